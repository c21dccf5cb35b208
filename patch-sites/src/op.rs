//! The op catalogue: every sensitive operation the ABI can name, with its stable numeric id,
//! the operand forms it takes, what it reads and writes, and what it may leave undefined.
//!
//! Ids are stable forever: a new op gets a new id, an id is never reused. A reader that meets an
//! id it does not know leaves that site native (see [`crate::table`]).

use crate::regs::{Gpr, RegSet};

/// How a site names the operand of its instruction. The numeric codes are the ABI's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    /// No explicit operand (`cli`, `wbinvd`, `rdmsr`, ...).
    None,
    /// A general-purpose register (`mov cr3, rdi`; `lldt di`; the output of `save_fl`).
    Reg(Gpr),
    /// An immediate port (`in al, 0x71`).
    PortImm(u8),
    /// The port in `dx` (`in al, dx`; `rep insb`).
    PortDx,
    /// A memory operand addressed by one base register only (`invlpg [rdi]`).
    MemBase(Gpr),
    /// Any other memory operand; such a site can only stay native or trap.
    MemOther,
    /// A debug register and a general-purpose register (`mov dr7, rax`).
    DebugReg {
        /// Debug register number, 0..=7.
        dr: u8,
        /// The general-purpose register.
        reg: Gpr,
    },
    /// A register and a base-only memory operand (`invpcid rax, [rdi]`).
    RegMemBase {
        /// The register operand.
        reg: Gpr,
        /// The base of the memory operand.
        base: Gpr,
    },
}

/// Numeric operand-kind codes, as stored in a site record.
pub mod operand_code {
    /// [`super::Operand::None`].
    pub const NONE: u8 = 0;
    /// [`super::Operand::Reg`].
    pub const REG: u8 = 1;
    /// [`super::Operand::PortImm`].
    pub const PORT_IMM: u8 = 2;
    /// [`super::Operand::PortDx`].
    pub const PORT_DX: u8 = 3;
    /// [`super::Operand::MemBase`].
    pub const MEM_BASE: u8 = 4;
    /// [`super::Operand::MemOther`].
    pub const MEM_OTHER: u8 = 5;
    /// [`super::Operand::DebugReg`].
    pub const DEBUG_REG: u8 = 6;
    /// [`super::Operand::RegMemBase`].
    pub const REG_MEM_BASE: u8 = 7;
    /// One past the largest code.
    pub const LIMIT: u8 = 8;
}

impl Operand {
    /// The operand-kind code stored in a record.
    pub const fn code(self) -> u8 {
        match self {
            Operand::None => operand_code::NONE,
            Operand::Reg(_) => operand_code::REG,
            Operand::PortImm(_) => operand_code::PORT_IMM,
            Operand::PortDx => operand_code::PORT_DX,
            Operand::MemBase(_) => operand_code::MEM_BASE,
            Operand::MemOther => operand_code::MEM_OTHER,
            Operand::DebugReg { .. } => operand_code::DEBUG_REG,
            Operand::RegMemBase { .. } => operand_code::REG_MEM_BASE,
        }
    }

    /// The record's `reg` byte (0xFF when unused).
    pub const fn reg_byte(self) -> u8 {
        match self {
            Operand::Reg(r) | Operand::MemBase(r) => r as u8,
            Operand::DebugReg { reg, .. } | Operand::RegMemBase { reg, .. } => reg as u8,
            _ => NO_REG,
        }
    }

    /// The record's `reg2` byte (0xFF when unused).
    pub const fn reg2_byte(self) -> u8 {
        match self {
            Operand::DebugReg { dr, .. } => dr,
            Operand::RegMemBase { base, .. } => base as u8,
            _ => NO_REG,
        }
    }

    /// The record's `port` field.
    pub const fn port_field(self) -> u16 {
        match self {
            Operand::PortImm(p) => p as u16,
            _ => 0,
        }
    }

