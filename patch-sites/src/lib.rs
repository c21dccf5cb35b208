//! # patch-sites: the pvpatch ABI
//!
//! What the post-link tool (`pvpatch`), the boot-time runtime (`pvpatch-runtime`) and the tests
//! share, with no dependencies and no allocation, usable from a `no_std` kernel:
//!
//! * [`op`]: the op catalogue, every sensitive operation with a stable id, its operand forms,
//!   inputs, outputs and what it may leave undefined;
//! * [`table`]: the versioned site table (header + 24-byte records with self-relative offsets),
//!   parsed without trusting any count, length or offset, and written;
//! * [`rom`]: the backend-ROM format, version 1, parsed and written;
//! * [`outcome`]: what a site becomes, the vocabulary every report uses;
//! * [`shim`]: the boot shim's parameters and report, and its edit of the PVH memory map;
//! * [`prepared`]: plans prepared at link time for the boot shim, as lists of changes;
//! * [`macros`]: source-level annotation macros that emit a patchable site and its record;
//! * [`regs`]: registers and register/flag sets; [`crc32`]: the checksum both formats use.
//!
//! The byte layouts are documented in `docs/abi.md`; `const` assertions pin them here.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

pub mod crc32;
mod le;
pub mod macros;
pub mod op;
pub mod outcome;
pub mod prepared;
pub mod regs;
pub mod rom;
pub mod shim;
pub mod table;

pub use op::{ALL_OPS, Op, Operand};
pub use outcome::Outcome;
pub use regs::{Gpr, RegSet};
pub use rom::{Rom, RomAction, RomEntry, RomError, RomKind};
pub use table::{AddrRange, Form, Header, Site, SiteTable, TableError};
