//! Linux's own patch and annotation tables, read from a linked image.
//!
//! Each table is found by its section name, or, for the three a `vmlinux` folds into `.rodata`
//! and `.init.data` with no section of their own (`__mcount_loc`, `__jump_table`,
//! `.static_call_sites`), by its `__start_`/`__stop_` symbols (from the symbol table, or from a
//! stripped kernel's kallsyms), and parsed with bounds checks. Where the entry
//! layout changed across kernel versions (`.parainstructions`, `.altinstructions`,
//! `__bug_table`), every candidate layout is tried against the whole table: a layout is
//! accepted only if every entry of it resolves to a plausible place (inside code, onto the
//! instruction it must name). Exactly one must fit; none or several is reported as
//! unrecognised, never guessed.
//!
//! What the tables give the rest of the tool:
//! * *instruction starts*: addresses that must begin an instruction (the sweep restarts there);
//! * *protected ranges*: bytes Linux itself patches or refers to, which pvpatch never changes
//!   behind Linux's back. A sensitive instruction inside one is reported as covered by it.

use std::fmt;

use crate::load::image::{Image, Section};

/// The tables this module knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TableKind {
    /// `.parainstructions`: paravirt patch sites (removed in 6.8). Every release up to 6.7 uses
    /// 16-byte entries with an absolute pointer; the relative 8- and 6-byte forms existed only in
    /// the x86 maintainers' tree before the section was removed, and are accepted too.
    Parainstructions,
    /// `.altinstructions`: alternatives.
    Altinstructions,
    /// `.altinstr_replacement`: the replacement code alternatives copy.
    AltinstrReplacement,
    /// `__ex_table`: instructions that may fault, with their fixups.
    ExTable,
    /// `.orc_unwind_ip`: addresses with ORC unwind entries.
    OrcUnwindIp,
    /// `.smp_locks`: lock prefixes patched on uniprocessor systems.
    SmpLocks,
    /// `.retpoline_sites`: indirect calls and jumps through retpoline thunks.
    RetpolineSites,
    /// `.return_sites`: returns through the return thunk.
    ReturnSites,
    /// `.call_sites`: calls accounted for call-depth tracking.
    CallSites,
    /// `.ibt_endbr_seal`: `endbr64` instructions sealed at boot.
    IbtEndbrSeal,
    /// `__bug_table`: `ud2` instructions of BUG()/WARN().
    BugTable,
    /// `__jump_table`: static-key jump sites. Linux's linker script puts it inside `.rodata`,
    /// so a vmlinux normally has no section of that name; images that do are read.
    JumpTable,
    /// `.static_call_sites`: static-call sites (inside `.rodata` in a vmlinux, like the jump
    /// table).
    StaticCallSites,
    /// `__mcount_loc`: the `call __fentry__` at each traced function's entry, which ftrace
    /// turns into NOPs and back (inside `.init.data` in a vmlinux; zero entries, for functions
    /// the build dropped, are skipped).
    McountLoc,
    /// `runtime_ptr_*` and `runtime_shift_*` (6.11 and later): the immediates of `movabs` and
    /// shift instructions that Linux patches at boot with values it learns then (the dentry
    /// hash table's address and shift). One table per variable, each between its `__start_`
    /// and `__stop_` symbols: all of them are read, as one.
    RuntimeConst,
}

impl TableKind {
    /// Every kind, in report order.
    pub const ALL: [TableKind; 15] = [
        TableKind::Parainstructions,
        TableKind::Altinstructions,
        TableKind::AltinstrReplacement,
        TableKind::ExTable,
        TableKind::OrcUnwindIp,
        TableKind::SmpLocks,
        TableKind::RetpolineSites,
        TableKind::ReturnSites,
        TableKind::CallSites,
        TableKind::IbtEndbrSeal,
        TableKind::BugTable,
        TableKind::JumpTable,
        TableKind::StaticCallSites,
        TableKind::McountLoc,
        TableKind::RuntimeConst,
    ];

