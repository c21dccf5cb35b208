//! The rewrite-equivalence oracle: runs a site's native instruction and the planner's rewrite
//! of it from the same machine state, and compares what they leave and what they did.
//!
//! A rewrite is equivalent to the instruction it replaces when, from the same state:
//!
//! * both end at the end of the site (or both fault, with the same vector);
//! * every general register is equal, except those the op leaves undefined and those the site
//!   lets a rewrite clobber (the op's *outputs* must be equal);
//! * RFLAGS is equal (its status flags only where they may be clobbered);
//! * memory is equal: the data page, the stack at and above the final `rsp` (the kernel has no
//!   red zone: below `rsp` is scratch an interrupt may overwrite), and the backend's private
//!   page unless the backend owns it;
//! * the virtual CPU's state (control, debug registers, MSRs) is equal, and the effect traces
//!   are equal after the backend's [`abstraction`] function: the native trace against the
//!   rewrite's trace as the backend interprets it, both less what the backend declares void.
//!
//! The executor is [`engine::Engine`] (unicorn), with the sensitive instructions carried out by
//! the [`vcpu`] model and trap sites handled by the runtime's own trap emulator.

pub mod abstraction;
pub mod engine;
pub mod image;
pub mod published;
pub mod reference;
pub mod vcpu;

use std::fmt;

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use patch_sites::Outcome;
use patch_sites::op::Kind;
use patch_sites::table::{
    AddrRange, Form, SITE_FLAG_REP, Site, SiteTable, sealed_table_size, write_sealed_table,
};
use patch_sites::{Gpr, Op, Operand, RegSet};
use pvpatch_runtime::backend::{Backend, Choice, LoadedRom};
use pvpatch_runtime::plan::{self, Keep, TextRead};

pub use abstraction::Abstraction;
pub use engine::{
    CODE, DATA, End, Engine, EngineError, Executor, HYPERCALL, Hypervisor, PRIVATE, ROM, Run,
    STACK, State,
};
pub use vcpu::{Effect, EffectKind};

/// Where the site under test lies.
pub const SITE: u64 = CODE + 0x100;

/// RFLAGS' status flags (CF, PF, AF, ZF, SF, OF).
pub const STATUS_FLAGS: u64 = 0x8d5;

/// Why the oracle does not run `op` (its native instruction cannot run in the engine as a
/// kernel would run it), or `None` if it does.
pub fn not_covered(op: Op) -> Option<&'static str> {
    match op.info().kind {
        Kind::Instruction | Kind::Idiom => None,
        Kind::ControlTransfer => Some("control transfers are never rewritten"),
        _ => Some("hypervisor interfaces are never rewritten"),
    }
}

/// A site to rewrite: its record, the bytes an annotated kernel holds there, and the native
/// instruction (with its NOP padding) those bytes stand for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The record (at [`SITE`]).
    pub site: Site,
    /// The bytes where the patch is written (the site; a detour's stub), before patching.
    pub text: Vec<u8>,
    /// The code at the site as it was before annotation: the native instruction, padded with
    /// NOPs to the site's length (or, for a detour, followed by the code around it); both runs
    /// end at its end.
    pub reference: Vec<u8>,
    /// Code the rewrite's run has besides the patch: a detour's `jmp` at the site (with the
    /// code after it) and the rest of its stub.
    pub around: Vec<(u64, Vec<u8>)>,
}

/// Where a detour's stub is placed.
pub const STUB: u64 = CODE + 0x4000;

impl Case {
    /// A site in the native form: the instruction, then `pad` bytes of NOPs. `None` if the op
    /// is unknown or has no encoding for this operand.
    pub fn native(op_id: u16, operand: Operand, width: u8, flags: u8, pad: u8) -> Option<Case> {
        let mut site = Site {
            addr: SITE,
            site_len: 0,
            insn_len: 0,
            op_id,
            form: Form::Native,
            operand,
            width,
            flags,
            clobbers: RegSet::EMPTY,
            stub: None,
        };
        let op = site.op()?;
        patch_sites::op::check_operand(op, operand, width).ok()?;
        // The oracle's own encoding: the reference owes nothing to the runtime's encoder.
        let native = reference::native(op, operand, width, flags & SITE_FLAG_REP != 0)?;
        let mut text = native.clone();
        text.resize(native.len() + pad as usize, 0);
        reference::nops(&mut text[native.len()..]);
        site.insn_len = native.len() as u8;
        site.site_len = text.len() as u8;
        Some(Case {
            site,
            reference: text.clone(),
            text,
            around: Vec::new(),
        })
    }

