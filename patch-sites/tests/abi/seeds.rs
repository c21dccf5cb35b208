//! The seed corpora of the cargo-fuzz targets (`fuzz/corpus/`) are this crate's fixtures,
//! written by the ABI's own writers: the documented example table and ROM ([`super::doc`]),
//! the sample sites and ROM the other tests corrupt ([`super::table`], [`super::rom`]), the
//! sample sites in every form, an unsealed table, and prepared plans for the boot shim. This test fails when a seed is not what
//! the fixtures write; `cargo xtask test-update` (which sets `PVPATCH_UPDATE=1`) rewrites them.

use std::path::{Path, PathBuf};

use patch_sites::table::{self, Form, Site, sealed_table_size, write_sealed_table};

use super::table::{TABLE_ADDR, TEXT, sample_sites};

fn sealed(sites: &[Site]) -> Vec<u8> {
    let mut buf = vec![0u8; sealed_table_size(sites.len())];
    write_sealed_table(sites, TABLE_ADDR, &mut buf).expect("valid sites");
    buf
}

/// The sample sites, one in each form the ABI has (a detour with its stub).
fn every_form() -> Vec<Site> {
    let mut sites = sample_sites();
    sites[1].form = Form::IndirectCall;
    sites[1].site_len = 6;
    sites[1].insn_len = 6;
    sites[2].form = Form::Trap;
    sites[3].form = Form::Detour;
    sites[3].site_len = 5;
    sites[3].stub = Some(TEXT.start + 0x4000);
    sites
}

/// An unsealed (linker-gathered) table: header, then records, no count or checksum.
fn unsealed(sites: &[Site]) -> Vec<u8> {
    let begin = TABLE_ADDR + table::HEADER_SIZE as u64;
    let end = begin + (sites.len() * table::RECORD_SIZE) as u64;
    let mut buf = table::unsealed_header(TABLE_ADDR, begin, end)
        .expect("header")
        .to_vec();
    for (i, s) in sites.iter().enumerate() {
        let at = begin + (i * table::RECORD_SIZE) as u64;
        buf.extend_from_slice(&s.to_raw(at).expect("record").to_bytes());
    }
    buf
}

/// Prepared plans for the sample table: one that changes nothing, and kvm's with a site and a
/// piece of code.
fn plans() -> Vec<u8> {
    use patch_sites::prepared::{Change, PlanSpec, PlanSummary, plans_size, write_plans};
    let changes = [
        Change {
            index: 1,
            addr: TEXT.start + 0x10,
            old: &[0xe6, 0x80],
            new: &[0x66, 0x90],
        },
        Change {
            index: u32::MAX,
            addr: TEXT.start + 0x4000,
            old: &[0xcc; 4],
            new: &[0x0f, 0x01, 0xc1, 0xc3],
        },
    ];
    let mut kvm = PlanSummary::new("kvm");
    (kvm.features_mask, kvm.features_value, kvm.rewritten) = (2, 2, 1);
    let specs = [
        PlanSpec {
            summary: PlanSummary::new("native"),
            changes: &[],
        },
        PlanSpec {
            summary: kvm,
            changes: &changes,
        },
    ];
    let mut out = vec![0u8; plans_size(&specs)];
    write_plans(&sealed(&sample_sites()), &specs, &mut out).expect("the plans fit");
    out
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn the_fuzz_seeds_are_the_fixtures() {
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("site_table/seed-example", super::doc::example_table()),
        ("site_table/seed-sample", sealed(&sample_sites())),
        ("site_table/seed-every-form", sealed(&every_form())),
        ("site_table/seed-unsealed", unsealed(&sample_sites()[..2])),
        ("rom/seed-example", super::doc::example_rom()),
        ("rom/seed-sample", super::rom::sample()),
        ("rom_validator/seed-sample", super::rom::sample()),
        ("prepared_plans/seed-sample", plans()),
    ];
    let update = std::env::var_os("PVPATCH_UPDATE").is_some();
    for (name, bytes) in seeds {
        let path = corpus().join(name);
        if update {
            std::fs::write(&path, &bytes).expect("write the seed");
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} is not what the fixtures write (PVPATCH_UPDATE=1 rewrites it)",
            path.display()
        );
    }
}
