//! The op catalogue as a human table, for `pvpatch ops`.

use std::fmt::Write;

use patch_sites::op::{Dir, Kind};
use patch_sites::{ALL_OPS, Op, RegSet};

/// One op of the catalogue, as `pvpatch ops` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpEntry {
    /// Its id in site tables.
    pub id: u16,
    /// Its name.
    pub name: &'static str,
    /// `insn`, `idiom`, `control` or `hypercall`.
    pub kind: &'static str,
    /// Its native form.
    pub native: &'static str,
    /// The registers it reads (and `operand`, if it reads its operand).
    pub reads: String,
    /// The registers it writes (and `operand`, if it writes its operand).
    pub writes: String,
    /// The registers it leaves undefined.
    pub undefined: String,
    /// What it does.
    pub effect: &'static str,
}

/// Every op, in id order.
pub fn entries() -> Vec<OpEntry> {
    ALL_OPS
        .iter()
        .map(|&op| {
            let i = op.info();
            OpEntry {
                id: op.id(),
                name: op.name(),
                kind: match i.kind {
                    Kind::Instruction => "insn",
                    Kind::Idiom => "idiom",
                    Kind::ControlTransfer => "control",
                    Kind::HypervisorInterface => "hypercall",
                },
                native: i.native,
                reads: with_operand(i.reads, i.dir == Dir::In),
                writes: with_operand(i.writes, i.dir == Dir::Out),
                undefined: with_operand(i.undefined, false),
                effect: i.effect,
            }
        })
        .collect()
}

/// One line per op: id, name, kind, native form, inputs, outputs, undefined, effect.
pub fn render() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>4}  {:<13} {:<10} {:<24} {:<22} {:<22} {:<6} effect",
        "id", "op", "kind", "native", "reads", "writes", "undef"
    );
    for e in entries() {
        let _ = writeln!(
            s,
            "{:>4}  {:<13} {:<10} {:<24} {:<22} {:<22} {:<6} {}",
            e.id, e.name, e.kind, e.native, e.reads, e.writes, e.undefined, e.effect
        );
    }
    s
}

fn with_operand(set: RegSet, operand: bool) -> String {
    let mut parts = Vec::new();
    if !set.is_empty() {
        parts.push(set.to_string());
    }
    if operand {
        parts.push("operand".to_owned());
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(",")
    }
}

/// The op named `name` or with id `name`.
pub fn lookup(name: &str) -> Option<Op> {
    Op::from_name(name).or_else(|| name.parse().ok().and_then(Op::from_id))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_op_has_a_line() {
        let r = super::render();
        assert_eq!(r.lines().count(), patch_sites::ALL_OPS.len() + 1);
        assert!(r.contains("mov_to_cr3"));
        assert_eq!(super::lookup("10"), Some(patch_sites::Op::MovToCr3));
        assert_eq!(super::lookup("wbinvd"), Some(patch_sites::Op::Wbinvd));
    }
}
