//! From the sweep and Linux's tables to per-site facts: what covers each site, how much room
//! it offers a rewrite, and, in a stock kernel, where its detour goes.
//!
//! *Room* is what a later rewrite may use:
//! * **in place**: the instruction's own bytes, plus any NOP padding that follows it, as long as
//!   nothing can jump into that padding (no direct branch targets it, no table names it as an
//!   instruction start, no symbol starts there) and nothing protects it ([`guard`]);
//! * **detour**: the instruction and the whole instructions next to it that make 5 bytes, moved
//!   to a stub ([`detour`]), where none of the moved instructions is a branch target, a named
//!   instruction start, protected, control flow, or sensitive itself;
//! * **trap**: a one-byte `int3` the runtime emulates, only in kernels of our own (a stock
//!   kernel's #UD and int3 handlers would kill it).
//!
//! A site covered by one of Linux's patch tables has no room at all: its bytes are never changed
//! behind Linux's back.
//!
//! In a **stock kernel** (a Linux image we did not build: it has `_text` and `_etext` and no
//! linked site table of ours), out-of-line code lives only in [`caves`] inside Linux's text. Each
//! detour is planned forward (the site and the instructions after it) or, where that is not
//! possible, backward (the instructions before it and the site), its stub built and given cave
//! space, deterministically in address order; an arena is reserved first for the backend's own
//! out-of-line code.

pub mod caves;
pub mod detour;
pub mod guard;
pub mod stock;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};
use patch_sites::op::Kind;
use patch_sites::{Op, Outcome};

use crate::linux::{LinuxTables, Protected, TableKind};
use crate::load::Image;
use crate::sweep::{Found, Sweep};
use caves::{Allocator, Cave};
use guard::Guards;

/// Bytes reserved in the caves for the backend's out-of-line code (a ROM's entry points, the
/// thunks a backend generates): a ROM is at most 64 KiB.
pub const ARENA: u64 = 64 * 1024;

/// The longest moved range a detour may have (and the longest stub): what the runtime builds in
/// one buffer.
pub const MAX_MOVED: usize = 32;

/// Which way a detour moves code.
// Serialised (in the ledger) as its `name()`, which a test checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The site and the instructions after it.
    Forward,
    /// The instructions before the site, and the site.
    Backward,
    /// Instructions on both sides, or several sites.
    Around,
}

impl Direction {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Backward => "backward",
            Direction::Around => "around",
        }
    }
}

/// A detour a site can take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    /// The first moved byte.
    pub start: u64,
    /// Bytes moved.
    pub len: u8,
    /// The site's offset in the moved range.
    pub site_off: u8,
    /// Which way.
    pub direction: Direction,
    /// The planned detour (an index into [`Analysis::detours`]), in a stock kernel.
    pub group: Option<usize>,
    /// Where the site's patchable copy is in the stub, and its room.
    pub copy: Option<(u8, u8)>,
}

/// The room a site offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    /// Bytes patchable in place (0 when the site must not be touched).
    pub in_place: u8,
    /// The detour it can take, if any.
    pub detour: Option<Moved>,
    /// What the site may become (never [`Outcome::Unchanged`], which every site allows).
    pub forms: Vec<Outcome>,
    /// Why the site allows nothing, or why it allows no detour.
    pub reason: Option<String>,
    /// The same, as a kind without addresses (`forward: branch target; backward: protected
    /// (__mcount_loc)`), for counting.
    pub why: Option<String>,
    /// Linux's own design keeps the site where it is, whatever the rewriter: code Linux copies
    /// elsewhere to run, entry code whose address Linux checks, `sti`'s interrupt shadow, or one
    /// byte with a protected byte after it and a protected byte or a named instruction start
    /// before it (any jump written there overwrites the byte after it, none may start before
    /// it, and a stock kernel has no trap form).
    pub pinned: bool,
}

