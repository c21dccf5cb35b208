//! Planning: the patcher proper, shaped like Linux's `apply_alternatives` with the checks it
//! lacks. Nothing is written here ([`crate::apply`] writes a plan).
//!
//! 1. **Validate** (before anything is written): the table has been parsed and checked (inside
//!    the kernel's text, no overlap, lengths, operand forms); now every site's current bytes
//!    must hold what its record says. One record that does not match refuses the whole table.
//! 2. **Plan** every site in a buffer: the backend's choice, its operands substituted, padded
//!    with recommended NOPs, and checked by decoding it back.
//!
//! One pass per site: its bytes are read once, its native instruction encoded once (the check
//! of the original bytes, the native rewrite and the fallback all use that encoding), and what
//! is built is decoded once.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use patch_sites::op::Kind;
use patch_sites::table::{
    Detour, DetourArea, Form, Member, SITE_FLAG_NO_STACK, Site, SiteTable, TableError,
};
use patch_sites::{Op, Outcome, RegSet};
use pvpatch_isa::asm::Asm;
use pvpatch_isa::check::{self, Mismatch, StubCopy};
use pvpatch_isa::encode::{self, Seq};
use pvpatch_isa::sequence::may_change;

use crate::backend::{Backend, Choice};

/// Why a site was left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// It already holds what the backend wants.
    AlreadyThere,
    /// Its op is unknown to this runtime.
    UnknownOp,
    /// Control transfers and hypervisor interfaces are never rewritten.
    NotRewritable,
    /// What the backend wants does not fit; the native instruction stays.
    NoRoom,
    /// The operand cannot be put into the backend's template.
    Operand,
    /// The native instruction cannot be encoded (an operand the record cannot describe).
    NotEncodable,
    /// The backend's sequence clobbers registers or flags the site's code does not allow
    /// (beyond the op's outputs and what it leaves undefined).
    Clobbers,
    /// The site may run with no usable stack (`SITE_FLAG_NO_STACK`) and the backend's
    /// sequence calls, pushes or traps.
    NoStack,
}

/// One site, planned.
#[derive(Clone, Copy, Debug)]
pub struct Planned {
    /// Index in the table.
    pub index: u32,
    /// The site.
    pub site: Site,
    /// Where the bytes are written (the stub for a detour).
    pub addr: u64,
    /// The bytes there now.
    pub old: Seq,
    /// The bytes to write (equal to `old` when unchanged).
    pub new: Seq,
    /// What becomes of it.
    pub outcome: Outcome,
    /// Why it is unchanged, when it is.
    pub keep: Option<Keep>,
    /// The load-time detour whose stub holds the rewrite (`addr` is then the site's copy in
    /// the stub, written as part of [`PlannedDetour::stub`]).
    pub detour: Option<u16>,
}

/// One write: what is at `addr` now, and what goes there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    /// The record it is for (a detour's: its first rewritten site's).
    pub index: u32,
    /// Where.
    pub addr: u64,
    /// The bytes there now.
    pub old: Seq,
    /// The bytes to write.
    pub new: Seq,
}

/// A load-time detour to install: its stub (with its sites' rewrites in their copies) into its
/// cave, its trampoline, and the `jmp` over its moved range (written last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedDetour {
    /// Its index in the table's detour area.
    pub index: u16,
    /// The stub.
    pub stub: Write,
    /// The trampoline, if any, unless it lies in a host's moved range (whose write holds it).
    pub tramp: Option<Write>,
    /// The moved range.
    pub moved: Write,
    /// The detour whose moved range holds the trampoline (its dead tail), installed with this
    /// one and before it.
    pub host: Option<u16>,
    /// Whether its moved range holds another detour's trampoline (its `jmp` is written before
    /// the other detours' `jmp`s).
    pub is_host: bool,
}

impl Planned {
    /// Whether the site changes.
    pub fn changed(&self) -> bool {
        self.new != self.old
    }
}

impl PlannedDetour {
    /// Its writes, in the order they are made (the moved range last: it activates the detour).
    pub fn writes(&self) -> impl Iterator<Item = &Write> {
        core::iter::once(&self.stub)
            .chain(self.tramp.as_ref())
            .chain(core::iter::once(&self.moved))
    }
}

/// Out-of-line code the backend needs in the kernel's text (a ROM's entry points, generated
/// thunks, copied into the table's arena).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CodeWrite {
    /// Where.
    pub addr: u64,
    /// The bytes there now.
    pub old: Vec<u8>,
    /// The code.
    pub new: Vec<u8>,
}

