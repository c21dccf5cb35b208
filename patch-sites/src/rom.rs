//! The backend ROM, version 1: a blob a hypervisor publishes (for QEMU, through fw_cfg) that
//! says, per op, what a site should become under it: an inline template with operand slots, a
//! call to an entry point inside the ROM, the native instruction, or nothing at all.
//!
//! This module checks the ROM's *structure*: header, checksum, every entry's extent and fields.
//! Whether each template's instructions are acceptable for its op (they decode, stay inside
//! themselves, use only allowed instructions) is checked by the runtime with a decoder before
//! the ROM is used; see `pvpatch-runtime`.

use core::fmt;
use core::mem::{offset_of, size_of};

use crate::crc32::Crc32;
use crate::le::{put, u8_at, u16_at, u32_at};
use crate::op::Op;
use crate::regs::RegSet;

/// The first eight bytes of every ROM.
pub const ROM_MAGIC: [u8; 8] = *b"PVPATROM";
/// The only ROM version this reader accepts.
pub const ROM_VERSION: u16 = 1;
/// ROM header size.
pub const ROM_HEADER_SIZE: usize = 64;
/// ROM entry size.
pub const ROM_ENTRY_SIZE: usize = 24;
/// ROM slot size.
pub const ROM_SLOT_SIZE: usize = 4;
/// The largest ROM accepted.
pub const MAX_ROM_LEN: usize = 64 * 1024;
/// The longest inline template.
pub const MAX_TEMPLATE_LEN: usize = 64;
/// The most slots one template may have.
pub const MAX_SLOTS: usize = 8;
/// The fw_cfg file name QEMU publishes a ROM under for the runtime.
pub const FW_CFG_NAME: &str = "opt/pvpatch/rom";

/// The ROM header as it lies in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRomHeader {
    /// [`ROM_MAGIC`].
    pub magic: [u8; 8],
    /// [`ROM_VERSION`].
    pub version: u16,
    /// [`ROM_HEADER_SIZE`].
    pub header_size: u16,
    /// [`ROM_ENTRY_SIZE`].
    pub entry_size: u16,
    /// Number of entries.
    pub entry_count: u16,
    /// Length of the whole ROM in bytes.
    pub total_len: u32,
    /// CRC-32 of the whole ROM with this field zero.
    pub checksum: u32,
    /// Backend name: printable ASCII, NUL-padded.
    pub name: [u8; 16],
    /// The CPUID 0x4000_0000 signature (ebx, ecx, edx) the ROM serves; all zero for any.
    pub signature: [u8; 12],
    /// Reserved, zero.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: [u32; 2],
}

const _: () = assert!(size_of::<RawRomHeader>() == ROM_HEADER_SIZE);
const _: () = assert!(offset_of!(RawRomHeader, entry_count) == 14);
const _: () = assert!(offset_of!(RawRomHeader, total_len) == 16);
const _: () = assert!(offset_of!(RawRomHeader, checksum) == 20);
const _: () = assert!(offset_of!(RawRomHeader, name) == 24);
const _: () = assert!(offset_of!(RawRomHeader, signature) == 40);
const _: () = assert!(offset_of!(RawRomHeader, flags) == 52);

/// A ROM entry as it lies in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRomEntry {
    /// Op id.
    pub op: u16,
    /// [`RomKind`] code.
    pub kind: u8,
    /// Number of slots (inline templates only).
    pub slot_count: u8,
    /// Offset of the template or entry-point code from the ROM's start.
    pub code_off: u32,
    /// Length of the template or entry-point code.
    pub code_len: u16,
    /// Reserved, zero.
    pub reserved0: u16,
    /// Registers and flags the sequence clobbers beyond the op's outputs.
    pub clobbers: u32,
    /// Offset of the slot array from the ROM's start.
    pub slots_off: u32,
    /// Reserved, zero.
    pub reserved1: u32,
}

const _: () = assert!(size_of::<RawRomEntry>() == ROM_ENTRY_SIZE);
const _: () = assert!(offset_of!(RawRomEntry, code_off) == 4);
const _: () = assert!(offset_of!(RawRomEntry, code_len) == 8);
const _: () = assert!(offset_of!(RawRomEntry, clobbers) == 12);
const _: () = assert!(offset_of!(RawRomEntry, slots_off) == 16);

