//! What the shim does, in order: read its parameters and the command line; detect the backend;
//! validate the site table (and a published ROM); plan; write and read back; report. Nothing
//! is written unless everything validated, and a failed read-back puts every byte back.

use alloc::format;
use alloc::string::String;
use core::fmt::Write as _;

use patch_sites::prepared::{Change, Plans, PreparedPlan};
use patch_sites::rom::FW_CFG_NAME;
use patch_sites::shim::{Grouped, Params, PlanSource, REPORT_SIZE, Report, Status, set_text};
use pvpatch_runtime::apply::{self, ApplyError};
use pvpatch_runtime::detect::{self, BackendKind, Platform, cmdline_has, cmdline_value};

use crate::console::Serial;
use crate::text::KernelText;
use crate::{fwcfg, heap, hw, report, start_info};

struct ShimPlatform<'a> {
    cmdline: &'a str,
}

impl Platform for ShimPlatform<'_> {
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        hw::cpuid(leaf, sub)
    }
    fn vmware_backdoor(&self, cmd: u32) -> [u32; 4] {
        hw::vmware_backdoor(cmd)
    }
    fn cmdline(&self) -> Option<&str> {
        Some(self.cmdline)
    }
}

/// The TSC's rate in kHz, if something says: `tsc_early_khz=` (what the tests pass Linux),
/// the hypervisor's timing leaf, or CPUID 0x15.
fn tsc_khz(cmdline: &str) -> Option<u64> {
    if let Some(k) = cmdline_value(cmdline, "tsc_early_khz").and_then(|v| v.parse().ok()) {
        return Some(k);
    }
    let max_hv = hw::cpuid(0x4000_0000, 0)[0];
    if max_hv >= 0x4000_0010 {
        let k = hw::cpuid(0x4000_0010, 0)[0];
        if k != 0 {
            return Some(u64::from(k));
        }
    }
    let [den, num, hz, _] = hw::cpuid(0x15, 0);
    (den != 0 && num != 0 && hz != 0)
        .then(|| u64::from(hz) * u64::from(num) / u64::from(den) / 1000)
}

/// Runs the shim; returns the kernel's entry (physical).
pub fn main(entry: u64) -> u64 {
    let mut r = Report {
        tsc_entry: hw::tsc_entry(),
        ..Report::default()
    };
    let si = start_info::read(hw::start_info());
    let cmdline = si.map_or("", |s| s.cmdline);
    let verbose = cmdline_has(cmdline, "pvpatch.verbose");
    if cmdline_has(cmdline, "pvpatch=off") {
        r.status = Status::Off;
        set_text(&mut r.reason, "pvpatch=off");
    } else {
        patch(cmdline, &mut r);
    }
    r.cycles_total = hw::rdtsc().wrapping_sub(r.tsc_entry);
    r.heap_used = heap::used() as u32;
    let page = report::page();
    let reserved = match si {
        Some(si) => {
            let start = hw::phys_of(page.as_ptr());
            start_info::reserve_range(
                &si,
                start,
                start + page.len() as u64,
                &mut page[REPORT_SIZE..],
            )
        }
        None => Err("no start_info"),
    };
    let _ = r.write(&mut page[..REPORT_SIZE]);
    if verbose {
        line(&r, cmdline, reserved.err());
    }
    entry
}

/// The one line `pvpatch.verbose` asks for.
fn line(r: &Report, cmdline: &str, not_reserved: Option<&str>) {
    let mut out = Serial;
    let time = match tsc_khz(cmdline) {
        Some(k) if k > 0 => format!("{} us", r.cycles_total * 1000 / k),
        _ => format!("{} cycles", r.cycles_total),
    };
    let _ = match r.status {
        Status::Patched => {
            if r.planned == PlanSource::BootRefused {
                let _ = writeln!(out, "pvpatch: {}", r.reason());
            }
            writeln!(
                out,
                "pvpatch: backend {}: {} sites, {} rewritten ({} detours, {}), {}",
                r.backend(),
                Grouped(r.sites.into()),
                Grouped(r.rewritten.into()),
                r.detours,
                r.planned.name(),
                time
            )
        }
        s => writeln!(
            out,
            "pvpatch: {}: {}; Linux boots as it is, {}",
            s.name(),
            r.reason(),
            time
        ),
    };
    if let Some(why) = not_reserved {
        let _ = writeln!(out, "pvpatch: the report page is not reserved: {why}");
    }
}

/// Refuses after a failed write: the text was put back, or (`NotRestored`) could not be.
fn refuse_applied(r: &mut Report, e: ApplyError) {
    match e {
        ApplyError::NotRestored { .. } => refuse(r, &format!("{e}: the text is damaged")),
        e => refuse(r, &format!("{e}; every byte put back")),
    }
}

fn refuse(r: &mut Report, why: &str) {
    r.status = Status::Refused;
    set_text(&mut r.reason, why);
}

