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

/// What QEMU's TCG translated of the shim's own code in one boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Translated {
    /// Translation blocks.
    pub blocks: usize,
    /// Guest instructions in them.
    pub instructions: usize,
}

/// QEMU arguments that log each block TCG translates (`-d in_asm`, into `log`), filtered to the
/// shim's addresses (`-dfilter`): its load (`phys`) and its link-time window (`vaddr`), `len`
/// bytes each. Linux's own blocks are left out of the log.
pub fn in_asm_args(log: &Path, phys: u64, vaddr: u64, len: u64) -> Vec<String> {
    vec![
        "-d".into(),
        "in_asm".into(),
        "-D".into(),
        log.display().to_string(),
        "-dfilter".into(),
        format!("{phys:#x}+{len:#x},{vaddr:#x}+{len:#x}"),
    ]
}

/// Counts the blocks of a `-d in_asm` log filtered to the shim ([`in_asm_args`]) and their
/// instructions, for one run of the shim: the first block is its entry, and a block at the
/// entry again (a reboot) ends the count.
///
/// QEMU writes each block as an `IN:` line and one line an instruction, `0x<address>:` then
/// its bytes and its text; an instruction too long for one line of bytes goes on in a line of
/// bytes alone, which is not counted.
pub fn count_translated(log: &str) -> Translated {
    let mut t = Translated::default();
    let mut entry = None;
    let mut at_block_start = false;
    for line in log.lines() {
        if line.starts_with("IN:") {
            at_block_start = true;
            continue;
        }
        let Some((addr, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(addr) = addr
            .strip_prefix("0x")
            .and_then(|a| u64::from_str_radix(a, 16).ok())
        else {
            continue;
        };
        if at_block_start {
            at_block_start = false;
            match entry {
                None => entry = Some(addr),
                Some(e) if e == addr => break,
                Some(_) => {}
            }
            t.blocks += 1;
        }
        let bytes_only = rest
            .split_whitespace()
            .all(|w| w.len() == 2 && w.bytes().all(|b| b.is_ascii_hexdigit()));
        if !bytes_only {
            t.instructions += 1;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as QEMU 10 writes them (from a log of the shim's entry and its 64-bit code).
    const LOG: &str = "\
----------------
IN: 
0x04c00000:  fa                       cli      
0x04c00001:  fc                       cld      
0x04c0000a:  e8 00 00 00 00           calll    0x4c0000f

----------------
IN: 
0xffffffffc0002a85:  48 b9 51 45 4d 55 20 43  movabsq  $0x47464320554d4551, %rcx
0xffffffffc0002a8d:  46 47 
0xffffffffc0002a8f:  48 39 c8                 cmpq     %rcx, %rax

----------------
IN: 
0xffffffffc0002a95:  c3                       retq     

----------------
IN: 
0x04c00000:  fa                       cli      
0x04c00001:  fc                       cld      
";

    #[test]
    fn counts_one_run_of_blocks_and_instructions() {
        assert_eq!(
            count_translated(LOG),
            Translated {
                blocks: 3,
                instructions: 6
            }
        );
        assert_eq!(count_translated(""), Translated::default());
    }

    #[test]
    fn filter_names_both_ranges() {
        let a = in_asm_args(Path::new("/t/l"), 0x4c0_0000, 0xffff_ffff_c000_0000, 0x1000);
        assert_eq!(a[5], "0x4c00000+0x1000,0xffffffffc0000000+0x1000");
    }
}
