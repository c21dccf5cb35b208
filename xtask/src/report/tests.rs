//! Tests of the report: the README's chart is what the current code draws, the page holds
//! nothing it would fetch, bad figures draw without a panic, and the page renders in headless
//! Chromium.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::chart::{self, Bars, Colour, Group, Layout, Scale, Series};
use super::*;

/// A real demo's figures: `target/pvpatch-report/data.json` from a `cargo xtask demo` run (its
/// `meta` says where, when and at which commit), checked in so that the rendering tests need
/// no boot. The demo itself always draws from the boots it has just made.
const CAPTURED: &str = include_str!("../../testdata/demo-data.json");

fn captured() -> Data {
    serde_json::from_str(CAPTURED).expect("testdata/demo-data.json is a report's data")
}

#[test]
fn readme_chart_is_current() {
    let path = crate::util::root().join(README_CHART);
    let committed = std::fs::read_to_string(&path).expect("the README's chart is committed");
    let bars = chart::embedded(&committed).expect("the README's chart embeds its data");
    let drawn = chart::render(&bars).expect("the README's chart draws");
    assert!(
        drawn == committed,
        "{} is not what the current code draws from the figures it embeds: after a change to \
         the drawing code, `cargo xtask report --readme-chart` redraws it; for new figures, run \
         `cargo xtask demo` and copy target/pvpatch-report/cycles-per-op.svg over it",
        README_CHART
    );
}

#[test]
fn readme_chart_is_drawn_from_the_demo_data() {
    let data = captured();
    let bars = readme_chart(&data).expect("the captured run has kvm or tcg");
    let svg = chart::render(&bars).unwrap();
    assert_eq!(chart::embedded(&svg).unwrap(), bars);
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains(&bars.title));
}

#[test]
fn page_is_self_contained() {
    let data = captured();
    let page = html::page(&data).unwrap();
    let expected = data.runs.iter().filter(|r| !r.bench.is_empty()).count() + 2;
    assert_eq!(page.charts, expected);
    assert_eq!(page.html.matches("<svg").count(), expected);
    for fetches in [
        "<script", "<link", "<img", "<iframe", "<object", "<embed", "@import", "url(", "src=",
        "href=",
    ] {
        assert!(
            !page.html.contains(fetches),
            "the page holds {fetches}: it must fetch nothing"
        );
    }
    let namespace = "xmlns=\"http://www.w3.org/2000/svg\"";
    assert_eq!(
        page.html.matches("http").count(),
        page.html.matches(namespace).count(),
        "the only URLs in the page are SVG's namespace, which nothing fetches"
    );
    for r in &data.runs {
        assert!(page.html.contains(&format!("<td>{}</td>", r.config)));
    }
}

#[test]
fn every_figure_is_in_the_tables() {
    let data = captured();
    let page = html::page(&data).unwrap();
    for r in &data.runs {
        assert!(
            page.html
                .contains(&format!("<td class=\"n\">{}</td>", r.cycles_per_site))
        );
        for b in &r.bench {
            if let Some(v) = b.trapped {
                let shown = if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                };
                assert!(page.html.contains(&format!(">{shown}</td>")), "{}", b.op);
            }
        }
    }
}

#[test]
fn figures_as_labels() {
    assert_eq!(chart::figure(0.0), "0.00");
    assert_eq!(chart::figure(17.0), "17.0");
    assert_eq!(chart::whole(38.0), "38");
    assert_eq!(chart::whole(-0.2), "0");
    assert_eq!(chart::figure(7.5), "7.50");
    assert_eq!(chart::figure(52.65), "52.6");
    assert_eq!(chart::figure(100.0), "100");
    assert_eq!(chart::figure(1_512_300.4), "1,512,300");
    assert_eq!(chart::figure(-2500.0), "-2,500");
    assert_eq!(chart::figure(f64::NAN), "n/a");
}

#[test]
fn bad_figures_draw_without_a_panic() {
    let series = |n: usize| {
        (0..n)
            .map(|i| Series {
                name: format!("s{i}"),
                colour: Colour::Blue,
            })
            .collect::<Vec<_>>()
    };
    for scale in [Scale::Log, Scale::Linear] {
        for layout in [Layout::Grouped, Layout::Stacked] {
            let bars = Bars {
                title: "<&>\"".into(),
                subtitle: String::new(),
                axis: String::new(),
                scale,
                layout,
                series: series(3),
                groups: vec![
                    Group {
                        label: String::new(),
                        values: vec![Some(f64::NAN), Some(f64::INFINITY), Some(-1.0)],
                        note: Some("--".into()),
                    },
                    Group {
                        label: "x".repeat(300),
                        values: vec![None, Some(0.0), Some(1e300)],
                        note: None,
                    },
                ],
            };
            let svg = chart::render(&bars).unwrap();
            assert_eq!(chart::embedded(&svg).unwrap().title, bars.title);
        }
    }
    let empty = Bars {
        title: "empty".into(),
        subtitle: String::new(),
        axis: String::new(),
        scale: Scale::Log,
        layout: Layout::Grouped,
        series: series(2),
        groups: vec![Group {
            label: "short".into(),
            values: vec![Some(1.0)],
            note: None,
        }],
    };
    assert!(chart::render(&empty).is_err());
    assert!(
        chart::render(&Bars {
            groups: vec![],
            ..empty
        })
        .is_err()
    );
    assert!(chart::embedded("<svg></svg>").is_err());
}

