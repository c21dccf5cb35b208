//! The ops table of the indirect-call form: `call [rip + PV_OPS + 8 * op]` sites call these
//! thunks until the patcher rewrites them. Each thunk is the native instruction and `ret`: it
//! preserves every register and flag the op does not define, as the ABI requires.

use patch_sites::Op;

type Thunk = unsafe extern "C" fn();

unsafe extern "C" {
    fn pv_thunk_cli();
    fn pv_thunk_sti();
    fn pv_thunk_save_fl();
    fn pv_thunk_restore_fl();
    fn pv_thunk_io_delay();
    fn pv_thunk_rdmsr();
    fn pv_thunk_wrmsr();
    fn pv_thunk_cpuid();
    fn pv_thunk_rdtsc();
    fn pv_thunk_read_cr3();
    fn pv_thunk_write_cr3();
    fn pv_thunk_read_cr4();
    fn pv_thunk_invlpg();
    fn pv_thunk_wbinvd();
    fn pv_thunk_safe_halt();
    fn pv_thunk_swapgs();
    fn pv_thunk_iretq();
    fn pv_thunk_unset();
}

core::arch::global_asm!(
    ".pushsection .text.pvthunks, \"ax\"",
    "pv_thunk_cli: cli; ret",
    "pv_thunk_sti: sti; ret",
    "pv_thunk_save_fl: pushfq; pop rax; ret",
    "pv_thunk_restore_fl: push rdi; popfq; ret",
    "pv_thunk_io_delay: out 0x80, al; ret",
    "pv_thunk_rdmsr: rdmsr; ret",
    "pv_thunk_wrmsr: wrmsr; ret",
    "pv_thunk_cpuid: cpuid; ret",
    "pv_thunk_rdtsc: rdtsc; ret",
    "pv_thunk_read_cr3: mov rax, cr3; ret",
    "pv_thunk_write_cr3: mov cr3, rdi; ret",
    "pv_thunk_read_cr4: mov rax, cr4; ret",
    "pv_thunk_invlpg: invlpg [rdi]; ret",
    "pv_thunk_wbinvd: wbinvd; ret",
    "pv_thunk_safe_halt: sti; hlt; ret",
    "pv_thunk_swapgs: swapgs; ret",
    // The call pushed a return address above the iret frame: drop it, then iretq.
    "pv_thunk_iretq: add rsp, 8; iretq",
    // An op with no thunk: a call-form site of it is a bug, reported as #UD at this address.
    "pv_thunk_unset: ud2",
    ".popsection",
);

const fn table() -> [Option<Thunk>; 128] {
    let mut t: [Option<Thunk>; 128] = [Some(pv_thunk_unset); 128];
    t[Op::Cli as usize] = Some(pv_thunk_cli);
    t[Op::Sti as usize] = Some(pv_thunk_sti);
    t[Op::SaveFl as usize] = Some(pv_thunk_save_fl);
    t[Op::RestoreFl as usize] = Some(pv_thunk_restore_fl);
    t[Op::IoDelay as usize] = Some(pv_thunk_io_delay);
    t[Op::Rdmsr as usize] = Some(pv_thunk_rdmsr);
    t[Op::Wrmsr as usize] = Some(pv_thunk_wrmsr);
    t[Op::Cpuid as usize] = Some(pv_thunk_cpuid);
    t[Op::Rdtsc as usize] = Some(pv_thunk_rdtsc);
    t[Op::MovFromCr3 as usize] = Some(pv_thunk_read_cr3);
    t[Op::MovToCr3 as usize] = Some(pv_thunk_write_cr3);
    t[Op::MovFromCr4 as usize] = Some(pv_thunk_read_cr4);
    t[Op::Invlpg as usize] = Some(pv_thunk_invlpg);
    t[Op::Wbinvd as usize] = Some(pv_thunk_wbinvd);
    t[Op::SafeHalt as usize] = Some(pv_thunk_safe_halt);
    t[Op::Swapgs as usize] = Some(pv_thunk_swapgs);
    t[Op::Iretq as usize] = Some(pv_thunk_iretq);
    t
}

/// The ops table.
#[unsafe(no_mangle)]
pub static PV_OPS: [Option<Thunk>; 128] = table();
