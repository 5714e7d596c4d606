//! Real S3-compatible servers for the shipping tests, from the venv `cargo xtask setup`
//! creates (`target/test-venv-s3`): PyPI `localbucket` (enforces create-only `If-None-Match:
//! *`, does not check signatures) and PyPI `nanio` (checks SigV4 signatures, does not enforce
//! create-only). Both keep a bucket as a directory of plain files: `data/<bucket>/<key>`.
//! Neither speaks TLS: [`TlsFront`] puts Debian's nginx in front of one, with a certificate
//! from a private CA the test makes (an object store behind a company CA). Loopback only.

#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub fn venv() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv-s3");
    assert!(
        dir.join("bin/localbucket").exists() && dir.join("bin/nanio").exists(),
        "{} lacks localbucket and nanio: run `cargo xtask setup`",
        dir.display()
    );
    dir
}

/// A port nothing listens on (yet).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct S3Server {
    child: Child,
    pub port: u16,
    /// The server's data directory: `data/<bucket>/<key>` are the objects.
    pub data: PathBuf,
    pub log: PathBuf,
}

impl S3Server {
    /// `localbucket DATA --port PORT` with `bucket` created.
    pub fn localbucket(data: &Path, port: u16, bucket: &str) -> S3Server {
        std::fs::create_dir_all(data.join(bucket)).unwrap();
        let mut cmd = Command::new(venv().join("bin/localbucket"));
        cmd.arg(data)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()]);
        Self::spawn(cmd, data, port, "localbucket")
    }

    /// `nanio serve` accepting only `access_key`/`secret_key` (SigV4 checked), with `bucket`.
    pub fn nanio(
        data: &Path,
        port: u16,
        bucket: &str,
        access_key: &str,
        secret_key: &str,
    ) -> S3Server {
        std::fs::create_dir_all(data.join(bucket)).unwrap();
        let mut cmd = Command::new(venv().join("bin/nanio"));
        cmd.args(["serve", "--data-dir"])
            .arg(data)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--log-level", "warning", "--no-access-log"])
            .env("NANIO_ACCESS_KEY", access_key)
            .env("NANIO_SECRET_KEY", secret_key);
        Self::spawn(cmd, data, port, "nanio")
    }

    fn spawn(mut cmd: Command, data: &Path, port: u16, name: &str) -> S3Server {
        let log = data.with_extension(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{name} exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{name} not listening after 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server {
            child,
            port,
            data: data.to_owned(),
            log,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The file holding object `key` of `bucket`.
    pub fn object(&self, bucket: &str, key: &str) -> PathBuf {
        self.data.join(bucket).join(key)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every regular file under `dir`, relative, sorted (a bucket as its server stores it).
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// nginx terminating TLS in front of an S3 server, with a certificate for `127.0.0.1` and
/// `localhost` signed by a private CA made here. `cargo xtask test` unpacks Debian's nginx into
/// `target/bench-nginx` (as `cargo xtask bench` does).
pub struct TlsFront {
    child: Child,
    pub port: u16,
    /// The private CA's certificate (PEM): what a client must be told to trust.
    pub ca: PathBuf,
    pub error_log: PathBuf,
}

impl TlsFront {
    pub fn nginx() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-nginx/usr/sbin/nginx")
    }

    pub fn start(dir: &Path, upstream: u16) -> TlsFront {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let nginx = Self::nginx();
        assert!(
            nginx.exists(),
            "{} is missing: run `cargo xtask test` (its setup unpacks Debian's nginx)",
            nginx.display()
        );
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(
            rcgen::DnType::CommonName,
            "Airlock test private object-store CA",
        );
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        let leaf = leaf.signed_by(&key, &issuer).unwrap();
        let (ca_pem, cert, key_file) = (dir.join("ca.pem"), dir.join("s3.pem"), dir.join("s3.key"));
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
        std::fs::write(&cert, leaf.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let port = free_port();
        let error_log = dir.join("error.log");
        let temp: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| format!("    {t}_temp_path {}/{t};\n", dir.display()))
            .collect();
        // One process (no master and workers a killed master would leave behind); the whole
        // request passed on as the client sent it, so a signature over it still holds.
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                r#"daemon off;
master_process off;
user root;
pid {d}/nginx.pid;
error_log {log} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp}
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"#,
                d = dir.display(),
                log = error_log.display(),
                cert = cert.display(),
                key = key_file.display(),
            ),
        )
        .unwrap();
        let out = std::fs::File::create(dir.join("nginx.out")).unwrap();
        let mut cmd = Command::new(&nginx);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", nginx.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "nginx exited with {status}: {}{}",
                    std::fs::read_to_string(dir.join("nginx.out")).unwrap_or_default(),
                    std::fs::read_to_string(&error_log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx not listening after 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        TlsFront {
            child,
            port,
            ca: ca_pem,
            error_log,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
