//! The macros, for real: this test binary emits sites with every annotation macro, the linker
//! gathers their records, and the table is found through the `pvpatch_site_table` header and
//! parsed like any other. The sites that are safe in user mode run, in both forms.

use std::collections::BTreeMap;

use patch_sites::table::{AddrRange, Form, HEADER_SIZE, Header, SiteTable};
use patch_sites::{Op, Operand, pv_site_table_header};

pv_site_table_header!();

type Thunk = unsafe extern "C" fn();

unsafe extern "C" {
    static pvpatch_site_table: [u8; HEADER_SIZE];
    static __executable_start: u8;
    static etext: u8;
    fn test_thunk_save_fl();
    fn test_thunk_pushf();
    fn test_thunk_popf();
    fn test_thunk_cpuid();
    fn test_thunk_rdtsc();
    fn test_thunk_iretq();
}

// Callee-save thunks for the indirect-call form: each preserves everything its op does not
// define, as the ABI requires.
std::arch::global_asm!(
    ".pushsection .text.test_thunks, \"ax\"",
    "test_thunk_save_fl: pushfq; pop rax; ret",
    "test_thunk_pushf: push qword ptr [rsp]; pushfq; pop qword ptr [rsp + 8]; ret",
    "test_thunk_popf: push qword ptr [rsp + 8]; popfq; pop qword ptr [rsp]; ret",
    "test_thunk_cpuid: cpuid; ret",
    "test_thunk_rdtsc: rdtsc; ret",
    "test_thunk_iretq: add rsp, 8; iretq",
    ".popsection",
);

const fn ops_table() -> [Option<Thunk>; 128] {
    let mut t: [Option<Thunk>; 128] = [None; 128];
    t[Op::SaveFl as usize] = Some(test_thunk_save_fl);
    t[Op::Pushf as usize] = Some(test_thunk_pushf);
    t[Op::Popf as usize] = Some(test_thunk_popf);
    t[Op::Cpuid as usize] = Some(test_thunk_cpuid);
    t[Op::Rdtsc as usize] = Some(test_thunk_rdtsc);
    t[Op::Iretq as usize] = Some(test_thunk_iretq);
    t
}

#[unsafe(no_mangle)]
static TEST_PV_OPS: [Option<Thunk>; 128] = ops_table();

/// Every privileged macro, in the native form, compiled and linked but never run here.
#[inline(never)]
pub fn all_privileged() {
    let mut gdt = [0u8; 10];
    let desc = [0u64; 2];
    let buf = [0u8; 4];
    // SAFETY: never called; it exists so that every macro is assembled and recorded.
    unsafe {
        patch_sites::pv_cli!();
        patch_sites::pv_sti!();
        patch_sites::pv_hlt!();
        patch_sites::pv_safe_halt!();
        patch_sites::pv_restore_fl!(0x202u64);
        let c0 = patch_sites::pv_read_cr!(0);
        patch_sites::pv_write_cr!(0, c0);
        let c2 = patch_sites::pv_read_cr!(2);
        patch_sites::pv_write_cr!(2, c2);
        let c3 = patch_sites::pv_read_cr!(3);
        patch_sites::pv_write_cr!(3, c3);
        let c4 = patch_sites::pv_read_cr!(4);
        patch_sites::pv_write_cr!(4, c4);
        let c8 = patch_sites::pv_read_cr!(8);
        patch_sites::pv_write_cr!(8, c8);
        let d7 = patch_sites::pv_read_dr!(7);
        patch_sites::pv_write_dr!(7, d7);
        patch_sites::pv_clts!();
        let _ = patch_sites::pv_smsw!();
        patch_sites::pv_xsetbv!(0, 3);
        let m = patch_sites::pv_rdmsr!(0xc000_0102u32);
        patch_sites::pv_wrmsr!(0xc000_0102u32, m);
        let _ = patch_sites::pv_rdpmc!(0);
        let _ = patch_sites::pv_rdtscp!();
        let a: u8 = patch_sites::pv_in!(u8, imm 0x71);
        let b: u16 = patch_sites::pv_in!(u16, imm 0x72);
        let c: u32 = patch_sites::pv_in!(u32, imm 0x74);
        let _: u8 = patch_sites::pv_in!(u8, dx 0x3f8);
        let _: u16 = patch_sites::pv_in!(u16, dx 0x510);
        let _: u32 = patch_sites::pv_in!(u32, dx 0xcfc);
        patch_sites::pv_out!(u8, imm 0x70, a);
        patch_sites::pv_out!(u16, imm 0x72, b);
        patch_sites::pv_out!(u32, imm 0x74, c);
        patch_sites::pv_out!(u8, dx 0x3f8, a);
        patch_sites::pv_out!(u16, dx 0x510, b);
        patch_sites::pv_out!(u32, dx 0xcf8, c);
        patch_sites::pv_io_delay!();
        patch_sites::pv_rep_ins!(u8, 0x511, buf.as_ptr(), 4);
        patch_sites::pv_rep_outs!(u16, 0x3f8, buf.as_ptr(), 2);
        patch_sites::pv_rep_ins!(u32, 0x511, buf.as_ptr(), 1);
        patch_sites::pv_invlpg!(buf.as_ptr());
        patch_sites::pv_invpcid!(2, desc.as_ptr());
        patch_sites::pv_wbinvd!();
        patch_sites::pv_invd!();
        patch_sites::pv_sgdt!(gdt.as_mut_ptr());
        patch_sites::pv_lgdt!(gdt.as_ptr());
        patch_sites::pv_sidt!(gdt.as_mut_ptr());
        patch_sites::pv_lidt!(gdt.as_ptr());
        let l = patch_sites::pv_sldt!();
        patch_sites::pv_lldt!(l);
        let t = patch_sites::pv_str!();
        patch_sites::pv_ltr!(t);
        patch_sites::pv_swapgs!();
        patch_sites::pv_cli!(call TEST_PV_OPS);
        patch_sites::pv_write_cr!(3, c3; call TEST_PV_OPS);
    }
}

