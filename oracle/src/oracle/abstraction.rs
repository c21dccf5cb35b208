//! Abstraction functions: from what a backend's rewrite concretely does to the virtual-CPU
//! state and effect trace it stands for, and how the backend's interface reads an effect.
//!
//! Each backend's function is written from its published interface:
//!
//! * `native`, `tcg`: the identity: their rewrites are native instructions;
//! * `kvm` with `KVM_FEATURE_NOP_IO_DELAY`, `vmware`: the identity, except that the port-0x80
//!   write of an `io_delay` is void (Linux's KVM and VMware guests drop it too);
//! * `rom`: the identity, except that an op whose ROM entry is `nothing` is declared to have
//!   no effect on this hypervisor: that is what publishing such an entry means;
//! * **Xen PV**: `vcpu_info.evtchn_upcall_mask` *is* IF (inverted): a store to it is an IF
//!   transition, and the final RFLAGS.IF is read from it; `mmuext_op` `MMUEXT_NEW_BASEPTR` *is*
//!   a CR3 write (of the frame's address: Xen PV has no PCID, so only a CR3 write's base is
//!   part of its interface) and `MMUEXT_INVLPG_LOCAL` an `invlpg`; `sched_op(SCHEDOP_block)`
//!   *is* enabling interrupts and halting; the `xen_version` call that forces pending events is
//!   no effect of its own; port-0x80 delays are void;
//! * **Hyper-V**: `HvCallFlushVirtualAddressSpaceList` of one GVA *is* `invlpg` of it,
//!   `HvCallFlushVirtualAddressSpace` of an address space's non-global mappings *is* the CR3
//!   write that reloads it; the synthetic EOI, ICR and TPR MSRs *are* the x2APIC ones.

use super::published::{hyperv, xen};
use patch_sites::Op;
use patch_sites::rom::RomAction;
use pvpatch_runtime::backend::Backend;
use pvpatch_runtime::detect::{BackendKind, KVM_FEATURE_NOP_IO_DELAY};

use super::engine::{Hypervisor, PRIVATE, Run, State};
use super::vcpu::{Effect, mix};

/// A backend's abstraction function.
pub trait Abstraction: std::fmt::Debug {
    /// The backend's name.
    fn name(&self) -> &'static str;
    /// `e`, an effect of a run of a site of `op`, as the backend's interface reads it: `None`
    /// if the backend declares it void. Applied to both runs.
    fn canonical(&self, op: Op, e: &Effect) -> Option<Effect> {
        let _ = op;
        Some(*e)
    }
    /// The virtual-CPU trace a run of the rewrite stands for, from `initial`.
    fn trace(&self, run: &Run, initial: &State) -> Vec<Effect> {
        let _ = initial;
        run.vcpu.trace.clone()
    }
    /// The RFLAGS a run of the rewrite stands for.
    fn rflags(&self, run: &Run) -> u64 {
        run.rflags
    }
    /// The MSR an MSR of the rewrite's run stands for.
    fn msr(&self, msr: u32) -> u32 {
        msr
    }
    /// Whether the virtual CPU's control and debug registers are compared (they are not where
    /// the backend's interface has its own, and the trace says what was written).
    fn compares_control_registers(&self) -> bool {
        true
    }
    /// Whether the private page belongs to the backend (and is not compared).
    fn owns_private_page(&self) -> bool {
        false
    }
    /// The state both runs start from, where the backend's structures must agree with the
    /// machine state (Xen's mask with IF); `None` to use the state as it is.
    fn prepare(&self, state: &State) -> Option<State> {
        let _ = state;
        None
    }
    /// Who answers calls into the hypercall page during the rewrite's run.
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::None
    }
}

/// `native`, `tcg`, and `kvm` without `KVM_FEATURE_NOP_IO_DELAY`.
#[derive(Clone, Copy, Debug)]
pub struct Identity(pub &'static str);

impl Abstraction for Identity {
    fn name(&self) -> &'static str {
        self.0
    }
}

/// Bare hardware, as the KVM executor sees it: RFLAGS.RF (set by the CPU on returns from
/// some exceptions, never by the instruction) is not part of the result.
#[derive(Clone, Copy, Debug)]
pub struct RealCpu;

impl Abstraction for RealCpu {
    fn name(&self) -> &'static str {
        "real cpu"
    }
    fn rflags(&self, run: &Run) -> u64 {
        run.rflags & !(1 << 16)
    }
}

fn io_delay_void(op: Op, e: &Effect) -> Option<Effect> {
    (op != Op::IoDelay || !matches!(e, Effect::Out { port: 0x80, .. })).then_some(*e)
}

/// `kvm` with `KVM_FEATURE_NOP_IO_DELAY`, and `vmware`: port-0x80 delays are void.
#[derive(Clone, Copy, Debug)]
pub struct NoIoDelay(pub &'static str);

impl Abstraction for NoIoDelay {
    fn name(&self) -> &'static str {
        self.0
    }
    fn canonical(&self, op: Op, e: &Effect) -> Option<Effect> {
        io_delay_void(op, e)
    }
}

/// `rom`: the ops whose entry is `nothing` are void.
#[derive(Clone, Debug)]
pub struct RomDeclared {
    void: Vec<Op>,
}

impl Abstraction for RomDeclared {
    fn name(&self) -> &'static str {
        "rom"
    }
    fn canonical(&self, op: Op, e: &Effect) -> Option<Effect> {
        (!self.void.contains(&op)).then_some(*e)
    }
}

/// `vcpu_info`'s `evtchn_upcall_pending` and `evtchn_upcall_mask` in the private page.
/// RFLAGS.IF.
const IF: u64 = 1 << 9;
const XEN_PENDING: u64 = PRIVATE + xen::VCPU_INFO_PENDING;
const XEN_MASK: u64 = PRIVATE + xen::VCPU_INFO_MASK;

