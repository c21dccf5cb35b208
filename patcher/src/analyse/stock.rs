//! Detours in a stock kernel: for every rewritable site with less than 5 bytes in place, a
//! moved range around it, its stub in a cave, and the jump that reaches it.
//!
//! A moved range is made of whole instructions around the site: some after it (forward), some
//! before it (backward), or both (around). Every instruction in it is movable (falls through, a
//! direct `jmp`/`jcc`/`call`, a near `ret`) or another rewritable site, which then shares the
//! detour (a *group*: one stub, a patchable copy per site). Nothing protected lies in it and
//! nothing jumps into it from outside ([`super::check_range`]): a branch target inside is
//! allowed only when no symbol or table names it, nothing takes its address, and the one direct
//! branch in the image that targets it moves too (a loop moved whole: `1: hlt; jmp 1b`), and
//! only when no range without one will do (the branch follows its target into the stub).
//!
//! A range of at least 5 bytes becomes `jmp rel32 stub`. A shorter one (at least 2 bytes)
//! becomes `jmp rel8` to a *trampoline*: 5 bytes of nearby padding that hold `jmp rel32 stub`:
//! a run of `int3` padding too small for a cave, or the NOP alignment padding compilers leave
//! after a function's last jump (nothing falls into it or jumps to it). Either is vouched for by
//! an undefined ORC entry like a cave, or by the very entry that covers the moved range.
//! Direct detours are preferred, then the fewest bytes moved.
//!
//! Sites are planned in address order, stubs get cave space in that order, trampolines the
//! nearest free padding: the result is deterministic.

use patch_sites::Outcome;

use super::caves::{Allocator, Orc};
use super::detour::{self, Copy, Jump};
use super::guard::{Guards, Why};
use super::{
    Blocked, Direction, EntryText, MAX_MOVED, Moved, SiteInfo, blocked, check_range, decode_at,
    kind_of,
};
use crate::linux::TableKind;
use crate::load::Image;
use crate::sweep::Sweep;
use iced_x86::{FlowControl, Mnemonic};

/// A planned detour: a moved range, the sites it carries, its stub and jumps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetourPlan {
    /// The first moved byte.
    pub start: u64,
    /// Bytes moved.
    pub len: u8,
    /// The sites it carries (indices into the analysis' sites), by address.
    pub members: Vec<usize>,
    /// Per member: where its patchable copy is in the stub, and its room.
    pub copies: Vec<(u8, u8)>,
    /// Where the stub runs (a cave).
    pub stub_addr: u64,
    /// The stub.
    pub stub: Vec<u8>,
    /// What the moved range becomes.
    pub jump: Vec<u8>,
    /// The trampoline, if the range is reached through one: its address and bytes.
    pub trampoline: Option<(u64, Vec<u8>)>,
    /// The detour (an index into the plans) whose moved range holds the trampoline, after its
    /// `jmp rel32`: the *host*, installed whenever this detour is ([`plan_hosted`]).
    pub host: Option<usize>,
}

/// The instruction starts before `at` (nearest first), up to `n`.
fn before(image: &Image, sweep: &Sweep, at: u64, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut cur = at;
    while out.len() < n {
        let Some(p) = (1..=15u64).filter_map(|k| cur.checked_sub(k)).find(|&p| {
            sweep.is_insn_start(p) && decode_at(image, p).is_some_and(|i| p + i.len() as u64 == cur)
        }) else {
            break;
        };
        out.push(p);
        cur = p;
    }
    out
}

/// The instruction ends after `at` (nearest first), up to `n`.
fn after(image: &Image, at: u64, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut cur = at;
    while out.len() < n {
        let Some(i) = decode_at(image, cur) else {
            break;
        };
        cur += i.len() as u64;
        out.push(cur);
    }
    out
}

/// A piece of padding that can hold trampolines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pad {
    /// Its free part's first byte.
    start: u64,
    /// One past its free part.
    end: u64,
    /// NOP padding: only its first byte is known to start an instruction, so it holds one
    /// trampoline, there.
    nops: bool,
}

/// The padding that can hold trampolines, found near the sites that need it: runs of `int3`
/// padding of 5 to [`super::caves::MIN_CAVE`] bytes inside `[_text, _etext)`, one ORC entry
/// covering each, nothing protected or named in them ([`super::caves::runs_near`]); and dead
/// NOP padding. The free part of each shrinks as trampolines are placed.
#[derive(Clone, Default)]
struct Pads {
    /// Sorted by start, apart.
    free: Vec<Pad>,
    /// The sites whose neighbourhood has been searched.
    looked: std::collections::BTreeSet<u64>,
    /// The `int3` runs whose pieces are in `free` (by start): each is added once, however
    /// many neighbourhoods it lies in.
    runs: std::collections::BTreeSet<u64>,
}