/// What a ROM says to do with an op's sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RomKind {
    /// Nothing: the site becomes NOPs (the op has no effect under this backend).
    Nothing = 0,
    /// Keep the native instruction.
    Native = 1,
    /// Copy the inline template into the site, operands substituted, NOP-padded.
    Inline = 2,
    /// Call the entry point (a `call rel32` to code inside the ROM), NOP-padded.
    Call = 3,
}

impl RomKind {
    /// The kind with code `c`.
    pub const fn from_code(c: u8) -> Option<RomKind> {
        match c {
            0 => Some(RomKind::Nothing),
            1 => Some(RomKind::Native),
            2 => Some(RomKind::Inline),
            3 => Some(RomKind::Call),
            _ => None,
        }
    }

    /// The name `rom show` and ROM descriptions use.
    pub const fn name(self) -> &'static str {
        match self {
            RomKind::Nothing => "nothing",
            RomKind::Native => "native",
            RomKind::Inline => "inline",
            RomKind::Call => "call",
        }
    }
}

/// Where an operand goes in a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SlotKind {
    /// The template byte at `offset` becomes the immediate port.
    Imm8 = 1,
    /// Bits 5:3 of the ModRM byte at `offset` become the register's low bits; REX.R at
    /// `rex_offset` its high bit.
    ModrmReg = 2,
    /// Bits 2:0 of the ModRM byte at `offset`; REX.B at `rex_offset`.
    ModrmRm = 3,
    /// Bits 2:0 of the opcode byte at `offset` (`push r`, `pop r`); REX.B at `rex_offset`.
    OpcodeReg = 4,
}

/// Which of the site's operands a slot takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SlotSource {
    /// The immediate port.
    Port = 0,
    /// The operand's register (`reg`).
    Reg = 1,
    /// The operand's second register (`reg2`: a memory base).
    Reg2 = 2,
}

/// One operand slot of a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slot {
    /// How the operand is encoded.
    pub kind: SlotKind,
    /// Offset of the byte in the template.
    pub offset: u8,
    /// Offset of the REX prefix in the template, or 0xFF if it has none (then only registers
    /// 0..=7 can be substituted).
    pub rex_offset: u8,
    /// Which operand.
    pub source: SlotSource,
}

/// The value of `rex_offset` for a template without a REX prefix.
pub const NO_REX: u8 = 0xFF;

impl Slot {
    fn decode(b: &[u8]) -> Option<Slot> {
        let kind = match u8_at(b, 0)? {
            1 => SlotKind::Imm8,
            2 => SlotKind::ModrmReg,
            3 => SlotKind::ModrmRm,
            4 => SlotKind::OpcodeReg,
            _ => return None,
        };
        let source = match u8_at(b, 3)? {
            0 => SlotSource::Port,
            1 => SlotSource::Reg,
            2 => SlotSource::Reg2,
            _ => return None,
        };
        if (kind == SlotKind::Imm8) != (source == SlotSource::Port) {
            return None;
        }
        Some(Slot {
            kind,
            offset: u8_at(b, 1)?,
            rex_offset: u8_at(b, 2)?,
            source,
        })
    }

    fn encode(&self) -> [u8; ROM_SLOT_SIZE] {
        [
            self.kind as u8,
            self.offset,
            self.rex_offset,
            self.source as u8,
        ]
    }
}

/// What an entry says, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomAction<'a> {
    /// The site becomes NOPs.
    Nothing,
    /// The site stays native.
    Native,
    /// An inline template.
    Inline {
        /// Its bytes (operands still to be substituted).
        template: &'a [u8],
        /// Its slots (`slot_count` of them are used).
        slots: [Option<Slot>; MAX_SLOTS],
    },
    /// A call to the entry point at `code_off` from the ROM's start.
    Call {
        /// Offset of the entry point from the ROM's start.
        code_off: u32,
        /// The entry point's code.
        code: &'a [u8],
    },
}

