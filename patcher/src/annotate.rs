//! `pvpatch annotate`: write a sealed site table into a new section of the image.
//!
//! The table records every patchable sensitive instruction the sweep found, merged with the
//! records the image's own annotation macros emitted (its linker-gathered table, which take
//! precedence: they know their room and form). It goes into a new section `.pvpatch_sites` in a
//! new read-only `PT_LOAD` at the first 4 KiB boundary after the highest loadable segment, where
//! a runtime finds it (`docs/abi.md`, "Finding the table"). Every original section and program
//! header is kept byte for byte (the section-name table grows by one name); bytes after the last
//! section that no section covers (a bzImage build's `vmlinux.relocs`) are carried over too.
//! The output is written atomically; the input is never modified.

use std::io::Write;
use std::path::Path;

use object::build::elf::{Builder, SectionData};
use object::elf;
use object::write::StreamingBuffer;
use patch_sites::RegSet;
use patch_sites::table::{
    AddrRange, DetourSpec, Form, Header, MemberSpec, SEALED_ALIGN, SEALED_SECTION, Site, SiteTable,
    TableError, WriteError, sealed_table_size_with, write_sealed_table_with,
};
use patch_sites::table::{SITE_FLAG_NO_STACK, SITE_FLAG_REP};
use thiserror::Error;

use crate::ScanReport;
use crate::analyse::SiteInfo;
use crate::load::image::Image;
use crate::output::{OutputError, write_atomic};

/// The section holding a linker-gathered table's header.
pub const LINKED_HEADER_SECTION: &str = patch_sites::table::HEADER_SECTION;
/// The prepared plans are placed on this boundary after the shim's memory.
const PLANS_ALIGN: u64 = 4096;

