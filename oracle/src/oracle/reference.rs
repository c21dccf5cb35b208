//! The oracle's own encoding of a site's native instruction, with iced-x86's encoder: the
//! reference every rewrite is compared with owes nothing to the runtime's encoder
//! (`pvpatch_isa::encode`), which `tests/independence.rs` checks against this one.

use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register, RepPrefixKind};
use patch_sites::{Gpr, Op, Operand};

/// The 64-, 32- and 16-bit names of a general register.
fn reg(g: Gpr, width: u8) -> Register {
    const R32: [Register; 16] = [
        Register::EAX,
        Register::ECX,
        Register::EDX,
        Register::EBX,
        Register::ESP,
        Register::EBP,
        Register::ESI,
        Register::EDI,
        Register::R8D,
        Register::R9D,
        Register::R10D,
        Register::R11D,
        Register::R12D,
        Register::R13D,
        Register::R14D,
        Register::R15D,
    ];
    const R16: [Register; 16] = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
        Register::R8W,
        Register::R9W,
        Register::R10W,
        Register::R11W,
        Register::R12W,
        Register::R13W,
        Register::R14W,
        Register::R15W,
    ];
    let i = g.number() as usize;
    match width {
        2 => R16[i],
        4 => R32[i],
        _ => super::engine::GPRS_ICED[i],
    }
}

fn cr(n: u8) -> Option<Register> {
    Some(match n {
        0 => Register::CR0,
        2 => Register::CR2,
        3 => Register::CR3,
        4 => Register::CR4,
        8 => Register::CR8,
        _ => return None,
    })
}

fn dr(n: u8) -> Option<Register> {
    [
        Register::DR0,
        Register::DR1,
        Register::DR2,
        Register::DR3,
        Register::DR4,
        Register::DR5,
        Register::DR6,
        Register::DR7,
    ]
    .get(n as usize)
    .copied()
}

fn mem(base: Gpr) -> MemoryOperand {
    MemoryOperand::with_base(reg(base, 8))
}

