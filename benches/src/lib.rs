//! Inputs shared by the benchmarks.

use patch_sites::table::{Form, Site};
use patch_sites::{ALL_OPS, Operand, RegSet};

/// `n` sorted, non-overlapping native sites spread over kernel text, deterministic.
pub fn synthetic_sites(n: usize) -> Vec<Site> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut addr = 0xffff_ffff_8100_0000u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            addr += 16 + (x % 512);
            let op = ALL_OPS[(x >> 32) as usize % 5]; // cli, sti, pushf, popf, hlt
            let width = if op.info().widths.allows(0) { 0 } else { 8 };
            Site {
                addr,
                site_len: 5,
                insn_len: 1,
                op_id: op.id(),
                form: Form::Native,
                operand: Operand::None,
                width,
                flags: 0,
                clobbers: RegSet::EMPTY,
                stub: None,
            }
        })
        .collect()
}
