//! The oracle is not vacuous: each rewrite of this catalogue is wrong in one way, and the
//! oracle must say so, by the comparison that must find it (matched on the kind of difference
//! reported, not its text); the native instruction itself, from the same states, must pass.
//! Every comparison the oracle makes has an entry, and switching any one comparison off
//! makes the catalogue fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use patch_sites::{Gpr, Op, Operand};
use pvpatch_isa::encode;
use pvpatch_oracle::oracle::abstraction::{Identity, NoIoDelay, XenPv};
use pvpatch_oracle::oracle::{
    Abstraction, Candidate, Case, Comparison, Difference, Divergence, EffectKind, HYPERCALL,
    Hypervisor, Oracle, State,
};

/// Under which abstraction a wrong rewrite is judged.
#[derive(Clone, Copy, Debug)]
enum Under {
    /// The native backend's: the identity.
    Native,
    /// Xen PV's.
    Xen,
    /// A hypervisor that owns the private page and reads nothing in it: every store to it is
    /// an effect of its own.
    RawStores,
}

/// [`Under::RawStores`].
#[derive(Debug)]
struct RawStores;

impl Abstraction for RawStores {
    fn name(&self) -> &'static str {
        "raw stores"
    }
    fn owns_private_page(&self) -> bool {
        true
    }
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::Xen
    }
}

impl Under {
    fn abstraction(self) -> &'static dyn Abstraction {
        match self {
            Under::Native => &Identity("native"),
            Under::Xen => &XenPv,
            Under::RawStores => &RawStores,
        }
    }
}

/// The difference a wrong rewrite must be caught by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum By {
    /// This comparison.
    Comparison(Comparison),
    /// The register comparison, in this register.
    Register(Gpr),
}

impl By {
    fn comparison(self) -> Comparison {
        match self {
            By::Comparison(c) => c,
            By::Register(_) => Comparison::Registers,
        }
    }
    fn matches(self, d: &Difference) -> bool {
        match self {
            By::Comparison(c) => d.comparison == c,
            By::Register(g) => d.comparison == Comparison::Registers && d.register == Some(g),
        }
    }
}

struct Wrong {
    what: &'static str,
    op: Op,
    operand: Operand,
    width: u8,
    /// The wrong rewrite (padded with NOPs to the site).
    bytes: &'static [u8],
    /// The difference the oracle must report.
    caught_by: By,
    under: Under,
}

const RBX: Gpr = Gpr::Rbx;

fn effect(kind: EffectKind) -> By {
    By::Comparison(Comparison::Effect(kind))
}

fn wrong(
    what: &'static str,
    op: Op,
    operand: Operand,
    width: u8,
    bytes: &'static [u8],
    caught_by: By,
) -> Wrong {
    Wrong {
        what,
        op,
        operand,
        width,
        bytes,
        caught_by,
        under: Under::Native,
    }
}

// The catalogue's stores name the data page and the private page by address (`mov byte
// [abs32], imm8`): they must be where the engine maps them.
const _: () = assert!(
    pvpatch_oracle::oracle::DATA == 0x0300_0000 && pvpatch_oracle::oracle::PRIVATE == 0x0400_0000
);

/// The call in [`catalogue`]'s hypercall entry: `push rax; mov eax, HYPERCALL + 32 * 18
/// (console_io); call rax; pop rax`.
const CALL_CONSOLE_IO: [u8; 10] = {
    let a = (HYPERCALL + 32 * 18).to_le_bytes();
    [0x50, 0xb8, a[0], a[1], a[2], a[3], 0xff, 0xd0, 0x58, 0x90]
};