/// A sensitive instruction with everything known about it.
#[derive(Clone, Debug)]
pub struct SiteInfo {
    /// What the sweep found.
    pub found: Found,
    /// The Linux table entry that covers it, if any.
    pub covered_by: Option<Protected>,
    /// Its room.
    pub room: Room,
    /// It may run with no usable stack (a stock kernel's entry text): recorded
    /// `SITE_FLAG_NO_STACK`.
    pub no_stack: bool,
}

impl SiteInfo {
    /// Whether pvpatch may record it for rewriting.
    pub fn patchable(&self) -> bool {
        !self.room.forms.is_empty()
    }

    /// Whether a backend may rewrite it at all: an instruction or idiom that no Linux table
    /// covers (control transfers and hypervisor interfaces are reported, never rewritten).
    pub fn rewritable(&self) -> bool {
        self.covered_by.is_none()
            && matches!(self.found.op().info().kind, Kind::Instruction | Kind::Idiom)
    }

    /// Whether out-of-line code can be reached from it (a call in place, or a detour).
    pub fn reaches_out_of_line(&self) -> bool {
        self.room
            .forms
            .iter()
            .any(|f| matches!(f, Outcome::Call | Outcome::Detour))
    }
}

/// Everything known about the sites of one image.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    /// Per site, in address order.
    pub sites: Vec<SiteInfo>,
    /// Whether the image is a stock kernel (no trap form; out-of-line code in caves).
    pub stock: bool,
    /// The caves found (stock kernels).
    pub caves: Vec<Cave>,
    /// The arena reserved for the backend's out-of-line code: `(address, length)`.
    pub arena: Option<(u64, u64)>,
    /// The detours planned (stock kernels), by address.
    pub detours: Vec<stock::DetourPlan>,
    /// The protected bytes.
    pub guards: Guards,
}

pub(crate) fn decode_at(image: &Image, addr: u64) -> Option<Instruction> {
    let bytes = image.read(addr, 15).or_else(|| {
        let s = image.section_at(addr)?;
        image.read(addr, (s.addr + s.size - addr) as usize)
    })?;
    let mut d = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    let i = d.decode();
    (!i.is_invalid()).then_some(i)
}

fn is_nop(i: &Instruction) -> bool {
    i.mnemonic() == Mnemonic::Nop
}

/// The op a site is recorded as: its class, except that `out 0x80, al` (port 0x80 is the POST
/// port, written only as a delay) is the `io_delay` op, which backends may turn into nothing.
pub fn recorded_op(f: &Found) -> Op {
    if f.op() == Op::Out && f.operand() == patch_sites::Operand::PortImm(0x80) && f.class.width == 1
    {
        Op::IoDelay
    } else {
        f.op()
    }
}

/// Whether `image` is a stock Linux kernel: it has `_text` and `_etext` and no linked site
/// table of ours.
pub fn is_stock(image: &Image) -> bool {
    image.symbol_address("_text").is_some()
        && image.symbol_address("_etext").is_some()
        && image.section(patch_sites::table::HEADER_SECTION).is_none()
}

/// Functions of a stock kernel whose code does not run where it is linked, or not in 64-bit
/// mode: a call or a jump from them to a cave would go wrong. Their sites are rewritten in place
/// at most (code copied elsewhere carries an in-place rewrite with it), or not at all (32-bit).
const RUNS_ELSEWHERE: [(&str, &str); 7] = [
    ("relocate_kernel", "kexec copies it to a control page"),
    ("relocate_range", "kexec copies it to a control page"),
    ("identity_mapped", "kexec copies it to a control page"),
    ("virtual_mapped", "kexec copies it to a control page"),
    ("swap_pages", "kexec copies it to a control page"),
    ("__enc_copy", "SME copies it to a work area"),
    ("__efi64_thunk", "it switches to 32-bit compatibility mode"),
];

