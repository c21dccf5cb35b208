//! The ABI's integration tests: one binary, a module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod detours;
mod doc;
mod linked;
mod rom;
mod seeds;
mod table;
