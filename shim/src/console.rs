//! COM1, written by polling (Linux sets the UART up itself later; QEMU's needs nothing).

use core::fmt;

use crate::hw;

const COM1: u16 = 0x3f8;

/// The serial console.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

fn put(b: u8) {
    // Transmit holding register empty, at most a few thousand polls (no UART: carry on).
    for _ in 0..100_000 {
        if hw::inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    hw::outb(COM1, b);
}
