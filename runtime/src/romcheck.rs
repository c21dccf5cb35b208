//! Validating a backend ROM completely before anything of it is used.
//!
//! `patch_sites::Rom::parse` has checked the structure and the checksum. This module applies
//! the ISA crate's sequence checks ([`pvpatch_isa::sequence`]) to every template and entry
//! point, decoded with iced-x86, and refuses the ROM if any instruction does not decode, a
//! template or entry point leaves itself (a branch outside its own bytes, an indirect branch,
//! a return from an inline template), an instruction is one its op does not allow (any
//! hypervisor call, any other sensitive or system instruction), or a sequence, with a site's
//! operand put in, acts on another operand or changes more than the site allows. A ROM is used
//! whole or not at all. Room is not the ROM's business: a site too small for its op's sequence
//! (a one-byte `cli` of a stock kernel without a detour) stays native, as the planner decides.

use core::fmt;

use alloc::vec::Vec;
use patch_sites::Op;
use patch_sites::op::Kind;
use patch_sites::rom::{Rom, RomAction, RomEntry};
use patch_sites::table::{Site, SiteTable};
pub use pvpatch_isa::sequence::CodeProblem;
use pvpatch_isa::sequence::{self, BadInsn, check_code, effects, may_change};
use pvpatch_isa::template::{SubstError, Template};

/// Why a ROM is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomRefusal {
    /// It serves another hypervisor.
    WrongSignature,
    /// An entry names a hypervisor interface or a control transfer.
    OpNotPatchable(Op),
    /// A template or entry point has a bad instruction.
    Code {
        /// The entry's op.
        op: Op,
        /// Offset in the template or entry point.
        offset: u32,
        /// What is wrong.
        problem: CodeProblem,
    },
    /// After substitution, the template's own instruction has another operand or width than
    /// the site's.
    WrongOperand {
        /// The op.
        op: Op,
        /// The site.
        addr: u64,
    },
    /// The site's operand cannot be put into a template.
    Operand {
        /// The op.
        op: Op,
        /// The site.
        addr: u64,
        /// Why.
        error: SubstError,
    },
}

impl fmt::Display for RomRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RomRefusal::WrongSignature => f.write_str("the ROM serves another hypervisor"),
            RomRefusal::OpNotPatchable(op) => write!(
                f,
                "the ROM has an entry for {op}, which may not be rewritten"
            ),
            RomRefusal::Code {
                op,
                offset,
                problem,
            } => {
                write!(f, "the {op} code: the instruction at +{offset} {problem}")
            }
            RomRefusal::WrongOperand { op, addr } => write!(
                f,
                "the {op} template, for the site at {addr:#x}, acts on another operand or width"
            ),
            RomRefusal::Operand { op, addr, error } => {
                write!(f, "the {op} template for the site at {addr:#x}: {error}")
            }
        }
    }
}

/// A refusal of `op`'s code for one bad instruction.
fn code(op: Op) -> impl Fn(BadInsn) -> RomRefusal {
    move |b| RomRefusal::Code {
        op,
        offset: b.offset,
        problem: b.problem,
    }
}

/// The op's own instruction in the sequence must act on the site's operand and width.
fn same_operands(op: Op, site: &patch_sites::table::Site, code: &[u8]) -> Result<(), RomRefusal> {
    if sequence::same_operands(op, site, code) {
        Ok(())
    } else {
        Err(RomRefusal::WrongOperand {
            op,
            addr: site.addr,
        })
    }
}

/// Checks one entry on its own, without a kernel: its op may be rewritten, and its template
/// or entry point passes the sequence checks. An entry for an op this runtime does not know
/// passes (it is ignored, as the format says). [`validate_code`] applies this to every entry;
/// `pvpatch rom show` reports it per entry.
pub fn validate_entry(e: &RomEntry<'_>) -> Result<(), RomRefusal> {
    let Some(op) = e.op() else { return Ok(()) };
    if op.info().kind != Kind::Instruction && op.info().kind != Kind::Idiom {
        return Err(RomRefusal::OpNotPatchable(op));
    }
    match e.action {
        RomAction::Inline { template, .. } => check_code(op, template, false).map_err(code(op)),
        RomAction::Call { code: c, .. } => check_code(op, c, true).map_err(code(op)),
        RomAction::Nothing | RomAction::Native => Ok(()),
    }
}

/// Checks every template and entry point of `rom` on its own (what `pvpatch rom build` can
/// check without a kernel): [`validate_entry`] for each entry.
pub fn validate_code(rom: &Rom<'_>) -> Result<(), RomRefusal> {
    rom.entries().try_for_each(|e| validate_entry(&e))
}

/// The first site of each distinct op, operand and width of `table`, in table order. A ROM's
/// checks of a site depend on nothing else of it (the template's substitution, the operands its
/// own instruction must act on, what it may change), so checking these is checking every site,
/// and the first site that fails is the one the table order would have found: at boot, where
/// every instruction may be emulated, the sequences are decoded once per kind of site instead
/// of once per site, and the table is walked once instead of once per ROM entry.
fn site_kinds(table: &SiteTable<'_>) -> Vec<Site> {
    // The keys seen, sorted (a few hundred at most: one per port, register and op).
    let mut seen: Vec<u64> = Vec::new();
    let mut kinds = Vec::new();
    for s in table.sites().filter(|s| s.op().is_some()) {
        // The record's own fields name the operand exactly (its ABI encoding).
        let o = s.operand;
        let key = u64::from(s.op_id) << 48
            | u64::from(s.width) << 40
            | u64::from(o.code()) << 32
            | u64::from(o.reg_byte()) << 24
            | u64::from(o.reg2_byte()) << 16
            | u64::from(o.port_field());
        if let Err(at) = seen.binary_search(&key) {
            seen.insert(at, key);
            kinds.push(s);
        }
    }
    kinds
}

/// Validates `rom` for this kernel (`table`) on a hypervisor with CPUID signature `signature`.
pub fn validate(
    rom: &Rom<'_>,
    signature: &[u8; 12],
    table: &SiteTable<'_>,
) -> Result<(), RomRefusal> {
    if !rom.serves(signature) {
        return Err(RomRefusal::WrongSignature);
    }
    validate_code(rom)?;
    let kinds = site_kinds(table);
    for e in rom.entries() {
        let Some(op) = e.op() else { continue };
        for site in kinds.iter().filter(|s| s.op() == Some(op)) {
            match e.action {
                RomAction::Inline { template, slots } => {
                    let t = Template {
                        bytes: template,
                        slots,
                        clobbers: e.clobbers,
                    };
                    let seq = t.instantiate(site).map_err(|error| RomRefusal::Operand {
                        op,
                        addr: site.addr,
                        error,
                    })?;
                    check_code(op, seq.as_slice(), false).map_err(code(op))?;
                    same_operands(op, site, seq.as_slice())?;
                    effects(
                        op,
                        site,
                        seq.as_slice(),
                        may_change(op, site.operand, e.clobbers),
                        false,
                    )
                    .map_err(code(op))?;
                }
                RomAction::Call { code: c, .. } => {
                    // The entry point runs with the site's registers: its own instruction must
                    // use the site's operand, and it may change only what the site allows.
                    same_operands(op, site, c)?;
                    effects(op, site, c, may_change(op, site.operand, e.clobbers), true)
                        .map_err(code(op))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}
