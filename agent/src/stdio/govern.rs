//! `airlock govern -- COMMAND`: run a job under the exec filter, its listener handed to the
//! agent first. The filter is inherited by everything the job starts and cannot be removed
//! by it; without a running agent the job does not start.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{net::UnixStream, process::CommandExt as _},
    },
    path::Path,
    time::Duration,
};

use serde_json::{Value, json};

use super::seccomp;

#[derive(Debug, thiserror::Error)]
pub enum GovernError {
    #[error("nothing to run: give the job's command after `--`")]
    NoCommand,
    #[error("cannot install the exec filter: {0}")]
    Filter(std::io::Error),
    #[error(
        "the agent does not answer on {path}: {source} (is `airlock run` running? a governed job \
         does not start without it)"
    )]
    Agent {
        path: String,
        source: std::io::Error,
    },
    #[error("the agent refused the job: {0}")]
    Refused(String),
    #[error("cannot start {program}: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },
}

/// Install the filter, hand its listener to the agent at `socket`, then exec `command` (does
/// not return on success).
pub fn run(socket: &Path, name: Option<&str>, command: &[OsString]) -> GovernError {
    let Some((program, args)) = command.split_first() else {
        return GovernError::NoCommand;
    };
    let listener = match seccomp::install_exec_filter() {
        Ok(l) => l,
        Err(e) => return GovernError::Filter(e),
    };
    if let Err(e) = hand_over(socket, name, listener) {
        return e;
    }
    let source = std::process::Command::new(program).args(args).exec();
    GovernError::Exec {
        program: program.to_string_lossy().into_owned(),
        source,
    }
}

/// Send the listener with a request line; wait for the agent's `ok`. Our copy is closed when
/// this returns: only the agent holds it then.
fn hand_over(socket: &Path, name: Option<&str>, listener: OwnedFd) -> Result<(), GovernError> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let agent_err = |source| GovernError::Agent {
        path: socket.display().to_string(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(agent_err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(agent_err)?;
    let request = json!({"name": name}).to_string();
    let fds = [listener.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[std::io::IoSlice::new(request.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| agent_err(e.into()))?;
    drop(listener);
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(agent_err)?;
    let answer: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    if answer["ok"] == true {
        return Ok(());
    }
    Err(GovernError::Refused(answer["error"].as_str().map_or_else(
        || format!("unexpected answer {line:?}"),
        str::to_owned,
    )))
}
