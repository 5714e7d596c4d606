//! The agent's TLS clients: to backends (one configuration per backend: the system's roots
//! plus its `ca_file`, never Airlock's own roots), and to webhooks and the bucket (the
//! system's roots plus the configured extra ones). The crypto provider is `tls::provider`,
//! the same as the server side's.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use crate::{config::Backend, tls::provider};

#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    #[error("backend `{backend}`: ca_file {path}: {message}")]
    CaFile {
        backend: String,
        path: std::path::PathBuf,
        message: String,
    },
    #[error("backend `{0}`: no trusted roots (the system store is empty and no `ca_file` is set)")]
    NoRoots(String),
    #[error("cannot trust the CA certificate: {0}")]
    Root(#[source] rustls::Error),
    #[error("TLS client configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// The system's trust store (unreadable entries are logged), without any of `excluded`.
pub fn system_roots(excluded: &[Vec<u8>]) -> Vec<CertificateDer<'static>> {
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "a system trust store entry could not be read");
    }
    native
        .certs
        .into_iter()
        .filter(|c| !excluded.iter().any(|o| o.as_slice() == c.as_ref()))
        .collect()
}

/// A client configuration trusting the system's roots and `extra` (webhooks, the bucket).
pub fn system_client(
    extra: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsClientError> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(system_roots(&[]));
    for c in extra {
        roots.add(c.clone()).map_err(TlsClientError::Root)?;
    }
    client(roots, &[])
}

fn client(
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsClientError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsClientError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Client configurations for the upstream side, one per backend.
#[derive(Debug, Clone)]
pub struct Upstream {
    configs: Vec<Option<Arc<rustls::ClientConfig>>>,
}

impl Upstream {
    /// System roots plus each backend's `ca_file`, minus every root of Airlock's own CA.
    pub fn new(backends: &[Backend], own_roots: &[Vec<u8>]) -> Result<Upstream, TlsClientError> {
        let system = system_roots(own_roots);
        let mut configs = Vec::with_capacity(backends.len());
        for b in backends {
            if !b.tls {
                configs.push(None);
                continue;
            }
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(system.iter().cloned());
            if let Some(path) = &b.ca_file {
                let ca_file = |message: String| TlsClientError::CaFile {
                    backend: b.name.clone(),
                    path: path.clone(),
                    message,
                };
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| ca_file(e.to_string()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| ca_file(e.to_string()))?;
                let certs: Vec<_> = certs
                    .into_iter()
                    .filter(|c| !own_roots.iter().any(|o| o.as_slice() == c.as_ref()))
                    .collect();
                if certs.is_empty() {
                    return Err(ca_file(
                        "holds no certificate (Airlock's own roots are never trusted upstream)"
                            .into(),
                    ));
                }
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ca_file("no usable certificate".into()));
                }
            }
            if roots.is_empty() {
                return Err(TlsClientError::NoRoots(b.name.clone()));
            }
            configs.push(Some(client(roots, &[b"http/1.1"])?));
        }
        Ok(Upstream { configs })
    }

    pub fn config(&self, backend_id: usize) -> Option<Arc<rustls::ClientConfig>> {
        self.configs.get(backend_id).cloned().flatten()
    }
}
