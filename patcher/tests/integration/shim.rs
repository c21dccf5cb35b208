//! The boot shim in front of Debian's 6.1 and 6.12 under QEMU TCG: each kernel booted to its
//! init on every backend this machine has (native, tcg, vmware, a ROM published through fw_cfg,
//! and the out-of-line backend that sends every rewritable site through a thunk or a detour);
//! Linux's text read back after the boot through QEMU's monitor and compared with the file:
//! every planned byte is there, and every other byte that changed is one Linux patches itself.
//! A corrupted table, two hostile ROMs and `pvpatch=off`: nothing written, Linux boots. Under
//! this machine's KVM the shim's line is checked, and the boot stopped.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use patch_sites::Op;
use patch_sites::regs::RegSet;
use patch_sites::rom::{FW_CFG_NAME, RomEntrySpec, RomKind, rom_size, write_rom};
use patch_sites::shim::{PlanSource, REPORT_SIZE, Report, Status};
use pvpatch::load::Image;
use pvpatch::rewrite::{BackendSpec, plan_image};
use pvpatch::scan_image;
use pvpatch_testkit::kernels::{self, KernelSpec};
use pvpatch_testkit::qemu::{Accel, Machine};
use pvpatch_testkit::{self as harness, Qemu, initramfs};

/// The shimmed kernel of `spec` (built once per test run) with the original image, or `None`
/// (the skip recorded) where the kernel, QEMU or the shim's target is missing.
fn shimmed(test: &str, spec: KernelSpec) -> Option<&'static (PathBuf, Image, PathBuf)> {
    static K61: OnceLock<Result<(PathBuf, Image, PathBuf), String>> = OnceLock::new();
    static K612: OnceLock<Result<(PathBuf, Image, PathBuf), String>> = OnceLock::new();
    if let Err(why) = harness::qemu_available() {
        harness::skip(test, &why);
        return None;
    }
    let cell = if spec == kernels::BOOKWORM {
        &K61
    } else {
        &K612
    };
    let r = cell.get_or_init(|| {
        let k = kernels::cached(spec)?;
        let shim = harness::shim::build_shim().map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!("pvpatch-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = dir.join(format!("vmlinux-{}.shim", spec.name));
        harness::shim::shimmed(&k.vmlinux, &shim, &out).map_err(|e| e.to_string())?;
        let img = Image::open(&k.vmlinux).map_err(|e| e.to_string())?;
        let initrd = dir.join("initrd.cpio");
        std::fs::write(&initrd, initramfs::initramfs_staying()).map_err(|e| e.to_string())?;
        Ok((out, img, initrd))
    });
    match r {
        Ok(v) => Some(v),
        Err(why) => {
            harness::skip(test, why);
            None
        }
    }
}

/// `[_text, _etext)`: its virtual start, its physical start, its length.
fn text(img: &Image) -> (u64, u64, usize) {
    let (s, e) = (
        img.symbol_address("_text").unwrap(),
        img.symbol_address("_etext").unwrap(),
    );
    let seg = img
        .segments
        .iter()
        .find(|g| g.kind == object::elf::PT_LOAD && g.vaddr <= s && e <= g.vaddr + g.memsz)
        .unwrap();
    (s, seg.paddr + (s - seg.vaddr), (e - s) as usize)
}

/// The shim's report page, physical.
fn report_page(shimmed: &Path) -> u64 {
    let img = Image::open_with(shimmed, false).unwrap();
    let s = img.section(pvpatch::shim::SHIM_SECTION).unwrap();
    let p = pvpatch::shim::existing(&img).unwrap();
    let seg = img
        .segments
        .iter()
        .find(|g| g.vaddr == s.addr && g.kind == object::elf::PT_LOAD)
        .unwrap();
    seg.paddr + p.report_offset
}

/// What a boot of the shimmed kernel left: the report, Linux's text, the serial console.
struct Booted {
    report: Report,
    text: Vec<u8>,
    serial: String,
}

