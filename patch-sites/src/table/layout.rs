//! The header and the record as they lie in memory (`#[repr(C)]`, little-endian fields), and
//! the record's bytes read and written field by field.

use core::mem::{offset_of, size_of};

use super::detours::{RawDetour, RawMember};
use super::{DETOUR_SIZE, HEADER_SIZE, HEADER_SIZE_V2, MEMBER_SIZE, RECORD_SIZE};
use crate::le::{i32_at, u8_at, u16_at, u32_at};

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

/// What a version-2 header adds after the version-1 fields (bytes 32 to 63): the detour area
/// and the arena (see [`super::detours`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawHeaderExt {
    /// Self-relative (at byte 32 of the header) offset of the detour area, 0 for none.
    pub detours: i32,
    /// Detour descriptors.
    pub detour_count: u16,
    /// Members.
    pub member_count: u16,
    /// Bytes of the detour area: descriptors, members, stubs.
    pub area_len: u32,
    /// Self-relative (at byte 44) offset of the arena in the kernel's text, 0 for none.
    pub arena: i32,
    /// Bytes of the arena.
    pub arena_len: u32,
    /// Reserved, zero.
    pub reserved: [u32; 3],
}

const _: () = assert!(HEADER_SIZE + size_of::<RawHeaderExt>() == HEADER_SIZE_V2);
const _: () = assert!(offset_of!(RawHeaderExt, detour_count) == 36 - HEADER_SIZE);
const _: () = assert!(offset_of!(RawHeaderExt, member_count) == 38 - HEADER_SIZE);
const _: () = assert!(offset_of!(RawHeaderExt, area_len) == 40 - HEADER_SIZE);
const _: () = assert!(offset_of!(RawHeaderExt, arena) == 44 - HEADER_SIZE);
const _: () = assert!(offset_of!(RawHeaderExt, arena_len) == 48 - HEADER_SIZE);
const _: () = assert!(size_of::<RawDetour>() == DETOUR_SIZE);
const _: () = assert!(offset_of!(RawDetour, stub) == 4);
const _: () = assert!(offset_of!(RawDetour, src) == 8);
const _: () = assert!(offset_of!(RawDetour, tramp) == 12);
const _: () = assert!(offset_of!(RawDetour, moved_len) == 16);
const _: () = assert!(offset_of!(RawDetour, stub_len) == 17);
const _: () = assert!(offset_of!(RawDetour, moved_crc) == 20);
const _: () = assert!(size_of::<RawMember>() == MEMBER_SIZE);
const _: () = assert!(offset_of!(RawMember, detour) == 4);
const _: () = assert!(offset_of!(RawMember, copy_off) == 6);
const _: () = assert!(offset_of!(RawMember, copy_len) == 7);

impl RawHeaderExt {
    /// Reads the extension from bytes 32 to 63 of a header.
    pub fn read(b: &[u8]) -> Option<RawHeaderExt> {
        let at = HEADER_SIZE;
        if b.get(at..HEADER_SIZE_V2)?.len() != HEADER_SIZE_V2 - HEADER_SIZE {
            return None;
        }
        Some(RawHeaderExt {
            detours: i32_at(b, at)?,
            detour_count: u16_at(b, at + 4)?,
            member_count: u16_at(b, at + 6)?,
            area_len: u32_at(b, at + 8)?,
            arena: i32_at(b, at + 12)?,
            arena_len: u32_at(b, at + 16)?,
            reserved: [
                u32_at(b, at + 20)?,
                u32_at(b, at + 24)?,
                u32_at(b, at + 28)?,
            ],
        })
    }

    /// Its bytes (bytes 32 to 63 of a header).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE_V2 - HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE_V2 - HEADER_SIZE];
        b[0..4].copy_from_slice(&self.detours.to_le_bytes());
        b[4..6].copy_from_slice(&self.detour_count.to_le_bytes());
        b[6..8].copy_from_slice(&self.member_count.to_le_bytes());
        b[8..12].copy_from_slice(&self.area_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.arena.to_le_bytes());
        b[16..20].copy_from_slice(&self.arena_len.to_le_bytes());
        for (k, r) in self.reserved.iter().enumerate() {
            b[20 + 4 * k..24 + 4 * k].copy_from_slice(&r.to_le_bytes());
        }
        b
    }
}

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
