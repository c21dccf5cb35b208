//! One record: decoded and checked into a [`Site`] (absolute addresses, a known form, an
//! operand the op accepts), and a site encoded back into a record.

use core::fmt;

use super::layout::RawRecord;
use super::{MAX_INSN_LEN, SITE_FLAG_NO_STACK, SITE_FLAG_REP};
use crate::le::{rel_to, self_relative};
use crate::op::{NO_REG, Op, Operand, OperandError, check_operand, operand_code};
use crate::regs::{Gpr, RegSet};

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
    /// The native instruction, in a stock kernel: rewritten in place where the rewrite fits
    /// `site_len`, else through a load-time detour (the table's detour area has its member; the
    /// record's `stub` is where that detour's stub runs).
    Movable = 4,
}

impl Form {
    /// The form with code `c`.
    pub const fn from_code(c: u8) -> Option<Form> {
        match c {
            0 => Some(Form::Native),
            1 => Some(Form::IndirectCall),
            2 => Some(Form::Detour),
            3 => Some(Form::Trap),
            4 => Some(Form::Movable),
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
            Form::Movable => "movable",
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

    /// Where a patch is written: the stub for a build-time detour, the site otherwise (a
    /// movable site's patch goes to its stub only when its detour is installed).
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
        (Form::Detour | Form::Movable, None) => return Err(RecordError::FormMismatch),
        (Form::Detour, Some(s)) => {
            if !in_image(image, s, raw.site_len as u64) {
                return Err(RecordError::StubOutsideImage { addr: s });
            }
        }
        (Form::Movable, Some(s)) => {
            if !in_image(image, s, 1) {
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
    if raw.flags & !(SITE_FLAG_REP | SITE_FLAG_NO_STACK) != 0
        || raw.clobbers & !RegSet::VALID.0 != 0
    {
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

impl core::error::Error for RecordError {}
