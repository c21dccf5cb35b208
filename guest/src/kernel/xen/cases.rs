//! The oracle's model of Xen checked against Xen itself: the host passes cases as the second
//! module (an op, its register, the event mask and pending flag, every general register and
//! RFLAGS); the kernel runs each one through the entry point the planner would call for such a
//! site, from exactly that state, and prints what it saw afterwards (the mask, the pending
//! flag, the upcalls Xen delivered, RFLAGS and every register that changed). The host runs the
//! same case in the model and compares (`oracle/tests/real_xen.rs`).
//!
//! Module: `PVXCASE1`, a u32 count, a u32 of padding, then 144-byte records: op id (u16),
//! register (u8, 0xff none), width (u8), mask (u8), pending (u8), 2 bytes of padding, the 16
//! registers by number, RFLAGS (all little-endian). Output: one line per case,
//! `PVPATCH-CASE index mask pending upcalls rflags changed v...` (hex; `changed` a bit per
//! register number, then the new values in register order).

use core::fmt::Write;
use core::sync::atomic::Ordering;

use patch_sites::{Gpr, Op, Operand};
use pvpatch_runtime::pv::PvCode;

use super::super::console::Console;
use super::{UPCALLS, hv};

/// The module's magic.
pub const MAGIC: &[u8; 8] = b"PVXCASE1";
const RECORD: usize = 144;

#[repr(C)]
struct CaseRegs {
    gpr: [u64; 16],
    rflags: u64,
    target: u64,
}

unsafe extern "C" {
    fn xen_case_call(regs: *mut CaseRegs);
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Runs the cases of the second module, if there is one; returns how many ran.
pub fn run(si: &hv::StartInfo, code: &PvCode) -> usize {
    let (start, len) = si.module();
    if start == 0 || len < 16 {
        return 0;
    }
    // SAFETY: Xen maps the second module in the boot region at `mod_start`, `mod_len` bytes.
    let m = unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) };
    let mut con = Console::new();
    if &m[..8] != MAGIC {
        let _ = writeln!(con, "pvguest: the second module is not a case file");
        return 0;
    }
    let count = u32::from_le_bytes([m[8], m[9], m[10], m[11]]) as usize;
    let mut ran = 0;
    for (i, r) in m[16..].chunks_exact(RECORD).take(count).enumerate() {
        let op = Op::from_id(u16::from_le_bytes([r[0], r[1]]));
        let reg = Gpr::from_number(r[2]);
        let (width, mask, pending) = (r[3], r[4], r[5]);
        let operand = match (op, reg) {
            (Some(Op::Invlpg), Some(g)) => Operand::MemBase(g),
            (_, Some(g)) => Operand::Reg(g),
            _ => Operand::None,
        };
        let Some((op, target)) = op.and_then(|op| Some((op, code.entry(op, operand, width)?)))
        else {
            let _ = writeln!(con, "PVPATCH-CASE {i:x} none");
            continue;
        };
        let mut regs = CaseRegs {
            gpr: core::array::from_fn(|k| u64_at(r, 8 + 8 * k)),
            rflags: u64_at(r, 8 + 128),
            target,
        };
        let before = regs.gpr;
        hv::set_mask(mask);
        hv::set_pending(pending);
        if op == Op::SafeHalt {
            // Something must wake the halt: the timer, 200 us on.
            hv::set_timer(hv::now_ns() + 200_000);
        }
        let u0 = UPCALLS.load(Ordering::SeqCst);
        // SAFETY: `target` is an entry point generated for this kernel's vcpu_info and
        // hypercall page; it preserves everything but the op's outputs; xen_case_call keeps
        // the callee-saved registers and the stack.
        unsafe { xen_case_call(&mut regs) };
        let upcalls = UPCALLS.load(Ordering::SeqCst) - u0;
        let (mask_after, pending_after) = (hv::mask(), hv::pending());
        hv::set_timer(0);
        let changed = (0..16)
            .filter(|&k| regs.gpr[k] != before[k])
            .fold(0u16, |a, k| a | 1 << k);
        let _ = write!(
            con,
            "PVPATCH-CASE {i:x} {mask_after:x} {pending_after:x} {upcalls:x} {:x} {changed:x}",
            regs.rflags
        );
        for k in (0..16).filter(|k| changed & (1 << k) != 0) {
            let _ = write!(con, " {:x}", regs.gpr[k]);
        }
        let _ = writeln!(con);
        // Back to a clean state: nothing pending, events on.
        hv::set_pending(0);
        hv::set_mask(0);
        ran += 1;
    }
    ran
}
