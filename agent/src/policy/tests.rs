use super::*;
use serde_json::json;

fn set(files: &[(&str, &str)]) -> Result<PolicySet, PolicyErrors> {
    let files: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(n, t)| (PathBuf::from(format!("/p/{n}")), t.to_string()))
        .collect();
    PolicySet::parse(&files, HashKey([1; 32]))
}

fn subject(user: &str, uid: u32) -> Subject {
    Subject {
        uid,
        gid: uid,
        user: Some(user.into()),
        groups: vec![user.into(), "agents".into()],
        exe: Some("/usr/bin/python3.11".into()),
        comm: "python3".into(),
        cgroup: Some("/ci/job-42".into()),
        container: Vec::new(),
    }
}

fn call<'a>(tool: &'a str, args: &'a Value) -> Message<'a> {
    Message {
        backend: "tools",
        direction: Direction::ClientToServer,
        method: Some("tools/call"),
        tool: Some(tool),
        arguments: Some(args),
        is_call: true,
        scope_unknown: false,
    }
}

const EXAMPLE: &str = r#"
[[rule]]
id = "mask-secrets-and-pii"
action = "mask"
detectors = ["email", "credit_card", "us_ssn", "aws_access_key", "private_key", "jwt", "bearer_token"]
direction = "both"
style = "redact"

[[rule]]
id = "no-destructive-tools"
action = "block"
tools = ["drop_*", "delete_*"]

[[rule]]
id = "no-drop-table"
action = "block"
tools = ["query"]
args = { "sql" = "(?i)\\bdrop\\s+table\\b" }

[[rule]]
id = "approve-deploys"
action = "approve"
tools = ["deploy*"]
timeout_secs = 30
"#;

#[test]
fn the_issue_example_loads() {
    let s = set(&[("10-example.toml", EXAMPLE)]).unwrap();
    assert_eq!(s.rule_count(), 4);
    assert!(s.hash.starts_with("sha256:") && s.hash.len() == 7 + 64);
}

#[test]
fn first_block_or_approve_decides_and_all_masks_apply() {
    let s = set(&[("10-example.toml", EXAMPLE)]).unwrap();
    let who = subject("alice", 1000);
    let none = json!({});
    let d = s.decide(&who, &call("delete_repo", &none));
    assert_eq!(
        d.verdict,
        Verdict::Block {
            rule: "no-destructive-tools".into()
        }
    );
    // The rule that decided, not the first that matched (a mask rule, before it).
    assert_eq!(d.verdict_rule.as_deref(), Some("no-destructive-tools"));
    assert!(d.masks_anything());
    let d = s.decide(&who, &call("deploy_prod", &none));
    assert_eq!(
        d.verdict,
        Verdict::Approve {
            rule: "approve-deploys".into(),
            timeout: Duration::from_secs(30)
        }
    );
    let d = s.decide(&who, &call("search", &none));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.verdict_rule, None, "allowed by default: no rule decided");
    assert_eq!(d.record, RecordLevel::Full);
}

/// A payload for the archive is made only through masking: the detector's masking is in
/// it, and the text as received is used only when nothing was masked.
#[test]
fn a_masked_payload_carries_the_detectors_masking() {
    let s = set(&[("default.toml", EXAMPLE)]).unwrap();
    let who = subject("alice", 1000);
    let args = json!({"q": "mail alice@example.com"});
    let d = s.decide(&who, &call("search", &args));
    let (payload, masking) = s.mask_payload(&d, json!({"params": {"arguments": args}}));
    assert_eq!(masking.detectors(), vec!["email"]);
    assert!(
        !payload.as_str().contains("alice@example.com"),
        "{}",
        payload.as_str()
    );
    assert!(payload.as_str().contains("mail "), "{}", payload.as_str());

    // The text as received is not recorded when something in it was masked...
    let received = r#"{"q":"mail alice@example.com"}"#;
    let mut value: Value = serde_json::from_str(received).unwrap();
    let m = s.mask(&d, &mut value);
    let payload = m.payload(&value, Some(received));
    assert!(
        !payload.as_str().contains("alice@example.com"),
        "{}",
        payload.as_str()
    );
    // ... and is, as it came (no serialisation), when nothing was.
    let received = " {\"q\" : \"nothing to mask\"} ";
    let mut value: Value = serde_json::from_str(received).unwrap();
    let m = s.mask(&d, &mut value);
    assert_eq!(m.payload(&value, Some(received)).as_str(), received.trim());
}

