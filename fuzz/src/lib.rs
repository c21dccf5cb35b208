//! # pvpatch-fuzz
//!
//! Generators for property tests of the ABI (sites, tables, ROMs), shared by the property
//! tests in `tests/` and by the cargo-fuzz targets in `cargo-fuzz/`. The rewrite-equivalence
//! oracle will live here as well.

pub mod strategies;

/// The proptest configuration every property test here uses: at least 1,000 cases (more
/// through `PROPTEST_CASES`), failures kept next to the test in `*.proptest-regressions`.
pub fn proptest_config() -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    proptest::test_runner::Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..proptest::test_runner::Config::default()
    }
}
