//! `cargo xtask kernel`: the Debian kernels the tests and the demo use (bookworm's 6.1 and
//! bookworm-backports' 6.12), downloaded with `apt-get download` (nothing is installed), their
//! vmlinux extracted and checked, their `System.map` taken from the `-dbg` package, all cached
//! outside the repository (see `pvpatch_testkit::kernels`).

use anyhow::Result;
use pvpatch_testkit::kernels::{self, CachedKernel};

/// Makes sure both kernels are cached; returns them.
pub fn fetch() -> Result<Vec<CachedKernel>> {
    kernels::ALL
        .iter()
        .map(|spec| {
            kernels::fetch(*spec).map_err(|e| {
                anyhow::Error::new(e).context(format!("the Debian {} kernel", spec.name))
            })
        })
        .collect()
}