/// Why `addr`'s code cannot reach out of line: it runs elsewhere or in 32-bit mode (`true`:
/// not even in place), if so.
pub fn runs_elsewhere(image: &Image, addr: u64) -> Option<(String, bool)> {
    let (name, _) = image.symbolize(addr)?;
    if let Some(entry) = crate::shim::linux_entry(image).and_then(|p| image.virt_of_phys(p))
        && image.symbolize(entry).is_some_and(|(n, _)| n == name)
    {
        return Some((
            format!("{name} is the 32-bit PVH entry: its bytes are not 64-bit instructions"),
            true,
        ));
    }
    RUNS_ELSEWHERE
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, why)| {
            (
                format!("{n}: {why}; only rewrites in place"),
                *why == "it switches to 32-bit compatibility mode",
            )
        })
}

/// Whether `addr` is in Linux's entry text (`[__entry_text_start, __entry_text_end)`), which
/// runs on the user page tables when page-table isolation is on.
pub fn in_entry_text(image: &Image, addr: u64) -> bool {
    match (
        image.symbol_address("__entry_text_start"),
        image.symbol_address("__entry_text_end"),
    ) {
        (Some(s), Some(e)) => (s..e).contains(&addr),
        _ => false,
    }
}

/// The size of the pages PTI clones the entry text with (`PTI_CLONE_PMD` on x86-64).
const PMD_SIZE: u64 = 2 << 20;

/// Code in the entry text that Linux recognises by the instruction pointer alone, `(start,
/// end, why)`: an instruction moved out of it would no longer be recognised.
const IP_CHECKED: [(&str, &str, &str); 6] = [
    (
        "entry_SYSCALL_64",
        "entry_SYSCALL_64_safe_stack",
        "the syscall gap (ip_within_syscall_gap)",
    ),
    (
        "entry_SYSRETQ_unsafe_stack",
        "entry_SYSRETQ_end",
        "the syscall gap (ip_within_syscall_gap)",
    ),
    (
        "entry_SYSCALL_compat",
        "entry_SYSCALL_compat_safe_stack",
        "the syscall gap (ip_within_syscall_gap)",
    ),
    (
        "entry_SYSRETL_compat_unsafe_stack",
        "entry_SYSRETL_compat_end",
        "the syscall gap (ip_within_syscall_gap)",
    ),
    (
        "entry_SYSENTER_compat",
        "__end_entry_SYSENTER_compat",
        "SYSENTER's single-step region, which #DB recognises by its address",
    ),
    (
        "repeat_nmi",
        "end_repeat_nmi",
        "the NMI repeat region, which a nested NMI recognises by its address",
    ),
];

/// Linux's entry text in a stock kernel. It may run on the user page tables (page-table
/// isolation maps only the 2 MiB pages that hold it, [`EntryText::mapped`]), on the user's
/// stack or with `rsp` as a scratch register: its sites are recorded `SITE_FLAG_NO_STACK` (no
/// call, push or trap there), and a detour of one keeps its stub and trampoline inside
/// `mapped`, moves no call, and leaves alone the code Linux recognises by address
/// ([`EntryText::ip_checked`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryText {
    /// `__entry_text_start`.
    pub start: u64,
    /// `__entry_text_end`.
    pub end: u64,
    /// The 2 MiB pages around `[start, end)`, which the user page tables map too.
    pub mapped: (u64, u64),
    /// `(start, end, why)` of each range Linux checks instruction pointers against.
    pub ip_checked: Vec<(u64, u64, &'static str)>,
}

impl EntryText {
    /// The entry text of `image`, if it has one.
    pub fn of(image: &Image) -> Option<EntryText> {
        let start = image.symbol_address("__entry_text_start")?;
        let end = image.symbol_address("__entry_text_end")?;
        if end <= start {
            return None;
        }
        let mut ip_checked = Vec::new();
        for (a, b, why) in IP_CHECKED {
            match (image.symbol_address(a), image.symbol_address(b)) {
                (Some(x), Some(y)) if start <= x && x < y && y <= end => {
                    ip_checked.push((x, y, why))
                }
                (None, None) => {}
                // Half a range, or one outside the entry text: nothing can be shown safe.
                _ => ip_checked.push((
                    start,
                    end,
                    "entry code whose address checks could not be located",
                )),
            }
        }
        let mapped = (
            start & !(PMD_SIZE - 1),
            end.checked_add(PMD_SIZE - 1)? & !(PMD_SIZE - 1),
        );
        Some(EntryText {
            start,
            end,
            mapped,
            ip_checked,
        })
    }

