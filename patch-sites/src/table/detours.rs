//! Load-time detours (table version 2): what a stock kernel's sites need to reach out-of-line
//! code when they are too small for a call, and where the backend's own code may go.
//!
//! A version-2 header adds a *detour area* after the records: `detour_count` descriptors
//! ([`DETOUR_SIZE`] bytes each), then `member_count` members ([`MEMBER_SIZE`] bytes each), then
//! the stubs' bytes. A **descriptor** says: the *moved range* in the kernel's text (which
//! becomes `jmp rel32 stub`, or `jmp rel8 trampoline` when it has fewer than 5 bytes, then
//! `int3`s), the *stub* (where it runs: a cave in the text, which holds `int3`s until the stub is
//! installed; and its bytes, in the area), the *trampoline* (5 bytes of dead padding, `int3`s
//! or whole NOPs, that become `jmp rel32 stub`), and the CRC-32 of the moved range's original bytes. A **member**
//! ties one record (of form [`super::Form::Movable`]) to its descriptor and to its *patchable
//! copy* in the stub. Sites that share a moved range share a descriptor.
//!
//! The header may also name an *arena*: bytes of `int3` padding in the text reserved for the
//! backend's out-of-line code (a ROM's entry points, thunks a backend generates), copied there
//! at load.
//!
//! Nothing in the kernel's text changes until a runtime installs a detour; a runtime that does
//! not (a backend that wants every site native) changes nothing.

use core::fmt;

use super::site::{AddrRange, Form};
use super::{DETOUR_SIZE, MEMBER_SIZE};
use crate::le::{i32_at, self_relative, u8_at, u16_at, u32_at};

/// A detour descriptor as it lies in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDetour {
    /// Self-relative: the first byte of the moved range.
    pub moved: i32,
    /// Self-relative (at +4): where the stub runs.
    pub stub: i32,
    /// Self-relative (at +8): the stub's bytes, in the detour area.
    pub src: i32,
    /// Self-relative (at +12): the trampoline, or 0 for none.
    pub tramp: i32,
    /// Bytes moved.
    pub moved_len: u8,
    /// Bytes of the stub.
    pub stub_len: u8,
    /// Reserved, zero.
    pub reserved: u16,
    /// CRC-32 of the moved range's original bytes.
    pub moved_crc: u32,
}

impl RawDetour {
    /// Reads a descriptor from the first [`DETOUR_SIZE`] bytes of `b`.
    pub fn read(b: &[u8]) -> Option<RawDetour> {
        Some(RawDetour {
            moved: i32_at(b, 0)?,
            stub: i32_at(b, 4)?,
            src: i32_at(b, 8)?,
            tramp: i32_at(b, 12)?,
            moved_len: u8_at(b, 16)?,
            stub_len: u8_at(b, 17)?,
            reserved: u16_at(b, 18)?,
            moved_crc: u32_at(b, 20)?,
        })
    }

    /// Its bytes.
    pub fn to_bytes(&self) -> [u8; DETOUR_SIZE] {
        let mut b = [0u8; DETOUR_SIZE];
        b[0..4].copy_from_slice(&self.moved.to_le_bytes());
        b[4..8].copy_from_slice(&self.stub.to_le_bytes());
        b[8..12].copy_from_slice(&self.src.to_le_bytes());
        b[12..16].copy_from_slice(&self.tramp.to_le_bytes());
        b[16] = self.moved_len;
        b[17] = self.stub_len;
        b[18..20].copy_from_slice(&self.reserved.to_le_bytes());
        b[20..24].copy_from_slice(&self.moved_crc.to_le_bytes());
        b
    }
}

/// A member as it lies in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawMember {
    /// The index of its record.
    pub record: u32,
    /// The index of its detour.
    pub detour: u16,
    /// Where its patchable copy is in the stub.
    pub copy_off: u8,
    /// The copy's room.
    pub copy_len: u8,
}

impl RawMember {
    /// Reads a member from the first [`MEMBER_SIZE`] bytes of `b`.
    pub fn read(b: &[u8]) -> Option<RawMember> {
        Some(RawMember {
            record: u32_at(b, 0)?,
            detour: u16_at(b, 4)?,
            copy_off: u8_at(b, 6)?,
            copy_len: u8_at(b, 7)?,
        })
    }

