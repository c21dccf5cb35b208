//! `cargo xtask setup`: what a fresh Debian 12 machine needs, installed idempotently.
//!
//! * QEMU 10 from bookworm-backports: the stock 7.2 package cannot be installed beside the
//!   machine's qemu-utils from backports (it `Breaks: qemu-system-common (< 1:8.0)`);
//! * cmake and libclang-dev, which unicorn-engine's build needs; man-db and bsdextrautils, which
//!   the test of the generated man pages runs;
//! * the x86_64-unknown-none target, which rustup does not install on its own here;
//! * the nightly toolchain and cargo-fuzz, for the fuzz targets (`test` only);
//! * Debian's `chromium`, which a test opens the demo's HTML report in, headless (`test` only);
//! * Debian's Xen hypervisor (`xen-hypervisor-4.17-amd64`), downloaded and unpacked into the
//!   cache, never installed: the guest boots as a PV kernel under it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{Report, output, run};

const BACKPORTS: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";
const BACKPORTS_TEXT: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";
/// cmake and libclang-dev for unicorn-engine's build; man-db and bsdextrautils (`col`) for the
/// test that renders `cargo xtask dist`'s man pages.
const PACKAGES: [&str; 4] = ["cmake", "libclang-dev", "man-db", "bsdextrautils"];
const BROWSER: &str = "chromium";

fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

/// The major version of the installed qemu-system-x86_64, if any.
pub fn qemu_major() -> Option<u32> {
    let v = output(Command::new("qemu-system-x86_64").arg("--version"))?;
    let rest = v.split("version ").nth(1)?;
    rest.split('.').next()?.trim().parse().ok()
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .map(|s| s.contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Installs what is missing. Returns whether everything is in place.
pub fn setup(report: &mut Report) -> Result<bool> {
    let system = system_packages(report)?;
    rust_target()?;
    let references = reference_tools(report);
    let xen = xen_hypervisor(report);
    let browser = browser(report)?;
    Ok(fuzz_tools(report)? && system && references && xen && browser)
}

/// Debian's `chromium`, for the test that renders the demo's report headless. Whether it is there.
pub fn browser(report: &mut Report) -> Result<bool> {
    if dpkg_installed(BROWSER) {
        println!("setup: {BROWSER}: present");
        return Ok(true);
    }
    if !is_root() {
        println!("setup: not root; run these as root to install {BROWSER}:");
        println!("  apt-get update");
        println!(
            "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {BROWSER}"
        );
        report.skip(format!(
            "setup: not root, {BROWSER} not installed (commands printed above)"
        ));
        return Ok(false);
    }
    println!("setup: installing {BROWSER} (a test renders the demo's report in it, headless)");
    run(apt_get().arg("update").arg("-q"))?;
    run(apt_get()
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .arg(BROWSER))?;
    Ok(true)
}

/// Debian's Xen hypervisor in the cache (see `pvpatch_testkit::xen`). Whether it is there.
pub fn xen_hypervisor(report: &mut Report) -> bool {
    use pvpatch_testkit::xen;
    if let Ok(p) = xen::cached() {
        println!("setup: Xen hypervisor: present ({})", p.display());
        return true;
    }
    println!(
        "setup: downloading {} (apt-get download; unpacked into the cache, not installed)",
        xen::PACKAGE
    );
    match xen::fetch() {
        Ok(_) => true,
        Err(e) => {
            report.skip(format!(
                "setup: the Xen hypervisor could not be fetched: {e}"
            ));
            false
        }
    }
}

/// The reference tools the tests compare with (see `pvpatch_testkit::tools`), in a Python
/// environment in the cache. Whether they are there.
pub fn reference_tools(report: &mut Report) -> bool {
    use pvpatch_testkit::tools;
    if tools::kallsyms_finder().is_ok() {
        println!("setup: {}: present", tools::VMLINUX_TO_ELF);
        return true;
    }
    let venv = tools::venv();
    println!(
        "setup: installing {} (the reference for kallsyms) into {}",
        tools::VMLINUX_TO_ELF,
        venv.display()
    );
    let made = run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).and_then(|()| {
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            tools::VMLINUX_TO_ELF,
        ]))
    });
    match made.and_then(|()| tools::kallsyms_finder().map_err(anyhow::Error::msg)) {
        Ok(_) => true,
        Err(e) => {
            report.skip(format!(
                "setup: {} could not be installed: {e:#}",
                tools::VMLINUX_TO_ELF
            ));
            false
        }
    }
}