    /// Whether `addr` is in the entry text.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// Why `[start, end)` must stay where it is, if it overlaps a range Linux checks
    /// instruction pointers against.
    pub fn ip_checked(&self, start: u64, end: u64) -> Option<&'static str> {
        self.ip_checked
            .iter()
            .find(|r| r.0 < end && start < r.1)
            .map(|r| r.2)
    }
}

/// Analyses every site the sweep found.
pub fn analyse(image: &Image, tables: &LinuxTables, sweep: &Sweep) -> Analysis {
    let guards = Guards::new(image, tables);
    let stock = is_stock(image);
    let mut sites: Vec<SiteInfo> = sweep
        .found
        .iter()
        .map(|f| site_info(image, tables, sweep, &guards, stock, f))
        .collect();
    let mut analysis = Analysis {
        stock,
        ..Analysis::default()
    };
    if stock {
        // No ORC table, no caves: nothing could vouch for an unwind from a stub.
        let orc = caves::Orc::read(image).unwrap_or_default();
        analysis.caves = caves::find(image, &guards, sweep, &orc);
        let mut alloc = Allocator::new(analysis.caves.clone());
        analysis.arena = alloc.alloc_last(ARENA).map(|a| (a, ARENA));
        analysis.detours = stock::plan(image, sweep, &guards, &mut sites, &orc, &mut alloc);
    }
    analysis.sites = sites;
    analysis.guards = guards;
    analysis
}

/// The analysis of an image that is not a stock kernel, without its sites: each is analysed
/// on its own ([`site_info`]) when it is visited (a streamed scan).
pub(crate) fn analyse_without_sites(image: &Image, tables: &LinuxTables) -> Analysis {
    Analysis {
        stock: false,
        guards: Guards::new(image, tables),
        ..Analysis::default()
    }
}

/// One site analysed: what covers it, its room. In an image that is not a stock kernel it
/// depends on no other site (a stock kernel's detours are then planned over all of them).
pub fn site_info(
    image: &Image,
    tables: &LinuxTables,
    sweep: &Sweep,
    guards: &Guards,
    stock: bool,
    f: &Found,
) -> SiteInfo {
    let covered_by = covering(tables, f);
    let at = Where {
        image,
        tables,
        sweep,
        guards,
        stock,
    };
    let room = room(&at, f, covered_by.as_ref());
    SiteInfo {
        found: *f,
        covered_by,
        room,
        no_stack: stock && in_entry_text(image, f.addr),
    }
}

/// The most relevant table entry overlapping the instruction: one Linux patches, else one
/// that refers to it.
fn covering(tables: &LinuxTables, f: &Found) -> Option<Protected> {
    let mut best: Option<Protected> = None;
    for p in tables.covering(f.addr, f.len as u64) {
        match best {
            Some(b) if b.table.patches() || !p.table.patches() => {}
            _ => best = Some(*p),
        }
    }
    best
}

fn nothing(reason: String, why: &str) -> Room {
    Room {
        in_place: 0,
        detour: None,
        forms: Vec::new(),
        reason: Some(reason),
        why: Some(why.to_owned()),
        pinned: false,
    }
}

/// Why a detour is not possible: a message with addresses, and its kind.
#[derive(Clone, Debug)]
pub(crate) struct Blocked {
    message: String,
    kind: String,
}

pub(crate) fn blocked(kind: impl Into<String>, message: String) -> Blocked {
    Blocked {
        message,
        kind: kind.into(),
    }
}

/// What [`site_info`] analyses a site in.
#[derive(Clone, Copy)]
struct Where<'a> {
    image: &'a Image,
    tables: &'a LinuxTables,
    sweep: &'a Sweep,
    guards: &'a Guards,
    stock: bool,
}