    /// The bit of this operand's kind in an [`OperandKinds`] mask.
    pub const fn kind_bit(self) -> OperandKinds {
        OperandKinds(1 << self.code())
    }

    /// The registers the operand itself names (register operand, address base).
    pub const fn regs(self) -> RegSet {
        match self {
            Operand::Reg(r) | Operand::MemBase(r) => RegSet::reg(r),
            Operand::DebugReg { reg, .. } => RegSet::reg(reg),
            Operand::RegMemBase { reg, base } => RegSet::reg(reg).union(RegSet::reg(base)),
            Operand::PortDx => RegSet::reg(Gpr::Rdx),
            _ => RegSet::EMPTY,
        }
    }
}

/// The `reg`/`reg2` value meaning "no register".
pub const NO_REG: u8 = 0xFF;

/// A set of operand kinds an op accepts (bit `code` for each kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OperandKinds(pub u16);

impl OperandKinds {
    const fn bit(code: u8) -> u16 {
        1 << code
    }
    /// Only [`Operand::None`].
    pub const NONE: Self = Self(Self::bit(operand_code::NONE));
    /// Only [`Operand::Reg`].
    pub const REG: Self = Self(Self::bit(operand_code::REG));
    /// [`Operand::PortImm`] or [`Operand::PortDx`].
    pub const PORT: Self =
        Self(Self::bit(operand_code::PORT_IMM) | Self::bit(operand_code::PORT_DX));
    /// Only [`Operand::PortDx`].
    pub const PORT_DX: Self = Self(Self::bit(operand_code::PORT_DX));
    /// Only [`Operand::PortImm`].
    pub const PORT_IMM: Self = Self(Self::bit(operand_code::PORT_IMM));
    /// Any memory operand.
    pub const MEM: Self =
        Self(Self::bit(operand_code::MEM_BASE) | Self::bit(operand_code::MEM_OTHER));
    /// A register or any memory operand.
    pub const REG_OR_MEM: Self = Self(Self::REG.0 | Self::MEM.0);
    /// A debug register move.
    pub const DEBUG_REG: Self = Self(Self::bit(operand_code::DEBUG_REG));
    /// `invpcid`'s forms.
    pub const INVPCID: Self =
        Self(Self::bit(operand_code::REG_MEM_BASE) | Self::bit(operand_code::MEM_OTHER));

    /// Whether the kind with `code` is accepted.
    pub const fn allows_code(self, code: u8) -> bool {
        code < operand_code::LIMIT && self.0 & (1 << code) != 0
    }
}

/// A set of operand widths, in bytes, an op accepts (0 = the op has no width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Widths(pub u8);

impl Widths {
    /// No width (the record's width byte must be 0).
    pub const NONE: Self = Self(1);
    /// 1, 2 or 4 bytes (port I/O).
    pub const IO: Self = Self(2 | 4 | 8);
    /// 2 or 8 bytes (`pushf`/`popf` with and without an operand-size prefix).
    pub const STACK: Self = Self(4 | 16);
    /// 8 bytes only.
    pub const QWORD: Self = Self(16);
    /// 2 bytes only.
    pub const WORD: Self = Self(4);
    /// 1 byte only (`io_delay`: `out 0x80, al`).
    pub const BYTE: Self = Self(2);
    /// 2, 4 or 8 bytes (`str`, `sldt`, `smsw` to a register).
    pub const WORD_UP: Self = Self(4 | 8 | 16);

    /// Whether `width` (0, 1, 2, 4 or 8) is accepted.
    pub const fn allows(self, width: u8) -> bool {
        let bit = match width {
            0 => 1,
            1 => 2,
            2 => 4,
            4 => 8,
            8 => 16,
            _ => return false,
        };
        self.0 & bit != 0
    }
}

/// Which way the operand's register flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The op has no register operand.
    None,
    /// The register is read.
    In,
    /// The register is written.
    Out,
}

