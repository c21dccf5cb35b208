//! Arbitrary bytes as a backend ROM: parsing never panics, every entry of an accepted ROM can
//! be read back, and a ROM over the size limit is refused for the limit (an accepted ROM grown
//! past it, its length and checksum made right, and any input the fuzzer makes that long).
#![no_main]

use libfuzzer_sys::fuzz_target;
use patch_sites::crc32::crc32;
use patch_sites::rom::{MAX_ROM_LEN, Rom, RomAction, RomError};

/// `rom`, zero-padded to `len` bytes, with its total length and checksum made right.
fn grown(rom: &[u8], len: usize) -> Vec<u8> {
    let mut b = rom.to_vec();
    b.resize(len, 0);
    b[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    b[20..24].fill(0);
    let sum = crc32(&b);
    b[20..24].copy_from_slice(&sum.to_le_bytes());
    b
}

fuzz_target!(|data: &[u8]| {
    let rom = match Rom::parse(data) {
        Ok(rom) => rom,
        Err(RomError::LengthMismatch { available, .. }) => {
            assert!(
                available <= MAX_ROM_LEN,
                "over the limit, but said to disagree"
            );
            return;
        }
        Err(_) => return,
    };
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
    let len = MAX_ROM_LEN + 1 + data.len() % 4096;
    let e = Rom::parse(&grown(data, len)).err();
    assert_eq!(e, Some(RomError::TooLong { len }), "grown to {len} bytes");
    let shown = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        shown.contains(&format!("{MAX_ROM_LEN}-byte limit")),
        "{shown}"
    );
});
