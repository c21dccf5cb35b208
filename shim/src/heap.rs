//! A bump allocator over a static arena in the shim's `.bss`: the shim runs once, on one CPU,
//! and frees nothing that matters (the whole arena is Linux's RAM after the hand-over).

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of heap (a Debian kernel's plan of 1,100 sites and 870 detours takes about 1 MiB).
#[cfg(feature = "boot-planning")]
pub const HEAP: usize = 3 << 20;
/// Bytes of heap of the lean shim (a prepared plan's list of changes, 3,000 of them for a
/// Debian kernel out of line: 48 bytes each, about 150 KB, allocated once at its size).
#[cfg(not(feature = "boot-planning"))]
pub const HEAP: usize = 512 << 10;

#[repr(align(4096))]
struct Arena(UnsafeCell<[u8; HEAP]>);

// SAFETY: the shim is single-threaded; allocations hand out disjoint ranges.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; HEAP]));
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The allocator.
pub struct Bump;

// SAFETY: `alloc` returns ranges of the arena aligned as asked and never handed out twice, or
// null when it is full; `dealloc` frees nothing.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = ARENA.0.get() as usize;
        let mut cur = NEXT.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let Some(end) = start.checked_add(layout.size()).filter(|&e| e <= HEAP) else {
                return core::ptr::null_mut();
            };
            match NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

/// Bytes handed out so far.
pub fn used() -> usize {
    NEXT.load(Ordering::Relaxed)
}
