//! The second executor: the same cases as real ring-0 code in a minimal KVM virtual machine
//! (kvm-ioctls), for what the emulator gets wrong: a real CPU raises #GP for an unknown MSR or
//! a non-canonical value, which unicorn and the oracle's model do not.
//!
//! The machine: the oracle's regions at the same addresses, identity-mapped with 2 MiB pages;
//! a 64-bit code segment; a TSS whose IST1 gives exceptions their own stack (so that a trap
//! handler emulating `pushf` cannot overwrite its own frame); an IDT whose stub for vector `v`
//! is `out 0xc0+v, al` (an exit the host reads) and `iretq`. Port I/O exits to the host, which
//! answers `in` from the same derived values as the oracle's model; `hlt` exits and resumes.
//! A `#UD` at the trap site is handled by the host with the runtime's trap emulator, on the
//! interrupted frame, as the kernel's handler would; any other exception ends the run.
//!
//! Nothing here executes `vmcall`/`vmmcall` or `int n` (this host's KVM, PVM, hangs or fails
//! on them): cases that need a hypervisor stay with unicorn.

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memmap2::MmapMut;
use patch_sites::table::Site;
use pvpatch_runtime::trap::{self, Exec, Frame};

use crate::oracle::engine::{
    CODE, DATA, End, Executor, Hypervisor, PAGE, PRIVATE, Run, STACK, State,
};
use crate::oracle::vcpu::{Effect, Vcpu};

/// Guest memory: everything below 96 MiB (the oracle's regions end at 80 MiB).
const MEM: usize = 0x0600_0000;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x4000;
const IDT: u64 = 0x5000;
const STUBS: u64 = 0x6000;
const TSS: u64 = 0x7000;
/// The top of the exception stack (IST1).
const IST_TOP: u64 = 0x9000;
/// The port the sentinel at the end of the code writes.
const DONE_PORT: u16 = 0xf7;
/// Exception stubs write port `EXC_PORT + vector`.
const EXC_PORT: u16 = 0xc0;
/// At most this many exits a run.
const MAX_EXITS: usize = 64;

/// Why the machine could not be made or run.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` is missing or refused.
    #[error("KVM is not available: {0}")]
    Unavailable(String),
    /// An ioctl failed.
    #[error("KVM: {0}")]
    Ioctl(String),
}

fn io(e: impl std::fmt::Display) -> KvmError {
    KvmError::Ioctl(e.to_string())
}

/// The reusable machine.
pub struct KvmExecutor {
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: MmapMut,
}

