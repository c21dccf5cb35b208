//! `cargo xtask`: the project's commands.
//!
//! * `setup`: installs what the project needs on a fresh Debian 12 machine (idempotent);
//! * `test`: set-up, formatting, clippy, every test, a short fuzz run of every target;
//! * `fuzz [--time SECS] [TARGET...]`: runs the cargo-fuzz targets;
//! * `mutants`: cargo-mutants over the modules that decide safety;
//! * `dist`: the release binary, shell completions and man pages, for packagers;
//!
//! Every step says what it runs. Whatever cannot run is listed at the end with the reason.

mod demo;
mod deps;
mod dist;
mod fuzz;
mod kernel;
mod mutants;
mod report;
mod setup;
mod util;

use std::time::Instant;

use anyhow::{Result, bail};

use crate::util::{Report, cargo, root, run};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  demo                       the main job: installs QEMU if missing; pvpatch on Debian's
                             current kernel (fetched if needed): scan summary, annotation,
                             verification, boot under QEMU; then our guest kernel annotated,
                             given a ROM and booted on every backend this machine has; an
                             HTML report with charts (target/pvpatch-report/index.html)
  report [DATA.json]         redraw the demo's HTML report (target/pvpatch-report) from the
                             figures it saved (data.json), without booting anything
  report --readme-chart      redraw docs/img/cycles-per-op.svg from the figures it embeds
  setup                      install QEMU 10, cmake, libclang-dev, man-db, chromium, the
                             x86_64-unknown-none target, the nightly toolchain, cargo-fuzz and
                             Debian's Xen hypervisor (into the cache) (idempotent; without root,
                             prints the commands instead)
  test                       setup, fmt --check, clippy -D warnings, every test, ~20 s of fuzzing
                             per target; lists what was skipped and why
  fuzz [--time S] [TARGET..] run the cargo-fuzz targets (default: all, 60 s each)
  test-update                rewrite the expected outputs the tests compare with (golden
                             ledgers and summaries, fuzz seeds) from what the code writes now;
                             review the diff like code
  dist [--out DIR]           the release binary, shell completions (bash, zsh, fish, elvish,
                             PowerShell) and man pages, from pvpatch's clap definition, in
                             target/dist (or DIR)
  shim [--lean]              build the boot shim for x86_64-unknown-none (installing the target
                             if missing) and print its path, for pvpatch annotate --boot-shim
                             (--lean: the shim that only applies plans prepared at link time)
  mutants                    cargo-mutants (installed if missing) over table parsing and
                             validation, ROM parsing and validation, the planner's checks and
                             trap emulation; fails on a survivor docs/mutants.md does not
                             explain (not part of test: about a quarter of an hour)
  kernel                     download the current Debian kernels (bookworm's 6.1 and
                             bookworm-backports' 6.12) and their System.map, extract each
                             vmlinux and cache them (outside the repository)
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::setup(&mut Report::default()).map(|_| ()),
        Some("test") => test(),
        Some("fuzz") => fuzz::command(&args[1..]),
        Some("kernel") => kernel::fetch().map(|_| ()),
        Some("test-update") => test_update(),
        Some("demo") => demo::demo(),
        Some("report") => report::command(&args[1..]),
        Some("dist") => dist::command(&args[1..]),
        Some("shim") if args.get(1).map(String::as_str) == Some("--lean") => {
            shim_of(pvpatch_testkit::shim::Flavour::Lean).map(|p| println!("{}", p.display()))
        }
        Some("shim") => shim().map(|p| println!("{}", p.display())),
        Some("mutants") => mutants::command(),
        Some("help") | Some("--help") | Some("-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// Builds the boot shim (cargo's progress shown); returns its ELF.
fn shim() -> Result<std::path::PathBuf> {
    shim_of(pvpatch_testkit::shim::Flavour::Whole)
}

/// Builds the boot shim of flavour `f` (cargo's progress shown); returns its ELF.
fn shim_of(f: pvpatch_testkit::shim::Flavour) -> Result<std::path::PathBuf> {
    setup::rust_target()?;
    run(&mut pvpatch_testkit::shim::build_command_of(f, false))?;
    let p = pvpatch_testkit::shim::path_of(f);
    let size = std::fs::metadata(&p)?.len();
    let name = match f {
        pvpatch_testkit::shim::Flavour::Whole => "the boot shim",
        pvpatch_testkit::shim::Flavour::Lean => "the lean boot shim",
    };
    eprintln!("{name}: {} ({size} bytes of ELF)", p.display());
    Ok(p)
}

/// Rewrites every expected-output file the tests compare with (`PVPATCH_UPDATE=1`).
fn test_update() -> Result<()> {
    for (package, test, filter) in [
        ("patch-sites", "abi", "seeds"),
        ("pvpatch", "integration", "golden"),
        ("pvpatch", "integration", "fuzz_seed"),
    ] {
        run(cargo()
            .args(["test", "--locked", "-p", package, "--test", test, filter])
            .env("PVPATCH_UPDATE", "1"))?;
    }
    println!("rewritten; `git diff` shows what changed");
    Ok(())
}

/// `cargo clippy` for `x86_64-unknown-none` with `args` (packages, features), warnings denied.
fn clippy_bare_metal(args: &[&str]) -> Result<()> {
    run(cargo()
        .args(["clippy", "--locked", "--target", "x86_64-unknown-none"])
        .args(args)
        .args(["--", "-D", "warnings"]))
}

fn test() -> Result<()> {
    let started = Instant::now();
    let mut report = Report::default();
    report.step("setup", |r| setup::setup(r).map(|_| ()))?;
    report.step("fetch the Debian kernel (cargo xtask kernel)", |_| {
        kernel::fetch().map(|_| ())
    })?;
    let root = root();
    report.step("cargo fmt --check", |_| {
        run(cargo().args(["fmt", "--all", "--check"]))
    })?;
    report.step("clippy (host, every crate and target)", |_| {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    report.step(
        "clippy (x86_64-unknown-none: ABI, ISA, runtime, guest, shim)",
        |_| {
            clippy_bare_metal(&[
                "-p",
                "patch-sites",
                "-p",
                "pvpatch-isa",
                "-p",
                "pvpatch-runtime",
                "-p",
                "pvguest",
                "-p",
                "pvpatch-shim",
            ])
        },
    )?;
    report.step(
        "clippy (x86_64-unknown-none: the lean shim, without boot-time planning)",
        |_| clippy_bare_metal(&["-p", "pvpatch-shim", "--no-default-features"]),
    )?;
    report.step("crate boundaries (cargo tree)", |_| deps::check())?;
    report.step("clippy (cargo-fuzz targets)", |_| {
        run(cargo().current_dir(root.join("fuzz")).args([
            "clippy",
            "--locked",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    report.step(
        "build patch-sites, pvpatch-isa, pvpatch-runtime for x86_64-unknown-none",
        |_| {
            run(cargo().args([
                "build",
                "--locked",
                "-p",
                "patch-sites",
                "-p",
                "pvpatch-isa",
                "-p",
                "pvpatch-runtime",
                "--target",
                "x86_64-unknown-none",
            ]))
        },
    )?;
    report.step("build the boot shim (cargo xtask shim)", |_| {
        shim().map(|_| ())
    })?;
    let skip_log = root.join("target/xtask-skips.log");
    let _ = std::fs::remove_file(&skip_log);
    let figures_log = root.join("target/xtask-figures.log");
    let _ = std::fs::remove_file(&figures_log);
    report.step("cargo test --workspace", |_| {
        let mut c = cargo();
        c.args(["test", "--workspace", "--locked"]);
        c.env("PVPATCH_SKIP_LOG", &skip_log);
        c.env("PVPATCH_FIGURES_LOG", &figures_log);
        if util::is_ci() {
            // In CI nothing important may be skipped: a missing component fails the test.
            c.env("PVPATCH_REQUIRE_ALL", "1");
        }
        run(&mut c)
    })?;
    report.absorb_skip_log(&skip_log);
    report.absorb_figures_log(&figures_log);
    report.step("fuzz every target (20 s each)", |r| fuzz::run_all(r, 20))?;
    report.finish(started);
    if report.failed() {
        bail!("some steps failed");
    }
    Ok(())
}
