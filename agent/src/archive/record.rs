//! One archived row and the hash chain that links rows. A row's payload is a
//! [`MaskedPayload`], which the policy module alone makes from a message (see
//! `policy::masked`): an unmasked payload cannot reach the archive.

use serde::Serialize;

pub use crate::policy::MaskedPayload;

/// What the caller hands to the archive; the archive adds `archive_seq`, `prev_hash`, `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RecordInput {
    /// Microseconds since the Unix epoch, UTC.
    pub ts_us: i64,
    pub host: String,
    pub session_id: String,
    pub mcp_session_id: Option<String>,
    /// Position of the message in its session.
    pub seq: u64,
    /// `client_to_server` | `server_to_client`.
    pub direction: String,
    /// `request` | `response` | `notification` | `error` | `connection` | `http`.
    pub kind: String,
    pub method: Option<String>,
    pub tool: Option<String>,
    /// The JSON-RPC id as JSON text (`1`, `"abc"`).
    pub jsonrpc_id: Option<String>,
    /// Masked JSON text; `None` when the recording level is `metadata`.
    pub payload: Option<MaskedPayload>,
    /// `allow` | `mask` | `block` | `approved` | `denied`.
    pub decision: String,
    pub rules: Vec<String>,
    /// One entry per masked value: the detector that found it.
    pub masked_detectors: Vec<String>,
    pub latency_us: Option<u64>,
    pub pid: Option<u32>,
    pub tgid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    pub backend: Option<String>,
    pub server_addr: Option<String>,
    pub sni: Option<String>,
    /// `iss` and `sub` of the bearer JWT the client presented (never the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_sub: Option<String>,
    pub policy_hash: Option<String>,
}

/// A row as stored: the input plus its place in the host's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Global append order on this host (the chain's order; files are sorted differently).
    pub archive_seq: u64,
    pub input: RecordInput,
    pub prev_hash: String,
    pub hash: String,
}

/// `prev_hash` of the very first record of a host.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl Record {
    /// Chain `input` after `prev_hash`.
    pub fn chain(archive_seq: u64, input: RecordInput, prev_hash: &str) -> Record {
        let mut canonical = Vec::new();
        encode_input(&input, &mut canonical);
        Record {
            archive_seq,
            hash: hex(&hash_of(archive_seq, &canonical, prev_hash)),
            input,
            prev_hash: prev_hash.to_owned(),
        }
    }

    /// Whether `hash` is what the content and `prev_hash` give.
    pub fn hash_is_valid(&self) -> bool {
        let mut canonical = Vec::new();
        encode_input(&self.input, &mut canonical);
        hex(&hash_of(self.archive_seq, &canonical, &self.prev_hash)) == self.hash
    }

    /// The record as one write-ahead entry body: `archive_seq` (u64 LE), `prev_hash` and
    /// `hash` (64 ASCII hex digits each), then the canonical encoding of the input.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.archive_seq.to_le_bytes());
        out.extend_from_slice(self.prev_hash.as_bytes());
        out.extend_from_slice(self.hash.as_bytes());
        encode_input(&self.input, out);
    }

    /// The inverse of [`Record::encode`]; `None` for anything else (short, trailing bytes,
    /// invalid UTF-8, bad tags).
    pub fn decode(body: &[u8]) -> Option<Record> {
        RecordRef::decode(body).map(|r| r.to_owned())
    }

    /// The record borrowed, field by field.
    pub fn as_ref(&self) -> RecordRef<'_> {
        let i = &self.input;
        RecordRef {
            archive_seq: self.archive_seq,
            prev_hash: &self.prev_hash,
            hash: &self.hash,
            ts_us: i.ts_us,
            host: &i.host,
            session_id: &i.session_id,
            mcp_session_id: i.mcp_session_id.as_deref(),
            seq: i.seq,
            direction: &i.direction,
            kind: &i.kind,
            method: i.method.as_deref(),
            tool: i.tool.as_deref(),
            jsonrpc_id: i.jsonrpc_id.as_deref(),
            payload: i.payload.as_ref().map(MaskedPayload::as_str),
            decision: &i.decision,
            rules: i.rules.iter().map(String::as_str).collect(),
            masked_detectors: i.masked_detectors.iter().map(String::as_str).collect(),
            latency_us: i.latency_us,
            pid: i.pid,
            tgid: i.tgid,
            uid: i.uid,
            gid: i.gid,
            user: i.user.as_deref(),
            comm: i.comm.as_deref(),
            exe: i.exe.as_deref(),
            cgroup: i.cgroup.as_deref(),
            backend: i.backend.as_deref(),
            server_addr: i.server_addr.as_deref(),
            sni: i.sni.as_deref(),
            principal_iss: i.principal_iss.as_deref(),
            principal_sub: i.principal_sub.as_deref(),
            policy_hash: i.policy_hash.as_deref(),
        }
    }
}

