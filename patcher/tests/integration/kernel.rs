//! The real thing: Debian bookworm's current kernel (fetched by `cargo xtask kernel`), scanned,
//! cross-checked against capstone, annotated, verified, and booted under QEMU.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;

use capstone::prelude::*;
use pvpatch::linux::TableKind;
use pvpatch::load::image::Image;
use pvpatch::scan_image;
use pvpatch_testkit::{self as harness, Qemu};

fn kernel(test: &str) -> Option<PathBuf> {
    match harness::debian_kernel() {
        Ok(k) => Some(k.vmlinux),
        Err(why) => {
            harness::skip(test, &why);
            None
        }
    }
}

/// The vmlinux, loaded once for every test of this module.
fn image(test: &str) -> Option<&'static Image> {
    static IMG: OnceLock<Option<Image>> = OnceLock::new();
    let path = kernel(test)?;
    IMG.get_or_init(|| Some(Image::open(&path).expect("the cached vmlinux loads")))
        .as_ref()
}

/// capstone's view of the class of an instruction, from its mnemonic and operands, in our names.
fn capstone_class(mnemonic: &str, ops: &str, bytes: &[u8]) -> Option<&'static str> {
    let m = mnemonic
        .trim_start_matches("rep ")
        .trim_start_matches("repne ")
        .trim_start_matches("lock ");
    let cr = |to: bool| -> Option<&'static str> {
        let (dst, src) = ops.split_once(", ")?;
        let reg = if to { dst } else { src };
        Some(match (reg.trim(), to) {
            ("cr0", true) => "mov_to_cr0",
            ("cr0", false) => "mov_from_cr0",
            ("cr2", true) => "mov_to_cr2",
            ("cr2", false) => "mov_from_cr2",
            ("cr3", true) => "mov_to_cr3",
            ("cr3", false) => "mov_from_cr3",
            ("cr4", true) => "mov_to_cr4",
            ("cr4", false) => "mov_from_cr4",
            ("cr8", true) => "mov_to_cr8",
            ("cr8", false) => "mov_from_cr8",
            (r, true) if r.starts_with("dr") => "mov_to_dr",
            (r, false) if r.starts_with("dr") => "mov_from_dr",
            _ => return None,
        })
    };
    Some(match m {
        "cli" | "sti" | "hlt" | "rdmsr" | "wrmsr" | "in" | "out" | "invlpg" | "invpcid"
        | "wbinvd" | "invd" | "cpuid" | "lgdt" | "lidt" | "lldt" | "ltr" | "sgdt" | "sidt"
        | "sldt" | "str" | "smsw" | "clts" | "swapgs" | "rdtsc" | "rdtscp" | "rdpmc" | "iretq"
        | "sysretq" | "xsetbv" | "vmcall" | "vmgexit" => {
            // Normalised to the static names below.
            return [
                "cli", "sti", "hlt", "rdmsr", "wrmsr", "in", "out", "invlpg", "invpcid", "wbinvd",
                "invd", "cpuid", "lgdt", "lidt", "lldt", "ltr", "sgdt", "sidt", "sldt", "str",
                "smsw", "clts", "swapgs", "rdtsc", "rdtscp", "rdpmc", "iretq", "sysretq", "xsetbv",
                "vmcall", "vmgexit",
            ]
            .into_iter()
            .find(|c| *c == m);
        }
        "sysret" | "sysretd" | "sysretl" => "sysretl",
        // capstone names f3 0f 01 d9 (VMGEXIT) vmmcall with a rep prefix: a known naming
        // difference, told apart by the bytes.
        "vmmcall" if matches!(bytes.first(), Some(0xf3 | 0xf2)) => "vmgexit",
        "vmmcall" => "vmmcall",
        "pushfq" | "pushf" => "pushf",
        "popfq" | "popf" => "popf",
        "insb" | "insw" | "insd" => "ins",
        "outsb" | "outsw" | "outsd" => "outs",
        "mov" if ops.starts_with("cr") || ops.starts_with("dr") => return cr(true),
        "mov" if ops.contains(", cr") || ops.contains(", dr") => return cr(false),
        _ => return None,
    })
}

