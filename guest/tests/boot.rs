//! Boots the annotated guest under QEMU in every configuration this machine offers, and with a
//! corrupted site table or a hostile backend ROM, and checks what it reports.
//!
//! Every boot must end through `isa-debug-exit` with the pass code, print one well-formed JSON
//! report, detect the backend its configuration implies, and pass (or skip with a reason) every
//! self-test. A broken table or ROM must be refused whole: nothing patched, the reason on the
//! serial port, the self-tests still passing on the native instructions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use patch_sites::Op;
use patch_sites::rom::{RomEntrySpec, RomKind, rom_size, write_rom};
use patch_sites::table::{SEALED_SECTION, Site, SiteTable, write_sealed_table};
use pvpatch_testkit::{self as harness, Boot, Config};
use serde_json::Value;

/// The annotated guest, built once for every test of this binary.
fn guest() -> &'static Path {
    static GUEST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match GUEST.get_or_init(|| harness::build_guest().map_err(|e| e.to_string())) {
        Ok(p) => p,
        Err(e) => panic!("the guest does not build: {e}"),
    }
}

/// The demo ROM, built once for the annotated guest.
fn demo_rom() -> &'static Path {
    static ROM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match ROM.get_or_init(|| harness::build_demo_rom(guest()).map_err(|e| e.to_string())) {
        Ok(p) => p,
        Err(e) => panic!("the demo ROM does not build: {e}"),
    }
}

fn config(name: &str) -> Config {
    harness::configs()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no configuration {name}"))
}

/// Boots `kernel` in `config`; `None` (after recording the skip) when this machine cannot.
/// Panics unless the guest passed and printed a report that parses.
fn boot(test: &str, config: &Config, kernel: &Path) -> Option<(Boot, Value)> {
    if let Err(why) = config.available() {
        harness::skip(test, &why);
        return None;
    }
    let config = &config
        .clone()
        .for_guest(kernel)
        .unwrap_or_else(|e| panic!("{test}: the xgetbv probe failed: {e}"));
    let b = config
        .qemu
        .boot(kernel)
        .unwrap_or_else(|e| panic!("{test}: QEMU failed: {e}"));
    let context = || {
        format!(
            "{test} ({}): exit {:?}\nserial:\n{}\nstderr:\n{}",
            config.about, b.exit_code, b.serial, b.stderr
        )
    };
    let report = b
        .report()
        .unwrap_or_else(|| panic!("no parsable report\n{}", context()));
    assert!(b.passed(), "the guest failed\n{}", context());
    assert_eq!(report["pass"], true, "{}", context());
    // `rep outs` by its effect: the bytes reached the port (COM1, the serial console).
    assert!(
        b.serial.contains("pvguest: rep-outs-ok"),
        "the rep outs self-test's message never reached the serial port\n{}",
        context()
    );
    well_formed(&report);
    Some((b, report))
}

fn num(v: &Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a number: {cur}"))
}

fn text<'a>(v: &'a Value, path: &str) -> &'a str {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_str()
        .unwrap_or_else(|| panic!("{path} is not a string: {cur}"))
}

/// The self-tests the issue requires to check an effect; none may be skipped anywhere.
const MUST_PASS: &[&str] = &[
    "if_through_flags",
    "timer_only_when_enabled",
    "hlt_woken_by_the_timer",
    "control_registers",
    "invlpg_shows_the_new_mapping",
    "msr_round_trips",
    "cmos_round_trip",
    "fw_cfg_ports",
    "cpuid_matches_the_instruction",
    "descriptor_tables",
    "iretq_and_sysret",
];

/// Self-tests that pass under QEMU's TCG (`-cpu max`), whose CPU has what they need; elsewhere
/// they may be skipped for a condition they observed (this host's KVM delivers no data
/// breakpoints and cannot emulate `xgetbv`).
const PASS_UNDER_TCG: &[&str] = &["debug_registers", "xsetbv"];

fn passed_under_tcg(r: &Value) {
    let tests = r["selftests"].as_array().expect("selftests");
    for t in tests {
        eprintln!("{}: {} {}", t["name"], t["result"], t["why"]);
    }
    for m in PASS_UNDER_TCG {
        let t = tests
            .iter()
            .find(|t| t["name"] == *m)
            .unwrap_or_else(|| panic!("self-test {m} missing"));
        assert_eq!(text(t, "result"), "pass", "{m}: {}", t["why"]);
    }
}

