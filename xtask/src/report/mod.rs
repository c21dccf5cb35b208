//! The demo's HTML report: `target/pvpatch-report/index.html`.
//!
//! `cargo xtask demo` gathers what each configuration's guest reported into a [`Data`] (plain
//! figures, serde both ways) and writes it beside the report as `data.json`; everything else is
//! drawn from that value alone, so `cargo xtask report` redraws a report without booting
//! anything. The page is self-contained: its charts are inline SVG drawn by plotters
//! ([`chart`]), its style inline, no script, no font, nothing fetched.
//!
//! The charts: cycles per op per configuration and form (log scale), sites by outcome, and
//! patching cost per site; under each, its figures as a table. One chart is also written as
//! `cycles-per-op.svg`: the README shows it ([`README_CHART`]), and a test redraws it from the
//! data it embeds to check that it is what the current code draws.

pub mod chart;
mod html;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::chart::{Bars, Colour, Group, Layout, Scale, Series};
use crate::util::output;

/// The README's chart, relative to the workspace root.
pub const README_CHART: &str = "docs/img/cycles-per-op.svg";
/// The configurations whose cycles per op the README's chart shows, the first that ran.
const README_CONFIGS: [&str; 2] = ["kvm", "tcg"];

/// What a demo run measured, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Data {
    /// Machine, date, commit, command.
    pub meta: Meta,
    /// Every configuration booted, in the order the demo booted them.
    pub runs: Vec<Run>,
    /// The configurations this machine could not run, with why.
    pub skipped: Vec<Skipped>,
}

/// Where and how the figures were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The command that produced them.
    pub command: String,
    /// When (UTC).
    pub date: String,
    /// `git rev-parse HEAD`, and whether the tree had changes.
    pub commit: String,
    /// The kernel, the CPU and how many.
    pub machine: String,
}

/// A configuration that was not booted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// Its name.
    pub config: String,
    /// Why not.
    pub why: String,
}

/// One boot of the guest: what its report said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The configuration's name (`tcg`, `kvm-rom`, `xen`, ...).
    pub config: String,
    /// What it is.
    pub about: String,
    /// The backend the guest detected.
    pub backend: String,
    /// QEMU's exit status said pass.
    pub passed: bool,
    /// QEMU's start to its exit.
    pub seconds: f64,
    /// Sites in the guest's table.
    pub sites: u64,
    /// What the patcher made of them.
    pub outcomes: Outcomes,
    /// The self-tests.
    pub selftests: Vec<SelfTest>,
    /// Why nothing was patched, if so.
    pub refused: Option<String>,
    /// Planning, in the guest's TSC cycles.
    pub plan_cycles: u64,
    /// The first (cold) plan, where the guest times two (Xen).
    pub plan_first_cycles: Option<u64>,
    /// Applying.
    pub apply_cycles: u64,
    /// Planning and applying over the sites.
    pub cycles_per_site: u64,
    /// Planning and applying against the guest's boot, in thousandths.
    pub share_of_boot_permille: u64,
    /// Cycles per op.
    pub bench: Vec<BenchRow>,
}

/// Sites by outcome (`patch_sites::Outcome`'s names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    /// Already what the backend wants.
    pub unchanged: u64,
    /// Rewritten to the native instruction.
    pub native: u64,
    /// Rewritten to an inline sequence.
    pub inline: u64,
    /// Rewritten to a call.
    pub call: u64,
    /// Rewritten to nothing (NOPs).
    pub nothing: u64,
    /// Rewritten to trap.
    pub trap: u64,
}

/// One self-test's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfTest {
    /// Its name.
    pub name: String,
    /// `pass`, `fail` or `skip`.
    pub result: String,
    /// Why, if not passed.
    pub why: String,
}

/// Cycles per op, per form (`None`: not measured there, or the loop faults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// The op.
    pub op: String,
    /// `kernel` or `user`; `None` under Xen (a PV kernel runs in ring 3).
    pub ring: Option<String>,
    /// The native instruction, before patching.
    pub native: Option<f64>,
    /// The native-padded site, unpatched.
    pub site_unpatched: Option<f64>,
    /// The indirect call through the ops table, unpatched.
    pub call_unpatched: Option<f64>,
    /// The site rewritten to trap and emulated (under Xen: the native instruction as Xen runs it).
    pub trapped: Option<f64>,
    /// The native instruction again, after patching.
    pub native_again: Option<f64>,
    /// The patched site.
    pub site_patched: Option<f64>,
    /// The patched call site.
    pub call_patched: Option<f64>,
    /// How Xen ran the native instruction.
    pub trapped_how: Option<String>,
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("?").to_owned()
}