fn boot(
    shimmed: &Path,
    img: &Image,
    initrd: &Path,
    machine: Machine,
    append: &str,
    extra: &[String],
) -> Booted {
    let mut q = Qemu::linux(initrd);
    q.machine = machine;
    q.append = q.append.map(|a| format!("{a} pvpatch.verbose {append}"));
    q.extra.extend_from_slice(extra);
    let (_, phys, len) = text(img);
    let report_at = report_page(shimmed);
    let got = q
        .boot_and_read(
            shimmed,
            initramfs::MARKER,
            &[(report_at, REPORT_SIZE), (phys, len)],
        )
        .unwrap_or_else(|e| panic!("{}: {e}", shimmed.display()));
    let report = Report::read(&got.memory[0])
        .unwrap_or_else(|| panic!("no report at {report_at:#x}; serial:\n{}", got.boot.serial));
    report_command_agrees(&got.memory[0], &got.boot.serial);
    Booted {
        report,
        text: got.memory[1].clone(),
        serial: got.boot.serial,
    }
}

/// `pvpatch report` on the report page read back from memory says what the shim's own line on
/// the console said: the shim formats its line in the guest from the report it holds, the
/// command decodes the page QEMU dumped. Backend, sites, sites rewritten, detours, where the
/// plan was made and the microseconds; or the status and the reason.
fn report_command_agrees(page: &[u8], serial: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("report.bin");
    std::fs::write(&dump, page).unwrap();
    let khz = pvpatch_testkit::qemu::host_tsc_khz().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pvpatch"))
        .args(["report", "--json", "--tsc-khz", &khz])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pvpatch report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The line with the shim's time (after the one that says why prepared plans were not
    // used, if there is one).
    let line = serial
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with("pvpatch: ") && l.ends_with(" us"))
        .unwrap_or_else(|| panic!("no shim line with its time:\n{serial}"));
    let (what, us) = line["pvpatch: ".len()..line.len() - " us".len()]
        .rsplit_once(", ")
        .unwrap();
    assert_eq!(j["microseconds"], us.parse::<u64>().unwrap(), "{line}");
    if let Some(rest) = what.strip_prefix("backend ") {
        // `tcg: 1,103 sites, 0 rewritten (0 detours, planned at link time)`
        let (backend, rest) = rest.split_once(": ").unwrap();
        let n = |s: &str| s.replace(',', "").parse::<u64>().unwrap();
        let (sites, rest) = rest.split_once(" sites, ").unwrap();
        let (rewritten, rest) = rest.split_once(" rewritten (").unwrap();
        let (detours, planned) = rest.split_once(" detours, ").unwrap();
        assert_eq!(j["status"], "patched", "{line}");
        assert_eq!(j["backend"], backend, "{line}");
        assert_eq!(j["sites"], n(sites), "{line}");
        assert_eq!(j["rewritten"], n(rewritten), "{line}");
        assert_eq!(j["detours"], n(detours), "{line}");
        assert_eq!(j["planned"], planned.trim_end_matches(')'), "{line}");
    } else {
        // `refused: site table invalid: ...; Linux boots as it is`
        let (status, reason) = what
            .strip_suffix("; Linux boots as it is")
            .and_then(|w| w.split_once(": "))
            .unwrap_or_else(|| panic!("an unknown shim line: {line}"));
        assert_eq!(j["status"], status, "{line}");
        assert_eq!(j["reason"], reason, "{line}");
    }
}

/// Linux's text after a boot of the kernel without the shim, on `machine` (read once per
/// kernel and machine): what Linux itself patches at boot (alternatives, jump labels, static
/// calls, ftrace, return thunks, ...) is in it.
fn reference(img: &Image, initrd: &Path, machine: Machine) -> Vec<u8> {
    let mut q = Qemu::linux(initrd);
    q.machine = machine;
    let (_, phys, len) = text(img);
    let got = q
        .boot_and_read(&img.path, initramfs::MARKER, &[(phys, len)])
        .unwrap_or_else(|e| panic!("the reference boot of {}: {e}", img.path.display()));
    got.memory[0].clone()
}

