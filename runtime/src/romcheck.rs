//! Validating a backend ROM completely before anything of it is used.
//!
//! `patch_sites::Rom::parse` has checked the structure and the checksum. This module decodes
//! every template and entry point with iced-x86 and refuses the ROM if any instruction does not
//! decode, a template or entry point leaves itself (a branch outside its own bytes, an indirect
//! branch, a return from an inline template), an instruction is one its op does not allow (any
//! hypervisor call, any other sensitive or system instruction), a template does not fit the room
//! of a site of its op, or a call does not fit one. A ROM is used whole or not at all.

use core::fmt;

use iced_x86::{Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register};
use patch_sites::op::Kind;
use patch_sites::rom::{Rom, RomAction};
use patch_sites::table::SiteTable;
use patch_sites::{Gpr, Op, RegSet};

use crate::check::decode_at;
use crate::classify::{classify, gpr};
use crate::template::{SubstError, Template};

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
    /// A template does not fit a site of its op.
    TooLong {
        /// The op.
        op: Op,
        /// The site.
        addr: u64,
        /// Bytes needed.
        need: u8,
        /// Room.
        room: u8,
    },
    /// A call does not fit a site of its op (5 bytes).
    NoRoomForCall {
        /// The op.
        op: Op,
        /// The site.
        addr: u64,
        /// Room.
        room: u8,
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

/// What is wrong with one instruction of a ROM.
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
            CodeProblem::ControlTransfer(m) => write!(f, "is a control transfer ({m:?})"),
            CodeProblem::HypervisorCall(m) => write!(f, "is a hypervisor call ({m:?})"),
            CodeProblem::OtherSensitive(op) => write!(f, "is {op}, which this op does not allow"),
            CodeProblem::Forbidden(m) => write!(f, "is a forbidden system instruction ({m:?})"),
            CodeProblem::FallsOffTheEnd => f.write_str("can run off its end"),
            CodeProblem::Clobbers(r) => write!(
                f,
                "writes {}, which the entry neither defines nor declares clobbered",
                r.name()
            ),
            CodeProblem::ClobbersFlags => {
                f.write_str("changes flags the entry neither defines nor declares clobbered")
            }
            CodeProblem::WritesRegister(r) => write!(f, "writes {r:?}"),
            CodeProblem::WritesMemory => f.write_str("writes memory other than the stack"),
            CodeProblem::MovesTheStack => {
                f.write_str("moves the stack pointer other than by push, pop, call or ret")
            }
            CodeProblem::UnbalancedStack => f.write_str("does not leave the stack as it found it"),
        }
    }
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
            RomRefusal::TooLong {
                op,
                addr,
                need,
                room,
            } => write!(
                f,
                "the {op} template is {need} bytes but the site at {addr:#x} has room for {room}"
            ),
            RomRefusal::NoRoomForCall { op, addr, room } => write!(
                f,
                "{op} is a call (5 bytes) but the site at {addr:#x} has room for {room}"
            ),
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

