//! Source-level annotation macros for `no_std` kernels (and host programs).
//!
//! Each macro emits one *patchable site* and its 24-byte record into the `pv_sites` section:
//!
//! * by default the **native** form: the instruction, padded with a long NOP to at least five
//!   bytes, so that a `call rel32` always fits;
//! * with a trailing `call TABLE` (after a `;` when the macro has arguments) the
//!   **indirect-call** form: `call [rip + TABLE + 8*op_id]`
//!   (6 bytes), through an ops table of thunk addresses indexed by op id, as Linux's
//!   `PVOP_CALL` does. The thunks must preserve every register and flag the op does not define.
//!
//! The macros use fixed registers, so that every record's operand is known when it is
//! assembled: a value read is returned in `rax`, a value written is passed in `rdi`, port I/O
//! uses `al`/`ax`/`eax` and `dx`, MSR and CPUID ops use their architectural registers.
//!
//! A kernel that uses the macros invokes [`pv_site_table_header!`](crate::pv_site_table_header)
//! once; its header points at the records the linker gathers (see `docs/abi.md`).
//!
//! All macros expand to `asm!` and must be used inside `unsafe`; the caller is responsible for
//! the privileged instruction being valid where it runs.

/// The record that follows every site, as assembler text. Labels: `662` site start, `663` end
/// of the instruction, `664` end of the padding.
#[doc(hidden)]
#[macro_export]
macro_rules! __pv_record_asm {
    () => {
        concat!(
            ".pushsection pv_sites,\"aR\",@progbits\n",
            ".balign 4\n",
            ".long 662b - .\n",
            ".long 0\n",
            ".short {__pv_op}\n",
            ".byte 664b - 662b, 663b - 662b, {__pv_form}, {__pv_kind}, {__pv_reg}, {__pv_reg2}, ",
            "{__pv_width}, {__pv_flags}\n",
            ".short {__pv_port}\n",
            ".long {__pv_clob}\n",
            ".popsection"
        )
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_default {
    ([] $d:expr) => {
        $d
    };
    ([$x:expr] $d:expr) => {
        $x
    };
}

/// Emits one patchable site with its record.
///
/// ```text
/// pv_site!(op: Op::MovToCr3, operand: Operand::Reg(Gpr::Rdi), width: 8,
///          native: ["mov cr3, rdi"], opts: [nostack], in("rdi") value);
/// pv_site!(call PV_OPS; op: Op::Cli, native: ["cli"], opts: [nostack],);
/// ```
///
/// `native` is the instruction text (Intel syntax); `operand`, `width`, `flags` and `clobbers`
/// fill the record and default to none, 0, 0 and none. `opts` are `asm!` options for the native
/// form (the indirect-call form uses none: it pushes a return address). Everything after the
/// named arguments is passed to `asm!` as operands.
#[macro_export]
macro_rules! pv_site {
    (
        $(call $table:path;)?
        op: $op:expr,
        $(operand: $operand:expr,)?
        $(width: $width:expr,)?
        $(flags: $flags:expr,)?
        $(clobbers: $clob:expr,)?
        $(pre: [$($pre:expr),* $(,)?],)?
        native: [$($insn:expr),+ $(,)?],
        $(post: [$($post:expr),* $(,)?],)?
        opts: [$($opt:ident),* $(,)?],
        $($rest:tt)*
    ) => {
        $crate::__pv_form!(
            [$($table)?] [$($($pre),*)?] [$($insn),+] [$($($post),*)?] [$($opt),*]
            __pv_op = const $crate::op::Op::id($op),
            __pv_kind = const $crate::op::Operand::code(
                $crate::__pv_default!([$($operand)?] $crate::op::Operand::None)),
            __pv_reg = const $crate::op::Operand::reg_byte(
                $crate::__pv_default!([$($operand)?] $crate::op::Operand::None)),
            __pv_reg2 = const $crate::op::Operand::reg2_byte(
                $crate::__pv_default!([$($operand)?] $crate::op::Operand::None)),
            __pv_port = const $crate::op::Operand::port_field(
                $crate::__pv_default!([$($operand)?] $crate::op::Operand::None)),
            __pv_width = const { let w: u8 = $crate::__pv_default!([$($width)?] 0); w },
            __pv_flags = const { let f: u8 = $crate::__pv_default!([$($flags)?] 0); f },
            __pv_clob = const $crate::__pv_default!([$($clob)?] $crate::regs::RegSet::EMPTY).0,
            $($rest)*
        )
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_form {
    ([] [$($pre:expr),*] [$($insn:expr),+] [$($post:expr),*] [$($opt:ident),*]
     $($rest:tt)*) => {
        ::core::arch::asm!(
            $($pre,)*
            "662:",
            $($insn,)+
            "663:",
            ".if (663b - 662b) < 5",
            ".nops 5 - (663b - 662b)",
            ".endif",
            "664:",
            $($post,)*
            $crate::__pv_record_asm!(),
            __pv_form = const 0u8,
            options($($opt),*),
            $($rest)*
        )
    };
    ([$table:path] [$($pre:expr),*] [$($insn:expr),+] [$($post:expr),*]
     [$($opt:ident),*] $($rest:tt)*) => {
        ::core::arch::asm!(
            $($pre,)*
            "662:",
            "call qword ptr [rip + {__pv_table} + 8 * {__pv_op}]",
            "663:",
            "664:",
            $($post,)*
            $crate::__pv_record_asm!(),
            __pv_form = const 1u8,
            __pv_table = sym $table,
            $($rest)*
        )
    };
}

/// Emits, once per kernel, the header of the linker-gathered table: symbol
/// `pvpatch_site_table` in section `pv_sites_header`, pointing at `__start_pv_sites` and
/// `__stop_pv_sites`, which the linker defines (or the kernel's linker script, around
/// `KEEP(*(pv_sites))`).
#[macro_export]
macro_rules! pv_site_table_header {
    () => {
        ::core::arch::global_asm!(
            ".pushsection pv_sites,\"aR\",@progbits",
            ".popsection",
            ".pushsection pv_sites_header,\"aR\",@progbits",
            ".balign 8",
            ".globl pvpatch_site_table",
            "pvpatch_site_table:",
            ".ascii \"PVPSITES\"",
            ".short {version}, {header_size}, {record_size}, 0",
            ".long __start_pv_sites - .",
            ".long __stop_pv_sites - .",
            ".long 0, 0",
            ".popsection",
            version = const $crate::table::TABLE_VERSION,
            header_size = const $crate::table::HEADER_SIZE,
            record_size = const $crate::table::RECORD_SIZE,
        );
    };
}

// ---- Interrupt flag -----------------------------------------------------------------------

/// `cli`.
#[macro_export]
macro_rules! pv_cli {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Cli, native: ["cli"], opts: [nostack],)
    };
}

/// `sti`.
#[macro_export]
macro_rules! pv_sti {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Sti, native: ["sti"], opts: [nostack],)
    };
}

