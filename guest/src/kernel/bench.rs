//! Nanobenchmarks in the manner of Adams & Agesen: cycles per op, measured with `rdtsc` over a
//! loop and net of the empty loop, for each op as the native instruction, as an unpatched site
//! (native-padded, and indirect call through the ops table), as a patched site, and trapped
//! (the site rewritten to a trap the runtime emulates).
//!
//! The benchmark loops live in `.text.pvbench`, so that the trap pass can select their sites.

use alloc::vec::Vec;
use core::arch::asm;

use patch_sites::table::{AddrRange, Form, Site};
use patch_sites::*;

use super::arch;
use super::paging::TEST_VA;
use super::pvops::PV_OPS;

unsafe extern "C" {
    static __pvbench_start: u8;
    static __pvbench_end: u8;
}

/// The benchmark code.
pub fn range() -> AddrRange {
    AddrRange::new(
        &raw const __pvbench_start as u64,
        &raw const __pvbench_end as u64,
    )
}

/// Whether `s` is one of the benchmark's native-form sites (the ones the trap pass traps).
pub fn is_trappable_bench_site(s: &Site) -> bool {
    s.form == Form::Native
        && range().contains_span(s.addr, s.site_len as u64)
        && s.op()
            .is_some_and(|op| pvpatch_runtime::trap::supported(op, s.operand, s.width))
}

const KGS: u32 = 0xc000_0102;

macro_rules! loops {
    ($($name:ident => $body:block)*) => {
        $(
            #[unsafe(link_section = ".text.pvbench")]
            #[inline(never)]
            #[allow(unused_unsafe)]
            extern "C" fn $name(n: u32) -> u64 {
                let t0 = arch::rdtsc();
                for _ in 0..n {
                    // SAFETY: each benchmarked op is harmless where the kernel runs it: IF is
                    // restored, MSR and CR3 values are written back, the TLB only refills.
                    unsafe { $body }
                }
                arch::rdtsc() - t0
            }
        )*
    };
}

loops! {
    empty => { asm!("", options(nostack, nomem)) }
    cli_sti_native => { asm!("cli", "sti", options(nostack, nomem)) }
    cli_sti_site => { pv_cli!(); pv_sti!() }
    cli_sti_call => { pv_cli!(call PV_OPS); pv_sti!(call PV_OPS) }
    save_fl_native => { let _f: u64; asm!("pushfq", "pop {}", out(reg) _f, options(nomem)) }
    save_fl_site => { let _ = pv_save_fl!(); }
    save_fl_call => { let _ = pv_save_fl!(call PV_OPS); }
    io_delay_native => { asm!("out 0x80, al", in("al") 0u8, options(nostack, nomem)) }
    io_delay_site => { pv_io_delay!() }
    io_delay_call => { pv_io_delay!(call PV_OPS) }
    rdmsr_native => { let _ = arch::rdmsr(KGS); }
    rdmsr_site => { let _ = pv_rdmsr!(KGS); }
    rdmsr_call => { let _ = pv_rdmsr!(KGS; call PV_OPS); }
    cpuid_native => { let _ = arch::cpuid(0, 0); }
    cpuid_site => { let _ = pv_cpuid!(0u32, 0u32); }
    cpuid_call => { let _ = pv_cpuid!(0u32, 0u32; call PV_OPS); }
    rdtsc_native => { let (_lo, _hi): (u32, u32); asm!("rdtsc", out("eax") _lo, out("edx") _hi, options(nostack, nomem)) }
    rdtsc_site => { let _ = pv_rdtsc!(); }
    rdtsc_call => { let _ = pv_rdtsc!(call PV_OPS); }
    cr3_native => { asm!("mov {v}, cr3", "mov cr3, {v}", v = out(reg) _, options(nostack)) }
    cr3_site => { let v = pv_read_cr!(3); pv_write_cr!(3, v) }
    cr3_call => { let v = pv_read_cr!(3; call PV_OPS); pv_write_cr!(3, v; call PV_OPS) }
    invlpg_native => { arch::invlpg(TEST_VA) }
    invlpg_site => { pv_invlpg!(TEST_VA) }
    invlpg_call => { pv_invlpg!(TEST_VA; call PV_OPS) }
    swapgs_native => { asm!("swapgs", "swapgs", options(nostack, nomem)) }
    swapgs_site => { pv_swapgs!(); pv_swapgs!() }
    swapgs_call => { pv_swapgs!(call PV_OPS); pv_swapgs!(call PV_OPS) }
}

pub type Loop = extern "C" fn(u32) -> u64;

/// Where a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// In the kernel.
    Kernel,
    /// In user mode with IOPL 3 (ops allowed there only).
    User,
}

/// One case: its name, where it runs, and its native, site and call-form loops.
struct Case {
    name: &'static str,
    ring: Ring,
    native: Loop,
    site: Loop,
    call: Loop,
}

