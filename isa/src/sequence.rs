//! Checks of instruction sequences that a backend puts at a site or calls from one (a ROM's
//! templates and entry points): what may be in them, and what they may change. The runtime's
//! ROM validator applies them to every template and entry point before a ROM is used; `pvpatch
//! rom build` applies them before a ROM is written.
//!
//! * [`check_code`]: every instruction decodes, stays inside the sequence (no branch out, no
//!   indirect branch, no return from an inline template), and is one the op allows (never a
//!   hypervisor call, another op's sensitive instruction, or a system instruction no op allows);
//! * [`effects`]: no register, flag or memory changed beyond what the sequence may change, and
//!   the stack left as the op leaves it;
//! * [`same_operands`]: the op's own instruction in the sequence acts on the site's operand.

use core::fmt;

use iced_x86::{
    FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};
use patch_sites::op::Kind;
use patch_sites::table::Site;
use patch_sites::{Gpr, Op, Operand, RegSet};

use crate::check::{decode_at, reg_is};
use crate::classify::{classify, gpr};
use crate::names::Name;

/// One instruction of a sequence that is not allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadInsn {
    /// Its offset in the sequence.
    pub offset: u32,
    /// What is wrong with it.
    pub problem: CodeProblem,
}

/// What is wrong with one instruction of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeProblem {
    /// It does not decode.
    Undecodable,
    /// A branch leaves the template or entry point.
    LeavesItself,
    /// An indirect branch (its target cannot be checked).
    IndirectBranch,
    /// A return, interrupt or system call where none may be.
    ControlTransfer(Mnemonic),
    /// A hypervisor call.
    HypervisorCall(Mnemonic),
    /// A sensitive instruction of another op.
    OtherSensitive(Op),
    /// A system instruction no op allows.
    Forbidden(Mnemonic),
    /// The entry point can run off its end.
    FallsOffTheEnd,
    /// It writes a register the entry neither defines nor declares as clobbered.
    Clobbers(Gpr),
    /// It changes flags the entry neither defines nor declares as clobbered.
    ClobbersFlags,
    /// It writes a register other than a general-purpose one (segment, vector, control, ...).
    WritesRegister(Register),
    /// It writes memory other than by pushing onto the stack.
    WritesMemory,
    /// It moves the stack pointer other than by push, pop, call and ret.
    MovesTheStack,
    /// The code does not leave the stack as it found it.
    UnbalancedStack,
}

impl fmt::Display for CodeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodeProblem::Undecodable => f.write_str("does not decode"),
            CodeProblem::LeavesItself => f.write_str("branches outside its own bytes"),
            CodeProblem::IndirectBranch => f.write_str("is an indirect branch"),
            CodeProblem::ControlTransfer(m) => {
                write!(f, "is a control transfer ({})", Name(*m))
            }
            CodeProblem::HypervisorCall(m) => {
                write!(f, "is a hypervisor call ({})", Name(*m))
            }
            CodeProblem::OtherSensitive(op) => write!(f, "is {op}, which this op does not allow"),
            CodeProblem::Forbidden(m) => {
                write!(f, "is a forbidden system instruction ({})", Name(*m))
            }
            CodeProblem::FallsOffTheEnd => f.write_str("can run off its end"),
            CodeProblem::Clobbers(r) => write!(
                f,
                "writes {}, which the entry neither defines nor declares clobbered",
                r.name()
            ),
            CodeProblem::ClobbersFlags => {
                f.write_str("changes flags the entry neither defines nor declares clobbered")
            }
            CodeProblem::WritesRegister(r) => write!(f, "writes {}", Name(*r)),
            CodeProblem::WritesMemory => f.write_str("writes memory other than the stack"),
            CodeProblem::MovesTheStack => {
                f.write_str("moves the stack pointer other than by push, pop, call or ret")
            }
            CodeProblem::UnbalancedStack => f.write_str("does not leave the stack as it found it"),
        }
    }
}

/// Sensitive instructions a sequence for `op` may contain: the op's own.
pub fn allowed(op: Op, found: Op) -> bool {
    found == op
        || match op {
            Op::IoDelay => found == Op::Out,
            Op::SaveFl => found == Op::Pushf,
            Op::RestoreFl => found == Op::Popf,
            Op::SafeHalt => matches!(found, Op::Sti | Op::Hlt),
            _ => false,
        }
}

