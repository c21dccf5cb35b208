//! Visiting the sites of a scan, in address order, whether it kept them ([`crate::scan_image`])
//! or not ([`crate::scan_image_streamed`]): a scan that keeps none decodes and analyses each
//! one again ([`crate::analyse::site_info`], the function that analyses a kept one) when it is
//! visited, so that what is written of a site is the same either way. And what is counted of
//! them, for the ledger's summary and the human one.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use patch_sites::op::Kind;

use crate::ScanReport;
use crate::analyse::{Direction, SiteInfo, site_info};
use crate::sweep::Resync;

/// Calls `f` with every site of `report`, in address order, until it fails.
pub fn for_each_site<E>(
    report: &ScanReport<'_>,
    mut f: impl FnMut(&SiteInfo) -> Result<(), E>,
) -> Result<(), E> {
    if report.sweep.kept {
        return report.analysis.sites.iter().try_for_each(f);
    }
    for chunk in 0..report.sweep.chunk_count() {
        replay_sites(report, chunk..chunk + 1, &mut f)?;
    }
    Ok(())
}

/// Calls `f` with every resynchronisation of the sweep, in address order, until it fails.
pub fn for_each_resync<E>(
    report: &ScanReport<'_>,
    mut f: impl FnMut(&Resync) -> Result<(), E>,
) -> Result<(), E> {
    if report.sweep.kept {
        return report.sweep.resyncs.iter().try_for_each(f);
    }
    let mut out = Ok(());
    for chunk in 0..report.sweep.chunk_count() {
        report
            .sweep
            .replay_resyncs(report.image, chunk..chunk + 1, &mut |r| {
                if out.is_ok() {
                    out = f(&r);
                }
            });
        if out.is_err() {
            break;
        }
    }
    out
}

/// The sites of chunks `range`, analysed, to `f` (a scan that kept none).
fn replay_sites<E>(
    report: &ScanReport<'_>,
    range: std::ops::Range<usize>,
    f: &mut impl FnMut(&SiteInfo) -> Result<(), E>,
) -> Result<(), E> {
    let (image, sweep, analysis) = (report.image, &report.sweep, &report.analysis);
    let mut out = Ok(());
    sweep.replay_sites(image, range, &mut |found| {
        if out.is_ok() {
            let s = site_info(
                image,
                &report.tables,
                sweep,
                &analysis.guards,
                analysis.stock,
                &found,
            );
            out = f(&s);
        }
    });
    out
}

/// Per class, for the human summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts {
    /// Sites.
    pub sites: usize,
    /// Covered by one of Linux's tables.
    pub covered: usize,
    /// With 5 bytes or more in place.
    pub in_place5: usize,
    /// With 1 to 4 bytes in place.
    pub in_place_small: usize,
    /// With a detour.
    pub detour: usize,
    /// Rewritable with no way out of line.
    pub native: usize,
    /// With less than 5 bytes in place and no detour (only a trap fits).
    pub trap_only: usize,
}

impl std::ops::AddAssign for ClassCounts {
    fn add_assign(&mut self, o: ClassCounts) {
        self.sites += o.sites;
        self.covered += o.covered;
        self.in_place5 += o.in_place5;
        self.in_place_small += o.in_place_small;
        self.detour += o.detour;
        self.native += o.native;
        self.trap_only += o.trap_only;
    }
}

/// What is counted of the sites of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteCounts {
    /// Sites.
    pub sites: usize,
    /// Covered by one of Linux's tables.
    pub covered: usize,
    /// That pvpatch may record.
    pub patchable: usize,
    /// Hypervisor interfaces.
    pub hypervisor_interfaces: usize,
    /// That a backend may rewrite.
    pub rewritable: usize,
    /// Of those, that reach out-of-line code.
    pub out_of_line: usize,
    /// With a planned detour forward, backward, around.
    pub detours: [usize; 3],
    /// Why rewritable sites have no way out of line, with how many.
    pub native_reasons: BTreeMap<String, usize>,
    /// The part of `native_reasons` that is Linux's own design, whatever the rewriter
    /// ([`crate::analyse::Room::pinned`]).
    pub pinned_reasons: BTreeMap<String, usize>,
    /// Per class name.
    pub by_class: BTreeMap<&'static str, usize>,
    /// Per op id.
    pub by_op: BTreeMap<u16, ClassCounts>,
    /// Per section (by its index in the image's sections).
    pub per_section: Vec<usize>,
}

impl SiteCounts {
    fn new(sections: usize) -> SiteCounts {
        SiteCounts {
            per_section: vec![0; sections],
            ..SiteCounts::default()
        }
    }

    /// Counts `s`.
    fn add(&mut self, s: &SiteInfo) {
        let op = s.found.op();
        let rewritable = s.rewritable();
        let reaches = s.reaches_out_of_line();
        self.sites += 1;
        self.covered += usize::from(s.covered_by.is_some());
        self.patchable += usize::from(s.patchable());
        self.hypervisor_interfaces += usize::from(op.info().kind == Kind::HypervisorInterface);
        self.rewritable += usize::from(rewritable);
        self.out_of_line += usize::from(rewritable && reaches);
        if let Some(m) = &s.room.detour
            && m.group.is_some()
        {
            self.detours[match m.direction {
                Direction::Forward => 0,
                Direction::Backward => 1,
                Direction::Around => 2,
            }] += 1;
        }
        if rewritable && !reaches {
            let why = s.room.why.as_deref().unwrap_or("unknown");
            bump(&mut self.native_reasons, why);
            if s.room.pinned {
                bump(&mut self.pinned_reasons, why);
            }
        }
        *self.by_class.entry(op.name()).or_default() += 1;
        let room = &s.room;
        *self.by_op.entry(op.id()).or_default() += ClassCounts {
            sites: 1,
            covered: usize::from(s.covered_by.is_some()),
            in_place5: usize::from(room.in_place >= 5),
            in_place_small: usize::from(room.in_place > 0 && room.in_place < 5),
            detour: usize::from(room.detour.is_some()),
            native: usize::from(rewritable && !reaches),
            trap_only: usize::from(room.in_place > 0 && room.in_place < 5 && room.detour.is_none()),
        };
        if let Some(n) = self.per_section.get_mut(s.found.section) {
            *n += 1;
        }
    }

