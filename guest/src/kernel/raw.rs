//! Raw sensitive instructions that no macro annotates: only the post-link tool records them
//! (`pvpatch annotate --section .text.pvraw`, run by the build), with exactly the room the
//! instruction has. The self-tests run them after patching like the macro sites.

use core::arch::asm;

macro_rules! raw {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[unsafe(link_section = ".text.pvraw")]
        #[inline(never)]
        pub fn $name($($a: $t),*) $(-> $r)? $body
    };
}

raw! {
    /// `cli`.
    fn cli() {
        // SAFETY: disabling interrupts.
        unsafe { asm!("cli", options(nostack, nomem)) }
    }
}

raw! {
    /// `sti`.
    fn sti() {
        // SAFETY: the IDT is loaded before the self-tests run.
        unsafe { asm!("sti", options(nostack, nomem)) }
    }
}

raw! {
    /// `out 0x80, al`: the port-0x80 delay, unannotated.
    fn io_delay() {
        // SAFETY: writes to the POST port have no effect beyond the delay.
        unsafe { asm!("out 0x80, al", in("al") 0u8, options(nostack, nomem)) }
    }
}

raw! {
    /// `out 0x70, al; in al, 0x71`: a CMOS register.
    fn cmos_read(index: u8) -> u8 {
        let v: u8;
        // SAFETY: selects and reads a CMOS register.
        unsafe { asm!("out 0x70, al", "in al, 0x71", inout("al") index => v, options(nostack, nomem)) };
        v
    }
}

raw! {
    /// `rdmsr`.
    fn rdmsr(msr: u32) -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: callers read MSRs that exist.
        unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, nomem)) };
        ((hi as u64) << 32) | lo as u64
    }
}

raw! {
    /// `wrmsr`.
    fn wrmsr(msr: u32, v: u64) {
        // SAFETY: callers write harmless MSRs with values they read back.
        unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) }
    }
}

raw! {
    /// `cpuid`.
    fn cpuid(leaf: u32) -> [u32; 4] {
        let (a, b, c, d): (u32, u64, u32, u32);
        // SAFETY: rbx is saved around the instruction.
        unsafe {
            asm!("mov {t}, rbx", "cpuid", "xchg {t}, rbx", t = out(reg) b, inout("eax") leaf => a,
                inout("ecx") 0u32 => c, out("edx") d, options(nostack, nomem))
        };
        [a, b as u32, c, d]
    }
}

raw! {
    /// `mov rax, cr3` then `mov cr3, rax`: a CR3 round trip.
    fn reload_cr3() -> u64 {
        let v: u64;
        // SAFETY: writes back the value just read.
        unsafe { asm!("mov {v}, cr3", "mov cr3, {v}", v = out(reg) v, options(nostack)) };
        v
    }
}

raw! {
    /// `invlpg [rdi]`.
    fn invlpg(addr: u64) {
        // SAFETY: invalidating a TLB entry.
        unsafe { asm!("invlpg [{}]", in(reg) addr, options(nostack)) }
    }
}

raw! {
    /// `rdtsc`.
    fn rdtsc() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: reading the TSC.
        unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, nomem)) };
        ((hi as u64) << 32) | lo as u64
    }
}

raw! {
    /// `pushfq; pop rax`.
    fn flags() -> u64 {
        let f: u64;
        // SAFETY: reading RFLAGS.
        unsafe { asm!("pushfq", "pop {}", out(reg) f, options(nomem)) };
        f
    }
}
