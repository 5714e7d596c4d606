//! The fuzz targets' corpora (`fuzz/corpus/<target>/`), replayed through the same bodies the
//! fuzzers run (`airlock::fuzzing`): every input a fuzzing run kept, and every crash it found
//! once fixed, stays a regression test. `cargo xtask fuzz TARGET --secs N` grows them.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    for input in inputs {
        let data = std::fs::read(&input).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} failed on {}", target, input.display());
    }
}

#[test]
fn request_classification() {
    replay(
        "request_classification",
        airlock::fuzzing::request_classification,
    );
}

#[test]
fn jsonrpc_batch() {
    replay("jsonrpc_batch", airlock::fuzzing::jsonrpc_batch);
}

#[test]
fn sse_parser() {
    replay("sse_parser", airlock::fuzzing::sse_parser);
}

#[test]
fn masker() {
    replay("masker", airlock::fuzzing::masker);
}

#[test]
fn policy_parser() {
    replay("policy_parser", airlock::fuzzing::policy_parser);
}

#[test]
fn request_framing() {
    replay("request_framing", airlock::fuzzing::request_framing);
}

#[test]
fn media_type() {
    replay("media_type", airlock::fuzzing::media_type);
}

#[test]
fn proxy_request() {
    replay("proxy_request", airlock::fuzzing::proxy_request);
}