/// Masking tells which mask rules masked something: a rule that matched and found nothing
/// did not act, and is not named (issue 19: events named a mask rule that masked nothing).
#[test]
fn masking_names_the_rules_that_masked_something() {
    let s = set(&[
        ("default.toml", EXAMPLE),
        (
            "site.toml",
            r#"
[[rule]]
id = "mask-tokens"
action = "mask"
detectors = ["github_token"]

[[rule]]
id = "allow-search"
action = "allow"
tools = ["search"]
"#,
        ),
    ])
    .unwrap();
    let who = subject("alice", 1000);
    let args = json!({"q": "mail a@b.io"});
    let d = s.decide(&who, &call("search", &args));
    assert_eq!(d.verdict, Verdict::Allow);
    assert_eq!(d.verdict_rule.as_deref(), Some("allow-search"));
    let mut v = args.clone();
    let m = s.mask(&d, &mut v);
    assert_eq!(m.rules, vec!["mask-secrets-and-pii"]);
    assert_eq!(m.total(), 1);
    assert_eq!(m.detectors(), vec!["email"]);
    let args = json!({"q": "ghp_PLANTEDsecretTOKEN0123456789abcdefAB"});
    let mut v = args.clone();
    let m = s.mask(&s.decide(&who, &call("search", &args)), &mut v);
    assert_eq!(m.rules, vec!["mask-tokens"], "the later file's rule masked");
    let mut v = json!({"q": "nothing to mask"});
    let m = s.mask(&s.decide(&who, &call("search", &v.clone())), &mut v);
    assert_eq!(m, Masking::none());
}

#[test]
fn argument_matchers_by_name_and_pointer() {
    let s = set(&[("a.toml", EXAMPLE)]).unwrap();
    let who = subject("alice", 1000);
    let bad = json!({"sql": "select 1; DROP   TABLE users"});
    let fine = json!({"sql": "select * from users"});
    assert_eq!(
        s.decide(&who, &call("query", &bad)).verdict,
        Verdict::Block {
            rule: "no-drop-table".into()
        }
    );
    assert_eq!(
        s.decide(&who, &call("query", &fine)).verdict,
        Verdict::Allow
    );
    let ptr = set(&[(
        "p.toml",
        "[[rule]]\nid = \"deep\"\naction = \"block\"\nargs = { \"/target/env\" = \"^prod$\" }\n",
    )])
    .unwrap();
    assert_eq!(
        ptr.decide(&who, &call("x", &json!({"target": {"env": "prod"}})))
            .verdict,
        Verdict::Block {
            rule: "deep".into()
        }
    );
    assert_eq!(
        ptr.decide(&who, &call("x", &json!({"target": {"env": "dev"}})))
            .verdict,
        Verdict::Allow
    );
    assert_eq!(
        ptr.decide(&who, &call("x", &json!({}))).verdict,
        Verdict::Allow,
        "missing argument: no match"
    );
}

