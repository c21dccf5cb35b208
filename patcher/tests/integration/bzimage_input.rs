//! Any kernel file a user has: `scan`, `annotate`, `plan`, `rewrite` and `verify` take a bzImage
//! (`/boot/vmlinuz-*`) as well as an ELF vmlinux, told apart by content; a bzImage is extracted
//! in memory, and what is written from one is an ELF vmlinux.

use std::path::Path;
use std::process::{Command, Output};

use pvpatch_testkit::kernels::{self, KernelSpec};
use serde_json::Value;

use super::cli::{fake_bzimage, sample_image};

fn pvpatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvpatch"))
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = pvpatch();
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The SHA-256 of `path`, by coreutils' `sha256sum` (not the tool's own hashing).
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// The ledger of `path` without the `image` object (which names the file given).
fn ledger_without_image(mut ledger: Value) -> Value {
    ledger.as_object_mut().unwrap().remove("image");
    ledger
}

/// `pvpatch scan /boot/vmlinuz-*` finds the same sites as in the vmlinux extracted from it.
fn scan_of_the_bzimage_is_the_scan_of_its_vmlinux(test: &str, spec: KernelSpec) {
    let k = match kernels::cached(spec) {
        Ok(k) => k,
        Err(why) => return pvpatch_testkit::skip(test, &why),
    };
    let from_bz = json_of(&run(&[&"scan", &"--json", &k.vmlinuz]));
    let from_elf = json_of(&run(&[&"scan", &"--json", &k.vmlinux]));
    let (bz_image, elf_image) = (from_bz["image"].clone(), from_elf["image"].clone());
    let sites = from_bz["sites"].as_array().unwrap().len();
    assert!(sites > 1_000, "{sites} sites");
    assert!(
        ledger_without_image(from_bz) == ledger_without_image(from_elf),
        "{}: the bzImage's ledger differs from its vmlinux's",
        k.package
    );
    // The ELF scanned is the vmlinux, byte for byte; the bzImage is described as given.
    assert_eq!(bz_image["sha256"], elf_image["sha256"]);
    assert_eq!(elf_image["sha256"].as_str(), Some(&*sha256sum(&k.vmlinux)));
    assert_eq!(elf_image["extracted_from"], Value::Null);
    let from = &bz_image["extracted_from"];
    assert_eq!(from["format"], "bzimage");
    assert_eq!(from["sha256"].as_str(), Some(&*sha256sum(&k.vmlinuz)));
    assert_eq!(
        from["size"].as_u64(),
        Some(std::fs::metadata(&k.vmlinuz).unwrap().len())
    );
    let checks: Vec<&str> = from["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // Debian signs its kernels for Secure Boot: the file matched its Authenticode digest.
    assert!(
        checks.contains(&"Authenticode SHA-256") && checks.contains(&"size trailer"),
        "{checks:?}"
    );
    // The summary says where the code came from.
    let summary = run(&[&"scan", &k.vmlinuz]);
    let text = String::from_utf8(summary.stdout).unwrap();
    let compression = from["compression"].as_str().unwrap();
    assert!(
        text.contains(&format!(
            "a bzImage ({} bytes): its {compression} payload extracted in memory",
            from["size"]
        )),
        "{text}"
    );
    eprintln!(
        "{test}: {}: {sites} sites, the same from the {compression} bzImage as from the vmlinux",
        k.package
    );
}

#[test]
fn scan_of_bookworms_vmlinuz_is_the_scan_of_its_vmlinux() {
    scan_of_the_bzimage_is_the_scan_of_its_vmlinux(
        "scan_of_bookworms_vmlinuz_is_the_scan_of_its_vmlinux",
        kernels::BOOKWORM,
    );
}

#[test]
fn scan_of_backports_vmlinuz_is_the_scan_of_its_vmlinux() {
    scan_of_the_bzimage_is_the_scan_of_its_vmlinux(
        "scan_of_backports_vmlinuz_is_the_scan_of_its_vmlinux",
        kernels::BACKPORTS,
    );
}

/// Annotating a Debian bzImage writes an annotated ELF vmlinux, byte for byte what annotating
/// the extracted vmlinux writes, that verifies; `--in-place` is refused.
#[test]
fn annotate_of_a_debian_vmlinuz_writes_the_annotated_vmlinux() {
    let test = "annotate_of_a_debian_vmlinuz_writes_the_annotated_vmlinux";
    let k = match kernels::cached(kernels::BOOKWORM) {
        Ok(k) => k,
        Err(why) => return pvpatch_testkit::skip(test, &why),
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("from-bz"), dir.path().join("from-elf"));
    let out = run(&[&"annotate", &k.vmlinuz, &"-o", &a]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8(out.stderr).unwrap();
    assert!(said.contains("the output is an ELF vmlinux"), "{said}");
    assert!(run(&[&"annotate", &k.vmlinux, &"-o", &b]).status.success());
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    assert_eq!(&std::fs::read(&a).unwrap()[..4], b"\x7fELF");
    let verified = json_of(&run(&[&"verify", &"--json", &a]));
    assert_eq!(verified["ok"], true, "{verified}");
    // A copy of the bzImage, so that a wrong write could not touch the cache.
    let copy = dir.path().join("vmlinuz");
    std::fs::copy(&k.vmlinuz, &copy).unwrap();
    let refused = run(&[&"annotate", &copy, &"--in-place"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--in-place would replace a bzImage")
    );
    assert_eq!(sha256sum(&copy), sha256sum(&k.vmlinuz));
}

/// Every command that reads a kernel takes a bzImage of the sample image in every compression
/// Linux's build uses, and sees what it sees in the ELF file.
#[test]
fn every_kernel_command_takes_a_bzimage() {
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("sample.elf");
    std::fs::write(&elf, sample_image()).unwrap();
    let annotated = dir.path().join("sample.annotated");
    assert!(
        run(&[&"annotate", &elf, &"-o", &annotated])
            .status
            .success()
    );
    for format in ["xz", "gzip", "zstd", "lz4"] {
        let bz = dir.path().join(format!("bz-{format}"));
        std::fs::write(&bz, fake_bzimage(format, &sample_image())).unwrap();
        let bz_annotated = dir.path().join(format!("bz-annotated-{format}"));
        std::fs::write(
            &bz_annotated,
            fake_bzimage(format, &std::fs::read(&annotated).unwrap()),
        )
        .unwrap();
        let scan = json_of(&run(&[&"scan", &"--json", &bz]));
        let elf_scan = json_of(&run(&[&"scan", &"--json", &elf]));
        assert_eq!(scan["image"]["extracted_from"]["compression"], format);
        assert!(ledger_without_image(scan) == ledger_without_image(elf_scan));
        let plan = json_of(&run(&[&"plan", &"--json", &"--backend", &"kvm", &bz]));
        let elf_plan = json_of(&run(&[&"plan", &"--json", &"--backend", &"kvm", &elf]));
        assert_eq!(plan["sites"], elf_plan["sites"], "{format}");
        let verified = json_of(&run(&[&"verify", &"--json", &bz_annotated]));
        assert_eq!(verified["ok"], true, "{format}: {verified}");
        let out = dir.path().join(format!("rewritten-{format}"));
        let rewritten = json_of(&run(&[
            &"rewrite",
            &"--json",
            &"--backend",
            &"tcg",
            &bz_annotated,
            &"-o",
            &out,
        ]));
        assert_eq!(rewritten["output_format"], "elf");
        assert!(rewritten["note"].as_str().unwrap().contains("bzImage"));
        assert_eq!(&std::fs::read(&out).unwrap()[..4], b"\x7fELF");
    }
}

/// A file that is neither says so; a corrupt bzImage fails its check with status 3.
#[test]
fn neither_elf_nor_bzimage_and_a_corrupt_bzimage_are_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a kernel\n".repeat(100)).unwrap();
    let out = run(&[&"scan", &text]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not an ELF file") && err.contains("not a bzImage"),
        "{err}"
    );

    let mut bz = fake_bzimage("xz", &sample_image());
    let last = bz.len() - 20;
    bz[last] ^= 0x40;
    let corrupt = dir.path().join("corrupt");
    std::fs::write(&corrupt, &bz).unwrap();
    for cmd in ["scan", "verify"] {
        let out = run(&[&cmd, &corrupt]);
        assert_eq!(out.status.code(), Some(3), "{cmd}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("corrupt"),
            "{out:?}"
        );
    }
    let capped = run(&[
        &"scan",
        &"--max-decompressed",
        &"1K",
        &dir.path().join("corrupt"),
    ]);
    assert_eq!(capped.status.code(), Some(3));
}
