//! The checks that read bytes instead of decoding them (so that the boot-time patcher need not
//! start iced-x86's decoder for the common sites) agree with iced-x86 wherever they answer.

use iced_x86::{Code, Decoder, DecoderOptions, Mnemonic};
use patch_sites::{Op, Operand};
use proptest::prelude::*;
use pvpatch_isa::check::{self, MemOtherForm};
use pvpatch_isa::classify::classify;
use pvpatch_isa::encode::NOPS;

fn decode(bytes: &[u8], ip: u64) -> iced_x86::Instruction {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode()
}

/// Byte strings near the forms `mem_other_form` knows: any prefix byte or none, `0f`, `00` or
/// `01` (sometimes another byte), any ModRM, SIB and displacement bytes (zeros often).
fn near_forms() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(None),
            (0x40u8..=0x4f).prop_map(Some),
            any::<u8>().prop_map(Some)
        ],
        prop_oneof![8 => Just(0x0fu8), 1 => any::<u8>()],
        prop_oneof![4 => Just(0x01u8), 4 => Just(0x00u8), 1 => any::<u8>()],
        any::<u8>(),
        proptest::collection::vec(prop_oneof![2 => Just(0u8), 3 => any::<u8>()], 0..7),
    )
        .prop_map(|(prefix, esc, group, modrm, tail)| {
            let mut v: Vec<u8> = prefix.into_iter().collect();
            v.extend([esc, group, modrm]);
            v.extend(tail);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// Whenever it answers, iced-x86 decodes the same op, a `MemOther` operand, the same width
    /// and the same length.
    #[test]
    fn mem_other_form_agrees_with_iced(bytes in near_forms()) {
        if let Some(MemOtherForm { op, width, len }) = check::mem_other_form(&bytes) {
            let i = decode(&bytes, 0x1000);
            prop_assert!(!i.is_invalid(), "{bytes:02x?} does not decode");
            let c = classify(&i);
            prop_assert_eq!(
                c.map(|c| (c.op, c.operand, c.width, c.rep)),
                Some((op, Operand::MemOther, width, false)),
                "{:02x?}", bytes
            );
            prop_assert_eq!(i.len(), len, "{:02x?}", bytes);
        }
    }

    /// `call_to` accepts exactly what iced-x86 decodes as a 5-byte call to the target.
    #[test]
    fn call_to_agrees_with_iced(
        bytes in proptest::collection::vec(any::<u8>(), 5..9),
        e8 in any::<bool>(),
        addr in any::<u64>(),
        target_is_it in any::<bool>(),
        other in any::<u64>(),
    ) {
        let mut bytes = bytes;
        if e8 {
            bytes[0] = 0xe8;
        }
        let i = decode(&bytes, addr);
        let target = if target_is_it && !i.is_invalid() { i.near_branch_target() } else { other };
        // A direct near call (not `call [mem]` or a far call, whose `near_branch_target` is 0).
        let iced_says = i.code() == Code::Call_rel32_64 && i.near_branch_target() == target && i.len() == 5;
        prop_assert_eq!(check::call_to(&bytes, addr, target).is_ok(), iced_says, "{:02x?}", bytes);
    }
}

#[test]
fn every_recommended_nop_is_recognised_and_is_one_nop() {
    for (n, nop) in NOPS.iter().enumerate().skip(1) {
        let mut b = nop.to_vec();
        b.extend([0x90, 0xcc]);
        assert_eq!(check::recommended_nop(&b), Some(n));
        let i = decode(&b, 0);
        assert_eq!((i.mnemonic(), i.len()), (Mnemonic::Nop, n));
    }
    assert_eq!(check::recommended_nop(&[0xcc]), None);
    assert_eq!(check::recommended_nop(&[0x0f, 0x1f]), None);
}

/// The forms Debian's 6.1 kernel holds (its sgdt, lgdt, lidt, sidt and sldt sites with a
/// displacement or RIP-relative operand) are all answered without the decoder.
#[test]
fn the_kernels_memory_forms_need_no_decoder() {
    let cases: &[(&[u8], Op, u8)] = &[
        (&[0x0f, 0x01, 0x44, 0x24, 0x06], Op::Sgdt, 5),
        (&[0x0f, 0x01, 0x15, 0x25, 0x9f, 0xa1, 0x01], Op::Lgdt, 7),
        (&[0x0f, 0x01, 0x54, 0x24, 0x06], Op::Lgdt, 5),
        (&[0x0f, 0x01, 0x90, 0x0a, 0x01, 0x00, 0x00], Op::Lgdt, 7),
        (&[0x0f, 0x01, 0x1d, 0x16, 0x84, 0xa1, 0x01], Op::Lidt, 7),
        (&[0x0f, 0x01, 0x0d, 0x2a, 0x48, 0x6d, 0x02], Op::Sidt, 7),
        (&[0x0f, 0x00, 0x44, 0x24, 0x08], Op::Sldt, 5),
        (&[0x41, 0x0f, 0x01, 0x7c, 0x24, 0x08], Op::Invlpg, 6),
    ];
    for (bytes, op, len) in cases {
        let f = check::mem_other_form(bytes).unwrap_or_else(|| panic!("{bytes:02x?}"));
        assert_eq!((f.op, f.len), (*op, *len as usize), "{bytes:02x?}");
        let c = classify(&decode(bytes, 0)).unwrap();
        assert_eq!(
            (c.op, c.operand, c.width),
            (f.op, Operand::MemOther, f.width)
        );
    }
    // Base-only addressing is the encoder's form, and a zero displacement is base-only.
    assert_eq!(check::mem_other_form(&[0x0f, 0x01, 0x17]), None);
    assert_eq!(check::mem_other_form(&[0x0f, 0x01, 0x57, 0x00]), None);
    // REX.W and other prefixes are left to the decoder.
    assert_eq!(check::mem_other_form(&[0x48, 0x0f, 0x01, 0x57, 0x08]), None);
    assert_eq!(check::mem_other_form(&[0x65, 0x0f, 0x01, 0x57, 0x08]), None);
}
