//! Detours: a site too small for the sequence a backend wants moves its instruction, and the
//! instructions next to it, to a stub, and becomes a `jmp` there.
//!
//! A *moved range* `[start, start + len)` (at least 5 bytes, for a `jmp rel32`) holds whole
//! instructions, the site's among them: the site and the instructions after it (forward), or the
//! instructions before it and the site (backward). It becomes `jmp stub` and `int3`s. The stub
//! holds, in order: the instructions before the site, re-encoded for their new address; the
//! site's *patchable copy* (its instruction, NOP-padded to `copy_len` bytes: what the runtime
//! rewrites); the instructions after the site, re-encoded; `jmp start + len`.
//!
//! Re-encoding uses iced-x86's encoder: a RIP-relative operand keeps its absolute target, even
//! one inside the moved range (a `lea` of its own address must still give the original); a
//! branch to a moved instruction follows it into the stub, any other keeps its absolute target;
//! branches are widened to rel32, so that every length is known before any address. The site's
//! own instruction is copied byte for byte (re-encoded only if it is RIP-relative).
//!
//! Nothing outside the range may jump into `(start, start + len)`: the caller checks that (the
//! analysis refuses a detour over a named instruction start, or over a branch target unless the
//! only branch to it moves too).

use iced_x86::{Code, Decoder, DecoderOptions, Encoder, FlowControl, Instruction};
use thiserror::Error;

/// A built detour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detour {
    /// The bytes of the moved range once detoured: `jmp stub`, then `int3`s.
    pub site: Vec<u8>,
    /// The stub.
    pub stub: Vec<u8>,
    /// Where in the stub the site's patchable copy is.
    pub copy_off: u8,
    /// The copy's length (its room).
    pub copy_len: u8,
    /// The moved range's length.
    pub room: u8,
}

/// Why a detour cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DetourError {
    /// The code does not decode.
    #[error("{0:#x} does not decode")]
    Undecodable(u64),
    /// The code ends before there is room for a `jmp rel32`.
    #[error("the code ends before 5 bytes")]
    TooShort,
    /// An instruction that cannot be moved (a return, an indirect or far transfer, a call: a
    /// moved call would push the stub's address).
    #[error("{0:#x} cannot be moved")]
    Unmovable(u64),
    /// The stub is out of `rel32` reach, or the encoder refused.
    #[error("cannot encode the stub: {0}")]
    Encode(String),
}

const JMP_REL32: u8 = 0xe9;

/// Whether `i` can run anywhere once re-encoded: it falls through, is a direct `jmp`/`jcc`
/// (its target kept), a direct `call` (the last instruction of a moved range only: it becomes
/// `push` of its original return address and `jmp` to its target, so that the callee sees and
/// returns to the address it always did), or a near `ret` (which leaves the stub as it would
/// have left the function).
pub fn movable(i: &Instruction) -> bool {
    match i.flow_control() {
        FlowControl::Next => true,
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
            i.is_jcc_short_or_near() || i.is_jmp_short_or_near()
        }
        FlowControl::Call => i.is_call_near(),
        FlowControl::Return => i.code() == Code::Retnq,
        _ => false,
    }
}

/// Builds the detour of the instruction of `insn_len` bytes at `site`, forward: it and the
/// instructions after it, up to 5 bytes, move; the copy's room is the whole moved range (the
/// form the ABI's build-time `Detour` records describe). `code` is the code from `site` on.
pub fn build(code: &[u8], site: u64, insn_len: usize, stub: u64) -> Result<Detour, DetourError> {
    let mut d = Decoder::with_ip(64, code, site, DecoderOptions::NONE);
    let mut len = 0;
    while len < 5 {
        if !d.can_decode() {
            return Err(DetourError::TooShort);
        }
        let i = d.decode();
        if i.is_invalid() {
            return Err(DetourError::Undecodable(i.ip()));
        }
        len += i.len();
    }
    let code = code.get(..len).ok_or(DetourError::TooShort)?;
    let g = build_group(
        code,
        site,
        &[Copy {
            off: 0,
            insn_len,
            len,
        }],
        stub,
        Jump::Direct,
    )?;
    Ok(Detour {
        site: g.site,
        stub: g.stub,
        copy_off: g.copies[0],
        copy_len: len as u8,
        room: len as u8,
    })
}