/// A plan for the whole table.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Every site, in table order.
    pub sites: Vec<Planned>,
    /// The load-time detours to install.
    pub detours: Vec<PlannedDetour>,
    /// The backend's out-of-line code.
    pub code: Vec<CodeWrite>,
}

impl Plan {
    /// Whether any site changes.
    pub fn changes_any(&self) -> bool {
        self.sites.iter().any(Planned::changed)
    }

    /// Takes the backend's out-of-line code ([`crate::arena::prepare`]'s write) into the plan,
    /// if any site changes: nothing calls it otherwise. The planner checks a deferred detour
    /// area before any plan that will take code ([`plan`]).
    pub fn take_code(&mut self, write: Option<CodeWrite>) {
        if self.changes_any() {
            self.code = write.into_iter().collect();
        }
    }

    /// The sites that will be written in place (a site rewritten in a detour's stub is written
    /// with the stub).
    pub fn changes(&self) -> impl Iterator<Item = &Planned> {
        self.sites
            .iter()
            .filter(|p| p.changed() && p.detour.is_none())
    }

    /// Every write of the plan, in the order they are made: code, then each detour's stub and
    /// trampoline, then the sites in place, then each detour's `jmp`, hosts' first. (Code writes are
    /// separate: they are not [`Seq`]s.)
    pub fn writes(&self) -> impl Iterator<Item = Write> + '_ {
        let stubs = self
            .detours
            .iter()
            .flat_map(|d| core::iter::once(d.stub).chain(d.tramp));
        let sites = self.changes().map(|p| Write {
            index: p.index,
            addr: p.addr,
            old: p.old,
            new: p.new,
        });
        // Hosts' moved ranges (with the trampolines they hold) before the jumps to them.
        stubs
            .chain(sites)
            .chain(self.detours_by_host(true).map(|d| d.moved))
    }

    /// The detours, hosts first (`true`: the order they are installed in) or last (`false`:
    /// the order they are taken away in).
    pub fn detours_by_host(&self, hosts_first: bool) -> impl Iterator<Item = &PlannedDetour> {
        let first = self
            .detours
            .iter()
            .filter(move |d| d.is_host == hosts_first);
        first.chain(
            self.detours
                .iter()
                .filter(move |d| d.is_host != hosts_first),
        )
    }
}

/// Why a table cannot be patched at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// A site's bytes cannot be read.
    Unreadable {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
    },
    /// A site does not hold what its record says.
    Mismatch {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
        /// How.
        mismatch: Mismatch,
    },
    /// A site of an op whose native instruction is wrong on this backend cannot take the
    /// backend's sequence (too little room, or an operand it has no entry point for).
    MustRewrite {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
        /// The op.
        op: Op,
    },
    /// A load-time detour cannot be installed: its moved range is not what the table saw
    /// (checksum), its cave or trampoline is not free padding, or its stub does not do
    /// what the moved instructions did.
    Detour {
        /// The detour's index.
        index: u16,
        /// What is wrong.
        problem: DetourProblem,
    },
    /// The table's detour area, left unchecked by a deferring parse, fails its check.
    Table(TableError),
    /// What the planner built for a site does not decode as intended (a bug, caught).
    BadSequence {
        /// Record index.
        index: u32,
        /// Address.
        addr: u64,
        /// How.
        mismatch: Mismatch,
    },
}

/// Why a detour cannot be installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetourProblem {
    /// Its moved range or cave cannot be read.
    Unreadable,
    /// The moved range's bytes are not the ones its checksum describes.
    MovedChanged,
    /// Its cave holds something other than `int3` padding, or its trampoline something other
    /// than `int3` or NOP padding.
    NotFree(u64),
    /// Its stub does not do what the moved instructions did.
    Stub(Mismatch),
    /// A jump to it cannot be encoded.
    Unreachable,
}

