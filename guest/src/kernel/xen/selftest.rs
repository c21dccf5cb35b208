//! The self-tests by effect on real Xen, each through patched sites of its own (the planner
//! rewrote them into calls to the Xen backend's entry points):
//!
//! * **IF**: after `cli` a timer event stays pending and undelivered (and `save_fl` shows IF
//!   clear); `sti` delivers it at once; `restore_fl` of an image with IF does the same, of one
//!   without masks again;
//! * **halt**: `safe_halt` with events masked sleeps until the timer's event wakes it (about
//!   the timer's delay, not less), delivers it, and leaves events unmasked;
//! * **CR3**: a probe address mapped to one page in the boot address space and to another in a
//!   second one (built, made read-only and pinned through `mmu_update`/`mmuext_op`); `mov cr3`
//!   to the second root reads the other page, back to the first reads the first again;
//! * **invlpg**: the probe's PTE is changed behind the TLB (`mmu_update` does not flush); the
//!   stale translation is still used until `invlpg` of the probe address.

use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use patch_sites::*;

use super::super::selftest::{Test, Verdict};
use super::hv;
use super::paging::{PROBE, X, Y, build_roots, page, read_probe};
use super::{IF, TIMER_EVENTS};

#[inline(never)]
fn cli_site() {
    // SAFETY: masks events (the site's entry point writes vcpu_info's mask).
    unsafe { pv_cli!() }
}

#[inline(never)]
fn sti_site() {
    // SAFETY: unmasks events; the event callback is registered.
    unsafe { pv_sti!() }
}

#[inline(never)]
fn save_fl_site() -> u64 {
    // SAFETY: reads the flags.
    unsafe { pv_save_fl!() }
}

#[inline(never)]
fn restore_fl_site(f: u64) {
    // SAFETY: restores flags the caller took from save_fl.
    unsafe { pv_restore_fl!(f) }
}

#[inline(never)]
fn safe_halt_site() {
    // SAFETY: the caller armed the timer that wakes it.
    unsafe { pv_safe_halt!() }
}

#[inline(never)]
fn read_cr3_site() -> u64 {
    // SAFETY: reads CR3 (Xen emulates it: the machine address of the current root).
    unsafe { pv_read_cr!(3) }
}

#[inline(never)]
fn write_cr3_site(v: u64) {
    // SAFETY: the caller passes the machine address of a valid, pinned root that maps this
    // kernel as the boot root does.
    unsafe { pv_write_cr!(3, v) }
}

#[inline(never)]
fn invlpg_site(va: u64) {
    // SAFETY: invalidating a TLB entry.
    unsafe { pv_invlpg!(va) }
}

fn spin_until(deadline: u64) {
    while hv::now_ns() < deadline {
        core::hint::spin_loop();
    }
}

/// How long a masked timer event may take to become pending, in Xen's system time: a timer
/// is due after a millisecond, but Xen and this guest both run under TCG here, and on a loaded
/// host Xen may take its timer interrupt many milliseconds late.
const PENDING_WITHIN: u64 = 2_000_000_000;

/// Spins until an event is pending or `PENDING_WITHIN` after `from`; whether one is.
fn pending_by(from: u64) -> bool {
    while hv::pending() == 0 && hv::now_ns() < from + PENDING_WITHIN {
        core::hint::spin_loop();
    }
    hv::pending() == 1
}

type R = Result<(), alloc::string::String>;

/// `Err(what())` unless `ok`.
pub fn check(ok: bool, what: impl FnOnce() -> alloc::string::String) -> R {
    if ok { Ok(()) } else { Err(what()) }
}

