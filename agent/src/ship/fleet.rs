//! `airlock verify --fleet`: check a fleet copy — the bucket itself, or a directory synced from
//! it — with the same checks as a local archive ([`crate::archive::verify`]).
//!
//! The fleet layout (see [`super::store`]) is laid out again as a local archive in a private
//! temporary directory — each host's Parquet files under `date=…/hour=…/`, its public key in
//! `_manifest/` — and verified there, with each host's manifest given line object by line
//! object ([`crate::archive::verify::verify_manifests`]), so that every problem with a line
//! names that object's key (with the host and line as context). On top of the local checks:
//! a line object missing between others, one that is not exactly one line ending in a
//! newline, and objects outside the layout.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use futures_util::StreamExt as _;
use object_store::{ObjectStore, ObjectStoreExt as _};

use super::{ShipError, store::FleetLayout};
use crate::archive::{
    files::is_file_of,
    manifest::{Entry, EntryBody, StoredLine},
    verify::{Report, Trust},
};

/// Where the fleet copy is.
pub enum Source {
    /// A bucket, with the prefix the hosts ship under.
    Bucket {
        store: Arc<dyn ObjectStore>,
        layout: FleetLayout,
        url: String,
    },
    /// A directory holding the bucket's layout (`host=…/…`), e.g. from `aws s3 sync`.
    Directory(PathBuf),
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Bucket { url, .. } => format!("{url}/"),
            Source::Directory(d) => format!("{}/", d.display()),
        }
    }
}

/// Verify a fleet copy. `Err` only when it cannot be read at all.
pub fn verify(source: &Source, trust: &Trust) -> Result<Report, ShipError> {
    let work = TempDir::new()?;
    let mut extra = Vec::new();
    let rels = match source {
        Source::Bucket { store, layout, url } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ShipError::Bucket {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            rt.block_on(download(store.as_ref(), layout, url, &work.0))?
        }
        Source::Directory(dir) => {
            let mut keys = Vec::new();
            walk(dir, dir, &mut keys).map_err(|e| ShipError::Local {
                path: dir.clone(),
                message: e.to_string(),
            })?;
            keys
        }
    };
    let (staged, manifests) = stage(source, &rels, &work.0, &mut extra)?;
    let trust = Trust {
        fleet: true,
        ..trust.clone()
    };
    let mut report = crate::archive::verify::verify_manifests(&work.0, &trust, manifests);
    // Name problems by the fleet's keys, not the temporary copy's paths.
    let prefix = source.name();
    let tmp = format!("{}/", work.0.display());
    report.problems = report
        .problems
        .into_iter()
        .map(|p| {
            let p = p.replace(&tmp, &prefix);
            match p.split_once(':') {
                Some((path, rest)) if path.starts_with("date=") => match staged.get(path) {
                    Some(host) => format!("{prefix}host={host}/{path}:{rest}"),
                    None => format!("{prefix}…/{path}:{rest}"),
                },
                _ => p,
            }
        })
        .chain(extra)
        .collect();
    Ok(report)
}

/// Every object key under the prefix (relative to it), downloaded into `into/_objects/`.
async fn download(
    store: &dyn ObjectStore,
    layout: &FleetLayout,
    url: &str,
    into: &Path,
) -> Result<Vec<String>, ShipError> {
    let fail = |e: object_store::Error| ShipError::Bucket {
        url: url.to_owned(),
        message: super::redact::error(&e),
    };
    let root = layout.root();
    let mut listing = store.list(root.as_ref());
    let mut keys = Vec::new();
    while let Some(meta) = listing.next().await {
        keys.push(meta.map_err(fail)?.location);
    }
    let objects = into.join("_objects");
    let mut rels = Vec::new();
    for key in keys {
        let rel = match &root {
            Some(r) => key
                .as_ref()
                .strip_prefix(r.as_ref())
                .map(|s| s.trim_start_matches('/').to_owned()),
            None => Some(key.as_ref().to_owned()),
        };
        let Some(rel) = rel.filter(|r| safe_rel(r)) else {
            continue;
        };
        let dest = objects.join(&rel);
        if let Some(parent) = dest.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| local(parent, e))?;
        }
        let mut file = fs::File::create(&dest).map_err(|e| local(&dest, e))?;
        let mut body = store.get(&key).await.map_err(fail)?.into_stream();
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk.map_err(fail)?)
                .map_err(|e| local(&dest, e))?;
        }
        rels.push(rel);
    }
    Ok(rels)
}