    fn merge(&mut self, other: SiteCounts) {
        self.sites += other.sites;
        self.covered += other.covered;
        self.patchable += other.patchable;
        self.hypervisor_interfaces += other.hypervisor_interfaces;
        self.rewritable += other.rewritable;
        self.out_of_line += other.out_of_line;
        for (a, b) in self.detours.iter_mut().zip(other.detours) {
            *a += b;
        }
        add_counts(&mut self.native_reasons, other.native_reasons);
        add_counts(&mut self.pinned_reasons, other.pinned_reasons);
        add_counts(&mut self.by_class, other.by_class);
        add_counts(&mut self.by_op, other.by_op);
        for (a, b) in self.per_section.iter_mut().zip(other.per_section) {
            *a += b;
        }
    }
}

/// Adds every count of `from` to `into`'s under the same key.
fn add_counts<K: Ord, V: Default + std::ops::AddAssign>(
    into: &mut BTreeMap<K, V>,
    from: BTreeMap<K, V>,
) {
    for (k, n) in from {
        *into.entry(k).or_default() += n;
    }
}

/// For people: the rewritable sites with no way out of line, by reason, those Linux's own
/// design keeps in place first (`pinned`, a part of `native`), each group by count; with the
/// share of the others out of line (`out` of `rewritable`) as a first line.
pub fn native_breakdown(
    out: usize,
    rewritable: usize,
    native: &BTreeMap<String, usize>,
    pinned: &BTreeMap<String, usize>,
) -> String {
    use std::fmt::Write as _;
    let pct = |a: usize, b: usize| {
        if b == 0 {
            100.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let held: usize = pinned.values().sum();
    let mut o = format!(
        "{out} of {rewritable} rewritable sites ({:.1}%) reach out-of-line code; {out} of {} \
         ({:.1}%) leaving out the {held} that Linux's own design keeps in place\n",
        pct(out, rewritable),
        rewritable - held.min(rewritable),
        pct(out, rewritable - held.min(rewritable)),
    );
    let ours: BTreeMap<&String, usize> = native
        .iter()
        .map(|(k, &n)| (k, n - pinned.get(k).copied().unwrap_or(0).min(n)))
        .filter(|&(_, n)| n > 0)
        .collect();
    let theirs: BTreeMap<&String, usize> = pinned.iter().map(|(k, &n)| (k, n)).collect();
    for (title, group) in [
        ("kept in place by Linux's design", theirs),
        ("kept in place by pvpatch's limits", ours),
    ] {
        if group.is_empty() {
            continue;
        }
        let _ = writeln!(o, "  {title} ({}):", group.values().sum::<usize>());
        let mut v: Vec<_> = group.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (why, n) in v {
            let _ = writeln!(o, "    {n:>5}  {why}");
        }
    }
    o
}

/// One more of `key` in `counts` (allocating the key only the first time).
fn bump(counts: &mut BTreeMap<String, usize>, key: &str) {
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_owned(), 1);
        }
    }
}

/// Counts the sites of `report` (a scan that kept none: on the sweep's threads, a chunk at a
/// time).
pub fn count(report: &ScanReport<'_>) -> SiteCounts {
    let sections = report.image.sections.len();
    let mut total = SiteCounts::new(sections);
    if report.sweep.kept {
        for s in &report.analysis.sites {
            total.add(s);
        }
        return total;
    }
    let chunks = report.sweep.chunk_count();
    let threads = report.sweep.threads().clamp(1, chunks.max(1));
    let next = AtomicUsize::new(0);
    let merged = Mutex::new(total);
    let work = || {
        let mut mine = SiteCounts::new(sections);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= chunks {
                break;
            }
            let _ = replay_sites(report, i..i + 1, &mut |s| {
                mine.add(s);
                Ok::<(), ()>(())
            });
        }
        merged.lock().unwrap_or_else(|p| p.into_inner()).merge(mine);
    };
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(work);
            }
        });
    }
    merged.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breakdown_puts_linux_s_reasons_first_and_leaves_them_out_of_the_second_share() {
        let native: BTreeMap<String, usize> = [("copied", 3), ("branch target", 2), ("shadow", 1)]
            .map(|(k, n)| (k.to_owned(), n))
            .into();
        let pinned: BTreeMap<String, usize> = [("copied", 3), ("shadow", 1)]
            .map(|(k, n)| (k.to_owned(), n))
            .into();
        let text = native_breakdown(94, 100, &native, &pinned);
        assert_eq!(
            text,
            "94 of 100 rewritable sites (94.0%) reach out-of-line code; 94 of 96 (97.9%) leaving \
             out the 4 that Linux's own design keeps in place\n  \
             kept in place by Linux's design (4):\n        3  copied\n        1  shadow\n  \
             kept in place by pvpatch's limits (2):\n        2  branch target\n"
        );
        // Nothing pinned: one group, and both shares equal.
        let text = native_breakdown(98, 100, &native, &BTreeMap::new());
        assert!(text.starts_with(
            "98 of 100 rewritable sites (98.0%) reach out-of-line code; 98 of 100 (98.0%)"
        ));
        assert!(!text.contains("Linux's design ("));
    }
}
