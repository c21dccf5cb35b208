//! The JSON Schemas of what `pvpatch` prints for programs: the ledger (`scan --json`,
//! `docs/ledger.schema.json`) and the plan (`plan --json`, `docs/plan.schema.json`).
//!
//! Both are derived from the Rust types that are serialised (`schemars`, describing what is
//! *written*: every field the JSON always has is required), so they cannot drift from the
//! output; the checked-in files are compared with [`ledger`] and [`plan`] by the tests
//! (`cargo xtask test-update` rewrites them). The string fields that take a value from a fixed
//! set (an op's name, a register, a table, an outcome) have that set as their `enum`, taken
//! from the same catalogue the ledger names them from; addresses, digests and bytes have a
//! `pattern`.
//!
//! Objects do not forbid other properties: a later version of the same schema may add fields
//! (`docs/ledger.md`), and a consumer checking a ledger against this schema must accept them.

use std::borrow::Cow;

use patch_sites::{ALL_OPS, Gpr, Outcome};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Value, json};

use crate::ledger::{LEDGER_SCHEMA, Ledger};
use crate::linux::TableKind;
use crate::rewrite::{PLAN_SCHEMA, PlanLedger};

/// The ledger's JSON Schema (`docs/ledger.schema.json`).
pub fn ledger() -> Value {
    root::<Ledger<'static>>(
        LEDGER_SCHEMA,
        "The ledger `pvpatch scan --json` prints: what a scan found in one x86-64 kernel image \
         (docs/ledger.md).",
    )
}

/// The plan's JSON Schema (`docs/plan.schema.json`).
pub fn plan() -> Value {
    root::<PlanLedger>(
        PLAN_SCHEMA,
        "The plan `pvpatch plan --json` prints: what one backend would make of every site of an \
         image's table.",
    )
}

/// `schema` as the checked-in file holds it: pretty, keys sorted, one trailing newline.
pub fn to_text(schema: &Value) -> String {
    let mut sorted = schema.clone();
    sort_keys(&mut sorted);
    // Serialising a `Value` cannot fail: its keys are strings.
    let mut text = serde_json::to_string_pretty(&sorted).unwrap_or_default();
    text.push('\n');
    text
}

/// The same text whichever order `serde_json` keeps keys in (its `preserve_order` feature may
/// be turned on by another crate of a build).
fn sort_keys(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.sort_keys();
            m.values_mut().for_each(sort_keys);
        }
        Value::Array(a) => a.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

fn root<T: JsonSchema>(name: &str, description: &str) -> Value {
    let generator = SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>();
    schema.insert("title".into(), name.into());
    schema.insert("description".into(), description.into());
    let mut schema = schema.to_value();
    tidy_descriptions(&mut schema);
    schema
}

/// The descriptions (the types' doc comments) as prose: a doc comment's lines joined (its
/// paragraphs kept), its links to Rust items shown as code.
fn tidy_descriptions(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(d)) = m.get_mut("description") {
                let paragraphs: Vec<String> =
                    d.split("\n\n").map(|p| p.replace('\n', " ")).collect();
                *d = paragraphs
                    .join("\n\n")
                    .replace("[`", "`")
                    .replace("`]", "`");
            }
            m.values_mut().for_each(tidy_descriptions);
        }
        Value::Array(a) => a.iter_mut().for_each(tidy_descriptions),
        _ => {}
    }
}

/// A schema from a JSON object (every literal below is one).
fn object(v: Value) -> Schema {
    match v {
        Value::Object(m) => m.into(),
        _ => Schema::default(),
    }
}

/// A string that is one of `values`.
fn one_of<'a>(description: &str, values: impl IntoIterator<Item = &'a str>) -> Schema {
    let values: Vec<&str> = values.into_iter().collect();
    object(json!({ "type": "string", "enum": values, "description": description }))
}

/// A string matching `pattern`.
fn matching(description: &str, pattern: &str) -> Schema {
    object(json!({ "type": "string", "pattern": pattern, "description": description }))
}