/// Instructions capstone 5 does not know and reports as invalid bytes. Where capstone fails,
/// the test asks iced-x86 what is there: it must be one of these (then both decoders continue
/// after it), or bytes neither decodes. Anything else fails the test.
const CAPSTONE_LACKS: &[iced_x86::Mnemonic] = &[
    iced_x86::Mnemonic::Serialize,
    iced_x86::Mnemonic::Rmpadjust,
    iced_x86::Mnemonic::Pvalidate,
    iced_x86::Mnemonic::Tilerelease,
];

/// What the differential had to account for, each case checked, never a proximity window.
#[derive(Debug, Default)]
struct Explained {
    /// Instructions of `CAPSTONE_LACKS`, by mnemonic.
    lacks: BTreeMap<String, usize>,
    /// `ud1`, which capstone decodes without its ModRM byte (one length per decoder).
    ud1: usize,
    /// Bytes neither decoder decodes.
    both_invalid: usize,
}

#[test]
fn scan_agrees_with_capstone_site_for_site() {
    let Some(img) = image("scan_agrees_with_capstone_site_for_site") else {
        return;
    };
    let report = scan_image(img, Default::default(), None);
    let ours: BTreeMap<u64, (u8, &str)> = report
        .analysis
        .sites
        .iter()
        .map(|s| (s.found.addr, (s.found.len, s.found.op().name())))
        .collect();

    // The same sections, read independently with goblin; the same restart points (symbols and
    // the tables' instruction starts are facts about the image, not about a decoder).
    let bytes = std::fs::read(&img.path).unwrap();
    let elf = goblin::elf::Elf::parse(&bytes).unwrap();
    let mut known: Vec<u64> = report.tables.starts.iter().map(|s| s.0).collect();
    known.extend(img.symbols.iter().map(|s| s.addr));
    known.sort_unstable();
    known.dedup();
    let cs = Capstone::new()
        .x86()
        .mode(arch::x86::ArchMode::Mode64)
        .syntax(arch::x86::ArchSyntax::Intel)
        .detail(false)
        .build()
        .unwrap();
    let iced_at = |data: &[u8], at: u64| {
        iced_x86::Decoder::with_ip(64, data, at, iced_x86::DecoderOptions::NONE).decode()
    };
    let mut theirs: BTreeMap<u64, (u8, &str)> = BTreeMap::new();
    let mut explained = Explained::default();
    let mut unexplained = Vec::new();
    let mut sections = 0;
    for sh in &elf.section_headers {
        let exec = sh.sh_flags & goblin::elf::section_header::SHF_EXECINSTR as u64 != 0
            && sh.sh_type == goblin::elf::section_header::SHT_PROGBITS;
        if !exec {
            continue;
        }
        sections += 1;
        let data = &bytes[sh.sh_offset as usize..(sh.sh_offset + sh.sh_size) as usize];
        let (start, end) = (sh.sh_addr, sh.sh_addr + sh.sh_size);
        let mut at = start;
        let mut k = known.partition_point(|&a| a <= start);
        'outer: while at < end {
            let here = &data[(at - start) as usize..];
            let mut it = cs.disasm_iter(here, at).unwrap();
            loop {
                while k < known.len() && known[k] <= at {
                    k += 1;
                }
                let next_known = known.get(k).copied().unwrap_or(u64::MAX);
                let rest = &data[(at - start) as usize..];
                let Some(i) = it.next() else {
                    // Capstone cannot decode here: it must be an instruction it lacks (both
                    // continue after it) or bytes iced cannot decode either (step one byte,
                    // as the sweep does).
                    let ins = iced_at(rest, at);
                    if ins.is_invalid() {
                        explained.both_invalid += 1;
                        at += 1;
                    } else if CAPSTONE_LACKS.contains(&ins.mnemonic()) {
                        *explained
                            .lacks
                            .entry(format!("{:?}", ins.mnemonic()))
                            .or_default() += 1;
                        at += ins.len() as u64;
                    } else {
                        unexplained.push(format!(
                            "{at:#x}: capstone cannot decode {:?} ({} bytes)",
                            ins.mnemonic(),
                            ins.len()
                        ));
                        at += 1;
                    }
                    continue 'outer;
                };
                let mut len = i.len() as u64;
                let m = i.mnemonic().unwrap_or("");
                if m == "ud1" {
                    // Capstone leaves out ud1's ModRM byte; continue where iced says it ends.
                    let ins = iced_at(rest, at);
                    if ins.mnemonic() == iced_x86::Mnemonic::Ud1 && ins.len() as u64 != len {
                        explained.ud1 += 1;
                        len = ins.len() as u64;
                        if at + len > next_known && next_known < end {
                            at = next_known;
                        } else {
                            at += len;
                        }
                        continue 'outer;
                    }
                }
                if at + len > next_known && next_known < end {
                    at = next_known;
                    continue 'outer;
                }
                if let Some(c) = capstone_class(m, i.op_str().unwrap_or(""), i.bytes()) {
                    theirs.insert(at, (len as u8, c));
                }
                at += len;
                if at >= end {
                    break 'outer;
                }
            }
        }
    }
    assert!(sections >= 3, "the kernel has several code sections");
    for (a, v) in &ours {
        if theirs.get(a) != Some(v) {
            unexplained.push(format!("{a:#x}: ours {v:?}, capstone {:?}", theirs.get(a)))
        }
    }
    for (a, v) in &theirs {
        if !ours.contains_key(a) {
            unexplained.push(format!("{a:#x}: capstone {v:?}, ours none"))
        }
    }
    eprintln!(
        "capstone differential: {} sites ours, {} capstone; where capstone could not decode or \
         decodes differently: {explained:?}",
        ours.len(),
        theirs.len(),
    );
    assert!(
        unexplained.is_empty(),
        "{} unexplained differences:\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
    assert!(
        ours.len() > 1000,
        "a distro kernel has thousands of sensitive instructions"
    );
}

