//! The Debian kernels the integration tests share, each loaded once.

use std::sync::OnceLock;

use pvpatch::load::Image;
use pvpatch_testkit::kernels::{self, CachedKernel, KernelSpec};

/// The cached kernel `spec` and its image, or `None` (with the skip recorded) if it is not
/// cached.
pub fn loaded(test: &str, spec: KernelSpec) -> Option<&'static (CachedKernel, Image)> {
    static K61: OnceLock<Result<(CachedKernel, Image), String>> = OnceLock::new();
    static K612: OnceLock<Result<(CachedKernel, Image), String>> = OnceLock::new();
    let cell = if spec == kernels::BOOKWORM {
        &K61
    } else {
        &K612
    };
    let r = cell.get_or_init(|| {
        let k = kernels::cached(spec)?;
        let img = Image::open(&k.vmlinux).map_err(|e| e.to_string())?;
        Ok((k, img))
    });
    match r {
        Ok(v) => Some(v),
        Err(why) => {
            pvpatch_testkit::skip(test, why);
            None
        }
    }
}
