//! The boot shim in front of a stock kernel (`docs/shim.md`): the shim's ELF (built for
//! `x86_64-unknown-none` by `cargo xtask shim`) read and checked, its segment placed above
//! everything the kernel loads, its parameters filled in, and the kernel's PVH entry note
//! pointed at it. `annotate --boot-shim` writes the result; `verify` checks it.

use std::path::{Path, PathBuf};

use object::elf;
use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{Endianness, Object, ObjectSymbol};
use patch_sites::shim::{MAX_CODE, MAX_SEGMENTS, PARAMS_MAGIC, PARAMS_SIZE, Params, Segment};
use thiserror::Error;

use patch_sites::prepared::{PlanSpec, PlanSummary, plans_size, write_plans};
use patch_sites::table::SiteTable;
use pvpatch_runtime::apply;
use pvpatch_runtime::detect::{BackendKind, KVM_FEATURE_NOP_IO_DELAY};
use pvpatch_runtime::plan::Write;

use crate::load::Image;
use crate::load::image::XEN_ELFNOTE_PHYS32_ENTRY;
use crate::rewrite::{BackendSpec, plan_table};

/// The section that holds the shim in an annotated image.
pub const SHIM_SECTION: &str = ".pvpatch_shim";
/// The section that holds the plans prepared for the shim at link time.
pub const PLANS_SECTION: &str = ".pvpatch_plans";
/// The shim's segment is placed on this boundary (a loader that relocates the kernel moves it
/// by a multiple of 2 MiB, and the shim maps itself with 2 MiB pages).
pub const SHIM_ALIGN: u64 = 0x20_0000;

/// Why the shim cannot be added.
#[derive(Debug, Error)]
pub enum ShimError {
    /// The shim's file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the shim pvpatch knows.
    #[error("{0}: not a pvpatch boot shim: {1}")]
    NotShim(String, String),
    /// The kernel has no PVH entry.
    #[error(
        "the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): the shim is entered in its \
         place, so a kernel without one cannot have a shim"
    )]
    NoPvhEntry,
    /// The kernel's layout does not fit the shim's parameters.
    #[error("{0}")]
    Layout(String),
}

/// A boot shim, read from its ELF.
#[derive(Clone, Debug)]
pub struct Shim {
    /// Its segment's file bytes.
    pub bytes: Vec<u8>,
    /// Where it is linked (its entry is the first byte).
    pub vaddr: u64,
    /// Bytes in memory (with its `.bss`).
    pub memsz: u64,
    /// Offset of its parameters in the segment.
    pub params_at: usize,
    /// Offset of its report page in the segment.
    pub report_at: u64,
}

fn not_shim(path: &Path, why: impl Into<String>) -> ShimError {
    ShimError::NotShim(path.display().to_string(), why.into())
}

impl Shim {
    /// Reads and checks the shim's ELF at `path`: one loadable segment, entered at its first
    /// byte, holding the parameters (with their magic) and the report page.
    pub fn load(path: &Path) -> Result<Shim, ShimError> {
        let data = std::fs::read(path).map_err(|source| ShimError::Read {
            path: path.to_owned(),
            source,
        })?;
        let f =
            ElfFile64::<Endianness>::parse(&*data).map_err(|e| not_shim(path, e.to_string()))?;
        let e = f.endian();
        let loads: Vec<_> = f
            .elf_program_headers()
            .iter()
            .filter(|p| p.p_type(e) == elf::PT_LOAD)
            .collect();
        let [seg] = loads[..] else {
            return Err(not_shim(
                path,
                format!("{} loadable segments, not 1", loads.len()),
            ));
        };
        let (vaddr, memsz) = (seg.p_vaddr(e), seg.p_memsz(e));
        let bytes = seg
            .data(e, &*data)
            .map_err(|_| not_shim(path, "its segment lies outside the file"))?
            .to_vec();
        let sym = |name: &str| {
            f.symbols()
                .find(|s| s.name() == Ok(name))
                .map(|s| s.address())
                .ok_or_else(|| not_shim(path, format!("no symbol {name}")))
        };
        if f.entry() != vaddr || sym("shim_entry32")? != vaddr {
            return Err(not_shim(path, "its entry is not its segment's first byte"));
        }
        let params_at = sym("PVPATCH_SHIM_PARAMS")?.wrapping_sub(vaddr) as usize;
        if bytes.get(params_at..params_at + 8) != Some(&PARAMS_MAGIC[..])
            || params_at + PARAMS_SIZE > bytes.len()
        {
            return Err(not_shim(
                path,
                "its parameters are not where its symbol says",
            ));
        }
        if params_offset(&bytes) != Some(params_at) {
            return Err(not_shim(
                path,
                "its parameters are not the last 8-aligned copy of their magic",
            ));
        }
        let report_at = sym("PVPATCH_SHIM_REPORT")?.wrapping_sub(vaddr);
        if report_at + 4096 > memsz || memsz < bytes.len() as u64 {
            return Err(not_shim(path, "its report page is outside its segment"));
        }
        Ok(Shim {
            bytes,
            vaddr,
            memsz,
            params_at,
            report_at,
        })
    }
}

