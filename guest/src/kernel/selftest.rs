//! The self-test of every op, run after patching: each checks the op's effect, through the
//! annotation macros' sites in both forms (native-padded and indirect call) and through the
//! raw sites only the post-link tool recorded.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use patch_sites::*;

use super::gdt::{self, TSS_SEL};
use super::idt::{self, TICKS};
use super::pvops::PV_OPS;
use super::{apic, arch, fwcfg, paging, raw, ring3};

/// A test's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It passed.
    Pass,
    /// It failed, and why.
    Fail(String),
    /// It could not run here, and why.
    Skip(&'static str),
}

/// One test.
#[derive(Clone, Debug)]
pub struct Test {
    /// Name.
    pub name: &'static str,
    /// Ops it exercises.
    pub ops: &'static str,
    /// Verdict.
    pub verdict: Verdict,
}

type R = Result<(), String>;

fn check(ok: bool, what: impl FnOnce() -> String) -> R {
    if ok { Ok(()) } else { Err(what()) }
}

/// Spins until `f` holds or about `cycles` TSC cycles pass.
fn wait(cycles: u64, mut f: impl FnMut() -> bool) -> bool {
    let t0 = arch::rdtsc();
    while arch::rdtsc() - t0 < cycles {
        if f() {
            return true;
        }
        core::hint::spin_loop();
    }
    f()
}

const SECOND: u64 = 3_000_000_000;
const IF: u64 = 1 << 9;

fn if_through_flags() -> R {
    // SAFETY: toggling IF with the IDT loaded and no timer armed; flags restored.
    unsafe {
        pv_cli!();
        check(pv_save_fl!() & IF == 0, || "cli left IF set".into())?;
        check(pv_pushf!() & IF == 0, || {
            "pushf shows IF set after cli".into()
        })?;
        pv_sti!();
        check(pv_save_fl!() & IF != 0, || "sti left IF clear".into())?;
        check(pv_save_fl!(call PV_OPS) & IF != 0, || {
            "save_fl (call form) shows IF clear".into()
        })?;
        let on = pv_save_fl!();
        pv_restore_fl!(on & !IF);
        check(pv_save_fl!() & IF == 0, || {
            "restore_fl did not clear IF".into()
        })?;
        pv_popf!(on);
        check(pv_save_fl!() & IF != 0, || "popf did not set IF".into())?;
        pv_cli!(call PV_OPS);
        check(!arch::interrupts_enabled(), || {
            "cli (call form) left IF set".into()
        })?;
        pv_restore_fl!(on; call PV_OPS);
        check(arch::interrupts_enabled(), || {
            "restore_fl (call form) did not set IF".into()
        })?;
        raw::cli();
        check(raw::flags() & IF == 0, || "raw cli left IF set".into())?;
        raw::sti();
        check(raw::flags() & IF != 0, || "raw sti left IF clear".into())?;
        pv_cli!();
    }
    Ok(())
}

fn timer_only_when_enabled() -> R {
    let before = TICKS.load(Ordering::SeqCst);
    // SAFETY: the timer's interrupt is handled; IF is restored to clear at the end.
    unsafe {
        pv_cli!();
        apic::arm(20_000);
        check(wait(SECOND, apic::expired), || {
            "the timer never ran down".into()
        })?;
        wait(SECOND / 100, || false);
        check(TICKS.load(Ordering::SeqCst) == before, || {
            "a timer interrupt arrived with IF clear".into()
        })?;
        pv_sti!();
        let arrived = wait(SECOND, || TICKS.load(Ordering::SeqCst) > before);
        pv_cli!();
        check(arrived, || {
            "the pending timer interrupt did not arrive after sti".into()
        })?;
    }
    Ok(())
}