fn room(at: &Where<'_>, f: &Found, covered_by: Option<&Protected>) -> Room {
    let Where {
        image,
        tables,
        sweep,
        guards,
        stock,
    } = *at;
    let op = f.op();
    if op.info().kind == Kind::HypervisorInterface {
        return nothing(
            "hypervisor interface: reported, never rewritten".into(),
            "hypervisor interface",
        );
    }
    if let Some(p) = covered_by {
        let kind = format!("covered by {}", p.table);
        return nothing(
            if p.table == TableKind::ExTable {
                format!(
                    "may fault and has a fixup ({} entry {}): its address must not change",
                    p.table, p.entry
                )
            } else {
                format!(
                    "covered by {} entry {}: Linux patches these bytes itself",
                    p.table, p.entry
                )
            },
            &kind,
        );
    }
    if let Some(g) = guards.first_overlap(f.addr, f.addr + f.len as u64) {
        return nothing(
            format!("protected ({}): never written", g.why),
            &format!("protected ({})", kind_of(&g.why)),
        );
    }
    // `sti` enables interrupts only after the next instruction: `sti; mwait` (and `sti; hlt`
    // where it is not one idiom) sleep without a window for an interrupt to slip in first. Run
    // anywhere else, or through a call, the window opens (found by the oracle on 6.1's
    // `mwait_idle`).
    if op == Op::Sti
        && let Some(next) = decode_at(image, f.addr + f.len as u64)
        && let Some(then) = match next.mnemonic() {
            Mnemonic::Hlt => Some("hlt"),
            Mnemonic::Mwait => Some("mwait"),
            Mnemonic::Mwaitx => Some("mwaitx"),
            _ => None,
        }
    {
        return Room {
            pinned: true,
            ..nothing(
                format!("sti's interrupt shadow: the {then} after it must follow it directly"),
                &format!("interrupt shadow (sti; {then})"),
            )
        };
    }
    // The other half, in a stock kernel: the `hlt` in `sti`'s shadow may not move away from it,
    // nor become a call. (Our own guest annotates `sti; hlt` as one idiom, `safe_halt`.)
    if stock
        && op == Op::Hlt
        && let Some(before) = f.addr.checked_sub(1)
        && sweep.is_insn_start(before)
        && decode_at(image, before).is_some_and(|i| i.mnemonic() == Mnemonic::Sti)
    {
        return Room {
            pinned: true,
            ..nothing(
                "sti's interrupt shadow: this hlt must follow the sti before it directly".into(),
                "interrupt shadow (sti; hlt)",
            )
        };
    }
    let control = op.info().kind == Kind::ControlTransfer;
    let entry_text = stock && in_entry_text(image, f.addr);
    if stock && control {
        return nothing(
            "control transfer: never rewritten in a stock kernel (no trap form there)".into(),
            "control transfer",
        );
    }
    // In place: the instruction, then NOP padding nothing jumps into and nothing protects.
    let mut in_place = f.len as u64;
    let mut at = f.addr + f.len as u64;
    while in_place < 255 {
        if guards.is_named(at)
            || guards.is_orc(at)
            || sweep.is_branch_target(at)
            || tables.covering(at, 1).next().is_some()
        {
            break;
        }
        match decode_at(image, at) {
            Some(i)
                if is_nop(&i)
                    && in_place + i.len() as u64 <= 255
                    && guards.first_overlap(at, at + i.len() as u64).is_none() =>
            {
                in_place += i.len() as u64;
                at += i.len() as u64;
            }
            _ => break,
        }
    }
    if stock && let Some((why, not_even_in_place)) = runs_elsewhere(image, f.addr) {
        return Room {
            in_place: if not_even_in_place { 0 } else { in_place as u8 },
            detour: None,
            forms: if not_even_in_place {
                Vec::new()
            } else {
                vec![Outcome::Inline]
            },
            reason: Some(why),
            why: Some(if not_even_in_place {
                "32-bit code".into()
            } else {
                "copied elsewhere to run".into()
            }),
            pinned: !not_even_in_place,
        };
    }
    let mut forms = vec![Outcome::Inline];
    // Entry code may run on the user page tables, on the user's stack or with `rsp` as scratch:
    // no call form (the record says `NO_STACK`), and a detour only where [`EntryText`] allows
    // one (planned with the others, [`stock`]).
    if entry_text {
        let checked = guards
            .entry_text()
            .map(|e| e.ip_checked(f.addr, f.addr + f.len as u64))
            .unwrap_or(Some("entry code whose address checks could not be located"));
        if let Some(why) = checked {
            return Room {
                in_place: in_place as u8,
                detour: None,
                forms,
                reason: Some(format!(
                    "entry text, in {why}: it must run at its own address; only rewrites in \
                     place that use no stack"
                )),
                why: Some("entry text: address checked by Linux".into()),
                pinned: true,
            };
        }
    }
    if in_place >= 5 && !entry_text {
        forms.push(if control {
            Outcome::Jump
        } else {
            Outcome::Call
        });
    }
    // Stock kernels: detours are planned for the whole image at once ([`stock`]).
    let (detour, reason, why) = if in_place >= 5 || control || stock {
        (None, None, None)
    } else {
        match moved_range(image, sweep, guards, f) {
            Ok(m) => (Some(m), None, None),
            Err(b) => (
                None,
                Some(format!("no detour: {}", b.message)),
                Some(b.kind),
            ),
        }
    };
    if detour.is_some() {
        forms.push(Outcome::Detour);
    }
    if !stock {
        forms.push(Outcome::Trap);
    }
    Room {
        in_place: in_place as u8,
        detour,
        forms,
        reason,
        why,
        pinned: false,
    }
}