    /// The section name.
    pub fn section(self) -> &'static str {
        match self {
            TableKind::Parainstructions => ".parainstructions",
            TableKind::Altinstructions => ".altinstructions",
            TableKind::AltinstrReplacement => ".altinstr_replacement",
            TableKind::ExTable => "__ex_table",
            TableKind::OrcUnwindIp => ".orc_unwind_ip",
            TableKind::SmpLocks => ".smp_locks",
            TableKind::RetpolineSites => ".retpoline_sites",
            TableKind::ReturnSites => ".return_sites",
            TableKind::CallSites => ".call_sites",
            TableKind::IbtEndbrSeal => ".ibt_endbr_seal",
            TableKind::BugTable => "__bug_table",
            TableKind::JumpTable => "__jump_table",
            TableKind::StaticCallSites => ".static_call_sites",
            TableKind::McountLoc => "__mcount_loc",
            TableKind::RuntimeConst => "runtime_const",
        }
    }

    /// The symbols that bound the table where it has no section of its own.
    pub fn bounds(self) -> Option<(&'static str, &'static str)> {
        match self {
            TableKind::JumpTable => Some(("__start___jump_table", "__stop___jump_table")),
            TableKind::StaticCallSites => {
                Some(("__start_static_call_sites", "__stop_static_call_sites"))
            }
            TableKind::McountLoc => Some(("__start_mcount_loc", "__stop_mcount_loc")),
            _ => None,
        }
    }

    /// Whether Linux rewrites the bytes this table names (as opposed to only referring to
    /// them); a sensitive instruction inside is "covered" by Linux's own patching.
    pub fn patches(self) -> bool {
        !matches!(
            self,
            TableKind::OrcUnwindIp | TableKind::ExTable | TableKind::BugTable
        )
    }
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.section())
    }
}

/// [`TableReport::found_by`] of a table found by its section header.
pub const FOUND_BY_SECTION: &str = "section";
/// [`TableReport::found_by`] of a table found by its `__start_`/`__stop_` symbols.
pub const FOUND_BY_SYMBOLS: &str = "symbols";

/// What was found of one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableReport {
    /// Which table.
    pub kind: TableKind,
    /// Whether the image has the table.
    pub present: bool,
    /// How it was found: [`FOUND_BY_SECTION`] or [`FOUND_BY_SYMBOLS`].
    pub found_by: Option<&'static str>,
    /// Its address.
    pub addr: u64,
    /// Its size.
    pub size: u64,
    /// The layout recognised (`None` if absent or unrecognised).
    pub layout: Option<&'static str>,
    /// Entry size of that layout.
    pub entry_size: usize,
    /// Entries used.
    pub entries: usize,
    /// Trailing all-zero entries (section padding) ignored.
    pub padding: usize,
    /// Why the table could not be used, if it could not.
    pub problem: Option<String>,
}

/// A byte range Linux's tables protect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protected {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Which table.
    pub table: TableKind,
    /// Which entry.
    pub entry: u32,
}

/// Everything read from Linux's tables.
#[derive(Clone, Debug, Default)]
pub struct LinuxTables {
    /// One report per known table, in [`TableKind::ALL`] order.
    pub reports: Vec<TableReport>,
    /// Protected ranges, sorted by start.
    pub protected: Vec<Protected>,
    /// Addresses the tables say begin an instruction, with the table, sorted.
    pub starts: Vec<(u64, TableKind)>,
    /// ORC IPs dropped from `starts` because they lie inside a site Linux patches (they
    /// describe the patched code).
    pub orc_inside_patch_sites: usize,
    longest: u64,
}

impl LinuxTables {
    /// The protected ranges that overlap `[addr, addr + len)`.
    pub fn covering(&self, addr: u64, len: u64) -> impl Iterator<Item = &Protected> {
        let end = addr.saturating_add(len);
        let hi = self.protected.partition_point(|p| p.start < end);
        let lo =
            self.protected[..hi].partition_point(|p| p.start < addr.saturating_sub(self.longest));
        self.protected[lo..hi].iter().filter(move |p| p.end > addr)
    }

    /// The report for `kind`.
    pub fn report(&self, kind: TableKind) -> Option<&TableReport> {
        self.reports.iter().find(|r| r.kind == kind)
    }

