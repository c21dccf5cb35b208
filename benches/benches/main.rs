//! Criterion benchmarks: `cargo bench -p pvpatch-benches`. The kernel benchmarks need the
//! Debian kernel that `cargo xtask kernel` caches; without it they say so and are left out.
//! After criterion's own output, a side-by-side report gives the ratios the README quotes.

// A benchmark whose input cannot be built has nothing to measure: failing loudly is right.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use patch_sites::table::{AddrRange, SiteTable, sealed_table_size, write_sealed_table};
use pvpatch_benches::{
    HostText, PEAK_RSS_PREFIX, backend, child_peak_rss, decode_only, median, objdump,
    own_peak_rss_kib, scan_file, sealed_table, synthetic_sites,
};

const TABLE_ADDR: u64 = 0xffff_ffff_8400_0000;
const TEXT: AddrRange = AddrRange::new(0xffff_ffff_8100_0000, 0xffff_ffff_8300_0000);
const CHILD: &str = "PVPATCH_BENCH_CHILD";

/// A Linux-scale table (10^4 sites, the order of a distro kernel's patch sites): validating it
/// is what the runtime does at boot before writing anything.
fn abi(c: &mut Criterion) {
    let sites = synthetic_sites(10_000);
    let mut buf = vec![0u8; sealed_table_size(sites.len())];
    write_sealed_table(&sites, TABLE_ADDR, &mut buf).expect("valid");
    let mut g = c.benchmark_group("abi");
    g.throughput(Throughput::Elements(sites.len() as u64));
    g.bench_function("parse_and_validate_10k_sites", |b| {
        b.iter(|| {
            let t = SiteTable::parse_contiguous(std::hint::black_box(&buf), TABLE_ADDR, &[TEXT]);
            t.map(|t| t.len()).unwrap_or(0)
        })
    });
    let mut out = vec![0u8; buf.len()];
    g.bench_function("write_10k_sites", |b| {
        b.iter(|| write_sealed_table(std::hint::black_box(&sites), TABLE_ADDR, &mut out))
    });
    g.finish();
}

/// Checked cases a second, as the README quotes it: 20,000 cases (80 passes over the mix).
fn oracle_side_by_side() {
    use pvpatch_oracle::oracle::{self as o, Oracle};
    use pvpatch_runtime::backend::Choice;
    use pvpatch_runtime::detect::BackendKind;
    let cases = oracle_cases();
    let mut oracle = Oracle::new().expect("unicorn");
    let native = o::backend(BackendKind::Native, 0, None);
    let start = std::time::Instant::now();
    let mut steps = 0;
    for _ in 0..80 {
        for (case, state) in &cases {
            let (_, v) = oracle
                .check(case, &native, None, Some(Choice::Trap), state)
                .expect("plans");
            steps += v.expect("equivalent").steps;
        }
    }
    let t = start.elapsed().as_secs_f64();
    let n = 80 * cases.len();
    println!("\nThe equivalence oracle, one reused engine ({n} trap rewrites of 12 ops):");
    println!(
        "  checked cases a second:                       {:>8.0}",
        n as f64 / t
    );
    println!(
        "  per case (two runs, {:.1} instructions):       {:>8.1} us",
        steps as f64 / n as f64,
        t * 1e6 / n as f64
    );
}