impl fmt::Display for DetourProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DetourProblem::Unreadable => f.write_str("its moved range or cave cannot be read"),
            DetourProblem::MovedChanged => {
                f.write_str("the moved range is not what the table was written for")
            }
            DetourProblem::NotFree(a) => write!(f, "{a:#x} is not free padding"),
            DetourProblem::Stub(m) => write!(f, "its stub is not the moved code: {m}"),
            DetourProblem::Unreachable => f.write_str("a jump to its stub cannot be encoded"),
        }
    }
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Unreadable { index, addr } => {
                write!(f, "record {index}: the site at {addr:#x} cannot be read")
            }
            PlanError::Mismatch {
                index,
                addr,
                mismatch,
            } => {
                write!(f, "record {index}: the site at {addr:#x} {mismatch}")
            }
            PlanError::BadSequence {
                index,
                addr,
                mismatch,
            } => {
                write!(
                    f,
                    "record {index}: the sequence built for {addr:#x} {mismatch}"
                )
            }
            PlanError::Detour { index, problem } => write!(f, "detour {index}: {problem}"),
            PlanError::Table(e) => write!(f, "site table invalid: {e}"),
            PlanError::MustRewrite { index, addr, op } => write!(
                f,
                "record {index}: the {op} at {addr:#x} cannot take the backend's sequence, and \
                 its native instruction is wrong on this backend"
            ),
        }
    }
}

/// `ud2`, the trap instruction where two bytes fit.
pub const UD2: [u8; 2] = [0x0f, 0x0b];

/// Reads kernel text.
pub trait TextRead {
    /// Copies `out.len()` bytes at `addr` into `out`; `false` if they cannot be read.
    fn read(&self, addr: u64, out: &mut [u8]) -> bool;
}

/// Overrides the backend's choice for particular sites (benchmarks force traps this way).
pub type Override<'o, 'a> = &'o dyn Fn(u32, &Site) -> Option<Choice<'a>>;

/// Plans every site of `table` for `backend`. Nothing is written.
pub fn plan(
    table: &SiteTable<'_>,
    backend: &Backend<'_>,
    text: &dyn TextRead,
    force: Option<Override<'_, '_>>,
) -> Result<Plan, PlanError> {
    let mut sites = Vec::with_capacity(table.len());
    for (i, site) in table.sites().enumerate() {
        sites.push(plan_site(i as u32, site, backend, text, force, table)?);
    }
    // A deferring parse leaves the detour area unchecked: a plan that uses any of it (a detour,
    // or the arena for the backend's out-of-line code, which goes in with any changed site:
    // [`Plan::take_code`]) checks it first. Sites rewritten in place need nothing of it (kvm's
    // and vmware's port 0x80 delays), nor does a plan that writes nothing.
    let has_code = backend.rom.is_some() || backend.pv.is_some() || backend.thunks.is_some();
    if backend.takes_every_detour()
        || sites
            .iter()
            .any(|p| p.changed() && (has_code || p.detour.is_some()))
    {
        table.check_detour_area().map_err(PlanError::Table)?;
    }
    let detours = plan_detours(table, backend, text, force, &mut sites)?;
    Ok(Plan {
        sites,
        detours,
        code: Vec::new(),
    })
}

/// The copy of a movable site in its detour's stub: its member, its address and bytes.
fn stub_copy(table: &SiteTable<'_>, index: u32) -> Option<(Member, u64, Seq)> {
    let area = table.detour_area();
    let m = area.member_of(index)?;
    let d = area.detour(m.detour).ok()?;
    let off = m.copy_off as usize;
    let copy = Seq::from_slice(d.stub_bytes.get(off..off + m.copy_len as usize)?)?;
    // The area may not have been checked yet (a deferring parse): nothing here may overflow.
    Some((m, d.stub.checked_add(off as u64)?, copy))
}

/// The members of each detour of `area`, by detour index.
pub fn members_by_detour(area: &DetourArea<'_>) -> Vec<Vec<Member>> {
    let mut out = alloc::vec![Vec::new(); area.detours as usize];
    for k in 0..area.members {
        if let Some(m) = area.member(k)
            && let Some(v) = out.get_mut(m.detour as usize)
        {
            v.push(m);
        }
    }
    out
}

/// `len` bytes of `int3` padding at `addr`, or why not.
fn free_padding(text: &dyn TextRead, addr: u64, len: usize) -> Result<Seq, DetourProblem> {
    let mut s = Seq::new();
    s.pad_to(len).ok_or(DetourProblem::Unreadable)?;
    if !text.read(addr, s.as_mut_slice()) {
        return Err(DetourProblem::Unreadable);
    }
    match s.as_slice().iter().position(|&b| b != 0xcc) {
        Some(k) => Err(DetourProblem::NotFree(addr + k as u64)),
        None => Ok(s),
    }
}