/// How far from a site NOP padding is looked for: a `jmp rel8`'s reach from any moved range
/// that contains the site.
const NOP_REACH: u64 = 127 + 2 + MAX_MOVED as u64;

impl Pads {
    /// Adds the padding within [`NOP_REACH`] of `at` (once per site): the `int3` runs, and
    /// dead NOPs right after an unconditional jump, return or `ud2`, up to the next other
    /// instruction, in `at`'s section, where nothing is protected, named or a branch target; at
    /// least 5 bytes.
    fn look_near(&mut self, image: &Image, sweep: &Sweep, guards: &Guards, orc: &Orc, at: u64) {
        if !self.looked.insert(at) {
            return;
        }
        let (near_lo, near_hi) = (at.saturating_sub(NOP_REACH), at.saturating_add(NOP_REACH));
        for (run, pieces) in
            super::caves::runs_near(image, guards, sweep, orc, 5, false, near_lo, near_hi)
        {
            if !self.runs.insert(run) {
                continue;
            }
            for c in pieces
                .into_iter()
                .filter(|c| c.len() < super::caves::MIN_CAVE)
            {
                let k = self.free.partition_point(|p| p.start < c.start);
                self.free.insert(
                    k,
                    Pad {
                        start: c.start,
                        end: c.end,
                        nops: false,
                    },
                );
            }
        }
        let Some(sec) = image.section_at(at) else {
            return;
        };
        let lo = near_lo.max(sec.addr);
        let hi = near_hi.min(sec.addr + sec.size);
        for a in lo..hi {
            if !sweep.is_insn_start(a) {
                continue;
            }
            let Some(i) = decode_at(image, a) else {
                continue;
            };
            // Only a jump or return that stays one: Linux may turn a jump its tables name into
            // a NOP (jump labels, alternatives) and fall into the padding, and a `ud2` may be a
            // WARN that carries on after it. Return thunks and retpolines stay jumps or returns.
            let ends_flow = matches!(
                i.flow_control(),
                FlowControl::UnconditionalBranch
                    | FlowControl::IndirectBranch
                    | FlowControl::Return
            ) && guards.overlapping(a, a + i.len() as u64).all(|g| {
                matches!(
                    g.why,
                    Why::Table(TableKind::ReturnSites | TableKind::RetpolineSites, _)
                )
            });
            if !ends_flow {
                continue;
            }
            // The dead NOPs up to the first protected byte or named start (6.12's pre-function
            // NOPs, which Linux may rewrite, follow the padding after a function's last jump).
            let start = a + i.len() as u64;
            let mut end = start;
            while end < hi && (end == start || !guards.is_named(end)) {
                match decode_at(image, end) {
                    Some(n)
                        if n.mnemonic() == Mnemonic::Nop
                            && guards.first_overlap(end, end + n.len() as u64).is_none() =>
                    {
                        end += n.len() as u64
                    }
                    _ => break,
                }
            }
            if end - start < 5
                || !sec.contains(end - 1)
                || guards.first_overlap(start, end).is_some()
                || guards.is_named(start)
                || guards.start_inside(sweep, start, end).is_some()
                || sweep.is_branch_target(start)
            {
                continue;
            }
            let k = self.free.partition_point(|p| p.start < start);
            let clash = self.free[k.saturating_sub(1)..]
                .iter()
                .take(2)
                .any(|p| p.start < end && start < p.end);
            if !clash {
                self.free.insert(
                    k,
                    Pad {
                        start,
                        end,
                        nops: true,
                    },
                );
            }
        }
    }
}

