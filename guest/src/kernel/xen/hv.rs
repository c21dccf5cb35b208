//! Xen's PV interface as this kernel uses it (`xen/include/public/xen.h`, `arch-x86/xen.h`,
//! `event_channel.h`, `sched.h`, `vcpu.h`, `physdev.h`, `callback.h`: numbers and layouts
//! only): hypercalls through the hypercall page, `start_info`, `shared_info`/`vcpu_info`, the
//! console, the clock, event channels and the trap table.
//!
//! Every hypercall passes its arguments in rdi, rsi, rdx, r10, r8 and returns in rax; the
//! page's stubs keep rcx and r11.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Hypercall numbers.
pub mod nr {
    /// `set_trap_table`.
    pub const SET_TRAP_TABLE: u64 = 0;
    /// `mmu_update`.
    pub const MMU_UPDATE: u64 = 1;
    /// `update_va_mapping`.
    pub const UPDATE_VA_MAPPING: u64 = 14;
    /// `set_timer_op`.
    pub const SET_TIMER_OP: u64 = 15;
    /// `xen_version`.
    pub const XEN_VERSION: u64 = pvpatch_runtime::pv::xen_abi::XEN_VERSION;
    /// `console_io`.
    pub const CONSOLE_IO: u64 = 18;
    /// `vcpu_op`.
    pub const VCPU_OP: u64 = 24;
    /// `mmuext_op`.
    pub const MMUEXT_OP: u64 = pvpatch_runtime::pv::xen_abi::MMUEXT_OP;
    /// `sched_op`.
    pub const SCHED_OP: u64 = pvpatch_runtime::pv::xen_abi::SCHED_OP;
    /// `callback_op`.
    pub const CALLBACK_OP: u64 = 30;
    /// `event_channel_op`.
    pub const EVENT_CHANNEL_OP: u64 = 32;
    /// `physdev_op`.
    pub const PHYSDEV_OP: u64 = 33;
}

/// `DOMID_SELF`.
pub const DOMID_SELF: u64 = pvpatch_runtime::pv::xen_abi::DOMID_SELF as u64;
/// `UVMF_INVLPG`: flush this address's TLB entry on this vCPU.
pub const UVMF_INVLPG: u64 = 2;
/// `MMUEXT_PIN_L4_TABLE`.
pub const MMUEXT_PIN_L4_TABLE: u32 = 3;
/// `MMUEXT_INVLPG_LOCAL`.
pub const MMUEXT_INVLPG_LOCAL: u32 = pvpatch_runtime::pv::xen_abi::MMUEXT_INVLPG_LOCAL;
/// `SCHEDOP_block`.
pub const SCHEDOP_BLOCK: u64 = pvpatch_runtime::pv::xen_abi::SCHEDOP_BLOCK;
/// `VCPUOP_stop_periodic_timer`.
pub const VCPUOP_STOP_PERIODIC_TIMER: u64 = 7;
/// `EVTCHNOP_bind_virq`.
pub const EVTCHNOP_BIND_VIRQ: u64 = 1;
/// `VIRQ_TIMER`.
pub const VIRQ_TIMER: u32 = 0;
/// `PHYSDEVOP_set_iopl`.
pub const PHYSDEVOP_SET_IOPL: u64 = 6;
/// `CALLBACKOP_register`.
pub const CALLBACKOP_REGISTER: u64 = 0;
/// `CALLBACKTYPE_event`.
pub const CALLBACKTYPE_EVENT: u16 = 0;
/// `CALLBACKTYPE_failsafe`.
pub const CALLBACKTYPE_FAILSAFE: u16 = 1;
/// The kernel's flat 64-bit code selector (`FLAT_KERNEL_CS64`).
pub const KERNEL_CS: u16 = 0xe033;
/// A present, writable, accessed, dirty PTE (Xen adds the user bit for a PV kernel).
pub const PTE_RW: u64 = 0x63;
/// A present, accessed, read-only PTE.
pub const PTE_RO: u64 = 0x21;
/// A page-table entry that points at a lower table: present, writable, user, accessed, dirty.
pub const PTE_TABLE: u64 = 0x67;

unsafe extern "C" {
    static xen_hypercall_page: [u8; 4096];
}