/// Why an image cannot be annotated.
#[derive(Debug, Error)]
pub enum AnnotateError {
    /// The image already has a table and `--force` was not given.
    #[error(
        "{0} is already annotated (it has a {SEALED_SECTION} section); pass --force to replace \
         the table"
    )]
    AlreadyAnnotated(String),
    /// The image's own linker-gathered table is invalid.
    #[error("the image's linker-gathered site table ({LINKED_HEADER_SECTION}) is invalid")]
    LinkedTable(#[source] TableError),
    /// The table cannot be placed or encoded.
    #[error("cannot write the site table")]
    Table(#[source] WriteError),
    /// The image has no loadable segment to place the table after.
    #[error("the image has no PT_LOAD segment")]
    NoLoadSegment,
    /// The image has properties that make it unsafe to rewrite.
    #[error("the image cannot be rewritten: {0}")]
    NotRewritable(String),
    /// object's ELF builder refused the image.
    #[error("the ELF file cannot be rewritten as it is: {0}")]
    Elf(String),
    /// An option that cannot apply to this image.
    #[error("{0}")]
    Usage(String),
    /// What was written does not check out: a bug of this tool, not of the image.
    #[error("internal error: {0}")]
    Internal(String),
    /// The output could not be written.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The boot shim cannot be added.
    #[error(transparent)]
    Shim(#[from] crate::shim::ShimError),
}

/// What to annotate.
#[derive(Clone, Debug, Default)]
pub struct AnnotateOptions {
    /// Replace an existing table.
    pub force: bool,
    /// Record raw sites only in these executable sections (all when empty).
    pub sections: Vec<String>,
    /// Put this boot shim in front of the kernel's PVH entry (`docs/shim.md`).
    pub boot_shim: Option<crate::shim::Shim>,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct Annotation {
    /// Address of the table.
    pub table_addr: u64,
    /// The boot shim's physical address, and its report page's, if one was added.
    pub shim: Option<(u64, u64)>,
    /// The plans prepared for the shim at link time (empty without a shim).
    pub prepared: Vec<crate::shim::PreparedNote>,
    /// Its size in bytes.
    pub table_size: usize,
    /// Sites recorded, in all.
    pub sites: usize,
    /// Of which from the image's own macros.
    pub from_macros: usize,
    /// Of which found by the sweep.
    pub from_scan: usize,
    /// Trailing bytes no section covers, carried over.
    pub trailing: usize,
    /// The table's bytes.
    pub table: Vec<u8>,
}

/// The sites of the image's linker-gathered table (emitted by the annotation macros), if the
/// image has one.
pub fn linked_sites(image: &Image) -> Result<Vec<Site>, TableError> {
    let Some(s) = image.section(LINKED_HEADER_SECTION) else {
        return Ok(Vec::new());
    };
    let hb = image.section_data(s);
    let header = Header::parse(hb, s.addr)?;
    let len = usize::try_from(header.records_len()).map_err(|_| TableError::BadExtent)?;
    let records = if len == 0 {
        &[][..]
    } else {
        image
            .read(header.records_begin, len)
            .ok_or(TableError::TruncatedRecords {
                needed: len as u64,
                available: 0,
            })?
    };
    let t = SiteTable::parse(header, records, &image.code_ranges())?;
    Ok(t.sites().collect())
}

/// The record for a site the sweep found.
pub fn record_for(s: &SiteInfo) -> Site {
    let f = &s.found;
    Site {
        addr: f.addr,
        site_len: s.room.in_place,
        insn_len: f.len,
        op_id: crate::analyse::recorded_op(f).id(),
        form: Form::Native,
        operand: f.operand(),
        width: f.class.width,
        flags: if f.class.rep { SITE_FLAG_REP } else { 0 }
            | if s.no_stack { SITE_FLAG_NO_STACK } else { 0 },
        // Nothing is known about the surrounding code: a rewrite may clobber only what the op
        // itself defines or leaves undefined.
        clobbers: RegSet::EMPTY,
        stub: None,
    }
}

/// What the table will hold.
#[derive(Clone, Debug, Default)]
pub struct TablePlan<'r> {
    /// The records, sorted by address.
    pub sites: Vec<Site>,
    /// How many came from the annotation macros.
    pub from_macros: usize,
    /// How many from the sweep.
    pub from_scan: usize,
    /// The load-time detours (stock kernels), sorted by moved range.
    pub detours: Vec<DetourSpec<'r>>,
    /// Their members, sorted by record.
    pub members: Vec<MemberSpec>,
    /// The arena for the backend's out-of-line code.
    pub arena: Option<AddrRange>,
}

/// A record's detour (its index in the analysis) and its copy (offset in the stub, room).
type DetourCopy = (usize, (u8, u8));

/// The sites the table will hold: the macros' records, then every patchable swept site that
/// does not overlap one, sorted by address; in a stock kernel, with their load-time detours and
/// the arena.
pub fn plan_sites<'r>(
    report: &'r ScanReport<'_>,
    linked: &[Site],
    opts: &AnnotateOptions,
) -> TablePlan<'r> {
    let image = report.image;
    let mut sites: Vec<Site> = linked.to_vec();
    sites.sort_by_key(|s| s.addr);
    let overlaps_macro = |a: u64, len: u64| {
        let i = sites.partition_point(|s| s.addr < a + len);
        sites[..i].iter().rev().take(4).any(|s| s.end() > a)
    };
    let analysis = &report.analysis;
    let mut scanned: Vec<(Site, Option<DetourCopy>)> = Vec::new();
    for s in &analysis.sites {
        if !s.patchable() || s.room.in_place == 0 {
            continue;
        }
        let section = &image.sections[s.found.section];
        if !opts.sections.is_empty() && !opts.sections.contains(&section.name) {
            continue;
        }
        if overlaps_macro(s.found.addr, s.found.len as u64) {
            continue;
        }
        let mut r = record_for(s);
        let detour = s
            .room
            .detour
            .as_ref()
            .and_then(|m| Some((m.group?, m.copy?)));
        if let Some((g, _)) = detour {
            r.form = Form::Movable;
            r.stub = Some(analysis.detours[g].stub_addr);
        }
        scanned.push((r, detour));
    }
    let from_macros = sites.len();
    let from_scan = scanned.len();
    let mut all: Vec<(Site, Option<DetourCopy>)> = sites.into_iter().map(|s| (s, None)).collect();
    all.extend(scanned);
    all.sort_by_key(|s| s.0.addr);
    // A detour is written only if every site it carries is in the table.
    let mut in_table = vec![0usize; analysis.detours.len()];
    for (_, d) in &all {
        if let Some((g, _)) = d {
            in_table[*g] += 1;
        }
    }
    // A hosted detour needs its host written too: a host that carries sites only if it carries
    // them all; one that carries none (an eviction) whenever a detour it hosts is written.
    let carried = |g: usize| {
        let p = &analysis.detours[g];
        p.members.len() == in_table[g]
            && p.host.is_none_or(|h| {
                let members = analysis.detours[h].members.len();
                members == 0 || members == in_table[h]
            })
    };
    // The detours written: those whose sites are all in the table, and their hosts; their
    // descriptors in the order of their moved ranges (a host may lie on either side).
    let mut written: Vec<usize> = Vec::new();
    for (site, d) in all.iter_mut() {
        let Some((g, _)) = *d else {
            continue;
        };
        if !carried(g) {
            site.form = Form::Native;
            site.stub = None;
            *d = None;
            continue;
        }
        written.push(g);
        written.extend(analysis.detours[g].host);
    }
    written.sort_by_key(|&g| analysis.detours[g].start);
    written.dedup();
    let detours: Vec<DetourSpec<'r>> = written
        .iter()
        .map(|&g| {
            let plan = &analysis.detours[g];
            DetourSpec {
                moved: plan.start,
                moved_len: plan.len,
                stub: plan.stub_addr,
                stub_bytes: &plan.stub,
                tramp: plan.trampoline.as_ref().map(|t| t.0),
                moved_crc: image
                    .read(plan.start, plan.len as usize)
                    .map_or(0, patch_sites::crc32::crc32),
            }
        })
        .collect();
    let mut members = Vec::new();
    for (k, (_, d)) in all.iter().enumerate() {
        let Some((g, (copy_off, copy_len))) = *d else {
            continue;
        };
        let i = written
            .binary_search_by_key(&analysis.detours[g].start, |&w| analysis.detours[w].start);
        let Ok(i) = i else {
            continue;
        };
        members.push(MemberSpec {
            record: k as u32,
            detour: i as u16,
            copy_off,
            copy_len,
        });
    }
    let arena = analysis
        .arena
        .filter(|_| analysis.stock)
        .map(|(a, n)| AddrRange::new(a, a + n));
    TablePlan {
        sites: all.into_iter().map(|s| s.0).collect(),
        from_macros,
        from_scan,
        detours,
        members,
        arena,
    }
}

