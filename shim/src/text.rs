//! Linux's text as the runtime sees it: kernel virtual addresses, mapped through the kernel's
//! loadable segments to where they loaded (as linked, plus the load's displacement), read and
//! written through the identity map. Writes outside the kernel's code ranges are dropped (the
//! read-back then finds them missing and the runtime undoes the pass).

use patch_sites::shim::Params;
use pvpatch_runtime::apply::TextPoke;
use pvpatch_runtime::plan::TextRead;

use crate::hw;

/// The kernel's text.
pub struct KernelText<'p> {
    params: &'p Params,
    delta: u64,
}

impl<'p> KernelText<'p> {
    /// The text of the kernel `params` describe, loaded `delta` bytes from where it is linked.
    pub fn new(params: &'p Params, delta: u64) -> Self {
        KernelText { params, delta }
    }

    /// Where `[addr, addr + len)` lies in physical memory, if one segment holds it.
    pub fn phys(&self, addr: u64, len: usize) -> Option<u64> {
        let end = addr.checked_add(len as u64)?;
        // A plain loop: under an emulator every block of code costs its translation.
        for s in self.params.segments() {
            if s.vaddr <= addr && end - s.vaddr <= s.memsz {
                return Some(
                    s.paddr
                        .wrapping_add(addr - s.vaddr)
                        .wrapping_add(self.delta),
                );
            }
        }
        None
    }

    /// Whether `[addr, addr + len)` lies in one of the kernel's code ranges.
    pub fn in_code(&self, addr: u64, len: usize) -> bool {
        let end = addr.saturating_add(len as u64);
        self.params
            .code()
            .iter()
            .any(|&(s, e)| s <= addr && end <= e)
    }

    /// The kernel's bytes at `addr`.
    pub fn bytes(&self, addr: u64, len: usize) -> Option<&'static [u8]> {
        let p = self.phys(addr, len)?;
        // SAFETY: inside one of the kernel's segments, which the loader filled; nothing else
        // runs while the shim does.
        unsafe { hw::phys(p, len) }
    }
}

/// The plans prepared at link time, as loaded (the parameters' place plus the load's
/// displacement), if the image has them.
pub fn plans(params: &Params, delta: u64) -> Option<&'static [u8]> {
    if params.plans_len == 0 {
        return None;
    }
    let len = usize::try_from(params.plans_len).ok()?;
    // SAFETY: the plans' own segment, which the loader filled from the file and which nothing
    // writes (they are read before the shim writes anything, and only the kernel's code
    // ranges are ever written).
    unsafe { hw::phys(params.plans_phys.wrapping_add(delta), len) }
}

impl TextRead for KernelText<'_> {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        match self.bytes(addr, out.len()) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

impl TextPoke for KernelText<'_> {
    fn open(&mut self) {}

    fn close(&mut self) {}

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        if !self.in_code(addr, bytes.len()) {
            return;
        }
        if let Some(p) = self.phys(addr, bytes.len()) {
            // SAFETY: the kernel's code, not yet running (the shim runs before its entry).
            unsafe { hw::write_phys(p, bytes) };
        }
    }

    fn sync(&mut self) {
        hw::serialize();
    }
}