impl std::fmt::Debug for KvmExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvmExecutor")
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl KvmExecutor {
    /// A machine, if `/dev/kvm` can make one.
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Unavailable(e.to_string()))?;
        let vm = kvm.create_vm().map_err(io)?;
        let mut mem = MmapMut::map_anon(MEM).map_err(io)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: mem.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is the anonymous mapping `mem`, which lives as long as the VM in
        // this struct (the VM is dropped first: fields drop in declaration order).
        unsafe { vm.set_user_memory_region(region) }.map_err(io)?;
        build_tables(&mut mem);
        let vcpu = vm.create_vcpu(0).map_err(io)?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(io)?;
        vcpu.set_cpuid2(&cpuid).map_err(io)?;
        let mut s = vcpu.get_sregs().map_err(io)?;
        s.cs = segment(0x08, true);
        let data = segment(0x10, false);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
        s.tr = kvm_segment {
            base: TSS,
            limit: 0x67,
            selector: 0x18,
            type_: 11,
            present: 1,
            s: 0,
            ..segment(0x18, false)
        };
        s.gdt.base = GDT;
        s.gdt.limit = 8 * 5 - 1;
        s.idt.base = IDT;
        s.idt.limit = 16 * 32 - 1;
        s.cr3 = PML4;
        s.cr4 = (1 << 5) | (1 << 9) | (1 << 10); // PAE, OSFXSR, OSXMMEXCPT
        s.cr0 = 0x8005_0033;
        s.efer = 0x501; // SCE, LME, LMA
        vcpu.set_sregs(&s).map_err(io)?;
        Ok(KvmExecutor { _vm: vm, vcpu, mem })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let a = addr as usize;
        self.mem[a..a + bytes.len()].copy_from_slice(bytes);
    }

    fn read_u64(&self, addr: u64) -> u64 {
        let a = addr as usize;
        self.mem
            .get(a..a + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    /// Runs from `start` to `until` with `code` placed, from `state`; `trap_site`'s `ud2` is
    /// emulated by the host with the runtime's trap emulator.
    fn run(
        &mut self,
        code: &[(u64, &[u8])],
        start: u64,
        until: u64,
        state: &State,
        trap_site: Option<Site>,
    ) -> Result<Run, KvmError> {
        // The text: int3 everywhere near what runs, the code, the sentinel.
        let lo = start.saturating_sub(64).max(CODE);
        self.write(lo, &vec![0xcc; (until + 64 - lo) as usize]);
        for (a, b) in code {
            self.write(*a, b);
        }
        self.write(until, &[0xe6, DONE_PORT as u8]);
        self.write(STACK, &state.stack);
        self.write(DATA, &state.data);
        self.write(PRIVATE, &state.private);
        let g = &state.gpr;
        let regs = kvm_regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: start,
            rflags: state.rflags,
        };
        self.vcpu.set_regs(&regs).map_err(io)?;
        let mut model = Vcpu::new(state.seed, state.rflags & trap::IF != 0);
        let mut end = End::Emulator("too many exits".to_string());
        enum Exit {
            Out(u16, u8, u32),
            In,
            Hlt,
            Other(String),
        }
        for _ in 0..MAX_EXITS {
            let exit = match self.vcpu.run().map_err(io)? {
                VcpuExit::IoIn(port, data) => {
                    let v = model.port_in(port, data.len() as u8).to_le_bytes();
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&v[..n]);
                    Exit::In
                }
                VcpuExit::IoOut(port, data) => {
                    let mut v = [0u8; 4];
                    let n = data.len().min(4);
                    v[..n].copy_from_slice(&data[..n]);
                    Exit::Out(port, n as u8, u32::from_le_bytes(v))
                }
                VcpuExit::Hlt => Exit::Hlt,
                other => Exit::Other(format!("{other:?}")),
            };
            let regs = self.vcpu.get_regs().map_err(io)?;
            let rip = regs.rip;
            match exit {
                Exit::Out(port, ..) if port == DONE_PORT && rip == until + 2 => {
                    end = End::Reached;
                    break;
                }
                Exit::Out(port, ..)
                    if (STUBS..STUBS + 16 * 32).contains(&rip)
                        && (EXC_PORT..EXC_PORT + 32).contains(&port) =>
                {
                    let vector = (port - EXC_PORT) as u8;
                    if vector == 6 && self.emulate_trap(trap_site, &mut model)? {
                        continue;
                    }
                    model.record(Effect::Fault(vector));
                    end = End::Fault(vector);
                    break;
                }
                Exit::Out(port, width, value) => model.port_out(port, width, value),
                Exit::In => {}
                Exit::Hlt => {
                    model.see_flags(regs.rflags);
                    model.halt(regs.rflags & trap::IF != 0);
                }
                Exit::Other(what) => {
                    end = End::Emulator(format!("exit {what} at {rip:#x}"));
                    break;
                }
            }
        }
        let r = self.vcpu.get_regs().map_err(io)?;
        let gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        // The real CPU's IF changes are not seen (`cli`/`sti` do not exit): the model's guesses
        // at them are not part of the run.
        model.trace.retain(|e| !matches!(e, Effect::If(_)));
        let page = |a: u64| self.mem[a as usize..(a + PAGE) as usize].to_vec();
        Ok(Run {
            end,
            gpr,
            rflags: r.rflags,
            stack: page(STACK),
            data: page(DATA),
            private: page(PRIVATE),
            vcpu: model,
            steps: 0,
            max_rsp: state.gpr[4],
            demand: Vec::new(),
        })
    }

    /// The host side of the kernel's `#UD` handler: if the interrupted RIP is the trap site's,
    /// emulate its op on the frame IST1 holds and let the stub `iretq`.
    fn emulate_trap(&mut self, site: Option<Site>, model: &mut Vcpu) -> Result<bool, KvmError> {
        let mut regs = self.vcpu.get_regs().map_err(io)?;
        let frame_at = regs.rsp; // RIP, CS, RFLAGS, RSP, SS
        let rip = self.read_u64(frame_at);
        let Some(site) = site.filter(|s| s.patch_addr() == rip) else {
            return Ok(false);
        };
        let mut frame = Frame {
            gpr: [
                regs.rax,
                regs.rcx,
                regs.rdx,
                regs.rbx,
                self.read_u64(frame_at + 24),
                regs.rbp,
                regs.rsi,
                regs.rdi,
                regs.r8,
                regs.r9,
                regs.r10,
                regs.r11,
                regs.r12,
                regs.r13,
                regs.r14,
                regs.r15,
            ],
            rip,
            rflags: self.read_u64(frame_at + 16),
        };
        let mut exec = HostExec {
            mem: &mut self.mem,
            model,
        };
        if trap::emulate(&site, &mut frame, &mut exec).is_err() {
            return Ok(false);
        }
        let g = frame.gpr;
        (regs.rax, regs.rcx, regs.rdx, regs.rbx) = (g[0], g[1], g[2], g[3]);
        (regs.rbp, regs.rsi, regs.rdi) = (g[5], g[6], g[7]);
        (regs.r8, regs.r9, regs.r10, regs.r11) = (g[8], g[9], g[10], g[11]);
        (regs.r12, regs.r13, regs.r14, regs.r15) = (g[12], g[13], g[14], g[15]);
        self.write(frame_at, &frame.rip.to_le_bytes());
        self.write(frame_at + 16, &frame.rflags.to_le_bytes());
        self.write(frame_at + 24, &g[4].to_le_bytes());
        self.vcpu.set_regs(&regs).map_err(io)?;
        Ok(true)
    }
}

