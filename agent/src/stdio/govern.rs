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
    #[error("cannot run the job as {who}: {why}")]
    User { who: String, why: String },
    #[error("cannot start {program}: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },
}

/// Who the job runs as (`--user`, `--group`): set after the listener is handed over, before
/// the command runs; the filter stays.
#[derive(Debug, Default)]
pub struct RunAs<'a> {
    pub user: Option<&'a str>,
    pub group: Option<&'a str>,
}

/// Install the filter, hand its listener to the agent at `socket`, then exec `command` (does
/// not return on success).
pub fn run(
    socket: &Path,
    name: Option<&str>,
    run_as: RunAs<'_>,
    command: &[OsString],
) -> GovernError {
    let Some((program, args)) = command.split_first() else {
        return GovernError::NoCommand;
    };
    // Resolved before anything else: a wrong name stops here.
    let identity = match identity(&run_as) {
        Ok(i) => i,
        Err(e) => return e,
    };
    let listener = match seccomp::install_exec_filter() {
        Ok(l) => l,
        Err(e) => return GovernError::Filter(e),
    };
    if let Err(e) = hand_over(socket, name, listener) {
        return e;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if let Some(id) = identity {
        if let Err(e) = id.assume() {
            return e;
        }
        cmd.env("HOME", &id.home)
            .env("USER", &id.name)
            .env("LOGNAME", &id.name);
    }
    let source = cmd.exec();
    GovernError::Exec {
        program: program.to_string_lossy().into_owned(),
        source,
    }
}

/// The user (and group) a job drops to.
struct Identity {
    name: String,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    home: std::path::PathBuf,
}

fn identity(run_as: &RunAs<'_>) -> Result<Option<Identity>, GovernError> {
    use nix::unistd::{Group, User};
    let Some(user) = run_as.user else {
        if let Some(g) = run_as.group {
            return Err(GovernError::User {
                who: format!("group {g}"),
                why: "`--group` needs `--user`".into(),
            });
        }
        return Ok(None);
    };
    let err = |why: String| GovernError::User {
        who: user.to_owned(),
        why,
    };
    // A name, or a number (systemd's `User=` takes both).
    let u = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| err(e.to_string()))?
    .ok_or_else(|| err("no such user".into()))?;
    let gid = match run_as.group {
        None => u.gid,
        Some(g) => {
            match g.parse::<u32>() {
                Ok(gid) => Group::from_gid(nix::unistd::Gid::from_raw(gid)),
                Err(_) => Group::from_name(g),
            }
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err(format!("no such group {g}")))?
            .gid
        }
    };
    Ok(Some(Identity {
        name: u.name,
        uid: u.uid,
        gid,
        home: u.dir,
    }))
}

impl Identity {
    /// Supplementary groups, group, then user (the order that keeps the right to change).
    fn assume(&self) -> Result<(), GovernError> {
        let err = |why: String| GovernError::User {
            who: self.name.clone(),
            why,
        };
        let name = std::ffi::CString::new(self.name.as_str()).map_err(|e| err(e.to_string()))?;
        nix::unistd::initgroups(&name, self.gid).map_err(|e| err(format!("initgroups: {e}")))?;
        nix::unistd::setgid(self.gid).map_err(|e| err(format!("setgid: {e}")))?;
        nix::unistd::setuid(self.uid).map_err(|e| err(format!("setuid: {e}")))?;
        Ok(())
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