fn hlt_woken_by_the_timer() -> R {
    // SAFETY: each halt has a timer interrupt to wake it: one-shot for safe_halt (the interrupt
    // cannot fall between sti and hlt), periodic for the plain hlt after a separate sti.
    unsafe {
        for form in 0..2 {
            let before = TICKS.load(Ordering::SeqCst);
            pv_cli!();
            apic::arm(50_000);
            if form == 0 {
                pv_safe_halt!()
            } else {
                pv_safe_halt!(call PV_OPS)
            }
            pv_cli!();
            check(TICKS.load(Ordering::SeqCst) > before, || {
                format!("safe_halt form {form} woke without the timer")
            })?;
        }
        let before = TICKS.load(Ordering::SeqCst);
        apic::arm_periodic(50_000);
        pv_sti!();
        pv_hlt!();
        pv_cli!();
        apic::stop();
        check(TICKS.load(Ordering::SeqCst) > before, || {
            "hlt woke without the timer".into()
        })?;
    }
    Ok(())
}

fn control_registers() -> R {
    // SAFETY: every write stores back a value just read, or toggles a bit that does not affect
    // the kernel (CR4.OSXMMEXCPT, CR0.TS, CR2, the TPR) and restores it.
    unsafe {
        let cr3 = pv_read_cr!(3);
        check(cr3 == paging::root(), || {
            format!("cr3 {cr3:#x} is not the kernel's tables")
        })?;
        // A write of CR3 by its effect: the second root maps the test page to another page.
        paging::map_test_page(false);
        let second = paging::second_root();
        for form in 0..2 {
            if form == 0 {
                pv_write_cr!(3, second);
            } else {
                pv_write_cr!(3, second; call PV_OPS);
            }
            let (now, seen) = (pv_read_cr!(3), paging::read_test_page());
            if form == 0 {
                pv_write_cr!(3, cr3);
            } else {
                pv_write_cr!(3, cr3; call PV_OPS);
            }
            check(now == second && seen == paging::SECOND_ROOT_WORD, || {
                format!(
                    "form {form}: after mov cr3 to the second root, cr3 {now:#x} and the test page \
                     shows {seen:#x}"
                )
            })?;
            let back = paging::read_test_page();
            check(back == paging::TEST_WORDS[0], || {
                format!("form {form}: back on the first root, the test page shows {back:#x}")
            })?;
        }
        let c = pv_read_cr!(3; call PV_OPS);
        check(c == cr3 && raw::reload_cr3() == cr3, || {
            "cr3 (call form, raw) differs".into()
        })?;

        let cr4 = pv_read_cr!(4);
        pv_write_cr!(4, cr4 ^ (1 << 10));
        let toggled = pv_read_cr!(4);
        pv_write_cr!(4, cr4);
        check(
            toggled == cr4 ^ (1 << 10) && pv_read_cr!(4; call PV_OPS) == cr4,
            || format!("cr4 round trip: {cr4:#x} -> {toggled:#x}"),
        )?;

        let cr0 = pv_read_cr!(0);
        pv_write_cr!(0, cr0 | (1 << 3));
        check(pv_read_cr!(0) & (1 << 3) != 0, || {
            "CR0.TS did not set".into()
        })?;
        pv_clts!();
        check(pv_read_cr!(0) & (1 << 3) == 0, || {
            "clts left CR0.TS set".into()
        })?;
        pv_write_cr!(0, cr0);
        check(pv_smsw!() & 0xffff == cr0 & 0xffff, || {
            "smsw differs from cr0".into()
        })?;

        pv_write_cr!(2, 0x1234_5000u64);
        check(pv_read_cr!(2) == 0x1234_5000, || "cr2 round trip".into())?;

        pv_write_cr!(8, 3u64);
        let tpr = pv_read_cr!(8);
        pv_write_cr!(8, 0u64);
        check(tpr == 3 && pv_read_cr!(8) == 0, || {
            format!("cr8 round trip gave {tpr}")
        })?;
    }
    Ok(())
}

