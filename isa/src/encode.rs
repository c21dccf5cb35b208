//! Encoding the native instruction of a site from its record (op, operand, width, flags), and
//! the recommended multi-byte NOPs that pad a rewritten site.
//!
//! A site emitted in the indirect-call form holds no native instruction: to patch it to native
//! (or to emulate a trap of it) the runtime encodes the instruction the record describes. Every
//! encoding is checked by decoding it back (see [`crate::check`]).

use patch_sites::table::{SITE_FLAG_REP, Site};
use patch_sites::{Op, Operand};

use crate::asm::Asm;

/// The longest sequence the runtime builds for one site.
pub const MAX_SEQ: usize = 64;

/// A short byte sequence, built without allocation.
#[derive(Clone, Copy, Eq)]
pub struct Seq {
    bytes: [u8; MAX_SEQ],
    len: u8,
}

impl core::fmt::Debug for Seq {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x?}", self.as_slice())
    }
}

/// Equal when the bytes are: only the first `len` count (comparing all 64 would cost the
/// patcher most of its time where every instruction is emulated).
impl PartialEq for Seq {
    fn eq(&self, other: &Seq) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Default for Seq {
    fn default() -> Self {
        Seq {
            bytes: [0; MAX_SEQ],
            len: 0,
        }
    }
}

impl Seq {
    /// An empty sequence.
    pub fn new() -> Self {
        Seq::default()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len as usize]
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes; `None` if they do not fit.
    pub fn push(&mut self, b: &[u8]) -> Option<()> {
        let at = self.len as usize;
        self.bytes.get_mut(at..at + b.len())?.copy_from_slice(b);
        self.len += b.len() as u8;
        Some(())
    }

    /// The sequence holding `b`.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let mut s = Seq::new();
        s.push(b)?;
        Some(s)
    }

    /// Pads with recommended NOPs up to `len` bytes.
    pub fn pad_to(&mut self, len: usize) -> Option<()> {
        if len < self.len() || len > MAX_SEQ {
            return None;
        }
        let from = self.len();
        self.len = len as u8;
        fill_nops(&mut self.bytes[from..len]);
        Some(())
    }
}