/// A record borrowed from its write-ahead encoding (or from a [`Record`]): what the Parquet
/// columns are built from, without an allocation per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub archive_seq: u64,
    pub prev_hash: &'a str,
    pub hash: &'a str,
    pub ts_us: i64,
    pub host: &'a str,
    pub session_id: &'a str,
    pub mcp_session_id: Option<&'a str>,
    pub seq: u64,
    pub direction: &'a str,
    pub kind: &'a str,
    pub method: Option<&'a str>,
    pub tool: Option<&'a str>,
    pub jsonrpc_id: Option<&'a str>,
    pub payload: Option<&'a str>,
    pub decision: &'a str,
    pub rules: Vec<&'a str>,
    pub masked_detectors: Vec<&'a str>,
    pub latency_us: Option<u64>,
    pub pid: Option<u32>,
    pub tgid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<&'a str>,
    pub comm: Option<&'a str>,
    pub exe: Option<&'a str>,
    pub cgroup: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub server_addr: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub principal_iss: Option<&'a str>,
    pub principal_sub: Option<&'a str>,
    pub policy_hash: Option<&'a str>,
}

impl<'a> RecordRef<'a> {
    /// Read a write-ahead entry body ([`Record::encode`]'s layout); `None` for anything else
    /// (short, trailing bytes, invalid UTF-8, bad tags).
    pub fn decode(body: &'a [u8]) -> Option<RecordRef<'a>> {
        let mut r = Decoder(body);
        let record = RecordRef {
            archive_seq: r.u64()?,
            prev_hash: r.ascii_hash()?,
            hash: r.ascii_hash()?,
            ts_us: i64::from_le_bytes(r.array()?),
            host: r.str()?,
            session_id: r.str()?,
            mcp_session_id: r.opt(Decoder::str)?,
            seq: r.u64()?,
            direction: r.str()?,
            kind: r.str()?,
            method: r.opt(Decoder::str)?,
            tool: r.opt(Decoder::str)?,
            jsonrpc_id: r.opt(Decoder::str)?,
            payload: r.opt(Decoder::str)?,
            decision: r.str()?,
            rules: r.list()?,
            masked_detectors: r.list()?,
            latency_us: r.opt(Decoder::u64)?,
            pid: r.opt(Decoder::u32)?,
            tgid: r.opt(Decoder::u32)?,
            uid: r.opt(Decoder::u32)?,
            gid: r.opt(Decoder::u32)?,
            user: r.opt(Decoder::str)?,
            comm: r.opt(Decoder::str)?,
            exe: r.opt(Decoder::str)?,
            cgroup: r.opt(Decoder::str)?,
            backend: r.opt(Decoder::str)?,
            server_addr: r.opt(Decoder::str)?,
            sni: r.opt(Decoder::str)?,
            principal_iss: r.opt(Decoder::str)?,
            principal_sub: r.opt(Decoder::str)?,
            policy_hash: r.opt(Decoder::str)?,
        };
        r.0.is_empty().then_some(record)
    }

    pub fn to_owned(&self) -> Record {
        let s = |v: &str| v.to_owned();
        let o = |v: Option<&str>| v.map(str::to_owned);
        let l = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect();
        Record {
            archive_seq: self.archive_seq,
            prev_hash: s(self.prev_hash),
            hash: s(self.hash),
            input: RecordInput {
                ts_us: self.ts_us,
                host: s(self.host),
                session_id: s(self.session_id),
                mcp_session_id: o(self.mcp_session_id),
                seq: self.seq,
                direction: s(self.direction),
                kind: s(self.kind),
                method: o(self.method),
                tool: o(self.tool),
                jsonrpc_id: o(self.jsonrpc_id),
                payload: o(self.payload).map(MaskedPayload::read_back),
                decision: s(self.decision),
                rules: l(&self.rules),
                masked_detectors: l(&self.masked_detectors),
                latency_us: self.latency_us,
                pid: self.pid,
                tgid: self.tgid,
                uid: self.uid,
                gid: self.gid,
                user: o(self.user),
                comm: o(self.comm),
                exe: o(self.exe),
                cgroup: o(self.cgroup),
                backend: o(self.backend),
                server_addr: o(self.server_addr),
                sni: o(self.sni),
                principal_iss: o(self.principal_iss),
                principal_sub: o(self.principal_sub),
                policy_hash: o(self.policy_hash),
            },
        }
    }
}

/// Chain `input` after `prev_hash` straight into a write-ahead entry body (the layout of
/// [`Record::encode`]), with one encoding of the input serving both the hash and the entry.
/// `body` is cleared first; returns the record's hash as it was written there (hex digits).
pub fn chain_into(
    archive_seq: u64,
    input: &RecordInput,
    prev_hash: &str,
    body: &mut Vec<u8>,
) -> [u8; 64] {
    body.clear();
    body.extend_from_slice(&archive_seq.to_le_bytes());
    body.extend_from_slice(prev_hash.as_bytes());
    let hash_at = body.len();
    body.extend_from_slice(&[b'0'; 64]);
    let input_at = body.len();
    encode_input(input, body);
    let mut digits = [0u8; 64];
    hex_into(
        &hash_of(archive_seq, &body[input_at..], prev_hash),
        &mut digits,
    );
    body[hash_at..input_at].copy_from_slice(&digits);
    digits
}

/// SHA-256 over the previous hash (64 hex digits), a newline, `archive_seq` (u64 LE) and the
/// canonical encoding of the input (ARCHIVE.md, "The record hash").
///
/// ring's SHA-256 (assembly with SHA-NI, AVX or SSSE3, picked at run time): on CPUs without
/// SHA-NI, such as this project's 2-vCPU machines, `sha2`'s portable code was ~9% of the
/// agent's CPU at saturation (a record hash per message).
fn hash_of(archive_seq: u64, canonical_input: &[u8], prev_hash: &str) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(&archive_seq.to_le_bytes());
    h.update(canonical_input);
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// The canonical encoding of an input, fields in declaration order: integers little-endian
/// (`ts_us` i64, `seq` and `latency_us` u64, ids u32), strings as a u32 byte length and UTF-8,
/// lists as a u32 count and their strings, an optional value as a 0 byte (absent) or a 1 byte
/// and the value.
pub fn encode_input(i: &RecordInput, out: &mut Vec<u8>) {
    let mut e = Encoder(out);
    e.0.extend_from_slice(&i.ts_us.to_le_bytes());
    e.str(&i.host);
    e.str(&i.session_id);
    e.opt_str(i.mcp_session_id.as_deref());
    e.0.extend_from_slice(&i.seq.to_le_bytes());
    e.str(&i.direction);
    e.str(&i.kind);
    e.opt_str(i.method.as_deref());
    e.opt_str(i.tool.as_deref());
    e.opt_str(i.jsonrpc_id.as_deref());
    e.opt_str(i.payload.as_ref().map(MaskedPayload::as_str));
    e.str(&i.decision);
    e.list(&i.rules);
    e.list(&i.masked_detectors);
    match i.latency_us {
        None => e.0.push(0),
        Some(v) => {
            e.0.push(1);
            e.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    for id in [i.pid, i.tgid, i.uid, i.gid] {
        match id {
            None => e.0.push(0),
            Some(v) => {
                e.0.push(1);
                e.0.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    for s in [
        &i.user,
        &i.comm,
        &i.exe,
        &i.cgroup,
        &i.backend,
        &i.server_addr,
        &i.sni,
        &i.principal_iss,
        &i.principal_sub,
        &i.policy_hash,
    ] {
        e.opt_str(s.as_deref());
    }
}

struct Encoder<'a>(&'a mut Vec<u8>);

impl Encoder<'_> {
    fn str(&mut self, s: &str) {
        // Payloads are capped far below 4 GiB (max_body_bytes); a longer string cannot occur.
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&s.as_bytes()[..len as usize]);
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.0.push(0),
            Some(s) => {
                self.0.push(1);
                self.str(s);
            }
        }
    }

    fn list(&mut self, items: &[String]) {
        let n = u32::try_from(items.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&n.to_le_bytes());
        for s in items.iter().take(n as usize) {
            self.str(s);
        }
    }
}

/// Reads the canonical encoding back, bounds-checked: `None` on any shortfall.
struct Decoder<'a>(&'a [u8]);

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn ascii_hash(&mut self) -> Option<&'a str> {
        let h = self.take(64)?;
        // Without an early exit the check vectorises (it showed up when publishing).
        if h.iter().fold(true, |ok, b| ok & b.is_ascii_hexdigit()) {
            std::str::from_utf8(h).ok()
        } else {
            None
        }
    }

    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.take(1)?[0] {
            0 => Some(None),
            1 => f(self).map(Some),
            _ => None,
        }
    }

    fn list(&mut self) -> Option<Vec<&'a str>> {
        let n = self.u32()? as usize;
        // Every string takes at least its 4-byte length: a count beyond that is corrupt.
        if n > self.0.len() / 4 {
            return None;
        }
        (0..n).map(|_| self.str()).collect()
    }
}

