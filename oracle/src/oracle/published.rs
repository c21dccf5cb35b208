//! The hypervisor interfaces the oracle's abstraction functions interpret, transcribed from their
//! published definitions, facts only, independently of the runtime (whose own constants
//! `tests/published.rs` compares with these, naming every difference):
//!
//! * Xen: `xen/include/public/xen.h` (hypercall numbers, `mmuext_op` commands, `DOMID_SELF`,
//!   `struct vcpu_info`'s first two bytes), `sched.h` (`SCHEDOP_*`),
//!   `arch-x86/xen-x86_64.h` (the hypercall calling convention: rdi, rsi, rdx, r10, r8), and the
//!   hypercall page's layout (32 bytes an entry, entry `n` for hypercall `n`);
//! * Hyper-V: the Hypervisor Top-Level Functional Specification (hypercall codes, the TLB-flush
//!   flags, the control word's rep-count field, the synthetic MSRs and the x2APIC registers
//!   they alias, and the hypercall MSRs).

/// Xen's public interface.
pub mod xen {
    /// `__HYPERVISOR_xen_version` (xen.h).
    pub const HYPERVISOR_XEN_VERSION: u64 = 17;
    /// `__HYPERVISOR_mmuext_op` (xen.h).
    pub const HYPERVISOR_MMUEXT_OP: u64 = 26;
    /// `__HYPERVISOR_sched_op` (xen.h).
    pub const HYPERVISOR_SCHED_OP: u64 = 29;
    /// `SCHEDOP_yield` (sched.h).
    pub const SCHEDOP_YIELD: u64 = 0;
    /// `SCHEDOP_block` (sched.h).
    pub const SCHEDOP_BLOCK: u64 = 1;
    /// `MMUEXT_NEW_BASEPTR` (xen.h).
    pub const MMUEXT_NEW_BASEPTR: u32 = 5;
    /// `MMUEXT_TLB_FLUSH_LOCAL` (xen.h).
    pub const MMUEXT_TLB_FLUSH_LOCAL: u32 = 6;
    /// `MMUEXT_INVLPG_LOCAL` (xen.h).
    pub const MMUEXT_INVLPG_LOCAL: u32 = 7;
    /// `DOMID_SELF` (xen.h).
    pub const DOMID_SELF: u32 = 0x7ff0;
    /// Bytes of one entry of the hypercall page (entry `n` at `32 * n`).
    pub const HYPERCALL_STRIDE: u64 = 32;
    /// `struct vcpu_info`: `uint8_t evtchn_upcall_pending` at offset 0.
    pub const VCPU_INFO_PENDING: u64 = 0;
    /// `struct vcpu_info`: `uint8_t evtchn_upcall_mask` at offset 1.
    pub const VCPU_INFO_MASK: u64 = 1;
    /// `struct mmuext_op`: `unsigned int cmd` at 0, then an 8-byte union `arg1` (a frame number
    /// or a linear address) at 8.
    pub const MMUEXT_ARG1: usize = 8;
}

/// Hyper-V's Top-Level Functional Specification.
pub mod hyperv {
    /// `HvCallFlushVirtualAddressSpace`.
    pub const CALL_FLUSH_VIRTUAL_ADDRESS_SPACE: u64 = 0x0002;
    /// `HvCallFlushVirtualAddressSpaceList` (a rep hypercall).
    pub const CALL_FLUSH_VIRTUAL_ADDRESS_LIST: u64 = 0x0003;
    /// `HV_FLUSH_ALL_PROCESSORS`.
    pub const FLUSH_ALL_PROCESSORS: u64 = 1 << 0;
    /// `HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES`.
    pub const FLUSH_ALL_VIRTUAL_ADDRESS_SPACES: u64 = 1 << 1;
    /// `HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY`.
    pub const FLUSH_NON_GLOBAL_MAPPINGS_ONLY: u64 = 1 << 2;
    /// The hypercall control word: the rep count in bits 43:32.
    pub const CONTROL_REP_COUNT_SHIFT: u32 = 32;
    /// `HV_X64_MSR_GUEST_OS_ID`.
    pub const MSR_GUEST_OS_ID: u32 = 0x4000_0000;
    /// `HV_X64_MSR_HYPERCALL` (bit 0 enables the page; bits 63:12 are its frame).
    pub const MSR_HYPERCALL: u32 = 0x4000_0001;
    /// `HV_X64_MSR_EOI`, which aliases the x2APIC EOI register (MSR 0x80b).
    pub const MSR_EOI: (u32, u32) = (0x4000_0070, 0x80b);
    /// `HV_X64_MSR_ICR`, which aliases the x2APIC ICR (MSR 0x830).
    pub const MSR_ICR: (u32, u32) = (0x4000_0071, 0x830);
    /// `HV_X64_MSR_TPR`, which aliases the x2APIC TPR (MSR 0x808).
    pub const MSR_TPR: (u32, u32) = (0x4000_0072, 0x808);
}