/// The hypercall page's address.
pub fn hypercall_page() -> u64 {
    &raw const xen_hypercall_page as u64
}

/// Hypercall `nr` with up to five arguments.
///
/// # Safety
/// The arguments must be what the hypercall expects: pointers to memory it may read or write.
pub unsafe fn call(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    let r: i64;
    // SAFETY: the stub at `32 * nr` of the page Xen filled issues the hypercall and returns;
    // the caller vouches for the arguments; every register the stub or Xen may change is
    // declared.
    unsafe {
        asm!("call {t}", t = in(reg) hypercall_page() + 32 * nr,
            inlateout("rdi") a1 => _, inlateout("rsi") a2 => _, inlateout("rdx") a3 => _,
            inlateout("r10") a4 => _, inlateout("r8") a5 => _, lateout("rax") r,
            lateout("rcx") _, lateout("r11") _);
    }
    r
}

/// `start_info` (x86_64), as far as this kernel reads it.
pub struct StartInfo(pub *const u8);

impl StartInfo {
    fn u64_at(&self, off: usize) -> u64 {
        // SAFETY: Xen maps start_info (1168 bytes) in the boot region; `off` is a field of it.
        unsafe { core::ptr::read_volatile(self.0.add(off) as *const u64) }
    }
    /// Whether the magic is `xen-3.0-x86_64`.
    pub fn valid(&self) -> bool {
        // SAFETY: see `u64_at`.
        let magic = unsafe { core::slice::from_raw_parts(self.0, 14) };
        !self.0.is_null() && magic == b"xen-3.0-x86_64"
    }
    /// Pages of the domain.
    pub fn nr_pages(&self) -> u64 {
        self.u64_at(32)
    }
    /// The machine address of `shared_info`.
    pub fn shared_info(&self) -> u64 {
        self.u64_at(40)
    }
    /// The boot page tables' root (its virtual address).
    pub fn pt_base(&self) -> u64 {
        self.u64_at(88)
    }
    /// The physical-to-machine list (virtual address of `u64[nr_pages]`).
    pub fn mfn_list(&self) -> u64 {
        self.u64_at(104)
    }
    /// The second module's virtual address and length (0 if none).
    pub fn module(&self) -> (u64, u64) {
        (self.u64_at(112), self.u64_at(120))
    }
    /// The command line: the first module's string without its file name.
    pub fn cmdline(&self) -> &'static str {
        // SAFETY: `cmd_line` is a 1024-byte array at offset 128 of start_info, which stays
        // mapped for the kernel's life.
        let bytes = unsafe { core::slice::from_raw_parts(self.0.add(128), 1024) };
        let n = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        core::str::from_utf8(&bytes[..n]).unwrap_or("")
    }
}

/// Where the kernel mapped `shared_info` (0 until it did).
static SHARED_INFO: AtomicU64 = AtomicU64::new(0);
/// Where the p2m list is.
static P2M: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(4096))]
struct Page([u8; 4096]);
/// The page whose mapping is replaced by `shared_info`.
static mut SHARED_PAGE: Page = Page([0; 4096]);