/// Lower-case hex of `bytes` into `out` (twice as long).
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    hex_into(bytes, &mut out);
    // Hex digits are ASCII.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    fn input(n: u64) -> RecordInput {
        RecordInput {
            ts_us: 1_700_000_000_000_000 + n as i64,
            host: "runner-1".into(),
            session_id: "s1".into(),
            seq: n,
            direction: "client_to_server".into(),
            kind: "request".into(),
            method: Some("tools/call".into()),
            payload: Some(MaskedPayload::for_tests("{\"a\":1}")),
            decision: "allow".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_wal_encoding_is_the_record() {
        let mut body = Vec::new();
        let mut full = input(7);
        full.rules = vec!["a".into(), "b".into()];
        full.pid = Some(9);
        full.latency_us = Some(3);
        full.principal_sub = Some("alice".into());
        let hash = chain_into(7, &full, GENESIS, &mut body);
        let back = Record::decode(&body).unwrap();
        assert_eq!(back, Record::chain(7, full, GENESIS));
        assert_eq!(back.hash.as_bytes(), hash);
        assert!(back.hash_is_valid());
        let mut again = Vec::new();
        back.encode(&mut again);
        assert_eq!(again, body);
        // Every shortened body and every trailing byte is refused, never misread.
        for cut in 0..body.len() {
            assert_eq!(Record::decode(&body[..cut]), None, "cut at {cut}");
        }
        body.push(0);
        assert_eq!(Record::decode(&body), None);
    }

    #[test]
    fn chain_links_and_detects_changes() {
        let a = Record::chain(1, input(1), GENESIS);
        let b = Record::chain(2, input(2), &a.hash);
        assert!(a.hash_is_valid() && b.hash_is_valid());
        assert_eq!(b.prev_hash, a.hash);
        let mut tampered = b.clone();
        tampered.input.tool = Some("delete_repo".into());
        assert!(!tampered.hash_is_valid());
        let mut moved = b.clone();
        moved.archive_seq = 3;
        assert!(!moved.hash_is_valid());
        // The same content after another predecessor hashes differently.
        assert_ne!(Record::chain(2, input(2), GENESIS).hash, b.hash);
    }
}
