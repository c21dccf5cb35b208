//! The oracle-backed fuzz targets' bodies, as tests: over the corpus kept in the repository
//! (every crash the fuzzer finds is added there and so becomes a regression test), and as a
//! property over random code built from sensitive instructions, NOPs and random bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use pvpatch_oracle::oracle::Oracle;
use pvpatch_oracle::targets::{plan_and_check, rom_validator};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = format!("{}/../fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "{dir} is empty");
    v
}

#[test]
fn plan_and_check_corpus() {
    let mut oracle = Oracle::new().unwrap();
    let mut checks = 0;
    for (name, data) in corpus("plan_and_check") {
        checks += plan_and_check(&data, &mut oracle).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        checks >= 40,
        "the seeds exercise the oracle ({checks} checks)"
    );
}

#[test]
fn rom_validator_corpus() {
    let (mut accepted, mut refused_entries) = (0, 0);
    for (name, data) in corpus("rom_validator") {
        if rom_validator(&data).unwrap_or_else(|e| panic!("{name}: {e}")) {
            accepted += 1;
        }
        if pvpatch::rom::show(&data).is_ok_and(|s| !s.refused.is_empty()) {
            refused_entries += 1;
        }
    }
    assert!(accepted >= 3, "some seeds are valid ROMs ({accepted})");
    assert!(
        refused_entries >= 1,
        "some seeds have entries the runtime refuses, for rom show to report"
    );
}

/// Code made of sensitive instructions (each in a few encodings), NOPs, and random bytes.
fn code() -> impl Strategy<Value = Vec<u8>> {
    let pieces: Vec<&'static [u8]> = vec![
        &[0xfa],
        &[0xfb],
        &[0xf4],
        &[0xfb, 0xf4],
        &[0x9c, 0x58],
        &[0x9c, 0x41, 0x5c],
        &[0x50, 0x9d],
        &[0x41, 0x57, 0x9d],
        &[0x9c],
        &[0x9d],
        &[0x0f, 0x30],
        &[0x0f, 0x32],
        &[0x0f, 0xa2],
        &[0x0f, 0x31],
        &[0x0f, 0x09],
        &[0x0f, 0x06],
        &[0x0f, 0x01, 0xf8],
        &[0x0f, 0x22, 0xd8],
        &[0x41, 0x0f, 0x20, 0xdd],
        &[0x44, 0x0f, 0x22, 0xc2],
        &[0x0f, 0x23, 0xf9],
        &[0x0f, 0x01, 0x3b],
        &[0x41, 0x0f, 0x01, 0x3e],
        &[0xe6, 0x80],
        &[0xe6, 0x71],
        &[0x66, 0xe7, 0x40],
        &[0xec],
        &[0xed],
        &[0xe4, 0x60],
        &[0x90],
        &[0x66, 0x90],
        &[0x0f, 0x1f, 0x00],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0xc3],
    ];
    proptest::collection::vec(
        prop_oneof![
            8 => proptest::sample::select(pieces).prop_map(|p| p.to_vec()),
            1 => proptest::collection::vec(any::<u8>(), 1..4),
        ],
        1..24,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(pvpatch_oracle::proptest_config())]

    #[test]
    fn plan_and_check_random_code(seed in any::<u64>(), code in code()) {
        thread_local! {
            static ORACLE: std::cell::RefCell<Oracle> =
                std::cell::RefCell::new(Oracle::new().unwrap());
        }
        let mut data = seed.to_le_bytes().to_vec();
        data.extend_from_slice(&code);
        let r = ORACLE.with(|o| plan_and_check(&data, &mut o.borrow_mut()));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}
