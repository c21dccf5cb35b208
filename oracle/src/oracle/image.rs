//! The oracle on a real kernel's plan: every detour and every rewrite in place that the
//! runtime's planner makes for an image, run from the image's own bytes (the moved instructions
//! and their neighbours as they are in the file) against the code they replace.
//!
//! A *unit* is what one activation of the plan replaces: a detour's moved range (the `jmp` to
//! its stub, the stub with its sites' rewrites, the trampoline, the backend's out-of-line code)
//! or one site rewritten in place (with the backend's code). The reference run executes the
//! original bytes of the range; the rewrite's run executes the same range after the plan, with
//! everything the plan placed elsewhere. Both start from the same state and end at the end of
//! the range, or where they leave it (a branch out, a return: they must leave for the same
//! address), or at the same fault; then the oracle's comparison applies (registers, flags,
//! stack, the virtual CPU's effects through the backend's abstraction, and every page of memory
//! either run reached).
//!
//! The engine runs without paging, at low physical addresses: kernel addresses are translated
//! by a constant ([`low`]), which keeps every relative branch, call and RIP-relative operand
//! pointing where it did. Memory the code reaches (per-CPU data through `gs`, globals through
//! `rip`) is mapped on demand with the same contents in both runs.

use patch_sites::table::Site;
use pvpatch_runtime::plan::Plan;

use super::engine::{End, Engine, Hypervisor, State};
use super::{Abstraction, Checked, Comparison, Difference, Divergence, Oracle, differences};

/// The start of the kernel's mapping (`__START_KERNEL_map`).
pub const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// Where it is translated to in the engine: above the oracle's own pages.
pub const LOW: u64 = 0x1000_0000;
/// How much of it can be translated (the kernel image's 1 GiB).
pub const SPAN: u64 = 0x4000_0000;

/// The engine's address for kernel address `a`, if it is in the kernel image's mapping.
pub fn low(a: u64) -> Option<u64> {
    a.checked_sub(KERNEL_MAP)
        .filter(|o| *o < SPAN)
        .map(|o| o + LOW)
}

/// One activation of a plan: what it replaces and with what.
#[derive(Clone, Debug)]
pub struct Unit {
    /// What it is, for messages (`detour 12`, `site 0x...`).
    pub what: String,
    /// The first site it rewrites (its record shapes the starting state).
    pub site: Site,
    /// `site` is not in the range: the unit is a host that carries no site (moved only to
    /// make room for trampolines), run from the state of a site it hosts. Its code calls no
    /// out-of-line code of its own.
    pub borrowed_site: bool,
    /// The range it replaces, in kernel addresses.
    pub start: u64,
    /// Its end.
    pub end: u64,
    /// The original code: the range's bytes in the image.
    pub reference: Vec<(u64, Vec<u8>)>,
    /// The rewrite: the range as the plan leaves it, and everything it placed elsewhere.
    pub rewrite: Vec<(u64, Vec<u8>)>,
}

/// Every unit of `plan`: one per detour, one per site rewritten in place outside a detour.
pub fn units(plan: &Plan) -> Vec<Unit> {
    let code: Vec<(u64, Vec<u8>)> = plan.code.iter().map(|c| (c.addr, c.new.clone())).collect();
    let mut out = Vec::new();
    let site_of = |g: u16| {
        plan.sites
            .iter()
            .find(|p| p.detour == Some(g))
            .map(|p| p.site)
    };
    let detour = |g: u16| plan.detours.iter().find(|e| e.index == g);
    for d in &plan.detours {
        // A host that carries no site (moved only to make room for trampolines) runs from the
        // state of a site whose detour it hosts: its own code has no sensitive instruction.
        let own = site_of(d.index);
        let Some(site) = own.or_else(|| {
            plan.detours
                .iter()
                .filter(|e| e.host == Some(d.index))
                .find_map(|e| site_of(e.index))
        }) else {
            continue;
        };
        let mut rewrite: Vec<(u64, Vec<u8>)> = d
            .writes()
            .map(|w| (w.addr, w.new.as_slice().to_vec()))
            .collect();
        // A hosted detour's trampoline is in its host's moved range, installed with it.
        if let Some(h) = d.host.and_then(detour) {
            rewrite.extend(h.writes().map(|w| (w.addr, w.new.as_slice().to_vec())));
        }
        rewrite.extend(code.iter().cloned());
        out.push(Unit {
            what: format!("detour {} at {:#x}", d.index, d.moved.addr),
            site,
            borrowed_site: own.is_none(),
            start: d.moved.addr,
            end: d.moved.addr + d.moved.new.len() as u64,
            reference: vec![(d.moved.addr, d.moved.old.as_slice().to_vec())],
            rewrite,
        });
    }
    for p in plan.changes() {
        let mut rewrite = vec![(p.addr, p.new.as_slice().to_vec())];
        rewrite.extend(code.iter().cloned());
        out.push(Unit {
            what: format!("site {:#x} in place", p.addr),
            site: p.site,
            borrowed_site: false,
            start: p.addr,
            end: p.addr + p.new.len() as u64,
            reference: vec![(p.addr, p.old.as_slice().to_vec())],
            rewrite,
        });
    }
    out
}

