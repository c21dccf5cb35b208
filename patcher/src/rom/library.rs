//! The library of sequences a ROM description can name, assembled with dynasmrt: inline
//! templates with operand slots, and entry points (`pvpatch rom sequences` lists them).

use dynasmrt::x64::X64Relocation;
use dynasmrt::{DynasmApi, VecAssembler, dynasm};
use patch_sites::rom::{NO_REX, Slot, SlotKind, SlotSource};

/// A sequence of the library.
#[derive(Clone, Debug)]
pub struct Sequence {
    /// Its name in descriptions.
    pub name: &'static str,
    /// Its assembly, for people.
    pub asm: &'static str,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Where the site's operands go.
    pub slots: Vec<Slot>,
    /// Whether it is an entry point (ends in `ret`) rather than an inline template.
    pub entry_point: bool,
}

type Asm = VecAssembler<X64Relocation>;

fn assemble(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
    let mut a = Asm::new(0);
    f(&mut a);
    // Assembling a fixed sequence without labels cannot fail.
    a.finalize().unwrap_or_default()
}

fn slot(kind: SlotKind, offset: u8, rex_offset: u8) -> Slot {
    let source = if kind == SlotKind::Imm8 {
        SlotSource::Port
    } else {
        SlotSource::Reg
    };
    Slot {
        kind,
        offset,
        rex_offset,
        source,
    }
}

fn inline(name: &'static str, asm: &'static str, bytes: Vec<u8>, slots: Vec<Slot>) -> Sequence {
    Sequence {
        name,
        asm,
        bytes,
        slots,
        entry_point: false,
    }
}

fn entry(name: &'static str, asm: &'static str, bytes: Vec<u8>) -> Sequence {
    Sequence {
        name,
        asm,
        bytes,
        slots: Vec::new(),
        entry_point: true,
    }
}

