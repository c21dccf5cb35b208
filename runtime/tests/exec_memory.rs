//! The planner and the poker on real executable memory: a function assembled into an anonymous
//! mapping, its sites recorded in a sealed table, run before patching, patched for a backend
//! through a `TextPoke` that flips the mapping between read-execute and read-write with
//! mprotect, and run again. Only ops that are safe in user mode (cpuid, rdtsc, pushf/popf) are
//! executed; everything else the runtime does is the same code the guest kernel runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dynasmrt::x64::X64Relocation;
use dynasmrt::{DynasmApi, VecAssembler, dynasm};
use memmap2::{Mmap, MmapMut};
use patch_sites::Outcome;
use patch_sites::rom::{NO_REX, Rom, RomEntrySpec, RomKind, Slot, SlotKind, SlotSource};
use patch_sites::table::{AddrRange, Form, Site, SiteTable, write_sealed_table};
use patch_sites::{Gpr, Op, Operand, RegSet};
use pvpatch_runtime::apply::{self, ApplyError, TextPoke};
use pvpatch_runtime::backend::{Backend, Choice, LoadedRom};
use pvpatch_runtime::detect::{BackendKind, Detected};
use pvpatch_runtime::plan::{self, PlanError, TextRead};
use pvpatch_runtime::romcheck;

const MAP_LEN: usize = 0x4000;
const PROBE: usize = 0x0000;
const THUNKS: usize = 0x0800;
const OPS: usize = 0x1000;
const ROM_AREA: usize = 0x2000;

enum State {
    Exec(Mmap),
    Writable(MmapMut),
}

/// Kernel text, host edition: an anonymous mapping that is read-execute except between
/// `open` and `close`.
struct ExecText {
    state: Option<State>,
    base: u64,
    /// Writes so far (for fault injection).
    writes: usize,
    /// Corrupt the n-th write (0-based), to see the poker's read-back catch it.
    corrupt_write: Option<usize>,
    /// And this one too.
    corrupt_also: Option<usize>,
}

impl ExecText {
    fn new(image: &[u8]) -> ExecText {
        let mut m = MmapMut::map_anon(MAP_LEN).unwrap();
        m[..image.len()].copy_from_slice(image);
        let base = m.as_ptr() as u64;
        ExecText {
            state: Some(State::Exec(m.make_exec().unwrap())),
            base,
            writes: 0,
            corrupt_write: None,
            corrupt_also: None,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self.state.as_ref().unwrap() {
            State::Exec(m) => m,
            State::Writable(m) => m,
        }
    }

    fn text(&self) -> AddrRange {
        AddrRange::new(self.base, self.base + MAP_LEN as u64)
    }

    /// Runs the probe function; its results, as u32s.
    fn probe(&self) -> Probe {
        assert!(matches!(self.state, Some(State::Exec(_))));
        let mut out = [0u32; 32];
        // SAFETY: the mapping is executable and holds the probe function, assembled for the
        // System V ABI (`extern "C" fn(*mut u32)`, rbx saved, DF clear on return), at PROBE;
        // every site in it holds either its original bytes or what the planner wrote, which
        // the planner decoded and checked; `out` has room for every slot it writes.
        unsafe {
            let f: extern "C" fn(*mut u32) = std::mem::transmute(self.base + PROBE as u64);
            f(out.as_mut_ptr());
        }
        Probe(out)
    }
}

impl TextRead for ExecText {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        if !self.text().contains_span(addr, out.len() as u64) {
            return false;
        }
        let at = (addr - self.base) as usize;
        out.copy_from_slice(&self.bytes()[at..at + out.len()]);
        true
    }
}

impl TextPoke for ExecText {
    fn open(&mut self) {
        self.state = match self.state.take().unwrap() {
            State::Exec(m) => Some(State::Writable(m.make_mut().unwrap())),
            w => Some(w),
        };
    }

    fn close(&mut self) {
        self.state = match self.state.take().unwrap() {
            State::Writable(m) => Some(State::Exec(m.make_exec().unwrap())),
            x => Some(x),
        };
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        if !self.text().contains_span(addr, bytes.len() as u64) {
            return;
        }
        let n = Some(self.writes);
        let corrupt = self.corrupt_write == n || self.corrupt_also == n;
        self.writes += 1;
        if let Some(State::Writable(m)) = self.state.as_mut() {
            let at = (addr - self.base) as usize;
            m[at..at + bytes.len()].copy_from_slice(bytes);
            if corrupt {
                m[at] ^= 0x01;
            }
        }
    }