#[test]
fn odd_guest_reports_read_without_a_panic() {
    for report in [
        json!(null),
        json!({}),
        json!({"bench": 3, "patch": [], "selftests": {"a": 1}}),
        json!({"bench": {"rows": [null, {"op": 7, "native": "x"}]}}),
    ] {
        let run = Run::from_report("odd", "odd", false, 0.0, &report);
        let data = Data {
            meta: Meta {
                command: "test".into(),
                date: String::new(),
                commit: String::new(),
                machine: String::new(),
            },
            runs: vec![run],
            skipped: vec![Skipped {
                config: "kvm".into(),
                why: "<no /dev/kvm>".into(),
            }],
        };
        let page = html::page(&data).unwrap();
        assert!(page.html.contains("&lt;no /dev/kvm&gt;"));
    }
}

/// Chromium from `PATH`.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

/// A test that cannot run here: skipped with why, except in CI (`CI=true`), where it fails.
fn cannot_run(test: &str, reason: &str) {
    if crate::util::is_ci() {
        panic!("{test} cannot run and CI is set: {reason}");
    }
    pvpatch_testkit::skip(test, reason);
}

/// Runs `cmd` with stdout and stderr into files in `dir`, killed after `limit`; its status,
/// stdout and stderr.
fn run_for(
    cmd: &mut Command,
    dir: &Path,
    name: &str,
    limit: Duration,
) -> (ExitStatus, String, String) {
    let out = dir.join(format!("{name}.out"));
    let err = dir.join(format!("{name}.err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("chromium starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ({name}) ran for more than {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    (status, read(&out), read(&err))
}

/// Chromium's log lines about the page: console messages (none are expected: the page has no
/// script), failed loads, and errors naming the page. Its other lines (D-Bus, GPU, the
/// launcher script) are about the headless machine.
fn page_errors(stderr: &str, url: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| {
            l.contains(":CONSOLE")
                || l.contains("Uncaught")
                || l.contains("Failed to load")
                || l.contains("net::ERR_")
                || (l.contains(url) && (l.contains("ERROR") || l.contains("WARNING")))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn page_errors_are_told_from_the_machine_s() {
    let url = "file:///tmp/r/index.html";
    let log = "\
/usr/bin/chromium: 9: [: 25275990016: unexpected operator
[1:2:1201/082202.016426:ERROR:dbus/bus.cc:405] Failed to connect to the bus: Failed to connect to socket /run/dbus/system_bus_socket: No such file or directory
[1:1:1201/082201.337940:WARNING:media/gpu/vaapi/vaapi_wrapper.cc:1655] drmGetDevices2() has not found any devices
[1:1:1201/082201.755492:INFO:CONSOLE:1] \"boom\", source: file:///tmp/r/index.html (1)
[1:1:1201/082201.755864:INFO:CONSOLE:1] \"Uncaught ReferenceError: nosuch is not defined\", source: file:///tmp/r/index.html (1)
";
    let errors = page_errors(log, url);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|e| e.contains(":CONSOLE")));
}

#[test]
fn report_renders_in_headless_chromium() {
    const TEST: &str = "xtask report::tests::report_renders_in_headless_chromium";
    let Some(browser) = chromium() else {
        cannot_run(
            TEST,
            "chromium is not installed (cargo xtask setup installs Debian's chromium)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let written = write(&dir.path().join("report"), &captured()).unwrap();
    let url = format!("file://{}", written.index.display());
    let headless = |profile: &str| {
        let mut c = Command::new(&browser);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join(profile).display()
        ));
        c
    };

    // A control: a page with a script error is seen as one (if Chromium stopped logging the
    // console to stderr, the check below would pass whatever the page did).
    let bad = dir.path().join("bad.html");
    std::fs::write(
        &bad,
        "<!DOCTYPE html><script>console.error('seen')</script>",
    )
    .unwrap();
    let bad_url = format!("file://{}", bad.display());
    let (_, _, stderr) = run_for(
        headless("profile-control").arg("--dump-dom").arg(&bad_url),
        dir.path(),
        "control",
        Duration::from_secs(120),
    );
    assert!(
        !page_errors(&stderr, &bad_url).is_empty(),
        "chromium logged no console message for a page that writes one:\n{stderr}"
    );

    let (status, dom, stderr) = run_for(
        headless("profile-dom").arg("--dump-dom").arg(&url),
        dir.path(),
        "dom",
        Duration::from_secs(120),
    );
    assert!(status.success(), "chromium --dump-dom: {status}\n{stderr}");
    assert_eq!(
        page_errors(&stderr, &url),
        Vec::<String>::new(),
        "chromium's log about the page"
    );
    assert_eq!(
        dom.matches("<svg").count(),
        written.charts,
        "charts in the DOM"
    );
    assert!(dom.contains("Cycles per op") && dom.trim_end().ends_with("</html>"));

    let shot = dir.path().join("report.png");
    let (status, _, stderr) = run_for(
        headless("profile-shot")
            .arg("--window-size=1100,9000")
            .arg(format!("--screenshot={}", shot.display()))
            .arg(&url),
        dir.path(),
        "screenshot",
        Duration::from_secs(120),
    );
    assert!(
        status.success(),
        "chromium --screenshot: {status}\n{stderr}"
    );
    assert_eq!(page_errors(&stderr, &url), Vec::<String>::new());
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "a PNG of the page ({} bytes)",
        png.len()
    );
    if let Some(keep) = std::env::var_os("PVPATCH_REPORT_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
