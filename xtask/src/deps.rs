//! The crate boundaries, checked with `cargo tree`: the ABI crate has no dependencies at all; the
//! ISA crate and the runtime are `no_std` (they build for `x86_64-unknown-none`, checked by their
//! own step); the post-link tool's library pulls in no command-line crate. (That nothing shipped
//! reaches unicorn, which is GPL-2.0, is checked on the lock file by the oracle's tests.)

use std::collections::BTreeSet;

use anyhow::{Result, bail};

use crate::util::{cargo, output};

/// The crates `cargo tree` lists for `args` (normal and build edges, the package itself
/// excluded).
fn tree(package: &str, args: &[&str]) -> Result<BTreeSet<String>> {
    let mut c = cargo();
    c.args([
        "tree",
        "--locked",
        "-p",
        package,
        "--prefix",
        "none",
        "-e",
        "normal,build",
    ])
    .args(["--format", "{p}"])
    .args(args);
    let Some(out) = output(&mut c) else {
        bail!("cargo tree -p {package} failed");
    };
    Ok(out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Fails if a boundary is crossed; prints what was checked.
pub fn check() -> Result<()> {
    let abi = tree("patch-sites", &["-e", "normal,build,dev"])?;
    if !abi.is_empty() {
        bail!("patch-sites must have no dependencies, has {abi:?}");
    }
    println!("patch-sites: no dependencies (normal, build or dev)");
    let lib = tree("pvpatch", &["--no-default-features"])?;
    let cli: Vec<&String> = lib
        .iter()
        .filter(|p| matches!(p.as_str(), "clap" | "anyhow" | "indicatif"))
        .collect();
    if !cli.is_empty() {
        bail!("pvpatch --no-default-features pulls in {cli:?}");
    }
    println!(
        "pvpatch --no-default-features: {} crates, none of clap, anyhow, indicatif",
        lib.len()
    );
    Ok(())
}
