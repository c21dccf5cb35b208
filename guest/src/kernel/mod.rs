//! The kernel proper (only built for `x86_64-unknown-none`).
//!
//! At boot: descriptor tables, page tables (text read-only), the APIC timer; then the
//! nanobenchmarks of unpatched sites, a trap pass over the benchmark's sites (checked, then
//! reverted), the patching of every site for the detected backend, the benchmarks of patched
//! sites, the self-test of every op, and one JSON report. QEMU exits with 33 when every
//! self-test passed.

mod apic;
mod arch;
mod bench;
mod console;
mod fwcfg;
mod gdt;
mod heap;
mod idt;
mod paging;
mod patch;
mod pvops;
mod raw;
mod report;
mod ring3;
mod selftest;
mod xen;

use alloc::format;
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use patch_sites::Outcome;
use patch_sites::{pv_out, pv_site_table_header};
use pvpatch_runtime::backend::Choice;

use console::Console;
use report::{Centi, Json};
use selftest::Verdict;

// One block: xen.s uses boot.s's CONTEXT_CALL macro.
core::arch::global_asm!(
    concat!(include_str!("../boot.s"), include_str!("../xen.s")),
    options(att_syntax)
);
pv_site_table_header!();

/// QEMU's `isa-debug-exit` port: writing `v` makes QEMU exit with status `(v << 1) | 1`.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Written on success: QEMU exits with 33.
const EXIT_PASS: u32 = 0x10;
/// Written on failure: QEMU exits with 35.
const EXIT_FAIL: u32 = 0x11;

/// Leaves QEMU with `code`.
fn exit(code: u32) -> ! {
    if xen::active() {
        xen::prepare_exit();
    }
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit device; writing it ends the VM.
    unsafe { pv_out!(u32, dx DEBUG_EXIT_PORT, code) };
    loop {
        core::hint::spin_loop();
    }
}

/// Ends the run as a failure.
pub fn exit_fail() -> ! {
    exit(EXIT_FAIL)
}

/// Ends the run as a success.
pub fn exit_pass() -> ! {
    exit(EXIT_PASS)
}

struct Phase(UnsafeCell<&'static str>);
// SAFETY: one CPU; written between steps, read by the exception handler for its message.
unsafe impl Sync for Phase {}
static PHASE: Phase = Phase(UnsafeCell::new("boot"));

/// Names what the kernel is doing, for the messages of unexpected exceptions.
pub fn set_phase(p: &'static str) {
    // SAFETY: see `Phase`.
    unsafe { *PHASE.0.get() = p };
}

/// What the kernel is doing.
pub fn phase() -> &'static str {
    // SAFETY: see `Phase`.
    unsafe { *PHASE.0.get() }
}

unsafe extern "C" {
    static boot_tsc: u64;
}

/// The kernel command line from the PVH start info (`cmdline_paddr` at offset 24).
fn cmdline(start_info: u32) -> &'static str {
    if start_info == 0 {
        return "";
    }
    // SAFETY: QEMU's PVH loader passes the physical address of a valid hvm_start_info, and the
    // command line it names is a NUL-terminated string, in identity-mapped memory.
    unsafe {
        let magic = core::ptr::read_volatile(start_info as usize as *const u32);
        if magic != 0x336e_c578 {
            return "";
        }
        let p = core::ptr::read_volatile((start_info as usize + 24) as *const u64) as *const u8;
        if p.is_null() {
            return "";
        }
        let mut n = 0;
        while n < 4096 && *p.add(n) != 0 {
            n += 1;
        }
        core::str::from_utf8(core::slice::from_raw_parts(p, n)).unwrap_or("")
    }
}