/// Where the table goes: the first [`SEALED_ALIGN`] boundary at or after the end of the highest
/// loadable segment (and of every allocated section, should one lie beyond the segments in a
/// malformed image), not counting an existing table.
pub fn table_address(image: &Image) -> Option<u64> {
    let ours = [
        image.section(SEALED_SECTION),
        image.section(crate::shim::SHIM_SECTION),
        image.section(crate::shim::PLANS_SECTION),
    ];
    let is_existing = |p: &crate::load::image::Segment| {
        ours.iter()
            .flatten()
            .any(|t| p.offset == t.offset && p.vaddr == t.addr && p.filesz == t.size)
    };
    let segments = image
        .segments
        .iter()
        .filter(|s| s.kind == elf::PT_LOAD && !is_existing(s))
        .filter_map(|s| s.vaddr.checked_add(s.memsz));
    let sections = image
        .sections
        .iter()
        .filter(|s| {
            s.is_alloc()
                && s.size > 0
                && s.name != SEALED_SECTION
                && s.name != crate::shim::SHIM_SECTION
                && s.name != crate::shim::PLANS_SECTION
        })
        .filter_map(|s| s.addr.checked_add(s.size));
    segments
        .chain(sections)
        .max()
        .and_then(|e| e.checked_next_multiple_of(SEALED_ALIGN))
}

