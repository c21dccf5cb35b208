//! Stock kernels rewritten: Debian's 6.1 and 6.12, planned for a backend with the runtime's own
//! planner, written back to the file, and booted; and every write of every plan checked against
//! the protected bytes, with Linux's tables re-read here, from the bounds System.map gives,
//! independently of the tool's own table reader.

use std::collections::BTreeMap;

use pvpatch::rewrite::{BackendSpec, ImagePlan, apply_to_file, plan_image};
use pvpatch::scan_image;
use pvpatch_testkit::kernels::{self, KernelSpec};
use pvpatch_testkit::{self as harness, Qemu};

use crate::kernels::loaded;

/// System.map as name -> address (the first of each name).
fn system_map(path: &std::path::Path) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for l in std::fs::read_to_string(path).unwrap().lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let [a, _, n] = f[..]
            && let Ok(a) = u64::from_str_radix(a, 16)
        {
            m.entry(n.to_owned()).or_insert(a);
        }
    }
    m
}

/// Every byte range Linux's tables name in `img`, read here from the bounds System.map gives:
/// entries of 4-byte relative pointers (each names the instruction there, up to 5 bytes for
/// calls and jumps and 4 for `endbr64`, 1 for a lock prefix's instruction), `__mcount_loc`'s
/// absolute pointers (5 bytes), `__jump_table`'s code (5 bytes) and target, `__ex_table`'s
/// instruction, `.static_call_sites` (5 bytes), `.altinstructions` and `.parainstructions`
/// (their lengths), `__bug_table` (2 bytes). Returned apart: the starts something jumps to
/// (jump-label targets, exception fixups), which a write may begin at but never contain, and
/// ORC's instruction boundaries, which no in-place rewrite may straddle.
struct Protected {
    ranges: Vec<(u64, u64)>,
    targets: Vec<u64>,
    orc: Vec<u64>,
}