/// Wrong rewrites, at least one for every comparison the oracle makes, each with the
/// comparison that must catch it.
fn catalogue() -> Vec<Wrong> {
    use EffectKind as E;
    let none = Operand::None;
    let at_rbx = Operand::MemBase(RBX);
    let c = By::Comparison;
    vec![
        wrong(
            "wrong register: mov rcx, cr3 for mov rbx, cr3",
            Op::MovFromCr3,
            Operand::Reg(RBX),
            8,
            &[0x0f, 0x20, 0xd9],
            By::Register(RBX),
        ),
        wrong(
            "flags not preserved: cli; test al, al",
            Op::Cli,
            none,
            0,
            &[0xfa, 0x84, 0xc0],
            c(Comparison::Rflags),
        ),
        wrong(
            "IF left set: cli dropped",
            Op::Cli,
            none,
            0,
            &[],
            effect(E::If),
        ),
        wrong(
            "IF set where it must be cleared: sti for cli",
            Op::Cli,
            none,
            0,
            &[0xfb],
            c(Comparison::Rflags),
        ),
        wrong(
            "port width wrong: out 0x71, ax for out 0x71, al",
            Op::Out,
            Operand::PortImm(0x71),
            1,
            &[0x66, 0xe7, 0x71],
            effect(E::Out),
        ),
        wrong(
            "wrong port: out 0x70, al for out 0x71, al",
            Op::Out,
            Operand::PortImm(0x71),
            1,
            &[0xe6, 0x70],
            effect(E::Out),
        ),
        wrong(
            "port read twice: in al, 0x60; in al, 0x60",
            Op::In,
            Operand::PortImm(0x60),
            1,
            &[0xe4, 0x60, 0xe4, 0x60],
            effect(E::In),
        ),
        wrong(
            "missing TLB flush: invlpg [rbx] dropped",
            Op::Invlpg,
            at_rbx,
            0,
            &[],
            effect(E::Invlpg),
        ),
        wrong(
            "TLB flush of the wrong page: invlpg [rbx + 0x1000]",
            Op::Invlpg,
            at_rbx,
            0,
            &[0x0f, 0x01, 0xbb, 0x00, 0x10, 0x00, 0x00],
            effect(E::Invlpg),
        ),
        wrong(
            "missing CR3 write: mov cr3, rbx dropped (the trace)",
            Op::MovToCr3,
            Operand::Reg(RBX),
            8,
            &[],
            effect(E::WriteCr),
        ),
        wrong(
            "missing CR3 write: mov cr3, rbx dropped (the register's state)",
            Op::MovToCr3,
            Operand::Reg(RBX),
            8,
            &[],
            c(Comparison::ControlRegisters),
        ),
        wrong(
            "clobbered callee-saved register: wbinvd; mov r12d, 0",
            Op::Wbinvd,
            none,
            0,
            &[0x0f, 0x09, 0x41, 0xbc, 0x00, 0x00, 0x00, 0x00],
            By::Register(Gpr::R12),
        ),
        wrong(
            "wrong MSR: mov ecx, 0x10; wrmsr",
            Op::Wrmsr,
            none,
            0,
            &[0xb9, 0x10, 0x00, 0x00, 0x00, 0x0f, 0x30],
            effect(E::WriteMsr),
        ),
        wrong(
            "MSR write dropped (the MSR's state)",
            Op::Wrmsr,
            none,
            0,
            &[],
            c(Comparison::Msrs),
        ),
        wrong(
            "rdmsr result half-written: rdmsr; xor edx, edx (flags too)",
            Op::Rdmsr,
            none,
            0,
            &[0x0f, 0x32, 0x31, 0xd2],
            By::Register(Gpr::Rdx),
        ),
        wrong("halt dropped", Op::Hlt, none, 0, &[], effect(E::Halt)),
        wrong(
            "safe_halt with an interrupt window lost: hlt; sti",
            Op::SafeHalt,
            none,
            0,
            &[0xf4, 0xfb],
            effect(E::If),
        ),
        wrong(
            "stack left unbalanced: pushfq; pushfq for pushf",
            Op::Pushf,
            none,
            8,
            &[0x9c, 0x9c],
            By::Register(Gpr::Rsp),
        ),
        wrong(
            "restore_fl that leaves interrupts on: push rbx; popfq; sti",
            Op::RestoreFl,
            Operand::Reg(RBX),
            8,
            &[0x53, 0x9d, 0xfb],
            c(Comparison::Rflags),
        ),
        wrong(
            "save_fl into the wrong register: pushfq; pop rcx",
            Op::SaveFl,
            Operand::Reg(RBX),
            8,
            &[0x9c, 0x59],
            By::Register(RBX),
        ),
        wrong(
            "cpuid with the subleaf ignored: xor ecx, ecx; cpuid",
            Op::Cpuid,
            none,
            0,
            &[0x31, 0xc9, 0x0f, 0xa2],
            By::Register(Gpr::Rax),
        ),
        wrong(
            "swapgs dropped",
            Op::Swapgs,
            none,
            0,
            &[],
            effect(E::Swapgs),
        ),
        wrong(
            "clts as a write of CR0 with TS kept: push rax; mov rax, cr0; mov cr0, rax; pop rax",
            Op::Clts,
            none,
            0,
            &[0x50, 0x0f, 0x20, 0xc0, 0x0f, 0x22, 0xc0, 0x58],
            effect(E::WriteCr),
        ),
        wrong(
            "a rewrite that faults: ud2 for cli (how the run ended)",
            Op::Cli,
            none,
            0,
            &[0x0f, 0x0b],
            c(Comparison::End),
        ),
        wrong(
            "a rewrite that faults: ud2 for cli (the fault)",
            Op::Cli,
            none,
            0,
            &[0x0f, 0x0b],
            effect(E::Fault),
        ),
        wrong(
            "the caller's stack overwritten: wbinvd; mov qword [rsp], 0",
            Op::Wbinvd,
            none,
            0,
            &[0x0f, 0x09, 0x48, 0xc7, 0x04, 0x24, 0x00, 0x00, 0x00, 0x00],
            c(Comparison::Stack),
        ),
        wrong(
            "kernel data overwritten: wbinvd; mov byte [DATA], 0x55",
            Op::Wbinvd,
            none,
            0,
            &[0x0f, 0x09, 0xc6, 0x04, 0x25, 0x00, 0x00, 0x00, 0x03, 0x55],
            c(Comparison::Memory),
        ),
        wrong(
            "a page the backend does not own written: wbinvd; mov byte [PRIVATE], 0x55",
            Op::Wbinvd,
            none,
            0,
            &[0x0f, 0x09, 0xc6, 0x04, 0x25, 0x00, 0x00, 0x00, 0x04, 0x55],
            c(Comparison::PrivatePage),
        ),
        wrong(
            "debug register write dropped: mov dr7, rbx",
            Op::MovToDr,
            Operand::DebugReg { dr: 7, reg: RBX },
            8,
            &[],
            effect(E::WriteDr),
        ),
        wrong(
            "caches discarded, not written back: invd for wbinvd",
            Op::Wbinvd,
            none,
            0,
            &[0x0f, 0x08],
            effect(E::Caches),
        ),
        wrong(
            "xsetbv dropped",
            Op::Xsetbv,
            none,
            0,
            &[],
            effect(E::Xsetbv),
        ),
        wrong(
            "lgdt [rbx] dropped",
            Op::Lgdt,
            at_rbx,
            0,
            &[],
            effect(E::LoadTable),
        ),
        wrong(
            "lldt bx dropped",
            Op::Lldt,
            Operand::Reg(RBX),
            2,
            &[],
            effect(E::LoadSelector),
        ),
        wrong(
            "invpcid rax, [rbx] dropped",
            Op::Invpcid,
            Operand::RegMemBase {
                reg: Gpr::Rax,
                base: RBX,
            },
            0,
            &[],
            effect(E::Invpcid),
        ),
        Wrong {
            under: Under::RawStores,
            ..wrong(
                "a store the hypervisor sees: wbinvd; mov byte [PRIVATE], 1",
                Op::Wbinvd,
                none,
                0,
                &[0x0f, 0x09, 0xc6, 0x04, 0x25, 0x00, 0x00, 0x00, 0x04, 0x01],
                effect(E::Store),
            )
        },
        Wrong {
            under: Under::Xen,
            ..wrong(
                "a stray hypercall: a console_io call after wbinvd",
                Op::Wbinvd,
                none,
                0,
                &[
                    0x0f,
                    0x09,
                    CALL_CONSOLE_IO[0],
                    CALL_CONSOLE_IO[1],
                    CALL_CONSOLE_IO[2],
                    CALL_CONSOLE_IO[3],
                    CALL_CONSOLE_IO[4],
                    CALL_CONSOLE_IO[5],
                    CALL_CONSOLE_IO[6],
                    CALL_CONSOLE_IO[7],
                    CALL_CONSOLE_IO[8],
                ],
                effect(E::Hypercall),
            )
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

/// How the catalogue fared: per entry, the divergence that caught it (if any did) and whether
/// its comparison was among what was reported.
fn run_catalogue(oracle: &mut Oracle) -> Vec<(Wrong, Option<Box<Divergence>>, bool)> {
    let mut out = Vec::new();
    for w in catalogue() {
        let pad = w.bytes.len().saturating_sub(1) as u8 + 1;
        let case = Case::native(w.op.id(), w.operand, w.width, 0, pad)
            .unwrap_or_else(|| panic!("{}: no case", w.what));
        assert!(w.bytes.len() <= case.site.site_len as usize, "{}", w.what);
        let wrong = padded(&case, w.bytes);
        let abs = w.under.abstraction();
        let mut caught = None;
        for state in states(&case, 64) {
            // The native instruction against itself passes.
            let right = Candidate {
                bytes: &case.reference,
                code: &[],
                trap: false,
                abstraction: abs,
            };
            oracle
                .compare(&case, &right, &state)
                .unwrap_or_else(|d| panic!("{}: the native instruction failed: {d}", w.what));
            let candidate = Candidate {
                bytes: &wrong,
                code: &[],
                trap: false,
                abstraction: abs,
            };
            if let Err(d) = oracle.compare(&case, &candidate, &state) {
                let by = d.what.iter().any(|x| w.caught_by.matches(x));
                caught = Some(d);
                if by {
                    break;
                }
            }
        }
        let by = caught
            .as_ref()
            .is_some_and(|d| d.what.iter().any(|x| w.caught_by.matches(x)));
        out.push((w, caught, by));
    }
    out
}

#[test]
fn every_wrong_rewrite_is_caught_by_its_comparison_and_the_right_one_passes() {
    let mut oracle = Oracle::new().unwrap();
    let results = run_catalogue(&mut oracle);
    let mut missed = Vec::new();
    for (w, caught, by) in &results {
        match (caught, by) {
            (Some(_), true) => eprintln!("caught by {:?}: {}", w.caught_by, w.what),
            (Some(d), false) => missed.push(format!(
                "{}: caught, but not by {:?}:\n{d}",
                w.what, w.caught_by
            )),
            (None, _) => missed.push(format!("{}: not caught in 64 states", w.what)),
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
    // Every comparison has an entry.
    let all = Comparison::all();
    let lacking: Vec<&Comparison> = all
        .iter()
        .filter(|c| {
            !results
                .iter()
                .any(|(w, ..)| w.caught_by.comparison() == **c)
        })
        .collect();
    assert!(lacking.is_empty(), "no catalogue entry for {lacking:?}");
    pvpatch_testkit::figure(
        "not_vacuous",
        &format!(
            "the catalogue: {} wrong rewrites, each caught by its own comparison; all {} \
             comparisons have an entry",
            results.len(),
            all.len()
        ),
    );
}

/// Each comparison is needed: the oracle with any one of them switched off lets the catalogue
/// fail (an entry is no longer caught by what must catch it).
#[test]
fn the_catalogue_fails_without_any_one_comparison() {
    let all = Comparison::all();
    let mut survived = Vec::new();
    let mut uncaught = 0;
    let mut per = Vec::new();
    for c in &all {
        let mut oracle = Oracle::new().unwrap().without(*c);
        let results = run_catalogue(&mut oracle);
        let failing: Vec<&str> = results
            .iter()
            .filter(|(_, _, by)| !by)
            .map(|(w, ..)| w.what)
            .collect();
        if failing.is_empty() {
            survived.push(*c);
        }
        // Entries nothing else catches either: the comparison is their only guard.
        uncaught += results.iter().filter(|(_, d, _)| d.is_none()).count();
        eprintln!("without {c:?}: the catalogue fails on {failing:?}");
        per.push(format!("{c:?} {}", failing.len()));
    }
    assert!(
        survived.is_empty(),
        "the catalogue passes without {survived:?}"
    );
    pvpatch_testkit::figure(
        "not_vacuous",
        &format!(
            "each of the {} comparisons switched off in turn: the catalogue fails every time \
             (entries failing, by comparison: {}); {uncaught} (comparison, entry) pairs where \
             nothing else catches the entry at all",
            all.len(),
            per.join(", ")
        ),
    );
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