/// What an op is, for reports and for what may be done with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One sensitive instruction.
    Instruction,
    /// A short idiom of instructions that source-level macros emit as one site
    /// (`pushfq; pop reg`, `sti; hlt`, `out 0x80, al`).
    Idiom,
    /// An instruction that transfers control (iretq, sysret): a patch may only jump.
    ControlTransfer,
    /// An interface to a hypervisor (`vmcall`, ...): reported, never rewritten.
    HypervisorInterface,
}

/// The groups reports use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Group {
    Interrupts,
    ControlRegs,
    DebugRegs,
    Msr,
    PortIo,
    TlbCache,
    Cpuid,
    Descriptors,
    Segments,
    Counters,
    Return,
    Xcr,
    Hypervisor,
}

/// Everything the ABI says about one op.
#[derive(Clone, Copy, Debug)]
pub struct OpInfo {
    /// The op.
    pub op: Op,
    /// Its name in reports (the scan class name).
    pub name: &'static str,
    /// Its group.
    pub group: Group,
    /// Its kind.
    pub kind: Kind,
    /// Operand kinds the op accepts.
    pub operands: OperandKinds,
    /// Operand widths the op accepts.
    pub widths: Widths,
    /// Direction of the register operand.
    pub dir: Dir,
    /// Fixed registers the op reads (besides its operand).
    pub reads: RegSet,
    /// Fixed registers and flags the op defines (besides its operand).
    pub writes: RegSet,
    /// Registers and flags the op leaves undefined; a rewrite may clobber them.
    pub undefined: RegSet,
    /// Whether the op reads or writes memory at or below `rsp` (push/pop/`save_fl`).
    pub uses_stack: bool,
    /// The native instruction(s), as assembly text, for documentation and reports.
    pub native: &'static str,
    /// What the op does to the virtual CPU.
    pub effect: &'static str,
}

macro_rules! ops {
    ($( $var:ident = $id:literal, $name:literal, $group:ident, $kind:ident, $operands:ident, $widths:ident,
        $dir:ident, reads[$($r:ident),*], writes[$($w:ident),*] $(+ $wf:ident)?, undefined[$($u:ident),*],
        $stack:literal, $native:literal, $effect:literal; )*) => {
        /// An op of the catalogue. The discriminant is the stable id stored in site records
        /// and ROM entries.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(u16)]
        #[allow(missing_docs)]
        pub enum Op { $( $var = $id, )* }

        /// Every op, in id order.
        pub const ALL_OPS: &[Op] = &[ $( Op::$var, )* ];

        const INFOS: &[OpInfo] = &[ $( OpInfo {
            op: Op::$var,
            name: $name,
            group: Group::$group,
            kind: Kind::$kind,
            operands: OperandKinds::$operands,
            widths: Widths::$widths,
            dir: Dir::$dir,
            reads: RegSet::of(&[$(Gpr::$r),*]),
            writes: RegSet::of(&[$(Gpr::$w),*]) $(.union(RegSet::$wf))?,
            undefined: RegSet(0 $( | RegSet::$u.0 )*),
            uses_stack: $stack,
            native: $native,
            effect: $effect,
        }, )* ];

        impl Op {
            /// The op with stable id `id`, if this reader knows it.
            pub const fn from_id(id: u16) -> Option<Op> {
                match id { $( $id => Some(Op::$var), )* _ => None }
            }
        }
    };
}

