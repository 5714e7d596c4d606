//! MCP on the wire, sans-IO: JSON-RPC messages, server-sent events, the 2026-07-28 mirrored
//! headers, and what Airlock remembers per session.

pub mod headers;
pub mod jsonrpc;
pub mod media;
pub mod session;
pub mod sse;
pub mod strict;
