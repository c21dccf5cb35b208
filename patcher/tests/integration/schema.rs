//! The JSON Schemas of the ledger (`docs/ledger.schema.json`) and of the plan
//! (`docs/plan.schema.json`): the checked-in files are what the Rust types generate
//! (`cargo xtask test-update` rewrites them), and an independent validator (the `jsonschema`
//! crate) accepts what `pvpatch scan --json` and `pvpatch plan --json` print, for the golden
//! image and for Debian's kernels, and rejects a ledger that breaks the schema.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use jsonschema::Validator;
use pvpatch_testkit::kernels::{self, KernelSpec};
use serde_json::{Value, json};

use super::golden::golden_at;

fn docs(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name)
}

fn testfile(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testfiles")
        .join(name)
}

/// A validator for the checked-in schema `name` (what consumers use), checked against its
/// meta-schema first.
fn validator(name: &str) -> Validator {
    let text = std::fs::read_to_string(docs(name)).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    if let Err(e) = jsonschema::meta::validate(&schema) {
        panic!("{name} is not a valid JSON Schema: {e}");
    }
    jsonschema::validator_for(&schema).unwrap()
}

/// Every error `validator` finds in `instance`, one a line, with where it is.
fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn assert_valid(validator: &Validator, instance: &Value, what: &str) {
    let errors = errors(validator, instance);
    assert!(
        errors.is_empty(),
        "{what} does not validate ({} errors):\n{}",
        errors.len(),
        errors[..errors.len().min(20)].join("\n")
    );
}

