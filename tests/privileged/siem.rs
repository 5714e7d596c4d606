//! The SIEM side of the audit-events tests: the receivers a user runs (Debian's `rsyslogd`
//! as a plain process, a Python stdlib HTTPS server with a certificate the test makes), and
//! the OCSF validation of what they received.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{Agent, PYTHON};

/// Debian's rsyslogd, receiving on TCP (octet-counted RFC 5424) and/or a Unix datagram
/// socket, writing each message's MSG (the JSON event) a line. Killed on drop.
pub struct Rsyslog {
    child: Child,
    out: PathBuf,
    dir: PathBuf,
}

impl Rsyslog {
    pub fn start(dir: &Path, tcp_port: Option<u16>, unix_socket: Option<&Path>) -> Rsyslog {
        Self::start_with(dir, tcp_port, None, unix_socket)
    }

    /// Also (or only) on UDP, `udp_port`.
    pub fn start_with(
        dir: &Path,
        tcp_port: Option<u16>,
        udp_port: Option<u16>,
        unix_socket: Option<&Path>,
    ) -> Rsyslog {
        assert!(
            Path::new("/usr/sbin/rsyslogd").exists(),
            "/usr/sbin/rsyslogd is missing: `cargo xtask setup` installs Debian's rsyslog"
        );
        let dir = dir.join(format!(
            "rsyslog-{}-{}",
            tcp_port.unwrap_or(0),
            udp_port.unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("events.log");
        let mut conf = format!(
            "global(workDirectory=\"{d}\" maxMessageSize=\"64k\")\n\
             template(name=\"airlock\" type=\"string\" string=\"%app-name% %syslogfacility-text% %syslogseverity-text% %msgid% %msg%\\n\")\n",
            d = dir.display()
        );
        if let Some(p) = tcp_port {
            conf.push_str(&format!(
                "module(load=\"imtcp\")\ninput(type=\"imtcp\" port=\"{p}\" address=\"127.0.0.1\")\n"
            ));
        }
        if let Some(p) = udp_port {
            conf.push_str(&format!(
                "module(load=\"imudp\")\ninput(type=\"imudp\" port=\"{p}\" address=\"127.0.0.1\")\n"
            ));
        }
        if let Some(s) = unix_socket {
            conf.push_str(&format!(
                "module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imuxsock\" Socket=\"{}\" UseSpecialParser=\"off\" ParseHostname=\"on\")\n",
                s.display()
            ));
        }
        conf.push_str(&format!(
            "action(type=\"omfile\" file=\"{}\" template=\"airlock\")\n",
            out.display()
        ));
        let conf_path = dir.join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = std::fs::File::create(dir.join("rsyslogd.log")).unwrap();
        let child = Command::new("/usr/sbin/rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start rsyslogd");
        let r = Rsyslog { child, out, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = tcp_port
                .is_none_or(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
                && unix_socket.is_none_or(Path::exists)
                // UDP cannot be probed: rsyslogd writes its pid file once its inputs run.
                && (udp_port.is_none() || r.dir.join("rsyslogd.pid").exists());
            if up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not start: {}",
                std::fs::read_to_string(r.dir.join("rsyslogd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// Received lines: (app-name, facility, severity, msgid, the JSON event).
    pub fn events(&self) -> Vec<(String, String, String, String, Value)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(5, ' ');
                let app = parts.next()?.to_owned();
                let fac = parts.next()?.to_owned();
                let sev = parts.next()?.to_owned();
                let msgid = parts.next()?.to_owned();
                let json = serde_json::from_str(parts.next()?.trim()).unwrap_or_else(|e| {
                    panic!("rsyslog received a MSG that is not JSON ({e}): {l}")
                });
                Some((app, fac, sev, msgid, json))
            })
            .collect()
    }

    pub fn raw(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Wait until `pred` holds for the received events.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let evs: Vec<Value> = self.events().into_iter().map(|e| e.4).collect();
            if pred(&evs) {
                return evs;
            }
            assert!(
                Instant::now() < deadline,
                "rsyslog did not receive {what}; it has:\n{}",
                self.raw()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// JSON lines of a file (the file sink).
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Validate events against OCSF 1.7.0 (the official export with its profiles, and
/// pydantic-ocsf's models), as the unit test does.
pub fn validate_ocsf(events: &[Value]) {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv-ocsf/bin/python");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask setup` creates it (pydantic-ocsf, ocsf-json-schema)",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/ocsf_validate.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        for e in events {
            writeln!(stdin, "{e}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "events from a real run fail OCSF validation:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

pub fn is_class(e: &Value, class: u64, activity: u64) -> bool {
    e["class_uid"] == class && e["activity_id"] == activity
}

pub fn blocked_call(e: &Value, tool: &str) -> bool {
    e["class_uid"] == 6003 && e["disposition_id"] == 2 && e["resources"][0]["name"] == tool
}

pub fn masked(e: &Value) -> bool {
    e["class_uid"] == 6003 && e["action"] == "Modified"
}

pub fn counter(agent: &Agent, name: &str) -> u64 {
    agent.status()["agent_counters"][name].as_u64().unwrap_or(0)
}

/// The user's HTTPS receiver: Python's stdlib server with a certificate the test made;
/// appends each POSTed body as a line to `out`. Killed on drop.
pub struct HttpsReceiver(Child);

const RECEIVER: &str = r#"
import http.server, ssl, sys
port, cert, key, out, auth = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Authorization") != auth:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(out, "ab") as f:
            f.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the test's readiness probe connects without TLS
srv = S(("127.0.0.1", port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

impl HttpsReceiver {
    pub fn start(dir: &Path, port: u16, out: &Path) -> HttpsReceiver {
        let child = Command::new(PYTHON)
            .args(["-c", RECEIVER, &port.to_string()])
            .arg(dir.join("hook.pem"))
            .arg(dir.join("hook.key"))
            .arg(out)
            .arg(HOOK_AUTH)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the HTTPS receiver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        HttpsReceiver(child)
    }
}

impl Drop for HttpsReceiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the receiver expects in `Authorization` (the agent reads it from a 0600 file).
pub const HOOK_AUTH: &str = "Splunk 0b6a1f3e-hec-token-for-tests";

/// A CA and a `localhost` certificate for the receiver; returns the CA's file.
pub fn receiver_pki(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "SIEM receiver test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("hook-ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("hook.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("hook.key"), key.serialize_pem()).unwrap();
    dir.join("hook-ca.pem")
}

/// Events of the file sink once `pred` holds for them.
pub fn wait_file(path: &Path, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let evs = json_lines(path);
        if pred(&evs) {
            return evs;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in {}: {evs:#?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