/// Plans the detours of every site of a stock kernel that needs one; fills in their rooms.
pub fn plan(
    image: &Image,
    sweep: &Sweep,
    guards: &Guards,
    sites: &mut [SiteInfo],
    orc: &Orc,
    alloc: &mut Allocator,
) -> Vec<DetourPlan> {
    let fresh = alloc.clone();
    let mut st = State {
        pads: Pads::default(),
        zone: Zone {
            entry: guards.entry_text(),
        },
        plans: Vec::new(),
        addr_of: sites.iter().map(|s| s.found.addr).collect(),
        taken: vec![false; sites.len()],
        moved: std::collections::BTreeMap::new(),
        tails: std::collections::BTreeMap::new(),
    };
    let mut failed = Vec::new();
    for i in 0..sites.len() {
        if !wants_detour(image, guards, &sites[i]) || st.taken[i] {
            continue;
        }
        let planned: Result<(DetourPlan, usize), Blocked> = plan_one(
            image,
            sweep,
            guards,
            sites,
            &st.addr_of,
            &st.taken,
            &st.moved,
            i,
            &mut st.pads,
            orc,
            st.zone,
            alloc,
        )
        .map(|p| (p, st.plans.len()))
        .or_else(|b| {
            // Hemmed in behind the previous detour: grow that one over this site instead.
            let prev = st
                .plans
                .last()
                .filter(|_| b.kind.ends_with("backward: another detour"));
            prev.and_then(|prev| {
                merge(
                    image,
                    sweep,
                    guards,
                    sites,
                    &st.addr_of,
                    &mut st.taken,
                    &mut st.moved,
                    prev,
                    i,
                    &mut st.pads,
                    orc,
                    st.zone,
                    alloc,
                )
            })
            .map(|p| (p, st.plans.len() - 1))
            .ok_or(b)
        });
        match planned {
            Ok((p, k)) => st.record(sites, p, k),
            Err(b) => {
                refuse(guards, &mut sites[i], b);
                failed.push(i);
            }
        }
    }
    // Second pass, once every other site has its range: the sites with no padding in reach
    // take a trampoline in a host's dead tail. Planned on copies, kept only if every stub can
    // then be laid out again in the order of the moved ranges (hosts on either side of their
    // sites break the order the first pass gave).
    let mut hosted = st.clone();
    let mut sites2 = sites.to_vec();
    let mut probe = alloc.clone();
    for i in failed {
        if sites2[i].room.pinned || hosted.taken[i] {
            continue;
        }
        let Some((host, p)) =
            plan_hosted(image, sweep, guards, &sites2, &hosted, i, orc, &mut probe)
        else {
            continue;
        };
        if let Some(h) = host {
            hosted.moved.insert(h.start, h.start + h.len as u64);
            hosted.plans.push(h);
        }
        let k = hosted.plans.len();
        hosted.record(&mut sites2, p, k);
    }
    if hosted.plans.len() > st.plans.len() {
        let mut again = fresh;
        if let Some(laid) = lay_out(image, &sites2, &hosted.plans, hosted.zone, &mut again) {
            sites.clone_from_slice(&sites2);
            *alloc = again;
            return laid;
        }
    }
    st.plans
}

/// Whether site `s` is one to plan a detour for: rewritable, too small for a call (or in the
/// entry text, where no call is allowed), not in code Linux checks by address or copies.
fn wants_detour(image: &Image, guards: &Guards, s: &SiteInfo) -> bool {
    let entry = guards.entry_text();
    let in_entry = entry.is_some_and(|e| e.contains(s.found.addr));
    s.rewritable()
        && (s.room.in_place < 5 || in_entry)
        && s.room.forms.contains(&Outcome::Inline)
        && !entry.is_some_and(|e| {
            e.ip_checked(s.found.addr, s.found.addr + s.found.len as u64)
                .is_some()
        })
        && super::runs_elsewhere(image, s.found.addr).is_none()
}

/// What the planner has placed so far.
#[derive(Clone)]
struct State<'a> {
    pads: Pads,
    zone: Zone<'a>,
    plans: Vec<DetourPlan>,
    /// Every site's address, by index.
    addr_of: Vec<u64>,
    /// Sites carried by a detour.
    taken: Vec<bool>,
    /// Moved ranges and trampolines planned so far: no two may share a byte.
    moved: std::collections::BTreeMap<u64, u64>,
    /// Hosts' dead tails: by host start, the first byte free for the next trampoline.
    tails: std::collections::BTreeMap<u64, u64>,
}

impl State<'_> {
    /// Records detour `p` as plan `k` (a new one, or the one it grew) and gives its sites their
    /// room.
    fn record(&mut self, sites: &mut [SiteInfo], p: DetourPlan, k: usize) {
        self.moved.insert(p.start, p.start + p.len as u64);
        match (&p.trampoline, p.host) {
            // The host's dead tail: its next trampoline goes after this one.
            (Some((t, _)), Some(h)) => {
                self.tails.insert(self.plans[h].start, t + 5);
            }
            // A trampoline in NOP padding must not be moved by a later detour.
            (Some((t, _)), None) => {
                self.moved.insert(*t, t + 5);
            }
            _ => {}
        }
        for (n, &m) in p.members.iter().enumerate() {
            self.taken[m] = true;
            let site = &mut sites[m];
            let off = (site.found.addr - p.start) as u8;
            let direction = if p.members.len() == 1 && off == 0 {
                Direction::Forward
            } else if site.found.addr + site.found.len as u64 == p.start + p.len as u64 {
                Direction::Backward
            } else {
                Direction::Around
            };
            site.room.detour = Some(Moved {
                start: p.start,
                len: p.len,
                site_off: off,
                direction,
                group: Some(k),
                copy: Some(p.copies[n]),
            });
            if !site.room.forms.contains(&Outcome::Detour) {
                site.room.forms.push(Outcome::Detour);
            }
            site.room.reason = None;
            site.room.why = None;
        }
        if k == self.plans.len() {
            self.plans.push(p);
        } else {
            self.plans[k] = p;
        }
    }
}

