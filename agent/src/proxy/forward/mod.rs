//! Egress proxies (`[[egress_proxy]]`): a governed process's connection to its HTTP proxy is
//! redirected to the agent like a backend's and attributed to that process (not to a proxy).
//! The agent reads each proxy request on it (bounded, under a deadline: [`wire`]) and judges
//! its target ([`judge`]):
//!
//! - `CONNECT` to a configured MCP backend: the agent asks the real proxy for the tunnel on the
//!   connection it dialled for this client (the client's header lines, `Proxy-Authorization`
//!   among them, passed on), answers `200` only once the proxy did, and intercepts inside
//!   (`intercept.rs`: a leaf for the backend's name, policies, masking, the archive); the
//!   upstream TLS runs through the proxy's tunnel. A refusal (407, 403, 502...) reaches the
//!   client as the proxy gave it (a body of at most 64 KiB), recorded; the client may ask
//!   again on the same connection (NTLM's second round).
//! - Anything else: passed to the real proxy byte for byte, on one proxy connection per client
//!   connection (NTLM and Negotiate authenticate the connection). Every request is judged until
//!   a tunnel opens, then the two connections are spliced. Recorded by target (`host:port`).
//! - A request that does not parse, TLS or SOCKS to the proxy, plain HTTP to an MCP backend
//!   (absolute-form), a backend reached under another name or through a `Host` header:
//!   refused with a reason (400, 403), recorded.
//!
//! `Proxy-Authorization` is never recorded, logged or shown: the records carry the method,
//! `host:port` and the outcome.

mod io;
mod judge;
mod tunnel;
pub mod wire;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::{debug, warn};

use super::{
    intercept,
    route::{End, Identity, Route, Tunnel},
    state::Proxy,
};
use crate::{
    archive::{MaskedPayload, RecordDecision},
    registry::{ConnGuard, ConnState},
};
use io::{HeadError, Next, Sides};
use judge::{Found, Verdict};
pub(crate) use tunnel::{TunnelError, TunnelRedial, TunnelSpec};
use wire::{Host, RequestHead, Target};

/// The largest body of a proxy's refusal passed on for a tunnel to an MCP backend.
const MAX_REFUSAL_BODY: u64 = 64 * 1024;

/// What asking the real proxy for a tunnel to a backend gave.
enum Asked {
    /// The tunnel is open on the proxy connection: its spec and the target's address.
    Opened(TunnelSpec, Option<SocketAddr>),
    /// The proxy refused; its answer was passed on. `close`: the connection ends.
    Refused { close: bool },
}

