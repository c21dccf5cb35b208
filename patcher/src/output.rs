//! Writing an output file atomically: into a temporary file beside it, flushed and synced,
//! then renamed over the destination. A failure at any point leaves no partial file behind and
//! the destination untouched; the input is never the destination unless the caller asked.
//!
//! What is replaced is always a regular file: a destination that is a symbolic link is
//! followed (its target is replaced, the link is kept); one that is not a regular file (a
//! character or block device, a FIFO, `/dev/stdout` or anything else reached through a
//! `/proc` link, a directory) is opened and written directly, never replaced.
//!
//! Every temporary file this process is writing is registered: [`abandon_temp_files`] removes
//! them (a binary calls it when it is interrupted), and [`stale_temp_files`] names the ones that
//! a killed run left beside a destination.

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tempfile::TempPath;
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

/// Whether a file is of one kind.
type IsKind = fn(&FileType) -> bool;

/// What kind of file `meta` describes, for messages: "a regular file", "a directory", "a
/// FIFO", ...
pub fn file_kind(meta: &Metadata) -> &'static str {
    #[cfg(unix)]
    use std::os::unix::fs::FileTypeExt;
    let kinds: &[(IsKind, &'static str)] = &[
        (FileType::is_file, "a regular file"),
        (FileType::is_dir, "a directory"),
        (FileType::is_symlink, "a symbolic link"),
        #[cfg(unix)]
        (FileTypeExt::is_fifo, "a FIFO"),
        #[cfg(unix)]
        (FileTypeExt::is_char_device, "a character device"),
        #[cfg(unix)]
        (FileTypeExt::is_block_device, "a block device"),
        #[cfg(unix)]
        (FileTypeExt::is_socket, "a socket"),
    ];
    let t = meta.file_type();
    kinds
        .iter()
        .find(|(is, _)| is(&t))
        .map_or("not a regular file", |&(_, kind)| kind)
}

/// The name prefix and suffix of the temporary files written beside a destination.
const TMP_PREFIX: &str = ".pvpatch-";
const TMP_SUFFIX: &str = ".tmp";

/// The temporary files this process is writing. Creating, renaming into place and removing one
/// happen with the lock held, so that [`abandon_temp_files`] sees each file either before it
/// exists, while it does, or after it was renamed.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes every temporary file this process is writing and keeps any other from being created
/// or renamed into place while the returned guard lives. For a binary's signal-handling thread,
/// which then exits the process without dropping the guard. Nothing else is touched: a
/// destination is either as it was or completely written.
pub fn abandon_temp_files() -> Abandoned {
    let mut guard = pending();
    for p in guard.drain(..) {
        let _ = std::fs::remove_file(&p);
    }
    Abandoned(guard)
}

