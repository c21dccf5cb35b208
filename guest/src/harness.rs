//! Building the guest and booting it under QEMU, for tests and `cargo xtask`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// QEMU's exit status when the guest wrote [`EXIT_PASS`] to `isa-debug-exit`.
pub const QEMU_PASS: i32 = 33;
/// What the guest writes to `isa-debug-exit` on success.
pub const EXIT_PASS: u32 = 0x10;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A command could not be started.
    #[error("cannot run {what}")]
    Spawn {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Building the guest failed.
    #[error("building the guest failed ({0})")]
    Build(std::process::ExitStatus),
    /// QEMU ran past its time limit and was killed.
    #[error("QEMU did not exit within {0:?}; serial output so far:\n{1}")]
    Timeout(Duration, String),
    /// Annotating the guest failed.
    #[error("annotating the guest failed: {0}")]
    Annotate(String),
    /// An I/O error on a scratch file.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The section of the guest that holds its raw, unannotated sensitive instructions: the only
/// section whose swept sites the post-link tool records.
pub const RAW_SECTION: &str = ".text.pvraw";

/// Builds the guest kernel and annotates it as its build does: `pvpatch annotate --section
/// .text.pvraw`, which merges the records of the annotation macros with the raw sites it finds.
/// Returns the annotated kernel.
pub fn build_guest() -> Result<PathBuf, HarnessError> {
    let plain = build_guest_plain()?;
    let out = plain.with_extension("annotated");
    let fresh = std::fs::metadata(&out)
        .and_then(|o| Ok(o.modified()? >= std::fs::metadata(&plain)?.modified()?))
        .unwrap_or(false);
    if !fresh {
        let img = pvpatch::image::Image::open(&plain)
            .map_err(|e| HarnessError::Annotate(e.to_string()))?;
        let report = pvpatch::report::scan_image(&img, Default::default(), None);
        let opts = pvpatch::annotate::AnnotateOptions {
            force: false,
            sections: vec![RAW_SECTION.to_owned()],
        };
        pvpatch::annotate::annotate(&report, &out, &opts)
            .map_err(|e| HarnessError::Annotate(format!("{e}")))?;
    }
    Ok(out)
}

/// The description of the ROM the demo and the tests publish.
pub const DEMO_ROM: &str = "guest/roms/demo.toml";

/// Builds the demo ROM for the annotated guest `kernel` as `pvpatch rom build DEMO_ROM --for
/// kernel` does (checked against every site of its table), next to the kernel.
pub fn build_demo_rom(kernel: &Path) -> Result<PathBuf, HarnessError> {
    let desc_path = workspace_root().join(DEMO_ROM);
    let description = std::fs::read_to_string(&desc_path).map_err(|source| HarnessError::Io {
        path: desc_path.clone(),
        source,
    })?;
    let img =
        pvpatch::image::Image::open(kernel).map_err(|e| HarnessError::Annotate(e.to_string()))?;
    let rom = pvpatch::rom::build_for(&description, &img)
        .map_err(|e| HarnessError::Annotate(format!("building {DEMO_ROM}: {e}")))?;
    let out = kernel.with_extension("demo.rom");
    write_file(&out, &rom)?;
    Ok(out)
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, then rename),
/// so that tests running side by side never see half a file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), HarnessError> {
    let io = |source| HarnessError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Builds the guest kernel (release, `x86_64-unknown-none`) without annotating it: it patches
/// from the table its macros' records make alone. When `PVGUEST_ELF` is set, that file is used
/// instead. The build uses its own target directory so that it can run while an outer
/// `cargo test` holds the workspace's.
pub fn build_guest_plain() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("PVGUEST_ELF") {
        return Ok(PathBuf::from(p));
    }
    let root = workspace_root();
    let target_dir = root.join("target/guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "pvguest",
            "--target",
            "x86_64-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .map_err(|source| HarnessError::Spawn {
            what: "cargo build (guest)".into(),
            source,
        })?;
    if !status.success() {
        return Err(HarnessError::Build(status));
    }
    Ok(target_dir.join("x86_64-unknown-none/release/pvguest"))
}

