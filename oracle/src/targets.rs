//! The bodies of the fuzz targets that need the oracle or the runtime's checks, here so that
//! the property tests and the regression tests over the kept corpus run the very same code as
//! `cargo xtask fuzz`.

use patch_sites::rom::Rom;
use patch_sites::table::{AddrRange, Site, SiteTable, sealed_table_size, write_sealed_table};
use patch_sites::{Gpr, Op, Operand};
use pvpatch::scan_image;
use pvpatch::sweep::Options;
use pvpatch_runtime::backend::{Backend, Choice, LoadedRom};
use pvpatch_runtime::detect::{BackendKind, Detected, KVM_FEATURE_NOP_IO_DELAY};
use pvpatch_runtime::plan;
use pvpatch_runtime::romcheck;

use crate::oracle::{self, Case, Oracle, SITE, State, vcpu::mix};

/// Arbitrary code bytes (after an 8-byte seed) as the `.text` of a kernel: the post-link tool
/// scans it; every site it would record whose op the oracle runs is planned for every built-in
/// backend, and as a trap, and each rewrite is checked by the oracle from a state derived from
/// the seed. `Ok` with the number of checks, or the first divergence.
pub fn plan_and_check(data: &[u8], oracle: &mut Oracle) -> Result<usize, String> {
    let Some((seed, code)) = data.split_first_chunk::<8>() else {
        return Ok(0);
    };
    let seed = u64::from_le_bytes(*seed);
    let Ok(img) = pvpatch::load::image::Image::from_bytes(
        "fuzz",
        pvpatch_testkit::elf::build(code, &[], &[]),
    ) else {
        return Ok(0);
    };
    let report = scan_image(&img, Options { threads: 1 }, None);
    let mut checks = 0;
    for s in report.analysis.sites.iter().filter(|s| s.patchable()) {
        let mut site = pvpatch::annotate::record_for(s);
        let Some(op) = site.op() else { continue };
        if oracle::not_covered(op).is_some() || site.site_len == 0 {
            continue;
        }
        // A memory operand the record cannot describe ([rax+rbx*2-...]) cannot be aimed at
        // the state's pages: an op that reads or writes through it would fault natively.
        let touches_memory = matches!(
            op,
            Op::Lgdt
                | Op::Lidt
                | Op::Sgdt
                | Op::Sidt
                | Op::Lldt
                | Op::Ltr
                | Op::Sldt
                | Op::Str
                | Op::Smsw
                | Op::Invpcid
        );
        if touches_memory && site.operand == Operand::MemOther {
            continue;
        }
        let Some(bytes) = img.read(site.addr, site.site_len as usize) else {
            continue;
        };
        site.addr = SITE;
        let case = Case {
            site,
            text: bytes.to_vec(),
            reference: bytes.to_vec(),
            around: Vec::new(),
        };
        let gpr: [u64; 16] = core::array::from_fn(|i| mix(seed ^ (i as u64) << 56));
        let state = State::for_site(&site, gpr, mix(seed ^ 0xf1a6), mix(seed));
        for (kind, features) in [
            (BackendKind::Native, 0),
            (BackendKind::Tcg, 0),
            (BackendKind::Kvm, KVM_FEATURE_NOP_IO_DELAY),
            (BackendKind::Vmware, 0),
        ] {
            let b = oracle::backend(kind, features, None);
            for force in [None, Some(Choice::Trap)] {
                let (_, verdict) = oracle
                    .check(&case, &b, None, force, &state)
                    .map_err(|e| format!("{op}: {e}"))?;
                verdict.map_err(|d| d.to_string())?;
                checks += 1;
            }
        }
    }
    Ok(checks)
}

