//! Abstraction functions: from what a backend's rewrite concretely does to the virtual-CPU
//! trace it stands for, and which effects of the native instruction the backend declares void.
//!
//! Each backend's function is written from its published interface:
//!
//! * `native`, `tcg`: the identity: their rewrites are native instructions;
//! * `kvm` with `KVM_FEATURE_NOP_IO_DELAY`, `vmware`: the identity, except that the port-0x80
//!   write of an `io_delay` is declared void (Linux's KVM and VMware guests drop it too);
//! * `rom`: the identity, except that an op whose ROM entry is `nothing` is declared to have
//!   no effect on this hypervisor: that is what publishing such an entry means.

use patch_sites::Op;
use patch_sites::rom::RomAction;
use pvpatch_runtime::backend::Backend;
use pvpatch_runtime::detect::{BackendKind, KVM_FEATURE_NOP_IO_DELAY};

use super::engine::Run;
use super::vcpu::Effect;

/// A backend's abstraction function.
pub trait Abstraction: std::fmt::Debug {
    /// The backend's name.
    fn name(&self) -> &'static str;
    /// Whether `e`, an effect of `op`'s native instruction, is one this backend declares void.
    fn declared_void(&self, op: Op, e: &Effect) -> bool;
    /// The virtual-CPU trace a run of the rewrite stands for.
    fn trace(&self, run: &Run) -> Vec<Effect> {
        run.vcpu.trace.clone()
    }
    /// Whether the private page belongs to the backend (and is not compared).
    fn owns_private_page(&self) -> bool {
        false
    }
}

/// `native`, `tcg`, and `kvm` without `KVM_FEATURE_NOP_IO_DELAY`.
#[derive(Clone, Copy, Debug)]
pub struct Identity(pub &'static str);

impl Abstraction for Identity {
    fn name(&self) -> &'static str {
        self.0
    }
    fn declared_void(&self, _: Op, _: &Effect) -> bool {
        false
    }
}

/// `kvm` with `KVM_FEATURE_NOP_IO_DELAY`, and `vmware`: port-0x80 delays are void.
#[derive(Clone, Copy, Debug)]
pub struct NoIoDelay(pub &'static str);

impl Abstraction for NoIoDelay {
    fn name(&self) -> &'static str {
        self.0
    }
    fn declared_void(&self, op: Op, e: &Effect) -> bool {
        op == Op::IoDelay && matches!(e, Effect::Out { port: 0x80, .. })
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
    fn declared_void(&self, op: Op, _: &Effect) -> bool {
        self.void.contains(&op)
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