/// The byte ranges Linux patches itself, by its tables (jump labels and static calls change
/// as keys are toggled at run time, so two boots need not agree there), sorted.
fn linux_patches(img: &Image) -> &'static [(u64, u64)] {
    type Ranges = &'static [(u64, u64)];
    static R: OnceLock<std::sync::Mutex<Vec<(String, Ranges)>>> = OnceLock::new();
    let cache = R.get_or_init(Default::default);
    let key = img.path.display().to_string();
    let mut c = cache.lock().unwrap();
    if let Some((_, v)) = c.iter().find(|(k, _)| *k == key) {
        return v;
    }
    let report = scan_image(img, Default::default(), None);
    let mut v: Vec<(u64, u64)> = report
        .tables
        .protected
        .iter()
        .map(|p| (p.start, p.end))
        .chain(
            report
                .analysis
                .guards
                .all()
                .iter()
                .map(|g| (g.start, g.end)),
        )
        .collect();
    v.sort_unstable();
    let v: &'static [(u64, u64)] = Vec::leak(v);
    c.push((key, v));
    v
}

/// Compares the text a shimmed boot left with the reference boot's: every planned byte is
/// there, and no other byte differs but where Linux patches itself. Returns the planned bytes
/// that changed, and the bytes of Linux's own that differ between the two boots.
fn check_text(
    img: &Image,
    reference: &[u8],
    booted: &Booted,
    planned: &[(u64, Vec<u8>)],
) -> (usize, usize) {
    let (start, _, len) = text(img);
    let linux = linux_patches(img);
    let is_linux = |a: u64| {
        let i = linux.partition_point(|r| r.0 <= a);
        linux[..i].iter().rev().take(64).any(|r| a < r.1)
    };
    let mut expected = std::collections::BTreeMap::new();
    for (a, bytes) in planned {
        for (i, b) in bytes.iter().enumerate() {
            expected.insert(a + i as u64, *b);
        }
    }
    let (mut seen, mut theirs) = (0, 0);
    assert_eq!(booted.text.len(), len);
    for (i, (&was, &is)) in reference.iter().zip(&booted.text).enumerate() {
        let a = start + i as u64;
        match expected.get(&a) {
            Some(&want) if is == want => seen += usize::from(was != want),
            Some(&want) => {
                panic!("{a:#x}: planned {want:#04x}, found {is:#04x} (unshimmed {was:#04x})")
            }
            None if was == is => {}
            None if is_linux(a) => theirs += 1,
            None => panic!(
                "{a:#x}: {is:#04x} where the unshimmed boot has {was:#04x}, planned by nobody"
            ),
        }
    }
    (seen, theirs)
}

/// The writes a plan makes inside `[_text, _etext)` (the init text is freed by the time the
/// text is read back).
fn planned_in_text(img: &Image, spec: &BackendSpec) -> (Vec<(u64, Vec<u8>)>, u32) {
    let report = scan_image(img, Default::default(), None);
    let plan = plan_image(&report, spec).unwrap();
    let (start, _, len) = text(img);
    let end = start + len as u64;
    let mut w: Vec<(u64, Vec<u8>)> = plan
        .plan
        .writes()
        .map(|w| (w.addr, w.new.as_slice().to_vec()))
        .chain(plan.plan.code.iter().map(|c| (c.addr, c.new.clone())))
        .filter(|(a, b)| *a >= start && a + b.len() as u64 <= end)
        .collect();
    w.sort();
    let changed = plan.plan.sites.iter().filter(|p| p.new != p.old).count() as u32;
    (w, changed)
}

/// The stock ROM (shim/roms/stock.toml), built for `img`.
fn stock_rom(shimmed: &Path) -> Vec<u8> {
    let toml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shim/roms/stock.toml"),
    )
    .unwrap();
    let img = Image::open(shimmed).unwrap();
    pvpatch::rom::build::build_for(&toml, &img).unwrap()
}