/// `hlt`.
#[macro_export]
macro_rules! pv_hlt {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Hlt, native: ["hlt"], opts: [nostack],)
    };
}

/// `sti; hlt` as one site (`safe_halt`).
#[macro_export]
macro_rules! pv_safe_halt {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::SafeHalt, native: ["sti", "hlt"],
            opts: [nostack],)
    };
}

/// `pushfq; pop rax` as one site (`save_fl`); evaluates to RFLAGS.
#[macro_export]
macro_rules! pv_save_fl {
    ($(call $t:path)?) => {{
        let flags: u64;
        $crate::pv_site!($(call $t;)? op: $crate::Op::SaveFl,
            operand: $crate::Operand::Reg($crate::Gpr::Rax), width: 8,
            native: ["pushfq", "pop rax"], opts: [], out("rax") flags);
        flags
    }};
}

/// `push rdi; popfq` as one site (`restore_fl`).
#[macro_export]
macro_rules! pv_restore_fl {
    ($v:expr $(; call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::RestoreFl,
            operand: $crate::Operand::Reg($crate::Gpr::Rdi), width: 8,
            native: ["push rdi", "popfq"], opts: [], in("rdi") $v as u64)
    };
}

/// `pushfq` alone as the site, then `pop rax` after it; evaluates to RFLAGS.
#[macro_export]
macro_rules! pv_pushf {
    ($(call $t:path)?) => {{
        let flags: u64;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Pushf, width: 8, native: ["pushfq"],
            post: ["pop rax"], opts: [], out("rax") flags);
        flags
    }};
}

