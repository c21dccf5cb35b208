//! Code caves: where out-of-line code (detour stubs, a backend's thunks) can live in a stock
//! kernel for the kernel's whole life.
//!
//! Only inside `[_text, _etext)`: everything after `_etext` is made non-executable or freed once
//! Linux has booted, and memory outside the image is not executable in Linux's direct map. There,
//! a cave is a run of `int3` alignment padding that:
//!
//! * no symbol, table entry or direct branch target falls in;
//! * is covered by an undefined ORC entry (the one at the run's start, whose stack-pointer
//!   register is `ORC_REG_UNDEFINED`) and by no other: an unwind from inside stops as
//!   unreliable instead of going wrong.
//!
//! Space is handed out deterministically: the lowest cave with room first, 16-byte aligned.

use crate::analyse::guard::Guards;
use crate::load::{Image, Section};
use crate::sweep::Sweep;

/// The shortest run worth using.
pub const MIN_CAVE: u64 = 64;

/// A cave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cave {
    /// First byte.
    pub start: u64,
    /// One past the last.
    pub end: u64,
}

impl Cave {
    /// Its size.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The ORC table: every IP with its entry, sorted by IP.
#[derive(Clone, Debug, Default)]
pub struct Orc {
    entries: Vec<(u64, [u8; 6])>,
}

impl Orc {
    /// The image's ORC table, if it has a consistent one.
    pub fn read(image: &Image) -> Option<Orc> {
        let ips: &Section = image.section(".orc_unwind_ip")?;
        let units: &Section = image.section(".orc_unwind")?;
        let ip_data = image.section_data(ips);
        let unit_data = image.section_data(units);
        let n = ip_data.len() / 4;
        if n == 0 || unit_data.len() / 6 != n {
            return None;
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let rel = i32::from_le_bytes(ip_data[4 * i..4 * i + 4].try_into().ok()?);
            let ip = (ips.addr + 4 * i as u64).checked_add_signed(rel as i64)?;
            entries.push((ip, unit_data[6 * i..6 * i + 6].try_into().ok()?));
        }
        entries.sort_unstable_by_key(|e| e.0);
        Some(Orc { entries })
    }

    /// The entry that describes `addr` (the last at or before it).
    pub fn covering(&self, addr: u64) -> Option<[u8; 6]> {
        let i = self.entries.partition_point(|e| e.0 <= addr);
        i.checked_sub(1).map(|i| self.entries[i].1)
    }

    /// Whether an entry is undefined (`struct orc_entry { s16 sp_offset; s16 bp_offset;
    /// u8 sp_reg:4, bp_reg:4; ... }` with `sp_reg` `ORC_REG_UNDEFINED`): an unwind stops there.
    pub fn undefined(e: &[u8; 6]) -> bool {
        e[4] & 0x0f == 0
    }

