//! Writing tables: a sealed table (header, checksum, records, contiguous) and the header of an
//! unsealed, linker-gathered one.

use core::fmt;

use super::layout::RawHeader;
use super::parse::{checksum, header_bytes};
use super::site::{AddrRange, RecordError, Site, decode_record};
use super::{FLAG_SEALED, HEADER_SIZE, RECORD_SIZE, TABLE_MAGIC, TABLE_VERSION};
use crate::le::{put, rel_to};

/// Why a table could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteError {
    /// The output buffer is smaller than [`sealed_table_size`].
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// More sites than a table can hold.
    TooManySites,
    /// Site `index` cannot be encoded or is invalid.
    Site {
        /// Its index.
        index: usize,
        /// What is wrong.
        error: RecordError,
    },
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::BufferTooSmall { needed } => write!(f, "buffer too small: {needed} needed"),
            WriteError::TooManySites => f.write_str("too many sites for one table"),
            WriteError::Site { index, error } => write!(f, "site {index}: {error}"),
        }
    }
}

/// Bytes a sealed table of `sites` sites occupies.
pub const fn sealed_table_size(sites: usize) -> usize {
    HEADER_SIZE + sites * RECORD_SIZE
}

/// Writes a sealed table (header, then records, contiguous) of `sites` into `out`, for a
/// table that will lie at address `table_addr`. Sites must be sorted by address and must not
/// overlap; each is checked as a reader would check it. Returns the bytes written.
pub fn write_sealed_table(
    sites: &[Site],
    table_addr: u64,
    out: &mut [u8],
) -> Result<usize, WriteError> {
    let count = u32::try_from(sites.len()).map_err(|_| WriteError::TooManySites)?;
    let needed = sealed_table_size(sites.len());
    if out.len() < needed {
        return Err(WriteError::BufferTooSmall { needed });
    }
    let too_big = WriteError::TooManySites;
    let mut prev_end: Option<u64> = None;
    for (index, site) in sites.iter().enumerate() {
        let off = HEADER_SIZE + index * RECORD_SIZE;
        let rec_addr = table_addr.checked_add(off as u64).ok_or(too_big)?;
        let raw = site
            .to_raw(rec_addr)
            .map_err(|error| WriteError::Site { index, error })?;
        // Check the record exactly as a reader will.
        let back = decode_record(&raw, rec_addr, &[AddrRange::EVERYTHING])
            .map_err(|error| WriteError::Site { index, error })?;
        if let Some(pe) = prev_end
            && back.addr < pe
        {
            let error = if index > 0 && back.addr < sites[index - 1].addr {
                RecordError::Unsorted
            } else {
                RecordError::Overlap {
                    other: index as u32 - 1,
                }
            };
            return Err(WriteError::Site { index, error });
        }
        prev_end = Some(back.end());
        put(out, off, &raw.to_bytes()).ok_or(WriteError::BufferTooSmall { needed })?;
    }
    let records_end_off = needed as i64 - 20;
    let mut raw = RawHeader {
        magic: TABLE_MAGIC,
        version: TABLE_VERSION,
        header_size: HEADER_SIZE as u16,
        record_size: RECORD_SIZE as u16,
        flags: FLAG_SEALED,
        records_begin: (HEADER_SIZE - 16) as i32,
        records_end: i32::try_from(records_end_off).map_err(|_| too_big)?,
        count,
        checksum: 0,
    };
    let hb = header_bytes(&raw);
    raw.checksum = checksum(&hb, &out[HEADER_SIZE..needed]);
    put(out, 0, &header_bytes(&raw)).ok_or(WriteError::BufferTooSmall { needed })?;
    Ok(needed)
}

/// Writes the header of an unsealed table at `header_addr` whose records lie at
/// `[records_begin, records_end)` (what the linker-gathered header holds, for tools and tests).
pub fn unsealed_header(
    header_addr: u64,
    records_begin: u64,
    records_end: u64,
) -> Option<[u8; HEADER_SIZE]> {
    let raw = RawHeader {
        magic: TABLE_MAGIC,
        version: TABLE_VERSION,
        header_size: HEADER_SIZE as u16,
        record_size: RECORD_SIZE as u16,
        flags: 0,
        records_begin: rel_to(header_addr.checked_add(16)?, records_begin)?,
        records_end: rel_to(header_addr.checked_add(20)?, records_end)?,
        count: 0,
        checksum: 0,
    };
    Some(header_bytes(&raw))
}

impl core::error::Error for WriteError {}
