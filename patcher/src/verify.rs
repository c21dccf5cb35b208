//! `pvpatch verify`: re-read an annotated image and check that every record of its table lands on
//! the instruction it names, with the operand it names, followed by the padding it claims.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, Register};
use patch_sites::table::{Form, SEALED_SECTION, Site, SiteTable, TableError};
use patch_sites::{Gpr, Op, Operand};
use thiserror::Error;

use crate::annotate::{sealed_table, table_address};
use crate::classify::{classify, gpr};
use crate::image::Image;
use crate::report::hex;

/// Why verification could not even start.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// The image has no table.
    #[error("{0} has no {SEALED_SECTION} section: it is not annotated")]
    NotAnnotated(String),
    /// The table is refused as a whole.
    #[error("the site table is invalid")]
    Table(#[source] TableError),
}

/// One record that does not match the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Record index.
    pub index: usize,
    /// Site address.
    pub addr: u64,
    /// What is wrong.
    pub what: String,
}

/// The result of verification.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Where the table is.
    pub table_addr: u64,
    /// Whether it is where a runtime looks for it.
    pub placement_ok: bool,
    /// Sites checked.
    pub sites: usize,
    /// Sites whose op this tool does not know (not checkable).
    pub unknown_ops: usize,
    /// Records that do not match.
    pub mismatches: Vec<Mismatch>,
}

impl Verified {
    /// Whether everything matched.
    pub fn ok(&self) -> bool {
        self.placement_ok && self.mismatches.is_empty()
    }
}

fn decode(image: &Image, addr: u64, max: usize) -> Option<Instruction> {
    let bytes = image.read(addr, max).or_else(|| image.read(addr, 1))?;
    let i = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE).decode();
    (!i.is_invalid()).then_some(i)
}

fn reg_is(r: Register, want: Gpr) -> bool {
    gpr(r) == Some(want) && r.size() == 8
}

/// Checks the instruction(s) at the start of a native site against its record.
fn check_native(image: &Image, site: &Site, op: Op) -> Result<(), String> {
    let at = site.addr;
    let insn = decode(image, at, site.insn_len as usize).ok_or("does not decode")?;
    let seq_len = match op {
        Op::SaveFl | Op::RestoreFl | Op::SafeHalt => {
            let second =
                decode(image, at + insn.len() as u64, 15).ok_or("idiom does not decode")?;
            let ok = match (op, site.operand) {
                (Op::SaveFl, Operand::Reg(r)) => {
                    insn.mnemonic() == Mnemonic::Pushfq
                        && second.mnemonic() == Mnemonic::Pop
                        && reg_is(second.op0_register(), r)
                }
                (Op::RestoreFl, Operand::Reg(r)) => {
                    insn.mnemonic() == Mnemonic::Push
                        && reg_is(insn.op0_register(), r)
                        && second.mnemonic() == Mnemonic::Popfq
                }
                (Op::SafeHalt, _) => {
                    insn.mnemonic() == Mnemonic::Sti && second.mnemonic() == Mnemonic::Hlt
                }
                _ => false,
            };
            if !ok {
                return Err(format!("is not the {op} idiom"));
            }
            insn.len() + second.len()
        }
        _ => {
            let c = classify(&insn)
                .ok_or_else(|| format!("is not a sensitive instruction ({:?})", insn.mnemonic()))?;
            let (want_op, want_operand) = match op {
                Op::IoDelay => (Op::Out, site.operand),
                _ => (op, site.operand),
            };
            if c.op != want_op {
                return Err(format!("is {} where the record says {op}", c.op));
            }
            if c.operand != want_operand || (op != Op::IoDelay && c.width != site.width) {
                return Err(format!(
                    "operand {:?} width {} where the record says {:?} width {}",
                    c.operand, c.width, site.operand, site.width
                ));
            }
            if c.rep != (site.flags & patch_sites::table::SITE_FLAG_REP != 0) {
                return Err("rep prefix differs from the record".into());
            }
            insn.len()
        }
    };
    if seq_len != site.insn_len as usize {
        return Err(format!(
            "instruction is {seq_len} bytes where the record says {}",
            site.insn_len
        ));
    }
    Ok(())
}

/// Checks that `[from, to)` is NOP padding.
fn check_padding(image: &Image, from: u64, to: u64) -> Result<(), String> {
    let mut at = from;
    while at < to {
        let i = decode(image, at, (to - at) as usize)
            .ok_or_else(|| format!("padding at {} does not decode", hex(at)))?;
        if i.mnemonic() != Mnemonic::Nop {
            return Err(format!(
                "padding at {} is {:?}, not a NOP",
                hex(at),
                i.mnemonic()
            ));
        }
        at += i.len() as u64;
    }
    if at != to {
        return Err("padding runs past the site".into());
    }
    Ok(())
}

fn check_site(image: &Image, site: &Site) -> Result<bool, String> {
    let Some(op) = site.op() else {
        return Ok(false);
    };
    match site.form {
        Form::Native => {
            check_native(image, site, op)?;
            check_padding(image, site.addr + site.insn_len as u64, site.end())?;
        }
        Form::IndirectCall => {
            let i = decode(image, site.addr, 15).ok_or("does not decode")?;
            if i.code() != Code::Call_rm64
                || i.memory_base() != Register::RIP
                || i.len() != site.insn_len as usize
            {
                return Err("is not a 6-byte call [rip+disp32]".into());
            }
            check_padding(image, site.addr + i.len() as u64, site.end())?;
        }
        Form::Detour => {
            let stub = site.stub.ok_or("detour without a stub")?;
            let j = decode(image, site.addr, 15).ok_or("does not decode")?;
            if j.mnemonic() != Mnemonic::Jmp || j.near_branch_target() != stub {
                return Err(format!("is not a jmp to its stub at {}", hex(stub)));
            }
            check_native(
                image,
                &Site {
                    addr: stub,
                    ..*site
                },
                op,
            )?;
        }
        Form::Trap => {
            let b = image.read(site.addr, 2).ok_or("unreadable")?;
            if b[0] != 0xcc && b != [0x0f, 0x0b] {
                return Err("is not int3 or ud2".into());
            }
        }
    }
    Ok(true)
}

/// Verifies the table of an annotated image.
pub fn verify(image: &Image) -> Result<Verified, VerifyError> {
    let (addr, bytes) = sealed_table(image)
        .ok_or_else(|| VerifyError::NotAnnotated(image.path.display().to_string()))?;
    let t = SiteTable::parse_contiguous(bytes, addr, &image.code_ranges())
        .map_err(VerifyError::Table)?;
    let mut out = Verified {
        table_addr: addr,
        placement_ok: table_address(image) == Some(addr),
        sites: t.len(),
        unknown_ops: 0,
        mismatches: Vec::new(),
    };
    for (index, site) in t.sites().enumerate() {
        match check_site(image, &site) {
            Ok(true) => {}
            Ok(false) => out.unknown_ops += 1,
            Err(what) => out.mismatches.push(Mismatch {
                index,
                addr: site.addr,
                what,
            }),
        }
    }
    Ok(out)
}
