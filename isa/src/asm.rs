//! The project's one small x86-64 assembler: the few instruction forms that the native encoder
//! ([`crate::encode`]) and the Xen and Hyper-V entry points (the runtime's `pv` module) need,
//! written into any [`Sink`]: a fixed [`Seq`] where nothing may allocate, a `Vec<u8>` for
//! generated code. Every form is checked against iced-x86's decoder by the tests of its users.

use alloc::vec::Vec;
use core::fmt;

use crate::encode::Seq;

/// Where assembled bytes go.
pub trait Sink {
    /// Appends `bytes`; `None` if they do not fit.
    fn put(&mut self, bytes: &[u8]) -> Option<()>;
    /// Bytes so far.
    fn len(&self) -> usize;
    /// Whether nothing was written yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Sink for Seq {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        self.push(bytes)
    }
    fn len(&self) -> usize {
        Seq::len(self)
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        self.extend_from_slice(bytes);
        Some(())
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// Why an instruction could not be assembled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsmError {
    /// The sink is full.
    Full,
    /// A rel32 cannot reach this address from where the instruction is.
    OutOfReach(u64),
}

impl fmt::Display for AsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AsmError::Full => f.write_str("the sequence does not fit its buffer"),
            AsmError::OutOfReach(a) => write!(f, "{a:#x} is out of rel32 reach"),
        }
    }
}

/// Result of assembling one instruction.
pub type Result = core::result::Result<(), AsmError>;

/// A REX prefix: W, R (ModRM.reg bit 3), X (SIB.index bit 3), B (ModRM.rm or opcode reg bit 3).
/// `0x40` means no prefix is needed (unless a byte register above `bl` is named).
pub const fn rex(w: bool, r: u8, x: u8, b: u8) -> u8 {
    0x40 | ((w as u8) << 3) | ((r >> 3) << 2) | ((x >> 3) << 1) | (b >> 3)
}

/// A ModRM byte.
pub const fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    (md << 6) | ((reg & 7) << 3) | (rm & 7)
}

/// `0x9c`: `pushfq`.
pub const PUSHFQ: u8 = 0x9c;
/// `0x9d`: `popfq`.
pub const POPFQ: u8 = 0x9d;
/// `0xc3`: `ret`.
pub const RET: u8 = 0xc3;
/// `0x74`: `jz rel8`.
pub const JZ: u8 = 0x74;
/// `0x75`: `jnz rel8`.
pub const JNZ: u8 = 0x75;

/// An assembler writing code that will run at `base`.
#[derive(Debug)]
pub struct Asm<S> {
    /// Where the first byte runs.
    pub base: u64,
    /// The bytes.
    pub out: S,
}

impl<S: Sink> Asm<S> {
    /// An assembler for code at `base`, into `out`.
    pub fn new(base: u64, out: S) -> Self {
        Asm { base, out }
    }

    /// The address of the next byte.
    pub fn at(&self) -> u64 {
        self.base.wrapping_add(self.out.len() as u64)
    }

