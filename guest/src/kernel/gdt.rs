//! The GDT (kernel and user segments, a TSS) and the TSS with its interrupt stack: `#BP` and
//! `#UD` (trap sites) run on their own stack, so that emulating `pushf` on the interrupted
//! stack never overwrites the trap's own frame.

use core::cell::UnsafeCell;

use patch_sites::{pv_lgdt, pv_ltr, pv_sgdt, pv_str};

/// Kernel code, 64-bit.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data.
pub const KERNEL_DS: u16 = 0x10;
/// User code, 32-bit (the `sysretl` target; SYSRET's selector base).
pub const USER_CS32: u16 = 0x18 | 3;
// 0x20: user data and 0x28: user code 64-bit follow, as SYSRET requires (STAR base + 8, + 16).
/// The TSS.
pub const TSS_SEL: u16 = 0x30;
/// The IST slot of the trap stack.
pub const TRAP_IST: u8 = 1;

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap: u16,
}

#[repr(C, align(16))]
struct Stack([u8; 16 * 1024]);

struct Tables {
    gdt: [u64; 8],
    tss: Tss,
    trap_stack: Stack,
    kernel_stack: Stack,
}

struct Cell(UnsafeCell<Tables>);

// SAFETY: written once by `init` on the boot CPU before interrupts are enabled; the CPU reads
// it afterwards.
unsafe impl Sync for Cell {}

static TABLES: Cell = Cell(UnsafeCell::new(Tables {
    gdt: [
        0,
        0x00af_9a00_0000_ffff, // 0x08 kernel code 64
        0x00cf_9200_0000_ffff, // 0x10 kernel data
        0x00cf_fa00_0000_ffff, // 0x18 user code 32
        0x00cf_f200_0000_ffff, // 0x20 user data
        0x00af_fa00_0000_ffff, // 0x28 user code 64
        0,                     // 0x30 TSS (low), set by init
        0,                     // TSS (high)
    ],
    tss: Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap: 104,
    },
    trap_stack: Stack([0; 16 * 1024]),
    kernel_stack: Stack([0; 16 * 1024]),
}));

/// The 10-byte pseudo-descriptor `lgdt`/`lidt` take.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Pointer {
    /// Limit.
    pub limit: u16,
    /// Base.
    pub base: u64,
}

/// Installs the GDT and TSS (through the annotation macros' `lgdt` and `ltr` sites) and reloads
/// the segment registers.
pub fn init() {
    let t = TABLES.0.get();
    // SAFETY: single-threaded boot, interrupts off: nothing else reads or writes the tables.
    unsafe {
        let tss = &raw const (*t).tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        (*t).gdt[6] = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        (*t).gdt[7] = tss >> 32;
        let trap_top = (&raw const (*t).trap_stack as u64) + 16 * 1024;
        (*t).tss.ist[(TRAP_IST - 1) as usize] = trap_top;
        (*t).tss.rsp[0] = (&raw const (*t).kernel_stack as u64) + 16 * 1024;
        let p = Pointer {
            limit: (8 * 8 - 1) as u16,
            base: &raw const (*t).gdt as u64,
        };
        pv_lgdt!(&raw const p);
        core::arch::asm!(
            "push {cs}", "lea rax, [rip + 2f]", "push rax", "retfq", "2:",
            "mov ds, {ds:e}", "mov es, {ds:e}", "mov ss, {ds:e}",
            cs = const KERNEL_CS as u64, ds = in(reg) KERNEL_DS as u32, out("rax") _,
        );
        pv_ltr!(TSS_SEL);
    }
}

/// What `sgdt` and `str` read back (the self-test compares them with what `init` loaded).
pub fn current() -> (Pointer, u16) {
    let mut p = Pointer::default();
    // SAFETY: storing the GDTR and TR has no side effects.
    let tr = unsafe {
        pv_sgdt!(&raw mut p);
        pv_str!()
    };
    (p, tr)
}

/// The GDT's base and limit as `init` loaded them.
pub fn expected() -> Pointer {
    // SAFETY: only the address of the static is taken; nothing is read or written.
    let base = unsafe { &raw const (*TABLES.0.get()).gdt as u64 };
    Pointer {
        limit: (8 * 8 - 1) as u16,
        base,
    }
}

/// A second GDT for the descriptor-table self-test: the kernel's descriptors, then what only it
/// has: a data segment at [`COPY_DATA_SEL`], an LDT at [`COPY_LDT_SEL`] whose first entry is a
/// data segment, and an available TSS descriptor (the kernel's TSS) at [`COPY_TSS_SEL`].
#[repr(C, align(16))]
struct Second {
    gdt: [u64; 13],
    ldt: [u64; 1],
}

struct SecondCell(UnsafeCell<Second>);

// SAFETY: written by `second_table` (the self-test, interrupts off, one CPU) before it is loaded.
unsafe impl Sync for SecondCell {}

static SECOND: SecondCell = SecondCell(UnsafeCell::new(Second {
    gdt: [0; 13],
    ldt: [0],
}));

/// A data segment only the second GDT has.
pub const COPY_DATA_SEL: u16 = 0x40;
/// The LDT only the second GDT describes.
pub const COPY_LDT_SEL: u16 = 0x48;
/// The kernel's TSS, described anew (available) in the second GDT.
pub const COPY_TSS_SEL: u16 = 0x58;
/// The LDT's data segment (index 0, TI = 1).
pub const LDT_DATA_SEL: u16 = 0x04;

/// A 16-byte system descriptor (`kind`: 2 LDT, 9 available TSS) for `base`, `limit`.
fn system(base: u64, limit: u64, kind: u64) -> [u64; 2] {
    [
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | ((0x80 | kind) << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56),
        base >> 32,
    ]
}

/// Builds the second GDT from the kernel's, and returns its pseudo-descriptor.
pub fn second_table() -> Pointer {
    let (t, c) = (TABLES.0.get(), SECOND.0.get());
    // SAFETY: the self-test runs with interrupts off on the only CPU, and the second table is
    // not loaded while it is written.
    unsafe {
        let (second, first) = (&mut (*c).gdt, &(*t).gdt);
        second[..8].copy_from_slice(first);
        (*c).gdt[8] = 0x00cf_9200_0000_ffff;
        (*c).ldt[0] = 0x00cf_9200_0000_ffff;
        let ldt = &raw const (*c).ldt as u64;
        let [lo, hi] = system(ldt, 7, 2);
        (*c).gdt[9] = lo;
        (*c).gdt[10] = hi;
        let tss = &raw const (*t).tss as u64;
        let [lo, hi] = system(tss, (core::mem::size_of::<Tss>() - 1) as u64, 9);
        (*c).gdt[11] = lo;
        (*c).gdt[12] = hi;
        Pointer {
            limit: (13 * 8 - 1) as u16,
            base: &raw const (*c).gdt as u64,
        }
    }
}

/// Marks the kernel's own TSS descriptor available again (after `ltr` of another descriptor
/// of the same TSS), so that `ltr TSS_SEL` can load it back.
pub fn release_tss() {
    // SAFETY: clears the busy bit of the kernel's TSS descriptor, which TR no longer names.
    unsafe { (*TABLES.0.get()).gdt[6] &= !(1 << 41) };
}