/// The recommended multi-byte NOPs (Intel SDM, "Recommended Multi-Byte Sequence of NOP
/// Instruction"), by length.
pub const NOPS: [&[u8]; 10] = [
    &[],
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// Fills `out` with as few recommended NOPs as possible.
pub fn fill_nops(out: &mut [u8]) {
    let mut at = 0;
    while at < out.len() {
        let n = (out.len() - at).min(NOPS.len() - 1);
        out[at..at + n].copy_from_slice(NOPS[n]);
        at += n;
    }
}

/// The native encoding of what `site` records, if it can be encoded: a memory operand other
/// than `[base]`, or a hypervisor interface, cannot.
pub fn native(site: &Site) -> Option<Seq> {
    let op = site.op()?;
    let mut a = Asm::new(0, Seq::new());
    let reg = |o: Operand| -> Option<u8> {
        match o {
            Operand::Reg(r) => Some(r.number()),
            _ => None,
        }
    };
    let w = site.width;
    match (op, site.operand) {
        (Op::Cli, _) => a.raw(&[0xfa]),
        (Op::Sti, _) => a.raw(&[0xfb]),
        (Op::Hlt, _) => a.raw(&[0xf4]),
        (Op::SafeHalt, _) => a.raw(&[0xfb, 0xf4]),
        (Op::Pushf, _) => a.width_prefix(w).and_then(|_| a.raw(&[0x9c])),
        (Op::Popf, _) => a.width_prefix(w).and_then(|_| a.raw(&[0x9d])),
        (Op::MovToCr0 | Op::MovToCr2 | Op::MovToCr3 | Op::MovToCr4 | Op::MovToCr8, o) => {
            a.mov_cr(true, op.control_register().unwrap_or(8), reg(o)?)
        }
        (Op::MovFromCr0 | Op::MovFromCr2 | Op::MovFromCr3 | Op::MovFromCr4 | Op::MovFromCr8, o) => {
            a.mov_cr(false, op.control_register().unwrap_or(8), reg(o)?)
        }
        (Op::MovToDr, Operand::DebugReg { dr, reg }) => {
            a.reg_form(false, dr, reg.number(), &[0x0f, 0x23])
        }
        (Op::MovFromDr, Operand::DebugReg { dr, reg }) => {
            a.reg_form(false, dr, reg.number(), &[0x0f, 0x21])
        }
        (Op::Rdmsr, _) => a.raw(&[0x0f, 0x32]),
        (Op::Wrmsr, _) => a.raw(&[0x0f, 0x30]),
        (Op::In, Operand::PortImm(p)) => a
            .width_prefix(w)
            .and_then(|_| a.raw(&[if w == 1 { 0xe4 } else { 0xe5 }, p])),
        (Op::In, Operand::PortDx) => a
            .width_prefix(w)
            .and_then(|_| a.raw(&[if w == 1 { 0xec } else { 0xed }])),
        (Op::Out | Op::IoDelay, Operand::PortImm(p)) => a
            .width_prefix(w)
            .and_then(|_| a.raw(&[if w == 1 { 0xe6 } else { 0xe7 }, p])),
        (Op::Out, Operand::PortDx) => a
            .width_prefix(w)
            .and_then(|_| a.raw(&[if w == 1 { 0xee } else { 0xef }])),
        (Op::Ins | Op::Outs, Operand::PortDx) => {
            if site.flags & SITE_FLAG_REP != 0 {
                a.raw(&[0xf3]).ok()?;
            }
            let base = if op == Op::Ins { 0x6c } else { 0x6e };
            a.width_prefix(w)
                .and_then(|_| a.raw(&[if w == 1 { base } else { base + 1 }]))
        }
        (Op::Invlpg, Operand::MemBase(b)) => a.mem_form(&[], 7, b.number(), &[0x0f, 0x01]),
        (Op::Invpcid, Operand::RegMemBase { reg, base }) => {
            a.mem_form(&[0x66], reg.number(), base.number(), &[0x0f, 0x38, 0x82])
        }
        (Op::Wbinvd, _) => a.raw(&[0x0f, 0x09]),
        (Op::Invd, _) => a.raw(&[0x0f, 0x08]),
        (Op::Cpuid, _) => a.raw(&[0x0f, 0xa2]),
        (Op::Lgdt | Op::Lidt | Op::Sgdt | Op::Sidt, Operand::MemBase(b)) => {
            let digit = match op {
                Op::Sgdt => 0,
                Op::Sidt => 1,
                Op::Lgdt => 2,
                _ => 3,
            };
            a.mem_form(&[], digit, b.number(), &[0x0f, 0x01])
        }
        (Op::Lldt | Op::Ltr | Op::Sldt | Op::Str, o) => {
            let digit = match op {
                Op::Sldt => 0,
                Op::Str => 1,
                Op::Lldt => 2,
                _ => 3,
            };
            let stores = matches!(op, Op::Sldt | Op::Str);
            match o {
                Operand::Reg(r) => {
                    if stores {
                        a.width_prefix(w).ok()?;
                    }
                    a.reg_form(w == 8 && stores, digit, r.number(), &[0x0f, 0x00])
                }
                Operand::MemBase(b) => a.mem_form(&[], digit, b.number(), &[0x0f, 0x00]),
                _ => return None,
            }
        }
        (Op::Smsw, Operand::Reg(r)) => a
            .width_prefix(w)
            .and_then(|_| a.reg_form(w == 8, 4, r.number(), &[0x0f, 0x01])),
        (Op::Smsw, Operand::MemBase(b)) => a.mem_form(&[], 4, b.number(), &[0x0f, 0x01]),
        (Op::Clts, _) => a.raw(&[0x0f, 0x06]),
        (Op::Swapgs, _) => a.raw(&[0x0f, 0x01, 0xf8]),
        (Op::Rdtsc, _) => a.raw(&[0x0f, 0x31]),
        (Op::Rdtscp, _) => a.raw(&[0x0f, 0x01, 0xf9]),
        (Op::Rdpmc, _) => a.raw(&[0x0f, 0x33]),
        (Op::Iretq, _) => a.raw(&[0x48, 0xcf]),
        (Op::Sysretq, _) => a.raw(&[0x48, 0x0f, 0x07]),
        (Op::Sysretl, _) => a.raw(&[0x0f, 0x07]),
        (Op::Xsetbv, _) => a.raw(&[0x0f, 0x01, 0xd1]),
        (Op::SaveFl, Operand::Reg(r)) => a.raw(&[0x9c]).and_then(|_| a.pop(r.number())),
        (Op::RestoreFl, Operand::Reg(r)) => a.push(r.number()).and_then(|_| a.raw(&[0x9d])),
        _ => return None,
    }
    .ok()?;
    Some(a.out)
}

/// The instruction at the start of `bytes` (which lie at `addr`) re-encoded to run at `at`
/// inside a called thunk, where the stack pointer is 8 bytes lower than at the site: a
/// RIP-relative operand keeps its target, and a memory operand based on `rsp` reaches 8 bytes
/// further (`[rsp]` gains a displacement). `None` for an instruction that moves the stack
/// pointer or names it as a register, or whose new displacement does not fit its encoding.
/// The result is checked by decoding it back.
pub fn called(bytes: &[u8], addr: u64, at: u64) -> Option<Seq> {
    use iced_x86::{Decoder, DecoderOptions, OpKind, Register};
    let mut d = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    let i = d.decode();
    if i.is_invalid() || i.stack_pointer_increment() != 0 {
        return None;
    }
    let names_rsp = (0..i.op_count()).any(|n| {
        i.op_kind(n) == OpKind::Register && i.op_register(n).full_register() == Register::RSP
    });
    if names_rsp || i.memory_index() == Register::RSP {
        return None;
    }
    let offsets = d.get_constant_offsets(&i);
    let mut out = Seq::from_slice(bytes.get(..i.len())?)?;
    let disp_at = offsets.displacement_offset();
    let want = if i.is_ip_rel_memory_operand() {
        let target = i.ip_rel_memory_address();
        let next = at.checked_add(i.len() as u64)?;
        let disp = i32::try_from(target.wrapping_sub(next) as i64).ok()?;
        if offsets.displacement_size() != 4 {
            return None;
        }
        out.as_mut_slice()[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());
        Some(target)
    } else if i.memory_base() == Register::RSP {
        let disp = i.memory_displacement64().wrapping_add(8);
        match offsets.displacement_size() {
            1 => {
                let d8 = i8::try_from(disp as i64).ok()?;
                out.as_mut_slice()[disp_at] = d8 as u8;
            }
            4 => {
                let d32 = i32::try_from(disp as i64).ok()?;
                out.as_mut_slice()[disp_at..disp_at + 4].copy_from_slice(&d32.to_le_bytes());
            }
            // `[rsp]`: ModRM (mod 00, rm 100) then SIB (base 100) end the instruction when it
            // has no immediate; mod 01 adds a disp8.
            0 if !offsets.has_immediate() => {
                let n = out.len();
                let b = out.as_mut_slice();
                if n < 2 || b[n - 2] & 0xc7 != 0x04 || b[n - 1] & 0x07 != 0x04 {
                    return None;
                }
                b[n - 2] |= 0x40;
                out.push(&[8])?;
            }
            _ => return None,
        }
        Some(disp)
    } else {
        None
    };
    // Decode it back: the same instruction, reaching the same place.
    let back = Decoder::with_ip(64, out.as_slice(), at, DecoderOptions::NONE).decode();
    let same = back.code() == i.code()
        && back.len() == out.len()
        && match want {
            Some(t) if i.is_ip_rel_memory_operand() => back.ip_rel_memory_address() == t,
            Some(t) => back.memory_base() == Register::RSP && back.memory_displacement64() == t,
            None => back.memory_displacement64() == i.memory_displacement64(),
        };
    same.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nops_decode_as_single_nops() {
        for (n, nop) in NOPS.iter().enumerate().skip(1) {
            let mut d = iced_x86::Decoder::with_ip(64, nop, 0, iced_x86::DecoderOptions::NONE);
            let i = d.decode();
            assert_eq!((i.mnemonic(), i.len()), (iced_x86::Mnemonic::Nop, n));
        }
        let mut buf = [0u8; 23];
        fill_nops(&mut buf);
        assert_eq!(buf[..9], *NOPS[9]);
        assert_eq!(buf[18..], *NOPS[5]);
    }

    fn decode(b: &[u8], ip: u64) -> iced_x86::Instruction {
        iced_x86::Decoder::with_ip(64, b, ip, iced_x86::DecoderOptions::NONE).decode()
    }

    #[test]
    fn called_reaches_what_the_site_reached() {
        // lgdt [rip+0x100] at 0x1000, moved to 0x9000: same target.
        let b = [0x0f, 0x01, 0x15, 0x00, 0x01, 0x00, 0x00];
        let s = called(&b, 0x1000, 0x9000).unwrap();
        assert_eq!(decode(s.as_slice(), 0x9000).ip_rel_memory_address(), 0x1107);
        // sgdt [rsp+6]: [rsp+14] in the thunk.
        let s = called(&[0x0f, 0x01, 0x44, 0x24, 0x06], 0, 0).unwrap();
        assert_eq!(s.as_slice(), [0x0f, 0x01, 0x44, 0x24, 0x0e]);
        // invpcid rax, [rsp]: [rsp+8].
        let s = called(&[0x66, 0x0f, 0x38, 0x82, 0x04, 0x24], 0, 0).unwrap();
        assert_eq!(s.as_slice(), [0x66, 0x0f, 0x38, 0x82, 0x44, 0x24, 0x08]);
        // sidt [rsp+0x200]: disp32.
        let s = called(&[0x0f, 0x01, 0x8c, 0x24, 0x00, 0x02, 0, 0], 0, 0).unwrap();
        assert_eq!(decode(s.as_slice(), 0).memory_displacement64(), 0x208);
        // lgdt [rax+0x10a]: unchanged.
        let b = [0x0f, 0x01, 0x90, 0x0a, 0x01, 0, 0];
        assert_eq!(called(&b, 0, 0x5000).unwrap().as_slice(), b);
    }

    #[test]
    fn called_refuses_what_it_cannot_keep() {
        // sgdt [rsp+0x7c]: disp8 overflows.
        assert!(called(&[0x0f, 0x01, 0x44, 0x24, 0x7c], 0, 0).is_none());
        // pushfq, and mov cr3, rsp.
        assert!(called(&[0x9c], 0, 0).is_none());
        assert!(called(&[0x0f, 0x22, 0xdc], 0, 0).is_none());
        // A RIP-relative target out of reach of the new place.
        assert!(called(&[0x0f, 0x01, 0x15, 0, 0, 0, 0], 0, 0x1_0000_0000).is_none());
        // Garbage.
        assert!(called(&[0x0f, 0xff], 0, 0).is_none());
        assert!(called(&[], 0, 0).is_none());
    }
}
