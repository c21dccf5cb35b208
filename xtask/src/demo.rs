//! `cargo xtask demo`: the whole mission, twice.
//!
//! 1. The post-link tool on Debian bookworm's current kernel (fetched and cached if needed): the
//!    scan summary, the ledger, the annotation with the boot shim in front, its verification,
//!    and boots of the shimmed kernel under QEMU to its init on every backend (native, tcg,
//!    vmware, a ROM through fw_cfg, the out-of-line test backend), each with the shim's line.
//! 2. Our own guest kernel, annotated at build time, rewritten at load: built, annotated by
//!    `pvpatch annotate`, given a backend ROM built by `pvpatch rom build`, and booted in every
//!    configuration this machine has; one table across backends (detected backend, sites by
//!    outcome, self-tests, patch cost, cycles per op), and the configurations skipped, with why.
//! 3. The same figures as an HTML report with charts (`target/pvpatch-report/index.html`, see
//!    [`crate::report`]), and the README's chart beside it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use pvpatch_testkit::{self as harness, Config, Qemu};
use serde_json::Value;

use crate::report;
use crate::util::{cargo, run};

/// The `pvpatch` binary [`build_tools`] built.
fn pvpatch() -> Command {
    Command::new(crate::util::target_dir().join("release/pvpatch"))
}

/// Runs the demo.
pub fn demo() -> Result<()> {
    println!("==> set-up: QEMU 10 and the Rust target the guest kernel is built for");
    // On a fresh machine: QEMU 10 and the bare-metal target (not the fuzzing tools, which only
    // `cargo xtask test` needs).
    crate::setup::system_packages(&mut crate::util::Report::default())?;
    crate::setup::rust_target()?;
    if !crate::setup::xen_hypervisor(&mut crate::util::Report::default()) {
        bail!("Debian's Xen hypervisor could not be fetched (the xen row needs it)");
    }
    build_tools()?;
    println!("\n==> the Debian kernels (downloaded once, cached)");
    let kernels = crate::kernel::fetch()?;
    debian_kernel(&kernels[0])?;
    guest()
}

/// Builds the `pvpatch` binary and the guest kernel, with cargo's progress (the first build on
/// a new machine takes minutes).
fn build_tools() -> Result<()> {
    println!("\n==> building pvpatch (release)");
    run(cargo().args(["build", "--release", "--locked", "-p", "pvpatch"]))?;
    println!("\n==> building the guest kernel (x86_64-unknown-none, release)");
    run(&mut harness::guest::build_command(false))?;
    println!("\n==> building the boot shim (x86_64-unknown-none, release, size-optimised)");
    run(&mut harness::shim::build_command(false))?;
    Ok(())
}