/// The Debian packages: QEMU 10 from bookworm-backports, cmake, libclang-dev (what the demo
/// needs of the set-up). Whether everything is there.
pub fn system_packages(report: &mut Report) -> Result<bool> {
    let mut missing_apt: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    let need_qemu = qemu_major().is_none_or(|v| v < 10);
    let need_backports = need_qemu && !Path::new(BACKPORTS).exists();
    if need_qemu {
        missing_apt.push("qemu-system-x86 (bookworm-backports)");
    }
    let mut complete = true;
    if missing_apt.is_empty() {
        println!(
            "setup: QEMU {}, {}: present",
            qemu_major().unwrap_or(0),
            PACKAGES.join(", ")
        );
    } else if !is_root() {
        complete = false;
        println!(
            "setup: not root; run these as root to install {}:",
            missing_apt.join(", ")
        );
        if need_backports {
            println!(
                "  printf '{}' > {BACKPORTS}",
                BACKPORTS_TEXT.replace('\n', "\\n")
            );
        }
        println!("  apt-get update");
        if need_qemu {
            println!(
                "  DEBIAN_FRONTEND=noninteractive apt-get install -y -t bookworm-backports \
                 --no-install-recommends qemu-system-x86"
            );
        }
        println!(
            "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            PACKAGES.join(" ")
        );
        report.skip("setup: not root, system packages not installed (commands printed above)");
    } else {
        if need_backports {
            println!("setup: adding bookworm-backports to apt's sources ({BACKPORTS})");
            std::fs::write(BACKPORTS, BACKPORTS_TEXT)
                .with_context(|| format!("writing {BACKPORTS}"))?;
        }
        run(apt_get().arg("update").arg("-q"))?;
        if need_qemu {
            run(apt_get().args([
                "install",
                "-y",
                "-q",
                "-t",
                "bookworm-backports",
                "--no-install-recommends",
                "qemu-system-x86",
            ]))?;
            match qemu_major() {
                Some(v) if v >= 10 => println!("setup: QEMU {v} installed"),
                v => bail!("QEMU 10 or newer expected after installing, found {v:?}"),
            }
        }
        let pk: Vec<&str> = PACKAGES
            .iter()
            .copied()
            .filter(|p| !dpkg_installed(p))
            .collect();
        if !pk.is_empty() {
            run(apt_get()
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&pk))?;
        }
    }
    Ok(complete)
}

/// The target the guest kernel (and the boot shim) are built for. `rust-toolchain.toml` names
/// it, but rustup does not install toolchain parts on its own here (`RUSTUP_AUTO_INSTALL=0`), so
/// a machine that has only the host target would fail at the first kernel build.
pub fn rust_target() -> Result<()> {
    let targets =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if targets.lines().any(|l| l.trim() == TARGET) {
        println!("setup: Rust target {TARGET}: present");
        return Ok(());
    }
    println!("setup: installing the Rust target {TARGET} (the guest kernel is built for it)");
    run(Command::new("rustup").args(["target", "add", TARGET]))
}

/// The bare-metal target.
pub const TARGET: &str = "x86_64-unknown-none";

/// What fuzzing needs: the nightly toolchain (sanitizers) and cargo-fuzz. Whether both are there.
pub fn fuzz_tools(report: &mut Report) -> Result<bool> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (cargo-fuzz needs it)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        println!("setup: installing cargo-fuzz from crates.io");
        if let Err(e) = run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"])) {
            report.skip(format!("setup: cargo-fuzz could not be installed: {e:#}"));
            return Ok(false);
        }
    } else {
        println!("setup: nightly toolchain, cargo-fuzz: present");
    }
    Ok(true)
}