/// Whether QEMU 10 (or newer) is installed; the reason if not.
pub fn qemu_available() -> Result<(), String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map_err(|_| "qemu-system-x86_64 is not installed (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major: Option<u32> = text
        .split("version ")
        .nth(1)
        .and_then(|r| r.split('.').next())
        .and_then(|m| m.trim().parse().ok());
    match major {
        Some(m) if m >= 10 => Ok(()),
        _ => Err(format!(
            "QEMU 10 or newer is needed, found: {}",
            text.trim()
        )),
    }
}

/// Whether `/dev/kvm` can be opened; the reason if not.
pub fn kvm_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))
}

/// Records that `test` was skipped for `reason`: printed, and appended to the file named by
/// `PVPATCH_SKIP_LOG` (which `cargo xtask test` lists at the end). When
/// `PVPATCH_REQUIRE_ALL` is set (CI), a skip is a failure instead.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("PVPATCH_REQUIRE_ALL").is_some() {
        panic!("{test} cannot run here and PVPATCH_REQUIRE_ALL is set: {reason}");
    }
    eprintln!("skipped: {test}: {reason}");
    if let Some(log) = std::env::var_os("PVPATCH_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
}

/// The accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// QEMU's TCG.
    Tcg,
    /// `/dev/kvm`.
    Kvm,
}

/// The machine and firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// `microvm` with qboot: the fastest boot; no VMware backdoor.
    Microvm,
    /// `pc` with qboot: has the VMware backdoor (vmport) unless `vmport=off`.
    Pc {
        /// Whether vmport is on.
        vmport: bool,
    },
}

/// One QEMU configuration.
#[derive(Clone, Debug)]
pub struct Qemu {
    /// Machine.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// `-cpu` value.
    pub cpu: String,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// `-append` value (the kernel command line).
    pub append: Option<String>,
    /// Extra arguments (e.g. `-fw_cfg`).
    pub extra: Vec<String>,
    /// Time limit.
    pub timeout: Duration,
}

/// The `-cpu` model for KVM on this kind of host: `host` without `arch-capabilities`, whose MSR
/// this host's KVM refuses to set (QEMU aborts with "failed to set MSR 0x10a").
pub const KVM_CPU: &str = "host,-arch-capabilities";

