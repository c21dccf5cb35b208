//! From the sweep and Linux's tables to per-site facts: what covers each site, and how much room
//! it offers a rewrite.
//!
//! *Room* is what a later rewrite may use:
//! * **in place**: the instruction's own bytes, plus any NOP padding that follows it, as long as
//!   nothing can jump into that padding (no direct branch targets it, no table names it as an
//!   instruction start, no symbol starts there);
//! * **detour**: the instruction plus the instructions after it that could be moved into a stub
//!   (at least 5 bytes, for a `jmp rel32`), where none of the moved instructions is a branch
//!   target, a table entry (ORC, exception table, alternatives, ...), a symbol, control flow, or
//!   sensitive itself;
//! * **trap**: a one-byte `int3` the runtime emulates, always possible where the bytes are not
//!   Linux's.
//!
//! A site covered by one of Linux's patch tables has no room at all: its bytes are never changed
//! behind Linux's back.

pub mod detour;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};
use patch_sites::op::Kind;
use patch_sites::{Op, Outcome};

use crate::linux::{LinuxTables, Protected, TableKind};
use crate::load::image::Image;
use crate::sweep::{Found, Sweep};

/// The room a site offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    /// Bytes patchable in place (0 when the site must not be touched).
    pub in_place: u8,
    /// Bytes a detour would take (instruction plus moved instructions), if one is possible.
    pub detour: Option<u8>,
    /// What the site may become (never [`Outcome::Unchanged`], which every site allows).
    pub forms: Vec<Outcome>,
    /// Why the site allows nothing, or why it allows no detour.
    pub reason: Option<String>,
}

/// A sensitive instruction with everything known about it.
#[derive(Clone, Debug)]
pub struct SiteInfo {
    /// What the sweep found.
    pub found: Found,
    /// The Linux table entry that covers it, if any.
    pub covered_by: Option<Protected>,
    /// Its room.
    pub room: Room,
}

impl SiteInfo {
    /// Whether pvpatch may record it for rewriting.
    pub fn patchable(&self) -> bool {
        !self.room.forms.is_empty()
    }
}

/// Everything known about the sites of one image.
#[derive(Clone, Debug)]
pub struct Analysis {
    /// Per site, in address order.
    pub sites: Vec<SiteInfo>,
}

/// A sorted list of addresses with a membership test.
struct Starts<'a> {
    symbols: &'a [crate::load::image::Symbol],
    tables: &'a LinuxTables,
}

impl Starts<'_> {
    /// Whether something other than the sweep says an instruction starts at `a` (and so may be
    /// jumped to, or is named by a table).
    fn named(&self, a: u64) -> bool {
        self.tables.is_start(a) || self.symbols.binary_search_by_key(&a, |s| s.addr).is_ok()
    }
}

fn decode_at(image: &Image, addr: u64) -> Option<Instruction> {
    let bytes = image.read(addr, 15).or_else(|| {
        let s = image.section_at(addr)?;
        image.read(addr, (s.addr + s.size - addr) as usize)
    })?;
    let mut d = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    let i = d.decode();
    (!i.is_invalid()).then_some(i)
}

fn is_nop(i: &Instruction) -> bool {
    i.mnemonic() == Mnemonic::Nop
}

/// The op a site is recorded as: its class, except that `out 0x80, al` (port 0x80 is the POST
/// port, written only as a delay) is the `io_delay` op, which backends may turn into nothing.
pub fn recorded_op(f: &Found) -> Op {
    if f.op() == Op::Out && f.operand() == patch_sites::Operand::PortImm(0x80) && f.class.width == 1
    {
        Op::IoDelay
    } else {
        f.op()
    }
}

/// Analyses every site the sweep found.
pub fn analyse(image: &Image, tables: &LinuxTables, sweep: &Sweep) -> Analysis {
    let starts = Starts {
        symbols: &image.symbols,
        tables,
    };
    let sites = sweep
        .found
        .iter()
        .map(|f| {
            let covered_by = covering(tables, f);
            let room = room(image, tables, sweep, &starts, f, covered_by.as_ref());
            SiteInfo {
                found: *f,
                covered_by,
                room,
            }
        })
        .collect();
    Analysis { sites }
}

/// The most relevant table entry overlapping the instruction: one Linux patches, else one
/// that refers to it.
fn covering(tables: &LinuxTables, f: &Found) -> Option<Protected> {
    let mut best: Option<Protected> = None;
    for p in tables.covering(f.addr, f.len as u64) {
        match best {
            Some(b) if b.table.patches() || !p.table.patches() => {}
            _ => best = Some(*p),
        }
    }
    best
}

fn nothing(reason: String) -> Room {
    Room {
        in_place: 0,
        detour: None,
        forms: Vec::new(),
        reason: Some(reason),
    }
}

