//! Policies: what to mask, block, hold for approval, and how much to record — sans-IO.
//!
//! A [`PolicySet`] is loaded from `policies_dir/*.toml` (files in name order). It answers two
//! questions about one MCP message seen for one caller:
//! - [`PolicySet::decide`]: the verdict (allow, block, approve), the mask rules that apply and
//!   the recording level;
//! - [`PolicySet::mask`]: the message with every detected value masked, and the mask rules
//!   that masked something ([`Masking`]).
//!
//! # Evaluation order (the contract documented in README.md)
//! 1. Rules are read in file-name order, then in order within a file.
//! 2. The verdict comes from the **first** matching `allow`, `block` or `approve` rule; when
//!    none matches, the message is allowed. `block` and `approve` rules only ever match
//!    client-to-server requests.
//! 3. **Every** matching `mask` rule applies, in order.
//! 4. The recording level comes from the first matching rule that sets `record`
//!    (default `full`). A blocked or held message is always recorded: `record = "off"` is
//!    rejected on `block` and `approve` rules.
//! 5. A record (and its audit event) names the rules that acted, not every rule that matched:
//!    the verdict's rule ([`Decision::verdict_rule`]) and the mask rules that masked a value
//!    ([`Masking::rules`]); the pipeline puts the one behind the record's decision first.
//!
//! Beside the rules: [`approvals`] (held calls bound to a digest of the exact call),
//! [`pins`] (first-seen tool definitions), [`credentials`] (brokered upstream credentials).

pub mod approvals;
pub mod credentials;
pub mod detectors;
pub mod mask;
mod masked;
pub mod pins;
pub mod store;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use globset::{Glob, GlobSet, GlobSetBuilder};

pub use masked::MaskedPayload;
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use sha2::Digest as _;

pub use mask::{HashKey, MaskCounts, Style};

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub fn reverse(self) -> Direction {
        match self {
            Direction::ClientToServer => Direction::ServerToClient,
            Direction::ServerToClient => Direction::ClientToServer,
        }
    }
}

/// Who sent or receives the message (from the connection's attribution).
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    /// Primary and supplementary group names.
    pub groups: Vec<String>,
    pub exe: Option<String>,
    pub comm: String,
    pub cgroup: Option<String>,
    /// The caller's container: its id and, where the runtime gave it, its name (a `containers`
    /// glob matches either).
    pub container: Vec<String>,
}

/// The parts of an MCP message that rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub backend: &'a str,
    pub direction: Direction,
    /// JSON-RPC method; for a response, the method of the request it answers.
    pub method: Option<&'a str>,
    /// Tool name of a `tools/call` (or of the request a response answers).
    pub tool: Option<&'a str>,
    /// `params.arguments` of a `tools/call` request.
    pub arguments: Option<&'a Value>,
    /// Whether this is a client's call: a client-to-server message with a method of its own
    /// (a request, or a notification). Only calls can be blocked or held.
    pub is_call: bool,
    /// The request this message belongs to is unknown (a server-to-client message that
    /// answers nothing Airlock saw): mask rules apply whatever `tools` and `methods` they name.
    pub scope_unknown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Mask,
    Block,
    Approve,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Directions {
    Requests,
    Responses,
    Both,
}

/// How much of a matched message goes into the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordLevel {
    /// Everything, payload masked.
    Full,
    /// Who, what, when; no payload.
    Metadata,
    /// Nothing.
    Off,
}

/// The outcome for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse with JSON-RPC error -32010 naming the rule.
    Block {
        rule: String,
    },
    /// Hold until a human decides, at most `timeout`.
    Approve {
        rule: String,
        timeout: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    /// Indexes of the matching mask rules, in order.
    mask_rules: Vec<usize>,
    pub record: RecordLevel,
    /// The rule that gave the verdict: the first matching `allow`, `block` or `approve` rule
    /// (none when no such rule matched and the message is allowed by default). A mask rule
    /// that matched is not named here: it acts only if it masks something ([`Masking`]).
    pub verdict_rule: Option<String>,
}

