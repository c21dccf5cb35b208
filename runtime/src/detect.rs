//! Which backend is this? CPUID.1:ECX[31] (the hypervisor bit), the signature and maximum leaf
//! at 0x4000_0000 and the backend's feature leaf, VMware's backdoor where probing it is safe, a
//! backend ROM the hypervisor published, and a `pvpatch.backend=` override on the kernel
//! command line.
//!
//! Everything the machine is asked goes through [`Platform`], so that detection is tested on
//! the host with recorded answers.

use core::fmt;

/// The backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackendKind {
    /// No hypervisor (or the hypervisor bit is clear).
    Native,
    /// KVM (`KVMKVMKVM`).
    Kvm,
    /// QEMU's TCG (`TCGTCGTCGTCG`).
    Tcg,
    /// VMware, or any hypervisor whose VMware backdoor answers.
    Vmware,
    /// A backend ROM the hypervisor published.
    Rom,
    /// Xen (`XenVMMXenVMM`).
    Xen,
    /// Hyper-V (`Microsoft Hv`).
    HyperV,
    /// Another hypervisor: treated as native.
    Unknown,
    /// The out-of-line test backend ([`crate::thunks`]): chosen only by `pvpatch.backend=`.
    OutOfLine,
}

impl BackendKind {
    /// The name reports and `pvpatch.backend=` use.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Native => "native",
            BackendKind::Kvm => "kvm",
            BackendKind::Tcg => "tcg",
            BackendKind::Vmware => "vmware",
            BackendKind::Rom => "rom",
            BackendKind::Xen => "xen",
            BackendKind::HyperV => "hyperv",
            BackendKind::Unknown => "unknown",
            BackendKind::OutOfLine => "outofline",
        }
    }

    /// The backend named `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            BackendKind::Native,
            BackendKind::Kvm,
            BackendKind::Tcg,
            BackendKind::Vmware,
            BackendKind::Rom,
            BackendKind::Xen,
            BackendKind::HyperV,
            BackendKind::OutOfLine,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }

    /// The backend a CPUID 0x4000_0000 signature names.
    pub fn from_signature(sig: &[u8; 12]) -> Self {
        // A loop over a table: a `match` on the bytes compiles to a tree of comparisons, a
        // dozen blocks for an emulator to translate at boot.
        const SIGNATURES: [(&[u8; 12], BackendKind); 5] = [
            (b"KVMKVMKVM\0\0\0", BackendKind::Kvm),
            (b"TCGTCGTCGTCG", BackendKind::Tcg),
            (b"VMwareVMware", BackendKind::Vmware),
            (b"XenVMMXenVMM", BackendKind::Xen),
            (b"Microsoft Hv", BackendKind::HyperV),
        ];
        let mut i = 0;
        while i < SIGNATURES.len() {
            if SIGNATURES[i].0 == sig {
                return SIGNATURES[i].1;
            }
            i += 1;
        }
        BackendKind::Unknown
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// KVM feature bit (CPUID 0x4000_0001.EAX): port 0x80 delays are unnecessary.
pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
/// VMware backdoor: `in eax, dx` with eax = magic, dx = this port.
pub const VMWARE_PORT: u16 = 0x5658;
/// VMware backdoor magic (`VMXh`).
pub const VMWARE_MAGIC: u32 = 0x564d_5868;
/// VMware backdoor command: get version.
pub const VMWARE_CMD_GETVERSION: u32 = 10;
/// VMware backdoor command: TSC frequency in Hz (eax low, ebx high).
pub const VMWARE_CMD_GETHZ: u32 = 45;

/// What detection asks of the machine.
pub trait Platform {
    /// `cpuid` (leaf, subleaf) -> eax, ebx, ecx, edx.
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4];
    /// The VMware backdoor: `in eax, dx` with the magic and `cmd`; eax, ebx, ecx, edx.
    fn vmware_backdoor(&self, cmd: u32) -> [u32; 4];
    /// The kernel command line, if any.
    fn cmdline(&self) -> Option<&str>;
    /// Whether the kernel was entered through Xen's 64-bit PV entry (a `start_info` whose magic
    /// is `xen-3.0-x86_64`). A PV kernel runs outside ring 0: its `cpuid` must be Xen's
    /// forced-emulation form (`ud2; .ascii "xen"; cpuid`), or it sees the machine under Xen
    /// (QEMU's TCG leaves, here) instead of Xen.
    fn xen_pv_entry(&self) -> bool {
        false
    }
}

