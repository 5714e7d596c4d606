//! One stdio server's relay: newline-delimited JSON-RPC between the client's original pipes
//! and the pipes the agent put in the server's place, every message through the pipeline.
//!
//! ```text
//!   client ──fd 0 (taken)──▶ [c2s thread] ─ Pipeline::process ─▶ server's new stdin
//!   client ◀─fd 1 (taken)─── [s2c thread] ◀ Pipeline::process ── server's new stdout
//!                  ▲ answers Airlock gives instead (blocked, refused lines)
//! ```
//!
//! Blocking reads on two threads, not the async runtime: the client's pipe is shared with the
//! client, so the agent must not change its file status flags (`O_NONBLOCK` is per open file,
//! not per descriptor). A line is at most `max_body_bytes`; a longer one, or one that is not
//! strict JSON-RPC, is recorded and not passed on (the client gets a JSON-RPC error for its
//! own). Messages of one direction are judged in order; a call held for approval holds the
//! client's later messages to that server until it is decided.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Write},
    os::fd::{AsRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::{
    archive::{RecordDecision, RecordKind},
    mcp::{
        jsonrpc::{self, Body, Parsed, code},
        session::SessionKey,
    },
    pipeline::{ConnCtx, Msg, Outcome, Pipeline},
    policy::Direction,
};

/// What one line read turned out to be.
enum Line {
    Text(Vec<u8>),
    /// Longer than the cap: this many bytes were discarded up to the newline.
    TooLong(usize),
    Eof,
}

/// Read one line (without its `\n`) of at most `cap` bytes; a longer one is read to its end
/// and discarded, so the next line starts clean.
fn read_line(r: &mut impl BufRead, cap: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut dropped = 0usize;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(match (line.is_empty(), dropped) {
                (true, 0) => Line::Eof,
                (_, 0) => Line::Text(line),
                (_, n) => Line::TooLong(n),
            });
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if dropped == 0 && line.len() + chunk.len() <= cap {
            line.extend_from_slice(chunk);
        } else {
            dropped += line.len() + chunk.len();
            line.clear();
        }
        let consumed = done.unwrap_or(buf.len());
        r.consume(consumed);
        if done.is_some() {
            if dropped > 0 {
                return Ok(Line::TooLong(dropped));
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Text(line));
        }
    }
}

/// What both directions of one relay share.
pub struct Relay {
    pipeline: Arc<Pipeline>,
    pub ctx: ConnCtx,
    key: SessionKey,
    max_line: usize,
    runtime: tokio::runtime::Handle,
    /// The client's end (its fd 1, taken): server messages and Airlock's answers; `None`
    /// once the server is done (so the client sees the end of the output).
    to_client: Mutex<Option<File>>,
    opened: Instant,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// The first error that ended a direction.
    error: Mutex<Option<String>>,
    /// Written when the server side ended: the client side stops waiting for the client.
    stop: OwnedFd,
}