/// Every sequence descriptions can name.
pub fn library() -> Vec<Sequence> {
    use SlotKind::*;
    let mut v = vec![
        inline(
            "cli",
            "cli",
            assemble(|a| dynasm!(a ; .arch x64 ; cli)),
            vec![],
        ),
        inline(
            "sti",
            "sti",
            assemble(|a| dynasm!(a ; .arch x64 ; sti)),
            vec![],
        ),
        inline(
            "hlt",
            "hlt",
            assemble(|a| dynasm!(a ; .arch x64 ; hlt)),
            vec![],
        ),
        inline(
            "safe_halt",
            "sti; hlt",
            assemble(|a| dynasm!(a ; .arch x64 ; sti ; hlt)),
            vec![],
        ),
        inline(
            "pushf",
            "pushfq",
            assemble(|a| dynasm!(a ; .arch x64 ; pushfq)),
            vec![],
        ),
        inline(
            "popf",
            "popfq",
            assemble(|a| dynasm!(a ; .arch x64 ; popfq)),
            vec![],
        ),
        inline(
            "save_fl",
            "pushfq; pop <reg>",
            assemble(|a| dynasm!(a ; .arch x64 ; pushfq ; .bytes [0x40] ; pop rax)),
            vec![slot(OpcodeReg, 2, 1)],
        ),
        inline(
            "restore_fl",
            "push <reg>; popfq",
            assemble(|a| dynasm!(a ; .arch x64 ; .bytes [0x40] ; push rax ; popfq)),
            vec![slot(OpcodeReg, 1, 0)],
        ),
        inline(
            "rdmsr",
            "rdmsr",
            assemble(|a| dynasm!(a ; .arch x64 ; rdmsr)),
            vec![],
        ),
        inline(
            "wrmsr",
            "wrmsr",
            assemble(|a| dynasm!(a ; .arch x64 ; wrmsr)),
            vec![],
        ),
        inline(
            "cpuid",
            "cpuid",
            assemble(|a| dynasm!(a ; .arch x64 ; cpuid)),
            vec![],
        ),
        inline(
            "rdtsc",
            "rdtsc",
            assemble(|a| dynasm!(a ; .arch x64 ; rdtsc)),
            vec![],
        ),
        inline(
            "wbinvd",
            "wbinvd",
            assemble(|a| dynasm!(a ; .arch x64 ; wbinvd)),
            vec![],
        ),
        inline(
            "swapgs",
            "swapgs",
            assemble(|a| dynasm!(a ; .arch x64 ; swapgs)),
            vec![],
        ),
        inline(
            "clts",
            "clts",
            assemble(|a| dynasm!(a ; .arch x64 ; clts)),
            vec![],
        ),
        inline(
            "invlpg",
            "invlpg [<reg>]",
            assemble(|a| dynasm!(a ; .arch x64 ; .bytes [0x40] ; invlpg [rax])),
            vec![slot(ModrmRm, 3, 0)],
        ),
        inline(
            "out_imm8_al",
            "out <port>, al",
            assemble(|a| dynasm!(a ; .arch x64 ; out BYTE 0 as _, al)),
            vec![slot(Imm8, 1, NO_REX)],
        ),
        inline(
            "in_al_imm8",
            "in al, <port>",
            assemble(|a| dynasm!(a ; .arch x64 ; in al, BYTE 0 as _)),
            vec![slot(Imm8, 1, NO_REX)],
        ),
        inline(
            "out_dx_al",
            "out dx, al",
            assemble(|a| dynasm!(a ; .arch x64 ; out dx, al)),
            vec![],
        ),
        inline(
            "in_al_dx",
            "in al, dx",
            assemble(|a| dynasm!(a ; .arch x64 ; in al, dx)),
            vec![],
        ),
        entry(
            "cli_ret",
            "cli; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; cli ; ret)),
        ),
        entry(
            "sti_ret",
            "sti; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; sti ; ret)),
        ),
        entry(
            "wbinvd_ret",
            "wbinvd; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; wbinvd ; ret)),
        ),
        entry(
            "rdtsc_ret",
            "rdtsc; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; rdtsc ; ret)),
        ),
        entry(
            "cpuid_ret",
            "cpuid; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; cpuid ; ret)),
        ),
        entry(
            "io_delay_ret",
            "out 0x80, al; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; out BYTE 0x80 as _, al ; ret)),
        ),
    ];
    // Control-register moves with the register in ModRM.rm and a REX prefix to extend it
    // (CR8 needs REX.R as well).
    for (name, asm, to, cr) in [
        ("mov_to_cr0", "mov cr0, <reg>", true, 0u8),
        ("mov_to_cr2", "mov cr2, <reg>", true, 2),
        ("mov_to_cr3", "mov cr3, <reg>", true, 3),
        ("mov_to_cr4", "mov cr4, <reg>", true, 4),
        ("mov_to_cr8", "mov cr8, <reg>", true, 8),
        ("mov_from_cr0", "mov <reg>, cr0", false, 0),
        ("mov_from_cr2", "mov <reg>, cr2", false, 2),
        ("mov_from_cr3", "mov <reg>, cr3", false, 3),
        ("mov_from_cr4", "mov <reg>, cr4", false, 4),
        ("mov_from_cr8", "mov <reg>, cr8", false, 8),
    ] {
        let bytes = assemble(|a| match (to, cr) {
            (true, 0) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr0, rax),
            (true, 2) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr2, rax),
            (true, 3) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr3, rax),
            (true, 4) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr4, rax),
            (true, _) => dynasm!(a ; .arch x64 ; mov cr8, rax),
            (false, 0) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr0),
            (false, 2) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr2),
            (false, 3) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr3),
            (false, 4) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr4),
            (false, _) => dynasm!(a ; .arch x64 ; mov rax, cr8),
        });
        v.push(inline(name, asm, bytes, vec![slot(ModrmRm, 3, 0)]));
    }
    v
}
