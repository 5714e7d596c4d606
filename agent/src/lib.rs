//! Airlock's agent: a host-level transparent interceptor for MCP traffic.
//!
//! # Layout
//! The data path, in the order a connection meets it (see ARCHITECTURE.md for the picture):
//! - [`kernel`]: loads and pins the programs of `agent-ebpf` (cgroup `connect4`/`connect6`
//!   redirect, `sock_ops` hand-off), keeps the backend address map in sync, takes flow records.
//! - [`keys`]: normalises socket addresses (IPv4, IPv6, IPv4-mapped) into the maps' key form.
//! - [`proxy`]: the wing — everything a redirected connection meets, one task per connection
//!   from accept to its closing record: `accept` (the loops), `connection` (steps 8–14, one
//!   method each), `refusal` (the one exit of a refused connection, with its rule), `route`
//!   (who and how to reach the backend: direct, or a tunnel through an egress proxy),
//!   `workers` (the connection threads), `relay` (opaque backends), `intercept` (TLS or
//!   plain HTTP: ClientHello, SNI, leaves, upstream TLS dialled concurrently), `http`
//!   (hyper HTTP/1.1 both sides, request heads read by Airlock first), `forward` (a
//!   client's connection to its HTTP proxy, `[[egress_proxy]]`: each proxy request judged).
//! - [`stdio`]: stdio MCP servers of jobs run under `airlock govern`: the exec filter
//!   (seccomp user notification), what an exec asks for, the line relay into the pipeline.
//! - [`attribution`]: the kernel record enriched from `/proc` (user, exe, cmdline, cgroup).
//! - [`egress`]: every connection the agent opens itself (upstreams, webhooks, the bucket):
//!   from a socket tagged as its own, under a deadline; TLS client configurations.
//! - [`tls`]: the managed CA, leaf minting, rustls server configs.
//! - [`limits`]: per-uid connection and body-byte caps, the parsing budget.
//! - [`pipeline`]: every MCP message: correlate, policy (mask, block), record.
//! - [`mcp`]: sans-IO strict JSON, JSON-RPC validation, media types, SSE parser, 2026-07-28
//!   headers, session correlation.
//! - [`registry`]: live and recently closed connections, for `airlock status`.
//! - [`admin`]: the root-only Unix socket `airlock status` and `airlock detach` talk to.
//! - [`agent`]: `airlock run`: its phases in order (`start`, `stop`), the admin socket's
//!   requests (`control`), background tasks (policy reloads, retention, DNS refresh).
//! - [`policy`]: sans-IO rules and detectors: verdicts (allow, block, approve), masking of
//!   JSON string leaves, recording levels; loaded from `policies_dir`.
//! - [`config`]: `airlock.toml`; [`cgroup`]: finding the cgroup v2 mount; [`fsperm`]: owner
//!   and mode checks of state, archive and keys.
//! - [`logging`]: the agent's own log (text or JSON), what it never contains.
//! - [`ship`]: the archive shipped to an S3-compatible bucket (`[ship]`), and `airlock verify`
//!   of a fleet copy.
//! - [`observe`]: the tap metrics and audit events read: every record, every agent event.
//! - [`metrics`]: Prometheus/OpenMetrics `GET /metrics` on `metrics_listen`.
//! - [`events`]: audit events for SIEMs: OCSF mapping, file/syslog/webhook sinks, spool.
//! - [`notify`]: systemd's readiness protocol (`READY=1` once interception is live);
//!   [`install`]: `airlock install|uninstall`, the package's files without the package.
//! - [`fuzzing`]: the fuzz targets' bodies (`fuzz/`), replayed on their corpora by the tests.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod agent;
pub mod archive;
pub mod attribution;
pub mod cgroup;
pub mod config;
pub mod egress;
pub mod enroll;
pub mod events;
pub mod fsperm;
pub mod fuzzing;
pub mod install;
pub mod kernel;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod netwatch;
pub mod notify;
pub mod observe;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod refusals;
pub mod registry;
pub mod ship;
pub mod sockdiag;
pub mod stdio;
pub mod tls;
