//! Does a site hold what its record says? Used by the boot-time patcher before it writes (a
//! record that does not match the code refuses the whole table) and on what it is about to
//! write, and by `pvpatch verify` on annotated images.

use core::fmt;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, Register};
use patch_sites::table::{Form, SITE_FLAG_REP, Site};
use patch_sites::{Gpr, Op, Operand};

use crate::classify::{classify, gpr, reg_width};
use crate::encode::{self, Seq};
use crate::names::Name;

/// How a site's bytes differ from its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The bytes at this address do not decode.
    Undecodable(u64),
    /// The instruction is not a sensitive one.
    NotSensitive(Mnemonic),
    /// A different op.
    WrongOp {
        /// What the bytes hold.
        found: Op,
    },
    /// Same op, different operand or width.
    WrongOperand {
        /// What the bytes hold.
        found: Operand,
        /// Its width.
        width: u8,
    },
    /// The `rep` prefix differs.
    WrongRep,
    /// The bytes are not the idiom the op names.
    NotIdiom,
    /// The instruction (or idiom) length differs from the record's.
    WrongLength {
        /// What the bytes hold.
        found: u8,
    },
    /// The padding at this address is not a NOP.
    NotPadding(u64),
    /// Not `call [rip+disp32]` where the record says indirect call.
    NotIndirectCall,
    /// Not `int3`/`ud2` where the record says trap.
    NotTrap,
    /// Not a `call rel32` to this target.
    NotCall(u64),
    /// The record's op is unknown or cannot be checked.
    Unknown,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Undecodable(a) => write!(f, "bytes at {a:#x} do not decode"),
            Mismatch::NotSensitive(m) => {
                write!(f, "holds {}, not a sensitive instruction", Name(*m))
            }
            Mismatch::WrongOp { found } => {
                write!(f, "holds {found} where the record says otherwise")
            }
            Mismatch::WrongOperand { found, width } => {
                write!(f, "operand {found:?} width {width} differs from the record")
            }
            Mismatch::WrongRep => f.write_str("rep prefix differs from the record"),
            Mismatch::NotIdiom => f.write_str("is not the idiom the record names"),
            Mismatch::WrongLength { found } => {
                write!(f, "instruction is {found} bytes, not the record's length")
            }
            Mismatch::NotPadding(a) => write!(f, "padding at {a:#x} is not a NOP"),
            Mismatch::NotIndirectCall => f.write_str("is not a 6-byte call [rip+disp32]"),
            Mismatch::NotTrap => f.write_str("is not int3 or ud2"),
            Mismatch::NotCall(t) => write!(f, "is not a call to {t:#x}"),
            Mismatch::Unknown => f.write_str("the record's op cannot be checked"),
        }
    }
}

/// Decodes one instruction of `bytes` at offset `at` (address `addr + at`).
pub fn decode_at(bytes: &[u8], addr: u64, at: usize) -> Result<Instruction, Mismatch> {
    let here = addr.wrapping_add(at as u64);
    let b = bytes.get(at..).ok_or(Mismatch::Undecodable(here))?;
    let i = Decoder::with_ip(64, b, here, DecoderOptions::NONE).decode();
    if i.is_invalid() {
        Err(Mismatch::Undecodable(here))
    } else {
        Ok(i)
    }
}

pub(crate) fn reg_is(r: Register, want: Gpr) -> bool {
    gpr(r) == Some(want) && reg_width(r) == 8
}

