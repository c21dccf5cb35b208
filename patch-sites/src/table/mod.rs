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
//! * [`write`]: sealed tables and unsealed headers written.

pub mod layout;
pub mod parse;
pub mod site;
pub mod write;

pub use layout::{RawHeader, RawRecord};
pub use parse::{Header, SiteTable, Span, TableError};
pub use site::{AddrRange, Form, RecordError, Site, decode_record};
pub use write::{WriteError, sealed_table_size, unsealed_header, write_sealed_table};

/// The first eight bytes of every table header.
pub const TABLE_MAGIC: [u8; 8] = *b"PVPSITES";
/// The only table version this reader accepts.
pub const TABLE_VERSION: u16 = 1;
/// Header size, in bytes.
pub const HEADER_SIZE: usize = 32;
/// Record size, in bytes.
pub const RECORD_SIZE: usize = 24;
/// The longest instruction x86-64 allows.
pub const MAX_INSN_LEN: u8 = 15;
/// Header flag: the table is sealed (count and checksum are valid, records are sorted).
pub const FLAG_SEALED: u16 = 1;
/// Site flag: `ins`/`outs` with a `rep` prefix.
pub const SITE_FLAG_REP: u8 = 1;
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