const CASES: &[Case] = &[
    Case {
        name: "cli;sti",
        ring: Ring::Kernel,
        native: cli_sti_native,
        site: cli_sti_site,
        call: cli_sti_call,
    },
    Case {
        name: "save_fl",
        ring: Ring::Kernel,
        native: save_fl_native,
        site: save_fl_site,
        call: save_fl_call,
    },
    Case {
        name: "io_delay (out 0x80)",
        ring: Ring::Kernel,
        native: io_delay_native,
        site: io_delay_site,
        call: io_delay_call,
    },
    Case {
        name: "rdmsr",
        ring: Ring::Kernel,
        native: rdmsr_native,
        site: rdmsr_site,
        call: rdmsr_call,
    },
    Case {
        name: "cpuid(0)",
        ring: Ring::Kernel,
        native: cpuid_native,
        site: cpuid_site,
        call: cpuid_call,
    },
    Case {
        name: "rdtsc",
        ring: Ring::Kernel,
        native: rdtsc_native,
        site: rdtsc_site,
        call: rdtsc_call,
    },
    Case {
        name: "mov cr3 (read, write)",
        ring: Ring::Kernel,
        native: cr3_native,
        site: cr3_site,
        call: cr3_call,
    },
    Case {
        name: "invlpg",
        ring: Ring::Kernel,
        native: invlpg_native,
        site: invlpg_site,
        call: invlpg_call,
    },
    Case {
        name: "swapgs;swapgs",
        ring: Ring::Kernel,
        native: swapgs_native,
        site: swapgs_site,
        call: swapgs_call,
    },
    Case {
        name: "cli;sti",
        ring: Ring::User,
        native: cli_sti_native,
        site: cli_sti_site,
        call: cli_sti_call,
    },
    Case {
        name: "save_fl",
        ring: Ring::User,
        native: save_fl_native,
        site: save_fl_site,
        call: save_fl_call,
    },
    Case {
        name: "io_delay (out 0x80)",
        ring: Ring::User,
        native: io_delay_native,
        site: io_delay_site,
        call: io_delay_call,
    },
    Case {
        name: "cpuid(0)",
        ring: Ring::User,
        native: cpuid_native,
        site: cpuid_site,
        call: cpuid_call,
    },
    Case {
        name: "rdtsc",
        ring: Ring::User,
        native: rdtsc_native,
        site: rdtsc_site,
        call: rdtsc_call,
    },
];

/// Runs `f(n)` where the case runs; `None` if it faulted there.
fn run(f: Loop, n: u32, ring: Ring) -> Option<u64> {
    match ring {
        Ring::Kernel => Some(f(n)),
        Ring::User => super::ring3::run_user(f, n),
    }
}

/// Cycles per iteration, in hundredths, net of the empty loop: the minimum over `reps` runs;
/// `None` if the loop faulted.
fn measure(f: Loop, n: u32, reps: u32, empty: u64, ring: Ring) -> Option<u64> {
    let mut best = u64::MAX;
    for _ in 0..reps {
        best = best.min(run(f, n, ring)?);
    }
    Some(per_op(best, n, empty))
}

fn per_op(total: u64, n: u32, empty: u64) -> u64 {
    (total * 100 / n as u64).saturating_sub(empty)
}

/// The loops `fs`, measured side by side: one run of each in turn, `reps` times over, so that
/// whatever slows the machine down for a while slows them all alike; per loop, the minimum,
/// as [`measure`] gives it (`None` for a loop that faulted).
pub fn side_by_side<const K: usize>(
    fs: [Loop; K],
    n: u32,
    reps: u32,
    empty: u64,
    ring: Ring,
) -> [Option<u64>; K] {
    let mut best = [Some(u64::MAX); K];
    for _ in 0..reps {
        for (b, f) in best.iter_mut().zip(fs) {
            if let Some(x) = b {
                *b = run(f, n, ring).map(|t| t.min(*x));
            }
        }
    }
    best.map(|b| b.map(|t| per_op(t, n, empty)))
}

/// One row of results (cycles per op, in hundredths; `None` where the loop faulted).
#[derive(Clone, Debug)]
pub struct Row {
    /// The case.
    pub name: &'static str,
    /// Where it ran.
    pub ring: Ring,
    /// The native instruction, measured with the unpatched sites.
    pub native: Option<u64>,
    /// The native instruction again, measured with the patched sites.
    pub native_again: Option<u64>,
    /// Unpatched native-padded site.
    pub site_unpatched: Option<u64>,
    /// Unpatched indirect-call site.
    pub call_unpatched: Option<u64>,
    /// Trapped site.
    pub trapped: Option<u64>,
    /// Patched native-padded site.
    pub site_patched: Option<u64>,
    /// Patched indirect-call site.
    pub call_patched: Option<u64>,
}

/// The benchmark's state across the three passes.
pub struct Bench {
    n: u32,
    reps: u32,
    empty: u64,
    empty_user: u64,
    /// The rows.
    pub rows: Vec<Row>,
    /// Iterations per run.
    pub iterations: u32,
}