/// Why [`table_address`] found no place for the table: no loadable segment at all, or one that
/// reaches the top of the address space (nothing can follow it).
fn no_room_for_the_table(image: &Image) -> AnnotateError {
    match image
        .segments
        .iter()
        .find(|s| s.kind == elf::PT_LOAD && s.vaddr.checked_add(s.memsz).is_none())
    {
        Some(s) => AnnotateError::NotRewritable(format!(
            "the loadable segment at {:#x} ({:#x} bytes) reaches the top of the address space: \
             there is no room for the site table after it",
            s.vaddr, s.memsz
        )),
        None if image.segments.iter().any(|s| s.kind == elf::PT_LOAD) => {
            AnnotateError::NotRewritable(
                "no room for the site table after the highest loadable segment or section: \
                 it would pass the top of the address space"
                    .into(),
            )
        }
        None => AnnotateError::NoLoadSegment,
    }
}

/// Checks what object's ELF builder assumes of an image it rewrites (it computes with section
/// and segment alignments, and would overflow on hostile ones).
fn rewritable(image: &Image) -> Result<(), AnnotateError> {
    let ok = |a: u64, max: u64| a == 0 || (a.is_power_of_two() && a <= max);
    for s in &image.sections {
        // Loaded sections keep their file offsets; the others are moved after the new section
        // and padded to their alignment, so theirs must stay small.
        let max = if s.is_alloc() { 1 << 32 } else { 1 << 16 };
        if !ok(s.align, max) {
            return Err(AnnotateError::NotRewritable(format!(
                "section [{}] {} has alignment {:#x}, not a power of two up to {max:#x}",
                s.index, s.name, s.align
            )));
        }
    }
    // Tables of 8-byte records: the builder may move a non-loaded one, and places it by its
    // declared alignment; readers need the records aligned.
    let records = [
        elf::SHT_SYMTAB,
        elf::SHT_DYNSYM,
        elf::SHT_RELA,
        elf::SHT_REL,
        elf::SHT_DYNAMIC,
    ];
    for s in &image.sections {
        if records.contains(&s.kind) && s.size > 0 && s.align < 8 {
            return Err(AnnotateError::NotRewritable(format!(
                "section [{}] {} holds 8-byte records but declares alignment {}",
                s.index, s.name, s.align
            )));
        }
    }
    // One more program header must fit before the first section's data: the builder does not
    // move the program header table, and every original header stays where it is.
    let b = image.bytes();
    let field = |at: usize, n: usize| -> u64 {
        b.get(at..at + n)
            .map_or(0, |x| x.iter().rev().fold(0, |v, &y| (v << 8) | y as u64))
    };
    let (phoff, phnum) = (field(0x20, 8), field(0x38, 2));
    let needed = phoff.saturating_add((phnum + 1) * 56);
    if let Some(first) = image
        .sections
        .iter()
        .filter(|s| s.has_file_data() && s.is_alloc())
        .min_by_key(|s| s.offset)
        && needed > first.offset
    {
        return Err(AnnotateError::NotRewritable(format!(
            "the program header table has no room for one more entry: {phnum} entries at \
             {phoff:#x} plus one end at {needed:#x}, but section [{}] {} starts at {:#x}",
            first.index, first.name, first.offset
        )));
    }
    for (i, p) in image.segments.iter().enumerate() {
        if !ok(p.align, 1 << 32) {
            return Err(AnnotateError::NotRewritable(format!(
                "program header {i} has alignment {:#x}, not a power of two up to 4 GiB",
                p.align
            )));
        }
    }
    Ok(())
}

/// Runs object's ELF builder; a panic inside it (a case the checks above do not foresee) is
/// an error for this image, not a crash of the tool.
fn contain<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, AnnotateError>,
) -> Result<T, AnnotateError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(AnnotateError::Elf(format!(
            "object's ELF builder failed while {what} this image"
        )))
    })
}

