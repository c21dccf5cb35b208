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

use core::fmt;
use core::mem::{offset_of, size_of};

use crate::crc32::Crc32;
use crate::le::{i32_at, put, rel_to, self_relative, u8_at, u16_at, u32_at};
use crate::op::{NO_REG, Op, Operand, OperandError, check_operand, operand_code};
use crate::regs::{Gpr, RegSet};

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

/// The header as it lies in memory (`#[repr(C)]`, little-endian fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawHeader {
    /// [`TABLE_MAGIC`].
    pub magic: [u8; 8],
    /// [`TABLE_VERSION`].
    pub version: u16,
    /// [`HEADER_SIZE`].
    pub header_size: u16,
    /// [`RECORD_SIZE`].
    pub record_size: u16,
    /// [`FLAG_SEALED`] or 0.
    pub flags: u16,
    /// Self-relative offset of the first record.
    pub records_begin: i32,
    /// Self-relative offset of the end of the last record.
    pub records_end: i32,
    /// Number of records (sealed tables; 0 otherwise).
    pub count: u32,
    /// CRC-32 of the header with this field zero, then the records (sealed tables; 0 otherwise).
    pub checksum: u32,
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE);
const _: () = assert!(offset_of!(RawHeader, version) == 8);
const _: () = assert!(offset_of!(RawHeader, header_size) == 10);
const _: () = assert!(offset_of!(RawHeader, record_size) == 12);
const _: () = assert!(offset_of!(RawHeader, flags) == 14);
const _: () = assert!(offset_of!(RawHeader, records_begin) == 16);
const _: () = assert!(offset_of!(RawHeader, records_end) == 20);
const _: () = assert!(offset_of!(RawHeader, count) == 24);
const _: () = assert!(offset_of!(RawHeader, checksum) == 28);

/// A record as it lies in memory (`#[repr(C)]`, little-endian fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRecord {
    /// Self-relative offset of the site's first byte.
    pub site: i32,
    /// Self-relative offset of the site's stub, 0 for none.
    pub stub: i32,
    /// Op id.
    pub op: u16,
    /// Bytes that may be rewritten (the room).
    pub site_len: u8,
    /// Length of the original instruction (or idiom) at the start of the site.
    pub insn_len: u8,
    /// [`Form`] code.
    pub form: u8,
    /// Operand-kind code (see [`operand_code`]).
    pub operand: u8,
    /// Register number, or 0xFF.
    pub reg: u8,
    /// Second register number or debug register number, or 0xFF.
    pub reg2: u8,
    /// Operand width in bytes (0, 1, 2, 4, 8).
    pub width: u8,
    /// Site flags ([`SITE_FLAG_REP`]).
    pub flags: u8,
    /// Immediate port (operand kind `PORT_IMM`), else 0.
    pub port: u16,
    /// Registers and flags the code around the site lets a rewrite clobber.
    pub clobbers: u32,
}

const _: () = assert!(size_of::<RawRecord>() == RECORD_SIZE);
const _: () = assert!(offset_of!(RawRecord, stub) == 4);
const _: () = assert!(offset_of!(RawRecord, op) == 8);
const _: () = assert!(offset_of!(RawRecord, site_len) == 10);
const _: () = assert!(offset_of!(RawRecord, insn_len) == 11);
const _: () = assert!(offset_of!(RawRecord, form) == 12);
const _: () = assert!(offset_of!(RawRecord, operand) == 13);
const _: () = assert!(offset_of!(RawRecord, reg) == 14);
const _: () = assert!(offset_of!(RawRecord, reg2) == 15);
const _: () = assert!(offset_of!(RawRecord, width) == 16);
const _: () = assert!(offset_of!(RawRecord, flags) == 17);
const _: () = assert!(offset_of!(RawRecord, port) == 18);
const _: () = assert!(offset_of!(RawRecord, clobbers) == 20);

