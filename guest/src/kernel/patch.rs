//! Boot-time patching of this kernel: detect the backend, find and validate the site table
//! (and a published ROM), plan, apply, verify, count. Nothing is written unless everything
//! validated.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use patch_sites::Outcome;
use patch_sites::rom::{FW_CFG_NAME, Rom};
use patch_sites::table::{AddrRange, HEADER_SIZE, SEALED_ALIGN, Site, SiteTable, TABLE_MAGIC};
use pvpatch_runtime::apply::{self, TextPoke};
use pvpatch_runtime::backend::{Backend, Choice, LoadedRom};
use pvpatch_runtime::detect::{self, BackendKind, Detected, Platform};
use pvpatch_runtime::plan::{self, Plan, TextRead};
use pvpatch_runtime::stats::Stats;

use super::{arch, fwcfg, idt, paging};

unsafe extern "C" {
    static pvpatch_site_table: [u8; HEADER_SIZE];
    static __text_start: u8;
    static __text_end: u8;
    static _end: u8;
    static __pvrom_start: u8;
    static __pvrom_end: u8;
}

/// The kernel's code.
pub fn text() -> AddrRange {
    AddrRange::new(&raw const __text_start as u64, &raw const __text_end as u64)
}

/// The machine, as detection sees it.
pub struct GuestPlatform<'a> {
    /// The kernel command line.
    pub cmdline: &'a str,
}

impl Platform for GuestPlatform<'_> {
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        arch::cpuid(leaf, sub)
    }
    fn vmware_backdoor(&self, cmd: u32) -> [u32; 4] {
        arch::vmware_backdoor(cmd)
    }
    fn cmdline(&self) -> Option<&str> {
        Some(self.cmdline)
    }
}

/// Writes kernel text through its writable alias (see [`paging`]), with interrupts off for the
/// whole batch: the text itself is never writable and CR0.WP stays set. Serializes with an
/// `iretq` to self, which does not exit to the hypervisor.
#[derive(Default)]
pub struct GuestPoke {
    /// Interrupts were on before `open`.
    saved: Option<bool>,
}

impl TextRead for GuestPoke {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        let t = text();
        let rom = rom_area();
        let inside = |r: AddrRange| r.contains_span(addr, out.len() as u64);
        if !inside(t) && !inside(rom) {
            return false;
        }
        // SAFETY: the range lies in the kernel's text, which is mapped and readable.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
        true
    }
}

impl TextPoke for GuestPoke {
    fn open(&mut self) {
        self.saved = Some(arch::irq_save());
    }

    fn close(&mut self) {
        if let Some(on) = self.saved.take() {
            arch::irq_restore(on);
        }
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let len = bytes.len() as u64;
        let inside = text().contains_span(addr, len) || rom_area().contains_span(addr, len);
        let Some(alias) = paging::alias(addr, len) else {
            return;
        };
        if self.saved.is_none() || !inside {
            return;
        }
        // SAFETY: `alias` maps the same physical bytes as `addr..addr+len`, which lie in the
        // kernel's text (checked), writable; interrupts are off, and no code that runs before
        // `close` is inside a site being written.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), alias as *mut u8, bytes.len());
        }
        // The read-back goes through the text's own mapping: keep the compiler from moving it
        // before the write it cannot see aliases.
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    }

    fn sync(&mut self) {
        arch::serialize();
    }
}

/// The executable area a ROM is copied into (inside the kernel's text, so that `call rel32`
/// reaches it).
pub fn rom_area() -> AddrRange {
    AddrRange::new(
        &raw const __pvrom_start as u64,
        &raw const __pvrom_end as u64,
    )
}

/// Where the site table was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Written by `pvpatch annotate`, after the kernel's end.
    Sealed,
    /// Gathered by the linker from the macros' records.
    Linked,
}

impl Source {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Source::Sealed => "sealed",
            Source::Linked => "linked",
        }
    }
}

