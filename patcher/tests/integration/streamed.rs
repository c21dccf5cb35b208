//! A scan that keeps no site (`scan_image_streamed`, what `pvpatch scan` runs) writes the same
//! ledger and summary, byte for byte, as one that keeps them all (`scan_image`): on the test
//! kit's images and on generated code, with one worker thread or several.

use proptest::prelude::*;
use pvpatch::ledger::Ledger;
use pvpatch::load::Image;
use pvpatch::summary::human_summary;
use pvpatch::sweep::Options;
use pvpatch::{scan_image, scan_image_streamed};
use pvpatch_testkit::elf;

/// The ledger (pretty JSON) and the summary (without its timing line) of a scan.
fn outputs(report: &pvpatch::ScanReport<'_>) -> (String, String) {
    let json = serde_json::to_string_pretty(&Ledger::new(report)).unwrap();
    let summary = human_summary(report)
        .lines()
        .filter(|l| !l.starts_with("swept "))
        .map(|l| format!("{l}\n"))
        .collect();
    (json, summary)
}

/// Checks that both scans of `bytes` say the same; returns the number of sites.
fn same(bytes: Vec<u8>) -> usize {
    same_in_chunks(bytes).0
}

/// As [`same`], with the chunks the sweep cut on 3 threads.
fn same_in_chunks(bytes: Vec<u8>) -> (usize, usize) {
    let img = Image::from_bytes("generated.elf", bytes).unwrap();
    let kept = scan_image(&img, Options { threads: 1 }, None);
    let expected = outputs(&kept);
    let mut chunks = 0;
    for threads in [1, 3] {
        let streamed = scan_image_streamed(&img, Options { threads }, None).unwrap();
        assert!(
            !streamed.sweep.kept || streamed.analysis.stock,
            "only a stock kernel's sites are kept"
        );
        chunks = streamed.sweep.chunk_count();
        let actual = outputs(&streamed);
        assert!(
            actual.0 == expected.0,
            "ledgers differ ({threads} threads):\n{}",
            first_difference(&expected.0, &actual.0)
        );
        assert!(
            actual.1 == expected.1,
            "summaries differ ({threads} threads):\n{}",
            first_difference(&expected.1, &actual.1)
        );
    }
    (kept.analysis.sites.len(), chunks)
}

fn first_difference(expected: &str, actual: &str) -> String {
    let line = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a)
        .unwrap_or(expected.lines().count().min(actual.lines().count()));
    format!(
        "line {}: expected {:?}, actual {:?}",
        line + 1,
        expected.lines().nth(line),
        actual.lines().nth(line)
    )
}

#[test]
fn the_test_kits_images() {
    assert!(same(elf::sample()) > 0);
    // A stock kernel: its sites are kept (detours are planned over all of them).
    assert!(same(elf::stock_sample()) > 0);
    assert_eq!(
        same(elf::many_exec_sections(&[0xc3], 300, &[0xfa, 0xfb])),
        600
    );
}

#[test]
fn code_in_many_chunks_of_several_sections() {
    // More than one chunk per section (chunks are cut at known starts: symbols every 4 KiB),
    // sites on both sides of every cut, resynchronisations, branches into padding.
    let mut code = Vec::new();
    for i in 0..90_000u32 {
        match i % 11 {
            0 => code.push(0xfa),
            1 => code.extend_from_slice(&[0x0f, 0x22, 0xdf]),
            2 => code.extend_from_slice(&[0xeb, 0x01]),
            3 => code.push(0x06),
            4 => code.extend_from_slice(&[0xe6, 0x80]),
            5 => code.push(0xfb),
            6 => code.extend_from_slice(&[0x0f, 0x1f, 0x40, 0x00]),
            _ => code.push(0x90),
        }
    }
    let names: Vec<String> = (0..code.len() / 4096).map(|i| format!("f{i}")).collect();
    let symbols: Vec<(&str, u64, u64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u64 * 4096, 4096))
        .collect();
    let extra = [elf::Extra {
        name: ".init.text".into(),
        addr: elf::TEXT + 0x200_0000,
        flags: 6,
        data: code[..50_000].to_vec(),
    }];
    let (sites, chunks) = same_in_chunks(elf::build(&code, &symbols, &extra));
    assert!(sites > 30_000);
    assert!(chunks > 3, "{chunks} chunks for 2 sections");
}

/// Pieces of code: sites of every kind, padding, branches, control flow, bad bytes.
const PIECES: &[&[u8]] = &[
    &[0xfa],                         // cli
    &[0xfb],                         // sti
    &[0xf4],                         // hlt
    &[0x0f, 0x01, 0xc9],             // mwait
    &[0x0f, 0x20, 0xd8],             // mov rax, cr3
    &[0x0f, 0x22, 0xdf],             // mov cr3, rdi
    &[0xe6, 0x80],                   // out 0x80, al
    &[0xec],                         // in al, dx
    &[0x0f, 0x31],                   // rdtsc
    &[0x0f, 0x01, 0xc1],             // vmcall
    &[0x9c],                         // pushf
    &[0x9d],                         // popf
    &[0x0f, 0x09],                   // wbinvd
    &[0x90],                         // nop
    &[0x0f, 0x1f, 0x40, 0x00],       // nop4
    &[0x66, 0x0f, 0x1f, 0x44, 0, 0], // nop6
    &[0x48, 0x89, 0xd8],             // mov rax, rbx
    &[0x48, 0x83, 0xc0, 0x01],       // add rax, 1
    &[0xeb, 0x01],                   // jmp +1
    &[0xeb, 0xfd],                   // jmp -3
    &[0xe8, 0, 0, 0, 0],             // call next
    &[0xff, 0xe0],                   // jmp rax
    &[0xc3],                         // ret
    &[0xcc],                         // int3
    &[0x06],                         // undecodable in 64-bit mode
    &[0x0f, 0x0b],                   // ud2
];

fn code_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0..PIECES.len(), 1..400)
        .prop_map(|ix| ix.into_iter().flat_map(|i| PIECES[i].to_vec()).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn generated_code_with_symbols(
        code in code_strategy(),
        cuts in prop::collection::vec(0usize..2000, 0..8),
    ) {
        // Symbols at arbitrary offsets: known starts that cut instructions.
        let names: Vec<String> = (0..cuts.len()).map(|i| format!("s{i}")).collect();
        let symbols: Vec<(&str, u64, u64)> = names
            .iter()
            .zip(&cuts)
            .map(|(n, &c)| (n.as_str(), (c % code.len()) as u64, 1))
            .collect();
        same(elf::build(&code, &symbols, &[]));
    }

    #[test]
    fn generated_sections(each in code_strategy(), n in 1usize..40) {
        same(elf::many_exec_sections(&[0xfa, 0xc3], n, &each));
    }
}
