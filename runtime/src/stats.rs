//! What patching did, counted: sites by outcome, by op and by the form they were emitted in,
//! bytes written, cycles spent.

use alloc::collections::BTreeMap;

use patch_sites::table::Form;
use patch_sites::{Op, Outcome};

use crate::apply::Applied;
use crate::plan::{Keep, Plan};

/// Counts by outcome, indexed by [`Outcome::index`].
pub type ByOutcome = [u32; Outcome::ALL.len()];

/// The site forms, in the order of [`Stats::by_form`].
pub const FORMS: [Form; 4] = [Form::Native, Form::IndirectCall, Form::Detour, Form::Trap];

/// Counts of one patching run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sites in the table.
    pub sites: u32,
    /// Sites by outcome, in [`Outcome::ALL`] order.
    pub by_outcome: ByOutcome,
    /// Sites by op: (outcome counts) per op id.
    pub by_op: BTreeMap<u16, ByOutcome>,
    /// Sites by the form they were emitted in ([`FORMS`] order): outcome counts.
    pub by_form: [ByOutcome; 4],
    /// Sites the backend wanted otherwise but that stayed or became native (no room, operand,
    /// clobbers, no encoding).
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
            let k = p.outcome.index();
            s.by_outcome[k] += 1;
            s.by_op.entry(p.site.op_id).or_default()[k] += 1;
            if let Some(f) = FORMS.iter().position(|f| *f == p.site.form) {
                s.by_form[f][k] += 1;
            }
            match p.keep {
                Some(Keep::UnknownOp) => s.unknown_ops += 1,
                Some(Keep::AlreadyThere | Keep::NotRewritable) | None => {}
                Some(_) => s.fallbacks += 1,
            }
        }
        s
    }

    /// Sites with this outcome.
    pub fn count(&self, o: Outcome) -> u32 {
        self.by_outcome[o.index()]
    }

    /// The op name of an id, for reports.
    pub fn op_name(id: u16) -> &'static str {
        Op::from_id(id).map_or("unknown", Op::name)
    }
}
