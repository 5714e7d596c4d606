//! The connection threads. Each accepted connection is handed to one of them and lives there
//! until it closes: its TLS sessions, both hyper connections and its pipeline run on one
//! single-threaded runtime, so the wake-ups between them (a request handed to the upstream
//! connection, its answer and body handed back) stay on one thread and one CPU instead of
//! bouncing between the workers of a shared work-stealing runtime. The accept loops and the
//! agent's background tasks stay on the main runtime.
//!
//! There is one thread per CPU the agent may use (`TOKIO_WORKER_THREADS` when set, as tokio
//! reads it for the main runtime). Connections go round-robin; the hand-off is bounded, so a
//! thread that falls behind slows the accept loop rather than queueing sockets without end.

use std::{
    cell::Cell,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::mpsc;
use tracing::warn;

/// What a connection thread does with an accepted connection (its peer, and the cookie of
/// the namespace it was accepted in): the future runs as a task of that thread.
pub type Serve = Arc<
    dyn Fn(
            tokio::net::TcpStream,
            SocketAddr,
            u64,
        ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>
        + Send
        + Sync,
>;

/// Accepted sockets waiting for each connection thread.
const HAND_OFF: usize = 256;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The connection thread this code runs on (`None` off them: the main runtime, tests).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Mark this thread as connection thread `index` (once, as it starts).
pub(crate) fn enter(index: usize) {
    INDEX.with(|i| i.set(Some(index)));
}

/// How many connection threads to start: `TOKIO_WORKER_THREADS` if it is a positive number,
/// else the CPUs this process may run on.
pub fn count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// An accepted socket, its peer, and the cookie of the network namespace it was accepted in.
type Accepted = (std::net::TcpStream, SocketAddr, u64);

/// The hand-off to the connection threads.
pub struct ConnThreads {
    threads: Vec<mpsc::Sender<Accepted>>,
    next: AtomicUsize,
}

impl ConnThreads {
    /// Start `n` connection threads, each running `serve` for the connections it is given.
    pub fn start(serve_one: Serve, n: usize) -> io::Result<ConnThreads> {
        let mut threads = Vec::with_capacity(n);
        for index in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, rx) = mpsc::channel(HAND_OFF);
            let serve_one = serve_one.clone();
            std::thread::Builder::new()
                .name(format!("airlock-conn-{index}"))
                .spawn(move || {
                    enter(index);
                    runtime.block_on(serve(serve_one, rx));
                })?;
            threads.push(tx);
        }
        Ok(ConnThreads {
            threads,
            next: AtomicUsize::new(0),
        })
    }

    /// Give an accepted connection to the next thread (waiting while its hand-off is full).
    pub async fn hand_off(&self, stream: tokio::net::TcpStream, peer: SocketAddr, netns: u64) {
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, error = %e, "cannot hand an accepted connection to its thread");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        if self.threads[i].send((stream, peer, netns)).await.is_err() {
            // The socket closes with the message (a plain close, not a reset; no record: see
            // issue 12's closing note): never a relay.
            warn!(%peer, thread = i, "a connection thread has stopped; connection closed");
        }
    }
}

async fn serve(serve_one: Serve, mut rx: mpsc::Receiver<Accepted>) {
    while let Some((stream, peer, netns)) = rx.recv().await {
        // Registered with this thread's reactor; it stays non-blocking (`into_std` keeps it).
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => {
                tokio::spawn(serve_one(stream, peer, netns));
            }
            Err(e) => warn!(%peer, error = %e, "cannot register an accepted connection"),
        }
    }
}
