//! pvpatch's integration tests: one binary, a module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bzimage_input;
mod cli;
mod golden;
mod guest;
mod hostile;
mod kallsyms;
mod kernel;
mod kernels;
mod malformed;
mod rom;
mod schema;
mod shim;
mod stock;
mod stock_props;
mod streamed;
mod tables;
mod usability;
