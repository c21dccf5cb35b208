//! A whole table validated: the header on its own ([`Header::parse`]), then the records'
//! extent, a sealed table's checksum, every record and overlaps ([`SiteTable::parse`]).

use core::fmt;

use super::detours::{self, DetourArea, DetourError, RecordView};
use super::layout::{RawHeader, RawHeaderExt, RawRecord};
use super::site::{AddrRange, RecordError, Site, decode_record};
use super::{
    DETOUR_SIZE, FLAG_SEALED, HEADER_SIZE, HEADER_SIZE_V2, MEMBER_SIZE, RECORD_SIZE, TABLE_MAGIC,
    TABLE_VERSION, TABLE_VERSION_DETOURS,
};
use crate::crc32::Crc32;
use crate::le::{i32_at, self_relative, u8_at, u16_at, u32_at};

/// Why a table is refused as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Fewer bytes than the header needs.
    TruncatedHeader {
        /// Bytes available.
        available: usize,
    },
    /// The magic is not [`TABLE_MAGIC`].
    BadMagic,
    /// A version this reader does not know.
    UnsupportedVersion(u16),
    /// The header size field is not [`HEADER_SIZE`].
    BadHeaderSize(u16),
    /// The record size field is not [`RECORD_SIZE`].
    RecordSizeMismatch {
        /// The size the table claims.
        found: u16,
    },
    /// Unknown header flag bits.
    BadFlags(u16),
    /// The records' extent is inverted, overflows, or is not a whole number of records.
    BadExtent,
    /// The record count overflows or disagrees with the records' extent.
    CountMismatch {
        /// The header's count.
        count: u32,
        /// Records the extent holds.
        extent_records: u64,
    },
    /// An unsealed table with a nonzero count or checksum.
    UnsealedWithChecksum,
    /// Fewer record bytes than the header describes.
    TruncatedRecords {
        /// Bytes the header describes.
        needed: u64,
        /// Bytes available.
        available: usize,
    },
    /// The checksum does not match.
    BadChecksum {
        /// The header's value.
        stored: u32,
        /// The computed value.
        computed: u32,
    },
    /// A record is wrong.
    Record {
        /// Its index.
        index: u32,
        /// What is wrong.
        error: RecordError,
    },
    /// The detour area (version 2) is wrong.
    Detours(DetourError),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::TruncatedHeader { available } => write!(
                f,
                "truncated header: {available} bytes, {HEADER_SIZE} needed"
            ),
            TableError::BadMagic => f.write_str("bad magic (not a pvpatch site table)"),
            TableError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported table version {v} (this reader knows {TABLE_VERSION} and \
                     {TABLE_VERSION_DETOURS})"
                )
            }
            TableError::BadHeaderSize(s) => write!(
                f,
                "header size {s}, expected {HEADER_SIZE} (version 1) or {HEADER_SIZE_V2} \
                 (version 2)"
            ),
            TableError::RecordSizeMismatch { found } => {
                write!(f, "record size {found}, expected {RECORD_SIZE}")
            }
            TableError::BadFlags(fl) => write!(f, "unknown header flags {fl:#x}"),
            TableError::BadExtent => {
                f.write_str("the records' extent is inverted or not a whole number of records")
            }
            TableError::CountMismatch {
                count,
                extent_records,
            } => write!(
                f,
                "count {count} disagrees with the records' extent ({extent_records} records)"
            ),
            TableError::UnsealedWithChecksum => {
                f.write_str("unsealed table has a nonzero count or checksum")
            }
            TableError::TruncatedRecords { needed, available } => {
                write!(f, "truncated records: {available} bytes, {needed} needed")
            }
            TableError::BadChecksum { stored, computed } => write!(
                f,
                "bad checksum: stored {stored:#010x}, computed {computed:#010x}"
            ),
            TableError::Record { index, error } => write!(f, "record {index}: {error}"),
            TableError::Detours(e) => write!(f, "{e}"),
        }
    }
}

