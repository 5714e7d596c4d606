//! The client's byte stream as hyper sees it: every request head is judged by
//! [`super::framing`] before hyper reads it. A refused head never reaches hyper: once the
//! answers still being written are done, hyper sees the connection end (quietly, between
//! requests), and `super::serve` sends Airlock's own answer, then closes.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf as _, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framing::{Framer, Malformed, Step};

/// Bytes asked of the socket in one read.
const READ_CHUNK: usize = 8 * 1024;

/// The exchanges of a connection that have not finished writing their answer: a refused
/// head waits for them (its answer must not cut into theirs).
#[derive(Debug, Default)]
pub struct Exchanges {
    open: AtomicUsize,
    idle: AtomicWaker,
}

impl Exchanges {
    /// An exchange begins (hyper called the service); it ends when the guard drops (with the
    /// answer's body, or the service's future).
    pub fn begin(self: &Arc<Self>) -> ExchangeGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ExchangeGuard(self.clone())
    }

    fn busy(&self) -> bool {
        self.open.load(Ordering::Acquire) > 0
    }
}

#[derive(Debug)]
pub struct ExchangeGuard(Arc<Exchanges>);

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.wake();
        }
    }
}

/// The client stream, its request heads judged before hyper reads them.
pub struct CheckedIo<S> {
    inner: S,
    framer: Framer,
    /// Read from the client, not yet handed to hyper.
    buf: BytesMut,
    /// How many bytes at the front of `buf` were judged and may go to hyper.
    passable: usize,
    /// The client closed its side.
    eof: bool,
    refused: Option<Malformed>,
    exchanges: Arc<Exchanges>,
}

impl<S> CheckedIo<S> {
    pub fn new(inner: S, exchanges: Arc<Exchanges>) -> CheckedIo<S> {
        CheckedIo {
            inner,
            framer: Framer::default(),
            buf: BytesMut::new(),
            passable: 0,
            eof: false,
            refused: None,
            exchanges,
        }
    }

    /// The refused request head, if one ended the connection.
    pub fn take_refused(&mut self) -> Option<Malformed> {
        self.refused.take()
    }

    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CheckedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.passable > 0 {
                let n = this.passable.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.passable -= n;
                if this.buf.is_empty() {
                    // An idle connection holds no buffer (hyper keeps its own).
                    this.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.refused.is_some() {
                // The answers under way finish first; then hyper sees the end of the
                // stream between requests and closes without a word.
                if this.exchanges.busy() {
                    this.exchanges.idle.register(cx.waker());
                    if this.exchanges.busy() {
                        return Poll::Pending;
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if !this.buf.is_empty() {
                match this.framer.step(&this.buf) {
                    Step::Pass(0) | Step::More => {}
                    Step::Pass(n) => {
                        this.passable = n.min(this.buf.len());
                        continue;
                    }
                    Step::Refuse(m) => {
                        this.buf.clear();
                        this.refused = Some(m);
                        continue;
                    }
                }
            }
            if this.eof {
                // What is left (a partial head) goes to hyper, which reports it as before.
                if this.buf.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.passable = this.buf.len();
                continue;
            }
            // A head is refused at MAX_HEAD bytes: the buffer stays below that plus a read.
            this.buf.reserve(READ_CHUNK);
            let spare = this.buf.spare_capacity_mut();
            let limit = spare.len().min(READ_CHUNK);
            let mut read = ReadBuf::uninit(&mut spare[..limit]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => {
                    if this.buf.is_empty() {
                        // Idle between requests: hold no buffer while waiting.
                        this.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        this.eof = true;
                    } else {
                        // SAFETY: `n` bytes of the spare capacity were just initialised by
                        // the read.
                        unsafe { this.buf.set_len(this.buf.len() + n) };
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CheckedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The good request passes; the malformed head after it does not, and the stream ends
    /// (for hyper) only once the exchange under way is done.
    #[tokio::test]
    async fn a_refused_head_waits_for_the_answers_under_way() {
        let (mut client, server) = tokio::io::duplex(4096);
        let exchanges = Arc::new(Exchanges::default());
        let mut io = CheckedIo::new(server, exchanges.clone());
        let good = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        client
            .write_all(&[&good[..], b"GET /b HTTP/1.1\r\nBad Header\r\n\r\n"].concat())
            .await
            .unwrap();
        let mut buf = vec![0; 4096];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], good);
        // hyper called the service for the good request: its answer is being written.
        let guard = exchanges.begin();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), io.read(&mut buf)).await;
        assert!(pending.is_err(), "the stream ended under an open exchange");
        let read = tokio::spawn(async move {
            let n = io.read(&mut buf).await.unwrap();
            (n, io)
        });
        drop(guard);
        let (n, mut io) = read.await.unwrap();
        assert_eq!(n, 0, "hyper sees the end of the stream");
        let refused = io.take_refused().expect("refused");
        assert!(refused.to_string().contains("Bad Header"), "{refused}");
    }
}
