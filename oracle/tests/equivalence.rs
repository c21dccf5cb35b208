//! Rewrite equivalence: for every op the oracle can run, on every backend, in every form the
//! planner can choose (the backend's own choice at a native site, at an indirect-call site,
//! a trap, and each ROM sequence for the op), the rewrite behaves like the native instruction
//! from random machine states. At least 1,000 cases a combination (`PROPTEST_CASES` for more);
//! a failure shrinks to a minimal case, printed as bytes and disassembly.
//!
//! Only rewrites that differ from the reference count as checked cases: a combination whose
//! rewrites are all the reference itself (a native backend's native site) is run once, and
//! reported apart. Each test asserts how many combinations are identical and how many differ.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::BTreeMap;

use patch_sites::Outcome;
use patch_sites::rom::Rom;
use patch_sites::{ALL_OPS, Op, Operand};
use proptest::prelude::*;
use proptest::test_runner::{TestError, TestRunner};
use pvpatch_oracle::oracle::engine::GPRS_ICED;
use pvpatch_oracle::oracle::{self, Case, Oracle, State};
use pvpatch_oracle::strategies as strat;
use pvpatch_runtime::backend::Choice;
use pvpatch_runtime::detect::{BackendKind, KVM_FEATURE_NOP_IO_DELAY};
use pvpatch_runtime::trap;

fn covered_ops() -> Vec<Op> {
    ALL_OPS
        .iter()
        .copied()
        .filter(|op| oracle::not_covered(*op).is_none())
        .collect()
}

/// The site form a combination starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// The native instruction (and NOPs).
    Native,
    /// `call [rip + disp32]` through the kernel's thunks.
    IndirectCall,
    /// The instruction and random code after it moved to a stub by the post-link tool.
    Detour,
}

#[derive(Clone, Debug)]
struct Combo {
    backend: BackendKind,
    features: u32,
    /// A ROM of one entry: (kind, sequence).
    rom: Option<(&'static str, &'static str)>,
    start: Start,
    trap: bool,
    op: Op,
}

impl Combo {
    fn name(&self) -> String {
        let mut s = format!("{} {} ", self.op, self.backend.name());
        if self.features != 0 {
            s.push_str("+nop_io_delay ");
        }
        if let Some((kind, seq)) = self.rom {
            s.push_str(&format!("rom {kind} {seq} "));
        }
        s.push_str(match (self.start, self.trap) {
            (Start::Detour, true) => "trap at a detour's stub",
            (_, true) => "trap",
            (Start::Native, _) => "at a native site",
            (Start::IndirectCall, _) => "at an indirect-call site",
            (Start::Detour, _) => "at a detour's stub",
        });
        s
    }
}

/// The ROM for a combination, built by the post-link tool from its sequence library and
/// checked as the runtime checks it.
fn rom_bytes(op: Op, kind: &str, seq: &str) -> Option<Vec<u8>> {
    let sequence = if kind == "nothing" {
        String::new()
    } else {
        format!("sequence = \"{seq}\"\n")
    };
    let d = format!(
        "name = \"oracle\"\nsignature = \"any\"\n[[entry]]\nop = \"{}\"\nkind = \"{kind}\"\n{sequence}",
        op.name()
    );
    pvpatch::rom::build(&d, None).ok()
}

/// Every ROM sequence of the library that is for `op`.
fn rom_sequences(op: Op) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<(&str, &str)> = pvpatch::rom::library()
        .into_iter()
        .filter(|s| s.name == op.name() || s.name.starts_with(&format!("{}_", op.name())))
        .map(|s| (if s.entry_point { "call" } else { "inline" }, s.name))
        .collect();
    if op == Op::IoDelay {
        v.push(("nothing", ""));
    }
    v
}

/// What one combination's cases became.
#[derive(Debug, Default)]
struct Seen {
    /// What the planner made of each planned case (identical or not), by outcome name.
    outcomes: BTreeMap<&'static str, u32>,
    /// Cases whose rewrite is the reference itself, byte for byte: the first is run once,
    /// the rest are not equivalence cases.
    identical: u32,
    /// Cases whose rewrite differs from the reference: each one run and compared.
    different: u32,
    /// Cases the planner refused (a site the backend cannot patch and whose native
    /// instruction is wrong there): nothing to compare.
    unpatchable: u32,
}