/// Where the parameters are in the bytes of a shim's segment: the last 8-aligned copy of
/// their magic. They open the shim's `.data`, after its code and constants, which may hold the
/// magic too (the shim compares it); [`Shim::load`] refuses a shim with a copy after them.
pub fn params_offset(segment: &[u8]) -> Option<usize> {
    (0..segment.len().checked_sub(7)?)
        .step_by(8)
        .rev()
        .find(|&i| segment[i..i + 8] == PARAMS_MAGIC)
}

/// The kernel's PVH entry as linked: from the note, or, in an image that already has a shim,
/// from the shim's parameters (the note points at the shim then).
pub fn linux_entry(image: &Image) -> Option<u64> {
    match existing(image) {
        Some(p) => Some(p.linux_entry),
        None => image.pvh_entry(),
    }
}

/// The parameters of the shim an image already has.
pub fn existing(image: &Image) -> Option<Params> {
    let data = image.section_data(image.section(SHIM_SECTION)?);
    Params::read(data.get(image.shim_params_at?..)?)
}

/// Where the shim goes and what it is told: placed on the first [`SHIM_ALIGN`] boundary above
/// every byte the kernel loads (`loads`: `(vaddr, paddr, memsz)`, the table's segment among
/// them); its parameters for the table at `table` (`(vaddr, len)`) and the kernel's code.
pub fn params(
    image: &Image,
    shim: &Shim,
    loads: &[(u64, u64, u64)],
    table: (u64, u64),
) -> Result<(Params, u64), ShimError> {
    let linux_entry = linux_entry(image).ok_or(ShimError::NoPvhEntry)?;
    if loads.len() > MAX_SEGMENTS {
        return Err(ShimError::Layout(format!(
            "{} loadable segments: the shim's parameters hold {MAX_SEGMENTS}",
            loads.len()
        )));
    }
    let code = image.code_ranges();
    if code.len() > MAX_CODE {
        return Err(ShimError::Layout(format!(
            "{} code ranges: the shim's parameters hold {MAX_CODE}",
            code.len()
        )));
    }
    let top = loads
        .iter()
        .filter_map(|&(_, p, m)| p.checked_add(m))
        .max()
        .unwrap_or(0);
    let phys = top
        .checked_next_multiple_of(SHIM_ALIGN)
        .filter(|p| p.checked_add(shim.memsz).is_some_and(|e| e <= 1 << 32))
        .ok_or_else(|| {
            ShimError::Layout(format!(
                "the kernel loads up to {top:#x}: no room for the shim below 4 GiB"
            ))
        })?;
    if !loads
        .iter()
        .any(|&(_, p, m)| linux_entry >= p && linux_entry < p + m)
    {
        return Err(ShimError::Layout(format!(
            "the PVH entry {linux_entry:#x} is in none of the kernel's segments"
        )));
    }
    let mut p = Params {
        linux_entry,
        shim_phys: phys,
        table_vaddr: table.0,
        table_len: table.1,
        report_offset: shim.report_at,
        nsegments: loads.len() as u32,
        ncode: code.len() as u32,
        ..Params::default()
    };
    for (s, &(vaddr, paddr, memsz)) in p.segments.iter_mut().zip(loads) {
        *s = Segment {
            vaddr,
            paddr,
            memsz,
        };
    }
    for (c, r) in p.code.iter_mut().zip(&code) {
        *c = (r.start, r.end);
    }
    Ok((p, phys))
}

