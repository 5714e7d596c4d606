use std::{net::IpAddr, path::PathBuf, sync::Arc};

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::config::{Backend, BackendMode, UnknownSni};

fn backend(host: &str, addresses: &[&str]) -> Backend {
    Backend {
        name: host.split('.').next().unwrap_or(host).to_owned(),
        host: host.to_owned(),
        port: 8443,
        tls: true,
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        ca_file: None,
        mode: BackendMode::Mcp,
        unknown_sni: UnknownSni::Reject,
        credentials_file: None,
        allow_http: Vec::new(),
    }
}

fn ca_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("airlock-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    ca::Ca::init(&d, "test").unwrap();
    d
}

fn client_config(dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let ca = ca::Ca::load(dir).unwrap();
    let mut roots = RootCertStore::empty();
    for r in ca.trusted_roots().unwrap() {
        roots.add(CertificateDer::from(r.der)).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A TLS handshake between a client trusting the CA and a server using `server`, over an
/// in-memory pipe; returns the negotiated ALPN or the client's error.
async fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<ServerConfig>,
    name: ServerName<'static>,
) -> Result<Option<Vec<u8>>, String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = tokio::spawn(async move {
        let mut s = tokio_rustls::TlsAcceptor::from(server)
            .accept(b)
            .await
            .ok()?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.ok()?;
        s.write_all(&buf).await.ok()?;
        s.flush().await.ok()
    });
    let mut c = tokio_rustls::TlsConnector::from(client)
        .connect(name, a)
        .await
        .map_err(|e| e.to_string())?;
    c.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"ping");
    let alpn = c.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let _ = srv.await;
    Ok(alpn)
}

#[tokio::test]
async fn leaf_for_a_backend_verifies_against_the_root_and_prefers_http11() {
    let dir = ca_dir("leaf");
    let ca = ca::Ca::load(&dir).unwrap();
    let minter = Arc::new(Minter::new(&ca, &[backend("mcp.internal.test", &[])], "h").unwrap());
    let acceptors = Acceptors::new(minter.clone());
    let cfg = acceptors
        .config_for(Some("mcp.internal.test"), "127.0.0.1".parse().unwrap())
        .unwrap();
    let alpn = handshake(
        client_config(&dir),
        cfg,
        ServerName::try_from("mcp.internal.test").unwrap(),
    )
    .await
    .unwrap();
    // The client offered h2 first; only HTTP/1.1 is spoken.
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    // Cached: a second connection mints nothing.
    let before = minter.minted.load(std::sync::atomic::Ordering::Relaxed);
    minter
        .leaf(&LeafName::Dns("MCP.internal.test".into()))
        .unwrap();
    minter
        .leaf(&LeafName::Dns("mcp.internal.test".into()))
        .unwrap();
    assert!(minter.minted.load(std::sync::atomic::Ordering::Relaxed) <= before + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn names_outside_the_constraints_are_neither_minted_nor_trusted() {
    let dir = ca_dir("constraints");
    let ca = ca::Ca::load(&dir).unwrap();
    let minter = Arc::new(Minter::new(&ca, &[backend("mcp.internal.test", &[])], "h").unwrap());
    assert!(minter.leaf(&LeafName::Dns("bank.example".into())).is_err());
    // Even a leaf forced out of the intermediate for another name fails verification:
    // the name constraint is in the chain, not only in our code.
    let forged = minter.mint(&LeafName::Dns("bank.example".into())).unwrap();
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(forged)));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let err = handshake(
        client_config(&dir),
        Arc::new(cfg),
        ServerName::try_from("bank.example").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("name") || err.contains("NotValidForName"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_sni_the_leaf_is_for_the_original_address() {
    let dir = ca_dir("ip");
    let ca = ca::Ca::load(&dir).unwrap();
    let minter =
        Arc::new(Minter::new(&ca, &[backend("mcp.internal.test", &["10.9.8.7"])], "h").unwrap());
    let acceptors = Acceptors::new(minter);
    let ip: IpAddr = "10.9.8.7".parse().unwrap();
    let cfg = acceptors.config_for(None, ip).unwrap();
    handshake(client_config(&dir), cfg, ServerName::IpAddress(ip.into()))
        .await
        .unwrap();
    assert!(
        acceptors
            .config_for(None, "10.9.8.8".parse().unwrap())
            .is_err()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A certificate as PEM, for `openssl`.
fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// Leaves verify in OpenSSL (what Python's `ssl` and Node use) as well as in rustls, under
/// an intermediate constrained to DNS names and addresses at once: an address leaf used to
/// carry its address as a common name, which OpenSSL checks against the DNS constraints
/// ("permitted subtree violation").
#[tokio::test]
async fn leaves_verify_in_openssl_too() {
    let dir = ca_dir("openssl");
    let ca = ca::Ca::load(&dir).unwrap();
    let minter = Minter::new(
        &ca,
        &[backend("mcp.internal.test", &["10.9.8.7", "fd00::7"])],
        "h",
    )
    .unwrap();
    let roots: String = ca
        .trusted_roots()
        .unwrap()
        .into_iter()
        .map(|r| r.pem)
        .collect();
    std::fs::write(dir.join("roots.pem"), roots).unwrap();
    for (name, check) in [
        (LeafName::Ip("10.9.8.7".parse().unwrap()), "-verify_ip"),
        (LeafName::Ip("fd00::7".parse().unwrap()), "-verify_ip"),
        (
            LeafName::Dns("mcp.internal.test".into()),
            "-verify_hostname",
        ),
    ] {
        let leaf = minter.leaf(&name).unwrap();
        std::fs::write(dir.join("leaf.pem"), pem(&leaf.cert[0])).unwrap();
        std::fs::write(dir.join("intermediate.pem"), pem(&leaf.cert[1])).unwrap();
        let out = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.join("roots.pem"))
            .arg("-untrusted")
            .arg(dir.join("intermediate.pem"))
            .args([check, &name.to_string()])
            .arg(dir.join("leaf.pem"))
            .output()
            .expect("openssl (the test needs the openssl command)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains(": OK"),
            "{name}: {text}"
        );
        // And rustls (webpki) agrees.
        let server_name = match &name {
            LeafName::Ip(ip) => ServerName::IpAddress((*ip).into()),
            LeafName::Dns(d) => ServerName::try_from(d.clone()).unwrap(),
        };
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(leaf)));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        handshake(client_config(&dir), Arc::new(cfg), server_name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn upstream_roots_never_include_airlocks_own() {
    let dir = ca_dir("upstream");
    let ca = ca::Ca::load(&dir).unwrap();
    let own: Vec<Vec<u8>> = ca
        .trusted_roots()
        .unwrap()
        .into_iter()
        .map(|r| r.der)
        .collect();
    // A backend whose ca_file is Airlock's own root is refused, not trusted.
    let mut b = backend("mcp.internal.test", &[]);
    b.ca_file = Some(dir.join("root-1.pem"));
    let err = crate::egress::tls::Upstream::new(&[b], &own)
        .unwrap_err()
        .to_string();
    assert!(err.contains("never trusted upstream"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
