//! Linux's tables in every layout the reader knows, and the ones it must refuse to guess: each
//! table is built byte by byte next to code it points into, and the sites it covers must be
//! left to Linux.

use pvpatch::linux::{LinuxTables, TableKind};
use pvpatch::load::image::Image;
use pvpatch::sweep::Options;
use pvpatch::{ScanReport, scan_image};
use pvpatch_testkit::elf::{self as testimg, Extra, TEXT};

/// Where the tables are linked: 1 MiB above `.text`, inside a rel32's reach.
const TABLE: u64 = TEXT + 0x10_0000;
/// Where `.altinstr_replacement` is linked.
const REPL: u64 = TEXT + 0x20_0000;

/// `cli` + 5 NOPs at 0, `sti` + 5 NOPs at 6, `ud2` at 12, 14, 16, 18, `ret` at 20.
fn code() -> Vec<u8> {
    let mut c = vec![0xfa, 0x90, 0x90, 0x90, 0x90, 0x90];
    c.extend([0xfb, 0x90, 0x90, 0x90, 0x90, 0x90]);
    c.extend([0x0f, 0x0b, 0x0f, 0x0b, 0x0f, 0x0b, 0x0f, 0x0b, 0xc3]);
    c
}
const CLI: u64 = TEXT;
const STI: u64 = TEXT + 6;
const UD2: [u64; 4] = [TEXT + 12, TEXT + 14, TEXT + 16, TEXT + 18];

/// A rel32 field at `field` pointing at `target`.
fn rel(field: u64, target: u64) -> [u8; 4] {
    i32::try_from(target.wrapping_sub(field) as i64)
        .unwrap()
        .to_le_bytes()
}

fn image(extra: &[Extra]) -> Image {
    Image::from_bytes("tables", testimg::build(&code(), &[], extra)).unwrap()
}

fn scan(img: &Image) -> ScanReport<'_> {
    scan_image(img, Options { threads: 1 }, None)
}

fn report(t: &LinuxTables, kind: TableKind) -> &pvpatch::linux::TableReport {
    t.report(kind).unwrap()
}

/// The reason the site at `addr` was left alone, if it was.
fn left_alone(r: &ScanReport<'_>, addr: u64) -> Option<String> {
    let s = r
        .analysis
        .sites
        .iter()
        .find(|s| s.found.addr == addr)
        .unwrap_or_else(|| panic!("no site at {addr:#x}"));
    s.room.reason.clone().filter(|_| s.room.forms.is_empty())
}

/// One `.parainstructions` entry for `cli` (6 bytes with its padding), in `size`-byte layout,
/// followed by a zero entry of section padding.
fn parainstructions(size: usize) -> Vec<u8> {
    let mut t = vec![0u8; 2 * size];
    match size {
        16 => t[..8].copy_from_slice(&CLI.to_le_bytes()),
        6 | 8 => t[..4].copy_from_slice(&rel(TABLE, CLI)),
        _ => unreachable!(),
    }
    let (ty, len) = if size == 16 { (8, 9) } else { (4, 5) };
    t[ty] = 3; // a type: not looked at
    t[len] = 6;
    t
}

#[test]
fn parainstructions_in_each_layout() {
    for size in [16, 8, 6] {
        let img = image(&[Extra::data(
            ".parainstructions",
            TABLE,
            parainstructions(size),
        )]);
        let r = scan(&img);
        let rep = report(&r.tables, TableKind::Parainstructions);
        assert_eq!(rep.problem, None, "{size}: {rep:?}");
        assert_eq!(
            (rep.entry_size, rep.entries, rep.padding),
            (size, 1, 1),
            "{rep:?}"
        );
        assert!(rep.layout.unwrap().contains(&format!("{size} bytes")));
        let why = left_alone(&r, CLI).expect("the cli inside a paravirt site is left alone");
        assert!(why.contains(".parainstructions entry 0"), "{why}");
        // The sti after it is no one's: it is ours to patch, with its 5 NOPs.
        assert_eq!(left_alone(&r, STI), None);
        let sti = r
            .analysis
            .sites
            .iter()
            .find(|s| s.found.addr == STI)
            .unwrap();
        assert_eq!(sti.room.in_place, 6);
    }
}

/// One `.altinstructions` entry: `sti` and its padding (6 bytes) may be replaced by the 3 bytes
/// at `.altinstr_replacement`.
fn altinstructions(size: usize) -> Vec<u8> {
    let mut t = vec![0u8; size];
    t[..4].copy_from_slice(&rel(TABLE, STI));
    t[4..8].copy_from_slice(&rel(TABLE + 4, REPL));
    let lens = if size == 12 { 10 } else { 12 };
    t[8] = 0x94; // a feature bit: not looked at
    t[lens] = 6;
    t[lens + 1] = 3;
    t
}