/// Checks the report's shape: every field a reader relies on, with its type, and counts that
/// add up.
fn well_formed(r: &Value) {
    assert_eq!(text(r, "report"), "pvguest/1");
    let _ = text(r, "backend.name");
    assert!(r["backend"]["hypervisor_bit"].is_boolean());
    assert_eq!(text(r, "backend.signature").len(), 12);
    assert!(r["backend"]["overridden"].is_boolean());
    assert!(["sealed", "linked"].contains(&text(r, "table.source")));
    // A refused table counts as empty.
    let sites = num(r, "table.sites");
    assert_eq!(num(r, "table.unknown_ops"), 0);

    let p = &r["patch"];
    let applied = p["applied"]
        .as_bool()
        .unwrap_or_else(|| panic!("patch.applied: {p}"));
    assert_eq!(applied, p["refused"].is_null(), "applied xor refused: {p}");
    let by = p["sites_by_outcome"]
        .as_object()
        .unwrap_or_else(|| panic!("sites_by_outcome: {p}"));
    let keys: Vec<&str> = by.keys().map(String::as_str).collect();
    for k in ["unchanged", "native", "inline", "call", "nothing", "trap"] {
        assert!(keys.contains(&k), "sites_by_outcome lacks {k}");
    }
    let total: u64 = by.values().map(|v| v.as_u64().unwrap_or(u64::MAX)).sum();
    if applied {
        assert!(sites > 0, "an empty table");
        assert_eq!(total, sites, "outcomes do not add up to the table: {p}");
        // The per-op counts add up too.
        let per_op: u64 = p["by_op"]
            .as_array()
            .unwrap_or_else(|| panic!("by_op: {p}"))
            .iter()
            .flat_map(|o| o.as_object().into_iter().flatten())
            .filter(|(k, _)| k.as_str() != "op")
            .map(|(_, v)| v.as_u64().unwrap_or(u64::MAX))
            .sum();
        assert_eq!(per_op, sites, "by_op does not add up: {p}");
        let per_form: u64 = p["by_form"]
            .as_object()
            .unwrap_or_else(|| panic!("by_form: {p}"))
            .values()
            .flat_map(|o| o.as_object().into_iter().flatten())
            .map(|(_, v)| v.as_u64().unwrap_or(u64::MAX))
            .sum();
        assert_eq!(per_form, sites, "by_form does not add up: {p}");
        assert!(num(r, "patch.boot_cycles") > 0);
    } else {
        assert_eq!(total, 0, "a refused table counted sites: {p}");
        assert_eq!(num(r, "patch.sites_written"), 0);
        assert_eq!(num(r, "patch.bytes_written"), 0);
    }

    let tests = r["selftests"].as_array().expect("selftests");
    assert!(tests.len() >= 18, "{} self-tests", tests.len());
    for t in tests {
        let name = text(t, "name");
        let _ = text(t, "ops");
        match text(t, "result") {
            "pass" => {}
            "skip" => {
                assert!(
                    !text(t, "why").is_empty(),
                    "{name} skipped without a reason"
                );
                assert!(
                    !MUST_PASS.contains(&name),
                    "{name} skipped: {}",
                    text(t, "why")
                );
            }
            other => panic!("self-test {name}: {other}: {}", t["why"]),
        }
    }
    for m in MUST_PASS {
        assert!(
            tests.iter().any(|t| t["name"] == *m),
            "self-test {m} missing"
        );
    }

    let rows = r["bench"]["rows"].as_array().expect("bench.rows");
    assert!(!rows.is_empty());
    for row in rows {
        let _ = text(row, "op");
        assert!(["kernel", "user"].contains(&text(row, "ring")));
        for k in ["native", "site_unpatched", "call_unpatched", "site_patched"] {
            assert!(
                row[k].is_number() || row[k].is_null(),
                "bench {}: {k} = {}",
                row["op"],
                row[k]
            );
        }
    }
}

fn outcome(r: &Value, k: &str) -> u64 {
    num(&r["patch"]["sites_by_outcome"], k)
}

