//! The machine, the only module with `unsafe`: port I/O, CPUID, the VMware backdoor, the TSC,
//! and physical memory through the identity map of the low 4 GiB that the entry built.

use core::arch::asm;

/// Where the shim is linked (entry.s maps it onto the segment, wherever it loaded).
pub const SHIM_VBASE: u64 = 0xffff_ffff_c000_0000;
/// The identity map's extent.
pub const IDENTITY: u64 = 1 << 32;

unsafe extern "C" {
    /// The segment's physical address, found by entry.s.
    static shim_phys_base: u64;
    /// The TSC at the entry.
    static shim_tsc_entry: u64;
    /// `%ebx` at the entry: the start_info's physical address.
    static shim_saved_ebx: u32;
    /// The way out: hands over to the kernel's entry at physical `entry`.
    fn shim_leave(entry: u64) -> !;
}

/// The segment's physical address.
pub fn phys_base() -> u64 {
    // SAFETY: written once by entry.s before any Rust code runs, never again.
    unsafe { core::ptr::read_volatile(&raw const shim_phys_base) }
}

/// The TSC at the shim's entry.
pub fn tsc_entry() -> u64 {
    // SAFETY: as in `phys_base`.
    unsafe { core::ptr::read_volatile(&raw const shim_tsc_entry) }
}

/// The start_info's physical address.
pub fn start_info() -> u64 {
    // SAFETY: as in `phys_base`.
    u64::from(unsafe { core::ptr::read_volatile(&raw const shim_saved_ebx) })
}

/// The physical address of something in the shim.
pub fn phys_of<T: ?Sized>(p: *const T) -> u64 {
    (p as *const u8 as u64).wrapping_sub(SHIM_VBASE) + phys_base()
}

/// Hands over to the kernel.
pub fn leave(entry: u64) -> ! {
    // SAFETY: entry.s's way out restores the entry state and jumps to `entry`; it needs nothing
    // of Rust's state.
    unsafe { shim_leave(entry) }
}

/// `len` bytes of physical memory at `addr`, if they lie in the identity map.
///
/// # Safety
/// The caller must know the bytes are RAM the loader filled or the kernel owns, and that
/// nothing else writes them while the slice lives.
pub unsafe fn phys(addr: u64, len: usize) -> Option<&'static [u8]> {
    let end = addr.checked_add(len as u64)?;
    if addr == 0 || end > IDENTITY {
        return None;
    }
    // SAFETY: identity-mapped and readable, as the caller vouches.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Writes `bytes` at physical `addr` (identity-mapped).
///
/// # Safety
/// The bytes must be the kernel's (its text being patched, its start_info) and nothing may be
/// running from them.
pub unsafe fn write_phys(addr: u64, bytes: &[u8]) -> bool {
    let Some(end) = addr.checked_add(bytes.len() as u64) else {
        return false;
    };
    if addr == 0 || end > IDENTITY {
        return false;
    }
    // SAFETY: identity-mapped RAM, as the caller vouches.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
    true
}

/// `out dx, al`.
pub fn outb(port: u16, v: u8) {
    // SAFETY: the ports used here (COM1, fw_cfg) have no effect on memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nostack, nomem)) }
}

/// `in al, dx`.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nostack, nomem)) }
    v
}

/// `in eax, dx`.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, nomem)) }
    v
}

/// `memcmp`, in place of compiler-builtins' word-at-a-time one: one `repe cmpsb`. The shim
/// compares short strings (names, magics, a change's bytes); under an emulator each block of
/// code costs its translation (about 17,000 cycles under TCG), and the builtin's unrolled
/// paths were 26 blocks of the shim's 300.
///
/// # Safety
/// `a` and `b` must be readable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let (x, y): (u32, u32);
    // SAFETY: the caller vouches for `n` readable bytes at each; `repe cmpsb` compares [rsi]
    // with [rdi] and stops past the first difference (or after `n`), so the last bytes compared
    // are the first that differ, or equal ones. The direction flag is clear (the ABI).
    unsafe {
        asm!(
            "xor {x:e}, {x:e}",
            "xor {y:e}, {y:e}",
            "test rcx, rcx",
            "jz 2f",
            "repe cmpsb",
            "movzx {x:e}, byte ptr [rsi - 1]",
            "movzx {y:e}, byte ptr [rdi - 1]",
            "2:",
            x = out(reg) x, y = out(reg) y,
            inout("rsi") a => _, inout("rdi") b => _, inout("rcx") n => _,
            options(nostack, readonly, pure));
    }
    x as i32 - y as i32
}

/// `bcmp`: [`memcmp`] (LLVM calls it for equality).
///
/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's promise, passed on.
    unsafe { memcmp(a, b, n) }
}

/// `out dx, eax`: for fw_cfg's DMA address, whose write starts a transfer into memory the
/// caller owns.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`; a DMA transfer writes only where the caller's descriptor says.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack)) }
}

/// CPUID.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// The VMware backdoor's command `cmd` (port 0x5658).
pub fn vmware_backdoor(cmd: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u64, u32, u32);
    // SAFETY: detection calls this only where the hypervisor emulates or ignores the port;
    // rbx (reserved by the compiler) is exchanged around the instruction.
    unsafe {
        asm!("xchg {t}, rbx", "in eax, dx", "xchg {t}, rbx",
            t = inout(reg) 0u64 => b, inout("eax") 0x564d_5868u32 => a, inout("ecx") cmd => c,
            inout("edx") 0x5658u32 => d, options(nostack, nomem));
    }
    [a, b as u32, c, d]
}

/// The TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Serializes instruction fetch after writing code (CPUID is serializing).
pub fn serialize() {
    let _ = cpuid(0, 0);
}
