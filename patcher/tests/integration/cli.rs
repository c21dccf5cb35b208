//! The `pvpatch` command line: outputs, exit statuses, and what is (not) left on disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use pvpatch_testkit::elf as testimg;

fn pvpatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvpatch"))
}

/// The sample image (see `pvpatch_testkit::elf::sample`).
pub fn sample_image() -> Vec<u8> {
    testimg::sample()
}

pub fn write_sample(dir: &Path) -> PathBuf {
    let p = dir.join("sample.elf");
    std::fs::write(&p, sample_image()).unwrap();
    p
}

/// A bzImage laid out as Linux's build lays one out (setup header, then the payload: the
/// compressed `elf` and the size trailer), compressed with `format`: xz, gzip, zstd or lz4
/// (legacy, as `lz4 -l` writes it).
pub fn fake_bzimage(format: &str, elf: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut payload = match format {
        "xz" => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(elf).unwrap();
            e.finish().unwrap()
        }
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(elf).unwrap();
            let mut v = e.finish().unwrap();
            v.truncate(v.len() - 4); // its ISIZE is the trailer
            v
        }
        "zstd" => {
            ruzstd::encoding::compress_to_vec(elf, ruzstd::encoding::CompressionLevel::Fastest)
        }
        "lz4" => {
            let mut v = vec![0x02, 0x21, 0x4c, 0x18];
            for chunk in elf.chunks(8 << 20) {
                let block = lz4_flex::block::compress(chunk);
                v.extend_from_slice(&(block.len() as u32).to_le_bytes());
                v.extend_from_slice(&block);
            }
            v
        }
        _ => panic!("{format}"),
    };
    payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
    let mut b = vec![0u8; 5 * 512];
    b[0x1f1] = 4; // setup sectors
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&payload);
    b
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn scan_prints_a_summary_and_a_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let out = pvpatch().arg("scan").arg(&img).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for class in [
        "cli",
        "mov_to_cr3",
        "out",
        "rdmsr",
        "sti",
        "vmcall",
        "__ex_table",
    ] {
        assert!(text.contains(class), "{class} missing from:\n{text}");
    }

    let out = pvpatch()
        .args(["scan", "--json"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], pvpatch::ledger::LEDGER_SCHEMA);
    assert_eq!(v["image"]["sha256"].as_str().unwrap().len(), 64);
    let sites = v["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 6);
    for s in sites {
        for field in [
            "address",
            "length",
            "class",
            "op",
            "operands",
            "section",
            "symbol",
            "covered_by",
            "room",
        ] {
            assert!(s.get(field).is_some(), "{field} missing in {s}");
        }
        assert!(s["address"].as_str().unwrap().starts_with("0x"));
    }
    let by_class = |c: &str| sites.iter().find(|s| s["class"] == c).unwrap();
    assert_eq!(by_class("cli")["room"]["in_place"], 5);
    assert_eq!(by_class("cli")["symbol"], "f+0x0");
    assert_eq!(by_class("mov_to_cr3")["operands"]["reg"], "rdi");
    assert_eq!(by_class("mov_to_cr3")["op"]["id"], 10);
    assert_eq!(by_class("out")["operands"]["port"], "0x80");
    assert_eq!(by_class("rdmsr")["covered_by"]["table"], "__ex_table");
    assert_eq!(by_class("rdmsr")["room"]["in_place"], 0);
    assert!(
        by_class("vmcall")["room"]["forms"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        v["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "__ex_table")
            .unwrap()["entries"],
        1
    );

    // -o writes the same ledger to a file.
    let ledger = dir.path().join("ledger.json");
    let st = pvpatch()
        .args(["scan", "--json", "-o"])
        .arg(&ledger)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read(&ledger).unwrap(), out.stdout);
}

#[test]
fn annotate_verify_and_the_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let original = std::fs::read(&img).unwrap();
    let ann = dir.path().join("sample.ann");
    let st = pvpatch()
        .arg("annotate")
        .arg(&img)
        .arg("-o")
        .arg(&ann)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0));
    let out = pvpatch().arg("verify").arg(&ann).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 records"));

    // Refused: annotating an annotated image, and writing over the input.
    let again = dir.path().join("again");
    let out = pvpatch()
        .arg("annotate")
        .arg(&ann)
        .arg("-o")
        .arg(&again)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already annotated"));
    assert!(!again.exists());
    assert_eq!(
        pvpatch()
            .arg("annotate")
            .arg(&img)
            .arg("-o")
            .arg(&img)
            .status()
            .unwrap()
            .code(),
        Some(5)
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        original,
        "the input is never modified"
    );
    assert_eq!(
        pvpatch()
            .args(["annotate", "--force"])
            .arg(&ann)
            .arg("-o")
            .arg(&again)
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&ann).unwrap());

    // Unreadable input.
    let missing = dir.path().join("missing");
    assert_eq!(
        pvpatch().arg("scan").arg(&missing).status().unwrap().code(),
        Some(3)
    );
    let text = dir.path().join("text");
    std::fs::write(&text, b"not an ELF file at all").unwrap();
    let out = pvpatch().arg("scan").arg(&text).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ELF file"));
    assert_eq!(
        pvpatch()
            .arg("extract-vmlinux")
            .arg(&text)
            .arg("-o")
            .arg(dir.path().join("x"))
            .status()
            .unwrap()
            .code(),
        Some(3)
    );

    // verify: not annotated, and a corrupted table.
    assert_eq!(
        pvpatch().arg("verify").arg(&img).status().unwrap().code(),
        Some(4)
    );
    let mut bytes = std::fs::read(&ann).unwrap();
    let image = pvpatch::load::image::Image::from_bytes("ann", bytes.clone()).unwrap();
    let s = image.section(".pvpatch_sites").unwrap();
    bytes[s.offset as usize + 40] ^= 0xff; // inside the first record
    let bad = dir.path().join("bad");
    std::fs::write(&bad, &bytes).unwrap();
    let out = pvpatch().arg("verify").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A bad command line.
    assert_eq!(
        pvpatch().arg("frobnicate").status().unwrap().code(),
        Some(2)
    );

    // Nothing but the files named above is left in the directory: no temporary files.
    assert_eq!(
        files_in(dir.path()),
        ["again", "bad", "sample.ann", "sample.elf", "text"]
    );
}

