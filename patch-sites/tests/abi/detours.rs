//! Version-2 tables (load-time detours and an arena), written and read back, and one test per
//! way their header, records or area can be wrong: each fails if its check is removed (found
//! by `cargo xtask mutants`).

use patch_sites::crc32::crc32;
use patch_sites::op::Operand;
use patch_sites::table::{
    AddrRange, DetourError, DetourSpec, Form, HEADER_SIZE_V2, MemberSpec, RECORD_SIZE, RecordError,
    Site, SiteTable, TableError, sealed_table_size_with, write_sealed_table_with,
};
use patch_sites::{Op, RegSet};

use crate::table::{TABLE_ADDR, TEXT};

const SITE: u64 = TEXT.start + 0x10;
const STUB: u64 = TEXT.start + 0x1000;
const ARENA: AddrRange = AddrRange::new(TEXT.start + 0x2000, TEXT.start + 0x3000);
/// The stub: the moved `cli` and four NOPs, then `jmp` back past the moved range.
const STUB_BYTES: [u8; 10] = [0xfa, 0x0f, 0x1f, 0x40, 0x00, 0xe9, 0, 0, 0, 0];

fn movable(addr: u64) -> Site {
    Site {
        addr,
        site_len: 1,
        insn_len: 1,
        op_id: Op::Cli.id(),
        form: Form::Movable,
        operand: Operand::None,
        width: 0,
        flags: 0,
        clobbers: RegSet::EMPTY,
        stub: Some(STUB),
    }
}

fn detour() -> DetourSpec<'static> {
    DetourSpec {
        moved: SITE,
        moved_len: 5,
        stub: STUB,
        stub_bytes: &STUB_BYTES,
        tramp: None,
        moved_crc: 0x1234_5678,
    }
}

const MEMBER: MemberSpec = MemberSpec {
    record: 0,
    detour: 0,
    copy_off: 0,
    copy_len: 1,
};

/// A sealed version-2 table: one movable `cli`, its detour and member, and the arena.
fn v2() -> Vec<u8> {
    let d = [detour()];
    let mut buf = vec![0u8; sealed_table_size_with(1, &d, 1, true)];
    let n = write_sealed_table_with(
        &[movable(SITE)],
        &d,
        &[MEMBER],
        Some(ARENA),
        TABLE_ADDR,
        &mut buf,
    )
    .expect("a valid table");
    assert_eq!(n, buf.len());
    buf
}

fn parse(b: &[u8]) -> Result<SiteTable<'_>, TableError> {
    SiteTable::parse_contiguous(b, TABLE_ADDR, &[TEXT])
}

