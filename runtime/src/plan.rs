//! Planning: the patcher proper, shaped like Linux's `apply_alternatives` with the checks it
//! lacks. Nothing is written here ([`crate::apply`] writes a plan).
//!
//! 1. **Validate** (before anything is written): the table has been parsed and checked (inside
//!    the kernel's text, no overlap, lengths, operand forms); now every site's current bytes
//!    must hold what its record says. One record that does not match refuses the whole table.
//! 2. **Plan** every site in a buffer: the backend's choice, its operands substituted, padded
//!    with recommended NOPs, and checked by decoding it back.
//!
//! One pass per site: its bytes are read once, its native instruction encoded once (the check
//! of the original bytes, the native rewrite and the fallback all use that encoding), and what
//! is built is decoded once.

use alloc::vec::Vec;
use core::fmt;

use patch_sites::op::Kind;
use patch_sites::table::{Form, Site, SiteTable};
use patch_sites::{Op, Outcome, RegSet};
use pvpatch_isa::check::{self, Mismatch};
use pvpatch_isa::encode::{self, Seq};
use pvpatch_isa::sequence::may_change;

use crate::backend::{Backend, Choice};

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
        sites.push(plan_site(i as u32, site, backend, text, force)?);
    }
    Ok(Plan { sites })
}

/// Plans one site.
fn plan_site(
    index: u32,
    site: Site,
    backend: &Backend<'_>,
    text: &dyn TextRead,
    force: Option<Override<'_, '_>>,
) -> Result<Planned, PlanError> {
    let addr = site.patch_addr();
    let len = site.site_len as usize;
    let mut old = Seq::new();
    old.pad_to(len)
        .ok_or(PlanError::Unreadable { index, addr })?;
    if !text.read(addr, old.as_mut_slice()) {
        return Err(PlanError::Unreadable { index, addr });
    }
    let planned = |new: Seq, outcome, keep| Planned {
        index,
        site,
        addr,
        old,
        new,
        outcome,
        keep,
    };
    let keep = |k| planned(old, Outcome::Unchanged, Some(k));
    let Some(op) = site.op() else {
        return Ok(keep(Keep::UnknownOp));
    };
    let native = encode::native(&site);
    check::original_encoded(
        old.as_slice(),
        addr,
        &site,
        native.as_ref().map(Seq::as_slice),
    )
    .map_err(|mismatch| PlanError::Mismatch {
        index,
        addr,
        mismatch,
    })?;
    if !matches!(op.info().kind, Kind::Instruction | Kind::Idiom) {
        return Ok(keep(Keep::NotRewritable));
    }
    let choice = force
        .and_then(|f| f(index, &site))
        .unwrap_or_else(|| backend.choose(&site, op));
    let must_rewrite = PlanError::MustRewrite { index, addr, op };
    let native_in_place = matches!(site.form, Form::Native | Form::Detour);
    if choice == Choice::Native {
        if backend.must_rewrite(op) {
            return Err(must_rewrite);
        }
        if native_in_place {
            // The common case: the native instruction is there and stays.
            return Ok(keep(Keep::AlreadyThere));
        }
    }
    let bad = |mismatch| PlanError::BadSequence {
        index,
        addr,
        mismatch,
    };
    match build(&site, op, choice, addr, len, native.as_ref()) {
        Ok((new, _)) if new == old => Ok(keep(Keep::AlreadyThere)),
        Ok((new, outcome)) => Ok(planned(new, outcome, None)),
        Err(Built::Bad(m)) => Err(bad(m)),
        // The backend's choice cannot be used here: fall back to the native instruction,
        // which every backend allows but for the ops it must rewrite.
        Err(Built::Keep(_)) if backend.must_rewrite(op) => Err(must_rewrite),
        Err(Built::Keep(k)) if native_in_place => Ok(keep(k)),
        Err(Built::Keep(k)) => match build(&site, op, Choice::Native, addr, len, native.as_ref()) {
            Ok((new, outcome)) if new != old => Ok(planned(new, outcome, Some(k))),
            Ok(_) | Err(Built::Keep(_)) => Ok(keep(k)),
            Err(Built::Bad(m)) => Err(bad(m)),
        },
    }
}

/// Why [`build`] built nothing.
enum Built {
    /// The choice cannot be used at this site.
    Keep(Keep),
    /// What was built does not decode as intended (a bug, caught).
    Bad(Mismatch),
}

/// The bytes for `choice` at a site, padded to its room and checked by decoding them back.
/// `native` is the record's native encoding.
fn build(
    site: &Site,
    op: Op,
    choice: Choice<'_>,
    addr: u64,
    len: usize,
    native: Option<&Seq>,
) -> Result<(Seq, Outcome), Built> {
    let may = may_change(op, site.operand, site.clobbers);
    let allowed = |clobbers: RegSet| {
        if may.contains(clobbers) {
            Ok(())
        } else {
            Err(Built::Keep(Keep::Clobbers))
        }
    };
    let (mut seq, outcome) = match choice {
        Choice::Native => (
            *native.ok_or(Built::Keep(Keep::NotEncodable))?,
            Outcome::Native,
        ),
        Choice::Nothing => (Seq::new(), Outcome::Nothing),
        Choice::Inline(t) => {
            allowed(t.clobbers)?;
            let s = t
                .instantiate(site)
                .map_err(|_| Built::Keep(Keep::Operand))?;
            (s, Outcome::Inline)
        }
        Choice::Call { target, clobbers } => {
            allowed(clobbers)?;
            let mut a = pvpatch_isa::asm::Asm::new(addr, Seq::new());
            a.call(target).map_err(|_| Built::Keep(Keep::NoRoom))?;
            (a.out, Outcome::Call)
        }
        Choice::Trap => {
            if !crate::trap::supported(op, site.operand, site.width) {
                return Err(Built::Keep(Keep::NotRewritable));
            }
            // `ud2` (a fault, delivered by every hypervisor) where it fits, else `int3`.
            let t: &[u8] = if len >= 2 { &UD2 } else { &[0xcc] };
            (
                Seq::from_slice(t).ok_or(Built::Keep(Keep::NoRoom))?,
                Outcome::Trap,
            )
        }
    };
    let body = seq.len();
    if body > len {
        return Err(Built::Keep(Keep::NoRoom));
    }
    seq.pad_to(len).ok_or(Built::Keep(Keep::NoRoom))?;
    let bytes = seq.as_slice();
    match choice {
        // Encoded from the record: its own length, not the call's the record describes.
        Choice::Native => check::native_insn(
            bytes,
            addr,
            &Site {
                insn_len: body as u8,
                ..*site
            },
        ),
        Choice::Nothing => Ok(()),
        Choice::Inline(_) => check::decodes_exactly(bytes, addr, body),
        Choice::Call { target, .. } => check::call_to(bytes, addr, target).map(|_| ()),
        Choice::Trap => Ok(()),
    }
    .and_then(|()| check::nops(bytes, addr, body))
    .map_err(Built::Bad)?;
    Ok((seq, outcome))
}