/// Detect, validate, plan, apply.
fn patch(cmdline: &str, r: &mut Report) {
    let t0 = hw::rdtsc();
    let raw = report::params();
    let Some(params) = Params::read(raw) else {
        return refuse(
            r,
            "the shim's parameters are missing (not written by pvpatch)",
        );
    };
    let delta = hw::phys_base().wrapping_sub(params.shim_phys);
    r.load_delta = delta;
    let detected = detect::detect(&ShimPlatform { cmdline });
    set_text(&mut r.backend, detected.kind.name());
    if detected.disabled {
        r.status = Status::LeftNative;
        return set_text(&mut r.reason, "pvpatch.backend=none");
    }
    if matches!(detected.kind, BackendKind::Xen | BackendKind::HyperV) {
        r.status = Status::LeftNative;
        return set_text(
            &mut r.reason,
            "Linux patches itself for this hypervisor (its own pv_ops): every site left native",
        );
    }
    let text = KernelText::new(&params, delta);
    let Some(bytes) = text.bytes(params.table_vaddr, params.table_len as usize) else {
        return refuse(r, "the site table is outside the kernel's segments");
    };
    // A ROM is looked for only under QEMU (fw_cfg is QEMU's), or when asked for.
    let qemu = detected.hypervisor_bit
        && matches!(
            detected.kind,
            BackendKind::Tcg | BackendKind::Kvm | BackendKind::Vmware | BackendKind::Rom
        );
    let rom: Option<&'static [u8]> = if qemu || detected.kind == BackendKind::Rom {
        fwcfg::find(FW_CFG_NAME).and_then(|(sel, size)| read_rom(sel, size))
    } else {
        None
    };
    let mut kind = detected.kind;
    if rom.is_some() && !detected.overridden {
        kind = BackendKind::Rom;
    }
    if kind == BackendKind::Rom && rom.is_none() {
        return refuse(r, "the rom backend, and no ROM published");
    }
    set_text(&mut r.backend, kind.name());
    if cmdline_has(cmdline, "pvpatch.plan=boot") {
        r.planned = PlanSource::BootAsked;
    } else if kind != BackendKind::Rom {
        match prepared(&params, delta, &text, bytes, kind, detected.features) {
            Ok(Some(plan)) => match apply_prepared(&plan, &params, delta, t0, r) {
                Ok(()) => return,
                Err(why) => {
                    r.planned = PlanSource::BootRefused;
                    set_text(&mut r.reason, &why);
                }
            },
            Ok(None) => {}
            Err(why) => {
                r.planned = PlanSource::BootRefused;
                set_text(&mut r.reason, &why);
            }
        }
    }
    let found = Found {
        params: &params,
        delta,
        text: &text,
        table: bytes,
        rom,
        detected,
        kind,
        t0,
    };
    plan_at_boot(&found, r);
}

/// The published ROM's bytes (item `sel`, `size` bytes).
#[cfg(feature = "boot-planning")]
fn read_rom(sel: u16, size: u32) -> Option<&'static [u8]> {
    fwcfg::read(sel, size).map(|v| &*v.leak())
}

/// The lean shim cannot use a ROM (it plans nothing at boot): it notes that one is published,
/// and does not read it.
#[cfg(not(feature = "boot-planning"))]
fn read_rom(_: u16, _: u32) -> Option<&'static [u8]> {
    Some(&[])
}

/// What the shim found before it plans at boot.
#[cfg_attr(not(feature = "boot-planning"), allow(dead_code))]
struct Found<'a> {
    params: &'a Params,
    /// The load's displacement.
    delta: u64,
    text: &'a KernelText<'a>,
    /// The site table's bytes.
    table: &'a [u8],
    rom: Option<&'static [u8]>,
    detected: detect::Detected,
    /// The backend (`rom` when a ROM was published).
    kind: BackendKind,
    /// The TSC when the shim began.
    t0: u64,
}

