//! The relay without root, seccomp or a kernel: a real `Pipeline` (archive, policies) between
//! four pipes standing for the client's and the server's ends.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    sync::{Arc, atomic::Ordering::Relaxed},
};

use serde_json::{Value, json};

use super::relay::Relay;
use crate::{
    mcp::session::SessionKey,
    pipeline::tests_process::{TempDir, ctx, pipeline},
};

fn pipe() -> (File, File) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (File::from(r), File::from(w))
}

fn read_json(r: &mut BufReader<File>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn blocked_calls_stay_with_airlock_masked_values_cross_neither_way_and_junk_is_not_passed_on() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new("stdio-relay");
    let p = {
        let _in_runtime = rt.enter();
        Arc::new(pipeline(&dir))
    };
    let (client_in_r, mut client_w) = pipe(); // client → relay
    let (server_in_r, server_in_w) = pipe(); // relay → server's stdin
    let (server_out_r, mut server_w) = pipe(); // server's stdout → relay
    let (client_r, client_out_w) = pipe(); // relay → client
    let key = SessionKey {
        backend: "tools".into(),
        id: "stdio-1".into(),
    };
    let relay = Arc::new(
        Relay::new(
            p.clone(),
            ctx(),
            key,
            4096,
            rt.handle().clone(),
            client_out_w,
        )
        .unwrap(),
    );
    let r1 = relay.clone();
    let c2s = std::thread::spawn(move || r1.client_to_server(client_in_r, server_in_w));
    let r2 = relay.clone();
    let s2c = std::thread::spawn(move || {
        let end = r2.server_to_client(server_out_r);
        r2.close_client();
        end
    });
    let mut client = BufReader::new(client_r);
    let mut server = BufReader::new(server_in_r);

    let call = |id: u64, tool: &str, args: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": tool, "arguments": args}})
    };
    writeln!(
        client_w,
        "{}",
        call(1, "drop_table", json!({"name": "users"}))
    )
    .unwrap();
    writeln!(client_w, "{{\"jsonrpc\": \"2.0\", \"id\": 2,").unwrap(); // not JSON
    writeln!(client_w, "{}", "x".repeat(5000)).unwrap(); // over the line cap
    writeln!(
        client_w,
        "{}",
        call(3, "search", json!({"q": "bob@example.com"}))
    )
    .unwrap();

    // The client: Airlock's answers, in order; the server: only the call that passed, masked.
    let blocked = read_json(&mut client);
    assert_eq!(
        (blocked["id"].clone(), blocked["error"]["code"].clone()),
        (json!(1), json!(-32010))
    );
    let junk = read_json(&mut client);
    assert_eq!(junk["error"]["code"], -32700, "{junk}");
    let long = read_json(&mut client);
    assert_eq!(long["error"]["code"], -32600, "{long}");
    assert!(
        long["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_body_bytes")
    );
    let forwarded = read_json(&mut server);
    assert_eq!(forwarded["id"], 3);
    let q = forwarded["params"]["arguments"]["q"].as_str().unwrap();
    assert!(!q.contains("bob@example.com"), "{q}");

    // The server prints a log line, then answers with personal data.
    writeln!(server_w, "server starting...").unwrap();
    let answer = json!({"jsonrpc": "2.0", "id": 3,
                        "result": {"content": [{"type": "text", "text": "ask carol@example.com"}]}});
    writeln!(server_w, "{answer}").unwrap();
    let got = read_json(&mut client);
    assert_eq!(got["id"], 3, "the log line was not passed on: {got}");
    let text = got["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("ask ") && !text.contains("carol@example.com"),
        "{text}"
    );

    // The client closes: the server's stdin ends; the server exits: the client's output ends.
    drop(client_w);
    let mut rest = String::new();
    assert_eq!(server.read_line(&mut rest).unwrap(), 0, "{rest}");
    drop(server_w);
    assert_eq!(client.read_line(&mut rest).unwrap(), 0, "{rest}");
    c2s.join().unwrap().unwrap();
    s2c.join().unwrap().unwrap();
    relay.finish();
    assert_eq!(p.counters.blocked.load(Relaxed), 1);
    assert_eq!(p.counters.malformed.load(Relaxed), 3);
    rt.block_on(p.archive.close()).unwrap();
}