    /// Its bytes.
    pub fn to_bytes(&self) -> [u8; MEMBER_SIZE] {
        let mut b = [0u8; MEMBER_SIZE];
        b[0..4].copy_from_slice(&self.record.to_le_bytes());
        b[4..6].copy_from_slice(&self.detour.to_le_bytes());
        b[6] = self.copy_off;
        b[7] = self.copy_len;
        b
    }
}

/// A detour, decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detour<'a> {
    /// The first moved byte.
    pub moved: u64,
    /// Bytes moved.
    pub moved_len: u8,
    /// Where the stub runs.
    pub stub: u64,
    /// The stub's bytes.
    pub stub_bytes: &'a [u8],
    /// The trampoline, if the moved range reaches the stub through one.
    pub tramp: Option<u64>,
    /// CRC-32 of the moved range's original bytes.
    pub moved_crc: u32,
}

impl Detour<'_> {
    /// The moved range.
    pub fn moved_range(&self) -> AddrRange {
        AddrRange::new(self.moved, self.moved.saturating_add(self.moved_len as u64))
    }

    /// Where the stub runs.
    pub fn stub_range(&self) -> AddrRange {
        AddrRange::new(
            self.stub,
            self.stub.saturating_add(self.stub_bytes.len() as u64),
        )
    }
}

/// A member, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The index of its record.
    pub record: u32,
    /// The index of its detour.
    pub detour: u16,
    /// Where its patchable copy is in the stub.
    pub copy_off: u8,
    /// The copy's room.
    pub copy_len: u8,
}

/// Why a detour area is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetourError {
    /// The area is shorter than its descriptors and members.
    Truncated,
    /// A descriptor's fields are out of range (offsets, lengths, reserved bits).
    BadDescriptor(u16),
    /// A descriptor's moved range, stub or trampoline is outside the kernel's code.
    OutsideImage(u16),
    /// A descriptor's stub bytes are outside the area.
    StubOutsideArea(u16),
    /// Two of the moved ranges, stubs, trampolines and the arena overlap, or a stub or
    /// trampoline overlaps a site.
    Overlap(u16),
    /// A member names no record, no detour, or a record that is not movable.
    BadMember(u32),
    /// Members are not sorted by record, or a record has two.
    UnsortedMembers(u32),
    /// A movable record has no member.
    MissingMember(u32),
    /// A member's site or copy does not lie where its detour says.
    Misplaced(u32),
    /// The arena is outside the kernel's code, or overlaps a site.
    BadArena,
}

impl fmt::Display for DetourError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DetourError::Truncated => f.write_str("the detour area is truncated"),
            DetourError::BadDescriptor(i) => write!(f, "detour {i}: fields out of range"),
            DetourError::OutsideImage(i) => {
                write!(
                    f,
                    "detour {i}: moved range, stub or trampoline outside the code"
                )
            }
            DetourError::StubOutsideArea(i) => {
                write!(f, "detour {i}: stub bytes outside the detour area")
            }
            DetourError::Overlap(i) => write!(
                f,
                "detour {i}: overlaps another detour, the arena, or a site it does not carry"
            ),
            DetourError::BadMember(r) => write!(f, "the member of record {r} is invalid"),
            DetourError::UnsortedMembers(r) => {
                write!(f, "members are not sorted by record at record {r}")
            }
            DetourError::MissingMember(r) => write!(f, "movable record {r} has no member"),
            DetourError::Misplaced(r) => write!(
                f,
                "record {r}: its site is not in its detour's moved range, or its copy not in \
                 the stub"
            ),
            DetourError::BadArena => {
                f.write_str("the arena is outside the code or overlaps a site")
            }
        }
    }
}

impl core::error::Error for DetourError {}

/// The detour area of a table: its bytes (descriptors, members, stubs), where it lies, and the
/// counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct DetourArea<'a> {
    /// The area's bytes.
    pub bytes: &'a [u8],
    /// Where they lie.
    pub addr: u64,
    /// Descriptors.
    pub detours: u16,
    /// Members.
    pub members: u16,
}

impl<'a> DetourArea<'a> {
    fn members_at(&self) -> usize {
        self.detours as usize * DETOUR_SIZE
    }

