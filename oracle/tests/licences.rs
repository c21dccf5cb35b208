//! unicorn-engine is GPL-2.0: only this test-only crate (and the benchmarks) may depend on it.
//! Nothing shipped (the `pvpatch` tool, the runtime, the ABI, the guest) may reach it, directly
//! or through another crate: checked on the workspace's lock file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

#[test]
fn nothing_shipped_depends_on_unicorn() {
    let lock =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    // name -> dependency names, from the lock file's [[package]] entries.
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut name = String::new();
    let mut in_deps = false;
    for line in lock.lines() {
        let l = line.trim();
        if l == "[[package]]" {
            in_deps = false;
        } else if let Some(n) = l.strip_prefix("name = ") {
            name = n.trim_matches('"').to_owned();
            deps.entry(name.clone()).or_default();
        } else if l.starts_with("dependencies = [") {
            in_deps = true;
        } else if in_deps && l == "]" {
            in_deps = false;
        } else if in_deps {
            let d = l.trim_matches(|c| c == '"' || c == ',');
            let d = d.split(' ').next().unwrap().to_owned();
            deps.get_mut(&name).unwrap().push(d);
        }
    }
    assert!(
        deps.contains_key("unicorn-engine"),
        "the lock file was read"
    );
    for shipped in [
        "pvpatch",
        "pvpatch-runtime",
        "patch-sites",
        "pvguest",
        "xtask",
    ] {
        let mut seen = BTreeSet::new();
        let mut todo = vec![shipped.to_owned()];
        while let Some(p) = todo.pop() {
            if seen.insert(p.clone()) {
                todo.extend(deps.get(&p).into_iter().flatten().cloned());
            }
        }
        assert!(deps.contains_key(shipped), "{shipped} is in the lock file");
        assert!(
            !seen.contains("unicorn-engine") && !seen.contains("pvpatch-oracle"),
            "{shipped} reaches the GPL-2.0 unicorn-engine"
        );
    }
}