/// How a unit's runs ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Runs compared (pairs).
    pub compared: usize,
    /// Both reached the end of the range.
    pub reached: usize,
    /// Both left the range for the same address.
    pub left: usize,
    /// Both faulted with the same vector.
    pub faulted: usize,
    /// Both still ran at the step limit (a loop), with the same effects as far as both got.
    pub looped: usize,
    /// Instructions executed, both runs.
    pub steps: usize,
}

impl Tally {
    /// Adds one comparison that ended with `end`.
    pub fn add(&mut self, end: &End, checked: Checked) {
        self.compared += 1;
        self.steps += checked.steps;
        match end {
            End::Reached => self.reached += 1,
            End::Left(_) => self.left += 1,
            End::Runaway(_) => self.looped += 1,
            _ => self.faulted += 1,
        }
    }
}

/// Why a unit could not be run.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    /// Code outside the kernel image's mapping.
    #[error("{0}: code at {1:#x} is outside the kernel image's mapping")]
    OutOfRange(String, u64),
}

fn translate(code: &[(u64, Vec<u8>)], what: &str) -> Result<Vec<(u64, Vec<u8>)>, UnitError> {
    code.iter()
        .map(|(a, b)| {
            low(*a)
                .filter(|_| low(a + b.len() as u64).is_some())
                .map(|l| (l, b.clone()))
                .ok_or_else(|| UnitError::OutOfRange(what.to_owned(), *a))
        })
        .collect()
}

impl Oracle {
    /// Runs `unit`'s reference and rewrite from `state` and compares them under `abs`.
    /// Returns how they ended.
    pub fn compare_unit(
        &mut self,
        unit: &Unit,
        abs: &dyn Abstraction,
        state: &State,
    ) -> Result<Result<(End, Checked), Box<Divergence>>, UnitError> {
        let reference = translate(&unit.reference, &unit.what)?;
        let rewrite = translate(&unit.rewrite, &unit.what)?;
        let (start, end) = (
            low(unit.start).ok_or_else(|| UnitError::OutOfRange(unit.what.clone(), unit.start))?,
            low(unit.end).ok_or_else(|| UnitError::OutOfRange(unit.what.clone(), unit.end))?,
        );
        let prepared = abs.prepare(state);
        let state = prepared.as_ref().unwrap_or(state);
        let r_code: Vec<(u64, &[u8])> = reference.iter().map(|(a, b)| (*a, b.as_slice())).collect();
        let w_code: Vec<(u64, &[u8])> = rewrite.iter().map(|(a, b)| (*a, b.as_slice())).collect();
        let engine: &mut Engine = &mut self.engine;
        let r = engine.run_image(&r_code, start, end, state, Hypervisor::None);
        let mut w = engine.run_image(&w_code, start, end, state, abs.hypervisor());
        // A moved call pushes its return address as an immediate: the kernel's own, where the
        // reference's `call` pushes the translated one. The same address, either way.
        for (a, b) in r.stack.chunks_exact(8).zip(w.stack.chunks_exact_mut(8)) {
            let (ra, wb) = (
                u64::from_le_bytes(a.try_into().unwrap_or([0; 8])),
                u64::from_le_bytes((&*b).try_into().unwrap_or([0; 8])),
            );
            if ra != wb && low(wb) == Some(ra) {
                b.copy_from_slice(&ra.to_le_bytes());
            }
        }
        let what = if let (End::Runaway(_), End::Runaway(_)) = (&r.end, &w.end) {
            // Both still running (a `hlt` loop): the effects so far must agree, as far as the
            // shorter run got.
            let op = unit.site.op();
            let effects = |trace: &[super::Effect]| -> Vec<super::Effect> {
                trace
                    .iter()
                    .filter_map(|e| op.and_then(|op| abs.canonical(op, e)))
                    .collect()
            };
            let a = effects(&r.vcpu.trace);
            let b = effects(&abs.trace(&w, state));
            let n = a.len().min(b.len());
            match super::first_differing_kind(&a[..n], &b[..n]) {
                Some(kind) => vec![Difference {
                    comparison: Comparison::Effect(kind),
                    register: None,
                    detail: format!(
                        "both still running after the step limit, with different effects: \
                         native {:x?}, rewrite {:x?}",
                        &a[..n.min(8)],
                        &b[..n.min(8)]
                    ),
                }],
                None => Vec::new(),
            }
        } else {
            differences(&unit.site, abs, state, &r, &w, true, &self.off)
        };
        if what.is_empty() && matches!(r.end, End::Runaway(_)) {
            return Ok(Ok((
                r.end.clone(),
                Checked {
                    effects: r.vcpu.trace.len(),
                    steps: r.steps + w.steps,
                },
            )));
        }
        if what.is_empty() {
            Ok(Ok((
                r.end.clone(),
                Checked {
                    effects: r.vcpu.trace.len(),
                    steps: r.steps + w.steps,
                },
            )))
        } else {
            let moved = |c: &[(u64, Vec<u8>)]| {
                c.iter()
                    .find(|(a, _)| *a == unit.start)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default()
            };
            Ok(Err(Box::new(Divergence {
                backend: abs.name(),
                site: Site {
                    addr: unit.start,
                    ..unit.site
                },
                reference: moved(&unit.reference),
                rewrite: moved(&unit.rewrite),
                context: Some(unit.what.clone()),
                what,
            })))
        }
    }
}
