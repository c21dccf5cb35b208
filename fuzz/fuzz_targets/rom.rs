//! Arbitrary bytes as a backend ROM: parsing never panics, and every entry of an accepted ROM
//! can be read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patch_sites::rom::{Rom, RomAction};

fuzz_target!(|data: &[u8]| {
    let Ok(rom) = Rom::parse(data) else { return };
    let mut n = 0;
    for e in rom.entries() {
        n += 1;
        if let RomAction::Inline { template, .. } = e.action {
            for s in e.slots() {
                assert!((s.offset as usize) < template.len());
            }
        }
    }
    assert_eq!(
        n,
        rom.len() as usize,
        "every entry of an accepted ROM is readable"
    );
    let _ = rom.name();
});
