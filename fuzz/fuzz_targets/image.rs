//! Arbitrary bytes as a kernel image: unpacking a bzImage (with a small cap on what its
//! payload may decompress to), loading, sweeping, reading Linux's tables, the ledger,
//! annotating (into memory) and verifying never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pvpatch::annotate::{AnnotateOptions, annotate_into};
use pvpatch::ledger::Ledger;
use pvpatch::load::bzimage;
use pvpatch::load::image::Image;
use pvpatch::scan_image;
use pvpatch::sweep::Options;

/// The cap on a payload's decompressed size: small, so that a bomb costs little.
const CAP: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // A bzImage yields its vmlinux, as `pvpatch extract-vmlinux` does; anything else is taken
    // as the image itself.
    let bytes = match bzimage::extract_vmlinux(data, CAP) {
        Ok(x) => {
            assert!(x.vmlinux.len() as u64 <= CAP, "past the cap");
            assert!(
                x.checks.iter().any(|c| c.starts_with("size trailer")),
                "extracted without the size trailer's check: {:?}",
                x.checks
            );
            x.vmlinux
        }
        Err(_) => data.to_vec(),
    };
    let Ok(img) = Image::from_bytes("fuzz", bytes) else {
        return;
    };
    let report = scan_image(&img, Options { threads: 1 }, None);
    // The ledger is written lazily: make every site's entry, as writing it would.
    let _ = Ledger::new(&report).sites.try_for_each(|_| Ok::<(), ()>(()));
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