impl Qemu {
    /// TCG on microvm with `-cpu max`.
    pub fn tcg() -> Self {
        Qemu {
            machine: Machine::Microvm,
            accel: Accel::Tcg,
            cpu: "max".into(),
            memory_mb: 128,
            append: None,
            extra: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    /// A Linux kernel with `initrd` as its initramfs, under TCG on microvm, its console on the
    /// serial port (see [`crate::initramfs`]).
    ///
    /// The kernel is told the TSC's frequency (`tsc_early_khz`, the host's: TCG's TSC runs at
    /// the host's rate): on a busy host, Linux's calibration against the PIT fails under TCG
    /// often enough (about one boot in six here), and without a reference clock to fall back
    /// on the kernel then hangs before its console is up.
    pub fn linux(initrd: &Path) -> Self {
        Qemu {
            memory_mb: 512,
            append: Some(format!(
                "console=ttyS0 panic=-1 rdinit=/init loglevel=4 tsc_early_khz={}",
                host_tsc_khz()
            )),
            extra: vec!["-initrd".into(), initrd.display().to_string()],
            timeout: Duration::from_secs(120),
            ..Qemu::tcg()
        }
    }

    /// The full command line.
    pub fn command(&self, kernel: &Path, serial: &Path) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        let machine = match self.machine {
            // The RTC is asked for: microvm leaves it out under KVM otherwise.
            Machine::Microvm => "microvm,rtc=on".to_owned(),
            Machine::Pc { vmport } => format!("pc,vmport={}", if vmport { "on" } else { "off" }),
        };
        c.args(["-machine", &machine, "-bios", "/usr/share/qemu/qboot.rom"]);
        c.args([
            "-accel",
            if self.accel == Accel::Kvm {
                "kvm"
            } else {
                "tcg"
            },
        ]);
        c.args(["-cpu", &self.cpu, "-m", &format!("{}M", self.memory_mb)]);
        c.args(["-nodefaults", "-display", "none", "-no-reboot"]);
        c.arg("-serial").arg(format!("file:{}", serial.display()));
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        c.arg("-kernel").arg(kernel);
        if let Some(a) = &self.append {
            c.args(["-append", a]);
        }
        c.args(&self.extra);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Boots `kernel` and waits for QEMU to exit.
    pub fn boot(&self, kernel: &Path) -> Result<Boot, HarnessError> {
        let dir = tempfile::tempdir().map_err(|source| HarnessError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let serial_path = dir.path().join("serial.txt");
        let started = Instant::now();
        let mut child = self
            .command(kernel, &serial_path)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                what: "qemu-system-x86_64".into(),
                source,
            })?;
        let read_serial = || std::fs::read_to_string(&serial_path).unwrap_or_default();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HarnessError::Timeout(self.timeout, read_serial()));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(source) => {
                    return Err(HarnessError::Io {
                        path: serial_path.clone(),
                        source,
                    });
                }
            }
        };
        let elapsed = started.elapsed();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        Ok(Boot {
            exit_code: status.code(),
            serial: read_serial(),
            stderr,
            elapsed,
        })
    }
}

/// The host's TSC frequency in kHz, measured once against the monotonic clock (100 ms; the
/// error is well under 0.1%).
pub fn host_tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let rdtsc = || {
            // SAFETY: rdtsc has no preconditions on x86-64.
            unsafe { core::arch::x86_64::_rdtsc() }
        };
        let t0 = Instant::now();
        let c0 = rdtsc();
        std::thread::sleep(Duration::from_millis(100));
        let c1 = rdtsc();
        let ns = t0.elapsed().as_nanos() as u64;
        (c1 - c0) * 1_000_000 / ns.max(1)
    })
}

/// The prefix of the guest's one-line JSON report on the serial port.
pub const REPORT_PREFIX: &str = "PVPATCH-REPORT ";

/// What one boot produced.
#[derive(Clone, Debug)]
pub struct Boot {
    /// QEMU's exit status (33 means the guest passed).
    pub exit_code: Option<i32>,
    /// Everything the guest wrote to COM1.
    pub serial: String,
    /// QEMU's own diagnostics.
    pub stderr: String,
    /// Wall time of the whole boot.
    pub elapsed: Duration,
}

impl Boot {
    /// Whether the guest exited through `isa-debug-exit` with its pass code.
    pub fn passed(&self) -> bool {
        self.exit_code == Some(QEMU_PASS)
    }

    /// The guest's JSON report, if it printed one that parses.
    pub fn report(&self) -> Option<serde_json::Value> {
        let line = self
            .serial
            .lines()
            .find_map(|l| l.strip_prefix(REPORT_PREFIX))?;
        serde_json::from_str(line.trim_end()).ok()
    }

