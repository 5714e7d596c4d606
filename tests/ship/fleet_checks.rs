//! Fleet checks of the security review: files retention removed locally stay verified in the
//! bucket; a host the verifier names but the bucket lacks is missing; a shipping state that
//! does not match the local manifest (or cannot be read) starts over, so retention keeps
//! never-shipped files. Same servers and helpers as `tests/ship.rs`.

use std::{process::Command, sync::atomic::Ordering};

use airlock::{config::Config, ship::Prepared};

use super::{
    AIRLOCK, BUCKET, Host, finish,
    s3::{S3Server, free_port},
    tempdir, verify, wait_until,
};

fn days_since_epoch() -> i64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400) as i64
}

#[test]
fn files_retention_removed_locally_stay_in_the_bucket_and_are_still_verified() {
    let dir = tempdir("retained");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let mut host = Host::new(&dir.join("runner-r"), "runner-r");
    host.add_file(3);
    host.add_file(2);
    let config = host.config(&server.endpoint(), "k", "s");
    let (shipper, published) = host.ship(&config);
    wait_until("two lines shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 2
    });
    let shipped = host.local_parquet();
    // Local retention deletes both (shipped) files and writes its line; the line ships too.
    host.writer
        .hold_retention(shipper.stats.lines_shipped.clone());
    let removed = host
        .writer
        .apply_retention(1, days_since_epoch() + 30)
        .unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(host.local_parquet().is_empty());
    published.notify_one();
    wait_until("the retention line shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 3
    });
    finish(&shipper);

    let key = format!("runner-r={}", host.public_key());
    let synced = server.data.join(BUCKET);
    let endpoint = server.endpoint();
    let cred = host.dir.join("ship.cred");
    let bucket = |extra: &[&str]| {
        let mut args = vec![
            "--fleet",
            "s3://fleet",
            "--endpoint",
            &endpoint,
            "--allow-http",
            "--credentials-file",
            cred.to_str().unwrap(),
            "--pubkey",
            &key,
        ];
        args.extend_from_slice(extra);
        verify(&args)
    };
    // The bucket keeps what the host deleted locally: that is what it is for.
    let (code, text) = bucket(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 host(s), 2 file(s), 5 record(s)"), "{text}");
    let (code, text) = verify(&["--fleet", synced.to_str().unwrap(), "--pubkey", &key]);
    assert_eq!(code, 0, "{text}");
    // The host's own archive, without the files, verifies too.
    let (code, text) = verify(&[
        "--archive",
        host.archive().to_str().unwrap(),
        "--pubkey",
        &key,
    ]);
    assert_eq!(code, 0, "{text}");

    // A retained file modified in the bucket is named: retention is no licence to differ.
    let object = server.object(BUCKET, &format!("host=runner-r/{}", shipped[0]));
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&object, &bytes).unwrap();
    let (code, text) = bucket(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!(
            "host=runner-r/{}: modified or truncated",
            shipped[0]
        )),
        "the modified retained file is named: {text}"
    );
}

#[test]
fn a_host_named_by_the_verifier_but_absent_from_the_bucket_is_missing() {
    let dir = tempdir("vanished");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let mut a = Host::new(&dir.join("runner-a"), "runner-a");
    let b = Host::new(&dir.join("runner-b"), "runner-b");
    a.add_file(2);
    let config = a.config(&server.endpoint(), "k", "s");
    let (shipper, _) = a.ship(&config);
    wait_until("shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 1
    });
    finish(&shipper);
    let synced = server.data.join(BUCKET);
    let ka = format!("runner-a={}", a.public_key());
    let kb = format!("runner-b={}", b.public_key());
    let (code, text) = verify(&["--fleet", synced.to_str().unwrap(), "--pubkey", &ka]);
    assert_eq!(code, 0, "{text}");
    // runner-b's whole archive gone from the bucket (or never there): named, not passed.
    let (code, text) = verify(&[
        "--fleet",
        synced.to_str().unwrap(),
        "--pubkey",
        &ka,
        "--pubkey",
        &kb,
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("host runner-b: no manifest") && text.contains("archive is missing"),
        "{text}"
    );
    // Pinned in the configuration (a fleet-wide `archive_key_fingerprints`): the same.
    let fingerprint = airlock::archive::manifest::fingerprint(&b.public_key()).unwrap();
    let conf = dir.join("verifier.toml");
    std::fs::write(
        &conf,
        format!(
            "state_dir = \"{d}/verifier-state\"\narchive_key_fingerprints = {{ runner-b = \"{fingerprint}\" }}\n\
             [[backend]]\nname = \"t\"\nhost = \"t.test\"\nport = 1\naddresses = [\"127.0.0.9\"]\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(AIRLOCK)
        .args(["--config", conf.to_str().unwrap(), "verify", "--fleet"])
        .args([synced.to_str().unwrap(), "--pubkey", &ka])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("host runner-b: no manifest"), "{text}");
}

#[test]
fn a_stale_or_corrupt_shipping_state_starts_over_and_retention_keeps_unshipped_files() {
    let dir = tempdir("stale");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let hostdir = dir.join("runner-s");
    let mut host = Host::new(&hostdir, "runner-s");
    host.add_file(2);
    host.add_file(3);
    let config = host.config(&server.endpoint(), "k", "s");
    let (shipper, _) = host.ship(&config);
    wait_until("two lines shipped", &shipper.stats, |s| {
        s.lines_shipped.load(Ordering::Relaxed) == 2
    });
    finish(&shipper);
    let prepared =
        |config: &Config| Prepared::new(config, config.ship.as_ref().unwrap()).expect("prepare");
    assert_eq!(
        prepared(&config)
            .stats
            .lines_shipped
            .load(Ordering::Relaxed),
        2,
        "a state that matches the manifest is resumed"
    );

    // The archive directory replaced (a new disk, a restore) while state_dir stays: its two
    // lines were never shipped, whatever the old state says.
    drop(host);
    std::fs::remove_dir_all(hostdir.join("archive")).unwrap();
    let mut host = Host::new(&hostdir, "runner-s");
    host.add_file(4);
    host.add_file(1);
    let p = prepared(&config);
    assert_eq!(
        p.stats.lines_shipped.load(Ordering::Relaxed),
        0,
        "a state that does not match the local manifest is not trusted"
    );
    host.writer.hold_retention(p.stats.lines_shipped.clone());
    let removed = host
        .writer
        .apply_retention(1, days_since_epoch() + 30)
        .unwrap();
    assert!(
        removed.is_empty(),
        "never-shipped files deleted: {removed:?}"
    );
    assert_eq!(host.local_parquet().len(), 2);

    // A corrupt state does not stop shipping: it starts over.
    std::fs::write(hostdir.join("state/ship-state.json"), b"{not json").unwrap();
    assert_eq!(
        prepared(&config)
            .stats
            .lines_shipped
            .load(Ordering::Relaxed),
        0
    );
}
