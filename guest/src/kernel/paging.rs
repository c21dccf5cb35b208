//! The kernel's own page tables: the low 4 GiB identity-mapped with 2 MiB pages, except the
//! first 2 MiB, mapped with 4 KiB pages so that the kernel's text is read-only; a writable,
//! non-executable alias of those 2 MiB at [`ALIAS_BASE`], through which the text poker writes
//! (as Linux's `text_poke` writes through a temporary mapping: the text itself is never
//! writable, and CR0.WP stays set); and one 4 KiB test page whose mapping the `invlpg`
//! self-test changes. Installed through annotated `mov cr3` and `mov cr0` sites.
//!
//! A second root ([`second_root`]) maps everything the same but the test page, which it maps
//! to a third backing page: the CR3 self-test switches to it and sees the other page.

use core::cell::UnsafeCell;

use patch_sites::{pv_read_cr, pv_write_cr};

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// Where the writable alias of the first 2 MiB (the kernel's text among them) starts: PML4
/// slot 1, 512 GiB.
pub const ALIAS_BASE: u64 = 1 << 39;
/// How much the alias covers.
pub const ALIAS_LEN: u64 = 2 << 20;

/// The virtual address of the test page.
pub const TEST_VA: u64 = 0x4000_0000;

#[repr(C, align(4096))]
struct Page([u64; 512]);

#[repr(C, align(4096))]
struct Tables {
    pml4: Page,
    pdpt: Page,
    pd: [Page; 4],
    low: Page,
    alias_pdpt: Page,
    alias_pd: Page,
    alias_pt: Page,
    test: Page,
    data_a: Page,
    data_b: Page,
    pml4_b: Page,
    pdpt_b: Page,
    pd1_b: Page,
    test_b: Page,
    data_c: Page,
}

struct Cell(UnsafeCell<Tables>);

// SAFETY: written by `init` and `map_test_page` on the only CPU; the MMU reads them.
unsafe impl Sync for Cell {}

const EMPTY: Page = Page([0; 512]);
static T: Cell = Cell(UnsafeCell::new(Tables {
    pml4: EMPTY,
    pdpt: EMPTY,
    pd: [EMPTY, EMPTY, EMPTY, EMPTY],
    low: EMPTY,
    alias_pdpt: EMPTY,
    alias_pd: EMPTY,
    alias_pt: EMPTY,
    test: EMPTY,
    data_a: EMPTY,
    data_b: EMPTY,
    pml4_b: EMPTY,
    pdpt_b: EMPTY,
    pd1_b: EMPTY,
    test_b: EMPTY,
    data_c: EMPTY,
}));

unsafe extern "C" {
    static __text_start: u8;
    static __text_end: u8;
}

/// Builds and installs the tables, and sets CR0.WP so that read-only text is read-only in the
/// kernel too.
pub fn init() {
    let t = T.0.get();
    // SAFETY: boot, one CPU; the tables identity-map everything the kernel uses (text, data,
    // stacks, the APIC page), so switching CR3 to them keeps the kernel running.
    unsafe {
        let addr = |p: *const Page| p as u64;
        (*t).pml4.0[0] = addr(&raw const (*t).pdpt) | P | W | U;
        for g in 0..4 {
            (*t).pdpt.0[g] = addr(&raw const (*t).pd[g]) | P | W | U;
            for e in 0..512 {
                let pa = ((g as u64) << 30) | ((e as u64) << 21);
                (*t).pd[g].0[e] = pa | P | W | U | PS;
            }
        }
        let (ts, te) = (
            &__text_start as *const u8 as u64,
            &__text_end as *const u8 as u64,
        );
        for e in 0..512u64 {
            let pa = e << 12;
            let text = pa + 4096 > ts && pa < te;
            (*t).low.0[e as usize] = pa | P | U | if text { 0 } else { W };
        }
        (*t).pd[0].0[0] = addr(&raw const (*t).low) | P | W | U;
        // The alias: supervisor-only, writable, never executable.
        for e in 0..512u64 {
            (*t).alias_pt.0[e as usize] = (e << 12) | P | W | NX;
        }
        (*t).alias_pd.0[0] = addr(&raw const (*t).alias_pt) | P | W;
        (*t).alias_pdpt.0[0] = addr(&raw const (*t).alias_pd) | P | W;
        (*t).pml4.0[1] = addr(&raw const (*t).alias_pdpt) | P | W;
        if te > ALIAS_LEN {
            panic!("the kernel's text ends at {te:#x}, beyond the 2 MiB its alias covers");
        }
        // The test page: its own page table at 1 GiB.
        (*t).test.0[0] = addr(&raw const (*t).data_a) | P | W;
        (*t).pd[1].0[0] = addr(&raw const (*t).test) | P | W | U;
        (*t).data_a.0[0] = TEST_WORDS[0];
        (*t).data_b.0[0] = TEST_WORDS[1];
        // The second root: the same tables but for the path to the test page, which ends at
        // the third backing page.
        (*t).pml4_b.0 = (*t).pml4.0;
        (*t).pdpt_b.0 = (*t).pdpt.0;
        (*t).pd1_b.0 = (*t).pd[1].0;
        (*t).test_b.0[0] = addr(&raw const (*t).data_c) | P | W;
        (*t).pd1_b.0[0] = addr(&raw const (*t).test_b) | P | W | U;
        (*t).pdpt_b.0[1] = addr(&raw const (*t).pd1_b) | P | W | U;
        (*t).pml4_b.0[0] = addr(&raw const (*t).pdpt_b) | P | W | U;
        (*t).data_c.0[0] = SECOND_ROOT_WORD;
        pv_write_cr!(3, addr(&raw const (*t).pml4));
        let cr0 = pv_read_cr!(0);
        pv_write_cr!(0, cr0 | (1 << 16));
    }
}

/// Maps the test page to its first (`false`) or second (`true`) backing page, without
/// flushing the TLB (the self-test does that with `invlpg`).
pub fn map_test_page(second: bool) {
    let t = T.0.get();
    // SAFETY: changes one PTE of the test page table, which maps nothing else.
    unsafe {
        let target = if second {
            &raw const (*t).data_b
        } else {
            &raw const (*t).data_a
        };
        core::ptr::write_volatile(&raw mut (*t).test.0[0], target as u64 | P | W);
    }
}

/// The word at the test page.
pub fn read_test_page() -> u64 {
    // SAFETY: TEST_VA is mapped (to one of the two data pages) from `init` on.
    unsafe { core::ptr::read_volatile(TEST_VA as *const u64) }
}

/// The words the two backing pages hold.
pub const TEST_WORDS: [u64; 2] = [0xaaaa_aaaa_aaaa_aaaa, 0xbbbb_bbbb_bbbb_bbbb];

/// The word the test page shows through the second root.
pub const SECOND_ROOT_WORD: u64 = 0xcccc_cccc_cccc_cccc;

/// The physical address of the second root: the kernel's mappings, the test page mapped to
/// a third backing page that holds [`SECOND_ROOT_WORD`].
pub fn second_root() -> u64 {
    // SAFETY: the address of the static.
    unsafe { &raw const (*T.0.get()).pml4_b as u64 }
}

/// The writable alias of `addr`, for `len` bytes of the first 2 MiB; `None` outside it.
pub fn alias(addr: u64, len: u64) -> Option<u64> {
    let end = addr.checked_add(len)?;
    (end <= ALIAS_LEN).then_some(ALIAS_BASE + addr)
}

/// The physical address of the PML4.
pub fn root() -> u64 {
    // SAFETY: the address of the static.
    unsafe { &raw const (*T.0.get()).pml4 as u64 }
}
