//! Property tests of the ABI: serialize then parse is the identity, for site tables and backend
//! ROMs, and parsing arbitrary bytes never panics. `PROPTEST_CASES` raises the case count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use patch_sites::rom::{Rom, RomAction, RomEntrySpec, rom_size, write_rom};
use patch_sites::table::{AddrRange, SiteTable, sealed_table_size, write_sealed_table};
use proptest::prelude::*;
use pvpatch_fuzz::strategies::{self as strat, TEXT_BASE};

const TEXT: AddrRange = AddrRange::new(TEXT_BASE, TEXT_BASE + (256 << 20));

proptest! {
    #![proptest_config(pvpatch_fuzz::proptest_config())]

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
}