/// `push rdi` before the site, then `popfq` alone as the site.
#[macro_export]
macro_rules! pv_popf {
    ($v:expr $(; call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Popf, width: 8, pre: ["push rdi"],
            native: ["popfq"], opts: [], in("rdi") $v as u64)
    };
}

// ---- Control and debug registers ---------------------------------------------------------

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_read_reg {
    ([$($t:path)?] $op:ident, $insn:literal) => {{
        let v: u64;
        $crate::pv_site!($(call $t;)? op: $crate::Op::$op,
            operand: $crate::Operand::Reg($crate::Gpr::Rax), width: 8,
            native: [$insn], opts: [nostack], out("rax") v);
        v
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_write_reg {
    ([$($t:path)?] $op:ident, $insn:literal, $v:expr) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::$op,
            operand: $crate::Operand::Reg($crate::Gpr::Rdi), width: 8,
            native: [$insn], opts: [nostack], in("rdi") $v as u64)
    };
}

/// `mov rax, crN` for N in 0, 2, 3, 4, 8; evaluates to the value.
#[macro_export]
macro_rules! pv_read_cr {
    (0 $(; call $t:path)?) => { $crate::__pv_read_reg!([$($t)?] MovFromCr0, "mov rax, cr0") };
    (2 $(; call $t:path)?) => { $crate::__pv_read_reg!([$($t)?] MovFromCr2, "mov rax, cr2") };
    (3 $(; call $t:path)?) => { $crate::__pv_read_reg!([$($t)?] MovFromCr3, "mov rax, cr3") };
    (4 $(; call $t:path)?) => { $crate::__pv_read_reg!([$($t)?] MovFromCr4, "mov rax, cr4") };
    (8 $(; call $t:path)?) => { $crate::__pv_read_reg!([$($t)?] MovFromCr8, "mov rax, cr8") };
}

/// `mov crN, rdi` for N in 0, 2, 3, 4, 8.
#[macro_export]
macro_rules! pv_write_cr {
    (0, $v:expr $(; call $t:path)?) => { $crate::__pv_write_reg!([$($t)?] MovToCr0, "mov cr0, rdi", $v) };
    (2, $v:expr $(; call $t:path)?) => { $crate::__pv_write_reg!([$($t)?] MovToCr2, "mov cr2, rdi", $v) };
    (3, $v:expr $(; call $t:path)?) => { $crate::__pv_write_reg!([$($t)?] MovToCr3, "mov cr3, rdi", $v) };
    (4, $v:expr $(; call $t:path)?) => { $crate::__pv_write_reg!([$($t)?] MovToCr4, "mov cr4, rdi", $v) };
    (8, $v:expr $(; call $t:path)?) => { $crate::__pv_write_reg!([$($t)?] MovToCr8, "mov cr8, rdi", $v) };
}

/// `mov rax, drN` (N a literal 0..=7); evaluates to the value.
#[macro_export]
macro_rules! pv_read_dr {
    ($n:literal $(; call $t:path)?) => {{
        let v: u64;
        $crate::pv_site!($(call $t;)? op: $crate::Op::MovFromDr,
            operand: $crate::Operand::DebugReg { dr: $n, reg: $crate::Gpr::Rax }, width: 8,
            native: [concat!("mov rax, dr", stringify!($n))], opts: [nostack], out("rax") v);
        v
    }};
}

/// `mov drN, rdi` (N a literal 0..=7).
#[macro_export]
macro_rules! pv_write_dr {
    ($n:literal, $v:expr $(; call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::MovToDr,
            operand: $crate::Operand::DebugReg { dr: $n, reg: $crate::Gpr::Rdi }, width: 8,
            native: [concat!("mov dr", stringify!($n), ", rdi")], opts: [nostack],
            in("rdi") $v as u64)
    };
}

/// `clts`.
#[macro_export]
macro_rules! pv_clts {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Clts, native: ["clts"], opts: [nostack],)
    };
}