fn cycles(v: &Value) -> Option<f64> {
    v.as_f64()
}

impl Run {
    /// The figures of a guest's JSON report (`docs/runtime.md`, "What the guest reports"; the
    /// Xen guest's `bench` is its rows); what is missing reads as 0 or `None`.
    pub fn from_report(config: &str, about: &str, passed: bool, seconds: f64, r: &Value) -> Run {
        let o = &r["patch"]["sites_by_outcome"];
        let rows = r["bench"]["rows"]
            .as_array()
            .or_else(|| r["bench"].as_array());
        Run {
            config: config.to_owned(),
            about: about.to_owned(),
            backend: text(&r["backend"]["name"]),
            passed,
            seconds,
            sites: count(&r["table"]["sites"]),
            outcomes: Outcomes {
                unchanged: count(&o["unchanged"]),
                native: count(&o["native"]),
                inline: count(&o["inline"]),
                call: count(&o["call"]),
                nothing: count(&o["nothing"]),
                trap: count(&o["trap"]),
            },
            selftests: r["selftests"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| SelfTest {
                    name: text(&t["name"]),
                    result: text(&t["result"]),
                    why: t["why"].as_str().unwrap_or("").to_owned(),
                })
                .collect(),
            refused: r["patch"]["refused"].as_str().map(str::to_owned),
            plan_cycles: count(&r["patch"]["plan_cycles"]),
            plan_first_cycles: r["patch"]["plan_first_cycles"].as_u64(),
            apply_cycles: count(&r["patch"]["apply_cycles"]),
            cycles_per_site: count(&r["patch"]["cycles_per_site"]),
            share_of_boot_permille: count(&r["patch"]["share_of_boot_permille"]),
            bench: rows
                .into_iter()
                .flatten()
                .map(|b| BenchRow {
                    op: text(&b["op"]),
                    ring: b["ring"].as_str().map(str::to_owned),
                    native: cycles(&b["native"]),
                    site_unpatched: cycles(&b["site_unpatched"]),
                    call_unpatched: cycles(&b["call_unpatched"]),
                    trapped: cycles(&b["trapped"]),
                    native_again: cycles(&b["native_again"]),
                    site_patched: cycles(&b["site_patched"]),
                    call_patched: cycles(&b["call_patched"]),
                    trapped_how: b["trapped_how"].as_str().map(str::to_owned),
                })
                .collect(),
        }
    }

    /// Self-tests with `result`.
    fn tests(&self, result: &str) -> usize {
        self.selftests.iter().filter(|t| t.result == result).count()
    }

    /// "16 pass, 2 skip".
    fn verdict(&self) -> String {
        let mut s = format!("{} pass", self.tests("pass"));
        for (k, word) in [("skip", "skip"), ("fail", "FAIL")] {
            match self.tests(k) {
                0 => {}
                n => s += &format!(", {n} {word}"),
            }
        }
        s
    }

    /// "tcg-vmport · vmware": the configuration, and the backend where it says more.
    fn name(&self) -> String {
        if self.backend == self.config {
            self.config.clone()
        } else {
            format!("{} · {}", self.config, self.backend)
        }
    }

    /// Whether this is the guest under real Xen (its benchmark has other forms).
    fn is_xen(&self) -> bool {
        self.bench.iter().any(|b| b.trapped_how.is_some())
    }
}

/// The forms of an op the cycles-per-op charts draw, in their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Native,
    CallUnpatched,
    Trapped,
    SitePatched,
}

impl Form {
    const CHARTED: [Form; 4] = [
        Form::Native,
        Form::CallUnpatched,
        Form::Trapped,
        Form::SitePatched,
    ];
    const CHARTED_XEN: [Form; 4] = [
        Form::Trapped,
        Form::CallUnpatched,
        Form::Native,
        Form::SitePatched,
    ];

    fn value(self, b: &BenchRow) -> Option<f64> {
        match self {
            Form::Native => b.native,
            Form::CallUnpatched => b.call_unpatched,
            Form::Trapped => b.trapped,
            Form::SitePatched => b.site_patched,
        }
    }

