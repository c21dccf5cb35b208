//! Building the guest and booting it under QEMU, for tests and `cargo xtask`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;

/// QEMU's exit status when the guest wrote [`EXIT_PASS`] to `isa-debug-exit`.
pub const QEMU_PASS: i32 = 33;
/// What the guest writes to `isa-debug-exit` on success.
pub const EXIT_PASS: u32 = 0x10;

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
    /// `pc` with QEMU's default firmware (SeaBIOS) and vmport off: what loads a multiboot
    /// `-kernel` (Xen); qboot cannot.
    PcMultiboot,
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
            Machine::PcMultiboot => "pc,vmport=off".to_owned(),
        };
        c.args(["-machine", &machine]);
        if self.machine != Machine::PcMultiboot {
            c.args(["-bios", "/usr/share/qemu/qboot.rom"]);
        }
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

/// A boot that stayed up until its serial console printed a line, with the physical memory a
/// test asked for, read through QEMU's monitor (QMP `pmemsave`) before QEMU was told to quit.
#[derive(Debug)]
pub struct Inspected {
    /// The boot (QEMU's exit status is that of `quit`).
    pub boot: Boot,
    /// The bytes of each range asked for, in order.
    pub memory: Vec<Vec<u8>>,
}

impl Qemu {
    /// Boots `kernel`, waits until the serial console shows `until` (the init's marker), reads
    /// each `(physical address, length)` of `reads` through QMP, and quits QEMU. The kernel's
    /// init must stay up after the marker ([`crate::initramfs::initramfs_staying`]).
    pub fn boot_and_read(
        &self,
        kernel: &Path,
        until: &str,
        reads: &[(u64, usize)],
    ) -> Result<Inspected, HarnessError> {
        use std::io::{BufRead, BufReader, Write};
        use std::os::unix::net::UnixStream;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| HarnessError::Io { path, source }
        };
        let dir = tempfile::tempdir().map_err(io(&std::env::temp_dir()))?;
        let serial_path = dir.path().join("serial.txt");
        let qmp_path = dir.path().join("qmp.sock");
        let started = Instant::now();
        let mut cmd = self.command(kernel, &serial_path);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: "qemu-system-x86_64".into(),
            source,
        })?;
        let read_serial = || std::fs::read_to_string(&serial_path).unwrap_or_default();
        let kill = |child: &mut std::process::Child| {
            let _ = child.kill();
            let _ = child.wait();
        };
        // Up to the marker (or QEMU's exit, or the time limit).
        loop {
            if read_serial().contains(until) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HarnessError::Monitor(format!(
                    "QEMU exited ({status}) before the console showed {until:?}:\n{}",
                    read_serial()
                )));
            }
            if started.elapsed() > self.timeout {
                kill(&mut child);
                return Err(HarnessError::Timeout(self.timeout, read_serial()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let result = (|| -> Result<Vec<Vec<u8>>, HarnessError> {
            let stream = UnixStream::connect(&qmp_path).map_err(io(&qmp_path))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(io(&qmp_path))?;
            let mut reader = BufReader::new(stream.try_clone().map_err(io(&qmp_path))?);
            let mut writer = stream;
            // One reply per command; events interleave and are skipped.
            let mut call = |cmd: serde_json::Value| -> Result<serde_json::Value, HarnessError> {
                writeln!(writer, "{cmd}").map_err(io(&qmp_path))?;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).map_err(io(&qmp_path))? == 0 {
                        return Err(HarnessError::Monitor("the monitor closed".into()));
                    }
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| HarnessError::Monitor(format!("{e}: {line}")))?;
                    if let Some(e) = v.get("error") {
                        return Err(HarnessError::Monitor(format!("{cmd}: {e}")));
                    }
                    if v.get("return").is_some() {
                        return Ok(v);
                    }
                }
            };
            call(serde_json::json!({"execute": "qmp_capabilities"}))?;
            let mut memory = Vec::new();
            for (i, &(addr, len)) in reads.iter().enumerate() {
                let file = dir.path().join(format!("mem{i}"));
                call(serde_json::json!({"execute": "pmemsave", "arguments": {
                    "val": addr, "size": len, "filename": file.display().to_string()}}))?;
                memory.push(std::fs::read(&file).map_err(io(&file))?);
            }
            let _ = call(serde_json::json!({"execute": "quit"}));
            Ok(memory)
        })();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if started.elapsed() > self.timeout + Duration::from_secs(30) => {
                    kill(&mut child);
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break None,
            }
        };
        let memory = result?;
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        Ok(Inspected {
            boot: Boot {
                exit_code: status.and_then(|s| s.code()),
                serial: read_serial(),
                stderr,
                elapsed: started.elapsed(),
            },
            memory,
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