/// Sensitive instructions a template of `op` may contain: the op's own.
fn allowed(op: Op, found: Op) -> bool {
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

/// Checks every instruction of `code` (at offset `base` of the ROM) for `op`. An inline template
/// may branch only within itself and may not return; an entry point may also call within
/// itself and must end in `ret` or a branch.
fn check_code(op: Op, code: &[u8], entry_point: bool) -> Result<(), RomRefusal> {
    let bad = |offset: usize, problem| RomRefusal::Code {
        op,
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

/// Checks what `code` (a template instantiated for a site, or an entry point) changes besides
/// its op's own instructions, whose effects are the op's: no register outside `may`, no flags
/// unless `may` has them, no memory but pushes, no stack switch, and the stack as it found it
/// (an entry point's `ret` pops the return address its call pushed). Straight-line accounting:
/// the code may branch only within itself, forward or back, and every path is checked
/// instruction by instruction.
fn effects(
    op: Op,
    site: &patch_sites::table::Site,
    code: &[u8],
    may: RegSet,
    entry_point: bool,
) -> Result<(), RomRefusal> {
    let bad = |offset: usize, problem| RomRefusal::Code {
        op,
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

/// What an entry may change at `site`: the op's outputs for the site's operand, what the op
/// leaves undefined, and what the entry declares it clobbers. (Whether the site's code allows
/// those clobbers is the planner's business: a site that does not falls back to native.)
fn may_change(op: Op, site: &patch_sites::table::Site, clobbers: RegSet) -> RegSet {
    op.outputs(site.operand)
        .union(op.info().undefined)
        .union(clobbers)
}

/// Every instruction of `code` that is the op itself must act on the site's operand and width.
fn same_operands(op: Op, site: &patch_sites::table::Site, code: &[u8]) -> Result<(), RomRefusal> {
    let own = if op == Op::IoDelay { Op::Out } else { op };
    let mut at = 0;
    while at < code.len() {
        let Ok(i) = decode_at(code, 0, at) else { break };
        if let Some(c) = classify(&i)
            && c.op == own
            && (c.operand != site.operand || c.width != site.width)
        {
            return Err(RomRefusal::WrongOperand {
                op,
                addr: site.addr,
            });
        }
        at += i.len();
    }
    Ok(())
}

/// Checks every template and entry point of `rom` on its own (what `pvpatch rom build` can
/// check without a kernel).
pub fn validate_code(rom: &Rom<'_>) -> Result<(), RomRefusal> {
    for e in rom.entries() {
        // Entries for ops this runtime does not know are ignored, as the format says.
        let Some(op) = e.op() else { continue };
        if op.info().kind != Kind::Instruction && op.info().kind != Kind::Idiom {
            return Err(RomRefusal::OpNotPatchable(op));
        }
        match e.action {
            RomAction::Inline { template, .. } => check_code(op, template, false)?,
            RomAction::Call { code, .. } => check_code(op, code, true)?,
            RomAction::Nothing | RomAction::Native => {}
        }
    }
    Ok(())
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
    for e in rom.entries() {
        let Some(op) = e.op() else { continue };
        for site in table.sites().filter(|s| s.op() == Some(op)) {
            match e.action {
                RomAction::Inline { template, slots } => {
                    let t = Template {
                        bytes: template,
                        slots,
                        clobbers: e.clobbers,
                    };
                    let seq = t.instantiate(&site).map_err(|error| RomRefusal::Operand {
                        op,
                        addr: site.addr,
                        error,
                    })?;
                    if seq.len() > site.site_len as usize {
                        return Err(RomRefusal::TooLong {
                            op,
                            addr: site.addr,
                            need: seq.len() as u8,
                            room: site.site_len,
                        });
                    }
                    check_code(op, seq.as_slice(), false)?;
                    same_operands(op, &site, seq.as_slice())?;
                    effects(
                        op,
                        &site,
                        seq.as_slice(),
                        may_change(op, &site, e.clobbers),
                        false,
                    )?;
                }
                RomAction::Call { .. } if site.site_len < 5 => {
                    return Err(RomRefusal::NoRoomForCall {
                        op,
                        addr: site.addr,
                        room: site.site_len,
                    });
                }
                RomAction::Call { code, .. } => {
                    // The entry point runs with the site's registers: its own instruction must
                    // use the site's operand, and it may change only what the site allows.
                    same_operands(op, &site, code)?;
                    effects(op, &site, code, may_change(op, &site, e.clobbers), true)?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `effects` with `may` beyond the op's fixed outputs.
    fn fx(op: Op, code: &[u8], may: RegSet, entry: bool) -> Result<(), CodeProblem> {
        let site = patch_sites::table::Site {
            addr: 0,
            site_len: 16,
            insn_len: 1,
            op_id: op.id(),
            form: patch_sites::table::Form::Native,
            operand: patch_sites::Operand::None,
            width: 8,
            flags: 0,
            clobbers: RegSet::EMPTY,
            stub: None,
        };
        effects(op, &site, code, may.union(op.info().writes), entry).map_err(|e| match e {
            RomRefusal::Code { problem, .. } => problem,
            other => panic!("{other}"),
        })
    }

    const NONE: RegSet = RegSet::EMPTY;

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
}