#[inline(never)]
fn user_mode_sites() -> Vec<(&'static str, u64, u64)> {
    let mut out = Vec::new();
    // SAFETY: these instructions are allowed in user mode (flags, cpuid, rdtsc, iretq to the
    // same privilege level); the call form goes through thunks that implement the op exactly.
    unsafe {
        let a = patch_sites::pv_save_fl!();
        let b = patch_sites::pv_save_fl!(call TEST_PV_OPS);
        out.push(("save_fl", a, b));
        let a = patch_sites::pv_pushf!();
        let b = patch_sites::pv_pushf!(call TEST_PV_OPS);
        out.push(("pushf", a, b));
        // popf with the carry flag set, read back with save_fl.
        let with_cf = a | 1;
        patch_sites::pv_popf!(with_cf);
        let a = patch_sites::pv_save_fl!();
        patch_sites::pv_popf!(with_cf; call TEST_PV_OPS);
        let b = patch_sites::pv_save_fl!();
        out.push(("popf", a & 1, b & 1));
        patch_sites::pv_restore_fl!(with_cf & !1);
        let a = patch_sites::pv_save_fl!();
        out.push(("restore_fl", a & 1, 0));
        let a = patch_sites::pv_cpuid!(0, 0);
        let b = patch_sites::pv_cpuid!(0, 0; call TEST_PV_OPS);
        out.push(("cpuid", a[1] as u64, b[1] as u64));
        let a = patch_sites::pv_rdtsc!();
        let b = patch_sites::pv_rdtsc!(call TEST_PV_OPS);
        out.push(("rdtsc", a, b));
        patch_sites::pv_iretq_to_self!();
        patch_sites::pv_iretq_to_self!(call TEST_PV_OPS);
        out.push(("iretq", 1, 1));
    }
    out
}

#[test]
fn user_mode_sites_behave_like_their_instructions_in_both_forms() {
    std::hint::black_box(all_privileged as fn());
    let results = user_mode_sites();
    for (name, a, b) in &results {
        match *name {
            "save_fl" | "pushf" => {
                // bit 1 is always set; IF is set in user mode
                assert_eq!(a & 0x202, 0x202, "{name}");
                assert_eq!(b & 0x202, 0x202, "{name}");
            }
            "popf" => assert_eq!((*a, *b), (1, 1), "popf must set CF"),
            "restore_fl" => assert_eq!(*a, 0, "restore_fl must clear CF"),
            "cpuid" => assert_eq!(a, b, "cpuid(0).ebx differs between forms"),
            "rdtsc" => assert!(b >= a, "rdtsc went backwards"),
            "iretq" => {}
            other => panic!("{other}"),
        }
    }
}