/// Maps `shared_info` over a page of the kernel's and remembers the p2m list.
pub fn map_shared_info(si: &StartInfo) -> Result<(), i64> {
    P2M.store(si.mfn_list(), Ordering::Relaxed);
    let va = &raw mut SHARED_PAGE as u64;
    // SAFETY: remaps one page of this kernel's BSS that nothing else uses.
    let rc = unsafe {
        call(
            nr::UPDATE_VA_MAPPING,
            va,
            si.shared_info() | PTE_RW,
            UVMF_INVLPG,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(rc);
    }
    SHARED_INFO.store(va, Ordering::Relaxed);
    Ok(())
}

/// vCPU 0's `vcpu_info` (at the start of `shared_info`).
pub fn vcpu_info() -> u64 {
    SHARED_INFO.load(Ordering::Relaxed)
}

/// `evtchn_upcall_pending`.
pub fn pending() -> u8 {
    // SAFETY: vcpu_info is mapped once `map_shared_info` succeeded (the only caller's order).
    unsafe { core::ptr::read_volatile(vcpu_info() as *const u8) }
}

/// Sets `evtchn_upcall_pending` (Xen delivers an upcall when it is set and events are not
/// masked, on its next return to the kernel).
pub fn set_pending(v: u8) {
    // SAFETY: see `pending`.
    unsafe { core::ptr::write_volatile(vcpu_info() as *mut u8, v) }
}

/// `evtchn_upcall_mask`: the virtual IF, inverted.
pub fn mask() -> u8 {
    // SAFETY: see `pending`.
    unsafe { core::ptr::read_volatile((vcpu_info() + 1) as *const u8) }
}

/// Writes `evtchn_upcall_mask` (without delivering what is pending: see [`force_events`]).
pub fn set_mask(v: u8) {
    // SAFETY: see `pending`.
    unsafe { core::ptr::write_volatile((vcpu_info() + 1) as *mut u8, v) }
}

/// Any hypercall makes Xen deliver pending, unmasked events on its return.
pub fn force_events() {
    // SAFETY: xen_version(XENVER_version) takes no pointer.
    unsafe { call(nr::XEN_VERSION, 0, 0, 0, 0, 0) };
}

/// Takes and clears the pending-event words: `evtchn_pending_sel`, then each selected word of
/// `evtchn_pending` not masked; returns the ports that were pending in word 0.
pub fn take_events() -> u64 {
    let base = SHARED_INFO.load(Ordering::Relaxed);
    let mut ports = 0;
    // SAFETY: shared_info is mapped; the words are Xen's to set and ours to clear, with locked
    // operations as the ABI asks.
    unsafe {
        set_pending(0);
        let sel = &*((vcpu_info() + 8) as *const AtomicU64);
        let words = sel.swap(0, Ordering::SeqCst);
        for w in 0..64 {
            if words & (1 << w) == 0 {
                continue;
            }
            let pending = &*((base + 2048 + 8 * w) as *const AtomicU64);
            let mask = core::ptr::read_volatile((base + 2560 + 8 * w) as *const u64);
            let bits = pending.load(Ordering::SeqCst) & !mask;
            pending.fetch_and(!bits, Ordering::SeqCst);
            if w == 0 {
                ports |= bits;
            }
        }
    }
    ports
}

/// Xen's system time in nanoseconds, from `vcpu_info.time` and the TSC.
pub fn now_ns() -> u64 {
    let t = vcpu_info() + 32;
    loop {
        // SAFETY: vcpu_time_info is mapped; a torn read is detected by the version.
        unsafe {
            let version = core::ptr::read_volatile(t as *const u32);
            core::sync::atomic::fence(Ordering::SeqCst);
            let tsc_stamp = core::ptr::read_volatile((t + 8) as *const u64);
            let system = core::ptr::read_volatile((t + 16) as *const u64);
            let mul = core::ptr::read_volatile((t + 24) as *const u32);
            let shift = core::ptr::read_volatile((t + 28) as *const i8);
            let tsc = super::super::arch::rdtsc();
            core::sync::atomic::fence(Ordering::SeqCst);
            let again = core::ptr::read_volatile(t as *const u32);
            if version & 1 != 0 || version != again {
                continue;
            }
            let mut delta = tsc.wrapping_sub(tsc_stamp);
            if shift >= 0 {
                delta <<= shift;
            } else {
                delta >>= -shift;
            }
            return system + ((delta as u128 * mul as u128) >> 32) as u64;
        }
    }
}

/// Arms the one-shot timer for `deadline` (Xen system time, ns); 0 cancels it.
pub fn set_timer(deadline: u64) -> i64 {
    // SAFETY: set_timer_op takes a value.
    unsafe { call(nr::SET_TIMER_OP, deadline, 0, 0, 0, 0) }
}

/// `SCHEDOP_block`: unmasks events and sleeps until one is pending.
pub fn block() -> i64 {
    // SAFETY: sched_op(SCHEDOP_block, NULL).
    unsafe { call(nr::SCHED_OP, SCHEDOP_BLOCK, 0, 0, 0, 0) }
}

/// Stops the periodic 10 ms timer Xen starts for every PV vCPU, and binds `VIRQ_TIMER` (the
/// one-shot timer) to an event channel; returns its port.
pub fn timer_channel() -> Result<u32, i64> {
    // SAFETY: vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL).
    let rc = unsafe { call(nr::VCPU_OP, VCPUOP_STOP_PERIODIC_TIMER, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(rc);
    }
    let mut bind = [VIRQ_TIMER, 0, 0];
    // SAFETY: struct evtchn_bind_virq { virq, vcpu, port (out) }, on this stack.
    let rc = unsafe {
        call(
            nr::EVENT_CHANNEL_OP,
            EVTCHNOP_BIND_VIRQ,
            bind.as_mut_ptr() as u64,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(rc);
    }
    Ok(bind[2])
}

/// Writes `s` to Xen's console (the serial port, for dom0).
pub fn console_write(s: &[u8]) {
    for chunk in s.chunks(1024) {
        // SAFETY: console_io(CONSOLEIO_write, len, buf) reads `len` bytes of `buf`.
        unsafe {
            call(
                nr::CONSOLE_IO,
                0,
                chunk.len() as u64,
                chunk.as_ptr() as u64,
                0,
                0,
            )
        };
    }
}

/// `PHYSDEVOP_set_iopl`: the virtual IOPL, which lets Xen emulate port I/O for the kernel.
pub fn set_iopl(iopl: u32) -> i64 {
    let arg = [iopl];
    // SAFETY: struct physdev_set_iopl { uint32_t iopl; } on this stack.
    unsafe {
        call(
            nr::PHYSDEV_OP,
            PHYSDEVOP_SET_IOPL,
            arg.as_ptr() as u64,
            0,
            0,
            0,
        )
    }
}

/// One `mmuext_op` on this domain.
pub fn mmuext(cmd: u32, arg1: u64) -> i64 {
    let op: [u64; 3] = [cmd as u64, arg1, 0];
    // SAFETY: struct mmuext_op { cmd; arg1; arg2 } (24 bytes) on this stack, count 1.
    unsafe { call(nr::MMUEXT_OP, op.as_ptr() as u64, 1, 0, DOMID_SELF, 0) }
}

/// `update_va_mapping(va, pte, UVMF_INVLPG)`.
pub fn update_va_mapping(va: u64, pte: u64) -> i64 {
    // SAFETY: the callers map pages of this kernel's own.
    unsafe { call(nr::UPDATE_VA_MAPPING, va, pte, UVMF_INVLPG, 0, 0) }
}

/// One `mmu_update`: the PTE at machine address `ptr` becomes `val`.
pub fn mmu_update(ptr: u64, val: u64) -> i64 {
    let req: [u64; 2] = [ptr, val];
    // SAFETY: struct mmu_update { ptr; val } on this stack, count 1, no done count.
    unsafe { call(nr::MMU_UPDATE, req.as_ptr() as u64, 1, 0, DOMID_SELF, 0) }
}

/// The machine frame of one of this kernel's pages (virtual = pseudo-physical here).
pub fn mfn(va: u64) -> u64 {
    let pfn = va >> 12;
    // SAFETY: the p2m list holds one u64 per page of the domain, and `va` lies in the
    // kernel's image (pfn < nr_pages).
    unsafe { core::ptr::read_volatile((P2M.load(Ordering::Relaxed) + 8 * pfn) as *const u64) }
}

/// `struct trap_info`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TrapInfo {
    /// Vector.
    pub vector: u8,
    /// DPL for `int n` (bits 0-1).
    pub flags: u8,
    /// Code selector.
    pub cs: u16,
    /// Handler.
    pub address: u64,
}

/// Installs the trap table (ending at an entry whose address is 0).
pub fn set_trap_table(table: &[TrapInfo]) -> i64 {
    // SAFETY: Xen reads entries until one has address 0; the caller's table ends with one.
    unsafe { call(nr::SET_TRAP_TABLE, table.as_ptr() as u64, 0, 0, 0, 0) }
}

/// Registers a callback of `kind`.
pub fn register_callback(kind: u16, address: u64) -> i64 {
    let reg: [u64; 2] = [kind as u64, address];
    // SAFETY: struct callback_register { u16 type; u16 flags; u32 pad; u64 address } on this
    // stack (flags 0).
    unsafe {
        call(
            nr::CALLBACK_OP,
            CALLBACKOP_REGISTER,
            reg.as_ptr() as u64,
            0,
            0,
            0,
        )
    }
}