impl RawRecord {
    /// Reads a record from the first [`RECORD_SIZE`] bytes of `b`.
    pub fn read(b: &[u8]) -> Option<RawRecord> {
        Some(RawRecord {
            site: i32_at(b, 0)?,
            stub: i32_at(b, 4)?,
            op: u16_at(b, 8)?,
            site_len: u8_at(b, 10)?,
            insn_len: u8_at(b, 11)?,
            form: u8_at(b, 12)?,
            operand: u8_at(b, 13)?,
            reg: u8_at(b, 14)?,
            reg2: u8_at(b, 15)?,
            width: u8_at(b, 16)?,
            flags: u8_at(b, 17)?,
            port: u16_at(b, 18)?,
            clobbers: u32_at(b, 20)?,
        })
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..4].copy_from_slice(&self.site.to_le_bytes());
        b[4..8].copy_from_slice(&self.stub.to_le_bytes());
        b[8..10].copy_from_slice(&self.op.to_le_bytes());
        b[10] = self.site_len;
        b[11] = self.insn_len;
        b[12] = self.form;
        b[13] = self.operand;
        b[14] = self.reg;
        b[15] = self.reg2;
        b[16] = self.width;
        b[17] = self.flags;
        b[18..20].copy_from_slice(&self.port.to_le_bytes());
        b[20..24].copy_from_slice(&self.clobbers.to_le_bytes());
        b
    }
}

/// The form a site was emitted in: what its bytes hold before patching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Form {
    /// The native instruction, followed by `site_len - insn_len` bytes of NOP.
    Native = 0,
    /// An indirect call through an ops table (`call [rip+disp32]`, 6 bytes), then NOPs.
    IndirectCall = 1,
    /// The site holds a `jmp` to a stub; the stub's first `site_len` bytes are the patchable
    /// copy of the instruction, followed by the moved instructions and a `jmp` back.
    Detour = 2,
    /// A trapping instruction (`int3`, `ud2`) that the runtime emulates.
    Trap = 3,
}

impl Form {
    /// The form with code `c`.
    pub const fn from_code(c: u8) -> Option<Form> {
        match c {
            0 => Some(Form::Native),
            1 => Some(Form::IndirectCall),
            2 => Some(Form::Detour),
            3 => Some(Form::Trap),
            _ => None,
        }
    }

    /// The name reports use.
    pub const fn name(self) -> &'static str {
        match self {
            Form::Native => "native",
            Form::IndirectCall => "indirect_call",
            Form::Detour => "detour",
            Form::Trap => "trap",
        }
    }
}

/// A half-open address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrRange {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

impl AddrRange {
    /// `[start, end)`.
    pub const fn new(start: u64, end: u64) -> Self {
        AddrRange { start, end }
    }

    /// Every address.
    pub const EVERYTHING: AddrRange = AddrRange {
        start: 0,
        end: u64::MAX,
    };

    /// Whether `[addr, addr + len)` lies inside.
    pub fn contains_span(&self, addr: u64, len: u64) -> bool {
        match addr.checked_add(len) {
            Some(e) => addr >= self.start && e <= self.end,
            None => false,
        }
    }
}

fn in_image(image: &[AddrRange], addr: u64, len: u64) -> bool {
    image.iter().any(|r| r.contains_span(addr, len))
}

/// A site, decoded and resolved to absolute addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Site {
    /// Address of the site's first byte.
    pub addr: u64,
    /// Bytes that may be rewritten.
    pub site_len: u8,
    /// Length of the original instruction (or idiom).
    pub insn_len: u8,
    /// Op id (see [`Site::op`]).
    pub op_id: u16,
    /// Emitted form.
    pub form: Form,
    /// Operand.
    pub operand: Operand,
    /// Operand width in bytes (0 when the op has none).
    pub width: u8,
    /// Site flags.
    pub flags: u8,
    /// What the surrounding code lets a rewrite clobber.
    pub clobbers: RegSet,
    /// The stub, for [`Form::Detour`].
    pub stub: Option<u64>,
}

