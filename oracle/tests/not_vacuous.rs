//! The oracle is not vacuous: each rewrite of this catalogue is wrong in one way, and the
//! oracle must say so, with the difference that makes it wrong; the native instruction itself,
//! from the same states, must pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use patch_sites::{Gpr, Op, Operand};
use pvpatch_isa::encode;
use pvpatch_oracle::oracle::abstraction::{Identity, NoIoDelay};
use pvpatch_oracle::oracle::{Abstraction, Candidate, Case, Oracle, State};

struct Wrong {
    what: &'static str,
    op: Op,
    operand: Operand,
    width: u8,
    /// The wrong rewrite (padded with NOPs to the site).
    bytes: &'static [u8],
    /// A word the oracle's report must contain.
    caught_by: &'static str,
}

const RBX: Gpr = Gpr::Rbx;

fn catalogue() -> Vec<Wrong> {
    vec![
        Wrong {
            what: "wrong register: mov rcx, cr3 for mov rbx, cr3",
            op: Op::MovFromCr3,
            operand: Operand::Reg(RBX),
            width: 8,
            bytes: &[0x0f, 0x20, 0xd9],
            caught_by: "rbx",
        },
        Wrong {
            what: "flags not preserved: cli; test al, al",
            op: Op::Cli,
            operand: Operand::None,
            width: 0,
            bytes: &[0xfa, 0x84, 0xc0],
            caught_by: "rflags",
        },
        Wrong {
            what: "IF left set: cli dropped",
            op: Op::Cli,
            operand: Operand::None,
            width: 0,
            bytes: &[],
            caught_by: "If(false)",
        },
        Wrong {
            what: "IF set where it must be cleared: sti for cli",
            op: Op::Cli,
            operand: Operand::None,
            width: 0,
            bytes: &[0xfb],
            caught_by: "rflags",
        },
        Wrong {
            what: "port width wrong: out 0x71, ax for out 0x71, al",
            op: Op::Out,
            operand: Operand::PortImm(0x71),
            width: 1,
            bytes: &[0x66, 0xe7, 0x71],
            caught_by: "width: 2",
        },
        Wrong {
            what: "wrong port: out 0x70, al for out 0x71, al",
            op: Op::Out,
            operand: Operand::PortImm(0x71),
            width: 1,
            bytes: &[0xe6, 0x70],
            caught_by: "port: 70",
        },
        Wrong {
            what: "port read twice: in al, 0x60; in al, 0x60",
            op: Op::In,
            operand: Operand::PortImm(0x60),
            width: 1,
            bytes: &[0xe4, 0x60, 0xe4, 0x60],
            caught_by: "effects",
        },
        Wrong {
            what: "missing TLB flush: invlpg [rbx] dropped",
            op: Op::Invlpg,
            operand: Operand::MemBase(RBX),
            width: 0,
            bytes: &[],
            caught_by: "Invlpg",
        },
        Wrong {
            what: "TLB flush of the wrong page: invlpg [rbx + 0x1000]",
            op: Op::Invlpg,
            operand: Operand::MemBase(RBX),
            width: 0,
            bytes: &[0x0f, 0x01, 0xbb, 0x00, 0x10, 0x00, 0x00],
            caught_by: "Invlpg",
        },
        Wrong {
            what: "missing CR3 write: mov cr3, rbx dropped",
            op: Op::MovToCr3,
            operand: Operand::Reg(RBX),
            width: 8,
            bytes: &[],
            caught_by: "WriteCr",
        },
        Wrong {
            what: "clobbered callee-saved register: wbinvd; mov r12d, 0",
            op: Op::Wbinvd,
            operand: Operand::None,
            width: 0,
            bytes: &[0x0f, 0x09, 0x41, 0xbc, 0x00, 0x00, 0x00, 0x00],
            caught_by: "r12",
        },
        Wrong {
            what: "wrong MSR: mov ecx, 0x10; wrmsr",
            op: Op::Wrmsr,
            operand: Operand::None,
            width: 0,
            bytes: &[0xb9, 0x10, 0x00, 0x00, 0x00, 0x0f, 0x30],
            caught_by: "WriteMsr",
        },
        Wrong {
            what: "rdmsr result half-written: rdmsr; xor edx, edx (flags too)",
            op: Op::Rdmsr,
            operand: Operand::None,
            width: 0,
            bytes: &[0x0f, 0x32, 0x31, 0xd2],
            caught_by: "rdx",
        },
        Wrong {
            what: "halt dropped",
            op: Op::Hlt,
            operand: Operand::None,
            width: 0,
            bytes: &[],
            caught_by: "Halt",
        },
        Wrong {
            what: "safe_halt with an interrupt window lost: hlt; sti",
            op: Op::SafeHalt,
            operand: Operand::None,
            width: 0,
            bytes: &[0xf4, 0xfb],
            caught_by: "effects",
        },
        Wrong {
            what: "stack left unbalanced: pushfq; pushfq for pushf",
            op: Op::Pushf,
            operand: Operand::None,
            width: 8,
            bytes: &[0x9c, 0x9c],
            caught_by: "rsp",
        },
        Wrong {
            what: "restore_fl that leaves interrupts on: push rbx; popfq; sti",
            op: Op::RestoreFl,
            operand: Operand::Reg(RBX),
            width: 8,
            bytes: &[0x53, 0x9d, 0xfb],
            caught_by: "rflags",
        },
        Wrong {
            what: "save_fl into the wrong register: pushfq; pop rcx",
            op: Op::SaveFl,
            operand: Operand::Reg(RBX),
            width: 8,
            bytes: &[0x9c, 0x59],
            caught_by: "rbx",
        },
        Wrong {
            what: "cpuid with the subleaf ignored: xor ecx, ecx; cpuid",
            op: Op::Cpuid,
            operand: Operand::None,
            width: 0,
            bytes: &[0x31, 0xc9, 0x0f, 0xa2],
            caught_by: "rax:",
        },
        Wrong {
            what: "swapgs dropped",
            op: Op::Swapgs,
            operand: Operand::None,
            width: 0,
            bytes: &[],
            caught_by: "Swapgs",
        },
        Wrong {
            what: "clts as a write of CR0 with TS kept: push rax; mov rax, cr0; mov cr0, rax; pop rax",
            op: Op::Clts,
            operand: Operand::None,
            width: 0,
            bytes: &[0x50, 0x0f, 0x20, 0xc0, 0x0f, 0x22, 0xc0, 0x58],
            caught_by: "WriteCr",
        },
    ]
}