/// Makes the builder copy every section except the section-name table as raw bytes: symbol,
/// string, relocation, dynamic and version sections would otherwise be rebuilt (with the same
/// meaning but not the same bytes). Sections keep their indices, since the new one is appended.
fn keep_sections_raw<'data>(
    b: &mut Builder<'data>,
    bytes: &'data [u8],
) -> Result<(), AnnotateError> {
    for s in b.sections.iter_mut() {
        let keep = matches!(
            s.data,
            SectionData::SectionString | SectionData::UninitializedData(_)
        ) || s.sh_type == elf::SHT_NOBITS
            || s.sh_type == elf::SHT_NULL;
        if keep {
            continue;
        }
        let raw = bytes
            .get(s.sh_offset as usize..)
            .and_then(|b| b.get(..s.sh_size as usize))
            .ok_or_else(|| {
                AnnotateError::Elf(format!("section {} lies outside the file", s.name))
            })?;
        // Borrowed from the mapping: the image is never copied.
        s.data = SectionData::Data(raw.into());
    }
    for sym in b.symbols.iter_mut() {
        sym.delete = true;
    }
    for sym in b.dynamic_symbols.iter_mut() {
        sym.delete = true;
    }
    Ok(())
}

/// Bytes at the end of the file that no section, segment or header table covers.
pub fn trailing_bytes(image: &Image) -> &[u8] {
    let bytes = image.bytes();
    let mut end = 64u64;
    for s in &image.sections {
        if s.has_file_data() {
            end = end.max(s.offset + s.size);
        }
    }
    for p in &image.segments {
        end = end.max(p.offset.saturating_add(p.filesz));
    }
    let shoff = u64::from_le_bytes(
        bytes
            .get(0x28..0x30)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 8]),
    );
    let shnum = u16::from_le_bytes([
        bytes.get(0x3c).copied().unwrap_or(0),
        bytes.get(0x3d).copied().unwrap_or(0),
    ]);
    let phoff = u64::from_le_bytes(
        bytes
            .get(0x20..0x28)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 8]),
    );
    let phnum = u16::from_le_bytes([
        bytes.get(0x38).copied().unwrap_or(0),
        bytes.get(0x39).copied().unwrap_or(0),
    ]);
    end = end.max(shoff.saturating_add(shnum as u64 * 64));
    end = end.max(phoff.saturating_add(phnum as u64 * 56));
    bytes.get(end as usize..).unwrap_or(&[])
}

/// Builds the table for `report` and writes the annotated image to `out`, atomically. Every
/// check runs before the output file is created.
pub fn annotate(
    report: &ScanReport<'_>,
    out: &Path,
    opts: &AnnotateOptions,
) -> Result<Annotation, AnnotateError> {
    let prepared = prepare(report, opts)?;
    let mut result = None;
    let mut failure = None;
    // Before the output replaces anything, it must load and verify as a runtime would see it.
    let check = |tmp: &Path| -> Result<(), OutputError> {
        let img = Image::open_with(tmp, false)
            .map_err(|e| OutputError::Content(format!("the output does not load: {e}")))?;
        let v = crate::verify::verify(&img)
            .map_err(|e| OutputError::Content(format!("the output does not verify: {e}")))?;
        match v.mismatches.first() {
            Some(m) => Err(OutputError::Content(format!(
                "the output does not verify: record {}: {}",
                m.index, m.what
            ))),
            None if !v.placement_ok => Err(OutputError::Content("the table is misplaced".into())),
            None => Ok(()),
        }
    };
    let written =
        write_atomic(
            out,
            Some(&report.image.path),
            Some(&check),
            |w| match write_annotated(report, &prepared, w) {
                Ok(a) => {
                    result = Some(a);
                    Ok(())
                }
                Err(AnnotateError::Output(o)) => Err(o),
                Err(e) => {
                    let msg = e.to_string();
                    failure = Some(e);
                    Err(OutputError::Content(msg))
                }
            },
        );
    if let Some(e) = failure {
        return Err(e);
    }
    written?;
    result.ok_or_else(|| AnnotateError::Internal("no output was produced".into()))
}