/// A table of representative sites (each op the ROM library serves, with 8 bytes of room) and
/// the text that holds them.
fn representative_sites() -> (Vec<Site>, Vec<u8>) {
    let base = SITE;
    let mut text = Vec::new();
    let mut sites = Vec::new();
    let shapes = [
        (Op::Cli, Operand::None, 0),
        (Op::Sti, Operand::None, 0),
        (Op::Hlt, Operand::None, 0),
        (Op::SafeHalt, Operand::None, 0),
        (Op::Pushf, Operand::None, 8),
        (Op::Popf, Operand::None, 8),
        (Op::SaveFl, Operand::Reg(Gpr::Rax), 8),
        (Op::RestoreFl, Operand::Reg(Gpr::Rdi), 8),
        (Op::Rdmsr, Operand::None, 0),
        (Op::Wrmsr, Operand::None, 0),
        (Op::Cpuid, Operand::None, 0),
        (Op::Rdtsc, Operand::None, 0),
        (Op::Wbinvd, Operand::None, 0),
        (Op::Swapgs, Operand::None, 0),
        (Op::Clts, Operand::None, 0),
        (Op::Invlpg, Operand::MemBase(Gpr::Rbx), 0),
        (Op::Out, Operand::PortImm(0x71), 1),
        (Op::In, Operand::PortDx, 1),
        (Op::IoDelay, Operand::PortImm(0x80), 1),
        (Op::MovToCr3, Operand::Reg(Gpr::Rax), 8),
        (Op::MovFromCr3, Operand::Reg(Gpr::R12), 8),
        (Op::MovToCr8, Operand::Reg(Gpr::Rcx), 8),
    ];
    for (op, operand, width) in shapes {
        if let Some(c) = Case::native(op.id(), operand, width, 0, 8) {
            let mut site = c.site;
            site.addr = base + text.len() as u64;
            text.extend_from_slice(&c.text);
            sites.push(site);
        }
    }
    (sites, text)
}

/// Arbitrary bytes as a backend ROM through the runtime's validator: it never panics, and a
/// ROM it accepts for a table plans every site of that table (no sequence the planner builds
/// from it fails to decode as intended). `Ok(true)` if the ROM was accepted.
///
/// `pvpatch rom show` runs on the same bytes: it prints exactly the ROMs the parser accepts,
/// and says, per entry, what the runtime's own checks would refuse ([`romcheck::validate_entry`]
/// for each entry, agreeing with [`romcheck::validate_code`]).
pub fn rom_validator(data: &[u8]) -> Result<bool, String> {
    let shown = pvpatch::rom::show(data);
    let Ok(rom) = Rom::parse(data) else {
        if shown.is_ok() {
            return Err("rom show printed a ROM the parser refuses".into());
        }
        return Ok(false);
    };
    let shown = shown.map_err(|e| format!("rom show refused a ROM the parser accepts: {e}"))?;
    let code = romcheck::validate_code(&rom);
    if shown.refused.first().map(|r| r.1) != code.err() {
        return Err(format!(
            "rom show reports {:?}, the runtime's validate_code {code:?}",
            shown.refused
        ));
    }
    if shown.text.matches("\n    refused: ").count() != shown.refused.len() {
        return Err(format!(
            "rom show does not print a refusal line per refused entry:\n{}",
            shown.text
        ));
    }
    let code_ok = code.is_ok();
    let (sites, text) = representative_sites();
    let table_addr = SITE + 0x1_0000;
    let mut buf = vec![0u8; sealed_table_size(sites.len())];
    write_sealed_table(&sites, table_addr, &mut buf).map_err(|e| format!("{e:?}"))?;
    let range = AddrRange::new(SITE, SITE + text.len() as u64);
    let table = SiteTable::parse_contiguous(&buf, table_addr, &[range])
        .map_err(|e| format!("the representative table: {e}"))?;
    if romcheck::validate(&rom, &[0; 12], &table).is_err() {
        return Ok(false);
    }
    if !code_ok {
        return Err("validate accepted a ROM that validate_code refuses".into());
    }
    let backend = Backend {
        detected: Detected::assumed(BackendKind::Rom, 0),
        rom: Some(LoadedRom {
            rom,
            base: oracle::ROM,
        }),
        pv: None,
        thunks: None,
    };
    // Planned whole: every site gets the ROM's sequence or its native fallback.
    let planned = plan::plan(&table, &backend, &oracle::SiteText(SITE, &text), None)
        .map_err(|e| format!("a validated ROM does not plan: {e}"))?;
    if planned.sites.len() != sites.len() {
        return Err("the plan lost sites".into());
    }
    Ok(true)
}
