//! The oracle's model of Xen PV checked against Xen itself.
//!
//! A sample of Xen cases (an op, its register, the event mask and pending flag, every general
//! register and RFLAGS) runs twice: in the oracle's engine, through the entry point the
//! runtime generates for the oracle's layout, with the model of Xen answering the hypercall
//! page (`Hypervisor::Xen`) and read through the Xen abstraction function; and in the guest
//! booted as a PV dom0 of Debian's Xen 4.17 (nested in QEMU's TCG), through the entry point
//! generated for the guest's real `vcpu_info` and hypercall page, from exactly the same state
//! (`guest/src/kernel/xen/cases.rs`). Per case the model's prediction and Xen's behaviour are
//! compared: every general register but rsp, RFLAGS' status flags and DF, the event mask (the
//! virtual IF) afterwards, whether Xen delivered an event, and the pending flag afterwards.
//!
//! The sample covers what a call can be handed as its whole state: `cli`, `sti`, `safe_halt`,
//! and `save_fl`, `restore_fl` and `invlpg` with each of their 15 registers. Its limits, by
//! construction (not differences found):
//! * `pushf`/`popf` are not sampled: their operand is the stack under the call, which the
//!   harness's call does not set;
//! * `mov cr3` is not sampled: a random root would end the guest; the CR3 self-test covers it;
//! * an event pending with events unmasked is not a state Xen keeps (it delivers at its next
//!   exit), so pending is set only with the mask set;
//! * a `restore_fl` image carries only what ring 3 can load harmlessly (status flags, DF, IF).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use patch_sites::{Gpr, Op, Operand};
use pvpatch_oracle::oracle::abstraction::{Abstraction, XenPv};
use pvpatch_oracle::oracle::vcpu::mix;
use pvpatch_oracle::oracle::{
    self, Case, Effect, End, Engine, Executor, Hypervisor, ROM, SITE, STATUS_FLAGS, State,
};
use pvpatch_runtime::detect::BackendKind;
use pvpatch_testkit as harness;

const IF: u64 = 1 << 9;
const DF: u64 = 1 << 10;
/// Cases per (op, register).
const PER_COMBO: u64 = 12;

fn combos() -> Vec<(Op, Operand, u8)> {
    let regs = || {
        (0u8..16)
            .filter(|r| *r != 4)
            .map(|r| Gpr::from_number(r).unwrap())
    };
    let mut v = vec![
        (Op::Cli, Operand::None, 0),
        (Op::Sti, Operand::None, 0),
        (Op::SafeHalt, Operand::None, 0),
    ];
    v.extend(regs().map(|g| (Op::SaveFl, Operand::Reg(g), 8)));
    v.extend(regs().map(|g| (Op::RestoreFl, Operand::Reg(g), 8)));
    v.extend(regs().map(|g| (Op::Invlpg, Operand::MemBase(g), 0)));
    v
}

/// One sampled case and the model's prediction for it.
struct Sampled {
    op: Op,
    operand: Operand,
    width: u8,
    state: State,
    mask: u8,
    pending: u8,
    model_gpr: [u64; 16],
    model_rflags: u64,
    model_mask: u8,
    model_delivers: bool,
}

fn sample() -> Vec<Sampled> {
    let pv = oracle::pv_code(BackendKind::Xen).expect("Xen entry points");
    let mut backend = oracle::backend(BackendKind::Xen, 0, None);
    backend.pv = Some(&pv);
    let mut engine = Engine::new().expect("engine");
    let mut out = Vec::new();
    for (c, (op, operand, width)) in combos().into_iter().enumerate() {
        let case = Case::native(op.id(), operand, width, 0, 8).expect("a native case");
        let rw = oracle::rewrite(&case, &backend, None).expect("planned");
        assert_eq!(rw.outcome, patch_sites::Outcome::Call, "{op:?} {operand:?}");
        for k in 0..PER_COMBO {
            let seed = mix(0x5845_4e00 ^ ((c as u64) << 8) ^ k);
            let gpr: [u64; 16] = core::array::from_fn(|i| mix(seed ^ (i as u64 + 1)));
            let masked = mix(seed ^ 0x40) & 1 == 1;
            let rflags = (mix(seed ^ 0x41) & (STATUS_FLAGS | DF)) | 2 | if masked { 0 } else { IF };
            let mut state = State::for_site(&case.site, gpr, rflags, seed);
            if let (Op::RestoreFl, Operand::Reg(g)) = (op, operand) {
                let r = g.number() as usize;
                state.gpr[r] = (state.gpr[r] & (STATUS_FLAGS | DF | IF)) | 2;
            }
            let mask = u8::from(masked);
            let pending = u8::from(masked && mix(seed ^ 0x42) & 3 != 0);
            state.private[0] = pending;
            state.private[1] = mask;
            let end = SITE + case.reference.len() as u64;
            let run = engine.execute(
                &[(ROM, &pv.code), (SITE, &rw.bytes)],
                SITE,
                end,
                &state,
                None,
                Hypervisor::Xen,
            );
            assert_eq!(run.end, End::Reached, "{op:?}: the model's run did not end");
            let abs = XenPv;
            let trace = abs.trace(&run, &state);
            let virtual_if = abs.rflags(&run) & IF != 0;
            let unmasked_on_the_way = trace.iter().any(|e| matches!(e, Effect::If(true)));
            let halted = trace.iter().any(|e| matches!(e, Effect::Halt { .. }));
            out.push(Sampled {
                op,
                operand,
                width,
                mask,
                pending,
                model_gpr: run.gpr,
                model_rflags: run.rflags,
                model_mask: u8::from(!virtual_if),
                // An event is delivered when it is pending and events become unmasked; a halt
                // returns only once one was (the guest arms its timer for it).
                model_delivers: halted || (pending == 1 && (unmasked_on_the_way || virtual_if)),
                state,
            });
        }
    }
    out
}

