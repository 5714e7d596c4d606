//! TLS on both sides of Airlock.
//!
//! - [`ca`]: the managed CA on disk (roots, staged rotation).
//! - [`Minter`]: a name-constrained intermediate made at start, and leaf certificates minted on
//!   demand for the names clients ask for (SNI, or the original IP without SNI), cached until
//!   shortly before they expire. Only configured backends get a leaf.
//! - [`Upstream`]: rustls client configurations per backend: system roots plus the backend's
//!   `ca_file`, never Airlock's own roots.
//! - [`read_client_hello`]: reads the ClientHello into a small fixed buffer so Airlock can
//!   decide (intercept, splice, refuse) before answering it.
//!
//! Both sides prefer AES-128-GCM (ChaCha20 is several times slower on the CPUs we run on) and
//! offer only ALPN `http/1.1`.

pub mod ca;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType,
};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{Acceptor, ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt as _;

use crate::config::Backend;

/// Leaves live a day; re-minted when less than an hour is left.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
const LEAF_REFRESH_MARGIN: Duration = Duration::from_secs(3600);
/// The intermediate lives a week; the agent makes a new one every day.
const INTERMEDIATE_VALIDITY_DAYS: i64 = 7;
/// At most this many leaves are cached (one per backend name in practice).
const LEAF_CACHE_MAX: usize = 1024;

/// The ring provider with AES-128-GCM preferred.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The name a leaf is minted for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeafName {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafName::Dns(d) => f.write_str(d),
            LeafName::Ip(i) => write!(f, "{i}"),
        }
    }
}

struct Intermediate {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

/// Mints and caches leaves under a name-constrained intermediate.
pub struct Minter {
    intermediate: Intermediate,
    /// Names and addresses the intermediate may sign for (lower-case names).
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
    cache: Mutex<HashMap<LeafName, (Arc<CertifiedKey>, Instant)>>,
    provider: Arc<CryptoProvider>,
    /// One key for the leaves of this intermediate (made with it, replaced with it daily):
    /// a cache miss then costs one signature, not a key generation as well.
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
    pub minted: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("dns", &self.dns)
            .field("ips", &self.ips)
            .finish()
    }
}

impl Minter {
    /// The intermediate for `backends`, signed by the CA's active root.
    pub fn new(ca: &ca::Ca, backends: &[Backend], host: &str) -> Result<Minter, ca::CaError> {
        let (root, _) = ca.active_issuer()?;
        let mut dns = BTreeSet::new();
        let mut ips = BTreeSet::new();
        for b in backends.iter().filter(|b| b.tls) {
            match b.host.parse::<IpAddr>() {
                Ok(ip) => {
                    ips.insert(crate::keys::canonical_ip(ip));
                }
                Err(_) => {
                    dns.insert(b.host.trim_end_matches('.').to_ascii_lowercase());
                }
            }
            ips.extend(b.addresses.iter().copied());
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Airlock");
        dn.push(DnType::CommonName, format!("Airlock intermediate {host}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut permitted: Vec<GeneralSubtree> = dns
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect();
        permitted.extend(ips.iter().map(|ip| {
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                *ip,
                if ip.is_ipv4() { 32 } else { 128 },
            ))
        }));
        // With nothing permitted (no TLS backend), exclude everything rather than allow all.
        params.name_constraints = Some(if permitted.is_empty() {
            NameConstraints {
                permitted_subtrees: vec![],
                excluded_subtrees: vec![
                    GeneralSubtree::DnsName(String::new()),
                    GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix([0; 4], 0)),
                    GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix([0; 16], 0)),
                ],
            }
        } else {
            NameConstraints {
                permitted_subtrees: permitted,
                excluded_subtrees: vec![],
            }
        });
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(INTERMEDIATE_VALIDITY_DAYS);
        params.serial_number = Some(ca::random_serial());
        let cert = params.signed_by(&key, &root)?;
        let der = cert.der().clone();
        let provider = provider();
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf_signer = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                leaf_key.serialize_der(),
            )))
            .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
        Ok(Minter {
            intermediate: Intermediate {
                issuer: Issuer::new(params, key),
                der,
            },
            dns,
            ips,
            cache: Mutex::new(HashMap::new()),
            provider,
            leaf_key,
            leaf_signer,
            minted: Default::default(),
        })
    }

    /// Whether a leaf may be minted for `name` (a configured TLS backend's host or address).
    pub fn permits(&self, name: &LeafName) -> bool {
        match name {
            LeafName::Dns(d) => self.dns.contains(&d.to_ascii_lowercase()),
            LeafName::Ip(ip) => self.ips.contains(&crate::keys::canonical_ip(*ip)),
        }
    }

    /// The cached leaf for `name`, minted when missing or close to expiry.
    pub fn leaf(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, String> {
        if !self.permits(name) {
            return Err(format!("{name} is not a configured backend"));
        }
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((key, expires)) = cache.get(name)
            && *expires > now + LEAF_REFRESH_MARGIN
        {
            return Ok(key.clone());
        }
        let key = self
            .mint(name)
            .map_err(|e| format!("minting a leaf for {name}: {e}"))?;
        self.minted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= LEAF_CACHE_MAX {
                cache.retain(|_, (_, exp)| *exp > now + LEAF_REFRESH_MARGIN);
            }
            if cache.len() < LEAF_CACHE_MAX {
                cache.insert(name.clone(), (key.clone(), now + LEAF_VALIDITY));
            }
        }
        Ok(key)
    }

    /// Mint a leaf now (no cache): public for the benchmark of a cache miss.
    pub fn mint(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, rcgen::Error> {
        let mut params = CertificateParams::default();
        // A leaf for an address has an empty subject (its SAN, then critical, names it):
        // OpenSSL checks a common name that looks like a host name, `10.9.8.7` included,
        // against the intermediate's DNS constraints when the leaf has no DNS SAN, and fails
        // with "permitted subtree violation".
        let mut dn = DistinguishedName::new();
        if let LeafName::Dns(d) = name {
            dn.push(DnType::CommonName, d.clone());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(d) => SanType::DnsName(d.clone().try_into()?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(LEAF_VALIDITY.as_secs() as i64);
        params.serial_number = Some(ca::random_serial());
        let cert = params.signed_by(&self.leaf_key, &self.intermediate.issuer)?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.intermediate.der.clone()],
            self.leaf_signer.clone(),
        )))
    }
}