/// The shim's segment bytes with `params` written in.
pub fn with_params(shim: &Shim, params: &Params) -> Vec<u8> {
    let mut b = shim.bytes.clone();
    let _ = params.write(&mut b[shim.params_at..shim.params_at + PARAMS_SIZE]);
    b
}

/// A plan prepared at link time, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedNote {
    /// The backend, as the report names it (with the feature it depends on, if any).
    pub backend: String,
    /// Sites the plan rewrites and bytes it changes, or why it could not be prepared (the
    /// shim then plans at boot, where the same planner meets the same failure; the lean shim
    /// refuses).
    pub outcome: Result<(u32, usize), String>,
}

/// The backends whose plans are known at link time: name, the runtime's kind, the feature bits
/// the plan depends on (mask, value), and how a report names it.
const PREPARED: [(BackendKind, u32, u32, &str); 7] = [
    (BackendKind::Native, 0, 0, "native"),
    (BackendKind::Tcg, 0, 0, "tcg"),
    (
        BackendKind::Kvm,
        KVM_FEATURE_NOP_IO_DELAY,
        KVM_FEATURE_NOP_IO_DELAY,
        "kvm",
    ),
    (
        BackendKind::Kvm,
        KVM_FEATURE_NOP_IO_DELAY,
        0,
        "kvm (port-0x80 delays needed)",
    ),
    (BackendKind::Vmware, 0, 0, "vmware"),
    (BackendKind::Unknown, 0, 0, "unknown"),
    (BackendKind::OutOfLine, 0, 0, "outofline"),
];

/// The plans of every backend known at link time for `image` with the site table `table` at
/// `table_addr` (`patch_sites::prepared`), made by the runtime's own validation and planner
/// exactly as it would plan at boot; and a note for each. A backend whose plan fails is left
/// out (the shim plans it at boot). The table is parsed whole here, its detour area with it,
/// where the shim defers that check to plans that use the area: `annotate` has checked the
/// table it wrote the same way, so the two cannot differ for a table it prepares plans for.
pub fn prepare_plans(
    image: &Image,
    table: &[u8],
    table_addr: u64,
) -> Result<(Vec<u8>, Vec<PreparedNote>), ShimError> {
    // Parsed once for every plan (`annotate` has checked it already).
    let parsed = SiteTable::parse_contiguous(table, table_addr, &image.code_ranges())
        .map_err(|e| ShimError::Layout(format!("the site table does not parse: {e}")))?;
    let sites = parsed.len() as u32;
    let mut made = Vec::new();
    let mut notes = Vec::new();
    for (kind, mask, value, name) in PREPARED {
        let spec = BackendSpec { kind, rom: None };
        match plan_table(image, &parsed, &spec, value) {
            Ok((plan, _)) => {
                let mut s = PlanSummary::new(kind.name());
                s.features_mask = mask;
                s.features_value = value;
                s.sites = sites;
                s.rewritten = plan.sites.iter().filter(|p| p.changed()).count() as u32;
                s.detours = plan.detours.len() as u32;
                // The code the plan places (none when no site changes), as the shim reports
                // it when it plans at boot.
                let code: usize = plan.code.iter().map(|c| c.new.len()).sum();
                s.code_bytes = code as u32;
                let bytes = code + plan.writes().map(|w| w.new.len()).sum::<usize>();
                notes.push(PreparedNote {
                    backend: name.to_owned(),
                    outcome: Ok((s.rewritten, bytes)),
                });
                made.push((s, plan));
            }
            Err(e) => notes.push(PreparedNote {
                backend: name.to_owned(),
                outcome: Err(e.to_string()),
            }),
        }
    }
    let writes: Vec<Vec<Write>> = made.iter().map(|(_, p)| apply::collect_writes(p)).collect();
    let changes: Vec<_> = made
        .iter()
        .zip(&writes)
        .map(|((_, p), w)| apply::changes(p, w))
        .collect();
    let specs: Vec<PlanSpec<'_, '_>> = made
        .iter()
        .zip(&changes)
        .map(|((summary, _), c)| PlanSpec {
            summary: *summary,
            changes: c,
        })
        .collect();
    let mut blob = vec![0u8; plans_size(&specs)];
    write_plans(table, &specs, &mut blob).ok_or_else(|| {
        ShimError::Layout("a prepared plan does not fit the plans' format".into())
    })?;
    Ok((blob, notes))
}