    fn sync(&mut self) {
        // cpuid serializes; a call into the new code also would.
        let _ = std::arch::x86_64::__cpuid(0);
    }
}

/// What the probe function recorded.
struct Probe([u32; 32]);

impl Probe {
    fn cpuid(&self, at: usize) -> [u32; 4] {
        self.0[at..at + 4].try_into().unwrap()
    }
    fn u64(&self, at: usize) -> u64 {
        self.0[at] as u64 | (self.0[at + 1] as u64) << 32
    }

    /// Every site did what its instruction does.
    fn check(&self) {
        let r = std::arch::x86_64::__cpuid(0);
        let want = [r.eax, r.ebx, r.ecx, r.edx];
        assert_eq!(self.cpuid(0), want, "cpuid, native site");
        assert_eq!(self.cpuid(4), want, "cpuid, call site");
        assert_eq!(self.cpuid(20), want, "cpuid, raw site");
        let (t0, t1) = (self.u64(8), self.u64(10));
        assert!(t0 > 0 && t1 > t0, "rdtsc goes forward: {t0} then {t1}");
        let fl = self.u64(12);
        assert_eq!(fl & 0x202, 0x202, "IF and the reserved bit: {fl:#x}");
        assert_eq!(self.u64(14), fl, "save_fl through a call");
        assert_eq!(self.u64(16), fl, "save_fl into rcx");
        assert_eq!(
            self.u64(18),
            fl | 0x400,
            "restore_fl set DF, save_fl saw it"
        );
    }
}

fn site(addr: u64, op: Op, form: Form, operand: Operand, insn_len: u8, site_len: u8) -> Site {
    let width = match operand {
        Operand::Reg(_) => 8,
        _ => 0,
    };
    Site {
        addr,
        site_len,
        insn_len,
        op_id: op.id(),
        form,
        operand,
        width,
        flags: 0,
        clobbers: RegSet::EMPTY,
        stub: None,
    }
}

/// The image (probe, thunks, an empty ops table to fill once the base is known) and its sites
/// as offsets.
struct Image {
    bytes: Vec<u8>,
    sites: Vec<Site>,
    thunks: Vec<(Op, usize)>,
}

