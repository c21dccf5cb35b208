//! Criterion benchmarks. `cargo bench -p pvpatch-benches` runs them all.

// A benchmark whose input cannot be built has nothing to measure: failing loudly is right.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use patch_sites::table::{AddrRange, SiteTable, sealed_table_size, write_sealed_table};
use pvpatch_benches::synthetic_sites;

const TABLE_ADDR: u64 = 0xffff_ffff_8400_0000;
const TEXT: AddrRange = AddrRange::new(0xffff_ffff_8100_0000, 0xffff_ffff_8300_0000);

/// A Linux-scale table (10^4 sites, the order of a distro kernel's patch sites): validating it
/// is what the runtime does at boot before writing anything.
fn abi(c: &mut Criterion) {
    let sites = synthetic_sites(10_000);
    let mut buf = vec![0u8; sealed_table_size(sites.len())];
    write_sealed_table(&sites, TABLE_ADDR, &mut buf).expect("valid");
    let mut g = c.benchmark_group("abi");
    g.throughput(Throughput::Elements(sites.len() as u64));
    g.bench_function("parse_and_validate_10k_sites", |b| {
        b.iter(|| {
            let t = SiteTable::parse_contiguous(std::hint::black_box(&buf), TABLE_ADDR, &[TEXT]);
            t.map(|t| t.len()).unwrap_or(0)
        })
    });
    let mut out = vec![0u8; buf.len()];
    g.bench_function("write_10k_sites", |b| {
        b.iter(|| write_sealed_table(std::hint::black_box(&sites), TABLE_ADDR, &mut out))
    });
    g.finish();
}

criterion_group!(benches, abi);
criterion_main!(benches);