fn interrupt_flag() -> R {
    let events = || TIMER_EVENTS.load(Ordering::SeqCst);
    cli_site();
    check(hv::mask() == 1, || "cli did not set the event mask".into())?;
    check(save_fl_site() & IF == 0, || {
        "save_fl after cli shows IF set".into()
    })?;
    let e0 = events();
    let now = hv::now_ns();
    hv::set_timer(now + 1_000_000);
    spin_until(now + 3_000_000);
    let pending = pending_by(now);
    check(events() == e0, || {
        "a timer event was delivered with events masked".into()
    })?;
    check(pending, || {
        "the timer's event is not pending 2 s after it was due".into()
    })?;
    sti_site();
    check(events() == e0 + 1, || {
        format!(
            "sti did not deliver the pending event ({} delivered)",
            events() - e0
        )
    })?;
    check(hv::mask() == 0, || "sti left events masked".into())?;
    let on = save_fl_site();
    check(on & IF != 0, || "save_fl after sti shows IF clear".into())?;
    // restore_fl: without IF masks, with IF delivers what became pending meanwhile.
    restore_fl_site(on & !IF);
    check(hv::mask() == 1, || {
        "restore_fl of an image without IF left events unmasked".into()
    })?;
    let now = hv::now_ns();
    hv::set_timer(now + 500_000);
    spin_until(now + 1_500_000);
    let pending = pending_by(now);
    check(events() == e0 + 1, || {
        "an event was delivered after restore_fl without IF".into()
    })?;
    check(pending, || {
        "the second timer's event is not pending 2 s after it was due".into()
    })?;
    restore_fl_site(on);
    check(events() == e0 + 2, || {
        "restore_fl with IF did not deliver the pending event".into()
    })?;
    check(hv::mask() == 0, || {
        "restore_fl with IF left events masked".into()
    })
}

fn halt() -> R {
    let events = || TIMER_EVENTS.load(Ordering::SeqCst);
    cli_site();
    let e0 = events();
    let t0 = hv::now_ns();
    let delay = 2_000_000;
    hv::set_timer(t0 + delay);
    safe_halt_site();
    let slept = hv::now_ns() - t0;
    check(events() == e0 + 1, || {
        format!(
            "safe_halt returned with {} timer events delivered",
            events() - e0
        )
    })?;
    check(slept >= delay, || {
        format!("safe_halt returned after {slept} ns, before the timer's {delay}")
    })?;
    check(hv::mask() == 0, || "safe_halt left events masked".into())
}

fn cr3(boot_l4: u64) -> Result<u64, alloc::string::String> {
    let (second, l1a) = build_roots(boot_l4)?;
    let first = read_cr3_site();
    check(first == hv::mfn(boot_l4) << 12, || {
        format!("CR3 reads {first:#x}, not the boot root's machine address")
    })?;
    check(read_probe() == Y, || {
        format!("the boot root maps the probe to {:#x}", read_probe())
    })?;
    write_cr3_site(second);
    let (seen, now) = (read_probe(), read_cr3_site());
    write_cr3_site(first);
    check(now == second, || {
        format!("after mov cr3 to the second root, CR3 reads {now:#x}")
    })?;
    check(seen == X, || {
        format!("after mov cr3 to the second root the probe reads {seen:#x}")
    })?;
    check(read_probe() == Y, || {
        "back on the boot root the probe does not read Y".into()
    })?;
    Ok(l1a)
}

/// Tries of the invlpg test: Xen (or QEMU) may flush the TLB on its own between the PTE's
/// change and the read that should see the stale translation (more often on a loaded host):
/// the test needs one try where the stale translation was seen, and `invlpg` then made the
/// new one visible.
const INVLPG_TRIES: u32 = 32;

fn invlpg(l1a: u64) -> Result<Option<u32>, alloc::string::String> {
    let (x, y) = (page(7), page(8));
    check(read_probe() == Y, || "the probe does not read Y".into())?;
    for attempt in 1..=INVLPG_TRIES {
        // Back to Y, flushed through the hypercall itself (not the site under test), and the
        // translation loaded into the TLB by a read.
        let rc = hv::mmu_update(l1a, hv::mfn(y) << 12 | hv::PTE_RW);
        check(rc == 0, || format!("mmu_update of the probe's PTE: {rc}"))?;
        hv::mmuext(hv::MMUEXT_INVLPG_LOCAL, PROBE);
        check(read_probe() == Y, || {
            "the probe does not read Y again".into()
        })?;
        // MMU_NORMAL_PT_UPDATE: Xen validates and writes the PTE, and flushes nothing.
        let rc = hv::mmu_update(l1a, hv::mfn(x) << 12 | hv::PTE_RW);
        check(rc == 0, || format!("mmu_update of the probe's PTE: {rc}"))?;
        let stale = read_probe() == Y;
        invlpg_site(PROBE);
        let after = read_probe();
        check(after == X, || {
            format!("after invlpg the probe reads {after:#x}, not the new page")
        })?;
        if stale {
            return Ok(Some(attempt));
        }
    }
    Ok(None)
}