/// States from a fixed sequence of seeds.
fn states(case: &Case, n: u64) -> impl Iterator<Item = State> + '_ {
    (0..n).map(move |i| {
        let m = |k: u64| pvpatch_oracle::oracle::vcpu::mix(i * 0x100 + k);
        let mut gpr = [0u64; 16];
        for (k, g) in gpr.iter_mut().enumerate() {
            *g = m(k as u64);
        }
        // Every second state: the ecx of an MSR or CPUID leaf that matters.
        if i % 2 == 0 {
            gpr[1] &= 0xff;
        }
        State::for_site(&case.site, gpr, m(99), m(100))
    })
}

fn padded(case: &Case, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b.resize(case.site.site_len as usize, 0);
    encode::fill_nops(&mut b[bytes.len()..]);
    b
}

#[test]
fn every_wrong_rewrite_is_caught_and_the_right_one_passes() {
    let mut oracle = Oracle::new().unwrap();
    let native = Identity("native");
    let mut missed = Vec::new();
    for w in catalogue() {
        let pad = w.bytes.len().saturating_sub(1) as u8 + 1;
        let case = Case::native(w.op.id(), w.operand, w.width, 0, pad)
            .unwrap_or_else(|| panic!("{}: no case", w.what));
        assert!(w.bytes.len() <= case.site.site_len as usize, "{}", w.what);
        let wrong = padded(&case, w.bytes);
        let mut caught = None;
        for state in states(&case, 64) {
            // The native instruction against itself passes.
            let right = Candidate {
                bytes: &case.reference,
                code: &[],
                trap: false,
                abstraction: &native,
            };
            oracle
                .compare(&case, &right, &state)
                .unwrap_or_else(|d| panic!("{}: the native instruction failed: {d}", w.what));
            let candidate = Candidate {
                bytes: &wrong,
                code: &[],
                trap: false,
                abstraction: &native,
            };
            if let Err(d) = oracle.compare(&case, &candidate, &state) {
                caught = Some(d);
                break;
            }
        }
        match caught {
            Some(d) if d.to_string().contains(w.caught_by) => {
                eprintln!("caught: {}: {}", w.what, d.what.join("; "))
            }
            Some(d) => missed.push(format!(
                "{}: caught, but not by {:?}:\n{d}",
                w.what, w.caught_by
            )),
            None => missed.push(format!("{}: not caught in 64 states", w.what)),
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
}

/// A backend's declared no-op is an abstraction, not a blind spot: dropping a port-0x80 delay
/// passes under KVM's abstraction and fails under the identity; dropping any other port write
/// fails under both.
#[test]
fn declared_void_effects_are_exactly_those() {
    let mut oracle = Oracle::new().unwrap();
    let kvm = NoIoDelay("kvm");
    let native = Identity("native");
    let delay = Case::native(Op::IoDelay.id(), Operand::PortImm(0x80), 1, 0, 1).unwrap();
    let nothing = padded(&delay, &[]);
    let state = states(&delay, 1).next().unwrap();
    let check = |o: &mut Oracle, case: &Case, a: &dyn Abstraction, bytes: &[u8]| {
        o.compare(
            case,
            &Candidate {
                bytes,
                code: &[],
                trap: false,
                abstraction: a,
            },
            &state,
        )
        .is_ok()
    };
    assert!(check(&mut oracle, &delay, &kvm, &nothing));
    assert!(!check(&mut oracle, &delay, &native, &nothing));
    let out = Case::native(Op::Out.id(), Operand::PortImm(0x80), 1, 0, 1).unwrap();
    let state = states(&out, 1).next().unwrap();
    assert!(
        oracle
            .compare(
                &out,
                &Candidate {
                    bytes: &padded(&out, &[]),
                    code: &[],
                    trap: false,
                    abstraction: &kvm,
                },
                &state,
            )
            .is_err(),
        "an `out` that is not an io_delay site is never void"
    );
}

/// Xen: `cli` as a store to `vcpu_info`'s mask passes with the right polarity (1: masked) and
/// is caught with the wrong one; `sti` likewise with 0.
#[test]
fn a_xen_mask_written_with_the_wrong_polarity_is_caught() {
    use pvpatch_oracle::oracle::PRIVATE;
    use pvpatch_oracle::oracle::abstraction::XenPv;
    let mut oracle = Oracle::new().unwrap();
    let mask = (PRIVATE as u32 + 1).to_le_bytes();
    let store = |v: u8| {
        let mut b = vec![0xc6, 0x04, 0x25]; // mov byte [abs32], imm8
        b.extend_from_slice(&mask);
        b.push(v);
        b
    };
    for (op, right, wrong) in [(Op::Cli, 1u8, 0u8), (Op::Sti, 0, 1)] {
        let case = Case::native(op.id(), Operand::None, 0, 0, 7).unwrap();
        let (ok, bad) = (padded(&case, &store(right)), padded(&case, &store(wrong)));
        let mut caught = false;
        for state in states(&case, 32) {
            let run = |o: &mut Oracle, bytes: &[u8]| {
                o.compare(
                    &case,
                    &Candidate {
                        bytes,
                        code: &[],
                        trap: false,
                        abstraction: &XenPv,
                    },
                    &state,
                )
            };
            run(&mut oracle, &ok).unwrap_or_else(|d| panic!("the right polarity failed: {d}"));
            caught |= run(&mut oracle, &bad).is_err();
        }
        assert!(caught, "{op} with the mask's polarity inverted passed");
    }
}
