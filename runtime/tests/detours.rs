//! The planner's detour checks, on a hand-built table: a movable `cli` whose rewrite (a call)
//! does not fit its one byte takes its detour, and every check before a byte is written refuses
//! what it must: a moved range that changed, a cave or trampoline that is not free, a stub that
//! is not the moved code, text that cannot be read. Each test fails if its check is removed
//! (found by `cargo xtask mutants`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use patch_sites::crc32::crc32;
use patch_sites::op::Operand;
use patch_sites::table::{
    AddrRange, DetourSpec, Form, MemberSpec, Site, SiteTable, sealed_table_size_with,
    write_sealed_table_with,
};
use patch_sites::{Op, Outcome, RegSet};
use pvpatch_runtime::backend::{Backend, Choice};
use pvpatch_runtime::detect::{BackendKind, Detected};
use pvpatch_runtime::plan::{self, DetourProblem, Plan, PlanError, TextRead};

const BASE: u64 = 0x40_0000;
const TEXT: AddrRange = AddrRange::new(BASE, BASE + 0x4000);
const SITE: u64 = BASE + 0x10;
const TRAMP: u64 = BASE + 0x40;
const STUB: u64 = BASE + 0x1000;
const ARENA: AddrRange = AddrRange::new(BASE + 0x2000, BASE + 0x3000);
const TABLE_ADDR: u64 = 0x80_0000;

/// The moved code: `cli` (the site), then either a 4-byte NOP (a 5-byte range the `jmp` to
/// the stub covers) or a 1-byte one (a 2-byte range, reached through a trampoline).
fn moved(tramp: bool) -> Vec<u8> {
    if tramp {
        vec![0xfa, 0x90]
    } else {
        vec![0xfa, 0x0f, 0x1f, 0x40, 0x00]
    }
}

/// The stub: the site's copy (`cli` padded to 5 bytes), the rest of the moved code, `jmp` back.
fn stub(tramp: bool) -> Vec<u8> {
    let m = moved(tramp);
    let mut s = vec![0xfa, 0x0f, 0x1f, 0x40, 0x00];
    s.extend_from_slice(&m[1..]);
    let after = STUB + s.len() as u64 + 5;
    s.push(0xe9);
    s.extend_from_slice(&((SITE + m.len() as u64).wrapping_sub(after) as u32).to_le_bytes());
    s
}

struct Text(Vec<u8>, Option<AddrRange>);

impl Text {
    /// The kernel's text: `int3` padding everywhere but the moved code.
    fn new(tramp: bool) -> Text {
        let mut t = vec![0xcc; (TEXT.end - TEXT.start) as usize];
        let m = moved(tramp);
        let at = (SITE - BASE) as usize;
        t[at..at + m.len()].copy_from_slice(&m);
        Text(t, None)
    }
    fn poke(&mut self, addr: u64, b: u8) {
        self.0[(addr - BASE) as usize] = b;
    }
}

impl TextRead for Text {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        if self
            .1
            .is_some_and(|r| addr < r.end && addr + out.len() as u64 > r.start)
        {
            return false;
        }
        let Some(at) = addr.checked_sub(BASE).map(|a| a as usize) else {
            return false;
        };
        match self.0.get(at..at + out.len()) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

/// A sealed table of one movable `cli` with its detour (`stub_bytes` as given).
fn table(tramp: bool, stub_bytes: &[u8]) -> Vec<u8> {
    table_with_flags(tramp, stub_bytes, 0)
}

/// [`table`], the record's flags `flags`.
fn table_with_flags(tramp: bool, stub_bytes: &[u8], flags: u8) -> Vec<u8> {
    let m = moved(tramp);
    let d = [DetourSpec {
        moved: SITE,
        moved_len: m.len() as u8,
        stub: STUB,
        stub_bytes,
        tramp: tramp.then_some(TRAMP),
        moved_crc: crc32(&m),
    }];
    let member = MemberSpec {
        record: 0,
        detour: 0,
        copy_off: 0,
        copy_len: 5,
    };
    let site = Site {
        flags,
        ..one_byte(SITE, Op::Cli, Form::Movable, 1, Some(STUB))
    };
    let mut buf = vec![0u8; sealed_table_size_with(1, &d, 1, true)];
    write_sealed_table_with(&[site], &d, &[member], Some(ARENA), TABLE_ADDR, &mut buf)
        .expect("a valid table");
    buf
}

fn native() -> Backend<'static> {
    Backend {
        detected: Detected::assumed(BackendKind::Native, 0),
        rom: None,
        pv: None,
        thunks: None,
    }
}