/// The equivalence oracle with one reused engine: a mix of sites (trap rewrites, which run the
/// runtime's emulator, and ROM templates), each case two runs and a comparison.
fn oracle_cases() -> Vec<(pvpatch_oracle::oracle::Case, pvpatch_oracle::oracle::State)> {
    use patch_sites::{Gpr, Op, Operand};
    use pvpatch_oracle::oracle::{Case, State, vcpu::mix};
    let sites = [
        (Op::Cli, Operand::None, 0),
        (Op::Sti, Operand::None, 0),
        (Op::SaveFl, Operand::Reg(Gpr::Rax), 8),
        (Op::RestoreFl, Operand::Reg(Gpr::Rdi), 8),
        (Op::Wrmsr, Operand::None, 0),
        (Op::Rdmsr, Operand::None, 0),
        (Op::MovToCr3, Operand::Reg(Gpr::Rbx), 8),
        (Op::Invlpg, Operand::MemBase(Gpr::Rsi), 0),
        (Op::Out, Operand::PortImm(0x71), 1),
        (Op::In, Operand::PortDx, 4),
        (Op::Cpuid, Operand::None, 0),
        (Op::Rdtsc, Operand::None, 0),
    ];
    let mut v = Vec::new();
    for i in 0..256u64 {
        let (op, operand, width) = sites[i as usize % sites.len()];
        let case = Case::native(op.id(), operand, width, 0, 3).expect("encodable");
        let gpr: [u64; 16] = std::array::from_fn(|k| mix(i * 64 + k as u64));
        let state = State::for_site(&case.site, gpr, mix(i ^ 0xf1a9), mix(i ^ 0x5eed));
        v.push((case, state));
    }
    v
}

fn oracle(c: &mut Criterion) {
    use pvpatch_oracle::oracle::{self as o, Oracle};
    use pvpatch_runtime::backend::Choice;
    use pvpatch_runtime::detect::BackendKind;
    let cases = oracle_cases();
    let mut oracle = Oracle::new().expect("unicorn");
    let native = o::backend(BackendKind::Native, 0, None);
    let mut g = c.benchmark_group("oracle");
    g.throughput(Throughput::Elements(cases.len() as u64));
    g.bench_function("check_256_trap_rewrites", |b| {
        b.iter(|| {
            for (case, state) in &cases {
                let (_, v) = oracle
                    .check(case, &native, None, Some(Choice::Trap), state)
                    .expect("plans");
                v.expect("equivalent");
            }
        })
    });
    g.finish();
}

fn kernel_path() -> Option<PathBuf> {
    match pvpatch_testkit::debian_kernel() {
        Ok(k) => Some(k.vmlinux),
        Err(why) => {
            println!("skipped: the kernel benchmarks: {why}");
            None
        }
    }
}

