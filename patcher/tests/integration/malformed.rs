//! Malformed images through every subcommand: each one is either handled (status 0) or refused
//! as bad input (status 3) with a message saying what is wrong, never reported as an internal
//! error (70) or a crash; the subcommands agree on whether an image is malformed; and an image
//! that has a loadable segment is never said to have none.

use std::path::Path;
use std::process::Command;

use pvpatch_testkit::elf as testimg;

fn pvpatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvpatch"))
}

fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The offset of the section header named `name`.
fn shdr(b: &[u8], name: &str) -> usize {
    let shoff = u64_at(b, 0x28) as usize;
    let shnum = u16_at(b, 0x3c);
    let shstrndx = u16_at(b, 0x3e);
    let strtab = u64_at(b, shoff + shstrndx * 64 + 24) as usize;
    (0..shnum)
        .map(|i| shoff + i * 64)
        .find(|&h| {
            let n = u32::from_le_bytes(b[h..h + 4].try_into().unwrap()) as usize;
            let s = &b[strtab + n..];
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            &s[..end] == name.as_bytes()
        })
        .unwrap_or_else(|| panic!("no section {name}"))
}

/// The malformed variants of the sample image, each with a word its refusal must use.
fn variants() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let sample = testimg::sample();
    let mut v = Vec::new();
    let mut b = sample.clone();
    let h = shdr(&b, ".symtab");
    b[h + 40..h + 44].copy_from_slice(&999u32.to_le_bytes()); // sh_link
    v.push(("sh_link out of range", b, "link"));
    let mut b = sample.clone();
    let h = shdr(&b, ".symtab");
    let first = u64_at(&b, h + 24) as usize + 24; // the first real symbol
    b[first..first + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    v.push(("huge symbol name offset", b, "name"));
    let mut b = sample.clone();
    let h = shdr(&b, ".strtab");
    let end = (u64_at(&b, h + 24) + u64_at(&b, h + 32)) as usize - 1;
    b[end] = b'x';
    v.push(("string table without its NUL", b, "NUL"));
    let mut b = sample.clone();
    let h = shdr(&b, ".shstrtab");
    put_u64(&mut b, h + 8, 6); // SHF_ALLOC | SHF_EXECINSTR
    v.push(("executable .shstrtab", b, "shstrtab"));
    let mut b = sample.clone();
    let h = shdr(&b, ".text");
    put_u64(&mut b, h + 16, 0); // sh_addr
    v.push(("text at address 0", b, "2 GiB"));
    let mut b = sample.clone();
    let ph = u64_at(&b, 0x20) as usize;
    b[ph..ph + 4].copy_from_slice(&0u32.to_le_bytes()); // PT_NULL
    v.push(("no PT_LOAD", b, "PT_LOAD"));
    let mut b = sample.clone();
    put_u64(&mut b, ph + 16, 0xffff_ffff_ffff_f000); // p_vaddr
    v.push((
        "PT_LOAD at the top of the address space",
        b,
        "top of the address space",
    ));
    v
}

