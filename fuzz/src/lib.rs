//! # pvpatch-fuzz
//!
//! Generators for property tests of the ABI (sites, tables, ROMs), shared by the property
//! tests in `tests/` and by the cargo-fuzz targets in `cargo-fuzz/`. The rewrite-equivalence
//! oracle will live here as well.

pub mod strategies;