    /// Whether some table names `addr` as an instruction start.
    pub fn is_start(&self, addr: u64) -> bool {
        self.starts.binary_search_by_key(&addr, |s| s.0).is_ok()
    }
}

/// One parsed entry: up to two instruction starts it names and up to two ranges it protects
/// (fixed arrays: `.orc_unwind_ip` alone has ~400,000 entries).
#[derive(Default)]
struct Entry {
    starts: [Option<u64>; 2],
    protected: [Option<(u64, u64)>; 2],
}

impl Entry {
    fn one(start: u64, protect: Option<(u64, u64)>) -> Self {
        Entry {
            starts: [Some(start), None],
            protected: [protect, None],
        }
    }
}

/// A candidate layout: name, entry size, and a parser for one entry (given the entry's
/// address and bytes) that returns `None` if the entry does not fit this layout.
struct Layout {
    name: &'static str,
    size: usize,
    parse: fn(&Ctx<'_>, u64, &[u8]) -> Option<Entry>,
}

/// What entry parsers may look at.
struct Ctx<'a> {
    image: &'a Image,
    code: Vec<&'a Section>,
    replacement: Option<&'a Section>,
}

impl Ctx<'_> {
    fn in_code(&self, addr: u64, len: u64) -> bool {
        self.code
            .iter()
            .any(|s| addr >= s.addr && addr.checked_add(len).is_some_and(|e| e <= s.addr + s.size))
    }

    /// In code, or exactly at the end of a code section (ORC's terminating entries).
    fn in_code_or_end(&self, addr: u64) -> bool {
        self.in_code(addr, 1) || self.code.iter().any(|s| addr == s.addr + s.size)
    }

    fn bytes_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.image.read(addr, len)
    }

    /// The length of the instruction at `addr` (in code), if it decodes.
    fn insn_len(&self, addr: u64) -> Option<u64> {
        let s = self.code.iter().find(|s| s.contains(addr))?;
        let avail = (s.addr + s.size - addr).min(15) as usize;
        let b = self.image.read(addr, avail)?;
        let i = iced_x86::Decoder::with_ip(64, b, addr, iced_x86::DecoderOptions::NONE).decode();
        (!i.is_invalid()).then_some(i.len() as u64)
    }

    /// The instruction at `addr` as a protected range, if it decodes to at least `min` bytes.
    fn insn(&self, addr: u64, min: u64) -> Option<(u64, u64)> {
        let len = self.insn_len(addr)?;
        (len >= min).then_some((addr, addr + len))
    }
}

fn rel(entry_addr: u64, field: u64, b: &[u8], off: usize) -> Option<u64> {
    let v = i32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?);
    entry_addr.checked_add(field)?.checked_add_signed(v as i64)
}