/// A boot of `every_backend`: the backend, the machine, what the command line adds, QEMU's
/// extra arguments, the backend as planned offline, and where the shim must make its plan.
type Case = (
    &'static str,
    Machine,
    &'static str,
    Vec<String>,
    BackendSpec,
    PlanSource,
);

fn every_backend(spec: KernelSpec) {
    let test = format!("shimmed_{}_boots_on_every_backend", spec.name);
    let Some((shimmed, img, initrd)) = shimmed(&test, spec) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rom = dir.path().join("stock.rom");
    let rom_bytes = stock_rom(shimmed);
    std::fs::write(&rom, &rom_bytes).unwrap();
    let fw_cfg = vec![
        "-fw_cfg".to_owned(),
        format!("name={FW_CFG_NAME},file={}", rom.display()),
    ];
    let pc = Machine::Pc { vmport: true };
    let (ref_microvm, ref_pc) = (
        reference(img, initrd, Machine::Microvm),
        reference(img, initrd, pc),
    );
    // The backends known at link time apply the plan prepared then; the ROM's is made at boot,
    // as is the out-of-line backend's when the command line asks (the whole boot-time pass:
    // validation, planning, the detour area).
    let link = PlanSource::Link;
    // Native runs on a CPU without 1 GiB pages: the entry's other way to map the low 4 GiB
    // (QEMU takes the last `-cpu`).
    let cases: [Case; 6] = [
        (
            "native",
            Machine::Microvm,
            "pvpatch.backend=native",
            vec!["-cpu".to_owned(), "max,pdpe1gb=off".to_owned()],
            BackendSpec::new("native", None).unwrap(),
            link,
        ),
        (
            "tcg",
            Machine::Microvm,
            "",
            vec![],
            BackendSpec::new("tcg", None).unwrap(),
            link,
        ),
        (
            "vmware",
            pc,
            "",
            vec![],
            BackendSpec::new("vmware", None).unwrap(),
            link,
        ),
        (
            "rom",
            Machine::Microvm,
            "",
            fw_cfg,
            BackendSpec::new("rom", Some(rom_bytes.clone())).unwrap(),
            PlanSource::Boot,
        ),
        (
            "outofline",
            Machine::Microvm,
            "pvpatch.backend=outofline",
            vec![],
            BackendSpec::new("outofline", None).unwrap(),
            link,
        ),
        (
            "outofline",
            Machine::Microvm,
            "pvpatch.backend=outofline pvpatch.plan=boot",
            vec![],
            BackendSpec::new("outofline", None).unwrap(),
            PlanSource::BootAsked,
        ),
    ];
    for (backend, machine, append, extra, spec_b, source) in cases {
        let booted = boot(shimmed, img, initrd, machine, append, &extra);
        let r = booted.report;
        assert_eq!(
            (r.status, r.backend(), r.planned),
            (Status::Patched, backend, source),
            "{backend}: {}\n{}",
            r.reason(),
            booted.serial
        );
        let (planned, changed) = planned_in_text(img, &spec_b);
        assert_eq!(
            r.rewritten, changed,
            "{backend}: sites rewritten, as planned offline"
        );
        let reference = if machine == pc { &ref_pc } else { &ref_microvm };
        let (seen, theirs) = check_text(img, reference, &booted, &planned);
        let line = booted
            .serial
            .lines()
            .find(|l| l.starts_with("pvpatch: backend"))
            .unwrap_or_else(|| panic!("{backend}: no shim line:\n{}", booted.serial));
        assert!(line.contains(&format!("backend {backend}:")), "{line}");
        assert!(line.contains(source.name()), "{line}");
        eprintln!(
            "{} {backend} ({}): {line}; {} sites rewritten, {seen} planned bytes changed in the text \
             read back and nothing else against the unshimmed boot but {theirs} bytes of Linux's \
             own patching; shim {} cycles ({} a site; preparing {}, planning {}, applying {}, \
             the rest (page tables, start_info, the report) {})",
            spec.name,
            source.name(),
            r.rewritten,
            r.cycles_total,
            r.cycles_total / u64::from(r.sites.max(1)),
            r.cycles_prepare,
            r.cycles_plan,
            r.cycles_apply,
            r.cycles_total
                .saturating_sub(r.cycles_prepare + r.cycles_plan + r.cycles_apply)
        );
    }
}

