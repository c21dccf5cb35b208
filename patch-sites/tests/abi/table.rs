//! One test per way a site table can be wrong; each fails if its check is removed.

use patch_sites::crc32::crc32;
use patch_sites::op::Operand;
use patch_sites::table::{
    self, AddrRange, FLAG_SEALED, Form, HEADER_SIZE, Header, RECORD_SIZE, RecordError, Site,
    SiteTable, TableError, WriteError, write_sealed_table,
};
use patch_sites::{Gpr, Op, RegSet};

pub const TABLE_ADDR: u64 = 0xffff_ffff_8200_0000;
pub const TEXT: AddrRange = AddrRange::new(0xffff_ffff_8100_0000, 0xffff_ffff_8180_0000);

fn site(addr: u64, op: Op, len: u8, insn_len: u8, operand: Operand, width: u8) -> Site {
    Site {
        addr,
        site_len: len,
        insn_len,
        op_id: op.id(),
        form: Form::Native,
        operand,
        width,
        flags: 0,
        clobbers: RegSet::EMPTY,
        stub: None,
    }
}

pub fn sample_sites() -> Vec<Site> {
    vec![
        site(TEXT.start + 0x10, Op::Cli, 5, 1, Operand::None, 0),
        site(
            TEXT.start + 0x20,
            Op::MovToCr3,
            5,
            3,
            Operand::Reg(Gpr::Rdi),
            8,
        ),
        site(TEXT.start + 0x30, Op::Out, 2, 2, Operand::PortImm(0x80), 1),
        site(TEXT.start + 0x40, Op::In, 1, 1, Operand::PortDx, 4),
    ]
}

fn sealed(sites: &[Site]) -> Vec<u8> {
    let mut buf = vec![0u8; table::sealed_table_size(sites.len())];
    let n = write_sealed_table(sites, TABLE_ADDR, &mut buf).expect("valid sites");
    assert_eq!(n, buf.len());
    buf
}

fn parse(bytes: &[u8]) -> Result<SiteTable<'_>, TableError> {
    SiteTable::parse_contiguous(bytes, TABLE_ADDR, &[TEXT])
}

/// Recomputes a sealed table's checksum after a test edited it, so that the check under test
/// is the one that fires.
fn reseal(b: &mut [u8]) {
    b[28..32].fill(0);
    let sum = crc32(b);
    b[28..32].copy_from_slice(&sum.to_le_bytes());
}

fn record_mut(b: &mut [u8], i: usize) -> &mut [u8] {
    &mut b[HEADER_SIZE + i * RECORD_SIZE..HEADER_SIZE + (i + 1) * RECORD_SIZE]
}

fn record_error(r: Result<SiteTable<'_>, TableError>) -> (u32, RecordError) {
    match r {
        Err(TableError::Record { index, error }) => (index, error),
        other => panic!("expected a record error, got {other:?}"),
    }
}

#[test]
fn a_written_table_parses_back() {
    let sites = sample_sites();
    let b = sealed(&sites);
    let t = parse(&b).expect("parses");
    assert!(t.header().is_sealed());
    assert_eq!(t.len(), 4);
    assert_eq!(t.sites().collect::<Vec<_>>(), sites);
    assert_eq!(t.unknown_ops(), 0);
}

#[test]
fn truncated_header() {
    let b = sealed(&sample_sites());
    for n in [0, 1, 8, 31] {
        assert_eq!(
            parse(&b[..n]).unwrap_err(),
            TableError::TruncatedHeader { available: n }
        );
    }
}

#[test]
fn truncated_records() {
    let b = sealed(&sample_sites());
    let cut = &b[..b.len() - 1];
    assert!(matches!(
        parse(cut),
        Err(TableError::TruncatedRecords { .. })
    ));
}

#[test]
fn bad_magic() {
    let mut b = sealed(&sample_sites());
    b[0] ^= 0x20;
    assert_eq!(parse(&b).unwrap_err(), TableError::BadMagic);
}

