//! The planner and protected bytes, on generated stock kernels: functions of random code with
//! sensitive instructions next to bytes Linux's tables name (`call __fentry__` in
//! `__mcount_loc`, return thunks in `.return_sites`, lock prefixes in `.smp_locks`, jump labels
//! in `__jump_table`, `endbr64` at function entries) and branch targets, an ORC table, and a
//! cave. Functions end in `int3` padding or in NOP padding (with the undefined ORC entry objtool
//! gives dead code), and bodies hold live NOPs: a trampoline may only ever land in the padding.
//! What is protected is known here from how each image was built, not from the tool's table
//! reader; every in-place room, moved range and planned write is checked against it.

use pvpatch::rewrite::{BackendSpec, plan_image};
use pvpatch::scan_image;
use pvpatch_testkit::elf::{Extra, TEXT, build};

use proptest::prelude::*;

/// One piece of a function body.
#[derive(Clone, Copy, Debug)]
enum Piece {
    /// An ordinary instruction (one of a few), movable.
    Filler(u8),
    /// A sensitive instruction (one of a few).
    Sensitive(u8),
    /// `je +0`: the next piece is a branch target.
    Branch,
    /// `lock inc qword [rax]`, named by `.smp_locks`.
    Lock,
    /// A 2-byte jump label NOP, named by `__jump_table` (the next piece is its target).
    JumpLabel,
    /// `je` over a loop, `hlt; jmp` back to the `hlt`: the `hlt` the target of that jump
    /// alone, the next piece the `je`'s (what follows a loop is live only if something
    /// branches to it). With `true`, a `je` into the loop, before it, targets the `hlt` too.
    Loop(bool),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => (0u8..6).prop_map(Piece::Filler),
        3 => (0u8..7).prop_map(Piece::Sensitive),
        1 => Just(Piece::Branch),
        1 => Just(Piece::Lock),
        1 => Just(Piece::JumpLabel),
        1 => any::<bool>().prop_map(Piece::Loop),
    ]
}

/// A function: `endbr64` or not, a `call __fentry__` or not, a body, and a return through the
/// return thunk (a `.return_sites` entry) or a plain `ret`.
#[derive(Clone, Debug)]
struct Function {
    endbr: bool,
    mcount: bool,
    body: Vec<Piece>,
    /// How it ends: `ret`, a return thunk's `jmp` (`.return_sites`), or a jump label's `jmp`
    /// (`__jump_table`), which Linux may turn into a NOP: then what follows is not dead.
    ending: u8,
    /// Padded to alignment with NOPs instead of `int3`s.
    nop_pad: bool,
    /// Preceded by 16 NOPs of pre-function padding (6.12's `__pfx_` symbols), which Linux may
    /// rewrite: protected, never padding.
    pfx: bool,
}

fn function() -> impl Strategy<Value = Function> {
    (
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(piece(), 1..12),
        0u8..3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(endbr, mcount, body, ending, nop_pad, pfx)| Function {
            endbr,
            mcount,
            body,
            ending,
            nop_pad,
            pfx,
        })
}

/// A built image and what the generator knows about it.
struct Built {
    bytes: Vec<u8>,
    /// Byte ranges Linux's tables (or IBT) name, sorted.
    protected: Vec<(u64, u64)>,
    /// Addresses something jumps to or names (branch targets, jump-label targets, functions).
    targets: Vec<u64>,
    /// The direct branches of the bodies: where each is, and its target.
    branches: Vec<(u64, u64)>,
    /// The cave.
    cave: (u64, u64),
    /// The padding after each function, and whether it is NOPs.
    padding: Vec<(u64, u64, bool)>,
    /// Function entries (named by their symbols).
    entries: Vec<u64>,
    /// Each `sti; hlt`.
    shadows: Vec<u64>,
}

const TABLES: u64 = 0xffff_ffff_8200_0000;
const CAVE: u64 = 80 * 1024;

fn rel32(from_end: u64, to: u64) -> [u8; 4] {
    ((to as i64 - from_end as i64) as i32).to_le_bytes()
}