/// `by_op` counts of one op: (outcome, count).
fn op_counts(r: &Value, op: &str) -> Vec<(String, u64)> {
    r["patch"]["by_op"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o["op"] == op)
        .flat_map(|o| o.as_object().into_iter().flatten())
        .filter(|(k, _)| k.as_str() != "op")
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

/// Every `op` site ended as one of `expected` (there is at least one site).
fn all_sites_of(r: &Value, op: &str, expected: &[&str]) {
    let c = op_counts(r, op);
    assert!(!c.is_empty(), "no {op} sites");
    assert!(
        c.iter().all(|(k, _)| expected.contains(&k.as_str())),
        "{op} sites: {c:?}, expected only {expected:?}"
    );
}

/// The native instruction, inline: unchanged where it already was, rewritten where the site
/// called through the ops table.
const NATIVE: &[&str] = &["unchanged", "native"];

/// What every backend that patches shares: the table sealed by the build, the trap pass
/// emulated correctly, something rewritten, nothing inlined or called unless a ROM says so.
fn patched_plainly(r: &Value) {
    assert_eq!(text(r, "table.source"), "sealed");
    assert_eq!(r["patch"]["applied"], true);
    assert!(num(r, "patch.sites_written") > 0);
    assert_eq!(r["rom"], Value::Null);
    assert_eq!(outcome(r, "inline"), 0);
    assert_eq!(outcome(r, "call"), 0);
    assert_eq!(outcome(r, "trap"), 0);
    assert!(outcome(r, "native") > 0, "call-form sites were not inlined");
    // Every indirect-call site got its instruction inline (or nothing, for port-0x80 delays),
    // but for control transfers (iretq), which are never rewritten; every native-form site
    // kept its instruction (or became nothing).
    let by_form = &r["patch"]["by_form"];
    let calls = by_form["indirect_call"]
        .as_object()
        .expect("call-form sites");
    assert!(
        calls
            .keys()
            .all(|k| ["native", "nothing", "unchanged"].contains(&k.as_str())),
        "{by_form}"
    );
    let transfers: u64 = ["iretq", "sysretq", "sysretl"]
        .iter()
        .flat_map(|op| op_counts(r, op))
        .map(|(_, n)| n)
        .sum();
    assert!(
        calls.get("unchanged").and_then(Value::as_u64).unwrap_or(0) <= transfers,
        "{by_form}"
    );
    let natives = by_form["native"].as_object().expect("native-form sites");
    assert!(
        natives.keys().all(|k| k == "unchanged" || k == "nothing"),
        "{by_form}"
    );
    assert_eq!(num(r, "patch.fallbacks"), 0);
    assert_eq!(r["traps"]["pass_ran"], true);
    assert_eq!(r["traps"]["emulation"], "ok");
    assert!(num(r, "traps.bench_sites_trapped") > 0);
}

#[test]
fn native_without_the_hypervisor_bit() {
    let Some((_, r)) = boot("native", &config("native"), guest()) else {
        return;
    };
    assert_eq!(text(&r, "backend.name"), "native");
    assert_eq!(r["backend"]["hypervisor_bit"], false);
    passed_under_tcg(&r);
    patched_plainly(&r);
    all_sites_of(&r, "io_delay", NATIVE);
}

#[test]
fn tcg() {
    let Some((_, r)) = boot("tcg", &config("tcg"), guest()) else {
        return;
    };
    assert_eq!(text(&r, "backend.name"), "tcg");
    assert_eq!(text(&r, "backend.signature"), "TCGTCGTCGTCG");
    patched_plainly(&r);
    passed_under_tcg(&r);
    all_sites_of(&r, "io_delay", NATIVE);
}

#[test]
fn tcg_with_vmwares_backdoor() {
    let Some((_, r)) = boot("tcg-vmport", &config("tcg-vmport"), guest()) else {
        return;
    };
    assert_eq!(text(&r, "backend.name"), "vmware");
    assert!(r["backend"]["vmware_version"].is_u64(), "{}", r["backend"]);
    patched_plainly(&r);
    passed_under_tcg(&r);
    all_sites_of(&r, "io_delay", &["nothing"]);
}

#[test]
fn kvm() {
    let Some((_, r)) = boot("kvm", &config("kvm"), guest()) else {
        return;
    };
    assert_eq!(text(&r, "backend.name"), "kvm");
    assert_eq!(text(&r, "backend.signature"), "KVMKVMKVM...");
    // KVM_FEATURE_NOP_IO_DELAY (bit 1 of CPUID 0x40000001.EAX), which QEMU sets by default.
    let features =
        u64::from_str_radix(text(&r, "backend.features").trim_start_matches("0x"), 16).unwrap();
    assert_ne!(features & 2, 0, "KVM does not offer NOP_IO_DELAY here");
    patched_plainly(&r);
    // xsetbv runs, or is skipped for what the probe boot saw (never for the signature alone).
    let x = r["selftests"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "xsetbv"))
        .expect("the xsetbv self-test");
    assert!(
        x["result"] == "pass" || text(x, "why").contains("probe boot"),
        "xsetbv: {x}"
    );
    all_sites_of(&r, "io_delay", &["nothing"]);
}

