//! Writing an output file atomically: into a temporary file beside it, flushed and synced,
//! then renamed over the destination. A failure at any point leaves no partial file behind and
//! the destination untouched; the input is never the destination unless the caller asked.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why an output could not be written.
#[derive(Debug, Error)]
pub enum OutputError {
    /// The destination is the input file.
    #[error("refusing to write over the input {0} (pass --in-place to replace it)")]
    WouldOverwriteInput(PathBuf),
    /// An I/O error.
    #[error("cannot write {path}")]
    Io {
        /// The destination.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The content could not be produced.
    #[error("{0}")]
    Content(String),
}

/// Whether `a` and `b` name the same file (`b` may not exist yet).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| -> Option<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        let parent = p
            .parent()
            .filter(|x| !x.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Some(parent.canonicalize().ok()?.join(p.file_name()?))
    };
    match (canon(a), canon(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// A check of the finished temporary file, run before it replaces the destination.
pub type Check<'a> = &'a dyn Fn(&Path) -> Result<(), OutputError>;

/// Writes `dest` atomically with what `fill` writes; the new file gets `mode_from`'s
/// permissions if given, and must pass `check` (given the temporary file's path) before it
/// replaces `dest`.
pub fn write_atomic(
    dest: &Path,
    mode_from: Option<&Path>,
    check: Option<Check<'_>>,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<(), OutputError>,
) -> Result<(), OutputError> {
    let io = |source| OutputError::Io {
        path: dest.to_owned(),
        source,
    };
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".pvpatch-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    let (file, tmp_path) = tmp.into_parts();
    // `tmp_path` deletes the file when dropped, i.e. on every early return below.
    let mut w = BufWriter::with_capacity(1 << 20, file);
    fill(&mut w)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    if let Some(m) = mode_from.and_then(|src| std::fs::metadata(src).ok()) {
        file.set_permissions(m.permissions()).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    drop(file);
    if let Some(check) = check {
        check(&tmp_path)?;
    }
    tmp_path.persist(dest).map_err(|e| io(e.error))?;
    Ok(())
}

/// Writes `bytes` to `dest` atomically.
pub fn write_bytes(dest: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    write_atomic(dest, None, None, |w| {
        w.write_all(bytes).map_err(|source| OutputError::Io {
            path: dest.to_owned(),
            source,
        })
    })
}