    /// The IPs in `[start, end)`.
    pub fn ips_in(&self, start: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        self.entries[self.entries.partition_point(|e| e.0 < start)..]
            .iter()
            .map(|e| e.0)
            .take_while(move |&ip| ip < end)
    }
}

/// Every cave of a stock kernel, by address. Empty if the image has no `_text`/`_etext` or no
/// ORC table (nothing could vouch for an unwind from inside).
pub fn find(image: &Image, guards: &Guards, sweep: &Sweep, orc: &Orc) -> Vec<Cave> {
    runs_near(image, guards, sweep, orc, MIN_CAVE, true, 0, u64::MAX)
        .into_iter()
        .flat_map(|(_, pieces)| pieces)
        .collect()
}

/// The pieces of `int3` padding of at least `min` bytes inside `[_text, _etext)` that one ORC
/// entry covers (an undefined one if `undefined`) and that nothing protects or names (those
/// that can hold stubs start 16-byte aligned when `min` is [`MIN_CAVE`]), in the maximal runs
/// that meet `[lo, hi)` (each whole, wherever it ends): each run's start, and its pieces, by
/// address.
#[allow(clippy::too_many_arguments)]
pub fn runs_near(
    image: &Image,
    guards: &Guards,
    sweep: &Sweep,
    orc: &Orc,
    min: u64,
    undefined: bool,
    lo: u64,
    hi: u64,
) -> Vec<(u64, Vec<Cave>)> {
    int3_runs_in(image, orc, min, lo, hi)
        .into_iter()
        .map(|(start, end)| {
            let mut out = Vec::new();
            pieces(guards, sweep, orc, min, undefined, start, end, &mut out);
            (start, out)
        })
        .collect()
}

/// The maximal `int3` runs of at least `min` bytes inside `[_text, _etext)` (cut at section
/// ends) that meet `[lo, hi)`: (start, end), by address. None without an ORC table (nothing
/// could vouch for an unwind from them).
fn int3_runs_in(image: &Image, orc: &Orc, min: u64, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let (Some(text), Some(etext)) = (
        image.symbol_address("_text"),
        image.symbol_address("_etext"),
    ) else {
        return Vec::new();
    };
    if orc.entries.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for s in image.exec_sections() {
        let (first, last) = (s.addr.max(text), (s.addr + s.size).min(etext));
        let (mut from, mut to) = (lo.max(first), hi.min(last));
        if from >= to {
            continue;
        }
        let data = image.section_data(s);
        let base = s.addr;
        let byte = |a: u64| data.get((a - base) as usize).copied();
        // Whole runs: grow the window over the runs at its edges.
        while from > first && byte(from - 1) == Some(0xcc) {
            from -= 1;
        }
        while to < last && byte(to) == Some(0xcc) {
            to += 1;
        }
        for (a, b) in int3_runs(data, (from - base) as usize, (to - base) as usize, min) {
            out.push((base + a as u64, base + b as u64));
        }
    }
    out
}

/// The pieces of the `int3` run `[start, end)` that [`runs_near`] keeps: cut at every ORC IP,
/// symbol or table start inside it, those an ORC entry (undefined, if `undefined`) covers and
/// nothing protects, of at least `min` bytes (16-byte aligned for caves).
#[allow(clippy::too_many_arguments)]
fn pieces(
    guards: &Guards,
    sweep: &Sweep,
    orc: &Orc,
    min: u64,
    undefined: bool,
    start: u64,
    end: u64,
    caves: &mut Vec<Cave>,
) {
    let mut cuts: Vec<u64> = orc.ips_in(start + 1, end).collect();
    let mut a = start;
    while let Some(n) = guards.start_inside(sweep, a, end) {
        cuts.push(n);
        a = n;
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut from = start;
    for to in cuts.into_iter().chain(std::iter::once(end)) {
        let align = if min >= MIN_CAVE { 15 } else { 0 };
        let piece = Cave {
            start: (from + align) & !align,
            end: to,
        };
        let covered = orc
            .covering(from)
            .is_some_and(|e| !undefined || Orc::undefined(&e));
        if piece.end > piece.start
            && piece.len() >= min
            && covered
            && guards.first_overlap(from, to).is_none()
        {
            caves.push(piece);
        }
        from = to;
    }
}

/// The maximal runs of `int3` (`0xcc`) of at least `min` bytes in `data[lo..hi]` (a run is cut
/// at `lo` and `hi`), as offsets. Any such run holds the byte `min - 1` after each position it
/// starts from, so the scan looks at one byte in `min` until it finds an `int3`, then grows
/// the run both ways.
fn int3_runs(data: &[u8], lo: usize, hi: usize, min: u64) -> Vec<(usize, usize)> {
    let hi = hi.min(data.len());
    let min = usize::try_from(min).unwrap_or(usize::MAX).max(1);
    let mut out = Vec::new();
    let mut i = lo;
    while let Some(probe) = i.checked_add(min - 1).filter(|&p| p < hi) {
        if data[probe] != 0xcc {
            i = probe + 1;
            continue;
        }
        let mut start = probe;
        while start > i && data[start - 1] == 0xcc {
            start -= 1;
        }
        let mut end = probe + 1;
        while end < hi && data[end] == 0xcc {
            end += 1;
        }
        if end - start >= min {
            out.push((start, end));
        }
        i = end;
    }
    out
}

/// Hands out cave space, 16-byte aligned, in increasing address order (the ABI wants stubs
/// sorted): the current cave while it has room, then the next.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    free: Vec<Cave>,
    cur: usize,
}

impl Allocator {
    /// An allocator over `caves`.
    pub fn new(mut caves: Vec<Cave>) -> Self {
        caves.sort_by_key(|c| c.start);
        Allocator {
            free: caves,
            cur: 0,
        }
    }

    /// `len` bytes, 16-byte aligned, at a higher address than anything allocated before, if a
    /// cave has room.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        self.alloc_within(len, 0, u64::MAX)
    }

    /// `len` bytes as [`Allocator::alloc`] gives them, inside `[lo, hi)` (the part of a cave
    /// below `lo` is given up).
    pub fn alloc_within(&mut self, len: u64, lo: u64, hi: u64) -> Option<u64> {
        let place = |c: &Cave| {
            let at = c.start.max(lo).checked_add(15)? & !15;
            (at.checked_add(len)? <= c.end.min(hi)).then_some(at)
        };
        let k = self.free[self.cur..]
            .iter()
            .position(|c| place(c).is_some())?
            + self.cur;
        self.cur = k;
        let c = &mut self.free[k];
        let at = place(c)?;
        c.start = (at.saturating_add(len).saturating_add(15) & !15).min(c.end);
        Some(at)
    }

    /// `len` bytes, 16-byte aligned, at the end of the last cave with room (for an arena, so
    /// that the lowest caves stay for stubs).
    pub fn alloc_last(&mut self, len: u64) -> Option<u64> {
        let c = self.free.iter_mut().rev().find(|c| c.len() >= len + 16)?;
        let at = (c.end - len) & !15;
        c.end = at;
        Some(at)
    }

    /// What is left.
    pub fn remaining(&self) -> u64 {
        self.free.iter().map(Cave::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every maximal run, one byte at a time.
    fn naive(data: &[u8], lo: usize, hi: usize, min: u64) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = lo;
        while i < hi {
            if data[i] != 0xcc {
                i += 1;
                continue;
            }
            let start = i;
            while i < hi && data[i] == 0xcc {
                i += 1;
            }
            if (i - start) as u64 >= min {
                out.push((start, i));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn int3_runs_are_the_maximal_runs(
            data in proptest::collection::vec(prop_oneof![3 => Just(0xccu8), 1 => any::<u8>()], 0..400),
            lo in 0usize..50,
            cut in 0usize..50,
            min in 1u64..70,
        ) {
            let hi = data.len().saturating_sub(cut);
            let lo = lo.min(hi);
            prop_assert_eq!(int3_runs(&data, lo, hi, min), naive(&data, lo, hi, min));
        }
    }
}
