//! proptest strategies that produce *valid* ABI values: every site, table and ROM they make is
//! one a reader must accept, so a round trip through the writer and the parser must be the
//! identity.

use patch_sites::op::{Op, Operand, OperandKinds, Widths, check_operand, operand_code};
use patch_sites::rom::{MAX_SLOTS, MAX_TEMPLATE_LEN, NO_REX, RomKind, Slot, SlotKind, SlotSource};
use patch_sites::table::{Form, SITE_FLAG_REP, Site};
use patch_sites::{ALL_OPS, Gpr, RegSet};
use proptest::prelude::*;

/// Where generated kernel text starts.
pub const TEXT_BASE: u64 = 0xffff_ffff_8100_0000;

/// Any general-purpose register.
pub fn gpr() -> impl Strategy<Value = Gpr> {
    (0u8..16).prop_map(|n| Gpr::ALL[n as usize])
}

/// Any valid register/flag set.
pub fn regset() -> impl Strategy<Value = RegSet> {
    (0u32..=RegSet::VALID.0).prop_map(RegSet)
}

fn operand_of_kind(code: u8) -> BoxedStrategy<Operand> {
    match code {
        operand_code::NONE => Just(Operand::None).boxed(),
        operand_code::REG => gpr().prop_map(Operand::Reg).boxed(),
        operand_code::PORT_IMM => any::<u8>().prop_map(Operand::PortImm).boxed(),
        operand_code::PORT_DX => Just(Operand::PortDx).boxed(),
        operand_code::MEM_BASE => gpr().prop_map(Operand::MemBase).boxed(),
        operand_code::MEM_OTHER => Just(Operand::MemOther).boxed(),
        operand_code::DEBUG_REG => (0u8..8, gpr())
            .prop_map(|(dr, reg)| Operand::DebugReg { dr, reg })
            .boxed(),
        _ => (gpr(), gpr())
            .prop_map(|(reg, base)| Operand::RegMemBase { reg, base })
            .boxed(),
    }
}

fn kinds_of(k: OperandKinds) -> Vec<u8> {
    (0..operand_code::LIMIT)
        .filter(|c| k.allows_code(*c))
        .collect()
}

fn widths_of(w: Widths) -> Vec<u8> {
    [0u8, 1, 2, 4, 8]
        .into_iter()
        .filter(|x| w.allows(*x))
        .collect()
}

/// An operand and a width `op` accepts, and site flags it allows.
pub fn operand_for(op: Op) -> BoxedStrategy<(Operand, u8, u8)> {
    if op == Op::IoDelay {
        // `out 0x80, al` and nothing else.
        return Just((Operand::PortImm(0x80), 1, 0)).boxed();
    }
    let info = op.info();
    let kinds = kinds_of(info.operands);
    let widths = widths_of(info.widths);
    let rep = matches!(op, Op::Ins | Op::Outs);
    (
        proptest::sample::select(kinds).prop_flat_map(operand_of_kind),
        proptest::sample::select(widths),
        if rep {
            prop_oneof![Just(0u8), Just(SITE_FLAG_REP)].boxed()
        } else {
            Just(0u8).boxed()
        },
    )
        // Kinds and widths are drawn apart; a few pairs name no instruction.
        .prop_filter("an operand the op takes", move |(operand, width, _)| {
            check_operand(op, *operand, *width).is_ok()
        })
        .boxed()
}

/// An op id with an operand and a width it accepts, and site flags it allows. One case in
/// sixteen is an op id no reader knows (with a structurally valid operand).
pub fn op_and_operand() -> impl Strategy<Value = (u16, Operand, u8, u8)> {
    let known = proptest::sample::select(ALL_OPS.to_vec()).prop_flat_map(|op| {
        operand_for(op).prop_map(move |(operand, width, flags)| (op.id(), operand, width, flags))
    });
    let unknown = (200u16..u16::MAX, 0u8..operand_code::LIMIT)
        .prop_flat_map(|(id, code)| {
            (
                Just(id),
                operand_of_kind(code),
                proptest::sample::select(vec![0u8, 1, 2, 4, 8]),
            )
        })
        .prop_map(|(id, operand, width)| (id, operand, width, 0u8));
    prop_oneof![15 => known, 1 => unknown]
}

/// The shape of one site, before it is placed: (op, operand, width, flags, form, insn_len,
/// site_len, clobbers, stub distance).
type Shape = (u16, Operand, u8, u8, Form, u8, u8, RegSet, u32);

