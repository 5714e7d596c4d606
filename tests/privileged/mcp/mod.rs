//! End to end with real, unmodified MCP peers (the Python SDK's server over HTTPS, the Python
//! and TypeScript SDK clients, the official conformance suite) through the eBPF redirect and
//! Airlock's TLS interception. The peers and the set-up they share are in
//! [`crate::harness::peers`] and [`crate::harness::mcp_backend`].
//!
//! # Layout
//! - `sdk`: the same results direct and through Airlock, per SDK and transport; masking and
//!   blocking inline, every message in the archive (`archive_queries` reads that archive back);
//! - `conformance`: the conformance suite's server scenarios;
//! - `tls`: untrusted server certificates, unknown SNI;
//! - `http`: principals, pass-through, batches, malformed bodies, plain HTTP, the body cap;
//! - `approvals`: calls held for a human;
//! - `controls`: brokered credentials, pinned tool definitions, `airlock sessions kill`;
//! - `crash`: SIGKILL under load loses no answered message.

mod approvals;
mod archive_queries;
mod conformance;
mod controls;
mod crash;
mod http;
mod sdk;
mod tls;