impl Relay {
    pub fn new(
        pipeline: Arc<Pipeline>,
        ctx: ConnCtx,
        key: SessionKey,
        max_line: usize,
        runtime: tokio::runtime::Handle,
        to_client: File,
    ) -> io::Result<Relay> {
        Ok(Relay {
            pipeline,
            ctx,
            key,
            max_line,
            runtime,
            to_client: Mutex::new(Some(to_client)),
            opened: Instant::now(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            error: Mutex::new(None),
            stop: eventfd()?,
        })
    }

    /// Make the client→server direction end (the server is gone, or the relay could not
    /// start): its read returns as at the end of the client's stream.
    pub fn stop(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our own eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// A `connection` record of this relay (`open`, `exec`, `close`), its event masked like a
    /// message; durable before this returns in strict mode.
    pub fn record_connection(&self, event: Value) -> Result<(), String> {
        let p = &self.pipeline;
        let mut rec = self
            .ctx
            .record(&p.host, Direction::ClientToServer, RecordKind::Connection);
        rec.payload = Some(p.mask_event(&self.ctx.subject, &self.ctx.backend, event));
        self.runtime
            .block_on(p.archive.record(rec))
            .map(|_| ())
            .map_err(|e| format!("the archive cannot record it: {e}"))
    }

    /// The server is done: close the agent's copy of the client's output, and stop waiting
    /// for the client's input (a client that never closes cannot hold the relay).
    pub fn close_client(&self) {
        if let Ok(mut c) = self.to_client.lock() {
            c.take();
        }
        self.stop();
    }

    pub fn note_error(&self, e: String) {
        if let Ok(mut slot) = self.error.lock()
            && slot.is_none()
        {
            *slot = Some(e);
        }
    }

    /// Both directions ended: the `close` record, the session forgotten.
    pub fn finish(&self) {
        let error = self.error.lock().ok().and_then(|e| e.clone());
        let mut event = json!({
            "event": "close",
            "state": if error.is_some() { "failed" } else { "closed" },
            "bytes_up": self.bytes_up.load(Ordering::Relaxed),
            "bytes_down": self.bytes_down.load(Ordering::Relaxed),
            "duration_ms": self.opened.elapsed().as_millis() as u64,
        });
        if let Some(e) = error {
            event["reason"] = e.into();
        }
        if let Err(e) = self.record_connection(event) {
            warn!(session = %self.ctx.session_id, error = %e, "cannot record the end of a relay");
        }
        self.pipeline.sessions.end(&self.key);
        debug!(session = %self.ctx.session_id, "stdio relay over");
    }

    /// Client → server until the client closes its end (then the server's stdin is closed).
    pub fn client_to_server(&self, from_client: File, mut to_server: File) -> io::Result<()> {
        let from_client = StopRead {
            file: from_client,
            stop: self.stop.as_raw_fd(),
        };
        let mut r = BufReader::with_capacity(64 * 1024, from_client);
        while let Some(text) = self.next_line(&mut r, Direction::ClientToServer)? {
            for out in self.judge(Direction::ClientToServer, text)? {
                match out {
                    Out::Forward(bytes) => write_line(&mut to_server, &bytes)?,
                    Out::Answer(bytes) => self.write_client(&bytes)?,
                }
            }
        }
        Ok(())
    }

    /// Server → client until the server closes its stdout (it exited).
    pub fn server_to_client(&self, from_server: File) -> io::Result<()> {
        let mut r = BufReader::with_capacity(64 * 1024, from_server);
        while let Some(text) = self.next_line(&mut r, Direction::ServerToClient)? {
            for out in self.judge(Direction::ServerToClient, text)? {
                match out {
                    Out::Forward(bytes) | Out::Answer(bytes) => self.write_client(&bytes)?,
                }
            }
        }
        Ok(())
    }

    /// The next non-blank line from `direction`'s sender, counted; `None` at its end. A line
    /// past `max_body_bytes` is recorded and skipped (the client gets Airlock's error for its
    /// own).
    fn next_line(&self, r: &mut impl BufRead, direction: Direction) -> io::Result<Option<Vec<u8>>> {
        let c2s = direction == Direction::ClientToServer;
        loop {
            let text = match read_line(r, self.max_line)? {
                Line::Eof => return Ok(None),
                Line::TooLong(n) => {
                    let max = self.max_line;
                    let why = if c2s {
                        format!("a line of {n} bytes is longer than `max_body_bytes` ({max})")
                    } else {
                        format!(
                            "the server wrote a line of {n} bytes, longer than `max_body_bytes` ({max})"
                        )
                    };
                    if let Some(Out::Answer(a)) =
                        self.refuse(direction, &why, None, code::INVALID_REQUEST)?
                    {
                        self.write_client(&a)?;
                    }
                    continue;
                }
                Line::Text(t) if t.iter().all(u8::is_ascii_whitespace) => continue,
                Line::Text(t) => t,
            };
            let counter = if c2s {
                &self.bytes_up
            } else {
                &self.bytes_down
            };
            counter.fetch_add(text.len() as u64 + 1, Ordering::Relaxed);
            return Ok(Some(text));
        }
    }

    fn write_client(&self, bytes: &[u8]) -> io::Result<()> {
        let mut to = self
            .to_client
            .lock()
            .map_err(|_| io::Error::other("the client writer was poisoned"))?;
        match to.as_mut() {
            Some(f) => write_line(f, bytes),
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the server is done: nothing more goes to the client",
            )),
        }
    }