/// Plans the table's site as a call into the arena (which does not fit its one byte).
fn plan_call(bytes: &[u8], text: &Text) -> Result<Plan, PlanError> {
    let t = SiteTable::parse_contiguous(bytes, TABLE_ADDR, &[TEXT]).expect("the table parses");
    let call = |_: u32, _: &Site| {
        Some(Choice::Call {
            target: ARENA.start,
            clobbers: RegSet::EMPTY,
        })
    };
    plan::plan(&t, &native(), text, Some(&call))
}

fn detour_problem(r: Result<Plan, PlanError>) -> DetourProblem {
    match r {
        Err(PlanError::Detour { index: 0, problem }) => problem,
        other => panic!("expected a detour problem, got {other:?}"),
    }
}

fn rel32(from_end: u64, to: u64) -> [u8; 4] {
    (to.wrapping_sub(from_end) as u32).to_le_bytes()
}

#[test]
fn a_call_too_long_for_its_site_goes_into_the_detours_copy() {
    for tramp in [false, true] {
        let s = stub(tramp);
        let p = plan_call(&table(tramp, &s), &Text::new(tramp)).expect("planned");
        let site = &p.sites[0];
        assert_eq!(
            (site.addr, site.outcome, site.detour),
            (STUB, Outcome::Call, Some(0))
        );
        let mut call = vec![0xe8];
        call.extend_from_slice(&rel32(STUB + 5, ARENA.start));
        assert_eq!(site.new.as_slice(), &call[..]);
        assert_eq!(site.old.as_slice(), &s[..5]);
        assert_eq!(p.detours.len(), 1);
        let d = &p.detours[0];
        // The stub: the copy rewritten, the rest as built; into a free cave.
        let mut want = s.clone();
        want[..5].copy_from_slice(&call);
        assert_eq!((d.stub.addr, d.stub.new.as_slice()), (STUB, &want[..]));
        assert_eq!(d.stub.old.as_slice(), &vec![0xcc; s.len()][..]);
        // The moved range: a jump to the stub (through the trampoline), int3 after it.
        let m = moved(tramp);
        assert_eq!((d.moved.addr, d.moved.old.as_slice()), (SITE, &m[..]));
        match &d.tramp {
            None => {
                let mut jmp = vec![0xe9];
                jmp.extend_from_slice(&rel32(SITE + 5, STUB));
                assert_eq!(d.moved.new.as_slice(), &jmp[..]);
            }
            Some(t) => {
                let short = (TRAMP - (SITE + 2)) as u8;
                assert_eq!(d.moved.new.as_slice(), &[0xeb, short]);
                let mut jmp = vec![0xe9];
                jmp.extend_from_slice(&rel32(TRAMP + 5, STUB));
                assert_eq!((t.addr, t.new.as_slice()), (TRAMP, &jmp[..]));
                assert_eq!(t.old.as_slice(), &[0xcc; 5]);
            }
        }
        assert!(tramp == d.tramp.is_some());
    }
}

#[test]
fn a_site_that_stays_native_uses_no_detour() {
    let bytes = table(false, &stub(false));
    let t = SiteTable::parse_contiguous(&bytes, TABLE_ADDR, &[TEXT]).unwrap();
    let p = plan::plan(&t, &native(), &Text::new(false), None).unwrap();
    assert!(p.detours.is_empty());
    assert_eq!(p.sites[0].outcome, Outcome::Unchanged);
    assert_eq!(p.sites[0].detour, None);
}