/// The instructions of `op` with this operand and width, or `None` where the record cannot say
/// (an operand the op does not take, a memory operand other than `[base]`).
fn instructions(op: Op, operand: Operand, width: u8, rep: bool) -> Option<Vec<Instruction>> {
    let one = |c: Code| Some(vec![Instruction::with(c)]);
    let ok = |r: Result<Instruction, iced_x86::IcedError>| r.ok().map(|i| vec![i]);
    let rep = if rep {
        RepPrefixKind::Repe
    } else {
        RepPrefixKind::None
    };
    use Op::*;
    match (op, operand) {
        (Cli, _) => one(Code::Cli),
        (Sti, _) => one(Code::Sti),
        (Hlt, _) => one(Code::Hlt),
        (SafeHalt, _) => Some(vec![
            Instruction::with(Code::Sti),
            Instruction::with(Code::Hlt),
        ]),
        (Pushf, _) => one(if width == 2 {
            Code::Pushfw
        } else {
            Code::Pushfq
        }),
        (Popf, _) => one(if width == 2 { Code::Popfw } else { Code::Popfq }),
        (MovToCr0 | MovToCr2 | MovToCr3 | MovToCr4 | MovToCr8, Operand::Reg(g)) => ok(
            Instruction::with2(Code::Mov_cr_r64, cr(op.control_register()?)?, reg(g, 8)),
        ),
        (MovFromCr0 | MovFromCr2 | MovFromCr3 | MovFromCr4 | MovFromCr8, Operand::Reg(g)) => ok(
            Instruction::with2(Code::Mov_r64_cr, reg(g, 8), cr(op.control_register()?)?),
        ),
        (MovToDr, Operand::DebugReg { dr: n, reg: g }) => {
            ok(Instruction::with2(Code::Mov_dr_r64, dr(n)?, reg(g, 8)))
        }
        (MovFromDr, Operand::DebugReg { dr: n, reg: g }) => {
            ok(Instruction::with2(Code::Mov_r64_dr, reg(g, 8), dr(n)?))
        }
        (Rdmsr, _) => one(Code::Rdmsr),
        (Wrmsr, _) => one(Code::Wrmsr),
        (In, Operand::PortImm(p)) => {
            let (c, r) = match width {
                1 => (Code::In_AL_imm8, Register::AL),
                2 => (Code::In_AX_imm8, Register::AX),
                _ => (Code::In_EAX_imm8, Register::EAX),
            };
            ok(Instruction::with2(c, r, u32::from(p)))
        }
        (In, Operand::PortDx) => {
            let (c, r) = match width {
                1 => (Code::In_AL_DX, Register::AL),
                2 => (Code::In_AX_DX, Register::AX),
                _ => (Code::In_EAX_DX, Register::EAX),
            };
            ok(Instruction::with2(c, r, Register::DX))
        }
        (Out | IoDelay, Operand::PortImm(p)) => {
            let (c, r) = match width {
                1 => (Code::Out_imm8_AL, Register::AL),
                2 => (Code::Out_imm8_AX, Register::AX),
                _ => (Code::Out_imm8_EAX, Register::EAX),
            };
            ok(Instruction::with2(c, u32::from(p), r))
        }
        (Out, Operand::PortDx) => {
            let (c, r) = match width {
                1 => (Code::Out_DX_AL, Register::AL),
                2 => (Code::Out_DX_AX, Register::AX),
                _ => (Code::Out_DX_EAX, Register::EAX),
            };
            ok(Instruction::with2(c, Register::DX, r))
        }
        (Ins, Operand::PortDx) => ok(match width {
            1 => Instruction::with_insb(64, rep),
            2 => Instruction::with_insw(64, rep),
            _ => Instruction::with_insd(64, rep),
        }),
        (Outs, Operand::PortDx) => ok(match width {
            1 => Instruction::with_outsb(64, Register::None, rep),
            2 => Instruction::with_outsw(64, Register::None, rep),
            _ => Instruction::with_outsd(64, Register::None, rep),
        }),
        (Invlpg, Operand::MemBase(b)) => ok(Instruction::with1(Code::Invlpg_m, mem(b))),
        (Invpcid, Operand::RegMemBase { reg: r, base }) => ok(Instruction::with2(
            Code::Invpcid_r64_m128,
            reg(r, 8),
            mem(base),
        )),
        (Wbinvd, _) => one(Code::Wbinvd),
        (Invd, _) => one(Code::Invd),
        (Cpuid, _) => one(Code::Cpuid),
        (Lgdt, Operand::MemBase(b)) => ok(Instruction::with1(Code::Lgdt_m1664, mem(b))),
        (Lidt, Operand::MemBase(b)) => ok(Instruction::with1(Code::Lidt_m1664, mem(b))),
        (Sgdt, Operand::MemBase(b)) => ok(Instruction::with1(Code::Sgdt_m1664, mem(b))),
        (Sidt, Operand::MemBase(b)) => ok(Instruction::with1(Code::Sidt_m1664, mem(b))),
        (Lldt | Ltr, Operand::Reg(g)) => {
            let c = if op == Lldt {
                Code::Lldt_r32m16
            } else {
                Code::Ltr_r32m16
            };
            ok(Instruction::with1(c, reg(g, 4)))
        }
        (Lldt | Ltr, Operand::MemBase(b)) => {
            let c = if op == Lldt {
                Code::Lldt_rm16
            } else {
                Code::Ltr_rm16
            };
            ok(Instruction::with1(c, mem(b)))
        }
        (Sldt | Str | Smsw, Operand::Reg(g)) => {
            let c = match (op, width) {
                (Sldt, 2) => Code::Sldt_rm16,
                (Sldt, 4) => Code::Sldt_r32m16,
                (Sldt, _) => Code::Sldt_r64m16,
                (Str, 2) => Code::Str_rm16,
                (Str, 4) => Code::Str_r32m16,
                (Str, _) => Code::Str_r64m16,
                (_, 2) => Code::Smsw_rm16,
                (_, 4) => Code::Smsw_r32m16,
                _ => Code::Smsw_r64m16,
            };
            ok(Instruction::with1(c, reg(g, width)))
        }
        (Sldt | Str | Smsw, Operand::MemBase(b)) => {
            let c = match op {
                Sldt => Code::Sldt_rm16,
                Str => Code::Str_rm16,
                _ => Code::Smsw_rm16,
            };
            ok(Instruction::with1(c, mem(b)))
        }
        (Clts, _) => one(Code::Clts),
        (Swapgs, _) => one(Code::Swapgs),
        (Rdtsc, _) => one(Code::Rdtsc),
        (Rdtscp, _) => one(Code::Rdtscp),
        (Rdpmc, _) => one(Code::Rdpmc),
        (Xsetbv, _) => one(Code::Xsetbv),
        (Iretq, _) => one(Code::Iretq),
        (Sysretq, _) => one(Code::Sysretq),
        (Sysretl, _) => one(Code::Sysretd),
        (SaveFl, Operand::Reg(g)) => Some(vec![
            Instruction::with(Code::Pushfq),
            Instruction::with1(Code::Pop_r64, reg(g, 8)).ok()?,
        ]),
        (RestoreFl, Operand::Reg(g)) => Some(vec![
            Instruction::with1(Code::Push_r64, reg(g, 8)).ok()?,
            Instruction::with(Code::Popfq),
        ]),
        _ => None,
    }
}

