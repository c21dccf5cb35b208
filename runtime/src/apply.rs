//! Applying a plan: all of it, or none of it.
//!
//! Through a [`TextPoke`]: re-read every site (nothing may have changed since planning), write
//! every changed site once, serialize once, read every site back. If any read-back differs,
//! every site written is restored: no site is ever left half-written and the kernel is either
//! fully patched or not at all.

use core::fmt;

use crate::plan::{Plan, TextRead};
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

/// Applies `plan`: all of it, or (on any failure) none of it. The backend's code goes in
/// first, then each detour's stub and trampoline, then the sites in place, then each detour's
/// `jmp` (so that nothing can reach a stub before it is whole); then everything is read back.
pub fn apply(plan: &Plan, t: &mut dyn TextPoke) -> Result<Applied, ApplyError> {
    // A plan that writes nothing (every site already what the backend wants) touches nothing:
    // not even the text poke's open and close.
    if plan.code.is_empty() && plan.writes().next().is_none() {
        return Ok(Applied::default());
    }
    for c in &plan.code {
        if !holds(t, c.addr, &c.old) {
            return Err(ApplyError::Changed {
                index: u32::MAX,
                addr: c.addr,
            });
        }
    }
    for w in plan.writes() {
        if !holds(t, w.addr, w.old.as_slice()) {
            return Err(ApplyError::Changed {
                index: w.index,
                addr: w.addr,
            });
        }
    }
    let mut applied = Applied::default();
    t.open();
    for c in &plan.code {
        t.write(c.addr, &c.new);
        applied.bytes += c.new.len() as u64;
    }
    for w in plan.writes() {
        t.write(w.addr, w.new.as_slice());
        applied.bytes += w.new.len() as u64;
    }
    applied.sites = plan.sites.iter().filter(|p| p.changed()).count() as u32;
    applied.detours = plan.detours.len() as u32;
    t.close();
    t.sync();
    let failed = plan
        .code
        .iter()
        .find(|c| !holds(t, c.addr, &c.new))
        .map(|c| (u32::MAX, c.addr))
        .or_else(|| {
            plan.writes()
                .find(|w| !holds(t, w.addr, w.new.as_slice()))
                .map(|w| (w.index, w.addr))
        });
    if let Some((index, addr)) = failed {
        revert(plan, t);
        let stuck = plan
            .code
            .iter()
            .find(|c| !holds(t, c.addr, &c.old))
            .map(|c| (u32::MAX, c.addr))
            .or_else(|| {
                plan.writes()
                    .find(|w| !holds(t, w.addr, w.old.as_slice()))
                    .map(|w| (w.index, w.addr))
            });
        return Err(match stuck {
            Some((index, addr)) => ApplyError::NotRestored { index, addr },
            None => ApplyError::ReadBack { index, addr },
        });
    }
    Ok(applied)
}

/// Writes back the old bytes of everything `plan` changed (the `jmp`s over moved ranges first,
/// so that nothing reaches a stub while it is being taken away; a host's last, so that no `jmp`
/// reaches its trampolines once they are gone).
pub fn revert(plan: &Plan, t: &mut dyn TextPoke) {
    t.open();
    for d in plan.detours_by_host(false) {
        t.write(d.moved.addr, d.moved.old.as_slice());
    }
    for w in plan.writes() {
        t.write(w.addr, w.old.as_slice());
    }
    for c in &plan.code {
        t.write(c.addr, &c.old);
    }
    t.close();
    t.sync();
}