#[test]
fn kvm_with_vmwares_backdoor() {
    let Some((_, r)) = boot("kvm-vmport", &config("kvm-vmport"), guest()) else {
        return;
    };
    assert_eq!(text(&r, "backend.name"), "vmware");
    assert!(r["backend"]["vmware_version"].is_u64(), "{}", r["backend"]);
    patched_plainly(&r);
    all_sites_of(&r, "io_delay", &["nothing"]);
}

/// What the demo ROM makes of the guest.
fn patched_by_the_demo_rom(r: &Value) {
    assert_eq!(text(r, "backend.name"), "rom");
    assert_eq!(text(r, "rom.name"), "pvpatch-demo");
    assert_eq!(r["rom"]["refused"], Value::Null);
    assert_eq!(r["patch"]["applied"], true);
    all_sites_of(r, "io_delay", &["nothing"]);
    all_sites_of(r, "wbinvd", &["call"]);
    assert!(
        op_counts(r, "cli").iter().any(|(k, _)| k == "inline"),
        "cli: {:?}",
        op_counts(r, "cli")
    );
    assert!(outcome(r, "inline") > 0 && outcome(r, "call") > 0);
    assert_eq!(r["traps"]["emulation"], "ok");
}

#[test]
fn rom_published_through_fw_cfg() {
    let c = harness::with_rom(config("tcg"), demo_rom(), "rom");
    let Some((_, r)) = boot("rom", &c, guest()) else {
        return;
    };
    patched_by_the_demo_rom(&r);
}

#[test]
fn rom_published_through_fw_cfg_under_kvm() {
    let c = harness::with_rom(config("kvm"), demo_rom(), "kvm-rom");
    let Some((_, r)) = boot("kvm-rom", &c, guest()) else {
        return;
    };
    patched_by_the_demo_rom(&r);
}

#[test]
fn command_line_override() {
    let mut c = config("tcg");
    c.qemu.append = Some("quiet pvpatch.backend=vmware".into());
    let Some((_, r)) = boot("override-vmware", &c, guest()) else {
        return;
    };
    assert_eq!(text(&r, "backend.name"), "vmware");
    assert_eq!(r["backend"]["overridden"], true);
    all_sites_of(&r, "io_delay", &["nothing"]);

    c.qemu.append = Some("pvpatch.backend=none".into());
    let Some((b, r)) = boot("override-none", &c, guest()) else {
        return;
    };
    assert_eq!(r["patch"]["applied"], false);
    assert!(text(&r, "patch.refused").contains("disabled"));
    assert!(b.messages().contains("patched nothing"), "{}", b.serial);
}

// ---------------------------------------------------------------------------------------------
// Broken site tables

/// A copy of the annotated guest, named `name`, whose sealed table `f` rewrote in place.
fn with_table(
    name: &str,
    f: impl FnOnce(&mut [u8], u64, &[patch_sites::table::AddrRange]),
) -> PathBuf {
    let src = guest();
    let img = pvpatch::load::image::Image::open(src).expect("the annotated guest opens");
    let s = img
        .section(SEALED_SECTION)
        .expect("the guest is annotated")
        .clone();
    let mut bytes = img.bytes().to_vec();
    let range = s.offset as usize..(s.offset + s.size) as usize;
    f(&mut bytes[range], s.addr, &img.code_ranges());
    let out = src.with_extension(format!("table-{name}"));
    harness::write_file(&out, &bytes).expect("write the broken guest");
    out
}

