//! Thunks for the backends whose interface is not an instruction: Xen PV and Hyper-V.
//!
//! At boot, once the kernel has set up the backend's shared structures (Xen: the `vcpu_info`
//! it registered and the hypercall page; Hyper-V: the hypercall page it enabled through
//! `HV_X64_MSR_HYPERCALL` and a hypercall input page), [`xen`] or [`hyperv`] generates the
//! entry points sites call, into an executable area the kernel provides. Every entry point
//! preserves every register and flag the op does not define: the planner uses them with
//! `clobbers` empty. Ops with a register operand get one entry point per register (`rsp`
//! excepted: those sites stay native).
//!
//! The sequences follow the published interfaces (facts only):
//!
//! * **Xen PV** (`xen/include/public/xen.h`, Linux's `xen-asm.S`): the virtual IF is the
//!   inverse of `vcpu_info.evtchn_upcall_mask` (byte 1); `evtchn_upcall_pending` (byte 0) set
//!   when events are unmasked means "deliver now", forced with a `xen_version` hypercall (17).
//!   `cli` sets the mask, `sti` clears it and checks pending, `save_fl`/`restore_fl` read and
//!   write it, `safe_halt` is `sched_op(SCHEDOP_block)` (29, 1), which unmasks atomically;
//!   `mov cr3` is `mmuext_op(MMUEXT_NEW_BASEPTR)` and `invlpg` `mmuext_op(MMUEXT_INVLPG_LOCAL)`
//!   (26; commands 5 and 7; the frame number is the value over 4096: a PV kernel's CR3 values
//!   are machine addresses, which is what Xen's emulated `mov from cr3` returns); a port-0x80
//!   delay is nothing. Checked on Debian's Xen 4.17 (`oracle/tests/real_xen.rs`, and the
//!   guest's self-tests as a PV kernel). Hypercall `n` is a call to the
//!   hypercall page at `32 * n`, arguments in rdi, rsi, rdx, r10, r8.
//! * **Hyper-V** (the TLFS): `HvCallFlushVirtualAddressSpaceList` (0x0003, one GVA) is
//!   `invlpg`; `HvCallFlushVirtualAddressSpace` (0x0002) is a `mov cr3` that reloads the
//!   current value; the synthetic EOI, ICR and TPR MSRs (0x4000_0070-72) are the x2APIC ones
//!   (0x80b, 0x830, 0x808). A hypercall is a call to the hypercall page with the control word
//!   in rcx, the input page's address in rdx and the output's in r8; rax gets the status.

use alloc::vec::Vec;

use patch_sites::{Gpr, Op, Operand};
use pvpatch_isa::asm::{Asm, AsmError, JNZ, JZ, POPFQ, PUSHFQ, RET};

/// Generated entry points.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PvCode {
    /// Where `code` is (and runs).
    pub base: u64,
    /// The code.
    pub code: Vec<u8>,
    entries: Vec<(Op, Option<u8>, u32)>,
    /// Ops whose native instruction is silently wrong on this backend: a site of one that
    /// cannot call its entry point makes the table unpatchable.
    must_rewrite: &'static [Op],
}

impl PvCode {
    /// The entry point for a site of `op` with `operand` and `width`, if there is one (per
    /// register for register operands; `pushf`/`popf` only in their 8-byte form).
    pub fn entry(&self, op: Op, operand: Operand, width: u8) -> Option<u64> {
        let reg = match operand {
            Operand::Reg(r) | Operand::MemBase(r) => Some(r.number()),
            _ if matches!(op, Op::Pushf | Op::Popf) => Some(width),
            _ => None,
        };
        self.entries
            .iter()
            .find(|(o, r, _)| *o == op && *r == reg)
            .map(|(_, _, off)| self.base + *off as u64)
    }