/// `smsw rax`; evaluates to the value.
#[macro_export]
macro_rules! pv_smsw {
    ($(call $t:path)?) => {{
        let v: u64;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Smsw,
            operand: $crate::Operand::Reg($crate::Gpr::Rax), width: 8,
            native: ["smsw rax"], opts: [nostack], out("rax") v);
        v
    }};
}

/// `xsetbv` (XCR `ecx` := `edx:eax`).
#[macro_export]
macro_rules! pv_xsetbv {
    ($xcr:expr, $v:expr $(; call $t:path)?) => {{
        let v: u64 = $v;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Xsetbv, native: ["xsetbv"],
            opts: [nostack], in("ecx") $xcr as u32, in("eax") v as u32,
            in("edx") (v >> 32) as u32)
    }};
}

// ---- MSRs, CPUID, counters ---------------------------------------------------------------

/// `rdmsr`; evaluates to the 64-bit value.
#[macro_export]
macro_rules! pv_rdmsr {
    ($msr:expr $(; call $t:path)?) => {{
        let (lo, hi): (u32, u32);
        $crate::pv_site!($(call $t;)? op: $crate::Op::Rdmsr, native: ["rdmsr"], opts: [nostack],
            in("ecx") $msr as u32, out("eax") lo, out("edx") hi);
        ((hi as u64) << 32) | lo as u64
    }};
}

/// `wrmsr`.
#[macro_export]
macro_rules! pv_wrmsr {
    ($msr:expr, $v:expr $(; call $t:path)?) => {{
        let v: u64 = $v;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Wrmsr, native: ["wrmsr"], opts: [nostack],
            in("ecx") $msr as u32, in("eax") v as u32, in("edx") (v >> 32) as u32)
    }};
}

/// `cpuid` (leaf, subleaf); evaluates to `[eax, ebx, ecx, edx]`. `rbx` is saved in `rsi`
/// around the site, because LLVM reserves it.
#[macro_export]
macro_rules! pv_cpuid {
    ($leaf:expr, $sub:expr $(; call $t:path)?) => {{
        let (a, b, c, d): (u32, u64, u32, u32);
        $crate::pv_site!($(call $t;)? op: $crate::Op::Cpuid,
            pre: ["mov rsi, rbx"], native: ["cpuid"], post: ["xchg rsi, rbx"], opts: [nostack],
            inout("eax") $leaf as u32 => a, inout("ecx") $sub as u32 => c, out("edx") d,
            out("rsi") b);
        [a, b as u32, c, d]
    }};
}

/// `rdtsc`; evaluates to the TSC.
#[macro_export]
macro_rules! pv_rdtsc {
    ($(call $t:path)?) => {{
        let (lo, hi): (u32, u32);
        $crate::pv_site!($(call $t;)? op: $crate::Op::Rdtsc, native: ["rdtsc"], opts: [nostack],
            out("eax") lo, out("edx") hi);
        ((hi as u64) << 32) | lo as u64
    }};
}

/// `rdtscp`; evaluates to `(tsc, tsc_aux)`.
#[macro_export]
macro_rules! pv_rdtscp {
    ($(call $t:path)?) => {{
        let (lo, hi, aux): (u32, u32, u32);
        $crate::pv_site!($(call $t;)? op: $crate::Op::Rdtscp, native: ["rdtscp"],
            opts: [nostack], out("eax") lo, out("edx") hi, out("ecx") aux);
        (((hi as u64) << 32) | lo as u64, aux)
    }};
}