/// A header that passed its own checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Where the header lies.
    pub addr: u64,
    /// Its fields.
    pub raw: RawHeader,
    /// Absolute address of the first record.
    pub records_begin: u64,
    /// Absolute address one past the last record.
    pub records_end: u64,
    /// Version 2's fields, with the detour area's address (0 when it has none) and the arena.
    pub ext: Option<(RawHeaderExt, u64, Option<AddrRange>)>,
}

impl Header {
    /// Parses and checks the header in the first [`HEADER_SIZE`] bytes of `bytes`, which lie at
    /// address `addr`.
    pub fn parse(bytes: &[u8], addr: u64) -> Result<Header, TableError> {
        if bytes.len() < HEADER_SIZE {
            return Err(TableError::TruncatedHeader {
                available: bytes.len(),
            });
        }
        let field = |off| u16_at(bytes, off).unwrap_or(0);
        let magic = bytes
            .get(0..8)
            .ok_or(TableError::TruncatedHeader { available: 0 })?;
        if magic != TABLE_MAGIC {
            return Err(TableError::BadMagic);
        }
        let raw = RawHeader {
            magic: TABLE_MAGIC,
            version: field(8),
            header_size: field(10),
            record_size: field(12),
            flags: field(14),
            records_begin: i32_at(bytes, 16).unwrap_or(0),
            records_end: i32_at(bytes, 20).unwrap_or(0),
            count: u32_at(bytes, 24).unwrap_or(0),
            checksum: u32_at(bytes, 28).unwrap_or(0),
        };
        let size = match raw.version {
            TABLE_VERSION => HEADER_SIZE,
            TABLE_VERSION_DETOURS => HEADER_SIZE_V2,
            v => return Err(TableError::UnsupportedVersion(v)),
        };
        if raw.header_size as usize != size {
            return Err(TableError::BadHeaderSize(raw.header_size));
        }
        if bytes.len() < size {
            return Err(TableError::TruncatedHeader {
                available: bytes.len(),
            });
        }
        if raw.record_size as usize != RECORD_SIZE {
            return Err(TableError::RecordSizeMismatch {
                found: raw.record_size,
            });
        }
        if raw.flags & !FLAG_SEALED != 0 {
            return Err(TableError::BadFlags(raw.flags));
        }
        let begin = self_relative(addr, 16, raw.records_begin).ok_or(TableError::BadExtent)?;
        let end = self_relative(addr, 20, raw.records_end).ok_or(TableError::BadExtent)?;
        let len = end.checked_sub(begin).ok_or(TableError::BadExtent)?;
        if len % RECORD_SIZE as u64 != 0 {
            return Err(TableError::BadExtent);
        }
        let extent_records = len / RECORD_SIZE as u64;
        if raw.flags & FLAG_SEALED != 0 {
            if raw.count as u64 != extent_records {
                return Err(TableError::CountMismatch {
                    count: raw.count,
                    extent_records,
                });
            }
        } else if raw.count != 0 || raw.checksum != 0 {
            return Err(TableError::UnsealedWithChecksum);
        }
        if extent_records > u32::MAX as u64 {
            return Err(TableError::CountMismatch {
                count: raw.count,
                extent_records,
            });
        }
        let ext = if raw.version == TABLE_VERSION_DETOURS {
            let e = RawHeaderExt::read(bytes).ok_or(TableError::TruncatedHeader {
                available: bytes.len(),
            })?;
            // Detours exist only in sealed tables: the checksum covers them.
            if raw.flags & FLAG_SEALED == 0 || e.reserved != [0; 3] {
                return Err(TableError::BadFlags(raw.flags));
            }
            let area = match e.detours {
                0 => 0,
                d => self_relative(addr, 32, d).ok_or(TableError::BadExtent)?,
            };
            let listed =
                e.detour_count as usize * DETOUR_SIZE + e.member_count as usize * MEMBER_SIZE;
            if (area == 0) != (e.area_len == 0) || (e.area_len as usize) < listed {
                return Err(TableError::Detours(DetourError::Truncated));
            }
            let arena = match e.arena {
                0 => None,
                a => {
                    let start = self_relative(addr, 44, a).ok_or(TableError::BadExtent)?;
                    let end = start
                        .checked_add(e.arena_len as u64)
                        .ok_or(TableError::Detours(DetourError::BadArena))?;
                    Some(AddrRange::new(start, end))
                }
            };
            Some((e, area, arena))
        } else {
            None
        };
        Ok(Header {
            addr,
            raw,
            records_begin: begin,
            records_end: end,
            ext,
        })
    }

