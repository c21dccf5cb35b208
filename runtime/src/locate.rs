//! Finding the site table in the running kernel's memory.
//!
//! A kernel that uses the annotation macros has a linker-gathered table: its header is the
//! symbol `pvpatch_site_table` (emitted by `pv_site_table_header!`), and the header's
//! self-relative fields point at the records the linker gathered. This is the only module of
//! the crate that forms slices from raw addresses.

use alloc::vec;

use patch_sites::table::{
    AddrRange, HEADER_SIZE, Header, RECORD_SIZE, SiteTable, Span, TableError,
};

/// Parses and validates the table whose header is at `header`, against the kernel's code
/// ranges `text`. Nothing is trusted: the header is checked before the records' extent is
/// used, and every record before the table is returned.
///
/// # Safety
///
/// `header` must point at [`HEADER_SIZE`] readable bytes, and, if they hold a valid header,
/// the records' extent it names must be readable for as long as the returned table is used
/// (for a linker-gathered table: the `pv_sites` section of the running kernel).
pub unsafe fn table_at(
    header: *const u8,
    text: &[AddrRange],
) -> Result<SiteTable<'static>, TableError> {
    // SAFETY: the caller guarantees HEADER_SIZE readable bytes at `header`.
    let hb = unsafe { core::slice::from_raw_parts(header, HEADER_SIZE) };
    let h = Header::parse(hb, header as u64)?;
    let len = usize::try_from(h.records_len()).map_err(|_| TableError::BadExtent)?;
    // SAFETY: the header is valid, so the caller guarantees its record extent is readable;
    // `Header::parse` checked that the extent is ordered and a whole number of records.
    let records = unsafe { core::slice::from_raw_parts(h.records_begin as *const u8, len) };
    // A linker-gathered table is rarely in address order: sort its spans to check overlaps.
    let mut scratch = vec![Span::default(); len / RECORD_SIZE];
    SiteTable::parse_with_scratch(h, records, text, &mut scratch)
}
