//! pvpatch-shim: the boot shim `pvpatch annotate --boot-shim` puts in front of a stock Linux
//! kernel. The PVH loader enters it instead of Linux (`docs/shim.md`); it detects the backend,
//! validates the site table the post-link tool wrote (and a ROM the hypervisor published),
//! rewrites Linux's text for that backend, reads it back, leaves a report, restores the entry
//! state and jumps to Linux's own PVH entry. Any doubt: nothing written, Linux boots as it is.
//!
//! On the host this builds as a short program that says so: the shim itself is built for
//! `x86_64-unknown-none` by `cargo xtask shim` (and the tests).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod fwcfg;
#[cfg(target_os = "none")]
mod heap;
#[cfg(target_os = "none")]
mod hw;
#[cfg(target_os = "none")]
mod report;
#[cfg(target_os = "none")]
mod run;
#[cfg(target_os = "none")]
mod start_info;
#[cfg(target_os = "none")]
mod text;

#[cfg(target_os = "none")]
core::arch::global_asm!(include_str!("entry.s"), options(att_syntax));

#[cfg(target_os = "none")]
#[global_allocator]
static HEAP: heap::Bump = heap::Bump;

#[cfg(target_os = "none")]
unsafe extern "C" {
    /// The kernel's entry as loaded (computed by entry.s before anything else).
    static shim_linux_entry: u32;
}

/// The kernel's entry, as entry.s computed it.
#[cfg(target_os = "none")]
fn linux_entry() -> u64 {
    // SAFETY: written by entry.s before any Rust code runs.
    u64::from(unsafe { core::ptr::read_volatile(&raw const shim_linux_entry) })
}

/// Called by entry.s in long mode; returns the kernel's entry (physical).
#[cfg(target_os = "none")]
#[unsafe(no_mangle)]
extern "C" fn shim_main() -> u64 {
    run::main(linux_entry())
}

/// A panic is a bug of the shim: say so if the console is there, and hand over.
#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write as _;
    let _ = writeln!(console::Serial, "pvpatch: the shim panicked: {info}");
    hw::leave(linux_entry())
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "pvpatch-shim is a boot shim: build it for x86_64-unknown-none (cargo xtask shim), and \
         put it in front of a kernel with pvpatch annotate --boot-shim"
    );
    std::process::exit(2);
}
