//! Planning and applying: the patcher proper, shaped like Linux's `apply_alternatives` with the
//! checks it lacks.
//!
//! 1. **Validate** (before anything is written): the table has been parsed and checked (inside
//!    the kernel's text, no overlap, lengths, operand forms); now every site's current bytes
//!    must hold what its record says. One record that does not match refuses the whole table.
//! 2. **Plan** every site in a buffer: the backend's choice, its operands substituted, padded
//!    with recommended NOPs, and checked by decoding it back.
//! 3. **Apply** through a [`TextPoke`]: re-read every site (nothing may have changed since
//!    planning), write every changed site once, serialize once, read every site back. If any
//!    read-back differs, every site written is restored: no site is ever left half-written and
//!    the kernel is either fully patched or not at all.

use alloc::vec::Vec;
use core::fmt;

use iced_x86::Mnemonic;
use patch_sites::op::Kind;
use patch_sites::table::{Form, Site, SiteTable};
use patch_sites::{Op, RegSet};

use crate::backend::{Backend, Choice};
use crate::check::{self, Mismatch, decode_at};
use crate::encode::{self, Seq};

/// What became of a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Left as it is (already what the backend wants, or could not be changed).
    Unchanged,
    /// Rewritten to the native instruction (from an indirect call or a trap).
    Native,
    /// An inline sequence.
    Inline,
    /// A direct call to a thunk.
    Call,
    /// NOPs.
    Nothing,
    /// A trap (`ud2` or `int3`), emulated.
    Trap,
}

impl Outcome {
    /// Every outcome, for counting.
    pub const ALL: [Outcome; 6] = [
        Outcome::Unchanged,
        Outcome::Native,
        Outcome::Inline,
        Outcome::Call,
        Outcome::Nothing,
        Outcome::Trap,
    ];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Native => "native",
            Outcome::Inline => "inline",
            Outcome::Call => "call",
            Outcome::Nothing => "nothing",
            Outcome::Trap => "trap",
        }
    }
}

/// Why a site was left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// It already holds what the backend wants.
    AlreadyThere,
    /// Its op is unknown to this runtime.
    UnknownOp,
    /// Control transfers and hypervisor interfaces are never rewritten.
    NotRewritable,
    /// What the backend wants does not fit; the native instruction stays.
    NoRoom,
    /// The operand cannot be put into the backend's template.
    Operand,
    /// The native instruction cannot be encoded (an operand the record cannot describe).
    NotEncodable,
    /// The backend's sequence clobbers registers or flags the site's code does not allow
    /// (beyond the op's outputs and what it leaves undefined).
    Clobbers,
}

/// One site, planned.
#[derive(Clone, Copy, Debug)]
pub struct Planned {
    /// Index in the table.
    pub index: u32,
    /// The site.
    pub site: Site,
    /// Where the bytes are written (the stub for a detour).
    pub addr: u64,
    /// The bytes there now.
    pub old: Seq,
    /// The bytes to write (equal to `old` when unchanged).
    pub new: Seq,
    /// What becomes of it.
    pub outcome: Outcome,
    /// Why it is unchanged, when it is.
    pub keep: Option<Keep>,
}

/// A plan for the whole table.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Every site, in table order.
    pub sites: Vec<Planned>,
}

impl Plan {
    /// The sites that will be written.
    pub fn changes(&self) -> impl Iterator<Item = &Planned> {
        self.sites.iter().filter(|p| p.new != p.old)
    }
}

/// Why a table cannot be patched at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// A site's bytes cannot be read.
    Unreadable {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
    },
    /// A site does not hold what its record says.
    Mismatch {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
        /// How.
        mismatch: Mismatch,
    },
    /// A site of an op whose native instruction is wrong on this backend cannot take the
    /// backend's sequence (too little room, or an operand it has no entry point for).
    MustRewrite {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
        /// The op.
        op: Op,
    },
    /// What the planner built for a site does not decode as intended (a bug, caught).
    BadSequence {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
        /// How.
        mismatch: Mismatch,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Unreadable { index, addr } => {
                write!(f, "record {index}: the site at {addr:#x} cannot be read")
            }
            PlanError::Mismatch {
                index,
                addr,
                mismatch,
            } => {
                write!(f, "record {index}: the site at {addr:#x} {mismatch}")
            }
            PlanError::BadSequence {
                index,
                addr,
                mismatch,
            } => {
                write!(
                    f,
                    "record {index}: the sequence built for {addr:#x} {mismatch}"
                )
            }
            PlanError::MustRewrite { index, addr, op } => write!(
                f,
                "record {index}: the {op} at {addr:#x} cannot take the backend's sequence, and \
                 its native instruction is wrong on this backend"
            ),
        }
    }
}