    /// A site in the detour form: the native instruction followed by `code` (instructions that
    /// run after it), with the post-link tool's detour built over them: the site becomes a
    /// `jmp` to a stub at [`STUB`] holding the patchable copy and the moved instructions.
    pub fn detour(op_id: u16, operand: Operand, width: u8, flags: u8, code: &[u8]) -> Option<Case> {
        let n = Case::native(op_id, operand, width, flags, 0)?;
        let insn = n.reference.len();
        let mut all = n.reference.clone();
        all.extend_from_slice(code);
        let d = pvpatch::analyse::detour::build(&all, SITE, insn, STUB).ok()?;
        let room = d.room as usize;
        let mut at_site = d.site.clone();
        at_site.extend_from_slice(&all[room..]);
        Some(Case {
            site: Site {
                form: Form::Detour,
                site_len: d.room,
                stub: Some(STUB),
                ..n.site
            },
            text: d.stub[..room].to_vec(),
            reference: all,
            around: vec![
                (SITE, at_site),
                (STUB + room as u64, d.stub[room..].to_vec()),
            ],
        })
    }

    /// A site in the indirect-call form (`call [rip + disp32]` through the kernel's table of
    /// thunks, then NOPs), at least as long as the native instruction.
    pub fn indirect_call(
        op_id: u16,
        operand: Operand,
        width: u8,
        flags: u8,
        pad: u8,
    ) -> Option<Case> {
        let n = Case::native(op_id, operand, width, flags, 0)?;
        let len = (6 + pad as usize).max(n.reference.len());
        let mut text = vec![0xff, 0x15, 0x00, 0x10, 0x00, 0x00];
        text.resize(len, 0);
        reference::nops(&mut text[6..]);
        let mut reference = n.reference.clone();
        reference.resize(len, 0);
        reference::nops(&mut reference[n.reference.len()..]);
        Some(Case {
            site: Site {
                form: Form::IndirectCall,
                insn_len: 6,
                site_len: len as u8,
                ..n.site
            },
            text,
            reference,
            around: Vec::new(),
        })
    }

    /// The site's op.
    pub fn op(&self) -> Option<Op> {
        self.site.op()
    }
}

/// What the planner made of a case for a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// The site's bytes after patching.
    pub bytes: Vec<u8>,
    /// What became of the site.
    pub outcome: Outcome,
    /// Why it was left as it was, if it was.
    pub keep: Option<Keep>,
    /// Why the runtime's ROM check refused the backend's ROM for this site, if it did.
    pub rom_refused: Option<String>,
}

impl Rewrite {
    /// Whether the rewrite is the reference itself, byte for byte, with nothing else to run (no
    /// trap, no moved code): its run would repeat the reference's, so it is no equivalence case.
    pub fn identical(&self, case: &Case) -> bool {
        self.outcome != Outcome::Trap && case.around.is_empty() && self.bytes == case.reference
    }
}

/// Why a case could not be checked at all.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// The one-site table was refused (a generator bug).
    #[error("the site's table was refused: {0}")]
    Table(patch_sites::TableError),
    /// The planner refused the site.
    #[error("the planner refused the site: {0}")]
    Plan(plan::PlanError),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Kernel text holding `.1` from `.0` on, for the planner.
#[derive(Debug)]
pub struct SiteText<'a>(pub u64, pub &'a [u8]);

impl TextRead for SiteText<'_> {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        let Some(at) = addr.checked_sub(self.0).map(|a| a as usize) else {
            return false;
        };
        match self.1.get(at..at + out.len()) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