/// Checks that the 5 bytes at `addr` are free for a trampoline: `int3` padding, or whole NOPs
/// (the dead alignment padding after an unconditional jump that the table chose; the patcher
/// proved it unreachable and covered by an undefined ORC entry). Returns those 5 bytes.
fn free_trampoline(text: &dyn TextRead, addr: u64) -> Result<Seq, DetourProblem> {
    let mut first = [0u8; 1];
    if !text.read(addr, &mut first) {
        return Err(DetourProblem::Unreadable);
    }
    if first[0] == 0xcc {
        return free_padding(text, addr, 5);
    }
    // The longest NOP is 15 bytes: 4 bytes of the first 5 plus one more cover any run.
    let mut wide = [0u8; 5 + 15];
    let n = (1..=wide.len())
        .rev()
        .find(|&n| text.read(addr, &mut wide[..n]))
        .ok_or(DetourProblem::Unreadable)?;
    pvpatch_isa::check::nops_cover(&wide[..n], addr, 5).map_err(|m| match m {
        Mismatch::NotPadding(a) => DetourProblem::NotFree(a),
        _ => DetourProblem::NotFree(addr),
    })?;
    Seq::from_slice(&wide[..5]).ok_or(DetourProblem::Unreadable)
}

/// A detour that passed its checks, with what its writes replace.
#[derive(Clone, Copy, Debug)]
pub struct CheckedDetour<'a> {
    /// The detour.
    pub detour: Detour<'a>,
    /// The moved range's bytes now.
    pub moved_old: Seq,
    /// The cave's bytes now (`int3`s).
    pub stub_old: Seq,
}

/// Checks detour `g` of `table` against the text before anything is written: the moved range
/// holds the bytes its checksum describes, its cave is free `int3` padding and its trampoline
/// free `int3` or NOP padding, and its stub does what the moved instructions did, every
/// member's copy where it says ([`check::stub`], which decodes both independently of whatever
/// built the stub). `members` are the detour's members.
pub fn check_detour<'a>(
    table: &SiteTable<'a>,
    text: &dyn TextRead,
    g: u16,
    members: &[Member],
) -> Result<CheckedDetour<'a>, PlanError> {
    let problem = |problem| PlanError::Detour { index: g, problem };
    let d = table
        .detour_area()
        .detour(g)
        .map_err(|_| problem(DetourProblem::Unreadable))?;
    let mut moved_old = Seq::new();
    moved_old
        .pad_to(d.moved_len as usize)
        .ok_or(problem(DetourProblem::Unreadable))?;
    if !text.read(d.moved, moved_old.as_mut_slice()) {
        return Err(problem(DetourProblem::Unreadable));
    }
    if patch_sites::crc32::crc32(moved_old.as_slice()) != d.moved_crc {
        return Err(problem(DetourProblem::MovedChanged));
    }
    let stub_old = free_padding(text, d.stub, d.stub_bytes.len()).map_err(problem)?;
    // A trampoline in a host's dead tail is checked with the host (its moved range's checksum).
    if let Some(t) = d.tramp.filter(|_| table.detour_area().host_of(g).is_none()) {
        free_trampoline(text, t).map_err(problem)?;
    }
    let mut copies = Vec::with_capacity(members.len());
    for m in members {
        let site = table
            .site(m.record as usize)
            .ok_or(problem(DetourProblem::Unreadable))?;
        copies.push(StubCopy {
            site_off: (site.addr - d.moved) as usize,
            insn_len: site.insn_len as usize,
            copy_off: m.copy_off as usize,
            copy_len: m.copy_len as usize,
        });
    }
    copies.sort_unstable_by_key(|c| c.site_off);
    check::stub(moved_old.as_slice(), d.moved, d.stub_bytes, d.stub, &copies)
        .map_err(|m| problem(DetourProblem::Stub(m)))?;
    Ok(CheckedDetour {
        detour: d,
        moved_old,
        stub_old,
    })
}

