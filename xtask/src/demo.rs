//! `cargo xtask demo`: the post-link tool on Debian bookworm's current kernel (fetched and cached
//! if needed): the scan summary, the ledger, the annotation, its verification, and a boot of the
//! annotated kernel under QEMU to its init.

use std::process::Command;

use anyhow::{Context, Result, bail};
use pvguest::harness::{self, Qemu};

use crate::util::{cargo, run};

fn pvpatch() -> Command {
    let mut c = cargo();
    c.args(["run", "--quiet", "--release", "-p", "pvpatch", "--"]);
    c
}

/// Runs the demo.
pub fn demo() -> Result<()> {
    let k = crate::kernel::fetch()?;
    let dir = k.vmlinux.parent().context("kernel directory")?.to_owned();
    let annotated = dir.join("vmlinux.annotated");
    let ledger = dir.join("ledger.json");
    println!("\n==> the kernel: {} ({})", k.package, k.vmlinux.display());
    run(pvpatch().arg("scan").arg(&k.vmlinux))?;
    println!("\n==> the annotation");
    run(pvpatch()
        .arg("annotate")
        .arg(&k.vmlinux)
        .arg("-o")
        .arg(&annotated)
        .arg("--ledger")
        .arg(&ledger))?;
    println!("  ledger (docs/ledger.md): {}", ledger.display());
    println!("\n==> verification");
    run(pvpatch().arg("verify").arg(&annotated))?;
    println!("\n==> the annotated kernel boots");
    if let Err(why) = harness::qemu_available() {
        println!("skipped: {why}");
        return Ok(());
    }
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, pvguest::initramfs::initramfs())?;
    let q = Qemu::linux(&initrd);
    println!(
        "$ {:?}",
        q.command(&annotated, std::path::Path::new("serial.txt"))
    );
    let boot = q.boot(&annotated)?;
    if !boot.passed() || !boot.serial.contains(pvguest::initramfs::MARKER) {
        bail!(
            "the annotated kernel did not reach its init (exit {:?}):\n{}",
            boot.exit_code,
            boot.serial
        );
    }
    println!(
        "QEMU (TCG, microvm) booted the annotated kernel to its init in {:.2} s; init printed {:?} \
         and exited QEMU with status 33",
        boot.elapsed.as_secs_f64(),
        pvguest::initramfs::MARKER
    );
    Ok(())
}