/// Says why site `s` has no detour (`b`), and whether Linux's own layout is the reason.
fn refuse(guards: &Guards, s: &mut SiteInfo, b: Blocked) {
    let (a, len) = (s.found.addr, s.found.len as u64);
    // One byte fenced by what Linux names: no jump fits without overwriting the byte after
    // it, and none may start before it (the byte before is protected, or the site is an
    // instruction start Linux's symbols or tables name).
    let fenced = |at: u64| {
        guards
            .first_overlap(at, at + 1)
            .map(|g| format!("protected ({})", kind_of(&g.why)))
    };
    let before = if guards.is_named(a) {
        Some("a named instruction start".to_owned())
    } else {
        fenced(a.wrapping_sub(1))
    };
    match (len, before, fenced(a + len)) {
        (1, Some(before), Some(after)) => {
            s.room.reason = Some(format!(
                "one byte, fenced: {before} before it, {after} after it; any jump written \
                 here overwrites the byte after it"
            ));
            s.room.why = Some(format!("one byte, fenced: {before}; {after}"));
            s.room.pinned = true;
        }
        _ => {
            s.room.reason = Some(format!("no detour: {}", b.message));
            s.room.why = Some(b.kind);
        }
    }
}

/// The plans again, each stub built anew in a fresh `alloc` in the order of the moved ranges
/// (the ABI's), with the same ranges, members, trampolines and hosts; `None` if one no longer
/// fits (it cannot, with the same stubs in the same caves, but the planner does not assume it).
fn lay_out(
    image: &Image,
    sites: &[SiteInfo],
    plans: &[DetourPlan],
    zone: Zone<'_>,
    alloc: &mut Allocator,
) -> Option<Vec<DetourPlan>> {
    let mut order: Vec<usize> = (0..plans.len()).collect();
    order.sort_by_key(|&k| plans[k].start);
    let mut out = plans.to_vec();
    for k in order {
        let p = &plans[k];
        let w = Window {
            start: p.start,
            end: p.start + p.len as u64,
            members: p.members.clone(),
        };
        let jump = p
            .trampoline
            .as_ref()
            .map_or(Jump::Direct, |t| Jump::Trampoline(t.0));
        let mut again = build(image, sites, w, jump, zone, alloc).ok()?;
        again.host = p.host;
        if again.copies != p.copies || again.stub.len() != p.stub.len() {
            return None;
        }
        out[k] = again;
    }
    Some(out)
}

/// Where a detour's pieces may go, by where its moved range is: Linux's entry text keeps its
/// stubs and trampolines in the pages PTI maps with it, moves no call, never crosses its edges
/// and leaves alone the code Linux recognises by address ([`EntryText`]).
#[derive(Clone, Copy)]
struct Zone<'a> {
    entry: Option<&'a EntryText>,
}

impl Zone<'_> {
    fn in_entry(&self, a: u64) -> bool {
        self.entry.is_some_and(|e| e.contains(a))
    }

    /// Whether `[start, end)` may move as far as the entry text is concerned.
    fn window(&self, start: u64, end: u64) -> Result<(), Blocked> {
        let Some(e) = self.entry else {
            return Ok(());
        };
        if self.in_entry(start) != self.in_entry(end - 1) || (start < e.start && end > e.end) {
            return Err(blocked(
                "entry text edge",
                format!("[{start:#x}, {end:#x}) crosses the entry text's edge"),
            ));
        }
        match e.ip_checked(start, end) {
            Some(why) => Err(blocked(
                "entry text: address checked by Linux",
                format!("[{start:#x}, {end:#x}) overlaps {why}"),
            )),
            None => Ok(()),
        }
    }

    /// Whether a trampoline at `t` may serve a moved range at `from`.
    fn trampoline(&self, from: u64, t: u64) -> bool {
        match self.entry {
            None => true,
            Some(e) => {
                e.ip_checked(t, t + 5).is_none()
                    && (!e.contains(from) || (e.mapped.0 <= t && t + 5 <= e.mapped.1))
            }
        }
    }

    /// Where the stub of a moved range at `from` may go.
    fn stubs(&self, from: u64) -> (u64, u64) {
        match self.entry {
            Some(e) if e.contains(from) => e.mapped,
            _ => (0, u64::MAX),
        }
    }
}

/// A window around site `i`: `[start, end)` with the sites it carries.
#[derive(Clone)]
struct Window {
    start: u64,
    end: u64,
    members: Vec<usize>,
}

