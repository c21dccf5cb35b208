//! The guest as a 64-bit Xen PV kernel (entered at `_start_xen`, xen.s): the same kernel, its
//! own site table, run in ring 3 under Debian's Xen. It installs a trap table and event
//! callbacks, maps `shared_info`, binds the one-shot timer to an event channel, detects Xen,
//! generates the Xen backend's entry points for its real `vcpu_info` and hypercall page,
//! patches every site (refusing a table with a site Xen cannot run natively and that cannot
//! take its call), then runs the self-tests by effect through the PV paths, the
//! nanobenchmarks (trapped by Xen against patched), the model cases the host passed as a
//! module, and reports on Xen's console. It exits through `isa-debug-exit` once
//! `PHYSDEVOP_set_iopl` lets Xen emulate the port write.

mod bench;
mod cases;
pub mod hv;
mod paging;
mod selftest;

use alloc::format;
use alloc::string::String;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use pvpatch_runtime::apply::{self, TextPoke};
use pvpatch_runtime::backend::Backend;
use pvpatch_runtime::detect::{self, Platform};
use pvpatch_runtime::plan::{self, TextRead};
use pvpatch_runtime::pv::{self, PvCode, XenLayout};
use pvpatch_runtime::stats::Stats;

use super::console::Console;
use super::idt::IsrContext;
use super::report::{Centi, Json};
use super::selftest::Verdict;
use super::{arch, patch, set_phase};

static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether the kernel runs as a Xen PV guest (the console and the exit then go through Xen).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Upcalls taken (each one an event callback).
pub static UPCALLS: AtomicU64 = AtomicU64::new(0);
/// Timer events seen.
pub static TIMER_EVENTS: AtomicU64 = AtomicU64::new(0);
/// Instructions the #GP handler emulated.
pub static EMULATED: AtomicU64 = AtomicU64::new(0);
/// The timer's event-channel port.
static TIMER_PORT: AtomicU32 = AtomicU32::new(u32::MAX);

/// RFLAGS.IF.
pub const IF: u64 = 1 << 9;

unsafe extern "C" {
    fn xen_event_entry();
    fn xen_failsafe_entry();
    fn xen_trap_0();
    fn xen_trap_1();
    fn xen_trap_2();
    fn xen_trap_3();
    fn xen_trap_4();
    fn xen_trap_5();
    fn xen_trap_6();
    fn xen_trap_7();
    fn xen_trap_8();
    fn xen_trap_10();
    fn xen_trap_11();
    fn xen_trap_12();
    fn xen_trap_13();
    fn xen_trap_14();
    fn xen_trap_16();
    fn xen_trap_17();
    fn xen_trap_18();
    fn xen_trap_19();
}

fn install_traps() -> Result<(), String> {
    let handlers: [(u8, unsafe extern "C" fn()); 18] = [
        (0, xen_trap_0),
        (1, xen_trap_1),
        (2, xen_trap_2),
        (3, xen_trap_3),
        (4, xen_trap_4),
        (5, xen_trap_5),
        (6, xen_trap_6),
        (7, xen_trap_7),
        (8, xen_trap_8),
        (10, xen_trap_10),
        (11, xen_trap_11),
        (12, xen_trap_12),
        (13, xen_trap_13),
        (14, xen_trap_14),
        (16, xen_trap_16),
        (17, xen_trap_17),
        (18, xen_trap_18),
        (19, xen_trap_19),
    ];
    let mut table = [hv::TrapInfo {
        vector: 0,
        flags: 0,
        cs: 0,
        address: 0,
    }; 19];
    for (t, (v, h)) in table.iter_mut().zip(handlers) {
        *t = hv::TrapInfo {
            vector: v,
            // `int3` may be used by the kernel itself (DPL 3 from Xen's view of ring 3).
            flags: if v == 3 { 3 } else { 0 },
            cs: hv::KERNEL_CS,
            address: h as *const () as u64,
        };
    }
    let rc = hv::set_trap_table(&table);
    if rc != 0 {
        return Err(format!("set_trap_table: {rc}"));
    }
    for (kind, h, name) in [
        (
            hv::CALLBACKTYPE_EVENT,
            xen_event_entry as *const () as usize,
            "event",
        ),
        (
            hv::CALLBACKTYPE_FAILSAFE,
            xen_failsafe_entry as *const () as usize,
            "failsafe",
        ),
    ] {
        let rc = hv::register_callback(kind, h as u64);
        if rc != 0 {
            return Err(format!("callback_op(register {name}): {rc}"));
        }
    }
    Ok(())
}

