//! Arbitrary bytes as a backend ROM through the runtime's validator: no panic, and a ROM it
//! accepts plans every site of a representative table.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = pvpatch_oracle::targets::rom_validator(data) {
        panic!("{e}");
    }
});