/// `ud2`, the trap instruction where two bytes fit.
pub const UD2: [u8; 2] = [0x0f, 0x0b];

/// Reads kernel text.
pub trait TextRead {
    /// Copies `out.len()` bytes at `addr` into `out`; `false` if they cannot be read.
    fn read(&self, addr: u64, out: &mut [u8]) -> bool;
}

/// Overrides the backend's choice for particular sites (benchmarks force traps this way).
pub type Override<'o, 'a> = &'o dyn Fn(u32, &Site) -> Option<Choice<'a>>;

/// Plans every site of `table` for `backend`. Nothing is written.
pub fn plan(
    table: &SiteTable<'_>,
    backend: &Backend<'_>,
    text: &dyn TextRead,
    force: Option<Override<'_, '_>>,
) -> Result<Plan, PlanError> {
    let mut sites = Vec::with_capacity(table.len());
    for (i, site) in table.sites().enumerate() {
        let index = i as u32;
        let addr = site.patch_addr();
        let len = site.site_len as usize;
        let mut old = Seq::new();
        old.pad_to(len)
            .ok_or(PlanError::Unreadable { index, addr })?;
        if !text.read(addr, old.as_mut_slice()) {
            return Err(PlanError::Unreadable { index, addr });
        }
        let keep = |k| Planned {
            index,
            site,
            addr,
            old,
            new: old,
            outcome: Outcome::Unchanged,
            keep: Some(k),
        };
        let Some(op) = site.op() else {
            sites.push(keep(Keep::UnknownOp));
            continue;
        };
        check::original(old.as_slice(), addr, &site).map_err(|mismatch| PlanError::Mismatch {
            index,
            addr,
            mismatch,
        })?;
        let rewritable = matches!(op.info().kind, Kind::Instruction | Kind::Idiom);
        if !rewritable {
            sites.push(keep(Keep::NotRewritable));
            continue;
        }
        let choice = force
            .and_then(|f| f(index, &site))
            .unwrap_or_else(|| backend.choose(&site, op));
        let must_rewrite = PlanError::MustRewrite { index, addr, op };
        if choice == Choice::Native && backend.must_rewrite(op) {
            return Err(must_rewrite);
        }
        if choice == Choice::Native && matches!(site.form, Form::Native | Form::Detour) {
            // The common case: the native instruction is there and stays.
            sites.push(keep(Keep::AlreadyThere));
            continue;
        }
        let built = build(&site, op, choice, addr, len);
        let planned = match built {
            Ok((new, outcome)) => {
                verify_sequence(&site, choice, new.as_slice(), addr).map_err(|mismatch| {
                    PlanError::BadSequence {
                        index,
                        addr,
                        mismatch,
                    }
                })?;
                if new == old {
                    keep(Keep::AlreadyThere)
                } else {
                    Planned {
                        index,
                        site,
                        addr,
                        old,
                        new,
                        outcome,
                        keep: None,
                    }
                }
            }
            // The backend's choice cannot be used here: fall back to the native instruction,
            // which every backend allows but for the ops it must rewrite.
            Err(_) if backend.must_rewrite(op) => return Err(must_rewrite),
            Err(k) => match build(&site, op, Choice::Native, addr, len) {
                Ok((new, outcome)) if new != old => {
                    verify_sequence(&site, Choice::Native, new.as_slice(), addr).map_err(
                        |mismatch| PlanError::BadSequence {
                            index,
                            addr,
                            mismatch,
                        },
                    )?;
                    Planned {
                        index,
                        site,
                        addr,
                        old,
                        new,
                        outcome,
                        keep: Some(k),
                    }
                }
                _ => keep(k),
            },
        };
        sites.push(planned);
    }
    Ok(Plan { sites })
}

