//! Raw privileged instructions: what the patcher itself executes (it must not run through the
//! sites it is rewriting), what trap emulation executes on a trapped site's behalf, and what
//! the benchmarks compare patched sites with. Nothing here is annotated, and the post-link tool
//! is told to record only the `.text.pvraw` section, so none of it is ever rewritten.
//!
//! Every function is `unsafe` only where the instruction can break the machine; each block
//! says why it is sound where it is used.

use core::arch::asm;

/// `cpuid`.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u64, u32, u32);
    // SAFETY: cpuid only reads CPU identification; rbx, which LLVM reserves, is saved in a
    // scratch register around it.
    unsafe {
        asm!("mov {t}, rbx", "cpuid", "xchg {t}, rbx", t = out(reg) b,
            inout("eax") leaf => a, inout("ecx") sub => c, out("edx") d, options(nostack, nomem));
    }
    [a, b as u32, c, d]
}

/// `rdtsc`, ordered after earlier instructions by `lfence`.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading the TSC has no side effects.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, nomem)) };
    ((hi as u64) << 32) | lo as u64
}

/// `in` of 1, 2 or 4 bytes from `port`.
///
/// # Safety
/// The port must be one whose read has no effect the caller did not intend.
pub unsafe fn port_in(port: u16, width: u8) -> u32 {
    let v: u32;
    // SAFETY: the caller vouches for the port.
    unsafe {
        match width {
            1 => asm!("in al, dx", in("dx") port, out("eax") v, options(nostack, nomem)),
            2 => asm!("in ax, dx", in("dx") port, out("eax") v, options(nostack, nomem)),
            _ => asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, nomem)),
        }
    }
    match width {
        1 => v & 0xff,
        2 => v & 0xffff,
        _ => v,
    }
}

/// `out` of 1, 2 or 4 bytes to `port`.
///
/// # Safety
/// The port must be one whose write has the effect the caller intends.
pub unsafe fn port_out(port: u16, width: u8, v: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        match width {
            1 => asm!("out dx, al", in("dx") port, in("eax") v, options(nostack, nomem)),
            2 => asm!("out dx, ax", in("dx") port, in("eax") v, options(nostack, nomem)),
            _ => asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, nomem)),
        }
    }
}

/// `mov reg, crN` for N in 0, 2, 3, 4, 8.
pub fn read_cr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe {
        match n {
            0 => asm!("mov {}, cr0", out(reg) v, options(nostack, nomem)),
            2 => asm!("mov {}, cr2", out(reg) v, options(nostack, nomem)),
            3 => asm!("mov {}, cr3", out(reg) v, options(nostack, nomem)),
            4 => asm!("mov {}, cr4", out(reg) v, options(nostack, nomem)),
            _ => asm!("mov {}, cr8", out(reg) v, options(nostack, nomem)),
        }
    }
    v
}

/// `mov crN, reg` for N in 0, 2, 3, 4, 8.
///
/// # Safety
/// The value must keep the kernel running (paging, protection, the current address space).
pub unsafe fn write_cr(n: u8, v: u64) {
    // SAFETY: the caller vouches for the value.
    unsafe {
        match n {
            0 => asm!("mov cr0, {}", in(reg) v, options(nostack)),
            2 => asm!("mov cr2, {}", in(reg) v, options(nostack)),
            3 => asm!("mov cr3, {}", in(reg) v, options(nostack)),
            4 => asm!("mov cr4, {}", in(reg) v, options(nostack)),
            _ => asm!("mov cr8, {}", in(reg) v, options(nostack)),
        }
    }
}

/// `mov reg, drN`.
pub fn read_dr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a debug register has no side effects.
    unsafe {
        match n {
            0 => asm!("mov {}, dr0", out(reg) v, options(nostack, nomem)),
            1 => asm!("mov {}, dr1", out(reg) v, options(nostack, nomem)),
            2 => asm!("mov {}, dr2", out(reg) v, options(nostack, nomem)),
            3 => asm!("mov {}, dr3", out(reg) v, options(nostack, nomem)),
            6 => asm!("mov {}, dr6", out(reg) v, options(nostack, nomem)),
            _ => asm!("mov {}, dr7", out(reg) v, options(nostack, nomem)),
        }
    }
    v
}