#[test]
fn shimmed_6_1_boots_on_every_backend() {
    every_backend(kernels::BOOKWORM);
}

#[test]
fn shimmed_6_12_boots_on_every_backend() {
    every_backend(kernels::BACKPORTS);
}

/// ROMs that parse but that the runtime must refuse, and what the refusal says (a kernel build
/// names an instruction by iced-x86's number: its name tables are left out of the shim).
fn hostile_roms() -> Vec<(&'static str, Vec<u8>, String)> {
    let rom = |entries: &[RomEntrySpec<'_>]| {
        let mut b = vec![0u8; rom_size(entries)];
        let n = write_rom("hostile", *b"\0\0\0\0\0\0\0\0\0\0\0\0", entries, &mut b).unwrap();
        b.truncate(n);
        b
    };
    let spec = |op: Op, kind: RomKind, code: &'static [u8]| RomEntrySpec {
        op_id: op.id(),
        kind,
        code,
        slots: &[],
        clobbers: RegSet::EMPTY,
    };
    vec![
        // Its wbinvd calls a hypervisor.
        (
            "a call entry that makes a hypercall",
            rom(&[spec(Op::Wbinvd, RomKind::Call, &[0x0f, 0x01, 0xc1, 0xc3])]),
            format!(
                "the wbinvd code: the instruction at +0 is a hypervisor call (mnemonic {})",
                pvpatch_isa::iced_x86::Mnemonic::Vmcall as u16
            ),
        ),
        // Its rdtsc template enables interrupts and returns nothing.
        (
            "an inline template that does something else",
            rom(&[spec(Op::Rdtsc, RomKind::Inline, &[0xfb])]),
            "the rdtsc code: the instruction at +0 is sti, which this op does not allow".into(),
        ),
    ]
}

#[test]
fn corrupted_tables_hostile_roms_and_off_write_nothing() {
    let test = "corrupted_tables_hostile_roms_and_off_write_nothing";
    let Some((shimmed, img, initrd)) = shimmed(test, kernels::BOOKWORM) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A table with one record changed: its checksum no longer holds.
    let corrupted = dir.path().join("corrupted");
    let mut bytes = std::fs::read(shimmed).unwrap();
    let shimmed_img = Image::open_with(shimmed, false).unwrap();
    let t = shimmed_img.section(".pvpatch_sites").unwrap();
    bytes[(t.offset + 64 + 24 * 7 + 10) as usize] ^= 0x01;
    std::fs::write(&corrupted, &bytes).unwrap();
    // Prepared plans with one byte of the directory changed: not used, the shim plans at
    // boot (and rewrites nothing under tcg: the text is checked against the unshimmed boot's
    // with no planned byte, which holds only because tcg's plan changes nothing, as the
    // every-backend test checks).
    let bad_plans = dir.path().join("bad-plans");
    let mut bytes = std::fs::read(shimmed).unwrap();
    let p = shimmed_img.section(pvpatch::shim::PLANS_SECTION).unwrap();
    bytes[(p.offset + 48 + 20) as usize] ^= 0x01;
    std::fs::write(&bad_plans, &bytes).unwrap();
    let mut cases: Vec<(String, PathBuf, String, Vec<String>, Status, String)> = vec![
        (
            "a corrupted table".into(),
            corrupted,
            String::new(),
            vec![],
            Status::Refused,
            "site table invalid: bad checksum".into(),
        ),
        (
            "corrupted prepared plans".into(),
            bad_plans,
            String::new(),
            vec![],
            Status::Patched,
            "prepared plans not used: the directory's digest does not hold".into(),
        ),
        (
            "pvpatch=off".into(),
            shimmed.clone(),
            "pvpatch=off".into(),
            vec![],
            Status::Off,
            "pvpatch=off".into(),
        ),
    ];
    for (what, rom, says) in hostile_roms() {
        let f = dir.path().join(what.replace(' ', "_"));
        std::fs::write(&f, rom).unwrap();
        cases.push((
            what.into(),
            shimmed.clone(),
            String::new(),
            vec![
                "-fw_cfg".into(),
                format!("name={FW_CFG_NAME},file={}", f.display()),
            ],
            Status::Refused,
            says,
        ));
    }
    let reference = reference(img, initrd, Machine::Microvm);
    for (what, kernel, append, extra, status, says) in cases {
        let booted = boot(&kernel, img, initrd, Machine::Microvm, &append, &extra);
        assert_eq!(
            booted.report.status,
            status,
            "{what}: {}\n{}",
            booted.report.reason(),
            booted.serial
        );
        assert!(
            booted.report.reason().contains(&says),
            "{what}: {:?} does not say {says:?}",
            booted.report.reason()
        );
        assert_eq!(check_text(img, &reference, &booted, &[]).0, 0);
        if status == Status::Patched {
            assert_eq!(booted.report.planned, PlanSource::BootRefused);
            assert!(
                booted.serial.contains(&says),
                "{what}: the console does not say {says:?}"
            );
        }
        eprintln!(
            "{what}: {} ({}); Linux booted to init",
            status.name(),
            booted.report.reason()
        );
    }
}

