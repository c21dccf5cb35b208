//! Classifying a decoded instruction: which op of the catalogue it is, and its operand in the
//! ABI's terms. The class names of reports are the op names (`cli`, `mov_to_cr3`, `in`, ...).
//!
//! This is the one definition both sides use: the post-link tool classifies what it sweeps with
//! it, and the boot-time patcher checks with it that a site holds what its record says and that
//! what it wrote decodes as intended. It needs only iced-x86's decoder (no `instr_info`), so the
//! register helpers below work from iced's register numbering.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};
use patch_sites::{Gpr, Op, Operand};

/// A sensitive instruction, classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    /// The op (the class).
    pub op: Op,
    /// Its operand.
    pub operand: Operand,
    /// Operand width in bytes (0 if none).
    pub width: u8,
    /// `ins`/`outs` with a `rep` prefix.
    pub rep: bool,
}

fn c(op: Op, operand: Operand, width: u8) -> Option<Classified> {
    Some(Classified {
        op,
        operand,
        width,
        rep: false,
    })
}

/// The general-purpose register `r` (any size) names, as the ABI numbers it. `ah`..`bh` have
/// no number of their own and give `None`.
pub fn gpr(r: Register) -> Option<Gpr> {
    let v = r as u32;
    let n = match v {
        // AL, CL, DL, BL
        1..=4 => v - 1,
        // SPL, BPL, SIL, DIL, R8L..R15L
        9..=20 => v - 5,
        // AX..R15W, EAX..R15D, RAX..R15
        21..=36 => v - 21,
        37..=52 => v - 37,
        53..=68 => v - 53,
        _ => return None,
    };
    Gpr::from_number(n as u8)
}

/// Whether `r` is a 64-bit general-purpose register.
pub fn is_gpr64(r: Register) -> bool {
    (Register::RAX as u32..=Register::R15 as u32).contains(&(r as u32))
}

/// The size in bytes of a general-purpose register operand (0 for anything else).
pub fn reg_width(r: Register) -> u8 {
    match r as u32 {
        1..=20 => 1,
        21..=36 => 2,
        37..=52 => 4,
        53..=68 => 8,
        _ => 0,
    }
}

/// The number of a control or debug register (`cr3` is 3, `dr7` is 7).
fn cr_dr_number(r: Register) -> Option<u8> {
    let v = r as u32;
    let cr0 = Register::CR0 as u32;
    let dr0 = Register::DR0 as u32;
    if (cr0..cr0 + 16).contains(&v) {
        Some((v - cr0) as u8)
    } else if (dr0..dr0 + 16).contains(&v) {
        Some((v - dr0) as u8)
    } else {
        None
    }
}

/// A memory operand in the ABI's terms: base-only addressing is `MemBase`, anything else
/// (index, displacement, RIP-relative, segment override) is `MemOther`.
pub fn mem_operand(i: &Instruction) -> Operand {
    let base = i.memory_base();
    if i.memory_index() == Register::None
        && i.memory_displacement64() == 0
        && i.segment_prefix() == Register::None
        && is_gpr64(base)
    {
        gpr(base).map_or(Operand::MemOther, Operand::MemBase)
    } else {
        Operand::MemOther
    }
}

fn reg_or_mem(i: &Instruction, op: Op, fixed_width: Option<u8>) -> Option<Classified> {
    match i.op0_kind() {
        OpKind::Register => {
            let r = i.op0_register();
            c(
                op,
                Operand::Reg(gpr(r)?),
                fixed_width.unwrap_or(reg_width(r)),
            )
        }
        OpKind::Memory => c(op, mem_operand(i), fixed_width.unwrap_or(2)),
        _ => None,
    }
}

fn cr_op(cr: Register, to: bool) -> Option<Op> {
    if !(Register::CR0 as u32..=Register::CR15 as u32).contains(&(cr as u32)) {
        return None;
    }
    Some(match (cr_dr_number(cr)?, to) {
        (0, true) => Op::MovToCr0,
        (0, false) => Op::MovFromCr0,
        (2, true) => Op::MovToCr2,
        (2, false) => Op::MovFromCr2,
        (3, true) => Op::MovToCr3,
        (3, false) => Op::MovFromCr3,
        (4, true) => Op::MovToCr4,
        (4, false) => Op::MovFromCr4,
        (8, true) => Op::MovToCr8,
        (8, false) => Op::MovFromCr8,
        _ => return None,
    })
}

