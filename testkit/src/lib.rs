//! # pvpatch-testkit
//!
//! What the tests, the benchmarks and `cargo xtask` share on the host:
//!
//! * [`qemu`]: one QEMU run (machine, accelerator, CPU, command line), its serial output, its
//!   exit status, and whether QEMU and `/dev/kvm` are there;
//! * [`guest`]: the guest kernel built and annotated as its build does, the demo ROM, and the
//!   configurations it is booted in;
//! * [`kernels`]: the cache of Debian kernels (`cargo xtask kernel` fills it);
//! * [`initramfs`]: a minimal initramfs whose `/init` proves a Linux kernel reached user space;
//! * [`elf`]: small ELF images built byte by byte, for tests, fuzzing and benchmarks;
//! * [`skip`]: a test that cannot run here says why (and fails in CI instead).
//!
//! Files are written with the post-link tool's own atomic writer (`pvpatch::output`).

pub mod elf;
pub mod guest;
pub mod initramfs;
pub mod kallsyms;
pub mod kernels;
pub mod qemu;
pub mod shim;
pub mod tools;
pub mod xen;

pub use guest::{
    Config, DEMO_ROM, RAW_SECTION, build_demo_rom, build_guest, build_guest_plain, configs,
    with_rom,
};
pub use kernels::{CachedKernel, debian_kernel};
/// Writes a file atomically (the post-link tool's writer: a temporary file beside it, then a
/// rename), so that tests running side by side never see half a file.
pub use pvpatch::output::write_bytes as write_file;
pub use qemu::{Accel, Boot, Machine, QEMU_PASS, Qemu, kvm_available, qemu_available};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A command could not be started.
    #[error("cannot run {what}")]
    Spawn {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Building the guest or the shim failed.
    #[error("building the guest or the shim failed ({0})")]
    Build(std::process::ExitStatus),
    /// QEMU ran past its time limit and was killed.
    #[error("QEMU did not exit within {0:?}; serial output so far:\n{1}")]
    Timeout(Duration, String),
    /// Annotating the guest failed.
    #[error("annotating the guest failed: {0}")]
    Annotate(String),
    /// A component the run needs is not on this machine.
    #[error("{0}")]
    Missing(String),
    /// A probe boot ended in a way that says nothing about what it probes.
    #[error("the probe boot ended unexpectedly: {0}")]
    Probe(String),
    /// QEMU's monitor (QMP) refused or failed a command.
    #[error("QEMU's monitor: {0}")]
    Monitor(String),
    /// An I/O error on a scratch file.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `cargo build --release --locked -p PACKAGE --target x86_64-unknown-none --target-dir DIR`,
/// for the bare-metal crates (the guest, the shim), each in its own target directory so that
/// it builds while an outer `cargo test` holds the workspace's; `quiet` leaves out cargo's
/// progress.
pub fn bare_metal_build(package: &str, target_dir: &Path, quiet: bool) -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = std::process::Command::new(cargo);
    c.current_dir(workspace_root());
    c.arg("build");
    if quiet {
        c.arg("--quiet");
    }
    c.args([
        "--release",
        "--locked",
        "-p",
        package,
        "--target",
        "x86_64-unknown-none",
    ])
    .arg("--target-dir")
    .arg(target_dir);
    c
}

/// Runs a bare-metal build; the ELF `built` names, once it succeeded.
pub fn run_build(
    mut c: std::process::Command,
    what: &str,
    built: PathBuf,
) -> Result<PathBuf, HarnessError> {
    let status = c.status().map_err(|source| HarnessError::Spawn {
        what: format!("cargo build ({what})"),
        source,
    })?;
    if !status.success() {
        return Err(HarnessError::Build(status));
    }
    Ok(built)
}

/// Records a figure a test measured and asserted (`what: value`): printed, and appended to
/// `PVPATCH_FIGURES_LOG`, which `cargo xtask test` prints in its summary (a passing test's
/// output is otherwise hidden).
pub fn figure(test: &str, what: &str) {
    eprintln!("{test}: {what}");
    append_line("PVPATCH_FIGURES_LOG", &format!("{test}: {what}"));
}

/// Appends `line` to the file the environment variable `var` names, if it names one (a log
/// for `cargo xtask test`; losing it loses only a line of its summary).
fn append_line(var: &str, line: &str) {
    if let Some(log) = std::env::var_os(var) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Records that `test` was skipped for `reason`: printed, and appended to the file named by
/// `PVPATCH_SKIP_LOG` (which `cargo xtask test` lists at the end). When
/// `PVPATCH_REQUIRE_ALL` is set (CI), a skip is a failure instead.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("PVPATCH_REQUIRE_ALL").is_some() {
        panic!("{test} cannot run here and PVPATCH_REQUIRE_ALL is set: {reason}");
    }
    eprintln!("skipped: {test}: {reason}");
    append_line("PVPATCH_SKIP_LOG", &format!("{test}: {reason}"));
}