/// Checks that `bytes` (at `addr`) start with the native instruction or idiom `site` records,
/// `site.insn_len` bytes long.
pub fn native_insn(bytes: &[u8], addr: u64, site: &Site) -> Result<(), Mismatch> {
    let op = site.op().ok_or(Mismatch::Unknown)?;
    if site.operand == Operand::MemOther
        && site.flags & SITE_FLAG_REP == 0
        && let Some(found) = mem_other_form(bytes)
    {
        // Certain without the decoder: the op, its memory operand and its length.
        return if found.op != op {
            Err(Mismatch::WrongOp { found: found.op })
        } else if found.width != site.width {
            Err(Mismatch::WrongOperand {
                found: Operand::MemOther,
                width: found.width,
            })
        } else if found.len != site.insn_len as usize {
            Err(Mismatch::WrongLength {
                found: found.len as u8,
            })
        } else {
            Ok(())
        };
    }
    let first = decode_at(bytes, addr, 0)?;
    let len = match op {
        Op::SaveFl | Op::RestoreFl | Op::SafeHalt => {
            let second = decode_at(bytes, addr, first.len())?;
            let ok = match (op, site.operand) {
                (Op::SaveFl, Operand::Reg(r)) => {
                    first.mnemonic() == Mnemonic::Pushfq
                        && second.mnemonic() == Mnemonic::Pop
                        && reg_is(second.op0_register(), r)
                }
                (Op::RestoreFl, Operand::Reg(r)) => {
                    first.mnemonic() == Mnemonic::Push
                        && reg_is(first.op0_register(), r)
                        && second.mnemonic() == Mnemonic::Popfq
                }
                (Op::SafeHalt, _) => {
                    first.mnemonic() == Mnemonic::Sti && second.mnemonic() == Mnemonic::Hlt
                }
                _ => false,
            };
            if !ok {
                return Err(Mismatch::NotIdiom);
            }
            first.len() + second.len()
        }
        _ => {
            let c = classify(&first).ok_or(Mismatch::NotSensitive(first.mnemonic()))?;
            // io_delay is `out 0x80, al`: the instruction classifies as `out`.
            let want = if op == Op::IoDelay { Op::Out } else { op };
            if c.op != want {
                return Err(Mismatch::WrongOp { found: c.op });
            }
            if c.operand != site.operand || c.width != site.width {
                return Err(Mismatch::WrongOperand {
                    found: c.operand,
                    width: c.width,
                });
            }
            if c.rep != (site.flags & SITE_FLAG_REP != 0) {
                return Err(Mismatch::WrongRep);
            }
            first.len()
        }
    };
    if len != site.insn_len as usize {
        return Err(Mismatch::WrongLength { found: len as u8 });
    }
    Ok(())
}

/// Checks that `bytes[from..]` (at `addr`) are NOPs to the end.
pub fn nops(bytes: &[u8], addr: u64, from: usize) -> Result<(), Mismatch> {
    let mut at = from;
    while at < bytes.len() {
        if let Some(n) = recommended_nop(&bytes[at..]) {
            at += n;
            continue;
        }
        let i = decode_at(bytes, addr, at).map_err(|_| Mismatch::NotPadding(addr + at as u64))?;
        if i.mnemonic() != Mnemonic::Nop || at + i.len() > bytes.len() {
            return Err(Mismatch::NotPadding(addr + at as u64));
        }
        at += i.len();
    }
    Ok(())
}

/// Checks that whole NOP instructions at the start of `bytes` (at `addr`) cover at least
/// `need` bytes: dead padding a trampoline may overwrite. The last one may end past `need`; it
/// must still decode within `bytes`.
pub fn nops_cover(bytes: &[u8], addr: u64, need: usize) -> Result<(), Mismatch> {
    let mut at = 0;
    while at < need {
        let i = decode_at(bytes, addr, at).map_err(|_| Mismatch::NotPadding(addr + at as u64))?;
        if i.mnemonic() != Mnemonic::Nop || at + i.len() > bytes.len() {
            return Err(Mismatch::NotPadding(addr + at as u64));
        }
        at += i.len();
    }
    Ok(())
}

/// Whether `bytes` are exactly `native` (the record's native encoding) followed by the
/// recommended NOPs: what the annotation macros emit. Comparing is much cheaper than decoding,
/// and exact: the encoder's output is checked against the decoder by the tests.
fn is_canonical(bytes: &[u8], site: &Site, native: &[u8]) -> bool {
    if native.len() != site.insn_len as usize || !bytes.starts_with(native) {
        return false;
    }
    let mut pad = Seq::new();
    pad.pad_to(bytes.len() - native.len()).is_some() && bytes[native.len()..] == *pad.as_slice()
}

