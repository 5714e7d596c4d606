//! The I/O around [`super::wire`]: heads read under a deadline into a bounded buffer, bodies
//! passed on as they arrive (never buffered whole), one exchange passed to the real proxy byte
//! for byte, and the splice once a tunnel is open.

use std::{sync::atomic::AtomicU64, time::Duration};

use bytes::{Buf as _, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::wire::{self, Body, BodyFollower, Malformed, RequestHead, ResponseHead};
use crate::proxy::relay::{self, RelayEnd, RelayError};

/// Bytes asked of a socket in one read.
const READ_CHUNK: usize = 16 * 1024;

/// Why no head was read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("{0}")]
    Malformed(#[from] Malformed),
    #[error("no complete head in time")]
    Timeout,
    #[error("the peer closed in the middle of a head")]
    Truncated,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Read until `parse` finds a head at the start of `buf` (within `timeout` in all), or the
/// peer closes: `Ok(None)` when it closes before sending a byte of it.
pub async fn read_head<R, T>(
    rd: &mut R,
    buf: &mut BytesMut,
    timeout: Duration,
    parse: impl Fn(&[u8]) -> Result<Option<T>, Malformed>,
) -> Result<Option<T>, HeadError>
where
    R: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !buf.is_empty()
            && let Some(head) = parse(buf)?
        {
            return Ok(Some(head));
        }
        buf.reserve(READ_CHUNK);
        let n = tokio::time::timeout_at(deadline, rd.read_buf(buf))
            .await
            .map_err(|_| HeadError::Timeout)??;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HeadError::Truncated)
            };
        }
    }
}