/// The length of the instruction a running probe may fault on (0: no probe running), and the
/// vector it faulted with (0: none).
static PROBE_LEN: AtomicU64 = AtomicU64::new(0);
static PROBE_VECTOR: AtomicU64 = AtomicU64::new(0);

/// Runs `f`, whose one privileged instruction is `len` bytes long: if it raises #GP or #UD, the
/// handler skips it. Returns the vector it raised, if it did.
pub fn probe(len: u64, f: impl FnOnce()) -> Option<u64> {
    PROBE_VECTOR.store(0, Ordering::SeqCst);
    PROBE_LEN.store(len, Ordering::SeqCst);
    f();
    PROBE_LEN.store(0, Ordering::SeqCst);
    match PROBE_VECTOR.load(Ordering::SeqCst) {
        0 => None,
        v => Some(v),
    }
}

/// Emulates, for a #GP, the instructions Xen bounces to a PV kernel that the benchmarks run
/// natively: `cli` and `sti` (the frame's IF, which HYPERVISOR_iret turns into the event
/// mask), `sti; hlt` and `hlt` (`SCHEDOP_block`), `invlpg [reg]` (`MMUEXT_INVLPG_LOCAL`).
/// Anything else is unexpected.
fn emulate_gp(ctx: &mut IsrContext) -> bool {
    // SAFETY: rip is in the kernel's text (a #GP from ring 3 of this kernel); 4 bytes of it are
    // mapped (the text ends well after any instruction).
    let b = unsafe { core::ptr::read_volatile(ctx.rip as *const [u8; 4]) };
    let (rex, rest) = match b[0] {
        0x40..=0x4f => (b[0], &b[1..]),
        _ => (0, &b[..]),
    };
    let len = match rest {
        [0xfa, ..] => {
            ctx.rflags &= !IF;
            1
        }
        [0xfb, 0xf4, ..] => {
            hv::block();
            ctx.rflags |= IF;
            2
        }
        [0xfb, ..] => {
            ctx.rflags |= IF;
            1
        }
        [0xf4, ..] => {
            hv::block();
            ctx.rflags |= IF;
            1
        }
        [0x0f, 0x01, modrm, ..]
            if modrm >> 6 == 0 && (modrm >> 3) & 7 == 7 && !matches!(modrm & 7, 4 | 5) =>
        {
            let reg = (modrm & 7) as usize + if rex & 1 != 0 { 8 } else { 0 };
            hv::mmuext(hv::MMUEXT_INVLPG_LOCAL, ctx.gpr[reg]);
            3 + usize::from(rex != 0)
        }
        _ => return false,
    };
    EMULATED.fetch_add(1, Ordering::Relaxed);
    ctx.rip += len as u64;
    true
}

#[unsafe(no_mangle)]
extern "C" fn xen_dispatch(ctx: &mut IsrContext) {
    let vector = ctx.vector;
    match vector {
        256 => {
            UPCALLS.fetch_add(1, Ordering::Relaxed);
            let ports = hv::take_events();
            let timer = TIMER_PORT.load(Ordering::Relaxed);
            if timer < 64 && ports & (1 << timer) != 0 {
                TIMER_EVENTS.fetch_add(1, Ordering::Relaxed);
            }
        }
        6 | 13 if PROBE_LEN.load(Ordering::SeqCst) != 0 => {
            PROBE_VECTOR.store(vector, Ordering::SeqCst);
            ctx.rip += PROBE_LEN.swap(0, Ordering::SeqCst);
        }
        13 if ctx.error == 0 && emulate_gp(ctx) => {}
        v => {
            let _ = writeln!(
                Console::new(),
                "pvguest: unexpected exception {v} (error {:#x}) at rip {:#x}, cs {:#x}, rsp {:#x} \
                 during {} (Xen PV)",
                ctx.error,
                ctx.rip,
                ctx.cs & 0xffff,
                ctx.rsp,
                super::phase()
            );
            super::exit_fail();
        }
    }
}

#[unsafe(no_mangle)]
extern "C" fn xen_failsafe() -> ! {
    let _ = writeln!(
        Console::new(),
        "pvguest: Xen's failsafe callback (a segment could not be loaded) during {}",
        super::phase()
    );
    super::exit_fail()
}

/// The machine, as detection sees it from a PV kernel: Xen's forced-emulation `cpuid`
/// (`ud2; .ascii "xen"; cpuid`), which Xen answers with its own leaves; no port is probed.
struct XenPlatform<'a> {
    cmdline: &'a str,
}