    /// The ops that have entry points.
    pub fn ops(&self) -> impl Iterator<Item = Op> + '_ {
        self.entries.iter().map(|e| e.0)
    }

    /// Whether `op`'s native instruction is wrong on this backend (Xen PV: a guest kernel runs
    /// outside ring 0, where `popf` leaves IF alone and `cli`/`sti` fault).
    pub fn must_rewrite(&self, op: Op) -> bool {
        self.must_rewrite.contains(&op)
    }
}

/// Why thunks cannot be generated at this address: a structure the thunks address is beyond a
/// rel32 from them.
pub type PvError = AsmError;

/// The caller-saved registers a hypercall may clobber: rax, rcx, rdx, rsi, rdi, r8-r11.
const VOLATILE: [u8; 9] = [0, 1, 2, 6, 7, 8, 9, 10, 11];

fn save_volatile(a: &mut Asm<Vec<u8>>) -> Result<(), PvError> {
    VOLATILE.iter().try_for_each(|r| a.push(*r))
}

fn restore_volatile(a: &mut Asm<Vec<u8>>) -> Result<(), PvError> {
    VOLATILE.iter().rev().try_for_each(|r| a.pop(*r))
}

/// The registers a per-register entry point exists for: all but rsp.
fn regs() -> impl Iterator<Item = u8> {
    (0u8..16).filter(|r| *r != Gpr::Rsp.number())
}

/// Where Xen's structures are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XenLayout {
    /// This vCPU's `vcpu_info` (pending at +0, mask at +1).
    pub vcpu_info: u64,
    /// The hypercall page.
    pub hypercall_page: u64,
}

/// How a kernel asks Xen for its hypercall page: write the page's physical address to the MSR
/// whose index CPUID leaf `base + 2` returns in EBX (`base` is the leaf where the
/// `XenVMMXenVMM` signature was found); `(msr, value)`.
pub fn xen_hypercall_page_msr(cpuid_base_plus_2_ebx: u32, page_phys: u64) -> (u32, u64) {
    (cpuid_base_plus_2_ebx, page_phys & !0xfff)
}

/// How a kernel enables Hyper-V's hypercall page: `HV_X64_MSR_HYPERCALL` (0x4000_0001) with the
/// page's guest physical address and the enable bit (bit 0); `(msr, value)`. (The guest OS ID,
/// `HV_X64_MSR_GUEST_OS_ID`, 0x4000_0000, must be written first.)
pub fn hyperv_hypercall_page_msr(page_phys: u64) -> (u32, u64) {
    (0x4000_0001, (page_phys & !0xfff) | 1)
}

/// Xen hypercall numbers and commands the thunks use.
pub mod xen_abi {
    /// `__HYPERVISOR_xen_version`.
    pub const XEN_VERSION: u64 = 17;
    /// `__HYPERVISOR_mmuext_op`.
    pub const MMUEXT_OP: u64 = 26;
    /// `__HYPERVISOR_sched_op`.
    pub const SCHED_OP: u64 = 29;
    /// `SCHEDOP_block`.
    pub const SCHEDOP_BLOCK: u64 = 1;
    /// `MMUEXT_NEW_BASEPTR`.
    pub const MMUEXT_NEW_BASEPTR: u32 = 5;
    /// `MMUEXT_INVLPG_LOCAL`.
    pub const MMUEXT_INVLPG_LOCAL: u32 = 7;
    /// `DOMID_SELF`.
    pub const DOMID_SELF: u32 = 0x7ff0;
    /// Bytes per hypercall in the hypercall page.
    pub const STRIDE: u64 = 32;
}