fn protected(img: &pvpatch::load::Image, map: &BTreeMap<String, u64>) -> Protected {
    let mut out = Vec::new();
    let mut targets = Vec::new();
    let mut orc = Vec::new();
    let bytes = |a: u64, b: u64| img.read(a, (b - a) as usize).unwrap_or(&[]);
    let rel = |base: u64, b: &[u8], off: usize| {
        base.wrapping_add(off as u64)
            .wrapping_add_signed(i32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as i64)
    };
    let bounds = |start: &str, stop: &str| Some((*map.get(start)?, *map.get(stop)?));
    for (start, stop, len) in [
        ("__retpoline_sites", "__retpoline_sites_end", 5u64),
        ("__return_sites", "__return_sites_end", 5),
        ("__call_sites", "__call_sites_end", 5),
        ("__ibt_endbr_seal", "__ibt_endbr_seal_end", 4),
        ("__smp_locks", "__smp_locks_end", 1),
    ] {
        let Some((a, b)) = bounds(start, stop) else {
            continue;
        };
        let t = bytes(a, b);
        for i in (0..t.len() / 4).map(|i| i * 4) {
            let p = rel(a, t, i);
            if p != a + i as u64 {
                out.push((p, p + len));
            }
        }
    }
    if let Some((a, b)) = bounds("__start_mcount_loc", "__stop_mcount_loc") {
        for c in bytes(a, b).chunks_exact(8) {
            let p = u64::from_le_bytes(c.try_into().unwrap());
            if p != 0 {
                out.push((p, p + 5));
            }
        }
    }
    if let Some((a, b)) = bounds("__start___jump_table", "__stop___jump_table") {
        let t = bytes(a, b);
        for i in (0..t.len() / 16).map(|i| i * 16) {
            out.push((rel(a, t, i), rel(a, t, i) + 2));
            targets.push(rel(a, t, i + 4));
        }
    }
    if let Some((a, b)) = bounds("__start_static_call_sites", "__stop_static_call_sites") {
        let t = bytes(a, b);
        for i in (0..t.len() / 8).map(|i| i * 8) {
            let p = rel(a, t, i);
            out.push((p, p + 5));
        }
    }
    if let Some((a, b)) = bounds("__start___ex_table", "__stop___ex_table") {
        let t = bytes(a, b);
        for i in (0..t.len() / 12).map(|i| i * 12) {
            let p = rel(a, t, i);
            out.push((p, p + 1));
            targets.push(rel(a, t, i + 4));
        }
    }
    if let Some((a, b)) = bounds("__start___bug_table", "__stop___bug_table") {
        let t = bytes(a, b);
        for i in (0..t.len() / 12).map(|i| i * 12) {
            let p = rel(a, t, i);
            out.push((p, p + 2));
        }
    }
    if let Some((a, b)) = bounds("__alt_instructions", "__alt_instructions_end") {
        let t = bytes(a, b);
        // 14-byte entries since 6.3, 12 before (the kernel's version decides).
        let size = if map.contains_key("__parainstructions") {
            12
        } else {
            14
        };
        for i in (0..t.len() / size).map(|i| i * size) {
            let p = rel(a, t, i);
            out.push((p, p + t[i + size - 2] as u64));
        }
    }
    if let Some((a, b)) = bounds("__parainstructions", "__parainstructions_end") {
        for c in bytes(a, b).chunks_exact(16) {
            let p = u64::from_le_bytes(c[..8].try_into().unwrap());
            out.push((p, p + c[9] as u64));
        }
    }
    if let Some((a, b)) = bounds("__start_orc_unwind_ip", "__stop_orc_unwind_ip") {
        let t = bytes(a, b);
        for i in (0..t.len() / 4).map(|i| i * 4) {
            orc.push(rel(a, t, i));
        }
    }
    // Runtime constants (6.11+): each variable's table of pointers to immediates Linux
    // patches at boot; the whole instruction (up to 3 bytes before the immediate).
    for (kind, size) in [("ptr", 8u64), ("shift", 1)] {
        let prefix = format!("__start_runtime_{kind}_");
        for (name, &a) in map.iter().filter(|(n, _)| n.starts_with(&prefix)) {
            let stop = format!("__stop_runtime_{kind}_{}", &name[prefix.len()..]);
            let Some(&b) = map.get(&stop) else { continue };
            let t = bytes(a, b);
            for i in (0..t.len() / 4).map(|i| i * 4) {
                let imm = rel(a, t, i);
                out.push((imm - 3, imm + size));
            }
        }
    }
    // Function entries that begin with endbr64 (an indirect call must find it there).
    for &a in map.values() {
        if img
            .read(a, 4)
            .is_some_and(|b| b == [0xf3, 0x0f, 0x1e, 0xfa])
        {
            out.push((a, a + 4));
        }
    }
    out.sort_unstable();
    targets.sort_unstable();
    orc.sort_unstable();
    Protected {
        ranges: out,
        targets,
        orc,
    }
}

/// The first of the sorted `points` strictly inside `(a, b)`.
fn inside(points: &[u64], a: u64, b: u64) -> Option<u64> {
    points
        .get(points.partition_point(|&p| p <= a))
        .copied()
        .filter(|&p| p < b)
}

fn overlapping(ranges: &[(u64, u64)], a: u64, b: u64) -> Option<(u64, u64)> {
    let i = ranges.partition_point(|r| r.0 < b);
    ranges[..i].iter().rev().take(64).find(|r| r.1 > a).copied()
}

