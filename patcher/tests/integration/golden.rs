//! Golden files: a small checked-in image (`tests/testfiles/sample.elf`, the test kit's sample
//! image: two functions, a few sensitive instructions, an `__ex_table` entry) and what the tool
//! says of it, byte for byte: the ledger (`sample.elf.ledger.json`) and the human summary
//! (`sample.elf.summary.txt`, without its timing line). A change to either is a change to what
//! users see; `cargo xtask test-update` (which sets `PVPATCH_UPDATE=1`) rewrites them, and the
//! diff is reviewed like code.

use std::path::{Path, PathBuf};

use pvpatch::ledger::Ledger;
use pvpatch::load::Image;
use pvpatch::scan_image;
use pvpatch::summary::human_summary;

fn testfile(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testfiles")
        .join(name)
}

/// Compares `actual` with the golden file `name`, or rewrites it under `PVPATCH_UPDATE`.
fn golden(name: &str, actual: &str) {
    golden_at(&testfile(name), actual);
}

/// Compares `actual` with the checked-in file at `path`, or rewrites it under
/// `PVPATCH_UPDATE`.
pub(crate) fn golden_at(path: &Path, actual: &str) {
    if std::env::var_os("PVPATCH_UPDATE").is_some() {
        pvpatch::output::write_bytes(path, actual.as_bytes()).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_default();
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the tool's output at line {} (`cargo xtask test-update` rewrites \
             it):\n  expected: {:?}\n  actual:   {:?}",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

fn sample() -> Image {
    let bytes = std::fs::read(testfile("sample.elf")).unwrap();
    Image::from_bytes("sample.elf", bytes).unwrap()
}

#[test]
fn the_checked_in_image_is_the_test_kits_sample() {
    // The golden image is checked in, so that a change to the builder cannot change it silently.
    if std::env::var_os("PVPATCH_UPDATE").is_some() {
        pvpatch::output::write_bytes(&testfile("sample.elf"), &pvpatch_testkit::elf::sample())
            .unwrap();
    }
    assert!(std::fs::read(testfile("sample.elf")).unwrap() == pvpatch_testkit::elf::sample());
}

#[test]
fn the_ledger_of_the_sample_image() {
    let img = sample();
    let report = scan_image(&img, Default::default(), None);
    let mut json = serde_json::to_string_pretty(&Ledger::new(&report)).unwrap();
    json.push('\n');
    golden("sample.elf.ledger.json", &json);
}

#[test]
fn the_summary_of_the_sample_image() {
    let img = sample();
    let report = scan_image(&img, Default::default(), None);
    let text: String = human_summary(&report)
        .lines()
        .filter(|l| !l.starts_with("swept "))
        .map(|l| format!("{l}\n"))
        .collect();
    golden("sample.elf.summary.txt", &text);
}

#[test]
fn what_pvpatch_scan_writes_is_the_golden_ledger_and_summary() {
    // The command keeps no site (it streams the ledger): what it writes is the same, to
    // standard output and to a file.
    let dir = testfile("");
    let scan = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pvpatch"))
            .current_dir(&dir)
            .arg("scan")
            .arg("sample.elf")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let expected = std::fs::read_to_string(testfile("sample.elf.ledger.json")).unwrap();
    assert!(scan(&["--json"]) == expected, "pvpatch scan --json");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("ledger.json");
    scan(&["--json", "-o", file.to_str().unwrap()]);
    assert!(std::fs::read_to_string(&file).unwrap() == expected, "-o");
    let summary: String = scan(&[])
        .lines()
        .filter(|l| !l.starts_with("swept "))
        .map(|l| format!("{l}\n"))
        .collect();
    let expected = std::fs::read_to_string(testfile("sample.elf.summary.txt")).unwrap();
    assert!(summary == expected, "pvpatch scan");
}