fn image() -> Image {
    const NOP3: [u8; 3] = [0x0f, 0x1f, 0x00];
    let mut bytes = vec![0u8; OPS + 128 * 8];
    let mut sites = Vec::new();

    // Thunks for the indirect-call form: the native instruction and `ret`.
    let mut thunks = Vec::new();
    let mut off = THUNKS;
    for (op, code) in [
        (Op::Cpuid, &[0x0f, 0xa2, 0xc3][..]),
        (Op::Rdtsc, &[0x0f, 0x31, 0xc3][..]),
        (Op::SaveFl, &[0x9c, 0x58, 0xc3][..]),
    ] {
        bytes[off..off + code.len()].copy_from_slice(code);
        thunks.push((op, off));
        off += 16;
    }

    let mut a: VecAssembler<X64Relocation> = VecAssembler::new(0);
    let mut native =
        |a: &mut VecAssembler<X64Relocation>, op: Op, operand: Operand, insn: &[u8], pad: bool| {
            let at = a.offset().0 as u64;
            let mut b = insn.to_vec();
            if pad {
                b.extend_from_slice(&NOP3);
            }
            dynasm!(a ; .arch x64 ; .bytes b.iter());
            sites.push(site(
                at,
                op,
                Form::Native,
                operand,
                insn.len() as u8,
                b.len() as u8,
            ));
        };
    let call = |a: &mut VecAssembler<X64Relocation>, op: Op, operand: Operand| {
        let at = a.offset().0;
        let disp = (OPS + 8 * op.id() as usize) as i64 - (at as i64 + 6);
        let mut b = vec![0xff, 0x15];
        b.extend_from_slice(&(disp as i32).to_le_bytes());
        dynasm!(a ; .arch x64 ; .bytes b.iter());
        site(at as u64, op, Form::IndirectCall, operand, 6, 6)
    };
    let rax = Operand::Reg(Gpr::Rax);

    dynasm!(a ; .arch x64 ; push rbx ; mov r8, rdi ; xor eax, eax ; xor ecx, ecx);
    native(&mut a, Op::Cpuid, Operand::None, &[0x0f, 0xa2], true);
    dynasm!(a ; .arch x64
        ; mov [r8], eax ; mov [r8 + 4], ebx ; mov [r8 + 8], ecx ; mov [r8 + 12], edx
        ; xor eax, eax ; xor ecx, ecx);
    let s = call(&mut a, Op::Cpuid, Operand::None);
    dynasm!(a ; .arch x64
        ; mov [r8 + 16], eax ; mov [r8 + 20], ebx ; mov [r8 + 24], ecx ; mov [r8 + 28], edx);
    let mut all = vec![s];
    native(&mut a, Op::Rdtsc, Operand::None, &[0x0f, 0x31], true);
    dynasm!(a ; .arch x64 ; mov [r8 + 32], eax ; mov [r8 + 36], edx);
    all.push(call(&mut a, Op::Rdtsc, Operand::None));
    dynasm!(a ; .arch x64 ; mov [r8 + 40], eax ; mov [r8 + 44], edx);
    native(&mut a, Op::SaveFl, rax, &[0x9c, 0x58], true);
    dynasm!(a ; .arch x64 ; mov [r8 + 48], rax);
    all.push(call(&mut a, Op::SaveFl, rax));
    dynasm!(a ; .arch x64 ; mov [r8 + 56], rax);
    native(
        &mut a,
        Op::SaveFl,
        Operand::Reg(Gpr::Rcx),
        &[0x9c, 0x59],
        true,
    );
    dynasm!(a ; .arch x64 ; mov [r8 + 64], rcx ; mov rax, [r8 + 48] ; or rax, 0x400);
    native(&mut a, Op::RestoreFl, rax, &[0x50, 0x9d], true);
    native(
        &mut a,
        Op::SaveFl,
        Operand::Reg(Gpr::Rdx),
        &[0x9c, 0x5a],
        true,
    );
    dynasm!(a ; .arch x64 ; cld ; mov [r8 + 72], rdx ; xor eax, eax ; xor ecx, ecx);
    // A raw site, as the post-link tool records them: the instruction's own room only.
    native(&mut a, Op::Cpuid, Operand::None, &[0x0f, 0xa2], false);
    dynasm!(a ; .arch x64
        ; mov [r8 + 80], eax ; mov [r8 + 84], ebx ; mov [r8 + 88], ecx ; mov [r8 + 92], edx
        ; pop rbx ; ret);
    let code = a.finalize().unwrap();
    assert!(code.len() < THUNKS);
    bytes[PROBE..PROBE + code.len()].copy_from_slice(&code);
    sites.extend(all);
    sites.sort_by_key(|s| s.addr);
    Image {
        bytes,
        sites,
        thunks,
    }
}

macro_rules! table {
    ($m:expr) => {
        SiteTable::parse_contiguous(&$m.table, $m.table_addr, &[$m.range]).unwrap()
    };
}

/// A machine: the image mapped, its ops table filled, and its sealed table.
struct Machine {
    text: ExecText,
    sites: Vec<Site>,
    table: Vec<u8>,
    table_addr: u64,
    range: AddrRange,
}

impl Machine {
    fn new() -> Machine {
        let img = image();
        let mut text = ExecText::new(&img.bytes);
        let base = text.base;
        text.open();
        for (op, off) in &img.thunks {
            let slot = base + (OPS + 8 * op.id() as usize) as u64;
            text.write(slot, &(base + *off as u64).to_le_bytes());
        }
        text.close();
        let sites: Vec<Site> = img
            .sites
            .iter()
            .map(|s| Site {
                addr: base + s.addr,
                ..*s
            })
            .collect();
        let table_addr = base + MAP_LEN as u64;
        let mut table = vec![0u8; patch_sites::table::sealed_table_size(sites.len())];
        write_sealed_table(&sites, table_addr, &mut table).unwrap();
        let range = text.text();
        Machine {
            text,
            sites,
            table,
            table_addr,
            range,
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.text.bytes().to_vec()
    }

    fn site_bytes(&self, i: usize) -> Vec<u8> {
        let s = &self.sites[i];
        let at = (s.addr - self.text.base) as usize;
        self.text.bytes()[at..at + s.site_len as usize].to_vec()
    }

    fn index_of(&self, op: Op, form: Form) -> usize {
        self.sites
            .iter()
            .position(|s| s.op() == Some(op) && s.form == form)
            .unwrap()
    }
}

fn backend(kind: BackendKind) -> Backend<'static> {
    Backend {
        detected: Detected::assumed(kind, 0),
        rom: None,
        pv: None,
        thunks: None,
    }
}

