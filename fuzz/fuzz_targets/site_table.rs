//! Arbitrary bytes as a site table: parsing never panics, and whatever parses re-serializes
//! (when sealed) to the very same bytes. The boot shim's deferring parse, with its detour area
//! checked afterwards, accepts exactly what the whole parse does; the planner, given such a
//! table (its area unchecked) and a text that holds every site's native instruction, never
//! panics, and installs a detour only from an area that passes its check.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use patch_sites::RegSet;
use patch_sites::table::{AddrRange, Site, SiteTable, sealed_table_size, write_sealed_table};
use pvpatch_runtime::backend::{Backend, Choice};
use pvpatch_runtime::detect::{BackendKind, Detected};
use pvpatch_runtime::plan::{self, TextRead};

/// Text of `int3`s but where the table's sites are: each holds its native instruction.
struct Text(HashMap<u64, u8>);

impl Text {
    fn of(t: &SiteTable<'_>) -> Text {
        let mut m = HashMap::new();
        for s in t.sites() {
            if let Some(n) = pvpatch_isa::encode::native(&s) {
                for (k, b) in n.as_slice().iter().enumerate() {
                    m.insert(s.addr.wrapping_add(k as u64), *b);
                }
            }
        }
        Text(m)
    }
}

impl TextRead for Text {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        for (k, b) in out.iter_mut().enumerate() {
            *b = self
                .0
                .get(&addr.wrapping_add(k as u64))
                .copied()
                .unwrap_or(0xcc);
        }
        true
    }
}

/// Plans a deferred table natively and with every site forced to a call: no panic, and a
/// plan with a detour only where the area passes its check.
fn plan_deferred(t: &SiteTable<'_>) {
    let text = Text::of(t);
    let backend = Backend {
        detected: Detected::assumed(BackendKind::Native, 0),
        rom: None,
        pv: None,
        thunks: None,
    };
    let call = |_: u32, s: &Site| {
        Some(Choice::Call {
            target: s.addr.wrapping_add(0x1000),
            clobbers: RegSet::EMPTY,
        })
    };
    for force in [None, Some(&call as plan::Override<'_, '_>)] {
        if let Ok(p) = plan::plan(t, &backend, &text, force)
            && !p.detours.is_empty()
        {
            assert!(
                t.check_detour_area().is_ok(),
                "a detour from an unchecked area"
            );
        }
    }
}

const TABLE_ADDR: u64 = 0xffff_ffff_8200_0000;
const IMAGE: [AddrRange; 2] = [
    AddrRange::new(0xffff_ffff_8100_0000, 0xffff_ffff_8180_0000),
    AddrRange::new(0xffff_ffff_81c0_0000, 0xffff_ffff_81c1_0000),
];

fuzz_target!(|data: &[u8]| {
    let whole = SiteTable::parse_contiguous(data, TABLE_ADDR, &IMAGE).map(|_| ());
    let deferred = SiteTable::parse_contiguous_deferring_detours(data, TABLE_ADDR, &IMAGE);
    if let Ok(t) = &deferred {
        plan_deferred(t);
    }
    assert_eq!(
        whole,
        deferred.and_then(|t| t.check_detour_area()),
        "a deferred check accepts what the whole parse does"
    );
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