/// Checks that `bytes` (the site's `site_len` bytes, at the site's patch address `addr`) hold
/// what an unpatched site of this form holds.
pub fn original(bytes: &[u8], addr: u64, site: &Site) -> Result<(), Mismatch> {
    original_encoded(
        bytes,
        addr,
        site,
        encode::native(site).as_ref().map(Seq::as_slice),
    )
}

/// [`original`], given the record's native encoding (`None` if it has none), so that a caller
/// that needs it anyway encodes it once.
pub fn original_encoded(
    bytes: &[u8],
    addr: u64,
    site: &Site,
    native: Option<&[u8]>,
) -> Result<(), Mismatch> {
    match site.form {
        Form::Native | Form::Detour | Form::Movable
            if native.is_some_and(|n| is_canonical(bytes, site, n)) =>
        {
            Ok(())
        }
        Form::Native | Form::Detour | Form::Movable => {
            native_insn(bytes, addr, site)?;
            nops(bytes, addr, site.insn_len as usize)
        }
        Form::IndirectCall => {
            let i = decode_at(bytes, addr, 0)?;
            if i.code() != Code::Call_rm64
                || i.memory_base() != Register::RIP
                || i.len() != site.insn_len as usize
            {
                return Err(Mismatch::NotIndirectCall);
            }
            nops(bytes, addr, i.len())
        }
        Form::Trap => {
            let ok = bytes.first() == Some(&0xcc) || bytes.starts_with(&[0x0f, 0x0b]);
            if !ok {
                return Err(Mismatch::NotTrap);
            }
            Ok(())
        }
    }
}

/// Checks that `bytes` start with `call rel32` to `target`; its length.
///
/// In 64-bit mode `e8` with no prefix is `call rel32` and nothing else, 5 bytes long, so this
/// reads the bytes rather than decode them (the decoder agrees: the tests).
pub fn call_to(bytes: &[u8], addr: u64, target: u64) -> Result<usize, Mismatch> {
    match bytes {
        [0xe8, r0, r1, r2, r3, ..]
            if addr
                .wrapping_add(5)
                .wrapping_add(i32::from_le_bytes([*r0, *r1, *r2, *r3]) as i64 as u64)
                == target =>
        {
            Ok(5)
        }
        _ => Err(Mismatch::NotCall(target)),
    }
}

/// The length of the recommended NOP ([`encode::NOPS`]) `bytes` start with, if they do: a NOP
/// recognised by comparison, which at boot (where every instruction may be emulated, and the
/// decoder's first use builds its tables) is far cheaper than decoding it.
pub fn recommended_nop(bytes: &[u8]) -> Option<usize> {
    encode::NOPS
        .iter()
        .skip(1)
        .rev()
        .find(|n| bytes.starts_with(n))
        .map(|n| n.len())
}

/// What [`mem_other_form`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOtherForm {
    /// The op.
    pub op: Op,
    /// Its operand width, as [`classify`] gives it.
    pub width: u8,
    /// The instruction's length.
    pub len: usize,
}