#[test]
fn altinstructions_in_each_layout_with_their_replacement() {
    for size in [12, 14] {
        let replacement = Extra {
            name: ".altinstr_replacement".into(),
            addr: REPL,
            flags: (object::elf::SHF_ALLOC | object::elf::SHF_EXECINSTR) as u64,
            data: vec![0x0f, 0x01, 0xcb, 0xc3], // stac; ret
        };
        let img = image(&[
            Extra::data(".altinstructions", TABLE, altinstructions(size)),
            replacement,
        ]);
        let r = scan(&img);
        let rep = report(&r.tables, TableKind::Altinstructions);
        assert_eq!(rep.problem, None, "{size}: {rep:?}");
        assert_eq!((rep.entry_size, rep.entries), (size, 1), "{rep:?}");
        assert!(
            r.tables.is_start(STI) && r.tables.is_start(REPL),
            "both the original and the replacement are instruction starts"
        );
        let why = left_alone(&r, STI).expect("an alternative's bytes are Linux's");
        assert!(why.contains(".altinstructions entry 0"), "{why}");
        assert_eq!(left_alone(&r, CLI), None);
    }
    // A replacement outside `.altinstr_replacement` (here: no such section) is not an entry
    // of this table at all: the layout is not recognised, and nothing is protected.
    let img = image(&[Extra::data(".altinstructions", TABLE, altinstructions(14))]);
    let r = scan(&img);
    let rep = report(&r.tables, TableKind::Altinstructions);
    assert!(
        rep.problem.as_deref().unwrap().contains("not recognised"),
        "{rep:?}"
    );
    assert_eq!(left_alone(&r, STI), None);
}

/// 24 bytes of `__bug_table` that are two 12-byte entries and three 8-byte ones at once, each
/// pointing at a `ud2`: the reader must not pick one.
#[test]
fn a_table_that_fits_two_layouts_is_refused_not_guessed() {
    let mut t = vec![0u8; 24];
    t[0..4].copy_from_slice(&rel(TABLE, UD2[0])); // both layouts' first entry
    t[8..12].copy_from_slice(&rel(TABLE + 8, UD2[1])); // 8-byte entry 1; 12-byte entry 0's file
    t[12..16].copy_from_slice(&rel(TABLE + 12, UD2[2])); // 12-byte entry 1; 8-byte entry 1's flags
    t[16..20].copy_from_slice(&rel(TABLE + 16, UD2[3])); // 8-byte entry 2; 12-byte entry 1's file
    let img = image(&[Extra::data("__bug_table", TABLE, t.clone())]);
    let r = scan(&img);
    let rep = report(&r.tables, TableKind::BugTable);
    let p = rep.problem.as_deref().unwrap_or("");
    assert!(
        p.contains("layout ambiguous") && p.contains("12 bytes") && p.contains("8 bytes"),
        "{rep:?}"
    );
    assert_eq!((rep.layout, rep.entries), (None, 0));
    assert!(r.tables.protected.is_empty());

    // A third 12-byte entry makes 36 bytes, a size no 8-byte layout divides: now it is read.
    t.extend_from_slice(&rel(TABLE + 24, UD2[0]));
    t.extend([0; 8]);
    let img = image(&[Extra::data("__bug_table", TABLE, t)]);
    let r = scan(&img);
    let rep = report(&r.tables, TableKind::BugTable);
    assert!(
        rep.problem.is_none() && rep.entry_size == 12 && rep.entries == 3,
        "{rep:?}"
    );
}

#[test]
fn a_table_of_zeros_is_empty_not_ambiguous() {
    // 48 bytes: a whole number of 16-, 8- and 6-byte entries.
    let img = image(&[Extra::data(".parainstructions", TABLE, vec![0; 48])]);
    let r = scan(&img);
    let rep = report(&r.tables, TableKind::Parainstructions);
    assert_eq!((rep.problem.as_deref(), rep.entries), (None, 0), "{rep:?}");
    assert!(rep.layout.unwrap().contains("zero"));
    assert_eq!(left_alone(&r, CLI), None);
}

/// A million `.smp_locks` entries (4 MB) naming one `lock` prefix: read in one pass, kept as one
/// protected range, and the image is scanned as quickly as with one entry.
#[test]
fn a_million_entries_naming_one_byte_cost_one_range() {
    let mut code = code();
    let lock = TEXT + code.len() as u64;
    code.extend([0xf0, 0x48, 0x0f, 0xb1, 0x0a, 0xc3]); // lock cmpxchg %rcx,(%rdx); ret
    let n = 1_000_000u64;
    let mut t = Vec::with_capacity(4 * n as usize);
    for i in 0..n {
        t.extend_from_slice(&rel(TABLE + 4 * i, lock));
    }
    let img = Image::from_bytes(
        "locks",
        testimg::build(&code, &[], &[Extra::data(".smp_locks", TABLE, t)]),
    )
    .unwrap();
    let r = scan(&img);
    let rep = report(&r.tables, TableKind::SmpLocks);
    assert_eq!((rep.problem.as_deref(), rep.entries), (None, 1_000_000));
    assert_eq!(r.tables.protected.len(), 1);
    assert_eq!(r.tables.protected[0].entry, 0, "the first entry is kept");
    assert_eq!(r.analysis.sites.len(), 2, "cli and sti");
}