/// What detection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detected {
    /// The backend chosen (after any override).
    pub kind: BackendKind,
    /// CPUID.1:ECX[31].
    pub hypervisor_bit: bool,
    /// The CPUID 0x4000_0000 signature (all zero if the hypervisor bit is clear).
    pub signature: [u8; 12],
    /// The maximum hypervisor leaf.
    pub max_leaf: u32,
    /// The backend's feature leaf (KVM: 0x4000_0001.EAX).
    pub features: u32,
    /// The VMware backdoor's version, if it answered.
    pub vmware_version: Option<u32>,
    /// The TSC frequency in kHz, if the backend reports it (VMware GETHZ, CPUID 0x15/0x16).
    pub tsc_khz: Option<u64>,
    /// Set when `pvpatch.backend=` chose the backend.
    pub overridden: bool,
    /// `pvpatch.backend=none`: patch nothing.
    pub disabled: bool,
    /// Entered through Xen's PV entry: the backend is Xen whatever the leaves say.
    pub xen_pv: bool,
}

impl Detected {
    /// A backend taken as given rather than probed (host tests, tools): `kind` with its
    /// feature bits `features`, the hypervisor bit set unless `kind` is native.
    pub const fn assumed(kind: BackendKind, features: u32) -> Detected {
        Detected {
            kind,
            hypervisor_bit: !matches!(kind, BackendKind::Native),
            signature: [0; 12],
            max_leaf: 0,
            features,
            vmware_version: None,
            tsc_khz: None,
            overridden: false,
            disabled: false,
            xen_pv: false,
        }
    }
}

/// The value of `key=` in a command line (the first word that starts with it).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline_word(cmdline, key, true)
}

/// Whether `word` is on a command line by itself.
pub fn cmdline_has(cmdline: &str, word: &str) -> bool {
    cmdline_word(cmdline, word, false).is_some()
}

/// The first word of `cmdline` (split at spaces and control characters, as Linux splits at
/// `isspace`) that is `key` (`value`: false; then `""`) or starts with `key=` (`value`: true;
/// then what follows the `=`). One plain loop, never inlined: at boot under an emulator each
/// copy of a function costs its translation, and the iterator adaptors of
/// `split_ascii_whitespace` made one copy a call site.
#[inline(never)]
fn cmdline_word<'a>(cmdline: &'a str, key: &str, value: bool) -> Option<&'a str> {
    let (b, k) = (cmdline.as_bytes(), key.as_bytes());
    // One pass, one test a byte: a word ends at a space or control byte, or at the end.
    let (mut start, mut i) = (0, 0);
    while i <= b.len() {
        let end = i;
        i += 1;
        if b.get(end).copied().unwrap_or(0) > b' ' {
            continue;
        }
        let w = &b[start..end];
        start = i;
        if w.len() < k.len() || w[..k.len()] != *k {
            continue;
        }
        if !value && w.len() == k.len() {
            return Some("");
        }
        if value && w.get(k.len()) == Some(&b'=') {
            return cmdline.get(end - w.len() + k.len() + 1..end);
        }
    }
    None
}

fn signature(r: [u32; 4]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[0..4].copy_from_slice(&r[1].to_le_bytes());
    s[4..8].copy_from_slice(&r[2].to_le_bytes());
    s[8..12].copy_from_slice(&r[3].to_le_bytes());
    s
}

/// Detects the backend. The VMware backdoor is probed only when a hypervisor says it is there
/// and is one whose I/O ports are emulated (VMware itself, or QEMU's TCG and KVM, whose
/// `vmport` device answers or ignores it): on bare metal, reading an unknown port is not safe.
/// `pvpatch.vmport=off` prevents the probe.
pub fn detect(p: &dyn Platform) -> Detected {
    let cmdline = p.cmdline().unwrap_or("");
    let leaf1 = p.cpuid(1, 0);
    let hypervisor_bit = leaf1[2] & (1 << 31) != 0;
    let mut d = Detected {
        hypervisor_bit,
        ..Detected::assumed(BackendKind::Native, 0)
    };
    if hypervisor_bit {
        let r = p.cpuid(0x4000_0000, 0);
        d.max_leaf = r[0];
        d.signature = signature(r);
        d.kind = BackendKind::from_signature(&d.signature);
        if p.xen_pv_entry() && d.kind != BackendKind::Xen {
            // Xen with Viridian shows Hyper-V's leaves first and its own 0x100 higher.
            if let Some((max, sig)) = (1..0x100u32)
                .map(|i| p.cpuid(0x4000_0000 + (i << 8), 0))
                .map(|r| (r[0], signature(r)))
                .find(|(_, s)| s == b"XenVMMXenVMM")
            {
                d.max_leaf = max;
                d.signature = sig;
                d.kind = BackendKind::Xen;
            }
        }
        if d.max_leaf >= 0x4000_0001 && d.kind == BackendKind::Kvm {
            d.features = p.cpuid(0x4000_0001, 0)[0];
        }
        let safe = matches!(
            d.kind,
            BackendKind::Vmware | BackendKind::Tcg | BackendKind::Kvm
        );
        if safe && cmdline_value(cmdline, "pvpatch.vmport") != Some("off") {
            let r = p.vmware_backdoor(VMWARE_CMD_GETVERSION);
            if r[1] == VMWARE_MAGIC && r[0] != u32::MAX {
                d.vmware_version = Some(r[0]);
                d.kind = BackendKind::Vmware;
                let hz = p.vmware_backdoor(VMWARE_CMD_GETHZ);
                if hz[0] != u32::MAX && hz[1] != u32::MAX {
                    let hz = ((hz[1] as u64) << 32) | hz[0] as u64;
                    if hz != 0 {
                        d.tsc_khz = Some(hz / 1000);
                    }
                }
            }
        }
    }
    if p.xen_pv_entry() {
        // Only Xen starts a kernel there, whatever its leaves say.
        d.xen_pv = true;
        d.kind = BackendKind::Xen;
    }
    if d.tsc_khz.is_none() {
        d.tsc_khz = tsc_khz_from_cpuid(p);
    }
    if let Some(name) = cmdline_value(cmdline, "pvpatch.backend") {
        if name == "none" {
            d.disabled = true;
        } else if let Some(k) = BackendKind::from_name(name) {
            d.kind = k;
            d.overridden = true;
        }
    }
    d
}