/// The Xen PV entry points, generated to run at `base`.
pub fn xen(layout: XenLayout, base: u64) -> Result<PvCode, PvError> {
    use xen_abi::*;
    let pending = layout.vcpu_info;
    let mask = layout.vcpu_info + 1;
    let hc = |n: u64| layout.hypercall_page + STRIDE * n;
    let mut a = Asm::new(base, Vec::new());
    let mut entries = Vec::new();

    // check_events: force delivery of pending events; preserves everything.
    let check_events = a.at();
    a.raw(&[PUSHFQ])?;
    save_volatile(&mut a)?;
    a.mov_imm32(7, 0)?;
    a.mov_imm32(6, 0)?;
    a.call(hc(XEN_VERSION))?;
    restore_volatile(&mut a)?;
    a.raw(&[POPFQ, RET])?;

    entries.push((Op::Cli, None, (a.at() - base) as u32));
    a.rip_byte_imm(0xc6, mask, 1)?;
    a.raw(&[RET])?;

    entries.push((Op::Sti, None, (a.at() - base) as u32));
    a.rip_byte_imm(0xc6, mask, 0)?;
    a.raw(&[PUSHFQ])?;
    a.rip_byte_imm(0xf6, pending, 0xff)?;
    a.jcc_over(JZ, 5)?;
    a.call(check_events)?;
    a.raw(&[POPFQ, RET])?;

    // pushf: the RFLAGS image with the virtual IF, where the return address was.
    entries.push((Op::Pushf, Some(8), (a.at() - base) as u32));
    a.raw(&[0xff, 0x34, 0x24, PUSHFQ])?; // push qword [rsp]; pushfq
    a.push(0)?;
    a.raw(&[0x48, 0x8b, 0x44, 0x24, 0x08])?; // mov rax, [rsp + 8]
    a.alu_imm(4, 0, !0x200)?;
    a.rip_byte_imm(0xf6, mask, 0xff)?;
    a.jcc_over(JNZ, 6)?;
    a.raw(&[0x48, 0x0d, 0x00, 0x02, 0x00, 0x00])?; // or rax, 0x200
    a.raw(&[0x48, 0x89, 0x44, 0x24, 0x18])?; // mov [rsp + 24], rax
    a.pop(0)?;
    a.raw(&[POPFQ, RET])?;

    // popf: the virtual IF from the image's IF, then popfq of the image past the return.
    entries.push((Op::Popf, Some(8), (a.at() - base) as u32));
    a.raw(&[0x48, 0xf7, 0x44, 0x24, 0x08, 0x00, 0x02, 0x00, 0x00])?; // test qword [rsp+8], 0x200
    a.setz_rip(mask)?;
    a.jcc_over(JZ, 7 + 2 + 5)?;
    a.rip_byte_imm(0xf6, pending, 0xff)?;
    a.jcc_over(JZ, 5)?;
    a.call(check_events)?;
    a.push(0)?;
    a.raw(&[0x48, 0x8b, 0x44, 0x24, 0x08])?; // mov rax, [rsp + 8]: the return address
    a.raw(&[0x48, 0x87, 0x44, 0x24, 0x10])?; // xchg rax, [rsp + 16]: it takes the image's slot
    a.raw(&[0x48, 0x89, 0x44, 0x24, 0x08])?; // mov [rsp + 8], rax: the image below it
    a.pop(0)?;
    a.raw(&[POPFQ, RET])?;

    entries.push((Op::SafeHalt, None, (a.at() - base) as u32));
    a.raw(&[PUSHFQ])?;
    save_volatile(&mut a)?;
    a.mov_imm32(7, SCHEDOP_BLOCK as u32)?;
    a.mov_imm32(6, 0)?;
    a.call(hc(SCHED_OP))?;
    restore_volatile(&mut a)?;
    a.raw(&[POPFQ, RET])?;

    for r in regs() {
        // save_fl: RFLAGS with IF replaced by the virtual IF.
        entries.push((Op::SaveFl, Some(r), (a.at() - base) as u32));
        a.raw(&[PUSHFQ, PUSHFQ])?;
        a.pop(r)?;
        a.alu_imm(4, r, !0x200)?;
        a.rip_byte_imm(0xf6, mask, 0xff)?;
        a.jcc_over(JNZ, 7)?;
        a.alu_imm(1, r, 0x200)?;
        a.raw(&[POPFQ, RET])?;

        // restore_fl: the virtual IF from the image's IF; the rest as popfq loads it.
        entries.push((Op::RestoreFl, Some(r), (a.at() - base) as u32));
        a.push(r)?;
        a.raw(&[0x48, 0xf7, 0x04, 0x24, 0x00, 0x02, 0x00, 0x00])?; // test qword [rsp], 0x200
        a.setz_rip(mask)?;
        a.jcc_over(JZ, 7 + 2 + 5)?;
        a.rip_byte_imm(0xf6, pending, 0xff)?;
        a.jcc_over(JZ, 5)?;
        a.call(check_events)?;
        a.raw(&[POPFQ, RET])?;

        // mov cr3, r and invlpg [r]: one mmuext_op on the stack.
        for (op, cmd, shift) in [
            (Op::MovToCr3, MMUEXT_NEW_BASEPTR, true),
            (Op::Invlpg, MMUEXT_INVLPG_LOCAL, false),
        ] {
            entries.push((op, Some(r), (a.at() - base) as u32));
            a.raw(&[PUSHFQ])?;
            save_volatile(&mut a)?;
            a.raw(&[0x48, 0x83, 0xec, 24])?; // sub rsp, 24
            a.store_rsp(8, r)?;
            a.raw(&[0xc7, 0x04, 0x24])?; // mov dword [rsp], cmd
            a.raw(&cmd.to_le_bytes())?;
            if shift {
                a.raw(&[0x48, 0xc1, 0x6c, 0x24, 0x08, 12])?; // shr qword [rsp + 8], 12
            }
            a.raw(&[0x48, 0x89, 0xe7])?; // mov rdi, rsp
            a.mov_imm32(6, 1)?;
            a.mov_imm32(2, 0)?;
            a.mov_imm32(10, DOMID_SELF)?;
            a.call(hc(MMUEXT_OP))?;
            a.raw(&[0x48, 0x83, 0xc4, 24])?; // add rsp, 24
            restore_volatile(&mut a)?;
            a.raw(&[POPFQ, RET])?;
        }
    }
    Ok(PvCode {
        base,
        code: a.out,
        entries,
        must_rewrite: &[
            Op::Cli,
            Op::Sti,
            Op::Pushf,
            Op::Popf,
            Op::SaveFl,
            Op::RestoreFl,
            Op::SafeHalt,
        ],
    })
}