/// A word the debug-register self-test sets a data breakpoint on.
static PROBE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn debug_registers() -> Verdict {
    match debug_registers_by_effect() {
        Ok(()) => Verdict::Pass,
        Err(_) if no_data_breakpoints() => Verdict::Skip(
            "the machine delivers no data breakpoints: DR7 armed by a native mov (read back \
                 armed) and a write to the watched word raised no #DB",
        ),
        Err(why) => Verdict::Fail(why),
    }
}

/// Whether a data breakpoint armed with the native instructions (not a site) fails to fire:
/// a fact about the machine (this host's KVM, PVM, emulates kernel code without them).
fn no_data_breakpoints() -> bool {
    let before = idt::BREAKPOINTS.load(Ordering::SeqCst);
    let d7 = arch::read_dr(7);
    // SAFETY: a write breakpoint on the probe, which the #DB handler counts; DR7 restored.
    unsafe {
        arch::write_dr(0, PROBE.as_ptr() as u64);
        arch::write_dr(7, (d7 & !0xf_0003) | 1 | (0b1101 << 16));
        let armed = arch::read_dr(7) & 1 != 0;
        PROBE.store(7, Ordering::SeqCst);
        arch::write_dr(7, d7);
        PROBE.store(0, Ordering::SeqCst);
        armed && idt::BREAKPOINTS.load(Ordering::SeqCst) == before
    }
}

fn debug_registers_by_effect() -> R {
    // SAFETY: DR0 is set to the probe's address and DR7 arms a write breakpoint on it, which
    // the IDT's #DB handler counts; DR7 is written back as read.
    unsafe {
        pv_write_dr!(0, 0xdead_b000u64);
        let v = pv_read_dr!(0);
        check(v == 0xdead_b000, || format!("dr0 round trip gave {v:#x}"))?;
        let d7 = pv_read_dr!(7);
        // L0, R/W0 = 01 (data writes), LEN0 = 11 (8 bytes).
        let armed = (d7 & !0xf_0003) | 1 | (0b1101 << 16);
        // Twice: the second time after the first breakpoint was taken and disarmed.
        for round in 0..2 {
            let before = idt::BREAKPOINTS.load(Ordering::SeqCst);
            pv_write_dr!(0, PROBE.as_ptr() as u64);
            pv_write_dr!(7, armed);
            let seen = pv_read_dr!(7);
            PROBE.store(round + 1, Ordering::SeqCst);
            let taken = idt::BREAKPOINTS.load(Ordering::SeqCst) - before;
            pv_write_dr!(7, d7);
            PROBE.store(0, Ordering::SeqCst);
            let after = idt::BREAKPOINTS.load(Ordering::SeqCst) - before;
            check(seen == armed && taken == 1 && after == 1, || {
                format!(
                    "round {round}: DR7 {seen:#x} (wrote {armed:#x}); a write to the watched \
                     word raised {taken} #DB, {after} in all (one, then none once disarmed)"
                )
            })?;
        }
        check(pv_read_dr!(7) == d7, || "DR7 not restored".into())
    }
}

fn invlpg_shows_the_new_mapping() -> R {
    let [a, b] = paging::TEST_WORDS;
    paging::map_test_page(false);
    // SAFETY: invalidating the test page's TLB entry.
    unsafe { pv_invlpg!(paging::TEST_VA) };
    check(paging::read_test_page() == a, || {
        "the test page does not map its first page".into()
    })?;
    paging::map_test_page(true);
    // SAFETY: as above.
    unsafe { pv_invlpg!(paging::TEST_VA) };
    check(paging::read_test_page() == b, || {
        "after remapping and invlpg the old mapping is seen".into()
    })?;
    paging::map_test_page(false);
    raw::invlpg(paging::TEST_VA);
    check(paging::read_test_page() == a, || {
        "raw invlpg: the old mapping is seen".into()
    })?;
    paging::map_test_page(true);
    // SAFETY: as above.
    unsafe { pv_invlpg!(paging::TEST_VA; call PV_OPS) };
    check(paging::read_test_page() == b, || {
        "invlpg (call form): the old mapping is seen".into()
    })
}