/// The sites of a sealed table, rewritten by `edit`, sealed again with a correct checksum: a
/// table that is well formed but wrong.
fn resealed(
    edit: impl FnOnce(&mut Vec<Site>),
) -> impl FnOnce(&mut [u8], u64, &[patch_sites::table::AddrRange]) {
    move |bytes, addr, code| {
        let mut sites: Vec<Site> = SiteTable::parse_contiguous(bytes, addr, code)
            .expect("the guest's table is valid")
            .sites()
            .collect();
        edit(&mut sites);
        write_sealed_table(&sites, addr, bytes).expect("reseal");
    }
}

/// Boots a guest whose table must be refused, and checks it patched nothing, said why, and
/// passed natively.
fn refuses_table(test: &str, kernel: &Path, why: &str) {
    let Some((b, r)) = boot(test, &config("tcg"), kernel) else {
        return;
    };
    assert_eq!(r["patch"]["applied"], false, "{}", r["patch"]);
    let refused = text(&r, "patch.refused");
    assert!(
        refused.contains(why),
        "refused for {refused:?}, expected {why:?}"
    );
    assert!(
        b.messages()
            .contains(&format!("pvguest: patched nothing: {refused}")),
        "{}",
        b.serial
    );
    // The trap pass is refused too: no site was ever touched.
    assert_eq!(r["traps"]["pass_ran"], false);
}

#[test]
fn corrupted_site_table_is_refused() {
    // One bit of one record flipped: the checksum catches it.
    let k = with_table("bitflip", |t, _, _| t[32 + 24 * 7 + 9] ^= 0x10);
    refuses_table("table-bitflip", &k, "checksum");
}

#[test]
fn site_outside_the_text_is_refused() {
    // A well-formed, checksummed record whose site lies 1 MiB past the kernel's text.
    let k = with_table(
        "outside",
        resealed(|sites| {
            let last = sites.last_mut().expect("sites");
            last.addr += 0x10_0000;
        }),
    );
    refuses_table("table-outside", &k, "outside");
}

#[test]
fn record_naming_the_wrong_instruction_is_refused() {
    // A `cli` site recorded as `hlt`: well formed, checksummed, and a lie the planner catches
    // by decoding the site before writing anything.
    let k = with_table(
        "lie",
        resealed(|sites| {
            let s = sites
                .iter_mut()
                .rev()
                .find(|s| s.op() == Some(Op::Cli) && s.insn_len == 1)
                .expect("a cli site");
            s.op_id = Op::Hlt.id();
        }),
    );
    refuses_table("table-lie", &k, "record");
}

// ---------------------------------------------------------------------------------------------
// Hostile ROMs