/// The descriptor-table and system-segment ops whose memory form the encoder cannot produce
/// (`sgdt [rsp+6]`, `lgdt [rip+x]`, ...), recognised without the decoder when that is certain:
/// an optional REX prefix with neither W nor R, `0f 01` or `0f 00`, a ModRM byte with a memory
/// operand, and addressing that is not base-only (an index, a non-zero displacement, RIP-relative
/// or absolute), which is what makes the ABI's operand `MemOther`. Anything else (other prefixes,
/// base-only addressing, other opcodes) is `None`: the caller decodes.
pub fn mem_other_form(bytes: &[u8]) -> Option<MemOtherForm> {
    let (rex, rest) = match bytes.split_first()? {
        (&b, rest) if (0x40..=0x4f).contains(&b) => (b, rest),
        _ => (0, bytes),
    };
    if rex & 0b1100 != 0 {
        return None;
    }
    let [0x0f, group, modrm, tail @ ..] = rest else {
        return None;
    };
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    let (op, width) = match (group, reg) {
        (0x01, 0) => (Op::Sgdt, 0),
        (0x01, 1) => (Op::Sidt, 0),
        (0x01, 2) => (Op::Lgdt, 0),
        (0x01, 3) => (Op::Lidt, 0),
        (0x01, 4) => (Op::Smsw, 2),
        (0x01, 7) => (Op::Invlpg, 0),
        (0x00, 0) => (Op::Sldt, 2),
        (0x00, 1) => (Op::Str, 2),
        (0x00, 2) => (Op::Lldt, 2),
        (0x00, 3) => (Op::Ltr, 2),
        _ => return None,
    };
    if md == 3 {
        return None;
    }
    let head = bytes.len() - tail.len();
    // (index present, base present, SIB bytes, displacement bytes)
    let (index, base, sib, disp) = if rm == 4 {
        let s = *tail.first()?;
        let (idx, b) = ((s >> 3) & 7 | (rex & 0b10) << 2, s & 7);
        let no_base = md == 0 && b == 5;
        let disp = match md {
            0 if no_base => 4,
            0 => 0,
            1 => 1,
            _ => 4,
        };
        (idx != 4, !no_base, 1, disp)
    } else {
        match md {
            // RIP-relative: not base-only.
            0 if rm == 5 => (false, false, 0, 4),
            0 => (false, true, 0, 0),
            1 => (false, true, 0, 1),
            _ => (false, true, 0, 4),
        }
    };
    let len = head + sib + disp;
    let d = bytes.get(head + sib..len)?;
    let nonzero_disp = d.iter().any(|&b| b != 0);
    if !index && base && !nonzero_disp {
        // Base-only: the encoder's `MemBase`, not this form.
        return None;
    }
    Some(MemOtherForm { op, width, len })
}

/// Checks that `bytes` start with whole instructions that end exactly at `len`.
pub fn decodes_exactly(bytes: &[u8], addr: u64, len: usize) -> Result<(), Mismatch> {
    let mut at = 0;
    while at < len {
        at += decode_at(bytes, addr, at)?.len();
    }
    if at != len {
        return Err(Mismatch::Undecodable(addr + at as u64));
    }
    Ok(())
}

/// A site's patchable copy in a stub: where the site is in the moved range, its
/// instruction's length, where its copy is in the stub, the copy's room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StubCopy {
    /// Offset of the site in the moved range.
    pub site_off: usize,
    /// Its instruction's length.
    pub insn_len: usize,
    /// Offset of its copy in the stub.
    pub copy_off: usize,
    /// The copy's room.
    pub copy_len: usize,
}

