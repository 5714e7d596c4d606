//! The TLS bench's peers: the MCP server (this binary re-run with `--serve`), the reference
//! proxy (Debian's nginx, unpacked by `cargo xtask bench` under `target/bench-nginx`), the
//! backend PKI, and what /proc says about a process (CPU from `schedstat`, resident memory).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

pub const HOST: &str = "mcp.internal.test";
/// Events in one streamed answer (`tools/call` of the `stream` tool).
pub const SSE_EVENTS: usize = 2000;

pub fn request_for(tool: &str) -> Bytes {
    let text = "x".repeat(200);
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{tool}","arguments":{{"text":"{text}"}}}}}}"#
    ))
}

/// A 1 KiB result with values the shipped policies mask (emails, a card, an AWS key id).
fn secret_response_body() -> Bytes {
    let mut text = String::new();
    for i in 0..6 {
        text.push_str(&format!(
            "contact user{i}@example.com about card 4111 1111 1111 1111; "
        ));
    }
    text.push_str("key AKIAIOSFODNN7EXAMPLE ");
    while text.len() < 900 {
        text.push('z');
    }
    result(&text)
}

fn result(text: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"{text}"}}],"isError":false}}}}"#
    ))
}

/// The `stream` tool's answer: [`SSE_EVENTS`] log notifications, then the result.
fn sse_events() -> Vec<Bytes> {
    let mut out: Vec<Bytes> = (0..SSE_EVENTS)
        .map(|i| {
            Bytes::from(format!(
                "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"level\":\"info\",\"logger\":\"bench\",\"data\":\"progress {i} of the long-running tool, {pad}\"}}}}\n\n",
                pad = "p".repeat(80)
            ))
        })
        .collect();
    let mut last = b"event: message\ndata: ".to_vec();
    last.extend_from_slice(&result(&"y".repeat(900)));
    last.extend_from_slice(b"\n\n");
    out.push(Bytes::from(last));
    out
}

/// The server: HTTPS, one thread, answers every request with a 1 KiB JSON-RPC result (or
/// the masked-values one, or an SSE stream, by tool name).
pub fn serve(cert: &str, key: &str, ports: &[String]) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(airlock::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut handles = Vec::new();
        for p in ports {
            let l = tokio::net::TcpListener::bind(("127.0.0.2", p.parse::<u16>().unwrap()))
                .await
                .unwrap();
            let acceptor = acceptor.clone();
            handles.push(tokio::spawn(async move {
                let (plain, secret) = (result(&"y".repeat(900)), secret_response_body());
                let events = Arc::new(sse_events());
                loop {
                    let Ok((tcp, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let (plain, secret, events) = (plain.clone(), secret.clone(), events.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let (plain, secret, events) =
                                    (plain.clone(), secret.clone(), events.clone());
                                async move {
                                    Ok::<_, std::convert::Infallible>(
                                        answer(req, plain, secret, events).await,
                                    )
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    });
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
    });
}

type AnswerBody = http_body_util::Either<
    Full<Bytes>,
    StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
        >,
    >,
>;

async fn answer(
    req: http::Request<hyper::body::Incoming>,
    plain: Bytes,
    secret: Bytes,
    events: Arc<Vec<Bytes>>,
) -> http::Response<AnswerBody> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let tool = |name: &str| {
        let needle = format!("\"name\":\"{name}\"");
        body.windows(needle.len()).any(|w| w == needle.as_bytes())
    };
    if tool("stream") {
        let frames: Vec<_> = events
            .iter()
            .map(|e| Ok(hyper::body::Frame::data(e.clone())))
            .collect();
        let mut r = http::Response::new(http_body_util::Either::Right(StreamBody::new(
            futures_util::stream::iter(frames),
        )));
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        return r;
    }
    let body = if tool("contact") { secret } else { plain };
    let mut r = http::Response::new(http_body_util::Either::Left(Full::new(body)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// nginx as a plain TLS reverse proxy: terminate, re-encrypt to the server (verified, SNI),
/// keep-alive upstream connections, no inspection, no access log; one worker per agent
/// thread.
pub struct Nginx {
    pub child: Child,
}

impl Nginx {
    pub fn binary() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-nginx/usr/sbin/nginx")
    }

    pub fn start(dir: &Path, port: u16, upstream: u16, pki: &Pki, workers: usize) -> Nginx {
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let conf = prefix.join("nginx.conf");
        let temp: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|t| format!("    {t}_temp_path {}/{t};\n", prefix.display()))
            .collect();
        std::fs::write(
            &conf,
            format!(
                r#"daemon off;
user root;
worker_processes {workers};
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp}
    upstream mcp {{ server 127.0.0.2:{upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.2:{port} ssl;
        server_name {HOST};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 1000000;
        location / {{
            proxy_pass https://mcp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {HOST};
            proxy_ssl_server_name on;
            proxy_ssl_name {HOST};
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#,
                p = prefix.display(),
                cert = pki.cert.display(),
                key = pki.key.display(),
                ca = pki.ca.display(),
            ),
        )
        .unwrap();
        let child = Command::new(Nginx::binary())
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.join("logs/error.log"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): run `cargo xtask bench` (it unpacks nginx)",
                    Nginx::binary().display()
                )
            });
        wait_port(port);
        Nginx { child }
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut out = vec![master];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, a)| a.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(master) {
                out.push(pid);
            }
        }
        out
    }
}

pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (nginx's upstream check) takes a leaf whose issuer equals its
    // own subject for self-signed.
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "airlock bench CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![HOST.to_owned()]).unwrap();
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, HOST);
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert, leaf.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.2", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time of every thread of these processes, nanoseconds (`schedstat`: time on a CPU,
/// counted by the scheduler, not sampled in ticks).
pub fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            total += std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}
