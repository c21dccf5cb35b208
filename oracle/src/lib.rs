//! # pvpatch-oracle
//!
//! The rewrite-equivalence [`oracle`] (unicorn, with a virtual CPU behind the sensitive
//! instructions), its second executor on real ring-0 code under KVM ([`kvm`]), the generators of
//! the property tests ([`strategies`]) and the bodies of the oracle's fuzz targets ([`targets`]),
//! shared by the property tests in `tests/` and the cargo-fuzz targets in `../fuzz/`.
//!
//! The oracle runs code with unicorn-engine, which is GPL-2.0: this crate is for tests only,
//! and nothing shipped (the `pvpatch` tool, the runtime) depends on it.

#[cfg(target_os = "linux")]
pub mod kvm;
pub mod oracle;
pub mod strategies;
pub mod targets;

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