/// The trap emulator's machine, from the host: memory and ports (the ops the KVM checks trap).
struct HostExec<'a> {
    mem: &'a mut MmapMut,
    model: &'a mut Vcpu,
}

impl Exec for HostExec<'_> {
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        self.model.port_in(port, width)
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        self.model.port_out(port, width, value)
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        self.model.read_cr(n)
    }
    fn write_cr(&mut self, n: u8, v: u64) {
        self.model.write_cr(n, v)
    }
    fn read_dr(&mut self, n: u8) -> u64 {
        self.model.read_dr(n)
    }
    fn write_dr(&mut self, n: u8, v: u64) {
        self.model.write_dr(n, v)
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        self.model.rdmsr(msr)
    }
    fn wrmsr(&mut self, msr: u32, v: u64) {
        self.model.wrmsr(msr, v)
    }
    fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4] {
        self.model.cpuid(leaf, sub)
    }
    fn invlpg(&mut self, addr: u64) {
        self.model.record(Effect::Invlpg(addr))
    }
    fn flush_caches(&mut self, discard: bool) {
        self.model.record(Effect::Caches { discard })
    }
    fn halt(&mut self, interrupts: bool) {
        self.model.halt(interrupts)
    }
    fn rdtsc(&mut self) -> u64 {
        self.model.rdtsc()
    }
    fn swapgs(&mut self) {
        self.model.swapgs()
    }
    fn clts(&mut self) {
        self.model.clts()
    }
    fn read_u64(&mut self, addr: u64) -> u64 {
        let a = addr as usize;
        self.mem
            .get(a..a + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn write_u64(&mut self, addr: u64, v: u64) {
        let a = addr as usize;
        if let Some(b) = self.mem.get_mut(a..a + 8) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Page tables (1 GiB identity, 2 MiB pages), GDT (null, code, data, TSS), TSS with IST1, IDT
/// and its stubs.
fn build_tables(mem: &mut MmapMut) {
    let mut put = |addr: u64, bytes: &[u8]| {
        let a = addr as usize;
        mem[a..a + bytes.len()].copy_from_slice(bytes);
    };
    put(PML4, &(PDPT | 3).to_le_bytes());
    put(PDPT, &(PD | 3).to_le_bytes());
    for i in 0..512u64 {
        put(PD + 8 * i, &((i << 21) | 0x83).to_le_bytes());
    }
    let tss_lo: u64 =
        0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
    for (i, d) in [
        0u64,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        tss_lo,
        TSS >> 32,
    ]
    .iter()
    .enumerate()
    {
        put(GDT + 8 * i as u64, &d.to_le_bytes());
    }
    put(TSS + 0x24, &IST_TOP.to_le_bytes()); // IST1
    for v in 0..32u64 {
        let stub = STUBS + 16 * v;
        let error_code = matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30);
        let mut code = vec![0xe6, (EXC_PORT + v as u16) as u8];
        if error_code {
            code.extend_from_slice(&[0x48, 0x83, 0xc4, 0x08]); // add rsp, 8
        }
        code.extend_from_slice(&[0x48, 0xcf]); // iretq
        put(stub, &code);
        let gate_lo = (stub & 0xffff)
            | (0x08 << 16)
            | (1 << 32) // IST1
            | (0x8e << 40)
            | (((stub >> 16) & 0xffff) << 48);
        put(IDT + 16 * v, &gate_lo.to_le_bytes());
        put(IDT + 16 * v + 8, &(stub >> 32).to_le_bytes());
    }
}

impl Executor for KvmExecutor {
    fn name(&self) -> &'static str {
        "kvm"
    }
    /// `hypervisor` must be [`Hypervisor::None`]: nothing here calls a hypervisor (see the
    /// module's documentation); a run that asks for one fails.
    fn execute(
        &mut self,
        code: &[(u64, &[u8])],
        start: u64,
        until: u64,
        state: &State,
        trap_site: Option<Site>,
        hypervisor: Hypervisor,
    ) -> Run {
        if hypervisor != Hypervisor::None {
            return Run::failed("the KVM executor runs no hypervisor".into(), state);
        }
        self.run(code, start, until, state, trap_site)
            .unwrap_or_else(|e| Run::failed(e.to_string(), state))
    }
}
