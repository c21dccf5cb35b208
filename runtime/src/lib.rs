//! # pvpatch-runtime
//!
//! The boot-time patcher, `no_std`: it finds the kernel's site table, validates all of it, and
//! (as the following issues add) detects the backend and rewrites every site for it.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

pub mod locate;