const KERNEL_GS_BASE: u32 = 0xc000_0102;
const GS_BASE: u32 = 0xc000_0101;

fn msr_round_trips() -> R {
    // SAFETY: IA32_KERNEL_GS_BASE and IA32_GS_BASE, which the kernel does not use; restored.
    unsafe {
        let old = pv_rdmsr!(KERNEL_GS_BASE);
        for (i, v) in [0x0000_1234_5678_9000u64, 0xffff_8000_0000_1000, 0x42]
            .into_iter()
            .enumerate()
        {
            match i {
                0 => pv_wrmsr!(KERNEL_GS_BASE, v),
                1 => pv_wrmsr!(KERNEL_GS_BASE, v; call PV_OPS),
                _ => raw::wrmsr(KERNEL_GS_BASE, v),
            }
            let r = [
                pv_rdmsr!(KERNEL_GS_BASE),
                pv_rdmsr!(KERNEL_GS_BASE; call PV_OPS),
                raw::rdmsr(KERNEL_GS_BASE),
            ];
            check(r == [v; 3], || {
                format!("KERNEL_GS_BASE wrote {v:#x}, read {r:x?}")
            })?;
        }
        pv_wrmsr!(KERNEL_GS_BASE, old);
        // swapgs exchanges the two bases.
        let gs = pv_rdmsr!(GS_BASE);
        pv_wrmsr!(GS_BASE, 0x1111_0000);
        pv_wrmsr!(KERNEL_GS_BASE, 0x2222_0000);
        pv_swapgs!();
        let swapped = (pv_rdmsr!(GS_BASE), pv_rdmsr!(KERNEL_GS_BASE));
        pv_swapgs!(call PV_OPS);
        let back = (pv_rdmsr!(GS_BASE), pv_rdmsr!(KERNEL_GS_BASE));
        pv_wrmsr!(GS_BASE, gs);
        pv_wrmsr!(KERNEL_GS_BASE, old);
        check(
            swapped == (0x2222_0000, 0x1111_0000) && back == (0x1111_0000, 0x2222_0000),
            || format!("swapgs gave {swapped:x?}, then {back:x?}"),
        )
    }
}

fn cmos_round_trip() -> R {
    const INDEX: u8 = 0x38; // general-purpose CMOS RAM
    // SAFETY: selecting and writing a general-purpose CMOS RAM byte, restored afterwards.
    unsafe {
        pv_out!(u8, imm 0x70, INDEX);
        let old: u8 = pv_in!(u8, imm 0x71);
        for v in [0x5au8, 0xa5] {
            pv_out!(u8, imm 0x70, INDEX);
            pv_out!(u8, imm 0x71, v);
            pv_out!(u8, dx 0x70u16, INDEX);
            let back: u8 = pv_in!(u8, dx 0x71u16);
            check(back == v && raw::cmos_read(INDEX) == v, || {
                format!("CMOS wrote {v:#x}, read {back:#x}")
            })?;
        }
        pv_out!(u8, imm 0x70, INDEX);
        pv_out!(u8, imm 0x71, old);
        pv_io_delay!();
        pv_io_delay!(call PV_OPS);
        raw::io_delay();
    }
    Ok(())
}

fn fw_cfg_ports() -> R {
    let sig = fwcfg::signature();
    check(sig == *b"QEMU", || format!("fw_cfg signature {sig:02x?}"))?;
    // 16 bytes of the file directory, byte by byte and with rep insb.
    let by_ins = fwcfg::read_prefix_with_ins(0x19, 16);
    let mut by_bytes = [0u8; 16];
    // SAFETY: selecting and reading fw_cfg items.
    unsafe {
        pv_out!(u16, dx 0x510u16, 0x19u16);
        for b in &mut by_bytes {
            *b = pv_in!(u8, dx 0x511u16);
        }
    }
    check(by_ins == by_bytes, || {
        "rep insb read other bytes than single in".into()
    })?;
    let msg = b"pvguest: rep-outs-ok\r\n";
    // SAFETY: writes the message to COM1's data register (the console polls for room; QEMU's
    // UART accepts bytes at any rate).
    unsafe { pv_rep_outs!(u8, 0x3f8u16, msg.as_ptr(), msg.len()) };
    Ok(())
}

