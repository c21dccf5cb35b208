//! The PVH `struct hvm_start_info` the loader hands over (Xen's `arch-x86/hvm/start_info.h`):
//! the command line, and the memory map the shim rewrites to keep its report page from Linux.

use patch_sites::shim::{MEM_ENTRY_SIZE, reserve};

use crate::hw;

/// `hvm_start_info.magic`.
const MAGIC: u32 = 0x336e_c578;
/// The most memory-map entries read.
const MAX_ENTRIES: usize = 128;

/// What the shim uses of start_info.
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    /// Its physical address.
    pub addr: u64,
    /// The kernel command line ("" if none).
    pub cmdline: &'static str,
    /// The memory map (version 1), if any: physical address and entries.
    pub memmap: Option<(u64, u32)>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The NUL-terminated string at the start of `b` ("" if there is no NUL), as text: ASCII as it
/// is (found and checked by one short loop: UTF-8 validation and the library's searches were a
/// dozen blocks of code more, each translated under an emulator), anything else validated, or
/// "" if not UTF-8.
fn c_str(b: &[u8]) -> &str {
    let (mut n, mut high) = (0, 0u8);
    while n < b.len() && b[n] != 0 {
        high |= b[n];
        n += 1;
    }
    if n == b.len() {
        return "";
    }
    let b = &b[..n];
    if high < 0x80 {
        // SAFETY: ASCII is UTF-8.
        unsafe { core::str::from_utf8_unchecked(b) }
    } else {
        core::str::from_utf8(b).unwrap_or("")
    }
}

/// Reads start_info at physical `addr`; `None` without its magic.
pub fn read(addr: u64) -> Option<StartInfo> {
    // SAFETY: the loader put start_info there (%ebx) and nothing else runs.
    let b = unsafe { hw::phys(addr, 56) }?;
    if u32_at(b, 0) != MAGIC {
        return None;
    }
    let version = u32_at(b, 4);
    let cmdline_at = u64_at(b, 24);
    // SAFETY: the command line is a NUL-terminated string the loader wrote; at most 4 KiB read.
    let cmdline = (cmdline_at != 0)
        .then(|| unsafe { hw::phys(cmdline_at, 4096) })
        .flatten()
        .map(c_str)
        .unwrap_or("");
    let memmap = (version >= 1 && u32_at(b, 48) > 0).then(|| (u64_at(b, 40), u32_at(b, 48)));
    Some(StartInfo {
        addr,
        cmdline,
        memmap,
    })
}

/// Reserves `[start, end)` in the memory map Linux will read: a copy of the map with the range
/// carved out as reserved, written into `copy` (which must itself lie inside the range), and
/// start_info pointed at it.
pub fn reserve_range(
    si: &StartInfo,
    start: u64,
    end: u64,
    copy: &mut [u8],
) -> Result<(), &'static str> {
    let (map_at, n) = si
        .memmap
        .ok_or("start_info has no memory map (version 0)")?;
    let n = (n as usize).min(MAX_ENTRIES);
    // SAFETY: the loader's memory map, `n` entries of 24 bytes.
    let map =
        unsafe { hw::phys(map_at, n * MEM_ENTRY_SIZE) }.ok_or("the memory map is unreadable")?;
    let k = reserve(map, n, start, end, copy).ok_or("no RAM entry holds the report page")?;
    let copy_at = hw::phys_of(copy.as_ptr());
    // SAFETY: start_info's memmap_paddr and memmap_entries, which Linux reads after the shim.
    let ok = unsafe {
        hw::write_phys(si.addr + 40, &copy_at.to_le_bytes())
            && hw::write_phys(si.addr + 48, &(k as u32).to_le_bytes())
    };
    ok.then_some(()).ok_or("start_info cannot be written")
}