fn u8_at(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

fn para_entry(ctx: &Ctx<'_>, addr: u64, len: u8) -> Option<Entry> {
    // A paravirt site holds an indirect call (6 bytes) or native code, at most a few bytes
    // longer; Linux checks `len` against its patch buffer of 16 bytes or so.
    if len == 0 || len > 32 || !ctx.in_code(addr, len as u64) {
        return None;
    }
    Some(Entry::one(addr, Some((addr, addr + len as u64))))
}

const PARAINSTRUCTIONS: &[Layout] = &[
    Layout {
        name: "u64 addr; u8 type; u8 len; pad (16 bytes, every release up to 6.7)",
        size: 16,
        parse: |ctx, _at, b| {
            let addr = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
            para_entry(ctx, addr, u8_at(b, 9)?)
        },
    },
    Layout {
        name: "s32 instr_offset; u8 type; u8 len; pad (8 bytes, tip tree late 2023)",
        size: 8,
        parse: |ctx, at, b| para_entry(ctx, rel(at, 0, b, 0)?, u8_at(b, 5)?),
    },
    Layout {
        name: "s32 instr_offset; u8 type; u8 len, packed (6 bytes, tip tree late 2023)",
        size: 6,
        parse: |ctx, at, b| para_entry(ctx, rel(at, 0, b, 0)?, u8_at(b, 5)?),
    },
];

fn alt_entry(ctx: &Ctx<'_>, at: u64, b: &[u8], lens: usize) -> Option<Entry> {
    let instr = rel(at, 0, b, 0)?;
    let repl = rel(at, 4, b, 4)?;
    let instrlen = u8_at(b, lens)? as u64;
    let repllen = u8_at(b, lens + 1)? as u64;
    if !ctx.in_code(instr, instrlen.max(1)) || repllen > instrlen {
        return None;
    }
    let mut e = Entry::one(instr, Some((instr, instr + instrlen)));
    if repllen > 0 {
        let r = ctx.replacement?;
        if repl < r.addr || repl.checked_add(repllen)? > r.addr + r.size {
            return None;
        }
        e.starts[1] = Some(repl);
        e.protected[1] = Some((repl, repl + repllen));
    }
    Some(e)
}

const ALTINSTRUCTIONS: &[Layout] = &[
    Layout {
        name: "s32 instr_offset; s32 repl_offset; u16 cpuid; u8 instrlen; u8 replacementlen \
               (12 bytes, 5.x-6.2)",
        size: 12,
        parse: |ctx, at, b| alt_entry(ctx, at, b, 10),
    },
    Layout {
        name: "s32 instr_offset; s32 repl_offset; u32 ft_flags; u8 instrlen; u8 replacementlen \
               (14 bytes, 6.3+)",
        size: 14,
        parse: |ctx, at, b| alt_entry(ctx, at, b, 12),
    },
];

const EX_TABLE: &[Layout] = &[Layout {
    name: "s32 insn; s32 fixup; s32 data (12 bytes)",
    size: 12,
    parse: |ctx, at, b| {
        let insn = rel(at, 0, b, 0)?;
        let fixup = rel(at, 4, b, 4)?;
        (ctx.in_code(insn, 1) && ctx.in_code(fixup, 1)).then(|| Entry {
            starts: [Some(insn), Some(fixup)],
            // The whole instruction: its address is the table's key, so it must not move.
            protected: [Some(ctx.insn(insn, 1).unwrap_or((insn, insn + 1))), None],
        })
    },
}];

fn bug_entry(ctx: &Ctx<'_>, at: u64, b: &[u8]) -> Option<Entry> {
    let addr = rel(at, 0, b, 0)?;
    // BUG() and WARN() are `ud2` on x86.
    (ctx.in_code(addr, 2) && ctx.bytes_at(addr, 2)? == [0x0f, 0x0b])
        .then(|| Entry::one(addr, Some((addr, addr + 2))))
}

const BUG_TABLE: &[Layout] = &[
    Layout {
        name: "s32 bug_addr; s32 file; u16 line; u16 flags (12 bytes, DEBUG_BUGVERBOSE)",
        size: 12,
        parse: bug_entry,
    },
    Layout {
        name: "s32 bug_addr; u16 flags; pad (8 bytes)",
        size: 8,
        parse: bug_entry,
    },
];

/// What a table of relative pointers protects at each address: nothing (ORC: instruction
/// starts only), a fixed number of bytes, or the whole instruction there.
#[derive(Clone, Copy)]
enum Guard {
    Nothing,
    Bytes(u64),
    Insn,
}

macro_rules! rel32_table {
    ($name:ident, $what:literal, $check:expr, $prot:expr) => {
        const $name: &[Layout] = &[Layout {
            name: $what,
            size: 4,
            parse: |ctx, at, b| {
                let a = rel(at, 0, b, 0)?;
                let check: fn(&Ctx<'_>, u64) -> bool = $check;
                let prot = match $prot {
                    Guard::Nothing => None,
                    Guard::Bytes(n) => Some((a, a + n)),
                    Guard::Insn => Some(ctx.insn(a, 1)?),
                };
                check(ctx, a).then(|| Entry::one(a, prot))
            },
        }];
    };
}

rel32_table!(
    ORC_IP,
    "s32 ip (4 bytes)",
    |ctx, a| ctx.in_code_or_end(a),
    Guard::Nothing
);
rel32_table!(
    SMP_LOCKS,
    "s32 lock prefix (4 bytes)",
    |ctx, a| ctx.bytes_at(a, 1) == Some(&[0xf0]) && ctx.in_code(a, 1),
    Guard::Insn
);
rel32_table!(
    RETPOLINE,
    "s32 call/jmp site (4 bytes)",
    |ctx, a| ctx.in_code(a, 2),
    Guard::Insn
);
rel32_table!(
    RETURN,
    "s32 return site (4 bytes)",
    |ctx, a| ctx.in_code(a, 1),
    Guard::Insn
);
rel32_table!(
    CALL,
    "s32 call site (4 bytes)",
    |ctx, a| ctx.in_code(a, 5),
    Guard::Insn
);
rel32_table!(
    ENDBR,
    "s32 endbr64 (4 bytes)",
    |ctx, a| ctx.bytes_at(a, 4) == Some(&[0xf3, 0x0f, 0x1e, 0xfa]),
    Guard::Bytes(4)
);

const JUMP_TABLE: &[Layout] = &[Layout {
    name: "s32 code; s32 target; s64 key (16 bytes)",
    size: 16,
    parse: |ctx, at, b| {
        let code = rel(at, 0, b, 0)?;
        let target = rel(at, 4, b, 4)?;
        (ctx.in_code(code, 2) && ctx.in_code(target, 1)).then(|| Entry {
            starts: [Some(code), Some(target)],
            // A `jmp`/NOP of 2 or 5 bytes, toggled when the key changes.
            protected: [Some(ctx.insn(code, 2).unwrap_or((code, code + 5))), None],
        })
    },
}];

const STATIC_CALLS: &[Layout] = &[Layout {
    name: "s32 addr; s32 key (8 bytes)",
    size: 8,
    parse: |ctx, at, b| {
        let a = rel(at, 0, b, 0)?;
        ctx.in_code(a, 5).then(|| Entry::one(a, Some((a, a + 5))))
    },
}];

const MCOUNT_LOC: &[Layout] = &[Layout {
    name: "u64 address of a 5-byte `call __fentry__` (8 bytes; 0 for a dropped function)",
    size: 8,
    parse: |ctx, _at, b| {
        let a = u64::from_le_bytes(b.get(0..8)?.try_into().ok()?);
        if a == 0 {
            return Some(Entry::default());
        }
        ctx.in_code(a, 5).then(|| Entry::one(a, Some((a, a + 5))))
    },
}];

fn layouts(kind: TableKind) -> &'static [Layout] {
    match kind {
        TableKind::Parainstructions => PARAINSTRUCTIONS,
        TableKind::Altinstructions => ALTINSTRUCTIONS,
        TableKind::AltinstrReplacement | TableKind::RuntimeConst => &[],
        TableKind::ExTable => EX_TABLE,
        TableKind::OrcUnwindIp => ORC_IP,
        TableKind::SmpLocks => SMP_LOCKS,
        TableKind::RetpolineSites => RETPOLINE,
        TableKind::ReturnSites => RETURN,
        TableKind::CallSites => CALL,
        TableKind::IbtEndbrSeal => ENDBR,
        TableKind::BugTable => BUG_TABLE,
        TableKind::JumpTable => JUMP_TABLE,
        TableKind::StaticCallSites => STATIC_CALLS,
        TableKind::McountLoc => MCOUNT_LOC,
    }
}

/// Whether every entry of the table fits `layout`: the number of entries used and of trailing
/// all-zero entries (section padding). Nothing is kept: a table is bounded only by the file's
/// size, so its entries are parsed again, one at a time, once a single layout fits.
fn try_layout(ctx: &Ctx<'_>, s: &Place, data: &[u8], layout: &Layout) -> Option<(usize, usize)> {
    if !data.len().is_multiple_of(layout.size) {
        return None;
    }
    let n = data.len() / layout.size;
    let used = used_entries(data, layout.size);
    entries(ctx, s, data, layout, used)
        .all(|e| e.is_some())
        .then_some((used, n - used))
}

/// The entries of `size` bytes before the trailing all-zero ones (section padding:
/// `.smp_locks` is page-aligned inside).
fn used_entries(data: &[u8], size: usize) -> usize {
    let mut used = data.len() / size;
    while used > 0 && data[(used - 1) * size..used * size].iter().all(|&b| b == 0) {
        used -= 1;
    }
    used
}

/// Entry `i` of table `kind`: its starts and protected bytes.
fn keep(out: &mut LinuxTables, kind: TableKind, i: usize, e: Entry) {
    out.starts
        .extend(e.starts.into_iter().flatten().map(|a| (a, kind)));
    for (start, end) in e.protected.into_iter().flatten() {
        out.protected.push(Protected {
            start,
            end,
            table: kind,
            entry: i as u32,
        });
    }
}

/// A table with one possible layout, read in one pass into `out`: the number of entries used
/// and of trailing all-zero ones, or `None` (with entries already kept: the caller drops them)
/// if one does not fit.
fn read_one_layout(
    ctx: &Ctx<'_>,
    s: &Place,
    data: &[u8],
    layout: &Layout,
    kind: TableKind,
    out: &mut LinuxTables,
) -> Option<(usize, usize)> {
    if !data.len().is_multiple_of(layout.size) {
        return None;
    }
    let n = data.len() / layout.size;
    let used = used_entries(data, layout.size);
    for (i, e) in entries(ctx, s, data, layout, used).enumerate() {
        keep(out, kind, i, e?);
    }
    Some((used, n - used))
}

/// The first `used` entries of the table, parsed as `layout`.
fn entries<'a>(
    ctx: &'a Ctx<'_>,
    s: &'a Place,
    data: &'a [u8],
    layout: &'a Layout,
    used: usize,
) -> impl Iterator<Item = Option<Entry>> + 'a {
    data.chunks_exact(layout.size)
        .take(used)
        .enumerate()
        .map(move |(i, b)| (layout.parse)(ctx, s.addr + (i * layout.size) as u64, b))
}

