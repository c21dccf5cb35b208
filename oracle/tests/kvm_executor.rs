//! The second executor: the same cases as real ring-0 code under KVM.
//!
//! * The native instruction on both executors: they must agree, except where the emulator is
//!   known to be wrong, and each such case is reported (counted and printed), not dropped.
//! * A trap rewrite against the native instruction, both on the real CPU, the host handling
//!   the `#UD` with the runtime's emulator.
//!
//! Skipped, with the reason, where `/dev/kvm` cannot make a VM; in CI that is a failure.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use patch_sites::{Gpr, Op, Operand, RegSet};
use pvpatch_isa::encode;
use pvpatch_oracle::kvm::KvmExecutor;
use pvpatch_oracle::oracle::abstraction::RealCpu;
use pvpatch_oracle::oracle::vcpu::{MSR_KERNEL_GS_BASE, mix};
use pvpatch_oracle::oracle::{
    Case, Comparison, Difference, EffectKind, End, Engine, Executor, Hypervisor, Run, State,
    differences,
};

fn executor(test: &str) -> Option<KvmExecutor> {
    match KvmExecutor::new() {
        Ok(k) => Some(k),
        Err(e) if std::env::var_os("CI").is_some() => panic!("{test}: CI must have KVM: {e}"),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

/// Ops both executors run, with an operand each.
fn ops() -> Vec<(Op, Operand, u8)> {
    vec![
        (Op::Cli, Operand::None, 0),
        (Op::Sti, Operand::None, 0),
        (Op::Pushf, Operand::None, 8),
        (Op::Popf, Operand::None, 8),
        (Op::SaveFl, Operand::Reg(Gpr::Rbx), 8),
        (Op::RestoreFl, Operand::Reg(Gpr::R9), 8),
        (Op::Hlt, Operand::None, 0),
        (Op::SafeHalt, Operand::None, 0),
        (Op::Out, Operand::PortImm(0x71), 1),
        (Op::Out, Operand::PortDx, 4),
        (Op::In, Operand::PortImm(0x60), 1),
        (Op::In, Operand::PortDx, 2),
        (Op::IoDelay, Operand::PortImm(0x80), 1),
        (Op::Wrmsr, Operand::None, 0),
        (Op::Rdmsr, Operand::None, 0),
        (Op::Invlpg, Operand::MemBase(Gpr::Rsi), 0),
        (Op::Wbinvd, Operand::None, 0),
    ]
}

/// A state for `case`; for MSR ops, every other state names IA32_KERNEL_GS_BASE (a real MSR,
/// written with a value that may be non-canonical), the rest random MSR numbers.
fn state(case: &Case, i: u64) -> State {
    let mut gpr: [u64; 16] = std::array::from_fn(|k| mix(i * 64 + k as u64));
    if matches!(case.op(), Some(Op::Wrmsr | Op::Rdmsr)) && i.is_multiple_of(2) {
        gpr[1] = MSR_KERNEL_GS_BASE as u64;
    }
    // No port writes with values that matter to a real device: ports here are unbacked.
    State::for_site(&case.site, gpr, mix(i ^ 0x5a5a), mix(i ^ 0xa5a5))
}

/// Outputs whose values come from the machine rather than the instruction (the model's MSRs
/// and this CPU's differ by design).
fn machine_valued(op: Op) -> RegSet {
    match op {
        Op::Rdmsr => RegSet::of(&[Gpr::Rax, Gpr::Rdx]),
        _ => RegSet::EMPTY,
    }
}

/// The emulator's known errors, by what the real CPU did.
fn known_emulator_error(op: Op, kvm: &Run) -> Option<&'static str> {
    match (op, &kvm.end) {
        (Op::Wrmsr | Op::Rdmsr, End::Fault(13)) => Some(
            "#GP on the real CPU for an unknown MSR or a non-canonical value; unicorn and the \
             model accept any",
        ),
        _ => None,
    }
}

/// What the real CPU does not show the host: control and debug registers, MSRs, and every
/// effect but port I/O, halts and faults (the exits).
fn unseen_by_kvm() -> Vec<Comparison> {
    let mut off = vec![Comparison::ControlRegisters, Comparison::Msrs];
    off.extend(
        EffectKind::ALL
            .into_iter()
            .filter(|k| {
                !matches!(
                    k,
                    EffectKind::In | EffectKind::Out | EffectKind::Halt | EffectKind::Fault
                )
            })
            .map(Comparison::Effect),
    );
    off
}

fn run_on(exec: &mut dyn Executor, case: &Case, code: &[u8], st: &State, trap: bool) -> Run {
    let s = case.site;
    exec.execute(
        &[(s.addr, code)],
        s.addr,
        s.addr + s.site_len as u64,
        st,
        trap.then_some(s),
        Hypervisor::None,
    )
}

fn lines(what: &[Difference]) -> String {
    what.iter()
        .map(Difference::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn native_instructions_agree_on_unicorn_and_kvm_but_for_known_emulator_errors() {
    let Some(mut kvm) = executor("native_instructions_agree") else {
        return;
    };
    let mut engine = Engine::new().unwrap();
    let mut reported: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut runs = 0;
    let off = unseen_by_kvm();
    for (op, operand, width) in ops() {
        let mut case = Case::native(op.id(), operand, width, 0, 3).unwrap();
        // Outputs the machine decides are not compared between two machines.
        case.site.clobbers = machine_valued(op);
        for i in 0..100 {
            let st = state(&case, i);
            let u = run_on(&mut engine, &case, &case.reference, &st, false);
            let k = run_on(&mut kvm, &case, &case.reference, &st, false);
            runs += 1;
            // The one comparison, unicorn's run as the reference.
            let what = differences(&case.site, &RealCpu, &st, &u, &k, false, &off);
            if what.is_empty() {
                continue;
            }
            let line = format!("{op} {operand:?} rcx={:#x}: {}", st.gpr[1], lines(&what));
            match known_emulator_error(op, &k) {
                Some(why) => reported.entry(why).or_default().push(line),
                None => failures.push(line),
            }
        }
    }
    for (why, cases) in &reported {
        eprintln!("reported: {} cases: {why}; e.g. {}", cases.len(), cases[0]);
    }
    eprintln!(
        "{runs} cases on both executors, {} reported, {} failures",
        reported.values().map(Vec::len).sum::<usize>(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        !reported.is_empty(),
        "the MSR cases must show the emulator's known error (else they test nothing)"
    );
}

#[test]
fn trap_rewrites_are_equivalent_on_the_real_cpu() {
    let Some(mut kvm) = executor("trap_rewrites_on_kvm") else {
        return;
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut iopl: BTreeMap<Op, usize> = BTreeMap::new();
    for (op, operand, width) in ops() {
        if matches!(op, Op::Wrmsr | Op::Rdmsr | Op::Invlpg | Op::Wbinvd) {
            // Their trap emulation goes through the model's MSRs, TLB and caches, not the
            // real CPU's: the unicorn oracle checks those.
            continue;
        }
        let case = Case::native(op.id(), operand, width, 0, 3).unwrap();
        let mut trap = vec![0x0f, 0x0b];
        trap.resize(case.site.site_len as usize, 0);
        encode::fill_nops(&mut trap[2..]);
        for i in 0..100 {
            let st = state(&case, i);
            let n = run_on(&mut kvm, &case, &case.reference, &st, false);
            let t = run_on(&mut kvm, &case, &trap, &st, true);
            checked += 1;
            let what = differences(&case.site, &RealCpu, &st, &n, &t, false, &[]);
            const IOPL: u64 = 0x3000;
            if !what.is_empty()
                && what.iter().all(|d| d.comparison == Comparison::Rflags)
                && n.rflags & !IOPL == t.rflags & !IOPL
            {
                // Reported, not failed: PVM's `iretq` (this host's KVM) keeps IOPL, which the
                // trap handler's return needs to restore; a kernel never sets IOPL.
                *iopl.entry(op).or_insert(0) += 1;
            } else if !what.is_empty() {
                failures.push(format!("{op} {operand:?} state {i}: {}", lines(&what)));
            }
        }
    }
    eprintln!(
        "{checked} trap rewrites checked on KVM, {} failures; reported: IOPL not restored by \
         this host's iretq after a trap that loads it: {iopl:?}",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