fn no_write_touches_a_protected_byte(spec: KernelSpec) {
    let test = format!("no_write_touches_a_protected_byte_{}", spec.name);
    let Some((k, img)) = loaded(&test, spec) else {
        return;
    };
    let map = system_map(&k.system_map);
    let prot = protected(img, &map);
    assert!(
        prot.ranges.len() > 50_000,
        "{}: {} protected ranges read",
        k.package,
        prot.ranges.len()
    );
    assert!(prot.targets.len() > 1_000 && prot.orc.len() > 100_000);
    let report = scan_image(img, Default::default(), None);
    let plan = plan_image(&report, &BackendSpec::new("outofline", None).unwrap()).unwrap();
    let mut writes = 0;
    let mut check = |what: &str, a: u64, len: u64| {
        writes += 1;
        if let Some(p) = overlapping(&prot.ranges, a, a + len) {
            panic!(
                "{}: {what} at {a:#x}+{len} touches protected {p:x?}",
                k.package
            );
        }
        if let Some(t) = inside(&prot.targets, a, a + len) {
            panic!(
                "{}: {what} at {a:#x}+{len} contains the branch target {t:#x}",
                k.package
            );
        }
    };
    for p in plan.plan.changes() {
        check("an in-place rewrite", p.addr, p.new.len() as u64);
        // In place, nothing may straddle an ORC boundary either.
        assert!(
            inside(&prot.orc, p.addr, p.addr + p.new.len() as u64).is_none(),
            "{}: the rewrite at {:#x} straddles an ORC boundary",
            k.package,
            p.addr
        );
    }
    for d in &plan.plan.detours {
        for w in d.writes() {
            check("a detour's write", w.addr, w.new.len() as u64);
        }
    }
    for c in &plan.plan.code {
        check("out-of-line code", c.addr, c.new.len() as u64);
    }
    // Function entries and 6.12's padding, from System.map.
    for (name, &a) in &map {
        if let Some(f) = name.strip_prefix("__pfx_")
            && let Some(&e) = map.get(f)
        {
            for d in &plan.plan.detours {
                for w in d.writes() {
                    assert!(
                        w.addr >= e || w.addr + w.new.len() as u64 <= a,
                        "{}: {:#x} writes {name}'s padding",
                        k.package,
                        w.addr
                    );
                }
            }
        }
    }
    let entry = entry_text_checks(&k.package, &map, &plan);
    eprintln!(
        "{}: {writes} writes of the out-of-line plan ({} detours, {entry} of them in the entry \
         text), none on any of {} protected ranges and {} branch targets re-read from \
         System.map's bounds",
        k.package,
        plan.plan.detours.len(),
        prot.ranges.len(),
        prot.targets.len()
    );
}

/// Linux's entry text, from System.map: every site there is recorded `NO_STACK` and never
/// becomes a call; every detour of it moves no call, stays clear of the code Linux recognises
/// by address, and keeps its stub and trampoline in the 2 MiB pages page-table isolation maps
/// with it. Returns how many detours move entry text.
fn entry_text_checks(package: &str, map: &BTreeMap<String, u64>, plan: &ImagePlan) -> usize {
    use patch_sites::table::SITE_FLAG_NO_STACK;
    let (start, end) = (map["__entry_text_start"], map["__entry_text_end"]);
    let pmd = 2u64 << 20;
    let (lo, hi) = (start / pmd * pmd, end.div_ceil(pmd) * pmd);
    let checked: Vec<(u64, u64)> = [
        ("entry_SYSCALL_64", "entry_SYSCALL_64_safe_stack"),
        ("entry_SYSRETQ_unsafe_stack", "entry_SYSRETQ_end"),
        ("entry_SYSCALL_compat", "entry_SYSCALL_compat_safe_stack"),
        (
            "entry_SYSRETL_compat_unsafe_stack",
            "entry_SYSRETL_compat_end",
        ),
        ("entry_SYSENTER_compat", "__end_entry_SYSENTER_compat"),
        ("repeat_nmi", "end_repeat_nmi"),
    ]
    .iter()
    .map(|(a, b)| (map[*a], map[*b]))
    .collect();
    let inside = |a: u64| (start..end).contains(&a);
    for p in &plan.plan.sites {
        if inside(p.site.addr) {
            assert!(
                p.site.flags & SITE_FLAG_NO_STACK != 0,
                "{package}: entry-text site {:#x} is not recorded NO_STACK",
                p.site.addr
            );
            assert_ne!(
                p.outcome,
                patch_sites::Outcome::Call,
                "{package}: {:#x}",
                p.site.addr
            );
        } else {
            assert_eq!(
                p.site.flags & SITE_FLAG_NO_STACK,
                0,
                "{package}: {:#x}",
                p.site.addr
            );
        }
    }
    let mut n = 0;
    for d in &plan.plan.detours {
        let (m, len) = (d.moved.addr, d.moved.old.len() as u64);
        if !inside(m) {
            assert!(
                m + len <= start || m >= end,
                "{package}: {m:#x} crosses the entry text"
            );
            continue;
        }
        n += 1;
        assert!(m + len <= end, "{package}: {m:#x} leaves the entry text");
        if let Some(r) = checked.iter().find(|r| r.0 < m + len && m < r.1) {
            panic!("{package}: the detour at {m:#x} moves code Linux checks by address: {r:x?}");
        }
        for w in std::iter::once(&d.stub).chain(d.tramp.as_ref()) {
            assert!(
                lo <= w.addr && w.addr + w.new.len() as u64 <= hi,
                "{package}: the detour at {m:#x} puts code at {:#x}, outside [{lo:#x}, {hi:#x})",
                w.addr
            );
        }
        let mut dec = iced_x86::Decoder::with_ip(64, d.moved.old.as_slice(), m, 0);
        for i in &mut dec {
            assert!(
                !i.is_call_near(),
                "{package}: the detour at {m:#x} moves a call"
            );
        }
    }
    assert!(n > 0, "{package}: no detour in the entry text");
    n
}

