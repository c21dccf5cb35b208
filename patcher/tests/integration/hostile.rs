//! Truncated, corrupted and hostile images: always an error naming what is wrong, never a panic,
//! never an output file left behind.

use std::io::Write;

use pvpatch::annotate::{AnnotateOptions, annotate_into};
use pvpatch::ledger::Ledger;
use pvpatch::linux::TableKind;
use pvpatch::load::image::{Image, ImageError};
use pvpatch::scan_image;
use pvpatch::sweep::Options;
use pvpatch_testkit::elf::{self as testimg, Extra, TEXT};

use super::cli::sample_image;

/// Everything the tool does with an image, in memory; returns whether it loaded.
fn exercise(name: &str, bytes: Vec<u8>) -> Result<(), ImageError> {
    let img = Image::from_bytes(name, bytes)?;
    let r = scan_image(&img, Options { threads: 1 }, None);
    serde_json::to_writer(std::io::sink(), &Ledger::new(&r)).unwrap();
    if let Ok(streamed) = pvpatch::scan_image_streamed(&img, Options { threads: 1 }, None) {
        serde_json::to_writer(std::io::sink(), &Ledger::new(&streamed)).unwrap();
    }
    let _ = annotate_into(&r, &AnnotateOptions::default(), &mut std::io::sink());
    if let Ok(Some(_)) = pvpatch::annotate::sealed_table(&img).map(Some).ok_or(()) {
        let _ = pvpatch::verify::verify(&img);
    }
    Ok(())
}

fn err(bytes: Vec<u8>) -> String {
    match Image::from_bytes("hostile", bytes) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a hostile image was accepted"),
    }
}

fn shdr_off(b: &[u8], i: usize) -> usize {
    let shoff = u64::from_le_bytes(b[0x28..0x30].try_into().unwrap()) as usize;
    shoff + i * 64
}

#[test]
fn truncated_at_every_length() {
    let full = sample_image();
    let mut errors = 0;
    for n in 0..full.len() {
        if exercise("truncated", full[..n].to_vec()).is_err() {
            errors += 1;
        }
    }
    // Losing the section headers at the end loses everything after byte 64.
    assert!(errors >= full.len() - 64, "{errors} of {}", full.len());
    assert!(err(full[..3].to_vec()).contains("not an ELF"));
    assert!(err(full[..10].to_vec()).contains("malformed"));
}