#[unsafe(no_mangle)]
extern "C" fn kmain(start_info: u32) -> ! {
    let t_kmain = arch::rdtsc();
    let mut con = Console::new();
    gdt::init();
    idt::init();
    paging::init();
    apic::init();
    let cmdline = cmdline(start_info);
    let t_init = arch::rdtsc();
    let _ = writeln!(con, "pvguest: booted; command line {cmdline:?}");
    if cmdline.split(' ').any(|w| w == "pvguest.probe=xgetbv") {
        // The harness's probe: whether this machine can run `xgetbv` at CPL 0 at all (this
        // host's KVM stops the VM with an emulation failure instead).
        selftest::probe_xgetbv();
        let _ = writeln!(con, "pvguest: probe xgetbv: ok");
        exit(EXIT_PASS);
    }

    set_phase("detection and validation");
    let prepared = patch::prepare(cmdline);
    // Where every kernel instruction is emulated (this host's KVM), loops are kept short.
    let slow = prepared.detected.signature == *b"KVMKVMKVM\0\0\0";

    set_phase("benchmarks of unpatched sites");
    let mut bench = bench::Bench::unpatched(slow);

    set_phase("trap pass");
    let force = |_: u32, s: &patch_sites::table::Site| {
        bench::is_trappable_bench_site(s).then_some(Choice::Trap)
    };
    let trap_pass = patch::patch(
        &prepared,
        Some(&bench::is_trappable_bench_site),
        Some(&force),
    );
    let mut trap_check = None;
    if let Some(plan) = &trap_pass.plan {
        bench.trapped();
        trap_check = Some(bench::check_traps());
        patch::revert(plan);
    }

    set_phase("patching");
    let outcome = patch::patch(&prepared, None, None);
    match &outcome.refused {
        None => {
            let _ = writeln!(
                con,
                "pvguest: backend {}: {} sites, {} rewritten ({} bytes)",
                prepared.detected.kind,
                prepared.table.as_ref().map_or(0, |t| t.len()),
                outcome.stats.applied.sites,
                outcome.stats.applied.bytes
            );
        }
        Some(why) => {
            let _ = writeln!(con, "pvguest: patched nothing: {why}");
        }
    }

    set_phase("benchmarks of patched sites");
    bench.patched();
    let unemulated = cmdline.split(' ').any(|w| w == "pvguest.xgetbv=unemulated");
    let tests = selftest::run(unemulated);
    let traps_taken = idt::TRAPS.load(Ordering::Relaxed);

    // The boot, as a kernel would count it: from the PVH entry to ready (tables, detection and
    // validation, patching), without the benchmarks and the trap pass run in between.
    // SAFETY: written once by boot.s before kmain.
    let entry_to_init = t_init - unsafe { boot_tsc };
    let patch_cycles = outcome.stats.plan_cycles + outcome.stats.apply_cycles;
    let boot_cycles = entry_to_init + prepared.cycles + patch_cycles;
    let sites = prepared.table.as_ref().map_or(0, |t| t.len());
    let unknown = prepared.table.as_ref().map_or(0, |t| t.unknown_ops());
    let pass = tests.iter().all(|t| !matches!(t.verdict, Verdict::Fail(_)))
        && trap_check.is_none_or(|r| r.is_ok());
    let _ = t_kmain;

    let mut out = Console::new();
    let _ = out.write_str("PVPATCH-REPORT ");
    let r: core::fmt::Result = (|| {
        let mut j = Json::object(&mut out)?;
        j.str("report", "pvguest/1")?;
        j.str("cmdline", cmdline)?;
        let d = prepared.detected;
        j.obj("backend", |b| {
            b.str("name", d.kind.name())?;
            b.bool("hypervisor_bit", d.hypervisor_bit)?;
            b.str("signature", &report::printable(&d.signature))?;
            b.num("max_leaf", format!("{}", d.max_leaf))?;
            b.str("features", &format!("{:#x}", d.features))?;
            b.opt_num("vmware_version", d.vmware_version)?;
            b.opt_num("tsc_khz", d.tsc_khz)?;
            b.bool("overridden", d.overridden)?;
            b.opt_str(
                "note",
                prepared.backend.as_ref().ok().and_then(|b| b.note()),
            )
        })?;
        j.obj("table", |t| {
            t.str("source", prepared.source.name())?;
            t.num("sites", sites)?;
            t.num("unknown_ops", unknown)
        })?;
        match &prepared.rom {
            Some(rom) => j.obj("rom", |r| {
                r.opt_str("name", rom.name.as_deref())?;
                r.num("size", rom.size)?;
                r.num("entries", rom.entries)?;
                r.opt_str("refused", rom.refused.as_deref())
            })?,
            None => j.null("rom")?,
        }
        j.obj("patch", |p| {
            p.bool("applied", outcome.refused.is_none())?;
            p.opt_str("refused", outcome.refused.as_deref())?;
            report::outcomes(p, &outcome.stats)?;
            p.obj("by_form", |f| {
                for (form, counts) in pvpatch_runtime::stats::FORMS
                    .iter()
                    .zip(&outcome.stats.by_form)
                {
                    if counts.iter().any(|n| *n > 0) {
                        f.obj(form.name(), |o| {
                            for (k, n) in Outcome::ALL.iter().zip(counts) {
                                if *n > 0 {
                                    o.num(k.name(), n)?;
                                }
                            }
                            Ok(())
                        })?;
                    }
                }
                Ok(())
            })?;
            p.num("fallbacks", outcome.stats.fallbacks)?;
            p.num("sites_written", outcome.stats.applied.sites)?;
            p.num("bytes_written", outcome.stats.applied.bytes)?;
            p.num("plan_cycles", outcome.stats.plan_cycles)?;
            p.num("apply_cycles", outcome.stats.apply_cycles)?;
            p.num(
                "cycles_per_site",
                patch_cycles.checked_div(sites as u64).unwrap_or(0),
            )?;
            p.num("entry_to_init_cycles", entry_to_init)?;
            p.num("prepare_cycles", prepared.cycles)?;
            p.num("boot_cycles", boot_cycles)?;
            p.num(
                "share_of_boot_permille",
                (patch_cycles * 1000).checked_div(boot_cycles).unwrap_or(0),
            )
        })?;
        j.obj("traps", |t| {
            t.bool("pass_ran", trap_pass.plan.is_some())?;
            t.opt_str("pass_refused", trap_pass.refused.as_deref())?;
            t.num("bench_sites_trapped", trap_pass.stats.count(Outcome::Trap))?;
            match trap_check {
                Some(Ok(())) => t.str("emulation", "ok")?,
                Some(Err(e)) => t.str("emulation", e)?,
                None => t.null("emulation")?,
            }
            t.num("taken", traps_taken)
        })?;
        report::selftests(&mut j, &tests)?;
        j.obj("bench", |b| {
            b.num("iterations", bench.iterations)?;
            b.num("empty_loop_kernel", Centi(bench.empty().0))?;
            b.num("empty_loop_user", Centi(bench.empty().1))?;
            b.array("rows", bench.rows.iter(), |o, r| {
                o.str("op", r.name)?;
                o.str(
                    "ring",
                    if r.ring == bench::Ring::User {
                        "user"
                    } else {
                        "kernel"
                    },
                )?;
                o.opt_num("native", r.native.map(Centi))?;
                o.opt_num("native_again", r.native_again.map(Centi))?;
                o.opt_num("site_unpatched", r.site_unpatched.map(Centi))?;
                o.opt_num("call_unpatched", r.call_unpatched.map(Centi))?;
                o.opt_num("trapped", r.trapped.map(Centi))?;
                o.opt_num("site_patched", r.site_patched.map(Centi))?;
                o.opt_num("call_patched", r.call_patched.map(Centi))
            })
        })?;
        j.num("heap_bytes", heap::used())?;
        j.bool("x2apic", apic::is_x2apic())?;
        j.bool("pass", pass)?;
        j.end()
    })();
    if r.is_err() {
        let _ = out.write_str("(report truncated)");
    }
    let _ = out.write_str("\n");
    exit(if pass { EXIT_PASS } else { EXIT_FAIL })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(Console::new(), "pvguest: panic during {}: {info}", phase());
    exit_fail()
}
