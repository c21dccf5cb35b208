//! Stock Debian kernels, cached outside the repository for the tests, the benchmarks and the
//! demo: `cargo xtask kernel` fetches them with `apt-get download` (nothing is installed),
//! extracts the ELF vmlinux from the package's bzImage with the post-link tool's own extractor,
//! checks it, and keeps the package's `System.map` (from its `-dbg` package: the one in the
//! image package is a stub) as an independent reference for symbol recovery.
//!
//! Two kernels: bookworm's current one (6.1) and bookworm-backports' (6.12), each the target
//! of its suite's `linux-image-amd64` metapackage.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A Debian kernel the project uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    /// Short name (`6.1`, `6.12`).
    pub name: &'static str,
    /// Its directory in the cache.
    pub dir: &'static str,
    /// The suite whose `linux-image-amd64` names it.
    pub suite: &'static str,
}

/// Debian bookworm's current kernel (6.1), through bookworm-security when it is newer.
pub const BOOKWORM: KernelSpec = KernelSpec {
    name: "6.1",
    dir: "debian-bookworm-amd64",
    suite: "bookworm",
};

/// bookworm-backports' kernel (6.12).
pub const BACKPORTS: KernelSpec = KernelSpec {
    name: "6.12",
    dir: "debian-bookworm-backports-amd64",
    suite: "bookworm-backports",
};

/// Both kernels.
pub const ALL: [KernelSpec; 2] = [BOOKWORM, BACKPORTS];

/// Where downloaded kernels and other large artefacts are cached: `$PVPATCH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/pvpatch`, else `~/.cache/pvpatch` (never inside the repository).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PVPATCH_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("pvpatch");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/pvpatch")
}

impl KernelSpec {
    /// The kernel's directory in the cache.
    pub fn cache(&self) -> PathBuf {
        cache_dir().join("kernels").join(self.dir)
    }
}

/// A cached Debian kernel, as `cargo xtask kernel` leaves it.
#[derive(Clone, Debug)]
pub struct CachedKernel {
    /// Which one.
    pub spec: KernelSpec,
    /// The ELF vmlinux extracted from the package's bzImage.
    pub vmlinux: PathBuf,
    /// The bzImage itself (`/boot/vmlinuz-*`).
    pub vmlinuz: PathBuf,
    /// The package's real `System.map` (from its `-dbg` package).
    pub system_map: PathBuf,
    /// The package it came from (`linux-image-6.1.0-57-amd64 6.1.192-3`).
    pub package: String,
}

/// The cached kernel `spec`, or why there is none (`cargo xtask kernel` fetches it).
pub fn cached(spec: KernelSpec) -> Result<CachedKernel, String> {
    let dir = spec.cache();
    let package = std::fs::read_to_string(dir.join("package.txt")).map_err(|_| {
        format!(
            "no Debian {} kernel in {} (`cargo xtask kernel` downloads and extracts it)",
            spec.name,
            dir.display()
        )
    })?;
    let k = CachedKernel {
        spec,
        vmlinux: dir.join("vmlinux"),
        vmlinuz: dir.join("vmlinuz"),
        system_map: dir.join("System.map"),
        package: package.trim().to_owned(),
    };
    for f in [&k.vmlinux, &k.vmlinuz, &k.system_map] {
        if !f.is_file() {
            return Err(format!(
                "{} is missing (`cargo xtask kernel` fetches it)",
                f.display()
            ));
        }
    }
    Ok(k)
}

/// The cached bookworm kernel (6.1).
pub fn debian_kernel() -> Result<CachedKernel, String> {
    cached(BOOKWORM)
}

