//! `cargo xtask mutants`: cargo-mutants over the modules that decide safety (table parsing and
//! validation, ROM parsing and validation, the planner's checks, trap emulation), each group
//! tested by the fastest tests that reach it. Every mutant that survives must be listed in
//! `docs/mutants.md` with why (an equivalent mutant, a check another check repeats); one that
//! survives unlisted fails the run, as does a listed one that no longer survives (the list
//! must stay true). Not part of `cargo xtask test`: a run takes about a quarter of an hour.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::util::{output, root, run};

/// One cargo-mutants run: the package it mutates, the files, the package whose tests judge.
struct Group {
    name: &'static str,
    slug: &'static str,
    package: &'static str,
    files: &'static [&'static str],
    tests: &'static str,
}

const GROUPS: [Group; 3] = [
    Group {
        name: "site-table parsing and validation",
        slug: "table",
        package: "patch-sites",
        files: &[
            "patch-sites/src/table/parse.rs",
            "patch-sites/src/table/site.rs",
        ],
        tests: "patch-sites",
    },
    Group {
        name: "ROM parsing",
        slug: "rom",
        package: "patch-sites",
        files: &["patch-sites/src/rom.rs"],
        tests: "patch-sites",
    },
    Group {
        name: "ROM validation, the planner's checks, trap emulation",
        slug: "runtime",
        package: "pvpatch-runtime",
        files: &[
            "runtime/src/romcheck.rs",
            "runtime/src/plan.rs",
            "runtime/src/trap.rs",
        ],
        tests: "pvpatch-runtime",
    },
];

/// The version the figures in the README were measured with.
const VERSION: &str = "27.1.0";

fn ensure_installed() -> Result<()> {
    if output(Command::new("cargo").args(["mutants", "--version"])).is_some() {
        return Ok(());
    }
    println!("mutants: installing cargo-mutants {VERSION} from crates.io");
    run(Command::new("cargo").args(["install", "--locked", "cargo-mutants", "--version", VERSION]))
}

/// A mutant's name without its line and column (`file: what`), so that the list of explained
/// survivors does not go stale when code above them moves.
fn key(line: &str) -> Option<String> {
    let mut parts = line.splitn(4, ':');
    let (file, _, _, what) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some(format!("{file}:{}", what.trim_end()))
}

/// The survivors `docs/mutants.md` explains: each table row's first cell, in backquotes.
fn explained(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        // A `|` in a table cell is written `\|`.
        .map(|(k, _)| k.replace("\\|", "|"))
        .collect()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

pub fn command() -> Result<()> {
    ensure_installed()?;
    let root = root();
    let doc =
        std::fs::read_to_string(root.join("docs/mutants.md")).context("reading docs/mutants.md")?;
    let listed = explained(&doc);
    let started = Instant::now();
    let mut survived = BTreeSet::new();
    let mut rows = Vec::new();
    for g in &GROUPS {
        println!("\n==> mutants: {} ({})", g.name, g.files.join(", "));
        let out = root.join("target/mutants").join(g.slug);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let t = Instant::now();
        let mut c = Command::new("cargo");
        c.current_dir(&root)
            .args(["mutants", "--no-shuffle", "-p", g.package])
            .args(["--test-package", g.tests])
            .arg("-o")
            .arg(&out);
        for f in g.files {
            c.args(["-f", f]);
        }
        // cargo-mutants exits non-zero when a mutant survives: the lists below decide.
        let _ = c.status().context("running cargo mutants")?;
        let secs = t.elapsed().as_secs_f64();
        let dir = out.join("mutants.out");
        let count = |f: &str| lines(&dir.join(f)).len();
        let (caught, missed, timeout, unviable) = (
            count("caught.txt"),
            count("missed.txt"),
            count("timeout.txt"),
            count("unviable.txt"),
        );
        if caught + missed + timeout + unviable == 0 {
            bail!("cargo mutants produced no results for {}", g.name);
        }
        for l in lines(&dir.join("missed.txt"))
            .into_iter()
            .chain(lines(&dir.join("timeout.txt")))
        {
            survived.insert(key(&l).unwrap_or(l));
        }
        rows.push(format!(
            "| {} | {} | {caught} | {missed} | {timeout} | {unviable} | {secs:.0} s |",
            g.name,
            g.files
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    println!(
        "\n==> mutants: results ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    println!("| group | files | caught | missed | timed out | unviable | time |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    let unexplained: Vec<&String> = survived.difference(&listed).collect();
    let stale: Vec<&String> = listed.difference(&survived).collect();
    if !stale.is_empty() {
        println!("\nlisted in docs/mutants.md but caught now (remove them):");
        for s in &stale {
            println!("  {s}");
        }
    }
    if !unexplained.is_empty() {
        println!(
            "\nsurvived, and not explained in docs/mutants.md (kill them with a test, or explain):"
        );
        for s in &unexplained {
            println!("  {s}");
        }
    }
    if !unexplained.is_empty() || !stale.is_empty() {
        bail!(
            "{} unexplained survivors, {} stale explanations",
            unexplained.len(),
            stale.len()
        );
    }
    println!(
        "\nevery survivor ({}) is explained in docs/mutants.md",
        survived.len()
    );
    Ok(())
}