/// `cpuid` as Xen emulates it for a PV kernel.
pub fn xen_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u64, u32, u32);
    // SAFETY: Xen's #UD handling recognises the prefix and emulates the cpuid after it (a PV
    // kernel's documented way to see Xen's CPUID policy); rbx is saved around it.
    unsafe {
        core::arch::asm!("mov {t}, rbx", "ud2", ".ascii \"xen\"", "cpuid", "xchg {t}, rbx",
            t = out(reg) b, inout("eax") leaf => a, inout("ecx") sub => c, out("edx") d,
            options(nostack, nomem));
    }
    [a, b as u32, c, d]
}

impl Platform for XenPlatform<'_> {
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        xen_cpuid(leaf, sub)
    }
    fn vmware_backdoor(&self, _cmd: u32) -> [u32; 4] {
        [u32::MAX; 4]
    }
    fn cmdline(&self) -> Option<&str> {
        Some(self.cmdline)
    }
    fn xen_pv_entry(&self) -> bool {
        true
    }
}

/// Writes the kernel's text directly (Xen maps a PV kernel's image writable), with events
/// masked for the batch; serializes with an `iretq` to self (allowed in ring 3).
#[derive(Default)]
pub struct XenPoke {
    saved: Option<u8>,
}

impl TextRead for XenPoke {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        patch::GuestPoke::default().read(addr, out)
    }
}

impl TextPoke for XenPoke {
    fn open(&mut self) {
        self.saved = Some(hv::mask());
        hv::set_mask(1);
    }
    fn close(&mut self) {
        if let Some(m) = self.saved.take() {
            hv::set_mask(m);
            if m == 0 && hv::pending() != 0 {
                hv::force_events();
            }
        }
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let len = bytes.len() as u64;
        let inside =
            patch::text().contains_span(addr, len) || patch::rom_area().contains_span(addr, len);
        if self.saved.is_none() || !inside {
            return;
        }
        // SAFETY: the range lies in the kernel's text or its backend area (checked), which Xen
        // maps writable for a PV kernel; events are masked and nothing that runs before
        // `close` executes the bytes being written.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
    fn sync(&mut self) {
        arch::serialize();
    }
}

/// Generates the Xen backend's entry points for this kernel's `vcpu_info` and hypercall page
/// into the backend area of its text.
fn entry_points() -> Result<&'static PvCode, String> {
    let area = patch::rom_area();
    let code = pv::xen(
        XenLayout {
            vcpu_info: hv::vcpu_info(),
            hypercall_page: hv::hypercall_page(),
        },
        area.start,
    )
    .map_err(|e| format!("generating the entry points: {e:?}"))?;
    if code.code.len() as u64 > area.end - area.start {
        return Err("the entry points do not fit the backend area".into());
    }
    let mut p = XenPoke::default();
    p.open();
    p.write(area.start, &code.code);
    p.close();
    p.sync();
    let mut back = alloc::vec![0u8; code.code.len()];
    if !p.read(area.start, &mut back) || back != code.code {
        return Err("the entry points did not read back as written".into());
    }
    // Kept for the kernel's life: patched sites call into it.
    Ok(alloc::boxed::Box::leak(alloc::boxed::Box::new(code)))
}

/// What patching did.
struct Patched {
    /// Cycles of the first, cold plan.
    plan_first_cycles: u64,
    refused: Option<String>,
    stats: Stats,
    sites: usize,
}

fn patch_all(prepared: &patch::Prepared, code: &'static PvCode) -> Patched {
    let mut out = Patched {
        plan_first_cycles: 0,
        refused: None,
        stats: Stats::default(),
        sites: prepared.table.as_ref().map_or(0, |t| t.len()),
    };
    let table = match &prepared.table {
        Ok(t) => t,
        Err(e) => {
            out.refused = Some(e.clone());
            return out;
        }
    };
    let backend = Backend {
        detected: prepared.detected,
        rom: None,
        pv: Some(code),
        thunks: None,
    };
    // The first plan is what a boot pays: TCG translates the planner's code as it first runs
    // (a PVH boot of the guest has run it once already, in its trap pass); it is the one
    // applied. The same plan again, timed and dropped, shows what planning itself costs.
    let t0 = arch::rdtsc();
    let planned = match plan::plan(table, &backend, &XenPoke::default(), None) {
        Ok(p) => p,
        Err(e) => {
            out.refused = Some(format!("{e}"));
            return out;
        }
    };
    let t_first = arch::rdtsc();
    out.plan_first_cycles = t_first - t0;
    drop(plan::plan(table, &backend, &XenPoke::default(), None));
    let t1 = arch::rdtsc();
    let applied = apply::apply(&planned, &mut XenPoke::default());
    let t2 = arch::rdtsc();
    out.stats = Stats::of(&planned);
    // The warm plan's cost; the cold one's is `plan_first_cycles`.
    out.stats.plan_cycles = t1 - t_first;
    out.stats.apply_cycles = t2 - t1;
    match applied {
        Ok(a) => out.stats.applied = a,
        Err(e) => out.refused = Some(format!("{e}")),
    }
    out
}

