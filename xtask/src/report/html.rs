//! The report's page: one HTML file, its charts inline SVG, its style inline, no script.

use std::fmt::Write as _;

use anyhow::Result;

use super::{BenchRow, Data, Run, chart, cost_chart, cycles_chart, outcomes_chart};

/// The page and how many charts it holds.
#[derive(Debug)]
pub struct Page {
    /// The HTML.
    pub html: String,
    /// Its `<svg>` elements.
    pub charts: usize,
}

const STYLE: &str = "
body { font-family: sans-serif; color: #222; max-width: 1020px; margin: 24px auto;
       padding: 0 16px; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
p.meta { color: #555; font-size: 0.92em; }
code { background: #f3f3f3; padding: 0 3px; }
figure { margin: 18px 0; }
figure svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.86em; margin: 12px 0 24px; }
th, td { border: 1px solid #d4d4d4; padding: 3px 7px; }
td { white-space: nowrap; }
td.t { white-space: normal; }
th { background: #f0f0f0; text-align: left; vertical-align: bottom; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
";

/// Text for HTML: `&`, `<`, `>` and `"` escaped.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Cycles as the tables show them: whole from 100 up, else two decimals (the guest's precision).
fn cycles(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "n/a".into(),
    }
}

/// A table: a header row, then rows; cells starting with a digit (or "n/a") are numbers.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    out.push_str("<table>\n<tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>\n");
    for row in rows {
        out.push_str("<tr>");
        for c in row {
            let number = c.starts_with(|ch: char| ch.is_ascii_digit() || ch == '-') || c == "n/a";
            // Prose (what a configuration is, why) wraps; names and figures do not.
            let class = if number {
                " class=\"n\""
            } else if c.len() > 32 {
                " class=\"t\""
            } else {
                ""
            };
            let _ = write!(out, "<td{class}>{}</td>", escape(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

fn figure(out: &mut String, charts: &mut usize, bars: Option<chart::Bars>) -> Result<()> {
    if let Some(bars) = bars {
        let svg = chart::render(&bars)?;
        out.push_str("<figure>\n");
        out.push_str(&svg);
        out.push_str("</figure>\n");
        *charts += 1;
    }
    Ok(())
}

fn bench_row(r: &Run, b: &BenchRow) -> Vec<String> {
    vec![
        r.config.clone(),
        b.op.clone(),
        b.ring.clone().unwrap_or_default(),
        cycles(b.native),
        cycles(b.site_unpatched),
        cycles(b.call_unpatched),
        cycles(b.trapped),
        cycles(b.native_again),
        cycles(b.site_patched),
        cycles(b.call_patched),
    ]
}

fn xen_row(r: &Run, b: &BenchRow) -> Vec<String> {
    vec![
        r.config.clone(),
        b.op.clone(),
        cycles(b.trapped),
        cycles(b.call_unpatched),
        cycles(b.site_patched),
        cycles(b.call_patched),
        b.trapped_how.clone().unwrap_or_default(),
    ]
}

/// The whole page.
pub fn page(data: &Data) -> Result<Page> {
    let mut out = String::new();
    let mut charts = 0;
    let m = &data.meta;
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>pvpatch: the demo's report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>pvpatch: the demo's report</h1>\n\
         <p class=\"meta\">Produced by <code>{}</code> on {} at {}, commit <code>{}</code>. \
         The figures are also in <code>data.json</code> beside this page; \
         <code>cargo xtask report</code> redraws the page from it.</p>\n",
        escape(&m.command),
        escape(&m.machine),
        escape(&m.date),
        escape(&m.commit)
    );

    out.push_str(
        "<h2>Cycles per op</h2>\n<p>Each op's forms, measured side by side in one boot \
         (<code>rdtsc</code> around a loop, the empty loop subtracted, the minimum of several \
         runs), in the manner of Adams &amp; Agesen: before patching, the native instruction and \
         the unpatched indirect call through the ops table; the site rewritten to <code>ud2</code> \
         and emulated; after patching, the patched site. Log scale: a bar's length is its \
         order of magnitude. The table under the charts has every form.</p>\n",
    );
    for r in &data.runs {
        figure(&mut out, &mut charts, cycles_chart(r))?;
    }
    let rows: Vec<Vec<String>> = data
        .runs
        .iter()
        .filter(|r| !r.is_xen())
        .flat_map(|r| r.bench.iter().map(move |b| bench_row(r, b)))
        .collect();
    if !rows.is_empty() {
        out.push_str("<p>Every form, in the guest's TSC cycles (n/a: not measured there, or the loop faults):</p>\n");
        table(
            &mut out,
            &[
                "config",
                "op",
                "ring",
                "native",
                "site, unpatched",
                "call, unpatched",
                "trapped",
                "native again",
                "site, patched",
                "call, patched",
            ],
            &rows,
        );
    }
    let rows: Vec<Vec<String>> = data
        .runs
        .iter()
        .filter(|r| r.is_xen())
        .flat_map(|r| r.bench.iter().map(move |b| xen_row(r, b)))
        .collect();
    if !rows.is_empty() {
        out.push_str("<p>Under Xen (a PV kernel runs in ring 3; Xen's TSC cycles), the native instruction as Xen runs it against the Xen backend's patched sequence:</p>\n");
        table(
            &mut out,
            &[
                "config",
                "op",
                "native, as Xen runs it",
                "call, unpatched",
                "site, patched",
                "call, patched",
                "how Xen ran the native instruction",
            ],
            &rows,
        );
    }

    out.push_str("<h2>Sites by outcome</h2>\n");
    figure(&mut out, &mut charts, outcomes_chart(&data.runs))?;
    let rows: Vec<Vec<String>> = data
        .runs
        .iter()
        .map(|r| {
            let o = &r.outcomes;
            vec![
                r.config.clone(),
                r.backend.clone(),
                r.about.clone(),
                r.sites.to_string(),
                o.unchanged.to_string(),
                o.native.to_string(),
                o.inline.to_string(),
                o.call.to_string(),
                o.nothing.to_string(),
                o.trap.to_string(),
                r.verdict(),
                if r.passed { "pass" } else { "FAIL" }.into(),
                format!("{:.1}", r.seconds),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "config",
            "backend",
            "what it is",
            "sites",
            "unchanged",
            "native",
            "inline",
            "call",
            "nothing",
            "trap",
            "self-tests",
            "boot",
            "wall (s)",
        ],
        &rows,
    );

    out.push_str("<h2>Patching cost per site</h2>\n");
    figure(&mut out, &mut charts, cost_chart(&data.runs))?;
    let rows: Vec<Vec<String>> = data
        .runs
        .iter()
        .map(|r| {
            vec![
                r.config.clone(),
                r.sites.to_string(),
                r.plan_first_cycles
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "n/a".into()),
                r.plan_cycles.to_string(),
                r.apply_cycles.to_string(),
                r.cycles_per_site.to_string(),
                format!("{:.1}", r.share_of_boot_permille as f64 / 10.0),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "config",
            "sites",
            "first (cold) plan, cycles",
            "plan, cycles",
            "apply, cycles",
            "cycles per site",
            "% of boot",
        ],
        &rows,
    );

    let notes: Vec<Vec<String>> = data
        .runs
        .iter()
        .flat_map(|r| {
            let refused = r.refused.iter().map(|why| {
                vec![
                    r.config.clone(),
                    "(patching)".into(),
                    "refused".into(),
                    why.clone(),
                ]
            });
            let tests = r.selftests.iter().filter(|t| t.result != "pass").map(|t| {
                vec![
                    r.config.clone(),
                    t.name.clone(),
                    t.result.clone(),
                    t.why.clone(),
                ]
            });
            refused.chain(tests).collect::<Vec<_>>()
        })
        .collect();
    if !notes.is_empty() {
        out.push_str("<h2>Self-tests not passed, and refusals</h2>\n");
        table(&mut out, &["config", "what", "result", "why"], &notes);
    }
    out.push_str("<h2>Configurations not run</h2>\n");
    if data.skipped.is_empty() {
        out.push_str("<p>None: every configuration booted on this machine.</p>\n");
    } else {
        let rows: Vec<Vec<String>> = data
            .skipped
            .iter()
            .map(|s| vec![s.config.clone(), s.why.clone()])
            .collect();
        table(&mut out, &["config", "why not"], &rows);
    }
    out.push_str("</body>\n</html>\n");
    Ok(Page { html: out, charts })
}
