//! Writing tables: a sealed table (header, checksum, records, contiguous) and the header of an
//! unsealed, linker-gathered one.

use core::fmt;

use super::detours::{RawDetour, RawMember};
use super::layout::{RawHeader, RawHeaderExt};
use super::parse::{checksum, header_bytes};
use super::site::{AddrRange, RecordError, Site, decode_record};
use super::{
    DETOUR_SIZE, FLAG_SEALED, HEADER_SIZE, HEADER_SIZE_V2, MEMBER_SIZE, RECORD_SIZE, TABLE_MAGIC,
    TABLE_VERSION, TABLE_VERSION_DETOURS,
};
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
    /// A detour or the arena cannot be encoded (an offset out of range, a stub too long).
    Detours,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::BufferTooSmall { needed } => write!(f, "buffer too small: {needed} needed"),
            WriteError::TooManySites => f.write_str("too many sites for one table"),
            WriteError::Site { index, error } => write!(f, "site {index}: {error}"),
            WriteError::Detours => f.write_str("a detour or the arena cannot be encoded"),
        }
    }
}

/// Bytes a sealed version-1 table of `sites` sites occupies.
pub const fn sealed_table_size(sites: usize) -> usize {
    HEADER_SIZE + sites * RECORD_SIZE
}

/// A load-time detour to write (see [`super::detours`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetourSpec<'a> {
    /// The first moved byte.
    pub moved: u64,
    /// Bytes moved.
    pub moved_len: u8,
    /// Where the stub runs.
    pub stub: u64,
    /// The stub's bytes.
    pub stub_bytes: &'a [u8],
    /// The trampoline, if any.
    pub tramp: Option<u64>,
    /// CRC-32 of the moved range's original bytes.
    pub moved_crc: u32,
}

/// A member to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    /// Its record's index.
    pub record: u32,
    /// Its detour's index.
    pub detour: u16,
    /// Where its patchable copy is in the stub.
    pub copy_off: u8,
    /// The copy's room.
    pub copy_len: u8,
}