fn cpuid_matches_the_instruction() -> R {
    for leaf in [0u32, 1, 7, 0x4000_0000, 0x8000_0000] {
        let mask = |mut r: [u32; 4]| {
            if leaf == 1 {
                r[1] &= 0x00ff_ffff; // initial APIC ID
            }
            r
        };
        let want = mask(arch::cpuid(leaf, 0));
        // SAFETY: cpuid only reads identification.
        let got = unsafe {
            [
                mask(pv_cpuid!(leaf, 0)),
                mask(pv_cpuid!(leaf, 0; call PV_OPS)),
                mask(raw::cpuid(leaf)),
            ]
        };
        check(got == [want; 3], || {
            format!("cpuid({leaf:#x}) gave {got:x?}, the instruction {want:x?}")
        })?;
    }
    Ok(())
}

fn counters() -> R {
    // SAFETY: reading the TSC.
    let (a, b, c, d) = unsafe {
        (
            pv_rdtsc!(),
            pv_rdtsc!(call PV_OPS),
            raw::rdtsc(),
            pv_rdtsc!(),
        )
    };
    check(a < b && b < c && c < d, || {
        format!("rdtsc not increasing: {a} {b} {c} {d}")
    })
}

fn rdtscp_if_present() -> Verdict {
    if arch::cpuid(0x8000_0001, 0)[3] & (1 << 27) == 0 {
        return Verdict::Skip("the CPU has no RDTSCP");
    }
    // SAFETY: RDTSCP is present; TSC_AUX is written and read back.
    let (t, aux) = unsafe {
        pv_wrmsr!(0xc000_0103u32, 7u64);
        pv_rdtscp!()
    };
    if t > 0 && aux == 7 {
        Verdict::Pass
    } else {
        Verdict::Fail(format!("rdtscp gave ({t}, {aux})"))
    }
}

fn rdpmc_if_present() -> Verdict {
    let a = arch::cpuid(0, 0)[0];
    let pmu = if a >= 0xa { arch::cpuid(0xa, 0)[0] } else { 0 };
    if pmu & 0xff == 0 || (pmu >> 8) & 0xff == 0 {
        return Verdict::Skip("the CPU reports no performance counters");
    }
    // SAFETY: counter 0 exists (CPUID leaf 0xA); reading it at CPL 0 is allowed.
    let _ = unsafe { pv_rdpmc!(0u32) };
    Verdict::Pass
}

/// `xgetbv` of XCR0 (enabling CR4.OSXSAVE first), for the harness's probe; nothing else.
pub fn probe_xgetbv() -> u64 {
    if arch::cpuid(1, 0)[2] & (1 << 26) == 0 {
        return 0;
    }
    // SAFETY: CR4.OSXSAVE makes XCR0 readable; CR4 is restored.
    unsafe {
        let cr4 = pv_read_cr!(4);
        pv_write_cr!(4, cr4 | (1 << 18));
        let x = xgetbv0();
        pv_write_cr!(4, cr4);
        x
    }
}

/// XCR0, by `xgetbv`.
///
/// # Safety
/// CR4.OSXSAVE must be set.
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller set CR4.OSXSAVE; xgetbv only reads XCR0.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nostack, nomem));
    }
    ((hi as u64) << 32) | lo as u64
}

