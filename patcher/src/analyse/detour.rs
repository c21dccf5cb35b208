//! Detours: a site too small for the sequence a backend wants moves its instruction, and the
//! instructions after it, to a stub, and becomes a `jmp` there.
//!
//! The site `[addr, addr + room)` (room at least 5 bytes: the sensitive instruction and the
//! whole instructions after it that make up the difference) becomes `jmp stub` and `int3`s. The
//! stub holds the patchable copy (the instruction, NOP-padded to `room` bytes: what the
//! runtime rewrites, as the record's `stub` says), then the moved instructions re-encoded for
//! their new address with iced-x86's encoder (a RIP-relative operand keeps its absolute
//! target, even one inside the moved range: a `lea` of its own address must still give the
//! original; a branch to a moved instruction follows it into the stub, any other keeps its
//! absolute target; branches are widened to rel32 so that every address is known in one pass),
//! then `jmp addr + room`.
//!
//! Nothing may jump into `(addr, addr + room)`: the caller checks that (the analysis refuses a
//! detour over a branch target or a named instruction start).

use iced_x86::{Code, Decoder, DecoderOptions, Encoder, FlowControl, Instruction};
use thiserror::Error;

/// A built detour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detour {
    /// The bytes at the site: `jmp stub`, then `int3`s (`room` bytes).
    pub site: Vec<u8>,
    /// The stub: the patchable copy (`room` bytes), the moved instructions, `jmp` back.
    pub stub: Vec<u8>,
    /// The bytes of the site and of the stub's patchable copy: the record's `site_len`.
    pub room: u8,
}

/// Why a detour cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DetourError {
    /// The code after the instruction does not decode.
    #[error("{0:#x} does not decode")]
    Undecodable(u64),
    /// The code ends before there is room for a `jmp rel32`.
    #[error("the code ends before 5 bytes")]
    TooShort,
    /// An instruction that cannot be moved (a return, an indirect or far transfer, a call: a
    /// moved call would push the stub's address).
    #[error("{0:#x} cannot be moved")]
    Unmovable(u64),
    /// The stub is out of `rel32` reach, or the block encoder refused.
    #[error("cannot encode the stub: {0}")]
    Encode(String),
}

const JMP_REL32: u8 = 0xe9;