/// One checked entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RomEntry<'a> {
    /// Op id (the op may be unknown to this reader; see [`RomEntry::op`]).
    pub op_id: u16,
    /// What to do.
    pub action: RomAction<'a>,
    /// Registers and flags the sequence clobbers beyond the op's outputs.
    pub clobbers: RegSet,
}

impl RomEntry<'_> {
    /// The op, if this reader knows it.
    pub fn op(&self) -> Option<Op> {
        Op::from_id(self.op_id)
    }

    /// The kind.
    pub fn kind(&self) -> RomKind {
        match self.action {
            RomAction::Nothing => RomKind::Nothing,
            RomAction::Native => RomKind::Native,
            RomAction::Inline { .. } => RomKind::Inline,
            RomAction::Call { .. } => RomKind::Call,
        }
    }

    /// The slots in use.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        let slots = match &self.action {
            RomAction::Inline { slots, .. } => &slots[..],
            _ => &[],
        };
        slots.iter().filter_map(|s| *s)
    }
}

/// Why a ROM is refused. A refused ROM is not used at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomError {
    /// Fewer bytes than a header.
    TruncatedHeader {
        /// Bytes available.
        available: usize,
    },
    /// Not a ROM.
    BadMagic,
    /// A version this reader does not know.
    UnsupportedVersion(u16),
    /// Header size field is wrong.
    BadHeaderSize(u16),
    /// Entry size field is wrong.
    EntrySizeMismatch {
        /// The size the ROM claims.
        found: u16,
    },
    /// More bytes than [`MAX_ROM_LEN`].
    TooLong {
        /// Bytes given.
        len: usize,
    },
    /// `total_len` disagrees with the bytes given.
    LengthMismatch {
        /// The header's total length.
        total_len: u32,
        /// Bytes available.
        available: usize,
    },
    /// The entry table does not fit.
    EntriesOverflow {
        /// The header's count.
        count: u16,
        /// Bytes given.
        available: usize,
    },
    /// The checksum does not match.
    BadChecksum {
        /// The header's value.
        stored: u32,
        /// The computed value.
        computed: u32,
    },
    /// The name is empty, not printable ASCII, or not NUL-padded.
    BadName,
    /// Reserved header fields are nonzero.
    ReservedHeaderBits,
    /// An entry is wrong.
    Entry {
        /// Its index.
        index: u16,
        /// What is wrong.
        error: RomEntryError,
    },
}

/// Why one ROM entry is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomEntryError {
    /// An unknown kind code.
    BadKind(u8),
    /// The code lies outside the ROM's data area, or is empty where it must not be.
    CodeOutOfBounds,
    /// An inline template longer than [`MAX_TEMPLATE_LEN`].
    TemplateTooLong(u16),
    /// More than [`MAX_SLOTS`] slots.
    TooManySlots(usize),
    /// The slot array lies outside the ROM's data area.
    BadSlots,
    /// A slot with an unknown kind or source, or pointing outside its template.
    BadSlot(u8),
    /// Fields that must be zero for this kind are not.
    UnexpectedFields,
    /// Reserved bits set.
    ReservedBits,
    /// The same op appears in an earlier entry.
    DuplicateOp {
        /// The earlier entry.
        other: u16,
    },
}

impl fmt::Display for RomEntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RomEntryError::BadKind(k) => write!(f, "unknown kind {k}"),
            RomEntryError::CodeOutOfBounds => f.write_str("code outside the ROM's data area"),
            RomEntryError::TemplateTooLong(n) => {
                write!(
                    f,
                    "inline template of {n} bytes, more than the {MAX_TEMPLATE_LEN}-byte limit"
                )
            }
            RomEntryError::TooManySlots(n) => {
                write!(f, "{n} slots, more than the limit of {MAX_SLOTS}")
            }
            RomEntryError::BadSlots => f.write_str("slot array outside the ROM's data area"),
            RomEntryError::BadSlot(i) => write!(f, "slot {i} is invalid"),
            RomEntryError::UnexpectedFields => f.write_str("fields set that this kind has not"),
            RomEntryError::ReservedBits => f.write_str("reserved bits set"),
            RomEntryError::DuplicateOp { other } => write!(f, "op already in entry {other}"),
        }
    }
}

