//! Size limits: an event never exceeds what the sinks can carry (a UDP syslog datagram, the
//! spool's per-event limit); fields are cut, events are never dropped for their size. A
//! flood of refused connections costs a bounded number of events.

use std::{net::UdpSocket, time::Duration};

use serde_json::Value;

use super::{
    EventsConfig, ocsf,
    tests::{record, validate_ocsf},
};
use crate::config::events::{SyslogSink, SyslogTransport};
use crate::observe::{AgentEvent, Observer as _};

/// Largest UDP payload over IPv4.
const UDP_MAX: usize = 65_507;

/// A UDP syslog receiver and a config sending to it.
fn udp_receiver() -> (UdpSocket, EventsConfig) {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let cfg = EventsConfig {
        queue_capacity: 16,
        file: None,
        syslog: Some(SyslogSink {
            transport: SyslogTransport::Udp(rx.local_addr().unwrap().to_string()),
            facility: 16,
            app_name: "airlock".into(),
        }),
        webhook: None,
    };
    (rx, cfg)
}

/// The next datagram's OCSF JSON (after the RFC 5424 header), and the datagram's size.
fn receive(rx: &UdpSocket) -> (Value, usize) {
    let mut buf = vec![0u8; 70_000];
    let n = rx
        .recv(&mut buf)
        .expect("a datagram (an event too large for one is lost: EMSGSIZE)");
    let text = std::str::from_utf8(&buf[..n]).unwrap();
    let json = &text[text.find(" - {").expect("RFC 5424 header") + 3..];
    (serde_json::from_str(json).unwrap(), n)
}

/// Fleet mode: host names come from bucket keys. 70 junk 1,000-byte names (and a long
/// problem) make a finding that still fits a UDP datagram: the count and the first names,
/// each bounded; `airlock verify`'s own path sends it.
#[test]
fn a_verification_failure_of_many_junk_hosts_fits_a_udp_datagram() {
    let hosts: Vec<String> = (0..70)
        .map(|i| format!("{i:03}{}", "j".repeat(997)))
        .collect();
    let problems: Vec<String> = (0..50)
        .map(|i| format!("{i}: {}", "p".repeat(900)))
        .collect();
    let (rx, cfg) = udp_receiver();
    let all_sent =
        super::report_verification_failure(&cfg, "runner-7", None, &hosts, &problems).unwrap();
    assert!(all_sent);
    let (ev, size) = receive(&rx);
    assert!(size <= UDP_MAX, "{size}");
    assert!(ev.to_string().len() <= ocsf::MAX_EVENT_BYTES);
    assert_eq!(ev["class_uid"], 2004);
    assert_eq!(ev["unmapped"]["airlock"]["hosts"], 70);
    let resources = ev["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 8, "the first names only");
    assert!(resources[0]["name"].as_str().unwrap().starts_with("000jjj"));
    let message = ev["message"].as_str().unwrap();
    assert!(
        message.contains("archives of 70 hosts") && message.contains("and 62 more"),
        "{message}"
    );
    // One host's name past 1,024 bytes is cut there.
    let (rx, cfg) = udp_receiver();
    let long = vec!["h".repeat(5000)];
    super::report_verification_failure(&cfg, "runner-7", None, &long, &problems).unwrap();
    let (one, _) = receive(&rx);
    let name = one["resources"][0]["name"].as_str().unwrap();
    assert!(name.len() <= 1024 + "…".len(), "{}", name.len());
    validate_ocsf(&format!("{ev}\n{one}\n"));
}

/// Any event past the limit (here a record with hundreds of long rule ids and a huge tool
/// name) is cut to fit, and still reaches a UDP syslog receiver, schema-valid.
#[test]
fn an_oversized_event_is_cut_to_fit_never_dropped() {
    let mut r = record("request", "block");
    r.rules = (0..300)
        .map(|i| format!("rule-{i}-{}", "r".repeat(1000)))
        .collect();
    let mut big = ocsf::from_record(&r, "v").unwrap();
    big["unmapped"]["airlock"]["note"] = "\u{1}".repeat(100_000).into();
    assert!(big.to_string().len() > 300_000);
    let (rx, cfg) = udp_receiver();
    let events = super::Events::start(&cfg, "runner-7", None).unwrap();
    events.emit(&big);
    assert!(events.flush(Duration::from_secs(5)));
    let (ev, size) = receive(&rx);
    assert!(size <= UDP_MAX, "{size}");
    assert_eq!(ev["class_uid"], 6003);
    assert_eq!(
        ev["policy"]["uid"], big["policy"]["uid"],
        "short fields kept"
    );
    assert_eq!(ev["metadata"]["uid"], "a1b2-17:3");
    assert_eq!(
        events
            .stats
            .syslog
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    validate_ocsf(&format!("{ev}\n"));

    // Escaped text (6 bytes a character in JSON) converges too.
    let mut v =
        serde_json::json!({"class_uid": 1, "a": "\u{1}".repeat(50_000), "b": vec!["x"; 9000]});
    assert!(ocsf::fit(&mut v, 4096));
    assert!(v.to_string().len() <= 4096, "{}", v.to_string().len());
    assert_eq!(v["class_uid"], 1);
}

/// 500 refused connections through the observer: one event, then (at the flush, as at the
/// end of the interval) one summary counting the other 499; a refusal of another reason is
/// its own event. Both kinds validate against the OCSF schema.
#[test]
fn a_rejection_flood_is_one_event_and_a_summary() {
    let dir = std::env::temp_dir().join(format!("airlock-events-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("events.jsonl");
    let cfg = EventsConfig {
        queue_capacity: 64,
        file: Some(crate::config::events::FileSink {
            path: path.clone(),
            max_bytes: 1 << 20,
            keep: 1,
        }),
        syslog: None,
        webhook: None,
    };
    let events = super::Events::start(&cfg, "runner-7", None).unwrap();
    let rejected = |rule: &str, reason: &str, port: u16| AgentEvent::ConnectionRejected {
        rule: rule.into(),
        reason: reason.into(),
        client: format!("127.0.0.1:{port}"),
        actor: None,
        destination: None,
    };
    for i in 0..500 {
        events.on_event(&rejected(
            "airlock:unattributed",
            "no kernel record for this connection: x",
            20_000 + i,
        ));
    }
    events.on_event(&rejected(
        "airlock:over_capacity",
        "over capacity: too many",
        1,
    ));
    assert!(events.flush(Duration::from_secs(5)));
    let text = std::fs::read_to_string(&path).unwrap();
    let evs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(evs.len(), 3, "{text}");
    assert_eq!(
        events
            .stats
            .file
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the queue of 64 was never full"
    );
    assert_eq!(evs[0]["src_endpoint"]["port"], 20_000);
    assert_eq!(evs[1]["policy"]["uid"], "airlock:over_capacity");
    let sum = &evs[2];
    assert_eq!(sum["class_uid"], 4001);
    assert_eq!(sum["count"], 499);
    assert_eq!(sum["policy"]["uid"], "airlock:unattributed");
    assert!(sum["start_time"].as_i64() <= sum["end_time"].as_i64());
    validate_ocsf(&text);
    std::fs::remove_dir_all(&dir).unwrap();
}
