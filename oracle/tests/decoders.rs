//! Differential decoding: iced-x86 (what the post-link tool and the runtime decode with)
//! against capstone 5, on random bytes. Each disagreement on validity or length must be one of
//! the known, listed differences below, each a fact about one decoder; anything else fails.
//! The real kernel's code is compared the same way in `patcher/tests/integration/kernel.rs`.
//! `PVPATCH_DECODE_CASES` raises the number of buffers (200,000 by default).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use capstone::prelude::*;
use iced_x86::{CpuidFeature, Decoder, DecoderOptions, Instruction, Mnemonic};

/// ISA extensions capstone 5 does not decode and iced does: newer ones, and the Xeon Phi's and
/// VIA's.
const CAPSTONE_LACKS: [CpuidFeature; 37] = [
    CpuidFeature::SM4,
    CpuidFeature::RDPRU,
    CpuidFeature::SEV_SNP,
    CpuidFeature::INVLPGB,
    CpuidFeature::AVX_VNNI,
    CpuidFeature::AVX512_BF16,
    CpuidFeature::TSE,
    CpuidFeature::AVX512ER,
    CpuidFeature::AVX512PF,
    CpuidFeature::AVX512_4FMAPS,
    CpuidFeature::AVX512_4VNNIW,
    CpuidFeature::PADLOCK_ACE,
    CpuidFeature::PADLOCK_PHE,
    CpuidFeature::PADLOCK_PMM,
    CpuidFeature::PADLOCK_RNG,
    CpuidFeature::PADLOCK_GMI,
    CpuidFeature::SERIALIZE,
    CpuidFeature::TSXLDTRK,
    CpuidFeature::AMX_BF16,
    CpuidFeature::AMX_TILE,
    CpuidFeature::AMX_INT8,
    CpuidFeature::UINTR,
    CpuidFeature::HRESET,
    CpuidFeature::AVX512_FP16,
    CpuidFeature::RAO_INT,
    CpuidFeature::PREFETCHITI,
    CpuidFeature::AMX_FP16,
    CpuidFeature::CMPCCXADD,
    CpuidFeature::AVX_IFMA,
    CpuidFeature::AVX_NE_CONVERT,
    CpuidFeature::AVX_VNNI_INT8,
    CpuidFeature::MSRLIST,
    CpuidFeature::WRMSRNS,
    CpuidFeature::AMX_COMPLEX,
    CpuidFeature::SHA512,
    CpuidFeature::SM3,
    CpuidFeature::AVX_VNNI_INT16,
];

/// The legacy and REX prefixes at the start of `b`, and the byte after them.
fn prefixes(b: &[u8]) -> (&[u8], Option<u8>) {
    let n = b
        .iter()
        .take_while(|x| {
            matches!(
                x,
                0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x66 | 0x67
            ) || (0x40..=0x4f).contains(*x)
        })
        .count();
    (&b[..n], b.get(n).copied())
}