/// Where a table lies.
struct Place {
    addr: u64,
    size: u64,
    found_by: &'static str,
}

/// Where `kind` lies in `image`: its section, else its bounding symbols; with its bytes. An
/// error names why symbols that bound it cannot be used.
fn locate(image: &Image, kind: TableKind) -> Option<Result<(Place, &[u8]), String>> {
    if let Some(s) = image.section(kind.section()) {
        let data = image.section_data(s);
        if data.len() as u64 != s.size {
            return Some(Err("the section has no bytes in the file".into()));
        }
        let place = Place {
            addr: s.addr,
            size: s.size,
            found_by: FOUND_BY_SECTION,
        };
        return Some(Ok((place, data)));
    }
    let (start, stop) = kind.bounds()?;
    let (a, b) = (image.symbol_address(start)?, image.symbol_address(stop)?);
    let place = Place {
        addr: a,
        size: b.wrapping_sub(a),
        found_by: FOUND_BY_SYMBOLS,
    };
    let data = (b >= a)
        .then(|| usize::try_from(b - a).ok())
        .flatten()
        .and_then(|len| image.read(a, len));
    Some(match data {
        Some(d) => Ok((place, d)),
        None => Err(format!(
            "{start} ({a:#x}) and {stop} ({b:#x}) do not bound bytes inside one section"
        )),
    })
}