/// Validates the table (and a ROM), plans for the backend and applies the plan: what the shim
/// does for a ROM, when asked (`pvpatch.plan=boot`), or when the prepared plans do not check out.
#[cfg(feature = "boot-planning")]
fn plan_at_boot(f: &Found<'_>, r: &mut Report) {
    use patch_sites::table::{AddrRange, SiteTable};
    use pvpatch_runtime::arena;
    use pvpatch_runtime::backend::{Backend, LoadedRom};
    use pvpatch_runtime::plan;

    let Found {
        params,
        delta,
        text,
        table: bytes,
        rom,
        detected,
        kind,
        t0,
    } = *f;
    let code: alloc::vec::Vec<AddrRange> = params
        .code()
        .iter()
        .map(|&(s, e)| AddrRange::new(s, e))
        .collect();
    // The detour area is checked by the planner, and only if the plan uses it: on backends
    // that keep every site as it is or rewrite some in place, that check was about a fifth of
    // the shim's time.
    let table =
        match SiteTable::parse_contiguous_deferring_detours(bytes, params.table_vaddr, &code) {
            Ok(t) => t,
            Err(e) => return refuse(r, &format!("site table invalid: {e}")),
        };
    r.sites = table.len() as u32;
    let arena_code = match arena::prepare(&table, kind, rom, &detected.signature, text) {
        Ok(c) => c,
        Err(e) => return refuse(r, &format!("{e}")),
    };
    let mut detected = detected;
    detected.kind = kind;
    let backend = Backend {
        detected,
        rom: arena_code.rom.map(|rom| LoadedRom {
            rom,
            base: arena_code.base,
        }),
        pv: None,
        thunks: arena_code.thunks.as_ref(),
    };
    let t1 = hw::rdtsc();
    r.cycles_prepare = t1 - t0;
    let mut planned = match plan::plan(&table, &backend, text, None) {
        Ok(p) => p,
        Err(e) => return refuse(r, &format!("{e}")),
    };
    planned.take_code(arena_code.write);
    let t2 = hw::rdtsc();
    r.cycles_plan = t2 - t1;
    let mut poke = KernelText::new(params, delta);
    let applied = apply::apply(&planned, &mut poke);
    r.cycles_apply = hw::rdtsc() - t2;
    match applied {
        Ok(a) => {
            r.status = Status::Patched;
            r.rewritten = a.sites;
            r.detours = a.detours;
            r.code_bytes = planned.code.iter().map(|c| c.new.len() as u32).sum();
            r.bytes_written = a.bytes as u32;
        }
        Err(e) => refuse_applied(r, e),
    }
}

/// Built without boot-time planning (`--no-default-features`, the lean shim): only plans
/// prepared at link time are applied; anything else leaves Linux as it is, and says why.
#[cfg(not(feature = "boot-planning"))]
fn plan_at_boot(f: &Found<'_>, r: &mut Report) {
    let why = match r.planned {
        PlanSource::BootRefused => String::from(r.reason()),
        PlanSource::BootAsked => String::from("pvpatch.plan=boot"),
        _ => format!("no plan prepared for {}", f.kind.name()),
    };
    refuse(r, &format!("{why} (the lean shim plans nothing at boot)"));
}

/// The plan prepared at link time for `kind` with the detected feature bits `features`, if the
/// image has one: `Ok(None)` if it has none for this backend, `Err` (why) if the plans do not
/// check out: their own digests, the site table's (they must have been made from this very
/// table), and every change inside the kernel's code.
fn prepared(
    params: &Params,
    delta: u64,
    text: &KernelText<'_>,
    table: &[u8],
    kind: BackendKind,
    features: u32,
) -> Result<Option<PreparedPlan<'static>>, String> {
    let Some(blob) = crate::text::plans(params, delta) else {
        return if params.plans_len == 0 {
            Ok(None)
        } else {
            Err("prepared plans not used: they are outside memory".into())
        };
    };
    let plans = Plans::read(blob).map_err(|e| format!("prepared plans not used: {e}"))?;
    if !plans.matches_table(table) {
        return Err(
            "prepared plans not used: the site table is not the one they were made from".into(),
        );
    }
    let Some(entry) = plans.find(kind.name(), features) else {
        return Ok(None);
    };
    let plan = plans
        .plan(&entry)
        .map_err(|e| format!("prepared plans not used: {e}"))?;
    if let Some(c) = plan.changes().find(|c| !text.in_code(c.addr, c.new.len())) {
        return Err(format!(
            "prepared plans not used: a change at {:#x} is outside the kernel's code",
            c.addr
        ));
    }
    Ok(Some(plan))
}

/// Applies a plan prepared at link time: every change's old bytes checked, then written and
/// read back, all or nothing. A change whose old bytes are not in the text means the text is
/// not what the plan was made from: nothing is written, and the shim plans at boot instead
/// (which refuses if the text does not match the table).
fn apply_prepared(
    plan: &PreparedPlan<'_>,
    params: &Params,
    delta: u64,
    t0: u64,
    r: &mut Report,
) -> Result<(), String> {
    let s = plan.summary;
    r.sites = s.sites;
    // Of exactly their number: the heap frees nothing, and a vector grown by doubling would
    // keep every smaller buffer.
    let mut changes: alloc::vec::Vec<Change<'_>> = alloc::vec::Vec::with_capacity(plan.len());
    changes.extend(plan.changes());
    let t1 = hw::rdtsc();
    r.cycles_prepare = t1 - t0;
    let mut poke = KernelText::new(params, delta);
    let applied = apply::apply_changes(&changes, &mut poke);
    r.cycles_apply = hw::rdtsc() - t1;
    match applied {
        Ok(bytes) => {
            r.status = Status::Patched;
            r.planned = PlanSource::Link;
            r.rewritten = s.rewritten;
            r.detours = s.detours;
            r.code_bytes = s.code_bytes;
            r.bytes_written = bytes as u32;
        }
        Err(e @ ApplyError::Changed { .. }) => {
            return Err(format!("prepared plan not used: {e}"));
        }
        Err(e) => refuse_applied(r, e),
    }
    Ok(())
}