fn room(
    image: &Image,
    tables: &LinuxTables,
    sweep: &Sweep,
    starts: &Starts<'_>,
    f: &Found,
    covered_by: Option<&Protected>,
) -> Room {
    let op = f.op();
    if op.info().kind == Kind::HypervisorInterface {
        return nothing("hypervisor interface: reported, never rewritten".into());
    }
    if let Some(p) = covered_by {
        return nothing(if p.table == TableKind::ExTable {
            format!(
                "may fault and has a fixup ({} entry {}): its address must not change",
                p.table, p.entry
            )
        } else {
            format!(
                "covered by {} entry {}: Linux patches these bytes itself",
                p.table, p.entry
            )
        });
    }
    // In place: the instruction, then NOP padding nothing jumps into.
    let mut in_place = f.len as u64;
    let mut at = f.addr + f.len as u64;
    while in_place < 255 {
        if starts.named(at) || sweep.is_branch_target(at) || tables.covering(at, 1).next().is_some()
        {
            break;
        }
        match decode_at(image, at) {
            Some(i) if is_nop(&i) && in_place + i.len() as u64 <= 255 => {
                in_place += i.len() as u64;
                at += i.len() as u64;
            }
            _ => break,
        }
    }
    let control = op.info().kind == Kind::ControlTransfer;
    let mut forms = vec![Outcome::Inline];
    if in_place >= 5 {
        forms.push(if control {
            Outcome::Jump
        } else {
            Outcome::Call
        });
    }
    let (detour, reason) = if in_place >= 5 {
        (None, None)
    } else {
        match detour_room(image, tables, sweep, starts, f) {
            Ok(n) => (Some(n), None),
            Err(why) => (None, Some(format!("no detour: {why}"))),
        }
    };
    if detour.is_some() && !control {
        forms.push(Outcome::Detour);
    }
    forms.push(Outcome::Trap);
    Room {
        in_place: in_place as u8,
        detour,
        forms,
        reason,
    }
}

/// The bytes of the instruction and of the instructions that could be moved after it, if they
/// reach the 5 a `jmp rel32` needs.
fn detour_room(
    image: &Image,
    tables: &LinuxTables,
    sweep: &Sweep,
    starts: &Starts<'_>,
    f: &Found,
) -> Result<u8, String> {
    if matches!(f.op(), Op::Pushf | Op::Popf) {
        // Relocating code around a stack adjustment would need ORC for the stub.
        return Err("the instruction changes the stack".into());
    }
    let section = image.section_at(f.addr).ok_or("site outside any section")?;
    let mut total = f.len as u64;
    let mut at = f.addr + f.len as u64;
    while total < 5 {
        if !section.contains(at) {
            return Err("the section ends".into());
        }
        if starts.named(at) {
            return Err(format!(
                "{at:#x} is named as an instruction start (symbol or table)"
            ));
        }
        if sweep.is_branch_target(at) {
            return Err(format!("{at:#x} is a branch target"));
        }
        if let Some(p) = tables.covering(at, 1).next() {
            return Err(format!(
                "{at:#x} is covered by {} entry {}",
                p.table, p.entry
            ));
        }
        let i = decode_at(image, at).ok_or_else(|| format!("{at:#x} does not decode"))?;
        if i.flow_control() != FlowControl::Next {
            return Err(format!("{at:#x} is control flow"));
        }
        if pvpatch_isa::classify::classify(&i).is_some() {
            return Err(format!("{at:#x} is sensitive itself"));
        }
        total += i.len() as u64;
        at += i.len() as u64;
    }
    Ok(total as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{Options, sweep};
    use crate::testing::{TEXT, elf_with_code};

    fn analysed(code: &[u8], symbols: &[(&str, u64, u64)]) -> Analysis {
        let img = elf_with_code(code, symbols);
        let t = crate::linux::read(&img);
        let known: Vec<u64> = img.symbols.iter().map(|s| s.addr).collect();
        let s = sweep(&img, &known, Options { threads: 1 }, None);
        super::analyse(&img, &t, &s)
    }

    #[test]
    fn padding_counts_as_room() {
        // cli; nop4; ret -> 5 bytes in place
        let a = analysed(&[0xfa, 0x0f, 0x1f, 0x40, 0x00, 0xc3], &[]);
        assert_eq!(a.sites[0].room.in_place, 5);
        assert_eq!(
            a.sites[0].room.forms,
            [Outcome::Inline, Outcome::Call, Outcome::Trap]
        );
    }

    #[test]
    fn padding_that_is_jumped_into_is_not_room() {
        // cli; nop; nop; nop; nop; ret; jmp -6 (to the 2nd nop)
        let code = [0xfa, 0x90, 0x90, 0x90, 0x90, 0xc3, 0xeb, 0xf9];
        let a = analysed(&code, &[]);
        assert_eq!(a.sites[0].room.in_place, 1);
    }

    #[test]
    fn detour_over_movable_instructions() {
        // sti; mov rax, rbx; add rax, 1; ret
        let code = [0xfb, 0x48, 0x89, 0xd8, 0x48, 0x83, 0xc0, 0x01, 0xc3];
        let a = analysed(&code, &[]);
        let r = &a.sites[0].room;
        assert_eq!(r.in_place, 1);
        assert_eq!(r.detour, Some(8));
        assert!(r.forms.contains(&Outcome::Detour));
    }

    #[test]
    fn no_detour_across_a_symbol_or_control_flow() {
        let code = [0xfb, 0xc3, 0x90, 0x90, 0x90, 0x90];
        let a = analysed(&code, &[]);
        assert!(
            a.sites[0]
                .room
                .reason
                .as_deref()
                .unwrap()
                .contains("control flow")
        );
        let code = [0xfb, 0x48, 0x89, 0xd8, 0x48, 0x83, 0xc0, 0x01, 0xc3];
        let a = analysed(&code, &[("f", 0, 1), ("g", 1, 8)]);
        let r = &a.sites[0].room;
        assert_eq!(r.detour, None);
        assert!(
            r.reason.as_deref().unwrap().contains("instruction start"),
            "{r:?}"
        );
        assert_eq!(TEXT + 1, a.sites[0].found.addr + 1);
    }

    #[test]
    fn hypervisor_interfaces_have_no_room() {
        let a = analysed(&[0x0f, 0x01, 0xc1, 0xc3], &[]);
        assert!(a.sites[0].room.forms.is_empty());
        assert!(!a.sites[0].patchable());
    }
}