/// `rdpmc`; evaluates to the counter.
#[macro_export]
macro_rules! pv_rdpmc {
    ($ctr:expr $(; call $t:path)?) => {{
        let (lo, hi): (u32, u32);
        $crate::pv_site!($(call $t;)? op: $crate::Op::Rdpmc, native: ["rdpmc"], opts: [nostack],
            in("ecx") $ctr as u32, out("eax") lo, out("edx") hi);
        ((hi as u64) << 32) | lo as u64
    }};
}

// ---- Port I/O ----------------------------------------------------------------------------

/// `in` from an immediate port (`imm PORT`, a constant) or from `dx` (`dx PORT`), with width
/// `u8`, `u16` or `u32`; evaluates to the value.
#[macro_export]
macro_rules! pv_in {
    (u8, imm $port:expr $(; call $t:path)?) => {
        $crate::__pv_in_imm!([$($t)?] u8, 1, "in al, {__pv_p}", "al", $port)
    };
    (u16, imm $port:expr $(; call $t:path)?) => {
        $crate::__pv_in_imm!([$($t)?] u16, 2, "in ax, {__pv_p}", "ax", $port)
    };
    (u32, imm $port:expr $(; call $t:path)?) => {
        $crate::__pv_in_imm!([$($t)?] u32, 4, "in eax, {__pv_p}", "eax", $port)
    };
    (u8, dx $port:expr $(; call $t:path)?) => {
        $crate::__pv_in_dx!([$($t)?] u8, 1, "in al, dx", "al", $port)
    };
    (u16, dx $port:expr $(; call $t:path)?) => {
        $crate::__pv_in_dx!([$($t)?] u16, 2, "in ax, dx", "ax", $port)
    };
    (u32, dx $port:expr $(; call $t:path)?) => {
        $crate::__pv_in_dx!([$($t)?] u32, 4, "in eax, dx", "eax", $port)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_in_imm {
    ([$($t:path)?] $ty:ty, $w:literal, $insn:literal, $r:tt, $port:expr) => {{
        let v: $ty;
        $crate::pv_site!($(call $t;)? op: $crate::Op::In,
            operand: $crate::Operand::PortImm($port), width: $w,
            native: [$insn], opts: [nostack], __pv_p = const $port, out($r) v);
        v
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_in_dx {
    ([$($t:path)?] $ty:ty, $w:literal, $insn:literal, $r:tt, $port:expr) => {{
        let v: $ty;
        $crate::pv_site!($(call $t;)? op: $crate::Op::In,
            operand: $crate::Operand::PortDx, width: $w,
            native: [$insn], opts: [nostack], in("dx") $port as u16, out($r) v);
        v
    }};
}

/// `out` to an immediate port (`imm PORT`) or to `dx` (`dx PORT`), width `u8`, `u16`, `u32`.
#[macro_export]
macro_rules! pv_out {
    (u8, imm $port:expr, $v:expr $(; call $t:path)?) => {
        $crate::__pv_out_imm!([$($t)?] u8, 1, "out {__pv_p}, al", $port, $v)
    };
    (u16, imm $port:expr, $v:expr $(; call $t:path)?) => {
        $crate::__pv_out_imm!([$($t)?] u16, 2, "out {__pv_p}, ax", $port, $v)
    };
    (u32, imm $port:expr, $v:expr $(; call $t:path)?) => {
        $crate::__pv_out_imm!([$($t)?] u32, 4, "out {__pv_p}, eax", $port, $v)
    };
    (u8, dx $port:expr, $v:expr $(; call $t:path)?) => {
        $crate::__pv_out_dx!([$($t)?] u8, 1, "out dx, al", $port, $v)
    };
    (u16, dx $port:expr, $v:expr $(; call $t:path)?) => {
        $crate::__pv_out_dx!([$($t)?] u16, 2, "out dx, ax", $port, $v)
    };
    (u32, dx $port:expr, $v:expr $(; call $t:path)?) => {
        $crate::__pv_out_dx!([$($t)?] u32, 4, "out dx, eax", $port, $v)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_out_imm {
    ([$($t:path)?] $ty:ty, $w:literal, $insn:literal, $port:expr, $v:expr) => {{
        let v: $ty = $v;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Out,
            operand: $crate::Operand::PortImm($port), width: $w,
            native: [$insn], opts: [nostack], __pv_p = const $port, in("eax") v as u32)
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_out_dx {
    ([$($t:path)?] $ty:ty, $w:literal, $insn:literal, $port:expr, $v:expr) => {{
        let v: $ty = $v;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Out,
            operand: $crate::Operand::PortDx, width: $w,
            native: [$insn], opts: [nostack], in("dx") $port as u16, in("eax") v as u32)
    }};
}

/// `out 0x80, al` as the `io_delay` idiom.
#[macro_export]
macro_rules! pv_io_delay {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::IoDelay,
            operand: $crate::Operand::PortImm(0x80), width: 1,
            native: ["out 0x80, al"], opts: [nostack], in("al") 0u8)
    };
}

/// `rep insb/insw/insd` (width `u8`, `u16`, `u32`) from port `dx` into `count` elements at
/// `dst`.
#[macro_export]
macro_rules! pv_rep_ins {
    (u8, $port:expr, $dst:expr, $count:expr $(; call $t:path)?) => {
        $crate::__pv_rep_str!([$($t)?] Ins, 1, "rep insb", $port, "rdi", $dst, $count)
    };
    (u16, $port:expr, $dst:expr, $count:expr $(; call $t:path)?) => {
        $crate::__pv_rep_str!([$($t)?] Ins, 2, "rep insw", $port, "rdi", $dst, $count)
    };
    (u32, $port:expr, $dst:expr, $count:expr $(; call $t:path)?) => {
        $crate::__pv_rep_str!([$($t)?] Ins, 4, "rep insd", $port, "rdi", $dst, $count)
    };
}

/// `rep outsb/outsw/outsd` (width `u8`, `u16`, `u32`) of `count` elements at `src` to port `dx`.
#[macro_export]
macro_rules! pv_rep_outs {
    (u8, $port:expr, $src:expr, $count:expr $(; call $t:path)?) => {
        $crate::__pv_rep_str!([$($t)?] Outs, 1, "rep outsb", $port, "rsi", $src, $count)
    };
    (u16, $port:expr, $src:expr, $count:expr $(; call $t:path)?) => {
        $crate::__pv_rep_str!([$($t)?] Outs, 2, "rep outsw", $port, "rsi", $src, $count)
    };
    (u32, $port:expr, $src:expr, $count:expr $(; call $t:path)?) => {
        $crate::__pv_rep_str!([$($t)?] Outs, 4, "rep outsd", $port, "rsi", $src, $count)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_rep_str {
    ([$($t:path)?] $op:ident, $w:literal, $insn:literal, $port:expr, $ptr_reg:tt, $ptr:expr,
     $count:expr) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::$op, operand: $crate::Operand::PortDx,
            width: $w, flags: $crate::table::SITE_FLAG_REP, native: [$insn], opts: [nostack],
            in("dx") $port as u16, inout($ptr_reg) $ptr => _, inout("rcx") $count as u64 => _)
    };
}

// ---- TLB and caches ----------------------------------------------------------------------

/// `invlpg [rdi]`.
#[macro_export]
macro_rules! pv_invlpg {
    ($addr:expr $(; call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Invlpg,
            operand: $crate::Operand::MemBase($crate::Gpr::Rdi),
            native: ["invlpg [rdi]"], opts: [nostack], in("rdi") $addr as u64)
    };
}

/// `invpcid rdi, [rsi]` (type in `rdi`, descriptor address in `rsi`).
#[macro_export]
macro_rules! pv_invpcid {
    ($ty:expr, $desc:expr $(; call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Invpcid,
            operand: $crate::Operand::RegMemBase { reg: $crate::Gpr::Rdi, base: $crate::Gpr::Rsi },
            native: ["invpcid rdi, [rsi]"], opts: [nostack], in("rdi") $ty as u64,
            in("rsi") $desc)
    };
}

/// `wbinvd`.
#[macro_export]
macro_rules! pv_wbinvd {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Wbinvd, native: ["wbinvd"],
            opts: [nostack],)
    };
}

/// `invd`.
#[macro_export]
macro_rules! pv_invd {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Invd, native: ["invd"], opts: [nostack],)
    };
}

// ---- Descriptor tables and segments ------------------------------------------------------

#[doc(hidden)]
#[macro_export]
macro_rules! __pv_mem_op {
    ([$($t:path)?] $op:ident, $insn:literal, $ptr:expr) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::$op,
            operand: $crate::Operand::MemBase($crate::Gpr::Rdi),
            native: [$insn], opts: [nostack], in("rdi") $ptr)
    };
}