fn build_image(funcs: &[Function]) -> Built {
    let mut code = vec![0xc3];
    code.resize(16, 0xcc); // __fentry__ at TEXT
    code.push(0xc3);
    code.resize(32, 0xcc); // __x86_return_thunk at TEXT + 16
    let (fentry, thunk) = (TEXT, TEXT + 16);
    let mut symbols: Vec<(String, u64, u64)> = vec![
        ("__fentry__".into(), 0, 1),
        ("__x86_return_thunk".into(), 16, 1),
    ];
    let (mut protected, mut targets, mut branches) = (Vec::new(), Vec::new(), Vec::new());
    let (mut mcount, mut returns, mut locks, mut jumps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut orc = vec![(TEXT, true)];
    // The int3s after `__fentry__`'s and the return thunk's `ret`s are padding too.
    let mut padding = vec![(TEXT + 1, TEXT + 16, false), (TEXT + 17, TEXT + 32, false)];
    let mut shadows = Vec::new();
    for (n, f) in funcs.iter().enumerate() {
        let at = |code: &Vec<u8>| TEXT + code.len() as u64;
        if f.pfx {
            let p = at(&code);
            protected.push((p, p + 16));
            symbols.push((format!("__pfx_f{n}"), p - TEXT, 16));
            code.resize(code.len() + 16, 0x90);
        }
        let start = code.len() as u64;
        targets.push(TEXT + start);
        orc.push((TEXT + start, true));
        if f.endbr {
            protected.push((at(&code), at(&code) + 4));
            code.extend_from_slice(&[0xf3, 0x0f, 0x1e, 0xfa]);
        }
        if f.mcount {
            let a = at(&code);
            protected.push((a, a + 5));
            mcount.push(a);
            code.push(0xe8);
            code.extend_from_slice(&rel32(a + 5, fentry));
        }
        let mut target_next = false;
        for p in &f.body {
            let a = at(&code);
            if std::mem::take(&mut target_next) {
                targets.push(a);
            }
            match *p {
                Piece::Filler(k) => code.extend_from_slice(match k {
                    0 => &[0x48, 0x89, 0xc0][..],
                    1 => &[0x48, 0x83, 0xc0, 0x07],
                    2 => &[0x90],
                    3 => &[0x48, 0x8d, 0x40, 0x10],
                    // A live 8-byte NOP: room for a trampoline, were it dead.
                    4 => &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
                    _ => &[0x31, 0xc0],
                }),
                Piece::Sensitive(6) => {
                    // `sti; hlt`: the hlt in the sti's interrupt shadow.
                    shadows.push(a);
                    code.extend_from_slice(&[0xfb, 0xf4]);
                }
                Piece::Sensitive(k) => code.extend_from_slice(match k {
                    0 => &[0xfa][..],
                    1 => &[0x0f, 0x31],
                    2 => &[0x0f, 0x32],
                    3 => &[0x0f, 0x30],
                    4 => &[0x0f, 0x09],
                    _ => &[0xec],
                }),
                Piece::Branch => {
                    code.extend_from_slice(&[0x74, 0x00]);
                    branches.push((a, a + 2));
                    target_next = true;
                }
                Piece::Loop(false) => {
                    code.extend_from_slice(&[0x74, 0x03, 0xf4, 0xeb, 0xfd]);
                    branches.extend([(a, a + 5), (a + 3, a + 2)]);
                    targets.push(a + 2);
                    target_next = true;
                }
                Piece::Loop(true) => {
                    code.extend_from_slice(&[0x75, 0x05, 0x74, 0x00, 0xf4, 0xeb, 0xfd]);
                    branches.extend([(a, a + 7), (a + 2, a + 4), (a + 5, a + 4)]);
                    targets.push(a + 4);
                    target_next = true;
                }
                Piece::Lock => {
                    protected.push((a, a + 4));
                    locks.push(a);
                    code.extend_from_slice(&[0xf0, 0x48, 0xff, 0x00]);
                }
                Piece::JumpLabel => {
                    protected.push((a, a + 2));
                    jumps.push((a, a + 2));
                    code.extend_from_slice(&[0x66, 0x90]);
                    target_next = true;
                }
            }
        }
        let a = at(&code);
        if target_next {
            targets.push(a);
        }
        match f.ending {
            1 => {
                protected.push((a, a + 5));
                returns.push(a);
                code.push(0xe9);
                code.extend_from_slice(&rel32(a + 5, thunk));
            }
            2 => {
                protected.push((a, a + 5));
                jumps.push((a, TEXT + start));
                code.push(0xe9);
                code.extend_from_slice(&rel32(a + 5, TEXT + start));
            }
            _ => code.push(0xc3),
        }
        let pad = at(&code);
        if f.nop_pad {
            // As compilers pad: whole NOPs, the longest first, with an undefined ORC entry.
            let end = code.len().next_multiple_of(16);
            while code.len() < end {
                code.extend_from_slice(match end - code.len() {
                    8.. => &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00][..],
                    4..=7 => &[0x0f, 0x1f, 0x40, 0x00],
                    2..=3 => &[0x66, 0x90],
                    _ => &[0x90],
                });
            }
            if at(&code) > pad {
                orc.push((pad, false));
            }
        } else {
            while !code.len().is_multiple_of(16) {
                code.push(0xcc);
            }
        }
        // NOPs after a jump label run once Linux turns the jump into a NOP: not padding.
        if !(f.nop_pad && f.ending == 2) {
            padding.push((pad, at(&code), f.nop_pad));
        }
        symbols.push((format!("f{n}"), start, pad - TEXT - start));
    }
    let cave = TEXT + code.len() as u64;
    orc.push((cave, false));
    code.resize(code.len() + CAVE as usize, 0xcc);
    let etext = TEXT + code.len() as u64;
    orc.push((etext, false));
    symbols.push(("_text".into(), 0, 0));
    symbols.push(("_etext".into(), code.len() as u64, 0));
    // Tables, each its own section.
    let at = |k: u64| TABLES + k * 0x10_0000;
    let rel_table = |base: u64, addrs: &[u64]| -> Vec<u8> {
        addrs
            .iter()
            .enumerate()
            .flat_map(|(i, &a)| ((a as i64 - (base + 4 * i as u64) as i64) as i32).to_le_bytes())
            .collect()
    };
    let jt: Vec<u8> = jumps
        .iter()
        .enumerate()
        .flat_map(|(i, &(c, t))| {
            let e = at(3) + 16 * i as u64;
            let mut v = ((c as i64 - e as i64) as i32).to_le_bytes().to_vec();
            v.extend_from_slice(&((t as i64 - (e + 4) as i64) as i32).to_le_bytes());
            v.extend_from_slice(&0u64.to_le_bytes());
            v
        })
        .collect();
    let ips: Vec<u64> = orc.iter().map(|o| o.0).collect();
    let extra = [
        Extra::data(
            "__mcount_loc",
            at(0),
            mcount.iter().flat_map(|a: &u64| a.to_le_bytes()).collect(),
        ),
        Extra::data(".return_sites", at(1), rel_table(at(1), &returns)),
        Extra::data(".smp_locks", at(2), rel_table(at(2), &locks)),
        Extra::data("__jump_table", at(3), jt),
        Extra::data(".orc_unwind_ip", at(4), rel_table(at(4), &ips)),
        Extra::data(
            ".orc_unwind",
            at(5),
            orc.iter()
                .flat_map(|&(_, defined)| [0, 0, 0, 0, if defined { 0x52 } else { 0 }, 0])
                .collect(),
        ),
    ];
    let syms: Vec<(&str, u64, u64)> = symbols
        .iter()
        .map(|(n, a, s)| (n.as_str(), *a, *s))
        .collect();
    protected.sort_unstable();
    targets.sort_unstable();
    Built {
        bytes: build(&code, &syms, &extra),
        protected,
        targets,
        branches,
        cave: (cave, etext),
        padding,
        entries: symbols.iter().map(|s| TEXT + s.1).collect(),
        shadows,
    }
}

