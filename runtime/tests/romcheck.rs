//! The ROM validator, on hand-written ROMs: one that is right for the kernel's sites passes, and
//! each way a ROM can be wrong is refused, with the reason (found by `cargo xtask mutants`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use patch_sites::rom::{NO_REX, Rom, RomEntrySpec, RomKind, Slot, SlotKind, SlotSource};
use patch_sites::table::{AddrRange, Form, Site, SiteTable, write_sealed_table};
use patch_sites::{Gpr, Op, Operand, RegSet};
use pvpatch_runtime::romcheck::{self, RomRefusal};

const TEXT: AddrRange = AddrRange::new(0x40_0000, 0x40_1000);
const TABLE_ADDR: u64 = 0x80_0000;
const KVM: [u8; 12] = *b"KVMKVMKVM\0\0\0";

fn site(addr: u64, op: Op, operand: Operand, width: u8, insn_len: u8) -> Site {
    Site {
        addr,
        site_len: 6,
        insn_len,
        op_id: op.id(),
        form: Form::Native,
        operand,
        width,
        flags: 0,
        clobbers: RegSet::EMPTY,
        stub: None,
    }
}

/// The kernel's sites: `pushfq; pop rbx` (save_fl into rbx), `cli`, `rdtsc`.
fn table_bytes() -> Vec<u8> {
    let sites = [
        site(TEXT.start + 0x10, Op::SaveFl, Operand::Reg(Gpr::Rbx), 8, 2),
        site(TEXT.start + 0x20, Op::Cli, Operand::None, 0, 1),
        site(TEXT.start + 0x30, Op::Rdtsc, Operand::None, 0, 2),
    ];
    let mut b = vec![0u8; patch_sites::table::sealed_table_size(sites.len())];
    write_sealed_table(&sites, TABLE_ADDR, &mut b).unwrap();
    b
}

const SAVE_FL_SLOT: [Slot; 1] = [Slot {
    kind: SlotKind::OpcodeReg,
    offset: 1,
    rex_offset: NO_REX,
    source: SlotSource::Reg,
}];

/// A ROM of `entries` for `signature`.
fn rom(signature: [u8; 12], entries: &[RomEntrySpec<'_>]) -> Vec<u8> {
    let mut buf = vec![0u8; patch_sites::rom::rom_size(entries)];
    patch_sites::rom::write_rom("validator-test", signature, entries, &mut buf).unwrap();
    buf
}

/// A ROM right for the table: `save_fl` inline with its register put in, `rdtsc` through an
/// entry point, `cli` left native.
fn good() -> Vec<RomEntrySpec<'static>> {
    vec![
        RomEntrySpec {
            slots: &SAVE_FL_SLOT,
            ..RomEntrySpec::new(Op::SaveFl, RomKind::Inline, &[0x9c, 0x58])
        },
        RomEntrySpec::new(Op::Rdtsc, RomKind::Call, &[0x0f, 0x31, 0xc3]),
        RomEntrySpec::new(Op::Cli, RomKind::Native, &[]),
    ]
}

/// [`good`] with `bad` in place of its entry for the same op (or added).
fn good_but(bad: RomEntrySpec<'static>) -> Vec<RomEntrySpec<'static>> {
    let mut e: Vec<RomEntrySpec<'_>> = good()
        .into_iter()
        .filter(|x| x.op_id != bad.op_id)
        .collect();
    e.push(bad);
    e
}

fn check(signature: [u8; 12], entries: &[RomEntrySpec<'_>]) -> Result<(), RomRefusal> {
    let bytes = rom(signature, entries);
    let r = Rom::parse(&bytes).unwrap();
    let t = table_bytes();
    let table = SiteTable::parse_contiguous(&t, TABLE_ADDR, &[TEXT]).unwrap();
    romcheck::validate_code(&r)?;
    romcheck::validate(&r, &KVM, &table)
}

#[test]
fn a_right_rom_passes() {
    assert_eq!(check(KVM, &good()), Ok(()));
    assert_eq!(check([0; 12], &good()), Ok(()), "a ROM for any hypervisor");
}

#[test]
fn a_rom_for_another_hypervisor_is_refused() {
    assert_eq!(
        check(*b"Microsoft Hv", &good()),
        Err(RomRefusal::WrongSignature)
    );
}

#[test]
fn an_entry_for_a_hypervisor_interface_is_refused() {
    let mut e = good();
    e.push(RomEntrySpec::new(
        Op::Vmcall,
        RomKind::Inline,
        &[0x0f, 0x01, 0xc1],
    ));
    assert_eq!(check(KVM, &e), Err(RomRefusal::OpNotPatchable(Op::Vmcall)));
}

#[test]
fn bad_instructions_are_refused_in_templates_and_entry_points() {
    for (what, bad) in [
        (
            "a vmcall in a template",
            RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0x0f, 0x01, 0xc1]),
        ),
        (
            "an entry point that jumps out",
            RomEntrySpec::new(Op::Rdtsc, RomKind::Call, &[0x0f, 0x31, 0xe9, 0, 1, 0, 0]),
        ),
        (
            "a template that does not decode",
            RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0x0f, 0xff]),
        ),
    ] {
        let r = check(KVM, &good_but(bad));
        assert!(matches!(r, Err(RomRefusal::Code { .. })), "{what}: {r:?}");
    }
}