/// Runs `cases` random cases of one combination. Each case is planned first; a rewrite
/// identical to the reference is run once per combination (its run would repeat the
/// reference's) and counted apart from the cases that are really compared.
fn run_combo(oracle: &RefCell<Oracle>, combo: &Combo, cases: u32) -> Result<Seen, String> {
    let rom = combo
        .rom
        .map(|(kind, seq)| rom_bytes(combo.op, kind, seq).ok_or("the ROM does not build"))
        .transpose()?;
    let parsed = rom.as_deref().map(|b| Rom::parse(b).unwrap());
    let pv = oracle::pv_code(combo.backend);
    let mut backend = oracle::backend(combo.backend, combo.features, parsed);
    backend.pv = pv.as_ref();
    let code = rom.as_deref().or(pv.as_ref().map(|p| p.code.as_slice()));
    let op = combo.op;
    let start = combo.start;
    let seen = RefCell::new(Seen::default());
    let refusal = RefCell::new(None::<String>);
    let case_of = move |(operand, width, flags): (Operand, u8, u8),
                        pad: u8,
                        around: &[Neighbour]| {
        match start {
            Start::Native => Case::native(op.id(), operand, width, flags, pad),
            Start::IndirectCall => Case::indirect_call(op.id(), operand, width, flags, pad),
            Start::Detour => {
                let insn = Case::native(op.id(), operand, width, flags, 0)?
                    .reference
                    .len();
                if insn >= 5 {
                    return None;
                }
                let code = encode_neighbours(around, oracle::SITE + insn as u64);
                Case::detour(op.id(), operand, width, flags, &code)
            }
        }
    };
    let around = if start == Start::Detour { 1..6 } else { 0..1 };
    let strategy = (
        strat::operand_for(op),
        0u8..6,
        proptest::collection::vec(any::<Neighbour>(), around),
    )
        .prop_filter_map("an encodable site", move |(o, pad, n)| case_of(o, pad, &n))
        .prop_flat_map(|case| {
            let site = case.site;
            (Just(case), strat::machine_state(site))
        });
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..pvpatch_oracle::proptest_config()
    });
    let force = combo.trap.then_some(Choice::Trap);
    let result = runner.run(&strategy, |(case, state): (Case, State)| {
        let rw = match oracle::rewrite(&case, &backend, force) {
            Ok(rw) => rw,
            // The planner refuses the table, as it must (the oracle shows why in
            // `xen_sites_left_native_are_not_equivalent`): nothing was rewritten.
            Err(oracle::OracleError::Plan(pvpatch_runtime::plan::PlanError::MustRewrite {
                ..
            })) => {
                seen.borrow_mut().unpatchable += 1;
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        let name = match &rw.rom_refused {
            Some(why) => {
                refusal.borrow_mut().get_or_insert_with(|| why.clone());
                "rom refused"
            }
            None => rw.outcome.name(),
        };
        let identical = rw.identical(&case);
        let run = {
            let mut s = seen.borrow_mut();
            *s.outcomes.entry(name).or_insert(0) += 1;
            if identical {
                s.identical += 1;
                s.identical == 1
            } else {
                s.different += 1;
                true
            }
        };
        if run {
            oracle
                .borrow_mut()
                .compare_rewrite(&case, &rw, &backend, code, &state)
                .map_err(|d| TestCaseError::fail(d.to_string()))?;
        }
        Ok(())
    });
    if let Some(why) = refusal.into_inner() {
        eprintln!(
            "{}: the ROM was refused for some sites: {why}",
            combo.name()
        );
    }
    match result {
        Ok(()) => Ok(seen.into_inner()),
        Err(TestError::Fail(why, (case, state))) => Err(format!(
            "{}: {why}\n  minimal case: {:?}\n  state: gpr {:x?} rflags {:#x} seed {:#x}",
            combo.name(),
            case.site,
            state.gpr,
            state.rflags,
            state.seed
        )),
        Err(e) => Err(format!("{}: {e}", combo.name())),
    }
}

/// What a set of combinations came to.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    /// Combinations every case of which was rewritten to the reference itself.
    identical: usize,
    /// Combinations with at least one rewrite that differs from the reference.
    different: usize,
    /// Different cases run and compared.
    cases: u64,
    /// The least number of different cases of a different combination.
    fewest: u32,
    /// Cases the planner refused, not counted.
    unpatchable: u64,
}

