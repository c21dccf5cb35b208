//! Round trips to user mode and back, for the `sysretq` and `sysretl` sites: `sysret` to a few
//! instructions at CPL 3 (64-bit, or 32-bit compatibility mode), which load a marker and come
//! back to the kernel through a `ud2` the `#UD` handler recognises. (Not `syscall`: Intel CPUs
//! refuse it in compatibility mode, and this host's KVM, which runs user code natively and
//! takes `syscall` for itself, leaves the kernel unable to touch MSRs after one; nor `int n`,
//! which this host's KVM cannot deliver.)

use core::cell::UnsafeCell;

use patch_sites::pv_wrmsr;

use super::gdt::{KERNEL_CS, USER_CS32};

const EFER: u32 = 0xc000_0080;
const STAR: u32 = 0xc000_0081;

#[repr(C, align(16))]
struct UserStack(UnsafeCell<[u8; 4096]>);

// SAFETY: used only as the user-mode stack of one round trip at a time.
unsafe impl Sync for UserStack {}

static USER_STACK: UserStack = UserStack(UnsafeCell::new([0; 4096]));

/// The kernel's stack pointer during a round trip; the way back restores it.
#[unsafe(no_mangle)]
static mut PV_SAVED_RSP: u64 = 0;
/// Where the kernel resumes after a round trip (set by the sysret site's own code).
#[unsafe(no_mangle)]
static mut PV_RESUME: u64 = 0;
/// The address of the user code's `ud2`.
#[unsafe(no_mangle)]
static mut PV_USER_UD2: u64 = 0;

/// Sets up SYSRET: STAR selects the user segments of the GDT, EFER.SCE enables the
/// instruction. Each MSR is written only if it differs.
fn setup() {
    let star = ((USER_CS32 as u64 & !3) << 48) | ((KERNEL_CS as u64) << 32);
    let want = [(STAR, star)];
    // SAFETY: the MSRs exist on every x86-64 CPU; nothing else uses them.
    unsafe {
        for (msr, v) in want {
            if super::arch::rdmsr(msr) != v {
                pv_wrmsr!(msr, v);
            }
        }
        let efer = super::arch::rdmsr(EFER);
        if efer & 1 == 0 {
            pv_wrmsr!(EFER, efer | 1);
        }
    }
}

fn user_stack_top() -> u64 {
    USER_STACK.0.get() as u64 + 4096
}

/// A `sysret` to user mode that runs `post`'s user code (which leaves a value in eax and
/// comes back through the `ud2` at label 5) and resumes at label 4; evaluates to that eax.
macro_rules! sysret_round_trip {
    ($op:expr, native: [$($native:literal),*], post: [$($post:literal),*]) => {{
        setup();
        let v: u32;
        // SAFETY: the kernel's rsp and resume address are saved for `return_from_user`; user
        // mode runs two instructions on its own stack (every page is user-accessible, SMEP/SMAP
        // are off) with interrupts off (r11) and comes back through `ud2`. rax, rcx and r11 are
        // clobbered.
        unsafe {
            patch_sites::pv_site!(op: $op,
                pre: [
                    "mov [rip + PV_SAVED_RSP], rsp",
                    "lea rax, [rip + 4f]",
                    "mov [rip + PV_RESUME], rax",
                    "lea rax, [rip + 5f]",
                    "mov [rip + PV_USER_UD2], rax",
                    "lea rcx, [rip + 3f]",
                    "mov r11, 2",
                    "mov rsp, {ustack}",
                ],
                native: [$($native),*],
                post: [$($post),*],
                opts: [], ustack = in(reg) user_stack_top(), out("rax") v, out("rcx") _,
                out("r11") _);
        }
        v
    }};
}

/// `sysretq` to 64-bit user mode and back through `ud2`; returns what user mode left in eax.
#[inline(never)]
pub fn sysretq_round_trip() -> u32 {
    sysret_round_trip!(patch_sites::Op::Sysretq,
        native: ["sysretq"],
        post: ["3:", "mov eax, 0x5e5e64", "5:", "ud2", "4:"])
}

/// `sysretl` to 32-bit compatibility mode and back through `ud2`; returns what user mode left
/// in eax. The user code is 32-bit: the kernel is below 4 GiB, so its address fits ecx.
#[inline(never)]
pub fn sysretl_round_trip() -> u32 {
    sysret_round_trip!(patch_sites::Op::Sysretl,
        native: [".byte 0x0f, 0x07"],
        post: [".code32", "3:", "mov eax, 0x5e5e32", "5:", "ud2", ".code64", "4:"])
}

/// If a `#UD` is a round trip's way back, resumes the kernel after the `sysret` site, at CPL 0
/// on its own stack.
pub fn return_from_user(ctx: &mut super::idt::IsrContext) -> bool {
    // SAFETY: plain reads of statics the round trip wrote before leaving the kernel (one CPU).
    unsafe {
        if PV_USER_UD2 == 0 || ctx.rip != PV_USER_UD2 || ctx.cs & 3 != 3 {
            return false;
        }
        PV_USER_UD2 = 0;
        ctx.rip = PV_RESUME;
        ctx.cs = KERNEL_CS as u64;
        ctx.ss = super::gdt::KERNEL_DS as u64;
        ctx.gpr[4] = PV_SAVED_RSP;
        ctx.rflags = 2;
    }
    true
}

/// Runs `f(n)` at CPL 3 (64-bit, IOPL 3 so that port I/O and cli/sti are allowed there,
/// interrupts off) and returns its result, or `None` if user mode faulted. This host's KVM runs
/// user-mode code natively while it emulates kernel code, so this is where a patched site's
/// own cost shows.
#[inline(never)]
pub fn run_user(f: extern "C" fn(u32) -> u64, n: u32) -> Option<u64> {
    setup();
    let v: u64;
    // SAFETY: as `sysretq_round_trip`: the kernel's rsp and resume address are saved; user mode
    // calls `f` on the user stack (aligned for the call) and comes back through `ud2`, or
    // through any fault, which `return_from_user` turns into a return with rax = u64::MAX.
    unsafe {
        core::arch::asm!(
            "mov [rip + PV_SAVED_RSP], rsp",
            "lea rax, [rip + 4f]",
            "mov [rip + PV_RESUME], rax",
            "lea rax, [rip + 5f]",
            "mov [rip + PV_USER_UD2], rax",
            "lea rcx, [rip + 3f]",
            "mov r11, 0x3002",
            "mov rsp, {ustack}",
            "sysretq",
            "3:", "call {f}", "5:", "ud2", "4:",
            f = in(reg) f, ustack = in(reg) user_stack_top(), in("rdi") n, out("rax") v,
            out("rcx") _, out("rdx") _, out("rsi") _, out("r8") _, out("r9") _, out("r10") _,
            out("r11") _,
        );
    }
    (v != u64::MAX).then_some(v)
}

/// A fault in user mode during a round trip: back to the kernel as if the round trip ended,
/// with rax = u64::MAX.
pub fn abort_user(ctx: &mut super::idt::IsrContext) -> bool {
    // SAFETY: as `return_from_user`.
    unsafe {
        if PV_USER_UD2 == 0 || ctx.cs & 3 != 3 {
            return false;
        }
        ctx.rip = PV_USER_UD2;
    }
    ctx.gpr[0] = u64::MAX;
    return_from_user(ctx)
}