/// The bytes of the native instruction (or idiom) `op` with this operand and width, by
/// iced-x86's encoder; `None` where the record cannot say.
pub fn native(op: Op, operand: Operand, width: u8, rep: bool) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut e = Encoder::new(64);
    for i in instructions(op, operand, width, rep)? {
        e.encode(&i, out.len() as u64).ok()?;
        out.extend_from_slice(&e.take_buffer());
    }
    Some(out)
}

/// Fills `out` with NOPs: single-byte `nop`s up to 9 bytes, as long ones where they fit (the
/// multi-byte NOPs `0f 1f /0` with the lengths the Intel SDM lists), encoded by iced-x86.
pub fn nops(out: &mut [u8]) {
    let mut at = 0;
    while at < out.len() {
        let n = (out.len() - at).min(9);
        let bytes = long_nop(n);
        out[at..at + n].copy_from_slice(&bytes);
        at += n;
    }
}

/// One NOP of `n` bytes (1 to 9): `nop`, `66 nop`, then `nop r/m32` with growing memory
/// operands and an operand-size prefix, each checked by decoding it back.
fn long_nop(n: usize) -> Vec<u8> {
    let mem = |disp: i64, index: bool| {
        let size = match disp {
            0 => 0,
            1..128 => 1,
            _ => 4,
        };
        let index = if index { Register::RAX } else { Register::None };
        MemoryOperand::new(Register::RAX, index, 1, disp, size, false, Register::None)
    };
    let i = match n {
        1 => Instruction::with(Code::Nopd),
        2 => Instruction::with(Code::Nopw),
        3 => Instruction::with1(Code::Nop_rm32, mem(0, false)).unwrap_or_default(),
        4 => Instruction::with1(Code::Nop_rm32, mem(1, false)).unwrap_or_default(),
        5 => Instruction::with1(Code::Nop_rm32, mem(1, true)).unwrap_or_default(),
        6 => Instruction::with1(Code::Nop_rm16, mem(1, true)).unwrap_or_default(),
        7 => Instruction::with1(Code::Nop_rm32, mem(256, false)).unwrap_or_default(),
        8 => Instruction::with1(Code::Nop_rm32, mem(256, true)).unwrap_or_default(),
        _ => Instruction::with1(Code::Nop_rm16, mem(256, true)).unwrap_or_default(),
    };
    let mut e = Encoder::new(64);
    match e.encode(&i, 0) {
        Ok(len) if len == n => e.take_buffer(),
        _ => vec![0x90; n],
    }
}