fn overlaps(ranges: &[(u64, u64)], a: u64, b: u64) -> Option<(u64, u64)> {
    ranges.iter().find(|r| r.0 < b && a < r.1).copied()
}

/// Checks one generated image; returns how many detours were planned, sites refused one, of
/// the refused the pinned, trampolines in NOP padding, and sites whose detour moves a branch
/// target with the branch to it.
fn e_of(d: &pvpatch::analyse::stock::DetourPlan) -> u64 {
    d.start + d.len as u64
}

fn check(built: &Built) -> Result<[usize; 6], TestCaseError> {
    let img = pvpatch::load::Image::from_bytes("stock.elf", built.bytes.clone())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let report = scan_image(&img, Default::default(), None);
    prop_assert!(
        report.analysis.stock,
        "the image is not taken for a stock kernel"
    );
    let inside = |a: u64, b: u64| built.targets.iter().find(|&&t| a < t && t < b).copied();
    // A moved range may hold a target only if the one branch to it moves with it (and nothing
    // names it: a function entry never lies inside a range).
    let jumped_into = |a: u64, b: u64| {
        built.targets.iter().find(|&&t| {
            let from: Vec<u64> = built
                .branches
                .iter()
                .filter(|br| br.1 == t)
                .map(|br| br.0)
                .collect();
            a < t && t < b && !(from.len() == 1 && a <= from[0] && from[0] < b)
        })
    };
    let mut internal = 0;
    let mut refused = 0;
    let mut pinned = 0;
    let protected = |x: u64| overlaps(&built.protected, x, x + 1).is_some();
    for s in &report.analysis.sites {
        let (a, room) = (s.found.addr, s.room.in_place as u64);
        // Linux's design pins a one-byte site with a protected byte after it and a protected
        // byte or a function entry at or before it, and `sti; hlt`; nothing else here.
        let shadow = built.shadows.contains(&a) || built.shadows.contains(&(a - 1));
        prop_assert!(
            !shadow || (s.room.pinned && s.room.detour.is_none() && s.room.forms.is_empty()),
            "the sti; hlt at {:#x} may move or become a call",
            a
        );
        let fenced = s.found.len == 1
            && protected(a + 1)
            && (protected(a - 1) || built.entries.contains(&a))
            || shadow;
        if s.rewritable() && s.room.detour.is_none() && room < 5 {
            prop_assert_eq!(s.room.pinned, fenced, "pinned: {:#x}", a);
            pinned += usize::from(fenced);
        } else {
            prop_assert!(!s.room.pinned, "{:#x} has a way out and is pinned", a);
        }
        if room > 0 {
            prop_assert_eq!(
                overlaps(&built.protected, a, a + room),
                None,
                "room of {:#x}",
                a
            );
            prop_assert_eq!(inside(a, a + room), None, "room of {:#x}", a);
        }
        if let Some(d) = &s.room.detour {
            let (m, e) = (d.start, d.start + d.len as u64);
            prop_assert_eq!(overlaps(&built.protected, m, e), None, "detour of {:#x}", a);
            prop_assert_eq!(jumped_into(m, e), None, "detour of {:#x}", a);
            internal += usize::from(inside(m, e).is_some());
        } else if s.rewritable() && s.room.in_place < 5 {
            refused += 1;
        }
    }
    // Stubs in the order of the moved ranges (the ABI's), and apart.
    let mut by_start: Vec<_> = report.analysis.detours.iter().collect();
    by_start.sort_by_key(|d| d.start);
    for w in by_start.windows(2) {
        prop_assert!(
            w[0].stub_addr + w[0].stub.len() as u64 <= w[1].stub_addr,
            "stubs out of order at {:#x}",
            w[1].start
        );
    }
    let mut in_nops = 0;
    let mut hosted = 0;
    for d in &report.analysis.detours {
        let (a, b) = (d.stub_addr, d.stub_addr + d.stub.len() as u64);
        prop_assert!(a >= built.cave.0 && b <= built.cave.1, "stub at {:#x}", a);
        // Every moved range, a host that carries no site too.
        let (m, e) = (d.start, d.start + d.len as u64);
        prop_assert_eq!(
            overlaps(&built.protected, m, e),
            None,
            "moved range {:#x}",
            m
        );
        prop_assert_eq!(jumped_into(m, e), None, "moved range {:#x}", m);
        if let (Some((t, _)), Some(h)) = (&d.trampoline, d.host) {
            // In another range's dead tail: after its `jmp rel32`, inside it.
            let h = &report.analysis.detours[h];
            prop_assert!(
                (e_of(h) <= d.start || e <= h.start) && h.start + 5 <= *t && t + 5 <= e_of(h),
                "trampoline at {:#x} is not in its host's dead tail",
                t
            );
            hosted += 1;
        } else if let Some((t, _)) = &d.trampoline {
            // Only dead padding; in NOP padding, only at its start (an instruction start).
            let pad = built.padding.iter().find(|p| p.0 <= *t && t + 5 <= p.1);
            prop_assert!(pad.is_some(), "trampoline at {:#x} is not in padding", t);
            if let Some(&(start, _, true)) = pad {
                prop_assert_eq!(*t, start, "trampoline inside NOP padding");
                in_nops += 1;
            }
        }
    }
    let plan = plan_image(&report, &BackendSpec::new("outofline", None).unwrap()).map_err(|e| {
        let cause = std::error::Error::source(&e).map(|c| c.to_string());
        TestCaseError::fail(format!("{e}: {}", cause.unwrap_or_default()))
    })?;
    for w in plan.plan.writes() {
        let (a, b) = (w.addr, w.addr + w.new.len() as u64);
        prop_assert_eq!(overlaps(&built.protected, a, b), None, "write at {:#x}", a);
    }
    for c in &plan.plan.code {
        prop_assert!(c.addr >= built.cave.0 && c.addr + c.new.len() as u64 <= built.cave.1);
    }
    Ok([
        report.analysis.detours.len(),
        refused,
        pinned,
        in_nops,
        internal,
        hosted,
    ])
}

