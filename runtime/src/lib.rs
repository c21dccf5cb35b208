//! # pvpatch-runtime
//!
//! The boot-time patcher, `no_std`: linked into a kernel (or a boot shim in front of one), it
//! finds the kernel's site table, detects the backend, validates the whole table (and any
//! backend ROM), plans every site for the backend, writes the plan through a
//! [`apply::TextPoke`] and verifies what it wrote. The x86 rules it applies (classification,
//! encoding, checks) are the `pvpatch-isa` crate's.
//!
//! * [`detect`]: which backend this is;
//! * [`backend`]: what each backend wants an op to become;
//! * [`romcheck`]: a published ROM, decoded and checked completely before use;
//! * [`locate`]: finding the table in the running kernel's memory;
//! * [`plan`]: every site's bytes checked against its record, then planned for the backend;
//! * [`apply`]: a plan written through a [`apply::TextPoke`] and read back, all or nothing;
//! * [`stats`]: what patching did, counted in the vocabulary of [`patch_sites::Outcome`];
//! * [`trap`]: emulating the ops of sites rewritten to a trap (`ud2` or `int3`);
//! * [`thunks`]: the out-of-line test backend (every site a call to its native instruction);
//! * [`pv`]: the entry points generated for Xen PV and Hyper-V.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod apply;
pub mod arena;
pub mod backend;
pub mod detect;
pub mod locate;
pub mod plan;
pub mod pv;
pub mod romcheck;
pub mod stats;
pub mod thunks;
pub mod trap;