/// `unemulated`: the harness saw a probe boot stop at `xgetbv` (it passes
/// `pvguest.xgetbv=unemulated`).
fn xsetbv_if_present(unemulated: bool) -> Verdict {
    if arch::cpuid(1, 0)[2] & (1 << 26) == 0 {
        return Verdict::Skip("the CPU has no XSAVE");
    }
    if unemulated {
        return Verdict::Skip(
            "a probe boot on this machine never got past xgetbv (seen by the harness, which \
             passed pvguest.xgetbv=unemulated)",
        );
    }
    // SAFETY: CR4.OSXSAVE is set so that XCR0 is accessible; XCR0 is written back as read.
    unsafe {
        let cr4 = pv_read_cr!(4);
        pv_write_cr!(4, cr4 | (1 << 18));
        let xgetbv = || xgetbv0();
        let x = xgetbv();
        // A valid XCR0 other than the current one: without AVX if it is on, else with the
        // SSE state toggled (valid while AVX is off). The kernel uses neither.
        let supported = arch::cpuid(0xd, 0)[0] as u64;
        let other = if x & 4 != 0 {
            x & !4
        } else if supported & 2 != 0 {
            x ^ 2
        } else {
            pv_write_cr!(4, cr4);
            return Verdict::Skip("XCR0 has no other valid value here (neither SSE nor AVX)");
        };
        pv_xsetbv!(0u32, other);
        let y = xgetbv();
        pv_xsetbv!(0u32, x);
        let z = xgetbv();
        pv_write_cr!(4, cr4);
        if y == other && z == x {
            Verdict::Pass
        } else {
            Verdict::Fail(format!(
                "XCR0 {x:#x}: xsetbv {other:#x} read back {y:#x}; xsetbv {x:#x} read back {z:#x}"
            ))
        }
    }
}

fn invpcid_if_present() -> Verdict {
    if arch::cpuid(0, 0)[0] < 7 || arch::cpuid(7, 0)[1] & (1 << 10) == 0 {
        return Verdict::Skip("the CPU has no INVPCID");
    }
    // Type 0 (one address, PCID 0: CR4.PCIDE is clear) after a remap, as invlpg: the new
    // mapping must be seen.
    let [a, b] = paging::TEST_WORDS;
    let desc = [0u64, paging::TEST_VA];
    let mut seen = [0u64; 2];
    for (i, second) in [true, false].into_iter().enumerate() {
        paging::map_test_page(second);
        // SAFETY: invalidates the test page's TLB entry; the descriptor is 16 bytes.
        unsafe { pv_invpcid!(0u64, desc.as_ptr()) };
        seen[i] = paging::read_test_page();
    }
    if seen == [b, a] {
        Verdict::Pass
    } else {
        Verdict::Fail(format!(
            "after remapping and invpcid the test page showed {seen:x?}, not {:x?}",
            [b, a]
        ))
    }
}