impl Site {
    /// The op, if this reader knows its id.
    pub fn op(&self) -> Option<Op> {
        Op::from_id(self.op_id)
    }

    /// One past the site's last byte.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.site_len as u64)
    }

    /// Where a patch is written: the stub for a detour, the site otherwise.
    pub fn patch_addr(&self) -> u64 {
        match (self.form, self.stub) {
            (Form::Detour, Some(s)) => s,
            _ => self.addr,
        }
    }

    /// Encodes the site as a record that will lie at `record_addr`.
    pub fn to_raw(&self, record_addr: u64) -> Result<RawRecord, RecordError> {
        let site = rel_to(record_addr, self.addr).ok_or(RecordError::OffsetOutOfRange)?;
        let stub = match self.stub {
            Some(s) => {
                let r =
                    rel_to(record_addr.wrapping_add(4), s).ok_or(RecordError::OffsetOutOfRange)?;
                if r == 0 {
                    return Err(RecordError::OffsetOutOfRange);
                }
                r
            }
            None => 0,
        };
        Ok(RawRecord {
            site,
            stub,
            op: self.op_id,
            site_len: self.site_len,
            insn_len: self.insn_len,
            form: self.form as u8,
            operand: self.operand.code(),
            reg: self.operand.reg_byte(),
            reg2: self.operand.reg2_byte(),
            width: self.width,
            flags: self.flags,
            port: self.operand.port_field(),
            clobbers: self.clobbers.0,
        })
    }
}