#[test]
fn identity_matchers() {
    let s = set(&[(
        "id.toml",
        r#"
[[rule]]
id = "ops-may-deploy"
action = "allow"
tools = ["deploy*"]
groups = ["ops"]

[[rule]]
id = "nobody-else"
action = "block"
tools = ["deploy*"]

[[rule]]
id = "ci-runner-no-shell"
action = "block"
tools = ["shell"]
cgroup = ["/ci/**"]
exe = ["/usr/bin/python3*"]
uids = [1000]
"#,
    )])
    .unwrap();
    let none = json!({});
    let mut ops = subject("bob", 1001);
    ops.groups.push("ops".into());
    assert_eq!(
        s.decide(&ops, &call("deploy", &none)).verdict,
        Verdict::Allow
    );
    assert_eq!(
        s.decide(&subject("alice", 1000), &call("deploy", &none))
            .verdict,
        Verdict::Block {
            rule: "nobody-else".into()
        }
    );
    assert_eq!(
        s.decide(&subject("alice", 1000), &call("shell", &none))
            .verdict,
        Verdict::Block {
            rule: "ci-runner-no-shell".into()
        }
    );
    let mut elsewhere = subject("alice", 1000);
    elsewhere.cgroup = Some("/user.slice".into());
    assert_eq!(
        s.decide(&elsewhere, &call("shell", &none)).verdict,
        Verdict::Allow
    );
    assert_eq!(
        s.decide(&subject("carol", 1002), &call("shell", &none))
            .verdict,
        Verdict::Allow
    );
}

#[test]
fn container_matchers_match_the_id_or_the_name() {
    let s = set(&[(
        "c.toml",
        r#"
[[rule]]
id = "no-shell-in-ci-jobs"
action = "block"
tools = ["shell"]
containers = ["ci-job-*", "4f2a*"]
"#,
    )])
    .unwrap();
    let none = json!({});
    let mut by_name = subject("root", 0);
    by_name.container = vec!["9b9b".repeat(16), "ci-job-17".into()];
    let mut by_id = subject("root", 0);
    by_id.container = vec![format!("4f2a{}", "0".repeat(60))];
    let mut other = subject("root", 0);
    other.container = vec!["7777".repeat(16), "web".into()];
    for (s_, blocked) in [
        (&by_name, true),
        (&by_id, true),
        (&other, false),
        (&subject("root", 0), false),
    ] {
        let v = s.decide(s_, &call("shell", &none)).verdict;
        assert_eq!(v != Verdict::Allow, blocked, "{:?}: {v:?}", s_.container);
    }
}

#[test]
fn blocks_apply_to_client_calls_only_notifications_included() {
    let s = set(&[("a.toml", EXAMPLE)]).unwrap();
    let who = subject("alice", 1000);
    let mut m = call("delete_repo", &Value::Null);
    m.direction = Direction::ServerToClient;
    m.is_call = false;
    assert_eq!(s.decide(&who, &m).verdict, Verdict::Allow);
    // A client notification naming the method is judged like the request it imitates.
    let n = call("delete_repo", &Value::Null);
    assert!(matches!(s.decide(&who, &n).verdict, Verdict::Block { .. }));
}

#[test]
fn mask_rules_scoped_to_a_tool_apply_to_messages_tied_to_no_request() {
    let s = set(&[(
        "a.toml",
        r#"
[[rule]]
id = "mask-lookup"
action = "mask"
detectors = ["email"]
tools = ["lookup"]
methods = ["tools/call"]
"#,
    )])
    .unwrap();
    let who = subject("alice", 1000);
    let mut other = call("other", &Value::Null);
    other.direction = Direction::ServerToClient;
    other.is_call = false;
    assert!(!s.decide(&who, &other).masks_anything());
    let mut unknown = other;
    unknown.tool = None;
    unknown.method = None;
    unknown.scope_unknown = true;
    assert!(s.decide(&who, &unknown).masks_anything());
}

#[test]
fn argument_names_match_under_case_folding() {
    let s = set(&[(
        "a.toml",
        r#"
[[rule]]
id = "no-drop"
action = "block"
tools = ["query"]
args = { "sql" = "(?i)drop", "/opts/mode" = "^force$" }
"#,
    )])
    .unwrap();
    let who = subject("alice", 1000);
    let args = json!({"SQL": "DROP TABLE x", "Opts": {"\u{17F}" : 1, "MODE": "force"}});
    let m = call("query", &args);
    assert!(matches!(s.decide(&who, &m).verdict, Verdict::Block { .. }));
}