/// Bytes a sealed table with detours (version 2 when there are detours or an arena) occupies.
pub fn sealed_table_size_with(
    sites: usize,
    detours: &[DetourSpec<'_>],
    members: usize,
    arena: bool,
) -> usize {
    if detours.is_empty() && members == 0 && !arena {
        return sealed_table_size(sites);
    }
    HEADER_SIZE_V2
        + sites * RECORD_SIZE
        + detours.len() * DETOUR_SIZE
        + members * MEMBER_SIZE
        + detours.iter().map(|d| d.stub_bytes.len()).sum::<usize>()
}

/// Writes a sealed version-1 table (header, then records, contiguous) of `sites` into `out`,
/// for a table that will lie at address `table_addr`. Sites must be sorted by address and must
/// not overlap; each is checked as a reader would check it. Returns the bytes written.
pub fn write_sealed_table(
    sites: &[Site],
    table_addr: u64,
    out: &mut [u8],
) -> Result<usize, WriteError> {
    write_sealed_table_with(sites, &[], &[], None, table_addr, out)
}

/// Writes a sealed table with load-time detours and an arena (version 2; version 1 when there
/// are neither): header, records, then the detour area (descriptors, members, stub bytes), all
/// contiguous.
pub fn write_sealed_table_with(
    sites: &[Site],
    detours: &[DetourSpec<'_>],
    members: &[MemberSpec],
    arena: Option<AddrRange>,
    table_addr: u64,
    out: &mut [u8],
) -> Result<usize, WriteError> {
    let count = u32::try_from(sites.len()).map_err(|_| WriteError::TooManySites)?;
    let v2 = !detours.is_empty() || !members.is_empty() || arena.is_some();
    let header_size = if v2 { HEADER_SIZE_V2 } else { HEADER_SIZE };
    let needed = sealed_table_size_with(sites.len(), detours, members.len(), arena.is_some());
    if out.len() < needed {
        return Err(WriteError::BufferTooSmall { needed });
    }
    let too_big = WriteError::TooManySites;
    let mut prev_end: Option<u64> = None;
    for (index, site) in sites.iter().enumerate() {
        let off = header_size + index * RECORD_SIZE;
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
    let records_end = header_size + sites.len() * RECORD_SIZE;
    // The detour area: descriptors, members, stubs.
    let area_at = records_end;
    let members_at = area_at + detours.len() * DETOUR_SIZE;
    let stubs_at = members_at + members.len() * MEMBER_SIZE;
    let mut stub_off = stubs_at;
    let bad = WriteError::Detours;
    for (i, d) in detours.iter().enumerate() {
        let at = table_addr
            .checked_add((area_at + i * DETOUR_SIZE) as u64)
            .ok_or(too_big)?;
        let src = table_addr.checked_add(stub_off as u64).ok_or(too_big)?;
        let raw = RawDetour {
            moved: rel_to(at, d.moved).ok_or(bad)?,
            stub: rel_to(at + 4, d.stub).ok_or(bad)?,
            src: rel_to(at + 8, src).ok_or(bad)?,
            tramp: match d.tramp {
                Some(t) => rel_to(at + 12, t).filter(|r| *r != 0).ok_or(bad)?,
                None => 0,
            },
            moved_len: d.moved_len,
            stub_len: u8::try_from(d.stub_bytes.len()).map_err(|_| bad)?,
            reserved: 0,
            moved_crc: d.moved_crc,
        };
        put(out, area_at + i * DETOUR_SIZE, &raw.to_bytes())
            .ok_or(WriteError::BufferTooSmall { needed })?;
        put(out, stub_off, d.stub_bytes).ok_or(WriteError::BufferTooSmall { needed })?;
        stub_off += d.stub_bytes.len();
    }
    for (k, m) in members.iter().enumerate() {
        let raw = RawMember {
            record: m.record,
            detour: m.detour,
            copy_off: m.copy_off,
            copy_len: m.copy_len,
        };
        put(out, members_at + k * MEMBER_SIZE, &raw.to_bytes())
            .ok_or(WriteError::BufferTooSmall { needed })?;
    }
    let mut raw = RawHeader {
        magic: TABLE_MAGIC,
        version: if v2 {
            TABLE_VERSION_DETOURS
        } else {
            TABLE_VERSION
        },
        header_size: header_size as u16,
        record_size: RECORD_SIZE as u16,
        flags: FLAG_SEALED,
        records_begin: (header_size - 16) as i32,
        records_end: i32::try_from(records_end as i64 - 20).map_err(|_| too_big)?,
        count,
        checksum: 0,
    };
    let ext = if v2 {
        let area_len = u32::try_from(stub_off - area_at).map_err(|_| too_big)?;
        Some(RawHeaderExt {
            detours: if area_len == 0 {
                0
            } else {
                rel_to(table_addr + 32, table_addr + area_at as u64).ok_or(too_big)?
            },
            detour_count: u16::try_from(detours.len()).map_err(|_| too_big)?,
            member_count: u16::try_from(members.len()).map_err(|_| too_big)?,
            area_len,
            arena: match arena {
                Some(a) => rel_to(table_addr + 44, a.start)
                    .filter(|r| *r != 0)
                    .ok_or(bad)?,
                None => 0,
            },
            arena_len: arena
                .map(|a| u32::try_from(a.end.saturating_sub(a.start)))
                .transpose()
                .map_err(|_| bad)?
                .unwrap_or(0),
            reserved: [0; 3],
        })
    } else {
        None
    };
    let hb = header_bytes(&raw, ext.as_ref());
    raw.checksum = checksum(
        &hb,
        header_size,
        &out[header_size..records_end],
        &out[area_at..stub_off],
    );
    let hb = header_bytes(&raw, ext.as_ref());
    put(out, 0, &hb[..header_size]).ok_or(WriteError::BufferTooSmall { needed })?;
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
    let b = header_bytes(&raw, None);
    let mut out = [0u8; HEADER_SIZE];
    out.copy_from_slice(&b[..HEADER_SIZE]);
    Some(out)
}

impl core::error::Error for WriteError {}
