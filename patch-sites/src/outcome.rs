//! What a site becomes: the one vocabulary of the post-link tool's analysis and ledger, the
//! backends' choices, the boot-time planner, its statistics and the guest's report.
//!
//! [`crate::table::Form`] says what a site's bytes hold *before* patching (how it was emitted);
//! an [`Outcome`] says what they hold *after*: the same bytes, or one of the rewrites.

/// What a site becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Left as it is: it already holds what the backend wants, or it may not be changed.
    Unchanged,
    /// The native instruction (a site emitted as an indirect call or a trap, rewritten).
    Native,
    /// Nothing: NOPs.
    Nothing,
    /// An inline sequence, in the site's own bytes.
    Inline,
    /// `call rel32` to out-of-line code (a thunk, a ROM's entry point).
    Call,
    /// `jmp rel32` (control transfers).
    Jump,
    /// A `jmp` to a stub that holds the rewrite and the instructions moved out of the way.
    Detour,
    /// A trapping instruction whose op the runtime emulates (own kernels only).
    Trap,
}

impl Outcome {
    /// Every outcome, in this order (the order of counts indexed by [`Outcome::index`]).
    pub const ALL: [Outcome; 8] = [
        Outcome::Unchanged,
        Outcome::Native,
        Outcome::Nothing,
        Outcome::Inline,
        Outcome::Call,
        Outcome::Jump,
        Outcome::Detour,
        Outcome::Trap,
    ];

    /// Its position in [`Outcome::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name reports and the ledger use.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Native => "native",
            Outcome::Nothing => "nothing",
            Outcome::Inline => "inline",
            Outcome::Call => "call",
            Outcome::Jump => "jump",
            Outcome::Detour => "detour",
            Outcome::Trap => "trap",
        }
    }

    /// The outcome named `s`.
    pub fn from_name(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.name() == s)
    }
}

impl core::fmt::Display for Outcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_indices_are_unique_and_in_order() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
            assert_eq!(Outcome::from_name(o.name()), Some(*o));
        }
    }
}