/// Runs every combination and asserts its tally: the numbers of identical and different
/// combinations `(identical, different)` are exact, and at least `min_cases` different cases
/// are checked for each 1,000 cases a combination (a little below what a run measures: which
/// operands and paddings are drawn is random). Fails with every failure, and if a combination
/// never produced the outcome it exists to test.
fn run_all(
    test: &str,
    combos: Vec<(Combo, &'static [Outcome])>,
    expect: (usize, usize),
    min_cases: u64,
) {
    let cases = pvpatch_oracle::proptest_config().cases;
    let oracle = RefCell::new(Oracle::new().unwrap());
    let mut failures = Vec::new();
    let mut tally = Tally {
        fewest: u32::MAX,
        ..Tally::default()
    };
    for (combo, expected) in &combos {
        match run_combo(&oracle, combo, cases) {
            Ok(seen) => {
                if !expected
                    .iter()
                    .any(|o| seen.outcomes.contains_key(o.name()))
                {
                    failures.push(format!(
                        "{}: never became {expected:?} in {cases} cases (saw {:?}): the \
                         combination tests nothing",
                        combo.name(),
                        seen.outcomes
                    ));
                }
                tally.unpatchable += u64::from(seen.unpatchable);
                if seen.different == 0 {
                    tally.identical += 1;
                } else {
                    tally.different += 1;
                    tally.cases += u64::from(seen.different);
                    tally.fewest = tally.fewest.min(seen.different);
                }
            }
            Err(e) => failures.push(e),
        }
    }
    pvpatch_testkit::figure(
        test,
        &format!(
            "{} combinations: {} identical (run once each), {} different; {} different cases \
             checked (at least {} a combination); {} unpatchable sites refused by the planner, \
             not counted",
            combos.len(),
            tally.identical,
            tally.different,
            tally.cases,
            if tally.different == 0 {
                0
            } else {
                tally.fewest
            },
            tally.unpatchable
        ),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(
        (tally.identical, tally.different),
        expect,
        "{test}: (identical, different) combinations"
    );
    let floor = min_cases * u64::from(cases) / 1000;
    assert!(
        tally.cases >= floor,
        "{test}: only {} different cases checked, fewer than {floor}",
        tally.cases
    );
}

fn combo(backend: BackendKind, features: u32, op: Op, start: Start) -> Combo {
    Combo {
        backend,
        features,
        rom: None,
        start,
        trap: false,
        op,
    }
}

/// The built-in backends' own choices, at native and indirect-call sites.
#[test]
fn builtin_backends_rewrites_are_equivalent() {
    let mut v = Vec::new();
    for (kind, features) in [
        (BackendKind::Native, 0),
        (BackendKind::Tcg, 0),
        (BackendKind::Kvm, 0),
        (BackendKind::Kvm, KVM_FEATURE_NOP_IO_DELAY),
        (BackendKind::Vmware, 0),
    ] {
        for op in covered_ops() {
            let nothing = op == Op::IoDelay
                && (kind == BackendKind::Vmware || features & KVM_FEATURE_NOP_IO_DELAY != 0);
            let at_native: &'static [Outcome] = if nothing {
                &[Outcome::Nothing]
            } else {
                &[Outcome::Unchanged]
            };
            v.push((combo(kind, features, op, Start::Native), at_native));
            let at_call: &'static [Outcome] = if nothing {
                &[Outcome::Nothing]
            } else {
                &[Outcome::Native]
            };
            v.push((combo(kind, features, op, Start::IndirectCall), at_call));
        }
    }
    run_all(
        "builtin_backends_rewrites_are_equivalent",
        v,
        (233, 237),
        190_000,
    );
}

/// Whether the runtime's trap emulator takes some form of `op`.
fn trappable(op: Op) -> bool {
    let g = patch_sites::Gpr::Rax;
    [
        Operand::None,
        Operand::Reg(g),
        Operand::PortImm(0x80),
        Operand::MemBase(g),
        Operand::DebugReg { dr: 0, reg: g },
    ]
    .into_iter()
    .filter(|o| op.info().operands.allows_code(o.code()))
    .any(|o| {
        [0u8, 1, 2, 4, 8]
            .iter()
            .any(|w| op.info().widths.allows(*w) && trap::supported(op, o, *w))
    })
}