/// Writes a ROM of `entries` serving `signature` (all zero: any hypervisor), `damage`d after.
fn hostile_rom(
    name: &str,
    signature: [u8; 12],
    entries: &[RomEntrySpec<'_>],
    damage: impl FnOnce(&mut Vec<u8>),
) -> PathBuf {
    let mut buf = vec![0u8; rom_size(entries)];
    write_rom("hostile", signature, entries, &mut buf).expect("a structurally valid ROM");
    damage(&mut buf);
    let out = guest().with_extension(format!("rom-{name}"));
    harness::write_file(&out, &buf).expect("write the ROM");
    out
}

/// Every entry but the hostile one is fine: the ROM must still be refused whole.
fn with_good_entries(bad: RomEntrySpec<'static>) -> Vec<RomEntrySpec<'static>> {
    vec![
        RomEntrySpec::new(Op::IoDelay, RomKind::Nothing, &[]),
        bad,
        RomEntrySpec::new(Op::Sti, RomKind::Inline, &[0xfb]),
    ]
}

fn refuses_rom(test: &str, rom: &Path, why: &str) {
    let c = harness::with_rom(config("tcg"), rom, "hostile-rom");
    let Some((b, r)) = boot(test, &c, guest()) else {
        return;
    };
    let refused = r["rom"]["refused"]
        .as_str()
        .unwrap_or_else(|| panic!("the ROM was not refused: {}", r["rom"]));
    assert!(
        refused.contains(why),
        "refused for {refused:?}, expected {why:?}"
    );
    assert_eq!(r["patch"]["applied"], false);
    assert!(
        b.messages()
            .contains("pvguest: patched nothing: backend ROM refused"),
        "{}",
        b.serial
    );
    assert_eq!(r["traps"]["pass_ran"], false);
}

#[test]
fn rom_template_too_long_for_some_sites_leaves_them_native() {
    // Two bytes for cli, whose raw sites have one: room is the planner's business, not the
    // ROM's (a stock kernel has one-byte sites everywhere). The ROM is used; the sites too
    // small for its template stay native, counted as fallbacks.
    let rom = hostile_rom(
        "too-long",
        [0; 12],
        &with_good_entries(RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0x90, 0xfa])),
        |_| {},
    );
    let test = "rom-too-long";
    let c = harness::with_rom(config("tcg"), &rom, "rom-too-long");
    let Some((b, r)) = boot(test, &c, guest()) else {
        return;
    };
    assert!(r["rom"]["refused"].is_null(), "{}", r["rom"]);
    assert_eq!(r["patch"]["applied"], true, "{}", b.serial);
    assert!(
        r["patch"]["fallbacks"].as_u64().unwrap_or(0) > 0,
        "{}",
        r["patch"]
    );
}

#[test]
fn rom_template_jumping_out_is_refused() {
    let rom = hostile_rom(
        "jumps-out",
        [0; 12],
        &with_good_entries(RomEntrySpec::new(Op::Cpuid, RomKind::Inline, &[0xeb, 0x40])),
        |_| {},
    );
    refuses_rom("rom-jumps-out", &rom, "branches outside its own bytes");
}

#[test]
fn rom_undecodable_template_is_refused() {
    let rom = hostile_rom(
        "undecodable",
        [0; 12],
        &with_good_entries(RomEntrySpec::new(Op::Cpuid, RomKind::Inline, &[0x0f, 0x04])),
        |_| {},
    );
    refuses_rom("rom-undecodable", &rom, "does not decode");
}

#[test]
fn rom_template_clobbering_a_register_is_refused() {
    // `xor esi, esi` for cpuid: two bytes, fits every cpuid site, and corrupts rsi (and the
    // flags) behind the kernel's back.
    let rom = hostile_rom(
        "clobbers",
        [0; 12],
        &with_good_entries(RomEntrySpec::new(Op::Cpuid, RomKind::Inline, &[0x31, 0xf6])),
        |_| {},
    );
    refuses_rom("rom-clobbers", &rom, "writes rsi");
}

#[test]
fn rom_with_wrong_checksum_is_refused() {
    let rom = hostile_rom(
        "checksum",
        [0; 12],
        &with_good_entries(RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0xfa])),
        |b| {
            let last = b.len() - 1;
            b[last] ^= 0x01;
        },
    );
    refuses_rom("rom-checksum", &rom, "checksum");
}

#[test]
fn rom_with_a_hypervisor_call_is_refused() {
    // vmcall would hang this host's vCPU: it must never be reached.
    let rom = hostile_rom(
        "vmcall",
        [0; 12],
        &with_good_entries(RomEntrySpec::new(
            Op::Wbinvd,
            RomKind::Call,
            &[0x0f, 0x01, 0xc1, 0xc3],
        )),
        |_| {},
    );
    refuses_rom("rom-vmcall", &rom, "hypervisor call");
}

#[test]
fn rom_for_another_hypervisor_is_refused() {
    let rom = hostile_rom(
        "xen",
        *b"XenVMMXenVMM",
        &with_good_entries(RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0xfa])),
        |_| {},
    );
    refuses_rom("rom-other-hypervisor", &rom, "another hypervisor");
}

#[test]
fn truncated_rom_is_refused() {
    let rom = hostile_rom(
        "truncated",
        [0; 12],
        &with_good_entries(RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0xfa])),
        |b| b.truncate(40),
    );
    refuses_rom("rom-truncated", &rom, "truncated ROM header: 40 bytes");
}