impl Decision {
    pub fn masks_anything(&self) -> bool {
        !self.mask_rules.is_empty()
    }
}

/// What masking did to a message: the values masked, by detector, and the mask rules that
/// masked at least one of them, in order. A mask rule that matched but found nothing is not
/// among `rules`: records and events name the rules that acted.
///
/// Only [`PolicySet::mask`] makes one (its fields are private, and it has no public
/// `Default`): holding a `Masking` shows that a message went through the policy's masking,
/// which is what lets [`Masking::payload`] hand over its text for the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masking {
    counts: MaskCounts,
    rules: Vec<String>,
}

impl Masking {
    /// Nothing masked: the start of [`PolicySet::mask`].
    fn none() -> Masking {
        Masking {
            counts: MaskCounts::new(),
            rules: Vec::new(),
        }
    }

    /// A masking as if rules `rules` had masked one email each, for tests outside this module.
    #[cfg(test)]
    pub(crate) fn for_tests(rules: &[&str]) -> Masking {
        Masking {
            counts: [("email".to_owned(), rules.len() as u32)].into(),
            rules: rules.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// The values masked, by detector.
    pub fn counts(&self) -> &MaskCounts {
        &self.counts
    }

    /// The mask rules that masked something, in order.
    pub fn rules(&self) -> &[String] {
        &self.rules
    }

    /// The archive's text of the message this masking was applied to. `masked` is the
    /// message as it is after masking (and after anything else taken out of it, such as a
    /// listing's hidden tools); `received` is the text as it came, which is kept, saving a
    /// serialisation, only when nothing was masked: text a detector matched is never
    /// recorded.
    pub fn payload(&self, masked: &Value, received: Option<&str>) -> MaskedPayload {
        let text = match received {
            Some(t) if self.total() == 0 => t.trim().to_owned(),
            _ => masked.to_string(),
        };
        MaskedPayload::from_masked(text)
    }

    /// How many values were masked.
    pub fn total(&self) -> u32 {
        self.counts.values().sum()
    }

    /// One entry per masked value, its detector's name (the record's `masked_detectors`).
    pub fn detectors(&self) -> Vec<String> {
        self.counts
            .iter()
            .flat_map(|(d, n)| std::iter::repeat_n(d.clone(), *n as usize))
            .collect()
    }
}

/// A loaded, validated set of rules.
#[derive(Debug)]
pub struct PolicySet {
    rules: Vec<Rule>,
    /// `sha256:<hex>` over the files' names and contents.
    pub hash: String,
    pub files: Vec<PathBuf>,
}

#[derive(Debug)]
struct Rule {
    id: String,
    action: Action,
    directions: Directions,
    matchers: Matchers,
    masker: Option<mask::Masker>,
    timeout: Duration,
    record: Option<RecordLevel>,
}

#[derive(Debug, Default)]
struct Matchers {
    tools: Option<GlobSet>,
    methods: Option<GlobSet>,
    backends: Option<GlobSet>,
    users: Option<GlobSet>,
    groups: Option<GlobSet>,
    exe: Option<GlobSet>,
    comm: Option<GlobSet>,
    cgroup: Option<GlobSet>,
    containers: Option<GlobSet>,
    uids: Option<Vec<u32>>,
    args: Vec<(String, Regex)>,
}

/// One problem in a policy file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// All the problems found in a policy directory.
#[derive(Debug)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Default hold time of an `approve` rule without `timeout_secs`.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(120);

impl PolicySet {
    /// Load every `*.toml` in `dir`, in name order. All problems are reported at once.
    pub fn load_dir(dir: &Path, key: HashKey) -> Result<PolicySet, PolicyErrors> {
        let located = |message: String| {
            PolicyErrors(vec![PolicyError {
                file: dir.to_owned(),
                line: 0,
                message,
            }])
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| located(format!("cannot read the policy directory: {e}")))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        paths.sort();
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|e| {
                PolicyErrors(vec![PolicyError {
                    file: p.clone(),
                    line: 0,
                    message: format!("cannot read: {e}"),
                }])
            })?;
            files.push((p, text));
        }
        Self::parse(&files, key)
    }

