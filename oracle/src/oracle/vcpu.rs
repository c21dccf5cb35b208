//! The virtual CPU the oracle runs code against: what the privileged instructions read and
//! what they do, recorded as an effect trace.
//!
//! Unicorn executes ordinary instructions; every sensitive one is stopped before it runs and
//! carried out here instead (the emulator gets `wrmsr`, `mov crN` and friends wrong or cannot
//! hook them, see `shared/notes/crates.md`). Reads are pure functions of the model's state and a
//! per-case seed, so both runs of a case see the same machine; writes and anything a hypervisor
//! could observe become [`Effect`]s, in order.

use std::collections::BTreeMap;

/// Something the virtual CPU did that a hypervisor (or the rest of the machine) can observe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effect {
    /// RFLAGS.IF changed to this value.
    If(bool),
    /// A control register was written (`clts` is a write of CR0 without TS).
    WriteCr {
        /// Which.
        cr: u8,
        /// The value.
        value: u64,
    },
    /// A debug register was written.
    WriteDr {
        /// Which.
        dr: u8,
        /// The value.
        value: u64,
    },
    /// An MSR was written.
    WriteMsr {
        /// Which.
        msr: u32,
        /// The value.
        value: u64,
    },
    /// A port was read.
    In {
        /// Port.
        port: u16,
        /// Bytes.
        width: u8,
    },
    /// A port was written.
    Out {
        /// Port.
        port: u16,
        /// Bytes.
        width: u8,
        /// The value (only the low `width` bytes).
        value: u32,
    },
    /// The TLB entries for the page of this address were invalidated.
    Invlpg(u64),
    /// Caches were written back and invalidated (`discard`: without writing back).
    Caches {
        /// `invd` rather than `wbinvd`.
        discard: bool,
    },
    /// The vCPU halted, with interrupts enabled or not.
    Halt {
        /// Whether an interrupt can end the halt.
        interrupts: bool,
    },
    /// GS.base and KERNEL_GS_BASE were exchanged.
    Swapgs,
    /// An extended control register was written (`xsetbv`).
    Xsetbv {
        /// Which (ecx).
        xcr: u32,
        /// The value (edx:eax).
        value: u64,
    },
    /// A descriptor-table register was loaded (`lgdt`, `lidt`).
    LoadTable {
        /// 0: GDTR, 1: IDTR.
        which: u8,
        /// The limit.
        limit: u16,
        /// The base.
        base: u64,
    },
    /// A segment selector register was loaded (`lldt`, `ltr`).
    LoadSelector {
        /// 0: LDTR, 1: TR.
        which: u8,
        /// The selector.
        selector: u16,
    },
    /// TLB entries were invalidated by process-context identifier (`invpcid`).
    Invpcid {
        /// The invalidation type (the register operand).
        kind: u64,
        /// The descriptor the memory operand names: the PCID, then the linear address.
        desc: [u64; 2],
    },
    /// A fault was raised with this vector; execution stopped.
    Fault(u8),
    /// A write to the backend's private page (Xen's `vcpu_info`, Hyper-V's input page): what
    /// it means is the backend's abstraction function's business.
    Store {
        /// Address.
        addr: u64,
        /// Bytes.
        size: u8,
        /// Value.
        value: u64,
    },
    /// A call into the hypercall page.
    Hypercall {
        /// Xen: the hypercall number (the entry's offset over 32); Hyper-V: the control word.
        nr: u64,
        /// Xen: rdi, rsi, rdx, r10, r8; Hyper-V: rcx, rdx, r8, 0, 0.
        args: [u64; 5],
        /// The first 32 bytes the first pointer argument points to (Xen: rdi; Hyper-V: the
        /// input page at rdx), as the hypervisor reads them.
        mem: [u64; 4],
    },
}

/// The kinds of [`Effect`]: what the oracle compares effect by effect (and what a test may
/// switch off, one at a time, to show the catalogue of wrong rewrites needs each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EffectKind {
    /// [`Effect::If`].
    If,
    /// [`Effect::WriteCr`].
    WriteCr,
    /// [`Effect::WriteDr`].
    WriteDr,
    /// [`Effect::WriteMsr`].
    WriteMsr,
    /// [`Effect::In`].
    In,
    /// [`Effect::Out`].
    Out,
    /// [`Effect::Invlpg`].
    Invlpg,
    /// [`Effect::Caches`].
    Caches,
    /// [`Effect::Halt`].
    Halt,
    /// [`Effect::Swapgs`].
    Swapgs,
    /// [`Effect::Xsetbv`].
    Xsetbv,
    /// [`Effect::LoadTable`].
    LoadTable,
    /// [`Effect::LoadSelector`].
    LoadSelector,
    /// [`Effect::Invpcid`].
    Invpcid,
    /// [`Effect::Fault`].
    Fault,
    /// [`Effect::Store`].
    Store,
    /// [`Effect::Hypercall`].
    Hypercall,
}