/// Plans `case` for `backend` (with the backend's choice replaced by `force`, if given) with
/// the runtime's planner, as the boot-time patcher would: a ROM is validated against the site
/// first, and a refused ROM is not used (every site stays native, as in the guest).
pub fn rewrite(
    case: &Case,
    backend: &Backend<'_>,
    force: Option<Choice<'_>>,
) -> Result<Rewrite, OracleError> {
    let table_addr = CODE + 0x2_0000;
    let mut buf = vec![0u8; sealed_table_size(1)];
    write_sealed_table(&[case.site], table_addr, &mut buf)
        .map_err(|_| OracleError::Table(patch_sites::TableError::BadExtent))?;
    let text = AddrRange::new(CODE, CODE + engine::CODE_SIZE);
    let table =
        SiteTable::parse_contiguous(&buf, table_addr, &[text]).map_err(OracleError::Table)?;
    let mut backend = *backend;
    let mut rom_refused = None;
    if let Some(r) = backend.rom
        && let Err(e) =
            pvpatch_runtime::romcheck::validate(&r.rom, &backend.detected.signature, &table)
    {
        rom_refused = Some(e.to_string());
        backend.rom = None;
    }
    let forced = force.map(|c| move |_: u32, _: &Site| Some(c));
    let p = plan::plan(
        &table,
        &backend,
        &SiteText(case.site.patch_addr(), &case.text),
        forced.as_ref().map(|f| f as plan::Override<'_, '_>),
    )
    .map_err(OracleError::Plan)?;
    let planned = &p.sites[0];
    Ok(Rewrite {
        bytes: planned.new.as_slice().to_vec(),
        outcome: planned.outcome,
        keep: planned.keep,
        rom_refused,
    })
}

/// A difference between the native instruction and its rewrite: everything needed to
/// reproduce it, printed as bytes and disassembly.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// The backend.
    pub backend: &'static str,
    /// The site.
    pub site: Site,
    /// The native instruction and padding.
    pub reference: Vec<u8>,
    /// The rewrite.
    pub rewrite: Vec<u8>,
    /// Where, when the site alone does not say (an image run's unit).
    pub context: Option<String>,
    /// What differs.
    pub what: Vec<Difference>,
}

/// One comparison the oracle makes between the reference's run and the rewrite's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Comparison {
    /// How the runs ended: reached the end of the site, faulted (and with which vector), left.
    End,
    /// The general registers (the op's outputs and everything the site may not clobber).
    Registers,
    /// RFLAGS.
    Rflags,
    /// The live stack: at and above the final `rsp`.
    Stack,
    /// Memory: the data page, and in an image run the pages mapped on demand.
    Memory,
    /// The backend's private page, unless the backend owns it.
    PrivatePage,
    /// The virtual CPU's control and debug registers.
    ControlRegisters,
    /// The virtual CPU's MSRs (through the backend's MSR map).
    Msrs,
    /// The effects of one kind, in order, after the backend's abstraction function.
    Effect(EffectKind),
}

impl Comparison {
    /// Every comparison the oracle makes.
    pub fn all() -> Vec<Comparison> {
        let mut v = vec![
            Comparison::End,
            Comparison::Registers,
            Comparison::Rflags,
            Comparison::Stack,
            Comparison::Memory,
            Comparison::PrivatePage,
            Comparison::ControlRegisters,
            Comparison::Msrs,
        ];
        v.extend(EffectKind::ALL.map(Comparison::Effect));
        v
    }
}

/// One difference between the runs: the comparison that found it, the register when it is one,
/// and what it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// The comparison.
    pub comparison: Comparison,
    /// The register, for [`Comparison::Registers`].
    pub register: Option<Gpr>,
    /// The values that differ.
    pub detail: String,
}

impl Difference {
    fn new(comparison: Comparison, detail: String) -> Self {
        Difference {
            comparison,
            register: None,
            detail,
        }
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// `bytes` at `addr`, disassembled, one instruction a line.
pub fn disassemble(bytes: &[u8], addr: u64) -> String {
    let mut out = String::new();
    let mut f = IntelFormatter::new();
    let mut d = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        let start = (i.ip() - addr) as usize;
        let raw: Vec<String> = bytes[start..start + i.len()]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut text = String::new();
        f.format(&i, &mut text);
        out.push_str(&format!(
            "    {:#x}: {:<24} {text}\n",
            i.ip(),
            raw.join(" ")
        ));
    }
    out
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self.site.op().map_or("unknown op", |o| o.name());
        writeln!(
            f,
            "{} rewrite of {op} ({:?}, width {}, form {:?}) is not equivalent:",
            self.backend, self.site.operand, self.site.width, self.site.form
        )?;
        if let Some(c) = &self.context {
            writeln!(f, "  at {c}")?;
        }
        for w in &self.what {
            writeln!(f, "  - {w}")?;
        }
        writeln!(f, "  native:  {:02x?}", self.reference)?;
        write!(f, "{}", disassemble(&self.reference, self.site.addr))?;
        writeln!(f, "  rewrite: {:02x?}", self.rewrite)?;
        write!(f, "{}", disassemble(&self.rewrite, self.site.patch_addr()))
    }
}

