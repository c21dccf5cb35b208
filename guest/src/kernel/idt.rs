//! The IDT, and what each vector does: the timer counts ticks; `#BP` and `#UD` at a trap site
//! are emulated by the runtime; anything else is reported and ends the run as a failure.

use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use alloc::vec::Vec;
use patch_sites::table::Site;
use patch_sites::{pv_lidt, pv_sidt};
use pvpatch_runtime::trap::{self, Frame};

use super::console::Console;
use super::gdt::{KERNEL_CS, Pointer, TRAP_IST};
use super::{apic, arch, exit_fail};

/// The timer's vector.
pub const TIMER_VECTOR: u8 = 0x40;
/// The APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// The state an interrupt stub saved (see `isr_common` in boot.s).
#[repr(C)]
pub struct IsrContext {
    /// rax..r15 by number; `gpr[4]` is the interrupted rsp (written back on return).
    pub gpr: [u64; 16],
    /// Vector.
    pub vector: u64,
    /// Error code (0 where the CPU pushes none).
    pub error: u64,
    /// Where execution resumes.
    pub rip: u64,
    /// Code segment.
    pub cs: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// Interrupted rsp (hardware frame).
    pub rsp: u64,
    /// Interrupted ss.
    pub ss: u64,
}

#[repr(C, align(16))]
struct Idt([u128; 256]);

struct Shared {
    idt: UnsafeCell<Idt>,
    traps: UnsafeCell<Vec<Site>>,
}

// SAFETY: the IDT is written once by `init`, and the trap sites once by `set_trap_sites`, both
// with interrupts disabled on the only CPU; afterwards both are only read.
unsafe impl Sync for Shared {}

static SHARED: Shared = Shared {
    idt: UnsafeCell::new(Idt([0; 256])),
    traps: UnsafeCell::new(Vec::new()),
};

/// Timer interrupts taken.
pub static TICKS: AtomicU64 = AtomicU64::new(0);
/// Traps emulated.
pub static TRAPS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static isr_stubs: [u8; 256 * 16];
}

fn gate(handler: u64, ist: u8) -> u128 {
    let lo = (handler & 0xffff)
        | ((KERNEL_CS as u64) << 16)
        | ((ist as u64) << 32)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    lo as u128 | ((handler >> 32) as u128) << 64
}

/// Installs the IDT (through the annotation macros' `lidt` site).
pub fn init() {
    // SAFETY: boot, interrupts off, nothing else touches the IDT; the stubs are 16 bytes apart.
    unsafe {
        let idt = &mut *SHARED.idt.get();
        let base = isr_stubs.as_ptr() as u64;
        for (v, e) in idt.0.iter_mut().enumerate() {
            let ist = if v == 3 || v == 6 { TRAP_IST } else { 0 };
            *e = gate(base + 16 * v as u64, ist);
        }
        let p = Pointer {
            limit: (256 * 16 - 1) as u16,
            base: idt.0.as_ptr() as u64,
        };
        pv_lidt!(&raw const p);
    }
}

/// What `sidt` reads back, and what `init` loaded.
pub fn current_and_expected() -> (Pointer, Pointer) {
    let mut p = Pointer::default();
    // SAFETY: storing the IDTR has no side effects.
    unsafe { pv_sidt!(&raw mut p) };
    // SAFETY: the address of the static.
    let base = unsafe { (*SHARED.idt.get()).0.as_ptr() as u64 };
    (
        p,
        Pointer {
            limit: (256 * 16 - 1) as u16,
            base,
        },
    )
}

/// Records the sites patched to traps (sorted by patch address), for the handler.
pub fn set_trap_sites(mut sites: Vec<Site>) {
    sites.sort_by_key(|s| s.patch_addr());
    let on = arch::irq_save();
    // SAFETY: interrupts are off, so no handler reads the list while it is replaced.
    unsafe { *SHARED.traps.get() = sites };
    arch::irq_restore(on);
}

struct GuestExec;

