//! Arbitrary bytes as a site table: parsing never panics, and whatever parses re-serializes
//! (when sealed) to the very same bytes. The boot shim's deferring parse, with its detour area
//! checked afterwards, accepts exactly what the whole parse does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patch_sites::table::{AddrRange, SiteTable, sealed_table_size, write_sealed_table};

const TABLE_ADDR: u64 = 0xffff_ffff_8200_0000;
const IMAGE: [AddrRange; 2] = [
    AddrRange::new(0xffff_ffff_8100_0000, 0xffff_ffff_8180_0000),
    AddrRange::new(0xffff_ffff_81c0_0000, 0xffff_ffff_81c1_0000),
];

fuzz_target!(|data: &[u8]| {
    let whole = SiteTable::parse_contiguous(data, TABLE_ADDR, &IMAGE).map(|_| ());
    let deferred = SiteTable::parse_contiguous_deferring_detours(data, TABLE_ADDR, &IMAGE)
        .and_then(|t| t.check_detour_area());
    assert_eq!(whole, deferred, "a deferred check accepts what the whole parse does");
    let Ok(t) = SiteTable::parse_contiguous(data, TABLE_ADDR, &IMAGE) else {
        return;
    };
    let sites: Vec<_> = t.sites().collect();
    assert_eq!(sites.len(), t.len(), "a validated table yields every site");
    if t.header().is_sealed() && t.header().records_begin == TABLE_ADDR + 32 {
        let mut out = vec![0u8; sealed_table_size(sites.len())];
        let n = write_sealed_table(&sites, TABLE_ADDR, &mut out).expect("re-serializes");
        assert_eq!(
            &out[..n],
            &data[..n],
            "sealed tables round-trip byte for byte"
        );
    }
});