#[test]
fn the_planner_never_touches_a_protected_byte() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let totals = std::cell::Cell::new([0usize; 6]);
    runner
        .run(&proptest::collection::vec(function(), 1..8), |funcs| {
            let got = check(&build_image(&funcs))?;
            let mut t = totals.get();
            for (t, g) in t.iter_mut().zip(got) {
                *t += g;
            }
            totals.set(t);
            Ok(())
        })
        .unwrap();
    let [detours, refused, pinned, in_nops, internal, hosted] = totals.get();
    eprintln!(
        "256 generated stock kernels: {detours} detours planned ({in_nops} through a trampoline \
         in NOP padding, {hosted} in another range's dead tail, {internal} sites' moving a \
         branch target with its branch), {refused} sites refused one ({pinned} pinned by \
         Linux's layout)"
    );
    assert!(
        pinned > 5,
        "too few pinned sites to test anything: {pinned}"
    );
    assert!(detours > 100, "too few detours to test anything: {detours}");
    assert!(refused > 20, "too few refusals to test anything: {refused}");
    assert!(
        in_nops > 10,
        "too few NOP trampolines to test anything: {in_nops}"
    );
    assert!(
        hosted > 5,
        "too few trampolines in a host's dead tail to test anything: {hosted}"
    );
    assert!(
        internal > 10,
        "too few ranges with a branch target inside to test anything: {internal}"
    );
}