#[test]
fn linux_table_addresses_land_on_instruction_starts() {
    let Some(img) = image("linux_table_addresses_land_on_instruction_starts") else {
        return;
    };
    let report = scan_image(img, Default::default(), None);
    for kind in [
        TableKind::Parainstructions,
        TableKind::Altinstructions,
        TableKind::ExTable,
        TableKind::SmpLocks,
        TableKind::RetpolineSites,
    ] {
        let r = report.tables.report(kind).unwrap();
        assert!(
            r.present && r.problem.is_none() && r.entries > 0,
            "{kind}: {r:?}"
        );
        let starts: Vec<u64> = report
            .tables
            .starts
            .iter()
            .filter(|s| s.1 == kind)
            .map(|s| s.0)
            .collect();
        let protected: Vec<u64> = report
            .tables
            .protected
            .iter()
            .filter(|p| p.table == kind)
            .map(|p| p.start)
            .collect();
        let addrs: BTreeSet<u64> = starts.into_iter().chain(protected).collect();
        let outside: Vec<String> = addrs
            .iter()
            .filter(|a| !img.exec_sections().any(|s| s.contains(**a)))
            .take(10)
            .map(|a| format!("{a:#x}"))
            .collect();
        assert!(
            outside.is_empty(),
            "{kind}: addresses outside every code section: {outside:?}"
        );
        let off: Vec<String> = addrs
            .iter()
            .filter(|a| !report.sweep.is_insn_start(**a))
            .take(10)
            .map(|a| format!("{a:#x}"))
            .collect();
        assert!(
            off.is_empty(),
            "{kind}: addresses not on an instruction start: {off:?}"
        );
        eprintln!(
            "{kind}: {} entries, {} addresses, all on instruction starts",
            r.entries,
            addrs.len()
        );
    }
    // Layouts of this 6.1 kernel, detected and not guessed.
    assert_eq!(
        report
            .tables
            .report(TableKind::Altinstructions)
            .unwrap()
            .entry_size,
        12
    );
    assert_eq!(
        report
            .tables
            .report(TableKind::Parainstructions)
            .unwrap()
            .entry_size,
        16
    );
    assert_eq!(
        report
            .tables
            .report(TableKind::BugTable)
            .unwrap()
            .entry_size,
        12
    );
}