/// System instructions no template or entry point may contain: virtualization, enclave and
/// confidential-computing instructions, monitor/mwait, segment and privilege changes.
fn forbidden(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Vmlaunch
            | Vmresume
            | Vmptrld
            | Vmptrst
            | Vmread
            | Vmwrite
            | Vmxon
            | Vmxoff
            | Vmclear
            | Invept
            | Invvpid
            | Vmfunc
            | Vmrun
            | Vmload
            | Vmsave
            | Stgi
            | Clgi
            | Skinit
            | Invlpga
            | Getsec
            | Rsm
            | Monitor
            | Mwait
            | Monitorx
            | Mwaitx
            | Encls
            | Enclu
            | Enclv
            | Lmsw
            | Wrfsbase
            | Wrgsbase
            | Stac
            | Clac
            | Xrstors
            | Xsaves
            | Wrpkru
            | Pconfig
            | Seamcall
            | Seamops
            | Seamret
            | Tdcall
            | Rmpadjust
            | Pvalidate
            | Rmpupdate
            | Psmash
            | Lgs
            | Lfs
            | Lss
            | Ltr
            | Lldt
            | Arpl
            | Umonitor
            | Umwait
            | Tpause
            | Uiret
            | Senduipi
            | Clui
            | Stui
            | Wrmsrns
            | Wrmsrlist
            | Rdmsrlist
    )
}

fn is_return_or_trap(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Ret | Retf
            | Iret
            | Iretd
            | Iretq
            | Int
            | Int1
            | Int3
            | Into
            | Syscall
            | Sysenter
            | Sysexit
            | Sysexitq
            | Sysret
            | Sysretq
            | Ud0
            | Ud1
            | Ud2
            | Hlt
    )
}

fn is_branch(i: &Instruction) -> bool {
    matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    ) || matches!(i.mnemonic(), Mnemonic::Jmp | Mnemonic::Call)
}

/// Checks every instruction of `code` (a sequence for `op`, decoded at offset 0). An inline template
/// may branch only within itself and may not return; an entry point may also call within
/// itself and must end in `ret` or a branch.
pub fn check_code(op: Op, code: &[u8], entry_point: bool) -> Result<(), BadInsn> {
    let bad = |offset: usize, problem| BadInsn {
        offset: offset as u32,
        problem,
    };
    // Decoded at address 0, so that branch targets are offsets into the code.
    let mut at = 0;
    let mut last: Option<Instruction> = None;
    while at < code.len() {
        let i = decode_at(code, 0, at).map_err(|_| bad(at, CodeProblem::Undecodable))?;
        if at + i.len() > code.len() {
            return Err(bad(at, CodeProblem::Undecodable));
        }
        let m = i.mnemonic();
        if let Some(c) = classify(&i) {
            if c.op.info().kind == Kind::HypervisorInterface {
                return Err(bad(at, CodeProblem::HypervisorCall(m)));
            }
            if !allowed(op, c.op) {
                return Err(bad(at, CodeProblem::OtherSensitive(c.op)));
            }
        }
        if matches!(m, Mnemonic::Vmcall | Mnemonic::Vmmcall | Mnemonic::Vmgexit) {
            return Err(bad(at, CodeProblem::HypervisorCall(m)));
        }
        if forbidden(m) {
            return Err(bad(at, CodeProblem::Forbidden(m)));
        }
        let hlt_allowed = m == Mnemonic::Hlt && allowed(op, Op::Hlt);
        let ret_allowed = entry_point && m == Mnemonic::Ret && i.op0_kind() != OpKind::Immediate16;
        if is_return_or_trap(m) && !hlt_allowed && !ret_allowed {
            return Err(bad(at, CodeProblem::ControlTransfer(m)));
        }
        if is_branch(&i) {
            if !matches!(
                i.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            ) {
                return Err(bad(at, CodeProblem::IndirectBranch));
            }
            if m == Mnemonic::Call && !entry_point {
                return Err(bad(at, CodeProblem::ControlTransfer(m)));
            }
            let target = i.near_branch_target();
            // An inline template may branch to its own end (where the site's padding follows).
            let limit = if entry_point {
                code.len() as u64
            } else {
                code.len() as u64 + 1
            };
            if target >= limit {
                return Err(bad(at, CodeProblem::LeavesItself));
            }
        }
        at += i.len();
        last = Some(i);
    }
    if entry_point {
        let ends =
            last.is_some_and(|i| i.mnemonic() == Mnemonic::Ret || i.mnemonic() == Mnemonic::Jmp);
        if !ends {
            return Err(bad(code.len(), CodeProblem::FallsOffTheEnd));
        }
    }
    Ok(())
}