/// Cases the generator found once, kept because they failed: each must plan and check.
#[test]
fn kernels_that_once_failed_plan_and_check() {
    use Piece::*;
    let f = |endbr, mcount, body: &[Piece], ending, nop_pad, pfx| Function {
        endbr,
        mcount,
        body: body.to_vec(),
        ending,
        nop_pad,
        pfx,
    };
    let found = [
        // A `cli` whose room in place (an 8-byte NOP after it) the next site's range took:
        // found once the ABI check refused a moved range over a site it does not carry.
        vec![f(
            false,
            false,
            &[Sensitive(0), Filler(4), Sensitive(0)],
            1,
            false,
            false,
        )],
        // CI, 6278b0f: "detour 5: overlaps another detour, the arena, or a site it does not
        // carry" (a trampoline in a later descriptor's dead tail).
        vec![
            f(
                false,
                false,
                &[Loop(false), Lock, Filler(0), Lock, Branch],
                1,
                false,
                true,
            ),
            f(
                false,
                false,
                &[Filler(3), Loop(false), Loop(true), Filler(1), Filler(0)],
                1,
                false,
                false,
            ),
            f(
                false,
                true,
                &[
                    Filler(1),
                    Filler(0),
                    Loop(true),
                    Sensitive(0),
                    Filler(4),
                    Filler(0),
                    Loop(true),
                    Filler(0),
                ],
                1,
                false,
                false,
            ),
        ],
    ];
    for funcs in &found {
        if let Err(e) = check(&build_image(funcs)) {
            panic!("{e}\n{funcs:?}");
        }
    }
}
