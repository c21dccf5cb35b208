//! Trap sites: a site rewritten to `ud2` (or `int3` where only one byte fits), and NOPs, whose
//! op the runtime emulates when it faults. `ud2` is preferred: this host's KVM (PVM) cannot
//! deliver `int3` to a guest kernel. The kernel's `#UD`/`#BP` handler gives [`emulate`] the
//! interrupted registers; the
//! effect of the op on the machine goes through [`Exec`], which the kernel implements with the
//! raw instructions (host tests implement it with a recording fake).

use patch_sites::table::{SITE_FLAG_REP, Site};
use patch_sites::{Gpr, Op, Operand};

/// The interrupted state, as the kernel's exception stub saved it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Frame {
    /// General-purpose registers by number (`rax` = 0 ... `r15` = 15); `rsp` is the interrupted
    /// stack pointer.
    pub gpr: [u64; 16],
    /// Where execution resumes.
    pub rip: u64,
    /// RFLAGS to resume with.
    pub rflags: u64,
}

/// RFLAGS.IF.
pub const IF: u64 = 1 << 9;

/// The RFLAGS bits `popfq` loads at CPL 0 in 64-bit mode: CF, PF, AF, ZF, SF, TF, IF, DF, OF,
/// IOPL, NT, AC and ID. RF, VIF and VIP are cleared, VM stays 0, reserved bits read as their
/// fixed values (bit 1 set). Found by the equivalence oracle: the emulator once loaded every
/// bit of the image.
pub const POPF_LOADS: u64 = 0x0024_7fd5;

/// RFLAGS as `popfq` at CPL 0 makes it from the image `v`.
pub const fn popf_image(v: u64) -> u64 {
    (v & POPF_LOADS) | 2
}

impl Frame {
    fn get(&self, r: Gpr) -> u64 {
        self.gpr[r.number() as usize]
    }

    fn set(&mut self, r: Gpr, v: u64) {
        self.gpr[r.number() as usize] = v;
    }

    fn rax(&self) -> u64 {
        self.gpr[0]
    }

    /// Writes `v` into the low `width` bytes of rax as an `in` does (a 32-bit write
    /// zero-extends).
    fn set_acc(&mut self, width: u8, v: u32) {
        let old = self.gpr[0];
        self.gpr[0] = match width {
            1 => (old & !0xff) | (v as u64 & 0xff),
            2 => (old & !0xffff) | (v as u64 & 0xffff),
            _ => v as u64,
        };
    }
}

/// The machine, for the ops a trap emulates.
pub trait Exec {
    /// `in` of `width` bytes.
    fn port_in(&mut self, port: u16, width: u8) -> u32;
    /// `out` of `width` bytes.
    fn port_out(&mut self, port: u16, width: u8, value: u32);
    /// `mov reg, crN`.
    fn read_cr(&mut self, n: u8) -> u64;
    /// `mov crN, reg`.
    fn write_cr(&mut self, n: u8, v: u64);
    /// `mov reg, drN`.
    fn read_dr(&mut self, n: u8) -> u64;
    /// `mov drN, reg`.
    fn write_dr(&mut self, n: u8, v: u64);
    /// `rdmsr`.
    fn rdmsr(&mut self, msr: u32) -> u64;
    /// `wrmsr`.
    fn wrmsr(&mut self, msr: u32, v: u64);
    /// `cpuid`.
    fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4];
    /// `invlpg [addr]`.
    fn invlpg(&mut self, addr: u64);
    /// `wbinvd`, or `invd` when `discard`.
    fn flush_caches(&mut self, discard: bool);
    /// `hlt`, with interrupts enabled while halted when `interrupts`.
    fn halt(&mut self, interrupts: bool);
    /// `rdtsc`.
    fn rdtsc(&mut self) -> u64;
    /// `swapgs`.
    fn swapgs(&mut self);
    /// `clts`.
    fn clts(&mut self);
    /// Reads a u64 of kernel memory (the interrupted stack).
    fn read_u64(&mut self, addr: u64) -> u64;
    /// Writes a u64 of kernel memory (the interrupted stack).
    fn write_u64(&mut self, addr: u64, v: u64);
}

/// Why a trap cannot be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapError {
    /// No trap site at this address.
    NotASite(u64),
    /// The op is not one the emulator implements.
    Unsupported(Op),
}

impl core::fmt::Display for TrapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TrapError::NotASite(a) => write!(f, "the trap at {a:#x} is not a trap site"),
            TrapError::Unsupported(op) => write!(f, "{op} cannot be emulated"),
        }
    }
}

