//! `pvpatch rom build` and `pvpatch rom show`: signatures, what the runtime would refuse, and
//! the size limit, through the command line.

use std::path::Path;
use std::process::{Command, Output};

use patch_sites::Op;
use patch_sites::rom::{MAX_ROM_LEN, RomEntrySpec, RomKind, rom_size, write_rom};

fn pvpatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvpatch"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn build(dir: &Path, signature: &str) -> (Output, std::path::PathBuf) {
    let desc = dir.join("rom.toml");
    std::fs::write(
        &desc,
        format!(
            "name = \"sig-test\"\nsignature = \"{signature}\"\n\
             [[entry]]\nop = \"io_delay\"\nkind = \"nothing\"\n"
        ),
    )
    .unwrap();
    let rom = dir.join("rom.bin");
    let out = pvpatch()
        .args(["rom", "build"])
        .arg(&desc)
        .arg("-o")
        .arg(&rom)
        .output()
        .unwrap();
    (out, rom)
}

#[test]
fn the_hyperv_signature_and_short_ones_build_as_cpuid_gives_them() {
    let dir = tempfile::tempdir().unwrap();
    let (out, rom) = build(dir.path(), "Microsoft Hv");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let bytes = std::fs::read(&rom).unwrap();
    assert_eq!(&bytes[40..52], b"Microsoft Hv");
    assert!(
        text(&out.stdout).contains("serves \"Microsoft Hv\""),
        "{}",
        text(&out.stdout)
    );
    // Shorter: NUL-padded, as KVM's "KVMKVMKVM\0\0\0".
    let (out, rom) = build(dir.path(), "KVMKVMKVM");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(&std::fs::read(&rom).unwrap()[40..52], b"KVMKVMKVM\0\0\0");
    // bhyve's has a trailing space, Parallels' a leading one.
    let (out, rom) = build(dir.path(), "bhyve bhyve ");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(&std::fs::read(&rom).unwrap()[40..52], b"bhyve bhyve ");
}

#[test]
fn an_empty_signature_is_refused_and_any_is_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let (out, rom) = build(dir.path(), "");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("signature"),
        "{}",
        text(&out.stderr)
    );
    assert!(!rom.exists());
    let (out, rom) = build(dir.path(), "any");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(&std::fs::read(&rom).unwrap()[40..52], &[0; 12]);
    assert!(
        text(&out.stdout).contains("serves any"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn rom_show_says_what_the_runtime_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let entries = [
        // Fine.
        RomEntrySpec::new(Op::IoDelay, RomKind::Nothing, &[]),
        // An entry for vmcall itself: a hypervisor interface is never rewritten.
        RomEntrySpec::new(Op::Vmcall, RomKind::Nothing, &[]),
        // A template that is a vmcall.
        RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0x0f, 0x01, 0xc1]),
        // A template that does not decode.
        RomEntrySpec::new(Op::Sti, RomKind::Inline, &[0x0f]),
        // An entry point that jumps out of itself.
        RomEntrySpec::new(Op::Wbinvd, RomKind::Call, &[0xe9, 0x00, 0x10, 0x00, 0x00]),
    ];
    let mut bytes = vec![0u8; rom_size(&entries)];
    write_rom("refused", [0; 12], &entries, &mut bytes).unwrap();
    let path = dir.path().join("refused.rom");
    std::fs::write(&path, &bytes).unwrap();
    let out = pvpatch().args(["rom", "show"]).arg(&path).output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}{}", text(&out.stderr));
    // Still printed whole.
    for op in ["io_delay", "vmcall", "cli", "sti", "wbinvd"] {
        assert!(stdout.contains(op), "{op} missing from:\n{stdout}");
    }
    for why in [
        "vmcall, which may not be rewritten",
        "is a hypervisor call",
        "does not decode",
        "branches outside its own bytes",
    ] {
        assert!(stdout.contains(why), "{why:?} missing from:\n{stdout}");
    }
    // One refusal line per refused entry, none for io_delay.
    assert_eq!(stdout.matches("refused:").count(), 4, "{stdout}");
    assert!(
        text(&out.stderr).contains("4 of 5 entries"),
        "{}",
        text(&out.stderr)
    );

    // A ROM the runtime accepts: status 0, no refusal.
    let entries = [RomEntrySpec::new(Op::IoDelay, RomKind::Nothing, &[])];
    let mut bytes = vec![0u8; rom_size(&entries)];
    write_rom("fine", [0; 12], &entries, &mut bytes).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let out = pvpatch().args(["rom", "show"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("refused"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_rom_over_the_limit_is_refused_for_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = vec![0u8; rom_size(&[])];
    write_rom("big", [0; 12], &[], &mut bytes).unwrap();
    bytes.resize(70_277, 0);
    bytes[16..20].copy_from_slice(&70_277u32.to_le_bytes());
    let path = dir.path().join("big.rom");
    std::fs::write(&path, &bytes).unwrap();
    let out = pvpatch().args(["rom", "show"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "ROM is 70277 bytes, more than the {MAX_ROM_LEN}-byte limit"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("disagrees"), "{stderr}");
}