/// Why a client connection to an egress proxy ends in failure (recorded as the reason).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no connection to the egress proxy")]
    NoUpstream,
    #[error("no such backend")]
    UnknownBackend,
    /// A proxy request refused, answered and recorded (see `Forwarding::refuse`).
    #[error("{0}")]
    Refused(String),
    #[error("writing to the client: {0}")]
    WriteClient(#[source] std::io::Error),
    #[error("archive unavailable: {0}")]
    Archive(#[source] crate::archive::service::ArchiveError),
    #[error(transparent)]
    Pass(#[from] io::PassError),
    #[error(transparent)]
    Intercept(#[from] intercept::InterceptError),
}

/// Why it cannot be told what a proxy request's target reaches (refused with 504).
#[derive(Debug, thiserror::Error)]
enum FindError {
    #[error("targets lock poisoned")]
    Poisoned,
    #[error("cannot tell whether `{name}` is an MCP backend: resolving it took over {secs} s")]
    LookupTimeout { name: String, secs: u64 },
}

/// One proxy request, as recorded.
struct Exchange<'a> {
    req: Option<&'a RequestHead>,
    decision: &'static str,
    backend: Option<&'a str>,
    status: Option<u16>,
    reason: Option<&'a str>,
}

/// Serve a client connection to egress proxy `proxy_i` (`upstream`: the connection to the
/// real proxy dialled during attribution). `Err` carries the reason of a refusal.
pub(crate) async fn forward(
    proxy: &Arc<Proxy>,
    client: TcpStream,
    upstream: Option<TcpStream>,
    proxy_i: usize,
    who: &Identity,
    guard: &ConnGuard,
) -> Result<End, ForwardError> {
    Forwarding {
        proxy,
        who,
        proxy_i,
    }
    .run(client, upstream, guard)
    .await
}

/// One client connection to an egress proxy: what its requests share.
struct Forwarding<'a> {
    proxy: &'a Arc<Proxy>,
    who: &'a Identity,
    proxy_i: usize,
}

impl Forwarding<'_> {
    async fn run(
        &self,
        client: TcpStream,
        upstream: Option<TcpStream>,
        guard: &ConnGuard,
    ) -> Result<End, ForwardError> {
        let proxy = upstream.ok_or(ForwardError::NoUpstream)?;
        let mut sides = Sides {
            client,
            proxy,
            from_client: BytesMut::with_capacity(4096),
            from_proxy: BytesMut::new(),
        };
        let idle = self.proxy.config.idle_timeout;
        let mut first = true;
        loop {
            let Some(req) = self.next_request(&mut sides, first).await? else {
                return Ok(End::Served(None));
            };
            first = false;
            guard.set_state(ConnState::Open);
            match self.judge(&req).await {
                Verdict::Pass => {
                    self.proxy
                        .counters
                        .egress_passed
                        .fetch_add(1, Ordering::Relaxed);
                    let pass = Exchange::new(Some(&req), "pass");
                    self.record_exchange(pass).await?;
                    let (status, next) = io::pass(&mut sides, &req, idle).await?;
                    debug!(id = self.who.id, target = %req.authority(), status, ?next, "proxy request passed on");
                    match next {
                        Next::Again => continue,
                        Next::Close => return Ok(End::Served(None)),
                        Next::Tunnel => return Ok(End::Relayed(io::splice(sides, idle).await)),
                    }
                }
                Verdict::Intercept(backend_id) => {
                    match self.ask_tunnel(&mut sides, &req, backend_id).await? {
                        Asked::Opened(spec, address) => {
                            self.proxy
                                .counters
                                .egress_intercepted
                                .fetch_add(1, Ordering::Relaxed);
                            let route = Route::Tunnel(Tunnel {
                                stream: sides.proxy,
                                authority: spec.authority.clone(),
                                address,
                                redial: Box::new(TunnelRedial {
                                    proxy: self.proxy.clone(),
                                    spec,
                                }),
                            });
                            return intercept::intercept(
                                self.proxy,
                                sides.client,
                                route,
                                backend_id,
                                self.who,
                                guard,
                            )
                            .await
                            .map_err(ForwardError::from);
                        }
                        Asked::Refused { close: true } => return Ok(End::Served(None)),
                        Asked::Refused { close: false } => continue,
                    }
                }
                Verdict::Refuse(status, reason) => {
                    return Err(self
                        .refuse(&mut sides.client, Some(&req), status, reason)
                        .await);
                }
            }
        }
    }

    /// The next request head: `None` when the client closed, went away or idled past
    /// `header_read_timeout_secs` between requests (how connections end, not refusals).
    async fn next_request(
        &self,
        sides: &mut Sides,
        first: bool,
    ) -> Result<Option<RequestHead>, ForwardError> {
        let timeout = self.proxy.config.header_read_timeout;
        let read = io::read_head(
            &mut sides.client,
            &mut sides.from_client,
            timeout,
            wire::parse_request,
        )
        .await;
        let (status, reason) = match (read, io::not_http(&sides.from_client)) {
            (Ok(head), _) => return Ok(head),
            (Err(_), Some(what)) => (0, what.to_owned()),
            (Err(HeadError::Malformed(m)), None) => {
                (m.status(), format!("malformed proxy request: {m}"))
            }
            (Err(HeadError::Timeout), None) if !sides.from_client.is_empty() => (
                408,
                format!("no complete proxy request within {} s", timeout.as_secs()),
            ),
            (Err(e), None) => {
                let first = if first { "first " } else { "" };
                debug!(id = self.who.id, error = %e, "no {first}proxy request: the connection ends");
                return Ok(None);
            }
        };
        Err(self.refuse(&mut sides.client, None, status, reason).await)
    }

    /// What a request is for, resolving names where a backend could hide behind one.
    async fn judge(&self, req: &RequestHead) -> Verdict {
        let (target, host) = judge::names(req);
        let target = match target {
            Some((h, p)) => self.find(h, p).await,
            None => Ok(Found::Nothing),
        };
        let host = match host {
            Some((h, p)) => self.find(h, p).await,
            None => Ok(Found::Nothing),
        };
        match (target, host) {
            (Ok(t), Ok(h)) => judge::decide(req, t, h, &self.proxy.config.backends),
            (Err(e), _) | (_, Err(e)) => Verdict::Refuse(504, e.to_string()),
        }
    }

    /// What `host:port` reaches: a backend by name or address, a backend's address under
    /// another name (resolved here, as the proxy would), or nothing. A lookup that does not
    /// finish within `connect_timeout_secs` is an error (fail closed); one that fails is
    /// nothing (the proxy cannot connect either, unless it resolves names differently).
    async fn find(&self, host: &Host, port: u16) -> Result<Found, FindError> {
        let backends = &self.proxy.config.backends;
        {
            let targets = self.proxy.targets.read().map_err(|_| FindError::Poisoned)?;
            if let Some(i) = judge::by_name(backends, &targets, host, port) {
                return Ok(Found::Backend(i));
            }
        }
        let Host::Name(name) = host else {
            return Ok(Found::Nothing);
        };
        if !judge::needs_lookup(backends, host, port) {
            return Ok(Found::Nothing);
        }
        let secs = self.proxy.config.connect_timeout.as_secs();
        let lookup = tokio::net::lookup_host((name.as_str(), port));
        let addrs: Vec<std::net::IpAddr> =
            match tokio::time::timeout(self.proxy.config.connect_timeout, lookup).await {
                Err(_) => {
                    return Err(FindError::LookupTimeout {
                        name: name.clone(),
                        secs,
                    });
                }
                Ok(Err(_)) => return Ok(Found::Nothing),
                Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            };
        let targets = self.proxy.targets.read().map_err(|_| FindError::Poisoned)?;
        Ok(judge::by_addresses(backends, &targets, &addrs, port)
            .map_or(Found::Nothing, Found::Alias))
    }

    /// Ask the real proxy, on this client's proxy connection, for the tunnel to a backend.
    async fn ask_tunnel(
        &self,
        sides: &mut Sides,
        req: &RequestHead,
        backend_id: usize,
    ) -> Result<Asked, ForwardError> {
        let backend = self
            .proxy
            .config
            .backends
            .get(backend_id)
            .ok_or(ForwardError::UnknownBackend)?;
        if sides.from_client.len() > req.len {
            let reason = "the client sent data after CONNECT before the tunnel was established";
            return Err(self
                .refuse(&mut sides.client, Some(req), 400, reason.into())
                .await);
        }
        let address = match &req.target {
            Target::Tunnel {
                host: Host::Ip(ip),
                port,
            } => Some(SocketAddr::new(*ip, *port)),
            _ => None,
        };
        let spec = TunnelSpec {
            proxy: self.who.attribution.original_dst,
            netns: self.who.attribution.netns,
            authority: req.authority(),
            headers: tunnel::ProxyHeaders::from_head(&sides.from_client[..req.len]),
            timeout: self.proxy.config.connect_timeout,
        };
        sides.from_client.clear();
        let asked = async {
            let head = tunnel::ask(&mut sides.proxy, &spec, &mut sides.from_proxy).await?;
            let open = tunnel::opened(&head, &sides.from_proxy, &spec)?;
            Ok::<_, tunnel::TunnelError>((open, head))
        };
        let (open, head) = match asked.await {
            Ok(answer) => answer,
            Err(reason) => {
                self.proxy
                    .counters
                    .upstream_failed
                    .fetch_add(1, Ordering::Relaxed);
                return Err(self
                    .refuse(&mut sides.client, Some(req), 502, reason.to_string())
                    .await);
            }
        };
        let mut exchange = Exchange::new(Some(req), "intercept");
        exchange.backend = Some(&backend.name);
        exchange.status = Some(head.status);
        if open {
            sides.from_proxy.clear();
            self.record_exchange(exchange).await?;
            sides
                .client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .map_err(ForwardError::WriteClient)?;
            return Ok(Asked::Opened(spec, address));
        }
        // Refused by the proxy: its answer goes to the client as it came (bounded).
        exchange.decision = "refused_by_proxy";
        self.proxy
            .counters
            .egress_refused
            .fetch_add(1, Ordering::Relaxed);
        self.record_exchange(exchange).await?;
        sides
            .client
            .write_all(&sides.from_proxy.split_to(head.len))
            .await
            .map_err(ForwardError::WriteClient)?;
        let body = io::forward_body(
            &mut sides.proxy,
            &mut sides.from_proxy,
            &mut sides.client,
            head.body,
            self.proxy.config.idle_timeout,
            Some(MAX_REFUSAL_BODY),
        )
        .await;
        Ok(Asked::Refused {
            close: head.close || req.close || !matches!(body, Ok(false)),
        })
    }

    /// Refuse a proxy request: counted, recorded, answered with `status` and the reason (no
    /// answer when `status` is 0: not HTTP). Returns the reason, as the connection's error.
    async fn refuse(
        &self,
        client: &mut TcpStream,
        req: Option<&RequestHead>,
        status: u16,
        reason: String,
    ) -> ForwardError {
        self.proxy
            .counters
            .egress_refused
            .fetch_add(1, Ordering::Relaxed);
        let mut exchange = Exchange::new(req, "block");
        exchange.reason = Some(&reason);
        exchange.status = (status > 0).then_some(status);
        if let Err(e) = self.record_exchange(exchange).await {
            warn!(id = self.who.id, error = %e, "cannot archive a refused proxy request");
        }
        // For the SIEM, as a refused connection is: one rule (events are aggregated by it),
        // the target in the text, the proxy as the destination.
        crate::observe::event(crate::observe::AgentEvent::ConnectionRejected {
            rule: "airlock:proxy_request_refused".into(),
            reason: match req {
                Some(r) => format!(
                    "proxy request refused: {} {}: {reason}",
                    r.method,
                    r.authority()
                ),
                None => format!("proxy request refused: {reason}"),
            },
            client: client
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            actor: Some(Box::new(self.who.attribution.clone())),
            destination: Some(self.who.attribution.original_dst.to_string()),
        });
        if status > 0 {
            io::answer(client, status, &reason).await;
        }
        ForwardError::Refused(reason)
    }

    /// The archive row of one proxy request (`kind = "connection"`, `event = "proxy_request"`):
    /// method, `host:port`, outcome. Written before anything of the request is passed on.
    async fn record_exchange(&self, x: Exchange<'_>) -> Result<(), ForwardError> {
        let proxy = self.proxy.config.egress_proxies.get(self.proxy_i);
        // The MCP backend a tunnel is for, else the proxy (`proxy NAME`).
        let label = match x.backend {
            Some(b) => b.to_owned(),
            None => self
                .proxy
                .config
                .target_name(crate::config::proxy_id(self.proxy_i)),
        };
        let seq = self.who.next_seq();
        let mut record = self.proxy.connection_record(
            self.who.id,
            seq,
            Some(&self.who.attribution),
            Some(&label),
        );
        if x.decision == "block" {
            record.decision = RecordDecision::Block.into();
            record.rules = vec!["airlock:proxy_request".into()];
        }
        record.payload = Some(MaskedPayload::agent_event(&serde_json::json!({
            "event": "proxy_request",
            "proxy": proxy.map(|p| p.name.as_str()),
            "method": x.req.map(|r| r.method.as_str()),
            "target": x.req.map(RequestHead::authority),
            "decision": x.decision,
            "mcp_backend": x.backend,
            "status": x.status,
            "reason": x.reason,
        })));
        self.proxy
            .archive
            .record(record)
            .await
            .map(|_| ())
            .map_err(ForwardError::Archive)
    }
}

impl<'a> Exchange<'a> {
    fn new(req: Option<&'a RequestHead>, decision: &'static str) -> Exchange<'a> {
        Exchange {
            req,
            decision,
            backend: None,
            status: None,
            reason: None,
        }
    }
}
