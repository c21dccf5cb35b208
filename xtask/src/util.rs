//! Running commands, and the report of what ran, what was skipped and why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, or `target` in the workspace root.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `cargo`, as the one running xtask, in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Whether this runs in CI (`CI=true`).
pub fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Runs a command, showing it first; fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, if it ran and succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a run did: steps with their times, and everything skipped with its reason.
#[derive(Debug, Default)]
pub struct Report {
    steps: Vec<(String, Duration, bool)>,
    skipped: Vec<String>,
    figures: Vec<String>,
}

impl Report {
    /// Runs one step, timing it. A failed step is recorded and its error returned.
    pub fn step(&mut self, name: &str, f: impl FnOnce(&mut Report) -> Result<()>) -> Result<()> {
        println!("\n==> {name}");
        let t = Instant::now();
        let r = f(self);
        self.steps.push((name.to_owned(), t.elapsed(), r.is_ok()));
        if let Err(e) = &r {
            eprintln!("==> {name}: FAILED: {e:#}");
            self.finish_failed();
        }
        r
    }

    /// Records something that was not run, and why.
    pub fn skip(&mut self, what: impl Into<String>) {
        let what = what.into();
        println!("skipped: {what}");
        self.skipped.push(what);
    }

    /// Reads the skips the tests wrote (one per line: `test: reason`).
    pub fn absorb_skip_log(&mut self, path: &Path) {
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                self.skipped.push(line.to_owned());
            }
        }
    }

    /// Reads the figures the tests measured and asserted (one per line: `test: figure`).
    pub fn absorb_figures_log(&mut self, path: &Path) {
        if let Ok(text) = std::fs::read_to_string(path) {
            self.figures.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned),
            );
        }
    }

    /// Whether a step failed.
    pub fn failed(&self) -> bool {
        self.steps.iter().any(|s| !s.2)
    }

    fn finish_failed(&self) {
        self.print_summary();
    }

    fn print_summary(&self) {
        println!("\n==> summary");
        for (name, t, ok) in &self.steps {
            println!(
                "  {:>7.1} s  {}  {name}",
                t.as_secs_f64(),
                if *ok { "ok    " } else { "FAILED" }
            );
        }
        if !self.figures.is_empty() {
            println!("  figures the tests asserted ({}):", self.figures.len());
            for f in &self.figures {
                println!("    - {f}");
            }
        }
        if self.skipped.is_empty() {
            println!("  nothing was skipped");
        } else {
            println!("  skipped ({}):", self.skipped.len());
            for s in &self.skipped {
                println!("    - {s}");
            }
        }
    }

    /// Prints the summary.
    pub fn finish(&self, started: Instant) {
        self.print_summary();
        println!("  total {:.1} s", started.elapsed().as_secs_f64());
    }
}