#[test]
fn a_moved_range_that_changed_is_refused() {
    let mut text = Text::new(false);
    text.poke(SITE + 3, 0x41);
    let r = plan_call(&table(false, &stub(false)), &text);
    assert_eq!(detour_problem(r), DetourProblem::MovedChanged);
}

#[test]
fn a_cave_or_trampoline_that_is_not_free_is_refused() {
    for at in [STUB, STUB + 9, STUB + 13] {
        let mut text = Text::new(false);
        text.poke(at, 0x90);
        let r = plan_call(&table(false, &stub(false)), &text);
        assert_eq!(detour_problem(r), DetourProblem::NotFree(at), "{at:#x}");
    }
    for at in [TRAMP, TRAMP + 4] {
        let mut text = Text::new(true);
        text.poke(at, 0xc3);
        let r = plan_call(&table(true, &stub(true)), &text);
        assert_eq!(detour_problem(r), DetourProblem::NotFree(at), "{at:#x}");
    }
}

#[test]
fn a_trampoline_in_dead_nop_padding_is_free_and_a_short_nop_run_is_not() {
    // The 8-byte NOP compilers pad functions with: whole NOPs over the trampoline's 5 bytes.
    let nop8 = [0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00];
    let mut text = Text::new(true);
    for (k, &b) in nop8.iter().enumerate() {
        text.poke(TRAMP + k as u64, b);
    }
    let p = plan_call(&table(true, &stub(true)), &text).expect("planned");
    let t = p.detours[0].tramp.as_ref().expect("a trampoline");
    assert_eq!(t.old.as_slice(), &nop8[..5]);
    // Four bytes of NOPs, then code: not room for the trampoline's `jmp rel32`.
    let mut text = Text::new(true);
    for (k, b) in [0x66, 0x90, 0x90, 0x90, 0xc3].into_iter().enumerate() {
        text.poke(TRAMP + k as u64, b);
    }
    let r = plan_call(&table(true, &stub(true)), &text);
    assert_eq!(detour_problem(r), DetourProblem::NotFree(TRAMP + 4));
    // Half of a NOP is not a NOP: a trampoline must start on one.
    let mut text = Text::new(true);
    for (k, &b) in nop8[3..].iter().enumerate() {
        text.poke(TRAMP + k as u64, b);
    }
    let r = plan_call(&table(true, &stub(true)), &text);
    assert_eq!(detour_problem(r), DetourProblem::NotFree(TRAMP));
}