#[test]
fn masking_follows_direction_and_uses_custom_detectors() {
    let s = set(&[(
        "a.toml",
        r#"
[[detector]]
name = "employee_id"
pattern = "EMP-[0-9]{6}"

[[rule]]
id = "mask-out"
action = "mask"
detectors = ["employee_id", "email"]
direction = "responses"
style = "redact"
"#,
    )])
    .unwrap();
    let who = subject("alice", 1000);
    let mut resp = call("lookup", &Value::Null);
    resp.direction = Direction::ServerToClient;
    resp.is_call = false;
    let d = s.decide(&who, &resp);
    let mut v = json!({"content": [{"type": "text", "text": "EMP-123456 is a@b.io"}]});
    let masking = s.mask(&d, &mut v);
    assert_eq!(
        v["content"][0]["text"],
        "[MASKED:employee_id] is [MASKED:email]"
    );
    assert_eq!(masking.counts.get("employee_id"), Some(&1));
    // Requests are left alone by a responses-only rule.
    let args = json!({"q": "EMP-123456"});
    let d = s.decide(&who, &call("lookup", &args));
    assert!(!d.masks_anything());
}

#[test]
fn listing_agrees_with_calling() {
    let s = set(&[("a.toml", EXAMPLE)]).unwrap();
    let who = subject("alice", 1000);
    assert!(!s.tool_visible(&who, "tools", "delete_repo"));
    assert_eq!(
        s.tool_hidden_by(&who, "tools", "delete_repo"),
        Some("no-destructive-tools")
    );
    assert_eq!(s.tool_hidden_by(&who, "tools", "search"), None);
    assert!(!s.tool_visible(&who, "tools", "drop_table"));
    assert!(
        s.tool_visible(&who, "tools", "query"),
        "blocked only for some arguments"
    );
    assert!(
        s.tool_visible(&who, "tools", "deploy_prod"),
        "approval can be granted"
    );
    assert!(s.tool_visible(&who, "tools", "search"));
    // A conditional block followed by an unconditional one: every call is blocked.
    let s = set(&[(
        "b.toml",
        "[[rule]]\nid = \"c\"\naction = \"block\"\ntools = [\"q\"]\nargs = { \"a\" = \"x\" }\n\
         [[rule]]\nid = \"u\"\naction = \"block\"\ntools = [\"q\"]\n",
    )])
    .unwrap();
    assert!(!s.tool_visible(&who, "tools", "q"));
}

#[test]
fn record_levels() {
    let s = set(&[(
        "r.toml",
        "[[rule]]\nid = \"quiet\"\naction = \"allow\"\ntools = [\"ping\"]\nrecord = \"off\"\n\
         [[rule]]\nid = \"meta\"\naction = \"mask\"\ndetectors = [\"email\"]\nrecord = \"metadata\"\n",
    )])
    .unwrap();
    let who = subject("alice", 1000);
    let none = json!({});
    assert_eq!(
        s.decide(&who, &call("ping", &none)).record,
        RecordLevel::Off
    );
    assert_eq!(
        s.decide(&who, &call("other", &none)).record,
        RecordLevel::Metadata
    );
}

#[test]
fn errors_name_file_and_line() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "[[rule]]\nid = \"a\"\naction = \"mask\"\ndetectors = [\"emial\"]\n",
            "x.toml",
            1,
            "unknown detector `emial`",
        ),
        (
            "\n\n[[rule]]\nid = \"a\"\naction = \"explode\"\n",
            "x.toml",
            5,
            "explode",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"block\"\ncolour = 1\n",
            "x.toml",
            4,
            "colour",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"block\"\ntools = [\"[\"]\n",
            "x.toml",
            1,
            "bad glob",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"block\"\nargs = { q = \"(\" }\n",
            "x.toml",
            1,
            "bad regex",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"block\"\nrecord = \"off\"\n",
            "x.toml",
            1,
            "always recorded",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"block\"\ndirection = \"responses\"\n",
            "x.toml",
            1,
            "requests only",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"mask\"\n",
            "x.toml",
            1,
            "needs `detectors`",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"allow\"\ntimeout_secs = 5\n",
            "x.toml",
            1,
            "approve rules",
        ),
        (
            "[[rule]]\nid = \"a\"\naction = \"allow\"\n\n[[rule]]\nid = \"a\"\naction = \"allow\"\n",
            "x.toml",
            5,
            "used twice",
        ),
        (
            "[[detector]]\nname = \"email\"\npattern = \"x\"\n",
            "x.toml",
            1,
            "built in",
        ),
        ("[[rule]\n", "x.toml", 1, ""),
    ];
    for (text, file, line, needle) in cases {
        let err = set(&[(file, text)]).expect_err(text);
        let first = &err.0[0];
        assert_eq!(first.file, PathBuf::from(format!("/p/{file}")), "{text}");
        assert_eq!(first.line, *line, "{text}: {first}");
        assert!(first.message.contains(needle), "{text}: {first}");
    }
}

