//! The shim's two statics that the world sees: the parameters `pvpatch annotate --boot-shim`
//! writes into the file, and the page that holds the report (and the memory map's copy that
//! keeps it from Linux).

use core::cell::UnsafeCell;

use patch_sites::shim::{PARAMS_MAGIC, PARAMS_SIZE};

/// The parameters: the magic, then zeros until pvpatch fills them in.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.params")]
static PVPATCH_SHIM_PARAMS: [u8; PARAMS_SIZE] = {
    let mut b = [0u8; PARAMS_SIZE];
    let mut i = 0;
    while i < 8 {
        b[i] = PARAMS_MAGIC[i];
        i += 1;
    }
    b
};

/// The report page.
#[repr(C, align(4096))]
pub struct Page(UnsafeCell<[u8; 4096]>);

// SAFETY: the shim is single-threaded; `page` hands out the one reference once.
unsafe impl Sync for Page {}

#[unsafe(no_mangle)]
#[unsafe(link_section = ".bss.report")]
static PVPATCH_SHIM_REPORT: Page = Page(UnsafeCell::new([0; 4096]));

/// The parameters as the file holds them. The compiler must not fold the zeros the shim was
/// built with: the reference goes through `black_box`, which it cannot see through. (A volatile
/// read of the whole array, the obvious way, compiles to one load and store per byte: under TCG
/// that one block cost about 3 million cycles to translate and run.)
pub fn params() -> &'static [u8; PARAMS_SIZE] {
    core::hint::black_box(&PVPATCH_SHIM_PARAMS)
}

/// The report page (called once, by the shim's one thread).
pub fn page() -> &'static mut [u8; 4096] {
    // SAFETY: the only reference ever made to the page; the shim is single-threaded.
    unsafe { &mut *PVPATCH_SHIM_REPORT.0.get() }
}
