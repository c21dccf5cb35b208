//! The cargo-fuzz targets in `fuzz`, run with the nightly toolchain. Each run uses
//! a scratch corpus (new inputs go there) seeded from the corpus kept in the repository, so a
//! run never dirties the tree. A crash fails the run and leaves its input in
//! `fuzz/artifacts/TARGET/`; copy it into the corpus and a regression test.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{Report, output, root, run};

/// Every target, from the fuzz package's manifest.
pub fn targets() -> Result<Vec<String>> {
    let manifest = root().join("fuzz/Cargo.toml");
    let text =
        std::fs::read_to_string(&manifest).with_context(|| format!("{}", manifest.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "pvpatch-fuzz-targets")
        .map(str::to_owned)
        .collect())
}

/// Whether `cargo +nightly fuzz` can run here; the reason if not.
fn available() -> Result<(), String> {
    if output(Command::new("cargo").args(["+nightly", "--version"])).is_none() {
        return Err("no nightly toolchain (cargo xtask setup installs it)".into());
    }
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        return Err("cargo-fuzz is not installed (cargo xtask setup installs it)".into());
    }
    Ok(())
}

/// Runs one target for `secs` seconds.
pub fn run_target(target: &str, secs: u64) -> Result<()> {
    let root = root();
    let dir = root.join("fuzz");
    let seeds = dir.join("corpus").join(target);
    let scratch = root.join("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&scratch)?;
    let mut c = Command::new("cargo");
    c.current_dir(&root)
        .args(["+nightly", "fuzz", "run", "--fuzz-dir"])
        .arg(&dir);
    c.arg(target).arg(&scratch);
    if seeds.is_dir() {
        c.arg(&seeds);
    }
    c.args([
        "--",
        &format!("-max_total_time={secs}"),
        "-print_final_stats=1",
    ]);
    run(&mut c)
}

/// Runs every target for `secs` seconds each; skips (with the reason) when fuzzing cannot run
/// here, unless in CI, where that is a failure.
pub fn run_all(report: &mut Report, secs: u64) -> Result<()> {
    if let Err(why) = available() {
        if crate::util::is_ci() {
            bail!("fuzzing cannot run: {why}");
        }
        report.skip(format!("fuzzing: {why}"));
        return Ok(());
    }
    for t in targets()? {
        run_target(&t, secs)?;
    }
    Ok(())
}

/// `cargo xtask fuzz [--time S] [TARGET...]`.
pub fn command(args: &[String]) -> Result<()> {
    let mut secs = 60;
    let mut chosen = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                secs = it
                    .next()
                    .context("--time needs seconds")?
                    .parse()
                    .context("--time")?;
            }
            t => chosen.push(t.to_owned()),
        }
    }
    let all = targets()?;
    if chosen.is_empty() {
        chosen = all.clone();
    }
    for t in &chosen {
        if !all.contains(t) {
            bail!("unknown fuzz target `{t}` (targets: {})", all.join(", "));
        }
    }
    available().map_err(|e| anyhow::anyhow!(e))?;
    for t in &chosen {
        run_target(t, secs)?;
    }
    Ok(())
}