#[test]
fn annotate_with_in_place_replaces_the_input_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let st = pvpatch()
        .args(["annotate", "--in-place"])
        .arg(&img)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0));
    assert_eq!(
        pvpatch().arg("verify").arg(&img).status().unwrap().code(),
        Some(0)
    );
    assert_eq!(files_in(dir.path()), ["sample.elf"]);
}

/// Hostile inputs through the command line: exit status 3, the problem named on stderr, the
/// input untouched, and no output or temporary file left behind; with `--in-place` too.
#[test]
fn hostile_images_fail_annotate_with_status_3_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample_image();
    let shoff = u64::from_le_bytes(good[0x28..0x30].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "empty file"),
        ("truncated", good[..good.len() / 2].to_vec(), "malformed"),
    ];
    let mut b = good.clone();
    b[shoff + 64 + 24..shoff + 64 + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("text_past_end", b, "exceeds"));
    let mut b = good.clone();
    b[0x12] = 3; // EM_386
    cases.push(("i386", b, "not x86-64"));
    let mut b = good.clone();
    b[0x3c..0x3e].copy_from_slice(&0xffffu16.to_le_bytes()); // e_shnum
    cases.push(("shnum", b, "malformed"));
    for (name, bytes, message) in cases {
        let input = dir.path().join(name);
        std::fs::write(&input, &bytes).unwrap();
        let output = dir.path().join(format!("{name}.out"));
        let out = pvpatch()
            .arg("annotate")
            .arg(&input)
            .arg("-o")
            .arg(&output)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: {stderr}");
        assert!(!output.exists(), "{name}");
        let out = pvpatch()
            .args(["annotate", "--in-place"])
            .arg(&input)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{name} in place");
        assert_eq!(
            std::fs::read(&input).unwrap(),
            bytes,
            "{name}: input intact"
        );
    }
    assert_eq!(
        files_in(dir.path()),
        ["empty", "i386", "shnum", "text_past_end", "truncated"]
    );
}