#[test]
fn annotated_kernel_keeps_every_section_verifies_and_boots() {
    let test = "annotated_kernel_keeps_every_section_verifies_and_boots";
    let Some(img) = image(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vmlinux.annotated");
    let report = scan_image(img, Default::default(), None);
    let a = pvpatch::annotate::annotate(&report, &out, &Default::default()).unwrap();
    assert!(a.sites > 500, "{a:?}");

    // Every original section and program header, byte for byte, read back with goblin.
    let before = std::fs::read(&img.path).unwrap();
    let after = std::fs::read(&out).unwrap();
    let (e0, e1) = (
        goblin::elf::Elf::parse(&before).unwrap(),
        goblin::elf::Elf::parse(&after).unwrap(),
    );
    let name = |e: &goblin::elf::Elf<'_>, sh: &goblin::elf::SectionHeader| {
        e.shdr_strtab.get_at(sh.sh_name).unwrap_or("").to_owned()
    };
    for (i, sh) in e0.section_headers.iter().enumerate() {
        let n = name(&e0, sh);
        let sh1 = &e1.section_headers[i];
        assert_eq!(name(&e1, sh1), n, "section {i} keeps its place and name");
        if n == ".shstrtab" {
            continue; // grows by the new section's name
        }
        assert_eq!(
            (
                sh.sh_type,
                sh.sh_flags,
                sh.sh_addr,
                sh.sh_offset,
                sh.sh_size,
                sh.sh_addralign,
                sh.sh_entsize
            ),
            (
                sh1.sh_type,
                sh1.sh_flags,
                sh1.sh_addr,
                sh1.sh_offset,
                sh1.sh_size,
                sh1.sh_addralign,
                sh1.sh_entsize
            ),
            "section header {n}"
        );
        if sh.sh_type != goblin::elf::section_header::SHT_NOBITS {
            let r0 = sh.sh_offset as usize..(sh.sh_offset + sh.sh_size) as usize;
            assert!(before[r0.clone()] == after[r0], "section {n} data");
        }
    }
    assert_eq!(e1.section_headers.len(), e0.section_headers.len() + 1);
    for (i, p) in e0.program_headers.iter().enumerate() {
        assert_eq!(p, &e1.program_headers[i], "program header {i}");
    }
    let new = e1.program_headers.last().unwrap();
    assert_eq!(
        (new.p_vaddr, new.p_type),
        (a.table_addr, goblin::elf::program_header::PT_LOAD)
    );
    // Bytes no section covers (vmlinux.relocs) carried over at the end.
    assert!(a.trailing > 0 && after.ends_with(&before[before.len() - a.trailing..]));

    // verify, via the library and the CLI.
    let img2 = Image::open(&out).unwrap();
    let v = pvpatch::verify::verify(&img2).unwrap();
    assert!(v.ok() && v.sites == a.sites, "{:?}", v.mismatches.first());

    // Annotating twice gives identical bytes; annotating the output is refused without --force
    // and gives the same bytes with it.
    let out2 = dir.path().join("again");
    pvpatch::annotate::annotate(&report, &out2, &Default::default()).unwrap();
    assert!(std::fs::read(&out2).unwrap() == after);
    let r2 = scan_image(&img2, Default::default(), None);
    assert!(matches!(
        pvpatch::annotate::annotate(&r2, &out2, &Default::default()),
        Err(pvpatch::annotate::AnnotateError::AlreadyAnnotated(_))
    ));
    let forced = pvpatch::annotate::AnnotateOptions {
        force: true,
        ..Default::default()
    };
    pvpatch::annotate::annotate(&r2, &out2, &forced).unwrap();
    assert!(
        std::fs::read(&out2).unwrap() == after,
        "--force reproduces the same image"
    );

    // And the annotated kernel still boots to its init.
    if let Err(why) = harness::qemu_available() {
        return harness::skip(test, &why);
    }
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, pvpatch_testkit::initramfs::initramfs()).unwrap();
    let boot = Qemu::linux(&initrd).boot(&out).unwrap();
    assert!(
        boot.passed() && boot.serial.contains(pvpatch_testkit::initramfs::MARKER),
        "exit {:?} after {:?}\nserial:\n{}\nstderr:\n{}",
        boot.exit_code,
        boot.elapsed,
        boot.serial,
        boot.stderr
    );
    eprintln!(
        "annotated kernel booted to its init in {:.2} s",
        boot.elapsed.as_secs_f64()
    );
}
