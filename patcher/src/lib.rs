//! # pvpatch
//!
//! The post-link tool's library: load an x86-64 ELF kernel image, find and classify every
//! sensitive instruction, read Linux's own patch tables, and write a site table into the
//! image.

pub mod analyze;
pub mod annotate;
pub mod bzimage;
pub mod catalogue;
pub mod detour;
pub mod image;
pub mod linux;
pub mod output;
pub mod report;
pub mod rom;
pub mod scan;
#[doc(hidden)]
pub mod testimg;
pub mod verify;