#[test]
fn no_write_touches_a_protected_byte_6_1() {
    no_write_touches_a_protected_byte(kernels::BOOKWORM);
}

#[test]
fn no_write_touches_a_protected_byte_6_12() {
    no_write_touches_a_protected_byte(kernels::BACKPORTS);
}

/// Rewrites the kernel for `backend` and boots it to its init, with no warning from Linux.
fn rewritten_kernel_boots(spec: KernelSpec, backend: &str) {
    let test = format!("rewritten_kernel_boots_{}_{backend}", spec.name);
    let Some((k, img)) = loaded(&test, spec) else {
        return;
    };
    if let Err(why) = harness::qemu_available() {
        return harness::skip(&test, &why);
    }
    let report = scan_image(img, Default::default(), None);
    let plan = plan_image(&report, &BackendSpec::new(backend, None).unwrap()).unwrap();
    let rewritten = apply_to_file(img, &plan).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vmlinux");
    std::fs::write(&out, &rewritten).unwrap();
    // The rewritten file still loads, and its text differs exactly where the plan says.
    let back = pvpatch::load::Image::open(&out).unwrap();
    let mut changed = 0;
    for s in img.exec_sections() {
        let (a, b) = (img.section_data(s), back.section_data(s));
        changed += a.iter().zip(b).filter(|(x, y)| x != y).count();
    }
    let planned: usize = plan
        .plan
        .writes()
        .map(|w| {
            w.old
                .as_slice()
                .iter()
                .zip(w.new.as_slice())
                .filter(|(x, y)| x != y)
                .count()
        })
        .sum::<usize>()
        + plan
            .plan
            .code
            .iter()
            .map(|c| c.old.iter().zip(&c.new).filter(|(x, y)| x != y).count())
            .sum::<usize>();
    assert_eq!(
        changed, planned,
        "{}: bytes changed against planned",
        k.package
    );
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, pvpatch_testkit::initramfs::initramfs()).unwrap();
    let mut q = Qemu::linux(&initrd);
    // Warnings are what a rewrite that Linux did not expect would cause. The out-of-line
    // kernel runs with page-table isolation forced on (TCG's CPU is not one Linux isolates by
    // itself), so that its entry code's detours run on the user page tables too; its note
    // that isolation is on is an info line.
    let pti = backend == "outofline";
    q.append = q.append.map(|a| {
        if pti {
            a.replace("loglevel=4", "loglevel=7 pti=on")
        } else {
            a.replace("loglevel=4", "loglevel=5")
        }
    });
    let boot = q.boot(&out).unwrap();
    if pti {
        assert!(
            boot.serial.contains("page tables isolation: force enabled"),
            "{}: page-table isolation is not on\nserial:\n{}",
            k.package,
            boot.serial
        );
    }
    assert!(
        boot.passed() && boot.serial.contains(pvpatch_testkit::initramfs::MARKER),
        "{} rewritten for {backend}: exit {:?}\nserial:\n{}",
        k.package,
        boot.exit_code,
        boot.serial
    );
    let warnings: Vec<&str> = boot
        .serial
        .lines()
        .filter(|l| l.contains("WARNING") || l.contains("BUG") || l.contains("Call Trace"))
        .collect();
    assert!(warnings.is_empty(), "{}: {warnings:?}", k.package);
    let by = plan.by_outcome();
    eprintln!(
        "{} rewritten for {backend} ({} detours, {changed} bytes changed; {} sites nothing, \
         {} detour) booted to its init in {:.2} s",
        k.package,
        plan.plan.detours.len(),
        by[patch_sites::Outcome::Nothing.index()],
        by[patch_sites::Outcome::Detour.index()],
        boot.elapsed.as_secs_f64()
    );
}

#[test]
fn rewritten_for_kvm_6_1_boots() {
    rewritten_kernel_boots(kernels::BOOKWORM, "kvm");
}

#[test]
fn rewritten_for_kvm_6_12_boots() {
    rewritten_kernel_boots(kernels::BACKPORTS, "kvm");
}

