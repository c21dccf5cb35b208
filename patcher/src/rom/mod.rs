//! Backend ROMs: `pvpatch rom build` assembles a ROM from a readable description, and
//! `pvpatch rom show` prints one, saying per entry what the runtime would refuse.
//!
//! A description (TOML) names the backend, the CPUID signature it serves, and per op what its
//! sites become: `nothing`, `native`, an `inline` template or a `call` to an entry point, both
//! named from a library of sequences assembled with dynasmrt (`pvpatch rom sequences` lists
//! them, with their assembly and operand slots):
//!
//! ```toml
//! name = "pvpatch-demo"
//! signature = "any"            # or CPUID 0x40000000's, e.g. "Microsoft Hv", "KVMKVMKVM"
//!
//! [[entry]]
//! op = "io_delay"
//! kind = "nothing"
//!
//! [[entry]]
//! op = "mov_to_cr3"
//! kind = "inline"
//! sequence = "mov_to_cr3"
//! clobbers = ["flags"]
//!
//! [[entry]]
//! op = "wbinvd"
//! kind = "call"
//! sequence = "wbinvd_ret"
//! ```
//!
//! The ROM built is checked exactly as the runtime will check it (structure, then every
//! template and entry point decoded), and, given the kernel it is for, against every site of
//! that kernel's table.

pub mod build;
pub mod library;
pub mod show;

pub use build::{RomBuildError, build, build_for};
pub use library::{Sequence, library};
pub use show::{Shown, show};