#[test]
fn malformed_images_are_bad_input_in_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (what, bytes, word) in variants() {
        let input = dir.path().join("in.elf");
        std::fs::write(&input, &bytes).unwrap();
        let out = dir.path().join("out.elf");
        let runs: [(&str, Vec<&std::ffi::OsStr>); 4] = [
            ("scan", vec!["scan".as_ref(), input.as_os_str()]),
            (
                "annotate",
                vec![
                    "annotate".as_ref(),
                    input.as_os_str(),
                    "-o".as_ref(),
                    out.as_os_str(),
                ],
            ),
            (
                "plan",
                vec![
                    "plan".as_ref(),
                    "--backend".as_ref(),
                    "kvm".as_ref(),
                    input.as_os_str(),
                ],
            ),
            ("verify", vec!["verify".as_ref(), input.as_os_str()]),
        ];
        let mut statuses = Vec::new();
        for (cmd, args) in runs {
            let o = pvpatch().args(&args).output().unwrap();
            let code = o.status.code();
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            statuses.push((cmd, code));
            if !matches!(code, Some(0 | 3 | 4)) {
                failures.push(format!("{what}: {cmd} exited {code:?}: {err}"));
            }
            if code == Some(3) && !err.to_lowercase().contains(&word.to_lowercase()) {
                failures.push(format!(
                    "{what}: {cmd}'s refusal does not say {word:?}: {err}"
                ));
            }
            if what.starts_with("PT_LOAD at") && err.contains("no PT_LOAD") {
                failures.push(format!("{what}: {cmd} says there is no PT_LOAD: {err}"));
            }
            if cmd == "annotate" && code != Some(0) && Path::new(&out).exists() {
                failures.push(format!(
                    "{what}: annotate failed and left {}",
                    out.display()
                ));
            }
            let _ = std::fs::remove_file(&out);
        }
        // An image the loader refuses (scan's status 3) is refused by every subcommand. (One
        // that loads may still be one annotate cannot rewrite: refused by it and plan, with
        // status 3 and the reason, while scan reports on it.)
        if statuses[0].1 == Some(3) && statuses.iter().any(|(_, c)| *c != Some(3)) {
            failures.push(format!("{what}: the subcommands disagree: {statuses:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn options_that_would_do_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.elf");
    std::fs::write(&input, testimg::sample()).unwrap();
    let out = dir.path().join("out.elf");
    for (section, says) in [
        (".nonexistent", "no section of that name"),
        (".shstrtab", "not an executable section"),
    ] {
        let o = pvpatch()
            .arg("annotate")
            .arg(&input)
            .arg("-o")
            .arg(&out)
            .args(["--section", section])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--section {section}: {err}");
        assert!(err.contains(section) && err.contains(says), "{err}");
        assert!(!out.exists(), "--section {section} wrote {}", out.display());
    }
}

#[test]
fn huge_names_are_not_echoed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let huge = "x".repeat(5 << 20);
    // An unknown op in a ROM description, an unknown backend, and a TOML error on a huge line.
    let desc = dir.path().join("rom.toml");
    std::fs::write(
        &desc,
        format!(
            "name = \"x\"\nsignature = \"any\"\n[[entry]]\nop = \"{huge}\"\nkind = \"nothing\"\n"
        ),
    )
    .unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, format!("name = {huge}\n")).unwrap();
    let input = dir.path().join("in.elf");
    std::fs::write(&input, testimg::sample()).unwrap();
    let rom = dir.path().join("out.rom");
    let runs: Vec<Vec<std::ffi::OsString>> = vec![
        vec![
            "rom".into(),
            "build".into(),
            desc.into(),
            "-o".into(),
            rom.clone().into(),
        ],
        vec![
            "rom".into(),
            "build".into(),
            bad_toml.into(),
            "-o".into(),
            rom.into(),
        ],
        // A long argument (one may be at most 128 KiB).
        vec![
            "plan".into(),
            "--backend".into(),
            huge[..100_000].into(),
            input.into(),
        ],
    ];
    for args in runs {
        let o = pvpatch().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            matches!(o.status.code(), Some(2 | 3)),
            "{:?}: {}",
            o.status,
            &err[..200.min(err.len())]
        );
        assert!(
            err.len() < 4096,
            "a {}-byte message for {:?}",
            err.len(),
            &args[..2]
        );
        assert!(
            err.contains("bytes"),
            "the message does not say how long the name was: {err}"
        );
    }
}

#[test]
fn too_many_sites_to_keep_is_bad_input() {
    // annotate, plan and rewrite keep every site: past MAX_KEPT_SITES, status 3 and why, not
    // gigabytes and an abort (scan streams, and has no such limit).
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dense.elf");
    let pairs = (pvpatch::MAX_KEPT_SITES / 2 + 1024) as usize;
    std::fs::write(
        &input,
        testimg::build(&[0xfa, 0xfb].repeat(pairs), &[], &[]),
    )
    .unwrap();
    let out = dir.path().join("out.elf");
    let o = pvpatch()
        .arg("annotate")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!("more than {}", pvpatch::MAX_KEPT_SITES)),
        "{err}"
    );
    assert!(!out.exists());
}