    /// Parse one line strictly and run its messages through the pipeline: what to send on.
    fn judge(&self, direction: Direction, text: Vec<u8>) -> io::Result<Vec<Out>> {
        let raw = Bytes::from(text);
        let body = match Body::parse(&raw) {
            Ok(Parsed::Messages(body)) => body,
            Ok(Parsed::Other(_)) => {
                let why = "a line that is JSON but not JSON-RPC";
                let refused = self.refuse(direction, why, Some(&raw), code::INVALID_REQUEST)?;
                return Ok(refused.into_iter().collect());
            }
            Err(e) => {
                let why = format!("a line that is not strict JSON-RPC: {e}");
                let refused = self.refuse(direction, &why, Some(&raw), code::PARSE_ERROR)?;
                return Ok(refused.into_iter().collect());
            }
        };
        let batch = matches!(body, Body::Batch(_));
        let messages: Vec<Value> = match body {
            Body::Single(v) => vec![v],
            Body::Batch(v) => v,
        };
        let mut forward = Vec::new();
        let mut out = Vec::new();
        let mut changed_any = false;
        for value in messages {
            let id = value.get("id").cloned();
            let msg = Msg {
                direction,
                value,
                session: self.key.clone(),
                mcp_session_id: None,
                raw: (!batch).then(|| raw.clone()),
                origin: None,
            };
            match self.runtime.block_on(self.pipeline.process(&self.ctx, msg)) {
                Ok(Outcome::Forward { value, changed, .. }) => {
                    changed_any |= changed;
                    forward.push(value);
                }
                Ok(Outcome::Answer(a)) => out.push(Out::Answer(to_vec(&a))),
                Err(e) => {
                    warn!(session = %self.ctx.session_id, error = %e, "stdio message refused");
                    if direction == Direction::ServerToClient {
                        // Nothing unrecorded reaches the client: end the relay.
                        return Err(io::Error::other(e.to_string()));
                    }
                    let msg = format!("Airlock could not judge or record this message: {e}");
                    let a = jsonrpc::error_response(id.as_ref(), code::UNAVAILABLE, &msg, None);
                    out.push(Out::Answer(to_vec(&a)));
                }
            }
        }
        if !forward.is_empty() {
            let bytes = if !batch && !changed_any {
                raw.to_vec()
            } else if batch {
                to_vec(&Value::Array(forward))
            } else {
                to_vec(&forward[0])
            };
            out.insert(0, Out::Forward(bytes));
        }
        Ok(out)
    }

    /// Record a line that was not passed on; for the client's own lines, its JSON-RPC error.
    fn refuse(
        &self,
        direction: Direction,
        why: &str,
        raw: Option<&[u8]>,
        code: i64,
    ) -> io::Result<Option<Out>> {
        debug!(session = %self.ctx.session_id, why, "stdio line not passed on");
        let counters = &self.pipeline.counters;
        counters
            .malformed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut detail = json!({"error": why});
        if let Some(raw) = raw {
            let shown = &raw[..raw.len().min(4096)];
            detail["line"] = String::from_utf8_lossy(shown).into_owned().into();
        }
        let recorded = self.runtime.block_on(self.pipeline.record_event(
            &self.ctx,
            direction,
            RecordKind::Error,
            RecordDecision::Block,
            detail,
            None,
            None,
        ));
        if let Err(e) = recorded {
            return Err(io::Error::other(format!(
                "cannot record a refused line: {e}"
            )));
        }
        if direction == Direction::ServerToClient {
            return Ok(None);
        }
        let a = jsonrpc::error_response(None, code, &format!("Airlock refused {why}"), None);
        Ok(Some(Out::Answer(to_vec(&a))))
    }
}

/// The client's input, read only when there is something to read or until the relay is
/// stopped (then it reads as ended). Blocking: the descriptor is the client's too, and its
/// flags are not ours to change.
struct StopRead {
    file: File,
    stop: RawFd,
}

impl std::io::Read for StopRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds, alive for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(0);
            }
            if fds[0].revents != 0 {
                return std::io::Read::read(&mut self.file, buf);
            }
        }
    }
}

/// A new eventfd (close-on-exec).
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

enum Out {
    /// To the other side.
    Forward(Vec<u8>),
    /// Back to the sender (Airlock's own answer).
    Answer(Vec<u8>),
}

fn to_vec(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn write_line(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let mut line = Vec::with_capacity(bytes.len() + 1);
    line.extend_from_slice(bytes);
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_capped_and_resynchronised() {
        let text = b"{\"a\":1}\r\nxxxxxxxxxxxxxxxxxxxxxxxx\n{\"b\":2}\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &text[..]);
        let mut got = Vec::new();
        loop {
            match read_line(&mut r, 10).unwrap() {
                Line::Eof => break,
                Line::Text(t) => got.push(String::from_utf8(t).unwrap()),
                Line::TooLong(n) => got.push(format!("too long {n}")),
            }
        }
        assert_eq!(got, ["{\"a\":1}", "too long 24", "{\"b\":2}", "last"]);
    }
}
