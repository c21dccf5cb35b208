//! The out-of-line test backend: for every shape of site a table has (op, operand, width,
//! flags), a thunk that runs the native instruction and returns, so that every rewritable site
//! becomes a call out of line (in place where it has 5 bytes, else through its detour). It
//! changes nothing a site can observe but where the instruction runs: it is how the tests prove
//! that calls, detours and stubs are right on real kernels, with the native instruction's own
//! semantics as the reference.
//!
//! A thunk is the instruction followed by `ret`, except for the ops that work on the stack:
//! `pushf` leaves the flags image where the caller's `pushf` would have (in the slot of the
//! return address, returning through a copy of it), and `popf` takes the image from above the
//! return address. Ops with a 2-byte stack operand (`pushfw`, `popfw`) get no thunk, nor do
//! instructions that name the stack pointer as a register (a call moves it).
//!
//! A site whose memory operand the record cannot describe (`lgdt [rip+d]`, `sgdt [rsp+6]`)
//! gets a thunk of its own: its instruction, read from the text, re-encoded to reach the same
//! memory from the thunk ([`encode::called`]: a RIP-relative target kept, an `rsp`-based
//! operand 8 bytes further, past the return address).

use alloc::vec::Vec;

use patch_sites::table::{SITE_FLAG_REP, Site, SiteTable};
use patch_sites::{Op, Operand};
use pvpatch_isa::asm::{Asm, AsmError, POPFQ, PUSHFQ, RET};
use pvpatch_isa::encode;

use crate::plan::TextRead;

/// A site's shape: what a thunk for it must execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// The op.
    pub op: Op,
    /// Its operand.
    pub operand: Operand,
    /// Its width.
    pub width: u8,
    /// `rep` (ins/outs).
    pub rep: bool,
}

impl Shape {
    /// The shape of `site`, if its op is known.
    pub fn of(site: &Site) -> Option<Shape> {
        Some(Shape {
            op: site.op()?,
            operand: site.operand,
            width: site.width,
            rep: site.flags & SITE_FLAG_REP != 0,
        })
    }
}

/// Generated thunks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Thunks {
    /// Where `code` runs.
    pub base: u64,
    /// The code.
    pub code: Vec<u8>,
    entries: Vec<(Key, u32)>,
}

/// What a thunk is for: every site of one shape, or one site (by address) whose instruction
/// it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Shape(Shape),
    Site(u64),
}

impl Thunks {
    /// The thunk for `site`, if there is one.
    pub fn entry(&self, site: &Site) -> Option<u64> {
        let key = if own_thunk(site.operand) {
            Key::Site(site.addr)
        } else {
            Key::Shape(Shape::of(site)?)
        };
        self.entries
            .iter()
            .find(|(e, _)| *e == key)
            .map(|(_, off)| self.base + *off as u64)
    }
}

/// Whether a site needs a thunk of its own, made from its instruction's bytes: its memory
/// operand is not one the record describes, or it is based on the stack pointer.
fn own_thunk(o: Operand) -> bool {
    let rsp = patch_sites::Gpr::Rsp;
    match o {
        Operand::MemOther => true,
        Operand::MemBase(b) | Operand::RegMemBase { base: b, .. } => b == rsp,
        _ => false,
    }
}

/// Whether an operand names the stack pointer (as a register or a memory base).
fn uses_rsp(o: Operand) -> bool {
    let rsp = patch_sites::Gpr::Rsp;
    match o {
        Operand::Reg(r) | Operand::MemBase(r) => r == rsp,
        Operand::DebugReg { reg, .. } => reg == rsp,
        Operand::RegMemBase { reg, base } => reg == rsp || base == rsp,
        _ => false,
    }
}

/// One thunk for `shape`, if its op can run out of line.
fn thunk(a: &mut Asm<Vec<u8>>, shape: Shape) -> Result<bool, AsmError> {
    match (shape.op, shape.width) {
        // The image goes where the return address was; return through a copy of it.
        (Op::Pushf, 8) => {
            a.raw(&[0xff, 0x34, 0x24, PUSHFQ])?; // push qword [rsp]; pushfq
            a.push(0)?;
            a.raw(&[0x48, 0x8b, 0x44, 0x24, 0x08])?; // mov rax, [rsp + 8]: the image
            a.raw(&[0x48, 0x89, 0x44, 0x24, 0x18])?; // mov [rsp + 24], rax
            a.pop(0)?;
            a.raw(&[POPFQ, RET])?;
            Ok(true)
        }
        // The image is above the return address: swap them, then popfq and return.
        (Op::Popf, 8) => {
            a.push(0)?;
            a.raw(&[0x48, 0x8b, 0x44, 0x24, 0x08])?; // mov rax, [rsp + 8]: the return address
            a.raw(&[0x48, 0x87, 0x44, 0x24, 0x10])?; // xchg rax, [rsp + 16]
            a.raw(&[0x48, 0x89, 0x44, 0x24, 0x08])?; // mov [rsp + 8], rax: the image
            a.pop(0)?;
            a.raw(&[POPFQ, RET])?;
            Ok(true)
        }
        (Op::Pushf | Op::Popf | Op::SaveFl | Op::RestoreFl, _) => Ok(false),
        // Called, the instruction would see the stack pointer 8 bytes lower (found booting
        // Debian 6.12: `lgdt [rsp]` loaded the return address as the GDT base); memory
        // operands on it get thunks of their own.
        _ if uses_rsp(shape.operand) => Ok(false),
        _ => {
            let site = Site {
                addr: 0,
                site_len: 15,
                insn_len: 15,
                op_id: shape.op.id(),
                form: patch_sites::table::Form::Native,
                operand: shape.operand,
                width: shape.width,
                flags: if shape.rep { SITE_FLAG_REP } else { 0 },
                clobbers: patch_sites::RegSet::EMPTY,
                stub: None,
            };
            match encode::native(&site) {
                Some(n) => {
                    a.raw(n.as_slice())?;
                    a.raw(&[RET])?;
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    }
}

/// The thunks for every shape of site in `table` (and every site that needs its own, its
/// instruction read through `text`), to run at `base`.
pub fn generate(table: &SiteTable<'_>, base: u64, text: &dyn TextRead) -> Result<Thunks, AsmError> {
    let mut a = Asm::new(base, Vec::new());
    let mut entries: Vec<(Key, u32)> = Vec::new();
    for site in table.sites() {
        let Some(shape) = Shape::of(&site) else {
            continue;
        };
        let key = if own_thunk(site.operand) && !matches!(shape.op, Op::Pushf | Op::Popf) {
            Key::Site(site.addr)
        } else {
            Key::Shape(shape)
        };
        if entries.iter().any(|(e, _)| *e == key) {
            continue;
        }
        // 16-byte aligned entry points.
        while a.out.len() % 16 != 0 {
            a.raw(&[0xcc])?;
        }
        let at = a.out.len() as u32;
        let made = match key {
            Key::Shape(shape) => thunk(&mut a, shape)?,
            Key::Site(addr) => {
                let mut insn = [0u8; 15];
                let len = (site.insn_len as usize).min(15);
                match text
                    .read(addr, &mut insn[..len])
                    .then(|| encode::called(&insn[..len], addr, a.at()))
                    .flatten()
                {
                    Some(moved) if !moved.is_empty() => {
                        a.raw(moved.as_slice())?;
                        a.raw(&[RET])?;
                        true
                    }
                    _ => false,
                }
            }
        };
        if made {
            entries.push((key, at));
        }
    }
    Ok(Thunks {
        base,
        code: a.out,
        entries,
    })
}
