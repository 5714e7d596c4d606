//! What every message of one intercepted connection shares: who, where, the record template.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use crate::{
    archive::{RecordDecision, RecordInput, RecordKind},
    attribution::{Attribution, NameCache},
    policy::{Direction, Subject},
};

/// What every message of one intercepted connection shares.
#[derive(Debug)]
pub struct ConnCtx {
    pub conn_id: u64,
    /// The archive's `session_id`: one per intercepted connection.
    pub session_id: String,
    pub attribution: Attribution,
    pub subject: Subject,
    pub backend: String,
    pub sni: Option<String>,
    /// `attribution.original_dst`, formatted once.
    server_addr: String,
    /// Next `seq` (0 is the connection's opening record; the closing record takes the last),
    /// shared with the connection's handler.
    pub seq: Arc<AtomicU64>,
    /// `iss` and `sub` of the bearer JWT the client presented, if any.
    pub identity: Mutex<Option<(Option<String>, Option<String>)>>,
}

impl ConnCtx {
    pub fn new(
        conn_id: u64,
        session_id: String,
        attribution: Attribution,
        subject: Subject,
        backend: String,
        sni: Option<String>,
        seq: Arc<AtomicU64>,
    ) -> ConnCtx {
        let server_addr = attribution.original_dst.to_string();
        ConnCtx {
            server_addr,
            conn_id,
            session_id,
            attribution,
            subject,
            backend,
            sni,
            seq,
            identity: Mutex::new(None),
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// A record with this connection's who/where filled in.
    pub fn record(&self, host: &str, direction: Direction, kind: RecordKind) -> RecordInput {
        let a = &self.attribution;
        let mut r = RecordInput {
            ts_us: now_us(),
            host: host.to_owned(),
            session_id: self.session_id.clone(),
            seq: self.next_seq(),
            direction: direction_str(direction).into(),
            kind: kind.into(),
            decision: RecordDecision::Allow.into(),
            pid: Some(a.pid),
            tgid: Some(a.tgid),
            uid: Some(a.uid),
            gid: Some(a.gid),
            user: a.user.clone(),
            comm: Some(a.comm.clone()),
            exe: a.exe.clone(),
            cgroup: a.cgroup.clone(),
            backend: Some(self.backend.clone()),
            server_addr: Some(self.server_addr.clone()),
            sni: self.sni.clone(),
            ..Default::default()
        };
        if let Ok(id) = self.identity.lock()
            && let Some((iss, sub)) = id.as_ref()
        {
            r.principal_iss = iss.clone();
            r.principal_sub = sub.clone();
        }
        r
    }
}

/// The policy subject of a connection: uid/gid and names, supplementary groups from /proc.
pub(crate) fn subject_of(a: &Attribution, names: &NameCache) -> Subject {
    let mut groups: Vec<String> = a.group.iter().cloned().collect();
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", a.tgid)) {
        for gid in status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|g| g.parse::<u32>().ok())
        {
            if let Some(name) = names.group(gid)
                && !groups.contains(&name)
            {
                groups.push(name);
            }
        }
    }
    Subject {
        uid: a.uid,
        gid: a.gid,
        user: a.user.clone(),
        groups,
        exe: a.exe.clone(),
        comm: a.comm.clone(),
        cgroup: a.cgroup.clone(),
        container: a
            .container
            .iter()
            .flat_map(|c| std::iter::once(c.id.clone()).chain(c.name.clone()))
            .collect(),
    }
}

/// The record kind of a JSON-RPC message.
pub(crate) fn message_kind(kind: crate::mcp::jsonrpc::Kind) -> RecordKind {
    use crate::mcp::jsonrpc::Kind;
    match kind {
        Kind::Request => RecordKind::Request,
        Kind::Notification => RecordKind::Notification,
        Kind::Response => RecordKind::Response,
        Kind::Error => RecordKind::Error,
    }
}

pub fn direction_str(d: Direction) -> &'static str {
    match d {
        Direction::ClientToServer => "client_to_server",
        Direction::ServerToClient => "server_to_client",
    }
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