/// The lean shim (built without boot-time planning, `cargo xtask shim --lean`) in front of
/// Debian's 6.1: its segment is a fraction of the whole shim's; it applies the plans prepared at
/// link time (tcg, and every site out of line), exactly as planned; a published ROM, which it
/// cannot plan for, and a corrupted table: nothing written, and it says why.
#[test]
fn the_lean_shim_applies_prepared_plans_and_nothing_else() {
    let test = "the_lean_shim_applies_prepared_plans_and_nothing_else";
    let Some((whole, img, initrd)) = shimmed(test, kernels::BOOKWORM) else {
        return;
    };
    let k = kernels::cached(kernels::BOOKWORM).unwrap();
    let lean = harness::shim::build_lean_shim().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shimmed = dir.path().join("vmlinux-lean.shim");
    harness::shim::shimmed(&k.vmlinux, &lean, &shimmed).unwrap();
    let segment = |f: &Path| {
        let i = Image::open_with(f, false).unwrap();
        let s = i.section(pvpatch::shim::SHIM_SECTION).unwrap().addr;
        let g = i.segments.iter().find(|g| g.vaddr == s).unwrap();
        (g.filesz, g.memsz)
    };
    let (lean_size, whole_size) = (segment(&shimmed), segment(whole));
    assert!(
        lean_size.0 < whole_size.0 / 4,
        "{lean_size:?} against {whole_size:?}"
    );
    let reference = reference(img, initrd, Machine::Microvm);
    for (backend, append) in [("tcg", ""), ("outofline", "pvpatch.backend=outofline")] {
        let booted = boot(&shimmed, img, initrd, Machine::Microvm, append, &[]);
        let r = booted.report;
        assert_eq!(
            (r.status, r.backend(), r.planned),
            (Status::Patched, backend, PlanSource::Link),
            "{}\n{}",
            r.reason(),
            booted.serial
        );
        let (planned, changed) = planned_in_text(img, &BackendSpec::new(backend, None).unwrap());
        assert_eq!(r.rewritten, changed);
        let (seen, _) = check_text(img, &reference, &booted, &planned);
        eprintln!(
            "lean shim ({} bytes of segment, {} in memory; the whole shim {} and {}), \
             {backend}: {seen} planned bytes changed, {} cycles ({} a site)",
            lean_size.0,
            lean_size.1,
            whole_size.0,
            whole_size.1,
            r.cycles_total,
            r.cycles_total / u64::from(r.sites.max(1))
        );
    }
    // A ROM published: the lean shim cannot plan for it.
    let rom = dir.path().join("stock.rom");
    std::fs::write(&rom, stock_rom(&shimmed)).unwrap();
    let fw_cfg = [
        "-fw_cfg".to_owned(),
        format!("name={FW_CFG_NAME},file={}", rom.display()),
    ];
    // A corrupted table: its digest no longer holds, and nothing is planned at boot.
    let corrupted = dir.path().join("corrupted");
    let mut bytes = std::fs::read(&shimmed).unwrap();
    let t = Image::open_with(&shimmed, false)
        .unwrap()
        .section(".pvpatch_sites")
        .unwrap()
        .offset;
    bytes[(t + 64 + 24 * 7 + 10) as usize] ^= 0x01;
    std::fs::write(&corrupted, &bytes).unwrap();
    for (what, kernel, extra, says) in [
        (
            "a published ROM",
            &shimmed,
            &fw_cfg[..],
            "no plan prepared for rom (the lean shim plans nothing at boot)",
        ),
        (
            "a corrupted table",
            &corrupted,
            &[][..],
            "the site table is not the one they were made from",
        ),
    ] {
        let booted = boot(kernel, img, initrd, Machine::Microvm, "", extra);
        let r = booted.report;
        assert_eq!(r.status, Status::Refused, "{what}: {}", r.reason());
        assert!(r.reason().contains(says), "{what}: {:?}", r.reason());
        assert_eq!(check_text(img, &reference, &booted, &[]).0, 0);
        eprintln!(
            "lean shim, {what}: refused ({}); Linux booted to init",
            r.reason()
        );
    }
}