    /// Raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> Result {
        self.out.put(bytes).ok_or(AsmError::Full)
    }

    /// The rel32 from the end of an instruction `len` bytes long starting here, to `target`.
    pub fn rel32(&self, len: usize, target: u64) -> core::result::Result<[u8; 4], AsmError> {
        let end = self.at() as i128 + len as i128;
        i32::try_from(target as i128 - end)
            .map(i32::to_le_bytes)
            .map_err(|_| AsmError::OutOfReach(target))
    }

    /// `0x66` where a 16-bit operand size needs it.
    pub fn width_prefix(&mut self, width: u8) -> Result {
        if width == 2 {
            self.raw(&[0x66])
        } else {
            Ok(())
        }
    }

    /// `[REX] opcode... modrm` with register `rm` in ModRM.rm and `digit` (an opcode extension
    /// or a second register) in ModRM.reg.
    pub fn reg_form(&mut self, w: bool, digit: u8, rm: u8, opcode: &[u8]) -> Result {
        let r = rex(w, digit, 0, rm);
        if r != 0x40 {
            self.raw(&[r])?;
        }
        self.raw(opcode)?;
        self.raw(&[modrm(3, digit, rm)])
    }

    /// `prefix [REX] opcode... modrm [sib] [disp8]` for a `[base]` memory operand with `reg` in
    /// ModRM.reg.
    pub fn mem_form(&mut self, prefix: &[u8], reg: u8, base: u8, opcode: &[u8]) -> Result {
        self.raw(prefix)?;
        let r = rex(false, reg, 0, base);
        if r != 0x40 {
            self.raw(&[r])?;
        }
        self.raw(opcode)?;
        match base & 7 {
            // rsp/r12: a SIB byte with no index
            4 => self.raw(&[modrm(0, reg, 4), 0x24]),
            // rbp/r13: mod=01 with a zero disp8
            5 => self.raw(&[modrm(1, reg, 5), 0x00]),
            _ => self.raw(&[modrm(0, reg, base)]),
        }
    }

    /// `opcode+reg` with REX.B for r8-r15 (`push`, `pop`).
    fn opcode_reg(&mut self, opcode: u8, r: u8) -> Result {
        if r >= 8 {
            self.raw(&[0x41])?;
        }
        self.raw(&[opcode + (r & 7)])
    }

    /// `push r64`.
    pub fn push(&mut self, r: u8) -> Result {
        self.opcode_reg(0x50, r)
    }

    /// `pop r64`.
    pub fn pop(&mut self, r: u8) -> Result {
        self.opcode_reg(0x58, r)
    }

    /// `call rel32`.
    pub fn call(&mut self, target: u64) -> Result {
        let d = self.rel32(5, target)?;
        self.raw(&[0xe8])?;
        self.raw(&d)
    }

    /// `jmp rel32`.
    pub fn jmp(&mut self, target: u64) -> Result {
        let d = self.rel32(5, target)?;
        self.raw(&[0xe9])?;
        self.raw(&d)
    }

    /// A short conditional jump (`opcode` is `0x70 + cc`) over the next `n` bytes.
    pub fn jcc_over(&mut self, opcode: u8, n: u8) -> Result {
        self.raw(&[opcode, n])
    }

    /// `op byte [rip + target], imm8` (`0xc6` is `mov`, `0xf6` is `test`; both `/0`).
    pub fn rip_byte_imm(&mut self, opcode: u8, target: u64, imm: u8) -> Result {
        let d = self.rel32(7, target)?;
        self.raw(&[opcode, 0x05])?;
        self.raw(&d)?;
        self.raw(&[imm])
    }

    /// `setz byte [rip + target]`.
    pub fn setz_rip(&mut self, target: u64) -> Result {
        let d = self.rel32(7, target)?;
        self.raw(&[0x0f, 0x94, 0x05])?;
        self.raw(&d)
    }

    /// `opcode r64, [rip + target]` or `[rip + target], r64` with REX.W (`0x89` store, `0x8d`
    /// lea).
    fn rip_reg(&mut self, opcode: u8, reg: u8, target: u64) -> Result {
        let d = self.rel32(7, target)?;
        self.raw(&[rex(true, reg, 0, 0), opcode, modrm(0, reg, 5)])?;
        self.raw(&d)
    }

    /// `mov qword [rip + target], r64`.
    pub fn store_rip(&mut self, target: u64, reg: u8) -> Result {
        self.rip_reg(0x89, reg, target)
    }

    /// `lea r64, [rip + target]`.
    pub fn lea_rip(&mut self, reg: u8, target: u64) -> Result {
        self.rip_reg(0x8d, reg, target)
    }

    /// `mov qword [rip + target], imm32` (sign-extended).
    pub fn store_rip_imm(&mut self, target: u64, imm: i32) -> Result {
        let d = self.rel32(11, target)?;
        self.raw(&[0x48, 0xc7, 0x05])?;
        self.raw(&d)?;
        self.raw(&imm.to_le_bytes())
    }

    /// `mov r32, imm32` (zero-extends; no flags).
    pub fn mov_imm32(&mut self, reg: u8, imm: u32) -> Result {
        self.opcode_reg(0xb8, reg)?;
        self.raw(&imm.to_le_bytes())
    }

    /// `movabs r64, imm64`.
    pub fn mov_imm64(&mut self, reg: u8, imm: u64) -> Result {
        self.raw(&[rex(true, 0, 0, reg), 0xb8 + (reg & 7)])?;
        self.raw(&imm.to_le_bytes())
    }

    /// `op r64, imm32` of the `81 /ext` group (`/1` or, `/4` and).
    pub fn alu_imm(&mut self, ext: u8, reg: u8, imm: i32) -> Result {
        self.raw(&[rex(true, 0, 0, reg), 0x81, modrm(3, ext, reg)])?;
        self.raw(&imm.to_le_bytes())
    }

    /// `mov [rsp + d8], r64`.
    pub fn store_rsp(&mut self, d8: u8, reg: u8) -> Result {
        self.raw(&[rex(true, reg, 0, 0), 0x89, modrm(1, reg, 4), 0x24, d8])
    }

    /// `cmp a, b` (64-bit, `39 /r`: flags from `a - b`).
    pub fn cmp(&mut self, a: u8, b: u8) -> Result {
        self.raw(&[rex(true, b, 0, a), 0x39, modrm(3, b, a)])
    }

    /// `mov crN, r64` (`to_cr`) or `mov r64, crN`.
    pub fn mov_cr(&mut self, to_cr: bool, cr: u8, reg: u8) -> Result {
        self.reg_form(false, cr, reg, &[0x0f, if to_cr { 0x22 } else { 0x20 }])
    }
}

