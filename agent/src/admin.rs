//! The admin socket: a root-only Unix socket under `state_dir` speaking one JSON request and
//! one JSON response per line. `airlock status` and `airlock detach` are its clients.
//!
//! Access control is twofold: the socket file is `0600` in a `0700` directory, and the peer's
//! credentials (`SO_PEERCRED`) must be uid 0.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;

use crate::registry::ConnSnapshot;

/// Longest request line the agent reads.
const MAX_REQUEST: u64 = 64 * 1024;
/// Longest response the client reads (a status with thousands of connections fits).
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Stop accepting, drain, exit. Pins (block mode) stay.
    Shutdown,
    /// Calls held for approval.
    Approvals,
    /// Let held call `id` through; with `digest`, only if it is that exact call.
    Approve {
        id: u64,
        digest: Option<String>,
    },
    /// End live connections (containment): every filter given must match.
    Kill {
        user: Option<String>,
        pid: Option<u32>,
        session: Option<String>,
    },
    /// Make a tool's changed definition its pin again.
    AcceptTool {
        backend: String,
        tool: String,
    },
    /// Refuse held call `id`.
    Deny {
        id: u64,
    },
    /// Serve the network namespace of process `pid` (a container runtime's hook, before the
    /// container's process runs). `name`: the container's name, when the runtime gave it.
    Enroll {
        pid: u32,
        #[serde(default)]
        name: Option<String>,
    },
    /// stdio MCP server processes on the host, relayed or not (`airlock discover`).
    Discover,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Approvals {
        pending: Vec<crate::policy::approvals::PendingApproval>,
    },
    Ok {
        message: String,
    },
    Discovered {
        found: Vec<crate::stdio::discover::Found>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    /// Kernel counters by name, summed over CPUs.
    pub kernel_counters: std::collections::BTreeMap<String, u64>,
    /// The agent's own counters.
    pub agent_counters: std::collections::BTreeMap<String, u64>,
    pub targets: Vec<TargetInfo>,
    /// Live connections, then the most recently closed ones (oldest first).
    pub connections: Vec<ConnSnapshot>,
    /// Shipping to the bucket (`[ship]`): backlog, uploads, last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ship: Option<crate::ship::ShipStatus>,
    /// Which of the mechanisms closing the ways around the redirect run.
    #[serde(default)]
    pub mechanisms: crate::kernel::Mechanisms,
    /// The other network namespaces the agent serves (containers).
    #[serde(default)]
    pub namespaces: Vec<NamespaceInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub cookie: u64,
    pub inode: u64,
    /// `scan` | `hook` | `refused connect`.
    pub source: String,
    pub enrolled_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::attribution::Container>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    pub version: String,
    pub started_at: String,
    pub config: String,
    pub cgroup: String,
    pub on_agent_down: String,
    pub listen: Vec<String>,
    pub live_connections: usize,
    /// `sha256:` of the policy set in force.
    pub policy_hash: Option<String>,
    /// Why the last reload was refused, if it was.
    pub policy_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetInfo {
    pub backend: String,
    pub address: String,
}

/// Bind the admin socket: removes a stale one; the socket is `0600` (its directory is created
/// `0700` if missing; the agent's state directory is `0711`).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve requests until the listener fails; `handle` answers one request (given the peer's
/// uid, for the record of who decided).
pub async fn serve<F>(listener: UnixListener, handle: F)
where
    F: Fn(Request, u32) -> Response + Clone + Send + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, handle).await {
                warn!(error = %e, "admin request failed");
            }
        });
    }
}

async fn serve_one<F>(stream: UnixStream, handle: F) -> io::Result<()>
where
    F: Fn(Request, u32) -> Response,
{
    let peer_uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    let response = if peer_uid != 0 {
        Response::Error {
            message: format!("the admin socket is for root only (your uid is {peer_uid})"),
        }
    } else {
        let mut line = String::new();
        let mut limited = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_REQUEST));
        tokio::time::timeout(CLIENT_TIMEOUT, limited.read_line(&mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request line"))??;
        match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => handle(req, peer_uid),
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the agent is not running (no admin socket at {0})")]
    NotRunning(PathBuf),
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("admin socket {path}: bad response: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Send one request to the running agent.
pub async fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let io_err = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning(path.to_owned()));
        }
        Err(e) => return Err(io_err(e)),
    };
    let exchange = async {
        let (rd, mut wr) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        wr.write_all(&line).await?;
        let mut text = String::new();
        BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_RESPONSE))
            .read_line(&mut text)
            .await?;
        Ok::<_, io::Error>(text)
    };
    let text = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| io_err(io::Error::new(io::ErrorKind::TimedOut, "no answer in 10 s")))?
        .map_err(io_err)?;
    serde_json::from_str(text.trim()).map_err(|e| ClientError::Protocol {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        let r: Request = serde_json::from_str(r#"{"command":"shutdown"}"#).unwrap();
        assert!(matches!(r, Request::Shutdown));
        assert!(serde_json::from_str::<Request>(r#"{"command":"format_disk"}"#).is_err());
    }

    #[tokio::test]
    async fn round_trip_over_a_socket_with_restrictive_modes() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("airlock-admin-test-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let listener = bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let server = tokio::spawn(serve(listener, |req, _uid| match req {
            Request::Shutdown => Response::Ok {
                message: "bye".into(),
            },
            _ => Response::Error {
                message: "not in this test".into(),
            },
        }));
        let resp = request(&path, &Request::Shutdown).await.unwrap();
        // Tests usually run as root; a non-root run gets the uid refusal instead.
        match resp {
            Response::Ok { message } => assert_eq!(message, "bye"),
            Response::Error { message } => assert!(message.contains("root only"), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn missing_socket_means_not_running() {
        let err = request(Path::new("/nonexistent/admin.sock"), &Request::Status)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::NotRunning(_)));
    }
}
