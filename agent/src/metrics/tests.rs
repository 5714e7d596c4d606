//! Names, suffixes and labels as OpenMetrics 1.0, the Prometheus text format 0.0.4 and
//! Prometheus's naming rules want them; which format a scraper's `Accept` gets.

use super::*;
use crate::archive::MaskedPayload;

fn record(kind: &str, direction: &str, decision: &str) -> RecordInput {
    RecordInput {
        kind: kind.into(),
        direction: direction.into(),
        decision: decision.into(),
        backend: Some("tools".into()),
        user: Some("alice".into()),
        pid: Some(42),
        session_id: "c1-7".into(),
        tool: Some("delete_everything".into()),
        jsonrpc_id: Some("3".into()),
        ..Default::default()
    }
}

fn scrape(m: &Metrics) -> String {
    encode(&m.registry(None), Format::OpenMetrics).unwrap()
}

/// A registry with a sample in every family the data path feeds.
fn busy() -> Metrics {
    let m = Metrics::new(["tools"]);
    let mut answer = record("response", "server_to_client", "mask");
    answer.method = Some("tools/call".into());
    answer.latency_us = Some(1500);
    answer.masked_detectors = vec!["email".into()];
    m.on_record(&answer);
    m.on_record(&record("request", "client_to_server", "block"));
    let mut approval = record("approval", "client_to_server", "approved");
    approval.payload = Some(MaskedPayload::agent_event(
        &serde_json::json!({"approval_id": 1, "by_uid": 0}),
    ));
    m.on_record(&approval);
    m.on_event(&AgentEvent::PolicyReloaded {
        hash: "sha256:1".into(),
        reason: "SIGHUP".into(),
    });
    m.on_event(&AgentEvent::ToolDefinitionChanged {
        backend: "tools".into(),
        tool: "add".into(),
        pinned: "a".into(),
        seen: "b".into(),
    });
    m
}

