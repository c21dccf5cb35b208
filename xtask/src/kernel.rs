//! `cargo xtask kernel`: Debian bookworm's current `linux-image-*-amd64` package, downloaded
//! with `apt-get download` (nothing is installed), its bzImage unpacked into the ELF vmlinux,
//! checked, and cached outside the repository (see `pvguest::harness::cache_dir`).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use pvguest::harness::{CachedKernel, debian_kernel, debian_kernel_dir};

use crate::util::{output, run};

/// The package `linux-image-amd64` currently depends on, with its candidate version.
fn current_package() -> Result<(String, String)> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        .context("apt-cache depends linux-image-amd64 failed")?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .context("linux-image-amd64 depends on no linux-image-*-amd64 package")?
        .to_owned();
    let policy = output(Command::new("apt-cache").args(["policy", &pkg])).unwrap_or_default();
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .unwrap_or("unknown")
        .to_owned();
    Ok((pkg, version))
}

fn download(pkg: &str, dir: &Path) -> Result<std::path::PathBuf> {
    let get = |d: &Path| {
        run(Command::new("apt-get").current_dir(d).args([
            "download",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            pkg,
        ]))
    };
    if get(dir).is_err() {
        println!("kernel: download failed; refreshing apt's package lists and retrying");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        get(dir)?;
    }
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download produced no .deb")
}

/// `./boot/vmlinuz-*` from the package, read through `dpkg-deb --fsys-tarfile | tar`.
fn vmlinuz(deb: &Path, dir: &Path) -> Result<Vec<u8>> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("dpkg-deb")?;
    let stdout = dpkg.stdout.take().context("dpkg-deb stdout")?;
    let status = Command::new("tar")
        .current_dir(dir)
        .args(["-x", "--wildcards", "./boot/vmlinuz-*", "./boot/config-*"])
        .stdin(stdout)
        .status()
        .context("tar")?;
    if !dpkg.wait()?.success() || !status.success() {
        bail!("extracting ./boot from {} failed", deb.display());
    }
    let boot = dir.join("boot");
    let path = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the package has no /boot/vmlinuz-*")?;
    let mut b = Vec::new();
    std::fs::File::open(&path)?.read_to_end(&mut b)?;
    Ok(b)
}

/// Makes sure the current Debian kernel is cached; returns it.
pub fn fetch() -> Result<CachedKernel> {
    let (pkg, version) = current_package()?;
    let wanted = format!("{pkg} {version}");
    if let Ok(k) = debian_kernel() {
        if k.package == wanted {
            println!("kernel: {wanted} already cached at {}", k.vmlinux.display());
            return Ok(k);
        }
        println!(
            "kernel: cached {} is not the current {wanted}; replacing it",
            k.package
        );
    }
    let dir = debian_kernel_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = tempfile::tempdir_in(&dir)?;
    println!("kernel: downloading {wanted}");
    let deb = download(&pkg, work.path())?;
    let bz = vmlinuz(&deb, work.path())?;
    let format = pvpatch::bzimage::compression(pvpatch::bzimage::payload(&bz)?)?;
    let vmlinux = pvpatch::bzimage::extract_vmlinux(&bz)?;
    // Check it: an x86-64 ELF kernel with code and Linux's tables.
    let img = pvpatch::image::Image::from_bytes("vmlinux", vmlinux.clone())?;
    for needed in [".text", ".altinstructions", "__ex_table", ".orc_unwind_ip"] {
        if img.section(needed).is_none() {
            bail!("the extracted vmlinux has no {needed} section");
        }
    }
    pvpatch::output::write_bytes(&dir.join("vmlinux"), &vmlinux)?;
    pvpatch::output::write_bytes(&dir.join("vmlinuz"), &bz)?;
    if let Some(cfg) = std::fs::read_dir(work.path().join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("config-"))
        })
    {
        std::fs::copy(cfg, dir.join("config"))?;
    }
    // Written last: its presence means the cache is complete.
    pvpatch::output::write_bytes(&dir.join("package.txt"), format!("{wanted}\n").as_bytes())?;
    println!(
        "kernel: {wanted}: {format} bzImage of {} bytes -> vmlinux of {} bytes in {}",
        bz.len(),
        vmlinux.len(),
        dir.display()
    );
    debian_kernel().map_err(anyhow::Error::msg)
}
