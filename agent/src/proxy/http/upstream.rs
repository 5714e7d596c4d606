//! The upstream side of an intercepted connection: the hyper client connection to the server,
//! re-dialled when the server closes it, and the pool of idle ones a new client connection
//! starts from.
//!
//! A server connection in use has no task of its own. Its driver (hyper's connection future,
//! which writes requests and reads answers) is polled by whoever waits on it: the exchange
//! while it sends a request and waits for the answer's head, then the answer's body
//! ([`UpstreamBody`]) as the client connection's task reads it. An exchange so stays on one
//! task from the client's request to the server's last byte, with no wake-up crossing between
//! tasks. Between exchanges (in the pool, or kept by its client connection) a small watcher
//! task polls it instead, so a server closing an idle connection is seen at once: the close
//! is answered (TLS `close_notify`, FIN) and the connection leaves the pool.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// A hyper client connection's driver, shared by its sender and the body it is reading; `None`
/// once the connection ended.
type Driver = Arc<Mutex<Option<DriverFuture>>>;

type DriverFuture = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// Poll the connection's driver once in `cx` (it registers `cx`'s waker for the connection's
/// socket); a driver that finished is dropped, which ends whatever waits on the connection.
fn drive(driver: &Driver, cx: &mut Context<'_>) {
    let mut slot = driver.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(conn) = slot.as_mut()
        && let Poll::Ready(end) = conn.as_mut().poll(cx)
    {
        if let Err(e) = end {
            debug!(error = %e, "upstream HTTP connection ended with an error");
        }
        *slot = None;
    }
}

/// Who polls a connection's driver: an exchange (`IN_USE`), its watcher (`IDLE`), or nobody
/// any more (`GONE`: its sender was dropped; the watcher ends).
struct Watch {
    state: AtomicU8,
    waker: futures_util::task::AtomicWaker,
}

const IN_USE: u8 = 0;
const IDLE: u8 = 1;
const GONE: u8 = 2;

impl Watch {
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        if state != IN_USE {
            self.waker.wake();
        }
    }
}