fn pvpatch(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Value {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pvpatch"));
    for a in args {
        c.arg(a);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "pvpatch {:?}: {}",
        c.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn golden_ledger() -> Value {
    serde_json::from_str(&std::fs::read_to_string(testfile("sample.elf.ledger.json")).unwrap())
        .unwrap()
}

#[test]
fn the_checked_in_schemas_are_golden_files_of_the_types() {
    golden_at(
        &docs("ledger.schema.json"),
        &pvpatch::schema::to_text(&pvpatch::schema::ledger()),
    );
    golden_at(
        &docs("plan.schema.json"),
        &pvpatch::schema::to_text(&pvpatch::schema::plan()),
    );
}

#[test]
fn the_golden_ledger_validates() {
    let v = validator("ledger.schema.json");
    let ledger = golden_ledger();
    assert!(!ledger["sites"].as_array().unwrap().is_empty());
    assert_valid(&v, &ledger, "sample.elf.ledger.json");
}

/// The golden ledger with one change, and where the validator must say it is wrong.
fn broken(change: impl FnOnce(&mut Value), path: &str) -> (Value, String) {
    let mut ledger = golden_ledger();
    change(&mut ledger);
    (ledger, path.to_owned())
}

#[test]
fn a_ledger_that_breaks_the_schema_is_rejected_where_it_does() {
    let v = validator("ledger.schema.json");
    let cases = [
        // An address that is not `0x` hex, or not lowercase.
        broken(
            |l| l["sites"][0]["address"] = json!("ffffffff81000000"),
            "/sites/0/address",
        ),
        broken(
            |l| l["sites"][0]["address"] = json!("0xFFFF"),
            "/sites/0/address",
        ),
        broken(
            |l| l["caves"] = json!([{ "address": "12", "length": 1 }]),
            "/caves/0/address",
        ),
        // A required field missing, at the top and in a site.
        broken(
            |l| {
                l.as_object_mut().unwrap().remove("summary");
            },
            "",
        ),
        broken(
            |l| {
                let room = l["sites"][0]["room"].as_object_mut().unwrap();
                room.remove("forms");
            },
            "/sites/0/room",
        ),
        // Another schema.
        broken(|l| l["schema"] = json!("pvpatch-ledger/1"), "/schema"),
        // A wrong type.
        broken(|l| l["sites"][0]["length"] = json!("2"), "/sites/0/length"),
        broken(
            |l| l["image"]["stock_kernel"] = json!(0),
            "/image/stock_kernel",
        ),
        broken(|l| l["sites"] = json!({}), "/sites"),
        // A value outside its set.
        broken(
            |l| l["image"]["elf_type"] = json!("core"),
            "/image/elf_type",
        ),
        broken(|l| l["sites"][0]["class"] = json!("nop"), "/sites/0/class"),
        broken(
            |l| l["sites"][0]["op"]["id"] = json!(9999),
            "/sites/0/op/id",
        ),
        broken(|l| l["sites"][0]["length"] = json!(16), "/sites/0/length"),
        broken(
            |l| l["tables"][0]["name"] = json!(".text"),
            "/tables/0/name",
        ),
        broken(|l| l["image"]["sha256"] = json!("00"), "/image/sha256"),
        broken(
            |l| l["summary"]["by_class"]["nop"] = json!(1),
            "/summary/by_class",
        ),
    ];
    for (ledger, path) in &cases {
        let errors = errors(&v, ledger);
        assert!(!errors.is_empty(), "a ledger broken at {path:?} validates");
        assert!(
            errors.iter().all(|e| e.starts_with(&format!("{path}: "))),
            "broken at {path:?}, the validator says:\n{}",
            errors.join("\n")
        );
    }
}

#[test]
fn a_ledger_with_a_field_added_validates() {
    // docs/ledger.md: fields may be added in later versions of the same schema, so a consumer
    // validating with this schema must accept them.
    let v = validator("ledger.schema.json");
    let mut ledger = golden_ledger();
    ledger["image"]["added_later"] = json!({ "any": "thing" });
    ledger["sites"][0]["added_later"] = json!(1);
    assert_valid(&v, &ledger, "the golden ledger with fields added");
}

#[test]
fn the_plans_of_the_sample_image_validate() {
    let v = validator("plan.schema.json");
    let sample = testfile("sample.elf");
    // (Not `outofline`: a kernel of our own has no arena for its code.)
    for backend in ["native", "kvm", "tcg", "vmware"] {
        let plan = pvpatch(&[&"plan", &"--json", &"--backend", &backend, &sample]);
        assert!(!plan["sites"].as_array().unwrap().is_empty());
        assert_valid(&v, &plan, &format!("the {backend} plan of sample.elf"));
    }
    let mut plan = pvpatch(&[&"plan", &"--json", &"--backend", &"kvm", &sample]);
    plan["by_outcome"]["teleport"] = json!(1);
    assert!(
        !v.is_valid(&plan),
        "a plan with an unknown outcome validates"
    );
}

/// The ledgers of a Debian kernel's vmlinux and vmlinuz (a bzImage, extracted in memory), as
/// `pvpatch scan --json` prints them, validate.
fn debian_ledgers_validate(test: &str, spec: KernelSpec) {
    let k = match kernels::cached(spec) {
        Ok(k) => k,
        Err(why) => return pvpatch_testkit::skip(test, &why),
    };
    let v = validator("ledger.schema.json");
    for (path, bzimage) in [(&k.vmlinux, false), (&k.vmlinuz, true)] {
        let ledger = pvpatch(&[&"scan", &"--json", path]);
        assert_eq!(
            ledger["image"]["extracted_from"].is_object(),
            bzimage,
            "{}: image.extracted_from",
            path.display()
        );
        let sites = ledger["sites"].as_array().unwrap().len();
        assert!(sites > 1_000, "{}: {sites} sites", path.display());
        let started = Instant::now();
        assert_valid(&v, &ledger, &path.display().to_string());
        eprintln!(
            "{test}: {} ({sites} sites, {} resyncs, {} caves) validates in {:.2?}",
            path.display(),
            ledger["resyncs"].as_array().unwrap().len(),
            ledger["caves"].as_array().unwrap().len(),
            started.elapsed()
        );
    }
}

#[test]
fn the_ledgers_of_debians_bookworm_kernel_validate() {
    debian_ledgers_validate(
        "the_ledgers_of_debians_bookworm_kernel_validate",
        kernels::BOOKWORM,
    );
}

#[test]
fn the_ledgers_of_debians_backports_kernel_validate() {
    debian_ledgers_validate(
        "the_ledgers_of_debians_backports_kernel_validate",
        kernels::BACKPORTS,
    );
}

#[test]
fn the_plans_of_debians_bookworm_kernel_validate() {
    let test = "the_plans_of_debians_bookworm_kernel_validate";
    let k = match kernels::cached(kernels::BOOKWORM) {
        Ok(k) => k,
        Err(why) => return pvpatch_testkit::skip(test, &why),
    };
    let v = validator("plan.schema.json");
    for backend in ["kvm", "outofline"] {
        let plan = pvpatch(&[&"plan", &"--json", &"--backend", &backend, &k.vmlinux]);
        let sites = plan["sites"].as_array().unwrap().len();
        assert!(sites > 1_000, "{sites} sites");
        assert_valid(
            &v,
            &plan,
            &format!("the {backend} plan of bookworm's vmlinux"),
        );
        eprintln!(
            "{test}: the {backend} plan ({sites} sites, {} detours) validates",
            plan["detours"]
        );
    }
}
