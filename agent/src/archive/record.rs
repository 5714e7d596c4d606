//! One archived row, the hash chain that links rows, and the type that keeps unmasked payloads
//! out of the archive.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A payload that went through the policy engine's masking. The archive accepts payloads only
/// in this type, and only the policy module can make one: an unmasked payload cannot reach
/// the archive by mistake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MaskedPayload(String);

impl MaskedPayload {
    /// For the policy module, after masking. (Also used when reading archived rows back.)
    pub(crate) fn from_masked(text: String) -> MaskedPayload {
        MaskedPayload(text)
    }

    /// A payload the agent writes itself (connection events: addresses, byte counts,
    /// reasons), which carries no message content to mask.
    pub(crate) fn agent_event(event: &serde_json::Value) -> MaskedPayload {
        MaskedPayload(event.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the caller hands to the archive; the archive adds `archive_seq`, `prev_hash`, `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        Self::chain_encoded(archive_seq, input, prev_hash).0
    }

    /// Chain `input` after `prev_hash`, also returning the record's JSON encoding, built from
    /// the one serialisation of the input that the hash needed (for the write-ahead segment).
    pub fn chain_encoded(
        archive_seq: u64,
        input: RecordInput,
        prev_hash: &str,
    ) -> (Record, Vec<u8>) {
        let input_json = serde_json::to_vec(&input).unwrap_or_default();
        let hash = hash_of(archive_seq, &input_json, prev_hash);
        let mut body = Vec::with_capacity(input_json.len() + 200);
        body.extend_from_slice(format!("{{\"archive_seq\":{archive_seq},\"input\":").as_bytes());
        body.extend_from_slice(&input_json);
        body.extend_from_slice(
            format!(",\"prev_hash\":\"{prev_hash}\",\"hash\":\"{hash}\"}}").as_bytes(),
        );
        let record = Record {
            archive_seq,
            input,
            prev_hash: prev_hash.to_owned(),
            hash,
        };
        (record, body)
    }

    /// Whether `hash` is what the content and `prev_hash` give.
    pub fn hash_is_valid(&self) -> bool {
        chain_hash(self.archive_seq, &self.input, &self.prev_hash) == self.hash
    }
}

/// SHA-256 over the previous hash, the sequence number and the canonical JSON of the input
/// (fields in declaration order), hex.
fn chain_hash(archive_seq: u64, input: &RecordInput, prev_hash: &str) -> String {
    // Serialising plain data to JSON cannot fail.
    hash_of(
        archive_seq,
        &serde_json::to_vec(input).unwrap_or_default(),
        prev_hash,
    )
}

fn hash_of(archive_seq: u64, input_json: &[u8], prev_hash: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(archive_seq.to_le_bytes());
    h.update(input_json);
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
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
            payload: Some(MaskedPayload::from_masked("{\"a\":1}".into())),
            decision: "allow".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_wal_encoding_is_the_record() {
        let (r, body) = Record::chain_encoded(7, input(7), GENESIS);
        let back: Record = serde_json::from_slice(&body).unwrap();
        assert_eq!(back, r);
        assert!(back.hash_is_valid());
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