impl EffectKind {
    /// Every kind.
    pub const ALL: [EffectKind; 17] = [
        EffectKind::If,
        EffectKind::WriteCr,
        EffectKind::WriteDr,
        EffectKind::WriteMsr,
        EffectKind::In,
        EffectKind::Out,
        EffectKind::Invlpg,
        EffectKind::Caches,
        EffectKind::Halt,
        EffectKind::Swapgs,
        EffectKind::Xsetbv,
        EffectKind::LoadTable,
        EffectKind::LoadSelector,
        EffectKind::Invpcid,
        EffectKind::Fault,
        EffectKind::Store,
        EffectKind::Hypercall,
    ];
}

impl Effect {
    /// Its kind.
    pub fn kind(&self) -> EffectKind {
        match self {
            Effect::If(_) => EffectKind::If,
            Effect::WriteCr { .. } => EffectKind::WriteCr,
            Effect::WriteDr { .. } => EffectKind::WriteDr,
            Effect::WriteMsr { .. } => EffectKind::WriteMsr,
            Effect::In { .. } => EffectKind::In,
            Effect::Out { .. } => EffectKind::Out,
            Effect::Invlpg(_) => EffectKind::Invlpg,
            Effect::Caches { .. } => EffectKind::Caches,
            Effect::Halt { .. } => EffectKind::Halt,
            Effect::Swapgs => EffectKind::Swapgs,
            Effect::Xsetbv { .. } => EffectKind::Xsetbv,
            Effect::LoadTable { .. } => EffectKind::LoadTable,
            Effect::LoadSelector { .. } => EffectKind::LoadSelector,
            Effect::Invpcid { .. } => EffectKind::Invpcid,
            Effect::Fault(_) => EffectKind::Fault,
            Effect::Store { .. } => EffectKind::Store,
            Effect::Hypercall { .. } => EffectKind::Hypercall,
        }
    }
}

/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_TSC_AUX.
pub const MSR_TSC_AUX: u32 = 0xc000_0103;
/// IA32_GS_BASE.
pub const MSR_GS_BASE: u32 = 0xc000_0101;

/// The model's state: control and debug registers, MSRs, the TSC, and the seed its reads of
/// ports, CPUID and unset MSRs are derived from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vcpu {
    /// CR0, CR2, CR3, CR4, CR8 (by number; others unused).
    pub cr: [u64; 9],
    /// DR0-DR7.
    pub dr: [u64; 8],
    /// MSRs written so far (reads of others are derived from the seed).
    pub msrs: BTreeMap<u32, u64>,
    /// The time stamp counter; each read advances it.
    pub tsc: u64,
    /// Reads of each port so far (a port's value depends on how often it was read).
    pub port_reads: BTreeMap<u16, u32>,
    /// Values `rdrand` and `rdseed` gave so far.
    pub draws: u64,
    /// The seed of every derived value.
    pub seed: u64,
    /// The trace.
    pub trace: Vec<Effect>,
    /// IF as last seen.
    pub interrupts: bool,
    /// GDTR and IDTR: (limit, base).
    pub tables: [(u16, u64); 2],
    /// LDTR and TR selectors.
    pub selectors: [u16; 2],
}

