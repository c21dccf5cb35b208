//! The site table: a header, then fixed-size records, all little-endian.
//!
//! The byte layout is in `docs/abi.md`; the `const` assertions below pin it. Every offset in the
//! table is *self-relative* (the address of the field plus its value), so a table needs no
//! relocation wherever the kernel is loaded.
//!
//! Parsing never panics and trusts nothing: [`Header::parse`] checks the header alone, then
//! [`SiteTable::parse`] checks the records' extent, the checksum of a sealed table and every
//! record before anything is handed out. A site whose op id this reader does not know is kept
//! (it must still be well formed and must not overlap others) and reported by
//! [`Site::op`] as `None`: a patcher leaves it native.

//!
//! * [`layout`]: the header and record as they lie in memory, pinned by `const` assertions;
//! * [`site`]: a record decoded into a [`Site`], and a site encoded into a record;
//! * [`parse`]: a whole table validated ([`Header`], [`SiteTable`]);
//! * [`write`]: sealed tables and unsealed headers written;
//! * [`detours`]: version 2's load-time detours and arena, for stock kernels.

pub mod detours;
pub mod layout;
pub mod parse;
pub mod site;
pub mod write;

pub use detours::{Detour, DetourArea, DetourError, Member};
pub use layout::{RawHeader, RawHeaderExt, RawRecord};
pub use parse::{Header, SiteTable, Span, TableError};
pub use site::{AddrRange, Form, RecordError, Site, decode_record};
pub use write::{
    DetourSpec, MemberSpec, WriteError, sealed_table_size, sealed_table_size_with, unsealed_header,
    write_sealed_table, write_sealed_table_with,
};

/// The first eight bytes of every table header.
pub const TABLE_MAGIC: [u8; 8] = *b"PVPSITES";
/// Table version 1: a header and records.
pub const TABLE_VERSION: u16 = 1;
/// Table version 2: version 1 with a detour area and an arena ([`detours`]), for stock kernels.
pub const TABLE_VERSION_DETOURS: u16 = 2;
/// Header size of version 1, in bytes.
pub const HEADER_SIZE: usize = 32;
/// Header size of version 2, in bytes.
pub const HEADER_SIZE_V2: usize = 64;
/// Detour descriptor size, in bytes.
pub const DETOUR_SIZE: usize = 24;
/// Member size, in bytes.
pub const MEMBER_SIZE: usize = 8;
/// Record size, in bytes.
pub const RECORD_SIZE: usize = 24;
/// The longest instruction x86-64 allows.
pub const MAX_INSN_LEN: u8 = 15;
/// Header flag: the table is sealed (count and checksum are valid, records are sorted).
pub const FLAG_SEALED: u16 = 1;
/// Site flag: `ins`/`outs` with a `rep` prefix.
pub const SITE_FLAG_REP: u8 = 1;
/// Site flag: the site may run with no usable stack (Linux's entry code, before it switches to
/// the kernel's stack or while `rsp` is a scratch register): a rewrite may neither call nor
/// push, and no trap is taken there. Its rewrite is the native instruction, nothing, or an
/// inline sequence that does not touch the stack.
pub const SITE_FLAG_NO_STACK: u8 = 2;
/// The name of the section that linkers gather records into.
pub const RECORD_SECTION: &str = "pv_sites";
/// The name of the section that holds the header of a linker-gathered table.
pub const HEADER_SECTION: &str = "pv_sites_header";
/// The global symbol of a linker-gathered table's header.
pub const HEADER_SYMBOL: &str = "pvpatch_site_table";
/// The name of the section the post-link tool writes a sealed table into.
pub const SEALED_SECTION: &str = ".pvpatch_sites";
/// A sealed table written by the post-link tool starts on this boundary, at the first one at or
/// after the end of the image's highest loadable segment.
pub const SEALED_ALIGN: u64 = 4096;