#[test]
fn text_that_cannot_be_read_is_refused() {
    for (what, r) in [
        ("moved range", AddrRange::new(SITE + 2, SITE + 3)),
        ("cave", AddrRange::new(STUB + 12, STUB + 13)),
    ] {
        let mut text = Text::new(false);
        text.1 = Some(r);
        let got = plan_call(&table(false, &stub(false)), &text);
        // The site itself is read first: an unreadable moved range may fail there.
        match got {
            Err(PlanError::Detour {
                problem: DetourProblem::Unreadable,
                ..
            })
            | Err(PlanError::Unreadable { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn a_stub_that_is_not_the_moved_code_is_refused() {
    // The moved NOP replaced by another instruction of the same length; the jump back aimed one
    // byte off.
    let mut wrong = stub(false);
    wrong[5..9].copy_from_slice(&[0x48, 0x83, 0xc0, 0x01]); // add rax, 1
    assert!(matches!(
        detour_problem(plan_call(&table(false, &wrong), &Text::new(false))),
        DetourProblem::Stub(_)
    ));
    let mut wrong = stub(false);
    let n = wrong.len();
    wrong[n - 4] = wrong[n - 4].wrapping_add(1);
    assert!(matches!(
        detour_problem(plan_call(&table(false, &wrong), &Text::new(false))),
        DetourProblem::Stub(_)
    ));
}

#[test]
fn refusals_say_what_is_wrong() {
    for (e, word) in [
        (DetourProblem::Unreadable, "read"),
        (DetourProblem::MovedChanged, "moved"),
        (DetourProblem::NotFree(0x1234), "0x1234"),
        (DetourProblem::Unreachable, "encoded"),
    ] {
        let shown = e.to_string();
        assert!(shown.contains(word), "{shown}");
        let shown = PlanError::Detour {
            index: 3,
            problem: e,
        }
        .to_string();
        assert!(shown.contains('3') && shown.contains(word), "{shown}");
    }
}

/// A 6-byte moved range (`cli`, then a 5-byte NOP): the `jmp` to the stub is followed by one
/// `int3`.
#[test]
fn a_moved_range_longer_than_its_jump_is_padded_with_int3() {
    let moved = [0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00];
    let mut stub = vec![0xfa, 0x0f, 0x1f, 0x40, 0x00, 0x0f, 0x1f, 0x44, 0x00, 0x00];
    let after = STUB + stub.len() as u64 + 5;
    stub.push(0xe9);
    stub.extend_from_slice(&rel32(after, SITE + 6));
    let mut text = Text::new(false);
    for (k, b) in moved.iter().enumerate() {
        text.poke(SITE + k as u64, *b);
    }
    let bytes = two_site_table(&moved, &stub, &[(0, Op::Cli, 0)]);
    let p = plan_forced(&bytes, &text, &[call()]).expect("planned");
    let mut jmp = vec![0xe9];
    jmp.extend_from_slice(&rel32(SITE + 5, STUB));
    jmp.push(0xcc);
    assert_eq!(p.detours[0].moved.new.as_slice(), &jmp[..]);
}

/// Two movable sites in one detour: the first's call does not fit in place, so the detour is
/// used; the second's trap fits in place, but the detour's `jmp` will cover it, so it moves
/// into its copy (at offset 5 of the stub) too.
#[test]
fn every_rewritten_member_of_a_used_detour_moves_into_its_copy() {
    let moved = [0xfa, 0xfb, 0x0f, 0x1f, 0x00];
    let mut stub = vec![
        0xfa, 0x0f, 0x1f, 0x40, 0x00, // cli's copy
        0xfb, 0x0f, 0x1f, 0x40, 0x00, // sti's copy
        0x0f, 0x1f, 0x00, // the NOP moved after them
    ];
    let after = STUB + stub.len() as u64 + 5;
    stub.push(0xe9);
    stub.extend_from_slice(&rel32(after, SITE + 5));
    let mut text = Text::new(false);
    for (k, b) in moved.iter().enumerate() {
        text.poke(SITE + k as u64, *b);
    }
    let bytes = two_site_table(&moved, &stub, &[(0, Op::Cli, 0), (1, Op::Sti, 5)]);
    // The sti planned as a trap: it fits its one byte (int3).
    let p = plan_forced(&bytes, &text, &[call(), Some(Choice::Trap)]).expect("planned");
    let (a, b) = (&p.sites[0], &p.sites[1]);
    assert_eq!(
        (a.addr, a.outcome, a.detour),
        (STUB, Outcome::Call, Some(0))
    );
    assert_eq!(
        (b.addr, b.outcome, b.detour),
        (STUB + 5, Outcome::Trap, Some(0))
    );
    assert_eq!(
        &b.new.as_slice()[..2],
        &[0x0f, 0x0b],
        "ud2 in the 5-byte copy"
    );
    assert_eq!(&p.detours[0].stub.new.as_slice()[5..7], &[0x0f, 0x0b]);
    // The sti left native: it stays as it is in its copy, and nothing else moves.
    let p = plan_forced(&bytes, &text, &[call(), Some(Choice::Native)]).expect("planned");
    assert_eq!(
        (p.sites[1].addr, p.sites[1].outcome),
        (SITE + 1, Outcome::Unchanged)
    );
    assert_eq!(
        &p.detours[0].stub.new.as_slice()[5..10],
        &stub[5..10],
        "the sti's copy as built"
    );
}

/// A site already in the form its choice makes (a trap record forced to a trap) is left alone.
#[test]
fn a_site_already_rewritten_is_already_there() {
    let buf = one_cli(Form::Trap, 2);
    let mut text = Text::new(false);
    text.poke(SITE, 0x0f);
    text.poke(SITE + 1, 0x0b);
    let t = SiteTable::parse_contiguous(&buf, TABLE_ADDR, &[TEXT]).unwrap();
    let trap = |_: u32, _: &Site| Some(Choice::Trap);
    let p = plan::plan(&t, &native(), &text, Some(&trap)).unwrap();
    assert_eq!(
        (p.sites[0].outcome, p.sites[0].keep),
        (Outcome::Unchanged, Some(plan::Keep::AlreadyThere))
    );
    assert_eq!(p.changes().count(), 0);
}

/// Xen PV: an IF site too small for its call cannot stay native (a PV guest's `cli` does not
/// mask its events): the table is refused.
#[test]
fn a_site_xen_cannot_leave_native_and_cannot_call_from_is_refused() {
    use pvpatch_runtime::pv;
    let code = pv::xen(
        pv::XenLayout {
            vcpu_info: 0x10_0000,
            hypercall_page: 0x11_0000,
        },
        ARENA.start,
    )
    .unwrap();
    let buf = one_cli(Form::Native, 1);
    let t = SiteTable::parse_contiguous(&buf, TABLE_ADDR, &[TEXT]).unwrap();
    let xen = Backend {
        detected: Detected::assumed(BackendKind::Xen, 0),
        pv: Some(&code),
        ..native()
    };
    assert!(matches!(
        plan::plan(&t, &xen, &Text::new(false), None),
        Err(PlanError::MustRewrite { op: Op::Cli, .. })
    ));
}

fn call() -> Option<Choice<'static>> {
    Some(Choice::Call {
        target: ARENA.start,
        clobbers: RegSet::EMPTY,
    })
}

/// A table of movable sites `(offset in the moved range, op, copy offset in the stub)`, each
/// with a 5-byte copy, all in one detour over `moved`.
fn two_site_table(moved: &[u8], stub_bytes: &[u8], sites: &[(u8, Op, u8)]) -> Vec<u8> {
    let d = [DetourSpec {
        moved: SITE,
        moved_len: moved.len() as u8,
        stub: STUB,
        stub_bytes,
        tramp: None,
        moved_crc: crc32(moved),
    }];
    let records: Vec<Site> = sites
        .iter()
        .map(|&(off, op, _)| one_byte(SITE + off as u64, op, Form::Movable, 1, Some(STUB)))
        .collect();
    let members: Vec<MemberSpec> = sites
        .iter()
        .enumerate()
        .map(|(k, &(_, _, copy))| MemberSpec {
            record: k as u32,
            detour: 0,
            copy_off: copy,
            copy_len: 5,
        })
        .collect();
    let mut buf = vec![0u8; sealed_table_size_with(records.len(), &d, members.len(), true)];
    write_sealed_table_with(&records, &d, &members, Some(ARENA), TABLE_ADDR, &mut buf)
        .expect("a valid table");
    buf
}

/// Plans with site `i` forced to `choices[i]`.
fn plan_forced(
    bytes: &[u8],
    text: &Text,
    choices: &[Option<Choice<'static>>],
) -> Result<Plan, PlanError> {
    let t = SiteTable::parse_contiguous(bytes, TABLE_ADDR, &[TEXT]).expect("the table parses");
    let f = |i: u32, _: &Site| choices.get(i as usize).copied().flatten();
    plan::plan(&t, &native(), text, Some(&f))
}

/// A template too long for its site but equal to its copy as built (`cli` and a 4-byte NOP):
/// writing it there would change nothing, so the site stays as it is and no detour is used.
#[test]
fn a_template_equal_to_the_copy_uses_no_detour() {
    use pvpatch_isa::template::Template;
    let template = Template {
        bytes: &[0xfa, 0x0f, 0x1f, 0x40, 0x00],
        slots: [None; patch_sites::rom::MAX_SLOTS],
        clobbers: RegSet::EMPTY,
    };
    let p = plan_forced(
        &table(false, &stub(false)),
        &Text::new(false),
        &[Some(Choice::Inline(template))],
    )
    .expect("planned");
    assert!(p.detours.is_empty());
    assert_eq!(
        (p.sites[0].addr, p.sites[0].outcome, p.sites[0].detour),
        (SITE, Outcome::Unchanged, None)
    );
}

/// A site that may run with no usable stack (`NO_STACK`, Linux's entry text) takes no call,
/// no trap and no inline sequence that pushes: it stays native, and no detour is installed for
/// it. A stack-free sequence too long for it still goes into its detour's copy. Without the
/// flag, the same pushing sequence is used.
#[test]
fn a_site_with_no_usable_stack_takes_no_call_no_trap_and_no_push() {
    use patch_sites::table::SITE_FLAG_NO_STACK;
    use pvpatch_isa::template::Template;
    use pvpatch_runtime::plan::Keep;
    let inline = |bytes: &'static [u8]| {
        Some(Choice::Inline(Template {
            bytes,
            slots: [None; patch_sites::rom::MAX_SLOTS],
            clobbers: RegSet::EMPTY,
        }))
    };
    // push rax; pop rax; cli
    let pushes: &'static [u8] = &[0x50, 0x58, 0xfa];
    // cli; a 2-byte NOP
    let stack_free: &'static [u8] = &[0xfa, 0x66, 0x90];
    let flagged = table_with_flags(false, &stub(false), SITE_FLAG_NO_STACK);
    for choice in [call(), Some(Choice::Trap), inline(pushes)] {
        let p = plan_forced(&flagged, &Text::new(false), &[choice]).expect("planned");
        assert_eq!(
            (p.sites[0].outcome, p.sites[0].keep, p.sites[0].detour),
            (Outcome::Unchanged, Some(Keep::NoStack), None),
            "{choice:?}"
        );
        assert!(p.detours.is_empty(), "{choice:?}");
    }
    let p = plan_forced(&flagged, &Text::new(false), &[inline(stack_free)]).expect("planned");
    assert_eq!(
        (p.sites[0].outcome, p.sites[0].detour),
        (Outcome::Inline, Some(0))
    );
    let plain = table(false, &stub(false));
    let p = plan_forced(&plain, &Text::new(false), &[inline(pushes)]).expect("planned");
    assert_eq!(
        (p.sites[0].outcome, p.sites[0].detour),
        (Outcome::Inline, Some(0))
    );
}

/// A sealed table of one `cli` at [`SITE`] in `form`, `site_len` bytes of room.
fn one_cli(form: Form, site_len: u8) -> Vec<u8> {
    let site = one_byte(SITE, Op::Cli, form, site_len, None);
    let mut buf = vec![0u8; patch_sites::table::sealed_table_size(1)];
    patch_sites::table::write_sealed_table(&[site], TABLE_ADDR, &mut buf).unwrap();
    buf
}

/// A record of a one-byte instruction without operands (`cli`, `sti`).
fn one_byte(addr: u64, op: Op, form: Form, site_len: u8, stub: Option<u64>) -> Site {
    Site {
        addr,
        site_len,
        insn_len: 1,
        op_id: op.id(),
        form,
        operand: Operand::None,
        width: 0,
        flags: 0,
        clobbers: RegSet::EMPTY,
        stub,
    }
}

/// A table whose detour area fails its check (its arena lies outside the code ranges given):
/// the whole parse refuses it; a deferring parse (the shim's) accepts it for a plan that writes
/// nothing or rewrites sites in place, and the planner refuses it as soon as the plan would use
/// a detour.
#[test]
fn a_deferred_detour_area_is_checked_before_anything_is_written() {
    use patch_sites::table::{DetourError, TableError};
    let bytes = table(false, &stub(false));
    let short = [AddrRange::new(BASE, ARENA.start)];
    let refused = Err(TableError::Detours(DetourError::BadArena));
    assert_eq!(
        SiteTable::parse_contiguous(&bytes, TABLE_ADDR, &short).map(|_| ()),
        refused
    );
    let t = SiteTable::parse_contiguous_deferring_detours(&bytes, TABLE_ADDR, &short).unwrap();
    assert!(!t.detour_area_checked());
    assert_eq!(t.check_detour_area(), refused);
    let text = Text::new(false);
    let p = plan::plan(&t, &native(), &text, None).unwrap();
    assert!(p.sites.iter().all(|s| s.new == s.old) && p.detours.is_empty());
    let call = |_: u32, _: &Site| {
        Some(Choice::Call {
            target: ARENA.start,
            clobbers: RegSet::EMPTY,
        })
    };
    assert_eq!(
        plan::plan(&t, &native(), &text, Some(&call)).map(|_| ()),
        Err(PlanError::Table(TableError::Detours(DetourError::BadArena)))
    );
    // A site rewritten in place, with no out-of-line code, needs nothing of the area.
    let nothing = |_: u32, _: &Site| Some(Choice::Nothing);
    let p = plan::plan(&t, &native(), &text, Some(&nothing)).unwrap();
    assert!(
        p.detours.is_empty() && p.sites[0].new != p.sites[0].old && p.sites[0].detour.is_none()
    );
    // Checked against the whole text, the same table plans the call.
    let full = SiteTable::parse_contiguous_deferring_detours(&bytes, TABLE_ADDR, &[TEXT]).unwrap();
    assert!(plan::plan(&full, &native(), &text, Some(&call)).is_ok());
    assert!(
        SiteTable::parse_contiguous(&bytes, TABLE_ADDR, &[TEXT])
            .is_ok_and(|t| t.detour_area_checked())
    );
}

/// A plan that writes nothing is applied without touching the text: no open, write, close or
/// sync of the text poke (which, in a kernel, may remap pages or stop other CPUs).
#[test]
fn a_plan_that_writes_nothing_touches_nothing() {
    use pvpatch_runtime::apply::{self, Applied, TextPoke};
    struct Counting(Text, u32);
    impl TextRead for Counting {
        fn read(&self, addr: u64, out: &mut [u8]) -> bool {
            self.0.read(addr, out)
        }
    }
    impl TextPoke for Counting {
        fn open(&mut self) {
            self.1 += 1;
        }
        fn close(&mut self) {
            self.1 += 1;
        }
        fn write(&mut self, _: u64, _: &[u8]) {
            self.1 += 1;
        }
        fn sync(&mut self) {
            self.1 += 1;
        }
    }
    let bytes = table(false, &stub(false));
    let t = SiteTable::parse_contiguous(&bytes, TABLE_ADDR, &[TEXT]).unwrap();
    let mut text = Counting(Text::new(false), 0);
    let p = plan::plan(&t, &native(), &text, None).unwrap();
    assert_eq!(apply::apply(&p, &mut text), Ok(Applied::default()));
    assert_eq!(text.1, 0);
    // With a write, the poke is used (this one drops what it is given: the read-back fails).
    let p = plan_call(&bytes, &text.0).unwrap();
    assert!(apply::apply(&p, &mut text).is_err());
    assert!(text.1 > 0);
}

/// A text that records where each write went, in order.
struct Recording(Text, Vec<u64>);

impl TextRead for Recording {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        self.0.read(addr, out)
    }
}

impl pvpatch_runtime::apply::TextPoke for Recording {
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        self.1.push(addr);
        for (k, &b) in bytes.iter().enumerate() {
            self.0.poke(addr + k as u64, b);
        }
    }
    fn sync(&mut self) {}
}

/// A site's 2-byte range (`cli; nop`) whose trampoline lies in the dead tail of a *host*: a
/// 12-byte range (three 4-byte NOPs) that carries no site, before or after it. The host is
/// installed with it, its moved range's write holds the trampoline after its own `jmp rel32`,
/// and that write comes before the site's `jmp rel8` (and is undone after it).
#[test]
fn a_trampoline_in_a_hosts_dead_tail_is_written_with_the_host_on_either_side() {
    let nops = [0x0f, 0x1f, 0x40, 0x00].repeat(3);
    for host in [BASE, SITE + 0x20] {
        let site_first = SITE < host;
        let (site_stub, host_stub) = if site_first {
            (STUB, STUB + 0x40)
        } else {
            (STUB + 0x40, STUB)
        };
        // The site's stub: its copy (`cli` in 5 bytes), the `nop`, `jmp` back past the range.
        let mut s = vec![0xfa, 0x0f, 0x1f, 0x40, 0x00, 0x90, 0xe9];
        s.extend_from_slice(&rel32(site_stub + 11, SITE + 2));
        // The host's: its three NOPs, `jmp` back.
        let mut h = nops.clone();
        h.push(0xe9);
        h.extend_from_slice(&rel32(host_stub + 17, host + 12));
        let guest = DetourSpec {
            moved: SITE,
            moved_len: 2,
            stub: site_stub,
            stub_bytes: &s,
            tramp: Some(host + 5),
            moved_crc: crc32(&[0xfa, 0x90]),
        };
        let hosting = DetourSpec {
            moved: host,
            moved_len: 12,
            stub: host_stub,
            stub_bytes: &h,
            tramp: None,
            moved_crc: crc32(&nops),
        };
        let d = if site_first {
            [guest, hosting]
        } else {
            [hosting, guest]
        };
        let (g, hi) = if site_first { (0u16, 1u16) } else { (1, 0) };
        let member = MemberSpec {
            record: 0,
            detour: g,
            copy_off: 0,
            copy_len: 5,
        };
        let site = one_byte(SITE, Op::Cli, Form::Movable, 1, Some(site_stub));
        let mut bytes = vec![0u8; sealed_table_size_with(1, &d, 1, true)];
        write_sealed_table_with(&[site], &d, &[member], Some(ARENA), TABLE_ADDR, &mut bytes)
            .expect("a valid table");
        let mut text = Text::new(true);
        for (k, &b) in nops.iter().enumerate() {
            text.poke(host + k as u64, b);
        }
        let p = plan_call(&bytes, &text).expect("planned");
        assert_eq!(
            p.detours.len(),
            2,
            "the host is installed with the site's detour"
        );
        let pd = |i: u16| p.detours.iter().find(|d| d.index == i).unwrap();
        let (gd, hd) = (pd(g), pd(hi));
        assert_eq!((gd.host, gd.tramp, gd.is_host), (Some(hi), None, false));
        assert_eq!((hd.host, hd.is_host), (None, true));
        // The host's range: `jmp rel32` to its stub, `int3`s, the trampoline at +5.
        let mut want = vec![0xe9];
        want.extend_from_slice(&rel32(host + 5, host_stub));
        want.push(0xe9);
        want.extend_from_slice(&rel32(host + 10, site_stub));
        want.extend_from_slice(&[0xcc, 0xcc]);
        assert_eq!(hd.moved.new.as_slice(), &want[..]);
        assert_eq!(hd.moved.old.as_slice(), &nops[..]);
        assert_eq!(
            gd.moved.new.as_slice(),
            &[0xeb, (host + 5).wrapping_sub(SITE + 2) as u8]
        );
        // Written: the host's range before the site's jump; undone in the other order.
        let mut rec = Recording(text, Vec::new());
        pvpatch_runtime::apply::apply(&p, &mut rec).expect("applied");
        let at = |a: u64, v: &[u64]| v.iter().position(|&x| x == a).unwrap();
        assert!(at(host, &rec.1) < at(SITE, &rec.1), "{:x?}", rec.1);
        rec.1.clear();
        pvpatch_runtime::apply::revert(&p, &mut rec);
        assert!(at(SITE, &rec.1) < at(host, &rec.1), "{:x?}", rec.1);
        let mut back = [0u8; 12];
        assert!(rec.read(host, &mut back));
        assert_eq!(back, nops[..]);
    }
}