/// A rewrite to run against a case's reference: the site's new bytes, any other code it needs
/// (a ROM, stubs), whether the site is a trap the runtime emulates, and the backend's
/// abstraction function.
#[derive(Debug)]
pub struct Candidate<'a> {
    /// The site's bytes.
    pub bytes: &'a [u8],
    /// Other code, placed first: `(address, bytes)`.
    pub code: &'a [(u64, &'a [u8])],
    /// Whether the site's trap is handled by the runtime's emulator.
    pub trap: bool,
    /// The backend's abstraction function.
    pub abstraction: &'a dyn Abstraction,
}

/// The oracle: a reusable engine.
#[derive(Debug)]
pub struct Oracle {
    engine: Engine,
    /// Comparisons switched off (only by the test that shows each one is needed).
    off: Vec<Comparison>,
}

/// What the oracle checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Effects of the native run.
    pub effects: usize,
    /// Instructions executed by the two runs.
    pub steps: usize,
}

impl Oracle {
    /// A new oracle.
    pub fn new() -> Result<Self, EngineError> {
        Ok(Oracle {
            engine: Engine::new()?,
            off: Vec::new(),
        })
    }

    /// Test-only: the oracle without `comparison` (a mutant of the oracle), for the test that
    /// shows the catalogue of wrong rewrites fails without any one of its comparisons. Nothing
    /// else switches a comparison off.
    #[doc(hidden)]
    pub fn without(mut self, comparison: Comparison) -> Self {
        self.off.push(comparison);
        self
    }

    /// Runs `case`'s reference and the planner's rewrite of it for `backend` from `state`, and
    /// compares them. `backend_code` is placed at [`ROM`]: the backend's ROM, or the entry
    /// points generated for Xen or Hyper-V.
    pub fn check(
        &mut self,
        case: &Case,
        backend: &Backend<'_>,
        backend_code: Option<&[u8]>,
        force: Option<Choice<'_>>,
        state: &State,
    ) -> Result<(Rewrite, Result<Checked, Box<Divergence>>), OracleError> {
        let rw = rewrite(case, backend, force)?;
        let verdict = self.compare_rewrite(case, &rw, backend, backend_code, state);
        Ok((rw, verdict))
    }

    /// Runs `case`'s reference and the rewrite `rw` (planned by [`rewrite`]) for `backend`
    /// from `state`, and compares them.
    pub fn compare_rewrite(
        &mut self,
        case: &Case,
        rw: &Rewrite,
        backend: &Backend<'_>,
        backend_code: Option<&[u8]>,
        state: &State,
    ) -> Result<Checked, Box<Divergence>> {
        let abs = abstraction::of(backend);
        let code: Vec<(u64, &[u8])> = backend_code
            .map(|r| (ROM, r))
            .into_iter()
            .chain(case.around.iter().map(|(a, b)| (*a, b.as_slice())))
            .collect();
        self.compare(
            case,
            &Candidate {
                bytes: &rw.bytes,
                code: &code,
                trap: rw.outcome == Outcome::Trap,
                abstraction: abs.as_ref(),
            },
            state,
        )
    }

    /// Runs the reference and `candidate` from `state` and compares them.
    pub fn compare(
        &mut self,
        case: &Case,
        candidate: &Candidate<'_>,
        state: &State,
    ) -> Result<Checked, Box<Divergence>> {
        compare_on(&mut self.engine, case, candidate, state, &self.off)
    }
}

/// Runs `case`'s reference and `candidate` from `state` on `exec` and compares them by every
/// comparison not in `off`: the oracle's check on any [`Executor`].
pub fn compare_on(
    exec: &mut dyn Executor,
    case: &Case,
    candidate: &Candidate<'_>,
    state: &State,
    off: &[Comparison],
) -> Result<Checked, Box<Divergence>> {
    let site = case.site;
    let end = site.addr + case.reference.len() as u64;
    let abs = candidate.abstraction;
    let prepared = abs.prepare(state);
    let state = prepared.as_ref().unwrap_or(state);
    let reference = exec.execute(
        &[(site.addr, &case.reference)],
        site.addr,
        end,
        state,
        None,
        Hypervisor::None,
    );
    let mut code = candidate.code.to_vec();
    code.push((site.patch_addr(), candidate.bytes));
    let rewritten = exec.execute(
        &code,
        site.addr,
        end,
        state,
        candidate.trap.then_some(site),
        abs.hypervisor(),
    );
    let what = differences(&site, abs, state, &reference, &rewritten, false, off);
    if what.is_empty() {
        Ok(Checked {
            effects: reference.vcpu.trace.len(),
            steps: reference.steps + rewritten.steps,
        })
    } else {
        Err(Box::new(Divergence {
            backend: abs.name(),
            site,
            reference: case.reference.clone(),
            rewrite: candidate.bytes.to_vec(),
            context: None,
            what,
        }))
    }
}

