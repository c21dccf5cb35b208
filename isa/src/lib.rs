//! # pvpatch-isa
//!
//! The x86-64 rules every side of pvpatch shares, `no_std`: the post-link tool classifies and
//! checks what it sweeps with them, the boot-time runtime checks sites and what it writes with
//! them, and the ROM builder and validator check sequences with them.
//!
//! * [`classify`]: which op of the catalogue a decoded instruction is, and its operand;
//! * [`encode`]: the native instruction of a site record, the recommended NOPs, [`encode::Seq`];
//! * [`check`]: whether bytes hold what a site record says (or a call, a trap, NOPs);
//! * [`template`]: inline templates and the substitution of a site's operands into them;
//! * [`sequence`]: what a backend's sequence may contain and change;
//! * [`asm`]: the one small assembler (the native encoder and the Xen/Hyper-V entry points).
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod asm;
pub mod check;
pub mod classify;
pub mod encode;
mod names;
pub mod sequence;
pub mod template;

pub use iced_x86;
