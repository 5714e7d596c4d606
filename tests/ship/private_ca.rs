//! A bucket behind a private CA: nanio (SigV4 checked) with Debian's nginx terminating TLS in
//! front of it, its certificate signed by a CA the test makes. Without the CA, shipping and
//! `verify --fleet` fail with `UnknownIssuer` (and say what to do); with `[ship] ca_file` and
//! `--ca-file` (or the configuration's `ca_file`), both work, on top of the system's roots. The
//! command line shows no library's INFO lines on the way.

use std::{process::Command, sync::atomic::Ordering};

use super::{
    AIRLOCK, BUCKET, Host, assert_identical, finish,
    s3::{S3Server, TlsFront, files_under, free_port},
    tempdir, verify, wait_until,
};

#[test]
fn a_bucket_behind_a_private_ca_needs_its_ca_file_and_gets_nothing_without() {
    let dir = tempdir("private-ca");
    let server = S3Server::nanio(&dir.join("s3"), free_port(), BUCKET, "airlock", "secret");
    let front = TlsFront::start(&dir.join("nginx"), server.port);
    let endpoint = front.endpoint();
    let mut host = Host::new(&dir.join("runner-ca"), "runner-ca");
    host.add_file(3);
    host.add_file(2);

    // The system's roots alone: the certificate's issuer is unknown; nothing reaches the
    // bucket, and the error says what to set.
    let config = host.config(&endpoint, "airlock", "secret");
    let (shipper, _) = host.ship(&config);
    wait_until("a refused handshake", &shipper.stats, |s| {
        s.uploads_failed.load(Ordering::Relaxed) >= 1
    });
    let status = shipper.status();
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("UnknownIssuer") && error.contains("ca_file"),
        "the error names the cause and the fix: {error}"
    );
    assert_eq!(status.lines_shipped, 0, "{status:?}");
    finish(&shipper);
    assert!(files_under(&server.data.join(BUCKET)).is_empty());

    // `ca_file`: the bucket is trusted, the whole archive ships through nginx to nanio (whose
    // signature check still passes: the request arrives as signed).
    let with_ca = host.config_with(
        &endpoint,
        "airlock",
        "secret",
        &format!("ca_file = \"{}\"", front.ca.display()),
    );
    assert_eq!(
        with_ca.ship.as_ref().unwrap().ca_file.as_deref(),
        Some(front.ca.as_path())
    );
    let (shipper, _) = host.ship(&with_ca);
    wait_until("both lines shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 2
    });
    assert_eq!(shipper.status().uploads_failed, 0);
    finish(&shipper);
    assert_identical(&host, &server);

    // `verify --fleet` without the CA: the bucket cannot be read (exit 1), the error says why
    // and what to pass; stderr holds no INFO line of object_store retrying the handshake.
    let key = format!("runner-ca={}", host.public_key());
    let cred = host.dir.join("ship.cred");
    let bucket = |extra: &[&str]| {
        let mut args = vec![
            "--fleet",
            "s3://fleet",
            "--endpoint",
            &endpoint,
            "--credentials-file",
            cred.to_str().unwrap(),
            "--pubkey",
            &key,
        ];
        args.extend_from_slice(extra);
        verify(&args)
    };
    let (code, text) = bucket(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("UnknownIssuer") && text.contains("--ca-file"),
        "{text}"
    );
    assert!(
        !text.contains(" INFO ") && !text.contains("Encountered transport error"),
        "a library's INFO lines on the command line's stderr: {text}"
    );
    // With it: verified, on top of the system's roots.
    let ca = front.ca.to_str().unwrap();
    let (code, text) = bucket(&["--ca-file", ca]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 host(s), 2 file(s), 5 record(s)"), "{text}");
    assert!(!text.contains(" INFO "), "{text}");

    // A verifier's configuration with `[ship] ca_file` (and the endpoint) needs no flags for
    // them.
    let conf = dir.join("verifier.toml");
    let ship_section = |ca_file: &str| {
        format!(
            "state_dir = \"{d}/verifier-state\"\n\
             [[backend]]\nname = \"t\"\nhost = \"t.test\"\nport = 1\naddresses = [\"127.0.0.9\"]\n\
             [ship]\nurl = \"s3://{BUCKET}\"\nendpoint = \"{endpoint}\"\n\
             credentials_file = \"{cred}\"\nca_file = \"{ca_file}\"\n",
            d = dir.display(),
            cred = cred.display(),
        )
    };
    std::fs::write(&conf, ship_section(ca)).unwrap();
    let out = Command::new(AIRLOCK)
        .args(["--config", conf.to_str().unwrap(), "verify", "--fleet"])
        .args(["s3://fleet", "--pubkey", &key])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");

    // A file that is not a CA certificate: a configuration error naming the key (exit 2), and
    // for the flag, the flag.
    let not_pem = dir.join("not-a-ca.pem");
    std::fs::write(&not_pem, "just some text\n").unwrap();
    std::fs::write(&conf, ship_section(not_pem.to_str().unwrap())).unwrap();
    let out = Command::new(AIRLOCK)
        .args(["--config", conf.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ship.ca_file") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
    let (code, text) = bucket(&["--ca-file", not_pem.to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--ca-file") && text.contains("no PEM certificate"),
        "{text}"
    );
    let (code, text) = bucket(&["--ca-file", dir.join("missing.pem").to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("cannot read"), "{text}");
}
