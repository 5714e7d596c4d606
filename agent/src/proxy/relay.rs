//! Byte relay between the client and the backend: fixed buffers, half-close, an idle timeout
//! over both directions, byte counters the status view reads while the relay runs.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};

/// Size of each direction's buffer: a connection costs at most two of these.
pub const BUFFER_SIZE: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished sending (EOF each way).
    Closed,
    /// Nothing moved in either direction for the idle timeout.
    IdleTimeout,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("client side: {0}")]
    Client(#[source] std::io::Error),
    #[error("upstream side: {0}")]
    Upstream(#[source] std::io::Error),
}

/// A connection that can be read and written at the same time from one task.
/// `TcpStream::split` borrows without a lock; other streams go through `tokio::io::split`.
pub trait Splittable {
    type Read<'a>: AsyncRead + Unpin
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

impl Splittable for tokio::net::TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

impl Splittable for tokio::io::DuplexStream {
    type Read<'a> = tokio::io::ReadHalf<&'a mut tokio::io::DuplexStream>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut tokio::io::DuplexStream>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }
}

/// Copy both ways until both directions reach EOF, one side fails, or nothing moves for `idle`.
pub async fn relay<C, U>(
    mut client: C,
    mut upstream: U,
    idle: Duration,
    bytes_up: &AtomicU64,
    bytes_down: &AtomicU64,
) -> Result<RelayEnd, RelayError>
where
    C: Splittable,
    U: Splittable,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, either way.
    let last_activity = AtomicU64::new(0);
    let (mut client_rd, mut client_wr) = client.halves();
    let (mut upstream_rd, mut upstream_wr) = upstream.halves();

    let up = copy_one_way(
        &mut client_rd,
        &mut upstream_wr,
        bytes_up,
        &last_activity,
        start,
        Side::Client,
    );
    let down = copy_one_way(
        &mut upstream_rd,
        &mut client_wr,
        bytes_down,
        &last_activity,
        start,
        Side::Upstream,
    );
    let both = async {
        let (u, d) = tokio::join!(up, down);
        u.and(d)
    };
    let watchdog = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        result = both => result.map(|()| RelayEnd::Closed),
        () = watchdog => Ok(RelayEnd::IdleTimeout),
    }
}

#[derive(Clone, Copy)]
enum Side {
    /// Reading from the client, writing upstream.
    Client,
    /// Reading from upstream, writing to the client.
    Upstream,
}

async fn copy_one_way<R, W>(
    rd: &mut R,
    wr: &mut W,
    counter: &AtomicU64,
    last_activity: &AtomicU64,
    start: Instant,
    side: Side,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    type Wrap = fn(std::io::Error) -> RelayError;
    let (read_err, write_err): (Wrap, Wrap) = match side {
        Side::Client => (RelayError::Client, RelayError::Upstream),
        Side::Upstream => (RelayError::Upstream, RelayError::Client),
    };
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = rd.read(&mut buf).await.map_err(read_err)?;
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if n == 0 {
            // Propagate the half-close; the other direction may still be sending.
            let _ = wr.shutdown().await;
            return Ok(());
        }
        wr.write_all(&buf[..n]).await.map_err(write_err)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (client_app, client_side) = tokio::io::duplex(64);
        let (upstream_side, upstream_app) = tokio::io::duplex(64);
        let up = AtomicU64::new(0);
        let down = AtomicU64::new(0);
        let apps = async move {
            let (mut c, mut u) = (client_app, upstream_app);
            c.write_all(b"ping").await.unwrap();
            c.shutdown().await.unwrap();
            let mut got = Vec::new();
            u.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ping");
            let send = async {
                u.write_all(&vec![7u8; 100_000]).await.unwrap();
                u.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let ((), read) = tokio::join!(send, c.read_to_end(&mut back));
            read.unwrap();
            assert_eq!(back.len(), 100_000);
        };
        let (end, ()) = tokio::join!(
            relay(
                client_side,
                upstream_side,
                Duration::from_secs(5),
                &up,
                &down
            ),
            apps
        );
        assert_eq!(end.unwrap(), RelayEnd::Closed);
        assert_eq!(up.load(Ordering::Relaxed), 4);
        assert_eq!(down.load(Ordering::Relaxed), 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_ended() {
        let (_client_app, client_side) = tokio::io::duplex(64);
        let (upstream_side, _upstream_app) = tokio::io::duplex(64);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let end = relay(
            client_side,
            upstream_side,
            Duration::from_secs(30),
            &up,
            &down,
        )
        .await;
        assert_eq!(end.unwrap(), RelayEnd::IdleTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_postpones_the_idle_timeout() {
        let (mut client_app, client_side) = tokio::io::duplex(64);
        let (upstream_side, mut upstream_app) = tokio::io::duplex(64);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let talker = async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                client_app.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                upstream_app.read_exact(&mut b).await.unwrap();
            }
            (client_app, upstream_app)
        };
        let started = Instant::now();
        let (end, _keep) = tokio::join!(
            relay(
                client_side,
                upstream_side,
                Duration::from_secs(30),
                &up,
                &down
            ),
            talker
        );
        assert_eq!(end.unwrap(), RelayEnd::IdleTimeout);
        // 5 bytes 20 s apart, then 30 s of silence.
        assert!(started.elapsed() >= Duration::from_secs(130));
        assert_eq!(up.load(Ordering::Relaxed), 5);
    }
}