/// While this lives, no output is renamed into place and no temporary file is created.
#[derive(Debug)]
#[must_use = "dropping it lets other threads write temporary files again"]
pub struct Abandoned(#[allow(dead_code)] MutexGuard<'static, Vec<PathBuf>>);

/// How long a write pauses, its temporary file complete, before it replaces the destination.
static PAUSE_MS: AtomicU64 = AtomicU64::new(0);

/// Makes every later write pause for `d` once its temporary file is complete, before that file
/// replaces the destination. Only for tests of interruption (the `pvpatch` binary sets it from
/// `PVPATCH_TEST_WRITE_PAUSE_MS`).
#[doc(hidden)]
pub fn pause_before_replacing(d: Duration) {
    PAUSE_MS.store(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// A registered temporary file: removed (and unregistered) when dropped, unless renamed into
/// place by [`Pending::persist`].
struct Pending(Option<TempPath>);

impl Pending {
    /// Creates a temporary file in `dir`.
    fn create(dir: &Path) -> std::io::Result<(File, Pending)> {
        let mut list = pending();
        let (file, path) = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .suffix(TMP_SUFFIX)
            .tempfile_in(dir)?
            .into_parts();
        list.push(path.to_path_buf());
        Ok((file, Pending(Some(path))))
    }

    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// Renames the file over `dest`.
    fn persist(mut self, dest: &Path) -> std::io::Result<()> {
        let mut list = pending();
        let Some(path) = self.0.take() else {
            return Err(std::io::Error::other("the temporary file is gone"));
        };
        let name = path.to_path_buf();
        if !list.contains(&name) {
            // Abandoned (and removed) by `abandon_temp_files`.
            return Err(std::io::Error::other("interrupted"));
        }
        match path.persist(dest) {
            Ok(()) => {
                list.retain(|p| *p != name);
                Ok(())
            }
            Err(e) => {
                // Put it back: dropping `self` removes it.
                self.0 = Some(e.path);
                Err(e.error)
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut list = pending();
        if let Some(path) = self.0.take() {
            let name = path.to_path_buf();
            drop(path);
            list.retain(|p| *p != name);
        }
    }
}

/// Where a destination is written.
enum Target {
    /// Opened and written as it is (not a regular file).
    Direct,
    /// This regular file (the destination, or the end of its chain of links; it may not exist
    /// yet) is replaced by a rename.
    Replace(PathBuf),
}

/// Whether `p` is a link of `/proc` (`/proc/self/fd/1`, `/dev/fd/1`), which names an open file
/// rather than a path.
fn in_proc(p: &Path) -> bool {
    let dir = p
        .parent()
        .filter(|x| !x.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.canonicalize()
        .map(|d| d.starts_with("/proc"))
        .unwrap_or(false)
}

/// Follows `dest`'s symbolic links to decide how it is written.
fn target(dest: &Path) -> Target {
    let mut p = dest.to_path_buf();
    // As many links as Linux follows.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                if in_proc(&p) {
                    return Target::Direct;
                }
                let Ok(next) = std::fs::read_link(&p) else {
                    return Target::Direct;
                };
                p = match p.parent() {
                    Some(dir) => dir.join(next),
                    None => next,
                };
            }
            Ok(m) if m.is_file() => return Target::Replace(p),
            Ok(_) => return Target::Direct,
            // A new file (perhaps the target of a dangling link), or one whose creation will
            // say why it cannot be.
            Err(_) => return Target::Replace(p),
        }
    }
    // A loop of links: opening it says so.
    Target::Direct
}

fn dir_of(p: &Path) -> &Path {
    p.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The temporary files (`.pvpatch-*.tmp`) that a write of `dest` would find beside it, which
/// this process is not writing: left by a run that was killed, or being written by another run
/// now. None for a destination that is not replaced by a rename.
pub fn stale_temp_files(dest: &Path) -> Vec<PathBuf> {
    let Target::Replace(p) = target(dest) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir_of(&p)) else {
        return Vec::new();
    };
    // Named as `dest`'s directory is (no `./` before a relative one).
    let dir = p.parent().unwrap_or(Path::new(""));
    let ours = pending().clone();
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(TMP_PREFIX)
                && name.ends_with(TMP_SUFFIX)
                && name.len() > TMP_PREFIX.len() + TMP_SUFFIX.len()
                && e.file_type().is_ok_and(|t| t.is_file())
        })
        .filter(|e| !ours.contains(&e.path()))
        .map(|e| dir.join(e.file_name()))
        .collect();
    found.sort();
    found
}

/// A check of the finished temporary file, run before it replaces the destination.
pub type Check<'a> = &'a dyn Fn(&Path) -> Result<(), OutputError>;