/// Runs every test.
pub fn run(si: &hv::StartInfo) -> Vec<Test> {
    let verdict = |r: R| match r {
        Ok(()) => Verdict::Pass,
        Err(e) => Verdict::Fail(e),
    };
    let mut tests = Vec::new();
    tests.push(Test {
        name: "interrupt flag (event mask, timer event)",
        ops: "cli, sti, save_fl, restore_fl",
        verdict: verdict(interrupt_flag()),
    });
    tests.push(Test {
        name: "halt (SCHEDOP_block woken by the timer)",
        ops: "safe_halt",
        verdict: verdict(halt()),
    });
    let boot_l4 = si.pt_base();
    let cr3 = cr3(boot_l4);
    tests.push(Test {
        name: "cr3 (a second root through mmuext_op)",
        ops: "mov_to_cr3, mov_from_cr3",
        verdict: verdict(cr3.as_ref().map(|_| ()).map_err(Clone::clone)),
    });
    tests.push(Test {
        name: "invlpg (MMUEXT_INVLPG_LOCAL)",
        ops: "invlpg",
        verdict: match cr3 {
            Err(_) => Verdict::Skip("needs the cr3 test's page tables"),
            Ok(l1a) => match invlpg(l1a) {
                Ok(Some(_)) => Verdict::Pass,
                Ok(None) => Verdict::Fail(format!(
                    "in {INVLPG_TRIES} tries the TLB never kept the old translation until \
                     invlpg: its effect cannot be seen"
                )),
                Err(e) => Verdict::Fail(e),
            },
        },
    });
    tests
}

/// MSRs a PV dom0 reads: what Xen returns, or `None` where it raises #GP.
pub fn msr_probes() -> Vec<(u32, Option<u64>)> {
    const MSRS: [u32; 12] = [
        0x10,
        0x1b,
        0x8b,
        0x1a0,
        0x277,
        0x3a,
        0xfe,
        0x174,
        0xc000_0080,
        0xc000_0081,
        0xc000_0100,
        0xc000_0102,
    ];
    MSRS.iter()
        .map(|&m| {
            let mut v = 0;
            let fault = super::probe(2, || {
                // SAFETY: reading an MSR: Xen emulates it or raises #GP, which the probe skips.
                v = unsafe { super::super::arch::rdmsr(m) }
            });
            (m, fault.is_none().then_some(v))
        })
        .collect()
}

/// Ports a PV dom0 reads once its virtual IOPL is 3: what Xen returns, or `None` where even
/// then the read raises #GP.
pub fn port_probes() -> Vec<(u16, Option<u32>)> {
    const PORTS: [u16; 5] = [0x61, 0x71, 0x3fd, 0xcf8, 0x5658];
    hv::set_iopl(3);
    PORTS
        .iter()
        .map(|&p| {
            let mut v = 0;
            let fault = super::probe(1, || {
                // SAFETY: reading a port: Xen emulates it or raises #GP, which the probe skips.
                v = unsafe { super::super::arch::port_in(p, 1) }
            });
            (p, fault.is_none().then_some(v))
        })
        .collect()
}

/// What Xen does with one privileged instruction of a PV kernel.
pub struct InsnProbe {
    /// The instruction.
    pub name: &'static str,
    /// The vector it raised in the kernel, if any.
    pub fault: Option<u64>,
    /// Cycles (the fastest of three), the bounce and the handler included.
    pub cycles: u64,
}

impl InsnProbe {
    /// `#GP` or `#UD` (Xen bounced it to the kernel), `emulated` (no fault, and it took
    /// thousands of cycles: Xen trapped and emulated it), or `native`.
    pub fn outcome(&self) -> &'static str {
        match self.fault {
            Some(13) => "#GP",
            Some(6) => "#UD",
            Some(_) => "fault",
            None if self.cycles > 1000 => "emulated",
            None => "native",
        }
    }
}

/// A table for `sgdt`/`lgdt`/`lidt` to read and write.
static mut TABLE_BUF: [u64; 2] = [0; 2];