/// Builds the table for `report` and writes the annotated image into `w`.
pub fn annotate_into(
    report: &ScanReport<'_>,
    opts: &AnnotateOptions,
    w: &mut dyn Write,
) -> Result<Annotation, AnnotateError> {
    let prepared = prepare(report, opts)?;
    write_annotated(report, &prepared, w)
}

/// The table `annotate` would write for `report`, and its address, checked as a runtime will
/// check it; nothing is written.
pub fn table_bytes(
    report: &ScanReport<'_>,
    opts: &AnnotateOptions,
) -> Result<(Vec<u8>, u64), AnnotateError> {
    let p = prepare(report, opts)?;
    Ok((p.table, p.table_addr))
}

/// A checked table, ready to be written.
struct Prepared {
    shim: Option<crate::shim::Shim>,
    table: Vec<u8>,
    table_addr: u64,
    sites: usize,
    from_macros: usize,
    from_scan: usize,
}

/// The sites and table bytes for `report`, checked as a runtime will check them.
fn prepare(report: &ScanReport<'_>, opts: &AnnotateOptions) -> Result<Prepared, AnnotateError> {
    let image = report.image;
    rewritable(image)?;
    if image.section(SEALED_SECTION).is_some() && !opts.force {
        return Err(AnnotateError::AlreadyAnnotated(
            image.path.display().to_string(),
        ));
    }
    for name in &opts.sections {
        let named: Vec<_> = image.sections.iter().filter(|s| &s.name == name).collect();
        if named.is_empty() {
            return Err(AnnotateError::Usage(format!(
                "--section {}: the image has no section of that name",
                crate::quoted(name)
            )));
        }
        if !named.iter().any(|s| s.is_exec()) {
            return Err(AnnotateError::Usage(format!(
                "--section {}: not an executable section (sh_type {}, sh_flags {:#x}): it has no \
                 sites to record",
                crate::quoted(name),
                named[0].kind,
                named[0].flags
            )));
        }
    }
    let linked = linked_sites(image).map_err(AnnotateError::LinkedTable)?;
    let plan = plan_sites(report, &linked, opts);
    let (from_macros, from_scan) = (plan.from_macros, plan.from_scan);
    let table_addr = table_address(image).ok_or_else(|| no_room_for_the_table(image))?;
    let mut table = vec![
        0u8;
        sealed_table_size_with(
            plan.sites.len(),
            &plan.detours,
            plan.members.len(),
            plan.arena.is_some()
        )
    ];
    write_sealed_table_with(
        &plan.sites,
        &plan.detours,
        &plan.members,
        plan.arena,
        table_addr,
        &mut table,
    )
    .map_err(|e| match e {
        patch_sites::table::WriteError::Site {
            index,
            error: patch_sites::table::RecordError::OffsetOutOfRange,
        } => AnnotateError::NotRewritable(format!(
            "the site at {:#x} is more than 2 GiB from where the site table goes ({table_addr:#x}): \
             a record holds a 32-bit offset to its site",
            plan.sites.get(index).map_or(0, |s| s.addr)
        )),
        e => AnnotateError::Table(e),
    })?;
    let sites = plan.sites;
    // Check what was written exactly as the runtime will.
    SiteTable::parse_contiguous(&table, table_addr, &image.code_ranges()).map_err(|e| {
        AnnotateError::Internal(format!("the written table does not parse back: {e}"))
    })?;
    if opts.boot_shim.is_some() && crate::shim::linux_entry(image).is_none() {
        return Err(crate::shim::ShimError::NoPvhEntry.into());
    }
    Ok(Prepared {
        shim: opts.boot_shim.clone(),
        table,
        table_addr,
        sites: sites.len(),
        from_macros,
        from_scan,
    })
}

