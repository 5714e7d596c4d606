//! TLS towards the backend and towards the client: an untrusted server certificate, and a
//! ClientHello naming no configured backend.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use crate::harness::*;

/// The server's certificate is not trusted upstream (no `ca_file`, not in the system store):
/// the client gets a 502 naming the reason, at once, and the failure is recorded.
#[test]
fn untrusted_server_certificate_gives_a_readable_502_and_a_record() {
    let Some((cg, mut agent, _server, port, bundle)) = tls_setup("badcert", "") else {
        return;
    };
    let started = Instant::now();
    let res = probe(
        &cg,
        &agent.dir,
        &bundle,
        &format!("https://{HOST}:{port}/mcp"),
        "",
    );
    assert!(started.elapsed() < Duration::from_secs(10), "not a hang");
    assert_eq!(res["status"], 502, "{res}");
    let body = res["body"].as_str().unwrap();
    assert!(body.contains("cannot reach backend `tools`"), "{body}");
    assert!(body.to_lowercase().contains("certificate"), "{body}");
    assert!(agent.sigterm().success());
    let records = archived_records(&agent.archive);
    assert!(
        records.iter().any(|r| r["kind"] == "error"
            && r["payload"]
                .as_str()
                .unwrap_or("")
                .contains("\"status\":502")),
        "{records:#?}"
    );
}

/// A ClientHello naming no configured backend is refused by default (fail closed), and with
/// `unknown_sni = "splice"` passed to the server untouched (the client sees the server's own
/// certificate, not one of Airlock's).
#[test]
fn unknown_sni_is_refused_or_spliced_per_config() {
    let Some((cg, mut agent, server, port, _bundle)) =
        tls_setup("sni-reject", "ca_file = \"BACKEND_CA\"")
    else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    let refused = probe(&cg, &agent.dir, Path::new("/dev/null"), &url, "other.test");
    assert_eq!(refused["handshake"], false, "{refused}");
    // The refusal and its reason are in `airlock status`.
    agent.wait_for_connection_text("SNI `other.test` names no backend");
    assert!(agent.sigterm().success());
    drop((cg, agent, server));

    let Some((cg, agent, _server, port, _bundle)) = tls_setup(
        "sni-splice",
        "ca_file = \"BACKEND_CA\"\nunknown_sni = \"splice\"",
    ) else {
        return;
    };
    let url = format!("https://{HOST}:{port}/mcp");
    let spliced = probe(&cg, &agent.dir, Path::new("/dev/null"), &url, "other.test");
    assert_eq!(spliced["handshake"], true, "{spliced}");
    // The certificate is the server's own (its PEM, in DER, is what the client saw).
    let server_pem = std::fs::read_to_string(agent.dir.join("server.pem")).unwrap();
    let server_der = airlock::tls::ca::pem_to_der(&server_pem).unwrap();
    let seen: Vec<u8> = (0..spliced["cert"].as_str().unwrap().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&spliced["cert"].as_str().unwrap()[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(seen, server_der);
}
