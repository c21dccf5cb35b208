//! The oracle on Debian's own kernels: every detour and every in-place rewrite that the
//! runtime's planner makes for 6.1 and 6.12, for the KVM backend (port-0x80 delays become
//! nothing) and the out-of-line test backend (every rewritable site a call to a thunk running
//! its native instruction, every detour taken), run from the image's own bytes against the
//! code it replaces, from several random states each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pvpatch::load::Image;
use pvpatch::rewrite::{BackendSpec, plan_image};
use pvpatch::scan_image;
use pvpatch_oracle::oracle::image::{self, Tally};
use pvpatch_oracle::oracle::vcpu::mix;
use pvpatch_oracle::oracle::{self, Oracle, State, abstraction};
use pvpatch_runtime::detect::{BackendKind, KVM_FEATURE_NOP_IO_DELAY};
use pvpatch_testkit::kernels::{self, KernelSpec};

/// Random states a unit is run from.
const STATES: u64 = 4;

fn every_unit_is_equivalent(spec: KernelSpec, backend: &str) {
    let test = format!("every_unit_is_equivalent_{}_{backend}", spec.name);
    let k = match kernels::cached(spec) {
        Ok(k) => k,
        Err(why) => return pvpatch_testkit::skip(&test, &why),
    };
    let img = Image::open(&k.vmlinux).unwrap();
    let report = scan_image(&img, Default::default(), None);
    let planned = plan_image(&report, &BackendSpec::new(backend, None).unwrap()).unwrap();
    let (kind, features) = match backend {
        "kvm" => (BackendKind::Kvm, KVM_FEATURE_NOP_IO_DELAY),
        _ => (BackendKind::OutOfLine, 0),
    };
    let abs = abstraction::of(&oracle::backend(kind, features, None));
    let units = image::units(&planned.plan);
    let in_place = planned
        .plan
        .sites
        .iter()
        .filter(|p| p.detour.is_none() && p.new != p.old)
        .count();
    assert_eq!(units.len(), planned.plan.detours.len() + in_place);
    assert!(
        !units.is_empty(),
        "{}: nothing planned for {backend}",
        k.package
    );
    let mut oracle = Oracle::new().unwrap();
    let mut tally = Tally::default();
    let mut divergences = Vec::new();
    for (i, unit) in units.iter().enumerate() {
        for n in 0..STATES {
            let seed = mix((i as u64) << 8 | n);
            let gpr = std::array::from_fn(|r| mix(seed ^ (r as u64 + 1)));
            let state = State::for_site(&unit.site, gpr, mix(seed ^ 0x99), seed);
            match oracle.compare_unit(unit, abs.as_ref(), &state).unwrap() {
                Ok((end, checked)) => tally.add(&end, checked),
                Err(d) => divergences.push(d),
            }
        }
    }
    let mut kinds = std::collections::BTreeMap::new();
    for d in &divergences {
        let key: Vec<String> = d
            .what
            .iter()
            .map(|w| {
                format!(
                    "{:?}: {}",
                    w.comparison,
                    w.detail.chars().take(60).collect::<String>()
                )
            })
            .collect();
        *kinds
            .entry(format!("{} {key:?}", d.site.op().map_or("?", |o| o.name())))
            .or_insert(0) += 1;
    }
    for (k, n) in &kinds {
        eprintln!("{n:>5} {k}");
    }
    for d in divergences.iter().take(3) {
        eprintln!("{d}");
    }
    assert!(
        divergences.is_empty(),
        "{} for {backend}: {} of {} runs diverge",
        k.package,
        divergences.len(),
        units.len() as u64 * STATES
    );
    // Not vacuous: with the backend's out-of-line code made to do nothing (every byte `ret`),
    // the comparison must see the difference in nearly every unit that calls it (a host that
    // carries no site calls nothing of its own: it is not one).
    if !planned.plan.code.is_empty() {
        let mut caught = 0;
        let tried: Vec<_> = units
            .iter()
            .filter(|u| !u.borrowed_site)
            .take(200)
            .collect();
        for (i, unit) in tried.iter().enumerate() {
            let mut broken = (*unit).clone();
            for (a, b) in &mut broken.rewrite {
                if planned.plan.code.iter().any(|c| c.addr == *a) {
                    b.iter_mut().for_each(|x| *x = 0xc3);
                }
            }
            let seed = mix(i as u64 ^ 0xbad);
            let gpr = std::array::from_fn(|r| mix(seed ^ (r as u64 + 1)));
            let state = State::for_site(&unit.site, gpr, mix(seed ^ 0x99), seed);
            if oracle
                .compare_unit(&broken, abs.as_ref(), &state)
                .unwrap()
                .is_err()
            {
                caught += 1;
            }
        }
        assert!(
            caught * 10 >= tried.len() * 9,
            "{}: only {caught} of {} units with empty thunks diverge",
            k.package,
            tried.len()
        );
        eprintln!(
            "{}: with empty thunks, {caught} of {} units diverge",
            k.package,
            tried.len()
        );
    }
    // Most runs must get through their range: a comparison of two faults checks little.
    assert!(
        tally.reached + tally.left >= tally.compared * 3 / 4,
        "{}: {tally:?}",
        k.package
    );
    eprintln!(
        "{} for {backend}: {} units ({} detours, {in_place} in place) x {STATES} states: {} \
         runs equal ({} reached the end, {} left for the same address, {} faulted alike, {} \
         looped alike), {} instructions",
        k.package,
        units.len(),
        planned.plan.detours.len(),
        tally.compared,
        tally.reached,
        tally.left,
        tally.faulted,
        tally.looped,
        tally.steps
    );
}

#[test]
fn every_unit_of_6_1_for_kvm_is_equivalent() {
    every_unit_is_equivalent(kernels::BOOKWORM, "kvm");
}

#[test]
fn every_unit_of_6_12_for_kvm_is_equivalent() {
    every_unit_is_equivalent(kernels::BACKPORTS, "kvm");
}

#[test]
fn every_unit_of_6_1_out_of_line_is_equivalent() {
    every_unit_is_equivalent(kernels::BOOKWORM, "outofline");
}

#[test]
fn every_unit_of_6_12_out_of_line_is_equivalent() {
    every_unit_is_equivalent(kernels::BACKPORTS, "outofline");
}