/// Finds the table: a sealed one at the first page boundary after `_end` if its magic is there,
/// else the linker-gathered one.
pub fn locate() -> (Source, Result<SiteTable<'static>, patch_sites::TableError>) {
    let end = &raw const _end as u64;
    let sealed = end.next_multiple_of(SEALED_ALIGN);
    // SAFETY: the low 4 GiB are identity-mapped RAM or QEMU's loaded image; reading 8 bytes
    // after the kernel's end is harmless (zero when no table was loaded).
    let magic = unsafe { core::ptr::read_volatile(sealed as *const [u8; 8]) };
    if magic == TABLE_MAGIC {
        // SAFETY: a sealed table: its header is there, and `table_at` checks the header before
        // it reads the records its extent names, which QEMU loaded with the segment.
        let t = unsafe { pvpatch_runtime::locate::table_at(sealed as *const u8, &[text()]) };
        (Source::Sealed, t)
    } else {
        // SAFETY: the header symbol and the records the linker gathered are part of the image.
        let t =
            unsafe { pvpatch_runtime::locate::table_at(pvpatch_site_table.as_ptr(), &[text()]) };
        (Source::Linked, t)
    }
}

/// The ROM QEMU published.
#[derive(Clone, Debug)]
pub struct RomReport {
    /// Its backend name, if it parsed.
    pub name: Option<String>,
    /// Its size.
    pub size: usize,
    /// Entries.
    pub entries: u16,
    /// Why it was refused.
    pub refused: Option<String>,
}

/// What was decided before any site is touched: the backend, the table, the ROM.
pub struct Prepared {
    /// What detection found (the backend is `rom` when a valid ROM was loaded).
    pub detected: Detected,
    /// Where the table was found.
    pub source: Source,
    /// The table, or why it was refused.
    pub table: Result<SiteTable<'static>, String>,
    /// The ROM, when one was published.
    pub rom: Option<RomReport>,
    /// The backend to patch for, unless patching is refused.
    pub backend: Result<Backend<'static>, String>,
    /// Cycles spent.
    pub cycles: u64,
}

/// Copies the ROM into the executable ROM area.
fn load_rom(bytes: &[u8]) -> Option<u64> {
    let area = rom_area();
    if bytes.len() as u64 > area.end - area.start {
        return None;
    }
    let mut p = GuestPoke::default();
    p.open();
    p.write(area.start, bytes);
    p.close();
    p.sync();
    Some(area.start)
}

/// Detects the backend, finds and validates the table, and fetches and validates a ROM the
/// hypervisor published. Writes nothing but a valid ROM's copy.
pub fn prepare(cmdline: &str) -> Prepared {
    let t0 = arch::rdtsc();
    let detected = detect::detect(&GuestPlatform { cmdline });
    let (source, table) = locate();
    let mut p = Prepared {
        detected,
        source,
        table: table.map_err(|e| format!("site table invalid: {e}")),
        rom: None,
        backend: Err(String::new()),
        cycles: 0,
    };
    p.backend = match &p.table {
        Err(e) => Err(e.clone()),
        Ok(_) if detected.disabled => Err("pvpatch.backend=none: patching disabled".into()),
        Ok(table) => choose_backend(detected, table, &mut p.rom),
    };
    if let Ok(b) = &p.backend {
        p.detected = b.detected;
    }
    p.cycles = arch::rdtsc() - t0;
    p
}