    /// Build from (path, contents) pairs, in the given order.
    pub fn parse(files: &[(PathBuf, String)], key: HashKey) -> Result<PolicySet, PolicyErrors> {
        let mut errors = Vec::new();
        let mut raw_rules = Vec::new();
        let mut custom: BTreeMap<String, detectors::Detector> = BTreeMap::new();
        let mut hasher = sha2::Sha256::new();
        for (path, text) in files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
            let err = |line: usize, message: String| PolicyError {
                file: path.clone(),
                line,
                message,
            };
            let file: RawFile = match toml::from_str(text) {
                Ok(f) => f,
                Err(e) => {
                    let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
                    errors.push(err(line, e.message().to_owned()));
                    continue;
                }
            };
            for d in file.detector {
                let line = line_of(text, d.span().start);
                let d = d.into_inner();
                if detectors::builtin(&d.name).is_some() {
                    errors.push(err(
                        line,
                        format!("detector `{}` is built in; choose another name", d.name),
                    ));
                    continue;
                }
                match Regex::new(&d.pattern) {
                    Ok(regex) => {
                        if custom
                            .insert(
                                d.name.clone(),
                                detectors::Detector {
                                    name: d.name.clone(),
                                    regex,
                                    validate: None,
                                },
                            )
                            .is_some()
                        {
                            errors
                                .push(err(line, format!("detector `{}` is defined twice", d.name)));
                        }
                    }
                    Err(e) => errors.push(err(
                        line,
                        format!("detector `{}`: bad pattern: {e}", d.name),
                    )),
                }
            }
            for r in file.rule {
                let line = line_of(text, r.span().start);
                raw_rules.push((path.clone(), line, r.into_inner()));
            }
        }
        let mut ids = BTreeSet::new();
        let mut rules = Vec::new();
        for (path, line, raw) in raw_rules {
            let mut fail = |message: String| {
                errors.push(PolicyError {
                    file: path.clone(),
                    line,
                    message,
                })
            };
            if !ids.insert(raw.id.clone()) {
                fail(format!("rule `{}`: the id is used twice", raw.id));
                continue;
            }
            match build_rule(raw, &custom, &key) {
                Ok(rule) => rules.push(rule),
                Err(message) => fail(message),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        let digest = hasher.finalize();
        let hash = format!(
            "sha256:{}",
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Ok(PolicySet {
            rules,
            hash,
            files: files.iter().map(|(p, _)| p.clone()).collect(),
        })
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Backends that share an address must be judged alike: which of them a connection meets
    /// must not decide what is allowed or masked. Refuses a set whose `backends` matchers
    /// tell a pair apart.
    pub fn check_alike(&self, shared: &[(String, String)], dir: &Path) -> Result<(), PolicyErrors> {
        let mut errors = Vec::new();
        for rule in &self.rules {
            let Some(set) = &rule.matchers.backends else {
                continue;
            };
            for (a, b) in shared {
                if set.is_match(a) != set.is_match(b) {
                    errors.push(PolicyError {
                        file: dir.to_owned(),
                        line: 0,
                        message: format!(
                            "rule `{}` treats backends `{a}` and `{b}` differently, but they share an address: which one a connection meets would decide how it is judged",
                            rule.id
                        ),
                    });
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyErrors(errors))
        }
    }

    /// Decide for one message, seen for one subject.
    pub fn decide(&self, subject: &Subject, msg: &Message<'_>) -> Decision {
        let mut verdict = None;
        let mut record = None;
        let mut mask_rules = Vec::new();
        let mut verdict_rule = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches(subject, msg) {
                continue;
            }
            if record.is_none() {
                record = rule.record;
            }
            if rule.action == Action::Mask {
                mask_rules.push(i);
                continue;
            }
            if verdict.is_some() {
                continue;
            }
            verdict_rule = Some(rule.id.clone());
            verdict = Some(match rule.action {
                Action::Block => Verdict::Block {
                    rule: rule.id.clone(),
                },
                Action::Approve => Verdict::Approve {
                    rule: rule.id.clone(),
                    timeout: rule.timeout,
                },
                Action::Allow | Action::Mask => Verdict::Allow,
            });
        }
        let verdict = verdict.unwrap_or(Verdict::Allow);
        let mut record = record.unwrap_or(RecordLevel::Full);
        if verdict != Verdict::Allow && record == RecordLevel::Off {
            record = RecordLevel::Metadata;
        }
        Decision {
            verdict,
            mask_rules,
            record,
            verdict_rule,
        }
    }

    /// Mask `value` with every mask rule of `decision`: the counts by detector, and the rules
    /// that masked something.
    pub fn mask(&self, decision: &Decision, value: &mut Value) -> Masking {
        let mut masking = Masking::none();
        for &i in &decision.mask_rules {
            let rule = &self.rules[i];
            if let Some(m) = &rule.masker
                && m.mask_json(value, &mut masking.counts) > 0
            {
                masking.rules.push(rule.id.clone());
            }
        }
        masking
    }

    /// Mask a message body and hand it over in the only form the archive accepts.
    pub fn mask_payload(&self, decision: &Decision, mut value: Value) -> (MaskedPayload, Masking) {
        let masking = self.mask(decision, &mut value);
        (MaskedPayload::from_masked(value.to_string()), masking)
    }

    /// Mask one string (e.g. an `Mcp-Param-*` header value) the same way.
    pub fn mask_str(
        &self,
        decision: &Decision,
        text: &str,
        counts: &mut MaskCounts,
    ) -> Option<String> {
        let mut current: Option<String> = None;
        for &i in &decision.mask_rules {
            if let Some(m) = &self.rules[i].masker
                && let Some(out) = m.mask_str(current.as_deref().unwrap_or(text), counts)
            {
                current = Some(out);
            }
        }
        current
    }

    /// Whether `tools/list` should show `tool` to `subject`: hidden when a call to it, with no
    /// regard to arguments, would be blocked. Listing and calling then agree.
    pub fn tool_visible(&self, subject: &Subject, backend: &str, tool: &str) -> bool {
        self.tool_hidden_by(subject, backend, tool).is_none()
    }

    /// The block rule that hides `tool` from `subject`'s listings (see [`Self::tool_visible`]).
    pub fn tool_hidden_by(&self, subject: &Subject, backend: &str, tool: &str) -> Option<&str> {
        let probe = Message {
            backend,
            direction: Direction::ClientToServer,
            method: Some("tools/call"),
            tool: Some(tool),
            arguments: None,
            is_call: true,
            scope_unknown: false,
        };
        for rule in &self.rules {
            if !rule.matches_ignoring_args(subject, &probe) {
                continue;
            }
            match rule.action {
                Action::Allow | Action::Approve => return None,
                // A block that depends on the arguments decides only some calls: the others
                // fall through to the later rules, which decide whether any call can pass.
                Action::Block if !rule.matchers.args.is_empty() => {}
                Action::Block => return Some(&rule.id),
                Action::Mask => {}
            }
        }
        None
    }
}

impl Rule {
    fn matches(&self, subject: &Subject, msg: &Message<'_>) -> bool {
        self.matches_ignoring_args(subject, msg) && self.args_match(msg.arguments)
    }

    fn matches_ignoring_args(&self, subject: &Subject, msg: &Message<'_>) -> bool {
        let direction_ok = matches!(
            (self.directions, msg.direction),
            (Directions::Both, _)
                | (Directions::Requests, Direction::ClientToServer)
                | (Directions::Responses, Direction::ServerToClient)
        );
        if !direction_ok {
            return false;
        }
        if matches!(self.action, Action::Block | Action::Approve) && !msg.is_call {
            return false;
        }
        let m = &self.matchers;
        let glob = |set: &Option<GlobSet>, value: Option<&str>| match set {
            None => true,
            Some(set) => value.is_some_and(|v| set.is_match(v)),
        };
        // Fail closed: a message whose request is unknown gets every mask rule.
        let any_scope = self.action == Action::Mask && msg.scope_unknown;
        (any_scope || (glob(&m.tools, msg.tool) && glob(&m.methods, msg.method)))
            && glob(&m.backends, Some(msg.backend))
            && glob(&m.users, subject.user.as_deref())
            && m.groups
                .as_ref()
                .is_none_or(|set| subject.groups.iter().any(|g| set.is_match(g)))
            && glob(&m.exe, subject.exe.as_deref())
            && glob(&m.comm, Some(&subject.comm))
            && glob(&m.cgroup, subject.cgroup.as_deref())
            && m.containers
                .as_ref()
                .is_none_or(|set| subject.container.iter().any(|c| set.is_match(c)))
            && m.uids
                .as_ref()
                .is_none_or(|uids| uids.contains(&subject.uid))
    }

    /// Every `args` matcher must find its argument and match it. Argument names compare under
    /// case folding (as Go's `encoding/json` reads them; strict parsing already refused an
    /// object holding two names that fold alike), and a JSON pointer's segments likewise.
    fn args_match(&self, arguments: Option<&Value>) -> bool {
        if self.matchers.args.is_empty() {
            return true;
        }
        let Some(arguments) = arguments else {
            return false;
        };
        self.matchers.args.iter().all(|(path, regex)| {
            let found = if path.starts_with('/') {
                pointer_folded(arguments, path)
            } else {
                get_folded(arguments, path)
            };
            match found {
                Some(Value::String(s)) => regex.is_match(s),
                Some(Value::Number(n)) => regex.is_match(&number_text(n)),
                Some(other) => regex.is_match(&other.to_string()),
                None => false,
            }
        })
    }
}

/// A number as `args` patterns see it: a whole number as an integer whatever the client wrote
/// (`1e5`, `100000.0` and `100000` alike, as servers that take it for an integer read it).
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if !(n.is_i64() || n.is_u64()) && f.fract() == 0.0 && f.abs() < 9.2e18 => {
            format!("{}", f as i64)
        }
        _ => n.to_string(),
    }
}

/// `value[key]`, the key compared under case folding.
fn get_folded<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    if let Some(v) = value.get(key) {
        return Some(v);
    }
    let folded = crate::mcp::strict::fold(key);
    value
        .as_object()?
        .iter()
        .find(|(k, _)| crate::mcp::strict::fold(k) == folded)
        .map(|(_, v)| v)
}