fn case_file(cases: &[Sampled]) -> Vec<u8> {
    let mut b = b"PVXCASE1".to_vec();
    b.extend((cases.len() as u32).to_le_bytes());
    b.extend([0; 4]);
    for c in cases {
        let reg = match c.operand {
            Operand::Reg(g) | Operand::MemBase(g) => g.number(),
            _ => 0xff,
        };
        b.extend(c.op.id().to_le_bytes());
        b.extend([reg, c.width, c.mask, c.pending, 0, 0]);
        for v in c.state.gpr {
            b.extend(v.to_le_bytes());
        }
        b.extend(c.state.rflags.to_le_bytes());
    }
    b
}

/// What the guest saw for one case.
struct Seen {
    mask: u8,
    pending: u8,
    upcalls: u64,
    rflags: u64,
    gpr: [u64; 16],
}

fn parse(line: &str, initial: &[u64; 16]) -> Option<Seen> {
    let mut w = line.split_ascii_whitespace();
    let mut hex = || u64::from_str_radix(w.next()?, 16).ok();
    let (mask, pending, upcalls, rflags, changed) = (hex()?, hex()?, hex()?, hex()?, hex()?);
    let mut gpr = *initial;
    for (k, g) in gpr.iter_mut().enumerate() {
        if changed & (1 << k) != 0 {
            *g = hex()?;
        }
    }
    Some(Seen {
        mask: mask as u8,
        pending: pending as u8,
        upcalls,
        rflags,
        gpr,
    })
}

#[test]
fn the_model_of_xen_agrees_with_xen() {
    let test = "the_model_of_xen_agrees_with_xen";
    if let Err(why) = harness::xen::available() {
        harness::skip(test, &why);
        return;
    }
    let cases = sample();
    let guest = harness::build_guest_plain().expect("the guest builds");
    let file = guest.with_extension("xen-cases");
    harness::write_file(&file, &case_file(&cases)).expect("write the cases");
    let b = harness::xen::boot(&guest, "", Some(&file)).expect("QEMU runs");
    assert!(b.passed(), "exit {:?}\n{}", b.exit_code, b.messages());
    let r = b.report().expect("a report");
    assert_eq!(
        r["model_cases"],
        cases.len(),
        "the guest did not run every case"
    );
    let lines: std::collections::BTreeMap<usize, &str> = b
        .serial
        .lines()
        .filter_map(|l| l.strip_prefix("PVPATCH-CASE "))
        .filter_map(|l| {
            let (i, rest) = l.split_once(' ')?;
            Some((usize::from_str_radix(i, 16).ok()?, rest))
        })
        .collect();
    let mut failures = Vec::new();
    // What the sample exercised on Xen, so that agreement cannot come from a sample that
    // does nothing: deliveries and their absence, masks both ways, registers written.
    let (mut delivered, mut quiet, mut masked, mut unmasked, mut written) = (0, 0, 0, 0, 0);
    for (i, c) in cases.iter().enumerate() {
        let what = format!(
            "case {i}: {} {:?} (mask {}, pending {}, rflags {:#x})",
            c.op.name(),
            c.operand,
            c.mask,
            c.pending,
            c.state.rflags
        );
        let Some(seen) = lines.get(&i).and_then(|l| parse(l, &c.state.gpr)) else {
            failures.push(format!("{what}: no result from the guest"));
            continue;
        };
        for k in (0..16).filter(|k| *k != 4) {
            if seen.gpr[k] != c.model_gpr[k] {
                failures.push(format!(
                    "{what}: {} is {:#x} on Xen, {:#x} in the model",
                    Gpr::from_number(k as u8).unwrap().name(),
                    seen.gpr[k],
                    c.model_gpr[k]
                ));
            }
        }
        if seen.upcalls > 0 {
            delivered += 1;
        } else {
            quiet += 1;
        }
        if seen.mask == 1 {
            masked += 1;
        } else {
            unmasked += 1;
        }
        written += usize::from(seen.gpr != c.state.gpr);
        let flags = STATUS_FLAGS | DF;
        if (seen.rflags ^ c.model_rflags) & flags != 0 {
            failures.push(format!(
                "{what}: status flags {:#x} on Xen, {:#x} in the model",
                seen.rflags & flags,
                c.model_rflags & flags
            ));
        }
        if seen.mask != c.model_mask {
            failures.push(format!(
                "{what}: event mask {} on Xen, {} in the model",
                seen.mask, c.model_mask
            ));
        }
        if (seen.upcalls > 0) != c.model_delivers {
            failures.push(format!(
                "{what}: {} upcalls on Xen, the model {} one",
                seen.upcalls,
                if c.model_delivers {
                    "predicts"
                } else {
                    "predicts none but"
                }
            ));
        }
        let pending_after = if c.model_delivers { 0 } else { c.pending };
        if seen.pending != pending_after {
            failures.push(format!(
                "{what}: pending {} on Xen afterwards, {pending_after} in the model",
                seen.pending
            ));
        }
    }
    let ops: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.op.name()).collect();
    harness::figure(
        test,
        &format!(
            "{} cases ({} ops, {} op-register combinations) on real Xen: {} differences; \
             {delivered} delivered an event, {quiet} did not; mask left set {masked}, clear \
             {unmasked}; {written} wrote a register",
            cases.len(),
            ops.len(),
            combos().len(),
            failures.len()
        ),
    );
    assert!(
        delivered >= 30 && quiet >= 40 && masked >= 40 && unmasked >= 40 && written >= 60,
        "the sample does not exercise both sides of every check"
    );
    assert!(
        failures.is_empty(),
        "{} differences between the model and Xen:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