#[test]
fn unknown_version_is_refused_as_a_whole() {
    let mut b = sealed(&sample_sites());
    b[8..10].copy_from_slice(&3u16.to_le_bytes());
    reseal(&mut b);
    assert_eq!(parse(&b).unwrap_err(), TableError::UnsupportedVersion(3));
}

#[test]
fn header_size_mismatch() {
    let mut b = sealed(&sample_sites());
    b[10..12].copy_from_slice(&40u16.to_le_bytes());
    reseal(&mut b);
    assert_eq!(parse(&b).unwrap_err(), TableError::BadHeaderSize(40));
}

#[test]
fn record_size_mismatch() {
    let mut b = sealed(&sample_sites());
    b[12..14].copy_from_slice(&16u16.to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        parse(&b).unwrap_err(),
        TableError::RecordSizeMismatch { found: 16 }
    );
}

#[test]
fn unknown_header_flags() {
    let mut b = sealed(&sample_sites());
    b[14..16].copy_from_slice(&(FLAG_SEALED | 0x80).to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        parse(&b).unwrap_err(),
        TableError::BadFlags(FLAG_SEALED | 0x80)
    );
}

#[test]
fn count_that_overflows() {
    let mut b = sealed(&sample_sites());
    b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        parse(&b).unwrap_err(),
        TableError::CountMismatch {
            count: u32::MAX,
            extent_records: 4
        }
    );
}

#[test]
fn extent_past_the_bytes_given() {
    // A records_end that claims far more records than there are bytes.
    let mut b = sealed(&sample_sites());
    let end = i32::from_le_bytes(b[20..24].try_into().unwrap()) + 1000 * RECORD_SIZE as i32;
    b[20..24].copy_from_slice(&end.to_le_bytes());
    b[24..28].copy_from_slice(&1004u32.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(
        parse(&b),
        Err(TableError::TruncatedRecords { .. })
    ));
}

#[test]
fn extent_not_a_whole_number_of_records() {
    let mut b = sealed(&sample_sites());
    let end = i32::from_le_bytes(b[20..24].try_into().unwrap()) - 1;
    b[20..24].copy_from_slice(&end.to_le_bytes());
    reseal(&mut b);
    assert_eq!(parse(&b).unwrap_err(), TableError::BadExtent);
}

