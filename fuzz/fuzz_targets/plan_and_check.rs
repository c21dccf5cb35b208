//! Arbitrary code bytes -> scan -> plan for every built-in backend (and as traps) -> the
//! equivalence oracle: every rewrite the planner makes of a site the post-link tool finds
//! behaves like the instruction it replaces.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use pvpatch_oracle::oracle::Oracle;

thread_local! {
    static ORACLE: RefCell<Oracle> = RefCell::new(Oracle::new().expect("unicorn"));
}

fuzz_target!(|data: &[u8]| {
    ORACLE.with(|o| {
        if let Err(e) = pvpatch_oracle::targets::plan_and_check(data, &mut o.borrow_mut()) {
            panic!("{e}");
        }
    });
});
