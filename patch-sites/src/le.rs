//! Bounds-checked little-endian field access on byte slices. Every read returns `None` past the
//! end instead of panicking; callers turn that into a specific error.

#[inline]
pub(crate) fn u8_at(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

#[inline]
pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

#[inline]
pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

#[inline]
pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

#[inline]
pub(crate) fn i32_at(b: &[u8], off: usize) -> Option<i32> {
    u32_at(b, off).map(|v| v as i32)
}

/// Writes `v` at `off`; returns `None` if it does not fit.
#[inline]
pub(crate) fn put(b: &mut [u8], off: usize, v: &[u8]) -> Option<()> {
    b.get_mut(off..off.checked_add(v.len())?)?
        .copy_from_slice(v);
    Some(())
}

/// `base + off + rel` in 64-bit wrapping-free arithmetic, `None` on overflow.
#[inline]
pub(crate) fn self_relative(base: u64, off: usize, rel: i32) -> Option<u64> {
    base.checked_add(off as u64)?.checked_add_signed(rel as i64)
}

/// The `i32` that makes `field_addr + rel == target`, if it fits.
#[inline]
pub(crate) fn rel_to(field_addr: u64, target: u64) -> Option<i32> {
    let d = (target as i128) - (field_addr as i128);
    i32::try_from(d).ok()
}