#[test]
fn the_per_entry_checks_are_the_boot_time_ones() {
    // What `pvpatch rom show` reports per entry is what the boot-time path refuses the ROM for.
    for bad in [
        RomEntrySpec::new(Op::Vmcall, RomKind::Nothing, &[]),
        RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0x0f, 0x01, 0xc1]),
        RomEntrySpec::new(Op::Rdtsc, RomKind::Call, &[0x0f, 0x31, 0xe9, 0, 1, 0, 0]),
        RomEntrySpec::new(Op::Cli, RomKind::Inline, &[0x0f, 0xff]),
    ] {
        let e = good_but(bad);
        let bytes = rom(KVM, &e);
        let r = Rom::parse(&bytes).unwrap();
        let per_entry: Vec<_> = r
            .entries()
            .filter_map(|x| romcheck::validate_entry(&x).err())
            .collect();
        assert_eq!(per_entry.len(), 1, "{per_entry:?}");
        let t = table_bytes();
        let table = SiteTable::parse_contiguous(&t, TABLE_ADDR, &[TEXT]).unwrap();
        assert_eq!(romcheck::validate(&r, &KVM, &table), Err(per_entry[0]));
        assert_eq!(romcheck::validate_code(&r), Err(per_entry[0]));
    }
    let bytes = rom(KVM, &good());
    let r = Rom::parse(&bytes).unwrap();
    assert!(r.entries().all(|x| romcheck::validate_entry(&x).is_ok()));
}

#[test]
fn a_sequence_on_another_operand_is_refused() {
    // save_fl into rax where the site saves into rbx: inline (no slot), and as an entry point.
    // The entries declare rax clobbered, so only the operand check can see it.
    for kind in [RomKind::Inline, RomKind::Call] {
        let code: &'static [u8] = if kind == RomKind::Inline {
            &[0x9c, 0x58]
        } else {
            &[0x9c, 0x58, 0xc3]
        };
        let wrong = RomEntrySpec {
            clobbers: RegSet::of(&[Gpr::Rax]),
            ..RomEntrySpec::new(Op::SaveFl, kind, code)
        };
        let r = check(KVM, &good_but(wrong));
        assert!(
            matches!(r, Err(RomRefusal::WrongOperand { op: Op::SaveFl, .. })),
            "{:?}: {r:?}",
            wrong.kind
        );
    }
}

#[test]
fn a_sequence_that_changes_more_than_the_site_allows_is_refused() {
    // rdtsc then `xor ecx, ecx`: rcx is not rdtsc's to change.
    for wrong in [
        RomEntrySpec::new(Op::Rdtsc, RomKind::Inline, &[0x0f, 0x31, 0x31, 0xc9]),
        RomEntrySpec::new(Op::Rdtsc, RomKind::Call, &[0x0f, 0x31, 0x31, 0xc9, 0xc3]),
    ] {
        let r = check(KVM, &good_but(wrong));
        assert!(
            matches!(r, Err(RomRefusal::Code { op: Op::Rdtsc, .. })),
            "{:?}: {r:?}",
            wrong.kind
        );
    }
}

#[test]
fn refusals_say_what_is_wrong() {
    for (r, word) in [
        (RomRefusal::WrongSignature, "hypervisor"),
        (RomRefusal::OpNotPatchable(Op::Vmcall), "vmcall"),
        (
            RomRefusal::WrongOperand {
                op: Op::SaveFl,
                addr: 0x40_0010,
            },
            "0x400010",
        ),
    ] {
        let shown = r.to_string();
        assert!(shown.contains(word), "{shown}");
    }
}

/// The checks run once per kind of site (op, operand, width), and a refusal still names the
/// first site in table order that the ROM cannot serve: here `save_fl` into rbx twice, then into
/// rcx twice, and a template fixed to rbx.
#[test]
fn each_kind_of_site_is_checked_and_the_first_that_fails_is_named() {
    let sites = [
        site(TEXT.start + 0x10, Op::SaveFl, Operand::Reg(Gpr::Rbx), 8, 2),
        site(TEXT.start + 0x20, Op::SaveFl, Operand::Reg(Gpr::Rbx), 8, 2),
        site(TEXT.start + 0x30, Op::SaveFl, Operand::Reg(Gpr::Rcx), 8, 2),
        site(TEXT.start + 0x40, Op::SaveFl, Operand::Reg(Gpr::Rcx), 8, 2),
    ];
    let mut t = vec![0u8; patch_sites::table::sealed_table_size(sites.len())];
    write_sealed_table(&sites, TABLE_ADDR, &mut t).unwrap();
    let table = SiteTable::parse_contiguous(&t, TABLE_ADDR, &[TEXT]).unwrap();
    let fixed = [RomEntrySpec {
        clobbers: RegSet::of(&[Gpr::Rbx, Gpr::Rcx]),
        // pushfq; pop rbx
        ..RomEntrySpec::new(Op::SaveFl, RomKind::Inline, &[0x9c, 0x5b])
    }];
    let bytes = rom(KVM, &fixed);
    let r = Rom::parse(&bytes).unwrap();
    assert_eq!(
        romcheck::validate(&r, &KVM, &table),
        Err(RomRefusal::WrongOperand {
            op: Op::SaveFl,
            addr: TEXT.start + 0x30
        })
    );
    // With the register put in, every kind passes.
    let slotted = [RomEntrySpec {
        slots: &SAVE_FL_SLOT,
        ..RomEntrySpec::new(Op::SaveFl, RomKind::Inline, &[0x9c, 0x58])
    }];
    let bytes = rom(KVM, &slotted);
    let r = Rom::parse(&bytes).unwrap();
    assert_eq!(romcheck::validate(&r, &KVM, &table), Ok(()));
}