#[test]
fn inverted_extent() {
    let mut b = sealed(&sample_sites());
    b[16..20].copy_from_slice(&1000i32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(parse(&b).unwrap_err(), TableError::BadExtent);
}

#[test]
fn bad_checksum() {
    let mut b = sealed(&sample_sites());
    let stored = u32::from_le_bytes(b[28..32].try_into().unwrap());
    // A flipped bit in a record, with the header untouched.
    record_mut(&mut b, 2)[18] ^= 1;
    match parse(&b) {
        Err(TableError::BadChecksum {
            stored: s,
            computed,
        }) => {
            assert_eq!(s, stored);
            assert_ne!(computed, stored);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unsealed_table_with_a_checksum() {
    let mut b = sealed(&sample_sites());
    b[14..16].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(parse(&b).unwrap_err(), TableError::UnsealedWithChecksum);
}

#[test]
fn offset_outside_the_image() {
    let mut b = sealed(&sample_sites());
    let r = record_mut(&mut b, 1);
    let rel = i32::from_le_bytes(r[0..4].try_into().unwrap());
    r[0..4].copy_from_slice(&(rel - 0x10_0000).to_le_bytes());
    reseal(&mut b);
    let (i, e) = record_error(parse(&b));
    assert_eq!(i, 1);
    assert!(matches!(e, RecordError::SiteOutsideImage { .. }), "{e:?}");
}

#[test]
fn site_straddling_the_end_of_the_image() {
    let mut sites = sample_sites();
    sites[3].addr = TEXT.end - 1;
    sites[3].site_len = 2;
    sites[3].insn_len = 1;
    let b = sealed(&sites);
    let (i, e) = record_error(parse(&b));
    assert_eq!(
        (i, e),
        (3, RecordError::SiteOutsideImage { addr: TEXT.end - 1 })
    );
}

#[test]
fn overlapping_sites() {
    let mut b = sealed(&sample_sites());
    // Move site 2 (at +0x30) to +0x22, inside site 1 (+0x20, 5 bytes).
    let r = record_mut(&mut b, 2);
    let rel = i32::from_le_bytes(r[0..4].try_into().unwrap());
    r[0..4].copy_from_slice(&(rel - 0xe).to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        record_error(parse(&b)),
        (2, RecordError::Overlap { other: 1 })
    );
}

#[test]
fn overlapping_sites_in_an_unsorted_linker_table() {
    // Unsealed tables may be in any order; an overlap is still found.
    let sites = [
        site(TEXT.start + 0x40, Op::Cli, 5, 1, Operand::None, 0),
        site(TEXT.start + 0x10, Op::Sti, 5, 1, Operand::None, 0),
        site(TEXT.start + 0x42, Op::Hlt, 5, 1, Operand::None, 0),
    ];
    let b = unsealed(&sites);
    let r = SiteTable::parse_contiguous(&b, TABLE_ADDR, &[TEXT]);
    assert_eq!(record_error(r), (2, RecordError::Overlap { other: 0 }));
    // And without the overlap, the unsorted table is accepted.
    let b = unsealed(&sites[..2]);
    assert_eq!(
        SiteTable::parse_contiguous(&b, TABLE_ADDR, &[TEXT])
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn the_sort_based_overlap_check_agrees_with_the_pairwise_one() {
    // Sites 0 and 3 overlap, far apart in table order and in address order's neighbours.
    let sites = [
        site(TEXT.start + 0x40, Op::Cli, 5, 1, Operand::None, 0),
        site(TEXT.start + 0x10, Op::Sti, 5, 1, Operand::None, 0),
        site(TEXT.start + 0x80, Op::Hlt, 5, 1, Operand::None, 0),
        site(TEXT.start + 0x44, Op::Cli, 5, 1, Operand::None, 0),
        site(TEXT.start, Op::Sti, 5, 1, Operand::None, 0),
    ];
    let parse_both = |b: &[u8]| {
        let h = Header::parse(b, TABLE_ADDR).unwrap();
        let records = &b[HEADER_SIZE..];
        let pairwise = SiteTable::parse(h, records, &[TEXT]).map(|t| t.len());
        let mut scratch = vec![table::Span::default(); sites.len()];
        let sorted =
            SiteTable::parse_with_scratch(h, records, &[TEXT], &mut scratch).map(|t| t.len());
        (pairwise, sorted)
    };
    let (pairwise, sorted) = parse_both(&unsealed(&sites));
    assert_eq!(pairwise, sorted);
    assert_eq!(
        pairwise,
        Err(TableError::Record {
            index: 3,
            error: RecordError::Overlap { other: 0 }
        })
    );
    // Touching is not overlapping: a site may end where the next begins.
    let mut apart = sites;
    apart[3] = site(TEXT.start + 0x45, Op::Cli, 5, 1, Operand::None, 0);
    assert_eq!(parse_both(&unsealed(&apart)), (Ok(5), Ok(5)));
}

#[test]
fn unsorted_sealed_table() {
    let mut b = sealed(&sample_sites());
    let r = record_mut(&mut b, 3);
    let rel = i32::from_le_bytes(r[0..4].try_into().unwrap());
    r[0..4].copy_from_slice(&(rel - 0x3f).to_le_bytes()); // before site 0
    reseal(&mut b);
    assert_eq!(record_error(parse(&b)), (3, RecordError::Unsorted));
}

#[test]
fn site_longer_than_its_room() {
    let mut b = sealed(&sample_sites());
    record_mut(&mut b, 1)[11] = 6; // insn_len 6 in a 5-byte site
    reseal(&mut b);
    assert_eq!(
        record_error(parse(&b)),
        (
            1,
            RecordError::SiteLongerThanRoom {
                insn_len: 6,
                site_len: 5
            }
        )
    );
}

#[test]
fn zero_and_overlong_instruction_lengths() {
    for bad in [0u8, 16] {
        let mut b = sealed(&sample_sites());
        let r = record_mut(&mut b, 0);
        r[10] = 20;
        r[11] = bad;
        reseal(&mut b);
        assert_eq!(
            record_error(parse(&b)),
            (0, RecordError::BadInstructionLength(bad))
        );
    }
}

#[test]
fn unknown_op_stays_native_and_the_rest_is_used() {
    let mut b = sealed(&sample_sites());
    record_mut(&mut b, 1)[8..10].copy_from_slice(&0x7ffu16.to_le_bytes());
    reseal(&mut b);
    let t = parse(&b).expect("a table with an unknown op is still used");
    assert_eq!(t.unknown_ops(), 1);
    let sites: Vec<Site> = t.sites().collect();
    assert_eq!(sites.len(), 4);
    assert_eq!(sites[1].op(), None);
    assert_eq!(sites[1].op_id, 0x7ff);
    assert_eq!(sites[0].op(), Some(Op::Cli));
    assert_eq!(sites[3].op(), Some(Op::In));
}

#[test]
fn unknown_op_is_still_checked_structurally() {
    let mut b = sealed(&sample_sites());
    let r = record_mut(&mut b, 1);
    r[8..10].copy_from_slice(&0x7ffu16.to_le_bytes());
    r[12] = 9; // bad form
    reseal(&mut b);
    assert_eq!(record_error(parse(&b)), (1, RecordError::BadForm(9)));
}

#[test]
fn bad_operand_fields() {
    let cases: [(usize, usize, u8, RecordError); 6] = [
        (0, 13, 9, RecordError::BadOperandKind(9)),
        (1, 14, 16, RecordError::BadRegister),
        (0, 14, 3, RecordError::BadRegister), // a register on an operand that has none
        (1, 16, 3, RecordError::BadWidth(3)),
        (3, 18, 1, RecordError::BadPort), // a port on a dx operand
        (0, 17, 4, RecordError::ReservedBits),
    ];
    for (rec, off, val, want) in cases {
        let mut b = sealed(&sample_sites());
        record_mut(&mut b, rec)[off] = val;
        reseal(&mut b);
        assert_eq!(
            record_error(parse(&b)),
            (rec as u32, want),
            "byte {off} := {val}"
        );
    }
}

#[test]
fn the_no_stack_flag_is_not_reserved() {
    // Bit 1 (`NO_STACK`) on any op; bit 0 (`REP`) stays for ins/outs.
    let mut b = sealed(&sample_sites());
    record_mut(&mut b, 0)[17] = table::SITE_FLAG_NO_STACK;
    reseal(&mut b);
    let t = parse(&b).expect("parses");
    assert_eq!(
        t.sites().next().map(|s| s.flags),
        Some(table::SITE_FLAG_NO_STACK)
    );
    record_mut(&mut b, 0)[17] = table::SITE_FLAG_NO_STACK | table::SITE_FLAG_REP;
    reseal(&mut b);
    assert_eq!(record_error(parse(&b)), (0, RecordError::ReservedBits));
}

#[test]
fn operand_the_op_does_not_take() {
    let mut b = sealed(&sample_sites());
    // cli with a register operand
    let r = record_mut(&mut b, 0);
    r[13] = 1;
    r[14] = 0;
    reseal(&mut b);
    let (_, e) = record_error(parse(&b));
    assert!(matches!(e, RecordError::Operand(_)), "{e:?}");
    // out with width 8
    let mut b = sealed(&sample_sites());
    record_mut(&mut b, 2)[16] = 8;
    reseal(&mut b);
    let (_, e) = record_error(parse(&b));
    assert!(matches!(e, RecordError::Operand(_)), "{e:?}");
}

#[test]
fn reserved_clobber_bits() {
    let mut b = sealed(&sample_sites());
    record_mut(&mut b, 0)[20..24].copy_from_slice(&(1u32 << 20).to_le_bytes());
    reseal(&mut b);
    assert_eq!(record_error(parse(&b)), (0, RecordError::ReservedBits));
}

#[test]
fn stub_rules() {
    // A detour needs a stub inside the image; other forms may not have one.
    let mut s = sample_sites();
    s[0].form = Form::Detour;
    let mut buf = vec![0u8; table::sealed_table_size(4)];
    assert!(matches!(
        write_sealed_table(&s, TABLE_ADDR, &mut buf),
        Err(WriteError::Site {
            index: 0,
            error: RecordError::FormMismatch
        })
    ));
    s[0].stub = Some(TEXT.start + 0x1000);
    let b = sealed(&s);
    let t = parse(&b).unwrap();
    assert_eq!(t.site(0).unwrap().patch_addr(), TEXT.start + 0x1000);

    s[0].stub = Some(TEXT.end + 0x1000);
    let b = sealed(&s);
    assert_eq!(
        record_error(parse(&b)),
        (
            0,
            RecordError::StubOutsideImage {
                addr: TEXT.end + 0x1000
            }
        )
    );

    let mut s = sample_sites();
    s[1].stub = Some(TEXT.start + 0x1000);
    let mut buf = vec![0u8; table::sealed_table_size(4)];
    assert!(write_sealed_table(&s, TABLE_ADDR, &mut buf).is_err());
}

#[test]
fn writer_refuses_what_a_reader_would_refuse() {
    let mut buf = vec![0u8; table::sealed_table_size(4)];
    let mut s = sample_sites();
    s.swap(0, 1);
    assert!(matches!(
        write_sealed_table(&s, TABLE_ADDR, &mut buf),
        Err(WriteError::Site {
            index: 1,
            error: RecordError::Unsorted
        })
    ));
    let mut s = sample_sites();
    s[1].addr = s[0].addr + 2;
    assert!(matches!(
        write_sealed_table(&s, TABLE_ADDR, &mut buf),
        Err(WriteError::Site {
            index: 1,
            error: RecordError::Overlap { other: 0 }
        })
    ));
    let mut s = sample_sites();
    s[0].addr = TABLE_ADDR - (1 << 33); // beyond an i32 offset
    assert!(matches!(
        write_sealed_table(&s, TABLE_ADDR, &mut buf),
        Err(WriteError::Site {
            index: 0,
            error: RecordError::OffsetOutOfRange
        })
    ));
    assert_eq!(
        write_sealed_table(&sample_sites(), TABLE_ADDR, &mut buf[..40]),
        Err(WriteError::BufferTooSmall { needed: buf.len() })
    );
}

#[test]
fn header_alone() {
    let b = sealed(&sample_sites());
    let h = Header::parse(&b, TABLE_ADDR).unwrap();
    assert_eq!(h.records_begin, TABLE_ADDR + HEADER_SIZE as u64);
    assert_eq!(h.record_count(), 4);
    assert_eq!(h.to_bytes()[..HEADER_SIZE], b[..HEADER_SIZE]);
}

/// An unsealed table as a linker gathers it: header, then records, no count, no checksum.
fn unsealed(sites: &[Site]) -> Vec<u8> {
    let n = sites.len();
    let mut b = vec![0u8; HEADER_SIZE + n * RECORD_SIZE];
    let begin = TABLE_ADDR + HEADER_SIZE as u64;
    let h = table::unsealed_header(TABLE_ADDR, begin, begin + (n * RECORD_SIZE) as u64).unwrap();
    b[..HEADER_SIZE].copy_from_slice(&h);
    for (i, s) in sites.iter().enumerate() {
        let addr = begin + (i * RECORD_SIZE) as u64;
        b[HEADER_SIZE + i * RECORD_SIZE..][..RECORD_SIZE]
            .copy_from_slice(&s.to_raw(addr).unwrap().to_bytes());
    }
    b
}

#[test]
fn unsealed_tables_parse() {
    let b = unsealed(&sample_sites());
    let t = SiteTable::parse_contiguous(&b, TABLE_ADDR, &[TEXT]).unwrap();
    assert!(!t.header().is_sealed());
    assert_eq!(t.sites().collect::<Vec<_>>(), sample_sites());
}

#[test]
fn unsealed_table_with_a_count() {
    // An unsealed table must have neither: a count alone is refused as a checksum alone is.
    let mut b = sealed(&sample_sites());
    b[14..16].copy_from_slice(&0u16.to_le_bytes());
    b[28..32].fill(0);
    assert_eq!(parse(&b).unwrap_err(), TableError::UnsealedWithChecksum);
}

#[test]
fn records_shorter_than_the_header_says() {
    let b = sealed(&sample_sites());
    let h = Header::parse(&b, TABLE_ADDR).unwrap();
    let short = &b[HEADER_SIZE..b.len() - 1];
    assert_eq!(
        SiteTable::parse(h, short, &[TEXT]).unwrap_err(),
        TableError::TruncatedRecords {
            needed: 4 * RECORD_SIZE as u64,
            available: 4 * RECORD_SIZE - 1
        }
    );
}

#[test]
fn two_sites_at_one_address_overlap() {
    // Site 2 moved onto site 1's address: an overlap (not disorder) at the later record.
    let mut b = sealed(&sample_sites());
    let r = record_mut(&mut b, 2);
    let rel = i32::from_le_bytes(r[0..4].try_into().unwrap());
    r[0..4].copy_from_slice(&(rel - 0x10).to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        record_error(parse(&b)),
        (2, RecordError::Overlap { other: 1 })
    );
}

#[test]
fn records_that_begin_inside_the_header() {
    // An unsealed header whose records begin 8 bytes into itself.
    let sites = sample_sites();
    let mut b = unsealed(&sites[..1]);
    let begin = i32::from_le_bytes(b[16..20].try_into().unwrap()) - 8;
    let end = i32::from_le_bytes(b[20..24].try_into().unwrap()) - 8;
    b[16..20].copy_from_slice(&begin.to_le_bytes());
    b[20..24].copy_from_slice(&end.to_le_bytes());
    assert!(matches!(
        SiteTable::parse_contiguous(&b, TABLE_ADDR, &[TEXT]),
        Err(TableError::TruncatedRecords { .. })
    ));
}

#[test]
fn touching_sites_in_either_table_order_do_not_overlap() {
    // The lower site last in the table: it ends where the earlier record's begins.
    let sites = [
        site(TEXT.start + 0x45, Op::Cli, 5, 1, Operand::None, 0),
        site(TEXT.start + 0x40, Op::Sti, 5, 1, Operand::None, 0),
    ];
    let b = unsealed(&sites);
    assert_eq!(
        SiteTable::parse_contiguous(&b, TABLE_ADDR, &[TEXT]).map(|t| t.len()),
        Ok(2)
    );
}

#[test]
fn the_longest_instruction_is_fifteen_bytes() {
    let mut s = sample_sites();
    s[0].site_len = 15;
    s[0].insn_len = 15;
    let b = sealed(&s);
    assert_eq!(parse(&b).unwrap().site(0).unwrap().insn_len, 15);
}

#[test]
fn an_indirect_call_site_holds_at_least_two_bytes() {
    let mut s = sample_sites();
    s[0].form = Form::IndirectCall;
    s[0].insn_len = 2;
    let b = sealed(&s);
    assert_eq!(parse(&b).unwrap().site(0).unwrap().form, Form::IndirectCall);
    let mut b = sealed(&s);
    record_mut(&mut b, 0)[11] = 1; // insn_len 1: no call is one byte
    reseal(&mut b);
    assert_eq!(record_error(parse(&b)), (0, RecordError::FormMismatch));
}

#[test]
fn every_debug_register_decodes() {
    for dr in [0u8, 3, 6, 7] {
        let s = [site(
            TEXT.start + 0x10,
            Op::MovToDr,
            3,
            3,
            Operand::DebugReg { dr, reg: Gpr::Rbx },
            8,
        )];
        let b = sealed(&s);
        assert_eq!(parse(&b).unwrap().site(0), Some(s[0]), "dr{dr}");
    }
}