#[test]
fn unpatched_sites_run_as_their_instructions() {
    let m = Machine::new();
    m.text.probe().check();
}

#[test]
fn native_backend_inlines_call_sites_and_keeps_the_rest() {
    let mut m = Machine::new();
    let before = m.snapshot();
    let table = table!(m);
    let b = backend(BackendKind::Native);
    let p = plan::plan(&table, &b, &m.text, None).unwrap();
    let calls: Vec<_> = p
        .sites
        .iter()
        .filter(|s| s.site.form == Form::IndirectCall)
        .collect();
    assert_eq!(calls.len(), 3);
    for s in &p.sites {
        let want = if s.site.form == Form::IndirectCall {
            Outcome::Native
        } else {
            Outcome::Unchanged
        };
        assert_eq!(s.outcome, want, "site {}", s.index);
    }
    let applied = apply::apply(&p, &mut m.text).unwrap();
    assert_eq!(applied.sites, 3);
    assert_eq!(applied.bytes, 18);
    m.text.probe().check();
    // The call sites hold their native instruction, NOP-padded, exactly as planned.
    let cpuid_call = m.index_of(Op::Cpuid, Form::IndirectCall);
    assert_eq!(
        m.site_bytes(cpuid_call),
        [0x0f, 0xa2, 0x0f, 0x1f, 0x40, 0x00]
    );
    let fl_call = m.index_of(Op::SaveFl, Form::IndirectCall);
    assert_eq!(&m.site_bytes(fl_call)[..2], [0x9c, 0x58]);
    // Nothing outside the sites changed.
    let after = m.snapshot();
    let changed: Vec<usize> = (0..MAP_LEN).filter(|&i| before[i] != after[i]).collect();
    for i in &changed {
        let addr = m.text.base + *i as u64;
        assert!(
            m.sites
                .iter()
                .any(|s| s.form == Form::IndirectCall && addr >= s.addr && addr < s.end()),
            "byte {i:#x} changed outside a call site"
        );
    }
    // Revert restores every byte.
    apply::revert(&p, &mut m.text);
    assert_eq!(m.snapshot(), before);
    m.text.probe().check();
}

