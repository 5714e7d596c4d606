//! `airlock sessions` and `airlock replay`: printing what `archive::sessions` finds.

use std::{path::Path, process::ExitCode};

use airlock::archive::{
    responder::{self, printable},
    sessions::View,
};

use crate::{fail, parse_time};

fn view(by_connection: bool) -> View {
    if by_connection {
        View::Connection
    } else {
        View::Mcp
    }
}

pub fn sessions(
    dir: &Path,
    since: Option<&str>,
    (user, backend): (Option<&str>, Option<&str>),
    by_connection: bool,
    json: bool,
) -> ExitCode {
    let since = match since.map(|s| parse_time("--since", s)).transpose() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let list = match airlock::archive::sessions::sessions(
        dir,
        since,
        user,
        backend,
        view(by_connection),
    ) {
        Ok(found) => found,
        Err(e) => return fail(e),
    };
    // A file that cannot be read is named and skipped (`airlock verify` is the integrity
    // tool); the exit status says the list is incomplete.
    let incomplete = |skipped: &[(std::path::PathBuf, String)]| {
        for (file, why) in skipped {
            eprintln!(
                "airlock: skipped {}: {} (its sessions are missing from this list; `airlock verify` checks the archive)",
                printable(&file.display().to_string()),
                printable(why)
            );
        }
        if skipped.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    };
    let (list, skipped) = (list.sessions, list.skipped);
    if json {
        for s in &list {
            println!("{}", serde_json::to_string(s).unwrap_or_default());
        }
        return incomplete(&skipped);
    }
    println!(
        "{:<36} {:>5} {:<10} {:>7} {:<12} {:<10} {:<28} {:>9} {:>6} {:>6} {:>7} {:>6}",
        "SESSION",
        "CONNS",
        "USER",
        "PID",
        "COMM",
        "BACKEND",
        "STARTED",
        "DURATION",
        "MSGS",
        "CALLS",
        "BLOCKED",
        "MASKED"
    );
    for s in &list {
        println!(
            "{:<36} {:>5} {:<10} {:>7} {:<12} {:<10} {:<28} {:>7}ms {:>6} {:>6} {:>7} {:>6}",
            printable(&s.session_id),
            s.connections.len(),
            printable(s.user.as_deref().unwrap_or("-")),
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            printable(s.comm.as_deref().unwrap_or("-")),
            printable(s.backend.as_deref().unwrap_or("-")),
            s.started,
            s.duration_ms,
            s.messages,
            s.calls,
            s.blocked,
            s.masked
        );
    }
    incomplete(&skipped)
}

pub fn replay(
    dir: &Path,
    session: &str,
    by_connection: bool,
    choose: (Option<&str>, Option<u32>),
    (json, connections_too): (bool, bool),
) -> ExitCode {
    let records = match airlock::archive::sessions::load(dir, session, view(by_connection), choose)
    {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if json {
        for r in &records {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    match responder::transcript(&records, session, colour, connections_too) {
        Some(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        None => fail(format!("no session `{session}` in {}", dir.display())),
    }
}