ops! {
    Cli = 1, "cli", Interrupts, Instruction, NONE, NONE, None, reads[], writes[], undefined[], false,
        "cli", "IF := 0";
    Sti = 2, "sti", Interrupts, Instruction, NONE, NONE, None, reads[], writes[], undefined[], false,
        "sti", "IF := 1; interrupts are recognised after the next instruction";
    Pushf = 3, "pushf", Interrupts, Instruction, NONE, STACK, None, reads[Rsp], writes[Rsp], undefined[], true,
        "pushfq", "rsp -= width; [rsp] := RFLAGS (RF and VM read as 0)";
    Popf = 4, "popf", Interrupts, Instruction, NONE, STACK, None, reads[Rsp], writes[Rsp] + FLAGS, undefined[], true,
        "popfq", "RFLAGS := [rsp] (status flags, TF, IF, DF, NT, AC, ID at CPL 0); rsp += width";
    Hlt = 5, "hlt", Interrupts, Instruction, NONE, NONE, None, reads[], writes[], undefined[], false,
        "hlt", "stop the vCPU until the next interrupt, NMI or INIT";
    MovToCr0 = 6, "mov_to_cr0", ControlRegs, Instruction, REG, QWORD, In, reads[], writes[], undefined[FLAGS], false,
        "mov cr0, reg", "CR0 := reg";
    MovFromCr0 = 7, "mov_from_cr0", ControlRegs, Instruction, REG, QWORD, Out, reads[], writes[], undefined[FLAGS], false,
        "mov reg, cr0", "reg := CR0";
    MovToCr2 = 8, "mov_to_cr2", ControlRegs, Instruction, REG, QWORD, In, reads[], writes[], undefined[FLAGS], false,
        "mov cr2, reg", "CR2 := reg";
    MovFromCr2 = 9, "mov_from_cr2", ControlRegs, Instruction, REG, QWORD, Out, reads[], writes[], undefined[FLAGS], false,
        "mov reg, cr2", "reg := CR2 (the last page-fault address)";
    MovToCr3 = 10, "mov_to_cr3", ControlRegs, Instruction, REG, QWORD, In, reads[], writes[], undefined[FLAGS], false,
        "mov cr3, reg", "CR3 := reg; non-global TLB entries of the PCID are flushed unless bit 63 is set";
    MovFromCr3 = 11, "mov_from_cr3", ControlRegs, Instruction, REG, QWORD, Out, reads[], writes[], undefined[FLAGS], false,
        "mov reg, cr3", "reg := CR3";
    MovToCr4 = 12, "mov_to_cr4", ControlRegs, Instruction, REG, QWORD, In, reads[], writes[], undefined[FLAGS], false,
        "mov cr4, reg", "CR4 := reg; toggling PGE, PCIDE or PAE flushes the TLB";
    MovFromCr4 = 13, "mov_from_cr4", ControlRegs, Instruction, REG, QWORD, Out, reads[], writes[], undefined[FLAGS], false,
        "mov reg, cr4", "reg := CR4";
    MovToCr8 = 14, "mov_to_cr8", ControlRegs, Instruction, REG, QWORD, In, reads[], writes[], undefined[FLAGS], false,
        "mov cr8, reg", "TPR := reg[3:0]";
    MovFromCr8 = 15, "mov_from_cr8", ControlRegs, Instruction, REG, QWORD, Out, reads[], writes[], undefined[FLAGS], false,
        "mov reg, cr8", "reg := TPR";
    MovToDr = 16, "mov_to_dr", DebugRegs, Instruction, DEBUG_REG, QWORD, In, reads[], writes[], undefined[FLAGS], false,
        "mov drN, reg", "DRn := reg";
    MovFromDr = 17, "mov_from_dr", DebugRegs, Instruction, DEBUG_REG, QWORD, Out, reads[], writes[], undefined[FLAGS], false,
        "mov reg, drN", "reg := DRn";
    Rdmsr = 18, "rdmsr", Msr, Instruction, NONE, NONE, None, reads[Rcx], writes[Rax, Rdx], undefined[], false,
        "rdmsr", "edx:eax := MSR[ecx] (upper halves of rax, rdx zeroed); #GP for an unknown MSR";
    Wrmsr = 19, "wrmsr", Msr, Instruction, NONE, NONE, None, reads[Rcx, Rax, Rdx], writes[], undefined[], false,
        "wrmsr", "MSR[ecx] := edx:eax; #GP for an unknown MSR or a reserved value";
    In = 20, "in", PortIo, Instruction, PORT, IO, None, reads[], writes[Rax], undefined[], false,
        "in al/ax/eax, imm8/dx", "al/ax/eax := port[imm8 or dx] (eax form zero-extends into rax)";
    Out = 21, "out", PortIo, Instruction, PORT, IO, None, reads[Rax], writes[], undefined[], false,
        "out imm8/dx, al/ax/eax", "port[imm8 or dx] := al/ax/eax";
    Ins = 22, "ins", PortIo, Instruction, PORT_DX, IO, None, reads[Rdi, Rdx], writes[Rdi], undefined[], false,
        "[rep] insb/w/d", "[rdi] := port[dx]; rdi += or -= width by DF (rcx times with rep)";
    Outs = 23, "outs", PortIo, Instruction, PORT_DX, IO, None, reads[Rsi, Rdx], writes[Rsi], undefined[], false,
        "[rep] outsb/w/d", "port[dx] := [rsi]; rsi += or -= width by DF (rcx times with rep)";
    Invlpg = 24, "invlpg", TlbCache, Instruction, MEM, NONE, None, reads[], writes[], undefined[], false,
        "invlpg [mem]", "invalidate the TLB entries for the page of the address";
    Invpcid = 25, "invpcid", TlbCache, Instruction, INVPCID, NONE, None, reads[], writes[], undefined[], false,
        "invpcid reg, [mem]", "invalidate TLB entries by PCID and address as the type in reg says";
    Wbinvd = 26, "wbinvd", TlbCache, Instruction, NONE, NONE, None, reads[], writes[], undefined[], false,
        "wbinvd", "write back and invalidate every cache";
    Invd = 27, "invd", TlbCache, Instruction, NONE, NONE, None, reads[], writes[], undefined[], false,
        "invd", "invalidate every cache without writing back";
    Cpuid = 28, "cpuid", Cpuid, Instruction, NONE, NONE, None, reads[Rax, Rcx], writes[Rax, Rbx, Rcx, Rdx], undefined[], false,
        "cpuid", "eax, ebx, ecx, edx := CPUID(eax, ecx) (upper halves zeroed)";
    Lgdt = 29, "lgdt", Descriptors, Instruction, MEM, NONE, None, reads[], writes[], undefined[], false,
        "lgdt [mem]", "GDTR := the 10-byte descriptor at mem";
    Lidt = 30, "lidt", Descriptors, Instruction, MEM, NONE, None, reads[], writes[], undefined[], false,
        "lidt [mem]", "IDTR := the 10-byte descriptor at mem";
    Lldt = 31, "lldt", Descriptors, Instruction, REG_OR_MEM, WORD, In, reads[], writes[], undefined[], false,
        "lldt r/m16", "LDTR := selector";
    Ltr = 32, "ltr", Descriptors, Instruction, REG_OR_MEM, WORD, In, reads[], writes[], undefined[], false,
        "ltr r/m16", "TR := selector; the TSS descriptor is marked busy";
    Sgdt = 33, "sgdt", Descriptors, Instruction, MEM, NONE, None, reads[], writes[], undefined[], false,
        "sgdt [mem]", "[mem] := GDTR";
    Sidt = 34, "sidt", Descriptors, Instruction, MEM, NONE, None, reads[], writes[], undefined[], false,
        "sidt [mem]", "[mem] := IDTR";
    Sldt = 35, "sldt", Descriptors, Instruction, REG_OR_MEM, WORD_UP, Out, reads[], writes[], undefined[], false,
        "sldt r/m", "r/m := LDTR selector";
    Str = 36, "str", Descriptors, Instruction, REG_OR_MEM, WORD_UP, Out, reads[], writes[], undefined[], false,
        "str r/m", "r/m := TR selector";
    Smsw = 37, "smsw", ControlRegs, Instruction, REG_OR_MEM, WORD_UP, Out, reads[], writes[], undefined[], false,
        "smsw r/m", "r/m := CR0 (low 16 bits to memory)";
    Clts = 38, "clts", ControlRegs, Instruction, NONE, NONE, None, reads[], writes[], undefined[], false,
        "clts", "CR0.TS := 0";
    Swapgs = 39, "swapgs", Segments, Instruction, NONE, NONE, None, reads[], writes[], undefined[], false,
        "swapgs", "exchange GS.base and IA32_KERNEL_GS_BASE";
    Rdtsc = 40, "rdtsc", Counters, Instruction, NONE, NONE, None, reads[], writes[Rax, Rdx], undefined[], false,
        "rdtsc", "edx:eax := TSC";
    Rdtscp = 41, "rdtscp", Counters, Instruction, NONE, NONE, None, reads[], writes[Rax, Rdx, Rcx], undefined[], false,
        "rdtscp", "edx:eax := TSC; ecx := IA32_TSC_AUX";
    Rdpmc = 42, "rdpmc", Counters, Instruction, NONE, NONE, None, reads[Rcx], writes[Rax, Rdx], undefined[], false,
        "rdpmc", "edx:eax := PMC[ecx]";
    Iretq = 43, "iretq", Return, ControlTransfer, NONE, NONE, None, reads[Rsp], writes[Rsp] + FLAGS, undefined[], true,
        "iretq", "pop rip, cs, rflags, rsp, ss";
    Sysretq = 44, "sysretq", Return, ControlTransfer, NONE, NONE, None, reads[Rcx, R11], writes[] + FLAGS, undefined[], false,
        "sysretq", "return to 64-bit CPL 3: rip := rcx, rflags := r11";
    Sysretl = 45, "sysretl", Return, ControlTransfer, NONE, NONE, None, reads[Rcx, R11], writes[] + FLAGS, undefined[], false,
        "sysretl", "return to 32-bit CPL 3: eip := ecx, rflags := r11";
    Xsetbv = 46, "xsetbv", ControlRegs, Instruction, NONE, NONE, None, reads[Rcx, Rax, Rdx], writes[], undefined[], false,
        "xsetbv", "XCR[ecx] := edx:eax";
    SaveFl = 64, "save_fl", Interrupts, Idiom, REG, QWORD, Out, reads[], writes[], undefined[], true,
        "pushfq; pop reg", "reg := RFLAGS (uses 8 bytes below rsp)";
    RestoreFl = 65, "restore_fl", Interrupts, Idiom, REG, QWORD, In, reads[], writes[] + FLAGS, undefined[], true,
        "push reg; popfq", "RFLAGS := reg (uses 8 bytes below rsp)";
    SafeHalt = 66, "safe_halt", Interrupts, Idiom, NONE, NONE, None, reads[], writes[], undefined[], false,
        "sti; hlt", "IF := 1 and halt, with no interrupt window between the two";
    IoDelay = 67, "io_delay", PortIo, Idiom, PORT_IMM, BYTE, None, reads[Rax], writes[], undefined[], false,
        "out 0x80, al", "a delay of about a microsecond; the value written to the POST port is ignored";
    Vmcall = 112, "vmcall", Hypervisor, HypervisorInterface, NONE, NONE, None, reads[], writes[], undefined[], false,
        "vmcall", "call the hypervisor (Intel VMX)";
    Vmmcall = 113, "vmmcall", Hypervisor, HypervisorInterface, NONE, NONE, None, reads[], writes[], undefined[], false,
        "vmmcall", "call the hypervisor (AMD SVM)";
    Vmgexit = 114, "vmgexit", Hypervisor, HypervisorInterface, NONE, NONE, None, reads[], writes[], undefined[], false,
        "vmgexit", "exit to the hypervisor through the GHCB (AMD SEV-ES)";
}

