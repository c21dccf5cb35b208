//! The local APIC timer: one-shot, on [`TIMER_VECTOR`](super::idt::TIMER_VECTOR). x2APIC
//! through MSRs (annotated `rdmsr`/`wrmsr` sites) when the CPU has it, else the xAPIC's MMIO
//! page. The 8259 PICs are masked (annotated `out` sites).

use core::sync::atomic::{AtomicBool, Ordering};

use patch_sites::{pv_out, pv_rdmsr, pv_wrmsr};

use super::arch;
use super::idt::{SPURIOUS_VECTOR, TIMER_VECTOR};

const APIC_BASE_MSR: u32 = 0x1b;
const XAPIC_MMIO: u64 = 0xfee0_0000;
static X2APIC: AtomicBool = AtomicBool::new(false);

// Register offsets (xAPIC MMIO offset; the x2APIC MSR is 0x800 + offset / 16).
const EOI: u32 = 0xb0;
const SVR: u32 = 0xf0;
const LVT_TIMER: u32 = 0x320;
const INITIAL: u32 = 0x380;
const CURRENT: u32 = 0x390;
const DIVIDE: u32 = 0x3e0;

fn write(reg: u32, v: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: an x2APIC register of the timer.
        unsafe { pv_wrmsr!(0x800 + reg / 16, v as u64) };
    } else {
        // SAFETY: the xAPIC page is identity-mapped; the register exists.
        unsafe { core::ptr::write_volatile((XAPIC_MMIO + reg as u64) as *mut u32, v) };
    }
}

fn read(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: an x2APIC register of the timer.
        unsafe { pv_rdmsr!(0x800 + reg / 16) as u32 }
    } else {
        // SAFETY: as in `write`.
        unsafe { core::ptr::read_volatile((XAPIC_MMIO + reg as u64) as *const u32) }
    }
}

/// Masks the PICs and enables the local APIC (in x2APIC mode when available).
pub fn init() {
    // SAFETY: masking every line of both 8259s.
    unsafe {
        pv_out!(u8, imm 0x21, 0xff);
        pv_out!(u8, imm 0xa1, 0xff);
    }
    let x2 = arch::cpuid(1, 0)[2] & (1 << 21) != 0;
    if x2 {
        // SAFETY: IA32_APIC_BASE: set EN and EXTD, keeping the base address.
        unsafe {
            let b = pv_rdmsr!(APIC_BASE_MSR);
            pv_wrmsr!(APIC_BASE_MSR, b | (1 << 11) | (1 << 10));
        }
    }
    X2APIC.store(x2, Ordering::Relaxed);
    write(SVR, 0x100 | SPURIOUS_VECTOR as u32);
    write(DIVIDE, 0xb); // divide by 1
    write(LVT_TIMER, (1 << 16) | TIMER_VECTOR as u32); // masked until armed
}

/// Whether the APIC is in x2APIC mode.
pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Arms the timer to fire once after `count` ticks.
pub fn arm(count: u32) {
    write(LVT_TIMER, TIMER_VECTOR as u32);
    write(INITIAL, count.max(1));
}

/// Whether an armed timer has run down.
pub fn expired() -> bool {
    read(CURRENT) == 0
}

/// Signals the end of an interrupt.
pub fn eoi() {
    write(EOI, 0);
}

/// Arms the timer to fire every `count` ticks.
pub fn arm_periodic(count: u32) {
    write(LVT_TIMER, (1 << 17) | TIMER_VECTOR as u32);
    write(INITIAL, count.max(1));
}

/// Stops the timer.
pub fn stop() {
    write(LVT_TIMER, (1 << 16) | TIMER_VECTOR as u32);
    write(INITIAL, 0);
}
