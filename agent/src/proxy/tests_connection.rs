//! A [`Connection`]'s steps without root: a proxy with no kernel, fake [`Lookups`] (a flow
//! record, an attribution, a loopback dial), a real pipeline and archive in a temporary
//! directory, and loopback TCP pairs for the client and for an in-process MCP server.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{
    connection::{Connection, Lookups},
    refusal::Refusal,
    state::{AgentCounters, DialError, KernelCell, Proxy},
};
use crate::{
    archive::Record,
    attribution::{Attribution, NameCache},
    config::Config,
    observe::{AgentEvent, Observer},
    pipeline::tests_process::{TempDir, pipeline},
    registry::Registry,
};

/// The kernel's part, faked: one flow record for any key, the caller as given, and a plain
/// loopback dial.
struct FakeLookups {
    /// `None`: the kernel has no record of the connection.
    meta: Option<airlock_common::ConnMeta>,
    attribution: Attribution,
}

impl Lookups for FakeLookups {
    fn take_flow(
        &self,
        _: &Proxy,
        _: &airlock_common::FlowKey,
    ) -> Option<airlock_common::ConnMeta> {
        self.meta
    }

    async fn attribute(
        &self,
        _: &Proxy,
        _: airlock_common::ConnMeta,
    ) -> Result<Attribution, Refusal> {
        Ok(self.attribution.clone())
    }

    async fn dial(&self, _: &Proxy, addr: SocketAddr, _: u64) -> Result<TcpStream, DialError> {
        TcpStream::connect(addr)
            .await
            .map_err(DialError::NamespaceSocket)
    }
}

/// A proxy for backend `tools` at `server` (plain HTTP, `mode = "mcp"`), over the test
/// pipeline's archive, without a kernel.
fn proxy(dir: &TempDir, server: SocketAddr, max_connections: usize) -> Arc<Proxy> {
    let text = format!(
        "host = \"runner-1\"\nmax_connections = {max_connections}\n[[backend]]\nname = \"tools\"\nhost = \"mcp.internal.test\"\nport = {}\naddresses = [\"{}\"]\ntls = false\n",
        server.port(),
        server.ip()
    );
    let config = Config::parse(std::path::Path::new("/etc/airlock/airlock.toml"), &text)
        .expect("the test configuration parses");
    let pipeline = Arc::new(pipeline(dir));
    Arc::new(Proxy {
        backends: config.backends.iter().cloned().map(Arc::new).collect(),
        kernel: KernelCell::none(),
        registry: Arc::new(Registry::new(16)),
        counters: AgentCounters::default(),
        names: Arc::new(NameCache::new(Duration::from_secs(60))),
        listening_since_ns: 0,
        archive: pipeline.archive.clone(),
        session_prefix: "test".into(),
        pipeline,
        upstream_pool: Default::default(),
        tls: None,
        own: Arc::new(crate::kernel::OwnSockets::detached().expect("/dev/null opens")),
        targets: std::sync::RwLock::new(Vec::new()),
        resources: Arc::new(crate::limits::Limits::new(
            config.max_connections_per_uid,
            config.max_inflight_bytes_per_uid,
            config.max_parsed_bytes,
        )),
        host_netns: 0,
        namespaces: Mutex::new(crate::netns::Registry::default()),
        threads: std::sync::OnceLock::new(),
        enrolling: Mutex::new(()),
        cgroup: "/sys/fs/cgroup/airlock-test".into(),
        cgroup_mount: "/sys/fs/cgroup".into(),
        config,
    })
}