// ---------------------------------------------------------------------------------------------
// Real Xen: the guest as a 64-bit PV dom0 of Debian's Xen 4.17, nested in QEMU's TCG

/// Ops whose native instruction is silently wrong in a PV kernel (the runtime's `MustRewrite`
/// rule for Xen): every site of them must become a call.
const XEN_MUST_REWRITE: [Op; 7] = [
    Op::Cli,
    Op::Sti,
    Op::Pushf,
    Op::Popf,
    Op::SaveFl,
    Op::RestoreFl,
    Op::SafeHalt,
];

/// The annotated guest with its table resealed so that it holds one site of the ops Xen needs
/// rewritten that cannot take its call (`keep_one`), or none: the raw sites of `.text.pvraw`
/// (`cli; ret`, `sti; ret`, `pushfq; pop`) have no room for one.
fn for_xen(name: &str, keep_one: Option<Op>) -> PathBuf {
    with_table(
        name,
        resealed(move |sites| {
            let mut kept = false;
            sites.retain(|s| {
                let cannot =
                    s.site_len < 5 && s.op().is_some_and(|op| XEN_MUST_REWRITE.contains(&op));
                if !cannot {
                    return true;
                }
                let keep = !kept && s.op() == keep_one;
                kept |= keep;
                keep
            });
            assert_eq!(
                kept,
                keep_one.is_some(),
                "the guest has no raw {keep_one:?} site"
            );
        }),
    )
}

/// Boots `kernel` under real Xen; `None` (after recording the skip) when this machine cannot.
fn boot_xen(test: &str, kernel: &Path, args: &str, module: Option<&Path>) -> Option<Boot> {
    if let Err(why) = harness::xen::available() {
        harness::skip(test, &why);
        return None;
    }
    let b = harness::xen::boot(kernel, args, module)
        .unwrap_or_else(|e| panic!("{test}: QEMU failed: {e}"));
    // Xen itself ran and built the guest as a PV dom0.
    assert!(
        b.serial.contains("Xen version 4.17") && b.serial.contains("Building a PV Dom0"),
        "{test}: not Xen's dom0\n{}",
        b.serial
    );
    Some(b)
}