/// `lgdt [rdi]`.
#[macro_export]
macro_rules! pv_lgdt {
    ($ptr:expr $(; call $t:path)?) => { $crate::__pv_mem_op!([$($t)?] Lgdt, "lgdt [rdi]", $ptr) };
}

/// `lidt [rdi]`.
#[macro_export]
macro_rules! pv_lidt {
    ($ptr:expr $(; call $t:path)?) => { $crate::__pv_mem_op!([$($t)?] Lidt, "lidt [rdi]", $ptr) };
}

/// `sgdt [rdi]`.
#[macro_export]
macro_rules! pv_sgdt {
    ($ptr:expr $(; call $t:path)?) => { $crate::__pv_mem_op!([$($t)?] Sgdt, "sgdt [rdi]", $ptr) };
}

/// `sidt [rdi]`.
#[macro_export]
macro_rules! pv_sidt {
    ($ptr:expr $(; call $t:path)?) => { $crate::__pv_mem_op!([$($t)?] Sidt, "sidt [rdi]", $ptr) };
}

/// `lldt di`.
#[macro_export]
macro_rules! pv_lldt {
    ($sel:expr $(; call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Lldt,
            operand: $crate::Operand::Reg($crate::Gpr::Rdi), width: 2,
            native: ["lldt di"], opts: [nostack], in("rdi") $sel as u64)
    };
}