/// The runtime constants: for each variable `v`, the 4-byte relative pointers between
/// `__start_runtime_ptr_v` and `__stop_runtime_ptr_v` (to a `movabs`'s 8-byte immediate) and
/// between `__start_runtime_shift_v` and `__stop_runtime_shift_v` (to a shift's 1-byte
/// immediate). Each protects its instruction: from up to 3 bytes before the immediate (prefix,
/// opcode, ModRM) to its end. A table whose entries do not all land in code is reported, not
/// used.
fn read_runtime_consts(ctx: &Ctx<'_>, report: &mut TableReport, out: &mut LinuxTables) {
    let mut entries = 0;
    let mut tables = 0;
    for (kind, size) in [("ptr", 8u64), ("shift", 1)] {
        let prefix = format!("__start_runtime_{kind}_");
        for (start_name, a) in ctx.image.symbols_with_prefix(&prefix) {
            let stop = format!("__stop_runtime_{kind}_{}", &start_name[prefix.len()..]);
            let Some(b) = ctx.image.symbol_address(&stop) else {
                continue;
            };
            let data = (b >= a && (b - a) % 4 == 0)
                .then(|| ctx.image.read(a, (b - a) as usize))
                .flatten();
            let Some(data) = data else {
                report.problem = Some(format!("{start_name} and {stop} do not bound a table"));
                continue;
            };
            let mut found = Vec::new();
            for (i, e) in data.chunks_exact(4).enumerate() {
                match rel(a + 4 * i as u64, 0, e, 0) {
                    Some(imm) if ctx.in_code(imm.saturating_sub(3), size + 3) => {
                        found.push((imm - 3, imm + size));
                    }
                    _ => {
                        report.problem =
                            Some(format!("{start_name}: entry {i} does not point into code"));
                        found.clear();
                        break;
                    }
                }
            }
            tables += 1;
            for (i, (s, e)) in found.into_iter().enumerate() {
                entries += 1;
                out.protected.push(Protected {
                    start: s,
                    end: e,
                    table: TableKind::RuntimeConst,
                    entry: i as u32,
                });
            }
        }
    }
    if tables > 0 {
        report.present = true;
        report.found_by = Some(FOUND_BY_SYMBOLS);
        report.layout = Some("s32 to the immediate (4 bytes), one table per variable");
        report.entry_size = 4;
        report.entries = entries;
    }
}