#[cfg(test)]
mod tests {
    use alloc::string::String;

    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    use super::*;

    fn listing(base: u64, code: &[u8]) -> alloc::vec::Vec<String> {
        let mut d = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = alloc::vec::Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(!i.is_invalid(), "undecodable at {:#x}", i.ip());
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn every_form_decodes_as_written() {
        let mut a = Asm::new(0x1000, alloc::vec::Vec::new());
        a.push(12).unwrap();
        a.pop(3).unwrap();
        a.call(0x2000).unwrap();
        a.jmp(0x1000).unwrap();
        a.rip_byte_imm(0xc6, 0x3001, 1).unwrap();
        a.rip_byte_imm(0xf6, 0x3000, 0xff).unwrap();
        a.setz_rip(0x3001).unwrap();
        a.store_rip(0x3008, 13).unwrap();
        a.lea_rip(2, 0x3010).unwrap();
        a.store_rip_imm(0x3018, -2).unwrap();
        a.mov_imm32(10, 0x7ff0).unwrap();
        a.mov_imm64(1, 0x1_0000_0003).unwrap();
        a.alu_imm(4, 9, !0x200).unwrap();
        a.store_rsp(8, 11).unwrap();
        a.cmp(0, 14).unwrap();
        a.mov_cr(true, 3, 15).unwrap();
        a.mov_cr(false, 8, 0).unwrap();
        a.mem_form(&[], 7, 12, &[0x0f, 0x01]).unwrap();
        a.mem_form(&[], 7, 13, &[0x0f, 0x01]).unwrap();
        assert_eq!(
            listing(0x1000, &a.out),
            [
                "push r12",
                "pop rbx",
                "call 0000000000002000h",
                "jmp 0000000000001000h",
                "mov byte ptr [3001h],1",
                "test byte ptr [3000h],0FFh",
                "sete [3001h]",
                "mov [3008h],r13",
                "lea rdx,[3010h]",
                "mov qword ptr [3018h],0FFFFFFFFFFFFFFFEh",
                "mov r10d,7FF0h",
                "mov rcx,100000003h",
                "and r9,0FFFFFFFFFFFFFDFFh",
                "mov [rsp+8],r11",
                "cmp rax,r14",
                "mov cr3,r15",
                "mov rax,cr8",
                "invlpg [r12]",
                "invlpg [r13]",
            ]
        );
    }

    #[test]
    fn out_of_reach_and_full() {
        let mut a = Asm::new(0, alloc::vec::Vec::new());
        assert_eq!(a.call(1 << 40), Err(AsmError::OutOfReach(1 << 40)));
        let mut s = Asm::new(0, Seq::new());
        for _ in 0..crate::encode::MAX_SEQ {
            s.raw(&[0x90]).unwrap();
        }
        assert_eq!(s.raw(&[0x90]), Err(AsmError::Full));
    }
}
