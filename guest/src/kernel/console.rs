//! The serial console (COM1), written with the annotation macros: every port access is a
//! patchable site. Under Xen PV, Xen's console (`console_io`).

use patch_sites::{pv_in, pv_out};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const TX_EMPTY: u8 = 0x20;

/// COM1 as a `core::fmt::Write`.
pub struct Console;

impl Console {
    /// The console (QEMU's 16550 needs no initialisation to transmit).
    pub fn new() -> Self {
        Console
    }

    // Never inlined: one pair of sites for the whole console, not one per call site.
    #[inline(never)]
    fn put(&mut self, b: u8) {
        // SAFETY: COM1's line-status and data ports; reading and writing them has no effect
        // on memory.
        unsafe {
            while pv_in!(u8, dx LINE_STATUS) & TX_EMPTY == 0 {
                core::hint::spin_loop();
            }
            pv_out!(u8, dx COM1, b);
        }
    }
}

impl core::fmt::Write for Console {
    #[inline(never)]
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        if super::xen::active() {
            // A PV kernel's console is Xen's (for dom0, the same serial port).
            super::xen::hv::console_write(s.as_bytes());
            return Ok(());
        }
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}