/// Why a kernel could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A command failed or could not run.
    #[error("{0}")]
    Command(String),
    /// apt knows no such package.
    #[error("{0}")]
    Package(String),
    /// The package's contents are not what was expected.
    #[error("{0}")]
    Contents(String),
    /// I/O on the cache.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bzImage could not be extracted.
    #[error("extracting the vmlinux")]
    Extract(#[source] pvpatch::load::bzimage::BzImageError),
    /// The extracted vmlinux does not load.
    #[error("the extracted vmlinux")]
    Image(#[source] pvpatch::load::ImageError),
    /// The cache could not be written.
    #[error("writing the cache")]
    Output(#[source] pvpatch::output::OutputError),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Runs a command, echoing it; its standard output.
fn stdout_of(cmd: &mut Command) -> Result<String, KernelError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| KernelError::Command(format!("cannot run {shown}: {e}")))?;
    if !out.status.success() {
        return Err(KernelError::Command(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The version of `linux-image-amd64` in `suite` (or its security update), and the image
/// package that version depends on.
fn current_package(suite: &str) -> Result<(String, String), KernelError> {
    let madison = stdout_of(Command::new("apt-cache").args(["madison", "linux-image-amd64"]))?;
    // ` linux-image-amd64 | 6.1.192-3 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages`
    let version = madison
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            let dist = f.get(2)?.split_whitespace().nth(1)?.split('/').next()?;
            let ok = dist == suite || dist == format!("{suite}-security");
            ok.then(|| f[1].to_owned())
        })
        .next()
        .ok_or_else(|| {
            KernelError::Package(format!(
                "apt knows no linux-image-amd64 in {suite} (is {suite} among apt's sources? \
                 `cargo xtask setup` adds bookworm-backports)"
            ))
        })?;
    let deps = stdout_of(
        Command::new("apt-cache").args(["depends", &format!("linux-image-amd64={version}")]),
    )?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .ok_or_else(|| {
            KernelError::Package(format!(
                "linux-image-amd64 {version} depends on no linux-image-*-amd64 package"
            ))
        })?
        .to_owned();
    Ok((pkg, version))
}

/// `apt-get download PKG` into `dir`; the .deb.
pub(crate) fn download(pkg: &str, dir: &Path) -> Result<PathBuf, KernelError> {
    let get = || {
        println!("kernel: apt-get download {pkg}");
        let status = Command::new("apt-get")
            .current_dir(dir)
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", pkg])
            .status();
        matches!(status, Ok(s) if s.success())
    };
    if !get() {
        println!("kernel: download failed; refreshing apt's package lists and retrying");
        stdout_of(Command::new("apt-get").args(["update", "-q"]))?;
        if !get() {
            return Err(KernelError::Command(format!(
                "apt-get download {pkg} failed"
            )));
        }
    }
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .ok_or_else(|| KernelError::Command(format!("apt-get download {pkg} produced no .deb")))
}

/// The first file of `deb` whose path starts with `prefix` (`./boot/vmlinuz-`), read through
/// `dpkg-deb --fsys-tarfile | tar` without unpacking the rest: tar stops at the first match.
pub(crate) fn member(deb: &Path, prefix: &str, dir: &Path) -> Result<Vec<u8>, KernelError> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        // It fails on the closed pipe once tar has what it wants.
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| KernelError::Command(format!("dpkg-deb: {e}")))?;
    let stdout = dpkg
        .stdout
        .take()
        .ok_or_else(|| KernelError::Command("dpkg-deb: no output".into()))?;
    let out = Command::new("tar")
        .current_dir(dir)
        .args([
            "-x",
            "-v",
            "--occurrence=1",
            "--wildcards",
            &format!("{prefix}*"),
        ])
        .stdin(stdout)
        .output()
        .map_err(|e| KernelError::Command(format!("tar: {e}")))?;
    let _ = dpkg.wait();
    let name = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
        .filter(|_| out.status.success())
        .ok_or_else(|| KernelError::Contents(format!("{} has no {prefix}*", deb.display())))?;
    let path = dir.join(&name);
    let mut b = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut b))
        .map_err(io(&path))?;
    Ok(b)
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), KernelError> {
    pvpatch::output::write_bytes(path, bytes).map_err(KernelError::Output)
}

/// Makes sure the current kernel of `spec` is cached (downloading and extracting it if not, or
/// if the suite has a newer one); returns it.
pub fn fetch(spec: KernelSpec) -> Result<CachedKernel, KernelError> {
    let (pkg, version) = current_package(spec.suite)?;
    let wanted = format!("{pkg} {version}");
    if let Ok(k) = cached(spec) {
        if k.package == wanted {
            println!(
                "kernel: {} {wanted} already cached at {}",
                spec.name,
                k.vmlinux.display()
            );
            return Ok(k);
        }
        println!(
            "kernel: cached {} is not the current {wanted}; replacing it",
            k.package
        );
    }
    let dir = spec.cache();
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let work = tempfile::tempdir_in(&dir).map_err(io(&dir))?;
    let deb = download(&pkg, work.path())?;
    let bz = member(&deb, "./boot/vmlinuz-", work.path())?;
    let config = member(&deb, "./boot/config-", work.path())?;
    let extracted = pvpatch::load::bzimage::extract_vmlinux(
        &bz,
        pvpatch::load::bzimage::DEFAULT_MAX_DECOMPRESSED,
    )
    .map_err(KernelError::Extract)?;
    let (format, vmlinux) = (extracted.format, extracted.vmlinux);
    // Check it: an x86-64 ELF kernel with code and Linux's tables.
    let img =
        pvpatch::load::Image::from_bytes("vmlinux", vmlinux.clone()).map_err(KernelError::Image)?;
    for needed in [".text", ".altinstructions", "__ex_table", ".orc_unwind_ip"] {
        if img.section(needed).is_none() {
            return Err(KernelError::Contents(format!(
                "the extracted vmlinux has no {needed} section"
            )));
        }
    }
    drop(img);
    // The real System.map is in the -dbg package (the image package's is an 83-byte stub); tar
    // stops once it has it, near the start of the archive.
    let dbg = download(&format!("{pkg}-dbg"), work.path())?;
    let map = member(&dbg, "./usr/lib/debug/boot/System.map-", work.path())?;
    if map.len() < 1_000_000 {
        return Err(KernelError::Contents(format!(
            "the System.map of {pkg}-dbg has only {} bytes",
            map.len()
        )));
    }
    write(&dir.join("vmlinux"), &vmlinux)?;
    write(&dir.join("vmlinuz"), &bz)?;
    write(&dir.join("config"), &config)?;
    write(&dir.join("System.map"), &map)?;
    // Written last: its presence means the cache is complete.
    write(&dir.join("package.txt"), format!("{wanted}\n").as_bytes())?;
    println!(
        "kernel: {wanted}: {format} bzImage of {} bytes -> vmlinux of {} bytes, System.map of {} \
         bytes, in {}",
        bz.len(),
        vmlinux.len(),
        map.len(),
        dir.display()
    );
    cached(spec).map_err(KernelError::Contents)
}
