//! Loading a kernel image: an x86-64 ELF file read (or mapped) and checked
//! ([`image::Image`]), and the ELF `vmlinux` inside a bzImage ([`bzimage`]).

pub mod bzimage;
pub mod image;
pub mod kallsyms;

pub use image::{Image, ImageError, Section, Segment, Symbol, SymbolSource};