/// Writes the image with the prepared table into `w`.
fn write_annotated(
    report: &ScanReport<'_>,
    p: &Prepared,
    w: &mut dyn Write,
) -> Result<Annotation, AnnotateError> {
    let image = report.image;
    let (table, table_addr) = (&p.table, p.table_addr);
    let trailing = trailing_bytes(image);
    let elf_err = |e: object::build::Error| AnnotateError::Elf(e.to_string());
    let mut b = contain("reading", || Builder::read(image.bytes()).map_err(elf_err))?;
    keep_sections_raw(&mut b, image.bytes())?;
    // An existing table and shim (with --force): drop their sections and segments first.
    let mut old = Vec::new();
    for s in b.sections.iter_mut() {
        let n = s.name.as_slice();
        if n == SEALED_SECTION.as_bytes()
            || n == crate::shim::SHIM_SECTION.as_bytes()
            || n == crate::shim::PLANS_SECTION.as_bytes()
        {
            s.delete = true;
            old.push(s.id());
        }
    }
    for seg in b.segments.iter_mut() {
        if seg.sections.iter().any(|id| old.contains(id)) {
            seg.delete = true;
        }
    }
    let (delta, file_end) = {
        let top = b
            .segments
            .iter()
            .filter(|s| s.is_load() && !s.delete)
            .max_by_key(|s| s.p_vaddr.saturating_add(s.p_memsz))
            .ok_or(AnnotateError::NoLoadSegment)?;
        let delta = top.p_vaddr.wrapping_sub(top.p_paddr);
        let mut end = 0u64;
        for s in b.segments.iter().filter(|s| s.is_load() && !s.delete) {
            end = end.max(s.p_offset.saturating_add(s.p_filesz));
        }
        for s in b
            .sections
            .iter()
            .filter(|s| s.is_alloc() && !s.delete && s.sh_type != elf::SHT_NOBITS)
        {
            end = end.max(s.sh_offset.saturating_add(s.sh_size));
        }
        (delta, end)
    };
    let offset = file_end
        .checked_next_multiple_of(SEALED_ALIGN)
        .ok_or_else(|| AnnotateError::Elf("file offsets overflow".into()))?;
    let size = table.len() as u64;
    add_loaded(
        &mut b,
        Loaded {
            name: SEALED_SECTION,
            data: table.clone(),
            sh_flags: elf::SHF_ALLOC,
            p_flags: elf::PF_R,
            vaddr: table_addr,
            paddr: table_addr.wrapping_sub(delta),
            offset,
            memsz: size,
            align: 8,
        },
    );
    let (shim, prepared) = match &p.shim {
        Some(sh) => {
            let (at, notes) = add_shim(&mut b, image, sh, (table_addr, table), offset + size)?;
            (Some(at), notes)
        }
        None => (None, Vec::new()),
    };
    let io = |source| {
        AnnotateError::Output(OutputError::Io {
            path: image.path.clone(),
            source,
        })
    };
    let mut stream = StreamingBuffer::new(&mut *w);
    contain("writing", || b.write(&mut stream).map_err(elf_err))?;
    stream.result().map_err(io)?;
    w.write_all(trailing).map_err(io)?;
    Ok(Annotation {
        table_addr,
        shim,
        prepared,
        table_size: table.len(),
        sites: p.sites,
        from_macros: p.from_macros,
        from_scan: p.from_scan,
        trailing: trailing.len(),
        table: table.clone(),
    })
}

/// A section of pvpatch's own, loaded by a segment of its own.
struct Loaded {
    name: &'static str,
    data: Vec<u8>,
    sh_flags: u32,
    p_flags: u32,
    vaddr: u64,
    paddr: u64,
    /// Its file offset.
    offset: u64,
    /// Bytes in memory (at least its data's).
    memsz: u64,
    /// The section's alignment.
    align: u64,
}

/// Adds `l`'s section and the segment that loads it.
fn add_loaded(b: &mut Builder<'_>, l: Loaded) {
    let size = l.data.len() as u64;
    let id = {
        let s = b.sections.add();
        s.name = l.name.as_bytes().to_vec().into();
        s.sh_type = elf::SHT_PROGBITS;
        s.sh_flags = u64::from(l.sh_flags);
        s.sh_addr = l.vaddr;
        s.sh_offset = l.offset;
        s.sh_size = size;
        s.sh_addralign = l.align;
        s.data = SectionData::Data(l.data.into());
        s.id()
    };
    let seg = b.segments.add();
    seg.p_type = elf::PT_LOAD;
    seg.p_flags = l.p_flags;
    seg.p_offset = l.offset;
    seg.p_vaddr = l.vaddr;
    seg.p_paddr = l.paddr;
    seg.p_filesz = size;
    seg.p_memsz = l.memsz;
    seg.p_align = SEALED_ALIGN;
    seg.sections.push(id);
}

