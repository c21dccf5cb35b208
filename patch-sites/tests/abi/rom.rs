//! One test per way a backend ROM can be wrong.

use patch_sites::crc32::crc32;
use patch_sites::rom::{
    NO_REX, ROM_ENTRY_SIZE, ROM_HEADER_SIZE, RomAction, RomEntryError, RomEntrySpec, RomKind,
    RomWriteError, Slot, SlotKind, SlotSource, rom_size, write_rom,
};
use patch_sites::{Op, RegSet, Rom, RomError};

const SIG: [u8; 12] = *b"TCGTCGTCGTCG";

pub fn sample() -> Vec<u8> {
    // mov cr3, rdi (0f 22 df) with the register in ModRM.rm; out imm8, al (e6 ib).
    let cr3 = [0x0f, 0x22, 0xdf];
    let cr3_slots = [Slot {
        kind: SlotKind::ModrmRm,
        offset: 2,
        rex_offset: NO_REX,
        source: SlotSource::Reg,
    }];
    let out = [0xe6, 0x00];
    let out_slots = [Slot {
        kind: SlotKind::Imm8,
        offset: 1,
        rex_offset: NO_REX,
        source: SlotSource::Port,
    }];
    let thunk = [0xfa, 0xc3]; // cli; ret
    let entries = [
        RomEntrySpec {
            op_id: Op::IoDelay.id(),
            kind: RomKind::Nothing,
            code: &[],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::Sti.id(),
            kind: RomKind::Native,
            code: &[],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::MovToCr3.id(),
            kind: RomKind::Inline,
            code: &cr3,
            slots: &cr3_slots,
            clobbers: RegSet::FLAGS,
        },
        RomEntrySpec {
            op_id: Op::Out.id(),
            kind: RomKind::Inline,
            code: &out,
            slots: &out_slots,
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::Cli.id(),
            kind: RomKind::Call,
            code: &thunk,
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
    ];
    let mut buf = vec![0u8; rom_size(&entries)];
    let n = write_rom("test-rom", SIG, &entries, &mut buf).expect("valid");
    assert_eq!(n, buf.len());
    buf
}

fn reseal(b: &mut [u8]) {
    b[20..24].fill(0);
    let sum = crc32(b);
    b[20..24].copy_from_slice(&sum.to_le_bytes());
}

fn entry_mut(b: &mut [u8], i: usize) -> &mut [u8] {
    &mut b[ROM_HEADER_SIZE + i * ROM_ENTRY_SIZE..][..ROM_ENTRY_SIZE]
}

fn entry_error(b: &[u8]) -> (u16, RomEntryError) {
    match Rom::parse(b) {
        Err(RomError::Entry { index, error }) => (index, error),
        other => panic!("expected an entry error, got {other:?}"),
    }
}

#[test]
fn a_written_rom_parses_back() {
    let b = sample();
    let rom = Rom::parse(&b).unwrap();
    assert_eq!(rom.name(), "test-rom");
    assert!(rom.serves(&SIG));
    assert!(!rom.serves(b"KVMKVMKVM\0\0\0"));
    assert_eq!(rom.len(), 5);
    assert_eq!(rom.entry(Op::IoDelay).unwrap().action, RomAction::Nothing);
    assert_eq!(rom.entry(Op::Sti).unwrap().action, RomAction::Native);
    let e = rom.entry(Op::MovToCr3).unwrap();
    match e.action {
        RomAction::Inline { template, .. } => assert_eq!(template, [0x0f, 0x22, 0xdf]),
        other => panic!("{other:?}"),
    }
    assert_eq!(e.slots().count(), 1);
    match rom.entry(Op::Cli).unwrap().action {
        RomAction::Call { code_off, code } => {
            assert_eq!(code, [0xfa, 0xc3]);
            assert_eq!(code_off % 16, 0);
            assert_eq!(&b[code_off as usize..][..2], code);
        }
        other => panic!("{other:?}"),
    }
    assert!(rom.entry(Op::Hlt).is_none());
}

#[test]
fn truncated() {
    let b = sample();
    assert_eq!(
        Rom::parse(&b[..63]).unwrap_err(),
        RomError::TruncatedHeader { available: 63 }
    );
    assert!(matches!(
        Rom::parse(&b[..b.len() - 1]),
        Err(RomError::LengthMismatch { .. })
    ));
}

#[test]
fn bad_magic_version_sizes() {
    let mut b = sample();
    b[3] = b'x';
    assert_eq!(Rom::parse(&b).unwrap_err(), RomError::BadMagic);
    let mut b = sample();
    b[8] = 9;
    reseal(&mut b);
    assert_eq!(Rom::parse(&b).unwrap_err(), RomError::UnsupportedVersion(9));
    let mut b = sample();
    b[10] = 32;
    reseal(&mut b);
    assert_eq!(Rom::parse(&b).unwrap_err(), RomError::BadHeaderSize(32));
    let mut b = sample();
    b[12] = 16;
    reseal(&mut b);
    assert_eq!(
        Rom::parse(&b).unwrap_err(),
        RomError::EntrySizeMismatch { found: 16 }
    );
}

#[test]
fn entry_count_that_overflows() {
    let mut b = sample();
    b[14..16].copy_from_slice(&u16::MAX.to_le_bytes());
    reseal(&mut b);
    let e = Rom::parse(&b).unwrap_err();
    assert_eq!(
        e,
        RomError::EntriesOverflow {
            count: u16::MAX,
            available: b.len()
        }
    );
    let needed = ROM_HEADER_SIZE + u16::MAX as usize * ROM_ENTRY_SIZE;
    assert!(
        e.to_string().contains(&format!("need {needed} bytes")),
        "{e}"
    );
}

#[test]
fn bad_checksum() {
    let mut b = sample();
    let last = b.len() - 1;
    b[last] ^= 0xff;
    assert!(matches!(Rom::parse(&b), Err(RomError::BadChecksum { .. })));
}

#[test]
fn bad_name_and_reserved_fields() {
    let mut b = sample();
    b[24] = 0; // empty name
    reseal(&mut b);
    assert_eq!(Rom::parse(&b).unwrap_err(), RomError::BadName);
    let mut b = sample();
    b[30] = 0x07; // control character
    reseal(&mut b);
    assert_eq!(Rom::parse(&b).unwrap_err(), RomError::BadName);
    let mut b = sample();
    b[52] = 1;
    reseal(&mut b);
    assert_eq!(Rom::parse(&b).unwrap_err(), RomError::ReservedHeaderBits);
}

#[test]
fn template_outside_the_rom() {
    let mut b = sample();
    let len = b.len() as u32;
    entry_mut(&mut b, 2)[4..8].copy_from_slice(&(len - 1).to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (2, RomEntryError::CodeOutOfBounds));
    // pointing into the header is refused too
    let mut b = sample();
    entry_mut(&mut b, 2)[4..8].copy_from_slice(&8u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (2, RomEntryError::CodeOutOfBounds));
}

#[test]
fn template_too_long() {
    let mut b = sample();
    entry_mut(&mut b, 2)[8..10].copy_from_slice(&65u16.to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (2, RomEntryError::TemplateTooLong(65)));
    assert_eq!(
        RomEntryError::TemplateTooLong(65).to_string(),
        "inline template of 65 bytes, more than the 64-byte limit"
    );
}

#[test]
fn bad_kind_slots_and_fields() {
    let mut b = sample();
    entry_mut(&mut b, 0)[2] = 7;
    reseal(&mut b);
    assert_eq!(entry_error(&b), (0, RomEntryError::BadKind(7)));

    let mut b = sample();
    entry_mut(&mut b, 2)[3] = 9; // 9 slots
    reseal(&mut b);
    assert_eq!(entry_error(&b), (2, RomEntryError::TooManySlots(9)));
    assert_eq!(
        RomEntryError::TooManySlots(9).to_string(),
        "9 slots, more than the limit of 8"
    );

    // a slot pointing past its template
    let mut b = sample();
    let slots_off = u32::from_le_bytes(entry_mut(&mut b, 2)[16..20].try_into().unwrap()) as usize;
    b[slots_off + 1] = 3;
    reseal(&mut b);
    assert_eq!(entry_error(&b), (2, RomEntryError::BadSlot(0)));

    // a port slot taking a register
    let mut b = sample();
    let slots_off = u32::from_le_bytes(entry_mut(&mut b, 3)[16..20].try_into().unwrap()) as usize;
    b[slots_off + 3] = 1;
    reseal(&mut b);
    assert_eq!(entry_error(&b), (3, RomEntryError::BadSlot(0)));

    // "nothing" with code
    let mut b = sample();
    entry_mut(&mut b, 0)[8..10].copy_from_slice(&2u16.to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (0, RomEntryError::UnexpectedFields));

    let mut b = sample();
    entry_mut(&mut b, 1)[20] = 1;
    reseal(&mut b);
    assert_eq!(entry_error(&b), (1, RomEntryError::ReservedBits));
}

#[test]
fn duplicate_op() {
    let mut b = sample();
    let cli = Op::Cli.id().to_le_bytes();
    entry_mut(&mut b, 1)[0..2].copy_from_slice(&cli);
    reseal(&mut b);
    assert_eq!(
        entry_error(&b),
        (4, RomEntryError::DuplicateOp { other: 1 })
    );
}

#[test]
fn unknown_op_entries_are_ignored() {
    let mut b = sample();
    entry_mut(&mut b, 1)[0..2].copy_from_slice(&0x555u16.to_le_bytes());
    reseal(&mut b);
    let rom = Rom::parse(&b).unwrap();
    assert_eq!(rom.unknown_ops(), 1);
    assert!(rom.entry(Op::Sti).is_none());
    assert!(rom.entry(Op::Cli).is_some());
}

#[test]
fn writer_refuses_bad_names() {
    let mut buf = [0u8; 256];
    for name in ["", "a name that is far too long", "tab\there"] {
        assert_eq!(
            write_rom(name, SIG, &[], &mut buf),
            Err(RomWriteError::BadName)
        );
    }
}

// ---- Limits at their edges, and what a parsed ROM reports (found by `cargo xtask mutants`) --

fn written(name: &str, entries: &[RomEntrySpec<'_>]) -> Result<Vec<u8>, RomWriteError> {
    let mut buf = vec![0u8; rom_size(entries)];
    write_rom(name, SIG, entries, &mut buf).map(|_| buf)
}

#[test]
fn a_rom_of_exactly_the_largest_size_is_accepted_and_one_byte_more_is_not() {
    use patch_sites::rom::MAX_ROM_LEN;
    // One call entry whose code fills the ROM to the byte.
    let fixed = rom_size(&[RomEntrySpec::new(Op::Cli, RomKind::Call, &[])]);
    let code = vec![0x90; MAX_ROM_LEN - fixed];
    let b = written(
        "largest",
        &[RomEntrySpec::new(Op::Cli, RomKind::Call, &code)],
    )
    .expect("fits");
    assert_eq!(b.len(), MAX_ROM_LEN);
    assert_eq!(Rom::parse(&b).unwrap().len(), 1);
    let code = vec![0x90; MAX_ROM_LEN - fixed + 1];
    let mut buf = vec![0u8; MAX_ROM_LEN + 1];
    assert!(matches!(
        write_rom(
            "largest",
            SIG,
            &[RomEntrySpec::new(Op::Cli, RomKind::Call, &code)],
            &mut buf
        ),
        Err(RomWriteError::TooLong { needed }) if needed == MAX_ROM_LEN + 1
    ));
    // A buffer one byte short of what the ROM needs.
    let entries = [RomEntrySpec::new(Op::Cli, RomKind::Call, &[0xfa, 0xc3])];
    let mut short = vec![0u8; rom_size(&entries) - 1];
    assert!(matches!(
        write_rom("short", SIG, &entries, &mut short),
        Err(RomWriteError::BufferTooSmall { .. })
    ));
}

#[test]
fn a_rom_over_the_limit_is_refused_for_the_limit() {
    use patch_sites::rom::MAX_ROM_LEN;
    // A ROM whose header says 70,277 bytes, given 70,277: the limit is what is wrong.
    let mut b = written("big", &[]).unwrap();
    b.resize(70_277, 0);
    b[16..20].copy_from_slice(&70_277u32.to_le_bytes());
    reseal(&mut b);
    let e = Rom::parse(&b).unwrap_err();
    assert_eq!(e, RomError::TooLong { len: 70_277 });
    assert_eq!(
        e.to_string(),
        format!("ROM is 70277 bytes, more than the {MAX_ROM_LEN}-byte limit")
    );
    // A length that disagrees is still said to disagree.
    let b = sample();
    let e = Rom::parse(&b[..b.len() - 1]).unwrap_err();
    assert!(e.to_string().contains("disagrees"), "{e}");
    assert!(!e.to_string().contains("limit"), "{e}");
    // Written: the writer names the limit too, not a buffer.
    let fixed = rom_size(&[RomEntrySpec::new(Op::Cli, RomKind::Call, &[])]);
    let code = vec![0x90; 70_277 - fixed];
    let e = written("big", &[RomEntrySpec::new(Op::Cli, RomKind::Call, &code)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("the ROM would be 70277 bytes, more than the {MAX_ROM_LEN}-byte limit")
    );
}

#[test]
fn an_empty_rom_is_its_header() {
    let b = written("empty", &[]).unwrap();
    assert_eq!(b.len(), ROM_HEADER_SIZE);
    let rom = Rom::parse(&b).unwrap();
    assert!(rom.is_empty());
    assert_eq!(
        (rom.len(), rom.unknown_ops(), rom.entries().count()),
        (0, 0, 0)
    );
    assert_eq!(rom.signature(), SIG);
    assert!(!Rom::parse(&sample()).unwrap().is_empty());
}

#[test]
fn entries_without_data_end_the_rom() {
    // Two entries and no code: the data starts where the ROM ends.
    let b = written(
        "no-data",
        &[
            RomEntrySpec::new(Op::Cli, RomKind::Native, &[]),
            RomEntrySpec::new(Op::Sti, RomKind::Nothing, &[]),
        ],
    )
    .unwrap();
    assert_eq!(b.len(), ROM_HEADER_SIZE + 2 * ROM_ENTRY_SIZE);
    let rom = Rom::parse(&b).unwrap();
    let actions: Vec<RomAction<'_>> = rom.entries().map(|e| e.action).collect();
    assert_eq!(actions, [RomAction::Native, RomAction::Nothing]);
    assert_eq!(rom.unknown_ops(), 0);
    // A count one more than the bytes hold.
    let mut b = b;
    b[14..16].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(
        Rom::parse(&b).unwrap_err(),
        RomError::EntriesOverflow {
            count: 3,
            available: b.len()
        }
    );
}

#[test]
fn names_of_one_and_of_sixteen_characters() {
    for name in ["x", "sixteen-chars-ok"] {
        let b = written(name, &[]).unwrap();
        assert_eq!(Rom::parse(&b).unwrap().name(), name);
    }
    assert_eq!(
        written("seventeen-chars-x", &[]).unwrap_err(),
        RomWriteError::BadName
    );
    // A name of no characters, written by hand.
    let mut b = written("x", &[]).unwrap();
    b[24] = 0;
    reseal(&mut b);
    assert_eq!(Rom::parse(&b).unwrap_err(), RomError::BadName);
}

#[test]
fn entries_that_carry_fields_their_kind_does_not_have() {
    // A native entry with only a code length; a call with only a slot table.
    let mut b = written(
        "fields",
        &[RomEntrySpec::new(Op::Sti, RomKind::Native, &[])],
    )
    .unwrap();
    entry_mut(&mut b, 0)[8..10].copy_from_slice(&1u16.to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (0, RomEntryError::UnexpectedFields));
    let mut b = written(
        "fields",
        &[RomEntrySpec::new(Op::Cli, RomKind::Call, &[0xfa, 0xc3])],
    )
    .unwrap();
    entry_mut(&mut b, 0)[16..20].copy_from_slice(&64u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (0, RomEntryError::UnexpectedFields));
    // A template without slots but with a slot table offset.
    let mut b = written(
        "fields",
        &[RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0xfa])],
    )
    .unwrap();
    entry_mut(&mut b, 0)[16..20].copy_from_slice(&64u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (0, RomEntryError::UnexpectedFields));
}

#[test]
fn the_longest_template_and_the_most_slots() {
    use patch_sites::rom::{MAX_SLOTS, MAX_TEMPLATE_LEN};
    let code = vec![0x90; MAX_TEMPLATE_LEN];
    let slots: Vec<Slot> = (0..MAX_SLOTS as u8)
        .map(|k| Slot {
            kind: SlotKind::Imm8,
            offset: k,
            rex_offset: NO_REX,
            source: SlotSource::Port,
        })
        .collect();
    let e = RomEntrySpec {
        slots: &slots,
        ..RomEntrySpec::new(Op::Out, RomKind::Inline, &code)
    };
    let b = written("longest", &[e]).unwrap();
    let rom = Rom::parse(&b).unwrap();
    let got = rom.entry(Op::Out).unwrap();
    assert_eq!(got.slots().count(), MAX_SLOTS);
    match got.action {
        RomAction::Inline { template, .. } => assert_eq!(template.len(), MAX_TEMPLATE_LEN),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_slot_kind_and_source_reads_back() {
    // lldt's template `lldt di` (0f 00 d7): the register in ModRM.rm; a ModRM.reg slot and
    // an opcode-register slot with the second register as source, for the reader's sake.
    let slots = [
        Slot {
            kind: SlotKind::ModrmReg,
            offset: 2,
            rex_offset: NO_REX,
            source: SlotSource::Reg2,
        },
        Slot {
            kind: SlotKind::OpcodeReg,
            offset: 1,
            rex_offset: 0,
            source: SlotSource::Reg,
        },
    ];
    let e = RomEntrySpec {
        slots: &slots,
        ..RomEntrySpec::new(Op::MovToDr, RomKind::Inline, &[0x0f, 0x23, 0xc7])
    };
    let b = written("slots", &[e]).unwrap();
    let rom = Rom::parse(&b).unwrap();
    let got: Vec<Slot> = rom.entry(Op::MovToDr).unwrap().slots().collect();
    assert_eq!(got, slots);
}

#[test]
fn kinds_and_errors_have_names() {
    assert_eq!(
        [
            RomKind::Nothing.name(),
            RomKind::Native.name(),
            RomKind::Inline.name(),
            RomKind::Call.name()
        ],
        ["nothing", "native", "inline", "call"]
    );
    for shown in [
        RomError::BadName.to_string(),
        RomError::EntriesOverflow {
            count: 3,
            available: 100,
        }
        .to_string(),
        RomEntryError::UnexpectedFields.to_string(),
        RomWriteError::BadName.to_string(),
    ] {
        assert!(shown.len() > 8, "{shown:?}");
    }
}

#[test]
fn a_rom_of_sixty_kilobytes_is_accepted() {
    // The format allows 64 KiB: a large entry point (60,000 bytes) is no reason to refuse.
    let code = vec![0x90; 60_000];
    let b = written("large", &[RomEntrySpec::new(Op::Cli, RomKind::Call, &code)]).unwrap();
    assert_eq!(Rom::parse(&b).unwrap().len(), 1);
}

#[test]
fn a_native_entry_with_only_a_code_offset() {
    let mut b = written(
        "fields",
        &[RomEntrySpec::new(Op::Sti, RomKind::Native, &[])],
    )
    .unwrap();
    entry_mut(&mut b, 0)[4..8].copy_from_slice(&64u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(entry_error(&b), (0, RomEntryError::UnexpectedFields));
}

#[test]
fn a_native_entry_with_only_a_slot_count_or_only_a_slot_table() {
    for (at, v) in [(3usize, 1u32), (16, 64)] {
        let mut b = written(
            "fields",
            &[RomEntrySpec::new(Op::Sti, RomKind::Native, &[])],
        )
        .unwrap();
        if at == 3 {
            entry_mut(&mut b, 0)[3] = v as u8;
        } else {
            entry_mut(&mut b, 0)[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        reseal(&mut b);
        assert_eq!(
            entry_error(&b),
            (0, RomEntryError::UnexpectedFields),
            "{at}"
        );
    }
}