impl fmt::Display for RomError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RomError::TruncatedHeader { available } => {
                write!(
                    f,
                    "truncated ROM header: {available} bytes, {ROM_HEADER_SIZE} needed"
                )
            }
            RomError::BadMagic => f.write_str("bad magic (not a pvpatch backend ROM)"),
            RomError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported ROM version {v} (this reader knows {ROM_VERSION})"
                )
            }
            RomError::BadHeaderSize(s) => write!(f, "header size {s}, expected {ROM_HEADER_SIZE}"),
            RomError::EntrySizeMismatch { found } => {
                write!(f, "entry size {found}, expected {ROM_ENTRY_SIZE}")
            }
            RomError::TooLong { len } => {
                write!(
                    f,
                    "ROM is {len} bytes, more than the {MAX_ROM_LEN}-byte limit"
                )
            }
            RomError::LengthMismatch {
                total_len,
                available,
            } => write!(
                f,
                "total length {total_len} disagrees with the {available} bytes given"
            ),
            RomError::EntriesOverflow { count, available } => write!(
                f,
                "{count} entries need {} bytes with the header, more than the {available} \
                 bytes of the ROM",
                ROM_HEADER_SIZE + *count as usize * ROM_ENTRY_SIZE
            ),
            RomError::BadChecksum { stored, computed } => write!(
                f,
                "bad checksum: stored {stored:#010x}, computed {computed:#010x}"
            ),
            RomError::BadName => f.write_str("backend name is not NUL-padded printable ASCII"),
            RomError::ReservedHeaderBits => f.write_str("reserved header fields are nonzero"),
            RomError::Entry { index, error } => write!(f, "entry {index}: {error}"),
        }
    }
}

/// A ROM whose structure passed every check.
#[derive(Clone, Copy, Debug)]
pub struct Rom<'a> {
    bytes: &'a [u8],
    header: RawRomHeader,
    unknown_ops: u16,
}

fn rom_checksum(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(&bytes[..20]);
    c.update_zeros(4);
    c.update(&bytes[24..]);
    c.finish()
}

fn name_ok(name: &[u8; 16]) -> bool {
    let len = name.iter().position(|&b| b == 0).unwrap_or(16);
    len > 0
        && name[..len]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ')
        && name[len..].iter().all(|&b| b == 0)
}