macro_rules! insns {
    ($($name:literal, $len:literal => $body:block)*) => {
        [$(($name, $len, {
            fn f() {
                // SAFETY: each instruction either faults (the probe skips it) or does what
                // Xen makes of it: reads, a write-back of the value read, or state the kernel
                // does not depend on (the virtual TS, which it never sets).
                #[allow(unused_unsafe)]
                unsafe { $body }
            }
            f as fn()
        })),*]
    };
}

/// Every probed instruction, at IOPL 0, with what Xen did and what it cost.
pub fn instruction_probes() -> Vec<InsnProbe> {
    use core::arch::asm;
    let list: [(&str, u64, fn()); 24] = insns! {
        "cli", 1 => { asm!("cli", options(nostack, nomem)) }
        "sti", 1 => { asm!("sti", options(nostack, nomem)) }
        "hlt", 1 => { asm!("hlt", options(nostack, nomem)) }
        "mov rax, cr0", 3 => { asm!("mov rax, cr0", out("rax") _, options(nostack, nomem)) }
        "mov rax, cr2", 3 => { asm!("mov rax, cr2", out("rax") _, options(nostack, nomem)) }
        "mov rax, cr3", 3 => { asm!("mov rax, cr3", out("rax") _, options(nostack, nomem)) }
        "mov cr3, rax (the value read)", 3 => {
            asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack))
        }
        "mov rax, cr4", 3 => { asm!("mov rax, cr4", out("rax") _, options(nostack, nomem)) }
        "mov rax, cr8", 4 => { asm!("mov rax, cr8", out("rax") _, options(nostack, nomem)) }
        "mov rax, dr7", 3 => { asm!("mov rax, dr7", out("rax") _, options(nostack, nomem)) }
        "clts", 2 => { asm!("clts", options(nostack, nomem)) }
        "wbinvd", 2 => { asm!("wbinvd", options(nostack, nomem)) }
        "invlpg [rax]", 3 => { asm!("invlpg [rax]", in("rax") &raw mut TABLE_BUF as u64, options(nostack)) }
        "rdmsr (TSC)", 2 => {
            asm!("rdmsr", in("ecx") 0x10, out("eax") _, out("edx") _, options(nostack, nomem))
        }
        "rdtsc", 2 => { asm!("rdtsc", out("eax") _, out("edx") _, options(nostack, nomem)) }
        "rdpmc (0)", 2 => {
            asm!("rdpmc", in("ecx") 0, out("eax") _, out("edx") _, options(nostack, nomem))
        }
        "cpuid (0)", 2 => {
            asm!("push rbx", "cpuid", "pop rbx", inout("eax") 0 => _, out("ecx") _,
                out("edx") _)
        }
        "xgetbv (0)", 3 => {
            asm!("xgetbv", in("ecx") 0, out("eax") _, out("edx") _, options(nostack, nomem))
        }
        "sgdt [rax]", 3 => { asm!("sgdt [rax]", in("rax") &raw mut TABLE_BUF as u64, options(nostack)) }
        "lgdt [rax]", 3 => { asm!("lgdt [rax]", in("rax") &raw mut TABLE_BUF as u64, options(nostack)) }
        "ltr ax", 3 => { asm!("ltr ax", in("ax") 0u16, options(nostack, nomem)) }
        "swapgs", 3 => { asm!("swapgs", options(nostack, nomem)) }
        "in al, 0x71", 2 => { asm!("in al, 0x71", out("al") _, options(nostack, nomem)) }
        "out 0x80, al", 2 => { asm!("out 0x80, al", in("al") 0u8, options(nostack, nomem)) }
    };
    list.iter()
        .map(|&(name, len, f)| {
            let mut best = u64::MAX;
            let mut fault = None;
            for _ in 0..3 {
                // Should Xen emulate `hlt` as a block, the timer wakes it (1 ms on).
                hv::set_timer(hv::now_ns() + 1_000_000);
                let t0 = super::super::arch::rdtsc();
                fault = super::probe(len, f);
                best = best.min(super::super::arch::rdtsc() - t0);
                hv::set_timer(0);
            }
            InsnProbe {
                name,
                fault,
                cycles: best,
            }
        })
        .collect()
}