/// A protection's kind, without its entry.
fn kind_of(w: &guard::Why) -> String {
    match w {
        guard::Why::Table(t, _) => t.section().to_owned(),
        other => other.to_string(),
    }
}

/// Why the instruction at `at` cannot be moved with a site, if it cannot.
pub(crate) fn unmovable(image: &Image, at: u64) -> Result<Instruction, Blocked> {
    let i = decode_at(image, at)
        .ok_or_else(|| blocked("undecodable", format!("{at:#x} does not decode")))?;
    if !detour::movable(&i) {
        return Err(blocked("control flow", format!("{at:#x} is control flow")));
    }
    if pvpatch_isa::classify::classify(&i).is_some() {
        return Err(blocked(
            "another site",
            format!("{at:#x} is sensitive itself"),
        ));
    }
    Ok(i)
}

/// Checks a candidate moved range `[start, end)`: inside one section, nothing protected in it,
/// nothing jumps into it from outside. `internal` lists the targets of the direct `jmp`s and
/// `jcc`s the range itself holds (they follow their targets into the stub): such a target may
/// lie inside if no symbol or table names it and that branch is the only one in the image that
/// targets it ([`Sweep::is_sole_target`]).
pub(crate) fn check_range(
    image: &Image,
    sweep: &Sweep,
    guards: &Guards,
    start: u64,
    end: u64,
    internal: &[u64],
) -> Result<(), Blocked> {
    let s = image
        .section_at(start)
        .ok_or_else(|| blocked("outside sections", "the site is outside any section".into()))?;
    if !s.contains(end - 1) {
        return Err(blocked("section end", "the section ends".into()));
    }
    if let Some(g) = guards.first_overlap(start, end) {
        return Err(blocked(
            format!("protected ({})", kind_of(&g.why)),
            format!("{:#x} is protected ({})", g.start.max(start), g.why),
        ));
    }
    let mut from = start;
    while let Some(a) = guards.start_inside(sweep, from, end) {
        if guards.is_named(a) {
            return Err(blocked(
                "named instruction start",
                format!("{a:#x} is named as an instruction start (symbol or table)"),
            ));
        }
        if !(internal.contains(&a) && sweep.is_sole_target(a)) {
            return Err(blocked(
                "branch target",
                format!("{a:#x} is a branch target"),
            ));
        }
        from = a;
    }
    Ok(())
}