    fn series(self, xen: bool) -> Series {
        let (name, colour) = match self {
            Form::Native => ("native instruction", Colour::Blue),
            Form::CallUnpatched => ("unpatched call", Colour::Orange),
            Form::Trapped if xen => ("native instruction, as Xen runs it", Colour::Vermillion),
            Form::Trapped => ("trapped (ud2, emulated)", Colour::Vermillion),
            Form::SitePatched => ("patched site", Colour::Green),
        };
        Series {
            name: name.to_owned(),
            colour,
        }
    }
}

/// The op as a row label: "rdtsc", or "rdtsc · user" for ring 3.
fn op_label(b: &BenchRow) -> String {
    match b.ring.as_deref() {
        Some("user") => format!("{} · user", b.op),
        _ => b.op.clone(),
    }
}

/// A configuration's cycles per op, per form; `None` if it has no benchmark.
pub fn cycles_chart(run: &Run) -> Option<Bars> {
    if run.bench.is_empty() {
        return None;
    }
    let xen = run.is_xen();
    // Under Xen the native instruction is what traps: it comes first.
    let order = if xen {
        Form::CHARTED_XEN
    } else {
        Form::CHARTED
    };
    let forms: Vec<Form> = order
        .into_iter()
        .filter(|f| run.bench.iter().any(|b| f.value(b).is_some()))
        .collect();
    // An op with no figure in any form (a loop that faults in user mode) is left to the table.
    let rows: Vec<&BenchRow> = run
        .bench
        .iter()
        .filter(|b| forms.iter().any(|f| f.value(b).is_some()))
        .collect();
    if rows.is_empty() {
        return None;
    }
    let subtitle = if xen {
        format!("{}. In the guest's ring 3, Xen's TSC cycles", run.about)
    } else {
        format!(
            "{}. The guest's TSC cycles, loop overhead subtracted",
            run.about
        )
    };
    Some(Bars {
        title: format!("Cycles per op: {} ({} backend)", run.config, run.backend),
        subtitle,
        axis: "cycles per op (log scale)".into(),
        scale: Scale::Log,
        layout: Layout::Grouped,
        series: forms.iter().map(|f| f.series(xen)).collect(),
        groups: rows
            .into_iter()
            .map(|b| Group {
                label: op_label(b),
                values: forms.iter().map(|f| f.value(b)).collect(),
                note: None,
            })
            .collect(),
    })
}

/// Sites by outcome, a stacked bar per configuration.
pub fn outcomes_chart(runs: &[Run]) -> Option<Bars> {
    type Get = fn(&Outcomes) -> u64;
    let all: [(&str, Colour, Get); 6] = [
        ("unchanged", Colour::Grey, |o| o.unchanged),
        ("native", Colour::Blue, |o| o.native),
        ("inline", Colour::Green, |o| o.inline),
        ("call", Colour::Sky, |o| o.call),
        ("nothing", Colour::Yellow, |o| o.nothing),
        ("trap", Colour::Vermillion, |o| o.trap),
    ];
    let kept: Vec<_> = all
        .into_iter()
        .filter(|(_, _, get)| runs.iter().any(|r| get(&r.outcomes) > 0))
        .collect();
    if runs.is_empty() || kept.is_empty() {
        return None;
    }
    Some(Bars {
        title: "Sites by outcome".into(),
        subtitle: "What the boot-time patcher made of each site of the guest's table, per \
                   configuration (configuration · backend detected)"
            .into(),
        axis: "sites".into(),
        scale: Scale::Linear,
        layout: Layout::Stacked,
        series: kept
            .iter()
            .map(|(name, colour, _)| Series {
                name: (*name).to_owned(),
                colour: *colour,
            })
            .collect(),
        groups: runs
            .iter()
            .map(|r| Group {
                label: r.name(),
                values: kept
                    .iter()
                    .map(|(_, _, get)| Some(get(&r.outcomes) as f64))
                    .collect(),
                note: Some(match &r.refused {
                    Some(_) => format!("{} sites, refused", r.sites),
                    None => format!("{} sites", r.sites),
                }),
            })
            .collect(),
    })
}