/// For each op id, the index of its entry in `INFOS` (ids are below 128).
const INFO_INDEX: [u8; 128] = {
    let mut idx = [0u8; 128];
    let mut i = 0;
    while i < INFOS.len() {
        let id = INFOS[i].op as usize;
        assert!(
            id < 128 && i < 256,
            "op ids and the catalogue fit the index"
        );
        idx[id] = i as u8;
        i += 1;
    }
    // Every op finds its own entry.
    let mut i = 0;
    while i < ALL_OPS.len() {
        assert!(INFOS[idx[ALL_OPS[i] as usize] as usize].op as u16 == ALL_OPS[i] as u16);
        i += 1;
    }
    idx
};

impl Op {
    /// The stable id.
    pub const fn id(self) -> u16 {
        self as u16
    }

    /// The catalogue entry.
    pub fn info(self) -> &'static OpInfo {
        // O(1): the runtime asks this for every site, possibly where every instruction is
        // emulated. `INFO_INDEX` is checked entry by entry at compile time.
        &INFOS[INFO_INDEX[self as usize] as usize]
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The control register a `mov` to or from CRn names, for those ops.
    pub const fn control_register(self) -> Option<u8> {
        match self {
            Op::MovToCr0 | Op::MovFromCr0 => Some(0),
            Op::MovToCr2 | Op::MovFromCr2 => Some(2),
            Op::MovToCr3 | Op::MovFromCr3 => Some(3),
            Op::MovToCr4 | Op::MovFromCr4 => Some(4),
            Op::MovToCr8 | Op::MovFromCr8 => Some(8),
            _ => None,
        }
    }

