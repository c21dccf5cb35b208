//! pvguest: a bare-metal x86-64 kernel booted by QEMU through PVH. It checks the site table its
//! own annotation macros produced, reports on the serial port, and exits through
//! `isa-debug-exit` (QEMU exits with 33 on success).
//!
//! On the host this builds as a short program that says so: the kernel itself is built by
//! `cargo xtask` for `x86_64-unknown-none`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod kernel;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "pvguest is a bare-metal kernel: build it for x86_64-unknown-none (cargo xtask builds \
         and boots it under QEMU)"
    );
    std::process::exit(2);
}