impl<'a> Rom<'a> {
    /// Parses and checks a whole ROM; `bytes` must be exactly the ROM.
    pub fn parse(bytes: &'a [u8]) -> Result<Rom<'a>, RomError> {
        if bytes.len() < ROM_HEADER_SIZE {
            return Err(RomError::TruncatedHeader {
                available: bytes.len(),
            });
        }
        if bytes[..8] != ROM_MAGIC {
            return Err(RomError::BadMagic);
        }
        let h16 = |o| u16_at(bytes, o).unwrap_or(0);
        let h32 = |o| u32_at(bytes, o).unwrap_or(0);
        let mut name = [0u8; 16];
        name.copy_from_slice(&bytes[24..40]);
        let mut signature = [0u8; 12];
        signature.copy_from_slice(&bytes[40..52]);
        let header = RawRomHeader {
            magic: ROM_MAGIC,
            version: h16(8),
            header_size: h16(10),
            entry_size: h16(12),
            entry_count: h16(14),
            total_len: h32(16),
            checksum: h32(20),
            name,
            signature,
            flags: h32(52),
            reserved: [h32(56), h32(60)],
        };
        if header.version != ROM_VERSION {
            return Err(RomError::UnsupportedVersion(header.version));
        }
        if header.header_size as usize != ROM_HEADER_SIZE {
            return Err(RomError::BadHeaderSize(header.header_size));
        }
        if header.entry_size as usize != ROM_ENTRY_SIZE {
            return Err(RomError::EntrySizeMismatch {
                found: header.entry_size,
            });
        }
        if bytes.len() > MAX_ROM_LEN {
            return Err(RomError::TooLong { len: bytes.len() });
        }
        if header.total_len as usize != bytes.len() {
            return Err(RomError::LengthMismatch {
                total_len: header.total_len,
                available: bytes.len(),
            });
        }
        let data_start = ROM_HEADER_SIZE + header.entry_count as usize * ROM_ENTRY_SIZE;
        if data_start > bytes.len() {
            return Err(RomError::EntriesOverflow {
                count: header.entry_count,
                available: bytes.len(),
            });
        }
        let computed = rom_checksum(bytes);
        if computed != header.checksum {
            return Err(RomError::BadChecksum {
                stored: header.checksum,
                computed,
            });
        }
        if !name_ok(&header.name) {
            return Err(RomError::BadName);
        }
        if header.flags != 0 || header.reserved != [0, 0] {
            return Err(RomError::ReservedHeaderBits);
        }
        let mut rom = Rom {
            bytes,
            header,
            unknown_ops: 0,
        };
        for i in 0..header.entry_count {
            let e = rom
                .entry_at(i, data_start)
                .map_err(|error| RomError::Entry { index: i, error })?;
            for j in 0..i {
                let other = u16_at(bytes, ROM_HEADER_SIZE + j as usize * ROM_ENTRY_SIZE);
                if other == Some(e.op_id) {
                    let error = RomEntryError::DuplicateOp { other: j };
                    return Err(RomError::Entry { index: i, error });
                }
            }
            if e.op().is_none() {
                rom.unknown_ops += 1;
            }
        }
        Ok(rom)
    }

    fn raw_entry(&self, i: u16) -> Option<RawRomEntry> {
        let b = self
            .bytes
            .get(ROM_HEADER_SIZE + i as usize * ROM_ENTRY_SIZE..)?;
        Some(RawRomEntry {
            op: u16_at(b, 0)?,
            kind: u8_at(b, 2)?,
            slot_count: u8_at(b, 3)?,
            code_off: u32_at(b, 4)?,
            code_len: u16_at(b, 8)?,
            reserved0: u16_at(b, 10)?,
            clobbers: u32_at(b, 12)?,
            slots_off: u32_at(b, 16)?,
            reserved1: u32_at(b, 20)?,
        })
    }

    fn entry_at(&self, i: u16, data_start: usize) -> Result<RomEntry<'a>, RomEntryError> {
        let raw = self.raw_entry(i).ok_or(RomEntryError::CodeOutOfBounds)?;
        let kind = RomKind::from_code(raw.kind).ok_or(RomEntryError::BadKind(raw.kind))?;
        if raw.reserved0 != 0 || raw.reserved1 != 0 || raw.clobbers & !RegSet::VALID.0 != 0 {
            return Err(RomEntryError::ReservedBits);
        }
        let data = |off: u32, len: usize| -> Option<&'a [u8]> {
            let off = off as usize;
            if off < data_start || len == 0 {
                return None;
            }
            self.bytes.get(off..off.checked_add(len)?)
        };
        let action = match kind {
            RomKind::Nothing | RomKind::Native => {
                if raw.code_off != 0
                    || raw.code_len != 0
                    || raw.slot_count != 0
                    || raw.slots_off != 0
                {
                    return Err(RomEntryError::UnexpectedFields);
                }
                if kind == RomKind::Nothing {
                    RomAction::Nothing
                } else {
                    RomAction::Native
                }
            }
            RomKind::Call => {
                if raw.slot_count != 0 || raw.slots_off != 0 {
                    return Err(RomEntryError::UnexpectedFields);
                }
                let code = data(raw.code_off, raw.code_len as usize)
                    .ok_or(RomEntryError::CodeOutOfBounds)?;
                RomAction::Call {
                    code_off: raw.code_off,
                    code,
                }
            }
            RomKind::Inline => {
                if raw.code_len as usize > MAX_TEMPLATE_LEN {
                    return Err(RomEntryError::TemplateTooLong(raw.code_len));
                }
                let template = data(raw.code_off, raw.code_len as usize)
                    .ok_or(RomEntryError::CodeOutOfBounds)?;
                let n = raw.slot_count as usize;
                if n > MAX_SLOTS {
                    return Err(RomEntryError::TooManySlots(n));
                }
                let mut slots = [None; MAX_SLOTS];
                if n == 0 {
                    if raw.slots_off != 0 {
                        return Err(RomEntryError::UnexpectedFields);
                    }
                } else {
                    let table =
                        data(raw.slots_off, n * ROM_SLOT_SIZE).ok_or(RomEntryError::BadSlots)?;
                    for (k, slot) in slots.iter_mut().enumerate().take(n) {
                        let bad = RomEntryError::BadSlot(k as u8);
                        let s = Slot::decode(&table[k * ROM_SLOT_SIZE..]).ok_or(bad)?;
                        let inside = |o: u8| (o as usize) < template.len();
                        if !inside(s.offset) || !(s.rex_offset == NO_REX || inside(s.rex_offset)) {
                            return Err(bad);
                        }
                        *slot = Some(s);
                    }
                }
                RomAction::Inline { template, slots }
            }
        };
        Ok(RomEntry {
            op_id: raw.op,
            action,
            clobbers: RegSet(raw.clobbers),
        })
    }

    /// The ROM's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The header.
    pub fn header(&self) -> &RawRomHeader {
        &self.header
    }

    /// The backend name.
    pub fn name(&self) -> &str {
        let len = self.header.name.iter().position(|&b| b == 0).unwrap_or(16);
        // `name_ok` checked it is ASCII.
        core::str::from_utf8(&self.bytes[24..24 + len]).unwrap_or("?")
    }

    /// The CPUID signature served (all zero: any).
    pub fn signature(&self) -> [u8; 12] {
        self.header.signature
    }

    /// Whether the ROM serves a hypervisor with this CPUID 0x4000_0000 signature.
    pub fn serves(&self, signature: &[u8; 12]) -> bool {
        self.header.signature == [0; 12] || self.header.signature == *signature
    }

    /// Number of entries.
    pub fn len(&self) -> u16 {
        self.header.entry_count
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.header.entry_count == 0
    }

    /// Entries naming an op this reader does not know (they are ignored).
    pub fn unknown_ops(&self) -> u16 {
        self.unknown_ops
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = RomEntry<'a>> + '_ {
        let data_start = ROM_HEADER_SIZE + self.header.entry_count as usize * ROM_ENTRY_SIZE;
        (0..self.header.entry_count).filter_map(move |i| self.entry_at(i, data_start).ok())
    }

    /// The entry for `op`, if the ROM has one.
    pub fn entry(&self, op: Op) -> Option<RomEntry<'a>> {
        self.entries().find(|e| e.op_id == op.id())
    }
}