fn choose_backend(
    detected: Detected,
    table: &SiteTable<'static>,
    rom_report: &mut Option<RomReport>,
) -> Result<Backend<'static>, String> {
    let mut backend = Backend {
        detected,
        rom: None,
        pv: None,
        thunks: None,
    };
    // A ROM is looked for only under QEMU (fw_cfg is QEMU's), or when asked for.
    let qemu = detected.hypervisor_bit
        && matches!(
            detected.kind,
            BackendKind::Tcg | BackendKind::Kvm | BackendKind::Vmware | BackendKind::Rom
        );
    if !qemu {
        return Ok(backend);
    }
    let Some(bytes) = fwcfg::find(FW_CFG_NAME).and_then(|(sel, size)| fwcfg::read_file(sel, size))
    else {
        return Ok(backend);
    };
    let bytes: &'static [u8] = bytes.leak();
    let mut report = RomReport {
        name: None,
        size: bytes.len(),
        entries: 0,
        refused: None,
    };
    let checked = Rom::parse(bytes)
        .map_err(|e| format!("{e}"))
        .and_then(|rom| {
            report.name = Some(String::from(rom.name()));
            report.entries = rom.len();
            pvpatch_runtime::romcheck::validate(&rom, &detected.signature, table)
                .map_err(|e| format!("{e}"))
        });
    let result = match checked {
        Err(e) => Err(e),
        Ok(()) => match load_rom(bytes) {
            None => Err("larger than the ROM area".into()),
            Some(base) => {
                // SAFETY: `load_rom` copied exactly `bytes.len()` bytes there.
                let copy = unsafe { core::slice::from_raw_parts(base as *const u8, bytes.len()) };
                // Parsed again from the executable copy, which calls will reach.
                Rom::parse(copy)
                    .map_err(|e| format!("the loaded copy does not parse: {e}"))
                    .map(|rom| {
                        if !detected.overridden {
                            backend.detected.kind = BackendKind::Rom;
                        }
                        backend.rom = Some(LoadedRom { rom, base });
                    })
            }
        },
    };
    report.refused = result.as_ref().err().cloned();
    *rom_report = Some(report);
    result
        .map(|()| backend)
        .map_err(|e| format!("backend ROM refused: {e}"))
}

/// What one patching pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Why nothing was patched, if nothing was.
    pub refused: Option<String>,
    /// Counts.
    pub stats: Stats,
    /// The plan that was applied.
    pub plan: Option<Plan>,
}

/// Overrides the backend's choice for the site of a given index, or leaves it (`None`).
pub type Override<'a> = dyn Fn(u32, &Site) -> Option<Choice<'static>> + 'a;

/// Plans and applies the prepared table. `filter` limits the sites written; `force`
/// overrides the backend's choice for some.
pub fn patch(
    p: &Prepared,
    filter: Option<&dyn Fn(&Site) -> bool>,
    force: Option<&Override<'_>>,
) -> Pass {
    let (table, backend) = match (&p.table, &p.backend) {
        (Ok(t), Ok(b)) => (t, b),
        (Err(e), _) | (_, Err(e)) => {
            return Pass {
                refused: Some(e.clone()),
                ..Pass::default()
            };
        }
    };
    let t0 = arch::rdtsc();
    let mut planned = match plan::plan(table, backend, &GuestPoke::default(), force) {
        Ok(pl) => pl,
        Err(e) => {
            return Pass {
                refused: Some(format!("{e}")),
                ..Pass::default()
            };
        }
    };
    if let Some(f) = filter {
        planned.sites.retain(|s| f(&s.site));
    }
    let t1 = arch::rdtsc();
    let applied = apply::apply(&planned, &mut GuestPoke::default());
    let t2 = arch::rdtsc();
    let mut stats = Stats::of(&planned);
    stats.plan_cycles = t1 - t0;
    stats.apply_cycles = t2 - t1;
    match applied {
        Ok(a) => stats.applied = a,
        Err(e @ apply::ApplyError::NotRestored { .. }) => {
            // Half-patched text that cannot be put back: nothing after this can be trusted.
            panic!("patching failed and could not be undone: {e}");
        }
        Err(e) => {
            return Pass {
                refused: Some(format!("{e}")),
                stats,
                plan: None,
            };
        }
    }
    let traps: Vec<Site> = planned
        .sites
        .iter()
        .filter(|s| s.outcome == Outcome::Trap)
        .map(|s| s.site)
        .collect();
    idt::set_trap_sites(traps);
    Pass {
        refused: None,
        stats,
        plan: Some(planned),
    }
}

/// Writes the old bytes of every site `plan` changed back (the benchmark's trap pass undoes
/// itself this way).
pub fn revert(plan: &Plan) {
    apply::revert(plan, &mut GuestPoke::default());
    idt::set_trap_sites(Vec::new());
}