/// Scanning and annotating the whole Debian vmlinux, and objdump -d over it, side by side.
fn kernel(c: &mut Criterion, vmlinux: &Path) {
    let code: u64 = {
        let img = pvpatch::load::image::Image::open(vmlinux).unwrap();
        img.exec_sections().map(|s| s.size).sum()
    };
    let mut g = c.benchmark_group("kernel");
    g.throughput(Throughput::Bytes(code));
    g.sample_size(20);
    g.bench_function("pvpatch_scan_vmlinux", |b| {
        b.iter(|| scan_file(vmlinux).unwrap())
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("annotated");
    g.bench_function("pvpatch_annotate_vmlinux", |b| {
        b.iter(|| {
            let img = pvpatch::load::image::Image::open(vmlinux).unwrap();
            let r = pvpatch::scan_image(&img, Default::default(), None);
            pvpatch::annotate::annotate(&r, &out, &Default::default()).unwrap()
        })
    });
    // The stock-kernel stages on their own: kallsyms from `.rodata`, the analysis (protected
    // bytes, caves, detours) over the tables and sweep, and one backend's plan.
    let img = pvpatch::load::image::Image::open(vmlinux).unwrap();
    if let Some(r) = img.section(".rodata") {
        let rodata = img.section_data(r);
        g.bench_function("kallsyms_recover_vmlinux", |b| {
            b.iter(|| pvpatch::load::kallsyms::read(rodata, r.addr).unwrap())
        });
    }
    let tables = pvpatch::linux::read(&img);
    let mut known: Vec<u64> = tables.starts.iter().map(|s| s.0).collect();
    known.extend(img.symbols.iter().map(|s| s.addr));
    known.sort_unstable();
    known.dedup();
    let sweep = pvpatch::sweep::sweep(&img, &known, Default::default(), None);
    g.bench_function("analyse_vmlinux", |b| {
        b.iter(|| pvpatch::analyse::analyse(&img, &tables, &sweep))
    });
    let report = pvpatch::scan_image(&img, Default::default(), None);
    let spec = pvpatch::rewrite::BackendSpec::new("outofline", None).unwrap();
    g.bench_function("plan_outofline_vmlinux", |b| {
        b.iter(|| pvpatch::rewrite::plan_image(&report, &spec).unwrap())
    });
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(45));
    g.bench_function("objdump_d_vmlinux", |b| {
        b.iter(|| objdump(vmlinux).unwrap())
    });
    g.finish();
}

/// Ratios from the same run, and annotate's peak memory.
fn side_by_side(vmlinux: &Path) {
    let img = pvpatch::load::image::Image::open(vmlinux).unwrap();
    let size = img.bytes().len() as u64;
    let code: u64 = img.exec_sections().map(|s| s.size).sum();
    let scan = median(11, || {
        scan_file(vmlinux).unwrap();
    });
    let decode = median(5, || {
        decode_only(&img);
    });
    let obj = median(3, || objdump(vmlinux).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("annotated");
    let exe = std::env::current_exe().unwrap();
    let job = format!("annotate\t{}\t{}", vmlinux.display(), out.display());
    let (rss, wall) = child_peak_rss(&exe, &[], (CHILD, &job)).unwrap();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "\nside by side, same run ({} MB image, {} MB of code):",
        mb(size) as u64,
        mb(code) as u64
    );
    println!(
        "  pvpatch scan (load, tables, sweep, analysis): {:>8.3} s",
        scan.as_secs_f64()
    );
    println!(
        "  iced decode only, 1 thread (the limit):       {:>8.3} s",
        decode.as_secs_f64()
    );
    println!(
        "  objdump -d --no-show-raw-insn:               {:>8.3} s",
        obj.as_secs_f64()
    );
    println!(
        "  objdump / pvpatch scan:                       {:>8.1}x",
        obj.as_secs_f64() / scan.as_secs_f64()
    );
    println!(
        "  pvpatch scan / decode-only limit:             {:>8.2}x",
        scan.as_secs_f64() / decode.as_secs_f64()
    );
    println!(
        "  pvpatch annotate (own process): {:.3} s wall, peak RSS {:.0} MB = {:.2}x the image",
        wall.as_secs_f64(),
        mb(rss),
        rss as f64 / size as f64
    );
}

/// The boot shim on the Debian kernel under QEMU TCG, side by side with the kernel without it:
/// five boots of each, alternating, to the init's marker; the best wall time of each, and the
/// shim's own time as it reports it (`pvpatch.verbose`), per backend.
fn shim_side_by_side(vmlinux: &Path) {
    use pvpatch_testkit::{Qemu, initramfs};
    if let Err(why) = pvpatch_testkit::qemu_available() {
        println!("skipped: the shim's boots: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let shim = pvpatch_testkit::shim::build_shim().unwrap();
    let shimmed = dir.path().join("vmlinux.shim");
    pvpatch_testkit::shim::shimmed(vmlinux, &shim, &shimmed).unwrap();
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initramfs::initramfs()).unwrap();
    let shim_bytes = pvpatch::shim::Shim::load(&shim).unwrap();
    let lean = pvpatch_testkit::shim::build_lean_shim().unwrap();
    let lean_bytes = pvpatch::shim::Shim::load(&lean).unwrap();
    println!(
        "\nThe boot shim ({} bytes of code and data, {} in memory with its .bss; the lean one, \
         which plans nothing at boot, {} and {}), QEMU TCG microvm, best of 5 boots to init, \
         alternating:",
        shim_bytes.bytes.len(),
        shim_bytes.memsz,
        lean_bytes.bytes.len(),
        lean_bytes.memsz
    );
    // The backends' plans prepared at link time, and the out-of-line one made at boot (the
    // whole boot-time pass) for comparison; last, `pvpatch=off`: the entry to long mode, the
    // command line read and the way back to Linux, which every run pays before it detects
    // anything (its cycles a site are counted against the table's sites, from the rows above).
    let img = pvpatch::load::Image::open(&shimmed).unwrap();
    let shim_phys = pvpatch::shim::existing(&img).unwrap().shim_phys;
    let mut sites = 0u64;
    for (backend, extra) in [
        ("tcg", ""),
        ("outofline", ""),
        ("outofline", " pvpatch.plan=boot"),
        ("tcg", " pvpatch=off"),
    ] {
        let mut q = Qemu::linux(&initrd);
        q.append = q
            .append
            .map(|a| format!("{a} pvpatch.verbose pvpatch.backend={backend}{extra}"));
        let plain = Qemu::linux(&initrd);
        let (mut best_plain, mut best_shim) = (f64::MAX, f64::MAX);
        let mut shim_us = Vec::new();
        for _ in 0..5 {
            let a = plain.boot(vmlinux).unwrap();
            assert!(a.passed(), "the kernel without the shim did not boot");
            best_plain = best_plain.min(a.elapsed.as_secs_f64());
            let b = q.boot(&shimmed).unwrap();
            assert!(b.passed(), "the shimmed kernel did not boot:\n{}", b.serial);
            best_shim = best_shim.min(b.elapsed.as_secs_f64());
            let line = b
                .serial
                .lines()
                .find(|l| l.starts_with("pvpatch: backend") || l.starts_with("pvpatch: off"))
                .unwrap_or_default()
                .to_owned();
            if let Some(us) = line
                .rsplit(", ")
                .next()
                .and_then(|t| t.strip_suffix(" us"))
                .and_then(|t| t.parse::<f64>().ok())
            {
                shim_us.push(us);
            }
            if let Some(n) = line
                .split(": ")
                .nth(2)
                .and_then(|t| t.split(" sites").next())
                .and_then(|t| t.replace(',', "").parse::<u64>().ok())
            {
                sites = n;
            }
            if shim_us.len() == 1 {
                println!("  {backend}{extra}: {line}");
            }
        }
        assert!(
            !shim_us.is_empty(),
            "{backend}{extra}: the shim printed no time of its own"
        );
        // What the run costs in translation, counted (the same in every boot): one more boot,
        // without `pvpatch.verbose` (its line is not part of an ordinary boot), QEMU logging the
        // blocks it translates at the shim's addresses.
        let log = dir
            .path()
            .join(format!("in_asm-{backend}{}.log", extra.replace(' ', "_")));
        let mut counted = Qemu::linux(&initrd);
        counted.append = counted
            .append
            .map(|a| format!("{a} pvpatch.backend={backend}{extra}"));
        counted.extra.extend(pvpatch_testkit::shim::in_asm_args(
            &log,
            shim_phys,
            shim_bytes.vaddr,
            shim_bytes.memsz,
        ));
        let c = counted.boot(&shimmed).unwrap();
        assert!(c.passed(), "the shimmed kernel did not boot:\n{}", c.serial);
        let t = pvpatch_testkit::shim::count_translated(&std::fs::read_to_string(&log).unwrap());
        assert!(t.blocks > 0, "QEMU logged no block of the shim's");
        shim_us.sort_by(f64::total_cmp);
        // The measure: best of 5 of each, the shim's own work against the unshimmed
        // kernel's boot to init; the median of the shim's 5 beside it, for the spread (under
        // TCG on this host a run is now and then half again as long).
        let best = shim_us.first().copied().unwrap_or(0.0);
        let median = shim_us.get(shim_us.len() / 2).copied().unwrap_or(0.0);
        let cycles = best * pvpatch_testkit::qemu::host_tsc_khz() as f64 / 1000.0;
        println!(
            "  {backend}{extra}: boot to init {best_shim:.3} s with the shim, {best_plain:.3} s \
             without ({:+.3} s); the shim's own work {:.2} ms best of {} = {:.3}% of the \
             unshimmed boot, {:.0} TSC cycles a site (median {:.2} ms = {:.3}%); {} blocks \
             translated ({} instructions) from its entry to the hand-over",
            best_shim - best_plain,
            best / 1000.0,
            shim_us.len(),
            best / 1e6 / best_plain * 100.0,
            cycles / sites.max(1) as f64,
            median / 1000.0,
            median / 1e6 / best_plain * 100.0,
            t.blocks,
            t.instructions,
        );
    }
}

/// The child of `side_by_side` and `hostile_shapes`: one annotation, or one scan with its
/// JSON ledger written out, nothing else, so its peak RSS is that command's.
fn child(job: &str) {
    let parts: Vec<&str> = job.split('\t').collect();
    if let ["scan-json", input] = parts[..] {
        let img = pvpatch::load::image::Image::open(Path::new(input)).unwrap();
        // As `pvpatch scan --json`: no site kept, the ledger written as each is analysed.
        let r = pvpatch::scan_image_streamed(&img, Default::default(), None).unwrap();
        let ledger = pvpatch::ledger::Ledger::new(&r);
        serde_json::to_writer_pretty(std::io::sink(), &ledger).unwrap();
        println!(
            "{PEAK_RSS_PREFIX}{}",
            own_peak_rss_kib().expect("/proc/self/status has VmHWM")
        );
        return;
    }
    let [_, input, output] = parts[..] else {
        panic!("bad job {job}")
    };
    let img = pvpatch::load::image::Image::open(Path::new(input)).unwrap();
    let r = pvpatch::scan_image(&img, Default::default(), None);
    pvpatch::annotate::annotate(&r, Path::new(output), &Default::default()).unwrap();
    println!(
        "{PEAK_RSS_PREFIX}{}",
        own_peak_rss_kib().expect("/proc/self/status has VmHWM")
    );
}

/// An annotated kernel's table, planned for `kind` on the host: what the boot-time runtime
/// does before writing a byte, and then writing and undoing it.
fn runtime_group(c: &mut Criterion, name: &str, annotated: &Path) {
    use pvpatch_runtime::detect::BackendKind;
    let img = pvpatch::load::image::Image::open(annotated).unwrap();
    let (tb, addr) = sealed_table(&img).expect("annotated");
    let code = img.code_ranges();
    let table = SiteTable::parse_contiguous(&tb, addr, &code).unwrap();
    let mut text = HostText::of(&img);
    let b = backend(BackendKind::Kvm);
    let mut g = c.benchmark_group("runtime");
    g.throughput(Throughput::Elements(table.len() as u64));
    g.bench_function(format!("parse_and_plan_{name}"), |bch| {
        bch.iter(|| {
            let t = SiteTable::parse_contiguous(std::hint::black_box(&tb), addr, &code).unwrap();
            pvpatch_runtime::plan::plan(&t, &b, &text, None).unwrap()
        })
    });
    let p = pvpatch_runtime::plan::plan(&table, &b, &text, None).unwrap();
    g.bench_function(format!("apply_and_revert_{name}"), |bch| {
        bch.iter(|| {
            pvpatch_runtime::apply::apply(&p, &mut text).unwrap();
            pvpatch_runtime::apply::revert(&p, &mut text);
        })
    });
    g.finish();
}

/// Cycles per site of planning (parse, validate, plan) and applying, on the host, for the
/// side-by-side report.
fn runtime_side_by_side(name: &str, annotated: &Path) {
    use pvpatch_runtime::detect::BackendKind;
    let img = pvpatch::load::image::Image::open(annotated).unwrap();
    let (tb, addr) = sealed_table(&img).expect("annotated");
    let code = img.code_ranges();
    let mut text = HostText::of(&img);
    let b = backend(BackendKind::Kvm);
    let n = SiteTable::parse_contiguous(&tb, addr, &code).unwrap().len() as f64;
    let tsc = |f: &mut dyn FnMut()| {
        let mut v: Vec<u64> = (0..101)
            .map(|_| {
                let t0 = rdtsc();
                f();
                rdtsc() - t0
            })
            .collect();
        v.sort();
        v[v.len() / 2] as f64
    };
    let mut plan_once = || {
        let t = SiteTable::parse_contiguous(&tb, addr, &code).unwrap();
        std::hint::black_box(pvpatch_runtime::plan::plan(&t, &b, &text, None).unwrap());
    };
    let planning = tsc(&mut plan_once);
    let t = SiteTable::parse_contiguous(&tb, addr, &code).unwrap();
    let p = pvpatch_runtime::plan::plan(&t, &b, &text, None).unwrap();
    let written = p.changes().count();
    let applying = tsc(&mut || {
        pvpatch_runtime::apply::apply(&p, &mut text).unwrap();
        pvpatch_runtime::apply::revert(&p, &mut text);
    });
    println!(
        "  runtime, {name}: {} sites ({written} rewritten for kvm): parse+validate+plan {:.0} TSC \
         cycles/site, apply+revert {:.0} cycles/site rewritten",
        n as u64,
        planning / n,
        applying / written.max(1) as f64
    );
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The Debian kernel annotated into `dir`.
fn annotated_kernel(vmlinux: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("vmlinux.annotated");
    let img = pvpatch::load::image::Image::open(vmlinux).unwrap();
    let r = pvpatch::scan_image(&img, Default::default(), None);
    pvpatch::annotate::annotate(&r, &out, &Default::default()).unwrap();
    out
}

/// Shapes an outside test found costly (issue 14): many executable sections, and code that is
/// all sites. Each scanned with its JSON ledger in a child of its own: wall time and the
/// child's peak RSS against the input's size.
fn hostile_shapes() {
    use pvpatch_testkit::elf;
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!("\nhostile shapes (scan and its --json ledger, one child each):");
    let shapes: [(&str, Vec<u8>); 5] = [
        (
            "20,000 two-byte executable sections (cli; sti)",
            elf::many_exec_sections(&[0xc3], 20_000, &[0xfa, 0xfb]),
        ),
        (
            "1 MB of cli; sti",
            elf::build(&[0xfa, 0xfb].repeat(1 << 19), &[], &[]),
        ),
        (
            "4 MB of cli; sti",
            elf::build(&[0xfa, 0xfb].repeat(2 << 20), &[], &[]),
        ),
        (
            "16 MB of cli; sti",
            elf::build(&[0xfa, 0xfb].repeat(8 << 20), &[], &[]),
        ),
        (
            "16 MB of an undecodable byte and a nop (a resynchronisation every 2 bytes)",
            elf::build(&[0x06, 0x90].repeat(8 << 20), &[], &[]),
        ),
    ];
    for (name, bytes) in shapes {
        let path = dir.path().join("shape.elf");
        std::fs::write(&path, &bytes).unwrap();
        let job = format!("scan-json\t{}", path.display());
        let (rss, wall) = child_peak_rss(&exe, &[], (CHILD, &job)).unwrap();
        println!(
            "  {name}: {:.3} s, peak RSS {:.1} MB for a {:.1} MB image ({:.1}x)",
            wall.as_secs_f64(),
            mb(rss),
            mb(bytes.len() as u64),
            rss as f64 / bytes.len() as f64
        );
    }
}

fn main() {
    if let Ok(job) = std::env::var(CHILD) {
        return child(&job);
    }
    if std::env::args().any(|a| a == "hostile") {
        // `cargo bench -p pvpatch-benches -- hostile`: only these.
        return hostile_shapes();
    }
    if std::env::args().any(|a| a == "shim") {
        // `cargo bench -p pvpatch-benches -- shim`: only the shim's boots.
        if let Some(v) = kernel_path() {
            shim_side_by_side(&v);
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    abi(&mut c);
    oracle(&mut c);
    let guest = pvpatch_testkit::build_guest().expect("the guest builds");
    runtime_group(&mut c, "guest", &guest);
    let vmlinux = kernel_path();
    let dir = tempfile::tempdir().unwrap();
    let annotated = vmlinux.as_deref().map(|v| annotated_kernel(v, dir.path()));
    if let (Some(v), Some(a)) = (&vmlinux, &annotated) {
        kernel(&mut c, v);
        runtime_group(&mut c, "debian_kernel", a);
    }
    c.final_summary();
    if let Some(v) = &vmlinux {
        side_by_side(v);
        shim_side_by_side(v);
    }
    oracle_side_by_side();
    hostile_shapes();
    runtime_side_by_side("the guest", &guest);
    if let Some(a) = &annotated {
        runtime_side_by_side("the Debian kernel", a);
    }
}
