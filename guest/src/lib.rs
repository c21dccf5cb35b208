//! Host side of the guest: build the kernel, boot it under QEMU, read what it reports.
//! (Built empty for `x86_64-unknown-none`, where the kernel binary lives.)
#![cfg_attr(target_os = "none", no_std)]

#[cfg(not(target_os = "none"))]
pub mod harness;
#[cfg(not(target_os = "none"))]
pub mod initramfs;