/// Types that stand for the schema of a field serialised as a plain string or number, used with
/// `#[schemars(with = "...")]`; each is one definition (`$defs`) of the schema.
macro_rules! described {
    ($( $(#[$doc:meta])* $name:ident => $schema:expr; )*) => {$(
        $(#[$doc])*
        pub(crate) enum $name {}

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                $schema
            }
        }
    )*};
}

described! {
    /// `0x`-prefixed lowercase hex ([`crate::ledger::hex`]).
    Address => matching(
        "An address (or a port): `0x`-prefixed lowercase hex, no padding.",
        "^0x[0-9a-f]+$",
    );
    /// A SHA-256, as hex.
    Sha256Hex => matching("A SHA-256: 64 lowercase hex digits.", "^[0-9a-f]{64}$");
    /// Bytes, as hex.
    HexBytes => matching("Bytes, two lowercase hex digits each.", "^([0-9a-f]{2})*$");
    /// An op's name.
    OpName => one_of(
        "The name of an op of the catalogue (docs/abi.md).",
        ALL_OPS.iter().map(|o| o.name()),
    );
    /// An op's stable id.
    OpId => object(json!({
        "type": "integer",
        "enum": ALL_OPS.iter().map(|o| o.id()).collect::<Vec<u16>>(),
        "description": "The stable id of an op of the catalogue (docs/abi.md).",
    }));
    /// A general-purpose register's name.
    RegName => one_of(
        "A general-purpose register, by its 64-bit name.",
        Gpr::ALL.iter().map(|r| r.name()),
    );
    /// A Linux table's section name.
    TableName => one_of(
        "One of Linux's tables, by its section name.",
        TableKind::ALL.iter().map(|t| t.section()),
    );
    /// An outcome's name.
    OutcomeName => one_of(
        "What a site becomes (`patch_sites::Outcome`).",
        Outcome::ALL.iter().map(|o| o.name()),
    );
    /// An op's name, or `unknown`.
    PlannedOpName => one_of(
        "The name of an op of the catalogue, or `unknown` for an op this pvpatch does not know.",
        ALL_OPS.iter().map(|o| o.name()).chain(["unknown"]),
    );
    /// A bzImage payload's compression.
    Compression => one_of(
        "The compression of a bzImage's payload.",
        crate::load::bzimage::COMPRESSIONS,
    );
    /// How a table was found.
    FoundBy => one_of(
        "How a table was found: by its section header, or by its `__start_`/`__stop_` symbols.",
        [crate::linux::FOUND_BY_SECTION, crate::linux::FOUND_BY_SYMBOLS],
    );
    /// The arena: an address and its size.
    Arena => matching(
        "The arena's address and size: `0x... (N bytes)`.",
        r"^0x[0-9a-f]+ \([0-9]+ bytes\)$",
    );
}

/// A count per op class (`summary.by_class`).
pub(crate) enum ClassCounts {}

impl JsonSchema for ClassCounts {
    fn schema_name() -> Cow<'static, str> {
        "ClassCounts".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        object(json!({
            "type": "object",
            "description": "Sites per class (an op's name).",
            "propertyNames": generator.subschema_for::<OpName>(),
            "additionalProperties": generator.subschema_for::<usize>(),
        }))
    }
}

/// A count per outcome (`by_outcome` of a plan).
pub(crate) enum OutcomeCounts {}

