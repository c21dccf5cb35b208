//! # pvpatch
//!
//! The post-link tool's library. Today: the op catalogue as a report; scanning and annotating
//! kernel images follow.

pub mod catalogue;
