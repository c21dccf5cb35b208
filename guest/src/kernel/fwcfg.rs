//! QEMU's fw_cfg: the signature through its ports (a device that answers, for the port-I/O
//! self-test), and files through its DMA interface (the backend ROM). Every port access is an
//! annotated site.

use alloc::vec;
use alloc::vec::Vec;

use patch_sites::{pv_in, pv_out};

const SELECTOR: u16 = 0x510;
const DATA: u16 = 0x511;
const DMA_HIGH: u16 = 0x514;
const DMA_LOW: u16 = 0x518;
const SIGNATURE: u16 = 0x0000;
const FEATURES: u16 = 0x0001;
const FILE_DIR: u16 = 0x0019;
const DMA_ERROR: u32 = 1;
const DMA_READ: u32 = 2;
const DMA_SELECT: u32 = 8;

/// The 4-byte signature ("QEMU" when the device is there).
pub fn signature() -> [u8; 4] {
    let mut s = [0u8; 4];
    // SAFETY: selecting and reading fw_cfg items has no side effects.
    unsafe {
        pv_out!(u16, dx SELECTOR, SIGNATURE);
        for b in &mut s {
            *b = pv_in!(u8, dx DATA);
        }
    }
    s
}

fn select(item: u16) {
    // SAFETY: as in `signature`.
    unsafe { pv_out!(u16, dx SELECTOR, item) };
}

fn dma_available() -> bool {
    select(FEATURES);
    let mut f = [0u8; 4];
    for b in &mut f {
        // SAFETY: as in `signature`.
        *b = unsafe { pv_in!(u8, dx DATA) };
    }
    u32::from_le_bytes(f) & 2 != 0
}

/// The selector and size of the file named `name`, if QEMU publishes one. The directory is
/// read with one DMA transfer: under a hypervisor every port access is an exit.
pub fn find(name: &str) -> Option<(u16, u32)> {
    if signature() != *b"QEMU" {
        return None;
    }
    let n = read_file(FILE_DIR, 4)?;
    let count = u32::from_be_bytes([n[0], n[1], n[2], n[3]]).min(4096);
    let dir = read_file(FILE_DIR, 4 + 64 * count)?;
    for e in dir[4..].chunks_exact(64) {
        let size = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
        let sel = u16::from_be_bytes([e[4], e[5]]);
        let end = e[8..].iter().position(|&b| b == 0).unwrap_or(56);
        if &e[8..8 + end] == name.as_bytes() {
            return Some((sel, size));
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

/// Reads the first `size` bytes of an item through the DMA interface.
pub fn read_file(sel: u16, size: u32) -> Option<Vec<u8>> {
    if !dma_available() {
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    let d = Dma {
        control: ((sel as u32) << 16 | DMA_SELECT | DMA_READ).to_be(),
        length: size.to_be(),
        address: (buf.as_mut_ptr() as u64).to_be(),
    };
    let at = &raw const d as u64;
    // SAFETY: the descriptor and the buffer are identity-mapped and live until the device has
    // finished (it clears `control` when done); writing the low half starts the transfer.
    unsafe {
        pv_out!(u32, dx DMA_HIGH, ((at >> 32) as u32).to_be());
        pv_out!(u32, dx DMA_LOW, (at as u32).to_be());
        loop {
            let c = u32::from_be(core::ptr::read_volatile(&raw const d.control));
            if c & DMA_ERROR != 0 {
                return None;
            }
            if c == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    }
    Some(buf)
}

/// The first `n` bytes of a file, read with `rep insb` from the data port (an annotated
/// `ins` site), to compare with what DMA read.
pub fn read_prefix_with_ins(sel: u16, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    select(sel);
    // SAFETY: reads `n` bytes of the selected item into a buffer of `n` bytes.
    unsafe { patch_sites::pv_rep_ins!(u8, DATA, buf.as_mut_ptr(), n) };
    buf
}