/// Planning and applying per site, a bar per configuration.
pub fn cost_chart(runs: &[Run]) -> Option<Bars> {
    if runs.is_empty() {
        return None;
    }
    Some(Bars {
        title: "Patching cost per site".into(),
        subtitle: "Planning and applying at boot over the table's sites, in the guest's TSC \
                   cycles; after each bar, its share of the guest's boot"
            .into(),
        axis: "cycles per site (log scale)".into(),
        scale: Scale::Log,
        layout: Layout::Grouped,
        series: vec![Series {
            name: "cycles per site".into(),
            colour: Colour::Blue,
        }],
        groups: runs
            .iter()
            .map(|r| Group {
                label: r.name(),
                values: vec![Some(r.cycles_per_site as f64)],
                note: Some(format!(
                    " ({:.1}% of boot)",
                    r.share_of_boot_permille as f64 / 10.0
                )),
            })
            .collect(),
    })
}

/// The chart the README shows: cycles per op of the first of [`README_CONFIGS`] that ran.
pub fn readme_chart(data: &Data) -> Option<Bars> {
    README_CONFIGS.iter().find_map(|name| {
        data.runs
            .iter()
            .find(|r| r.config == *name)
            .and_then(cycles_chart)
    })
}

/// What [`write`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The page.
    pub index: PathBuf,
    /// Charts in it.
    pub charts: usize,
    /// The README's chart, if the data has its configuration.
    pub readme_chart: Option<PathBuf>,
}

/// Writes the report into `dir`: `index.html`, `data.json` and the README's chart.
pub fn write(dir: &Path, data: &Data) -> Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let page = html::page(data)?;
    let index = dir.join("index.html");
    std::fs::write(&index, &page.html).with_context(|| format!("writing {}", index.display()))?;
    let json = dir.join("data.json");
    std::fs::write(&json, serde_json::to_string_pretty(data)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let readme_chart = match readme_chart(data) {
        Some(bars) => {
            let path = dir.join("cycles-per-op.svg");
            std::fs::write(&path, chart::render(&bars)?)
                .with_context(|| format!("writing {}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    Ok(Written {
        index,
        charts: page.charts,
        readme_chart,
    })
}

/// Where the report goes: `target/pvpatch-report` (or under `CARGO_TARGET_DIR`).
pub fn dir() -> PathBuf {
    crate::util::target_dir().join("pvpatch-report")
}

impl Meta {
    /// This machine, now, this checkout.
    pub fn here(command: &str) -> Meta {
        let root = crate::util::root();
        let line = |c: &mut Command| output(c).map(|s| s.trim().to_owned());
        let commit = line(
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(["rev-parse", "HEAD"]),
        )
        .unwrap_or_else(|| "unknown".into());
        let dirty = line(Command::new("git").arg("-C").arg(&root).args([
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]))
        .is_some_and(|s| !s.is_empty());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        Meta {
            command: command.to_owned(),
            date: line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .unwrap_or_else(|| "unknown".into()),
            commit: if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            },
            machine: format!(
                "{}, {cpu}, {cpus} CPUs",
                line(Command::new("uname").arg("-srm")).unwrap_or_else(|| "unknown".into())
            ),
        }
    }
}

/// `cargo xtask report [DATA]`: the report redrawn from a demo's `data.json` (default: the last
/// demo's), without booting anything; `cargo xtask report --readme-chart`: the README's chart
/// redrawn from the data it embeds (after a change to the drawing code).
pub fn command(args: &[String]) -> Result<()> {
    match args {
        [flag] if flag == "--readme-chart" => {
            let path = crate::util::root().join(README_CHART);
            let svg = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let bars = chart::embedded(&svg)?;
            std::fs::write(&path, chart::render(&bars)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("redrawn: {}", path.display());
            Ok(())
        }
        [] | [_] => {
            let dir = dir();
            let json = args
                .first()
                .map(PathBuf::from)
                .unwrap_or_else(|| dir.join("data.json"));
            let text = std::fs::read_to_string(&json).with_context(|| {
                format!("reading {} (cargo xtask demo writes it)", json.display())
            })?;
            let data: Data = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", json.display()))?;
            let written = write(&dir, &data)?;
            println!(
                "report: {} ({} charts)",
                written.index.display(),
                written.charts
            );
            Ok(())
        }
        _ => bail!("usage: cargo xtask report [DATA.json | --readme-chart]"),
    }
}