/// Installs the detours the plan uses: every member of a used detour is planned in the stub
/// (a member rewritten in place would be under the detour's `jmp`), then each detour is checked
/// (its moved range as the table saw it, its cave and trampoline free, its stub the moved code,
/// decoded independently) and its writes built.
fn plan_detours(
    table: &SiteTable<'_>,
    backend: &Backend<'_>,
    text: &dyn TextRead,
    force: Option<Override<'_, '_>>,
    sites: &mut [Planned],
) -> Result<Vec<PlannedDetour>, PlanError> {
    let area = table.detour_area();
    let every = backend.takes_every_detour();
    let mut used: Vec<u16> = if every {
        (0..area.detours).collect()
    } else {
        sites
            .iter()
            .filter(|p| p.changed())
            .filter_map(|p| p.detour)
            .collect()
    };
    if used.is_empty() {
        return Ok(Vec::new());
    }
    // A hosted detour's trampoline exists only once its host is installed.
    let hosts: Vec<u16> = used.iter().filter_map(|&g| area.host_of(g)).collect();
    used.extend(hosts);
    used.sort_unstable();
    used.dedup();
    // Members of used detours that were planned in place move into their copies.
    for p in sites.iter_mut() {
        if p.site.form != Form::Movable || p.detour.is_some() || (p.new == p.old && !every) {
            continue;
        }
        let Some((m, addr, copy)) = stub_copy(table, p.index) else {
            continue;
        };
        if used.binary_search(&m.detour).is_err() {
            continue;
        }
        let op = p.site.op().ok_or(PlanError::Unreadable {
            index: p.index,
            addr: p.addr,
        })?;
        let choice = force
            .and_then(|f| f(p.index, &p.site))
            .unwrap_or_else(|| backend.choose(&p.site, op));
        let native = encode::native(&p.site);
        let bad = |mismatch| PlanError::BadSequence {
            index: p.index,
            addr,
            mismatch,
        };
        match build(&p.site, op, choice, addr, copy.len(), native.as_ref()) {
            Ok((new, outcome)) => {
                p.addr = addr;
                p.old = copy;
                p.new = new;
                p.outcome = outcome;
                p.detour = Some(m.detour);
            }
            Err(Built::Bad(m)) => return Err(bad(m)),
            // It fitted in place but not in its copy: the copy is at least as long as the
            // site's room, so this cannot happen; keep it native in the stub.
            Err(Built::Keep(k)) => {
                p.addr = addr;
                p.old = copy;
                p.new = copy;
                p.outcome = Outcome::Unchanged;
                p.keep = Some(k);
                p.detour = Some(m.detour);
            }
        }
    }
    let by_detour = members_by_detour(area);
    // The planned sites of each detour, in table order, found in one pass (not one per detour:
    // at boot every instruction may be emulated).
    let mut of_detour: Vec<Vec<usize>> = vec![Vec::new(); area.detours as usize];
    for (k, p) in sites.iter().enumerate() {
        if let Some(v) = p.detour.and_then(|g| of_detour.get_mut(g as usize)) {
            v.push(k);
        }
    }
    let mut out: Vec<PlannedDetour> = Vec::with_capacity(used.len());
    // Trampolines in hosts' dead tails: (detour, host, address, bytes).
    let mut hosted = Vec::new();
    for &g in &used {
        let problem = |problem| PlanError::Detour { index: g, problem };
        let checked = check_detour(table, text, g, &by_detour[g as usize])?;
        let d = checked.detour;
        let mine = &of_detour[g as usize];
        let first = mine.first().map_or(0, |&k| sites[k].index);
        // The members' rewrites, in their copies.
        let mut stub_new =
            Seq::from_slice(d.stub_bytes).ok_or(problem(DetourProblem::Unreadable))?;
        for p in mine.iter().map(|&k| &sites[k]) {
            let off = (p.addr - d.stub) as usize;
            stub_new.as_mut_slice()[off..off + p.new.len()].copy_from_slice(p.new.as_slice());
        }
        let (moved_old, stub_old) = (checked.moved_old, checked.stub_old);
        let mut a = Asm::new(d.moved, Seq::new());
        let host = area.host_of(g);
        let tramp = match d.tramp {
            Some(t) => {
                let rel = i8::try_from(t as i128 - (d.moved as i128 + 2))
                    .map_err(|_| problem(DetourProblem::Unreachable))?;
                a.raw(&[0xeb, rel as u8])
                    .map_err(|_| problem(DetourProblem::Unreachable))?;
                let mut ta = Asm::new(t, Seq::new());
                ta.jmp(d.stub)
                    .map_err(|_| problem(DetourProblem::Unreachable))?;
                match host {
                    // Written with the host's moved range, once that write is built.
                    Some(h) => {
                        hosted.push((g, h, t, ta.out));
                        None
                    }
                    None => Some(Write {
                        index: first,
                        addr: t,
                        old: free_trampoline(text, t).map_err(problem)?,
                        new: ta.out,
                    }),
                }
            }
            None => {
                a.jmp(d.stub)
                    .map_err(|_| problem(DetourProblem::Unreachable))?;
                None
            }
        };
        while a.out.len() < d.moved_len as usize {
            a.raw(&[0xcc])
                .map_err(|_| problem(DetourProblem::Unreachable))?;
        }
        out.push(PlannedDetour {
            index: g,
            stub: Write {
                index: first,
                addr: d.stub,
                old: stub_old,
                new: stub_new,
            },
            tramp,
            moved: Write {
                index: first,
                addr: d.moved,
                old: moved_old,
                new: a.out,
            },
            host,
            is_host: false,
        });
    }
    for (g, h, t, bytes) in hosted {
        let unreachable = PlanError::Detour {
            index: g,
            problem: DetourProblem::Unreachable,
        };
        let k = out
            .binary_search_by_key(&h, |p| p.index)
            .map_err(|_| unreachable)?;
        let w = &mut out[k].moved;
        let off = t.checked_sub(w.addr).ok_or(unreachable)? as usize;
        w.new
            .as_mut_slice()
            .get_mut(off..off + bytes.len())
            .ok_or(unreachable)?
            .copy_from_slice(bytes.as_slice());
        out[k].is_host = true;
    }
    Ok(out)
}

