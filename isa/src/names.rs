//! Names of instructions and registers in messages. On the host they are iced-x86's own (its
//! `Debug`); in a kernel build (the boot shim, a guest) iced-x86's name tables (30 KB for the
//! mnemonics alone) are left out, and a name is iced-x86's number for it (`mnemonic 1025`, the
//! value of `iced_x86::Mnemonic::Vmcall` in the version `Cargo.lock` pins).

use core::fmt;

use iced_x86::{Mnemonic, Register};

/// Something iced-x86 names: a mnemonic or a register.
pub(crate) trait Named: Copy + fmt::Debug {
    /// What it is, before its number.
    const KIND: &'static str;
    /// iced-x86's number for it.
    fn number(self) -> u32;
}

impl Named for Mnemonic {
    const KIND: &'static str = "mnemonic";
    fn number(self) -> u32 {
        self as u32
    }
}

impl Named for Register {
    const KIND: &'static str = "register";
    fn number(self) -> u32 {
        self as u32
    }
}

/// `T`'s name, as [`fmt::Display`].
pub(crate) struct Name<T>(pub(crate) T);

impl<T: Named> fmt::Display for Name<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if cfg!(target_os = "none") {
            write!(f, "{} {}", T::KIND, self.0.number())
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}