/// Adds the boot shim's section and segment after the table's (file offset `after`), with its
/// parameters, and the plans prepared for it at link time in a segment of their own after the
/// shim's memory; points the PVH entry note at the shim. Returns the shim's physical address
/// and its report page's, and what was prepared.
fn add_shim(
    b: &mut Builder<'_>,
    image: &Image,
    sh: &crate::shim::Shim,
    (table_addr, table): (u64, &[u8]),
    after: u64,
) -> Result<((u64, u64), Vec<crate::shim::PreparedNote>), AnnotateError> {
    let loads: Vec<(u64, u64, u64)> = b
        .segments
        .iter()
        .filter(|s| s.is_load() && !s.delete)
        .map(|s| (s.p_vaddr, s.p_paddr, s.p_memsz))
        .collect();
    let (mut params, phys) =
        crate::shim::params(image, sh, &loads, (table_addr, table.len() as u64))?;
    let (plans, notes) = crate::shim::prepare_plans(image, table, table_addr)?;
    let plans_at = sh.memsz.next_multiple_of(PLANS_ALIGN);
    params.plans_phys = phys + plans_at;
    params.plans_len = plans.len() as u64;
    if params.plans_phys + params.plans_len > 1 << 32 {
        return Err(crate::shim::ShimError::Layout(format!(
            "the shim's prepared plans ({} bytes) would end above 4 GiB",
            plans.len()
        ))
        .into());
    }
    let bytes = crate::shim::with_params(sh, &params);
    let offset = after
        .checked_next_multiple_of(SEALED_ALIGN)
        .ok_or_else(|| AnnotateError::Elf("file offsets overflow".into()))?;
    let plans_offset = (offset + bytes.len() as u64)
        .checked_next_multiple_of(SEALED_ALIGN)
        .ok_or_else(|| AnnotateError::Elf("file offsets overflow".into()))?;
    add_loaded(
        b,
        Loaded {
            name: crate::shim::SHIM_SECTION,
            data: bytes,
            sh_flags: elf::SHF_ALLOC | elf::SHF_EXECINSTR | elf::SHF_WRITE,
            p_flags: elf::PF_R | elf::PF_W | elf::PF_X,
            vaddr: sh.vaddr,
            paddr: phys,
            offset,
            memsz: sh.memsz,
            align: 16,
        },
    );
    // The PVH entry note, wherever a note section holds it.
    let mut pointed = false;
    for s in b
        .sections
        .iter_mut()
        .filter(|s| s.sh_type == elf::SHT_NOTE && !s.delete)
    {
        if let SectionData::Data(d) = &s.data
            && let Some(new) = crate::shim::point_pvh_note(d, phys)
        {
            s.data = SectionData::Data(new.into());
            pointed = true;
        }
    }
    if !pointed {
        return Err(crate::shim::ShimError::NoPvhEntry.into());
    }
    let plans_len = plans.len() as u64;
    add_loaded(
        b,
        Loaded {
            name: crate::shim::PLANS_SECTION,
            data: plans,
            sh_flags: elf::SHF_ALLOC,
            p_flags: elf::PF_R,
            vaddr: sh.vaddr + plans_at,
            paddr: params.plans_phys,
            offset: plans_offset,
            memsz: plans_len,
            align: 8,
        },
    );
    Ok(((phys, phys + sh.report_at), notes))
}

/// The sealed table of an annotated image: its address and bytes, found by section name.
pub fn sealed_table(image: &Image) -> Option<(u64, &[u8])> {
    let s = image.section(SEALED_SECTION)?;
    Some((s.addr, image.section_data(s)))
}