/// The range a detour of `f` would move in a kernel of our own: the site and what follows
/// (the build-time `Detour` form of the ABI).
fn moved_range(image: &Image, sweep: &Sweep, guards: &Guards, f: &Found) -> Result<Moved, Blocked> {
    let mut end = f.addr + f.len as u64;
    while end - f.addr < 5 {
        let i = unmovable(image, end)?;
        end += i.len() as u64;
        if i.is_call_near() && end - f.addr < 5 {
            return Err(blocked(
                "call inside",
                format!(
                    "{:#x} is a call that would return into the moved range",
                    i.ip()
                ),
            ));
        }
    }
    if end - f.addr > MAX_MOVED as u64 {
        return Err(blocked(
            "too long",
            format!("{} bytes would move", end - f.addr),
        ));
    }
    check_range(image, sweep, guards, f.addr, end, &[])?;
    Ok(Moved {
        start: f.addr,
        len: (end - f.addr) as u8,
        site_off: 0,
        direction: Direction::Forward,
        group: None,
        copy: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{Options, sweep};
    use crate::testing::{TEXT, elf_with_code};

    fn analysed(code: &[u8], symbols: &[(&str, u64, u64)]) -> Analysis {
        let img = elf_with_code(code, symbols);
        let t = crate::linux::read(&img);
        let known: Vec<u64> = img.symbols.iter().map(|s| s.addr).collect();
        let s = sweep(&img, &known, Options { threads: 1 }, None);
        super::analyse(&img, &t, &s)
    }

    #[test]
    fn padding_counts_as_room() {
        // cli; nop4; ret -> 5 bytes in place
        let a = analysed(&[0xfa, 0x0f, 0x1f, 0x40, 0x00, 0xc3], &[]);
        assert_eq!(a.sites[0].room.in_place, 5);
        assert_eq!(
            a.sites[0].room.forms,
            [Outcome::Inline, Outcome::Call, Outcome::Trap]
        );
    }

    #[test]
    fn padding_that_is_jumped_into_is_not_room() {
        // cli; nop; nop; nop; nop; ret; jmp -6 (to the 2nd nop)
        let code = [0xfa, 0x90, 0x90, 0x90, 0x90, 0xc3, 0xeb, 0xf9];
        let a = analysed(&code, &[]);
        assert_eq!(a.sites[0].room.in_place, 1);
    }

    #[test]
    fn detour_over_movable_instructions() {
        // sti; mov rax, rbx; add rax, 1; ret
        let code = [0xfb, 0x48, 0x89, 0xd8, 0x48, 0x83, 0xc0, 0x01, 0xc3];
        let a = analysed(&code, &[]);
        let r = &a.sites[0].room;
        assert_eq!(r.in_place, 1);
        assert_eq!(r.detour.as_ref().map(|m| m.len), Some(8));
        assert!(r.forms.contains(&Outcome::Detour));
    }

    #[test]
    fn no_detour_across_a_symbol_or_control_flow() {
        // sti; jmp rax (indirect: its target is unknown, so it cannot move)
        let code = [0xfb, 0xff, 0xe0, 0x90, 0x90, 0x90];
        let a = analysed(&code, &[]);
        assert!(
            a.sites[0]
                .room
                .reason
                .as_deref()
                .unwrap()
                .contains("control flow")
        );
        let code = [0xfb, 0x48, 0x89, 0xd8, 0x48, 0x83, 0xc0, 0x01, 0xc3];
        let a = analysed(&code, &[("f", 0, 1), ("g", 1, 8)]);
        let r = &a.sites[0].room;
        assert_eq!(r.detour, None);
        assert!(
            r.reason.as_deref().unwrap().contains("instruction start"),
            "{r:?}"
        );
        assert_eq!(TEXT + 1, a.sites[0].found.addr + 1);
    }

    #[test]
    fn hypervisor_interfaces_have_no_room() {
        let a = analysed(&[0x0f, 0x01, 0xc1, 0xc3], &[]);
        assert!(a.sites[0].room.forms.is_empty());
        assert!(!a.sites[0].patchable());
    }
}