fn descriptor_tables() -> R {
    let (g, tr) = gdt::current();
    let want = gdt::expected();
    check(g == want, || "sgdt differs from what lgdt loaded".into())?;
    check(tr == TSS_SEL, || format!("str gave {tr:#x}"))?;
    let (i, want_i) = idt::current_and_expected();
    check(i == want_i, || "sidt differs from what lidt loaded".into())?;
    let (g2, i2) = (gdt::second_table(), idt::second_table());
    let segment = |sel: u16| -> u16 {
        let v: u16;
        // SAFETY: loads ES with a data selector (ES's base and limit are unused in long mode)
        // and reads it back; a selector the loaded tables lack faults, ending the run.
        unsafe {
            core::arch::asm!("mov es, {0:x}", "mov {0:x}, es", inout(reg) sel => v,
                options(nostack, nomem))
        };
        v
    };
    let before = idt::SECOND_IDT_HITS.load(Ordering::SeqCst);
    // SAFETY: loads a second GDT (the kernel's descriptors and more), a second IDT (the
    // kernel's gates but #DE), an LDT and another descriptor of the kernel's TSS, checks each by
    // its effect, and loads the kernel's own back (interrupts are off throughout).
    let seen = unsafe {
        pv_lgdt!(&raw const g2);
        pv_lidt!(&raw const i2);
        let tables = (gdt::current().0, idt::current_and_expected().0);
        // A segment only the second GDT has.
        let es = segment(gdt::COPY_DATA_SEL);
        // A #DE the second IDT sends to its own handler (the kernel's IDT would end the run).
        core::arch::asm!("xor edx, edx", "mov eax, 1", "xor ecx, ecx", "div ecx",
            out("eax") _, out("ecx") _, out("edx") _, options(nostack, nomem));
        pv_lldt!(gdt::COPY_LDT_SEL);
        let ldt = (pv_sldt!(), segment(gdt::LDT_DATA_SEL));
        pv_ltr!(gdt::COPY_TSS_SEL);
        let tr = pv_str!();
        segment(super::gdt::KERNEL_DS);
        pv_lldt!(0u16);
        pv_lidt!(&raw const want_i);
        pv_lgdt!(&raw const want);
        gdt::release_tss();
        pv_ltr!(TSS_SEL);
        (tables, es, ldt, tr)
    };
    let hits = idt::SECOND_IDT_HITS.load(Ordering::SeqCst) - before;
    check(seen.0 == (g2, i2), || {
        "sgdt/sidt do not show the second tables after lgdt/lidt".into()
    })?;
    check(seen.1 == gdt::COPY_DATA_SEL, || {
        format!("a segment of the second GDT loaded as {:#x}", seen.1)
    })?;
    check(hits == 1, || {
        format!("{hits} #DE through the second IDT's gate")
    })?;
    check(seen.2 == (gdt::COPY_LDT_SEL, gdt::LDT_DATA_SEL), || {
        format!(
            "after lldt: sldt, and a segment of the LDT, gave {:x?}",
            seen.2
        )
    })?;
    check(seen.3 == gdt::COPY_TSS_SEL, || {
        format!(
            "after ltr of the second TSS descriptor str gave {:#x}",
            seen.3
        )
    })?;
    check(
        gdt::current() == (want, TSS_SEL) && idt::current_and_expected().0 == want_i,
        || "the kernel's tables did not come back".into(),
    )?;
    // SAFETY: the null LDT.
    unsafe {
        pv_lldt!(0u16);
        let ldt = pv_sldt!();
        check(ldt == 0, || format!("sldt gave {ldt:#x}"))
    }
}

fn iretq_and_sysret() -> R {
    // SAFETY: iretq to the end of the site at the same privilege level.
    unsafe {
        pv_iretq_to_self!();
        pv_iretq_to_self!(call PV_OPS);
    }
    // By its effect: a frame whose target is past an instruction the fall-through would run,
    // and whose flags (CF, ZF set; PF, AF, SF, OF clear) differ from those before the site.
    for form in 0..2 {
        let (fell, flags): (u64, u64);
        // The frame (CF and ZF set, the other status flags clear, live flags with ZF clear
        // by then), the site, and what the fall-through would run before the landing label.
        macro_rules! iretq_to_665 {
            ($($call:tt)*) => {
                patch_sites::pv_site!($($call)* op: Op::Iretq,
                    pre: [
                        "xor ecx, ecx", "mov rax, ss", "push rax", "lea rax, [rsp + 8]",
                        "push rax", "pushfq", "and qword ptr [rsp], ~0x8d5",
                        "or qword ptr [rsp], 0x41", "test eax, eax", "mov rax, cs", "push rax",
                        "lea rax, [rip + 665f]", "push rax",
                    ],
                    native: ["iretq"],
                    post: ["mov ecx, 1", "665:", "pushfq", "pop rdx"],
                    opts: [], out("rax") _, out("rcx") fell, out("rdx") flags)
            };
        }
        // SAFETY: the frame returns to label 665 at the same privilege level, on the same
        // stack; the flags image keeps IF as it was.
        unsafe {
            if form == 0 {
                iretq_to_665!()
            } else {
                iretq_to_665!(call PV_OPS;)
            }
        }
        check(fell == 0 && flags & 0x8d5 == 0x41, || {
            format!(
                "form {form}: iretq fell through ({fell}) or landed with status flags {:#x}, \
                 not 0x41",
                flags & 0x8d5
            )
        })?;
    }
    let q = ring3::sysretq_round_trip();
    check(q == 0x5e5e64, || {
        format!("the 64-bit user round trip returned {q:#x}")
    })?;
    let l = ring3::sysretl_round_trip();
    check(l == 0x5e5e32, || {
        format!("the 32-bit user round trip returned {l:#x}")
    })
}