/// Checks a window: every instruction in it movable or a free rewritable site; nothing
/// protected; nothing jumps in, except (`internal`) from the window itself, to a target
/// nothing else jumps to or names (a loop moved whole).
#[allow(clippy::too_many_arguments)]
fn check_window(
    image: &Image,
    sweep: &Sweep,
    guards: &Guards,
    sites: &[SiteInfo],
    addr_of: &[u64],
    taken: &[bool],
    moved: &std::collections::BTreeMap<u64, u64>,
    zone: Zone<'_>,
    start: u64,
    end: u64,
    internal: bool,
) -> Result<Window, Blocked> {
    zone.window(start, end)?;
    // A site before the range whose room in place reaches into it (its record covers those
    // bytes: a rewrite in place would write them). Records do not overlap, so only the last
    // one before the range can.
    if let Some(s) = sites[..addr_of.partition_point(|&a| a < start)].last()
        && record_end(s) > start
    {
        return Err(blocked(
            "another site's room",
            format!(
                "{start:#x} is in the room in place of the site at {:#x}",
                s.found.addr
            ),
        ));
    }
    if let Some((a, _)) = moved.range(..end).next_back().filter(|(_, e)| **e > start) {
        return Err(blocked(
            "another detour",
            format!("{a:#x} is used by another detour"),
        ));
    }
    let mut members = Vec::new();
    // Targets of the range's own branches: they may lie inside it (a loop moved whole).
    let mut targets = Vec::new();
    let mut at = start;
    while at < end {
        if let Ok(k) = addr_of.binary_search(&at) {
            let s = &sites[k];
            if taken[k] || !s.rewritable() || s.room.pinned {
                return Err(blocked(
                    "another site",
                    format!("{at:#x} is a site that cannot share a detour"),
                ));
            }
            members.push(k);
            at += s.found.len as u64;
            continue;
        }
        let i = super::unmovable(image, at)?;
        at += i.len() as u64;
        // Only a branch the sweep decoded there is the one it counted.
        if internal
            && (i.is_jcc_short_or_near() || i.is_jmp_short_or_near())
            && sweep.is_insn_start(i.ip())
        {
            targets.push(i.near_branch_target());
        }
        if i.is_call_near() && zone.in_entry(start) {
            return Err(blocked(
                "call in entry text",
                format!(
                    "{:#x} is a call in the entry text (its stack may not be usable)",
                    i.ip()
                ),
            ));
        }
        if i.is_call_near() && at != end {
            return Err(blocked(
                "call inside",
                format!(
                    "{:#x} is a call that would return into the moved range",
                    i.ip()
                ),
            ));
        }
    }
    if at != end {
        return Err(blocked(
            "undecodable",
            format!("{end:#x} is not an instruction boundary"),
        ));
    }
    check_range(image, sweep, guards, start, end, &targets)?;
    Ok(Window {
        start,
        end,
        members,
    })
}

/// A trampoline slot [`trampoline`] found: its address, and the padding it comes out of.
#[derive(Clone, Copy)]
struct Slot {
    at: u64,
    pad: usize,
}

impl Slot {
    /// Takes the slot out of `pads` (once the detour that uses it is built).
    fn take(self, pads: &mut Pads) {
        let Some(p) = pads.free.get_mut(self.pad) else {
            return;
        };
        if p.nops {
            p.start = p.end;
        } else if self.at == p.start {
            p.start += 5;
        } else {
            p.end -= 5;
        }
    }
}

/// The nearest free trampoline slot reachable by a `jmp rel8` at `start` (left in `pads`: see
/// [`Slot::take`]). The ORC entry that covers the slot must be undefined (an unwind from there
/// stops) or the very entry that covers `start` (an unwind from there is the one from the site).
fn trampoline(
    pads: &Pads,
    orc: &Orc,
    moved: &std::collections::BTreeMap<u64, u64>,
    zone: Zone<'_>,
    start: u64,
) -> Option<Slot> {
    let site = orc.covering(start);
    let free = |t: u64| {
        moved
            .range(..t + 5)
            .next_back()
            .is_none_or(|(_, e)| *e <= t)
    };
    let sound = |t: u64| {
        free(t)
            && zone.trampoline(start, t)
            && orc
                .covering(t)
                .is_some_and(|e| Orc::undefined(&e) || Some(e) == site)
    };
    let reach = |t: u64| (t as i128 - (start as i128 + 2)).unsigned_abs() <= 127 && sound(t);
    let lo = pads.free.partition_point(|p| p.end + 128 < start);
    pads.free[lo..]
        .iter()
        .enumerate()
        .take_while(|(_, p)| p.start <= start + 130)
        .filter(|(_, p)| p.end - p.start >= 5)
        .filter_map(|(k, p)| {
            // The slot: the free part's start, or (in `int3`s) its end minus 5, whichever is
            // reachable.
            let last = if p.nops { p.start } else { p.end - 5 };
            [p.start, last]
                .into_iter()
                .find(|&t| reach(t))
                .map(|t| (t.abs_diff(start), t, lo + k))
        })
        .min_by_key(|(d, t, _)| (*d, *t))
        .map(|(_, at, pad)| Slot { at, pad })
}