    /// Descriptor `i`, decoded (only range checks that need no other part of the table).
    pub fn detour(&self, i: u16) -> Result<Detour<'a>, DetourError> {
        let off = i as usize * DETOUR_SIZE;
        let bad = DetourError::BadDescriptor(i);
        let raw = RawDetour::read(self.bytes.get(off..).ok_or(DetourError::Truncated)?)
            .ok_or(DetourError::Truncated)?;
        let at = self.addr.checked_add(off as u64).ok_or(bad)?;
        if raw.reserved != 0 || raw.moved_len < 2 || raw.stub_len == 0 {
            return Err(bad);
        }
        let moved = self_relative(at, 0, raw.moved).ok_or(bad)?;
        let stub = self_relative(at, 4, raw.stub).ok_or(bad)?;
        let src = self_relative(at, 8, raw.src).ok_or(bad)?;
        let tramp = match raw.tramp {
            0 => None,
            t => Some(self_relative(at, 12, t).ok_or(bad)?),
        };
        // A range of fewer than 5 bytes can only hold a `jmp rel8` (to a trampoline).
        if (raw.moved_len < 5) != tramp.is_some() {
            return Err(bad);
        }
        let stubs_at = self.members_at() + self.members as usize * MEMBER_SIZE;
        let src_off = src
            .checked_sub(self.addr)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(DetourError::StubOutsideArea(i))?;
        if src_off < stubs_at {
            return Err(DetourError::StubOutsideArea(i));
        }
        let stub_bytes = self
            .bytes
            .get(src_off..src_off + raw.stub_len as usize)
            .ok_or(DetourError::StubOutsideArea(i))?;
        Ok(Detour {
            moved,
            moved_len: raw.moved_len,
            stub,
            stub_bytes,
            tramp,
            moved_crc: raw.moved_crc,
        })
    }

    /// Member `i`.
    pub fn member(&self, i: u16) -> Option<Member> {
        let off = self.members_at() + i as usize * MEMBER_SIZE;
        let raw = RawMember::read(self.bytes.get(off..)?)?;
        Some(Member {
            record: raw.record,
            detour: raw.detour,
            copy_off: raw.copy_off,
            copy_len: raw.copy_len,
        })
    }

    /// The member of record `record`, if it has one (members are sorted by record).
    pub fn member_of(&self, record: u32) -> Option<Member> {
        let (mut lo, mut hi) = (0u16, self.members);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let m = self.member(mid)?;
            if m.record == record {
                return Some(m);
            }
            if m.record < record {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        None
    }
}

/// What the area's checks need to know of one record.
#[derive(Clone, Copy, Debug)]
pub struct RecordView {
    /// The site's first byte.
    pub addr: u64,
    /// Its room.
    pub site_len: u8,
    /// Its instruction's length.
    pub insn_len: u8,
    /// Its form.
    pub form: Form,
    /// Its stub reference.
    pub stub: Option<u64>,
}

fn overlaps(a: AddrRange, b: AddrRange) -> bool {
    a.start < b.end && b.start < a.end
}

/// The first record whose site ends after `start` (records sorted by address).
fn first_site_after(count: u32, record: &dyn Fn(u32) -> Option<RecordView>, start: u64) -> u32 {
    let (mut lo, mut hi) = (0u32, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match record(mid) {
            Some(r) if r.addr + (r.site_len as u64) <= start => lo = mid + 1,
            _ => hi = mid,
        }
    }
    lo
}

/// Whether `r` overlaps a site (records sorted by address).
fn covers_site(count: u32, record: &dyn Fn(u32) -> Option<RecordView>, r: AddrRange) -> bool {
    let i = first_site_after(count, record, r.start);
    i < count && record(i).is_some_and(|s| s.addr < r.end)
}

/// The first descriptor whose moved range overlaps `r`, if any (descriptors sorted by moved
/// range).
fn moved_over<'a>(area: &DetourArea<'a>, r: AddrRange) -> Option<(u16, Detour<'a>)> {
    over(area, r, Detour::moved_range)
}

/// The descriptor whose range `of` (its moved range or its stub, each sorted and apart across
/// descriptors) overlaps `r`, if any: a binary search. A descriptor that does not decode ends
/// the search (the check reports it in its own turn).
fn over<'a>(
    area: &DetourArea<'a>,
    r: AddrRange,
    of: fn(&Detour<'a>) -> AddrRange,
) -> Option<(u16, Detour<'a>)> {
    let (mut lo, mut hi) = (0u16, area.detours);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match area.detour(mid) {
            Ok(d) if of(&d).end <= r.start => lo = mid + 1,
            _ => hi = mid,
        }
    }
    if lo >= area.detours {
        return None;
    }
    let d = area.detour(lo).ok()?;
    (of(&d).start < r.end).then_some((lo, d))
}

/// The shortest moved range that may host a trampoline: the `jmp rel32` its installation
/// writes, then the trampoline's 5 bytes.
pub const MIN_HOST_LEN: u8 = 10;