    /// The header's size: [`HEADER_SIZE`] (version 1) or [`HEADER_SIZE_V2`].
    pub fn size(&self) -> usize {
        self.raw.header_size as usize
    }

    /// The detour area's address and length (version 2 with detours).
    pub fn detour_area(&self) -> Option<(u64, u32)> {
        self.ext
            .and_then(|(e, a, _)| (a != 0).then_some((a, e.area_len)))
    }

    /// Whether the table is sealed (count, checksum and order are guaranteed).
    pub fn is_sealed(&self) -> bool {
        self.raw.flags & FLAG_SEALED != 0
    }

    /// Number of records.
    pub fn record_count(&self) -> u32 {
        ((self.records_end - self.records_begin) / RECORD_SIZE as u64) as u32
    }

    /// Bytes the records occupy.
    pub fn records_len(&self) -> u64 {
        self.records_end - self.records_begin
    }

    /// The header's bytes: the first [`Header::size`] bytes of the array.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE_V2] {
        header_bytes(&self.raw, self.ext.map(|e| e.0).as_ref())
    }
}

/// A site's span, for the sort-based overlap check of [`SiteTable::parse_with_scratch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// Record index.
    pub index: u32,
}

/// Sorts the spans and reports the first overlap (the later record of the pair, in table order).
fn check_overlaps_sorted(spans: &mut [Span]) -> Result<(), TableError> {
    spans.sort_unstable_by_key(|s| (s.start, s.index));
    for w in spans.windows(2) {
        if w[1].start < w[0].end {
            let (later, earlier) = if w[1].index > w[0].index {
                (w[1], w[0])
            } else {
                (w[0], w[1])
            };
            return Err(TableError::Record {
                index: later.index,
                error: RecordError::Overlap {
                    other: earlier.index,
                },
            });
        }
    }
    Ok(())
}

/// A header's bytes; the extension's when there is one (the first `raw.header_size` count).
pub(super) fn header_bytes(raw: &RawHeader, ext: Option<&RawHeaderExt>) -> [u8; HEADER_SIZE_V2] {
    let mut b = [0u8; HEADER_SIZE_V2];
    if let Some(e) = ext {
        b[HEADER_SIZE..].copy_from_slice(&e.to_bytes());
    }
    b[0..8].copy_from_slice(&raw.magic);
    b[8..10].copy_from_slice(&raw.version.to_le_bytes());
    b[10..12].copy_from_slice(&raw.header_size.to_le_bytes());
    b[12..14].copy_from_slice(&raw.record_size.to_le_bytes());
    b[14..16].copy_from_slice(&raw.flags.to_le_bytes());
    b[16..20].copy_from_slice(&raw.records_begin.to_le_bytes());
    b[20..24].copy_from_slice(&raw.records_end.to_le_bytes());
    b[24..28].copy_from_slice(&raw.count.to_le_bytes());
    b[28..32].copy_from_slice(&raw.checksum.to_le_bytes());
    b
}

/// The checksum of a sealed table: the header (`size` bytes) with its checksum field zero, the
/// records, the detour area.
pub(super) fn checksum(header: &[u8], size: usize, records: &[u8], area: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(&header[..28]);
    c.update_zeros(4);
    c.update(&header[32..size]);
    c.update(records);
    c.update(area);
    c.finish()
}

/// A table whose header, checksum and every record passed their checks.
#[derive(Clone, Copy, Debug)]
pub struct SiteTable<'a> {
    header: Header,
    records: &'a [u8],
    unknown_ops: u32,
    area: DetourArea<'a>,
    /// The code ranges the detour area is still to be checked against, when a deferring parse
    /// left that check for later ([`SiteTable::parse_contiguous_deferring_detours`]).
    area_unchecked: Option<&'a [AddrRange]>,
}