/// `ltr di`.
#[macro_export]
macro_rules! pv_ltr {
    ($sel:expr $(; call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Ltr,
            operand: $crate::Operand::Reg($crate::Gpr::Rdi), width: 2,
            native: ["ltr di"], opts: [nostack], in("rdi") $sel as u64)
    };
}

/// `sldt eax`; evaluates to the selector.
#[macro_export]
macro_rules! pv_sldt {
    ($(call $t:path)?) => {{
        let v: u64;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Sldt,
            operand: $crate::Operand::Reg($crate::Gpr::Rax), width: 4,
            native: ["sldt eax"], opts: [nostack], out("rax") v);
        v as u16
    }};
}

/// `str eax`; evaluates to the selector.
#[macro_export]
macro_rules! pv_str {
    ($(call $t:path)?) => {{
        let v: u64;
        $crate::pv_site!($(call $t;)? op: $crate::Op::Str,
            operand: $crate::Operand::Reg($crate::Gpr::Rax), width: 4,
            native: ["str eax"], opts: [nostack], out("rax") v);
        v as u16
    }};
}

/// `swapgs`.
#[macro_export]
macro_rules! pv_swapgs {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Swapgs, native: ["swapgs"],
            opts: [nostack],)
    };
}

/// An `iretq` to the end of the site, at the current privilege level (a serializing
/// instruction that does not exit to a hypervisor): the frame is built before the site, the
/// site is the `iretq` alone.
#[macro_export]
macro_rules! pv_iretq_to_self {
    ($(call $t:path)?) => {
        $crate::pv_site!($(call $t;)? op: $crate::Op::Iretq,
            pre: [
                "mov rax, ss", "push rax", "lea rax, [rsp + 8]", "push rax", "pushfq",
                "mov rax, cs", "push rax", "lea rax, [rip + 664f]", "push rax",
            ],
            native: ["iretq"], opts: [], out("rax") _)
    };
}
