//! The oracle on a unit built by hand: a detour that moves a loop on `rdrand` whole, as the
//! planner may (`1: rdrand rdx; jnc 1b` after a `mov cr4, rdx`, as in Linux's
//! `sev_verify_cbit`). The hardware's random values differ from run to run; the model's draw a
//! sequence from the state, so that the reference and the rewrite see the same values.

use patch_sites::op::Operand;
use patch_sites::regs::{Gpr, RegSet};
use patch_sites::table::{Form, Site};
use pvpatch_oracle::oracle::image::{Tally, Unit};
use pvpatch_oracle::oracle::vcpu::mix;
use pvpatch_oracle::oracle::{self, Oracle, State, abstraction};
use pvpatch_runtime::detect::BackendKind;

const SITE: u64 = 0xffff_ffff_8100_0285;
const STUB: u64 = 0xffff_ffff_8107_7b10;

fn rel32(from_end: u64, to: u64) -> [u8; 4] {
    ((to as i64 - from_end as i64) as i32).to_le_bytes()
}

#[test]
fn a_moved_rdrand_loop_draws_the_same_values_in_both_runs() {
    // mov cr4, rdx; 1: rdrand rdx; jnc 1b
    let moved = [0x0f, 0x22, 0xe2, 0x48, 0x0f, 0xc7, 0xf2, 0x73, 0xfa];
    let end = SITE + moved.len() as u64;
    let mut jump = vec![0xe9];
    jump.extend_from_slice(&rel32(SITE + 5, STUB));
    jump.resize(moved.len(), 0xcc);
    // The stub: the site's copy, the loop (its `jnc` following `rdrand` into the stub, as a
    // rel32), the jump back.
    let mut stub = vec![0x0f, 0x22, 0xe2, 0x48, 0x0f, 0xc7, 0xf2, 0x0f, 0x83];
    stub.extend_from_slice(&rel32(STUB + 13, STUB + 3));
    stub.push(0xe9);
    stub.extend_from_slice(&rel32(STUB + 18, end));
    let unit = Unit {
        what: "detour of a loop on rdrand".into(),
        site: Site {
            addr: SITE,
            site_len: 3,
            insn_len: 3,
            op_id: patch_sites::op::Op::MovToCr4 as u16,
            form: Form::Movable,
            operand: Operand::Reg(Gpr::Rdx),
            width: 8,
            flags: 0,
            clobbers: RegSet::EMPTY,
            stub: Some(STUB),
        },
        borrowed_site: false,
        start: SITE,
        end,
        reference: vec![(SITE, moved.to_vec())],
        rewrite: vec![(SITE, jump), (STUB, stub)],
    };
    let abs = abstraction::of(&oracle::backend(BackendKind::OutOfLine, 0, None));
    let mut oracle = Oracle::new().unwrap();
    let mut tally = Tally::default();
    for n in 0..16u64 {
        let seed = mix(0x5244 << 16 | n);
        let gpr = std::array::from_fn(|r| mix(seed ^ (r as u64 + 1)));
        let state = State::for_site(&unit.site, gpr, mix(seed ^ 0x99), seed);
        match oracle.compare_unit(&unit, abs.as_ref(), &state).unwrap() {
            Ok((end, checked)) => tally.add(&end, checked),
            Err(d) => panic!("the moved loop diverges: {d}"),
        }
    }
    assert_eq!(tally.compared, 16);
    assert_eq!(
        tally.reached, 16,
        "every run draws a value and leaves the loop"
    );
}
