//! What the admin socket asks of a running agent (`airlock status`, `sessions kill`,
//! `approvals`, `tools accept`, the OCI hook's enrolment, `detach`), answered from its state.

use std::{
    sync::Arc,
    time::{Instant, SystemTime},
};

use tokio::sync::mpsc;
use tracing::info;

use crate::{
    admin::{AgentInfo, Request, Response, Status, TargetInfo},
    proxy::Proxy,
    registry::rfc3339,
};

/// The agent state the admin requests read and act on.
pub(super) struct Control {
    pub proxy: Arc<Proxy>,
    pub policies: Arc<crate::policy::store::PolicyStore>,
    /// The attached cgroup, as shown.
    pub cgroup: String,
    pub shutdown_tx: mpsc::Sender<&'static str>,
    pub shipper: Option<Arc<crate::ship::Shipper>>,
    pub started_at: SystemTime,
    /// Governed jobs and their stdio relays.
    pub stdio: Arc<crate::stdio::Stdio>,
}

impl Control {
    /// Answer one request of a root peer (`peer_uid`, for the log).
    pub fn handle(&self, req: Request, peer_uid: u32) -> Response {
        match req {
            Request::Kill { user, pid, session } => {
                if user.is_none() && pid.is_none() && session.is_none() {
                    return Response::Error {
                        message: "name what to kill: --user, --pid or --session".into(),
                    };
                }
                // A session id is `<agent prefix>-<connection id>`.
                let session_conn = session.as_deref().map(|s| {
                    s.rsplit('-')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .filter(|_| s.starts_with(&self.proxy.session_prefix) || !s.contains('-'))
                });
                if let Some(None) = session_conn {
                    return Response::Error {
                        message: format!(
                            "`{}` is not a session of this agent",
                            session.unwrap_or_default()
                        ),
                    };
                }
                let ids = self.proxy.registry.kill(|id, a| {
                    user.as_ref()
                        .is_none_or(|u| a.and_then(|a| a.user.as_ref()) == Some(u))
                        && pid.is_none_or(|p| a.is_some_and(|a| a.tgid == p || a.pid == p))
                        && session_conn.is_none_or(|c| c == Some(id))
                });
                info!(
                    ?ids,
                    ?user,
                    ?pid,
                    ?session,
                    by_uid = peer_uid,
                    "sessions killed by an operator"
                );
                Response::Ok {
                    message: format!(
                        "killed {} connection(s){}",
                        ids.len(),
                        if ids.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ": {}",
                                ids.iter()
                                    .map(u64::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    ),
                }
            }
            Request::AcceptTool { backend, tool } => {
                let r = self
                    .proxy
                    .pipeline
                    .pins
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .accept(&backend, &tool);
                match r {
                    Ok(true) => Response::Ok {
                        message: format!("accepted the new definition of `{tool}` ({backend})"),
                    },
                    Ok(false) => Response::Error {
                        message: format!(
                            "`{tool}` of backend `{backend}` has no changed definition to accept"
                        ),
                    },
                    Err(e) => Response::Error {
                        message: format!("cannot save the tool pins: {e}"),
                    },
                }
            }
            Request::Approvals => {
                let pending = self
                    .proxy
                    .pipeline
                    .approvals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .list(Instant::now());
                Response::Approvals { pending }
            }
            Request::Approve { id, digest } => decide(&self.proxy, id, "approved", |a| {
                a.approve(id, digest.as_deref(), peer_uid, Instant::now())
            }),
            Request::Deny { id } => decide(&self.proxy, id, "denied", |a| {
                a.deny(id, peer_uid, Instant::now())
            }),
            Request::Discover => Response::Discovered {
                found: tokio::task::block_in_place(|| self.stdio.discover()),
            },
            Request::Status => {
                let mut s = status(&self.proxy, &self.cgroup, self.started_at);
                s.agent.policy_hash = Some(self.policies.current().hash.clone());
                s.agent.policy_error = self.policies.last_error();
                s.ship = self.shipper.as_ref().map(|s| s.status());
                Response::Status(Box::new(s))
            }
            Request::Enroll { pid, name } => {
                match tokio::task::block_in_place(|| self.proxy.enroll(pid, "hook", name)) {
                    Ok(Some(ns)) => Response::Ok {
                        message: format!(
                            "serving the network namespace of pid {pid} (cookie {})",
                            ns.cookie
                        ),
                    },
                    Ok(None) => Response::Ok {
                        message: format!("pid {pid} is in the agent's own network namespace"),
                    },
                    Err(message) => Response::Error { message },
                }
            }
            Request::Shutdown => {
                let _ = self.shutdown_tx.try_send("admin request");
                Response::Ok {
                    message: "shutting down".into(),
                }
            }
        }
    }
}

/// One retention pass; `days = 0` keeps everything.
/// An operator's decision on a held call (`airlock approvals approve|deny`): applied, the
/// waiting call woken, answered in one line.
fn decide(
    proxy: &Proxy,
    id: u64,
    done: &str,
    apply: impl FnOnce(
        &mut crate::policy::approvals::Approvals,
    ) -> Result<
        crate::policy::approvals::Outcome,
        crate::policy::approvals::ApprovalError,
    >,
) -> Response {
    let r = apply(
        &mut proxy
            .pipeline
            .approvals
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    proxy.pipeline.approval_decided.notify_waiters();
    match r {
        Ok(_) => Response::Ok {
            message: format!("{done} {id}"),
        },
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

fn status(proxy: &Proxy, cgroup: &str, started_at: SystemTime) -> Status {
    let (live, recent) = proxy.registry.snapshot();
    let live_connections = live.len();
    let kernel_counters = proxy
        .kernel
        .lock()
        .map(|k| {
            k.counters()
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v))
                .collect()
        })
        .unwrap_or_default();
    let targets = proxy
        .targets
        .read()
        .map(|ts| {
            ts.iter()
                .map(|t| TargetInfo {
                    backend: proxy.config.target_name(t.backend_id),
                    address: t.addr.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let port = proxy.config.listen_port;
    Status {
        agent: AgentInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: rfc3339(started_at),
            config: proxy.config.path.display().to_string(),
            cgroup: cgroup.to_owned(),
            on_agent_down: format!("{:?}", proxy.config.on_agent_down).to_lowercase(),
            listen: vec![format!("127.0.0.1:{port}"), format!("[::1]:{port}")],
            live_connections,
            policy_hash: None,
            policy_error: None,
        },
        kernel_counters,
        agent_counters: {
            let mut c = proxy.counters.snapshot();
            let a = &proxy.archive.stats;
            for (k, v) in [
                ("archive_records", &a.records),
                ("archive_fsyncs", &a.fsyncs),
                ("archive_files", &a.files),
                ("archive_errors", &a.errors),
                ("archive_dropped", &a.dropped),
            ] {
                c.insert(k.to_owned(), v.load(std::sync::atomic::Ordering::Relaxed));
            }
            let p = &proxy.pipeline.counters;
            for (k, v) in [
                ("mcp_messages", &p.messages),
                ("mcp_blocked", &p.blocked),
                ("mcp_masked_values", &p.masked_values),
                ("mcp_malformed", &p.malformed),
                ("mcp_protocol_refused", &p.protocol_refused),
                ("http_refused", &p.refused_requests),
                ("answers_refused", &p.refused_answers),
                ("tool_pin_saves", proxy.pipeline.pin_saves.as_ref()),
            ] {
                c.insert(k.to_owned(), v.load(std::sync::atomic::Ordering::Relaxed));
            }
            c.extend(proxy.resources.counters.snapshot());
            c.extend(crate::events::counters());
            c.extend(crate::stdio::counters());
            c.extend(proxy.resources.in_use());
            c
        },
        targets,
        connections: live.into_iter().chain(recent).collect(),
        ship: None,
        mechanisms: proxy
            .kernel
            .lock()
            .map(|k| k.mechanisms.clone())
            .unwrap_or_default(),
        namespaces: proxy
            .namespaces
            .lock()
            .map(|r| {
                r.list()
                    .iter()
                    .map(|ns| crate::admin::NamespaceInfo {
                        cookie: ns.cookie,
                        inode: ns.inode,
                        source: ns.source.to_owned(),
                        enrolled_at: rfc3339(ns.enrolled_at),
                        container: ns.container.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