/// Plans one site.
fn plan_site(
    index: u32,
    site: Site,
    backend: &Backend<'_>,
    text: &dyn TextRead,
    force: Option<Override<'_, '_>>,
    table: &SiteTable<'_>,
) -> Result<Planned, PlanError> {
    let addr = site.patch_addr();
    let len = site.site_len as usize;
    let mut old = Seq::new();
    old.pad_to(len)
        .ok_or(PlanError::Unreadable { index, addr })?;
    if !text.read(addr, old.as_mut_slice()) {
        return Err(PlanError::Unreadable { index, addr });
    }
    let planned = |new: Seq, outcome, keep| Planned {
        index,
        site,
        addr,
        old,
        new,
        outcome,
        keep,
        detour: None,
    };
    let keep = |k| planned(old, Outcome::Unchanged, Some(k));
    let Some(op) = site.op() else {
        return Ok(keep(Keep::UnknownOp));
    };
    let native = encode::native(&site);
    check::original_encoded(
        old.as_slice(),
        addr,
        &site,
        native.as_ref().map(Seq::as_slice),
    )
    .map_err(|mismatch| PlanError::Mismatch {
        index,
        addr,
        mismatch,
    })?;
    if !matches!(op.info().kind, Kind::Instruction | Kind::Idiom) {
        return Ok(keep(Keep::NotRewritable));
    }
    let choice = force
        .and_then(|f| f(index, &site))
        .unwrap_or_else(|| backend.choose(&site, op));
    let must_rewrite = PlanError::MustRewrite { index, addr, op };
    let native_in_place = matches!(site.form, Form::Native | Form::Detour | Form::Movable);
    if choice == Choice::Native {
        if backend.must_rewrite(op) {
            return Err(must_rewrite);
        }
        if native_in_place {
            // The common case: the native instruction is there and stays.
            return Ok(keep(Keep::AlreadyThere));
        }
    }
    let bad = |mismatch| PlanError::BadSequence {
        index,
        addr,
        mismatch,
    };
    let in_place = build(&site, op, choice, addr, len, native.as_ref());
    // A movable site too small for the choice takes its detour: the rewrite goes into its
    // copy in the stub.
    if site.form == Form::Movable
        && matches!(in_place, Err(Built::Keep(Keep::NoRoom)))
        && let Some((m, copy_addr, copy)) = stub_copy(table, index)
    {
        let bad = |mismatch| PlanError::BadSequence {
            index,
            addr: copy_addr,
            mismatch,
        };
        check::original_encoded(
            copy.as_slice(),
            copy_addr,
            &site,
            native.as_ref().map(Seq::as_slice),
        )
        .map_err(bad)?;
        match build(&site, op, choice, copy_addr, copy.len(), native.as_ref()) {
            Ok((new, outcome)) if new != copy => {
                return Ok(Planned {
                    index,
                    site,
                    addr: copy_addr,
                    old: copy,
                    new,
                    outcome,
                    keep: None,
                    detour: Some(m.detour),
                });
            }
            Err(Built::Bad(m)) => return Err(bad(m)),
            _ => {}
        }
    }
    match in_place {
        Ok((new, _)) if new == old => Ok(keep(Keep::AlreadyThere)),
        Ok((new, outcome)) => Ok(planned(new, outcome, None)),
        Err(Built::Bad(m)) => Err(bad(m)),
        // The backend's choice cannot be used here: fall back to the native instruction,
        // which every backend allows but for the ops it must rewrite.
        Err(Built::Keep(_)) if backend.must_rewrite(op) => Err(must_rewrite),
        Err(Built::Keep(k)) if native_in_place => Ok(keep(k)),
        Err(Built::Keep(k)) => match build(&site, op, Choice::Native, addr, len, native.as_ref()) {
            Ok((new, outcome)) if new != old => Ok(planned(new, outcome, Some(k))),
            Ok(_) | Err(Built::Keep(_)) => Ok(keep(k)),
            Err(Built::Bad(m)) => Err(bad(m)),
        },
    }
}