/// Checks that `stub` (at `stub_addr`) does what the moved range `moved` (at `moved_addr`) did,
/// decoding both independently of whatever built the stub: every moved instruction in order,
/// each the same instruction with the same absolute branch target and memory operand (a
/// branch to a moved instruction follows it into the stub; a short branch may have been
/// widened); each site's copy where `copies` says (its original bytes, or the same instruction
/// where it is RIP-relative), NOP-padded to its room; then `jmp` back to the end of the moved
/// range, and nothing else. A direct `call` may only be the last moved instruction, and must
/// be `push` of its original return address (the end of the range) then `jmp` to its target.
pub fn stub(
    moved: &[u8],
    moved_addr: u64,
    stub: &[u8],
    stub_addr: u64,
    copies: &[StubCopy],
) -> Result<(), Mismatch> {
    let end = moved_addr.wrapping_add(moved.len() as u64);
    // The moved instructions, and where each must be in the stub.
    let mut orig: alloc::vec::Vec<(Instruction, Option<StubCopy>)> = alloc::vec::Vec::new();
    let mut at = 0;
    while at < moved.len() {
        let i = decode_at(moved, moved_addr, at)?;
        // A site is copied whole: an idiom (`pushfq; pop`) is one site of several instructions.
        let copy = copies.iter().find(|c| c.site_off == at).copied();
        if let Some(c) = copy
            && (c.insn_len < i.len() || at + c.insn_len > moved.len())
        {
            return Err(Mismatch::WrongLength {
                found: i.len() as u8,
            });
        }
        orig.push((i, copy));
        at += copy.map_or(i.len(), |c| c.insn_len);
    }
    if at != moved.len() || orig.iter().filter(|o| o.1.is_some()).count() != copies.len() {
        return Err(Mismatch::Undecodable(moved_addr + at as u64));
    }
    // Where each moved instruction is in the stub: walk the stub once.
    let mut placed: alloc::vec::Vec<u64> = alloc::vec::Vec::with_capacity(orig.len());
    let mut s = 0usize;
    for (i, copy) in &orig {
        placed.push(stub_addr + s as u64);
        match copy {
            Some(c) => {
                if s != c.copy_off {
                    return Err(Mismatch::NotPadding(stub_addr + s as u64));
                }
                s += c.copy_len;
            }
            None if i.is_call_near() => {
                let push = decode_at(stub, stub_addr, s)?;
                s += push.len() + decode_at(stub, stub_addr, s + push.len())?.len();
            }
            None => s += decode_at(stub, stub_addr, s)?.len(),
        }
    }
    let new_place = |t: u64| {
        orig.iter()
            .position(|(o, _)| o.ip() == t)
            .map(|k| placed[k])
    };
    for ((i, copy), &here) in orig.iter().zip(&placed) {
        let off = (here - stub_addr) as usize;
        match copy {
            Some(c) => {
                let body = stub
                    .get(off..off + c.insn_len)
                    .ok_or(Mismatch::Undecodable(here))?;
                let same = body == &moved[c.site_off..c.site_off + c.insn_len] || {
                    let n = decode_at(stub, stub_addr, off)?;
                    n.len() == c.insn_len
                        && i.len() == c.insn_len
                        && i.is_ip_rel_memory_operand()
                        && n.code() == i.code()
                        && n.ip_rel_memory_address() == i.ip_rel_memory_address()
                };
                if !same {
                    return Err(Mismatch::WrongOp {
                        found: crate::classify::classify(&decode_at(stub, stub_addr, off)?)
                            .map_or(patch_sites::Op::Vmcall, |c| c.op),
                    });
                }
                nops(&stub[..off + c.copy_len], stub_addr, off + c.insn_len)?;
            }
            None if i.is_call_near() => {
                let push = decode_at(stub, stub_addr, off)?;
                let jmp = decode_at(stub, stub_addr, off + push.len())?;
                let t = i.near_branch_target();
                let pushes_return = push.code() == iced_x86::Code::Pushq_imm32
                    && push.immediate32to64() as u64 == i.next_ip();
                if i.next_ip() != end
                    || !pushes_return
                    || jmp.code() != iced_x86::Code::Jmp_rel32_64
                    || jmp.near_branch_target() != t
                    || (t >= moved_addr && t < end)
                {
                    return Err(Mismatch::NotCall(t));
                }
            }
            None => {
                let n = decode_at(stub, stub_addr, off)?;
                let mut want = *i;
                if want.is_jcc_short_or_near() || want.is_jmp_short_or_near() {
                    want.as_near_branch();
                }
                let mut got = n;
                if got.is_jcc_short_or_near() || got.is_jmp_short_or_near() {
                    got.as_near_branch();
                }
                if want.is_jcc_near() || want.is_jmp_near() || want.is_call_near() {
                    let t = want.near_branch_target();
                    let to = if t > moved_addr && t < end {
                        new_place(t).ok_or(Mismatch::Undecodable(i.ip()))?
                    } else {
                        new_place(t).filter(|_| t == moved_addr).unwrap_or(t)
                    };
                    want.set_near_branch64(to);
                }
                want.set_ip(got.ip());
                want.set_len(got.len());
                want.set_next_ip(got.next_ip());
                if want != got {
                    return Err(Mismatch::NotSensitive(n.mnemonic()));
                }
            }
        }
    }
    let back = decode_at(stub, stub_addr, s)?;
    if back.mnemonic() != Mnemonic::Jmp || back.near_branch_target() != end {
        return Err(Mismatch::NotCall(end));
    }
    if s + back.len() != stub.len() {
        return Err(Mismatch::NotPadding(stub_addr + (s + back.len()) as u64));
    }
    Ok(())
}