/// `data` (the bytes of a note section) with the descriptor of the Xen PVH entry note set to
/// `entry`, if the section has that note (with a 4- or 8-byte descriptor).
pub fn point_pvh_note(data: &[u8], entry: u64) -> Option<Vec<u8>> {
    let mut out = data.to_vec();
    let mut at = 0usize;
    let align4 = |n: usize| n.checked_next_multiple_of(4);
    while at + 12 <= data.len() {
        let w = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap_or([0; 4])) as usize;
        let (namesz, descsz, kind) = (w(at), w(at + 4), w(at + 8) as u32);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align4(namesz)?)?;
        let next = desc_at.checked_add(align4(descsz)?)?;
        if next > data.len() {
            return None;
        }
        if data.get(name_at..name_at + namesz) == Some(&b"Xen\0"[..])
            && kind == XEN_ELFNOTE_PHYS32_ENTRY
        {
            match descsz {
                4 => out[desc_at..desc_at + 4]
                    .copy_from_slice(&u32::try_from(entry).ok()?.to_le_bytes()),
                8 => out[desc_at..desc_at + 8].copy_from_slice(&entry.to_le_bytes()),
                _ => return None,
            }
            return Some(out);
        }
        at = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parameters_are_the_last_aligned_copy_of_their_magic() {
        let mut seg = vec![0u8; 256];
        assert_eq!(params_offset(&seg), None);
        assert_eq!(params_offset(&seg[..5]), None);
        // A constant holding the magic before the parameters (as the built shim has), and an
        // unaligned one after them: the parameters.
        seg[40..48].copy_from_slice(&PARAMS_MAGIC);
        seg[128..136].copy_from_slice(&PARAMS_MAGIC);
        seg[201..209].copy_from_slice(&PARAMS_MAGIC);
        assert_eq!(params_offset(&seg), Some(128));
        // At the very end.
        seg[248..].copy_from_slice(&PARAMS_MAGIC);
        assert_eq!(params_offset(&seg), Some(248));
    }

    #[test]
    fn the_pvh_note_is_pointed_at_the_shim_and_nothing_else_changes() {
        let note = |name: &[u8], kind: u32, desc: &[u8]| {
            let mut v = Vec::new();
            v.extend_from_slice(&(name.len() as u32).to_le_bytes());
            v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            v.extend_from_slice(&kind.to_le_bytes());
            v.extend_from_slice(name);
            v.resize(v.len().next_multiple_of(4), 0);
            v.extend_from_slice(desc);
            v.resize(v.len().next_multiple_of(4), 0);
            v
        };
        let mut data = note(b"GNU\0", 3, &[1; 20]);
        data.extend(note(b"Xen\0", 18, &0x100_0850u32.to_le_bytes()));
        data.extend(note(b"Xen\0", 19, &[0; 8]));
        let out = point_pvh_note(&data, 0x4c0_0000).unwrap();
        let changed: Vec<usize> = (0..data.len()).filter(|&i| data[i] != out[i]).collect();
        // 0x0100_0850 -> 0x04c0_0000: the four bytes of the descriptor, nothing else.
        assert_eq!(changed, [52, 53, 54, 55], "only the entry's bytes");
        assert!(out.windows(4).any(|w| w == 0x4c0_0000u32.to_le_bytes()));
        // No PVH note, a truncated one, an entry beyond 4 GiB in a 4-byte note: none.
        assert_eq!(point_pvh_note(&note(b"GNU\0", 18, &[0; 4]), 1), None);
        assert_eq!(point_pvh_note(&data[..data.len() - 30], 1), None);
        assert_eq!(point_pvh_note(&data, 1 << 33), None);
    }
}