/// Why [`build`] built nothing.
enum Built {
    /// The choice cannot be used at this site.
    Keep(Keep),
    /// What was built does not decode as intended (a bug, caught).
    Bad(Mismatch),
}

/// The bytes for `choice` at a site, padded to its room and checked by decoding them back.
/// `native` is the record's native encoding.
fn build(
    site: &Site,
    op: Op,
    choice: Choice<'_>,
    addr: u64,
    len: usize,
    native: Option<&Seq>,
) -> Result<(Seq, Outcome), Built> {
    let may = may_change(op, site.operand, site.clobbers);
    let allowed = |clobbers: RegSet| {
        if may.contains(clobbers) {
            Ok(())
        } else {
            Err(Built::Keep(Keep::Clobbers))
        }
    };
    let no_stack = site.flags & SITE_FLAG_NO_STACK != 0;
    if no_stack && matches!(choice, Choice::Call { .. } | Choice::Trap) {
        return Err(Built::Keep(Keep::NoStack));
    }
    let (mut seq, outcome) = match choice {
        Choice::Native => (
            *native.ok_or(Built::Keep(Keep::NotEncodable))?,
            Outcome::Native,
        ),
        Choice::Nothing => (Seq::new(), Outcome::Nothing),
        Choice::Inline(t) => {
            allowed(t.clobbers)?;
            let s = t
                .instantiate(site)
                .map_err(|_| Built::Keep(Keep::Operand))?;
            if no_stack && pvpatch_isa::sequence::uses_stack(s.as_slice()) {
                return Err(Built::Keep(Keep::NoStack));
            }
            (s, Outcome::Inline)
        }
        Choice::Call { target, clobbers } => {
            allowed(clobbers)?;
            let mut a = pvpatch_isa::asm::Asm::new(addr, Seq::new());
            a.call(target).map_err(|_| Built::Keep(Keep::NoRoom))?;
            (a.out, Outcome::Call)
        }
        Choice::Trap => {
            if !crate::trap::supported(op, site.operand, site.width) {
                return Err(Built::Keep(Keep::NotRewritable));
            }
            // `ud2` (a fault, delivered by every hypervisor) where it fits, else `int3`.
            let t: &[u8] = if len >= 2 { &UD2 } else { &[0xcc] };
            (
                Seq::from_slice(t).ok_or(Built::Keep(Keep::NoRoom))?,
                Outcome::Trap,
            )
        }
    };
    let body = seq.len();
    if body > len {
        return Err(Built::Keep(Keep::NoRoom));
    }
    seq.pad_to(len).ok_or(Built::Keep(Keep::NoRoom))?;
    let bytes = seq.as_slice();
    match choice {
        // Encoded from the record: its own length, not the call's the record describes.
        Choice::Native => check::native_insn(
            bytes,
            addr,
            &Site {
                insn_len: body as u8,
                ..*site
            },
        ),
        Choice::Nothing => Ok(()),
        Choice::Inline(_) => check::decodes_exactly(bytes, addr, body),
        Choice::Call { target, .. } => check::call_to(bytes, addr, target).map(|_| ()),
        Choice::Trap => Ok(()),
    }
    .and_then(|()| check::nops(bytes, addr, body))
    .map_err(Built::Bad)?;
    Ok((seq, outcome))
}
