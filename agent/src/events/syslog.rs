//! The syslog sink: RFC 5424 messages, the OCSF JSON as MSG, over TCP (octet-counting
//! framing, RFC 6587), UDP, or a Unix socket (datagram like `/dev/log`, or stream with
//! octet counting). A receiver that is down is retried with backoff while new events wait in
//! the bounded queue (dropped and counted when it is full); the event in hand is never lost
//! to a reconnect.

use std::{
    io::{self, Write as _},
    net::{TcpStream, ToSocketAddrs, UdpSocket},
    os::unix::net::{UnixDatagram, UnixStream},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use super::{Backoff, Event, EventStats, EventsError, Msg};
use crate::config::events::{SyslogSink, SyslogTransport};

/// Connect and write deadlines: a receiver that stops reading costs the sink this long at
/// most, never the traffic.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, MSGID the
/// OCSF class (`ocsf.6003`), no BOM (receivers' JSON parsers take MSG as is).
pub fn format(e: &Event, facility: u8, host: &str, app_name: &str, procid: u32) -> String {
    let sev = match e.severity_id {
        0 | 1 => 6, // informational
        2 => 5,     // notice
        3 => 4,     // warning
        4 => 3,     // error
        5 => 2,     // critical
        _ => 1,     // alert (fatal)
    };
    let pri = u32::from(facility) * 8 + sev;
    let ts = std::time::UNIX_EPOCH + Duration::from_millis(e.time_ms.max(0) as u64);
    let ts = humantime::format_rfc3339_millis(ts);
    format!(
        "<{pri}>1 {ts} {} {app_name} {procid} ocsf.{} - {}",
        header_field(host, 255),
        e.class_uid,
        e.json
    )
}

/// A header field: printable ASCII, no spaces, bounded; `-` when empty.
fn header_field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if f.is_empty() { "-".into() } else { f }
}

/// Octet-counting frame: `LEN SP MSG`.
pub fn frame(msg: &str) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

enum Conn {
    Tcp(TcpStream),
    Udp(UdpSocket),
    UnixDatagram(UnixDatagram),
    UnixStream(UnixStream),
}

fn connect(t: &SyslogTransport) -> io::Result<Conn> {
    Ok(match t {
        SyslogTransport::Tcp(a) => {
            let addr = a
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::other(format!("{a} has no address")))?;
            let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            Conn::Tcp(s)
        }
        SyslogTransport::Udp(a) => {
            let addr = a
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::other(format!("{a} has no address")))?;
            let bind: std::net::SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().map_err(io::Error::other)?
            } else {
                "[::]:0".parse().map_err(io::Error::other)?
            };
            let s = UdpSocket::bind(bind)?;
            s.connect(addr)?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Conn::Udp(s)
        }
        SyslogTransport::UnixDatagram(p) => {
            let s = UnixDatagram::unbound()?;
            s.connect(p)?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Conn::UnixDatagram(s)
        }
        SyslogTransport::UnixStream(p) => {
            let s = UnixStream::connect(p)?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Conn::UnixStream(s)
        }
    })
}

fn send(c: &mut Conn, msg: &str) -> io::Result<()> {
    match c {
        Conn::Tcp(s) => s.write_all(&frame(msg)),
        Conn::UnixStream(s) => s.write_all(&frame(msg)),
        Conn::Udp(s) => s.send(msg.as_bytes()).map(|_| ()),
        Conn::UnixDatagram(s) => s.send(msg.as_bytes()).map(|_| ()),
    }
}

/// Start the syslog sink's thread.
pub fn spawn(
    cfg: SyslogSink,
    host: String,
    rx: std::sync::mpsc::Receiver<Msg>,
    stats: Arc<EventStats>,
) -> Result<std::thread::JoinHandle<()>, EventsError> {
    std::thread::Builder::new()
        .name("airlock-events-syslog".into())
        .spawn(move || {
            let s = &stats.syslog;
            let procid = std::process::id();
            let mut conn: Option<Conn> = None;
            let mut backoff = Backoff::new(Duration::from_secs(5));
            let mut warned = false;
            while let Some(msg) = super::next(&rx, s) {
                let e = match msg {
                    Msg::Event(e) => e,
                    Msg::Flush(ack) => {
                        let _ = ack.try_send(());
                        continue;
                    }
                };
                let line = format(&e, cfg.facility, &host, &cfg.app_name, procid);
                // The event in hand is retried until it is sent; meanwhile the queue fills
                // and the traffic is not touched.
                loop {
                    let r = match conn.as_mut() {
                        Some(c) => send(c, &line),
                        None => connect(&cfg.transport).and_then(|mut c| {
                            let r = send(&mut c, &line);
                            conn = Some(c);
                            r
                        }),
                    };
                    match r {
                        Ok(()) => {
                            s.sent.fetch_add(1, Ordering::Relaxed);
                            backoff.reset();
                            if warned {
                                tracing::info!("syslog receiver reachable again");
                                warned = false;
                            }
                            break;
                        }
                        // Larger than a datagram may be: retrying cannot help.
                        Err(err) if err.raw_os_error() == Some(libc::EMSGSIZE) => {
                            s.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(bytes = line.len(), "an event is too large for a syslog datagram; dropped (use tcp://)");
                            break;
                        }
                        Err(err) => {
                            s.failed.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                            if !warned {
                                tracing::warn!(transport = ?cfg.transport, error = %err, "cannot send events to syslog; retrying (events queue meanwhile)");
                                warned = true;
                            }
                            std::thread::sleep(backoff.step());
                        }
                    }
                }
            }
        })
        .map_err(|e| EventsError::Thread("syslog", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_header_and_octet_counting() {
        let e = Event {
            json: r#"{"class_uid":6003}"#.into(),
            class_uid: 6003,
            severity_id: 3,
            time_ms: 1_764_468_000_123,
        };
        let m = format(&e, 16, "runner 7", "airlock", 42);
        assert_eq!(
            m,
            r#"<132>1 2025-11-30T02:00:00.123Z runner7 airlock 42 ocsf.6003 - {"class_uid":6003}"#
        );
        let f = frame(&m);
        assert!(f.starts_with(format!("{} <132>", m.len()).as_bytes()));
    }
}