impl Detour<'_> {
    /// Whether the 5 bytes at `t` lie in this range's *dead tail*: after the `jmp rel32` that
    /// installing it writes, inside the range (this range has no trampoline of its own).
    pub fn hosts(&self, t: u64) -> bool {
        self.tramp.is_none()
            && self.moved_len >= MIN_HOST_LEN
            && t >= self.moved.saturating_add(5)
            && t.saturating_add(5) <= self.moved.saturating_add(self.moved_len as u64)
    }
}

impl DetourArea<'_> {
    /// The *host* of detour `i`'s trampoline: the descriptor whose moved range holds it (in
    /// its dead tail, checked by [`check`]), if any. A runtime that installs detour `i`
    /// installs its host too, and writes the trampoline as part of the host's moved range.
    pub fn host_of(&self, i: u16) -> Option<u16> {
        let t = self.detour(i).ok()?.tramp?;
        moved_over(self, AddrRange::new(t, t.saturating_add(5)))
            .filter(|(h, e)| *h != i && e.hosts(t))
            .map(|(h, _)| h)
    }
}

/// How far a trampoline may lie from its moved range (a `jmp rel8`).
const TRAMP_REACH: u64 = 136;

/// A cursor into the records (sorted by address): the `k`th, decoded once.
#[derive(Clone, Copy)]
struct Sites {
    k: u32,
    at: Option<RecordView>,
}

impl Sites {
    /// Where record `r`'s bytes end: its room in place, or its instruction if longer.
    fn end(r: &RecordView) -> u64 {
        r.addr + r.site_len.max(r.insn_len) as u64
    }

    fn step(&mut self, next: &dyn Fn(u32) -> Option<RecordView>) {
        self.k += 1;
        self.at = next(self.k);
    }

    /// Moves to the first record that ends after `start` (past the last, at `None`).
    fn skip_to(&mut self, start: u64, next: &dyn Fn(u32) -> Option<RecordView>) {
        while self.at.is_some_and(|r| Sites::end(&r) <= start) {
            self.step(next);
        }
    }
}

