//! The data path: every redirected connection, from `accept()` to its last byte. Read in the
//! order a connection meets it:
//!
//! - [`accept`]: the accept loops (the agent's namespace and each served one) hand sockets to
//!   [`workers`], the connection threads, where everything of a connection runs;
//! - [`connection`]: one connection, steps 8–14 (ARCHITECTURE.md) as methods: the kernel's
//!   record, attribution and the upstream dial, the `open` record, serving, the `close`
//!   record; every refusal leaves through [`refusal`];
//! - [`relay`]: `mode = "opaque"`, bytes both ways;
//! - [`intercept`]: `mode = "mcp"`: TLS (ClientHello, SNI, the leaf, the upstream handshake)
//!   or plain HTTP, then [`http`]: hyper on both sides, what passes and what is refused,
//!   request by request, answer by answer, SSE event by event, each MCP message through the
//!   [`crate::pipeline`];
//! - [`forward`]: a connection to an egress proxy: each proxy request judged, a tunnel to an
//!   MCP backend intercepted inside;
//! - [`route`]: what those share (who the connection is, how the backend is reached, how it
//!   ended); [`state`]: what every connection shares ([`Proxy`]).
//!
//! The agent's own outbound sockets (the upstream dial, webhooks, the bucket) are
//! [`crate::egress`]'s.

pub mod accept;
pub mod connection;
pub mod forward;
pub mod http;
pub mod intercept;
pub mod refusal;
pub mod relay;
pub mod route;
pub mod state;
pub mod workers;

use std::sync::Arc;

pub use state::{AgentCounters, DialError, Proxy};

/// Start `n` connection threads serving `proxy`'s connections.
pub fn start_threads(proxy: &Arc<Proxy>, n: usize) -> std::io::Result<workers::ConnThreads> {
    let proxy = proxy.clone();
    workers::ConnThreads::start(
        Arc::new(move |stream, peer, netns| {
            Box::pin(connection::serve(proxy.clone(), stream, peer, netns))
        }),
        n,
    )
}

#[cfg(test)]
mod tests_connection;