fn caches() -> R {
    // SAFETY: under QEMU both only cost time.
    unsafe {
        pv_wbinvd!();
        pv_wbinvd!(call PV_OPS);
        pv_invd!();
    }
    Ok(())
}

/// Runs every test. `xgetbv_unemulated`: the harness saw this machine stop at `xgetbv`.
pub fn run(xgetbv_unemulated: bool) -> Vec<Test> {
    let mut out = Vec::new();
    let mut t = |name, ops, r: Verdict| {
        out.push(Test {
            name,
            ops,
            verdict: r,
        })
    };
    let v = |r: R| match r {
        Ok(()) => Verdict::Pass,
        Err(e) => Verdict::Fail(e),
    };
    super::set_phase("self-test: if_through_flags");
    t(
        "if_through_flags",
        "cli sti pushf popf save_fl restore_fl",
        v(if_through_flags()),
    );
    super::set_phase("self-test: timer_only_when_enabled");
    t(
        "timer_only_when_enabled",
        "cli sti wrmsr",
        v(timer_only_when_enabled()),
    );
    super::set_phase("self-test: hlt_woken_by_the_timer");
    t(
        "hlt_woken_by_the_timer",
        "safe_halt hlt",
        v(hlt_woken_by_the_timer()),
    );
    super::set_phase("self-test: control_registers");
    t(
        "control_registers",
        "mov_to/from_cr0,2,3,4,8 clts smsw",
        v(control_registers()),
    );
    super::set_phase("self-test: debug_registers");
    t(
        "debug_registers",
        "mov_to_dr mov_from_dr",
        debug_registers(),
    );
    super::set_phase("self-test: invlpg_shows_the_new_mapping");
    t(
        "invlpg_shows_the_new_mapping",
        "invlpg",
        v(invlpg_shows_the_new_mapping()),
    );
    super::set_phase("self-test: msr_round_trips");
    t(
        "msr_round_trips",
        "rdmsr wrmsr swapgs",
        v(msr_round_trips()),
    );
    super::set_phase("self-test: cmos_round_trip");
    t("cmos_round_trip", "in out io_delay", v(cmos_round_trip()));
    super::set_phase("self-test: fw_cfg_ports");
    t("fw_cfg_ports", "in out ins outs", v(fw_cfg_ports()));
    super::set_phase("self-test: cpuid_matches_the_instruction");
    t(
        "cpuid_matches_the_instruction",
        "cpuid",
        v(cpuid_matches_the_instruction()),
    );
    super::set_phase("self-test: rdtsc_increases");
    t("rdtsc_increases", "rdtsc", v(counters()));
    super::set_phase("self-test: rdtscp");
    t("rdtscp", "rdtscp", rdtscp_if_present());
    super::set_phase("self-test: rdpmc");
    t("rdpmc", "rdpmc", rdpmc_if_present());
    super::set_phase("self-test: xsetbv");
    t("xsetbv", "xsetbv", xsetbv_if_present(xgetbv_unemulated));
    super::set_phase("self-test: invpcid");
    t("invpcid", "invpcid", invpcid_if_present());
    super::set_phase("self-test: descriptor_tables");
    t(
        "descriptor_tables",
        "lgdt lidt lldt ltr sgdt sidt sldt str",
        v(descriptor_tables()),
    );
    super::set_phase("self-test: iretq_and_sysret");
    t(
        "iretq_and_sysret",
        "iretq sysretq sysretl",
        v(iretq_and_sysret()),
    );
    super::set_phase("self-test: caches");
    t("caches", "wbinvd invd", v(caches()));
    super::set_phase("after the self-tests");
    out
}