/// A JSON pointer (RFC 6901) whose object keys compare under case folding.
fn pointer_folded<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut current = value;
    for raw in pointer.split('/').skip(1) {
        let token = raw.replace("~1", "/").replace("~0", "~");
        current = match current {
            Value::Array(items) => items.get(token.parse::<usize>().ok()?)?,
            Value::Object(_) => get_folded(current, &token)?,
            _ => return None,
        };
    }
    Some(current)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
    #[serde(default)]
    detector: Vec<toml::Spanned<RawDetector>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    name: String,
    pattern: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    action: Action,
    direction: Option<Directions>,
    #[serde(default)]
    detectors: Vec<String>,
    style: Option<Style>,
    timeout_secs: Option<u64>,
    record: Option<RecordLevel>,
    tools: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    backends: Option<Vec<String>>,
    users: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    uids: Option<Vec<u32>>,
    exe: Option<Vec<String>>,
    comm: Option<Vec<String>>,
    cgroup: Option<Vec<String>>,
    containers: Option<Vec<String>>,
    #[serde(default)]
    args: BTreeMap<String, String>,
}

fn build_rule(
    raw: RawRule,
    custom: &BTreeMap<String, detectors::Detector>,
    key: &HashKey,
) -> Result<Rule, String> {
    let id = raw.id;
    let ctx = |m: String| format!("rule `{id}`: {m}");
    if id.trim().is_empty() {
        return Err("a rule needs a non-empty `id`".into());
    }
    let is_mask = raw.action == Action::Mask;
    if !is_mask && !raw.detectors.is_empty() {
        return Err(ctx("`detectors` only apply to mask rules".into()));
    }
    if !is_mask && raw.style.is_some() {
        return Err(ctx("`style` only applies to mask rules".into()));
    }
    if raw.action != Action::Approve && raw.timeout_secs.is_some() {
        return Err(ctx("`timeout_secs` only applies to approve rules".into()));
    }
    if raw.timeout_secs == Some(0) {
        return Err(ctx("`timeout_secs` must be at least 1".into()));
    }
    let enforcing = matches!(raw.action, Action::Block | Action::Approve);
    if enforcing && raw.record == Some(RecordLevel::Off) {
        return Err(ctx(
            "blocked and held messages are always recorded: `record = \"off\"` is not allowed here"
                .into(),
        ));
    }
    let directions = match (raw.direction, enforcing) {
        (None, true) | (Some(Directions::Requests), true) => Directions::Requests,
        (Some(_), true) => {
            return Err(ctx(
                "block and approve rules apply to requests only: drop `direction`".into(),
            ));
        }
        (Some(d), false) => d,
        (None, false) => Directions::Both,
    };
    let masker = if is_mask {
        if raw.detectors.is_empty() {
            return Err(ctx("a mask rule needs `detectors`".into()));
        }
        // Detectors run in the built-in order (most specific first), then custom ones.
        let mut wanted: Vec<detectors::Detector> = Vec::new();
        for name in &raw.detectors {
            if detectors::builtin(name).is_none() && !custom.contains_key(name) {
                return Err(ctx(format!(
                    "unknown detector `{name}` (built in: {}; or define it with [[detector]])",
                    detectors::BUILTIN.join(", ")
                )));
            }
        }
        for name in detectors::BUILTIN {
            if raw.detectors.iter().any(|d| d == name)
                && let Some(d) = detectors::builtin(name)
            {
                wanted.push(d);
            }
        }
        for name in &raw.detectors {
            if let Some(d) = custom.get(name) {
                wanted.push(d.clone());
            }
        }
        let style = raw.style.unwrap_or(Style::Redact);
        Some(mask::Masker::new(wanted, style, key.clone()).map_err(|e| ctx(e.to_string()))?)
    } else {
        None
    };
    let globs = |field: &str, list: Option<Vec<String>>| -> Result<Option<GlobSet>, String> {
        let Some(list) = list else { return Ok(None) };
        if list.is_empty() {
            return Err(ctx(format!(
                "`{field}` is empty: remove it to match everything"
            )));
        }
        let mut b = GlobSetBuilder::new();
        for g in &list {
            b.add(Glob::new(g).map_err(|e| ctx(format!("`{field}`: bad glob `{g}`: {e}")))?);
        }
        b.build()
            .map(Some)
            .map_err(|e| ctx(format!("`{field}`: {e}")))
    };
    let mut args = Vec::new();
    for (path, pattern) in raw.args {
        let regex =
            Regex::new(&pattern).map_err(|e| ctx(format!("`args.{path}`: bad regex: {e}")))?;
        args.push((path, regex));
    }
    if raw.uids.as_ref().is_some_and(Vec::is_empty) {
        return Err(ctx("`uids` is empty: remove it to match everything".into()));
    }
    let matchers = Matchers {
        tools: globs("tools", raw.tools)?,
        methods: globs("methods", raw.methods)?,
        backends: globs("backends", raw.backends)?,
        users: globs("users", raw.users)?,
        groups: globs("groups", raw.groups)?,
        exe: globs("exe", raw.exe)?,
        comm: globs("comm", raw.comm)?,
        cgroup: globs("cgroup", raw.cgroup)?,
        containers: globs("containers", raw.containers)?,
        uids: raw.uids,
        args,
    };
    Ok(Rule {
        id,
        action: raw.action,
        directions,
        matchers,
        masker,
        timeout: raw
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_APPROVAL_TIMEOUT),
        record: raw.record,
    })
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
