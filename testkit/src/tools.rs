//! Reference tools that no one here wrote, installed by `cargo xtask setup` into the cache (never
//! into the system): the tests compare the project's own readers with them.
//!
//! * `vmlinux-to-elf` (PyPI), whose `kallsyms-finder` prints the kallsyms of a `vmlinux` as
//!   `address type name` lines: the reference for `pvpatch::load::kallsyms`.

use std::path::PathBuf;

use crate::kernels::cache_dir;

/// The version of vmlinux-to-elf the tests were written against.
pub const VMLINUX_TO_ELF: &str = "vmlinux-to-elf==1.4.0";

/// The Python environment the reference tools live in.
pub fn venv() -> PathBuf {
    cache_dir().join("venv")
}

/// vmlinux-to-elf's `kallsyms-finder`, or why it is not there.
pub fn kallsyms_finder() -> Result<PathBuf, String> {
    let p = venv().join("bin/kallsyms-finder");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing (`cargo xtask setup` installs {VMLINUX_TO_ELF} there)",
            p.display()
        ))
    }
}