/// Picks the leaf by SNI (the shared server configuration); without SNI, the leaf chosen for
/// the connection beforehand.
#[derive(Debug)]
struct Resolver {
    minter: Arc<Minter>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(sni) => self.minter.leaf(&LeafName::Dns(sni.to_owned())).ok(),
            None => self.fallback.clone(),
        }
    }
}

/// Where a new intermediate comes from when the current one gets old (and where a staged
/// root rotation is picked up).
#[derive(Debug, Clone)]
pub struct MinterSource {
    pub ca_dir: std::path::PathBuf,
    pub backends: Vec<Backend>,
    pub host: String,
}

/// The intermediate is replaced after a day (it is valid for a week).
const INTERMEDIATE_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Server configurations for the client side of intercepted connections.
#[derive(Debug)]
pub struct Acceptors {
    current: std::sync::RwLock<(Arc<Minter>, Arc<ServerConfig>, Instant)>,
    source: Option<MinterSource>,
}

impl Acceptors {
    pub fn new(minter: Arc<Minter>) -> Acceptors {
        let shared = server_config(minter.clone(), None);
        Acceptors {
            current: std::sync::RwLock::new((minter, shared, Instant::now())),
            source: None,
        }
    }

    /// Like [`Acceptors::new`], making a new intermediate from `source` every day.
    pub fn with_refresh(minter: Arc<Minter>, source: MinterSource) -> Acceptors {
        let mut a = Acceptors::new(minter);
        a.source = Some(source);
        a
    }

    fn refresh_if_due(&self) {
        let due = self
            .current
            .read()
            .map(|c| c.2.elapsed() >= INTERMEDIATE_REFRESH)
            .unwrap_or(false);
        let Some(src) = self.source.as_ref().filter(|_| due) else {
            return;
        };
        let made =
            ca::Ca::load(&src.ca_dir).and_then(|ca| Minter::new(&ca, &src.backends, &src.host));
        if let Ok(mut cur) = self.current.write() {
            match made {
                Ok(m) => {
                    let m = Arc::new(m);
                    *cur = (m.clone(), server_config(m, None), Instant::now());
                    tracing::info!("made a new intermediate certificate");
                }
                Err(e) => {
                    // The old one is valid for days yet: retry in an hour.
                    tracing::warn!(error = %e, "cannot make a new intermediate certificate");
                    cur.2 += Duration::from_secs(3600);
                }
            }
        }
    }

    /// The configuration for a connection whose ClientHello named `sni`; without SNI, one
    /// that serves the leaf for the original address.
    pub fn config_for(
        &self,
        sni: Option<&str>,
        original_ip: IpAddr,
    ) -> Result<Arc<ServerConfig>, String> {
        self.refresh_if_due();
        let (minter, shared) = match self.current.read() {
            Ok(c) => (c.0.clone(), c.1.clone()),
            Err(p) => {
                let c = p.into_inner();
                (c.0.clone(), c.1.clone())
            }
        };
        match sni {
            Some(_) => Ok(shared),
            None => {
                let leaf = minter.leaf(&LeafName::Ip(original_ip))?;
                Ok(server_config(minter, Some(leaf)))
            }
        }
    }
}

fn server_config(minter: Arc<Minter>, fallback: Option<Arc<CertifiedKey>>) -> Arc<ServerConfig> {
    let provider = minter.provider.clone();
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { minter, fallback }));
    // Only HTTP/1.1: a client offering h2 and http/1.1 gets http/1.1; one offering only h2
    // gets a `no_application_protocol` alert (RFC 7301) instead of a protocol it cannot parse.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    Arc::new(cfg)
}

/// What the ClientHello said, and the bytes it came in (to splice them on untouched).
pub struct Hello {
    pub accepted: rustls::server::Accepted,
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
    pub bytes: Vec<u8>,
}

/// Read a ClientHello into a buffer of at most `max` bytes, within `timeout`.
pub async fn read_client_hello(
    stream: &mut tokio::net::TcpStream,
    max: usize,
    timeout: Duration,
) -> Result<Hello, String> {
    let read = async {
        let mut acceptor = Acceptor::default();
        let mut bytes = Vec::with_capacity(2048);
        let mut buf = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading the ClientHello: {e}"))?;
            if n == 0 {
                return Err("the client closed before finishing its ClientHello".to_owned());
            }
            bytes.extend_from_slice(&buf[..n]);
            if bytes.len() > max {
                return Err(format!("ClientHello larger than {max} bytes"));
            }
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                acceptor
                    .read_tls(&mut chunk)
                    .map_err(|e| format!("reading the ClientHello: {e}"))?;
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let hello = accepted.client_hello();
                    let sni = hello.server_name().map(str::to_owned);
                    let alpn = hello
                        .alpn()
                        .map(|a| a.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default();
                    return Ok(Hello {
                        accepted,
                        sni,
                        alpn,
                        bytes,
                    });
                }
                Ok(None) => continue,
                Err((e, _alert)) => return Err(format!("not a valid ClientHello: {e}")),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("no complete ClientHello within {} ms", timeout.as_millis()))?
}

#[cfg(test)]
mod tests;