    /// The op named `name` in reports.
    pub fn from_name(name: &str) -> Option<Op> {
        INFOS.iter().find(|i| i.name == name).map(|i| i.op)
    }

    /// Whether a site of this op may be rewritten at all (hypervisor interfaces are reported,
    /// never rewritten).
    pub fn patchable(self) -> bool {
        self.info().kind != Kind::HypervisorInterface
    }

    /// Everything the op reads: fixed inputs, plus the operand's register when it is an input
    /// or an address.
    pub fn inputs(self, operand: Operand) -> RegSet {
        let info = self.info();
        let mut set = info.reads;
        match (info.dir, operand) {
            (Dir::In, _) => set = set.union(operand.regs()),
            (_, Operand::MemBase(b)) => set = set.union(RegSet::reg(b)),
            (_, Operand::RegMemBase { .. }) | (_, Operand::PortDx) => {
                set = set.union(operand.regs())
            }
            _ => {}
        }
        set
    }

    /// Everything the op defines: fixed outputs, plus the operand's register when it is an
    /// output.
    pub fn outputs(self, operand: Operand) -> RegSet {
        let info = self.info();
        match (info.dir, operand) {
            (Dir::Out, Operand::Reg(r)) | (Dir::Out, Operand::DebugReg { reg: r, .. }) => {
                info.writes.union(RegSet::reg(r))
            }
            _ => info.writes,
        }
    }
}

