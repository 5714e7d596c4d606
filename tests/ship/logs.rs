//! What the shipper and the command line log: possible tampering (a conflicting object in the
//! bucket, a local file that differs from its manifest line) is an ALARM at ERROR, never a
//! passing WARN; the command line shows no library's INFO lines. The library's log of this
//! test binary is captured in memory.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use super::{
    AIRLOCK, BUCKET, Host, finish,
    s3::{S3Server, files_under, free_port},
    tempdir,
};

/// Everything the library logs in this test binary (every level), as text lines.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Capture the library's log from now on (once per test binary).
pub fn capture_log() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_writer(|| LogSink)
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .try_init();
    });
}

/// Captured log lines containing `needle`.
pub fn log_lines(needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&LOG.lock().unwrap())
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The command line logs warnings, errors and its own messages: not `object_store`'s INFO
/// lines (it retries a refused connection at INFO) — unless AIRLOCK_LOG asks for them.
#[test]
fn the_command_line_shows_no_library_info_lines() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let run = |log: Option<&str>| {
        let mut cmd = Command::new(AIRLOCK);
        cmd.args(["--config", "/nonexistent/airlock.toml", "verify", "--fleet"])
            .args(["s3://fleet", "--endpoint", &endpoint, "--allow-http"])
            .env("AWS_ACCESS_KEY_ID", "k")
            .env("AWS_SECRET_ACCESS_KEY", "s")
            .env_remove("AIRLOCK_LOG")
            .env_remove("RUST_LOG");
        if let Some(log) = log {
            cmd.env("AIRLOCK_LOG", log);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(None);
    assert_eq!(code, Some(1), "nothing listens there: {stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(
        !stderr.contains(" INFO ") && !stderr.contains("Encountered"),
        "a library's INFO lines: {stderr}"
    );
    // Asked for, they are there (the retries happen; only the level hid them).
    let (code, stderr) = run(Some("info"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("Encountered transport error"), "{stderr}");
}

/// A local file that no longer matches its manifest line is not shipped, and that is an alarm
/// (possible tampering), logged at ERROR like a conflicting object in the bucket.
#[test]
fn a_local_file_modified_before_shipping_is_an_alarm_and_stays_local() {
    capture_log();
    let dir = tempdir("modified-local");
    let server = S3Server::localbucket(&dir.join("s3"), free_port(), BUCKET);
    let mut host = Host::new(&dir.join("runner-t"), "runner-t");
    host.add_file(3);
    let file = host.archive().join(&host.local_parquet()[0]);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    let config = host.config(&server.endpoint(), "k", "s");
    let (shipper, _) = host.ship(&config);
    let deadline = Instant::now() + Duration::from_secs(30);
    let error = loop {
        let error = shipper.status().last_error.unwrap_or_default();
        if error.contains("ALARM") {
            break error;
        }
        assert!(
            Instant::now() < deadline,
            "no alarm: {:?}",
            shipper.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        error.contains(&file.display().to_string())
            && error.contains("differs from its manifest line"),
        "{error}"
    );
    assert_eq!(shipper.status().lines_shipped, 0);
    finish(&shipper);
    let lines = log_lines(&file.display().to_string());
    assert!(!lines.is_empty(), "the alarm is logged");
    for line in &lines {
        assert!(line.contains(" ERROR ") && line.contains("ALARM"), "{line}");
    }
    assert!(
        files_under(&server.data.join(BUCKET))
            .iter()
            .all(|k| !k.ends_with(".parquet")),
        "the modified file reached the bucket"
    );
}
