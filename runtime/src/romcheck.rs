//! Validating a backend ROM completely before anything of it is used.
//!
//! `patch_sites::Rom::parse` has checked the structure and the checksum. This module decodes
//! every template and entry point with iced-x86 and refuses the ROM if any instruction does not
//! decode, a template or entry point leaves itself (a branch outside its own bytes, an indirect
//! branch, a return from an inline template), an instruction is one its op does not allow (any
//! hypervisor call, any other sensitive or system instruction), a template does not fit the room
//! of a site of its op, or a call does not fit one. A ROM is used whole or not at all.

use core::fmt;

use iced_x86::{Instruction, Mnemonic, OpKind};
use patch_sites::Op;
use patch_sites::op::Kind;
use patch_sites::rom::{Rom, RomAction};
use patch_sites::table::SiteTable;

use crate::check::decode_at;
use crate::classify::classify;
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
                }
                RomAction::Call { .. } if site.site_len < 5 => {
                    return Err(RomRefusal::NoRoomForCall {
                        op,
                        addr: site.addr,
                        room: site.site_len,
                    });
                }
                _ => {}
            }
        }
    }
    Ok(())
}