/// Every range of whole instructions around site `f` that could move, by preference: direct
/// (at least 5 bytes) before through a trampoline, then fewest bytes, then fewest before the
/// site: `(needs a trampoline, length, bytes before the site, start)`.
fn windows(image: &Image, sweep: &Sweep, f: &crate::sweep::Found) -> Vec<(bool, u64, u64, u64)> {
    let site_end = f.addr + f.len as u64;
    let befores = before(image, sweep, f.addr, 4);
    let afters = after(image, site_end, 6);
    let mut out = Vec::new();
    for b in std::iter::once(f.addr).chain(befores.iter().copied()) {
        for e in std::iter::once(site_end).chain(afters.iter().copied()) {
            let len = e - b;
            if (2..=MAX_MOVED as u64).contains(&len) {
                out.push((len < 5, len, f.addr - b, b));
            }
        }
    }
    out.sort_unstable();
    out
}

#[allow(clippy::too_many_arguments)]
fn plan_one(
    image: &Image,
    sweep: &Sweep,
    guards: &Guards,
    sites: &[SiteInfo],
    addr_of: &[u64],
    taken: &[bool],
    moved: &std::collections::BTreeMap<u64, u64>,
    i: usize,
    pads: &mut Pads,
    orc: &Orc,
    zone: Zone<'_>,
    alloc: &mut Allocator,
) -> Result<DetourPlan, Blocked> {
    let f = &sites[i].found;
    let site_end = f.addr + f.len as u64;
    let candidates = windows(image, sweep, f);
    if candidates.iter().any(|c| c.0) {
        pads.look_near(image, sweep, guards, orc, f.addr);
    }
    let mut first_fwd: Option<Blocked> = None;
    let mut first_back: Option<Blocked> = None;
    // A window that moves a branch target (with every branch to it) only when no other will:
    // the fewer instructions a stub re-encodes, the better.
    for internal in [false, true] {
        for &(needs_tramp, len, _, start) in &candidates {
            let end = start + len;
            let w = match check_window(
                image, sweep, guards, sites, addr_of, taken, moved, zone, start, end, internal,
            ) {
                Ok(w) => w,
                Err(b) => {
                    if start == f.addr && first_fwd.is_none() {
                        first_fwd = Some(b);
                    } else if end == site_end && first_back.is_none() {
                        first_back = Some(b);
                    }
                    continue;
                }
            };
            let slot = if needs_tramp {
                let Some(t) = trampoline(pads, orc, moved, zone, start) else {
                    if first_fwd.is_none() && start == f.addr {
                        first_fwd = Some(blocked(
                            "no padding in reach",
                            format!("no padding within a jmp rel8 of {start:#x}"),
                        ));
                    }
                    continue;
                };
                Some(t)
            } else {
                None
            };
            return build_taking(image, sites, w, slot, pads, zone, alloc);
        }
    }
    let fwd = first_fwd.unwrap_or_else(|| blocked("too long", "no forward range".into()));
    let back = first_back.unwrap_or_else(|| blocked("too long", "no backward range".into()));
    Err(Blocked {
        message: format!("forward: {}; backward: {}", fwd.message, back.message),
        kind: format!("forward: {}; backward: {}", fwd.kind, back.kind),
    })
}

/// The shortest moved range a host may have: the `jmp rel32` its installation writes, then a
/// trampoline's 5 bytes.
const MIN_HOST: u64 = 10;

/// Where site `s`'s record ends: its room in place, or its instruction if longer.
fn record_end(s: &SiteInfo) -> u64 {
    s.found.addr + s.found.len.max(s.room.in_place) as u64
}

/// Whether `[a, b)` overlaps a site's record (the site and its room in place).
fn over_site(sites: &[SiteInfo], addr_of: &[u64], a: u64, b: u64) -> bool {
    // Sites are sorted by address, and a record is at most 255 bytes.
    let from = addr_of.partition_point(|&x| x + 256 <= a);
    sites[from..]
        .iter()
        .take_while(|s| s.found.addr < b)
        .any(|s| record_end(s) > a)
}

