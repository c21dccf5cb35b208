//! Applying a plan: all of it, or none of it.
//!
//! Through a [`TextPoke`]: re-read every site (nothing may have changed since planning), write
//! every changed site once, serialize once, read every site back. If any read-back differs,
//! every site written is restored: no site is ever left half-written and the kernel is either
//! fully patched or not at all.

use core::fmt;

use crate::plan::{Plan, TextRead};
use pvpatch_isa::encode::Seq;

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
}

/// Applies `plan`: all of it, or (on any failure) none of it.
pub fn apply(plan: &Plan, t: &mut dyn TextPoke) -> Result<Applied, ApplyError> {
    let mut buf = Seq::new();
    for p in plan.changes() {
        buf = p.old;
        if !t.read(p.addr, buf.as_mut_slice()) || buf != p.old {
            return Err(ApplyError::Changed {
                index: p.index,
                addr: p.addr,
            });
        }
    }
    let mut applied = Applied::default();
    t.open();
    for p in plan.changes() {
        t.write(p.addr, p.new.as_slice());
        applied.sites += 1;
        applied.bytes += p.new.len() as u64;
    }
    t.close();
    t.sync();
    let failed = plan.changes().find(|p| {
        buf = p.new;
        !t.read(p.addr, buf.as_mut_slice()) || buf != p.new
    });
    if let Some(p) = failed {
        revert(plan, t);
        let stuck = plan.changes().find(|q| {
            buf = q.old;
            !t.read(q.addr, buf.as_mut_slice()) || buf != q.old
        });
        return Err(match stuck {
            Some(q) => ApplyError::NotRestored {
                index: q.index,
                addr: q.addr,
            },
            None => ApplyError::ReadBack {
                index: p.index,
                addr: p.addr,
            },
        });
    }
    Ok(applied)
}

/// Writes back the old bytes of every site `plan` changed.
pub fn revert(plan: &Plan, t: &mut dyn TextPoke) {
    t.open();
    for q in plan.changes() {
        t.write(q.addr, q.old.as_slice());
    }
    t.close();
    t.sync();
}
