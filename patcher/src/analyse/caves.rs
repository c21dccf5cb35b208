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
    runs(image, guards, sweep, orc, MIN_CAVE, true)
}

/// Every piece of `int3` padding of at least `min` bytes inside `[_text, _etext)` that one ORC
/// entry covers (an undefined one if `undefined`) and that nothing protects or names, by address
/// (pieces that can hold stubs start 16-byte aligned when `min` is [`MIN_CAVE`]).
pub fn runs(
    image: &Image,
    guards: &Guards,
    sweep: &Sweep,
    orc: &Orc,
    min: u64,
    undefined: bool,
) -> Vec<Cave> {
    let (Some(text), Some(etext)) = (
        image.symbol_address("_text"),
        image.symbol_address("_etext"),
    ) else {
        return Vec::new();
    };
    if orc.entries.is_empty() {
        return Vec::new();
    }
    let mut caves = Vec::new();
    for s in image.exec_sections() {
        let lo = s.addr.max(text);
        let hi = (s.addr + s.size).min(etext);
        if lo >= hi {
            continue;
        }
        let data = image.section_data(s);
        let base = s.addr;
        let mut at = lo;
        while at < hi {
            let off = (at - base) as usize;
            let Some(p) = data[off..(hi - base) as usize]
                .iter()
                .position(|&b| b == 0xcc)
            else {
                break;
            };
            let start = at + p as u64;
            let len = data[(start - base) as usize..(hi - base) as usize]
                .iter()
                .take_while(|&&b| b == 0xcc)
                .count() as u64;
            let end = start + len;
            at = end;
            if len < min {
                continue;
            }
            // Cut the run at every ORC IP, symbol or table start inside it; keep the pieces an
            // undefined ORC entry covers and nothing protects.
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
    }
    caves
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