#[test]
fn section_offset_past_the_end() {
    let mut b = sample_image();
    let o = shdr_off(&b, 1) + 24; // .text sh_offset
    b[o..o + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = err(b);
    assert!(e.contains(".text") && e.contains("exceeds"), "{e}");
}

#[test]
fn huge_section_size() {
    let mut b = sample_image();
    let o = shdr_off(&b, 2) + 32; // __ex_table sh_size
    b[o..o + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err(b);
    assert!(e.contains("__ex_table"), "{e}");
}

#[test]
fn overlapping_sections() {
    let mut b = sample_image();
    // Point __ex_table's file data at .text's.
    let text_off = u64::from_le_bytes(
        b[shdr_off(&b, 1) + 24..shdr_off(&b, 1) + 32]
            .try_into()
            .unwrap(),
    );
    let o = shdr_off(&b, 2) + 24;
    b[o..o + 8].copy_from_slice(&text_off.to_le_bytes());
    let e = err(b);
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn section_headers_out_of_the_file() {
    let mut b = sample_image();
    b[0x28..0x30].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
    let _ = err(b.clone());
    let mut b = sample_image();
    b[0x3c..0x3e].copy_from_slice(&u16::MAX.to_le_bytes()); // e_shnum
    let _ = err(b);
}

#[test]
fn wrong_machine_and_type() {
    let mut b = sample_image();
    b[0x12] = 3; // EM_386
    assert!(err(b).contains("not x86-64"));
    let mut b = sample_image();
    b[0x10] = 1; // ET_REL
    assert!(err(b).contains("ELF type 1"));
}

#[test]
fn linux_table_pointing_outside_the_image_is_reported_not_used() {
    let code = [0xfa, 0x90, 0x90, 0x90, 0x90, 0xc3];
    let at = TEXT + 0x10_0000;
    let mut t = Vec::new();
    // .smp_locks entries pointing far outside the code.
    for i in 0..1000i32 {
        t.extend_from_slice(&(0x7000_0000 + i).to_le_bytes());
    }
    let img = Image::from_bytes(
        "t",
        testimg::build(
            &code,
            &[],
            &[
                Extra::data(".smp_locks", at, t),
                Extra::data(".parainstructions", at + 0x10_000, vec![0xff; 160]),
            ],
        ),
    )
    .unwrap();
    let r = scan_image(&img, Options { threads: 1 }, None);
    for kind in [TableKind::SmpLocks, TableKind::Parainstructions] {
        let rep = r.tables.report(kind).unwrap();
        assert!(
            rep.problem
                .as_deref()
                .unwrap_or("")
                .contains("not recognised"),
            "{rep:?}"
        );
        assert_eq!(rep.entries, 0);
    }
    // The image is still scanned and annotated.
    assert_eq!(r.analysis.sites.len(), 1);
    let mut out = Vec::new();
    let a = annotate_into(&r, &AnnotateOptions::default(), &mut out).unwrap();
    assert_eq!(a.sites, 1);
    Image::from_bytes("out", out).unwrap();
}

#[test]
fn random_corruption_never_panics() {
    let base = sample_image();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut loaded = 0;
    for _ in 0..3000 {
        let mut b = base.clone();
        for _ in 0..(1 + rnd() % 4) {
            let i = (rnd() % b.len() as u64) as usize;
            b[i] = rnd() as u8;
        }
        if exercise("fuzzed", b).is_ok() {
            loaded += 1;
        }
    }
    assert!(
        loaded > 100,
        "most single-byte corruptions still load ({loaded})"
    );
}

#[test]
fn a_failed_annotation_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::from_bytes("s", sample_image()).unwrap();
    let r = scan_image(&img, Options { threads: 1 }, None);
    // The output directory does not exist: the write fails, and nothing is left anywhere.
    let out = dir.path().join("no/such/dir/out");
    assert!(pvpatch::annotate::annotate(&r, &out, &AnnotateOptions::default()).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // A writer that fails midway reports the error.
    struct Failing(usize);
    impl Write for Failing {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 < b.len() {
                return Err(std::io::Error::other("disk full"));
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    assert!(annotate_into(&r, &AnnotateOptions::default(), &mut Failing(100)).is_err());
}

/// Found by the `image` fuzz target: a PT_LOAD of size 0 put the table on top of `.text`, and
/// the annotated output no longer loaded; a section alignment of 2^64 - 511 made object's ELF
/// builder panic. Fixtures named `fuzz_*` are such inputs: each must be refused with an error
/// or annotated into an image that loads and verifies.
#[test]
fn fuzz_regressions_annotate_to_images_that_load_and_verify() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("fuzz_")
        {
            continue;
        }
        n += 1;
        let img = Image::open(&path).unwrap();
        let r = scan_image(&img, Options { threads: 1 }, None);
        let mut out = Vec::new();
        match annotate_into(&r, &AnnotateOptions::default(), &mut out) {
            Ok(_) => {
                let ann = Image::from_bytes("annotated", out)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(
                    pvpatch::verify::verify(&ann).unwrap().ok(),
                    "{}",
                    path.display()
                );
            }
            Err(e) => eprintln!("{}: refused: {e}", path.display()),
        }
    }
    assert!(n > 0);
}

#[test]
fn et_dyn_images_are_scanned_and_annotated() {
    let mut b = sample_image();
    b[0x10] = 3; // ET_DYN
    let img = Image::from_bytes("pie", b).unwrap();
    assert_eq!(img.elf_type, object::elf::ET_DYN);
    let r = scan_image(&img, Options { threads: 1 }, None);
    assert_eq!(r.analysis.sites.len(), 6);
    let mut out = Vec::new();
    annotate_into(&r, &AnnotateOptions::default(), &mut out).unwrap();
    assert!(
        pvpatch::verify::verify(&Image::from_bytes("out", out).unwrap())
            .unwrap()
            .ok()
    );
}

#[test]
fn no_room_for_another_program_header_is_a_clear_refusal() {
    // Move .text's data (and its segment) right after the program header table, as in a
    // typical PIE whose first section follows the headers.
    let mut b = sample_image();
    let text = shdr_off(&b, 1);
    b[text + 24..text + 32].copy_from_slice(&0x80u64.to_le_bytes());
    b[64 + 8..64 + 16].copy_from_slice(&0x80u64.to_le_bytes()); // PT_LOAD p_offset
    let img = Image::from_bytes("tight", b).unwrap();
    let r = scan_image(&img, Options { threads: 1 }, None);
    let e = annotate_into(&r, &AnnotateOptions::default(), &mut std::io::sink()).unwrap_err();
    assert!(
        matches!(e, pvpatch::annotate::AnnotateError::NotRewritable(_)),
        "{e}"
    );
    assert!(e.to_string().contains("no room for one more entry"), "{e}");
}

#[test]
fn twenty_thousand_executable_sections() {
    // Each one `cli; sti`: 40,000 sites in 20,000 sections. Memory and time stay linear in the
    // sections (benches measure both); here, that every section is swept and counted.
    let bytes = testimg::many_exec_sections(&[0xc3], 20_000, &[0xfa, 0xfb]);
    let img = Image::from_bytes("sections", bytes).unwrap();
    let r = scan_image(&img, Options::default(), None);
    assert_eq!(r.sweep.code.len(), 20_001);
    assert_eq!(r.analysis.sites.len(), 40_000);
    let ledger = serde_json::to_value(Ledger::new(&r)).unwrap();
    let sections = ledger["code"]["sections"].as_array().unwrap();
    assert_eq!(sections.len(), 20_001);
    assert!(
        sections[1..]
            .iter()
            .all(|s| s["sites"] == 2 && s["instructions"] == 2)
    );
    // Every site's section and address agree with the map it was found in.
    for s in &r.analysis.sites {
        let code = r.sweep.code_at(s.found.addr).unwrap();
        assert_eq!(code.section, s.found.section);
        assert!(r.sweep.is_insn_start(s.found.addr));
    }
}

#[test]
fn real_shared_libraries_load() {
    // Thread-local storage: a `.tbss` overlaps the next section's addresses in every libc; such
    // images were refused as malformed. Every ELF shared library of the machine must load (or be
    // refused for what this tool does not handle, never as malformed).
    let dir = std::path::Path::new("/usr/lib/x86_64-linux-gnu");
    let Ok(entries) = std::fs::read_dir(dir) else {
        pvpatch_testkit::skip(
            "real_shared_libraries_load",
            "no /usr/lib/x86_64-linux-gnu here",
        );
        return;
    };
    let mut loaded = 0;
    let mut tls = 0;
    let mut failures = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let is_lib = name.contains(".so");
        let regular = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file());
        let small = std::fs::metadata(&p).is_ok_and(|m| m.len() < 64 << 20);
        let elf = std::fs::read(&p).is_ok_and(|b| b.starts_with(b"\x7fELF"));
        if !(is_lib && regular && small && elf) {
            continue;
        }
        match Image::open(&p) {
            Ok(img) => {
                loaded += 1;
                tls += usize::from(img.sections.iter().any(|s| s.name == ".tbss"));
            }
            Err(ImageError::Malformed(m)) => failures.push(format!("{}: {m}", p.display())),
            Err(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "refused as malformed:\n{}",
        failures.join("\n")
    );
    assert!(
        loaded > 100 && tls > 0,
        "{loaded} libraries loaded, {tls} with .tbss"
    );
    eprintln!("real_shared_libraries_load: {loaded} libraries loaded, {tls} with a .tbss");
}

#[test]
fn a_stock_kernel_of_too_many_sites_is_refused_with_status_3() {
    // `_text` and `_etext` make it a stock kernel, whose sites are planned together and so
    // kept: past MAX_STOCK_SITES, a clear error and status 3 (not gigabytes).
    let n = pvpatch::MAX_STOCK_SITES as usize / 2 + 1;
    let code = [0xfa, 0xfb].repeat(n);
    let len = code.len() as u64;
    let bytes = testimg::build(&code, &[("_text", 0, 1), ("_etext", len - 1, 1)], &[]);
    let img = Image::from_bytes("stock", bytes.clone()).unwrap();
    assert!(pvpatch::analyse::is_stock(&img));
    let e = pvpatch::scan_image_streamed(&img, Options::default(), None).unwrap_err();
    assert!(e.to_string().contains("stock kernel"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stock.elf");
    std::fs::write(&path, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pvpatch"))
        .args(["scan", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 262144 are analysed"), "{err}");
}