/// Ends the run: Xen emulates the `isa-debug-exit` write once the virtual IOPL allows it.
pub fn prepare_exit() {
    hv::set_iopl(3);
}

#[unsafe(no_mangle)]
extern "C" fn xen_main(start_info: *const u8) -> ! {
    let t_entry = arch::rdtsc();
    let si = hv::StartInfo(start_info);
    if !si.valid() {
        // No console yet: nothing to say it with but the exit.
        super::exit_fail();
    }
    if let Err(rc) = hv::map_shared_info(&si) {
        // The console works without shared_info.
        ACTIVE.store(true, Ordering::Relaxed);
        let _ = writeln!(Console::new(), "pvguest: mapping shared_info failed: {rc}");
        super::exit_fail();
    }
    ACTIVE.store(true, Ordering::Relaxed);
    let mut con = Console::new();
    if let Err(e) = install_traps() {
        let _ = writeln!(con, "pvguest: {e}");
        super::exit_fail();
    }
    match hv::timer_channel() {
        Ok(port) => TIMER_PORT.store(port, Ordering::Relaxed),
        Err(rc) => {
            let _ = writeln!(con, "pvguest: binding VIRQ_TIMER failed: {rc}");
            super::exit_fail();
        }
    }
    // Events on from here, as a kernel's would be once its handlers are in place.
    hv::set_mask(0);
    if hv::pending() != 0 {
        hv::force_events();
    }
    let cmdline = si.cmdline();
    let t_init = arch::rdtsc();
    let _ = writeln!(
        con,
        "pvguest: booted as a Xen PV kernel ({} pages); command line {cmdline:?}",
        si.nr_pages()
    );

    set_phase("detection and validation");
    let t0 = arch::rdtsc();
    let detected = detect::detect(&XenPlatform { cmdline });
    let (source, table) = patch::locate();
    let prepared = patch::Prepared {
        detected,
        source,
        table: table.map_err(|e| format!("site table invalid: {e}")),
        rom: None,
        backend: Err(String::new()),
        cycles: arch::rdtsc() - t0,
    };

    set_phase("benchmarks of unpatched sites");
    let mut marks = bench::XenBench::unpatched();

    set_phase("generating the entry points");
    let t_code = arch::rdtsc();
    let code = entry_points();
    let entry_cycles = arch::rdtsc() - t_code;
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(con, "pvguest: {e}");
            super::exit_fail();
        }
    };
    set_phase("patching");
    let text_crc = || {
        let t = patch::text();
        // SAFETY: the kernel's text is mapped and readable.
        patch_sites::crc32::crc32(unsafe {
            core::slice::from_raw_parts(t.start as *const u8, (t.end - t.start) as usize)
        })
    };
    let crc_before = text_crc();
    let patched = patch_all(&prepared, code);
    match &patched.refused {
        None => {
            let _ = writeln!(
                con,
                "pvguest: backend {}: {} sites, {} rewritten ({} bytes)",
                prepared.detected.kind,
                patched.sites,
                patched.stats.applied.sites,
                patched.stats.applied.bytes
            );
        }
        Some(why) => {
            // A PV kernel cannot run a table Xen cannot take: it stops here, nothing written.
            let _ = writeln!(con, "pvguest: patched nothing: {why}");
            let crc = text_crc();
            if crc == crc_before {
                let _ = writeln!(con, "pvguest: text unchanged (crc32 {crc:#010x})");
            } else {
                let _ = writeln!(
                    con,
                    "pvguest: text CHANGED ({crc_before:#010x} -> {crc:#010x})"
                );
            }
            let _ = writeln!(
                con,
                "pvguest: refusing to run on Xen with sites it cannot take"
            );
            super::exit_fail();
        }
    }

    set_phase("benchmarks of patched sites");
    marks.patched();
    set_phase("self-tests");
    let tests = selftest::run(&si);
    set_phase("model cases");
    let model = cases::run(&si, code);

    set_phase("probes");
    let insns = selftest::instruction_probes();
    let msrs = selftest::msr_probes();
    // Last: the virtual IOPL it sets lets Xen emulate port I/O (and makes cli/sti no-ops).
    let ports = selftest::port_probes();

    let pass = tests.iter().all(|t| !matches!(t.verdict, Verdict::Fail(_)));
    let patch_cycles = patched.stats.plan_cycles + patched.stats.apply_cycles;
    // The boot as a kernel would count it: entry to handlers in place, detection and
    // validation, generating the entry points, patching (not the benchmarks in between).
    let boot_cycles = (t_init - t_entry)
        + prepared.cycles
        + entry_cycles
        + patched.plan_first_cycles
        + patched.stats.apply_cycles;
    let boot_patch_cycles = patched.plan_first_cycles + patched.stats.apply_cycles;
    let mut out = Console::new();
    let _ = out.write_str("PVPATCH-REPORT ");
    let r: core::fmt::Result = (|| {
        let mut j = Json::object(&mut out)?;
        j.str("report", "pvguest/1")?;
        j.str("entry", "xen-pv")?;
        j.str("cmdline", cmdline)?;
        let d = prepared.detected;
        j.obj("backend", |b| {
            b.str("name", d.kind.name())?;
            b.bool("xen_pv", d.xen_pv)?;
            b.bool("hypervisor_bit", d.hypervisor_bit)?;
            b.str("signature", &super::report::printable(&d.signature))?;
            b.num("max_leaf", format!("{}", d.max_leaf))?;
            b.bool("overridden", d.overridden)
        })?;
        j.obj("xen", |x| {
            x.str("vcpu_info", &format!("{:#x}", hv::vcpu_info()))?;
            x.str("hypercall_page", &format!("{:#x}", hv::hypercall_page()))?;
            x.num("entry_points_bytes", code.code.len())?;
            x.num("upcalls", UPCALLS.load(Ordering::Relaxed))?;
            x.num("timer_events", TIMER_EVENTS.load(Ordering::Relaxed))?;
            x.num("emulated_by_guest", EMULATED.load(Ordering::Relaxed))?;
            x.num("entry_to_init_cycles", t_init - t_entry)
        })?;
        j.obj("table", |t| {
            t.str("source", prepared.source.name())?;
            t.num("sites", patched.sites)
        })?;
        j.obj("patch", |p| {
            p.bool("applied", patched.refused.is_none())?;
            super::report::outcomes(p, &patched.stats)?;
            p.num("sites_written", patched.stats.applied.sites)?;
            p.num("bytes_written", patched.stats.applied.bytes)?;
            p.num("plan_cycles", patched.stats.plan_cycles)?;
            p.num("plan_first_cycles", patched.plan_first_cycles)?;
            p.num("apply_cycles", patched.stats.apply_cycles)?;
            p.num(
                "cycles_per_site",
                patch_cycles.checked_div(patched.sites as u64).unwrap_or(0),
            )?;
            p.num("boot_cycles", boot_cycles)?;
            p.num(
                "share_of_boot_permille",
                (boot_patch_cycles * 1000)
                    .checked_div(boot_cycles)
                    .unwrap_or(0),
            )
        })?;
        super::report::selftests(&mut j, &tests)?;
        j.array("bench", marks.rows.iter(), |o, r| {
            o.str("op", r.name)?;
            o.str("trapped_how", r.how)?;
            o.opt_num("trapped", r.trapped.map(Centi))?;
            o.opt_num("call_unpatched", r.call_unpatched.map(Centi))?;
            o.opt_num("site_patched", r.site_patched.map(Centi))?;
            o.opt_num("call_patched", r.call_patched.map(Centi))
        })?;
        j.obj("probes", |p| {
            let value = |v: Option<u64>| v.map_or("#GP".into(), |v| format!("{v:#x}"));
            p.array("msrs", msrs.iter(), |o, (msr, v)| {
                o.str("msr", &format!("{msr:#x}"))?;
                o.str("value", &value(*v))
            })?;
            p.array("ports", ports.iter(), |o, (port, v)| {
                o.str("port", &format!("{port:#x}"))?;
                o.str("value", &value(v.map(u64::from)))
            })?;
            p.array("instructions", insns.iter(), |o, i| {
                o.str("insn", i.name)?;
                o.str("outcome", i.outcome())?;
                o.num("cycles", i.cycles)
            })
        })?;
        j.num("model_cases", model)?;
        j.num("heap_bytes", super::heap::used())?;
        j.bool("pass", pass)?;
        j.end()
    })();
    if r.is_err() {
        let _ = out.write_str("(report truncated)");
    }
    let _ = out.write_str("\n");
    if pass {
        super::exit_pass()
    } else {
        super::exit_fail()
    }
}