/// Where Hyper-V's structures are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HyperVLayout {
    /// The hypercall page.
    pub hypercall_page: u64,
    /// A page for hypercall input (its address is also its physical address).
    pub input_page: u64,
}

/// Hyper-V hypercall codes, flags and synthetic MSRs the thunks use.
pub mod hyperv_abi {
    /// `HvCallFlushVirtualAddressSpace`.
    pub const FLUSH_VIRTUAL_ADDRESS_SPACE: u64 = 0x0002;
    /// `HvCallFlushVirtualAddressSpaceList`.
    pub const FLUSH_VIRTUAL_ADDRESS_LIST: u64 = 0x0003;
    /// `HV_FLUSH_ALL_PROCESSORS`.
    pub const FLUSH_ALL_PROCESSORS: u64 = 1;
    /// `HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES`.
    pub const FLUSH_ALL_ADDRESS_SPACES: u64 = 2;
    /// `HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY`.
    pub const FLUSH_NON_GLOBAL_ONLY: u64 = 4;
    /// The rep count's shift in the control word.
    pub const REP_COUNT_SHIFT: u32 = 32;
    /// `HV_X64_MSR_EOI`, `HV_X64_MSR_ICR`, `HV_X64_MSR_TPR` and the x2APIC MSRs they are.
    pub const SYNTHETIC_APIC_MSRS: [(u32, u32); 3] = [
        (0x4000_0070, 0x80b),
        (0x4000_0071, 0x830),
        (0x4000_0072, 0x808),
    ];
}