impl core::fmt::Display for Op {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks that `operand` and `width` are a form `op` accepts.
pub fn check_operand(op: Op, operand: Operand, width: u8) -> Result<(), OperandError> {
    let info = op.info();
    if !info.operands.allows_code(operand.code()) {
        return Err(OperandError::KindNotAllowed);
    }
    if !info.widths.allows(width) {
        return Err(OperandError::WidthNotAllowed);
    }
    // sldt, str and smsw store 16 bits to memory whatever the operand size.
    if matches!(op, Op::Sldt | Op::Str | Op::Smsw)
        && matches!(operand, Operand::MemBase(_) | Operand::MemOther)
        && width != 2
    {
        return Err(OperandError::WidthNotAllowed);
    }
    if let Operand::DebugReg { dr, .. } = operand
        && dr > 7
    {
        return Err(OperandError::BadDebugRegister);
    }
    // io_delay is `out 0x80, al`, and nothing else: backends may drop it because port 0x80 is
    // the POST port, written only as a delay (found by the equivalence oracle: a record with
    // another port would have had a real port write dropped).
    if op == Op::IoDelay && (operand != Operand::PortImm(0x80) || width != 1) {
        return Err(OperandError::NotTheDelayPort);
    }
    Ok(())
}

/// Why an operand does not suit an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperandError {
    /// The op does not take this kind of operand.
    KindNotAllowed,
    /// The op does not take this operand width.
    WidthNotAllowed,
    /// A debug register number above 7.
    BadDebugRegister,
    /// An `io_delay` that is not `out 0x80, al`.
    NotTheDelayPort,
}

