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
    assert_eq!(
        Rom::parse(&b).unwrap_err(),
        RomError::EntriesOverflow { count: u16::MAX }
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
    assert_eq!(entry_error(&b), (2, RomEntryError::BadSlots));

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