/// Why one record is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The site's bytes are not all inside the image's code.
    SiteOutsideImage {
        /// The site's resolved address (0 if it overflowed).
        addr: u64,
    },
    /// The stub's patchable bytes are not all inside the image's code.
    StubOutsideImage {
        /// The stub's resolved address.
        addr: u64,
    },
    /// An offset does not fit the field, or resolves past the address space.
    OffsetOutOfRange,
    /// The original instruction is longer than the room the site has.
    SiteLongerThanRoom {
        /// Original instruction length.
        insn_len: u8,
        /// Room.
        site_len: u8,
    },
    /// A zero-length instruction or an instruction longer than 15 bytes.
    BadInstructionLength(u8),
    /// An unknown form code.
    BadForm(u8),
    /// A form's requirement is not met (detour without stub, stub without detour, short
    /// indirect call).
    FormMismatch,
    /// An unknown operand-kind code.
    BadOperandKind(u8),
    /// A register field that is not 0..=15 (or 0xFF where unused), or used where it must not be.
    BadRegister,
    /// A width other than 0, 1, 2, 4, 8.
    BadWidth(u8),
    /// A port field on an operand that has none, or above 255.
    BadPort,
    /// Reserved flag or clobber bits set, or `rep` on an op that has none.
    ReservedBits,
    /// The op does not accept this operand.
    Operand(OperandError),
    /// The site overlaps an earlier one.
    Overlap {
        /// Index of the record it overlaps.
        other: u32,
    },
    /// A sealed table's records are not in ascending address order.
    Unsorted,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::SiteOutsideImage { addr } => {
                write!(f, "site at {addr:#x} lies outside the image's code")
            }
            RecordError::StubOutsideImage { addr } => {
                write!(f, "stub at {addr:#x} lies outside the image's code")
            }
            RecordError::OffsetOutOfRange => f.write_str("offset out of range"),
            RecordError::SiteLongerThanRoom { insn_len, site_len } => write!(
                f,
                "instruction of {insn_len} bytes is longer than the site's room of {site_len}"
            ),
            RecordError::BadInstructionLength(n) => write!(f, "instruction length {n}"),
            RecordError::BadForm(c) => write!(f, "unknown form code {c}"),
            RecordError::FormMismatch => f.write_str("the form's requirements are not met"),
            RecordError::BadOperandKind(c) => write!(f, "unknown operand kind {c}"),
            RecordError::BadRegister => f.write_str("invalid register field"),
            RecordError::BadWidth(w) => write!(f, "invalid operand width {w}"),
            RecordError::BadPort => f.write_str("invalid port field"),
            RecordError::ReservedBits => f.write_str("reserved bits set"),
            RecordError::Operand(e) => write!(f, "{e}"),
            RecordError::Overlap { other } => write!(f, "overlaps the site of record {other}"),
            RecordError::Unsorted => f.write_str("sealed table records are not sorted"),
        }
    }
}

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
                    "unsupported table version {v} (this reader knows {TABLE_VERSION})"
                )
            }
            TableError::BadHeaderSize(s) => write!(f, "header size {s}, expected {HEADER_SIZE}"),
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
        if raw.version != TABLE_VERSION {
            return Err(TableError::UnsupportedVersion(raw.version));
        }
        if raw.header_size as usize != HEADER_SIZE {
            return Err(TableError::BadHeaderSize(raw.header_size));
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
        Ok(Header {
            addr,
            raw,
            records_begin: begin,
            records_end: end,
        })
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

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        header_bytes(&self.raw)
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

fn header_bytes(raw: &RawHeader) -> [u8; HEADER_SIZE] {
    let mut b = [0u8; HEADER_SIZE];
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

fn checksum(header: &[u8; HEADER_SIZE], records: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(&header[..28]);
    c.update_zeros(4);
    c.update(records);
    c.finish()
}

/// Decodes and checks one record that lies at `record_addr`, against the image's code ranges.
/// Checks that need other records (overlap, order) are the table's.
pub fn decode_record(
    raw: &RawRecord,
    record_addr: u64,
    image: &[AddrRange],
) -> Result<Site, RecordError> {
    let addr = self_relative(record_addr, 0, raw.site).ok_or(RecordError::OffsetOutOfRange)?;
    let form = Form::from_code(raw.form).ok_or(RecordError::BadForm(raw.form))?;
    if raw.insn_len == 0 || raw.insn_len > MAX_INSN_LEN {
        return Err(RecordError::BadInstructionLength(raw.insn_len));
    }
    if raw.insn_len > raw.site_len {
        return Err(RecordError::SiteLongerThanRoom {
            insn_len: raw.insn_len,
            site_len: raw.site_len,
        });
    }
    if !in_image(image, addr, raw.site_len as u64) {
        return Err(RecordError::SiteOutsideImage { addr });
    }
    let stub = if raw.stub == 0 {
        None
    } else {
        Some(self_relative(record_addr, 4, raw.stub).ok_or(RecordError::OffsetOutOfRange)?)
    };
    #[allow(clippy::collapsible_match)] // a guard would send a valid detour to the `_` arm
    match (form, stub) {
        (Form::Detour, None) => return Err(RecordError::FormMismatch),
        (Form::Detour, Some(s)) => {
            if !in_image(image, s, raw.site_len as u64) {
                return Err(RecordError::StubOutsideImage { addr: s });
            }
        }
        (_, Some(_)) => return Err(RecordError::FormMismatch),
        (Form::IndirectCall, None) if raw.insn_len < 2 => return Err(RecordError::FormMismatch),
        _ => {}
    }
    let operand = decode_operand(raw)?;
    if !matches!(raw.width, 0 | 1 | 2 | 4 | 8) {
        return Err(RecordError::BadWidth(raw.width));
    }
    if raw.flags & !SITE_FLAG_REP != 0 || raw.clobbers & !RegSet::VALID.0 != 0 {
        return Err(RecordError::ReservedBits);
    }
    if let Some(op) = Op::from_id(raw.op) {
        check_operand(op, operand, raw.width).map_err(RecordError::Operand)?;
        if raw.flags & SITE_FLAG_REP != 0 && !matches!(op, Op::Ins | Op::Outs) {
            return Err(RecordError::ReservedBits);
        }
    }
    Ok(Site {
        addr,
        site_len: raw.site_len,
        insn_len: raw.insn_len,
        op_id: raw.op,
        form,
        operand,
        width: raw.width,
        flags: raw.flags,
        clobbers: RegSet(raw.clobbers),
        stub,
    })
}

fn decode_operand(raw: &RawRecord) -> Result<Operand, RecordError> {
    let gpr = |b: u8| Gpr::from_number(b).ok_or(RecordError::BadRegister);
    let none = |b: u8| {
        if b == NO_REG {
            Ok(())
        } else {
            Err(RecordError::BadRegister)
        }
    };
    if raw.operand != operand_code::PORT_IMM && raw.port != 0 {
        return Err(RecordError::BadPort);
    }
    let op = match raw.operand {
        operand_code::NONE | operand_code::PORT_DX | operand_code::MEM_OTHER => {
            none(raw.reg)?;
            none(raw.reg2)?;
            match raw.operand {
                operand_code::NONE => Operand::None,
                operand_code::PORT_DX => Operand::PortDx,
                _ => Operand::MemOther,
            }
        }
        operand_code::PORT_IMM => {
            none(raw.reg)?;
            none(raw.reg2)?;
            let p = u8::try_from(raw.port).map_err(|_| RecordError::BadPort)?;
            Operand::PortImm(p)
        }
        operand_code::REG | operand_code::MEM_BASE => {
            let r = gpr(raw.reg)?;
            none(raw.reg2)?;
            if raw.operand == operand_code::REG {
                Operand::Reg(r)
            } else {
                Operand::MemBase(r)
            }
        }
        operand_code::DEBUG_REG => {
            if raw.reg2 > 7 {
                return Err(RecordError::Operand(OperandError::BadDebugRegister));
            }
            Operand::DebugReg {
                dr: raw.reg2,
                reg: gpr(raw.reg)?,
            }
        }
        operand_code::REG_MEM_BASE => Operand::RegMemBase {
            reg: gpr(raw.reg)?,
            base: gpr(raw.reg2)?,
        },
        c => return Err(RecordError::BadOperandKind(c)),
    };
    Ok(op)
}

/// A table whose header, checksum and every record passed their checks.
#[derive(Clone, Copy, Debug)]
pub struct SiteTable<'a> {
    header: Header,
    records: &'a [u8],
    unknown_ops: u32,
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
            let computed = checksum(&header.to_bytes(), records);
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
        let table = SiteTable {
            header,
            records,
            unknown_ops,
        };
        if !sorted {
            match spans {
                Some(s) => check_overlaps_sorted(s)?,
                None => table.check_overlaps_unsorted()?,
            }
        }
        Ok(table)
    }

    /// Parses a table whose header and records lie together in `bytes`, which starts at `addr`
    /// (a sealed table as the post-link tool writes it, or a test's).
    pub fn parse_contiguous(
        bytes: &'a [u8],
        addr: u64,
        image: &[AddrRange],
    ) -> Result<SiteTable<'a>, TableError> {
        let header = Header::parse(bytes, addr)?;
        let needed = header.records_len();
        let start = header
            .records_begin
            .checked_sub(addr)
            .ok_or(TableError::BadExtent)?;
        let end = start.checked_add(needed).ok_or(TableError::BadExtent)?;
        if start < HEADER_SIZE as u64 || end > bytes.len() as u64 {
            return Err(TableError::TruncatedRecords {
                needed,
                available: bytes.len(),
            });
        }
        SiteTable::parse(header, &bytes[start as usize..end as usize], image)
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

    /// Every site, in table order.
    pub fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        (0..self.len()).filter_map(move |i| self.site(i))
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

impl core::error::Error for RecordError {}
impl core::error::Error for TableError {}
impl core::error::Error for WriteError {}