#[test]
fn real_xen_pv_guest() {
    let kernel = for_xen("xen", None);
    let Some(b) = boot_xen("real-xen", &kernel, "", None) else {
        return;
    };
    let context = || format!("exit {:?}\n{}", b.exit_code, b.messages());
    let r = b
        .report()
        .unwrap_or_else(|| panic!("no parsable report\n{}", context()));
    assert!(b.passed(), "{}\nself-tests: {}", context(), r["selftests"]);
    assert_eq!(r["pass"], true);
    assert_eq!(r["entry"], "xen-pv");
    assert_eq!(text(&r, "backend.name"), "xen", "{}", r["backend"]);
    assert_eq!(r["backend"]["xen_pv"], true);
    // Xen's own leaves, seen through the forced-emulation prefix (plain cpuid shows TCG's).
    assert_eq!(text(&r, "backend.signature"), "XenVMMXenVMM");
    // Every site planned, and applied.
    assert_eq!(r["patch"]["applied"], true, "{}", r["patch"]);
    let sites = num(&r, "table.sites");
    let planned: u64 = r["patch"]["sites_by_outcome"]
        .as_object()
        .expect("outcomes")
        .values()
        .map(|v| v.as_u64().expect("count"))
        .sum();
    assert_eq!(planned, sites, "{}", r["patch"]);
    assert!(sites > 250, "{sites} sites");
    // Every site of the ops Xen needs rewritten became a call.
    for op in XEN_MUST_REWRITE {
        for (outcome, n) in op_counts(&r, op.name()) {
            assert_eq!(outcome, "call", "{n} {} sites {outcome} on Xen", op.name());
        }
    }
    // The self-tests by effect, through the PV paths.
    let tests = r["selftests"].as_array().expect("selftests");
    for name in ["interrupt flag", "halt", "cr3", "invlpg"] {
        let t = tests
            .iter()
            .find(|t| t["name"].as_str().is_some_and(|n| n.starts_with(name)))
            .unwrap_or_else(|| panic!("no {name} self-test: {tests:?}"));
        assert_eq!(t["result"], "pass", "{t}");
    }
    // The timer's events really arrived (the IF and halt tests count on them).
    assert!(num(&r, "xen.timer_events") >= 3, "{}", r["xen"]);
    // Trapped by Xen against patched, for every op the README's table shows.
    let rows = r["bench"].as_array().expect("bench");
    for op in ["cli;sti", "save_fl", "mov cr3", "invlpg", "hlt-wake"] {
        let row = rows
            .iter()
            .find(|x| x["op"].as_str().is_some_and(|n| n.starts_with(op)))
            .unwrap_or_else(|| panic!("no {op} row: {rows:?}"));
        for k in ["trapped", "call_unpatched", "site_patched", "call_patched"] {
            assert!(row[k].as_f64().is_some_and(|v| v > 0.0), "{op}: {k}: {row}");
        }
    }
    // What Xen emulates for a PV dom0 and what it refuses (MSR 0x3a is #GP; EFER reads).
    let msrs = r["probes"]["msrs"].as_array().expect("msrs");
    let msr = |m: &str| {
        msrs.iter()
            .find(|x| x["msr"] == m)
            .map(|x| x["value"].clone())
    };
    assert_eq!(msr("0x3a"), Some("#GP".into()), "{msrs:?}");
    assert!(msr("0xc0000080").is_some_and(|v| v != "#GP"), "{msrs:?}");
    // What Xen does with privileged instructions of a PV kernel, probed one by one: the ones
    // the Xen backend rewrites fault (Xen neither emulates `cli`/`sti`/`hlt`/`invlpg` nor lets
    // them run), control-register reads are emulated, `rdtsc` runs natively.
    let insns = r["probes"]["instructions"]
        .as_array()
        .expect("instructions");
    let outcome = |i: &str| {
        insns
            .iter()
            .find(|x| x["insn"] == i)
            .map(|x| x["outcome"].as_str().unwrap_or("?").to_owned())
            .unwrap_or_else(|| panic!("no probe of {i}: {insns:?}"))
    };
    for (i, expect) in [
        ("cli", "#GP"),
        ("sti", "#GP"),
        ("hlt", "#GP"),
        ("invlpg [rax]", "#GP"),
        ("lgdt [rax]", "#GP"),
        ("swapgs", "#GP"),
        ("mov rax, cr3", "emulated"),
        ("mov cr3, rax (the value read)", "emulated"),
        ("rdmsr (TSC)", "emulated"),
        ("rdtsc", "native"),
        ("sgdt [rax]", "native"),
    ] {
        assert_eq!(outcome(i), expect, "{i}: {insns:?}");
    }
    harness::figure(
        "real_xen_pv_guest",
        &format!(
            "real Xen: {sites} sites planned, {} rewritten; first (cold) plan {} cycles, the \
             same plan again {}, applying {}; {} upcalls; {:.1} s from QEMU's start",
            num(&r, "patch.sites_written"),
            num(&r, "patch.plan_first_cycles"),
            num(&r, "patch.plan_cycles"),
            num(&r, "patch.apply_cycles"),
            num(&r, "xen.upcalls"),
            b.elapsed.as_secs_f64()
        ),
    );
}

#[test]
fn real_xen_refuses_a_site_it_cannot_run_natively() {
    // The raw `cli; ret` of .text.pvraw: one byte, no room for a call, no detour (a `ret`
    // follows). On Xen its native form would silently do nothing: the table is refused.
    let kernel = for_xen("xen-cli", Some(Op::Cli));
    let Some(b) = boot_xen("real-xen-refused", &kernel, "", None) else {
        return;
    };
    let m = b.messages();
    assert_eq!(b.exit_code, Some(35), "the guest did not fail\n{m}");
    assert!(b.report().is_none(), "{m}");
    assert!(
        m.contains("pvguest: patched nothing: record ")
            && m.contains("the cli at")
            && m.contains("cannot take the backend's sequence"),
        "{m}"
    );
    assert!(m.contains("pvguest: text unchanged"), "{m}");
    assert!(m.contains("pvguest: refusing to run on Xen"), "{m}");
}