/// A detour for site `i` when every range that could move needs a trampoline and no padding is
/// in reach: through a trampoline in the dead tail of a *host*, another detour's moved range
/// after the `jmp rel32` its installation writes (nothing runs those bytes once it is
/// installed, and a runtime installs the host whenever it installs this detour). The host is a
/// detour planned already, or a new one that carries no site (*eviction*, in E9Patch's terms:
/// instructions moved only to make room) on either side of the site's range; it runs once every
/// other site has its range, so that a host takes no range a site could have had. The
/// trampoline is vouched for by ORC as in padding: the entry that covers it is undefined or
/// equal to the one that covers the moved range. Returns the new host, if one was made, and the
/// detour.
#[allow(clippy::too_many_arguments)]
fn plan_hosted(
    image: &Image,
    sweep: &Sweep,
    guards: &Guards,
    sites: &[SiteInfo],
    st: &State<'_>,
    i: usize,
    orc: &Orc,
    alloc: &mut Allocator,
) -> Option<(Option<DetourPlan>, DetourPlan)> {
    let f = &sites[i].found;
    let (zone, addr_of, taken, moved) = (st.zone, &st.addr_of, &st.taken, &st.moved);
    let short = windows(image, sweep, f).into_iter().filter(|w| w.0);
    for (_, len, _, start) in short {
        let end = start + len;
        let Ok(w) = check_window(
            image, sweep, guards, sites, addr_of, taken, moved, zone, start, end, false,
        ) else {
            continue;
        };
        let site_orc = orc.covering(start);
        let slot_ok = |t: u64| {
            (t as i128 - (start as i128 + 2)).unsigned_abs() <= 127
                && zone.trampoline(start, t)
                && orc
                    .covering(t)
                    .is_some_and(|e| Orc::undefined(&e) || Some(e) == site_orc)
                && !over_site(sites, addr_of, t, t + 5)
        };
        // A detour planned already, the nearest first (the second pass appends to the plans:
        // they are not in address order).
        let existing = st
            .plans
            .iter()
            .enumerate()
            .filter(|(_, p)| p.start.abs_diff(start) <= 140)
            .filter(|(_, p)| p.len as u64 >= MIN_HOST && p.trampoline.is_none())
            .filter_map(|(k, p)| {
                let t = st.tails.get(&p.start).copied().unwrap_or(p.start + 5);
                (t + 5 <= p.start + p.len as u64 && slot_ok(t)).then_some((k, t))
            })
            .min_by_key(|(_, t)| t.abs_diff(start));
        if let Some((k, t)) = existing
            && let Ok(mut p) = build(image, sites, w.clone(), Jump::Trampoline(t), zone, alloc)
        {
            p.host = Some(k);
            return Some((None, p));
        }
        // A new host: a range of whole instructions that carries no site, the nearest first.
        let mut hosts: Vec<u64> = (start.saturating_sub(130)..start + 125)
            .filter(|&h| (h + MIN_HOST <= start || h >= end) && sweep.is_insn_start(h))
            .collect();
        hosts.sort_by_key(|&h| (h.abs_diff(start), h));
        for h in hosts {
            if !slot_ok(h + 5) {
                continue;
            }
            let ends = after(image, h, 8).into_iter().filter(|&e| {
                e - h >= MIN_HOST && e - h <= MAX_MOVED as u64 && (e <= start || h >= end)
            });
            for e in ends {
                if over_site(sites, addr_of, h, e) {
                    break;
                }
                let Ok(hw) = check_window(
                    image, sweep, guards, sites, addr_of, taken, moved, zone, h, e, false,
                ) else {
                    continue;
                };
                if !hw.members.is_empty() {
                    continue;
                }
                let Ok(host) = build(image, sites, hw, Jump::Direct, zone, alloc) else {
                    continue;
                };
                let jump = Jump::Trampoline(h + 5);
                let Ok(mut p) = build(image, sites, w.clone(), jump, zone, alloc) else {
                    continue;
                };
                p.host = Some(st.plans.len());
                return Some((Some(host), p));
            }
        }
    }
    None
}

/// Grows detour `prev` (planned before site `i`, ending before it) over site `i` and what
/// lies between: one moved range, one stub, `prev`'s members and `i` sharing it. `prev`'s moved
/// range and trampoline are released while the larger range is checked and restored if it
/// fails; its stub's cave space is not reused.
#[allow(clippy::too_many_arguments)]
fn merge(
    image: &Image,
    sweep: &Sweep,
    guards: &Guards,
    sites: &[SiteInfo],
    addr_of: &[u64],
    taken: &mut [bool],
    moved: &mut std::collections::BTreeMap<u64, u64>,
    prev: &DetourPlan,
    i: usize,
    pads: &mut Pads,
    orc: &Orc,
    zone: Zone<'_>,
    alloc: &mut Allocator,
) -> Option<DetourPlan> {
    let f = &sites[i].found;
    let site_end = f.addr + f.len as u64;
    // A hosted trampoline stays with the range it was found for (its host's tail is not in
    // `moved` apart from the host).
    if prev.start + prev.len as u64 > f.addr || prev.host.is_some() {
        return None;
    }
    let release = |taken: &mut [bool], moved: &mut std::collections::BTreeMap<u64, u64>, on| {
        for &m in &prev.members {
            taken[m] = on;
        }
        if on {
            moved.insert(prev.start, prev.start + prev.len as u64);
            if let Some((t, _)) = &prev.trampoline {
                moved.insert(*t, t + 5);
            }
        } else {
            moved.remove(&prev.start);
            if let Some((t, _)) = &prev.trampoline {
                moved.remove(t);
            }
        }
    };
    release(taken, moved, false);
    let ends = std::iter::once(site_end).chain(after(image, site_end, 6));
    for end in ends.take_while(|&e| e - prev.start <= MAX_MOVED as u64) {
        let Ok(w) = check_window(
            image, sweep, guards, sites, addr_of, taken, moved, zone, prev.start, end, false,
        ) else {
            continue;
        };
        let slot = if end - prev.start >= 5 {
            None
        } else {
            pads.look_near(image, sweep, guards, orc, f.addr);
            let Some(t) = trampoline(pads, orc, moved, zone, prev.start) else {
                continue;
            };
            Some(t)
        };
        if let Ok(p) = build_taking(image, sites, w, slot, pads, zone, alloc) {
            return Some(p);
        }
    }
    release(taken, moved, true);
    None
}