fn own_table() -> (Header, &'static [u8], AddrRange) {
    // SAFETY: the symbols are defined by the header macro and the linker; the header is 32
    // readable bytes, and the records lie between `__start_pv_sites` and `__stop_pv_sites`, which
    // the header points at and `Header::parse` has checked to be in order.
    unsafe {
        let addr = pvpatch_site_table.as_ptr() as u64;
        let h = Header::parse(&pvpatch_site_table, addr).expect("own header");
        let records =
            std::slice::from_raw_parts(h.records_begin as *const u8, h.records_len() as usize);
        let text = AddrRange::new(
            &__executable_start as *const u8 as u64,
            &etext as *const u8 as u64,
        );
        (h, records, text)
    }
}

#[test]
fn the_linker_gathered_table_parses_and_names_every_macro() {
    std::hint::black_box(all_privileged as fn());
    std::hint::black_box(user_mode_sites as fn() -> _);
    let (h, records, text) = own_table();
    assert!(!h.is_sealed());
    let t = SiteTable::parse(h, records, &[text]).expect("the linker-gathered table is valid");
    let mut by_op: BTreeMap<&str, usize> = BTreeMap::new();
    for s in t.sites() {
        let op = s.op().expect("every macro names a known op");
        *by_op.entry(op.name()).or_default() += 1;
        assert!(s.site_len >= 5, "{op} site of {} bytes", s.site_len);
        // SAFETY: the site lies inside this binary's text (checked by the parser).
        let bytes = unsafe { std::slice::from_raw_parts(s.addr as *const u8, s.site_len as usize) };
        match s.form {
            Form::IndirectCall => {
                assert_eq!(&bytes[..2], [0xff, 0x15], "{op}: call [rip+disp32]");
                assert_eq!(s.insn_len, 6);
            }
            Form::Native => check_native(op, s.operand, bytes, s.insn_len),
            f => panic!("unexpected form {f:?}"),
        }
    }
    for op in patch_sites::ALL_OPS {
        let absent = matches!(
            op,
            Op::Vmcall | Op::Vmmcall | Op::Vmgexit | Op::Sysretq | Op::Sysretl
        );
        assert_eq!(
            by_op.contains_key(op.name()),
            !absent,
            "macro coverage of {op}"
        );
    }
    assert!(by_op["in"] >= 6 && by_op["out"] >= 6, "{by_op:?}");
}

/// The first bytes of a native site are its instruction, and the rest is NOP padding.
fn check_native(op: Op, operand: Operand, bytes: &[u8], insn_len: u8) {
    let insn = &bytes[..insn_len as usize];
    let expect: &[u8] = match op {
        Op::Cli => &[0xfa],
        Op::Sti => &[0xfb],
        Op::Hlt => &[0xf4],
        Op::SafeHalt => &[0xfb, 0xf4],
        Op::SaveFl => &[0x9c, 0x58],
        Op::RestoreFl => &[0x57, 0x9d],
        Op::Pushf => &[0x9c],
        Op::Popf => &[0x9d],
        Op::MovToCr3 => &[0x0f, 0x22, 0xdf],
        Op::MovFromCr3 => &[0x0f, 0x20, 0xd8],
        Op::Wbinvd => &[0x0f, 0x09],
        Op::Cpuid => &[0x0f, 0xa2],
        Op::Rdtsc => &[0x0f, 0x31],
        Op::Rdmsr => &[0x0f, 0x32],
        Op::Wrmsr => &[0x0f, 0x30],
        Op::Swapgs => &[0x0f, 0x01, 0xf8],
        Op::Iretq => &[0x48, 0xcf],
        Op::IoDelay => &[0xe6, 0x80],
        Op::Invlpg => &[0x0f, 0x01, 0x3f],
        Op::In => match operand {
            Operand::PortImm(p) if insn[0] == 0xe4 => return assert_eq!(insn, [0xe4, p]),
            _ => return,
        },
        _ => return,
    };
    assert_eq!(insn, expect, "{op}");
    let pad = &bytes[insn_len as usize..];
    // Multi-byte NOPs: 90, 66 90, 0f 1f ...
    assert!(
        pad.is_empty()
            || pad[0] == 0x90
            || pad.starts_with(&[0x66, 0x90])
            || pad[0] == 0x0f
            || pad[0] == 0x66,
        "{op}: padding {pad:02x?}"
    );
}