fn lookups(server: SocketAddr) -> FakeLookups {
    let attribution = crate::pipeline::tests_process::ctx().attribution.clone();
    let meta = airlock_common::ConnMeta {
        orig_addr: crate::keys::ip_words(server.ip()),
        orig_port: server.port(),
        orig_family: airlock_common::family::IPV4,
        backend_id: 0,
        pid: attribution.pid,
        tgid: attribution.tgid,
        uid: attribution.uid,
        gid: attribution.gid,
        comm: *b"python3\0\0\0\0\0\0\0\0\0",
        cgroup_id: attribution.cgroup_id,
        cookie: 1,
        connect_ns: 1,
        dialed_addr: crate::keys::ip_words(server.ip()),
        matched: 0,
        _pad: 0,
        netns: 0,
    };
    FakeLookups {
        meta: Some(meta),
        attribution: Attribution {
            original_dst: server,
            ..attribution
        },
    }
}

/// A client connection as the proxy's listener would accept it: (client side, accepted side,
/// the client's address).
async fn accepted() -> (TcpStream, TcpStream, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server_side, peer) = listener.accept().await.unwrap();
    (client, server_side, peer)
}

/// The rows of every Parquet file of the archive, once it is closed.
async fn archived(dir: &TempDir, proxy: &Proxy) -> Vec<Record> {
    proxy.archive.close().await.unwrap();
    let mut rows = Vec::new();
    let mut stack = vec![dir.0.join("archive")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                rows.extend(crate::archive::columns::read(&path).unwrap());
            }
        }
    }
    rows
}

/// `ConnectionRejected` events, by client address (tests run side by side: each looks for
/// its own client).
#[derive(Default)]
struct Rejections(Mutex<Vec<(String, String)>>);

impl Observer for Rejections {
    fn on_event(&self, event: &AgentEvent) {
        if let AgentEvent::ConnectionRejected { rule, client, .. } = event
            && let Ok(mut seen) = self.0.lock()
        {
            seen.push((client.clone(), rule.clone()));
        }
    }
}

/// A connection over `max_connections` leaves through the one refusal exit: counted,
/// recorded in the archive with its rule, evented, and the client reset, never served.
#[tokio::test]
async fn an_over_capacity_connection_is_refused_through_the_one_exit() {
    let dir = TempDir::new("conn-over-capacity");
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let proxy = proxy(&dir, server_addr, 1);
    let rejections = Arc::new(Rejections::default());
    crate::observe::install(rejections.clone());
    // One live connection already: the next is one too many.
    let _live = proxy
        .registry
        .open("127.0.0.1:1".parse().unwrap(), None, None);
    let (mut client, accepted, peer) = accepted().await;
    Connection::new(proxy.clone(), peer, 0, lookups(server_addr))
        .run(accepted)
        .await;

    assert_eq!(proxy.counters.rejected_over_capacity.load(Relaxed), 1);
    let mut buf = [0u8; 16];
    let read = client.read(&mut buf).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the client is reset: {read:?}"
    );
    assert!(
        rejections
            .0
            .lock()
            .unwrap()
            .contains(&(peer.to_string(), "airlock:over_capacity".into())),
        "evented"
    );
    let rows = archived(&dir, &proxy).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0].input;
    assert_eq!(row.kind, "connection");
    assert_eq!(row.decision, "block");
    assert_eq!(row.rules, vec!["airlock:over_capacity"]);
    assert_eq!(row.uid, Some(1000), "the refused caller is named");
    let payload = row.payload.as_ref().map(|p| p.as_str()).unwrap_or("");
    assert!(payload.contains("max_connections"), "{payload}");
}

/// A connection the kernel has no record of is refused through the same exit, before anything
/// is learnt of its caller: never an open proxy.
#[tokio::test]
async fn a_connection_without_a_kernel_record_is_refused_through_the_one_exit() {
    let dir = TempDir::new("conn-unattributed");
    let server_addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let proxy = proxy(&dir, server_addr, 16);
    let (mut client, accepted, peer) = accepted().await;
    let unknown = FakeLookups {
        meta: None,
        ..lookups(server_addr)
    };
    Connection::new(proxy.clone(), peer, 0, unknown)
        .run(accepted)
        .await;
    assert_eq!(proxy.counters.rejected_unattributed.load(Relaxed), 1);
    let mut buf = [0u8; 16];
    assert!(matches!(client.read(&mut buf).await, Ok(0) | Err(_)));
    let rows = archived(&dir, &proxy).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].input.rules, vec!["airlock:unattributed"]);
    assert_eq!(rows[0].input.uid, None, "nothing known of the caller");
}