/// The Hyper-V entry points, generated to run at `base`.
pub fn hyperv(layout: HyperVLayout, base: u64) -> Result<PvCode, PvError> {
    use hyperv_abi::*;
    let input = layout.input_page;
    let mut a = Asm::new(base, Vec::new());
    let mut entries = Vec::new();

    // wrmsr: x2APIC EOI, ICR and TPR through their synthetic MSRs; everything else native.
    entries.push((Op::Wrmsr, None, (a.at() - base) as u32));
    a.raw(&[PUSHFQ])?;
    for (synthetic, x2apic) in SYNTHETIC_APIC_MSRS {
        // cmp ecx, x2apic; jne next; push rcx; mov ecx, synthetic; wrmsr; pop rcx; popfq; ret
        a.raw(&[0x81, 0xf9])?;
        a.raw(&x2apic.to_le_bytes())?;
        a.jcc_over(JNZ, 1 + 5 + 2 + 1 + 1 + 1)?;
        a.push(1)?;
        a.mov_imm32(1, synthetic)?;
        a.raw(&[0x0f, 0x30])?;
        a.pop(1)?;
        a.raw(&[POPFQ, RET])?;
    }
    a.raw(&[POPFQ, 0x0f, 0x30, RET])?;

    let hypercall = |a: &mut Asm<Vec<u8>>, control: u64| -> Result<(), PvError> {
        a.mov_imm64(1, control)?;
        a.lea_rip(2, input)?;
        a.mov_imm32(8, 0)?;
        a.call(layout.hypercall_page)
    };
    for r in regs() {
        // invlpg [r]: flush one GVA, every address space, every processor (a superset).
        entries.push((Op::Invlpg, Some(r), (a.at() - base) as u32));
        a.raw(&[PUSHFQ])?;
        a.store_rip(input + 24, r)?;
        save_volatile(&mut a)?;
        a.store_rip_imm(input, 0)?;
        a.store_rip_imm(
            input + 8,
            (FLUSH_ALL_PROCESSORS | FLUSH_ALL_ADDRESS_SPACES) as i32,
        )?;
        a.store_rip_imm(input + 16, 0)?;
        hypercall(&mut a, FLUSH_VIRTUAL_ADDRESS_LIST | (1 << REP_COUNT_SHIFT))?;
        restore_volatile(&mut a)?;
        a.raw(&[POPFQ, RET])?;

        // mov cr3, r: a reload of the current value is a flush of the address space's
        // non-global mappings; any other value is written.
        entries.push((Op::MovToCr3, Some(r), (a.at() - base) as u32));
        let scratch = if r == 0 { 1 } else { 0 };
        a.raw(&[PUSHFQ])?;
        a.push(scratch)?;
        a.mov_cr(false, 3, scratch)?;
        a.cmp(scratch, r)?;
        a.pop(scratch)?;
        // jne to the native write at the end.
        let flush_start = a.out.len();
        a.raw(&[JNZ, 0])?; // patched below
        a.store_rip(input, r)?;
        save_volatile(&mut a)?;
        a.store_rip_imm(
            input + 8,
            (FLUSH_NON_GLOBAL_ONLY | FLUSH_ALL_PROCESSORS) as i32,
        )?;
        a.store_rip_imm(input + 16, 0)?;
        hypercall(&mut a, FLUSH_VIRTUAL_ADDRESS_SPACE)?;
        restore_volatile(&mut a)?;
        a.raw(&[POPFQ, RET])?;
        let over = a.out.len() - (flush_start + 2);
        a.out[flush_start + 1] = over as u8;
        a.raw(&[POPFQ])?;
        a.mov_cr(true, 3, r)?;
        a.raw(&[RET])?;
    }
    Ok(PvCode {
        base,
        code: a.out,
        entries,
        must_rewrite: &[],
    })
}

#[cfg(test)]
mod tests {
    use alloc::string::String;
    use alloc::vec::Vec;

    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    use super::*;

