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
use pvpatch_oracle::kvm::{KvmExecutor, KvmRun};
use pvpatch_oracle::oracle::vcpu::{Effect, MSR_KERNEL_GS_BASE, mix};
use pvpatch_oracle::oracle::{Case, End, Engine, Hypervisor, STACK, State};

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

fn unicorn_end(e: &End) -> Option<u8> {
    match e {
        End::Fault(v) => Some(*v),
        _ => None,
    }
}

/// The emulator's known errors, by what the real CPU did.
fn known_emulator_error(op: Op, kvm: &KvmRun) -> Option<&'static str> {
    match (op, kvm.fault) {
        (Op::Wrmsr | Op::Rdmsr, Some(13)) => Some(
            "#GP on the real CPU for an unknown MSR or a non-canonical value; unicorn and the \
             model accept any",
        ),
        _ => None,
    }
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
    for (op, operand, width) in ops() {
        let case = Case::native(op.id(), operand, width, 0, 3).unwrap();
        let s = case.site;
        let end = s.addr + s.site_len as u64;
        for i in 0..100 {
            let st = state(&case, i);
            let u = engine.run(
                &[(s.addr, &case.reference)],
                s.addr,
                end,
                &st,
                None,
                Hypervisor::None,
            );
            let k = kvm
                .run(&[(s.addr, &case.reference)], s.addr, end, &st, None)
                .unwrap();
            runs += 1;
            let mut what = Vec::new();
            if let Err(e) = &k.end {
                what.push(format!("KVM: {e}"));
            }
            if unicorn_end(&u.end) != k.fault {
                what.push(format!(
                    "ended: unicorn {:?}, KVM fault {:?}",
                    u.end, k.fault
                ));
            }
            if k.fault.is_none() {
                let free = machine_valued(op);
                for g in Gpr::ALL {
                    let n = g.number() as usize;
                    if !free.has(g) && u.gpr[n] != k.gpr[n] {
                        what.push(format!(
                            "{}: unicorn {:#x}, KVM {:#x}",
                            g.name(),
                            u.gpr[n],
                            k.gpr[n]
                        ));
                    }
                }
                // RF and the reserved bit 1 aside.
                let m = !(1u64 << 16);
                if u.rflags & m != k.rflags & m {
                    what.push(format!(
                        "rflags: unicorn {:#x}, KVM {:#x}",
                        u.rflags, k.rflags
                    ));
                }
                let io = |t: &[Effect]| -> Vec<Effect> {
                    t.iter()
                        .filter(|e| {
                            matches!(
                                e,
                                Effect::In { .. } | Effect::Out { .. } | Effect::Halt { .. }
                            )
                        })
                        .copied()
                        .collect()
                };
                if io(&u.vcpu.trace) != io(&k.effects) {
                    what.push(format!(
                        "port I/O and halts: unicorn {:x?}, KVM {:x?}",
                        io(&u.vcpu.trace),
                        io(&k.effects)
                    ));
                }
                let from = (u.gpr[4] - STACK).min(4096) as usize;
                if u.stack[from..] != k.stack[from..] || u.data != k.data {
                    what.push("memory differs".into());
                }
            }
            if what.is_empty() {
                continue;
            }
            let line = format!("{op} {operand:?} rcx={:#x}: {}", st.gpr[1], what.join("; "));
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
        let s = case.site;
        let end = s.addr + s.site_len as u64;
        let mut trap = vec![0x0f, 0x0b];
        trap.resize(s.site_len as usize, 0);
        encode::fill_nops(&mut trap[2..]);
        for i in 0..100 {
            let st = state(&case, i);
            let n = kvm
                .run(&[(s.addr, &case.reference)], s.addr, end, &st, None)
                .unwrap();
            let t = kvm
                .run(&[(s.addr, &trap)], s.addr, end, &st, Some(s))
                .unwrap();
            checked += 1;
            let mut what = Vec::new();
            if n.end.is_err() || t.end.is_err() || n.fault != t.fault {
                what.push(format!(
                    "ended: native {:?} {:?}, trap {:?} {:?}",
                    n.end, n.fault, t.end, t.fault
                ));
            }
            let free = op.info().undefined;
            for g in Gpr::ALL {
                let k = g.number() as usize;
                if !free.has(g) && n.gpr[k] != t.gpr[k] {
                    what.push(format!(
                        "{}: native {:#x}, trap {:#x}",
                        g.name(),
                        n.gpr[k],
                        t.gpr[k]
                    ));
                }
            }
            const IOPL: u64 = 0x3000;
            if n.rflags != t.rflags {
                if n.rflags & !IOPL == t.rflags & !IOPL && what.is_empty() {
                    // Reported, not failed: PVM's `iretq` (this host's KVM) keeps IOPL, which
                    // the trap handler's return needs to restore; a kernel never sets IOPL.
                    *iopl.entry(op).or_insert(0) += 1;
                } else {
                    what.push(format!(
                        "rflags: native {:#x}, trap {:#x}",
                        n.rflags, t.rflags
                    ));
                }
            }
            if n.effects != t.effects {
                what.push(format!(
                    "effects: native {:x?}, trap {:x?}",
                    n.effects, t.effects
                ));
            }
            let from = (n.gpr[4] - STACK).min(4096) as usize;
            if n.stack[from..] != t.stack[from..] {
                what.push("the live stack differs".into());
            }
            if !what.is_empty() {
                failures.push(format!("{op} {operand:?} state {i}: {}", what.join("; ")));
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