/// Writes `dest` atomically with what `fill` writes; the new file gets `mode_from`'s
/// permissions if given, and must pass `check` (given the temporary file's path) before it
/// replaces `dest`. A `dest` that is not a regular file is written directly (after the check,
/// on a temporary file of the system's temporary directory, if there is one).
pub fn write_atomic(
    dest: &Path,
    mode_from: Option<&Path>,
    check: Option<Check<'_>>,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<(), OutputError>,
) -> Result<(), OutputError> {
    let io = io_error(dest);
    let replaced = match target(dest) {
        Target::Replace(p) => p,
        Target::Direct => return write_direct(dest, check, fill),
    };
    let (file, tmp) = Pending::create(dir_of(&replaced)).map_err(io)?;
    // `tmp` deletes the file when dropped, i.e. on every early return below.
    let file = filled(file, fill, dest)?;
    if let Some(m) = mode_from.and_then(|src| std::fs::metadata(src).ok()) {
        file.set_permissions(m.permissions()).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    drop(file);
    pause();
    if let Some(check) = check {
        check(tmp.path())?;
    }
    tmp.persist(&replaced).map_err(io)?;
    Ok(())
}

/// The error of an I/O failure writing `dest`.
fn io_error(dest: &Path) -> impl Fn(std::io::Error) -> OutputError + Copy + '_ {
    |source| OutputError::Io {
        path: dest.to_owned(),
        source,
    }
}

/// `file` with what `fill` writes, through a buffer, flushed (failures are `dest`'s).
fn filled(
    file: File,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<(), OutputError>,
    dest: &Path,
) -> Result<File, OutputError> {
    let mut w = BufWriter::with_capacity(1 << 20, file);
    fill(&mut w)?;
    w.into_inner().map_err(|e| io_error(dest)(e.into_error()))
}

fn pause() {
    let ms = PAUSE_MS.load(Ordering::Relaxed);
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Writes a destination that is not a regular file: opened for writing, never created,
/// truncated or replaced (a regular file reached through `/proc`, such as `/dev/stdout`
/// redirected to a file, is appended to).
fn write_direct(
    dest: &Path,
    check: Option<Check<'_>>,
    fill: impl FnOnce(&mut BufWriter<File>) -> Result<(), OutputError>,
) -> Result<(), OutputError> {
    let io = io_error(dest);
    let open = || {
        let regular = std::fs::metadata(dest).is_ok_and(|m| m.is_file());
        OpenOptions::new().write(true).append(regular).open(dest)
    };
    let Some(check) = check else {
        filled(open().map_err(io)?, fill, dest)?;
        return Ok(());
    };
    // The check needs a file: write one in the temporary directory, check it, copy it.
    let (file, tmp) = Pending::create(&std::env::temp_dir()).map_err(io)?;
    filled(file, fill, dest)?;
    pause();
    check(tmp.path())?;
    let mut from = File::open(tmp.path()).map_err(io)?;
    let mut to = open().map_err(io)?;
    std::io::copy(&mut from, &mut to).map_err(io)?;
    to.flush().map_err(io)?;
    Ok(())
}

/// Writes `bytes` to `dest` atomically.
pub fn write_bytes(dest: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    write_atomic(dest, None, None, |w| {
        w.write_all(bytes).map_err(io_error(dest))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_link_is_followed_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"old").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("file", &link).unwrap();
        write_bytes(&link, b"new").unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
    }

    #[test]
    fn a_dangling_link_creates_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("new", &link).unwrap();
        write_bytes(&link, b"x").unwrap();
        assert_eq!(std::fs::read(dir.path().join("new")).unwrap(), b"x");
    }

    #[test]
    fn stale_files_are_named_and_a_failed_check_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        assert!(stale_temp_files(&dest).is_empty());
        let stale = dir.path().join(".pvpatch-abc.tmp");
        std::fs::write(&stale, b"").unwrap();
        assert_eq!(stale_temp_files(&dest), vec![stale.clone()]);
        let refuse = |_: &Path| Err(OutputError::Content("no".into()));
        assert!(write_atomic(&dest, None, Some(&refuse), |_| Ok(())).is_err());
        assert_eq!(stale_temp_files(&dest), vec![stale]);
        assert!(!dest.exists());
    }
}
