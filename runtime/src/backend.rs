//! What each backend wants a site to become.
//!
//! * `native`, `tcg`: the native instruction (a site in the indirect-call form gets the native
//!   instruction inline, which saves the call);
//! * `kvm`: port-0x80 delays become nothing when KVM says they are unnecessary
//!   (`KVM_FEATURE_NOP_IO_DELAY`), as Linux's KVM guest does; everything else is native: the
//!   other exits an unmodified kernel takes have no replacement in KVM's interface;
//! * `vmware`: port-0x80 delays become nothing, as Linux's VMware guest does;
//! * `rom`: whatever the published ROM says, once it has been validated completely;
//! * `xen`, `hyperv`: calls to the entry points [`crate::pv`] generated for the kernel's
//!   `vcpu_info`/hypercall page (Xen) or hypercall page and input page (Hyper-V); a port-0x80
//!   delay is nothing under Xen. Without generated entry points every site stays native (and the
//!   report says so).

use patch_sites::rom::{Rom, RomAction};
use patch_sites::table::Site;
use patch_sites::{Op, Outcome, RegSet};
use pvpatch_isa::template::Template;

use crate::detect::{BackendKind, Detected, KVM_FEATURE_NOP_IO_DELAY};
use crate::pv::PvCode;

/// What a backend wants for one site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice<'a> {
    /// The native instruction.
    Native,
    /// Nothing: the site becomes NOPs.
    Nothing,
    /// An inline template.
    Inline(Template<'a>),
    /// `call rel32` to an entry point that clobbers `clobbers` beyond the op's outputs.
    Call {
        /// The entry point.
        target: u64,
        /// What it clobbers beyond the op's outputs.
        clobbers: RegSet,
    },
    /// A trap (`ud2` where two bytes fit, else `int3`) whose op the runtime emulates.
    Trap,
}

impl Choice<'_> {
    /// What a site becomes when this choice is used.
    pub fn outcome(&self) -> Outcome {
        match self {
            Choice::Native => Outcome::Native,
            Choice::Nothing => Outcome::Nothing,
            Choice::Inline(_) => Outcome::Inline,
            Choice::Call { .. } => Outcome::Call,
            Choice::Trap => Outcome::Trap,
        }
    }
}

/// A validated ROM and where its bytes are, executable, in the kernel's address space.
#[derive(Clone, Copy, Debug)]
pub struct LoadedRom<'a> {
    /// The ROM.
    pub rom: Rom<'a>,
    /// The address of its first byte.
    pub base: u64,
}

/// The backend patching will use.
#[derive(Clone, Copy, Debug)]
pub struct Backend<'a> {
    /// What detection found.
    pub detected: Detected,
    /// The ROM, when the backend is `rom`.
    pub rom: Option<LoadedRom<'a>>,
    /// The generated entry points, when the backend is `xen` or `hyperv`.
    pub pv: Option<&'a PvCode>,
    /// The generated thunks, when the backend is `outofline`.
    pub thunks: Option<&'a crate::thunks::Thunks>,
}

impl<'a> Backend<'a> {
    /// The backend's kind.
    pub fn kind(&self) -> BackendKind {
        self.detected.kind
    }

    /// What the backend wants for `site` (of the known op `op`).
    pub fn choose(&self, site: &Site, op: Op) -> Choice<'a> {
        match self.detected.kind {
            BackendKind::Kvm if op == Op::IoDelay => {
                if self.detected.features & KVM_FEATURE_NOP_IO_DELAY != 0 {
                    Choice::Nothing
                } else {
                    Choice::Native
                }
            }
            BackendKind::Vmware | BackendKind::Xen if op == Op::IoDelay => Choice::Nothing,
            BackendKind::Xen | BackendKind::HyperV => {
                match self.pv.and_then(|p| p.entry(op, site.operand, site.width)) {
                    Some(target) => Choice::Call {
                        target,
                        clobbers: RegSet::EMPTY,
                    },
                    None => Choice::Native,
                }
            }
            BackendKind::OutOfLine => match self.thunks.and_then(|t| t.entry(site)) {
                Some(target) => Choice::Call {
                    target,
                    clobbers: RegSet::EMPTY,
                },
                None => Choice::Native,
            },
            BackendKind::Rom => match self.rom.and_then(|r| r.rom.entry(op).map(|e| (r, e))) {
                Some((_, e)) => match e.action {
                    RomAction::Nothing => Choice::Nothing,
                    RomAction::Native => Choice::Native,
                    RomAction::Inline { template, slots } => Choice::Inline(Template {
                        bytes: template,
                        slots,
                        clobbers: e.clobbers,
                    }),
                    RomAction::Call { code_off, .. } => match self.rom {
                        Some(r) => Choice::Call {
                            target: r.base + code_off as u64,
                            clobbers: e.clobbers,
                        },
                        None => Choice::Native,
                    },
                },
                None => Choice::Native,
            },
            _ => Choice::Native,
        }
    }

    /// Whether every detour of the table is installed, even one whose sites all stay native
    /// (then they run moved, in the stub): the out-of-line test backend's promise that every
    /// rewritable site runs somewhere else.
    pub fn takes_every_detour(&self) -> bool {
        self.detected.kind == BackendKind::OutOfLine
    }

    /// Whether a site of `op` must not stay native on this backend (see
    /// [`PvCode::must_rewrite`]).
    pub fn must_rewrite(&self, op: Op) -> bool {
        matches!(self.detected.kind, BackendKind::Xen)
            && self.pv.is_some_and(|p| p.must_rewrite(op))
    }

    /// Why nothing beyond native is available, for reports.
    pub fn note(&self) -> Option<&'static str> {
        match self.detected.kind {
            BackendKind::Xen | BackendKind::HyperV if self.pv.is_none() => Some(
                "no entry points generated (the kernel provided no layout): every site stays native",
            ),
            BackendKind::Unknown => Some("unknown hypervisor: every site stays native"),
            BackendKind::OutOfLine if self.thunks.is_none() => {
                Some("no thunks generated (no arena): every site stays native")
            }
            _ => None,
        }
    }
}