/// A shim's report page read back from the guest's memory (QEMU's `pmemsave`), for people
/// ([`ShownReport::text`]) and for programs (`pvpatch report --json`).
#[derive(Clone, Debug)]
pub struct ShownReport {
    /// For people: a line of what happened, then the counts, the cycles and the reason.
    pub text: String,
    /// For programs.
    pub json: ReportJson,
}

/// A shim's report, as `pvpatch report --json` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReportJson {
    /// `patched`, `off`, `left native`, `refused` (or `none`: the shim did not get that far).
    pub status: &'static str,
    /// The backend it found (or was told).
    pub backend: String,
    /// `planned at link time` or `planned at boot`, as the shim's line says it.
    pub planned: &'static str,
    /// Why the plan was made where it was: `link`, `boot`, `boot-asked` (`pvpatch.plan=boot`),
    /// `boot-refused` (the prepared plans did not check out: the reason says why).
    pub plan_source: &'static str,
    /// Sites in the table.
    pub sites: u32,
    /// Sites rewritten.
    pub rewritten: u32,
    /// Detours installed.
    pub detours: u32,
    /// Bytes of out-of-line code written.
    pub code_bytes: u32,
    /// Bytes written in all.
    pub bytes_written: u32,
    /// The TSC at the shim's entry.
    pub tsc_entry: u64,
    /// TSC cycles: from the entry to the report (`total`), and its phases.
    pub cycles: ReportCycles,
    /// `cycles.total` in microseconds, when the TSC's rate was given (as the shim's own line
    /// computes it: cycles × 1000 / kHz, rounded down).
    pub microseconds: Option<u64>,
    /// How far the loader moved the shim from where it was linked (bytes, signed).
    pub load_delta: i64,
    /// Bytes of heap the shim used.
    pub heap_used: u32,
    /// Why nothing was rewritten, or why a prepared plan was not used ("" if neither).
    pub reason: String,
}

/// The shim's cycles, by phase.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ReportCycles {
    /// From the entry to the report.
    pub total: u64,
    /// Detection, validation, the ROM.
    pub prepare: u64,
    /// Planning at boot (0 for a plan prepared at link time).
    pub plan: u64,
    /// Writing and reading back.
    pub apply: u64,
}