impl trap::Exec for GuestExec {
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        // SAFETY: the trapped site's own access, which the kernel meant to make.
        unsafe { arch::port_in(port, width) }
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        // SAFETY: as above.
        unsafe { arch::port_out(port, width, value) }
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        arch::read_cr(n)
    }
    fn write_cr(&mut self, n: u8, v: u64) {
        // SAFETY: the trapped site's own write.
        unsafe { arch::write_cr(n, v) }
    }
    fn read_dr(&mut self, n: u8) -> u64 {
        arch::read_dr(n)
    }
    fn write_dr(&mut self, n: u8, v: u64) {
        // SAFETY: the trapped site's own write.
        unsafe { arch::write_dr(n, v) }
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        // SAFETY: the trapped site's own access.
        unsafe { arch::rdmsr(msr) }
    }
    fn wrmsr(&mut self, msr: u32, v: u64) {
        // SAFETY: the trapped site's own access.
        unsafe { arch::wrmsr(msr, v) }
    }
    fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4] {
        arch::cpuid(leaf, sub)
    }
    fn invlpg(&mut self, addr: u64) {
        arch::invlpg(addr)
    }
    fn flush_caches(&mut self, discard: bool) {
        arch::flush_caches(discard)
    }
    fn halt(&mut self, interrupts: bool) {
        arch::halt(interrupts)
    }
    fn rdtsc(&mut self) -> u64 {
        arch::rdtsc()
    }
    fn swapgs(&mut self) {
        arch::swapgs()
    }
    fn clts(&mut self) {
        arch::clts()
    }
    fn read_u64(&mut self, addr: u64) -> u64 {
        // SAFETY: the interrupted kernel stack, at the address a pushf/popf would use.
        unsafe { core::ptr::read(addr as *const u64) }
    }
    fn write_u64(&mut self, addr: u64, v: u64) {
        // SAFETY: as above.
        unsafe { core::ptr::write(addr as *mut u64, v) }
    }
}

/// Emulates the trap site the exception came from, if it came from one.
fn handle_trap(ctx: &mut IsrContext) -> bool {
    let at = if ctx.vector == 3 {
        ctx.rip.wrapping_sub(1)
    } else {
        ctx.rip
    };
    // SAFETY: the list is only replaced with interrupts off (and this runs in an interrupt).
    let sites = unsafe { &*SHARED.traps.get() };
    let Ok(i) = sites.binary_search_by_key(&at, |s| s.patch_addr()) else {
        return false;
    };
    let mut f = Frame {
        gpr: ctx.gpr,
        rip: ctx.rip,
        rflags: ctx.rflags,
    };
    match trap::emulate(&sites[i], &mut f, &mut GuestExec) {
        Ok(()) => {
            ctx.gpr = f.gpr;
            ctx.rip = f.rip;
            ctx.rflags = f.rflags;
            TRAPS.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(_) => false,
    }
}

#[unsafe(no_mangle)]
extern "C" fn isr_dispatch(ctx: &mut IsrContext) {
    match ctx.vector as u8 {
        TIMER_VECTOR => {
            TICKS.fetch_add(1, Ordering::Relaxed);
            apic::eoi();
        }
        SPURIOUS_VECTOR => {}
        // The descriptor-table self-test's `div ecx` (2 bytes) by zero, through the second
        // IDT's `#DE` gate: counted and skipped.
        SECOND_IDT_VECTOR => {
            SECOND_IDT_HITS.fetch_add(1, Ordering::Relaxed);
            ctx.rip += 2;
        }
        // The debug-register self-test's data breakpoint (a trap: rip is past the write).
        1 if arch::read_dr(6) & 0xf != 0 => {
            BREAKPOINTS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: clearing DR6's hit bits arms nothing.
            unsafe { arch::write_dr(6, 0xffff_0ff0) };
        }
        3 | 6 if handle_trap(ctx) => {}
        6 if super::ring3::return_from_user(ctx) => {}
        _ if super::ring3::abort_user(ctx) => {}
        v => {
            let _ = writeln!(
                Console::new(),
                "pvguest: unexpected exception {v} (error {:#x}) at rip {:#x}, cs {:#x}, rsp {:#x}, \
                 cr2 {:#x} during {}",
                ctx.error,
                ctx.rip,
                ctx.cs,
                ctx.rsp,
                arch::read_cr(2),
                super::phase()
            );
            exit_fail();
        }
    }
}

/// The vector whose stub the second IDT's `#DE` gate leads to.
pub const SECOND_IDT_VECTOR: u8 = 0x42;
/// `#DE`s taken through the second IDT.
pub static SECOND_IDT_HITS: AtomicU64 = AtomicU64::new(0);
/// Data breakpoints taken (`#DB` with a DR6 hit bit set).
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

struct SecondIdt(UnsafeCell<Idt>);

// SAFETY: written by `second_table` (the self-test, interrupts off, one CPU) before it is loaded.
unsafe impl Sync for SecondIdt {}

static SECOND: SecondIdt = SecondIdt(UnsafeCell::new(Idt([0; 256])));

/// A second IDT for the descriptor-table self-test: the kernel's gates, but `#DE` leads to the
/// stub of [`SECOND_IDT_VECTOR`] (under the kernel's own IDT a `#DE` ends the run).
pub fn second_table() -> Pointer {
    // SAFETY: the second IDT is not loaded while it is written; the first is only read.
    unsafe {
        let idt = &mut *SECOND.0.get();
        idt.0 = (*SHARED.idt.get()).0;
        let base = isr_stubs.as_ptr() as u64;
        idt.0[0] = gate(base + 16 * SECOND_IDT_VECTOR as u64, 0);
        Pointer {
            limit: (256 * 16 - 1) as u16,
            base: idt.0.as_ptr() as u64,
        }
    }
}