/// Every op the runtime can emulate, rewritten to a trap (`ud2`, or `int3` in one byte) and
/// handled by the runtime's own emulator.
#[test]
fn trap_rewrites_are_equivalent() {
    let mut v = Vec::new();
    for op in covered_ops() {
        if !trappable(op) {
            continue;
        }
        for start in [Start::Native, Start::IndirectCall] {
            v.push((
                Combo {
                    trap: true,
                    ..combo(BackendKind::Native, 0, op, start)
                },
                &[Outcome::Trap][..],
            ));
        }
    }
    assert!(v.len() >= 40, "{} trap combinations", v.len());
    run_all("trap_rewrites_are_equivalent", v, (0, 64), 60_000);
}

/// Every sequence of the ROM library, as the one entry of a ROM for its op.
#[test]
fn rom_sequences_are_equivalent() {
    let mut v = Vec::new();
    for op in covered_ops() {
        for (kind, seq) in rom_sequences(op) {
            for start in [Start::Native, Start::IndirectCall] {
                // A template equal to the native instruction leaves a native site as it is.
                let expected: &'static [Outcome] = match (kind, start) {
                    ("call", _) => &[Outcome::Call],
                    ("nothing", _) => &[Outcome::Nothing],
                    (_, Start::Native) => &[Outcome::Inline, Outcome::Unchanged],
                    _ => &[Outcome::Inline],
                };
                v.push((
                    Combo {
                        rom: Some((kind, seq)),
                        ..combo(BackendKind::Rom, 0, op, start)
                    },
                    expected,
                ));
            }
        }
    }
    assert!(v.len() >= 60, "{} ROM combinations", v.len());
    run_all("rom_sequences_are_equivalent", v, (0, 74), 45_000);
}

/// Xen PV and Hyper-V: calls to the entry points the runtime generates, at every site with
/// room for a call, checked through each backend's abstraction function.
#[test]
fn xen_and_hyperv_rewrites_are_equivalent() {
    let mut v = Vec::new();
    for kind in [BackendKind::Xen, BackendKind::HyperV] {
        let pv = oracle::pv_code(kind).unwrap();
        let served: Vec<Op> = pv.ops().collect();
        for op in covered_ops() {
            let called = served.contains(&op);
            let nothing = kind == BackendKind::Xen && op == Op::IoDelay;
            let at_native: &'static [Outcome] = match (nothing, called) {
                (true, _) => &[Outcome::Nothing],
                (_, true) => &[Outcome::Call],
                _ => &[Outcome::Unchanged],
            };
            let at_call: &'static [Outcome] = match (nothing, called) {
                (true, _) => &[Outcome::Nothing],
                (_, true) => &[Outcome::Call],
                _ => &[Outcome::Native],
            };
            v.push((combo(kind, 0, op, Start::Native), at_native));
            v.push((combo(kind, 0, op, Start::IndirectCall), at_call));
        }
    }
    run_all(
        "xen_and_hyperv_rewrites_are_equivalent",
        v,
        (81, 107),
        80_000,
    );
}

/// Why the planner refuses a Xen table with an IF site it cannot call from: the native
/// instruction left there is not equivalent under Xen's abstraction (a PV guest's `cli` does
/// not mask its events; its `popf` does not change its IF).
#[test]
fn xen_sites_left_native_are_not_equivalent() {
    use pvpatch_oracle::oracle::abstraction::XenPv;
    use pvpatch_oracle::oracle::{Candidate, vcpu::mix};
    let mut o = Oracle::new().unwrap();
    for (op, operand, width) in [
        (Op::Cli, Operand::None, 0),
        (Op::Sti, Operand::None, 0),
        (Op::Popf, Operand::None, 8),
        (Op::RestoreFl, Operand::Reg(patch_sites::Gpr::Rdi), 8),
    ] {
        let case = Case::native(op.id(), operand, width, 0, 0).unwrap();
        let caught = (0..32u64).any(|i| {
            let gpr: [u64; 16] = std::array::from_fn(|k| mix(i * 16 + k as u64));
            let state = State::for_site(&case.site, gpr, mix(i ^ 0x77), mix(i));
            o.compare(
                &case,
                &Candidate {
                    bytes: &case.reference,
                    code: &[],
                    trap: false,
                    abstraction: &XenPv,
                },
                &state,
            )
            .is_err()
        });
        assert!(caught, "a native {op} passed under Xen's abstraction");
    }
}

