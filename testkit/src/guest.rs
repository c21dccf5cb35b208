//! The guest kernel (`guest/`): built for `x86_64-unknown-none`, annotated as its build does,
//! given the demo ROM, and the configurations it is booted in.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::HarnessError;
use crate::qemu::{Accel, KVM_CPU, Machine, Qemu, kvm_available, qemu_available};

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
        let img = pvpatch::load::image::Image::open(&plain)
            .map_err(|e| HarnessError::Annotate(e.to_string()))?;
        let report = pvpatch::scan_image(&img, Default::default(), None);
        let opts = pvpatch::annotate::AnnotateOptions {
            sections: vec![RAW_SECTION.to_owned()],
            ..Default::default()
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
    let desc_path = crate::workspace_root().join(DEMO_ROM);
    let description = std::fs::read_to_string(&desc_path).map_err(|source| HarnessError::Io {
        path: desc_path.clone(),
        source,
    })?;
    let img = pvpatch::load::image::Image::open(kernel)
        .map_err(|e| HarnessError::Annotate(e.to_string()))?;
    let rom = pvpatch::rom::build_for(&description, &img)
        .map_err(|e| HarnessError::Annotate(format!("building {DEMO_ROM}: {e}")))?;
    let out = kernel.with_extension("demo.rom");
    pvpatch::output::write_bytes(&out, &rom)
        .map_err(|e| HarnessError::Annotate(format!("writing {}: {e}", out.display())))?;
    Ok(out)
}

/// Builds the guest kernel (release, `x86_64-unknown-none`) without annotating it: it patches
/// from the table its macros' records make alone. When `PVGUEST_ELF` is set, that file is used
/// instead. The build uses its own target directory so that it can run while an outer
/// `cargo test` holds the workspace's.
pub fn build_guest_plain() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("PVGUEST_ELF") {
        return Ok(PathBuf::from(p));
    }
    crate::run_build(
        build_command(true),
        "guest",
        guest_target_dir().join("x86_64-unknown-none/release/pvguest"),
    )
}

/// The guest's own target directory, so that it can be built while an outer `cargo test` holds
/// the workspace's.
fn guest_target_dir() -> PathBuf {
    crate::workspace_root().join("target/guest")
}

/// The command that builds the guest kernel (release, `x86_64-unknown-none`); `quiet` leaves out
/// cargo's progress.
pub fn build_command(quiet: bool) -> Command {
    crate::bare_metal_build("pvguest", &guest_target_dir(), quiet)
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

impl Config {
    /// This configuration for booting `guest`: under KVM, with `pvguest.xgetbv=unemulated`
    /// appended when a probe boot saw the machine stop at `xgetbv` ([`xgetbv_stops`], run
    /// once per process), so that the `xsetbv` self-test is skipped for what was seen.
    pub fn for_guest(mut self, guest: &Path) -> Result<Config, HarnessError> {
        if self.qemu.accel != Accel::Kvm {
            return Ok(self);
        }
        // Held while the probe runs: tests booting in parallel wait for its one answer.
        static SEEN: std::sync::Mutex<Option<Option<String>>> = std::sync::Mutex::new(None);
        let mut known = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        let seen = match &*known {
            Some(s) => s.clone(),
            None => {
                let s = xgetbv_stops(&self.qemu, guest)?;
                if let Some(what) = &s {
                    eprintln!("xgetbv probe: this machine stops at xgetbv: {what}");
                }
                *known = Some(s.clone());
                s
            }
        };
        if seen.is_some() {
            let flag = "pvguest.xgetbv=unemulated";
            self.qemu.append = Some(match self.qemu.append.take() {
                Some(a) => format!("{a} {flag}"),
                None => flag.into(),
            });
        }
        Ok(self)
    }
}

/// Whether `qemu` stops a guest kernel at `xgetbv` (this host's KVM, PVM, cannot emulate it at
/// CPL 0: the VM stops with an emulation failure): a probe boot of `guest` with
/// `pvguest.probe=xgetbv`, 15 s at most (it prints its line within a second or two). `Some(what QEMU said)` if it stopped there, `None` if
/// `xgetbv` ran.
pub fn xgetbv_stops(qemu: &Qemu, guest: &Path) -> Result<Option<String>, HarnessError> {
    let probe = Qemu {
        append: Some("pvguest.probe=xgetbv".into()),
        timeout: Duration::from_secs(15),
        ..qemu.clone()
    };
    match probe.boot(guest) {
        Ok(b) if b.serial.contains("pvguest: probe xgetbv: ok") => Ok(None),
        // Ended before its line: a broken guest or QEMU, not a fact about xgetbv.
        Ok(b) => Err(HarnessError::Probe(format!(
            "QEMU exited {:?} without the probe's line\nserial:\n{}\nstderr:\n{}",
            b.exit_code, b.serial, b.stderr
        ))),
        Err(HarnessError::Timeout(_, serial))
            if serial.contains("pvguest: booted") && !serial.contains("unexpected exception") =>
        {
            Ok(Some(
            "the probe booted, never printed its line after xgetbv, and QEMU had not exited after \
             15 s (QEMU keeps a VM that KVM stopped on an emulation failure)"
                .into(),
            ))
        }
        Err(e) => Err(e),
    }
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
