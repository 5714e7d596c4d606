//! The accept loops: one per listener (the agent's namespace, and each served one), on the
//! main runtime; each accepted socket goes to a connection thread ([`super::workers`]).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::net::TcpListener;
use tracing::warn;

use super::{state::Proxy, workers::ConnThreads};

impl Proxy {
    /// Accept until the task is dropped, handing each connection to a connection thread.
    /// Accept errors (e.g. out of fds) are logged and retried after a pause rather than ending
    /// the agent. `netns` is the cookie of the listener's network namespace.
    pub async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        threads: Arc<ConnThreads>,
        netns: u64,
    ) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    threads.hand_off(stream, peer, netns).await;
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
