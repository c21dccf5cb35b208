//! Building the boot shim (`x86_64-unknown-none`, linked at its fixed virtual base with no
//! relocations, size-optimised) and shimming the Debian kernels for the tests and the demo.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;

/// The flags the shim is built with: a static link (code-model=kernel, the target's default,
/// for its address in the top 2 GiB), in place of the workspace's flags for the guest.
pub const RUSTFLAGS: &str = "-C relocation-model=static -C code-model=kernel";

/// Which shim: the whole one, or the lean one that only applies plans prepared at link time
/// (built without the `boot-planning` feature: no decoder, no planner).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// Plans prepared at link time, and planning at boot (a ROM, damaged plans, on request).
    Whole,
    /// Plans prepared at link time only.
    Lean,
}

/// The shim's own target directory (it builds while an outer `cargo test` holds the
/// workspace's, and with other flags than the guest); the lean one has its own.
pub fn target_dir_of(f: Flavour) -> PathBuf {
    crate::workspace_root().join(match f {
        Flavour::Whole => "target/shim",
        Flavour::Lean => "target/shim-lean",
    })
}

/// The whole shim's target directory.
pub fn target_dir() -> PathBuf {
    target_dir_of(Flavour::Whole)
}

/// The command that builds the shim; `quiet` leaves out cargo's progress.
pub fn build_command(quiet: bool) -> Command {
    build_command_of(Flavour::Whole, quiet)
}

/// The command that builds the shim of flavour `f`.
pub fn build_command_of(f: Flavour, quiet: bool) -> Command {
    let mut c = crate::bare_metal_build("pvpatch-shim", &target_dir_of(f), quiet);
    if f == Flavour::Lean {
        c.arg("--no-default-features");
    }
    c.env("RUSTFLAGS", RUSTFLAGS);
    c.env_remove("CARGO_ENCODED_RUSTFLAGS");
    // Size first (iced-x86's decoder is most of the shim), speed for the runtime's planner:
    // at opt-level "z" LLVM copies every struct with `rep movsb`, which TCG runs at about 500
    // cycles for 128 bytes against 200 for plain moves (measured in the shim), and the planner
    // copies several per site. Per-crate opt-level 2 made the shim's whole run under TCG
    // 20-25% shorter for 12% more bytes. The shim's own code and the ABI's, which a plan
    // prepared at link time runs alone, at "s": less unrolled code, fewer blocks for TCG to
    // translate (252 to 239 of them on Debian 6.1 under tcg).
    c.args([
        "--config",
        "profile.release.opt-level=\"z\"",
        "--config",
        "profile.release.package.pvpatch-runtime.opt-level=2",
        "--config",
        "profile.release.package.pvpatch-isa.opt-level=2",
        "--config",
        "profile.release.package.patch-sites.opt-level=\"s\"",
        "--config",
        "profile.release.package.pvpatch-shim.opt-level=\"s\"",
        "--config",
        "profile.release.lto=true",
        "--config",
        "profile.release.codegen-units=1",
    ]);
    c
}

/// The built shim's ELF.
pub fn path() -> PathBuf {
    path_of(Flavour::Whole)
}

/// The built ELF of the shim of flavour `f`.
pub fn path_of(f: Flavour) -> PathBuf {
    target_dir_of(f).join("x86_64-unknown-none/release/pvpatch-shim")
}

/// Builds the shim (quietly); returns its ELF. `PVPATCH_SHIM` names a prebuilt one instead.
pub fn build_shim() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("PVPATCH_SHIM") {
        return Ok(PathBuf::from(p));
    }
    crate::run_build(build_command(true), "shim", path())
}

/// Builds the lean shim (quietly); returns its ELF.
pub fn build_lean_shim() -> Result<PathBuf, HarnessError> {
    crate::run_build(
        build_command_of(Flavour::Lean, true),
        "lean shim",
        path_of(Flavour::Lean),
    )
}

/// `vmlinux` annotated with the shim `shim` in front of it, written to `out`.
pub fn shimmed(
    vmlinux: &Path,
    shim: &Path,
    out: &Path,
) -> Result<pvpatch::annotate::Annotation, HarnessError> {
    let img =
        pvpatch::load::Image::open(vmlinux).map_err(|e| HarnessError::Annotate(e.to_string()))?;
    let report = pvpatch::scan_image(&img, Default::default(), None);
    let opts = pvpatch::annotate::AnnotateOptions {
        boot_shim: Some(
            pvpatch::shim::Shim::load(shim).map_err(|e| HarnessError::Annotate(e.to_string()))?,
        ),
        ..Default::default()
    };
    pvpatch::annotate::annotate(&report, out, &opts)
        .map_err(|e| HarnessError::Annotate(e.to_string()))
}
