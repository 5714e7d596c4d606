//! The shipper's cursor, `state_dir/ship-state.json`: how many of the host's manifest lines are
//! in the bucket, and the SHA-256 of the last of them.
//!
//! The count is only believed when the local manifest's line at that place still has that
//! hash: an archive directory replaced (or a manifest rewritten) under an old state would
//! otherwise have its lines treated as shipped — and retention's hold (`keep_unshipped`)
//! delete files that never left the host. Anything doubtful (another bucket or host, a
//! mismatch, a file that cannot be read or parsed) starts over from line 0 with a warning:
//! every write is create-only and compared, so re-shipping costs time, never data.

use std::{fs, io, path::Path};

use sha2::Digest as _;
use tracing::warn;

use super::ShipError;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct State {
    pub url: String,
    pub host: String,
    pub lines_shipped: u64,
    /// SHA-256 (hex) of the last shipped line's bytes, newline included.
    #[serde(default)]
    pub last_line_sha256: Option<String>,
}

/// The number of lines to count as shipped, checked as above.
pub(super) fn resume(path: &Path, manifest: &Path, url: &str, host: &str) -> u64 {
    let state: State = match fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "the shipping state is not readable; shipping starts over from the first manifest line (objects already in the bucket are recognised, not rewritten)");
                return 0;
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the shipping state; shipping starts over from the first manifest line");
            return 0;
        }
    };
    // A state for another bucket or host says nothing about this one.
    if state.url != url || state.host != host || state.lines_shipped == 0 {
        return 0;
    }
    let local = fs::read(manifest).ok().and_then(|m| {
        m.split_inclusive(|b| *b == b'\n')
            .nth(usize::try_from(state.lines_shipped - 1).ok()?)
            .filter(|l| l.ends_with(b"\n"))
            .map(|l| hex::encode(sha2::Sha256::digest(l)))
    });
    match (&local, &state.last_line_sha256) {
        (Some(l), Some(s)) if l == s => state.lines_shipped,
        _ => {
            warn!(
                path = %path.display(),
                manifest = %manifest.display(),
                lines_shipped = state.lines_shipped,
                "the shipping state does not match the local manifest (archive directory replaced or manifest rewritten?); shipping starts over from the first manifest line, and retention keeps every file until it is shipped again"
            );
            0
        }
    }
}

/// Write the state through a temporary file, fsync, rename (0600).
pub(super) fn save(path: &Path, state: &State) -> Result<(), ShipError> {
    crate::policy::pins::write_atomically(path, &serde_json::to_vec(state).unwrap_or_default())
        .map_err(|source| ShipError::State {
            path: path.to_owned(),
            source,
        })
}