/// The TSC frequency from CPUID leaf 0x15 (ratio and crystal) or 0x16 (base MHz).
fn tsc_khz_from_cpuid(p: &dyn Platform) -> Option<u64> {
    let max = p.cpuid(0, 0)[0];
    if max >= 0x15 {
        let [den, num, crystal, _] = p.cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return Some(crystal as u64 * num as u64 / den as u64 / 1000);
        }
    }
    if max >= 0x16 {
        let mhz = p.cpuid(0x16, 0)[0] & 0xffff;
        if mhz != 0 {
            return Some(mhz as u64 * 1000);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        hv: bool,
        sig: &'static [u8; 12],
        features: u32,
        vmport: Option<u32>,
        cmdline: &'static str,
        probes: core::cell::Cell<u32>,
    }

    impl Platform for Fake {
        fn cpuid(&self, leaf: u32, _sub: u32) -> [u32; 4] {
            let w = |i: usize| u32::from_le_bytes(self.sig[i..i + 4].try_into().unwrap());
            match leaf {
                0 => [0xd, 0, 0, 0],
                1 => [0, 0, if self.hv { 1 << 31 } else { 0 }, 0],
                0x4000_0000 => [0x4000_0001, w(0), w(4), w(8)],
                0x4000_0001 => [self.features, 0, 0, 0],
                _ => [0; 4],
            }
        }
        fn vmware_backdoor(&self, cmd: u32) -> [u32; 4] {
            self.probes.set(self.probes.get() + 1);
            match (self.vmport, cmd) {
                (Some(v), VMWARE_CMD_GETVERSION) => [v, VMWARE_MAGIC, 2, 0],
                (Some(_), VMWARE_CMD_GETHZ) => [2_600_000_000u32, 0, 0, 0],
                _ => [u32::MAX, 0, 0, 0],
            }
        }
        fn cmdline(&self) -> Option<&str> {
            Some(self.cmdline)
        }
    }

    fn fake(hv: bool, sig: &'static [u8; 12]) -> Fake {
        Fake {
            hv,
            sig,
            features: 0,
            vmport: None,
            cmdline: "",
            probes: Default::default(),
        }
    }

    #[test]
    fn signatures() {
        assert_eq!(
            detect(&fake(false, b"TCGTCGTCGTCG")).kind,
            BackendKind::Native
        );
        assert_eq!(detect(&fake(true, b"TCGTCGTCGTCG")).kind, BackendKind::Tcg);
        let mut k = fake(true, b"KVMKVMKVM\0\0\0");
        k.features = 0x0100_7efb;
        let d = detect(&k);
        assert_eq!(
            (d.kind, d.features & KVM_FEATURE_NOP_IO_DELAY),
            (BackendKind::Kvm, 2)
        );
        assert_eq!(detect(&fake(true, b"XenVMMXenVMM")).kind, BackendKind::Xen);
        assert_eq!(
            detect(&fake(true, b"Microsoft Hv")).kind,
            BackendKind::HyperV
        );
        assert_eq!(
            detect(&fake(true, b"SomethingNew")).kind,
            BackendKind::Unknown
        );
    }

    /// Xen as a PV kernel sees it through forced emulation: with Viridian, Hyper-V's leaves at
    /// 0x4000_0000 and Xen's at 0x4000_0100.
    struct PvXen {
        viridian: bool,
        pv: bool,
    }

    impl Platform for PvXen {
        fn cpuid(&self, leaf: u32, _sub: u32) -> [u32; 4] {
            let sig = |s: &[u8; 12], max: u32| {
                let w = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap());
                [max, w(0), w(4), w(8)]
            };
            match (leaf, self.viridian) {
                (1, _) => [0, 0, 1 << 31, 0],
                (0x4000_0000, true) => sig(b"Microsoft Hv", 0x4000_0006),
                (0x4000_0000, false) | (0x4000_0100, true) => sig(b"XenVMMXenVMM", leaf + 5),
                _ => [0; 4],
            }
        }
        fn vmware_backdoor(&self, _: u32) -> [u32; 4] {
            panic!("a PV kernel must not probe an I/O port")
        }
        fn cmdline(&self) -> Option<&str> {
            None
        }
        fn xen_pv_entry(&self) -> bool {
            self.pv
        }
    }

    #[test]
    fn xen_from_the_pv_entry() {
        let d = detect(&PvXen {
            viridian: false,
            pv: true,
        });
        assert_eq!(
            (d.kind, d.xen_pv, d.max_leaf),
            (BackendKind::Xen, true, 0x4000_0005)
        );
        // Viridian first: Xen's own leaves are found above Hyper-V's.
        let d = detect(&PvXen {
            viridian: true,
            pv: true,
        });
        assert_eq!(
            (d.kind, &d.signature, d.max_leaf),
            (BackendKind::Xen, b"XenVMMXenVMM", 0x4000_0105)
        );
        // Not entered as PV: Hyper-V's leaves name the backend.
        let d = detect(&PvXen {
            viridian: true,
            pv: false,
        });
        assert_eq!((d.kind, d.xen_pv), (BackendKind::HyperV, false));
    }

    #[test]
    fn vmware_backdoor_only_where_safe() {
        let mut t = fake(true, b"TCGTCGTCGTCG");
        t.vmport = Some(6);
        let d = detect(&t);
        assert_eq!(
            (d.kind, d.vmware_version, d.tsc_khz),
            (BackendKind::Vmware, Some(6), Some(2_600_000))
        );
        // Bare metal: never probed.
        let mut n = fake(false, b"TCGTCGTCGTCG");
        n.vmport = Some(6);
        assert_eq!(detect(&n).kind, BackendKind::Native);
        assert_eq!(n.probes.get(), 0);
        // Unknown hypervisor: not probed either; nor with pvpatch.vmport=off.
        let u = fake(true, b"SomethingNew");
        detect(&u);
        assert_eq!(u.probes.get(), 0);
        let mut off = fake(true, b"TCGTCGTCGTCG");
        off.vmport = Some(6);
        off.cmdline = "console=ttyS0 pvpatch.vmport=off";
        assert_eq!(detect(&off).kind, BackendKind::Tcg);
        // vmport=off in QEMU: the backdoor answers all ones.
        assert_eq!(detect(&fake(true, b"TCGTCGTCGTCG")).kind, BackendKind::Tcg);
    }

    #[test]
    fn command_line_override() {
        let mut t = fake(true, b"TCGTCGTCGTCG");
        t.cmdline = "quiet pvpatch.backend=kvm";
        let d = detect(&t);
        assert_eq!((d.kind, d.overridden), (BackendKind::Kvm, true));
        t.cmdline = "pvpatch.backend=none";
        assert!(detect(&t).disabled);
        assert_eq!(
            cmdline_value("a=1 pvpatch.backend=rom b", "pvpatch.backend"),
            Some("rom")
        );
        assert_eq!(
            cmdline_value("pvpatch.backendx=rom", "pvpatch.backend"),
            None
        );
        assert_eq!(
            cmdline_value(
                "pvpatch.backendx=rom\tpvpatch.backend=kvm ",
                "pvpatch.backend"
            ),
            Some("kvm")
        );
        assert_eq!(
            cmdline_value("pvpatch.backend=", "pvpatch.backend"),
            Some("")
        );
        assert!(cmdline_has("  quiet\npvpatch.verbose", "pvpatch.verbose"));
        assert!(!cmdline_has(
            "pvpatch.verbosex pvpatch.verbose=1",
            "pvpatch.verbose"
        ));
        assert!(!cmdline_has("", "pvpatch.verbose"));
    }

    proptest::proptest! {
        /// The scanner against the standard library's splitting: words are separated by any
        /// byte up to a space, and the first word that is `key=...` gives the value.
        #[test]
        fn command_line_words_as_std_splits_them(
            line in "[ab=. \t\n\x01\u{e9}]{0,24}",
            key in "[ab.]{1,3}",
        ) {
            let mut words = line.split(|c: char| c <= ' ').filter(|w| !w.is_empty());
            let has = line.split(|c: char| c <= ' ').any(|w| w == key);
            let value = words.find_map(|w| w.strip_prefix(key.as_str())?.strip_prefix('='));
            proptest::prop_assert_eq!(cmdline_has(&line, &key), has);
            proptest::prop_assert_eq!(cmdline_value(&line, &key), value);
        }
    }
}