/// Reads the shim's report from the start of `dump` (its page, or at least its first
/// [`patch_sites::shim::REPORT_SIZE`] bytes) and shows it; `tsc_khz`, the TSC's rate, puts
/// the time in microseconds too.
pub fn show_report(
    dump: &[u8],
    tsc_khz: Option<u64>,
) -> Result<ShownReport, patch_sites::shim::ReportError> {
    use patch_sites::shim::{Grouped, PlanSource, Report};
    let r = Report::parse(dump)?;
    let plan_source = match r.planned {
        PlanSource::Link => "link",
        PlanSource::Boot => "boot",
        PlanSource::BootAsked => "boot-asked",
        PlanSource::BootRefused => "boot-refused",
    };
    let microseconds = tsc_khz.filter(|&k| k > 0).map(|k| {
        u64::try_from(u128::from(r.cycles_total) * 1000 / u128::from(k)).unwrap_or(u64::MAX)
    });
    let json = ReportJson {
        status: r.status.name(),
        backend: r.backend().to_owned(),
        planned: r.planned.name(),
        plan_source,
        sites: r.sites,
        rewritten: r.rewritten,
        detours: r.detours,
        code_bytes: r.code_bytes,
        bytes_written: r.bytes_written,
        tsc_entry: r.tsc_entry,
        cycles: ReportCycles {
            total: r.cycles_total,
            prepare: r.cycles_prepare,
            plan: r.cycles_plan,
            apply: r.cycles_apply,
        },
        microseconds,
        load_delta: r.load_delta as i64,
        heap_used: r.heap_used,
        reason: r.reason().to_owned(),
    };
    let mut text = format!(
        "shim report: {}, backend {} ({}, {plan_source})\n",
        json.status, json.backend, json.planned
    );
    text += &format!(
        "  sites {}, rewritten {}, detours {}; bytes written {} ({} of out-of-line code)\n",
        Grouped(json.sites.into()),
        Grouped(json.rewritten.into()),
        Grouped(json.detours.into()),
        Grouped(json.bytes_written.into()),
        Grouped(json.code_bytes.into())
    );
    let time = match (microseconds, tsc_khz) {
        (Some(us), Some(k)) => format!(" ({} us at {} kHz)", Grouped(us), Grouped(k)),
        _ => String::new(),
    };
    text += &format!(
        "  cycles {} from entry to report{time}: preparing {}, planning {}, applying {}\n",
        Grouped(r.cycles_total),
        Grouped(r.cycles_prepare),
        Grouped(r.cycles_plan),
        Grouped(r.cycles_apply)
    );
    text += &format!(
        "  TSC at entry {}; loaded {}{:#x} from where it was linked; heap used {} bytes\n",
        r.tsc_entry,
        if json.load_delta < 0 { "-" } else { "+" },
        json.load_delta.unsigned_abs(),
        Grouped(r.heap_used.into())
    );
    if !json.reason.is_empty() {
        text += &format!("  reason: {}\n", json.reason);
    }
    Ok(ShownReport { text, json })
}

#[cfg(test)]
mod report_tests {
    use super::*;
    use patch_sites::shim::{PlanSource, REPORT_SIZE, Report, ReportError, Status, set_text};

    #[test]
    fn a_report_is_shown_and_bad_dumps_are_refused() {
        let mut r = Report {
            status: Status::Refused,
            sites: 1103,
            cycles_total: 3_302_512,
            cycles_prepare: 1_000,
            load_delta: 0u64.wrapping_sub(0x20_0000),
            planned: PlanSource::BootRefused,
            ..Report::default()
        };
        set_text(&mut r.backend, "tcg");
        set_text(&mut r.reason, "site table invalid: bad checksum");
        let mut page = vec![0u8; 4096];
        r.write(&mut page).unwrap();
        let shown = show_report(&page, Some(2_600_000)).unwrap();
        assert_eq!(shown.json.status, "refused");
        assert_eq!(shown.json.plan_source, "boot-refused");
        assert_eq!(shown.json.microseconds, Some(1270));
        assert_eq!(shown.json.load_delta, -0x20_0000);
        assert!(
            shown
                .text
                .starts_with("shim report: refused, backend tcg (planned at boot, boot-refused)\n"),
            "{}",
            shown.text
        );
        for want in [
            "sites 1,103,",
            "(1,270 us at 2,600,000 kHz)",
            "loaded -0x200000 from",
            "reason: site table invalid: bad checksum",
        ] {
            assert!(shown.text.contains(want), "{want:?} not in\n{}", shown.text);
        }
        assert_eq!(show_report(&page, None).unwrap().json.microseconds, None);
        assert_eq!(show_report(&page, Some(0)).unwrap().json.microseconds, None);
        assert_eq!(
            show_report(&page[..100], None).unwrap_err(),
            ReportError::Short { len: 100 }
        );
        assert_eq!(
            show_report(&page[1..REPORT_SIZE + 1], None).unwrap_err(),
            ReportError::NoMagic
        );
        assert_eq!(
            show_report(&[], None).unwrap_err(),
            ReportError::Short { len: 0 }
        );
    }
}