/// Whether `code` (an inline sequence, placed at address 0) touches the stack or the kernel's
/// per-CPU segment: pushes, pops, `leave`, calls, returns, traps or interrupts, names `rsp` (as
/// a register or an address's base or index), or addresses memory through `fs` or `gs`. Such a
/// sequence must not run where there may be no usable stack and the user's `gs` (a site with
/// `SITE_FLAG_NO_STACK`). Code that does not decode counts as touching it.
pub fn uses_stack(code: &[u8]) -> bool {
    let mut at = 0;
    while at < code.len() {
        let Ok(i) = decode_at(code, 0, at) else {
            return true;
        };
        let names_rsp = |r: Register| r != Register::None && r.full_register() == Register::RSP;
        let touches = i.stack_pointer_increment() != 0
            || i.is_stack_instruction()
            || matches!(i.segment_prefix(), Register::FS | Register::GS)
            || matches!(
                i.flow_control(),
                FlowControl::Call
                    | FlowControl::IndirectCall
                    | FlowControl::Return
                    | FlowControl::Interrupt
                    | FlowControl::Exception
                    | FlowControl::XbeginXabortXend
            )
            || names_rsp(i.memory_base())
            || names_rsp(i.memory_index())
            || (0..i.op_count())
                .any(|k| i.op_kind(k) == OpKind::Register && names_rsp(i.op_register(k)));
        if touches {
            return true;
        }
        at += i.len();
    }
    false
}

