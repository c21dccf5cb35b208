//! QEMU's fw_cfg: the backend ROM a hypervisor publishes as a file, read through the DMA
//! interface into the shim's heap (physical addresses through the shim's own mapping).

use alloc::vec;
use alloc::vec::Vec;

use crate::hw;

const DMA_HIGH: u16 = 0x514;
const DMA_LOW: u16 = 0x518;
/// What the DMA address register reads as ("QEMU CFG"), there only if the device has the DMA
/// interface.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
const FILE_DIR: u16 = 0x0019;
const DMA_ERROR: u32 = 1;
const DMA_READ: u32 = 2;
const DMA_SELECT: u32 = 8;
/// Directory entries read with the count.
const FIRST_ENTRIES: u32 = 32;
/// The largest file read (a ROM is far smaller).
const MAX_FILE: u32 = 1 << 20;

/// The selector and size of the file named `name`, if the device is there and publishes one.
pub fn find(name: &str) -> Option<(u16, u32)> {
    // The DMA register's signature says both that the device is there and that it has DMA:
    // two reads, where the signature and feature items took ten port accesses (each an exit
    // to the device model).
    let high = u32::from_be(hw::inl(DMA_HIGH));
    let low = u32::from_be(hw::inl(DMA_LOW));
    if (u64::from(high) << 32 | u64::from(low)) != DMA_SIGNATURE {
        return None;
    }
    // The count and the first entries in one transfer (QEMU publishes a dozen or two files;
    // past the item's end the device writes zeros, and only `count` entries are read); the
    // whole directory in a second only if there are more.
    // (Into the stack: no allocation, whose code is more blocks to translate.)
    let mut first = [0u8; 4 + 64 * FIRST_ENTRIES as usize];
    read_into(FILE_DIR, &mut first)?;
    let count = u32::from_be_bytes([first[0], first[1], first[2], first[3]]).min(4096);
    let more;
    let dir: &[u8] = if count > FIRST_ENTRIES {
        more = read(FILE_DIR, 4 + 64 * count)?;
        &more
    } else {
        &first
    };
    let count = count as usize;
    // A plain loop over the entries (size, selector, reserved, a NUL-padded name of 56 bytes):
    // each block of code the shim runs costs its translation under an emulator.
    let name = name.as_bytes();
    if name.len() >= 56 {
        return None;
    }
    for i in 0..count {
        let e = &dir[4 + 64 * i..4 + 64 * (i + 1)];
        if e[8..8 + name.len()] == *name && e[8 + name.len()] == 0 {
            return Some((
                u16::from_be_bytes([e[4], e[5]]),
                u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
            ));
        }
    }
    None
}

#[repr(C, align(16))]
struct Dma {
    control: u32,
    length: u32,
    address: u64,
}

/// The first `size` bytes of item `sel`, by one DMA transfer.
pub fn read(sel: u16, size: u32) -> Option<Vec<u8>> {
    if size > MAX_FILE {
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    read_into(sel, &mut buf)?;
    Some(buf)
}

/// The first `buf.len()` bytes of item `sel` into `buf` (which must lie in the shim), by one
/// DMA transfer.
fn read_into(sel: u16, buf: &mut [u8]) -> Option<()> {
    let d = Dma {
        control: ((u32::from(sel) << 16) | DMA_SELECT | DMA_READ).to_be(),
        length: (buf.len() as u32).to_be(),
        address: hw::phys_of(buf.as_mut_ptr()).to_be(),
    };
    let at = hw::phys_of(&raw const d);
    hw::outl(DMA_HIGH, ((at >> 32) as u32).to_be());
    hw::outl(DMA_LOW, (at as u32).to_be());
    loop {
        // SAFETY: `d` lives on this stack frame until the device is done; the device clears
        // `control` (or sets the error bit) when it has written the buffer.
        let c = u32::from_be(unsafe { core::ptr::read_volatile(&raw const d.control) });
        if c & DMA_ERROR != 0 {
            return None;
        }
        if c == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    Some(())
}
