//! The PV path of the guest's small paging layer: a PV kernel never writes a live page table
//! itself. Tables it builds are filled while still ordinary pages, then remapped read-only
//! (`update_va_mapping`) before Xen takes them as tables (`MMUEXT_PIN_L4_TABLE` validates a
//! whole tree); an entry of a live table is changed with `mmu_update`, addressed by the
//! machine address of the entry. Frames are machine frames: the p2m list maps this kernel's
//! pseudo-physical pages to them. Switching roots is the `mov cr3` patch site's business (the
//! Xen backend's `MMUEXT_NEW_BASEPTR`), not this module's.

use alloc::format;
use alloc::string::String;

use super::hv;
use super::selftest::check;

#[repr(C, align(4096))]
struct Pages([[u64; 512]; 9]);
/// Page tables and data pages of the CR3 and invlpg tests: L4b, L3a, L2a, L1a, L3b, L2b, L1b,
/// X, Y.
static mut PAGES: Pages = Pages([[0; 512]; 9]);
/// The probe address: L4 slot 1 (nothing of the boot address space is there).
pub const PROBE: u64 = 0x80_0000_0000;
/// What the page the second root maps at the probe holds.
pub const X: u64 = 0x5858_5858_5858_5858;
/// What the page the boot root maps at the probe holds.
pub const Y: u64 = 0x5959_5959_5959_5959;

/// The address of page `i` of the tests' pages.
pub fn page(i: usize) -> u64 {
    // SAFETY: taking the address of one of the static pages.
    unsafe { (&raw mut PAGES.0[i]) as u64 }
}

pub fn read_probe() -> u64 {
    // SAFETY: the probe address is mapped (to X or Y) in whichever root is current when the
    // tests read it.
    unsafe { core::ptr::read_volatile(PROBE as *const u64) }
}

/// The two address spaces: the boot root gains L4[1] -> L3a -> L2a -> L1a -> Y; a second root
/// (a copy of the boot root's entries) has L4[1] -> L3b -> L2b -> L1b -> X. Returns the
/// second root's machine address and L1a's.
pub fn build_roots(boot_l4: u64) -> Result<(u64, u64), String> {
    let [l4b, l3a, l2a, l1a, l3b, l2b, l1b, x, y] = core::array::from_fn(page);
    let entry = |va: u64, flags: u64| hv::mfn(va) << 12 | flags;
    // SAFETY: the pages are this test's own and still writable (mapped as Xen built the
    // boot region); the boot L4 is mapped read-only and only read here.
    unsafe {
        let w = |va: u64, i: usize, v: u64| core::ptr::write_volatile((va as *mut u64).add(i), v);
        for i in 0..512 {
            w(x, i, X);
            w(y, i, Y);
            w(
                l4b,
                i,
                core::ptr::read_volatile((boot_l4 as *const u64).add(i)),
            );
        }
        w(l4b, 1, entry(l3b, hv::PTE_TABLE));
        w(l3b, 0, entry(l2b, hv::PTE_TABLE));
        w(l2b, 0, entry(l1b, hv::PTE_TABLE));
        w(l1b, 0, entry(x, hv::PTE_RW));
        w(l3a, 0, entry(l2a, hv::PTE_TABLE));
        w(l2a, 0, entry(l1a, hv::PTE_TABLE));
        w(l1a, 0, entry(y, hv::PTE_RW));
    }
    // Page-table pages must be mapped read-only everywhere before Xen takes them as tables.
    for t in [l4b, l3a, l2a, l1a, l3b, l2b, l1b] {
        let rc = hv::update_va_mapping(t, entry(t, hv::PTE_RO));
        check(rc == 0, || format!("remapping a table read-only: {rc}"))?;
    }
    let rc = hv::mmuext(hv::MMUEXT_PIN_L4_TABLE, hv::mfn(l4b));
    check(rc == 0, || format!("pinning the second root: {rc}"))?;
    let rc = hv::mmu_update(hv::mfn(boot_l4) << 12 | 8, entry(l3a, hv::PTE_TABLE));
    check(rc == 0, || {
        format!("mmu_update of the boot root's slot 1: {rc}")
    })?;
    Ok((hv::mfn(l4b) << 12, hv::mfn(l1a) << 12))
}