/// Every sample's family is declared by a HELP and a TYPE line before it, as `format` names
/// families (OpenMetrics: a counter's family without `_total`; Prometheus 0.0.4: the sample's
/// own name, `_total` included). Returns the families with samples.
fn declared_families(text: &str, format: Format) -> Vec<String> {
    let mut help = std::collections::HashSet::new();
    let mut types = std::collections::HashMap::new();
    let mut seen = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(help.insert(name.to_owned()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            assert!(help.contains(name), "TYPE before HELP for {name}");
            types.insert(name.to_owned(), ty.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap();
        let family = [
            (name, ""),
            (name.strip_suffix("_bucket").unwrap_or(""), "histogram"),
            (name.strip_suffix("_sum").unwrap_or(""), "histogram"),
            (name.strip_suffix("_count").unwrap_or(""), "histogram"),
            (name.strip_suffix("_total").unwrap_or(""), "counter"),
        ]
        .into_iter()
        .find(|(f, ty)| {
            !f.is_empty()
                && types.get(*f).is_some_and(|t| ty.is_empty() || t == ty)
                && (format == Format::OpenMetrics || *ty != "counter")
        })
        .unwrap_or_else(|| panic!("{format:?}: no HELP and TYPE for the sample `{line}`:\n{text}"))
        .0;
        if !seen.iter().any(|s| s == family) {
            seen.push(family.to_owned());
        }
    }
    seen
}

#[test]
fn both_formats_declare_help_and_type_for_every_family() {
    let registry = busy().registry(None);
    let om = encode(&registry, Format::OpenMetrics).unwrap();
    let prom = encode(&registry, Format::Prometheus).unwrap();
    let om_families = declared_families(&om, Format::OpenMetrics);
    let prom_families = declared_families(&prom, Format::Prometheus);
    assert!(om_families.len() >= 8, "{om}");
    assert_eq!(om_families.len(), prom_families.len(), "{om}\n{prom}");
    // Prometheus 0.0.4: a counter is declared under its sample's name, `_total` included;
    // no OpenMetrics-only lines.
    assert!(
        prom.contains("# HELP airlock_mcp_blocked_calls_total Calls"),
        "{prom}"
    );
    assert!(prom.contains("# TYPE airlock_mcp_blocked_calls_total counter\n"));
    assert!(prom.contains("# TYPE airlock_mcp_operation_duration_seconds histogram\n"));
    assert!(prom.contains("# TYPE airlock_build_info gauge\n"));
    assert!(
        !prom.contains("# EOF") && !prom.contains("# UNIT"),
        "{prom}"
    );
    // The same series in both (label order and number spelling may differ: `le="1.0"` and
    // `le="1"` are the same bucket to a parser).
    let samples = |t: &str| {
        let mut v: Vec<String> = t
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    assert_eq!(samples(&om), samples(&prom));
}

#[test]
fn the_format_follows_accept() {
    use Format::*;
    let cases: &[(&[&str], Format)] = &[
        // No preference, or the classic format asked for: Prometheus 0.0.4.
        (&[], Prometheus),
        (&["text/plain;version=0.0.4"], Prometheus),
        (&["text/plain; version=0.0.4; charset=utf-8"], Prometheus),
        (&["*/*"], Prometheus),
        (&["application/json"], Prometheus),
        (
            &["text/plain;q=0.9, application/openmetrics-text;q=0.5"],
            Prometheus,
        ),
        (&["application/openmetrics-text;q=0"], Prometheus),
        (&["application/openmetrics-text;q=nonsense"], Prometheus),
        (&[";;;,,,=q"], Prometheus),
        // OpenMetrics asked for: Prometheus 2.42 (Debian's) and 3.x scrapers.
        (
            &[
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            ],
            OpenMetrics,
        ),
        (
            &[
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
            ],
            OpenMetrics,
        ),
        (
            &["Application/OpenMetrics-Text; Version=1.0.0"],
            OpenMetrics,
        ),
        (&["text/html", "application/openmetrics-text"], OpenMetrics),
    ];
    for (accept, want) in cases {
        assert_eq!(
            Format::negotiate(accept.iter().copied()),
            *want,
            "{accept:?}"
        );
    }
}

/// The value of the sample line starting with `series` (name and labels, exactly).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[test]
fn openmetrics_names_types_units_and_eof() {
    let m = Metrics::new(["tools"]);
    let mut answer = record("response", "server_to_client", "mask");
    answer.method = Some("tools/call".into());
    answer.latency_us = Some(1500);
    answer.masked_detectors = vec!["email".into(), "email".into(), "aws_key".into()];
    m.on_record(&answer);
    let text = scrape(&m);
    // OpenMetrics: a counter's family (TYPE line) has no `_total`; its sample has it.
    assert!(
        text.contains("# TYPE airlock_mcp_messages counter\n"),
        "{text}"
    );
    assert!(
        !text.contains("# TYPE airlock_mcp_messages_total"),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_messages_total{backend=\"tools\",direction=\"server_to_client\",kind=\"response\",decision=\"mask\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // Base units: the unit is the name's suffix, and declared.
    assert!(text.contains("# TYPE airlock_mcp_operation_duration_seconds histogram\n"));
    assert!(text.contains("# UNIT airlock_mcp_operation_duration_seconds seconds\n"));
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_operation_duration_seconds_count{backend=\"tools\",method=\"tools/call\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_operation_duration_seconds_bucket{le=\"0.0025\",backend=\"tools\",method=\"tools/call\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_masked_values_total{backend=\"tools\",detector=\"email\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_masked_values_total{backend=\"tools\",detector=\"aws_key\"}"
        ),
        Some(1.0)
    );
    assert!(text.contains("airlock_build_info{version=\""));
    assert!(text.ends_with("# EOF\n"));
    // Every family is ours, and every counter sample ends in `_total`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("airlock_"), "{line}");
    }
    for family in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
    {
        assert!(!family.ends_with("_total"), "{family}");
        assert!(
            text.lines()
                .filter(|l| l.starts_with(family) && !l.starts_with('#'))
                .all(|l| l.starts_with(&format!("{family}_total"))),
            "{family}: {text}"
        );
    }
}

#[test]
fn a_blocked_call_counts_once_and_no_identity_label_exists() {
    let m = Metrics::new(["tools"]);
    // A blocked call: the request, and Airlock's error answer, both `block`.
    m.on_record(&record("request", "client_to_server", "block"));
    m.on_record(&record("error", "server_to_client", "block"));
    // Not MCP messages: counted elsewhere, or not at all.
    m.on_record(&record("connection", "client_to_server", "allow"));
    m.on_record(&record("http", "client_to_server", "allow"));
    let text = scrape(&m);
    assert_eq!(
        sample(&text, "airlock_mcp_blocked_calls_total{backend=\"tools\"}"),
        Some(1.0),
        "{text}"
    );
    let messages: f64 = text
        .lines()
        .filter(|l| l.starts_with("airlock_mcp_messages_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(messages, 2.0, "{text}");
    for forbidden in [
        "user=",
        "pid=",
        "session",
        "tool=",
        "jsonrpc",
        "alice",
        "delete_everything",
    ] {
        assert!(!text.contains(forbidden), "{forbidden} in {text}");
    }
}

#[test]
fn labels_stay_bounded() {
    let m = Metrics::new(["tools"]);
    let mut r = record("response", "server_to_client", "something-new");
    r.backend = Some("not-configured".into());
    r.method = Some("x/made-up-by-a-client".into());
    r.latency_us = Some(10);
    r.masked_detectors = (0..200).map(|i| format!("detector-{i}")).collect();
    m.on_record(&r);
    let text = scrape(&m);
    assert!(text.contains("backend=\"other\""), "{text}");
    assert!(text.contains("method=\"other\""), "{text}");
    assert!(text.contains("decision=\"other\""), "{text}");
    let detectors = text
        .lines()
        .filter(|l| l.starts_with("airlock_mcp_masked_values_total"))
        .count();
    assert_eq!(detectors, MAX_DETECTORS + 1, "capped, the rest `other`");
}

#[test]
fn held_calls_by_outcome_and_policy_events() {
    let m = Metrics::new(["tools"]);
    let approval = |decision: &str, by_uid: serde_json::Value| {
        let mut r = record("approval", "client_to_server", decision);
        r.payload = Some(MaskedPayload::agent_event(
            &serde_json::json!({"approval_id": 1, "by_uid": by_uid}),
        ));
        r
    };
    m.on_record(&approval("approved", 0.into()));
    m.on_record(&approval("denied", 0.into()));
    m.on_record(&approval("denied", serde_json::Value::Null));
    m.on_event(&AgentEvent::PolicyRefused {
        error: "bad".into(),
        reason: "SIGHUP".into(),
    });
    m.on_event(&AgentEvent::ToolDefinitionChanged {
        backend: "tools".into(),
        tool: "add".into(),
        pinned: "a".into(),
        seen: "b".into(),
    });
    let text = scrape(&m);
    for outcome in ["approved", "denied", "timed_out"] {
        assert_eq!(
            sample(
                &text,
                &format!("airlock_mcp_held_calls_total{{backend=\"tools\",outcome=\"{outcome}\"}}")
            ),
            Some(1.0),
            "{outcome}: {text}"
        );
    }
    assert_eq!(
        sample(&text, "airlock_policy_reloads_total{result=\"refused\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "airlock_tool_definition_changes_total{backend=\"tools\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn listen_address_must_be_loopback_unless_allowed() {
    assert!(parse_listen("127.0.0.1:9464", false).is_ok());
    assert!(parse_listen("[::1]:9464", false).is_ok());
    let e = parse_listen("0.0.0.0:9464", false).unwrap_err();
    assert!(e.contains("metrics_allow_remote"), "{e}");
    assert!(parse_listen("0.0.0.0:9464", true).is_ok());
    assert!(parse_listen("localhost:9464", false).is_err());
}

/// `metrics_listen` in airlock.toml: off when absent, loopback only unless
/// `metrics_allow_remote`, the error naming the key.
#[test]
fn config_keys() {
    use crate::config::Config;
    let parse = |top: &str| {
        Config::parse(
            std::path::Path::new("/etc/airlock/airlock.toml"),
            &format!(
                "{top}\n[[backend]]\nname = \"tools\"\nhost = \"mcp.internal.test\"\nport = 8443\naddresses = [\"127.0.0.2\"]\n"
            ),
        )
    };
    assert_eq!(parse("").unwrap().metrics_listen, None);
    assert_eq!(
        parse("metrics_listen = \"127.0.0.1:9464\"")
            .unwrap()
            .metrics_listen,
        Some("127.0.0.1:9464".parse().unwrap())
    );
    let e = parse("metrics_listen = \"192.0.2.1:9464\"").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("metrics_listen"));
    assert!(e.to_string().contains("not a loopback address"), "{e}");
    assert!(
        parse("metrics_listen = \"192.0.2.1:9464\"\nmetrics_allow_remote = true")
            .unwrap()
            .metrics_listen
            .is_some()
    );
}

#[test]
fn only_get_metrics_is_served() {
    let m = Metrics::new(["tools"]);
    let registry = m.registry(None);
    let req = |method: &str, path: &str| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    };
    let ok = server::answer(&req("GET", "/metrics"), &registry);
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()[http::header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(ok.headers()[http::header::VARY], "accept");
    let openmetrics = http::Request::builder()
        .uri("/metrics")
        .header(
            http::header::ACCEPT,
            "application/openmetrics-text; version=1.0.0",
        )
        .body(())
        .unwrap();
    assert_eq!(
        server::answer(&openmetrics, &registry).headers()[http::header::CONTENT_TYPE],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert_eq!(
        server::answer(&req("POST", "/metrics"), &registry).status(),
        405
    );
    assert_eq!(server::answer(&req("GET", "/"), &registry).status(), 404);
    assert_eq!(
        server::answer(&req("GET", "/metricsx"), &registry).status(),
        404
    );
}

/// Counting by index after first use (the data path's fast path) loses nothing: every record
/// of a long run is counted. (Its cost, ~35-130 ns a record in release, is a benchmark's
/// business, not a test's.)
#[test]
fn many_records_all_counted() {
    let m = Metrics::new(["tools", "other-backend"]);
    let mut r = record("response", "server_to_client", "allow");
    r.method = Some("tools/call".into());
    r.latency_us = Some(1200);
    let n = 20_000;
    let request = record("request", "client_to_server", "allow");
    for _ in 0..n {
        m.on_record(&request);
        m.on_record(&r);
    }
    r.masked_detectors = vec!["email".into(), "email".into()];
    for _ in 0..n {
        m.on_record(&r);
    }
    let text = scrape(&m);
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_messages_total{backend=\"tools\",direction=\"server_to_client\",kind=\"response\",decision=\"allow\"}"
        ),
        Some(2.0 * n as f64)
    );
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_masked_values_total{backend=\"tools\",detector=\"email\"}"
        ),
        Some(2.0 * n as f64)
    );
    assert_eq!(
        sample(
            &text,
            "airlock_mcp_messages_total{backend=\"tools\",direction=\"client_to_server\",kind=\"request\",decision=\"allow\"}"
        ),
        Some(n as f64)
    );
}
