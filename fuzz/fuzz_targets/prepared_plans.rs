//! Arbitrary bytes as the boot shim's prepared plans: reading never panics; of a blob that
//! reads, every plan the directory names is either refused or whole (its changes all there,
//! each as long in old bytes as in new), and the plan `find` returns serves what was asked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patch_sites::prepared::Plans;

fuzz_target!(|data: &[u8]| {
    let Ok(plans) = Plans::read(data) else {
        return;
    };
    let _ = plans.matches_table(data);
    for entry in plans.entries() {
        let Ok(plan) = plans.plan(&entry) else {
            continue;
        };
        let mut n = 0;
        for c in plan.changes() {
            assert_eq!(c.old.len(), c.new.len());
            n += 1;
        }
        assert_eq!(n, plan.len(), "every change of an accepted plan is readable");
        let s = entry.summary;
        let asked = s.features_value;
        if let Some(found) = plans.find(s.backend(), asked) {
            assert!(found.summary.serves(s.backend(), asked));
        }
    }
});
