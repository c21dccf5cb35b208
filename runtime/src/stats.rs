//! What patching did, counted: sites by outcome and by op, bytes written, cycles spent.

use alloc::collections::BTreeMap;

use patch_sites::Op;

use crate::plan::{Applied, Outcome, Plan};

/// Counts of one patching run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sites in the table.
    pub sites: u32,
    /// Sites by outcome, in [`Outcome::ALL`] order.
    pub by_outcome: [u32; 6],
    /// Sites by op: (outcome counts) per op id.
    pub by_op: BTreeMap<u16, [u32; 6]>,
    /// Sites the backend wanted otherwise but that fell back to native (no room, operand).
    pub fallbacks: u32,
    /// Sites whose op this runtime does not know (left native).
    pub unknown_ops: u32,
    /// Sites written and bytes written.
    pub applied: Applied,
    /// Cycles spent validating and planning.
    pub plan_cycles: u64,
    /// Cycles spent writing, serializing and reading back.
    pub apply_cycles: u64,
}

impl Stats {
    /// The counts of a plan.
    pub fn of(plan: &Plan) -> Stats {
        let mut s = Stats {
            sites: plan.sites.len() as u32,
            ..Stats::default()
        };
        for p in &plan.sites {
            let k = Outcome::ALL
                .iter()
                .position(|o| *o == p.outcome)
                .unwrap_or(0);
            s.by_outcome[k] += 1;
            s.by_op.entry(p.site.op_id).or_default()[k] += 1;
            if p.site.op().is_none() {
                s.unknown_ops += 1;
            } else if p.keep.is_some() && p.outcome != Outcome::Unchanged {
                s.fallbacks += 1;
            }
        }
        s
    }

    /// Sites with this outcome.
    pub fn count(&self, o: Outcome) -> u32 {
        Outcome::ALL
            .iter()
            .position(|x| *x == o)
            .map_or(0, |k| self.by_outcome[k])
    }

    /// The op name of an id, for reports.
    pub fn op_name(id: u16) -> &'static str {
        Op::from_id(id).map_or("unknown", Op::name)
    }
}
