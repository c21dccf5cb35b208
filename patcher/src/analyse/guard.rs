//! Protected bytes: everything a rewrite of a stock kernel must never write, move or straddle,
//! gathered once from every source, sorted, and queried by range.
//!
//! * every entry of Linux's tables ([`crate::linux`]): the bytes it names (paravirt and
//!   alternative sites, the `call __fentry__` of every `__mcount_loc` entry, the `jmp`/NOP of
//!   every jump label, every static call, retpoline, return and call-depth site, every sealed
//!   `endbr64`, every lock prefix's instruction, every instruction of `__ex_table`, every
//!   `ud2` of `__bug_table`);
//! * function entries that begin with `endbr64` (an indirect branch must find it there);
//! * 6.12's pre-function padding, `[__pfx_f, f)`: NOPs that call-depth tracking and FineIBT
//!   rewrite at boot;
//! * instruction starts something jumps to: symbols, every start a table names as a target
//!   (exception fixups, jump-label targets and sites, alternatives, static calls), and every
//!   direct branch target: a rewrite may begin at one but never contain one (see
//!   [`Guards::start_inside`]).
//!
//! ORC IPs are instruction *boundaries*, not targets: nothing jumps to them. A detour may move
//! instructions across them, because the code it moves is never executed in place again (the
//! moved range becomes `jmp stub` and `int3`s), the state at its end, where the stub jumps back,
//! is the state ORC describes there, and an unwind from inside the stub finds the cave's
//! undefined entry and stops as unreliable. In-place room never extends across one.

use crate::linux::{LinuxTables, TableKind};
use crate::load::Image;
use crate::sweep::Sweep;

/// Why a byte is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Why {
    /// An entry of one of Linux's tables.
    Table(TableKind, u32),
    /// A function's `endbr64`.
    FunctionEntry,
    /// Padding before a function (`__pfx_` symbols).
    Padding,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Table(t, e) => write!(f, "{t} entry {e}"),
            Why::FunctionEntry => f.write_str("a function's endbr64"),
            Why::Padding => f.write_str("pre-function padding"),
        }
    }
}

/// One protected range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guard {
    /// First byte.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// Why.
    pub why: Why,
}

/// Every protected byte and named instruction start of an image.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    /// Sorted by start.
    ranges: Vec<Guard>,
    /// The longest range (bounds the backward search of [`Guards::overlapping`]).
    longest: u64,
    /// Instruction starts named by symbols and tables as targets, sorted.
    named: Vec<u64>,
    /// ORC IPs (boundaries), sorted.
    orc: Vec<u64>,
    /// The entry text and the code in it whose address Linux checks (found once).
    entry: Option<super::EntryText>,
}

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

impl Guards {
    /// Gathers the guards of `image`.
    pub fn new(image: &Image, tables: &LinuxTables) -> Guards {
        let mut ranges: Vec<Guard> = tables
            .protected
            .iter()
            .map(|p| Guard {
                start: p.start,
                end: p.end,
                why: Why::Table(p.table, p.entry),
            })
            .collect();
        for s in &image.symbols {
            if image.read(s.addr, 4) == Some(&ENDBR64[..]) {
                ranges.push(Guard {
                    start: s.addr,
                    end: s.addr + 4,
                    why: Why::FunctionEntry,
                });
            }
            if let Some(f) = s.name.strip_prefix("__pfx_")
                && let Some(entry) = image.symbol_address(f)
                && entry > s.addr
                && entry - s.addr <= 64
            {
                ranges.push(Guard {
                    start: s.addr,
                    end: entry,
                    why: Why::Padding,
                });
            }
        }
        ranges.sort_by_key(|g| (g.start, g.end));
        let longest = ranges.iter().map(|g| g.end - g.start).max().unwrap_or(0);
        // The tables' starts are sorted, and so are the symbols: merged, not sorted again.
        let (mut orc, mut from_tables) = (Vec::new(), Vec::new());
        for &(a, k) in &tables.starts {
            if k == TableKind::OrcUnwindIp {
                orc.push(a);
            } else {
                from_tables.push(a);
            }
        }
        let sorted = |v: &mut Vec<u64>| {
            if !v.is_sorted() {
                v.sort_unstable();
            }
        };
        sorted(&mut orc);
        sorted(&mut from_tables);
        let mut symbols: Vec<u64> = image.symbols.iter().map(|s| s.addr).collect();
        sorted(&mut symbols);
        let mut named: Vec<u64> =
            crate::spans::merge_sorted(&from_tables, &symbols, |&a| a).collect();
        named.dedup();
        Guards {
            ranges,
            longest,
            named,
            orc,
            entry: super::EntryText::of(image),
        }
    }

    /// The image's entry text, if it has one.
    pub fn entry_text(&self) -> Option<&super::EntryText> {
        self.entry.as_ref()
    }

    /// The guards that overlap `[start, end)`.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Guard> {
        let hi = self.ranges.partition_point(|g| g.start < end);
        let lo =
            self.ranges[..hi].partition_point(|g| g.start < start.saturating_sub(self.longest));
        self.ranges[lo..hi].iter().filter(move |g| g.end > start)
    }

    /// The first guard that overlaps `[start, end)`.
    pub fn first_overlap(&self, start: u64, end: u64) -> Option<&Guard> {
        self.overlapping(start, end).next()
    }

    /// An instruction start that something names, or that a direct branch targets, strictly
    /// inside `(start, end)`: nothing may jump into the middle of a rewrite.
    pub fn start_inside(&self, sweep: &Sweep, start: u64, end: u64) -> Option<u64> {
        let i = self.named.partition_point(|&a| a <= start);
        if let Some(&a) = self.named.get(i)
            && a < end
        {
            return Some(a);
        }
        sweep.branch_target_in(start.saturating_add(1), end)
    }

    /// Whether `a` is an instruction start something names (symbol or table).
    pub fn is_named(&self, a: u64) -> bool {
        self.named.binary_search(&a).is_ok()
    }

    /// Whether `a` is an ORC IP.
    pub fn is_orc(&self, a: u64) -> bool {
        self.orc.binary_search(&a).is_ok()
    }

    /// Every guard, sorted by start.
    pub fn all(&self) -> &[Guard] {
        &self.ranges
    }
}