impl<'a> SiteTable<'a> {
    /// Checks a table whose records are `records` (the bytes at `header.records_begin ..
    /// header.records_end`), against the image's code ranges `image`. An unsorted table
    /// (linker-gathered) is checked for overlaps by comparing every pair; see
    /// [`SiteTable::parse_with_scratch`] for the sort-based check.
    pub fn parse(
        header: Header,
        records: &'a [u8],
        image: &[AddrRange],
    ) -> Result<SiteTable<'a>, TableError> {
        SiteTable::parse_with_scratch(header, records, image, &mut [])
    }

    /// As [`SiteTable::parse`], with `scratch` to sort an unsorted table's sites for the
    /// overlap check (`O(n log n)` instead of `O(n²)`) when it holds at least one entry per
    /// record.
    pub fn parse_with_scratch(
        header: Header,
        records: &'a [u8],
        image: &[AddrRange],
        scratch: &mut [Span],
    ) -> Result<SiteTable<'a>, TableError> {
        SiteTable::parse_with_area(header, records, &[], image, scratch)
    }

    /// As [`SiteTable::parse_with_scratch`], for a version-2 table whose detour area is `area`
    /// (the bytes at the address its header names): the area is checked too.
    pub fn parse_with_area(
        header: Header,
        records: &'a [u8],
        area: &'a [u8],
        image: &[AddrRange],
        scratch: &mut [Span],
    ) -> Result<SiteTable<'a>, TableError> {
        SiteTable::parse_inner(header, records, area, image, scratch, true)
    }

    /// [`SiteTable::parse_with_area`], the detour area's check included or not.
    fn parse_inner(
        header: Header,
        records: &'a [u8],
        area: &'a [u8],
        image: &[AddrRange],
        scratch: &mut [Span],
        check_area: bool,
    ) -> Result<SiteTable<'a>, TableError> {
        let area = match header.detour_area() {
            Some((_, len)) => area
                .get(..len as usize)
                .ok_or(TableError::Detours(DetourError::Truncated))?,
            None => &[],
        };
        let needed = header.records_len();
        if (records.len() as u64) < needed {
            return Err(TableError::TruncatedRecords {
                needed,
                available: records.len(),
            });
        }
        // `needed <= records.len()`, so it fits a usize.
        let records = &records[..needed as usize];
        if header.is_sealed() {
            let computed = checksum(&header.to_bytes(), header.size(), records, area);
            if computed != header.raw.checksum {
                return Err(TableError::BadChecksum {
                    stored: header.raw.checksum,
                    computed,
                });
            }
        }
        let sealed = header.is_sealed();
        let count = records.len() / RECORD_SIZE;
        let scratch = if scratch.len() >= count {
            Some(&mut scratch[..count])
        } else {
            None
        };
        let mut unknown_ops = 0u32;
        // (index, start, end) of the previous site
        let mut prev: Option<(u32, u64, u64)> = None;
        let mut sorted = true;
        let mut spans = scratch;
        for (i, site) in RecordIter::new(&header, records).enumerate() {
            let index = i as u32;
            let site = site.and_then(|(addr, raw)| decode_record(&raw, addr, image));
            let site = site.map_err(|error| TableError::Record { index, error })?;
            if site.op().is_none() {
                unknown_ops += 1;
            }
            if let Some(s) = spans.as_deref_mut() {
                s[i] = Span {
                    start: site.addr,
                    end: site.end(),
                    index,
                };
            }
            if let Some((pi, pstart, pend)) = prev {
                if site.addr < pstart {
                    if sealed {
                        return Err(TableError::Record {
                            index,
                            error: RecordError::Unsorted,
                        });
                    }
                    sorted = false;
                } else if sorted && site.addr < pend {
                    let error = RecordError::Overlap { other: pi };
                    return Err(TableError::Record { index, error });
                }
            }
            prev = Some((index, site.addr, site.end()));
        }
        let (detours, members) = header
            .ext
            .map_or((0, 0), |(e, _, _)| (e.detour_count, e.member_count));
        let table = SiteTable {
            header,
            records,
            unknown_ops,
            area: DetourArea {
                bytes: area,
                addr: header.detour_area().map_or(0, |a| a.0),
                detours,
                members,
            },
            area_unchecked: None,
        };
        if !sorted {
            match spans {
                Some(s) => check_overlaps_sorted(s)?,
                None => table.check_overlaps_unsorted()?,
            }
        }
        if header.ext.is_some() {
            if check_area {
                table.check_area_against(image)?;
            }
        } else if table.sites().any(|s| s.form == super::Form::Movable) {
            return Err(TableError::Detours(DetourError::MissingMember(0)));
        }
        Ok(table)
    }

    /// The detour area's check ([`detours::check`]) against the code ranges `image`.
    fn check_area_against(&self, image: &[AddrRange]) -> Result<(), TableError> {
        let Some((_, _, arena)) = self.header.ext else {
            return Ok(());
        };
        let view = |i: u32| self.view(i as usize);
        detours::check(&self.area, self.len() as u32, &view, image, arena)
            .map_err(TableError::Detours)
    }

    /// As [`SiteTable::parse_contiguous`], with every check but the detour area's (the header,
    /// the checksum over the whole table, every record), which is left for
    /// [`SiteTable::check_detour_area`]. For a caller that may use nothing of the area (the
    /// boot shim on a backend that keeps every site as it is, or rewrites some in place), where
    /// checking how the area's stubs, trampolines and arena lie against each other and the sites
    /// is work without a purpose: it must call that before it installs a detour or writes into
    /// the arena (the runtime's planner does).
    pub fn parse_contiguous_deferring_detours(
        bytes: &'a [u8],
        addr: u64,
        image: &'a [AddrRange],
    ) -> Result<SiteTable<'a>, TableError> {
        let mut table = SiteTable::contiguous(bytes, addr, image, false)?;
        if table.header.ext.is_some() {
            table.area_unchecked = Some(image);
        }
        Ok(table)
    }

    /// Whether the detour area has been checked (always, but after a deferring parse).
    pub fn detour_area_checked(&self) -> bool {
        self.area_unchecked.is_none()
    }

    /// Checks the detour area a deferring parse left unchecked (nothing to do otherwise).
    pub fn check_detour_area(&self) -> Result<(), TableError> {
        match self.area_unchecked {
            Some(image) => self.check_area_against(image),
            None => Ok(()),
        }
    }

    /// Parses a table whose header and records lie together in `bytes`, which starts at `addr`
    /// (a sealed table as the post-link tool writes it, or a test's).
    pub fn parse_contiguous(
        bytes: &'a [u8],
        addr: u64,
        image: &[AddrRange],
    ) -> Result<SiteTable<'a>, TableError> {
        SiteTable::contiguous(bytes, addr, image, true)
    }

    /// [`SiteTable::parse_contiguous`], the detour area's check included or not.
    fn contiguous(
        bytes: &'a [u8],
        addr: u64,
        image: &[AddrRange],
        check_area: bool,
    ) -> Result<SiteTable<'a>, TableError> {
        let header = Header::parse(bytes, addr)?;
        let needed = header.records_len();
        let start = header
            .records_begin
            .checked_sub(addr)
            .ok_or(TableError::BadExtent)?;
        let end = start.checked_add(needed).ok_or(TableError::BadExtent)?;
        if start < header.size() as u64 || end > bytes.len() as u64 {
            return Err(TableError::TruncatedRecords {
                needed,
                available: bytes.len(),
            });
        }
        let area = match header.detour_area() {
            Some((a, len)) => {
                let off = a
                    .checked_sub(addr)
                    .and_then(|o| usize::try_from(o).ok())
                    .ok_or(TableError::Detours(DetourError::Truncated))?;
                bytes
                    .get(off..off.checked_add(len as usize).ok_or(TableError::BadExtent)?)
                    .ok_or(TableError::Detours(DetourError::Truncated))?
            }
            None => &[],
        };
        SiteTable::parse_inner(
            header,
            &bytes[start as usize..end as usize],
            area,
            image,
            &mut [],
            check_area,
        )
    }

    /// An unsorted (linker-gathered) table without scratch space: every pair of spans is
    /// compared, reading only each record's offset and length.
    fn check_overlaps_unsorted(&self) -> Result<(), TableError> {
        let span = |i: usize| -> Option<(u64, u64)> {
            let off = i * RECORD_SIZE;
            let at = self.header.records_begin.checked_add(off as u64)?;
            let start = self_relative(at, 0, i32_at(self.records, off)?)?;
            Some((
                start,
                start.saturating_add(u8_at(self.records, off + 10)? as u64),
            ))
        };
        let n = self.len();
        for i in 0..n {
            let (a0, a1) = span(i).ok_or(TableError::BadExtent)?;
            for j in 0..i {
                let (b0, b1) = span(j).ok_or(TableError::BadExtent)?;
                if a0 < b1 && b0 < a1 {
                    return Err(TableError::Record {
                        index: i as u32,
                        error: RecordError::Overlap { other: j as u32 },
                    });
                }
            }
        }
        Ok(())
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Number of sites.
    pub fn len(&self) -> usize {
        self.records.len() / RECORD_SIZE
    }

    /// Whether the table has no sites.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// How many sites name an op this reader does not know (they stay native).
    pub fn unknown_ops(&self) -> u32 {
        self.unknown_ops
    }

    /// Site `i`.
    pub fn site(&self, i: usize) -> Option<Site> {
        let off = i.checked_mul(RECORD_SIZE)?;
        let raw = RawRecord::read(self.records.get(off..)?)?;
        let addr = self.header.records_begin.checked_add(off as u64)?;
        decode_record(&raw, addr, &[AddrRange::EVERYTHING]).ok()
    }

    /// What the detour checks need of record `i`: its place, lengths, form and stub, read from
    /// the raw record without decoding the rest (every record was decoded and checked once when
    /// the table was parsed; a binary search over them must not decode each again).
    pub fn view(&self, i: usize) -> Option<RecordView> {
        let off = i.checked_mul(RECORD_SIZE)?;
        let raw = RawRecord::read(self.records.get(off..)?)?;
        let at = self.header.records_begin.checked_add(off as u64)?;
        Some(RecordView {
            addr: self_relative(at, 0, raw.site)?,
            site_len: raw.site_len,
            insn_len: raw.insn_len,
            form: super::Form::from_code(raw.form)?,
            stub: match raw.stub {
                0 => None,
                s => Some(self_relative(at, 4, s)?),
            },
        })
    }

    /// Every site, in table order.
    pub fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        (0..self.len()).filter_map(move |i| self.site(i))
    }

    /// The detour area (empty for a version-1 table).
    pub fn detour_area(&self) -> &DetourArea<'a> {
        &self.area
    }

    /// The arena for the backend's out-of-line code, if the table names one.
    pub fn arena(&self) -> Option<AddrRange> {
        self.header.ext.and_then(|e| e.2)
    }
}

struct RecordIter<'h, 'a> {
    header: &'h Header,
    records: &'a [u8],
    next: usize,
}

impl<'h, 'a> RecordIter<'h, 'a> {
    fn new(header: &'h Header, records: &'a [u8]) -> Self {
        RecordIter {
            header,
            records,
            next: 0,
        }
    }
}

impl Iterator for RecordIter<'_, '_> {
    type Item = Result<(u64, RawRecord), RecordError>;
    fn next(&mut self) -> Option<Self::Item> {
        let off = self.next;
        let bytes = self.records.get(off..off.checked_add(RECORD_SIZE)?)?;
        self.next = off + RECORD_SIZE;
        let addr = self.header.records_begin.checked_add(off as u64);
        Some(match (addr, RawRecord::read(bytes)) {
            (Some(a), Some(r)) => Ok((a, r)),
            _ => Err(RecordError::OffsetOutOfRange),
        })
    }
}

impl core::error::Error for TableError {}