fn local(path: &Path, e: std::io::Error) -> ShipError {
    ShipError::Local {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// No `..`, no absolute path: a key may not leave the staging directory.
fn safe_rel(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.starts_with('/')
        && rel
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let ty = e.file_type()?;
        if ty.is_dir() {
            walk(root, &p, out)?;
        } else if ty.is_file()
            && let Ok(rel) = p.strip_prefix(root)
            && let Some(rel) = rel.to_str()
        {
            out.push(rel.to_owned());
        }
    }
    Ok(())
}

/// Each host's manifest, line object by line object.
type Manifests = BTreeMap<String, Result<Vec<StoredLine>, String>>;

/// Lay the fleet copy out as a local archive under `work`; returns which host each staged file
/// path belongs to, and each host's manifest lines (named by their keys). Problems only the
/// fleet layout can have go to `extra`.
fn stage(
    source: &Source,
    rels: &[String],
    work: &Path,
    extra: &mut Vec<String>,
) -> Result<(BTreeMap<String, String>, Manifests), ShipError> {
    let name = source.name();
    let from = |rel: &str| match source {
        Source::Bucket { .. } => work.join("_objects").join(rel),
        Source::Directory(d) => d.join(rel),
    };
    let archive = work.to_owned();
    let manifest_dir = archive.join("_manifest");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&manifest_dir)
        .map_err(|e| local(&manifest_dir, e))?;
    let mut hosts: BTreeMap<String, (BTreeMap<u64, String>, Option<String>)> = BTreeMap::new();
    let mut staged = BTreeMap::new();
    for rel in rels {
        let Some((host_part, rest)) = rel.split_once('/') else {
            extra.push(format!("{name}{rel}: not in the fleet layout (host=…/…)"));
            continue;
        };
        let Some(host) = host_part.strip_prefix("host=").filter(|h| !h.is_empty()) else {
            extra.push(format!("{name}{rel}: not in the fleet layout (host=…/…)"));
            continue;
        };
        let entry = hosts.entry(host.to_owned()).or_default();
        if let Some(obj) = rest.strip_prefix("_manifest/") {
            if obj == format!("{host}.pub") {
                entry.1 = Some(rel.clone());
            } else if let Some(n) = obj
                .strip_suffix(".json")
                .filter(|n| n.len() == 12 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())
            {
                entry.0.insert(n, rel.clone());
            } else {
                extra.push(format!(
                    "{name}{rel}: not a manifest line or key of host {host}"
                ));
            }
        } else if rest.starts_with("date=") && rest.ends_with(".parquet") {
            let file = rest.rsplit('/').next().unwrap_or_default();
            if !is_file_of(host, file) {
                extra.push(format!(
                    "{name}{rel}: a file of another host under host={host}: moved or inserted"
                ));
                continue;
            }
            let dest = archive.join(rest);
            if let Some(parent) = dest.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| local(parent, e))?;
            }
            std::os::unix::fs::symlink(from(rel), &dest).map_err(|e| local(&dest, e))?;
            staged.insert(rest.to_owned(), host.to_owned());
        } else {
            extra.push(format!("{name}{rel}: not in the fleet layout"));
        }
    }
    let mut manifests = Manifests::new();
    for (host, (lines, key)) in &hosts {
        if let Some(key) = key {
            fs::copy(from(key), manifest_dir.join(format!("{host}.pub")))
                .map_err(|e| local(&from(key), e))?;
        }
        if lines.is_empty() {
            continue;
        }
        // Every line up to the last object: a missing one is a line too (the verifier says
        // whether a valid line after it proves it was removed).
        let last = lines.keys().next_back().copied().unwrap_or(0);
        let mut stored = Vec::new();
        for seq in 1..=last {
            let key = format!("{name}host={host}/_manifest/{seq:012}.json");
            let line_name = format!("{key}: manifest line {seq} of host {host}");
            let Some(rel) = lines.get(&seq) else {
                stored.push(StoredLine {
                    name: line_name,
                    mention: key,
                    bytes: None,
                    defect: None,
                });
                continue;
            };
            let mut bytes = fs::read(from(rel)).map_err(|e| local(&from(rel), e))?;
            // The host's files, by the lines that list them (for missing ones too).
            if let Ok(Entry {
                body: EntryBody::File { path, .. },
                ..
            }) = serde_json::from_slice::<Entry>(&bytes)
            {
                staged.entry(path).or_insert_with(|| host.clone());
            }
            // The shipper wrote the line with its newline, and nothing else.
            let mut defect = None;
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
            } else {
                defect = Some("the object does not end with a newline".to_owned());
            }
            if bytes.contains(&b'\n') {
                defect = Some("the object holds more than one line".to_owned());
            }
            stored.push(StoredLine {
                name: line_name,
                mention: key,
                bytes: Some(bytes),
                defect,
            });
        }
        manifests.insert(host.clone(), Ok(stored));
    }
    Ok((staged, manifests))
}

/// A private temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, ShipError> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| ShipError::Local {
            path: std::env::temp_dir(),
            message: e.to_string(),
        })?;
        let path = std::env::temp_dir().join(format!("airlock-fleet-{}", hex::encode(bytes)));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| local(&path, e))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