#[test]
fn every_error_is_reported_at_once() {
    let err = set(&[
        (
            "a.toml",
            "[[rule]]\nid = \"a\"\naction = \"mask\"\ndetectors = [\"nope\"]\n",
        ),
        (
            "b.toml",
            "[[rule]]\nid = \"b\"\naction = \"block\"\ntools = [\"[\"]\n",
        ),
    ])
    .unwrap_err();
    assert_eq!(err.0.len(), 2);
    assert!(err.to_string().contains("/p/a.toml:1:") && err.to_string().contains("/p/b.toml:1:"));
}

#[test]
fn hash_changes_with_content_and_name() {
    let a = set(&[("a.toml", EXAMPLE)]).unwrap().hash;
    let b = set(&[("a.toml", &format!("{EXAMPLE}\n# comment"))])
        .unwrap()
        .hash;
    let c = set(&[("b.toml", EXAMPLE)]).unwrap().hash;
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_eq!(a, set(&[("a.toml", EXAMPLE)]).unwrap().hash);
}

#[test]
fn shipped_defaults_load() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let s = PolicySet::load_dir(&dir, HashKey([0; 32])).unwrap_or_else(|e| panic!("{e}"));
    assert!(s.rule_count() >= 1);
    // The defaults mask secrets both ways.
    let who = subject("alice", 1000);
    let mut resp = call("read", &Value::Null);
    resp.direction = Direction::ServerToClient;
    resp.is_call = false;
    let d = s.decide(&who, &resp);
    let mut v = json!({"text": "key AKIAIOSFODNN7EXAMPLE"});
    s.mask(&d, &mut v);
    assert!(!v.to_string().contains("AKIAIOSFODNN7EXAMPLE"));
}

#[test]
fn a_set_that_tells_apart_backends_sharing_an_address_is_refused() {
    let s = set(&[(
        "a.toml",
        r#"
[[rule]]
id = "only-a"
action = "block"
tools = ["x"]
backends = ["a"]
"#,
    )])
    .unwrap();
    let dir = std::path::Path::new("/etc/airlock/policies");
    let err = s.check_alike(&[("a".into(), "b".into())], dir).unwrap_err();
    assert!(err.to_string().contains("only-a"), "{err}");
    assert!(s.check_alike(&[("c".into(), "d".into())], dir).is_ok());
    assert!(s.check_alike(&[], dir).is_ok());
}

#[test]
fn whole_numbers_match_as_integers_however_written() {
    let s = set(&[(
        "a.toml",
        r#"
[[rule]]
id = "big-transfers"
action = "block"
tools = ["transfer"]
args = { "amount" = "^[0-9]{5,}$" }
"#,
    )])
    .unwrap();
    let who = subject("alice", 1000);
    for amount in [json!(100000), json!(1e5), json!(100000.0)] {
        let args = json!({ "amount": amount });
        let m = call("transfer", &args);
        assert!(
            matches!(s.decide(&who, &m).verdict, Verdict::Block { .. }),
            "{amount}"
        );
    }
    let args = json!({"amount": 99.5});
    assert_eq!(
        s.decide(&who, &call("transfer", &args)).verdict,
        Verdict::Allow
    );
}