/// One instruction around a detoured site: (kind, register, value).
type Neighbour = (u8, u8, u32);

/// `items` encoded with iced-x86's block encoder at `at`: RIP-relative loads and stores into
/// the data page, RIP-relative `lea`s, ALU instructions, and short branches forward to a later
/// item or to the final `nop`.
fn encode_neighbours(items: &[Neighbour], at: u64) -> Vec<u8> {
    use iced_x86::{
        BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock, MemoryOperand,
        Register,
    };
    // Until encoded, instruction i is known by the address 16 i past a placeholder.
    let ip = |i: usize| 0x7000_0000u64 + 16 * i as u64;
    let n = items.len();
    let mut v = Vec::with_capacity(n + 1);
    for (i, &(kind, r, x)) in items.iter().enumerate() {
        // Any register but rsp.
        let reg = match r as usize % 16 {
            4 => Register::RBX,
            n => GPRS_ICED[n],
        };
        let data = pvpatch_oracle::oracle::DATA + ((x as u64 % 0xff8) & !7);
        let rip = |t: u64| MemoryOperand::with_base_displ(Register::RIP, t as i64);
        let later = ip(i + 1 + (x as usize % (n - i)));
        let mut ins = match kind % 7 {
            0 => Instruction::with2(Code::Mov_r64_rm64, reg, rip(data)),
            1 => Instruction::with2(Code::Mov_rm64_r64, rip(data), reg),
            2 => Instruction::with2(
                Code::Lea_r64_m,
                reg,
                rip(pvpatch_oracle::oracle::CODE + (x as u64 % 0x1_0000)),
            ),
            3 => Instruction::with2(Code::Add_rm64_imm32, reg, x as i32),
            4 => Instruction::with1(Code::Inc_rm64, reg),
            5 => Instruction::with_branch(
                [
                    Code::Je_rel8_64,
                    Code::Jne_rel8_64,
                    Code::Jb_rel8_64,
                    Code::Jl_rel8_64,
                ][x as usize % 4],
                later,
            ),
            _ => Instruction::with_branch(Code::Jmp_rel8_64, later),
        }
        .unwrap();
        ins.set_ip(ip(i));
        v.push(ins);
    }
    let mut nop = Instruction::with(Code::Nopd);
    nop.set_ip(ip(n));
    v.push(nop);
    BlockEncoder::encode(64, InstructionBlock::new(&v, at), BlockEncoderOptions::NONE)
        .unwrap()
        .code_buffer
}

/// Detours: the site's instruction and random code after it (RIP-relative operands and
/// branches among it) moved to a stub, the stub's copy left native, trapped, or rewritten by
/// each ROM sequence, checked against the code as it was.
#[test]
fn detour_rewrites_are_equivalent() {
    let mut v = Vec::new();
    for op in covered_ops() {
        if matches!(op, Op::Pushf | Op::Popf) {
            // Kernels of our own never detour a stack move (the stub would need its own unwind
            // data); a stock kernel's are checked from its own bytes (tests/kernels.rs).
            continue;
        }
        if op == Op::Invpcid {
            // Never shorter than 5 bytes: a call fits in place, a detour is never needed.
            continue;
        }
        v.push((
            combo(BackendKind::Native, 0, op, Start::Detour),
            &[Outcome::Unchanged][..],
        ));
        if trappable(op) {
            v.push((
                Combo {
                    trap: true,
                    ..combo(BackendKind::Native, 0, op, Start::Detour)
                },
                &[Outcome::Trap][..],
            ));
        }
        if op == Op::IoDelay {
            v.push((
                combo(
                    BackendKind::Kvm,
                    KVM_FEATURE_NOP_IO_DELAY,
                    op,
                    Start::Detour,
                ),
                &[Outcome::Nothing][..],
            ));
        }
        for (kind, seq) in rom_sequences(op) {
            let expected: &'static [Outcome] = match kind {
                "call" => &[Outcome::Call],
                "nothing" => &[Outcome::Nothing],
                _ => &[Outcome::Inline, Outcome::Unchanged],
            };
            v.push((
                Combo {
                    rom: Some((kind, seq)),
                    ..combo(BackendKind::Rom, 0, op, Start::Detour)
                },
                expected,
            ));
        }
    }
    run_all("detour_rewrites_are_equivalent", v, (0, 110), 110_000);
}