fn port_width(code: Code) -> u8 {
    match code {
        Code::In_AL_imm8 | Code::In_AL_DX | Code::Out_imm8_AL | Code::Out_DX_AL => 1,
        Code::In_AX_imm8 | Code::In_AX_DX | Code::Out_imm8_AX | Code::Out_DX_AX => 2,
        _ => 4,
    }
}

/// The op and operand of `i`, if it is one of the sensitive instructions (or a hypervisor
/// interface). Cheap for the common case: one match on the mnemonic.
pub fn classify(i: &Instruction) -> Option<Classified> {
    match i.mnemonic() {
        Mnemonic::Cli => c(Op::Cli, Operand::None, 0),
        Mnemonic::Sti => c(Op::Sti, Operand::None, 0),
        Mnemonic::Pushfq => c(Op::Pushf, Operand::None, 8),
        Mnemonic::Pushf => c(Op::Pushf, Operand::None, 2),
        Mnemonic::Popfq => c(Op::Popf, Operand::None, 8),
        Mnemonic::Popf => c(Op::Popf, Operand::None, 2),
        Mnemonic::Hlt => c(Op::Hlt, Operand::None, 0),
        Mnemonic::Mov => match i.code() {
            Code::Mov_cr_r64 | Code::Mov_cr_r32 => {
                let op = cr_op(i.op0_register(), true)?;
                c(op, Operand::Reg(gpr(i.op1_register())?), 8)
            }
            Code::Mov_r64_cr | Code::Mov_r32_cr => {
                let op = cr_op(i.op1_register(), false)?;
                c(op, Operand::Reg(gpr(i.op0_register())?), 8)
            }
            Code::Mov_dr_r64 | Code::Mov_dr_r32 => {
                let dr = cr_dr_number(i.op0_register())?;
                c(
                    Op::MovToDr,
                    Operand::DebugReg {
                        dr,
                        reg: gpr(i.op1_register())?,
                    },
                    8,
                )
            }
            Code::Mov_r64_dr | Code::Mov_r32_dr => {
                let dr = cr_dr_number(i.op1_register())?;
                c(
                    Op::MovFromDr,
                    Operand::DebugReg {
                        dr,
                        reg: gpr(i.op0_register())?,
                    },
                    8,
                )
            }
            _ => None,
        },
        Mnemonic::Rdmsr => c(Op::Rdmsr, Operand::None, 0),
        Mnemonic::Wrmsr => c(Op::Wrmsr, Operand::None, 0),
        Mnemonic::In => {
            let w = port_width(i.code());
            if i.op1_kind() == OpKind::Immediate8 {
                c(Op::In, Operand::PortImm(i.immediate8()), w)
            } else {
                c(Op::In, Operand::PortDx, w)
            }
        }
        Mnemonic::Out => {
            let w = port_width(i.code());
            if i.op0_kind() == OpKind::Immediate8 {
                c(Op::Out, Operand::PortImm(i.immediate8()), w)
            } else {
                c(Op::Out, Operand::PortDx, w)
            }
        }
        m @ (Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd) => {
            let w = match m {
                Mnemonic::Insb => 1,
                Mnemonic::Insw => 2,
                _ => 4,
            };
            Some(Classified {
                op: Op::Ins,
                operand: Operand::PortDx,
                width: w,
                rep: i.has_rep_prefix(),
            })
        }
        m @ (Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd) => {
            let w = match m {
                Mnemonic::Outsb => 1,
                Mnemonic::Outsw => 2,
                _ => 4,
            };
            Some(Classified {
                op: Op::Outs,
                operand: Operand::PortDx,
                width: w,
                rep: i.has_rep_prefix(),
            })
        }
        Mnemonic::Invlpg => c(Op::Invlpg, mem_operand(i), 0),
        Mnemonic::Invpcid => {
            let operand = match (gpr(i.op0_register()), mem_operand(i)) {
                (Some(reg), Operand::MemBase(base)) => Operand::RegMemBase { reg, base },
                _ => Operand::MemOther,
            };
            c(Op::Invpcid, operand, 0)
        }
        Mnemonic::Wbinvd => c(Op::Wbinvd, Operand::None, 0),
        Mnemonic::Invd => c(Op::Invd, Operand::None, 0),
        Mnemonic::Cpuid => c(Op::Cpuid, Operand::None, 0),
        Mnemonic::Lgdt => c(Op::Lgdt, mem_operand(i), 0),
        Mnemonic::Lidt => c(Op::Lidt, mem_operand(i), 0),
        Mnemonic::Sgdt => c(Op::Sgdt, mem_operand(i), 0),
        Mnemonic::Sidt => c(Op::Sidt, mem_operand(i), 0),
        Mnemonic::Lldt => reg_or_mem(i, Op::Lldt, Some(2)),
        Mnemonic::Ltr => reg_or_mem(i, Op::Ltr, Some(2)),
        Mnemonic::Sldt => reg_or_mem(i, Op::Sldt, None),
        Mnemonic::Str => reg_or_mem(i, Op::Str, None),
        Mnemonic::Smsw => reg_or_mem(i, Op::Smsw, None),
        Mnemonic::Clts => c(Op::Clts, Operand::None, 0),
        Mnemonic::Swapgs => c(Op::Swapgs, Operand::None, 0),
        Mnemonic::Rdtsc => c(Op::Rdtsc, Operand::None, 0),
        Mnemonic::Rdtscp => c(Op::Rdtscp, Operand::None, 0),
        Mnemonic::Rdpmc => c(Op::Rdpmc, Operand::None, 0),
        Mnemonic::Iretq => c(Op::Iretq, Operand::None, 0),
        Mnemonic::Sysretq => c(Op::Sysretq, Operand::None, 0),
        Mnemonic::Sysret => c(Op::Sysretl, Operand::None, 0),
        Mnemonic::Xsetbv => c(Op::Xsetbv, Operand::None, 0),
        Mnemonic::Vmcall => c(Op::Vmcall, Operand::None, 0),
        Mnemonic::Vmmcall => c(Op::Vmmcall, Operand::None, 0),
        Mnemonic::Vmgexit => c(Op::Vmgexit, Operand::None, 0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    use super::*;

    fn one(bytes: &[u8]) -> Option<Classified> {
        let mut d = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE);
        let i = d.decode();
        assert!(!i.is_invalid(), "{bytes:02x?}");
        assert_eq!(i.len(), bytes.len(), "{bytes:02x?}");
        classify(&i)
    }

    #[test]
    fn classes_and_operands() {
        let cases: &[(&[u8], Op, Operand, u8)] = &[
            (&[0xfa], Op::Cli, Operand::None, 0),
            (&[0xfb], Op::Sti, Operand::None, 0),
            (&[0x9c], Op::Pushf, Operand::None, 8),
            (&[0x66, 0x9d], Op::Popf, Operand::None, 2),
            (&[0xf4], Op::Hlt, Operand::None, 0),
            (&[0x0f, 0x22, 0xdf], Op::MovToCr3, Operand::Reg(Gpr::Rdi), 8),
            (
                &[0x41, 0x0f, 0x20, 0xe4],
                Op::MovFromCr4,
                Operand::Reg(Gpr::R12),
                8,
            ),
            (
                &[0x44, 0x0f, 0x22, 0xc0],
                Op::MovToCr8,
                Operand::Reg(Gpr::Rax),
                8,
            ),
            (
                &[0x0f, 0x20, 0xd0],
                Op::MovFromCr2,
                Operand::Reg(Gpr::Rax),
                8,
            ),
            (
                &[0x0f, 0x23, 0xf8],
                Op::MovToDr,
                Operand::DebugReg {
                    dr: 7,
                    reg: Gpr::Rax,
                },
                8,
            ),
            (
                &[0x0f, 0x21, 0xc3],
                Op::MovFromDr,
                Operand::DebugReg {
                    dr: 0,
                    reg: Gpr::Rbx,
                },
                8,
            ),
            (&[0x0f, 0x32], Op::Rdmsr, Operand::None, 0),
            (&[0x0f, 0x30], Op::Wrmsr, Operand::None, 0),
            (&[0xe4, 0x71], Op::In, Operand::PortImm(0x71), 1),
            (&[0xed], Op::In, Operand::PortDx, 4),
            (&[0x66, 0xe7, 0x72], Op::Out, Operand::PortImm(0x72), 2),
            (&[0xe6, 0x80], Op::Out, Operand::PortImm(0x80), 1),
            (&[0xee], Op::Out, Operand::PortDx, 1),
            (
                &[0x0f, 0x01, 0x3f],
                Op::Invlpg,
                Operand::MemBase(Gpr::Rdi),
                0,
            ),
            (&[0x0f, 0x01, 0x7f, 0x08], Op::Invlpg, Operand::MemOther, 0),
            (
                &[0x0f, 0x01, 0x3c, 0x24],
                Op::Invlpg,
                Operand::MemBase(Gpr::Rsp),
                0,
            ),
            (
                &[0x66, 0x0f, 0x38, 0x82, 0x3e],
                Op::Invpcid,
                Operand::RegMemBase {
                    reg: Gpr::Rdi,
                    base: Gpr::Rsi,
                },
                0,
            ),
            (&[0x0f, 0x09], Op::Wbinvd, Operand::None, 0),
            (&[0x0f, 0x08], Op::Invd, Operand::None, 0),
            (&[0x0f, 0xa2], Op::Cpuid, Operand::None, 0),
            (&[0x0f, 0x01, 0x17], Op::Lgdt, Operand::MemBase(Gpr::Rdi), 0),
            (&[0x0f, 0x01, 0x1f], Op::Lidt, Operand::MemBase(Gpr::Rdi), 0),
            (&[0x0f, 0x00, 0xd7], Op::Lldt, Operand::Reg(Gpr::Rdi), 2),
            (&[0x0f, 0x00, 0xdf], Op::Ltr, Operand::Reg(Gpr::Rdi), 2),
            (&[0x0f, 0x01, 0x07], Op::Sgdt, Operand::MemBase(Gpr::Rdi), 0),
            (&[0x0f, 0x01, 0x0f], Op::Sidt, Operand::MemBase(Gpr::Rdi), 0),
            (&[0x0f, 0x00, 0xc0], Op::Sldt, Operand::Reg(Gpr::Rax), 4),
            (&[0x0f, 0x00, 0xc8], Op::Str, Operand::Reg(Gpr::Rax), 4),
            (
                &[0x48, 0x0f, 0x01, 0xe0],
                Op::Smsw,
                Operand::Reg(Gpr::Rax),
                8,
            ),
            (&[0x0f, 0x06], Op::Clts, Operand::None, 0),
            (&[0x0f, 0x01, 0xf8], Op::Swapgs, Operand::None, 0),
            (&[0x0f, 0x31], Op::Rdtsc, Operand::None, 0),
            (&[0x0f, 0x01, 0xf9], Op::Rdtscp, Operand::None, 0),
            (&[0x0f, 0x33], Op::Rdpmc, Operand::None, 0),
            (&[0x48, 0xcf], Op::Iretq, Operand::None, 0),
            (&[0x48, 0x0f, 0x07], Op::Sysretq, Operand::None, 0),
            (&[0x0f, 0x07], Op::Sysretl, Operand::None, 0),
            (&[0x0f, 0x01, 0xd1], Op::Xsetbv, Operand::None, 0),
            (&[0x0f, 0x01, 0xc1], Op::Vmcall, Operand::None, 0),
            (&[0x0f, 0x01, 0xd9], Op::Vmmcall, Operand::None, 0),
            (&[0xf3, 0x0f, 0x01, 0xd9], Op::Vmgexit, Operand::None, 0),
        ];
        for (bytes, op, operand, width) in cases {
            let got = one(bytes).unwrap_or_else(|| panic!("{bytes:02x?} not classified"));
            assert_eq!(
                (got.op, got.operand, got.width),
                (*op, *operand, *width),
                "{bytes:02x?}"
            );
            // Every classified instruction is a form the ABI accepts for its op.
            assert!(patch_sites::op::check_operand(got.op, got.operand, got.width).is_ok());
        }
        let rep = one(&[0xf3, 0x6c]).unwrap();
        assert_eq!((rep.op, rep.width, rep.rep), (Op::Ins, 1, true));
        let outs = one(&[0x66, 0x6f]).unwrap();
        assert_eq!((outs.op, outs.width, outs.rep), (Op::Outs, 2, false));
    }

    #[test]
    fn register_numbers() {
        assert_eq!(gpr(Register::RAX), Some(Gpr::Rax));
        assert_eq!(gpr(Register::R15D), Some(Gpr::R15));
        assert_eq!(gpr(Register::DIL), Some(Gpr::Rdi));
        assert_eq!(gpr(Register::R8W), Some(Gpr::R8));
        assert_eq!(gpr(Register::AH), None);
        assert_eq!(gpr(Register::CR3), None);
        assert_eq!((reg_width(Register::AL), reg_width(Register::R9W)), (1, 2));
        assert_eq!((reg_width(Register::ESP), reg_width(Register::R12)), (4, 8));
        assert!(is_gpr64(Register::R15) && !is_gpr64(Register::RIP));
    }

    #[test]
    fn ordinary_instructions_are_not_sensitive() {
        for bytes in [
            &[0x48, 0x89, 0xf8][..],
            &[0x90],
            &[0xc3],
            &[0x0f, 0x0b],
            &[0xcc],
        ] {
            assert_eq!(one(bytes), None, "{bytes:02x?}");
        }
    }
}