/// Checks what `code` (a template instantiated for a site, or an entry point) changes besides
/// its op's own instructions, whose effects are the op's: no register outside `may`, no flags
/// unless `may` has them, no memory but pushes, no stack switch, and the stack as it found it
/// (an entry point's `ret` pops the return address its call pushed). Straight-line accounting:
/// the code may branch only within itself, forward or back, and every path is checked
/// instruction by instruction.
pub fn effects(
    op: Op,
    site: &Site,
    code: &[u8],
    may: RegSet,
    entry_point: bool,
) -> Result<(), BadInsn> {
    let bad = |offset: usize, problem| BadInsn {
        offset: offset as u32,
        problem,
    };
    let mut factory = InstructionInfoFactory::new();
    let mut depth: i64 = 0;
    let mut at = 0;
    while at < code.len() {
        let i = decode_at(code, 0, at).map_err(|_| bad(at, CodeProblem::Undecodable))?;
        let push_pop = i.stack_pointer_increment();
        depth += push_pop as i64;
        let own = classify(&i).is_some_and(|c| allowed(op, c.op));
        if !own {
            let info = factory.info(&i);
            for u in info.used_registers() {
                if !matches!(
                    u.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                ) {
                    continue;
                }
                match gpr(u.register()) {
                    Some(Gpr::Rsp) if push_pop != 0 => {}
                    Some(Gpr::Rsp) => return Err(bad(at, CodeProblem::MovesTheStack)),
                    Some(g) if may.has(g) => {}
                    Some(g) => return Err(bad(at, CodeProblem::Clobbers(g))),
                    None => return Err(bad(at, CodeProblem::WritesRegister(u.register()))),
                }
            }
            let writes_memory = info.used_memory().iter().any(|m| {
                matches!(
                    m.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
            });
            if writes_memory && push_pop >= 0 {
                return Err(bad(at, CodeProblem::WritesMemory));
            }
            if i.rflags_modified() != 0 && !may.contains(RegSet::FLAGS) {
                return Err(bad(at, CodeProblem::ClobbersFlags));
            }
        }
        at += i.len();
    }
    // The stack must end where the op leaves it: `pushf` and `popf` move it by their width
    // (found by the equivalence oracle: their templates were refused as unbalanced); an entry
    // point's `ret` pops its return address, and a call cannot push or pop for the caller.
    let own = match op {
        Op::Pushf => -(site.width as i64),
        Op::Popf => site.width as i64,
        _ => 0,
    };
    let balanced = if entry_point {
        depth == 8 && own == 0
    } else {
        depth == own
    };
    if !balanced {
        return Err(bad(code.len(), CodeProblem::UnbalancedStack));
    }
    Ok(())
}

/// What a rewrite of a site of `op` with `operand` may change: the op's outputs for that
/// operand, what the op leaves undefined, and `extra` (what the code around the site lets a
/// rewrite clobber, or what a backend's sequence declares it clobbers).
pub fn may_change(op: Op, operand: Operand, extra: RegSet) -> RegSet {
    op.outputs(operand).union(op.info().undefined).union(extra)
}

/// Whether every instruction of `code` that is the op itself acts on the site's operand and
/// width.
pub fn same_operands(op: Op, site: &Site, code: &[u8]) -> bool {
    let own = if op == Op::IoDelay { Op::Out } else { op };
    let mut at = 0;
    let mut prev: Option<Instruction> = None;
    while at < code.len() {
        let Ok(i) = decode_at(code, 0, at) else { break };
        if let Some(c) = classify(&i)
            && c.op == own
            && (c.operand != site.operand || c.width != site.width)
        {
            return false;
        }
        // An idiom's pair names the site's register: `pushfq; pop r` for save_fl, `push r;
        // popfq` for restore_fl (found by cargo-mutants: a save_fl template popping into a
        // register it declared clobbered, leaving the site's untouched, passed).
        if let (Some(p), Operand::Reg(r)) = (prev, site.operand) {
            let other = |reg: Register| !reg_is(reg, r);
            let wrong = match op {
                Op::SaveFl => {
                    p.mnemonic() == Mnemonic::Pushfq
                        && i.mnemonic() == Mnemonic::Pop
                        && other(i.op0_register())
                }
                Op::RestoreFl => {
                    p.mnemonic() == Mnemonic::Push
                        && i.mnemonic() == Mnemonic::Popfq
                        && other(p.op0_register())
                }
                _ => false,
            };
            if wrong {
                return false;
            }
        }
        prev = Some(i);
        at += i.len();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `effects` with `may` beyond the op's fixed outputs.
    fn fx(op: Op, code: &[u8], may: RegSet, entry: bool) -> Result<(), CodeProblem> {
        let site = Site {
            addr: 0,
            site_len: 16,
            insn_len: 1,
            op_id: op.id(),
            form: patch_sites::table::Form::Native,
            operand: Operand::None,
            width: 8,
            flags: 0,
            clobbers: RegSet::EMPTY,
            stub: None,
        };
        effects(op, &site, code, may.union(op.info().writes), entry).map_err(|e| e.problem)
    }

    const NONE: RegSet = RegSet::EMPTY;

    #[test]
    fn stack_use_is_every_push_pop_call_trap_and_mention_of_rsp() {
        // Stack-free: nothing; mov rax, cr3 (0f 20 d8); xor eax, eax; a NOP; out 0x80, al.
        for code in [
            &[][..],
            &[0x0f, 0x20, 0xd8],
            &[0x31, 0xc0],
            &[0x90],
            &[0xe6, 0x80],
        ] {
            assert!(!uses_stack(code), "{code:02x?}");
        }
        for code in [
            &[0x50][..],                                    // push rax
            &[0x58],                                        // pop rax
            &[0x9c],                                        // pushfq
            &[0x9d],                                        // popfq
            &[0xe8, 0, 0, 0, 0],                            // call
            &[0xc3],                                        // ret
            &[0xcc],                                        // int3
            &[0x0f, 0x0b],                                  // ud2
            &[0x48, 0x89, 0xe0],                            // mov rax, rsp
            &[0x48, 0x8b, 0x04, 0x24],                      // mov rax, [rsp]
            &[0x48, 0x8b, 0x04, 0x64], // mov rax, [rsp + riz*2]: not an index; base rsp
            &[0x48, 0x83, 0xec, 0x08], // sub rsp, 8
            &[0x0f, 0x20, 0xd8, 0x0f], // mov rax, cr3; then a truncated instruction
            &[0xc9],                   // leave
            &[0x65, 0x48, 0x8b, 0x04, 0x25, 0x10, 0, 0, 0], // mov rax, gs:[0x10]
        ] {
            assert!(uses_stack(code), "{code:02x?}");
        }
    }

    #[test]
    fn the_ops_own_instructions_are_its_effects() {
        // cpuid writes eax..edx: its outputs, not clobbers.
        assert_eq!(fx(Op::Cpuid, &[0x0f, 0xa2], NONE, false), Ok(()));
        // pushfq and popfq move the stack by their width, inline; never from a call.
        assert_eq!(fx(Op::Pushf, &[0x9c], NONE, false), Ok(()));
        assert_eq!(fx(Op::Popf, &[0x9d], NONE, false), Ok(()));
        assert_eq!(
            fx(Op::Pushf, &[0x9c, 0xc3], NONE, true),
            Err(CodeProblem::UnbalancedStack)
        );
        assert_eq!(
            fx(Op::Cli, &[0x9c, 0xfa], NONE, false),
            Err(CodeProblem::UnbalancedStack)
        );
        // pushfq; pop rcx for save_fl into rcx.
        let rcx = RegSet::reg(Gpr::Rcx);
        assert_eq!(fx(Op::SaveFl, &[0x9c, 0x59], rcx, false), Ok(()));
        // ... but not into rdx.
        assert_eq!(
            fx(Op::SaveFl, &[0x9c, 0x5a], rcx, false),
            Err(CodeProblem::Clobbers(Gpr::Rdx))
        );
        // An entry point: rdtsc; ret.
        assert_eq!(fx(Op::Rdtsc, &[0x0f, 0x31, 0xc3], NONE, true), Ok(()));
    }

    #[test]
    fn undeclared_effects_are_refused() {
        // xor esi, esi: rsi, and flags.
        assert_eq!(
            fx(Op::Cpuid, &[0x31, 0xf6], RegSet::FLAGS, false),
            Err(CodeProblem::Clobbers(Gpr::Rsi))
        );
        let rsi = RegSet::reg(Gpr::Rsi);
        assert_eq!(
            fx(Op::Cpuid, &[0x31, 0xf6], rsi, false),
            Err(CodeProblem::ClobbersFlags)
        );
        assert_eq!(
            fx(Op::Cpuid, &[0x31, 0xf6], rsi.union(RegSet::FLAGS), false),
            Ok(())
        );
        // mov [rax], ebx
        assert_eq!(
            fx(Op::Cpuid, &[0x89, 0x18], NONE, false),
            Err(CodeProblem::WritesMemory)
        );
        // mov [rsp+8], rax: the caller's stack
        assert_eq!(
            fx(Op::Cpuid, &[0x48, 0x89, 0x44, 0x24, 0x08], NONE, false),
            Err(CodeProblem::WritesMemory)
        );
        // mov rsp, rax
        assert_eq!(
            fx(Op::Cpuid, &[0x48, 0x89, 0xc4], NONE, false),
            Err(CodeProblem::MovesTheStack)
        );
        // mov ds, ax
        assert_eq!(
            fx(Op::Cpuid, &[0x8e, 0xd8], NONE, false),
            Err(CodeProblem::WritesRegister(Register::DS))
        );
        // push rax with no pop: the stack is left 8 bytes lower.
        assert_eq!(
            fx(Op::Cpuid, &[0x50], NONE, false),
            Err(CodeProblem::UnbalancedStack)
        );
        // push rax; pop rax is balanced (and rewrites rax with its own value, still a write).
        assert_eq!(
            fx(Op::Cpuid, &[0x50, 0x58], NONE, false),
            Ok(()),
            "rax is an output of cpuid"
        );
        // An entry point that returns with something left on the stack.
        assert_eq!(
            fx(Op::Rdtsc, &[0x50, 0x0f, 0x31, 0xc3], NONE, true),
            Err(CodeProblem::UnbalancedStack)
        );
    }

    #[test]
    fn an_idioms_pair_must_name_the_sites_register() {
        let site = |op: Op, r: Gpr| Site {
            addr: 0,
            site_len: 8,
            insn_len: 2,
            op_id: op.id(),
            form: patch_sites::table::Form::Native,
            operand: Operand::Reg(r),
            width: 8,
            flags: 0,
            clobbers: RegSet::EMPTY,
            stub: None,
        };
        // pushfq; pop rbx / pop rax, for save_fl into rbx.
        assert!(same_operands(
            Op::SaveFl,
            &site(Op::SaveFl, Gpr::Rbx),
            &[0x9c, 0x5b]
        ));
        assert!(!same_operands(
            Op::SaveFl,
            &site(Op::SaveFl, Gpr::Rbx),
            &[0x9c, 0x58]
        ));
        // push r9 / push rdi; popfq, for restore_fl from r9.
        let r9 = site(Op::RestoreFl, Gpr::R9);
        assert!(same_operands(Op::RestoreFl, &r9, &[0x41, 0x51, 0x9d]));
        assert!(!same_operands(Op::RestoreFl, &r9, &[0x57, 0x9d]));
    }
}