/// Builds the detour for the instruction of `insn_len` bytes at `addr`, whose code (from
/// `addr` on) is `code`, with its stub at `stub`.
pub fn build(code: &[u8], addr: u64, insn_len: usize, stub: u64) -> Result<Detour, DetourError> {
    let first = code.get(..insn_len).ok_or(DetourError::TooShort)?;
    let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    d.set_position(insn_len)
        .map_err(|_| DetourError::TooShort)?;
    d.set_ip(addr + insn_len as u64);
    let mut moved: Vec<Instruction> = Vec::new();
    let mut room = insn_len;
    while room < 5 {
        if !d.can_decode() {
            return Err(DetourError::TooShort);
        }
        let i = d.decode();
        if i.is_invalid() {
            return Err(DetourError::Undecodable(i.ip()));
        }
        if !matches!(
            i.flow_control(),
            FlowControl::Next | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
        ) || (i.flow_control() != FlowControl::Next
            && !i.is_jcc_short_or_near()
            && !i.is_jmp_short_or_near())
        {
            return Err(DetourError::Unmovable(i.ip()));
        }
        room += i.len();
        moved.push(i);
    }
    let room_u8 = u8::try_from(room).map_err(|_| DetourError::TooShort)?;
    let rel = |from_end: u64, to: u64| -> Result<[u8; 4], DetourError> {
        i32::try_from(to as i128 - from_end as i128)
            .map(i32::to_le_bytes)
            .map_err(|_| DetourError::Encode(format!("{to:#x} is out of reach of {from_end:#x}")))
    };
    let mut site = vec![JMP_REL32];
    site.extend_from_slice(&rel(addr + 5, stub)?);
    site.resize(room, 0xcc);

    let mut out = first.to_vec();
    out.resize(room, 0);
    pvpatch_isa::encode::fill_nops(&mut out[insn_len..]);
    let back = Instruction::with_branch(Code::Jmp_rel32_64, addr + room as u64)
        .map_err(|e| DetourError::Encode(e.to_string()))?;
    let mut block: Vec<Instruction> = moved
        .iter()
        .map(|i| {
            let mut n = *i;
            if n.is_jcc_short_or_near() || n.is_jmp_short_or_near() {
                n.as_near_branch();
            }
            n
        })
        .collect();
    block.push(back);
    // Pass 1: where each instruction goes (lengths do not depend on the address: branches are
    // rel32 and RIP-relative operands disp32).
    let mut enc = Encoder::new(64);
    let mut at = stub + room as u64;
    let mut new_ip = Vec::with_capacity(block.len());
    for i in &block {
        new_ip.push(at);
        let mut probe = *i;
        if probe.is_jcc_near() || probe.is_jmp_near() {
            probe.set_near_branch64(at);
        }
        let n = enc
            .encode(&probe, at)
            .map_err(|e| DetourError::Encode(format!("{:#x}: {e}", i.ip())))?;
        at += n as u64;
    }
    let _ = enc.take_buffer();
    // Pass 2: branches to moved instructions follow them.
    for (k, i) in block.iter().enumerate() {
        let mut i = *i;
        if i.is_jcc_near() || i.is_jmp_near() {
            let t = i.near_branch_target();
            if let Some(j) = moved.iter().position(|m| m.ip() == t) {
                i.set_near_branch64(new_ip[j]);
            } else if t > addr && t < addr + room as u64 {
                return Err(DetourError::Unmovable(i.ip()));
            }
        }
        enc.encode(&i, new_ip[k])
            .map_err(|e| DetourError::Encode(format!("{:#x}: {e}", i.ip())))?;
    }
    out.extend_from_slice(&enc.take_buffer());
    Ok(Detour {
        site,
        stub: out,
        room: room_u8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_byte_cli_moves_its_neighbours_and_keeps_their_targets() {
        // cli; mov rax, [rip + 0x100]; jz +2; inc ecx; nop
        let code = [
            0xfa, 0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0x74, 0x02, 0xff, 0xc1, 0x90,
        ];
        let addr = 0x40_0000;
        let stub = 0x50_0000;
        let d = build(&code, addr, 1, stub).unwrap();
        assert_eq!(d.room, 8, "cli and the 7-byte mov");
        assert_eq!(d.site[0], 0xe9);
        assert_eq!(d.site.len(), 8);
        assert_eq!(d.stub[0], 0xfa);
        // The moved mov still reads addr + 8 + 0x100.
        let mut dec = Decoder::with_ip(64, &d.stub[8..], stub + 8, DecoderOptions::NONE);
        let mov = dec.decode();
        assert_eq!(mov.ip_rel_memory_address(), addr + 8 + 0x100);
        let jmp = dec.decode();
        assert_eq!(jmp.near_branch_target(), addr + 8);
        // A lea of its own address keeps the original (found by the oracle: iced's block
        // encoder re-aims a RIP-relative operand at a moved instruction's new place).
        let code = [
            0x41, 0x0f, 0x22, 0xd9, 0x4c, 0x8d, 0x25, 0xf9, 0xff, 0xff, 0xff, 0x90,
        ];
        let d = build(&code, addr, 4, stub).unwrap();
        let lea = Decoder::with_ip(64, &d.stub[11..], stub + 11, DecoderOptions::NONE).decode();
        assert_eq!(lea.ip_rel_memory_address(), addr + 4);
        // A call cannot move.
        let call = [0xfa, 0xe8, 0, 0, 0, 0];
        assert_eq!(
            build(&call, addr, 1, stub),
            Err(DetourError::Unmovable(addr + 1))
        );
        assert_eq!(
            build(&[0xfa, 0x90], addr, 1, stub),
            Err(DetourError::TooShort)
        );
    }
}