fn debian_kernel(k: &pvpatch_testkit::CachedKernel) -> Result<()> {
    let dir = k.vmlinux.parent().context("kernel directory")?.to_owned();
    let annotated = dir.join("vmlinux.annotated");
    let ledger = dir.join("ledger.json");
    println!("\n==> the kernel: {} ({})", k.package, k.vmlinux.display());
    run(pvpatch().arg("scan").arg(&k.vmlinux))?;
    println!("\n==> the annotation, with the boot shim in front of the kernel's PVH entry");
    run(pvpatch()
        .arg("annotate")
        .arg(&k.vmlinux)
        .arg("-o")
        .arg(&annotated)
        .arg("--ledger")
        .arg(&ledger)
        .arg("--boot-shim")
        .arg(harness::shim::path()))?;
    println!("  ledger (docs/ledger.md): {}", ledger.display());
    println!("\n==> verification");
    run(pvpatch().arg("verify").arg(&annotated))?;
    println!("\n==> the shimmed kernel boots on every backend (QEMU TCG)");
    if let Err(why) = harness::qemu_available() {
        println!("skipped: {why}");
        return Ok(());
    }
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, pvpatch_testkit::initramfs::initramfs())?;
    let rom = dir.join("stock.rom");
    run(pvpatch()
        .args(["rom", "build"])
        .arg(crate::util::root().join("shim/roms/stock.toml"))
        .arg("-o")
        .arg(&rom)
        .arg("--for")
        .arg(&annotated))?;
    let fw_cfg = vec![
        "-fw_cfg".to_owned(),
        format!("name=opt/pvpatch/rom,file={}", rom.display()),
    ];
    let pc = harness::qemu::Machine::Pc { vmport: true };
    let micro = harness::qemu::Machine::Microvm;
    for (what, machine, append, extra) in [
        (
            "native (pvpatch.backend=native)",
            micro,
            "pvpatch.backend=native",
            vec![],
        ),
        ("tcg (detected)", micro, "", vec![]),
        ("vmware (pc, vmport=on)", pc, "", vec![]),
        (
            "rom (shim/roms/stock.toml through fw_cfg)",
            micro,
            "",
            fw_cfg,
        ),
        (
            "outofline (every rewritable site out of line)",
            micro,
            "pvpatch.backend=outofline",
            vec![],
        ),
    ] {
        let mut q = Qemu::linux(&initrd);
        q.machine = machine;
        q.append = q.append.map(|a| format!("{a} pvpatch.verbose {append}"));
        q.extra.extend(extra);
        let boot = q.boot(&annotated)?;
        if !boot.passed() || !boot.serial.contains(pvpatch_testkit::initramfs::MARKER) {
            bail!(
                "the shimmed kernel did not reach its init on {what} (exit {:?}):\n{}",
                boot.exit_code,
                boot.serial
            );
        }
        let line = boot
            .serial
            .lines()
            .find(|l| l.starts_with("pvpatch: "))
            .unwrap_or("(no line from the shim)");
        println!(
            "{what}: init reached in {:.2} s\n  {line}",
            boot.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Builds, annotates and boots the guest in every configuration; prints the tables.
fn guest() -> Result<()> {
    println!("\n==> our guest kernel, annotated at build time and rewritten at load");
    let plain = harness::build_guest_plain()?;
    let annotated = plain.with_extension("annotated");
    run(pvpatch()
        .arg("annotate")
        .arg(&plain)
        .arg("-o")
        .arg(&annotated)
        .args(["--section", harness::RAW_SECTION]))?;
    let rom = plain.with_extension("demo.rom");
    println!("\n==> a backend ROM, assembled from {}", harness::DEMO_ROM);
    run(pvpatch()
        .args(["rom", "build"])
        .arg(crate::util::root().join(harness::DEMO_ROM))
        .arg("-o")
        .arg(&rom)
        .arg("--for")
        .arg(&annotated))?;

    let mut configs = harness::configs();
    for (base, name) in [("tcg", "rom"), ("kvm", "kvm-rom")] {
        if let Some(c) = configs.iter().find(|c| c.name == base).cloned() {
            configs.push(harness::with_rom(c, &rom, name));
        }
    }
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for c in &configs {
        if let Err(why) = c.available() {
            skipped.push((c.name, why));
            continue;
        }
        let c = &c.clone().for_guest(&annotated)?;
        println!("\n==> {} ({})", c.name, c.about);
        println!(
            "$ {}",
            shell_line(&c.qemu.command(&annotated, Path::new("serial.txt")))
        );
        let boot = c.qemu.boot(&annotated)?;
        let report = boot.report().with_context(|| {
            format!(
                "{}: no report (exit {:?}):\n{}",
                c.name, boot.exit_code, boot.serial
            )
        })?;
        for line in boot.messages().lines() {
            println!("  {line}");
        }
        results.push(Run {
            config: c.clone(),
            passed: boot.passed(),
            seconds: boot.elapsed.as_secs_f64(),
            report,
        });
    }
    // Real Xen: the guest as a PV dom0. Its own table (the macros' records, every site padded
    // for a call); the annotated image adds raw one-byte cli/sti/pushfq sites that cannot take
    // a call and that Xen cannot run natively: it is refused, and says why.
    let xen_elf = harness::xen::cached().map_err(anyhow::Error::msg)?;
    for (kernel, expect_pass) in [(&plain, true), (&annotated, false)] {
        let config = Config {
            name: if expect_pass { "xen" } else { "xen-raw" },
            qemu: harness::xen::qemu(kernel, ""),
            expect: "xen",
            about: if expect_pass {
                "Debian's Xen 4.17 (a PV dom0) under TCG; the guest's own table"
            } else {
                "the same, with the annotated table's raw one-byte sites: refused"
            },
        };
        println!("\n==> {} ({})", config.name, config.about);
        println!(
            "$ {}",
            shell_line(&config.qemu.command(&xen_elf, Path::new("serial.txt")))
        );
        let boot = config.qemu.boot(&xen_elf)?;
        for line in boot.messages().lines().filter(|l| !l.starts_with("(XEN)")) {
            println!("  {line}");
        }
        if !expect_pass {
            if boot.passed() || !boot.serial.contains("pvguest: patched nothing") {
                bail!("xen-raw: the table with raw sites was not refused");
            }
            continue;
        }
        let report = boot.report().with_context(|| {
            format!(
                "xen: no report (exit {:?}):\n{}",
                boot.exit_code, boot.serial
            )
        })?;
        results.push(Run {
            config,
            passed: boot.passed(),
            seconds: boot.elapsed.as_secs_f64(),
            report,
        });
    }
    print_summary(&results);
    print_bench(&results);
    print_xen_bench(&results);
    if skipped.is_empty() {
        println!("\nno configuration skipped");
    } else {
        println!("\nskipped:");
        for (name, why) in &skipped {
            println!("  {name}: {why}");
        }
    }
    write_report(&results, &skipped)?;
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed || r.report["backend"]["name"] != r.config.expect)
        .map(|r| r.config.name)
        .collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The HTML report of the runs (`target/pvpatch-report`), written even if a run failed.
fn write_report(results: &[Run], skipped: &[(&str, String)]) -> Result<()> {
    let data = report::Data {
        meta: report::Meta::here("cargo xtask demo"),
        runs: results
            .iter()
            .map(|r| {
                report::Run::from_report(
                    r.config.name,
                    r.config.about,
                    r.passed,
                    r.seconds,
                    &r.report,
                )
            })
            .collect(),
        skipped: skipped
            .iter()
            .map(|(config, why)| report::Skipped {
                config: (*config).to_owned(),
                why: why.clone(),
            })
            .collect(),
    };
    let written = report::write(&report::dir(), &data)?;
    println!(
        "\n==> the report: {} ({} charts; its figures in data.json beside it)",
        written.index.display(),
        written.charts
    );
    if let Some(svg) = written.readme_chart {
        println!(
            "    the README's chart: {} (cp it to {} to update the README)",
            svg.display(),
            report::README_CHART
        );
    }
    Ok(())
}

struct Run {
    config: Config,
    passed: bool,
    seconds: f64,
    report: Value,
}

fn shell_line(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        let a = a.to_string_lossy();
        if a.contains([' ', ',', '=']) && !a.starts_with('-') {
            s += &format!(" '{a}'");
        } else {
            s += &format!(" {a}");
        }
    }
    s
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn cycles(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

/// The table across backends.
fn print_summary(results: &[Run]) {
    println!("\n==> the guest on every backend\n");
    println!(
        "{:<11} {:<7} {:>5}  {:>9} {:>6} {:>6} {:>4} {:>7}  {:<11} {:>11} {:>7}  {:>5}",
        "config",
        "backend",
        "sites",
        "unchanged",
        "native",
        "inline",
        "call",
        "nothing",
        "self-tests",
        "cycles/site",
        "% boot",
        "wall"
    );
    for r in results {
        let rep = &r.report;
        let o = &rep["patch"]["sites_by_outcome"];
        let tests = rep["selftests"].as_array().cloned().unwrap_or_default();
        let count = |k: &str| tests.iter().filter(|t| t["result"] == k).count();
        let verdict = format!(
            "{} pass{}{}",
            count("pass"),
            match count("skip") {
                0 => String::new(),
                k => format!(", {k} skip"),
            },
            match count("fail") {
                0 => String::new(),
                k => format!(", {k} FAIL"),
            }
        );
        let share = n(&rep["patch"]["share_of_boot_permille"]) as f64 / 10.0;
        println!(
            "{:<11} {:<7} {:>5}  {:>9} {:>6} {:>6} {:>4} {:>7}  {:<11} {:>11} {:>6.1}%  {:>4.1}s",
            r.config.name,
            rep["backend"]["name"].as_str().unwrap_or("?"),
            n(&rep["table"]["sites"]),
            n(&o["unchanged"]),
            n(&o["native"]),
            n(&o["inline"]),
            n(&o["call"]),
            n(&o["nothing"]),
            verdict,
            n(&rep["patch"]["cycles_per_site"]),
            share,
            r.seconds
        );
    }
    for r in results {
        if let Some(refused) = r.report["patch"]["refused"].as_str() {
            println!("  {}: patched nothing: {refused}", r.config.name);
        }
        for t in r.report["selftests"].as_array().into_iter().flatten() {
            if t["result"] != "pass" {
                println!(
                    "  {}: {} {}: {}",
                    r.config.name,
                    t["name"].as_str().unwrap_or("?"),
                    t["result"].as_str().unwrap_or("?"),
                    t["why"].as_str().unwrap_or("")
                );
            }
        }
    }
}

/// The nanobenchmarks, in the manner of Adams & Agesen: cycles per op, per form, in two passes
/// (before patching: the native instruction and the unpatched sites side by side; after: the
/// native instruction again and the patched sites side by side), and trapped.
fn print_bench(results: &[Run]) {
    println!("\n==> nanobenchmarks: cycles per op (rdtsc, loop overhead subtracted)\n");
    let line = |c: [&str; 10]| {
        println!(
            "{:<11} {:<22} {:<6} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]
        )
    };
    line([
        "config", "op", "ring", "native", "site", "call", "trapped", "native", "patched", "patched",
    ]);
    line([
        "",
        "",
        "",
        "",
        "unpatched",
        "unpatched",
        "",
        "again",
        "site",
        "call",
    ]);
    for r in results {
        for row in r.report["bench"]["rows"].as_array().into_iter().flatten() {
            let c = |k: &str| cycles(&row[k]);
            line([
                r.config.name,
                row["op"].as_str().unwrap_or("?"),
                row["ring"].as_str().unwrap_or("?"),
                &c("native"),
                &c("site_unpatched"),
                &c("call_unpatched"),
                &c("trapped"),
                &c("native_again"),
                &c("site_patched"),
                &c("call_patched"),
            ]);
        }
    }
}

/// Trapped by Xen against patched: the Adams & Agesen comparison on a real hypervisor.
fn print_xen_bench(results: &[Run]) {
    let Some(r) = results.iter().find(|r| r.config.name == "xen") else {
        return;
    };
    println!("\n==> real Xen (PV dom0): cycles per op, the native instruction as Xen runs it");
    println!("    against the Xen backend's patched sequence\n");
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9}  how the native instruction ran",
        "op", "trapped", "call", "patched", "patched"
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9}",
        "", "", "unpatched", "site", "call"
    );
    for row in r.report["bench"].as_array().into_iter().flatten() {
        let c = |k: &str| cycles(&row[k]);
        println!(
            "{:<40} {:>9} {:>9} {:>9} {:>9}  {}",
            row["op"].as_str().unwrap_or("?"),
            c("trapped"),
            c("call_unpatched"),
            c("site_patched"),
            c("call_patched"),
            row["trapped_how"].as_str().unwrap_or("")
        );
    }
    let p = &r.report["patch"];
    println!(
        "\n  patching: the first (cold) plan {} cycles, the same plan again {}, applying {}",
        n(&p["plan_first_cycles"]),
        n(&p["plan_cycles"]),
        n(&p["apply_cycles"])
    );
    let probes = &r.report["probes"];
    let list = |k: &str, f: &str| -> String {
        probes[k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {}",
                    p[f].as_str().unwrap_or("?"),
                    p["value"].as_str().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("\n  privileged instructions of a PV kernel, as Xen handles them (cycles, the bounce");
    println!("  and the kernel's skip included):");
    for i in probes["instructions"].as_array().into_iter().flatten() {
        println!(
            "    {:<32} {:<9} {:>7}",
            i["insn"].as_str().unwrap_or("?"),
            i["outcome"].as_str().unwrap_or("?"),
            n(&i["cycles"])
        );
    }
    println!(
        "\n  rdmsr as Xen answers a PV dom0: {}",
        list("msrs", "msr")
    );
    println!(
        "  in (IOPL 3 through PHYSDEVOP_set_iopl): {}",
        list("ports", "port")
    );
}
