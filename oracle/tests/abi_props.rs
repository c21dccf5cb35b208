//! Property tests of the ABI: serialize then parse is the identity, for site tables and backend
//! ROMs, and parsing arbitrary bytes never panics. `PROPTEST_CASES` raises the case count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use patch_sites::rom::{Rom, RomAction, RomEntrySpec, rom_size, write_rom};
use patch_sites::table::{
    AddrRange, HEADER_SIZE, Header, RECORD_SIZE, RecordError, Site, SiteTable, Span, TableError,
    sealed_table_size, unsealed_header, write_sealed_table,
};
use proptest::prelude::*;
use pvpatch_oracle::strategies::{self as strat, TEXT_BASE};

const TEXT: AddrRange = AddrRange::new(TEXT_BASE, TEXT_BASE + (256 << 20));

/// An unsealed table as a linker gathers it, in the order given: header, then records.
fn unsealed(sites: &[Site], table_addr: u64) -> Vec<u8> {
    let begin = table_addr + HEADER_SIZE as u64;
    let end = begin + (sites.len() * RECORD_SIZE) as u64;
    let mut b = unsealed_header(table_addr, begin, end).unwrap().to_vec();
    for (i, s) in sites.iter().enumerate() {
        let at = begin + (i * RECORD_SIZE) as u64;
        b.extend_from_slice(&s.to_raw(at).unwrap().to_bytes());
    }
    b
}

proptest! {
    #![proptest_config(pvpatch_oracle::proptest_config())]

    #[test]
    fn table_round_trip(sites in strat::sites(64), table_off in 0u64..(1 << 30)) {
        let table_addr = TEXT_BASE + (128 << 20) + table_off;
        let mut buf = vec![0u8; sealed_table_size(sites.len())];
        let n = write_sealed_table(&sites, table_addr, &mut buf).expect("valid sites");
        prop_assert_eq!(n, buf.len());
        let t = SiteTable::parse_contiguous(&buf, table_addr, &[TEXT]).expect("parses");
        let back: Vec<_> = t.sites().collect();
        prop_assert_eq!(&back, &sites);
        let unknown = sites.iter().filter(|s| s.op().is_none()).count();
        prop_assert_eq!(t.unknown_ops() as usize, unknown);
        // Writing what was read gives the same bytes.
        let mut again = vec![0u8; buf.len()];
        write_sealed_table(&back, table_addr, &mut again).unwrap();
        prop_assert_eq!(again, buf);
    }

    #[test]
    fn rom_round_trip((name, sig, entries) in strat::rom()) {
        let specs: Vec<RomEntrySpec<'_>> = entries
            .iter()
            .map(|(op, (kind, code, slots, clobbers))| RomEntrySpec {
                op_id: *op,
                kind: *kind,
                code,
                slots,
                clobbers: *clobbers,
            })
            .collect();
        let mut buf = vec![0u8; rom_size(&specs)];
        let n = write_rom(&name, sig, &specs, &mut buf).expect("valid ROM");
        prop_assert_eq!(n, buf.len());
        let rom = Rom::parse(&buf).expect("parses");
        prop_assert_eq!(rom.name(), name.as_str());
        prop_assert_eq!(rom.signature(), sig);
        let back: Vec<_> = rom.entries().collect();
        prop_assert_eq!(back.len(), specs.len());
        for (e, s) in back.iter().zip(&specs) {
            prop_assert_eq!(e.op_id, s.op_id);
            prop_assert_eq!(e.kind(), s.kind);
            prop_assert_eq!(e.clobbers, s.clobbers);
            match e.action {
                RomAction::Inline { template, .. } => {
                    prop_assert_eq!(template, s.code);
                    prop_assert_eq!(e.slots().collect::<Vec<_>>(), s.slots.to_vec());
                }
                RomAction::Call { code, .. } => prop_assert_eq!(code, s.code),
                _ => prop_assert!(s.code.is_empty()),
            }
        }
        // `rom show` prints it, and says per entry what the runtime's own checks refuse.
        let shown = pvpatch::rom::show(&buf).expect("shows");
        prop_assert_eq!(shown.entries as usize, specs.len());
        prop_assert_eq!(
            shown.refused.first().map(|r| r.1),
            pvpatch_runtime::romcheck::validate_code(&rom).err()
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), addr: u64) {
        let _ = SiteTable::parse_contiguous(&bytes, addr, &[AddrRange::EVERYTHING]);
        let _ = Rom::parse(&bytes);
    }

    #[test]
    fn flipped_bytes_in_a_sealed_table_are_always_caught(
        sites in strat::sites(16),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let table_addr = TEXT_BASE + (128 << 20);
        let mut buf = vec![0u8; sealed_table_size(sites.len())];
        write_sealed_table(&sites, table_addr, &mut buf).unwrap();
        let i = pos.index(buf.len());
        buf[i] ^= 1 << bit;
        // One flipped bit anywhere: the magic, a size, the checksum or a record; CRC-32 catches
        // every single-bit error, so the table is refused.
        prop_assert!(SiteTable::parse_contiguous(&buf, table_addr, &[TEXT]).is_err());
    }

    /// A linker-gathered table in any order, perhaps with one site moved onto another: the
    /// sort-based overlap check (with scratch) and the pairwise one (without) accept and refuse
    /// the same tables, and both refuse one only for an overlap.
    #[test]
    fn both_overlap_checks_agree_on_unsorted_tables(
        sites in strat::sites(48).prop_shuffle(),
        moved in any::<Option<(prop::sample::Index, prop::sample::Index, u8)>>(),
    ) {
        let mut sites = sites;
        let mut moved_onto = false;
        if let (Some((from, to, delta)), false) = (moved, sites.is_empty()) {
            let (from, to) = (from.index(sites.len()), to.index(sites.len()));
            let delta = u64::from(delta) % u64::from(sites[to].site_len);
            if from != to {
                sites[from].addr = sites[to].addr + delta;
                moved_onto = true;
            }
        }
        let table_addr = TEXT_BASE + (128 << 20);
        let b = unsealed(&sites, table_addr);
        let h = Header::parse(&b, table_addr).unwrap();
        let pairwise = SiteTable::parse(h, &b[HEADER_SIZE..], &[TEXT]).map(|t| t.len());
        let mut scratch = vec![Span::default(); sites.len()];
        let sorted = SiteTable::parse_with_scratch(h, &b[HEADER_SIZE..], &[TEXT], &mut scratch)
            .map(|t| t.len());
        match (&pairwise, &sorted) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(*a, sites.len());
                prop_assert_eq!(*b, sites.len());
                prop_assert!(!moved_onto, "a site moved onto another was accepted");
            }
            (
                Err(TableError::Record { error: RecordError::Overlap { .. }, .. }),
                Err(TableError::Record { error: RecordError::Overlap { .. }, .. }),
            ) => prop_assert!(moved_onto),
            _ => prop_assert!(false, "pairwise {:?}, sorted {:?}", pairwise, sorted),
        }
    }
}
