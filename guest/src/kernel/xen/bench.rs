//! Nanobenchmarks on real Xen, in the manner of Adams & Agesen: per op, cycles of the native
//! instruction as Xen runs it in a PV kernel (trapped: emulated by Xen, or bounced to the
//! kernel's #GP handler, which emulates it through the PV interface), of the unpatched
//! indirect call (its thunk holds the native instruction: the same trap and a call), and of
//! the patched site and call (the Xen backend's entry points). Net of the empty loop, minimum
//! of several runs measured side by side; `rdtsc` is not trapped in a PV kernel.

use alloc::vec::Vec;
use core::arch::asm;

use patch_sites::*;

use super::super::arch;
use super::super::bench::{self, Loop, for_xen};
use super::super::pvops::PV_OPS;
use super::hv;

/// One row (cycles per op, in hundredths).
pub struct Row {
    /// The op.
    pub name: &'static str,
    /// What the native instruction does in a PV kernel.
    pub how: &'static str,
    /// The native instruction (trapped).
    pub trapped: Option<u64>,
    /// The unpatched indirect call.
    pub call_unpatched: Option<u64>,
    /// The patched native-form site.
    pub site_patched: Option<u64>,
    /// The patched indirect call.
    pub call_patched: Option<u64>,
}

const HOW: [&str; 5] = [
    "bounced to the kernel's #GP handler (Xen emulates neither)",
    "not trapped: pushfq shows IF=1 whatever the event mask (wrong)",
    "emulated by Xen (read: the root's machine address; write: NEW_BASEPTR)",
    "bounced to the kernel's #GP handler (MMUEXT_INVLPG_LOCAL)",
    "bounced to the kernel's #GP handler (sti; hlt as SCHEDOP_block)",
];

/// An already expired timer makes an event pending at once; events masked, so that the op
/// under test is what delivers it.
#[inline(always)]
fn arm() {
    hv::set_mask(1);
    hv::set_timer(1);
}

/// Times only the op: arming the timer (a hypercall) stays outside the measurement.
macro_rules! wake_loop {
    ($name:ident, $op:block) => {
        extern "C" fn $name(n: u32) -> u64 {
            let mut t = 0;
            for _ in 0..n {
                arm();
                let t0 = arch::rdtsc();
                // SAFETY: an event is pending, so the halt returns at once; `sti; hlt` is
                // emulated by the #GP handler as SCHEDOP_block.
                #[allow(unused_unsafe)]
                unsafe {
                    $op
                }
                t += arch::rdtsc() - t0;
            }
            // What is left pending (the base loop's events) is delivered here, unmeasured.
            hv::set_timer(0);
            hv::set_mask(0);
            hv::force_events();
            t
        }
    };
}

wake_loop!(wake_base, {});
wake_loop!(wake_native, { asm!("sti", "hlt", options(nostack, nomem)) });
wake_loop!(wake_site, { pv_safe_halt!() });
wake_loop!(wake_call, { pv_safe_halt!(call PV_OPS) });

const N: u32 = 200;
const REPS: u32 = 5;

/// The PVH benchmark's side-by-side measurement, in the kernel (a PV kernel's ring): per op in
/// hundredths, net of `base`.
fn side_by_side<const K: usize>(fs: [Loop; K], base: u64) -> [u64; K] {
    bench::side_by_side(fs, N, REPS, base, bench::Ring::Kernel).map(|c| c.unwrap_or(0))
}

/// The benchmark across the two passes.
pub struct XenBench {
    empty: u64,
    wake_base: u64,
    /// The rows.
    pub rows: Vec<Row>,
}

impl XenBench {
    /// Before patching: the native instruction and the unpatched call.
    pub fn unpatched() -> XenBench {
        let [empty] = side_by_side([for_xen::EMPTY], 0);
        let [wake] = side_by_side([wake_base], 0);
        let mut rows = Vec::new();
        for (i, (name, native, _, call)) in for_xen::CASES.iter().enumerate() {
            let [t, c] = side_by_side([*native, *call], empty);
            rows.push(Row {
                name,
                how: HOW[i],
                trapped: Some(t),
                call_unpatched: Some(c),
                site_patched: None,
                call_patched: None,
            });
        }
        let [t, c] = side_by_side([wake_native, wake_call], wake);
        rows.push(Row {
            name: "hlt-wake (safe_halt, an event pending)",
            how: HOW[4],
            trapped: Some(t),
            call_unpatched: Some(c),
            site_patched: None,
            call_patched: None,
        });
        XenBench {
            empty,
            wake_base: wake,
            rows,
        }
    }

    /// After patching: the patched site and call.
    pub fn patched(&mut self) {
        for (row, (_, _, site, call)) in self.rows.iter_mut().zip(for_xen::CASES) {
            let [s, c] = side_by_side([site, call], self.empty);
            row.site_patched = Some(s);
            row.call_patched = Some(c);
        }
        let [s, c] = side_by_side([wake_site, wake_call], self.wake_base);
        if let Some(row) = self.rows.last_mut() {
            row.site_patched = Some(s);
            row.call_patched = Some(c);
        }
    }
}