/// Which known difference explains a disagreement, if one does.
fn known(b: &[u8], iced: &Instruction, cs: Option<(&str, usize)>) -> Option<&'static str> {
    let (pre, opcode) = prefixes(b);
    let lock = pre.contains(&0xf0);
    match (iced.is_invalid(), cs) {
        // capstone decodes what the CPU refuses.
        (true, Some(_)) if lock => Some("LOCK where it is not allowed: #UD (capstone ignores)"),
        (true, Some(("mov", _)))
            if opcode == Some(0x0f) && matches!(b.get(pre.len() + 1), Some(0x20..=0x23)) =>
        {
            Some("mov to or from CR1, CR5-CR7, CR9-CR15 or DR8-DR15: #UD (capstone decodes it)")
        }
        (true, Some(("mov", _))) if opcode == Some(0x8e) => {
            Some("mov to CS or a segment register above gs: #UD (capstone decodes it)")
        }
        (true, Some(_))
            if opcode == Some(0x0f) && matches!(b.get(pre.len() + 1), Some(0xa6 | 0xa7)) =>
        {
            Some("VIA PadLock opcodes with a ModRM no PadLock instruction has (iced: invalid)")
        }
        (true, Some(_)) if opcode == Some(0x8f) => {
            Some("XOP with a prefix or field the opcode forbids: #UD (capstone decodes it)")
        }
        (true, Some(_)) if opcode == Some(0x62) => Some(
            "EVEX with a reserved field set or a combination the opcode forbids: #UD (capstone decodes it)",
        ),
        (true, Some(_))
            if opcode == Some(0x0f) && pre.iter().any(|p| matches!(p, 0xf2 | 0xf3 | 0x66)) =>
        {
            Some("a 66/F2/F3 prefix that makes a 0F opcode undefined: #UD (capstone decodes it)")
        }
        (true, Some(_))
            if matches!(opcode, Some(0xc4 | 0xc5 | 0x62))
                && pre
                    .iter()
                    .any(|p| matches!(p, 0x66 | 0xf2 | 0xf3) || (0x40..=0x4f).contains(p)) =>
        {
            Some("a 66/F2/F3/REX prefix before VEX or EVEX: #UD (capstone decodes it)")
        }
        // iced decodes what capstone lacks.
        (false, None) => {
            let m = iced.mnemonic();
            if opcode == Some(0x62) {
                Some("EVEX forms capstone does not decode (masking, broadcast, rounding bits)")
            } else if matches!(opcode, Some(0xc4 | 0xc5)) && !pre.is_empty() {
                Some("VEX after a segment prefix (capstone: invalid)")
            } else if opcode == Some(0x0f) && pre.iter().any(|p| matches!(p, 0xf2 | 0xf3)) {
                Some("an F2/F3 prefix the opcode ignores (capstone: invalid)")
            } else if m == Mnemonic::Pause {
                Some("pause (F3 90) with 66 or REX prefixes (capstone: invalid)")
            } else if opcode == Some(0xc4) && b.get(pre.len() + 2).is_some_and(|x| x & 0x80 != 0) {
                Some("VEX.W set on an instruction that ignores it (capstone: invalid)")
            } else if m == Mnemonic::Movsxd {
                Some("movsxd without REX.W (capstone: invalid)")
            } else if matches!(
                m,
                Mnemonic::Fxch | Mnemonic::Fcomp | Mnemonic::Fstp | Mnemonic::Fcom
            ) {
                Some("x87 alias encodings (DC D0+i, DD C8+i, DE D0+i, DF D0+i...)")
            } else if matches!(
                m,
                Mnemonic::Reservednop | Mnemonic::Prefetch | Mnemonic::Prefetchw
            ) {
                Some("0F 0D and 0F 18-1F hint NOPs in every ModRM form")
            } else if matches!(m, Mnemonic::Sfence | Mnemonic::Lfence | Mnemonic::Mfence) {
                Some("fences with a nonzero ModRM r/m")
            } else if iced
                .cpuid_features()
                .iter()
                .any(|f| CAPSTONE_LACKS.contains(f))
            {
                Some("ISA extensions capstone 5 lacks (newer, Xeon Phi, VIA PadLock)")
            } else {
                None
            }
        }
        (false, Some((m, len))) if len != iced.len() => {
            if matches!(m, "ud0" | "ud1") && len < iced.len() {
                Some("ud0/ud1: capstone leaves out the ModRM byte")
            } else if iced.mnemonic() == Mnemonic::Ret && len == iced.len() + 2 {
                Some("ret imm16 with 66 and REX: capstone reads a 4-byte immediate")
            } else if iced.is_jcc_short_or_near() || iced.is_jmp_near() || iced.is_call_near() {
                (pre.contains(&0x66) && len + 2 == iced.len()).then_some(
                    "66 on a near branch: rel32 as Intel CPUs decode it (iced), rel16 (capstone)",
                )
            } else {
                None
            }
        }
        _ => None,
    }
}

#[test]
fn iced_and_capstone_agree_on_random_bytes_but_for_known_differences() {
    let cs = Capstone::new()
        .x86()
        .mode(arch::x86::ArchMode::Mode64)
        .detail(false)
        .build()
        .unwrap();
    let n: u64 = std::env::var("PVPATCH_DECODE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut explained: BTreeMap<&str, u64> = BTreeMap::new();
    let mut unexplained = Vec::new();
    let mut agree = 0u64;
    for _ in 0..n {
        let mut b = [0u8; 16];
        for c in b.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let iced = Decoder::with_ip(64, &b, 0x1000, DecoderOptions::NONE).decode();
        let insns = cs.disasm_count(&b, 0x1000, 1).unwrap();
        let theirs = insns
            .iter()
            .next()
            .map(|i| (i.mnemonic().unwrap_or(""), i.len()));
        let same = match theirs {
            None => iced.is_invalid(),
            Some((_, len)) => !iced.is_invalid() && len == iced.len(),
        };
        if same {
            agree += 1;
            continue;
        }
        let theirs_owned = theirs.map(|(m, l)| (m.to_owned(), l));
        match known(
            &b,
            &iced,
            theirs_owned.as_ref().map(|(m, l)| (m.as_str(), *l)),
        ) {
            Some(why) => *explained.entry(why).or_default() += 1,
            None => unexplained.push(format!(
                "{:02x?}: iced {} ({} bytes), capstone {theirs_owned:?}",
                &b[..iced.len().max(8)],
                if iced.is_invalid() {
                    "invalid".to_owned()
                } else {
                    format!("{iced}")
                },
                iced.len()
            )),
        }
    }
    eprintln!("{n} buffers: {agree} agree; known differences: {explained:#?}");
    assert!(
        unexplained.is_empty(),
        "{} unexplained disagreements:\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
    assert!(agree > n * 9 / 10);
}