/// Recomputes the checksum over what it covers: the header, the one record, and as much of
/// the area as the header's length says (the area follows the record here).
fn reseal(b: &mut [u8]) {
    b[28..32].fill(0);
    let covered = (HEADER_SIZE_V2 + RECORD_SIZE + u32_at(b, 40) as usize).min(b.len());
    let sum = crc32(&b[..covered]);
    b[28..32].copy_from_slice(&sum.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Edits a copy of the version-2 table, reseals it, and parses it.
fn edited(f: impl FnOnce(&mut Vec<u8>)) -> Result<(), TableError> {
    let mut b = v2();
    f(&mut b);
    reseal(&mut b);
    parse(&b).map(|_| ())
}

#[test]
fn a_written_version_2_table_parses_back() {
    let b = v2();
    let t = parse(&b).expect("parses");
    assert_eq!(t.len(), 1);
    assert!(!t.is_empty());
    assert_eq!(t.site(0), Some(movable(SITE)));
    assert_eq!(t.arena(), Some(ARENA));
    let v = t.view(0).expect("a view of record 0");
    assert_eq!(
        (v.addr, v.site_len, v.insn_len, v.form, v.stub),
        (SITE, 1, 1, Form::Movable, Some(STUB))
    );
    let (area, len) = t.header().detour_area().expect("an area");
    // Descriptor (24), member (8), stub bytes: right after the one record.
    assert_eq!(area, TABLE_ADDR + (HEADER_SIZE_V2 + RECORD_SIZE) as u64);
    assert_eq!(len as usize, 24 + 8 + STUB_BYTES.len());
    let a = t.detour_area();
    assert_eq!((a.detours, a.members), (1, 1));
    let d = a.detour(0).expect("detour 0");
    assert_eq!(
        (
            d.moved,
            d.moved_len,
            d.stub,
            d.stub_bytes,
            d.tramp,
            d.moved_crc
        ),
        (SITE, 5, STUB, &STUB_BYTES[..], None, 0x1234_5678)
    );
    assert_eq!(a.member_of(0).map(|m| (m.detour, m.copy_len)), Some((0, 1)));
}

#[test]
fn an_empty_table_is_empty() {
    let mut buf = vec![0u8; sealed_table_size_with(0, &[], 0, false)];
    write_sealed_table_with(&[], &[], &[], None, TABLE_ADDR, &mut buf).unwrap();
    let t = parse(&buf).unwrap();
    assert!(t.is_empty());
    assert_eq!(t.len(), 0);
    assert_eq!(t.arena(), None);
    assert_eq!(t.header().detour_area(), None);
}

#[test]
fn an_arena_alone_makes_a_version_2_table_without_an_area() {
    let mut buf = vec![0u8; sealed_table_size_with(0, &[], 0, true)];
    write_sealed_table_with(&[], &[], &[], Some(ARENA), TABLE_ADDR, &mut buf).unwrap();
    let t = parse(&buf).unwrap();
    assert_eq!(t.arena(), Some(ARENA));
    assert_eq!(t.header().detour_area(), None);
}

#[test]
fn a_version_2_table_must_be_sealed_and_its_reserved_words_zero() {
    // Unsealed: flags 0, count and checksum 0 (else another check fires first).
    let mut b = v2();
    b[14..16].fill(0);
    b[24..32].fill(0);
    assert!(matches!(parse(&b), Err(TableError::BadFlags(0))));
    for word in 0..3 {
        let r = edited(|b| put_u32(b, 52 + 4 * word, 1));
        assert!(matches!(r, Err(TableError::BadFlags(_))), "{word}: {r:?}");
    }
}

#[test]
fn the_area_and_its_length_come_together() {
    let r = edited(|b| put_u32(b, 32, 0));
    assert_eq!(r.err(), Some(TableError::Detours(DetourError::Truncated)));
    let r = edited(|b| put_u32(b, 40, 0));
    assert_eq!(r.err(), Some(TableError::Detours(DetourError::Truncated)));
}

#[test]
fn the_area_must_hold_its_descriptors_and_members() {
    // Exactly the descriptor and the member: accepted by the header (the stub then lies outside
    // the area, which the area's own check refuses); one byte fewer: refused by the header.
    let listed = 24 + 8;
    let r = edited(|b| put_u32(b, 40, listed));
    assert_eq!(
        r.err(),
        Some(TableError::Detours(DetourError::StubOutsideArea(0)))
    );
    let r = edited(|b| put_u32(b, 40, listed - 1));
    assert_eq!(r.err(), Some(TableError::Detours(DetourError::Truncated)));
    // With the counts doubled, what they list is 64 bytes: 63 is too few.
    let r = edited(|b| {
        b[36..38].copy_from_slice(&2u16.to_le_bytes());
        b[38..40].copy_from_slice(&2u16.to_le_bytes());
        put_u32(b, 40, 2 * listed - 1);
    });
    assert_eq!(r.err(), Some(TableError::Detours(DetourError::Truncated)));
}

#[test]
fn an_arena_whose_end_overflows_is_refused() {
    let r = edited(|b| put_u32(b, 48, u32::MAX));
    assert!(
        matches!(r, Err(TableError::Detours(DetourError::BadArena))),
        "{r:?}"
    );
}

#[test]
fn a_movable_record_needs_a_stub_and_a_member() {
    // No stub: the record itself is refused.
    let r = edited(|b| put_u32(b, HEADER_SIZE_V2 + 4, 0));
    assert!(
        matches!(
            r,
            Err(TableError::Record {
                index: 0,
                error: RecordError::FormMismatch
            })
        ),
        "{r:?}"
    );
    // A stub outside the code.
    let r = edited(|b| {
        let rel = u32_at(b, HEADER_SIZE_V2 + 4).wrapping_add(0x0100_0000);
        put_u32(b, HEADER_SIZE_V2 + 4, rel);
    });
    assert!(
        matches!(
            r,
            Err(TableError::Record {
                error: RecordError::StubOutsideImage { .. },
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn a_movable_record_in_a_version_1_table_has_no_member() {
    // The same record in a table without an area.
    let site = movable(SITE);
    let mut buf = vec![0u8; sealed_table_size_with(1, &[], 0, false)];
    let r = write_sealed_table_with(&[site], &[], &[], None, TABLE_ADDR, &mut buf);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        parse(&buf).err(),
        Some(TableError::Detours(DetourError::MissingMember(0)))
    );
}

#[test]
fn form_codes_and_names() {
    for (code, form, name) in [
        (0, Form::Native, "native"),
        (1, Form::IndirectCall, "indirect_call"),
        (2, Form::Detour, "detour"),
        (3, Form::Trap, "trap"),
        (4, Form::Movable, "movable"),
    ] {
        assert_eq!(Form::from_code(code), Some(form));
        assert_eq!(form.name(), name);
    }
    assert_eq!(Form::from_code(5), None);
}

#[test]
fn errors_say_what_is_wrong() {
    let shown = [
        TableError::BadFlags(3).to_string(),
        TableError::Detours(DetourError::Truncated).to_string(),
        RecordError::FormMismatch.to_string(),
        RecordError::BadInstructionLength(0).to_string(),
    ];
    for s in &shown {
        assert!(s.len() > 8, "{s:?}");
    }
    assert!(shown[1].contains("truncated"), "{}", shown[1]);
}

/// A table of two detours: a host that carries no site (`host_len` bytes at `host`, stub at
/// `STUB`) and a `cli`'s two-byte range at `guest` whose trampoline is at `tramp`.
fn hosted(host: u64, host_len: u8, guest: u64, tramp: u64) -> Result<(), TableError> {
    let host_d = DetourSpec {
        moved: host,
        moved_len: host_len,
        stub: STUB,
        stub_bytes: &STUB_BYTES,
        tramp: None,
        moved_crc: 1,
    };
    let guest_d = DetourSpec {
        moved: guest,
        moved_len: 2,
        stub: STUB + 0x20,
        stub_bytes: &STUB_BYTES,
        tramp: Some(tramp),
        moved_crc: 2,
    };
    // Descriptors in the order of their moved ranges (and stubs: a guest first swaps them).
    let mut d = [host_d, guest_d];
    if guest < host {
        d[0].stub = STUB + 0x20;
        d[1].stub = STUB;
        d.swap(0, 1);
    }
    let g = d.iter().position(|d| d.moved == guest).unwrap() as u16;
    let site = Site {
        stub: Some(d[g as usize].stub),
        ..movable(guest)
    };
    let member = MemberSpec {
        detour: g,
        ..MEMBER
    };
    let mut buf = vec![0u8; sealed_table_size_with(1, &d, 1, false)];
    write_sealed_table_with(&[site], &d, &[member], None, TABLE_ADDR, &mut buf).expect("written");
    let t = parse(&buf)?;
    let a = t.detour_area();
    assert_eq!(a.host_of(g), Some(1 - g), "the guest's host");
    assert_eq!(a.host_of(1 - g), None, "a host has no host");
    Ok(())
}

/// A trampoline may lie in another detour's moved range only in its *dead tail*: after the
/// `jmp rel32` its installation writes, and inside it.
#[test]
fn a_trampoline_lies_in_a_moved_range_only_in_its_dead_tail() {
    let (host, guest) = (TEXT.start + 0x40, TEXT.start + 0x60);
    assert_eq!(hosted(host, 12, guest, host + 5), Ok(()));
    assert_eq!(hosted(host, 12, guest, host + 7), Ok(()));
    let overlap = Err(TableError::Detours(DetourError::Overlap(1)));
    // Over the `jmp rel32`, or past the range's end.
    assert_eq!(hosted(host, 12, guest, host + 4), overlap);
    assert_eq!(hosted(host, 12, guest, host + 8), overlap);
    // A range too short to host one.
    assert_eq!(hosted(host, 9, guest, host + 4), overlap);
    // A later range may host it too (its descriptor comes after the detour's).
    let (host, guest) = (TEXT.start + 0x60, TEXT.start + 0x40);
    assert_eq!(hosted(host, 12, guest, host + 5), Ok(()));
    assert_eq!(
        hosted(host, 12, guest, host + 4),
        Err(TableError::Detours(DetourError::Overlap(0)))
    );
}

/// Two `cli` detours: a 5-byte range at `SITE` (stub at `STUB`) and a 2-byte range near the
/// stubs whose trampoline is at `tramp`.
fn two_detours(tramp: u64) -> Result<(), TableError> {
    let far = STUB + 0x40;
    let d = [
        detour(),
        DetourSpec {
            moved: far,
            moved_len: 2,
            stub: STUB + 0x100,
            stub_bytes: &STUB_BYTES,
            tramp: Some(tramp),
            moved_crc: 2,
        },
    ];
    let sites = [
        movable(SITE),
        Site {
            stub: Some(STUB + 0x100),
            ..movable(far)
        },
    ];
    let members = [
        MEMBER,
        MemberSpec {
            record: 1,
            detour: 1,
            ..MEMBER
        },
    ];
    let mut buf = vec![0u8; sealed_table_size_with(2, &d, 2, false)];
    write_sealed_table_with(&sites, &d, &members, None, TABLE_ADDR, &mut buf).expect("written");
    parse(&buf).map(|_| ())
}

/// A trampoline never lies over a stub, its own or another detour's: writing it would change
/// code a detour runs.
#[test]
fn a_trampoline_never_lies_over_a_stub() {
    assert_eq!(two_detours(STUB + 0x10), Ok(()));
    let overlap = Err(TableError::Detours(DetourError::Overlap(1)));
    assert_eq!(two_detours(STUB + 2), overlap);
    assert_eq!(two_detours(STUB + 0x100 - 4), overlap);
}

/// The table of [`detour()`] and its member (record 0), with `sites` and `arena`.
fn one_detour(sites: &[Site], arena: Option<AddrRange>) -> Result<(), TableError> {
    let d = [detour()];
    let mut buf = vec![0u8; sealed_table_size_with(sites.len(), &d, 1, arena.is_some())];
    write_sealed_table_with(sites, &d, &[MEMBER], arena, TABLE_ADDR, &mut buf).expect("written");
    parse(&buf).map(|_| ())
}

/// A moved range covers no site but its own members': another record there would be written
/// in place under the range's `jmp`, or moved with it unchecked.
#[test]
fn a_moved_range_covers_only_its_own_sites() {
    let with = |other: Site| one_detour(&[movable(SITE), other], None);
    let native = |addr| Site {
        form: Form::Native,
        stub: None,
        ..movable(addr)
    };
    // Just past the range: fine.
    assert_eq!(with(native(SITE + 5)), Ok(()));
    // Inside it.
    assert_eq!(
        with(native(SITE + 2)),
        Err(TableError::Detours(DetourError::Overlap(0)))
    );
}

/// A moved range never covers the arena: its `jmp` would be written into the backend's code.
#[test]
fn a_moved_range_never_covers_the_arena() {
    let with = |arena: AddrRange| one_detour(&[movable(SITE)], Some(arena));
    assert_eq!(with(ARENA), Ok(()));
    // Over the range's last bytes (and none of the site's).
    assert_eq!(
        with(AddrRange::new(SITE + 3, SITE + 0x100)),
        Err(TableError::Detours(DetourError::Overlap(0)))
    );
}
