//! Privileged integration tests: real eBPF programs attached to a child cgroup per test, a real
//! `airlock run`, real clients (Python sockets) started inside the cgroup, backends on loopback.
//!
//! They need root. Without it they skip locally and fail in CI (`CI=true`).

mod archive;
mod census;
mod containers;
mod events;
mod events_flood;
mod failclosed;
mod harness;
mod lifecycle;
mod logs;
mod mcp;
mod metrics;
mod proxies;
mod redirect;
mod redteam;
mod refusals;
mod ship;
mod siem;
mod stdio;
mod upgrade;