impl core::fmt::Display for OperandError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OperandError::KindNotAllowed => "the op does not take this kind of operand",
            OperandError::WidthNotAllowed => "the op does not take this operand width",
            OperandError::BadDebugRegister => "debug register number above 7",
            OperandError::NotTheDelayPort => "io_delay is out 0x80, al and nothing else",
        })
    }
}

impl core::error::Error for OperandError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_infos_agree() {
        assert_eq!(INFOS.len(), ALL_OPS.len());
        for (i, op) in ALL_OPS.iter().enumerate() {
            assert_eq!(INFOS[i].op, *op);
            assert_eq!(Op::from_id(op.id()), Some(*op));
            assert_eq!(Op::from_name(op.name()), Some(*op));
            assert!(op.info().reads.is_valid() && op.info().writes.is_valid());
        }
        let mut ids: [u16; 64] = [0; 64];
        for (i, op) in ALL_OPS.iter().enumerate() {
            ids[i] = op.id();
        }
        let ids = &mut ids[..ALL_OPS.len()];
        ids.sort_unstable();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "duplicate op id");
        assert_eq!(Op::from_id(0), None);
        assert_eq!(Op::from_id(999), None);
    }

    #[test]
    fn the_issue_classes_are_all_here() {
        let classes = "cli sti pushf popf hlt mov_to_cr0 mov_from_cr0 mov_to_cr2 mov_from_cr2 \
            mov_to_cr3 mov_from_cr3 mov_to_cr4 mov_from_cr4 mov_to_cr8 mov_from_cr8 mov_to_dr \
            mov_from_dr rdmsr wrmsr in out ins outs invlpg invpcid wbinvd invd cpuid lgdt lidt \
            lldt ltr sgdt sidt sldt str smsw clts swapgs rdtsc rdtscp rdpmc iretq sysretq \
            sysretl xsetbv vmcall vmmcall vmgexit";
        for c in classes.split_whitespace() {
            assert!(Op::from_name(c).is_some(), "{c} missing");
        }
    }

    #[test]
    fn operand_checks() {
        assert!(check_operand(Op::Cli, Operand::None, 0).is_ok());
        assert_eq!(
            check_operand(Op::Cli, Operand::Reg(Gpr::Rax), 0),
            Err(OperandError::KindNotAllowed)
        );
        assert!(check_operand(Op::In, Operand::PortImm(0x71), 1).is_ok());
        assert!(check_operand(Op::In, Operand::PortDx, 4).is_ok());
        assert_eq!(
            check_operand(Op::In, Operand::PortDx, 8),
            Err(OperandError::WidthNotAllowed)
        );
        assert_eq!(
            check_operand(
                Op::MovToDr,
                Operand::DebugReg {
                    dr: 9,
                    reg: Gpr::Rax
                },
                8
            ),
            Err(OperandError::BadDebugRegister)
        );
        assert!(Op::Cpuid.outputs(Operand::None).has(Gpr::Rbx));
        assert!(Op::MovFromCr3.outputs(Operand::Reg(Gpr::R12)).has(Gpr::R12));
        assert!(Op::MovToCr3.inputs(Operand::Reg(Gpr::Rdi)).has(Gpr::Rdi));
        assert!(Op::In.inputs(Operand::PortDx).has(Gpr::Rdx));
        assert!(!Op::Vmcall.patchable());
    }
}