/// Why a body could not be passed on.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Malformed(#[from] Malformed),
    #[error("a body past {0} bytes")]
    TooLong(u64),
    #[error("passing a body on: {0}")]
    Write(#[source] std::io::Error),
    #[error("no byte of a body for {0} s")]
    Idle(u64),
    #[error("reading a body: {0}")]
    Read(#[source] std::io::Error),
    #[error("the sender closed in the middle of a body")]
    Truncated,
}

/// Why an exchange passed to the real proxy ended before its answer was passed on whole.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("writing to the egress proxy: {0}")]
    WriteProxy(#[source] std::io::Error),
    #[error("the egress proxy's answer: {0}")]
    Answer(#[source] HeadError),
    #[error("the egress proxy closed without answering")]
    Unanswered,
    #[error("writing to the client: {0}")]
    WriteClient(#[source] std::io::Error),
    #[error(transparent)]
    Body(#[from] BodyError),
}

/// Pass a body from `rd` to `wr` as `body` delimits it, starting with what `buf` holds; at
/// most `limit` bytes. `Ok(true)` when it ended with its sender's close.
pub async fn forward_body<R, W>(
    rd: &mut R,
    buf: &mut BytesMut,
    wr: &mut W,
    body: Body,
    idle: Duration,
    limit: Option<u64>,
) -> Result<bool, BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut follower = BodyFollower::new(body);
    let mut passed = 0u64;
    loop {
        if !buf.is_empty() {
            let p = follower.feed(buf)?;
            passed += p.used as u64;
            if limit.is_some_and(|l| passed > l) {
                return Err(BodyError::TooLong(limit.unwrap_or(0)));
            }
            wr.write_all(&buf[..p.used])
                .await
                .map_err(BodyError::Write)?;
            buf.advance(p.used);
            if p.done {
                return Ok(false);
            }
        } else if follower.done() {
            return Ok(false);
        }
        buf.reserve(READ_CHUNK);
        let n = tokio::time::timeout(idle, rd.read_buf(buf))
            .await
            .map_err(|_| BodyError::Idle(idle.as_secs()))?
            .map_err(BodyError::Read)?;
        if n == 0 {
            return if follower.until_close() {
                let _ = wr.shutdown().await;
                Ok(true)
            } else {
                Err(BodyError::Truncated)
            };
        }
    }
}

/// A client connection to a proxy and the agent's connection to the real proxy, with what
/// was read from each and not passed on yet.
pub struct Sides {
    pub client: TcpStream,
    pub proxy: TcpStream,
    pub from_client: BytesMut,
    pub from_proxy: BytesMut,
}

/// What follows an exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The next request on the same connections.
    Again,
    /// The connection ends here.
    Close,
    /// The connections became a tunnel (a 2xx to CONNECT, a 101): splice.
    Tunnel,
}

/// Pass the request whose head starts `from_client` to the proxy, then its answer to the
/// client, byte for byte. The body goes up while the answer is awaited (`Expect:
/// 100-continue`, early refusals); interim answers are passed on. The final status, and what
/// follows.
pub async fn pass(
    sides: &mut Sides,
    req: &RequestHead,
    idle: Duration,
) -> Result<(u16, Next), PassError> {
    let Sides {
        client,
        proxy,
        from_client,
        from_proxy,
    } = sides;
    let (mut client_rd, mut client_wr) = client.split();
    let (mut proxy_rd, mut proxy_wr) = proxy.split();
    proxy_wr
        .write_all(&from_client[..req.len])
        .await
        .map_err(PassError::WriteProxy)?;
    from_client.advance(req.len);
    let up = forward_body(
        &mut client_rd,
        from_client,
        &mut proxy_wr,
        req.body,
        idle,
        None,
    );
    let head_req = req.method == "HEAD";
    let connect = req.is_connect();
    let down = async {
        loop {
            let head = read_head(&mut proxy_rd, from_proxy, idle, |b| {
                wire::parse_response(b, head_req, connect)
            })
            .await
            .map_err(PassError::Answer)?
            .ok_or(PassError::Unanswered)?;
            client_wr
                .write_all(&from_proxy[..head.len])
                .await
                .map_err(PassError::WriteClient)?;
            from_proxy.advance(head.len);
            if !(100..200).contains(&head.status) || head.status == 101 {
                return Ok::<ResponseHead, PassError>(head);
            }
        }
    };
    let (sent, answer) = tokio::join!(up, down);
    let answer = answer?;
    if answer.body == Body::Tunnel {
        sent?;
        return Ok((answer.status, Next::Tunnel));
    }
    let closed = forward_body(
        &mut proxy_rd,
        from_proxy,
        &mut client_wr,
        answer.body,
        idle,
        None,
    )
    .await?;
    let next = if sent.is_err() || closed || answer.close || req.close {
        Next::Close
    } else {
        Next::Again
    };
    Ok((answer.status, next))
}

/// Hand what each side sent ahead over, then relay both ways until both close.
pub async fn splice(mut sides: Sides, idle: Duration) -> Result<RelayEnd, RelayError> {
    if !sides.from_proxy.is_empty() {
        sides
            .client
            .write_all(&sides.from_proxy)
            .await
            .map_err(RelayError::Client)?;
    }
    if !sides.from_client.is_empty() {
        sides
            .proxy
            .write_all(&sides.from_client)
            .await
            .map_err(RelayError::Upstream)?;
    }
    // Bytes are read from TCP_INFO when the connection ends (heads included).
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    relay::relay(sides.client, sides.proxy, idle, &up, &down).await
}

/// Airlock's own answer to a proxy request it refuses: `status`, the reason as the body, and
/// the connection closes.
pub async fn answer(client: &mut TcpStream, status: u16, reason: &str) {
    let body = format!("Airlock: {reason}\n");
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let out = format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\nproxy-connection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        client.write_all(out.as_bytes()).await?;
        client.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

/// Bytes that are not an HTTP request at all, named (no HTTP answer makes sense to them).
pub fn not_http(first: &[u8]) -> Option<&'static str> {
    match first.first() {
        Some(0x16) => Some(
            "TLS to the proxy (an https:// proxy URL): the proxy requests inside cannot be read, so the connection is refused",
        ),
        Some(0x04 | 0x05) => Some(
            "a SOCKS greeting: only HTTP proxy requests are read, so the connection is refused",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        s.read_exact(&mut buf).await.unwrap();
        buf
    }

    /// An exchange with an interim answer and a chunked body, a pipelined CONNECT after it,
    /// then a tunnel: every byte reaches the other side as it was sent, and the next request
    /// is found where it begins.
    #[tokio::test]
    async fn exchanges_pass_byte_for_byte_until_a_tunnel_opens() {
        let (mut client, agent_side) = pair().await;
        let (agent_proxy, mut proxy) = pair().await;
        let mut sides = Sides {
            client: agent_side,
            proxy: agent_proxy,
            from_client: BytesMut::new(),
            from_proxy: BytesMut::new(),
        };
        let head = "POST http://x.test/ HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n";
        let body = "3;a=b\r\nabc\r\n0\r\nT: 1\r\n\r\n";
        let next = "CONNECT y.test:443 HTTP/1.1\r\nHost: y.test:443\r\n\r\n";
        let idle = Duration::from_secs(5);
        client.write_all(head.as_bytes()).await.unwrap();
        let proxy_side = async {
            assert_eq!(read_exactly(&mut proxy, head.len()).await, head.as_bytes());
            proxy
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(read_exactly(&mut proxy, body.len()).await, body.as_bytes());
            proxy
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        };
        let client_side = async {
            let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
            assert_eq!(read_exactly(&mut client, interim.len()).await, interim);
            client
                .write_all(format!("{body}{next}").as_bytes())
                .await
                .unwrap();
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            assert_eq!(read_exactly(&mut client, answer.len()).await, answer);
        };
        let agent = async {
            let req = read_head(
                &mut sides.client,
                &mut sides.from_client,
                idle,
                wire::parse_request,
            )
            .await
            .unwrap()
            .unwrap();
            pass(&mut sides, &req, idle).await.unwrap()
        };
        let ((), (), passed) = tokio::join!(proxy_side, client_side, agent);
        assert_eq!(passed, (200, Next::Again));

        let req = read_head(
            &mut sides.client,
            &mut sides.from_client,
            idle,
            wire::parse_request,
        )
        .await
        .unwrap()
        .unwrap();
        assert!(req.is_connect());
        let proxy_side = async {
            assert_eq!(read_exactly(&mut proxy, next.len()).await, next.as_bytes());
            proxy
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\nserver-first")
                .await
                .unwrap();
        };
        let (passed, ()) = tokio::join!(pass(&mut sides, &req, idle), proxy_side);
        assert_eq!(passed.unwrap(), (200, Next::Tunnel));
        let spliced = tokio::spawn(splice(sides, idle));
        let established = b"HTTP/1.1 200 Connection established\r\n\r\nserver-first";
        assert_eq!(
            read_exactly(&mut client, established.len()).await,
            established
        );
        client.write_all(b"tunnel bytes").await.unwrap();
        assert_eq!(read_exactly(&mut proxy, 12).await, b"tunnel bytes");
        drop((client, proxy));
        assert!(spliced.await.is_ok());
    }

    /// A chunked body that breaks the plain syntax ends the exchange with an error: the next
    /// request could not be found.
    #[tokio::test]
    async fn a_malformed_body_ends_the_connection() {
        let (mut client, agent_side) = pair().await;
        let (agent_proxy, proxy) = pair().await;
        let mut sides = Sides {
            client: agent_side,
            proxy: agent_proxy,
            from_client: BytesMut::new(),
            from_proxy: BytesMut::new(),
        };
        client
            .write_all(b"POST http://x.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .await
            .unwrap();
        let idle = Duration::from_secs(2);
        let req = read_head(
            &mut sides.client,
            &mut sides.from_client,
            idle,
            wire::parse_request,
        )
        .await
        .unwrap()
        .unwrap();
        drop(proxy);
        assert!(pass(&mut sides, &req, idle).await.is_err());
    }
}