/// One site of a moved range: its offset, its instruction's length, its copy's room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    /// Offset of the site in the moved range.
    pub off: usize,
    /// Its instruction's length.
    pub insn_len: usize,
    /// Its patchable copy's room in the stub.
    pub len: usize,
}

/// How the moved range reaches its stub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jump {
    /// `jmp rel32 stub` (the range has at least 5 bytes).
    Direct,
    /// `jmp rel8 trampoline` (2 bytes), the trampoline `jmp rel32 stub`.
    Trampoline(u64),
}

/// A built group detour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The moved range once detoured: `jmp`, then `int3`s.
    pub site: Vec<u8>,
    /// The trampoline's bytes (`jmp rel32 stub`), if there is one.
    pub trampoline: Option<Vec<u8>>,
    /// The stub.
    pub stub: Vec<u8>,
    /// Where each site's copy is in the stub, in the order the sites were given.
    pub copies: Vec<u8>,
}

fn rel32(from_end: u64, to: u64) -> Result<[u8; 4], DetourError> {
    i32::try_from(to as i128 - from_end as i128)
        .map(i32::to_le_bytes)
        .map_err(|_| DetourError::Encode(format!("{to:#x} is out of reach of {from_end:#x}")))
}

/// Builds the detour of the moved range `code` (at `start`), in which the sites `copies` (by
/// offset, ascending) each get a patchable copy, with the stub at `stub`, reached by `jump`.
pub fn build_group(
    code: &[u8],
    start: u64,
    copies: &[Copy],
    stub: u64,
    jump: Jump,
) -> Result<Group, DetourError> {
    let len = code.len();
    let min = match jump {
        Jump::Direct => 5,
        Jump::Trampoline(_) => 2,
    };
    // No copies: a range moved only to make room for another's trampoline (a host).
    if len < min || u8::try_from(len).is_err() {
        return Err(DetourError::TooShort);
    }
    for c in copies {
        if c.off + c.insn_len > len || c.len < c.insn_len {
            return Err(DetourError::TooShort);
        }
    }
    let copy_at = |ip: u64| copies.iter().find(|c| start + c.off as u64 == ip);
    // Everything in the range, in order: a site (copied whole: an idiom such as `pushfq; pop`
    // is one site of several instructions) or a moved instruction (re-encoded).
    let mut all: Vec<(Instruction, Option<Copy>)> = Vec::new();
    let mut off = 0;
    while off < len {
        let ip = start + off as u64;
        let i = Decoder::with_ip(64, &code[off..], ip, DecoderOptions::NONE).decode();
        if i.is_invalid() {
            return Err(DetourError::Undecodable(ip));
        }
        let copy = copy_at(ip);
        off += copy.map_or(i.len(), |c| c.insn_len);
        match copy {
            Some(c) if i.len() > c.insn_len || off > len => {
                return Err(DetourError::Undecodable(ip));
            }
            Some(c) => all.push((i, Some(*c))),
            None if !movable(&i) => return Err(DetourError::Unmovable(i.ip())),
            // A call inside the range would return into it.
            None if i.is_call_near() && i.next_ip() != start + len as u64 => {
                return Err(DetourError::Unmovable(i.ip()));
            }
            None => {
                let mut n = i;
                if n.is_jcc_short_or_near() || n.is_jmp_short_or_near() {
                    n.as_near_branch();
                }
                all.push((n, None));
            }
        }
    }
    if off != len || all.iter().filter(|(_, c)| c.is_some()).count() != copies.len() {
        return Err(DetourError::Undecodable(start + off as u64));
    }
    let enc_err =
        |ip: u64| move |e: iced_x86::IcedError| DetourError::Encode(format!("{ip:#x}: {e}"));
    let back = Instruction::with_branch(Code::Jmp_rel32_64, start + len as u64)
        .map_err(|e| DetourError::Encode(e.to_string()))?;
    // Pass 1: where each instruction goes (lengths do not depend on the address: branches are
    // rel32 and RIP-relative operands disp32; a copy takes its room).
    let mut enc = Encoder::new(64);
    let mut at = stub;
    let mut new_ip: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (i, c) in &all {
        new_ip.push((i.ip(), at));
        at += match c {
            Some(c) => c.len as u64,
            None => {
                let mut probe = *i;
                if probe.is_call_near() {
                    // push imm32; jmp rel32.
                    10
                } else {
                    if probe.is_jcc_near() || probe.is_jmp_near() {
                        probe.set_near_branch64(at);
                    }
                    enc.encode(&probe, at).map_err(enc_err(i.ip()))? as u64
                }
            }
        };
    }
    // Pass 2: encode; branches to moved instructions follow them.
    let moved_to = |t: u64| new_ip.iter().find(|(o, _)| *o == t).map(|(_, n)| *n);
    let mut out = Vec::new();
    let mut offs = Vec::new();
    let emit = |i: &Instruction, out: &mut Vec<u8>| -> Result<(), DetourError> {
        let here = stub + out.len() as u64;
        let mut i = *i;
        if i.is_call_near() {
            // The return address the call would push (the end of the range: a kernel address
            // that `push imm32` sign-extends), then a jump to the callee.
            let ret = i32::try_from(i.next_ip() as i64).map_err(|_| {
                DetourError::Encode(format!("{:#x}: return address not sign-extended", i.ip()))
            })?;
            let t = i.near_branch_target();
            if t >= start && t < start + len as u64 {
                return Err(DetourError::Unmovable(i.ip()));
            }
            out.push(0x68);
            out.extend_from_slice(&ret.to_le_bytes());
            out.push(JMP_REL32);
            out.extend_from_slice(&rel32(here + 10, t)?);
            return Ok(());
        }
        if i.is_jcc_near() || i.is_jmp_near() {
            let t = i.near_branch_target();
            if let Some(n) = moved_to(t) {
                i.set_near_branch64(n);
            } else if t > start && t < start + len as u64 {
                return Err(DetourError::Unmovable(i.ip()));
            }
        }
        let mut e = Encoder::new(64);
        e.encode(&i, here).map_err(enc_err(i.ip()))?;
        out.extend_from_slice(&e.take_buffer());
        Ok(())
    };
    for (i, c) in &all {
        let Some(c) = c else {
            emit(i, &mut out)?;
            continue;
        };
        let copy_off = out.len();
        offs.push(u8::try_from(copy_off).map_err(|_| DetourError::TooShort)?);
        // The copy: the site's bytes, unless they are RIP-relative (then re-encoded in place).
        if i.is_ip_rel_memory_operand() && i.len() == c.insn_len {
            emit(i, &mut out)?;
            if out.len() - copy_off != c.insn_len {
                return Err(DetourError::Encode(format!(
                    "{:#x}: the re-encoded site changed length",
                    i.ip()
                )));
            }
        } else {
            out.extend_from_slice(&code[c.off..c.off + c.insn_len]);
        }
        let pad_from = out.len();
        out.resize(copy_off + c.len, 0);
        pvpatch_isa::encode::fill_nops(&mut out[pad_from..]);
    }
    emit(&back, &mut out)?;
    let (site, trampoline) = match jump {
        Jump::Direct => {
            let mut j = vec![JMP_REL32];
            j.extend_from_slice(&rel32(start + 5, stub)?);
            (j, None)
        }
        Jump::Trampoline(t) => {
            let r = i8::try_from(t as i128 - (start as i128 + 2)).map_err(|_| {
                DetourError::Encode(format!("{t:#x} is out of rel8 reach of {start:#x}"))
            })?;
            let mut tr = vec![JMP_REL32];
            tr.extend_from_slice(&rel32(t + 5, stub)?);
            (vec![0xeb, r as u8], Some(tr))
        }
    };
    let mut site = site;
    site.resize(len, 0xcc);
    Ok(Group {
        site,
        trampoline,
        stub: out,
        copies: offs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop moved whole: its branch follows its target into the stub, whether the target is
    /// the range's first byte (a site) or a moved instruction inside it, and the stub passes
    /// the load-time check that decodes both independently of the builder.
    #[test]
    fn a_loop_moved_whole_branches_within_its_stub() {
        let (addr, stub) = (0x40_0000u64, 0x50_0000u64);
        // The site at the range's start, copied into a 5-byte room; the builder's stub, which
        // the load-time check accepts.
        let copies = |insn_len: usize| {
            [pvpatch_isa::check::StubCopy {
                site_off: 0,
                insn_len,
                copy_off: 0,
                copy_len: 5,
            }]
        };
        let built = |code: &[u8], insn_len: usize| {
            let copy = Copy {
                off: 0,
                insn_len,
                len: 5,
            };
            let g = build_group(code, addr, &[copy], stub, Jump::Direct).unwrap();
            pvpatch_isa::check::stub(code, addr, &g.stub, stub, &copies(insn_len)).unwrap();
            g.stub
        };
        // 1: hlt; jmp 1b; xor eax, eax: the target is the site, the range's first byte.
        let g = built(&[0xf4, 0xeb, 0xfd, 0x31, 0xc0], 1);
        let jmp = Decoder::with_ip(64, &g[5..], stub + 5, DecoderOptions::NONE).decode();
        assert_eq!(jmp.near_branch_target(), stub, "to the site's copy");
        // mov cr4, rdx; 1: rdrand rdx; jnc 1b: the target is inside the range.
        let code = [0x0f, 0x22, 0xe2, 0x48, 0x0f, 0xc7, 0xf2, 0x73, 0xfa];
        let g = built(&code, 3);
        let mut dec = Decoder::with_ip(64, &g[5..], stub + 5, DecoderOptions::NONE);
        assert_eq!(dec.decode().mnemonic(), iced_x86::Mnemonic::Rdrand);
        assert_eq!(
            dec.decode().near_branch_target(),
            stub + 5,
            "to the moved rdrand"
        );
        // The check refuses a stub whose loop still branches to the original address.
        let mut kept = g.clone();
        let at = 5 + 4;
        let orig = (addr + 3) as i64 - (stub + at as u64 + 6) as i64;
        kept[at + 2..at + 6].copy_from_slice(&(orig as i32).to_le_bytes());
        assert!(pvpatch_isa::check::stub(&code, addr, &kept, stub, &copies(3)).is_err());
    }

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
        // An indirect call cannot move; a direct one can, last: it pushes the return address
        // it always did and jumps to its target.
        let call = [0xfa, 0xff, 0xd0, 0x90, 0x90];
        assert_eq!(
            build(&call, addr, 1, stub),
            Err(DetourError::Unmovable(addr + 1))
        );
        let d = build(&[0xfa, 0xe8, 0, 0, 0, 0], addr, 1, stub).unwrap();
        let mut dec = Decoder::with_ip(64, &d.stub[6..], stub + 6, DecoderOptions::NONE);
        let push = dec.decode();
        assert_eq!(push.code(), Code::Pushq_imm32);
        assert_eq!(
            push.immediate32to64() as u64,
            addr + 6,
            "the original return address"
        );
        assert_eq!(
            dec.decode().near_branch_target(),
            addr + 6,
            "the call keeps its target"
        );
        // Not before other moved code: the callee would return into the moved range.
        let copy = Copy {
            off: 0,
            insn_len: 1,
            len: 1,
        };
        let code = [0xfa, 0xe8, 0, 0, 0, 0, 0x90];
        assert_eq!(
            build_group(&code, addr, &[copy], stub, Jump::Direct),
            Err(DetourError::Unmovable(addr + 1))
        );
        // An idiom is one site of two instructions, copied whole.
        let g = build(&[0x9c, 0x58, 0x48, 0xff, 0xc0], addr, 2, stub).unwrap();
        assert_eq!(&g.stub[..2], [0x9c, 0x58]);
        assert_eq!(
            build(&[0xfa, 0x90], addr, 1, stub),
            Err(DetourError::TooShort)
        );
    }
}