/// An entry to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RomEntrySpec<'s> {
    /// Op id.
    pub op_id: u16,
    /// What to do.
    pub kind: RomKind,
    /// Template or entry-point code (empty for `Nothing`/`Native`).
    pub code: &'s [u8],
    /// Slots (inline only).
    pub slots: &'s [Slot],
    /// Clobbers beyond the op's outputs.
    pub clobbers: RegSet,
}

impl<'s> RomEntrySpec<'s> {
    /// An entry for `op` of `kind` with `code`, no slots and no clobbers beyond the op's
    /// outputs (set the fields for more).
    pub const fn new(op: Op, kind: RomKind, code: &'s [u8]) -> RomEntrySpec<'s> {
        RomEntrySpec {
            op_id: op.id(),
            kind,
            code,
            slots: &[],
            clobbers: RegSet::EMPTY,
        }
    }
}

/// Why a ROM could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomWriteError {
    /// The output buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The ROM would be longer than [`MAX_ROM_LEN`].
    TooLong {
        /// Bytes it would take.
        needed: usize,
    },
    /// The name is empty, longer than 16 bytes, or not printable ASCII.
    BadName,
    /// The written ROM does not pass [`Rom::parse`].
    Invalid(RomError),
}

impl fmt::Display for RomWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RomWriteError::BufferTooSmall { needed } => {
                write!(f, "buffer too small: {needed} bytes needed")
            }
            RomWriteError::TooLong { needed } => write!(
                f,
                "the ROM would be {needed} bytes, more than the {MAX_ROM_LEN}-byte limit"
            ),
            RomWriteError::BadName => f.write_str("name must be 1-16 printable ASCII characters"),
            RomWriteError::Invalid(e) => write!(f, "the ROM would be invalid: {e}"),
        }
    }
}