/// Checks the whole area against the records (`record(i)` for `i < count`, sorted by address,
/// as a sealed table's are) and the kernel's code ranges: every descriptor in range; moved
/// ranges and stubs each sorted and apart; no stub over a moved range, no trampoline over one
/// except in another range's dead tail ([`Detour::hosts`]), neither over a site, the arena or
/// another trampoline, no trampoline over a stub, no moved range over a site but its own
/// members' or over the arena; every member names a movable record whose site lies in its
/// detour's moved range and whose copy lies in the stub; one member per movable record, sorted.
/// `O((d + m) log n)` for `d` detours, `m` members and `n` records: it runs at boot.
pub fn check(
    area: &DetourArea<'_>,
    count: u32,
    record: &dyn Fn(u32) -> Option<RecordView>,
    image: &[AddrRange],
    arena: Option<AddrRange>,
) -> Result<(), DetourError> {
    let in_image = |r: AddrRange| image.iter().any(|i| r.start >= i.start && r.end <= i.end);
    let needed = area.members_at() + area.members as usize * MEMBER_SIZE;
    if area.bytes.len() < needed {
        return Err(DetourError::Truncated);
    }
    if let Some(a) = arena
        && (a.end <= a.start || !in_image(a) || covers_site(count, record, a))
    {
        return Err(DetourError::BadArena);
    }
    let mut prev_moved: Option<AddrRange> = None;
    let mut prev_stub: Option<AddrRange> = None;
    // Stubs come in address order (checked below), as do sites and moved ranges: one cursor
    // into each finds what a stub could overlap, for O(d + n) in all (at boot, where every
    // instruction may be emulated). Trampolines, few and only near their ranges, are searched.
    // Each cursor keeps what it points at, decoded once (not once per test of it).
    let next = |k: u32| if k < count { record(k) } else { None };
    let mut stub_sites = Sites { k: 0, at: next(0) };
    // A second cursor into the sites, for the moved ranges.
    let mut moved_sites = stub_sites;
    let mut moved_cur = 0u16;
    let moved_of = |k: u16| area.detour(k).ok().map(|e| e.moved_range());
    let mut moved_at = if area.detours > 0 { moved_of(0) } else { None };
    for i in 0..area.detours {
        let d = area.detour(i)?;
        let tramp = d.tramp.map(|t| AddrRange::new(t, t.saturating_add(5)));
        if !in_image(d.moved_range())
            || !in_image(d.stub_range())
            || tramp.is_some_and(|t| !in_image(t))
        {
            return Err(DetourError::OutsideImage(i));
        }
        let sorted = prev_moved.is_none_or(|p| p.end <= d.moved)
            && prev_stub.is_none_or(|p| p.end <= d.stub);
        let st = d.stub_range();
        stub_sites.skip_to(st.start, &next);
        while moved_at.is_some_and(|e| e.end <= st.start) {
            moved_cur += 1;
            moved_at = if moved_cur < area.detours {
                moved_of(moved_cur)
            } else {
                None
            };
        }
        // Past the last site or moved range, a cursor points at nothing (`None`).
        let stub_clash = stub_sites.at.is_some_and(|r| r.addr < st.end)
            || moved_at.is_some_and(|e| e.start < st.end)
            || arena.is_some_and(|a| overlaps(a, st));
        // The sites a moved range overlaps are its own members' (records that name its stub):
        // any other would be written in place under the range's `jmp`, or moved with it.
        let mv = d.moved_range();
        moved_sites.skip_to(mv.start, &next);
        let mut over_mv = moved_sites;
        let mut moved_clash = false;
        while let Some(r) = over_mv.at
            && r.addr < mv.end
        {
            if Sites::end(&r) > mv.start && (r.form != Form::Movable || r.stub != Some(d.stub)) {
                moved_clash = true;
                break;
            }
            over_mv.step(&next);
        }
        // A trampoline may lie in a moved range only in another range's dead tail.
        let clash = stub_clash
            || moved_clash
            || arena.is_some_and(|a| overlaps(a, mv))
            || tramp.is_some_and(|t| {
                moved_over(area, t).is_some_and(|(h, e)| h == i || !e.hosts(t.start))
                    || covers_site(count, record, t)
                    || arena.is_some_and(|a| overlaps(a, t))
                    || over(area, t, Detour::stub_range).is_some()
                    || t.start.abs_diff(d.moved) > TRAMP_REACH
            });
        if !sorted || clash {
            return Err(DetourError::Overlap(i));
        }
        // Trampolines lie within reach of their moved ranges, so only neighbours can share one.
        if let Some(t) = tramp {
            let mut j = i;
            while j > 0 {
                j -= 1;
                let e = area.detour(j)?;
                if d.moved.saturating_sub(e.moved) > 2 * TRAMP_REACH + 32 {
                    break;
                }
                if e.tramp
                    .is_some_and(|u| overlaps(t, AddrRange::new(u, u.saturating_add(5))))
                {
                    return Err(DetourError::Overlap(i));
                }
            }
        }
        prev_moved = Some(d.moved_range());
        prev_stub = Some(d.stub_range());
    }
    // Members: sorted, one per movable record, in place; every movable record has one.
    let mut next_record = 0u32;
    // Members come in record order, so their detours in address order: the last one decoded
    // is usually the next one's.
    let mut last: Option<(u16, Detour<'_>)> = None;
    for k in 0..area.members {
        let m = area.member(k).ok_or(DetourError::Truncated)?;
        if m.record < next_record {
            return Err(DetourError::UnsortedMembers(m.record));
        }
        if m.record >= count || m.detour >= area.detours {
            return Err(DetourError::BadMember(m.record));
        }
        let r = record(m.record).ok_or(DetourError::BadMember(m.record))?;
        if r.form != Form::Movable {
            return Err(DetourError::BadMember(m.record));
        }
        let d = match last {
            Some((g, d)) if g == m.detour => d,
            _ => {
                let d = area.detour(m.detour)?;
                last = Some((m.detour, d));
                d
            }
        };
        let copy_end = m.copy_off as usize + m.copy_len as usize;
        if !d.moved_range().contains_span(r.addr, r.insn_len as u64)
            || r.stub != Some(d.stub)
            || (m.copy_len as usize) < r.insn_len as usize
            || copy_end > d.stub_bytes.len()
        {
            return Err(DetourError::Misplaced(m.record));
        }
        next_record = m.record + 1;
    }
    let mut k = 0u16;
    for i in 0..count {
        let r = record(i).ok_or(DetourError::BadMember(i))?;
        if r.form == Form::Movable {
            if area.member(k).is_none_or(|m| m.record != i) {
                return Err(DetourError::MissingMember(i));
            }
            k += 1;
        }
    }
    Ok(())
}