/// Xen PV.
#[derive(Clone, Copy, Debug)]
pub struct XenPv;

impl Abstraction for XenPv {
    fn name(&self) -> &'static str {
        "xen"
    }
    fn canonical(&self, op: Op, e: &Effect) -> Option<Effect> {
        match *e {
            Effect::WriteCr { cr: 3, value } => Some(Effect::WriteCr {
                cr: 3,
                value: value & 0x000f_ffff_ffff_f000,
            }),
            _ => io_delay_void(op, e),
        }
    }
    fn trace(&self, run: &Run, initial: &State) -> Vec<Effect> {
        use xen::*;
        let mut interrupts = initial.private[1] == 0;
        let mut out = Vec::new();
        let mut set_if = |out: &mut Vec<Effect>, on: bool| {
            if on != interrupts {
                interrupts = on;
                out.push(Effect::If(on));
            }
        };
        for e in &run.vcpu.trace {
            match *e {
                // The real IF of a PV guest is not its IF.
                Effect::If(_) => {}
                Effect::Store {
                    addr: XEN_MASK,
                    value,
                    ..
                } => set_if(&mut out, value & 0xff == 0),
                Effect::Store { .. } => {}
                Effect::Hypercall { nr, mem, .. } if nr == HYPERVISOR_MMUEXT_OP => {
                    match mem[0] as u32 {
                        MMUEXT_NEW_BASEPTR => out.push(Effect::WriteCr {
                            cr: 3,
                            value: mem[1] << 12,
                        }),
                        MMUEXT_INVLPG_LOCAL => out.push(Effect::Invlpg(mem[1])),
                        _ => out.push(*e),
                    }
                }
                Effect::Hypercall { nr, args, .. }
                    if nr == HYPERVISOR_SCHED_OP && args[0] == SCHEDOP_BLOCK =>
                {
                    set_if(&mut out, true);
                    out.push(Effect::Halt { interrupts: true });
                }
                Effect::Hypercall { nr, .. } if nr == HYPERVISOR_XEN_VERSION => {}
                other => out.push(other),
            }
        }
        out
    }
    fn rflags(&self, run: &Run) -> u64 {
        let masked = run.private.get(1).is_none_or(|m| *m != 0);
        (run.rflags & !IF) | if masked { 0 } else { IF }
    }
    fn compares_control_registers(&self) -> bool {
        false
    }
    fn owns_private_page(&self) -> bool {
        true
    }
    fn prepare(&self, state: &State) -> Option<State> {
        let mut s = state.clone();
        s.private[(XEN_MASK - PRIVATE) as usize] = u8::from(state.rflags & IF == 0);
        s.private[(XEN_PENDING - PRIVATE) as usize] = (mix(state.seed ^ 0x70) & 1) as u8;
        Some(s)
    }
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::Xen
    }
}

/// Hyper-V.
#[derive(Clone, Copy, Debug)]
pub struct HyperV;

impl Abstraction for HyperV {
    fn name(&self) -> &'static str {
        "hyperv"
    }
    fn trace(&self, run: &Run, _: &State) -> Vec<Effect> {
        use hyperv::*;
        let mut out = Vec::new();
        for e in &run.vcpu.trace {
            match *e {
                Effect::Store { .. } => {}
                Effect::WriteMsr { msr, value } => out.push(Effect::WriteMsr {
                    msr: self.msr(msr),
                    value,
                }),
                Effect::Hypercall { nr, mem, .. } => {
                    let flags = mem[1];
                    let all = FLUSH_ALL_PROCESSORS;
                    match nr {
                        n if n
                            == CALL_FLUSH_VIRTUAL_ADDRESS_LIST | (1 << CONTROL_REP_COUNT_SHIFT)
                            && flags & (all | FLUSH_ALL_VIRTUAL_ADDRESS_SPACES)
                                == all | FLUSH_ALL_VIRTUAL_ADDRESS_SPACES =>
                        {
                            out.push(Effect::Invlpg(mem[3]))
                        }
                        CALL_FLUSH_VIRTUAL_ADDRESS_SPACE
                            if flags & FLUSH_NON_GLOBAL_MAPPINGS_ONLY != 0 =>
                        {
                            out.push(Effect::WriteCr {
                                cr: 3,
                                value: mem[0],
                            })
                        }
                        _ => out.push(*e),
                    }
                }
                other => out.push(other),
            }
        }
        out
    }
    fn msr(&self, msr: u32) -> u32 {
        [hyperv::MSR_EOI, hyperv::MSR_ICR, hyperv::MSR_TPR]
            .iter()
            .find(|(s, _)| *s == msr)
            .map_or(msr, |(_, x)| *x)
    }
    fn owns_private_page(&self) -> bool {
        true
    }
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::HyperV
    }
}

/// The abstraction function of `backend`.
pub fn of(backend: &Backend<'_>) -> Box<dyn Abstraction> {
    let d = backend.detected;
    match d.kind {
        BackendKind::Kvm if d.features & KVM_FEATURE_NOP_IO_DELAY != 0 => {
            Box::new(NoIoDelay("kvm"))
        }
        BackendKind::Vmware => Box::new(NoIoDelay("vmware")),
        BackendKind::Xen => Box::new(XenPv),
        BackendKind::HyperV => Box::new(HyperV),
        BackendKind::Rom => Box::new(RomDeclared {
            void: backend
                .rom
                .map(|r| {
                    r.rom
                        .entries()
                        .filter(|e| matches!(e.action, RomAction::Nothing))
                        .filter_map(|e| e.op())
                        .collect()
                })
                .unwrap_or_default(),
        }),
        k => Box::new(Identity(k.name())),
    }
}