    fn listing(code: &PvCode, at: u64, n: usize) -> Vec<String> {
        let off = (at - code.base) as usize;
        let mut d = Decoder::with_ip(64, &code.code[off..], at, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        (0..n)
            .map(|_| {
                let i = d.decode();
                assert!(!i.is_invalid(), "undecodable at {:#x}", i.ip());
                let mut s = String::new();
                f.format(&i, &mut s);
                s
            })
            .collect()
    }

    #[test]
    fn xen_entry_points_are_the_sequences_described() {
        let base = 0x10_0000;
        let l = XenLayout {
            vcpu_info: 0x20_0000,
            hypercall_page: 0x30_0000,
        };
        let c = xen(l, base).unwrap();
        let cli = c.entry(Op::Cli, Operand::None, 0).unwrap();
        assert_eq!(listing(&c, cli, 2), ["mov byte ptr [200001h],1", "ret"]);
        let sti = c.entry(Op::Sti, Operand::None, 0).unwrap();
        assert_eq!(
            listing(&c, sti, 3),
            [
                "mov byte ptr [200001h],0",
                "pushfq",
                "test byte ptr [200000h],0FFh"
            ]
        );
        let save = c.entry(Op::SaveFl, Operand::Reg(Gpr::R13), 8).unwrap();
        let l = listing(&c, save, 8);
        assert_eq!(
            [&l[..5], &l[6..]].concat(),
            [
                "pushfq",
                "pushfq",
                "pop r13",
                "and r13,0FFFFFFFFFFFFFDFFh",
                "test byte ptr [200001h],0FFh",
                "or r13,200h",
                "popfq",
            ]
        );
        assert!(l[5].starts_with("jne short"), "{l:?}");
        assert!(c.entry(Op::SaveFl, Operand::Reg(Gpr::Rsp), 8).is_none());
        let cr3 = c.entry(Op::MovToCr3, Operand::Reg(Gpr::Rbx), 8).unwrap();
        let l = listing(&c, cr3, 20);
        assert!(l.contains(&"mov [rsp+8],rbx".into()), "{l:?}");
        assert!(l.contains(&"mov dword ptr [rsp],5".into()), "{l:?}");
        assert!(l.contains(&"call 0000000000300340h".into()), "{l:?}");
        // Out of reach.
        assert_eq!(
            xen(
                XenLayout {
                    vcpu_info: 1 << 40,
                    hypercall_page: 0
                },
                base
            ),
            Err(AsmError::OutOfReach((1 << 40) + 1))
        );
    }

    #[test]
    fn hypercall_page_msrs() {
        assert_eq!(
            hyperv_hypercall_page_msr(0x1234_5000),
            (0x4000_0001, 0x1234_5001)
        );
        assert_eq!(
            xen_hypercall_page_msr(0x4000_0000, 0x9_9000),
            (0x4000_0000, 0x9_9000)
        );
    }

    #[test]
    fn hyperv_entry_points_decode_and_translate_the_apic_msrs() {
        let base = 0x10_0000;
        let c = hyperv(
            HyperVLayout {
                hypercall_page: 0x30_0000,
                input_page: 0x40_0000,
            },
            base,
        )
        .unwrap();
        let w = c.entry(Op::Wrmsr, Operand::None, 0).unwrap();
        assert_eq!(
            listing(&c, w, 9),
            [
                "pushfq",
                "cmp ecx,80Bh",
                "jne short 0000000000100014h",
                "push rcx",
                "mov ecx,40000070h",
                "wrmsr",
                "pop rcx",
                "popfq",
                "ret"
            ]
        );
        for r in regs() {
            let g = Gpr::from_number(r).unwrap();
            for op in [Op::Invlpg, Op::MovToCr3] {
                let operand = if op == Op::Invlpg {
                    Operand::MemBase(g)
                } else {
                    Operand::Reg(g)
                };
                let at = c.entry(op, operand, 8).unwrap();
                listing(&c, at, 12);
            }
        }
    }
}