/// Everything that differs between the reference run and the rewrite's, by the comparisons
/// not in `off`.
///
/// The native run must reach the end of the site, unless `any_end` (an image run, which may
/// leave its range or fault: the rewrite must then do the same). The one comparison of two
/// runs, whichever [`Executor`] made them.
pub fn differences(
    site: &Site,
    abs: &dyn Abstraction,
    initial: &State,
    r: &Run,
    w: &Run,
    any_end: bool,
    off: &[Comparison],
) -> Vec<Difference> {
    let on = |c: Comparison| !off.contains(&c);
    let initial_rsp = initial.gpr[4];
    let mut what = Vec::new();
    let mut differ = |c: Comparison, detail: String| {
        if on(c) {
            what.push(Difference::new(c, detail));
        }
    };
    let Some(op) = site.op() else {
        return vec![Difference::new(Comparison::End, "unknown op".into())];
    };
    // An invalid case is never a pass, whatever is switched off.
    if let End::Emulator(e) = &r.end {
        return vec![Difference::new(
            Comparison::End,
            format!("the native run failed in the emulator: {e}"),
        )];
    }
    if r.end != End::Reached && !any_end {
        return vec![Difference::new(
            Comparison::End,
            format!(
                "the native run did not reach the end of the site ({:?}): the case is invalid",
                r.end
            ),
        )];
    }
    if r.end != w.end {
        differ(
            Comparison::End,
            format!("the native run ended {:?}, the rewrite {:?}", r.end, w.end),
        );
    }
    let free = op.info().undefined.union(site.clobbers);
    let mut registers = Vec::new();
    for g in Gpr::ALL {
        let i = g.number() as usize;
        if !free.has(g) && r.gpr[i] != w.gpr[i] {
            registers.push(Difference {
                comparison: Comparison::Registers,
                register: Some(g),
                detail: format!(
                    "{}: native {:#x}, rewrite {:#x}",
                    g.name(),
                    r.gpr[i],
                    w.gpr[i]
                ),
            });
        }
    }
    let mask = if free.contains(RegSet::FLAGS) {
        !STATUS_FLAGS
    } else {
        !0
    };
    let w_rflags = abs.rflags(w);
    if r.rflags & mask != w_rflags & mask {
        differ(
            Comparison::Rflags,
            format!(
                "rflags: native {:#x}, rewrite {:#x} (compared bits {mask:#x})",
                r.rflags, w_rflags
            ),
        );
    }
    // The live stack is at and above the final rsp; when the op made rsp something else (a
    // `save_fl` into rsp), at and above the rsp it started with.
    let in_stack = |a: u64| (STACK..STACK + engine::PAGE).contains(&a);
    let rsp = if in_stack(r.gpr[4]) {
        r.gpr[4]
    } else {
        initial_rsp
    };
    let from = rsp
        .checked_sub(STACK)
        .map_or(0, |o| (o as usize).min(engine::PAGE as usize));
    let free_below = r.max_rsp.clamp(initial_rsp, STACK + engine::PAGE);
    let live = |i: usize| {
        // In an image run the code may pop, allocate stack (`sub rsp`) or switch stacks: what
        // lay below rsp at some point of the native run was free stack then (an interrupt
        // could have overwritten it), and matters only if the native run wrote it.
        !any_end || STACK + i as u64 >= free_below || r.stack.get(i) != initial.stack.get(i)
    };
    let stack_differs = if any_end {
        (from..r.stack.len().max(w.stack.len()))
            .any(|i| live(i) && r.stack.get(i) != w.stack.get(i))
    } else {
        r.stack.get(from..) != w.stack.get(from..)
    };
    if stack_differs {
        differ(
            Comparison::Stack,
            format!("the stack at and above rsp {rsp:#x} differs"),
        );
    }
    if r.data != w.data {
        differ(
            Comparison::Memory,
            first_difference("the data page", DATA, &r.data, &w.data),
        );
    }
    // Pages an image run mapped on demand: a page only one run reached must still hold what
    // it was given in that run.
    if r.demand != w.demand {
        let pages: std::collections::BTreeSet<u64> =
            r.demand.iter().chain(&w.demand).map(|(p, _)| *p).collect();
        let held = |run: &Run, p: u64| {
            run.demand
                .iter()
                .find(|(q, _)| *q == p)
                .map_or_else(|| engine::demand_page(initial.seed, p), |(_, b)| b.clone())
        };
        for p in pages {
            let (a, b) = (held(r, p), held(w, p));
            if a != b {
                differ(Comparison::Memory, first_difference("memory", p, &a, &b));
            }
        }
    }
    if !abs.owns_private_page() && r.private != w.private {
        differ(
            Comparison::PrivatePage,
            first_difference("the private page", PRIVATE, &r.private, &w.private),
        );
    }
    if abs.compares_control_registers() && (r.vcpu.cr, r.vcpu.dr) != (w.vcpu.cr, w.vcpu.dr) {
        differ(
            Comparison::ControlRegisters,
            format!(
                "control/debug registers: native {:x?} {:x?}, rewrite {:x?} {:x?}",
                r.vcpu.cr, r.vcpu.dr, w.vcpu.cr, w.vcpu.dr
            ),
        );
    }
    let compared = |e: &Effect| on(Comparison::Effect(e.kind()));
    let expected: Vec<Effect> = r
        .vcpu
        .trace
        .iter()
        .filter_map(|e| abs.canonical(op, e))
        .filter(compared)
        .collect();
    let got: Vec<Effect> = abs
        .trace(w, initial)
        .iter()
        .filter_map(|e| abs.canonical(op, e))
        .filter(compared)
        .collect();
    if let Some(kind) = first_differing_kind(&expected, &got) {
        differ(
            Comparison::Effect(kind),
            format!(
                "effects: native {expected:x?}, rewrite {got:x?} (as {} reads them)",
                abs.name()
            ),
        );
    }
    let msrs: std::collections::BTreeMap<u32, u64> =
        w.vcpu.msrs.iter().map(|(m, v)| (abs.msr(*m), *v)).collect();
    if r.vcpu.msrs != msrs {
        differ(
            Comparison::Msrs,
            format!("MSR state: native {:x?}, rewrite {msrs:x?}", r.vcpu.msrs),
        );
    }
    if on(Comparison::Registers) {
        what.extend(registers);
    }
    what
}

