//! Inline templates with operand slots: the bytes a backend (built in, or a ROM) wants at a
//! site, and where the site's operands go. Instantiating a template for a site substitutes the
//! site's port or registers into the bytes the slots name.

use patch_sites::Operand;
use patch_sites::regs::RegSet;
use patch_sites::rom::{MAX_SLOTS, NO_REX, Slot, SlotKind, SlotSource};
use patch_sites::table::Site;

use crate::encode::Seq;

/// An inline template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Template<'a> {
    /// The bytes, operands still to be substituted.
    pub bytes: &'a [u8],
    /// Where the operands go (`None` for unused slots).
    pub slots: [Option<Slot>; MAX_SLOTS],
    /// What the sequence clobbers beyond the op's outputs.
    pub clobbers: RegSet,
}

/// Why a template cannot be instantiated for a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubstError {
    /// The slot wants an operand the site does not have (a port on a register site, ...).
    NoSuchOperand,
    /// A register 8..15 where the template has no REX prefix to extend it.
    NeedsRex,
    /// The byte the slot names as a REX prefix is not one.
    NotRex,
    /// A slot points outside the template.
    OutOfBounds,
    /// The template is longer than the longest sequence.
    TooLong,
    /// A base register that a bare ModRM.rm cannot name in a memory operand (rsp and r12 need
    /// a SIB byte, rbp and r13 a displacement).
    MemoryBase,
}

impl core::fmt::Display for SubstError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SubstError::NoSuchOperand => "the template wants an operand the site does not have",
            SubstError::NeedsRex => "the template has no REX prefix for a register above rdi",
            SubstError::NotRex => "the byte named as the REX prefix is not one",
            SubstError::OutOfBounds => "a slot points outside the template",
            SubstError::TooLong => "the template is too long",
            SubstError::MemoryBase => {
                "the template's memory operand cannot take this base register"
            }
        })
    }
}

impl<'a> Template<'a> {
    /// A template without operands.
    pub const fn fixed(bytes: &'a [u8]) -> Self {
        Template {
            bytes,
            slots: [None; MAX_SLOTS],
            clobbers: RegSet::EMPTY,
        }
    }

    /// The template's bytes with `site`'s operands substituted.
    pub fn instantiate(&self, site: &Site) -> Result<Seq, SubstError> {
        let mut out = Seq::from_slice(self.bytes).ok_or(SubstError::TooLong)?;
        for slot in self.slots.iter().flatten() {
            substitute(out.as_mut_slice(), slot, site.operand)?;
        }
        Ok(out)
    }
}

fn substitute(b: &mut [u8], slot: &Slot, operand: Operand) -> Result<(), SubstError> {
    let at = slot.offset as usize;
    if at >= b.len() {
        return Err(SubstError::OutOfBounds);
    }
    let value = match slot.source {
        SlotSource::Port => match operand {
            Operand::PortImm(p) => p,
            _ => return Err(SubstError::NoSuchOperand),
        },
        SlotSource::Reg => match operand.reg_byte() {
            r if r < 16 => r,
            _ => return Err(SubstError::NoSuchOperand),
        },
        SlotSource::Reg2 => match operand {
            Operand::RegMemBase { base, .. } => base.number(),
            _ => return Err(SubstError::NoSuchOperand),
        },
    };
    let (mask, shift, rex_bit) = match slot.kind {
        SlotKind::Imm8 => {
            b[at] = value;
            return Ok(());
        }
        SlotKind::ModrmReg => (0x38u8, 3, 0x04u8),
        SlotKind::ModrmRm | SlotKind::OpcodeReg => (0x07, 0, 0x01),
    };
    if slot.kind == SlotKind::ModrmRm && b[at] >> 6 != 3 && matches!(value & 7, 4 | 5) {
        return Err(SubstError::MemoryBase);
    }
    b[at] = (b[at] & !mask) | ((value & 7) << shift);
    if slot.rex_offset == NO_REX {
        if value >= 8 {
            return Err(SubstError::NeedsRex);
        }
        return Ok(());
    }
    let r = b
        .get_mut(slot.rex_offset as usize)
        .ok_or(SubstError::OutOfBounds)?;
    if *r & 0xf0 != 0x40 {
        return Err(SubstError::NotRex);
    }
    if value >= 8 {
        *r |= rex_bit
    } else {
        *r &= !rex_bit
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use patch_sites::table::Form;
    use patch_sites::{Gpr, Op};

    fn site(op: Op, operand: Operand) -> Site {
        Site {
            addr: 0x1000,
            site_len: 5,
            insn_len: 3,
            op_id: op.id(),
            form: Form::Native,
            operand,
            width: 8,
            flags: 0,
            clobbers: RegSet::EMPTY,
            stub: None,
        }
    }

    #[test]
    fn registers_and_ports_are_substituted() {
        let mut t = Template::fixed(&[0x40, 0x0f, 0x22, 0xd8]); // mov cr3, rax (with a REX)
        t.slots[0] = Some(Slot {
            kind: SlotKind::ModrmRm,
            offset: 3,
            rex_offset: 0,
            source: SlotSource::Reg,
        });
        let s = t
            .instantiate(&site(Op::MovToCr3, Operand::Reg(Gpr::Rdi)))
            .unwrap();
        assert_eq!(s.as_slice(), [0x40, 0x0f, 0x22, 0xdf]);
        let s = t
            .instantiate(&site(Op::MovToCr3, Operand::Reg(Gpr::R12)))
            .unwrap();
        assert_eq!(s.as_slice(), [0x41, 0x0f, 0x22, 0xdc]);

        let mut t = Template::fixed(&[0x0f, 0x22, 0xd8]);
        t.slots[0] = Some(Slot {
            kind: SlotKind::ModrmRm,
            offset: 2,
            rex_offset: NO_REX,
            source: SlotSource::Reg,
        });
        assert_eq!(
            t.instantiate(&site(Op::MovToCr3, Operand::Reg(Gpr::R12))),
            Err(SubstError::NeedsRex)
        );

        let mut t = Template::fixed(&[0xe6, 0x00]);
        t.slots[0] = Some(Slot {
            kind: SlotKind::Imm8,
            offset: 1,
            rex_offset: NO_REX,
            source: SlotSource::Port,
        });
        let s = t
            .instantiate(&site(Op::Out, Operand::PortImm(0x80)))
            .unwrap();
        assert_eq!(s.as_slice(), [0xe6, 0x80]);
        assert_eq!(
            t.instantiate(&site(Op::Out, Operand::PortDx)),
            Err(SubstError::NoSuchOperand)
        );
    }
}