/// Under this machine's KVM every ring-0 instruction is emulated: Linux does not reach its init
/// within minutes, but the shim finishes, and its line is checked.
#[test]
fn under_kvm_the_shim_reports_its_line() {
    let test = "under_kvm_the_shim_reports_its_line";
    if let Err(why) = harness::kvm_available() {
        return harness::skip(test, &why);
    }
    let Some((shimmed, _, initrd)) = shimmed(test, kernels::BOOKWORM) else {
        return;
    };
    let mut q = Qemu::linux(initrd);
    q.accel = Accel::Kvm;
    q.cpu = harness::qemu::KVM_CPU.into();
    q.timeout = std::time::Duration::from_secs(180);
    q.append = q.append.map(|a| format!("{a} pvpatch.verbose"));
    // The line ends with the time in microseconds (the test passes the TSC's rate).
    let got = q.boot_and_read(shimmed, " us\r", &[]).unwrap();
    let line = got
        .boot
        .serial
        .lines()
        .find(|l| l.starts_with("pvpatch: "))
        .unwrap()
        .to_owned();
    assert!(line.starts_with("pvpatch: backend kvm:"), "{line}");
    eprintln!("under KVM: {line}");
}

/// Shimming keeps every original section byte for byte, but for the PVH entry note's
/// descriptor (now the shim's entry); `verify` checks the shim; annotating the shimmed kernel
/// again (`--force`) gives the same file; a kernel without a PVH entry is refused.
#[test]
fn shimming_changes_only_the_pvh_note_and_is_reproducible() {
    let test = "shimming_changes_only_the_pvh_note_and_is_reproducible";
    let Some((shimmed, img, _)) = shimmed(test, kernels::BOOKWORM) else {
        return;
    };
    let out = Image::open_with(shimmed, false).unwrap();
    let mut note_bytes = 0;
    // (The section-name table grows by the new sections' names.)
    for s in img.sections.iter().filter(|s| s.name != ".shstrtab") {
        let o = out
            .section(&s.name)
            .unwrap_or_else(|| panic!("{} is gone", s.name));
        let (a, b) = (img.section_data(s), out.section_data(o));
        assert_eq!((s.addr, a.len()), (o.addr, b.len()), "{}", s.name);
        let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
        if s.kind == object::elf::SHT_NOTE {
            note_bytes += differ;
        } else {
            assert_eq!(differ, 0, "{} changed", s.name);
        }
    }
    assert!(
        (1..=8).contains(&note_bytes),
        "{note_bytes} bytes of notes changed"
    );
    let v = pvpatch::verify::verify(&out).unwrap();
    let s = v.shim.as_ref().unwrap();
    assert!(v.ok() && s.problems.is_empty(), "{:?}", s.problems);
    assert_eq!(Some(s.linux_entry), img.pvh_entry());
    // Plans for every backend known at link time, kvm's with and without its delay feature.
    assert_eq!(s.prepared.len(), 7, "plans prepared for {:?}", s.prepared);
    // Damaged plans: verify says so. The last byte of the blob (the last change's new bytes),
    // which the plan's digest catches; and the first old byte of the out-of-line plan (the
    // last in the directory) with both digests made to hold again, which only the comparison
    // with the image's bytes catches.
    use patch_sites::prepared::{DIR_ENTRY, PLANS_HEADER, digest64};
    let verified = |bytes: Vec<u8>| {
        let damaged = Image::from_bytes("damaged", bytes).unwrap();
        let v = pvpatch::verify::verify(&damaged).unwrap();
        let problems = v.shim.as_ref().unwrap().problems.clone();
        (v.ok(), problems)
    };
    let bytes = std::fs::read(shimmed).unwrap();
    let p = out.section(pvpatch::shim::PLANS_SECTION).unwrap();
    let (at, len) = (p.offset as usize, p.size as usize);
    let mut b = bytes.clone();
    b[at + len - 1] ^= 0x40;
    let (ok, problems) = verified(b);
    assert!(
        !ok && problems
            .iter()
            .any(|p| p.contains("its digest does not hold")),
        "{problems:?}"
    );
    let mut b = bytes;
    let e = at + PLANS_HEADER + (s.prepared.len() - 1) * DIR_ENTRY;
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let (off, plen) = (u64_at(&b, e + 48) as usize, u64_at(&b, e + 56) as usize);
    b[at + off + 16] ^= 0x40;
    let pd = digest64(&b[at + off..at + off + plen]);
    b[e + 64..e + 72].copy_from_slice(&pd.to_le_bytes());
    let dir = digest64(&b[at + PLANS_HEADER..e + DIR_ENTRY]);
    b[at + 32..at + 40].copy_from_slice(&dir.to_le_bytes());
    let (ok, problems) = verified(b);
    assert!(
        !ok && problems
            .iter()
            .any(|p| p.contains("the outofline plan expects other bytes")),
        "{problems:?}"
    );
    // Again, from the shimmed kernel.
    let again = tempfile::NamedTempFile::new().unwrap();
    let shim = harness::shim::build_shim().unwrap();
    let reread = Image::open(shimmed).unwrap();
    let report = scan_image(&reread, Default::default(), None);
    let opts = pvpatch::annotate::AnnotateOptions {
        force: true,
        boot_shim: Some(pvpatch::shim::Shim::load(&shim).unwrap()),
        ..Default::default()
    };
    pvpatch::annotate::annotate(&report, again.path(), &opts).unwrap();
    assert!(std::fs::read(again.path()).unwrap() == std::fs::read(shimmed).unwrap());
    // A kernel without a PVH entry note.
    let sample = Image::from_bytes("sample", pvpatch_testkit::elf::sample()).unwrap();
    let report = scan_image(&sample, Default::default(), None);
    let opts = pvpatch::annotate::AnnotateOptions {
        boot_shim: Some(pvpatch::shim::Shim::load(&shim).unwrap()),
        ..Default::default()
    };
    let e = pvpatch::annotate::annotate(&report, again.path(), &opts).unwrap_err();
    assert!(e.to_string().contains("no PVH entry note"), "{e}");
}
