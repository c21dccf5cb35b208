//! Debian's Xen hypervisor, for booting the guest as a 64-bit PV kernel nested in QEMU's
//! software emulation: `apt-get download xen-hypervisor-4.17-amd64` (nothing is installed: the
//! package would touch the machine's boot configuration), its `/boot/xen-4.17-amd64.gz`
//! decompressed to the ELF (an ELF32 with a multiboot header) that QEMU's `-kernel` loads, all
//! in the cache beside the kernels.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use crate::kernels::{KernelError, cache_dir, download, io, member, write};
use crate::qemu::{Machine, Qemu};

/// The package.
pub const PACKAGE: &str = "xen-hypervisor-4.17-amd64";

/// The hypervisor's command line: its console and ours on COM1, all of its messages, a 256 MiB
/// dom0 (the guest).
pub const XEN_CMDLINE: &str =
    "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all dom0_mem=256M";

/// The cache directory.
pub fn dir() -> PathBuf {
    cache_dir().join("xen")
}

/// The hypervisor ELF, if `cargo xtask setup` cached it; why not if not.
pub fn cached() -> Result<PathBuf, String> {
    let elf = dir().join("xen.elf");
    match std::fs::read(dir().join("package.txt")) {
        Ok(_) if elf.is_file() => Ok(elf),
        _ => Err(format!(
            "Debian's Xen hypervisor is not in {} (`cargo xtask setup` downloads and unpacks it)",
            dir().display()
        )),
    }
}

/// Downloads and unpacks the hypervisor into the cache unless it is there; returns the ELF.
pub fn fetch() -> Result<PathBuf, KernelError> {
    if let Ok(p) = cached() {
        return Ok(p);
    }
    let dir = dir();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let work = tempfile::tempdir_in(&dir).map_err(io(&dir))?;
    let deb = download(PACKAGE, work.path())?;
    let gz = member(&deb, "./boot/xen-4.17-amd64.gz", work.path())?;
    let mut elf = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut elf)
        .map_err(|e| KernelError::Contents(format!("{}: gunzip: {e}", deb.display())))?;
    // An ELF32 image with a multiboot1 header in its first 8 KiB: what QEMU's -kernel loads.
    if elf.get(..5) != Some(b"\x7fELF\x01") {
        return Err(KernelError::Contents(format!(
            "{}: the hypervisor is not an ELF32 image",
            deb.display()
        )));
    }
    let multiboot = elf
        .get(..8192)
        .unwrap_or(&elf)
        .chunks_exact(4)
        .any(|w| w == 0x1bad_b002u32.to_le_bytes());
    if !multiboot {
        return Err(KernelError::Contents(format!(
            "{}: the hypervisor has no multiboot header",
            deb.display()
        )));
    }
    let out = dir.join("xen.elf");
    write(&out, &elf)?;
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    write(&dir.join("package.txt"), format!("{name}\n").as_bytes())?;
    println!("xen: {name} unpacked into {}", out.display());
    Ok(out)
}

/// QEMU running Xen (`xen`) with the guest as its first module (dom0) and `guest_args` as its
/// command line: TCG (`-cpu max` presents AMD with SVM, so Xen runs without XPTI), 512 MiB,
/// on `pc` with SeaBIOS (which loads a multiboot kernel; qboot does not). The `-kernel` passed to [`Qemu::command`] is the
/// hypervisor.
pub fn qemu(guest: &std::path::Path, guest_args: &str) -> Qemu {
    let module = if guest_args.is_empty() {
        guest.display().to_string()
    } else {
        format!("{} {guest_args}", guest.display())
    };
    Qemu {
        machine: Machine::PcMultiboot,
        memory_mb: 512,
        append: Some(XEN_CMDLINE.into()),
        extra: vec!["-initrd".into(), module],
        timeout: Duration::from_secs(120),
        ..Qemu::tcg()
    }
}

/// Whether this machine can boot the guest under Xen: QEMU, and the hypervisor in the cache.
pub fn available() -> Result<PathBuf, String> {
    crate::qemu::qemu_available()?;
    cached()
}

/// Boots `guest` as Xen's dom0 with `guest_args` on its command line and `module` (if any) as
/// its second module, and waits for QEMU to exit.
pub fn boot(
    guest: &std::path::Path,
    guest_args: &str,
    module: Option<&std::path::Path>,
) -> Result<crate::Boot, crate::HarnessError> {
    let xen = cached().map_err(crate::HarnessError::Missing)?;
    let mut q = qemu(guest, guest_args);
    if let (Some(m), Some(first)) = (module, q.extra.last_mut()) {
        first.push(',');
        first.push_str(&m.display().to_string());
    }
    q.boot(&xen)
}