/// What a rewrite of `site` may change besides what it must: the op's outputs for its operand,
/// what the op leaves undefined, and what the code around the site lets it clobber.
pub fn may_clobber(site: &Site, op: Op) -> RegSet {
    op.outputs(site.operand)
        .union(op.info().undefined)
        .union(site.clobbers)
}

/// The bytes for `choice` at a site, padded to its room.
fn build(
    site: &Site,
    op: Op,
    choice: Choice<'_>,
    addr: u64,
    len: usize,
) -> Result<(Seq, Outcome), Keep> {
    let (mut seq, outcome) = match choice {
        Choice::Native => {
            let s = if site.form == Form::Native || site.form == Form::Detour {
                // The native instruction is already there: keep its bytes exactly.
                return Err(Keep::AlreadyThere);
            } else {
                encode::native(site).ok_or(Keep::NotEncodable)?
            };
            (s, Outcome::Native)
        }
        Choice::Nothing => (Seq::new(), Outcome::Nothing),
        Choice::Inline(t) => {
            if !may_clobber(site, op).contains(t.clobbers) {
                return Err(Keep::Clobbers);
            }
            (
                t.instantiate(site).map_err(|_| Keep::Operand)?,
                Outcome::Inline,
            )
        }
        Choice::Call { target, clobbers } => {
            if !may_clobber(site, op).contains(clobbers) {
                return Err(Keep::Clobbers);
            }
            let rel = (target as i128) - (addr as i128 + 5);
            let rel = i32::try_from(rel).map_err(|_| Keep::NoRoom)?;
            let mut s = Seq::new();
            s.push(&[0xe8]).ok_or(Keep::NoRoom)?;
            s.push(&rel.to_le_bytes()).ok_or(Keep::NoRoom)?;
            (s, Outcome::Call)
        }
        Choice::Trap => {
            if op.info().kind == Kind::ControlTransfer
                || !crate::trap::supported(op, site.operand, site.width)
            {
                return Err(Keep::NotRewritable);
            }
            // `ud2` (a fault, delivered by every hypervisor) where it fits, else `int3`.
            let t: &[u8] = if len >= 2 { &UD2 } else { &[0xcc] };
            (Seq::from_slice(t).ok_or(Keep::NoRoom)?, Outcome::Trap)
        }
    };
    if seq.len() > len {
        return Err(Keep::NoRoom);
    }
    seq.pad_to(len).ok_or(Keep::NoRoom)?;
    Ok((seq, outcome))
}

/// Checks that the bytes built for a site decode as intended.
fn verify_sequence(
    site: &Site,
    choice: Choice<'_>,
    bytes: &[u8],
    addr: u64,
) -> Result<(), Mismatch> {
    let body = match choice {
        Choice::Native => {
            if site.form == Form::Native || site.form == Form::Detour {
                return check::original(bytes, addr, site);
            }
            // Encoded from the record: its own length, not the call's the record describes.
            let len = encode::native(site).map_or(0, |s| s.len());
            check::native_insn(
                bytes,
                addr,
                &Site {
                    insn_len: len as u8,
                    ..*site
                },
            )?;
            len
        }
        Choice::Nothing => 0,
        Choice::Inline(t) => {
            // Every instruction of the template decodes and ends exactly at its end.
            let mut at = 0;
            while at < t.bytes.len() {
                at += decode_at(bytes, addr, at)?.len();
            }
            if at != t.bytes.len() {
                return Err(Mismatch::Undecodable(addr + at as u64));
            }
            at
        }
        Choice::Call { target, .. } => {
            let i = decode_at(bytes, addr, 0)?;
            if i.mnemonic() != Mnemonic::Call || i.near_branch_target() != target || i.len() != 5 {
                return Err(Mismatch::NotIndirectCall);
            }
            5
        }
        Choice::Trap => {
            if bytes.starts_with(&UD2) {
                2
            } else if bytes.first() == Some(&0xcc) {
                1
            } else {
                return Err(Mismatch::NotTrap);
            }
        }
    };
    check::nops(bytes, addr, body)
}

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