/// [`build`], through the trampoline `slot` if there is one, which is taken from `pads` only
/// if the detour is built (a failed build leaves the padding for another).
fn build_taking(
    image: &Image,
    sites: &[SiteInfo],
    w: Window,
    slot: Option<Slot>,
    pads: &mut Pads,
    zone: Zone<'_>,
    alloc: &mut Allocator,
) -> Result<DetourPlan, Blocked> {
    let jump = slot.map_or(Jump::Direct, |s| Jump::Trampoline(s.at));
    let built = build(image, sites, w, jump, zone, alloc)?;
    if let Some(s) = slot {
        s.take(pads);
    }
    Ok(built)
}

fn build(
    image: &Image,
    sites: &[SiteInfo],
    w: Window,
    jump: Jump,
    zone: Zone<'_>,
    alloc: &mut Allocator,
) -> Result<DetourPlan, Blocked> {
    let len = (w.end - w.start) as usize;
    let code = image
        .read(w.start, len)
        .ok_or_else(|| blocked("unreadable", "the moved range cannot be read".into()))?;
    let copies: Vec<Copy> = w
        .members
        .iter()
        .map(|&m| {
            let f = &sites[m].found;
            Copy {
                off: (f.addr - w.start) as usize,
                insn_len: f.len as usize,
                len: (f.len as usize).max(5),
            }
        })
        .collect();
    let fail = |e: detour::DetourError| blocked("stub not encodable", e.to_string());
    // Lengths do not depend on the address: size it, place it, build it there.
    let probe = detour::build_group(code, w.start, &copies, w.start, jump).map_err(fail)?;
    if probe.stub.len() > pvpatch_isa::encode::MAX_SEQ {
        return Err(blocked(
            "stub too long",
            format!("its stub would be {} bytes", probe.stub.len()),
        ));
    }
    let (lo, hi) = zone.stubs(w.start);
    let at = alloc
        .alloc_within(probe.stub.len() as u64, lo, hi)
        .ok_or_else(|| {
            if hi == u64::MAX {
                blocked("no cave space", "no cave space left".into())
            } else {
                blocked(
                    "no cave space in the entry text's pages",
                    format!("no cave space left in [{lo:#x}, {hi:#x}), which PTI maps"),
                )
            }
        })?;
    let g = detour::build_group(code, w.start, &copies, at, jump).map_err(fail)?;
    Ok(DetourPlan {
        start: w.start,
        len: len as u8,
        members: w.members,
        copies: g
            .copies
            .iter()
            .zip(&copies)
            .map(|(off, c)| (*off, c.len as u8))
            .collect(),
        stub_addr: at,
        stub: g.stub,
        jump: g.site,
        trampoline: match (jump, g.trampoline) {
            (Jump::Trampoline(t), Some(b)) => Some((t, b)),
            _ => None,
        },
        host: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pvpatch_testkit::elf::{TEXT, build as elf};

    /// A trampoline slot found for a range whose detour then fails to build stays free for the
    /// next site (it used to be taken before the build).
    #[test]
    fn a_failed_build_leaves_its_trampoline_slot_free() {
        let mut code = vec![0xfa, 0x90];
        code.resize(48, 0xcc);
        let img = Image::from_bytes("t.elf", elf(&code, &[("f", 0, 2)], &[])).unwrap();
        let pad = Pad {
            start: TEXT + 16,
            end: TEXT + 32,
            nops: false,
        };
        let mut pads = Pads {
            free: vec![pad],
            ..Pads::default()
        };
        let slot = Slot {
            at: TEXT + 16,
            pad: 0,
        };
        // No cave space: the build fails.
        let w = Window {
            start: TEXT,
            end: TEXT + 2,
            members: Vec::new(),
        };
        let mut alloc = Allocator::new(Vec::new());
        let zone = Zone { entry: None };
        let built = build_taking(&img, &[], w, Some(slot), &mut pads, zone, &mut alloc);
        assert!(built.is_err_and(|b| b.kind == "no cave space"));
        assert_eq!(pads.free, vec![pad], "the failed build took the slot");
        // The slot is one that taking changes.
        slot.take(&mut pads);
        assert_eq!(pads.free[0].start, TEXT + 21);
    }
}