/// An in-process MCP server that answers every `tools/call` with the arguments it received;
/// `(server address, bodies received)`.
async fn echo_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(body) = read_http(&mut sock).await {
                    let _ = tx.send(body.clone());
                    let request: Value = serde_json::from_str(&body).unwrap_or_default();
                    let answer = json!({"jsonrpc": "2.0", "id": request["id"], "result": {
                        "content": [{"type": "text",
                                     "text": request["params"]["arguments"].to_string()}]}});
                    let answer = answer.to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        answer.len()
                    );
                    if sock.write_all(head.as_bytes()).await.is_err()
                        || sock.write_all(answer.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// One HTTP/1.1 message with a `Content-Length` body, read whole; its body (`None` at the end
/// of the stream).
async fn read_http(sock: &mut TcpStream) -> Option<String> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&data[end + 4..end + 4 + len]).into_owned());
            }
        }
        let n = sock.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// POST one JSON-RPC message on `client`; the answer's body.
async fn post(client: &mut TcpStream, server: SocketAddr, body: &Value) -> Value {
    let body = body.to_string();
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_http(client))
        .await
        .expect("an answer within 10 s")
        .expect("an answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// An accepted MCP connection is served through the real pipeline: a call's personal data is
/// masked before the server sees it, a destructive call is answered by Airlock naming its
/// rule, and the archive holds the connection's open and close and every message.
#[tokio::test]
async fn an_mcp_connection_is_served_through_the_pipeline() {
    let dir = TempDir::new("conn-mcp");
    let (server_addr, mut received) = echo_server().await;
    let proxy = proxy(&dir, server_addr, 16);
    let (mut client, accepted, peer) = accepted().await;
    let run =
        tokio::spawn(Connection::new(proxy.clone(), peer, 0, lookups(server_addr)).run(accepted));

    let call = |id: u64, tool: &str, arguments: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": tool, "arguments": arguments}})
    };
    let answer = post(
        &mut client,
        server_addr,
        &call(1, "search", json!({"q": "mail bob@example.com"})),
    )
    .await;
    let seen = received.recv().await.expect("the server got the call");
    assert!(!seen.contains("bob@example.com"), "masked upstream: {seen}");
    assert!(seen.contains("[MASKED:email]"), "{seen}");
    assert_eq!(answer["id"], 1, "{answer}");
    assert!(!answer.to_string().contains("bob@example.com"), "{answer}");

    let answer = post(&mut client, server_addr, &call(2, "drop_table", json!({}))).await;
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no-destructive-tools"), "{answer}");
    assert!(
        received.try_recv().is_err(),
        "a blocked call never reaches the server"
    );

    drop(client);
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the connection ends when the client goes")
        .unwrap();
    assert_eq!(proxy.counters.relayed.load(Relaxed), 1);
    assert_eq!(proxy.pipeline.counters.blocked.load(Relaxed), 1);
    let rows = archived(&dir, &proxy).await;
    let events: Vec<&str> = rows.iter().map(|r| r.input.kind.as_str()).collect();
    assert_eq!(events.first(), Some(&"connection"), "{events:?}");
    assert_eq!(events.last(), Some(&"connection"), "{events:?}");
    let payloads: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.input.payload.as_ref().map(|p| p.as_str()))
        .collect();
    assert!(
        payloads.iter().all(|p| !p.contains("bob@example.com")),
        "{payloads:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.input.rules.contains(&"no-destructive-tools".to_owned())),
        "{events:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.input.decision == "mask" && r.input.tool.as_deref() == Some("search")),
        "the masked call's record says so: {events:?}"
    );
}