impl Bench {
    /// The first pass, before patching: native and unpatched. Fewer iterations where every
    /// kernel instruction is emulated (this host's KVM).
    pub fn unpatched(slow: bool) -> Bench {
        let (n, reps) = if slow { (100, 3) } else { (2000, 7) };
        let on = arch::irq_save();
        let empty_user = measure(empty, n, reps, 0, Ring::User).unwrap_or(0);
        let empty = measure(empty, n, reps, 0, Ring::Kernel).unwrap_or(0);
        let base = |ring| {
            if ring == Ring::User {
                empty_user
            } else {
                empty
            }
        };
        let rows = CASES
            .iter()
            .map(|c| {
                let [native, site, call] =
                    side_by_side([c.native, c.site, c.call], n, reps, base(c.ring), c.ring);
                Row {
                    name: c.name,
                    ring: c.ring,
                    native,
                    native_again: None,
                    site_unpatched: site,
                    call_unpatched: call,
                    trapped: None,
                    site_patched: None,
                    call_patched: None,
                }
            })
            .collect();
        arch::irq_restore(on);
        Bench {
            n,
            reps,
            empty,
            empty_user,
            rows,
            iterations: n,
        }
    }

    /// The trap pass: the native-form sites of the loops are traps now.
    pub fn trapped(&mut self) {
        let on = arch::irq_save();
        for (r, c) in self.rows.iter_mut().zip(CASES) {
            // Trap emulation runs in the kernel: user-mode traps are not measured.
            if c.ring == Ring::Kernel {
                r.trapped = measure(c.site, self.n, self.reps, self.empty, c.ring);
            }
        }
        arch::irq_restore(on);
    }

    /// The last pass, after patching: the native instruction again, side by side with the
    /// patched sites.
    pub fn patched(&mut self) {
        let on = arch::irq_save();
        let (n, reps, kernel, user) = (self.n, self.reps, self.empty, self.empty_user);
        for (r, c) in self.rows.iter_mut().zip(CASES) {
            let b = if c.ring == Ring::User { user } else { kernel };
            [r.native_again, r.site_patched, r.call_patched] =
                side_by_side([c.native, c.site, c.call], n, reps, b, c.ring);
        }
        arch::irq_restore(on);
    }

    /// The empty loop's cost per iteration (hundredths of a cycle), in the kernel and in user
    /// mode.
    pub fn empty(&self) -> (u64, u64) {
        (self.empty, self.empty_user)
    }
}

/// Checks, while the benchmark's sites are traps, that emulation did what the instructions do.
pub fn check_traps() -> Result<(), &'static str> {
    let on = arch::irq_save();
    // SAFETY: the same harmless ops as the loops.
    let r = unsafe {
        let want = arch::cpuid(0, 0);
        if cpuid_once() != want {
            Err("trapped cpuid differs from the instruction")
        } else if rdmsr_once() != arch::rdmsr(KGS) {
            Err("trapped rdmsr differs from the instruction")
        } else if !cli_sti_once() {
            Err("trapped cli/sti did not change IF")
        } else {
            Ok(())
        }
    };
    arch::irq_restore(on);
    r
}

#[unsafe(link_section = ".text.pvbench")]
#[inline(never)]
unsafe fn cpuid_once() -> [u32; 4] {
    // SAFETY: cpuid.
    unsafe { pv_cpuid!(0u32, 0u32) }
}

#[unsafe(link_section = ".text.pvbench")]
#[inline(never)]
unsafe fn rdmsr_once() -> u64 {
    // SAFETY: a harmless MSR.
    unsafe { pv_rdmsr!(KGS) }
}

#[unsafe(link_section = ".text.pvbench")]
#[inline(never)]
unsafe fn cli_sti_once() -> bool {
    // SAFETY: IF toggled and left clear, as the caller had it.
    unsafe {
        pv_sti!();
        let a = arch::interrupts_enabled();
        pv_cli!();
        a && !arch::interrupts_enabled()
    }
}

/// The loops the Xen PV benchmarks share with these (see `xen::bench`): per op, its native,
/// native-padded site and indirect-call loops.
pub mod for_xen {
    use super::Loop;

    /// `(name, native, site, call)`.
    pub const CASES: [(&str, Loop, Loop, Loop); 4] = [
        (
            "cli;sti",
            super::cli_sti_native,
            super::cli_sti_site,
            super::cli_sti_call,
        ),
        (
            "save_fl",
            super::save_fl_native,
            super::save_fl_site,
            super::save_fl_call,
        ),
        (
            "mov cr3 (read, write)",
            super::cr3_native,
            super::cr3_site,
            super::cr3_call,
        ),
        (
            "invlpg",
            super::invlpg_native,
            super::invlpg_site,
            super::invlpg_call,
        ),
    ];

    /// The empty loop.
    pub const EMPTY: Loop = super::empty;
}