/// A mixing function (splitmix64's finaliser).
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Vcpu {
    /// A machine derived from `seed`, with IF as given.
    pub fn new(seed: u64, interrupts: bool) -> Self {
        let r = |i: u64| mix(seed ^ mix(i));
        Vcpu {
            // PE, PG and the usual bits on; CD, NW and TS derived.
            cr: [
                0x8005_0033 | (r(0) & 0x6000_0008),
                0,
                r(2),
                r(3) & 0x00ff_f000,
                0x0000_06f0 | (r(4) & 0x3_0000),
                0,
                0,
                0,
                r(8) & 0xf,
            ],
            dr: [r(10), r(11), r(12), r(13), 0, 0, 0xffff_0ff0, 0x400],
            msrs: BTreeMap::new(),
            tsc: r(20) >> 8,
            port_reads: BTreeMap::new(),
            draws: 0,
            seed,
            trace: Vec::new(),
            interrupts,
            tables: [(r(30) as u16, r(31)), (r(32) as u16, r(33))],
            selectors: [r(34) as u16 & 0xfff8, r(35) as u16 & 0xfff8],
        }
    }

    /// Records `e`.
    pub fn record(&mut self, e: Effect) {
        self.trace.push(e);
    }

    /// Notes RFLAGS as seen now: records an IF transition.
    pub fn see_flags(&mut self, rflags: u64) {
        let i = rflags & (1 << 9) != 0;
        if i != self.interrupts {
            self.interrupts = i;
            self.record(Effect::If(i));
        }
    }

    /// `in`: the value is derived from the port and how many times it was read.
    pub fn port_in(&mut self, port: u16, width: u8) -> u32 {
        let n = self.port_reads.entry(port).or_default();
        *n += 1;
        let v = mix(self.seed ^ ((port as u64) << 32) ^ *n as u64) as u32;
        self.record(Effect::In { port, width });
        match width {
            1 => v & 0xff,
            2 => v & 0xffff,
            _ => v,
        }
    }

    /// `out`.
    pub fn port_out(&mut self, port: u16, width: u8, value: u32) {
        let value = match width {
            1 => value & 0xff,
            2 => value & 0xffff,
            _ => value,
        };
        self.record(Effect::Out { port, width, value });
    }

    /// `rdmsr`: what was written, else a value derived from the MSR's number.
    pub fn rdmsr(&self, msr: u32) -> u64 {
        self.msrs
            .get(&msr)
            .copied()
            .unwrap_or_else(|| mix(self.seed ^ 0x4d53_5200_0000_0000 ^ msr as u64))
    }

    /// `wrmsr`.
    pub fn wrmsr(&mut self, msr: u32, value: u64) {
        self.msrs.insert(msr, value);
        self.record(Effect::WriteMsr { msr, value });
    }

    /// `mov reg, crN`.
    pub fn read_cr(&self, n: u8) -> u64 {
        self.cr[n as usize]
    }

    /// `mov crN, reg` (CR8 keeps the low four bits: the TPR).
    pub fn write_cr(&mut self, n: u8, value: u64) {
        let value = if n == 8 { value & 0xf } else { value };
        self.cr[n as usize] = value;
        self.record(Effect::WriteCr { cr: n, value });
    }

    /// `mov reg, drN` (DR4 and DR5 alias DR6 and DR7, as with CR4.DE clear).
    pub fn read_dr(&self, n: u8) -> u64 {
        self.dr[Self::dr_index(n)]
    }

    /// `mov drN, reg`.
    pub fn write_dr(&mut self, n: u8, value: u64) {
        let i = Self::dr_index(n);
        self.dr[i] = value;
        self.record(Effect::WriteDr { dr: i as u8, value });
    }

    fn dr_index(n: u8) -> usize {
        match n {
            4 => 6,
            5 => 7,
            n => n as usize & 7,
        }
    }

    /// `cpuid`: derived from the leaf and subleaf.
    pub fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let h = mix(self.seed ^ 0x4350_5549_4400_0000 ^ ((leaf as u64) << 32) ^ sub as u64);
        let g = mix(h);
        [h as u32, (h >> 32) as u32, g as u32, (g >> 32) as u32]
    }

    /// `rdtsc`: each read is later than the last.
    pub fn rdtsc(&mut self) -> u64 {
        self.tsc = self.tsc.wrapping_add(1000);
        self.tsc
    }

    /// `rdrand` and `rdseed`: a sequence derived from the seed, the same in every run from one
    /// state (the hardware's values differ from run to run, and would make a native run and
    /// its rewrite differ where both did the same).
    pub fn random(&mut self) -> u64 {
        self.draws += 1;
        mix(self.seed ^ 0x5244_5241_4e44_0000 ^ self.draws)
    }

    /// `hlt`. A halt with interrupts enabled means IF is set at that point, whatever path set
    /// it (a trap handler resumes with IF only after the halt).
    pub fn halt(&mut self, interrupts: bool) {
        if interrupts && !self.interrupts {
            self.interrupts = true;
            self.record(Effect::If(true));
        }
        self.record(Effect::Halt { interrupts });
    }

    /// `rdpmc`: performance counter `counter`, 48 bits derived from the seed.
    pub fn rdpmc(&self, counter: u32) -> u64 {
        mix(self.seed ^ 0x504d_4300_0000_0000 ^ counter as u64) & 0xffff_ffff_ffff
    }

    /// `swapgs`.
    pub fn swapgs(&mut self) {
        let gs = self.rdmsr(MSR_GS_BASE);
        let k = self.rdmsr(MSR_KERNEL_GS_BASE);
        self.msrs.insert(MSR_GS_BASE, k);
        self.msrs.insert(MSR_KERNEL_GS_BASE, gs);
        self.record(Effect::Swapgs);
    }

    /// `clts`.
    pub fn clts(&mut self) {
        let v = self.cr[0] & !8;
        self.write_cr(0, v);
    }
}