/// The `image` fuzz target's seeds are the sample images (a kernel of our own, and a stripped
/// stock kernel with kallsyms), and the first in a bzImage of each compression;
/// `PVPATCH_UPDATE=1` rewrites them.
#[test]
fn the_image_fuzz_seeds_are_the_sample_images() {
    for (name, bytes) in [
        ("seed-sample", sample_image()),
        ("seed-stock-kallsyms", pvpatch_testkit::elf::stock_sample()),
        ("seed-bzimage-xz", fake_bzimage("xz", &sample_image())),
        ("seed-bzimage-gzip", fake_bzimage("gzip", &sample_image())),
        ("seed-bzimage-zstd", fake_bzimage("zstd", &sample_image())),
        ("seed-bzimage-lz4", fake_bzimage("lz4", &sample_image())),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/image")
            .join(name);
        if std::env::var_os("PVPATCH_UPDATE").is_some() {
            std::fs::write(&path, &bytes).unwrap();
        }
        assert!(
            std::fs::read(&path).unwrap_or_default() == bytes,
            "{} is not the sample image (PVPATCH_UPDATE=1 rewrites it)",
            path.display()
        );
    }
}

/// `extract-vmlinux` says which checks the payload allowed; refuses a changed payload and a
/// decompression bomb with status 3, at once, writing nothing; reads `--max-decompressed`.
#[test]
fn extract_vmlinux_checks_the_payload_and_caps_it() {
    let dir = tempfile::tempdir().unwrap();
    let (bz, out) = (dir.path().join("bz"), dir.path().join("vmlinux"));
    let run = |bytes: &[u8], extra: &[&str]| {
        std::fs::write(&bz, bytes).unwrap();
        let _ = std::fs::remove_file(&out);
        let t = std::time::Instant::now();
        let o = pvpatch()
            .arg("extract-vmlinux")
            .arg(&bz)
            .arg("-o")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (
            o.status.code(),
            text(&o.stdout),
            text(&o.stderr),
            t.elapsed(),
        )
    };
    let elf = sample_image();
    for (format, checks) in [
        ("xz", "xz check (CRC64), index size, size trailer"),
        ("gzip", "CRC32, size trailer (ISIZE)"),
        ("zstd", "content checksum, size trailer"),
        ("lz4", "8 MiB blocks, size trailer"),
    ] {
        let (code, stdout, stderr, _) =
            run(&fake_bzimage(format, &elf), &["--max-decompressed", "512M"]);
        assert_eq!(code, Some(0), "{format}: {stderr}");
        assert!(stdout.contains(&format!("(checks: {checks})")), "{stdout}");
        assert_eq!(std::fs::read(&out).unwrap(), elf);
    }

    // A changed byte in a zstd payload fails its content checksum.
    let mut bad = fake_bzimage("zstd", &elf);
    let n = bad.len();
    bad[n - 100] ^= 0x20;
    let (code, _, stderr, _) = run(&bad, &[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(!out.exists());

    // Bombs: 64 MiB of zeros against a 16 MiB cap; claiming 4 GiB against the default cap;
    // claiming less than they hold (as a 4 GiB payload's trailer does once it wraps).
    let zeros = fake_bzimage("zstd", &vec![0u8; 64 << 20]);
    let mut claims_4g = zeros.clone();
    let n = claims_4g.len();
    claims_4g[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut wraps = zeros.clone();
    wraps[n - 4..].copy_from_slice(&4096u32.to_le_bytes());
    for (bytes, extra, named) in [
        (&zeros, &["--max-decompressed", "16M"][..], "the 16 MiB cap"),
        (&claims_4g, &[][..], "the 1 GiB cap"),
        (&wraps, &[][..], "the 1 GiB cap"),
    ] {
        let (code, _, stderr, took) = run(bytes, extra);
        assert_eq!(code, Some(3), "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
        assert!(!out.exists());
    }

    // Sizes: bytes, or K, M, G, T; anything else is a usage error.
    let (code, _, _, _) = run(&fake_bzimage("lz4", &elf), &["--max-decompressed", "65536"]);
    assert_eq!(code, Some(0));
    let (code, _, stderr, _) = run(&fake_bzimage("lz4", &elf), &["--max-decompressed", "1.5G"]);
    assert_eq!(code, Some(2), "{stderr}");
}
