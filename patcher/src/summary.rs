//! The human summary of a scan: Linux's tables, sites per class, sites per section.

use std::fmt::Write as _;

use patch_sites::Op;

use crate::ScanReport;
use crate::ledger::{code_info, summary};
use crate::sites::{SiteCounts, count};

/// The human summary: tables, a table per class, a table per section.
pub fn human_summary(report: &ScanReport<'_>) -> String {
    human_summary_with_counts(report, &count(report))
}

/// The human summary of a scan whose sites are counted already.
pub fn human_summary_with_counts(report: &ScanReport<'_>, counts: &SiteCounts) -> String {
    let image = report.image;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{}: x86-64 {}, {} bytes, {} function symbols{}",
        image.path.display(),
        if image.elf_type == object::elf::ET_DYN {
            "ET_DYN"
        } else {
            "ET_EXEC"
        },
        image.bytes().len(),
        image.symbols.len(),
        if image.symbols.is_empty() {
            " (stripped)"
        } else {
            ""
        }
    );
    if let Some(b) = &image.bzimage {
        let _ = writeln!(
            o,
            "  a bzImage ({} bytes): its {} payload extracted in memory (checks: {})",
            b.size,
            b.compression,
            b.checks.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "swept {} bytes of code, {} instructions, in {:.1} ms; {} resynchronisations",
        report.sweep.bytes,
        report.sweep.instructions,
        report.elapsed.as_secs_f64() * 1e3,
        report.sweep.resync_count
    );
    let _ = writeln!(o, "\nLinux tables:");
    for r in &report.tables.reports {
        if !r.present {
            let _ = writeln!(o, "  {:<22} absent", r.kind.section());
        } else if let Some(p) = &r.problem {
            let _ = writeln!(o, "  {:<22} NOT USED: {p}", r.kind.section());
        } else if r.entry_size == 0 {
            let _ = writeln!(
                o,
                "  {:<22} {} bytes of {}",
                r.kind.section(),
                r.size,
                r.layout.unwrap_or("")
            );
        } else {
            let pad = if r.padding > 0 {
                format!(" (+{} padding)", r.padding)
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "  {:<22} {:>7} entries{pad}: {}",
                r.kind.section(),
                r.entries,
                r.layout.unwrap_or("")
            );
        }
    }
    if report.tables.orc_inside_patch_sites > 0 {
        let _ = writeln!(
            o,
            "  ({} ORC IPs inside paravirt/alternative sites describe the patched code; not used \
             as instruction starts)",
            report.tables.orc_inside_patch_sites
        );
    }

    let _ = writeln!(o, "\nSensitive instructions by class:");
    let stock = report.analysis.stock;
    let last = if stock { "native" } else { "trap" };
    let _ = writeln!(
        o,
        "  {:<14} {:>6} {:>9} {:>10} {:>9} {:>7} {:>6}",
        "class", "sites", "covered", "in-place5", "in-place", "detour", last
    );
    for (id, c) in &counts.by_op {
        let name = Op::from_id(*id).map(Op::name).unwrap_or("?");
        // Stock kernels: rewritable sites with no way out of line; others: only a trap fits.
        let trap_only = if stock { c.native } else { c.trap_only };
        let _ = writeln!(
            o,
            "  {:<14} {:>6} {:>9} {:>10} {:>9} {:>7} {:>6}",
            name, c.sites, c.covered, c.in_place5, c.in_place_small, c.detour, trap_only
        );
    }
    let s = summary(report, counts);
    let _ = writeln!(
        o,
        "  {:<14} {:>6} {:>9}   patchable: {}, hypervisor interfaces: {}",
        "total", s.sites, s.covered, s.patchable, s.hypervisor_interfaces
    );
    if stock {
        let _ = writeln!(
            o,
            "  (in-place5: room for a call; in-place: less than 5 bytes; detour: can move \
             neighbouring code to a cave stub; native: no way out of line)"
        );
        let _ = writeln!(
            o,
            "\nStock kernel ({} symbols from {}): detours forward {}, backward {}, around {} ({} \
             stubs, {} through trampolines, {} of them in another detour's moved range; {} \
             ranges moved only to make room); {} caves of {} bytes, arena {}",
            report.image.symbols.len(),
            report.image.symbol_source.name(),
            s.detours_forward,
            s.detours_backward,
            s.detours_around,
            s.stubs,
            s.trampolines,
            s.hosted,
            s.evicted,
            s.caves,
            s.cave_bytes,
            s.arena.as_deref().unwrap_or("none")
        );
        o.push_str(&crate::sites::native_breakdown(
            s.out_of_line,
            s.rewritable,
            &s.native_reasons,
            &s.pinned_reasons,
        ));
    } else {
        let _ = writeln!(
            o,
            "  (in-place5: room for a call; in-place: less than 5 bytes; detour: \
                         can move following code; trap: only an int3 fits)"
        );
    }

    let _ = writeln!(o, "\nBy section:");
    for c in code_info(report, counts).sections {
        let _ = writeln!(
            o,
            "  {:<22} {:>18} {:>10} bytes {:>9} instructions {:>6} sites",
            c.name, c.address, c.size, c.instructions, c.sites
        );
    }
    o
}