    /// The serial output without the report line.
    pub fn messages(&self) -> String {
        self.serial
            .lines()
            .filter(|l| !l.starts_with(REPORT_PREFIX))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One configuration the guest is booted in, and the backend it must detect there.
#[derive(Clone, Debug)]
pub struct Config {
    /// Short name (`native`, `tcg`, `tcg-vmport`, `kvm`, `kvm-vmport`, `rom`).
    pub name: &'static str,
    /// How QEMU runs.
    pub qemu: Qemu,
    /// The backend the guest must report.
    pub expect: &'static str,
    /// What the configuration shows.
    pub about: &'static str,
}

impl Config {
    /// Whether this machine can run it; why not if not.
    pub fn available(&self) -> Result<(), String> {
        qemu_available()?;
        if self.qemu.accel == Accel::Kvm {
            kvm_available()?;
        }
        Ok(())
    }
}

/// Every configuration: TCG without the hypervisor bit (native), TCG (tcg), TCG with VMware's
/// backdoor (vmware), a backend ROM published through fw_cfg (`rom`, needs `rom` set: see
/// [`with_rom`]), and the same on `/dev/kvm`. microvm has no VMware backdoor; `pc` (with qboot)
/// has it through vmport.
pub fn configs() -> Vec<Config> {
    let tcg = Qemu::tcg();
    let kvm = Qemu {
        accel: Accel::Kvm,
        cpu: KVM_CPU.into(),
        timeout: Duration::from_secs(240),
        ..Qemu::tcg()
    };
    let pc = Machine::Pc { vmport: true };
    vec![
        Config {
            name: "native",
            qemu: Qemu {
                cpu: "max,-hypervisor".into(),
                ..tcg.clone()
            },
            expect: "native",
            about: "TCG, -cpu max,-hypervisor: no hypervisor bit",
        },
        Config {
            name: "tcg",
            qemu: tcg.clone(),
            expect: "tcg",
            about: "TCG, microvm",
        },
        Config {
            name: "tcg-vmport",
            qemu: Qemu {
                machine: pc,
                ..tcg.clone()
            },
            expect: "vmware",
            about: "TCG, pc with vmport: VMware's backdoor answers",
        },
        Config {
            name: "kvm",
            qemu: kvm.clone(),
            expect: "kvm",
            about: "KVM (this host: PVM), microvm",
        },
        Config {
            name: "kvm-vmport",
            qemu: Qemu { machine: pc, ..kvm },
            expect: "vmware",
            about: "KVM, pc with vmport",
        },
    ]
}

/// `config` with a backend ROM published through fw_cfg.
pub fn with_rom(mut config: Config, rom: &Path, name: &'static str) -> Config {
    config.qemu.extra.push("-fw_cfg".into());
    config.qemu.extra.push(format!(
        "name={},file={}",
        patch_sites::rom::FW_CFG_NAME,
        rom.display()
    ));
    config.name = name;
    config.expect = "rom";
    config
}

/// Where downloaded kernels and other large artefacts are cached: `$PVPATCH_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/pvpatch`, else `~/.cache/pvpatch` (never inside the repository).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PVPATCH_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("pvpatch");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/pvpatch")
}

/// The directory of the cached Debian kernel.
pub fn debian_kernel_dir() -> PathBuf {
    cache_dir().join("kernels/debian-bookworm-amd64")
}

/// A cached Debian kernel, as `cargo xtask kernel` leaves it.
#[derive(Clone, Debug)]
pub struct CachedKernel {
    /// The ELF vmlinux extracted from the package's bzImage.
    pub vmlinux: PathBuf,
    /// The package it came from (`linux-image-6.1.0-56-amd64 6.1.192-2`).
    pub package: String,
}

/// The cached Debian kernel, or why there is none (`cargo xtask kernel` fetches it).
pub fn debian_kernel() -> Result<CachedKernel, String> {
    let dir = debian_kernel_dir();
    let package = std::fs::read_to_string(dir.join("package.txt")).map_err(|_| {
        format!(
            "no Debian kernel in {} (`cargo xtask kernel` downloads and extracts it)",
            dir.display()
        )
    })?;
    let vmlinux = dir.join("vmlinux");
    if !vmlinux.is_file() {
        return Err(format!(
            "{} is missing (`cargo xtask kernel` extracts it)",
            vmlinux.display()
        ));
    }
    Ok(CachedKernel {
        vmlinux,
        package: package.trim().to_owned(),
    })
}