/// Reads every table the image has.
pub fn read(image: &Image) -> LinuxTables {
    let ctx = Ctx {
        image,
        code: image.exec_sections().collect(),
        replacement: image.section(TableKind::AltinstrReplacement.section()),
    };
    let mut out = LinuxTables::default();
    for kind in TableKind::ALL {
        let mut report = TableReport {
            kind,
            present: false,
            found_by: None,
            addr: 0,
            size: 0,
            layout: None,
            entry_size: 0,
            entries: 0,
            padding: 0,
            problem: None,
        };
        if kind == TableKind::RuntimeConst {
            read_runtime_consts(&ctx, &mut report, &mut out);
            out.reports.push(report);
            continue;
        }
        let (s, data) = match locate(image, kind) {
            None => {
                out.reports.push(report);
                continue;
            }
            Some(Err(why)) => {
                report.present = true;
                report.problem = Some(why);
                out.reports.push(report);
                continue;
            }
            Some(Ok(found)) => found,
        };
        report.present = true;
        report.found_by = Some(s.found_by);
        report.addr = s.addr;
        report.size = s.size;
        if kind == TableKind::AltinstrReplacement {
            // Code, not a table: decoded by the sweep; its entries come from .altinstructions.
            report.layout = Some("replacement code");
            out.reports.push(report);
            continue;
        }
        // A table with one possible layout is read in one pass, its entries kept as they are
        // checked (and dropped if one does not fit); several layouts are each tried first.
        if let [layout] = layouts(kind) {
            let (starts, protected) = (out.starts.len(), out.protected.len());
            match read_one_layout(&ctx, &s, data, layout, kind, &mut out) {
                Some((used, padding)) => {
                    report.layout = Some(layout.name);
                    report.entry_size = layout.size;
                    report.entries = used;
                    report.padding = padding;
                }
                None => {
                    out.starts.truncate(starts);
                    out.protected.truncate(protected);
                    report.problem = Some(format!(
                        "layout not recognised: {} bytes are not a whole table of {}-byte \
                         entries that all point into code",
                        s.size, layout.size
                    ));
                }
            }
            out.reports.push(report);
            continue;
        }
        let fits: Vec<(&Layout, (usize, usize))> = layouts(kind)
            .iter()
            .filter_map(|l| try_layout(&ctx, &s, data, l).map(|r| (l, r)))
            .collect();
        // A table of nothing but zeros fits every layout whose size divides it, and means the
        // same under each: no entries.
        if fits.len() > 1 && fits.iter().all(|(_, (used, _))| *used == 0) {
            report.layout = Some("empty: every byte is zero");
            out.reports.push(report);
            continue;
        }
        match fits.len() {
            1 => {
                let (layout, (used, padding)) = fits[0];
                report.layout = Some(layout.name);
                report.entry_size = layout.size;
                report.entries = used;
                report.padding = padding;
                for (i, e) in entries(&ctx, &s, data, layout, used).flatten().enumerate() {
                    keep(&mut out, kind, i, e);
                }
            }
            0 => {
                let sizes: Vec<String> = layouts(kind).iter().map(|l| l.size.to_string()).collect();
                report.problem = Some(format!(
                    "layout not recognised: {} bytes are not a whole table of {}-byte entries \
                     that all point into code",
                    s.size,
                    sizes.join("- or ")
                ));
            }
            _ => {
                let names: Vec<&str> = fits.iter().map(|(l, _)| l.name).collect();
                report.problem = Some(format!(
                    "layout ambiguous: every entry fits each of {}; not guessing",
                    names.join(" / ")
                ));
            }
        }
        out.reports.push(report);
    }
    // Entries that protect the same bytes for the same table are one range: the first is kept,
    // so that a hostile table of a million copies costs no more than one.
    out.protected
        .sort_by_key(|p| (p.start, p.end, p.table as u8));
    out.protected
        .dedup_by(|b, a| (a.start, a.end, a.table) == (b.start, b.end, b.table));
    out.longest = out
        .protected
        .iter()
        .map(|p| p.end - p.start)
        .max()
        .unwrap_or(0);
    // One kind per address: any table's but ORC's where several name it (an ORC IP is only a
    // boundary; a fixup or a jump target is something that jumps there).
    // ORC's IPs are most of them (400,000 in a Debian kernel), read in one run, and Linux's
    // build sorts them: only the others are sorted (a sort of them all took 60 ms), then both
    // are merged in one pass that also drops repeats and what the next rule drops.
    let all = std::mem::take(&mut out.starts);
    let is_orc = |s: &(u64, TableKind)| s.1 == TableKind::OrcUnwindIp;
    let lo = all.iter().position(is_orc).unwrap_or(all.len());
    let hi = lo + all[lo..].iter().take_while(|s| is_orc(s)).count();
    let owned: Vec<_>;
    // One sorted run (Linux's): used in place; else gathered and sorted.
    let (orc, mut others): (&[_], Vec<_>) = if !all[hi..].iter().any(is_orc)
        && all[lo..hi].is_sorted_by_key(|s| s.0)
    {
        (
            &all[lo..hi],
            all[..lo].iter().chain(&all[hi..]).copied().collect(),
        )
    } else {
        let (mut o, rest): (Vec<(u64, TableKind)>, Vec<_>) = all.iter().partition(|s| is_orc(s));
        o.sort_unstable_by_key(|s| s.0);
        owned = o;
        (&owned, rest)
    };
    others.sort_unstable_by_key(|s| (s.0, s.1));
    // ORC describes the code as it runs, after Linux has patched its paravirt and alternative
    // sites: an ORC IP strictly inside such a site (e.g. after the `pushf` of a `pushf; pop
    // %rax` that replaces a 6-byte call) is not an instruction start of the image's bytes.
    let patched: Vec<(u64, u64)> = out
        .protected
        .iter()
        .filter(|p| {
            matches!(
                p.table,
                TableKind::Parainstructions | TableKind::Altinstructions
            )
        })
        .map(|p| (p.start, p.end))
        .collect();
    // The ORC IPs come in address order: where the patched sites before one start is found
    // by moving forward, not searched for.
    let mut next = 0;
    let mut inside_patched = |a: u64| {
        while next < patched.len() && patched[next].0 < a {
            next += 1;
        }
        patched[..next]
            .iter()
            .rev()
            .take_while(|r| a - r.0 < 64)
            .any(|r| a < r.1)
    };
    let mut starts = Vec::with_capacity(others.len() + orc.len());
    let (mut dropped, mut last) = (0, None);
    // On a tie the other table's start comes first, and is the one kept.
    for s in crate::spans::merge_sorted(&others, orc, |s| s.0) {
        if last.replace(s.0) == Some(s.0) {
            continue;
        }
        if is_orc(&s) && inside_patched(s.0) {
            dropped += 1;
            continue;
        }
        starts.push(s);
    }
    out.starts = starts;
    out.orc_inside_patch_sites = dropped;
    out
}