impl JsonSchema for OutcomeCounts {
    fn schema_name() -> Cow<'static, str> {
        "OutcomeCounts".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let names: Vec<&str> = Outcome::ALL.iter().map(|o| o.name()).collect();
        object(json!({
            "type": "object",
            "description": "Sites per outcome: every outcome, 0 when none.",
            "propertyNames": generator.subschema_for::<OutcomeName>(),
            "required": names,
            "additionalProperties": generator.subschema_for::<u32>(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schemas_are_objects_with_a_title() {
        for (s, name) in [(ledger(), LEDGER_SCHEMA), (plan(), PLAN_SCHEMA)] {
            assert_eq!(s["title"], name);
            assert_eq!(s["properties"]["schema"]["const"], name);
            assert!(to_text(&s).ends_with("}\n"));
        }
    }

    #[test]
    fn descriptions_are_prose() {
        let mut v = json!({ "description": "See [`Foo::bar`]: one\nline.\n\nAnother.", "x": [
            { "description": "a\nb" }
        ] });
        tidy_descriptions(&mut v);
        assert_eq!(v["description"], "See `Foo::bar`: one line.\n\nAnother.");
        assert_eq!(v["x"][0]["description"], "a b");
    }

    #[test]
    fn every_compression_a_bzimage_can_have_is_in_the_list() {
        let magics: [&[u8]; 6] = [
            &[0x1f, 0x8b, 0],
            &[0x1f, 0x9e, 0],
            &[0xfd, b'7', b'z', b'X', b'Z', 0x00],
            &[0x28, 0xb5, 0x2f, 0xfd],
            &[0x02, 0x21, 0x4c, 0x18],
            &[0x5d, 0x00, 0x00],
        ];
        for m in magics {
            let c = crate::load::bzimage::compression(m).unwrap();
            assert!(crate::load::bzimage::COMPRESSIONS.contains(&c), "{c}");
        }
    }

    #[test]
    fn the_enums_serialise_as_their_names() {
        use crate::analyse::Direction;
        use crate::load::SymbolSource;
        let name = |v: Value| v.as_str().unwrap().to_owned();
        for d in [Direction::Forward, Direction::Backward, Direction::Around] {
            assert_eq!(name(serde_json::to_value(d).unwrap()), d.name());
        }
        for s in [
            SymbolSource::Symtab,
            SymbolSource::Kallsyms,
            SymbolSource::None,
        ] {
            assert_eq!(name(serde_json::to_value(s).unwrap()), s.name());
        }
    }

    #[test]
    fn the_ledgers_enums_are_written_as_docs_ledger_md_says() {
        // The names pvpatch-ledger/2 has always written.
        use crate::ledger::{ElfType, operand_kind};
        use crate::sweep::ResyncReason;
        use patch_sites::Operand;
        let written = |v: Value| v.as_str().unwrap().to_owned();
        for (r, expected) in [
            (ResyncReason::Undecodable, "undecodable"),
            (ResyncReason::CrossedKnownStart, "crossed_known_start"),
        ] {
            assert_eq!(written(serde_json::to_value(r).unwrap()), expected);
        }
        for (t, expected) in [(ElfType::Exec, "exec"), (ElfType::Dyn, "dyn")] {
            assert_eq!(written(serde_json::to_value(t).unwrap()), expected);
        }
        let kinds = [
            (Operand::None, "none"),
            (Operand::Reg(Gpr::Rax), "reg"),
            (Operand::PortImm(0x70), "port_imm"),
            (Operand::PortDx, "port_dx"),
            (Operand::MemBase(Gpr::Rdi), "mem_base"),
            (Operand::MemOther, "mem_other"),
            (
                Operand::DebugReg {
                    dr: 7,
                    reg: Gpr::Rax,
                },
                "debug_reg",
            ),
            (
                Operand::RegMemBase {
                    reg: Gpr::Rax,
                    base: Gpr::Rbx,
                },
                "reg_mem_base",
            ),
        ];
        for (o, expected) in kinds {
            assert_eq!(
                written(serde_json::to_value(operand_kind(o)).unwrap()),
                expected
            );
        }
    }

    #[test]
    fn the_text_is_sorted() {
        let t = to_text(&json!({ "b": { "d": 1, "c": [{ "f": 0, "e": 0 }] }, "a": 0 }));
        assert_eq!(
            t.replace([' ', '\n'], ""),
            r#"{"a":0,"b":{"c":[{"e":0,"f":0}],"d":1}}"#
        );
    }
}