#[test]
fn rewritten_out_of_line_6_1_boots() {
    rewritten_kernel_boots(kernels::BOOKWORM, "outofline");
}

#[test]
fn rewritten_out_of_line_6_12_boots() {
    rewritten_kernel_boots(kernels::BACKPORTS, "outofline");
}

/// The tables a stripped vmlinux folds into `.rodata` without a section header, found through
/// the `__start_`/`__stop_` symbols of its own kallsyms, each with every entry System.map's
/// bounds give (the `-dbg` package's map, read here, not by the tool).
fn hidden_tables_are_found_without_symbols_files(spec: KernelSpec) {
    use pvpatch::linux::TableKind;
    let test = format!(
        "hidden_tables_are_found_without_symbols_files_{}",
        spec.name
    );
    let Some((k, img)) = loaded(&test, spec) else {
        return;
    };
    assert_eq!(img.symbol_source, pvpatch::load::SymbolSource::Kallsyms);
    let map = system_map(&k.system_map);
    let tables = pvpatch::linux::read(img);
    for (kind, start, stop, size) in [
        (
            TableKind::McountLoc,
            "__start_mcount_loc",
            "__stop_mcount_loc",
            8,
        ),
        (
            TableKind::JumpTable,
            "__start___jump_table",
            "__stop___jump_table",
            16,
        ),
        (
            TableKind::StaticCallSites,
            "__start_static_call_sites",
            "__stop_static_call_sites",
            8,
        ),
    ] {
        let r = tables.reports.iter().find(|r| r.kind == kind).unwrap();
        let expected = (map[stop] - map[start]) / size;
        assert_eq!(r.found_by, Some("symbols"), "{}: {kind:?}", k.package);
        assert_eq!(r.addr, map[start], "{}: {kind:?}", k.package);
        assert_eq!(
            (r.entries + r.padding) as u64,
            expected,
            "{}: {kind:?} entries",
            k.package
        );
        assert!(
            r.problem.is_none(),
            "{}: {kind:?}: {:?}",
            k.package,
            r.problem
        );
        eprintln!(
            "{}: {kind:?} found by its symbols at {:#x}: {} entries, as System.map's bounds say",
            k.package, r.addr, expected
        );
    }
}

#[test]
fn hidden_tables_are_found_without_symbols_files_6_1() {
    hidden_tables_are_found_without_symbols_files(kernels::BOOKWORM);
}

#[test]
fn hidden_tables_are_found_without_symbols_files_6_12() {
    hidden_tables_are_found_without_symbols_files(kernels::BACKPORTS);
}

/// The stripped stock sample: its symbols come from its kallsyms, its `__mcount_loc` from the
/// kallsyms symbols that bound it, its cave from the ORC table; its two small sites get detours
/// whose writes spare the protected `call __fentry__`, and a plan sends them out of line.
#[test]
fn a_stripped_stock_sample_is_read_and_planned_from_its_kallsyms() {
    use pvpatch::linux::TableKind;
    let img =
        pvpatch::load::Image::from_bytes("stock", pvpatch_testkit::elf::stock_sample()).unwrap();
    assert_eq!(img.symbol_source, pvpatch::load::SymbolSource::Kallsyms);
    let f = img.symbol_address("f").unwrap();
    let report = scan_image(&img, Default::default(), None);
    assert!(report.analysis.stock);
    let mcount = report
        .tables
        .reports
        .iter()
        .find(|r| r.kind == TableKind::McountLoc)
        .unwrap();
    assert_eq!((mcount.found_by, mcount.entries), (Some("symbols"), 1));
    assert_eq!(report.analysis.caves.len(), 1);
    let ops: Vec<&str> = report
        .analysis
        .sites
        .iter()
        .map(|s| s.found.op().name())
        .collect();
    assert_eq!(ops, ["rdtsc", "cli"]);
    assert!(
        report
            .analysis
            .sites
            .iter()
            .all(|s| s.reaches_out_of_line())
    );
    let plan = plan_image(&report, &BackendSpec::new("outofline", None).unwrap()).unwrap();
    assert_eq!(plan.plan.detours.len(), 2);
    for w in plan.plan.writes() {
        assert!(
            w.addr >= f + 5 || w.addr + w.new.len() as u64 <= f,
            "{:#x}",
            w.addr
        );
    }
}