fn shape() -> impl Strategy<Value = Shape> {
    let form = prop_oneof![
        Just(Form::Native),
        Just(Form::IndirectCall),
        Just(Form::Detour),
        Just(Form::Trap)
    ];
    (
        op_and_operand(),
        form,
        1u8..=15,
        0u8..=40,
        regset(),
        0u32..0x10_0000,
    )
        .prop_map(
            |((op, operand, width, flags), form, insn, extra, clobbers, stub)| {
                let insn = if form == Form::IndirectCall {
                    insn.max(2)
                } else {
                    insn
                };
                let site_len = insn.saturating_add(extra);
                (
                    op, operand, width, flags, form, insn, site_len, clobbers, stub,
                )
            },
        )
}

/// Up to `max` valid sites, sorted by address, not overlapping, inside `[TEXT_BASE,
/// TEXT_BASE + 64 MiB)`; detour stubs lie in the 64 MiB after that.
pub fn sites(max: usize) -> impl Strategy<Value = Vec<Site>> {
    proptest::collection::vec((shape(), 0u64..64), 0..=max).prop_map(|shapes| {
        let mut addr = TEXT_BASE;
        let mut out = Vec::with_capacity(shapes.len());
        for ((op, operand, width, flags, form, insn_len, site_len, clobbers, stub), gap) in shapes {
            addr += gap;
            out.push(Site {
                addr,
                site_len,
                insn_len,
                op_id: op,
                form,
                operand,
                width,
                flags,
                clobbers,
                stub: (form == Form::Detour).then_some(TEXT_BASE + (64 << 20) + stub as u64),
            });
            addr += site_len as u64;
        }
        out
    })
}

/// One ROM entry's contents: kind, code, slots, clobbers.
pub type RomEntryValue = (RomKind, Vec<u8>, Vec<Slot>, RegSet);

fn slot(template_len: usize) -> impl Strategy<Value = Slot> {
    let t = template_len as u8;
    let kind = prop_oneof![
        Just(SlotKind::Imm8),
        Just(SlotKind::ModrmReg),
        Just(SlotKind::ModrmRm),
        Just(SlotKind::OpcodeReg)
    ];
    (
        kind,
        0..t,
        prop_oneof![Just(NO_REX), 0..t],
        prop_oneof![Just(SlotSource::Reg), Just(SlotSource::Reg2)],
    )
        .prop_map(|(kind, offset, rex_offset, source)| Slot {
            kind,
            offset,
            rex_offset,
            source: if kind == SlotKind::Imm8 {
                SlotSource::Port
            } else {
                source
            },
        })
}

fn rom_entry() -> impl Strategy<Value = RomEntryValue> {
    let inline = proptest::collection::vec(any::<u8>(), 1..=MAX_TEMPLATE_LEN).prop_flat_map(|t| {
        let n = t.len();
        (
            Just(t),
            proptest::collection::vec(slot(n), 0..=MAX_SLOTS),
            regset(),
        )
            .prop_map(|(t, s, c)| (RomKind::Inline, t, s, c))
    });
    let call = (proptest::collection::vec(any::<u8>(), 1..300), regset())
        .prop_map(|(code, c)| (RomKind::Call, code, vec![], c));
    prop_oneof![
        Just((RomKind::Nothing, vec![], vec![], RegSet::EMPTY)),
        Just((RomKind::Native, vec![], vec![], RegSet::EMPTY)),
        inline,
        call,
    ]
}

/// A valid ROM description: name, signature, and entries for distinct op ids (some unknown to
/// this reader).
pub fn rom() -> impl Strategy<Value = (String, [u8; 12], Vec<(u16, RomEntryValue)>)> {
    let name = "[ -~]{1,16}";
    let ids = proptest::collection::btree_set(
        prop_oneof![4 => proptest::sample::select(ALL_OPS.to_vec()).prop_map(Op::id), 1 => 200u16..400],
        0..24,
    );
    (name, any::<[u8; 12]>(), ids).prop_flat_map(|(name, sig, ids)| {
        let n = ids.len();
        (
            Just(name),
            Just(sig),
            Just(ids),
            proptest::collection::vec(rom_entry(), n),
        )
            .prop_map(|(name, sig, ids, entries)| {
                (name, sig, ids.into_iter().zip(entries).collect())
            })
    })
}

/// A machine state for the oracle to run `site` from: random registers, flags and page
/// contents, made meaningful for the site by [`crate::oracle::State::for_site`].
pub fn machine_state(site: Site) -> impl Strategy<Value = crate::oracle::State> {
    (any::<[u64; 16]>(), any::<u64>(), any::<u64>()).prop_map(move |(gpr, rflags, seed)| {
        crate::oracle::State::for_site(&site, gpr, rflags, seed)
    })
}