/// The watcher of an idle connection: polls its driver while no exchange does; ends when the
/// connection ended or its sender is gone. (Its waker replaces the exchange's on the socket
/// only when it polls, and it polls only while the connection is idle.)
async fn watch_idle(driver: Weak<Mutex<Option<DriverFuture>>>, watch: Arc<Watch>) {
    std::future::poll_fn(|cx| {
        watch.waker.register(cx.waker());
        match watch.state.load(Ordering::Acquire) {
            GONE => return Poll::Ready(()),
            IN_USE => return Poll::Pending,
            _ => {}
        }
        let Some(driver) = driver.upgrade() else {
            return Poll::Ready(());
        };
        drive(&driver, cx);
        let ended = driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none();
        if ended {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A hyper client connection's request side, its driver, and the connection thread that
/// opened it.
pub struct UpstreamSender {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: Driver,
    watch: Arc<Watch>,
    thread: Thread,
}

impl Drop for UpstreamSender {
    fn drop(&mut self) {
        self.watch.set(GONE);
    }
}

impl UpstreamSender {
    /// An exchange drives the connection from now on (its watcher stands aside).
    fn take_up(&self) {
        self.watch.set(IN_USE);
    }

    /// Between exchanges: the watcher drives it.
    fn put_down(&self) {
        self.watch.set(IDLE);
    }

    /// Whether the connection is gone (its driver ended, or hyper closed it).
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
            || self
                .driver
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none()
    }

    /// Whether a request could be sent now (the driver has asked for one).
    pub fn is_ready(&self) -> bool {
        self.send.is_ready()
    }

    /// Wait until the connection takes a request, driving it meanwhile.
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        std::future::poll_fn(|cx| {
            drive(&self.driver, cx);
            self.send.poll_ready(cx)
        })
        .await
    }

    /// Poll the driver once from the current task: an answer read whole leaves the connection
    /// ready for the next request only once its driver has seen the end.
    async fn settle(&self) {
        std::future::poll_fn(|cx| {
            drive(&self.driver, cx);
            Poll::Ready(())
        })
        .await
    }

    /// Send `req`, driving the connection until the answer's head is in; the answer's body
    /// drives it from then on.
    async fn send(
        &mut self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<
        http::Response<UpstreamBody>,
        hyper::client::conn::TrySendError<http::Request<Full<Bytes>>>,
    > {
        let mut answer = std::pin::pin!(self.send.try_send_request(req));
        let driver = self.driver.clone();
        let head = std::future::poll_fn(|cx| {
            drive(&driver, cx);
            answer.as_mut().poll(cx)
        })
        .await?;
        let watch = self.watch.clone();
        Ok(head.map(|inner| UpstreamBody {
            inner,
            driver,
            watch,
        }))
    }
}

/// A server's answer body, which drives its connection as it is read (see the module
/// documentation).
pub struct UpstreamBody {
    inner: Incoming,
    driver: Driver,
    watch: Arc<Watch>,
}

impl Drop for UpstreamBody {
    /// Read whole or abandoned, the answer no longer drives its connection: the watcher does
    /// until the next exchange takes it (a connection kept by its client connection after a
    /// stream is watched too).
    fn drop(&mut self) {
        if self.watch.state.load(Ordering::Acquire) == IN_USE {
            self.watch.set(IDLE);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        drive(&self.driver, cx);
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why no connection to the server could be used, or no answer came on it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Dial(#[from] crate::proxy::state::DialError),
    #[error(transparent)]
    Tunnel(#[from] crate::proxy::forward::TunnelError),
    #[error("TLS with the server ({name}): {source}")]
    Tls {
        /// The server name verified, as `Debug` shows it.
        name: String,
        source: std::io::Error,
    },
    #[error("HTTP handshake with the server: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("upstream connection task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("no upstream connection")]
    Missing,
    #[error("the server's response: {0}")]
    Response(#[source] hyper::Error),
}

/// How to open (again) a connection to the server this client connection goes to, and where
/// its idle connections wait between exchanges.
pub trait Dial: Send + Sync + 'static {
    fn dial(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<UpstreamSender, UpstreamError>> + Send + '_>>;

    /// An idle connection to the same server, if one waits.
    fn take_idle(&self) -> Option<UpstreamSender>;

    /// Keep an idle connection for the next exchange to the same server.
    fn keep_idle(&self, sender: UpstreamSender);
}

/// The upstream side of one client connection: the connection dialled while the client's
/// handshake ran; after each exchange whose answer was read whole, it goes back to the pool,
/// and the next exchange takes an idle one (or dials). An idle client connection so holds no
/// server connection, as in a reverse proxy's keep-alive pool.
pub struct UpstreamSlot {
    first: Option<tokio::task::JoinHandle<Result<UpstreamSender, UpstreamError>>>,
    sender: Option<UpstreamSender>,
    dialer: Box<dyn Dial>,
}

impl UpstreamSlot {
    pub fn new(
        first: tokio::task::JoinHandle<Result<UpstreamSender, UpstreamError>>,
        dialer: Box<dyn Dial>,
    ) -> UpstreamSlot {
        UpstreamSlot {
            first: Some(first),
            sender: None,
            dialer,
        }
    }

    /// A connection ready for a request: this client connection's own, an idle pooled one,
    /// or (`fresh`, or none usable) a new one.
    async fn ready(&mut self, fresh: bool) -> Result<&mut UpstreamSender, UpstreamError> {
        if let Some(first) = self.first.take() {
            let s = first.await.map_err(UpstreamError::Task)??;
            self.sender = Some(s);
        }
        if self.sender.is_none() && !fresh {
            self.sender = self.dialer.take_idle();
        }
        if let Some(s) = self.sender.as_ref() {
            s.take_up();
        }
        let usable = match self.sender.as_mut() {
            Some(s) => !s.is_closed() && s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let fresh = self.dialer.dial().await?;
            fresh.take_up();
            self.sender = Some(fresh);
        }
        self.sender.as_mut().ok_or(UpstreamError::Missing)
    }

    /// Send `req`; a request that a closing connection never wrote goes out once more on a
    /// new connection (hyper hands it back unsent, so this cannot send it twice).
    pub async fn send(
        &mut self,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        let mut retried = false;
        loop {
            // A request handed back unsent goes out on a new connection, not another pooled one.
            let sender = self.ready(retried).await?;
            match sender.send(req).await {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !retried => {
                        retried = true;
                        self.sender = None;
                        req = unsent;
                    }
                    _ => return Err(UpstreamError::Response(e.into_error())),
                },
            }
        }
    }

    /// The exchange is over: a connection whose answer was read whole (ready for another
    /// request) waits in the pool; one still carrying a stream stays with this client
    /// connection.
    pub async fn checkin(&mut self) {
        if let Some(s) = self.sender.as_ref() {
            s.settle().await;
            if s.is_ready() {
                s.put_down();
            }
        }
        if self
            .sender
            .as_ref()
            .is_some_and(|s| !s.is_closed() && s.is_ready())
            && let Some(sender) = self.sender.take()
        {
            self.dialer.keep_idle(sender);
        }
    }
}

/// The upstream TLS of a backend: its client configuration and the name to verify.
pub type UpstreamTls = (
    std::sync::Arc<rustls::ClientConfig>,
    rustls_pki_types::ServerName<'static>,
);

/// Open an HTTP/1.1 client connection over `io`. Its driver runs where it is waited on (see
/// the module documentation), so the connection can outlive the client connection that opened
/// it (the upstream pool).
pub async fn client_handshake<S>(io: S) -> Result<UpstreamSender, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(64 * 1024)
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    let driver: Driver = Arc::new(Mutex::new(Some(Box::pin(connection))));
    let watch = Arc::new(Watch {
        state: AtomicU8::new(IDLE),
        waker: Default::default(),
    });
    tokio::spawn(watch_idle(Arc::downgrade(&driver), watch.clone()));
    Ok(UpstreamSender {
        send: sender,
        driver,
        watch,
        thread: crate::proxy::workers::current(),
    })
}

/// Idle upstream connections, by backend, address and connection thread, shared by every
/// client connection on that thread to the same place: an exchange takes one and gives it back
/// once its answer was read whole, so a new client connection costs one TLS handshake, not
/// two, and an idle client connection holds no server connection. Only a connection with no
/// request in flight is kept, at most `MAX_IDLE` per place and thread (nginx's `keepalive 128`,
/// which is per worker too), for `IDLE_TTL`. HTTP/1.1 requests stand alone (MCP sessions ride
/// in headers; brokered credentials are added per request), so reuse across callers leaks
/// nothing.
///
/// A server connection's driver task runs on the connection thread that dialled it
/// ([`crate::proxy::workers`]), and only exchanges of that thread take it: its wake-ups never cross
/// to another thread (and CPU).
#[derive(Default)]
pub struct UpstreamPool {
    idle: std::sync::Mutex<std::collections::HashMap<(PoolKey, Thread), Vec<Idle>>>,
}

/// A connection thread's index (`None`: off the connection threads).
type Thread = Option<usize>;

struct Idle {
    sender: UpstreamSender,
    since: Instant,
}

impl Idle {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && self.sender.is_ready() && self.since.elapsed() < IDLE_TTL
    }
}

/// Backend index and server address.
/// Backend, address, network namespace (its cookie: the same address may be another server
/// in a container's namespace).
pub type PoolKey = (usize, std::net::SocketAddr, u64);

const MAX_IDLE: usize = 128;
const IDLE_TTL: Duration = Duration::from_secs(30);

impl UpstreamPool {
    /// An idle connection to `key` of this thread, if one is still open (the most recently
    /// used).
    pub fn take(&self, key: PoolKey) -> Option<UpstreamSender> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(&(key, crate::proxy::workers::current()))?;
        while let Some(i) = list.pop() {
            if i.usable() {
                return Some(i.sender);
            }
        }
        None
    }

    /// Whether this thread has an idle connection to `key`.
    pub fn has(&self, key: PoolKey) -> bool {
        self.idle
            .lock()
            .map(|i| {
                i.get(&(key, crate::proxy::workers::current()))
                    .is_some_and(|l| !l.is_empty())
            })
            .unwrap_or(false)
    }

    /// Keep `sender` for reuse (by its own thread) if it is idle and open.
    pub fn put(&self, key: PoolKey, sender: UpstreamSender) {
        if sender.is_closed() || !sender.is_ready() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry((key, sender.thread)).or_default();
            list.retain(Idle::usable);
            if list.len() < MAX_IDLE {
                list.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client connection over an in-memory pipe (nothing is ever sent on it).
    async fn sender() -> (UpstreamSender, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(4096);
        (client_handshake(ours).await.unwrap(), theirs)
    }

    #[tokio::test]
    async fn a_server_closing_an_idle_connection_is_seen_without_an_exchange() {
        let (mut s, peer) = sender().await;
        s.take_up();
        s.ready().await.unwrap();
        // Idle (as in the pool): its watcher drives it.
        s.put_down();
        drop(peer);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !s.is_closed() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the close was never seen");
        // In use, the watcher stands aside: a connection whose exchange has it is driven by
        // that exchange alone (here: nobody, so a close goes unseen until it polls).
        let (s, peer) = sender().await;
        s.take_up();
        drop(peer);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!s.is_closed());
    }

    #[tokio::test]
    async fn a_pooled_connection_is_taken_only_on_the_thread_that_drives_it() {
        let pool = UpstreamPool::default();
        let key: PoolKey = (0, "127.0.0.1:1".parse().unwrap(), 1);
        // This test's thread plays connection thread 0; its driver task runs here.
        crate::proxy::workers::enter(0);
        let (mut s, _peer) = sender().await;
        assert_eq!(s.thread, Some(0));
        // Ready once its driver task has run.
        s.ready().await.unwrap();
        pool.put(key, s);
        assert!(pool.has(key));
        // Another connection thread neither sees nor takes it.
        let other = std::thread::spawn(move || {
            crate::proxy::workers::enter(1);
            (pool.has(key), pool.take(key).is_some(), pool)
        });
        let (seen, taken, pool) = other.join().unwrap();
        assert!(!seen && !taken);
        // Its own thread takes it, once.
        assert!(pool.take(key).is_some());
        assert!(pool.take(key).is_none());
    }
}