/// A ROM with an inline template with an operand slot, a fixed template and an entry point.
fn test_rom() -> Vec<u8> {
    let save_fl_slot = [Slot {
        kind: SlotKind::OpcodeReg,
        offset: 1,
        rex_offset: NO_REX,
        source: SlotSource::Reg,
    }];
    let entries = [
        RomEntrySpec {
            op_id: Op::Cpuid.id(),
            kind: RomKind::Inline,
            code: &[0x0f, 0xa2],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::Rdtsc.id(),
            kind: RomKind::Call,
            code: &[0x0f, 0x31, 0xc3],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::SaveFl.id(),
            kind: RomKind::Inline,
            code: &[0x9c, 0x58],
            slots: &save_fl_slot,
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::RestoreFl.id(),
            kind: RomKind::Native,
            code: &[],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
    ];
    let mut buf = vec![0u8; patch_sites::rom::rom_size(&entries)];
    patch_sites::rom::write_rom("host-test", [0; 12], &entries, &mut buf).unwrap();
    buf
}

#[test]
fn rom_backend_inlines_templates_and_calls_entry_points() {
    let mut m = Machine::new();
    let rom_bytes = test_rom();
    let rom = Rom::parse(&rom_bytes).unwrap();
    let table = table!(m);
    romcheck::validate(&rom, &[0; 12], &table).unwrap();
    // Load the ROM into executable memory, as the guest does.
    let base = m.text.base + ROM_AREA as u64;
    m.text.open();
    m.text.write(base, &rom_bytes);
    m.text.close();
    let b = Backend {
        rom: Some(LoadedRom { rom, base }),
        pv: None,
        thunks: None,
        ..backend(BackendKind::Rom)
    };
    let p = plan::plan(&table, &b, &m.text, None).unwrap();
    let outcome = |op: Op, form: Form| p.sites[m.index_of(op, form)].outcome;
    assert_eq!(outcome(Op::Cpuid, Form::IndirectCall), Outcome::Inline);
    assert_eq!(outcome(Op::Rdtsc, Form::Native), Outcome::Call);
    assert_eq!(outcome(Op::Rdtsc, Form::IndirectCall), Outcome::Call);
    assert_eq!(outcome(Op::SaveFl, Form::IndirectCall), Outcome::Inline);
    assert_eq!(outcome(Op::RestoreFl, Form::Native), Outcome::Unchanged);
    apply::apply(&p, &mut m.text).unwrap();
    m.text.probe().check();
    // The rdtsc sites call the entry point.
    let entry = base
        + Rom::parse(&rom_bytes)
            .unwrap()
            .entries()
            .find_map(|e| match e.action {
                patch_sites::rom::RomAction::Call { code_off, .. } => Some(code_off as u64),
                _ => None,
            })
            .unwrap();
    for i in [
        m.index_of(Op::Rdtsc, Form::Native),
        m.index_of(Op::Rdtsc, Form::IndirectCall),
    ] {
        let b = m.site_bytes(i);
        assert_eq!(b[0], 0xe8);
        let rel = i32::from_le_bytes(b[1..5].try_into().unwrap());
        let target = (m.sites[i].addr as i64 + 5 + rel as i64) as u64;
        assert_eq!(target, entry);
    }
    // save_fl into rcx and rdx got the template with the register substituted.
    let rcx = m
        .sites
        .iter()
        .position(|s| s.operand == Operand::Reg(Gpr::Rcx))
        .unwrap();
    assert_eq!(&m.site_bytes(rcx)[..2], [0x9c, 0x59]);
}

#[test]
fn a_rewrite_that_clobbers_what_the_site_does_not_allow_falls_back_to_native() {
    let m = Machine::new();
    // rdtsc by call, declared to clobber rsi: the sites do not allow it.
    let entries = [RomEntrySpec {
        op_id: Op::Rdtsc.id(),
        kind: RomKind::Call,
        code: &[0x31, 0xf6, 0x0f, 0x31, 0xc3],
        slots: &[],
        clobbers: RegSet::reg(Gpr::Rsi).union(RegSet::FLAGS),
    }];
    let mut buf = vec![0u8; patch_sites::rom::rom_size(&entries)];
    patch_sites::rom::write_rom("clobbers", [0; 12], &entries, &mut buf).unwrap();
    let rom = Rom::parse(&buf).unwrap();
    let table = table!(m);
    // Honest about what it clobbers, so the ROM itself is valid ...
    romcheck::validate(&rom, &[0; 12], &table).unwrap();
    let b = Backend {
        rom: Some(LoadedRom {
            rom,
            base: m.text.base + ROM_AREA as u64,
        }),
        ..backend(BackendKind::Rom)
    };
    // ... but no site lets it clobber rsi: the native instruction stays.
    let p = plan::plan(&table, &b, &m.text, None).unwrap();
    let native = &p.sites[m.index_of(Op::Rdtsc, Form::Native)];
    assert_eq!(native.outcome, Outcome::Unchanged);
    assert_eq!(native.keep, Some(plan::Keep::Clobbers));
    let call = &p.sites[m.index_of(Op::Rdtsc, Form::IndirectCall)];
    assert_eq!(call.outcome, Outcome::Native);
    assert_eq!(call.keep, Some(plan::Keep::Clobbers));
    // Both count as fallbacks, by form.
    let stats = pvpatch_runtime::stats::Stats::of(&p);
    assert_eq!(stats.fallbacks, 2);
    let native = pvpatch_runtime::stats::FORMS
        .iter()
        .position(|f| *f == Form::Native)
        .unwrap();
    assert_eq!(stats.by_form[native].iter().sum::<u32>(), 7);
}

#[test]
fn a_failed_read_back_restores_every_site() {
    let mut m = Machine::new();
    let before = m.snapshot();
    let table = table!(m);
    let p = plan::plan(&table, &backend(BackendKind::Native), &m.text, None).unwrap();
    // The second of three writes lands wrong.
    m.text.corrupt_write = Some(m.text.writes + 1);
    let e = apply::apply(&p, &mut m.text).unwrap_err();
    assert!(matches!(e, ApplyError::ReadBack { .. }), "{e:?}");
    assert_eq!(m.snapshot(), before, "every site restored");
    m.text.probe().check();
}

/// Corrupts every write from the n-th on: the read-back fails, and so does the restore.
#[test]
fn a_restore_that_fails_too_is_reported_as_such() {
    let mut m = Machine::new();
    let table = table!(m);
    let p = plan::plan(&table, &backend(BackendKind::Native), &m.text, None).unwrap();
    // Writes 0..3 apply the plan (the third lands wrong), writes 3..6 restore it (the first
    // restore lands wrong too).
    m.text.corrupt_write = Some(m.text.writes + 2);
    m.text.corrupt_also = Some(m.text.writes + 3);
    let e = apply::apply(&p, &mut m.text).unwrap_err();
    assert!(matches!(e, ApplyError::NotRestored { .. }), "{e:?}");
}

#[test]
fn a_site_changed_after_planning_stops_everything() {
    let mut m = Machine::new();
    let table = table!(m);
    let p = plan::plan(&table, &backend(BackendKind::Native), &m.text, None).unwrap();
    // Someone else patches the cpuid call site's displacement between plan and apply.
    let i = m.index_of(Op::Cpuid, Form::IndirectCall);
    let addr = m.sites[i].addr + 2;
    let old = m.site_bytes(i)[2];
    m.text.open();
    m.text.write(addr, &[old ^ 0x80]);
    m.text.close();
    let before = m.snapshot();
    let writes = m.text.writes;
    let e = apply::apply(&p, &mut m.text).unwrap_err();
    assert_eq!(
        e,
        ApplyError::Changed {
            index: i as u32,
            addr: m.sites[i].addr
        }
    );
    assert_eq!(m.text.writes, writes, "nothing written");
    assert_eq!(m.snapshot(), before);
}

#[test]
fn a_record_that_lies_refuses_the_table() {
    let mut m = Machine::new();
    // The rdtsc site recorded as cpuid.
    let i = m.index_of(Op::Rdtsc, Form::Native);
    m.sites[i].op_id = Op::Cpuid.id();
    write_sealed_table(&m.sites, m.table_addr, &mut m.table).unwrap();
    let table = table!(m);
    let e = plan::plan(&table, &backend(BackendKind::Native), &m.text, None).unwrap_err();
    assert!(
        matches!(e, PlanError::Mismatch { index, .. } if index == i as u32),
        "{e:?}"
    );
}

#[test]
fn unknown_ops_are_left_alone() {
    let mut m = Machine::new();
    let i = m.index_of(Op::Rdtsc, Form::IndirectCall);
    m.sites[i].op_id = 999;
    write_sealed_table(&m.sites, m.table_addr, &mut m.table).unwrap();
    let table = table!(m);
    assert_eq!(table.unknown_ops(), 1);
    let p = plan::plan(&table, &backend(BackendKind::Native), &m.text, None).unwrap();
    assert_eq!(p.sites[i].keep, Some(plan::Keep::UnknownOp));
    apply::apply(&p, &mut m.text).unwrap();
    // Still a call through the ops table, which still works.
    assert_eq!(m.site_bytes(i)[..2], [0xff, 0x15]);
    m.text.probe().check();
}

#[test]
fn forced_traps_are_written_as_ud2_and_reverted() {
    let mut m = Machine::new();
    let before = m.snapshot();
    let table = table!(m);
    let force = |_: u32, s: &Site| (s.op() == Some(Op::Cpuid)).then_some(Choice::Trap);
    let p = plan::plan(&table, &backend(BackendKind::Native), &m.text, Some(&force)).unwrap();
    apply::apply(&p, &mut m.text).unwrap();
    for (i, s) in m.sites.iter().enumerate() {
        if s.op() == Some(Op::Cpuid) {
            assert_eq!(p.sites[i].outcome, Outcome::Trap);
            assert_eq!(m.site_bytes(i)[..2], [0x0f, 0x0b], "site {i}");
        }
    }
    // Not run here (a user-mode ud2 is SIGILL); undone exactly.
    apply::revert(&p, &mut m.text);
    assert_eq!(m.snapshot(), before);
    m.text.probe().check();
}
