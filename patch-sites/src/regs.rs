//! General-purpose registers and register/flag sets, as the ABI encodes them.

/// A 64-bit general-purpose register, numbered as the x86-64 encoding numbers it
/// (ModRM.reg/rm with REX.R/B): `rax` = 0 ... `r15` = 15.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// Every register, in encoding order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    /// The register with encoding number `n`, if `n < 16`.
    pub const fn from_number(n: u8) -> Option<Gpr> {
        if n < 16 {
            Some(Gpr::ALL[n as usize])
        } else {
            None
        }
    }

    /// The encoding number (0..=15).
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// The 64-bit name, as reports print it.
    pub const fn name(self) -> &'static str {
        const NAMES: [&str; 16] = [
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ];
        NAMES[self as usize]
    }

    /// The register named `name` (64-bit names only).
    pub fn from_name(name: &str) -> Option<Gpr> {
        Gpr::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// A set of general-purpose registers and the arithmetic status flags.
///
/// Bits 0..=15 are the GPRs by encoding number, bit 16 is the six status flags
/// (CF, PF, AF, ZF, SF, OF) taken together. Bits 17..=31 are reserved and must be zero
/// in every table and ROM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegSet(pub u32);

impl RegSet {
    /// The empty set.
    pub const EMPTY: RegSet = RegSet(0);
    /// The arithmetic status flags (CF, PF, AF, ZF, SF, OF).
    pub const FLAGS: RegSet = RegSet(1 << 16);
    /// Every bit the ABI defines.
    pub const VALID: RegSet = RegSet(0x1_ffff);
    /// The registers the System V ABI lets a call clobber (rax, rcx, rdx, rsi, rdi, r8-r11),
    /// and the flags.
    pub const SYSV_CALLER_SAVED: RegSet = RegSet::of(&[
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
    ])
    .union(RegSet::FLAGS);

    /// The set holding exactly `regs`.
    pub const fn of(regs: &[Gpr]) -> RegSet {
        let mut bits = 0u32;
        let mut i = 0;
        while i < regs.len() {
            bits |= 1 << regs[i] as u32;
            i += 1;
        }
        RegSet(bits)
    }

    /// The set holding one register.
    pub const fn reg(r: Gpr) -> RegSet {
        RegSet(1 << r as u32)
    }

    /// Union.
    pub const fn union(self, other: RegSet) -> RegSet {
        RegSet(self.0 | other.0)
    }

    /// Difference (`self` without `other`).
    pub const fn minus(self, other: RegSet) -> RegSet {
        RegSet(self.0 & !other.0)
    }

    /// Whether every member of `other` is in `self`.
    pub const fn contains(self, other: RegSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the register is a member.
    pub const fn has(self, r: Gpr) -> bool {
        self.0 & (1 << r as u32) != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether only bits the ABI defines are set.
    pub const fn is_valid(self) -> bool {
        self.0 & !RegSet::VALID.0 == 0
    }

    /// The registers in the set, in encoding order.
    pub fn gprs(self) -> impl Iterator<Item = Gpr> {
        Gpr::ALL.into_iter().filter(move |r| self.has(*r))
    }
}

impl core::fmt::Display for RegSet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for r in self.gprs() {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(r.name())?;
            first = false;
        }
        if self.contains(RegSet::FLAGS) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str("flags")?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}
