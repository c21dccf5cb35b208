//! Our own guest kernel, annotated the way its build will: the records its annotation macros
//! emitted are merged with what the sweep finds, and the result verifies and boots.

use pvpatch::annotate::{AnnotateOptions, annotate, linked_sites};
use pvpatch::load::image::Image;
use pvpatch::scan_image;
use pvpatch_testkit::{self as harness, Qemu};

#[test]
fn the_guest_table_merges_macro_records_and_boots() {
    let test = "the_guest_table_merges_macro_records_and_boots";
    let elf = harness::build_guest_plain().expect("the guest builds");
    let img = Image::open(&elf).unwrap();
    let linked = linked_sites(&img).unwrap();
    assert!(
        linked.len() > 10,
        "the guest's console alone uses the macros"
    );
    let report = scan_image(&img, Default::default(), None);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pvguest.annotated");
    let a = annotate(&report, &out, &AnnotateOptions::default()).unwrap();
    assert_eq!(a.from_macros, linked.len());
    assert_eq!(a.sites, a.from_macros + a.from_scan);
    let ann = Image::open(&out).unwrap();
    let v = pvpatch::verify::verify(&ann).unwrap();
    assert!(v.ok(), "{:?}", v.mismatches.first());
    // Every macro record is in the sealed table unchanged.
    let t = patch_sites::table::SiteTable::parse_contiguous(
        pvpatch::annotate::sealed_table(&ann).unwrap().1,
        a.table_addr,
        &ann.code_ranges(),
    )
    .unwrap();
    let sealed: Vec<_> = t.sites().collect();
    for s in &linked {
        assert!(sealed.contains(s), "macro record at {:#x} lost", s.addr);
    }
    if let Err(why) = harness::qemu_available() {
        return harness::skip(test, &why);
    }
    let boot = Qemu::tcg().boot(&out).unwrap();
    assert!(boot.passed(), "{}\n{}", boot.serial, boot.stderr);
}