/// The kind of the first effect where two traces part (the native one's, or the rewrite's
/// when the native trace is a prefix of it); `None` if they are equal.
fn first_differing_kind(a: &[Effect], b: &[Effect]) -> Option<EffectKind> {
    if a == b {
        return None;
    }
    let i = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    a.get(i).or_else(|| b.get(i)).map(Effect::kind)
}

fn first_difference(what: &str, base: u64, a: &[u8], b: &[u8]) -> String {
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
    format!(
        "{what} differs first at {:#x}: native {:02x?}, rewrite {:02x?}",
        base + i as u64,
        a.get(i),
        b.get(i)
    )
}

/// A backend taken as given, with its ROM (loaded at [`ROM`]) when it is `rom`.
pub fn backend<'a>(
    kind: pvpatch_runtime::detect::BackendKind,
    features: u32,
    rom: Option<patch_sites::rom::Rom<'a>>,
) -> Backend<'a> {
    Backend {
        detected: pvpatch_runtime::detect::Detected::assumed(kind, features),
        rom: rom.map(|rom| LoadedRom { rom, base: ROM }),
        pv: None,
        thunks: None,
    }
}

/// The entry points the runtime generates for `kind` (Xen or Hyper-V) as the oracle lays the
/// machine out: `vcpu_info` or the hypercall input page in the private page, the hypercall
/// page at [`HYPERCALL`], the code at [`ROM`].
pub fn pv_code(kind: pvpatch_runtime::detect::BackendKind) -> Option<pvpatch_runtime::pv::PvCode> {
    use pvpatch_runtime::detect::BackendKind;
    use pvpatch_runtime::pv;
    match kind {
        BackendKind::Xen => pv::xen(
            pv::XenLayout {
                vcpu_info: PRIVATE,
                hypercall_page: HYPERCALL,
            },
            ROM,
        )
        .ok(),
        BackendKind::HyperV => pv::hyperv(
            pv::HyperVLayout {
                hypercall_page: HYPERCALL,
                input_page: PRIVATE + 0x800,
            },
            ROM,
        )
        .ok(),
        _ => None,
    }
}