/// `mov drN, reg`.
///
/// # Safety
/// The value must not arm a breakpoint the kernel does not handle.
pub unsafe fn write_dr(n: u8, v: u64) {
    // SAFETY: the caller vouches for the value.
    unsafe {
        match n {
            0 => asm!("mov dr0, {}", in(reg) v, options(nostack)),
            1 => asm!("mov dr1, {}", in(reg) v, options(nostack)),
            2 => asm!("mov dr2, {}", in(reg) v, options(nostack)),
            3 => asm!("mov dr3, {}", in(reg) v, options(nostack)),
            6 => asm!("mov dr6, {}", in(reg) v, options(nostack)),
            _ => asm!("mov dr7, {}", in(reg) v, options(nostack)),
        }
    }
}

/// `rdmsr`.
///
/// # Safety
/// The MSR must exist (or the caller must handle the #GP).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller vouches for the MSR.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, nomem)) };
    ((hi as u64) << 32) | lo as u64
}

/// `wrmsr`.
///
/// # Safety
/// The MSR must exist and the value must be one the kernel can run with.
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller vouches for the MSR and value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    };
}

/// `invlpg [addr]`.
pub fn invlpg(addr: u64) {
    // SAFETY: invalidating a TLB entry only costs a later page walk.
    unsafe { asm!("invlpg [{}]", in(reg) addr, options(nostack)) };
}

/// `wbinvd`, or `invd` when `discard` (QEMU's caches are coherent: both only cost time).
pub fn flush_caches(discard: bool) {
    // SAFETY: under QEMU neither loses data; the kernel runs only there.
    unsafe {
        if discard {
            asm!("invd", options(nostack))
        } else {
            asm!("wbinvd", options(nostack))
        }
    }
}

/// `hlt`; with `interrupts`, `sti; hlt; cli` (no window between sti and hlt).
pub fn halt(interrupts: bool) {
    // SAFETY: halting waits for an interrupt; callers arm one first.
    unsafe {
        if interrupts {
            asm!("sti", "hlt", "cli", options(nostack))
        } else {
            asm!("hlt", options(nostack))
        }
    }
}

/// `swapgs`.
pub fn swapgs() {
    // SAFETY: the kernel does not use GS.
    unsafe { asm!("swapgs", options(nostack, nomem)) };
}

/// `clts`.
pub fn clts() {
    // SAFETY: clearing CR0.TS only stops #NM on the next FPU instruction.
    unsafe { asm!("clts", options(nostack, nomem)) };
}

/// Whether RFLAGS.IF is set.
pub fn interrupts_enabled() -> bool {
    let f: u64;
    // SAFETY: reading RFLAGS.
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem)) };
    f & (1 << 9) != 0
}

/// Disables interrupts; returns whether they were enabled.
pub fn irq_save() -> bool {
    let on = interrupts_enabled();
    // SAFETY: disabling interrupts is always allowed in the kernel.
    unsafe { asm!("cli", options(nostack, nomem)) };
    on
}

/// Re-enables interrupts if `on`.
pub fn irq_restore(on: bool) {
    if on {
        // SAFETY: the IDT is loaded before interrupts are first enabled.
        unsafe { asm!("sti", options(nostack, nomem)) };
    }
}

/// A serializing instruction that does not exit to the hypervisor: `iretq` to the next
/// instruction, at the current privilege level (what Linux's `sync_core` falls back to; `cpuid`
/// would exit).
pub fn serialize() {
    // SAFETY: builds a frame returning to the label below with the current CS, SS, RSP and
    // RFLAGS; rax is declared clobbered.
    unsafe {
        asm!(
            "mov rax, ss", "push rax", "lea rax, [rsp + 8]", "push rax", "pushfq",
            "mov rax, cs", "push rax", "lea rax, [rip + 2f]", "push rax", "iretq", "2:",
            out("rax") _,
        )
    };
}

/// The VMware backdoor: `in eax, dx` with eax = magic, ecx = command, dx = 0x5658.
pub fn vmware_backdoor(cmd: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u64, u32, u32);
    // SAFETY: called only where detection has established that port 0x5658 is emulated or
    // ignored by the hypervisor; rbx is saved around the instruction.
    unsafe {
        asm!("xchg {t}, rbx", "in eax, dx", "xchg {t}, rbx",
            t = inout(reg) 0u64 => b, inout("eax") 0x564d_5868u32 => a, inout("ecx") cmd => c,
            inout("edx") 0x5658u32 => d, options(nostack, nomem));
    }
    [a, b as u32, c, d]
}