/// Whether [`emulate`] implements `op` (the planner only makes trap sites of these).
pub fn supported(op: Op, operand: Operand, width: u8) -> bool {
    use Op::*;
    match op {
        // The emulator pushes and pops 8 bytes (found by the equivalence oracle: `pushfw` was
        // emulated as `pushfq`).
        Pushf | Popf if width != 8 => false,
        Cli | Sti | Pushf | Popf | Hlt | SafeHalt | SaveFl | RestoreFl | Rdmsr | Wrmsr | Cpuid
        | Wbinvd | Invd | Rdtsc | Swapgs | Clts | In | Out | IoDelay => true,
        MovToCr0 | MovFromCr0 | MovToCr2 | MovFromCr2 | MovToCr3 | MovFromCr3 | MovToCr4
        | MovFromCr4 | MovToCr8 | MovFromCr8 => matches!(operand, Operand::Reg(_)),
        MovToDr | MovFromDr => matches!(operand, Operand::DebugReg { .. }),
        Invlpg => matches!(operand, Operand::MemBase(_)),
        _ => false,
    }
}

/// Emulates the op of `site` (whose trap just fired) on `frame`, and resumes after the site.
pub fn emulate(site: &Site, frame: &mut Frame, exec: &mut dyn Exec) -> Result<(), TrapError> {
    let op = site.op().ok_or(TrapError::NotASite(site.addr))?;
    if !supported(op, site.operand, site.width) || site.flags & SITE_FLAG_REP != 0 {
        return Err(TrapError::Unsupported(op));
    }
    let port = |f: &Frame| match site.operand {
        Operand::PortImm(p) => p as u16,
        _ => f.gpr[2] as u16,
    };
    match (op, site.operand) {
        (Op::Cli, _) => frame.rflags &= !IF,
        (Op::Sti, _) => frame.rflags |= IF,
        (Op::SaveFl, Operand::Reg(r)) => {
            // `pushfq; pop reg`: the pushed image has RF and VM clear (a fault's saved RFLAGS
            // may have RF set).
            let v = frame.rflags & !(3 << 16);
            frame.set(r, v)
        }
        (Op::RestoreFl, Operand::Reg(r)) => frame.rflags = popf_image(frame.get(r)),
        (Op::Pushf, _) => {
            let sp = frame.gpr[4].wrapping_sub(8);
            // RF (bit 16) and VM (bit 17) read as zero in the pushed image.
            exec.write_u64(sp, frame.rflags & !(3 << 16));
            frame.gpr[4] = sp;
        }
        (Op::Popf, _) => {
            let sp = frame.gpr[4];
            frame.rflags = popf_image(exec.read_u64(sp));
            frame.gpr[4] = sp.wrapping_add(8);
        }
        (Op::Hlt, _) => exec.halt(frame.rflags & IF != 0),
        (Op::SafeHalt, _) => {
            frame.rflags |= IF;
            exec.halt(true)
        }
        (Op::Rdmsr, _) => {
            let v = exec.rdmsr(frame.gpr[1] as u32);
            frame.gpr[0] = v & 0xffff_ffff;
            frame.gpr[2] = v >> 32;
        }
        (Op::Wrmsr, _) => {
            let v = (frame.gpr[2] << 32) | (frame.rax() & 0xffff_ffff);
            exec.wrmsr(frame.gpr[1] as u32, v)
        }
        (Op::Cpuid, _) => {
            let r = exec.cpuid(frame.rax() as u32, frame.gpr[1] as u32);
            frame.gpr[0] = r[0] as u64;
            frame.gpr[3] = r[1] as u64;
            frame.gpr[1] = r[2] as u64;
            frame.gpr[2] = r[3] as u64;
        }
        (Op::Rdtsc, _) => {
            let t = exec.rdtsc();
            frame.gpr[0] = t & 0xffff_ffff;
            frame.gpr[2] = t >> 32;
        }
        (Op::Wbinvd, _) => exec.flush_caches(false),
        (Op::Invd, _) => exec.flush_caches(true),
        (Op::Swapgs, _) => exec.swapgs(),
        (Op::Clts, _) => exec.clts(),
        (Op::In, _) => {
            let v = exec.port_in(port(frame), site.width);
            frame.set_acc(site.width, v)
        }
        (Op::Out | Op::IoDelay, _) => {
            let v = frame.rax() as u32;
            exec.port_out(port(frame), site.width.max(1), v)
        }
        (op, Operand::Reg(r))
            if matches!(
                op,
                Op::MovToCr0 | Op::MovToCr2 | Op::MovToCr3 | Op::MovToCr4 | Op::MovToCr8
            ) =>
        {
            exec.write_cr(op.control_register().unwrap_or(8), frame.get(r))
        }
        (op, Operand::Reg(r)) => {
            let v = exec.read_cr(op.control_register().unwrap_or(8));
            frame.set(r, v)
        }
        (Op::MovToDr, Operand::DebugReg { dr, reg }) => exec.write_dr(dr, frame.get(reg)),
        (Op::MovFromDr, Operand::DebugReg { dr, reg }) => {
            let v = exec.read_dr(dr);
            frame.set(reg, v)
        }
        (Op::Invlpg, Operand::MemBase(b)) => exec.invlpg(frame.get(b)),
        _ => return Err(TrapError::Unsupported(op)),
    }
    // After the patched bytes: for a detour, in the stub, where the moved instructions follow
    // (found by the equivalence oracle: the emulator resumed after the site and skipped them).
    frame.rip = site.patch_addr() + site.site_len as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use patch_sites::RegSet;
    use patch_sites::table::Form;

    use super::*;

    #[derive(Default)]
    struct Fake {
        log: Vec<(&'static str, u64, u64)>,
        mem: [u64; 4],
    }

    impl Exec for Fake {
        fn port_in(&mut self, port: u16, width: u8) -> u32 {
            self.log.push(("in", port as u64, width as u64));
            0x1234_5678
        }
        fn port_out(&mut self, port: u16, width: u8, value: u32) {
            self.log
                .push(("out", port as u64, ((width as u64) << 32) | value as u64));
        }
        fn read_cr(&mut self, n: u8) -> u64 {
            0xc000 + n as u64
        }
        fn write_cr(&mut self, n: u8, v: u64) {
            self.log.push(("cr", n as u64, v));
        }
        fn read_dr(&mut self, n: u8) -> u64 {
            0xd000 + n as u64
        }
        fn write_dr(&mut self, n: u8, v: u64) {
            self.log.push(("dr", n as u64, v));
        }
        fn rdmsr(&mut self, msr: u32) -> u64 {
            0x1111_2222_3333_4444 ^ msr as u64
        }
        fn wrmsr(&mut self, msr: u32, v: u64) {
            self.log.push(("wrmsr", msr as u64, v));
        }
        fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4] {
            [leaf, sub, 3, 4]
        }
        fn invlpg(&mut self, addr: u64) {
            self.log.push(("invlpg", addr, 0));
        }
        fn flush_caches(&mut self, discard: bool) {
            self.log.push(("flush", discard as u64, 0));
        }
        fn halt(&mut self, interrupts: bool) {
            self.log.push(("hlt", interrupts as u64, 0));
        }
        fn rdtsc(&mut self) -> u64 {
            0x0000_0005_0000_0007
        }
        fn swapgs(&mut self) {
            self.log.push(("swapgs", 0, 0));
        }
        fn clts(&mut self) {
            self.log.push(("clts", 0, 0));
        }
        fn read_u64(&mut self, addr: u64) -> u64 {
            self.mem[(addr / 8) as usize]
        }
        fn write_u64(&mut self, addr: u64, v: u64) {
            self.mem[(addr / 8) as usize] = v;
        }
    }

    fn site(op: Op, operand: Operand, width: u8) -> Site {
        Site {
            addr: 0x1000,
            site_len: 5,
            insn_len: 1,
            op_id: op.id(),
            form: Form::Trap,
            operand,
            width,
            flags: 0,
            clobbers: RegSet::EMPTY,
            stub: None,
        }
    }

    #[test]
    fn emulation_does_what_the_instruction_does() {
        let mut x = Fake::default();
        let mut f = Frame {
            rflags: 0x202,
            rip: 0x1001,
            ..Frame::default()
        };
        emulate(&site(Op::Cli, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!((f.rflags & IF, f.rip), (0, 0x1005));
        emulate(&site(Op::Sti, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!(f.rflags & IF, IF);

        f.gpr[0] = 0xffff_ffff_ffff_ffff;
        emulate(&site(Op::In, Operand::PortImm(0x71), 1), &mut f, &mut x).unwrap();
        assert_eq!(f.gpr[0], 0xffff_ffff_ffff_ff78);
        emulate(&site(Op::In, Operand::PortDx, 4), &mut f, &mut x).unwrap();
        assert_eq!(f.gpr[0], 0x1234_5678);
        f.gpr[2] = 0x3f8;
        f.gpr[0] = 0x41;
        emulate(&site(Op::Out, Operand::PortDx, 1), &mut f, &mut x).unwrap();
        assert_eq!(x.log.last(), Some(&("out", 0x3f8, (1 << 32) | 0x41)));

        f.gpr[1] = 0xc000_0102;
        emulate(&site(Op::Rdmsr, Operand::None, 0), &mut f, &mut x).unwrap();
        let v = 0x1111_2222_3333_4444u64 ^ 0xc000_0102;
        assert_eq!((f.gpr[0], f.gpr[2]), (v & 0xffff_ffff, v >> 32));
        emulate(&site(Op::Wrmsr, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!(x.log.last(), Some(&("wrmsr", 0xc000_0102, v)));

        f.gpr[7] = 0x5000;
        emulate(
            &site(Op::MovToCr3, Operand::Reg(Gpr::Rdi), 8),
            &mut f,
            &mut x,
        )
        .unwrap();
        assert_eq!(x.log.last(), Some(&("cr", 3, 0x5000)));
        emulate(
            &site(Op::MovFromCr4, Operand::Reg(Gpr::R12), 8),
            &mut f,
            &mut x,
        )
        .unwrap();
        assert_eq!(f.gpr[12], 0xc004);

        // pushf then popf through the interrupted stack.
        f.gpr[4] = 16;
        f.rflags = 0x246 | (1 << 16);
        emulate(&site(Op::Pushf, Operand::None, 8), &mut f, &mut x).unwrap();
        assert_eq!((f.gpr[4], x.mem[1]), (8, 0x246));
        x.mem[1] = 0x2c7;
        emulate(&site(Op::Popf, Operand::None, 8), &mut f, &mut x).unwrap();
        assert_eq!((f.gpr[4], f.rflags), (16, 0x2c7));

        f.gpr[0] = 0;
        f.gpr[1] = 7;
        emulate(&site(Op::Cpuid, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!(&f.gpr[0..4], &[0, 3, 4, 7]);

        assert_eq!(
            emulate(&site(Op::Iretq, Operand::None, 0), &mut f, &mut x),
            Err(TrapError::Unsupported(Op::Iretq))
        );
    }

    #[test]
    fn the_other_ops_do_what_their_instructions_do() {
        let mut x = Fake::default();
        let mut f = Frame {
            rflags: 0x3_0246, // RF and VM set: an image never shows them
            ..Frame::default()
        };
        emulate(&site(Op::SaveFl, Operand::Reg(Gpr::Rbx), 8), &mut f, &mut x).unwrap();
        assert_eq!(f.gpr[3], 0x246);
        f.gpr[9] = 0xffff_ffff_ffff_ffff;
        emulate(
            &site(Op::RestoreFl, Operand::Reg(Gpr::R9), 8),
            &mut f,
            &mut x,
        )
        .unwrap();
        assert_eq!(f.rflags, POPF_LOADS | 2);
        assert_eq!(popf_image(0), 2);
        assert_eq!(popf_image(1 << 16 | 1 << 9), 1 << 9 | 2);

        f.rflags = 0x2;
        emulate(&site(Op::Hlt, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!(x.log.last(), Some(&("hlt", 0, 0)));
        f.rflags = 0x202;
        emulate(&site(Op::Hlt, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!(x.log.last(), Some(&("hlt", 1, 0)));
        f.rflags = 0x2;
        emulate(&site(Op::SafeHalt, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!((x.log.last(), f.rflags & IF), (Some(&("hlt", 1, 0)), IF));

        emulate(&site(Op::Rdtsc, Operand::None, 0), &mut f, &mut x).unwrap();
        assert_eq!((f.gpr[0], f.gpr[2]), (7, 5));
        for (op, what) in [
            (Op::Wbinvd, ("flush", 0, 0)),
            (Op::Invd, ("flush", 1, 0)),
            (Op::Swapgs, ("swapgs", 0, 0)),
            (Op::Clts, ("clts", 0, 0)),
        ] {
            emulate(&site(op, Operand::None, 0), &mut f, &mut x).unwrap();
            assert_eq!(x.log.last(), Some(&what), "{op}");
        }

        // Port widths: a 2-byte in keeps the rest of rax; io_delay is a one-byte write to 0x80
        // (eax is handed over whole: the port takes the low `width` bytes).
        f.gpr[0] = 0xaaaa_bbbb_cccc_dddd;
        emulate(&site(Op::In, Operand::PortImm(0x60), 2), &mut f, &mut x).unwrap();
        assert_eq!(f.gpr[0], 0xaaaa_bbbb_cccc_5678);
        assert_eq!(x.log.last(), Some(&("in", 0x60, 2)));
        emulate(
            &site(Op::IoDelay, Operand::PortImm(0x80), 1),
            &mut f,
            &mut x,
        )
        .unwrap();
        assert_eq!(x.log.last(), Some(&("out", 0x80, (1 << 32) | 0xcccc_5678)));
        emulate(&site(Op::Out, Operand::PortImm(0x71), 4), &mut f, &mut x).unwrap();
        assert_eq!(x.log.last(), Some(&("out", 0x71, (4 << 32) | 0xcccc_5678)));

        // Control registers by number, both directions; debug registers; invlpg's address.
        for (to, from, n) in [
            (Op::MovToCr0, Op::MovFromCr0, 0),
            (Op::MovToCr2, Op::MovFromCr2, 2),
            (Op::MovToCr4, Op::MovFromCr4, 4),
            (Op::MovToCr8, Op::MovFromCr8, 8),
        ] {
            f.gpr[14] = 0x77 + n;
            emulate(&site(to, Operand::Reg(Gpr::R14), 8), &mut f, &mut x).unwrap();
            assert_eq!(x.log.last(), Some(&("cr", n, 0x77 + n)), "{to}");
            emulate(&site(from, Operand::Reg(Gpr::R13), 8), &mut f, &mut x).unwrap();
            assert_eq!(f.gpr[13], 0xc000 + n, "{from}");
        }
        f.gpr[6] = 0x400;
        let dr7 = Operand::DebugReg {
            dr: 7,
            reg: Gpr::Rsi,
        };
        emulate(&site(Op::MovToDr, dr7, 8), &mut f, &mut x).unwrap();
        assert_eq!(x.log.last(), Some(&("dr", 7, 0x400)));
        emulate(&site(Op::MovFromDr, dr7, 8), &mut f, &mut x).unwrap();
        assert_eq!(f.gpr[6], 0xd007);
        f.gpr[5] = 0xffff_8000_1234_5000;
        emulate(
            &site(Op::Invlpg, Operand::MemBase(Gpr::Rbp), 0),
            &mut f,
            &mut x,
        )
        .unwrap();
        assert_eq!(x.log.last(), Some(&("invlpg", 0xffff_8000_1234_5000, 0)));

        // A detour's copy resumes in the stub, after the patched bytes.
        let mut d = site(Op::Cli, Operand::None, 0);
        d.form = Form::Detour;
        d.stub = Some(0x9000);
        d.site_len = 3;
        emulate(&d, &mut f, &mut x).unwrap();
        assert_eq!(f.rip, 0x9003);
    }

    #[test]
    fn what_the_emulator_refuses() {
        let mut x = Fake::default();
        let mut f = Frame::default();
        // Not 8-byte pushf/popf, a control register through memory, rep string I/O, an op it
        // does not know, an unknown op id.
        assert!(!supported(Op::Pushf, Operand::None, 2));
        assert!(!supported(Op::Popf, Operand::None, 2));
        assert!(supported(Op::Pushf, Operand::None, 8));
        assert!(!supported(Op::MovToCr3, Operand::MemBase(Gpr::Rax), 8));
        assert!(!supported(Op::MovToDr, Operand::Reg(Gpr::Rax), 8));
        assert!(!supported(Op::Invlpg, Operand::Reg(Gpr::Rax), 0));
        assert!(!supported(Op::Lgdt, Operand::MemBase(Gpr::Rax), 0));
        assert_eq!(
            emulate(&site(Op::Pushf, Operand::None, 2), &mut f, &mut x),
            Err(TrapError::Unsupported(Op::Pushf))
        );
        let mut rep = site(Op::Out, Operand::PortDx, 1);
        rep.flags = SITE_FLAG_REP;
        assert_eq!(
            emulate(&rep, &mut f, &mut x),
            Err(TrapError::Unsupported(Op::Out))
        );
        let mut unknown = site(Op::Cli, Operand::None, 0);
        unknown.op_id = 0x7f;
        assert_eq!(
            emulate(&unknown, &mut f, &mut x),
            Err(TrapError::NotASite(0x1000))
        );
        assert_eq!(f, Frame::default(), "a refused trap changes nothing");
        assert!(x.log.is_empty());
        let shown = alloc::format!("{}", TrapError::Unsupported(Op::Lgdt));
        assert!(shown.contains("lgdt"), "{shown}");
        let shown = alloc::format!("{}", TrapError::NotASite(0x1000));
        assert!(shown.contains("0x1000"), "{shown}");
    }
}