/// Alignment of entry-point code inside a written ROM.
pub const CALL_ALIGN: usize = 16;

/// Bytes a ROM of these entries occupies when written by [`write_rom`].
pub fn rom_size(entries: &[RomEntrySpec<'_>]) -> usize {
    let mut off = ROM_HEADER_SIZE + entries.len() * ROM_ENTRY_SIZE;
    for e in entries {
        if e.kind == RomKind::Call {
            off = off.next_multiple_of(CALL_ALIGN);
        }
        off += e.code.len();
        off += e.slots.len() * ROM_SLOT_SIZE;
    }
    off
}

/// Writes a ROM into `out`; returns its length. The result is parsed back before returning, so
/// a ROM this function writes is one [`Rom::parse`] accepts.
pub fn write_rom(
    name: &str,
    signature: [u8; 12],
    entries: &[RomEntrySpec<'_>],
    out: &mut [u8],
) -> Result<usize, RomWriteError> {
    let nb = name.as_bytes();
    if nb.is_empty() || nb.len() > 16 || !nb.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(RomWriteError::BadName);
    }
    let needed = rom_size(entries);
    let too_long = RomWriteError::TooLong { needed };
    let too_small = RomWriteError::BufferTooSmall { needed };
    if needed > MAX_ROM_LEN {
        return Err(too_long);
    }
    // Within the limit, the count and every code length fit their fields.
    let count = u16::try_from(entries.len()).map_err(|_| too_long)?;
    if out.len() < needed {
        return Err(too_small);
    }
    let out = &mut out[..needed];
    out.fill(0);
    let mut off = ROM_HEADER_SIZE + entries.len() * ROM_ENTRY_SIZE;
    for (i, e) in entries.iter().enumerate() {
        if e.kind == RomKind::Call {
            off = off.next_multiple_of(CALL_ALIGN);
        }
        let (code_off, code_len) = if e.code.is_empty() {
            (0, 0)
        } else {
            (off, e.code.len())
        };
        put(out, off, e.code).ok_or(too_small)?;
        off += e.code.len();
        let slots_off = if e.slots.is_empty() { 0 } else { off };
        for s in e.slots {
            put(out, off, &s.encode()).ok_or(too_small)?;
            off += ROM_SLOT_SIZE;
        }
        let mut raw = [0u8; ROM_ENTRY_SIZE];
        raw[0..2].copy_from_slice(&e.op_id.to_le_bytes());
        raw[2] = e.kind as u8;
        raw[3] = u8::try_from(e.slots.len()).map_err(|_| {
            RomWriteError::Invalid(RomError::Entry {
                index: i as u16,
                error: RomEntryError::TooManySlots(e.slots.len()),
            })
        })?;
        raw[4..8].copy_from_slice(&(code_off as u32).to_le_bytes());
        raw[8..10].copy_from_slice(&u16::try_from(code_len).map_err(|_| too_long)?.to_le_bytes());
        raw[12..16].copy_from_slice(&e.clobbers.0.to_le_bytes());
        raw[16..20].copy_from_slice(&(slots_off as u32).to_le_bytes());
        put(out, ROM_HEADER_SIZE + i * ROM_ENTRY_SIZE, &raw).ok_or(too_small)?;
    }
    out[0..8].copy_from_slice(&ROM_MAGIC);
    out[8..10].copy_from_slice(&ROM_VERSION.to_le_bytes());
    out[10..12].copy_from_slice(&(ROM_HEADER_SIZE as u16).to_le_bytes());
    out[12..14].copy_from_slice(&(ROM_ENTRY_SIZE as u16).to_le_bytes());
    out[14..16].copy_from_slice(&count.to_le_bytes());
    out[16..20].copy_from_slice(&(needed as u32).to_le_bytes());
    out[24..24 + nb.len()].copy_from_slice(nb);
    out[40..52].copy_from_slice(&signature);
    let sum = rom_checksum(out);
    out[20..24].copy_from_slice(&sum.to_le_bytes());
    Rom::parse(out).map_err(RomWriteError::Invalid)?;
    Ok(needed)
}

impl core::error::Error for RomEntryError {}
impl core::error::Error for RomError {}
impl core::error::Error for RomWriteError {}
