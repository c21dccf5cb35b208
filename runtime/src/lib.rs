//! # pvpatch-runtime
//!
//! The boot-time patcher, `no_std`: linked into a kernel, it finds the kernel's site table,
//! detects the backend, validates the whole table (and any backend ROM), plans every site for
//! the backend, writes the plan through a [`plan::TextPoke`] and verifies what it wrote.
//!
//! * [`detect`]: which backend this is;
//! * [`backend`]: what each backend wants an op to become;
//! * [`romcheck`]: a published ROM, decoded and checked completely before use;
//! * [`plan`]: validate, plan, apply (all or nothing), with [`stats`];
//! * [`trap`]: emulating the ops of sites rewritten to a trap (`ud2` or `int3`);
//! * [`classify`], [`check`], [`encode`], [`template`]: what an instruction is, whether a site
//!   holds what its record says, native encodings and NOPs, operand substitution;
//! * [`locate`]: finding the table in the running kernel's memory;
//! * [`pv`]: the entry points generated for Xen PV and Hyper-V.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod backend;
pub mod check;
pub mod classify;
pub mod detect;
pub mod encode;
pub mod locate;
pub mod plan;
pub mod pv;
pub mod romcheck;
pub mod stats;
pub mod template;
pub mod trap;
