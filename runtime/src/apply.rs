//! Applying a plan: all of it, or none of it.
//!
//! Through a [`TextPoke`]: re-read every site (nothing may have changed since planning), write
//! every changed site once, serialize once, read every site back. If any read-back differs,
//! every site written is restored: no site is ever left half-written and the kernel is either
//! fully patched or not at all.

use core::fmt;

use alloc::vec::Vec;

use patch_sites::prepared::Change;

use crate::plan::{Plan, TextRead, Write};
use pvpatch_isa::encode::{MAX_SEQ, Seq};

/// Writes kernel text.
pub trait TextPoke: TextRead {
    /// Called before a batch of writes (to lift write protection once for all of them).
    fn open(&mut self) {}
    /// Called after a batch of writes.
    fn close(&mut self) {}
    /// Writes `bytes` at `addr`, whatever the page's protection (between `open` and `close`).
    fn write(&mut self, addr: u64, bytes: &[u8]);
    /// Makes every write so far visible to instruction fetch (a serializing instruction that
    /// does not exit to the hypervisor).
    fn sync(&mut self);
}

/// Why applying a plan failed. Nothing is left changed, unless the text cannot even be
/// restored ([`ApplyError::NotRestored`], which a kernel must treat as fatal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyError {
    /// A site changed between planning and applying.
    Changed {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
    },
    /// A site did not read back as written; every site was restored.
    ReadBack {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
    },
    /// A site did not read back as written, and restoring the old bytes failed too: the text
    /// cannot be trusted.
    NotRestored {
        /// Record index of the first site that is not as it was.
        index: u32,
        /// Address.
        addr: u64,
    },
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::Changed { index, addr } => {
                write!(
                    f,
                    "record {index}: the site at {addr:#x} changed after planning"
                )
            }
            ApplyError::ReadBack { index, addr } => write!(
                f,
                "record {index}: the site at {addr:#x} did not read back as written; every site \
                 was restored"
            ),
            ApplyError::NotRestored { index, addr } => write!(
                f,
                "record {index}: the site at {addr:#x} did not read back as written, and \
                 restoring the old bytes failed: the text cannot be trusted"
            ),
        }
    }
}

/// What applying wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Sites written.
    pub sites: u32,
    /// Bytes written.
    pub bytes: u64,
    /// Detours installed.
    pub detours: u32,
}

/// Whether the text at `addr` holds `bytes` (read in pieces of at most [`MAX_SEQ`] bytes).
fn holds(t: &dyn TextPoke, addr: u64, bytes: &[u8]) -> bool {
    let mut buf = Seq::new();
    bytes.chunks(MAX_SEQ).enumerate().all(|(k, chunk)| {
        buf = Seq::from_slice(chunk).unwrap_or_default();
        t.read(addr + (k * MAX_SEQ) as u64, buf.as_mut_slice()) && buf.as_slice() == chunk
    })
}

/// Every change `plan` makes, in the order they are made: the backend's code first, then
/// each detour's stub and trampoline, then the sites in place, then each detour's `jmp` (so
/// that nothing can reach a stub before it is whole). `writes` holds the plan's [`Write`]s the
/// changes borrow (`plan.writes()`, collected).
pub fn changes<'a>(plan: &'a Plan, writes: &'a [Write]) -> Vec<Change<'a>> {
    let code = plan.code.iter().map(|c| Change {
        index: u32::MAX,
        addr: c.addr,
        old: &c.old,
        new: &c.new,
    });
    let sites = writes.iter().map(|w| Change {
        index: w.index,
        addr: w.addr,
        old: w.old.as_slice(),
        new: w.new.as_slice(),
    });
    code.chain(sites).collect()
}

/// `plan.writes()`, in a vector of exactly their number (a boot shim's heap frees nothing: a
/// vector grown by doubling would keep every smaller buffer).
pub fn collect_writes(plan: &Plan) -> Vec<Write> {
    let mut w = Vec::with_capacity(plan.writes().count());
    w.extend(plan.writes());
    w
}

/// Applies `plan`: all of it, or (on any failure) none of it (see [`apply_changes`]).
pub fn apply(plan: &Plan, t: &mut dyn TextPoke) -> Result<Applied, ApplyError> {
    let writes = collect_writes(plan);
    let bytes = apply_changes(&changes(plan, &writes), t)?;
    Ok(Applied {
        sites: plan.sites.iter().filter(|p| p.changed()).count() as u32,
        bytes,
        detours: plan.detours.len() as u32,
    })
}

/// Applies `changes` in their order: all of them, or (on any failure) none. Every change's old
/// bytes are checked first (nothing may have changed since planning); then everything is
/// written, serialized once, and read back; if any read-back differs, every change is taken
/// back, in the reverse order. A list that changes nothing touches nothing: not even the text
/// poke's open and close. Returns the bytes written.
pub fn apply_changes(changes: &[Change<'_>], t: &mut dyn TextPoke) -> Result<u64, ApplyError> {
    if changes.is_empty() {
        return Ok(0);
    }
    if let Some(c) = changes.iter().find(|c| !holds(t, c.addr, c.old)) {
        return Err(ApplyError::Changed {
            index: c.index,
            addr: c.addr,
        });
    }
    t.open();
    for c in changes {
        t.write(c.addr, c.new);
    }
    t.close();
    t.sync();
    if let Some(bad) = changes.iter().find(|c| !holds(t, c.addr, c.new)) {
        revert_changes(changes, t);
        return Err(match changes.iter().find(|c| !holds(t, c.addr, c.old)) {
            Some(c) => ApplyError::NotRestored {
                index: c.index,
                addr: c.addr,
            },
            None => ApplyError::ReadBack {
                index: bad.index,
                addr: bad.addr,
            },
        });
    }
    Ok(changes.iter().map(|c| c.new.len() as u64).sum())
}

/// Writes back the old bytes of everything `plan` changed (see [`revert_changes`]).
pub fn revert(plan: &Plan, t: &mut dyn TextPoke) {
    let writes = collect_writes(plan);
    revert_changes(&changes(plan, &writes), t);
}

/// Writes back the old bytes of `changes` in the reverse of the order they were made: each
/// detour's `jmp` first (a host's last, so that no `jmp` reaches its trampolines once they are
/// gone), so that nothing reaches a stub while it is being taken away; the backend's code last.
pub fn revert_changes(changes: &[Change<'_>], t: &mut dyn TextPoke) {
    t.open();
    for c in changes.iter().rev() {
        t.write(c.addr, c.old);
    }
    t.close();
    t.sync();
}
