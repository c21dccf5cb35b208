//! Arbitrary bytes as a kernel image: loading, sweeping, reading Linux's tables, the ledger,
//! annotating (into memory) and verifying never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvpatch::annotate::{AnnotateOptions, annotate_into};
use pvpatch::load::image::Image;
use pvpatch::ledger::Ledger;
use pvpatch::scan_image;
use pvpatch::sweep::Options;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::from_bytes("fuzz", data.to_vec()) else {
        return;
    };
    let report = scan_image(&img, Options { threads: 1 }, None);
    let _ = Ledger::new(&report);
    let mut out = Vec::new();
    if annotate_into(&report, &AnnotateOptions::default(), &mut out).is_ok() {
        // What annotate wrote must load and verify.
        let ann = Image::from_bytes("annotated", out).expect("annotated output loads");
        let v = pvpatch::verify::verify(&ann).expect("annotated output has a valid table");
        assert!(
            v.ok(),
            "annotated output does not verify: {:?}",
            v.mismatches.first()
        );
    }
});
