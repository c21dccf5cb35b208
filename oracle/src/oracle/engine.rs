//! The executor: one unicorn engine, reused for every run, with the virtual CPU of
//! [`super::vcpu`] behind its sensitive instructions and the runtime's own trap emulator behind
//! `#UD`.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use patch_sites::table::Site;
use pvpatch_runtime::trap::{self, Exec, Frame};
use unicorn_engine::{Arch, Mode, Prot, RegisterX86, Unicorn};

use super::vcpu::{Effect, Vcpu};

/// Where the site under test is placed. The engine runs without paging, where unicorn maps
/// only physical addresses: the regions lie low, where kernel addresses cannot.
pub const CODE: u64 = 0x0100_0000;
/// Size of the text region (the site, padding, and anything the backend adds).
pub const CODE_SIZE: u64 = 0x1_0000;
/// Where a ROM or other backend code is placed, inside the text region.
pub const ROM: u64 = CODE + 0x8000;
/// The stack page.
pub const STACK: u64 = 0x0200_0000;
/// The data page memory operands point into.
pub const DATA: u64 = 0x0300_0000;
/// A page private to the backend (a shared-info page, a hypercall scratch area).
pub const PRIVATE: u64 = 0x0400_0000;
/// The hypercall page: calls into it are intercepted as the hypervisor's.
pub const HYPERCALL: u64 = 0x0500_0000;

/// Which hypervisor answers calls into the hypercall page (and sees the private page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypervisor {
    /// None: the hypercall page is `int3`s.
    None,
    /// Xen: hypercall `n` at `32 * n`; `vcpu_info` at the private page.
    Xen,
    /// Hyper-V: one entry point; the control word in rcx.
    HyperV,
}
/// Page size.
pub const PAGE: u64 = 0x1000;

/// Where position-independent code runs (see [`Engine::run`]): slots of [`SLOT`] bytes, each
/// holding one piece of code and keeping its translation while it does.
pub const RELOC: u64 = 0x0600_0000;
/// Bytes of relocation slots.
const RELOC_SIZE: u64 = 0x1_0000;
/// One slot: code of up to 48 bytes, then `int3`.
const SLOT: u64 = 64;
/// The most instructions one run may execute.
pub const MAX_STEPS: usize = 500;

/// The register order of [`State::gpr`] (the ABI's numbering: rax = 0 ... r15 = 15).
pub const GPRS: [RegisterX86; 16] = [
    RegisterX86::RAX,
    RegisterX86::RCX,
    RegisterX86::RDX,
    RegisterX86::RBX,
    RegisterX86::RSP,
    RegisterX86::RBP,
    RegisterX86::RSI,
    RegisterX86::RDI,
    RegisterX86::R8,
    RegisterX86::R9,
    RegisterX86::R10,
    RegisterX86::R11,
    RegisterX86::R12,
    RegisterX86::R13,
    RegisterX86::R14,
    RegisterX86::R15,
];

/// A machine state to start from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// General registers by number.
    pub gpr: [u64; 16],
    /// RFLAGS.
    pub rflags: u64,
    /// The seed of the virtual CPU's derived values.
    pub seed: u64,
    /// The stack page.
    pub stack: Vec<u8>,
    /// The data page.
    pub data: Vec<u8>,
    /// The backend's private page.
    pub private: Vec<u8>,
}

/// RFLAGS.TF: never set by generated states (a single-step trap would fire at a point that
/// depends on the padding, not on the rewrite).
pub const TF: u64 = 1 << 8;

impl State {
    /// A state for `site`: general registers and RFLAGS from `gpr` and `rflags`, pages filled
    /// from `seed`; then made meaningful for the site: `rsp` inside the stack page, the base
    /// register of a memory operand inside the data page, and an RFLAGS image that `popf` or
    /// `restore_fl` loads without TF.
    pub fn for_site(site: &Site, mut gpr: [u64; 16], rflags: u64, seed: u64) -> State {
        let page = |salt: u64| -> Vec<u8> {
            (0..PAGE / 8)
                .flat_map(|i| super::vcpu::mix(seed ^ salt ^ (i << 8)).to_le_bytes())
                .collect()
        };
        let mut stack = page(0x5354_0000_0000_0000);
        let data = page(0x4441_0000_0000_0000);
        let private = page(0x5052_0000_0000_0000);
        gpr[4] = (STACK + 0x400 + gpr[4] % 0x800) & !7;
        let base = match site.operand {
            patch_sites::Operand::MemBase(b) => Some(b),
            patch_sites::Operand::RegMemBase { base, .. } => Some(base),
            _ => None,
        };
        if let Some(b) = base.filter(|b| b.number() != 4) {
            let i = b.number() as usize;
            gpr[i] = DATA + gpr[i] % 0xf00;
        }
        // String port I/O: the buffer inside the data page (either direction), a short `rep`.
        match site.op() {
            Some(patch_sites::Op::Ins) => gpr[7] = DATA + 0x100 + gpr[7] % 0xd00,
            Some(patch_sites::Op::Outs) => gpr[6] = DATA + 0x100 + gpr[6] % 0xd00,
            _ => {}
        }
        if matches!(
            site.op(),
            Some(patch_sites::Op::Ins | patch_sites::Op::Outs)
        ) {
            gpr[1] %= 16;
        }
        match (site.op(), site.operand) {
            // Half the CR3 writes reload the current value (a flush, to some backends).
            (Some(patch_sites::Op::MovToCr3), patch_sites::Operand::Reg(r))
                if seed & 1 == 0 && r.number() != 4 =>
            {
                gpr[r.number() as usize] = Vcpu::new(seed, false).cr[3];
            }
            (Some(patch_sites::Op::Popf), _) => {
                let at = (gpr[4] - STACK) as usize;
                let v = u64::from_le_bytes(stack[at..at + 8].try_into().unwrap_or([0; 8])) & !TF;
                stack[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            (Some(patch_sites::Op::RestoreFl), patch_sites::Operand::Reg(r)) => {
                gpr[r.number() as usize] &= !TF;
            }
            _ => {}
        }
        State {
            gpr,
            rflags: (rflags & (super::STATUS_FLAGS | trap::IF | 0x400)) | 2,
            seed,
            stack,
            data,
            private,
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// At the end of the code under test.
    Reached,
    /// A fault that nothing handled (its vector is the last effect).
    Fault(u8),
    /// Still running after [`MAX_STEPS`] instructions, or stopped elsewhere.
    Runaway(u64),
    /// The emulator failed.
    Emulator(String),
    /// An image run left the code placed for it, for this address (a branch out of a moved
    /// range, a return).
    Left(u64),
}

/// A machine the oracle runs code on: unicorn with the virtual-CPU model ([`Engine`]), or real
/// ring-0 code under KVM (`crate::kvm::KvmExecutor`). Both leave a [`Run`], which the oracle's
/// one comparison (`differences`) reads, whichever ran it.
pub trait Executor {
    /// Its name, for reports.
    fn name(&self) -> &'static str;
    /// Runs from `start` to `until` with `code` placed, from `state`; `trap_site`'s trap is
    /// handled by the runtime's emulator; `hypervisor` answers the hypercall page. A run the
    /// machine could not carry out ends in [`End::Emulator`].
    fn execute(
        &mut self,
        code: &[(u64, &[u8])],
        start: u64,
        until: u64,
        state: &State,
        trap_site: Option<Site>,
        hypervisor: Hypervisor,
    ) -> Run;
}

impl Executor for Engine {
    fn name(&self) -> &'static str {
        "unicorn"
    }
    fn execute(
        &mut self,
        code: &[(u64, &[u8])],
        start: u64,
        until: u64,
        state: &State,
        trap_site: Option<Site>,
        hypervisor: Hypervisor,
    ) -> Run {
        self.run(code, start, until, state, trap_site, hypervisor)
    }
}

/// What a run left.
#[derive(Clone, Debug)]
pub struct Run {
    /// How it ended.
    pub end: End,
    /// General registers.
    pub gpr: [u64; 16],
    /// RFLAGS.
    pub rflags: u64,
    /// The stack page.
    pub stack: Vec<u8>,
    /// The data page.
    pub data: Vec<u8>,
    /// The private page.
    pub private: Vec<u8>,
    /// The virtual CPU, with its trace.
    pub vcpu: Vcpu,
    /// Instructions executed.
    pub steps: usize,
    /// The highest stack pointer any instruction of the run started with (what lies below it
    /// was free stack at that point).
    pub max_rsp: u64,
    /// An image run's pages mapped on demand (memory the code reached outside the placed code
    /// and the state's pages), with what they hold at the end.
    pub demand: Vec<(u64, Vec<u8>)>,
}

impl Run {
    /// A run the executor could not carry out, and why.
    pub fn failed(why: String, state: &State) -> Run {
        Run {
            end: End::Emulator(why),
            gpr: [0; 16],
            rflags: 0,
            stack: Vec::new(),
            data: Vec::new(),
            private: Vec::new(),
            vcpu: Vcpu::new(state.seed, false),
            steps: 0,
            max_rsp: 0,
            demand: Vec::new(),
        }
    }
}

/// An image run's bounds and its pages mapped on demand.
#[derive(Debug, Default)]
struct ImageRun {
    spans: Vec<(u64, u64)>,
    demand: Vec<u64>,
    left: Option<u64>,
    seed: u64,
}

/// The most pages one image run may map on demand.
const MAX_DEMAND: usize = 64;

/// What a page mapped on demand holds at first: derived from the run's seed and the page's
/// address, the same in both runs of a comparison.
pub fn demand_page(seed: u64, page: u64) -> Vec<u8> {
    (0..PAGE / 8)
        .flat_map(|i| super::vcpu::mix(seed ^ page ^ (i << 3) ^ 0x4445_4d41_4e44).to_le_bytes())
        .collect()
}

/// Per-run data the hooks see.
#[derive(Debug)]
struct Hooked {
    /// Where the run ends.
    until: u64,
    hypervisor: Hypervisor,
    vcpu: Vcpu,
    trap_site: Option<Site>,
    fault: Option<u8>,
    steps: usize,
    max_rsp: u64,
    error: Option<String>,
    image: Option<ImageRun>,
}

/// The reusable engine.
pub struct Engine {
    uc: Unicorn<'static, Hooked>,
    /// The CPU as created: restored before every run, so that nothing (a pending exception,
    /// a stop request) carries over from the last one.
    fresh: unicorn_engine::Context,
    /// What the relocation slots hold (see [`Engine::run`]).
    slots: Vec<u8>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

/// Why the engine could not be made.
#[derive(Debug, thiserror::Error)]
#[error("unicorn: {0}")]
pub struct EngineError(String);

fn uc_err(e: unicorn_engine::uc_error) -> EngineError {
    EngineError(format!("{e:?}"))
}

impl Engine {
    /// An x86-64 engine with the text, stack, data and private regions mapped and the hooks in.
    pub fn new() -> Result<Self, EngineError> {
        let data = Hooked {
            until: 0,
            hypervisor: Hypervisor::None,
            vcpu: Vcpu::new(0, false),
            trap_site: None,
            fault: None,
            steps: 0,
            max_rsp: 0,
            error: None,
            image: None,
        };
        let mut uc = Unicorn::new_with_data(Arch::X86, Mode::MODE_64, data).map_err(uc_err)?;
        uc.mem_map(CODE, CODE_SIZE, Prot::ALL).map_err(uc_err)?;
        for page in [STACK, DATA, PRIVATE] {
            uc.mem_map(page, PAGE, Prot::READ | Prot::WRITE)
                .map_err(uc_err)?;
        }
        uc.mem_map(HYPERCALL, PAGE, Prot::READ | Prot::EXEC)
            .map_err(uc_err)?;
        uc.mem_map(RELOC, RELOC_SIZE, Prot::ALL).map_err(uc_err)?;
        uc.mem_write(RELOC, &[0xcc; RELOC_SIZE as usize])
            .map_err(uc_err)?;
        uc.mem_write(HYPERCALL, &[0xcc; PAGE as usize])
            .map_err(uc_err)?;
        uc.add_code_hook(1, 0, on_instruction).map_err(uc_err)?;
        uc.add_mem_hook(
            unicorn_engine::HookType::MEM_WRITE,
            PRIVATE,
            PRIVATE + PAGE - 1,
            on_private_write,
        )
        .map_err(uc_err)?;
        uc.add_intr_hook(on_interrupt).map_err(uc_err)?;
        uc.add_mem_hook(unicorn_engine::HookType::MEM_UNMAPPED, 1, 0, on_unmapped)
            .map_err(uc_err)?;
        uc.add_insn_invalid_hook(on_invalid).map_err(uc_err)?;
        let fresh = uc.context_init().map_err(uc_err)?;
        Ok(Engine {
            uc,
            fresh,
            slots: vec![0xcc; RELOC_SIZE as usize],
        })
    }

    /// Runs from `start` until `until`, with `code` placed first (each `(address, bytes)`; the
    /// rest of the text region is `int3`), from `state`. `trap_site` is the site whose `ud2`
    /// or `int3` the runtime's trap emulator handles.
    ///
    /// Position-independent code alone (one piece from `start` to `until` with no RIP-relative
    /// operand and no branch, call or return: a native instruction or a trap, and NOPs) runs
    /// instead in a slot chosen by its bytes, which keeps its translation while it holds them:
    /// running the same bytes again translates nothing (translating is most of a short run's
    /// cost). Where such code runs is no part of what a run leaves (registers, flags, memory,
    /// effects); a trap site moves with it.
    pub fn run(
        &mut self,
        code: &[(u64, &[u8])],
        start: u64,
        until: u64,
        state: &State,
        trap_site: Option<Site>,
        hypervisor: Hypervisor,
    ) -> Run {
        if let [(at, bytes)] = code
            && *at == start
            && start.checked_add(bytes.len() as u64) == Some(until)
            && trap_site.is_none_or(|s| s.stub.is_none())
            && let Some(slot) = self.slot_for(bytes)
        {
            let delta = slot.wrapping_sub(start);
            let trap = trap_site.map(|s| Site {
                addr: s.addr.wrapping_add(delta),
                ..s
            });
            let end = slot + bytes.len() as u64;
            let mut r = self
                .execute(slot, end, state, trap, hypervisor)
                .unwrap_or_else(|e| Run::failed(e.0, state));
            if let End::Runaway(rip) = r.end
                && (slot..slot + SLOT).contains(&rip)
            {
                r.end = End::Runaway(rip.wrapping_sub(delta));
            }
            return r;
        }
        self.try_run(code, start, until, state, trap_site, hypervisor)
            .unwrap_or_else(|e| Run::failed(e.0, state))
    }

    /// The slot `bytes` run in, written there (and its old translation dropped) unless it holds
    /// them already; `None` if they are not position-independent or too long for a slot.
    fn slot_for(&mut self, bytes: &[u8]) -> Option<u64> {
        use iced_x86::FlowControl;
        if bytes.is_empty() || bytes.len() as u64 > SLOT - 16 {
            return None;
        }
        let mut d = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
        while d.can_decode() {
            let i = d.decode();
            let flow = i.flow_control();
            if i.is_invalid()
                || i.is_ip_rel_memory_operand()
                || !matches!(
                    flow,
                    FlowControl::Next | FlowControl::Exception | FlowControl::Interrupt
                )
            {
                return None;
            }
        }
        // FNV-1a over the bytes picks the slot.
        let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        let off = (hash % (RELOC_SIZE / SLOT)) * SLOT;
        let held = &mut self.slots[off as usize..(off + SLOT) as usize];
        if &held[..bytes.len()] != bytes || held[bytes.len()..].iter().any(|&b| b != 0xcc) {
            held.fill(0xcc);
            held[..bytes.len()].copy_from_slice(bytes);
            let at = RELOC + off;
            self.uc.mem_write(at, held).ok()?;
            self.uc.ctl_remove_cache(at, at + SLOT).ok()?;
        }
        Some(RELOC + off)
    }

    /// Runs code placed at arbitrary addresses of the low physical space (a kernel's code,
    /// translated there): the pages of `code` are mapped for this run only, filled with `int3`
    /// around it, and the run ends when it leaves `code` ([`End::Left`]) or reaches `until`.
    /// Memory it reaches outside the state's pages is mapped on demand ([`demand_page`]) and
    /// returned in [`Run::demand`].
    pub fn run_image(
        &mut self,
        code: &[(u64, &[u8])],
        start: u64,
        until: u64,
        state: &State,
        hypervisor: Hypervisor,
    ) -> Run {
        let mut pages: Vec<u64> = code
            .iter()
            .filter(|(_, b)| !b.is_empty())
            .flat_map(|(a, b)| {
                let first = a & !(PAGE - 1);
                let last = (a + b.len() as u64 - 1) & !(PAGE - 1);
                (first..=last).step_by(PAGE as usize)
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        let placed = (|| -> Result<(), EngineError> {
            for &p in &pages {
                self.uc.mem_map(p, PAGE, Prot::ALL).map_err(uc_err)?;
                self.uc
                    .mem_write(p, &[0xcc; PAGE as usize])
                    .map_err(uc_err)?;
            }
            for (a, b) in code {
                self.uc.mem_write(*a, b).map_err(uc_err)?;
            }
            // Code translated for an earlier run at these addresses must not be reused.
            for &p in &pages {
                self.uc.ctl_remove_cache(p, p + PAGE).map_err(uc_err)?;
            }
            Ok(())
        })();
        self.uc.get_data_mut().image = Some(ImageRun {
            spans: code
                .iter()
                .map(|(a, b)| (*a, *a + b.len() as u64))
                .collect(),
            demand: Vec::new(),
            left: None,
            seed: state.seed,
        });
        let run = placed.and_then(|()| self.execute(start, until, state, None, hypervisor));
        let image = self.uc.get_data_mut().image.take().unwrap_or_default();
        let mut demand = Vec::new();
        for &p in &image.demand {
            let mut b = vec![0; PAGE as usize];
            if self.uc.mem_read(p, &mut b).is_ok() {
                demand.push((p, b));
            }
            let _ = self.uc.mem_unmap(p, PAGE);
        }
        for &p in &pages {
            let _ = self.uc.mem_unmap(p, PAGE);
        }
        demand.sort();
        match run {
            Ok(mut r) => {
                if let (Some(a), false) = (image.left, matches!(r.end, End::Emulator(_))) {
                    r.end = End::Left(a);
                }
                r.demand = demand;
                r
            }
            Err(e) => Run {
                demand,
                ..Run::failed(e.0, state)
            },
        }
    }

    fn try_run(
        &mut self,
        code: &[(u64, &[u8])],
        start: u64,
        until: u64,
        state: &State,
        trap_site: Option<Site>,
        hypervisor: Hypervisor,
    ) -> Result<Run, EngineError> {
        let uc = &mut self.uc;
        // Fill the text around what is placed with int3, so that a stray jump faults.
        let mut spans: Vec<(u64, u64)> = code
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.push((start, until));
        for &(a, e) in &spans {
            let lo = a.saturating_sub(64).max(CODE);
            let hi = (e + 64).min(CODE + CODE_SIZE);
            uc.mem_write(lo, &vec![0xcc; (hi - lo) as usize])
                .map_err(uc_err)?;
        }
        for (a, b) in code {
            uc.mem_write(*a, b).map_err(uc_err)?;
        }
        uc.ctl_remove_cache(CODE, CODE + CODE_SIZE)
            .map_err(uc_err)?;
        self.execute(start, until, state, trap_site, hypervisor)
    }

    /// Runs the code in place from `state`.
    fn execute(
        &mut self,
        start: u64,
        until: u64,
        state: &State,
        trap_site: Option<Site>,
        hypervisor: Hypervisor,
    ) -> Result<Run, EngineError> {
        let uc = &mut self.uc;
        uc.context_restore(&self.fresh).map_err(uc_err)?;
        uc.mem_write(STACK, &state.stack).map_err(uc_err)?;
        uc.mem_write(DATA, &state.data).map_err(uc_err)?;
        uc.mem_write(PRIVATE, &state.private).map_err(uc_err)?;
        for (r, v) in GPRS.iter().zip(state.gpr) {
            uc.reg_write(*r, v).map_err(uc_err)?;
        }
        uc.reg_write(RegisterX86::RFLAGS, state.rflags)
            .map_err(uc_err)?;
        let interrupts = state.rflags & trap::IF != 0;
        let image = uc.get_data_mut().image.take();
        *uc.get_data_mut() = Hooked {
            until,
            hypervisor,
            vcpu: Vcpu::new(state.seed, interrupts),
            trap_site,
            fault: None,
            steps: 0,
            max_rsp: state.gpr[4],
            error: None,
            image,
        };
        let result = uc.emu_start(start, until, 0, MAX_STEPS);
        let mut gpr = [0u64; 16];
        for (r, v) in GPRS.iter().zip(gpr.iter_mut()) {
            *v = uc.reg_read(*r).map_err(uc_err)?;
        }
        let rip = uc.reg_read(RegisterX86::RIP).map_err(uc_err)?;
        let rflags = uc.reg_read(RegisterX86::RFLAGS).map_err(uc_err)?;
        let mut stack = vec![0; PAGE as usize];
        let mut data = vec![0; PAGE as usize];
        let mut private = vec![0; PAGE as usize];
        uc.mem_read(STACK, &mut stack).map_err(uc_err)?;
        uc.mem_read(DATA, &mut data).map_err(uc_err)?;
        uc.mem_read(PRIVATE, &mut private).map_err(uc_err)?;
        let h = uc.get_data_mut();
        let mut vcpu = std::mem::replace(&mut h.vcpu, Vcpu::new(0, false));
        let end = if let Some(e) = h.error.take() {
            End::Emulator(e)
        } else if let Some(v) = h.fault {
            End::Fault(v)
        } else if let Err(e) = result {
            // An access outside the mapped pages and the like: the CPU would fault.
            vcpu.record(Effect::Fault(fault_vector(e)));
            End::Fault(fault_vector(e))
        } else if rip == until {
            vcpu.see_flags(rflags);
            End::Reached
        } else {
            End::Runaway(rip)
        };
        Ok(Run {
            end,
            gpr,
            rflags,
            stack,
            data,
            private,
            vcpu,
            steps: h.steps,
            max_rsp: h.max_rsp,
            demand: Vec::new(),
        })
    }
}

/// The vector a CPU would raise where unicorn reports an error.
fn fault_vector(e: unicorn_engine::uc_error) -> u8 {
    use unicorn_engine::uc_error as E;
    match e {
        E::INSN_INVALID => 6,
        E::READ_UNMAPPED | E::WRITE_UNMAPPED | E::FETCH_UNMAPPED => 14,
        E::READ_PROT | E::WRITE_PROT | E::FETCH_PROT => 14,
        _ => 13,
    }
}

fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    GPRS_ICED.iter().position(|x| *x == full)
}

/// The general registers in the ABI's order, as iced names them.
pub const GPRS_ICED: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

type Uc<'a> = Unicorn<'a, Hooked>;

fn read_gpr(uc: &Uc<'_>, i: usize) -> u64 {
    uc.reg_read(GPRS[i]).unwrap_or(0)
}

fn write_gpr(uc: &mut Uc<'_>, i: usize, v: u64) {
    let _ = uc.reg_write(GPRS[i], v);
}

fn fail(uc: &mut Uc<'_>, why: String) {
    uc.get_data_mut().error = Some(why);
    let _ = uc.emu_stop();
}

/// An access to unmapped memory: in an image run, a fetch leaves the placed code, and data is
/// mapped on demand (up to [`MAX_DEMAND`] pages); otherwise it faults.
fn on_unmapped(
    uc: &mut Uc<'_>,
    ty: unicorn_engine::MemType,
    addr: u64,
    size: usize,
    _: i64,
) -> bool {
    let Some(img) = uc.get_data_mut().image.as_mut() else {
        return false;
    };
    if ty == unicorn_engine::MemType::FETCH_UNMAPPED {
        img.left = Some(addr);
        return false;
    }
    let seed = img.seed;
    let first = addr & !(PAGE - 1);
    let last = addr.saturating_add(size.max(1) as u64 - 1) & !(PAGE - 1);
    for p in [first, last] {
        match uc.get_data().image.as_ref() {
            Some(i) if i.demand.contains(&p) => continue,
            Some(i) if i.demand.len() < MAX_DEMAND => {}
            _ => return false,
        }
        if uc.mem_map(p, PAGE, Prot::READ | Prot::WRITE).is_err()
            || uc.mem_write(p, &demand_page(seed, p)).is_err()
        {
            return false;
        }
        if let Some(i) = uc.get_data_mut().image.as_mut() {
            i.demand.push(p);
        }
    }
    true
}

/// A write to the private page, seen when a hypervisor owns it.
fn on_private_write(
    uc: &mut Uc<'_>,
    _: unicorn_engine::MemType,
    addr: u64,
    size: usize,
    value: i64,
) -> bool {
    let h = uc.get_data_mut();
    if h.hypervisor != Hypervisor::None {
        h.vcpu.record(Effect::Store {
            addr,
            size: size as u8,
            value: value as u64,
        });
    }
    true
}

/// A call into the hypercall page: recorded with its arguments and what they point to, carried
/// out as far as the hypervisor's side goes (Xen's `SCHEDOP_block` unmasks events), and
/// returned from with status 0.
fn hypercall(uc: &mut Uc<'_>, addr: u64) {
    let hv = uc.get_data().hypervisor;
    let r = |uc: &Uc<'_>, i: usize| read_gpr(uc, i);
    let (nr, args, ptr) = match hv {
        Hypervisor::Xen => {
            let args = [r(uc, 7), r(uc, 6), r(uc, 2), r(uc, 10), r(uc, 8)];
            (
                (addr - HYPERCALL) / super::published::xen::HYPERCALL_STRIDE,
                args,
                args[0],
            )
        }
        _ => {
            let args = [r(uc, 1), r(uc, 2), r(uc, 8), 0, 0];
            (args[0], args, args[1])
        }
    };
    let mut raw = [0u8; 32];
    let mem = if uc.mem_read(ptr, &mut raw).is_ok() {
        core::array::from_fn(|i| {
            u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
        })
    } else {
        [0; 4]
    };
    uc.get_data_mut()
        .vcpu
        .record(Effect::Hypercall { nr, args, mem });
    if hv == Hypervisor::Xen
        && nr == super::published::xen::HYPERVISOR_SCHED_OP
        && args[0] == super::published::xen::SCHEDOP_BLOCK
    {
        let _ = uc.mem_write(PRIVATE + 1, &[0]);
    }
    write_gpr(uc, 0, 0);
    let rsp = read_gpr(uc, 4);
    let mut ret = [0u8; 8];
    if uc.mem_read(rsp, &mut ret).is_err() {
        fail(uc, "hypercall: the return address cannot be read".into());
        return;
    }
    write_gpr(uc, 4, rsp + 8);
    resume_at(uc, u64::from_le_bytes(ret));
}

/// Resumes at `rip`, or, when only NOPs lie between it and the end of the run, at the end,
/// stopping there: NOPs change nothing, and translating the padding after a site would be a
/// second block of every short run (most of its cost).
fn resume_at(uc: &mut Uc<'_>, rip: u64) {
    let until = uc.get_data().until;
    let target = if rip < until && only_nops(uc, rip, until) {
        until
    } else {
        rip
    };
    let _ = uc.reg_write(RegisterX86::RIP, target);
    if target == until {
        let _ = uc.emu_stop();
    }
}

/// Whether `from..until` holds NOPs and nothing else (at most 64 bytes are looked at).
fn only_nops(uc: &Uc<'_>, from: u64, until: u64) -> bool {
    let n = (until - from) as usize;
    let mut b = [0u8; 64];
    if n > b.len() || uc.mem_read(from, &mut b[..n]).is_err() {
        return false;
    }
    let mut d = Decoder::with_ip(64, &b[..n], from, DecoderOptions::NONE);
    while d.can_decode() {
        if d.decode().mnemonic() != Mnemonic::Nop {
            return false;
        }
    }
    true
}

/// Before every instruction: count it, see IF, and carry out a sensitive instruction on the
/// virtual CPU instead of the emulator.
fn on_instruction(uc: &mut Uc<'_>, addr: u64, size: u32) {
    if (HYPERCALL..HYPERCALL + PAGE).contains(&addr) && uc.get_data().hypervisor != Hypervisor::None
    {
        uc.get_data_mut().steps += 1;
        hypercall(uc, addr);
        return;
    }
    if let Some(img) = uc.get_data_mut().image.as_mut()
        && !img.spans.iter().any(|&(a, e)| (a..e).contains(&addr))
    {
        img.left = Some(addr);
        let _ = uc.emu_stop();
        return;
    }
    let rflags = uc.reg_read(RegisterX86::RFLAGS).unwrap_or(0);
    let rsp = read_gpr(uc, 4);
    {
        let h = uc.get_data_mut();
        h.steps += 1;
        h.max_rsp = h.max_rsp.max(rsp);
        h.vcpu.see_flags(rflags);
    }
    let _ = size;
    let Some(insn) = fetch(uc, addr) else {
        return;
    };
    if insn.mnemonic() == Mnemonic::Popfq && uc.get_data().image.is_some() {
        // A kernel never single-steps itself: a flags image with TF that moved code loads
        // (from memory the state filled at random) would trap at a point that depends on
        // where the code runs, not on what it does. Image runs load flags without TF.
        let Some(b) = load::<8>(uc, rsp) else {
            return;
        };
        const KEEP: u64 = (1 << 17) | (1 << 19) | (1 << 20); // VM, VIF, VIP
        const RF: u64 = 1 << 16;
        let new = (rflags & KEEP) | (u64::from_le_bytes(b) & !(KEEP | RF | TF) & 0x3f_7fd5) | 2;
        let _ = uc.reg_write(RegisterX86::RFLAGS, new);
        write_gpr(uc, 4, rsp.wrapping_add(8));
        uc.get_data_mut().vcpu.see_flags(new);
        resume_at(uc, addr + insn.len() as u64);
        return;
    }
    run_model(uc, addr, &insn, rflags);
}

/// The instruction at `addr` (unicorn's idea of its size is wrong for those it cannot run).
fn fetch(uc: &Uc<'_>, addr: u64) -> Option<Instruction> {
    let mut bytes = [0u8; 15];
    let n = (1..=15)
        .rev()
        .find(|&n| uc.mem_read(addr, &mut bytes[..n]).is_ok())?;
    let insn = Decoder::with_ip(64, &bytes[..n], addr, DecoderOptions::NONE).decode();
    (!insn.is_invalid()).then_some(insn)
}

/// Carries out `insn` at `addr` on the virtual CPU if the model owns it; whether it did.
fn run_model(uc: &mut Uc<'_>, addr: u64, insn: &Instruction, rflags: u64) -> bool {
    match model(uc, insn, rflags) {
        Ok(Step::Next) => {
            // Skip the instruction: the virtual CPU did it.
            resume_at(uc, addr + insn.len() as u64);
            true
        }
        Ok(Step::Again) => {
            // One iteration of a `rep` string instruction: back for the next one.
            if uc.get_data().steps >= MAX_STEPS {
                let _ = uc.emu_stop();
            }
            let _ = uc.reg_write(RegisterX86::RIP, addr);
            true
        }
        Ok(Step::Emulate) => false,
        Err(why) => {
            fail(uc, format!("{addr:#x} {insn}: {why}"));
            true
        }
    }
}

/// What the model did with an instruction.
enum Step {
    /// Nothing: the emulator runs it.
    Emulate,
    /// All of it: continue after it.
    Next,
    /// One iteration of a `rep` instruction that has more to do.
    Again,
}

/// Makes `len` bytes at `addr` accessible: in an image run, pages are mapped on demand as the
/// code's own accesses would map them.
fn reachable(uc: &mut Uc<'_>, addr: u64, len: usize) -> bool {
    let mut probe = vec![0u8; len];
    if uc.mem_read(addr, &mut probe).is_ok() {
        return true;
    }
    uc.get_data().image.is_some()
        && on_unmapped(uc, unicorn_engine::MemType::READ_UNMAPPED, addr, len, 0)
        && uc.mem_read(addr, &mut probe).is_ok()
}

/// Reads `N` bytes the model needs, or raises #PF.
fn load<const N: usize>(uc: &mut Uc<'_>, addr: u64) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    if reachable(uc, addr, N) && uc.mem_read(addr, &mut b).is_ok() {
        Some(b)
    } else {
        page_fault(uc);
        None
    }
}

/// Writes bytes for the model, or raises #PF.
fn store(uc: &mut Uc<'_>, addr: u64, b: &[u8]) -> bool {
    if reachable(uc, addr, b.len()) && uc.mem_write(addr, b).is_ok() {
        true
    } else {
        page_fault(uc);
        false
    }
}

fn page_fault(uc: &mut Uc<'_>) {
    let h = uc.get_data_mut();
    h.fault = Some(14);
    h.vcpu.record(Effect::Fault(14));
    let _ = uc.emu_stop();
}

/// The address of `insn`'s memory operand (operand `n`).
fn address(uc: &Uc<'_>, insn: &Instruction, n: u32) -> Result<u64, String> {
    let regs: Vec<u64> = (0..16).map(|i| read_gpr(uc, i)).collect();
    insn.virtual_address(n, 0, |r, _, _| match r {
        Register::FS | Register::GS | Register::ES | Register::DS | Register::SS | Register::CS => {
            Some(0)
        }
        _ => gpr_index(r).map(|i| regs[i]),
    })
    .ok_or_else(|| "no address".into())
}

/// Carries out `insn` on the virtual CPU if it is one the model owns; `Ok(false)` if the
/// emulator should run it.
fn model(uc: &mut Uc<'_>, insn: &Instruction, rflags: u64) -> Result<Step, String> {
    let reg = |i: u32| insn.op_register(i);
    match insn.mnemonic() {
        Mnemonic::Mov
            if insn.op_count() == 2
                && insn.op0_kind() == OpKind::Register
                && insn.op1_kind() == OpKind::Register
                && [reg(0), reg(1)].iter().any(|r| r.is_cr() || r.is_dr()) =>
        {
            // mov crN/drN, reg or mov reg, crN/drN.
            let to = reg(0).is_cr() || reg(0).is_dr();
            let (ctl, g) = if to {
                (reg(0), reg(1))
            } else {
                (reg(1), reg(0))
            };
            let i = gpr_index(g).ok_or("the other operand is not a GPR")?;
            let n = ctl.number() as u8;
            match (to, ctl.is_cr()) {
                (true, true) => {
                    let v = read_gpr(uc, i);
                    uc.get_data_mut().vcpu.write_cr(n, v)
                }
                (true, false) => {
                    let v = read_gpr(uc, i);
                    uc.get_data_mut().vcpu.write_dr(n, v)
                }
                (false, true) => {
                    let v = uc.get_data().vcpu.read_cr(n);
                    write_gpr(uc, i, v)
                }
                (false, false) => {
                    let v = uc.get_data().vcpu.read_dr(n);
                    write_gpr(uc, i, v)
                }
            }
        }
        Mnemonic::Rdmsr => {
            let v = uc.get_data().vcpu.rdmsr(read_gpr(uc, 1) as u32);
            write_gpr(uc, 0, v & 0xffff_ffff);
            write_gpr(uc, 2, v >> 32);
        }
        Mnemonic::Wrmsr => {
            let v = (read_gpr(uc, 2) << 32) | (read_gpr(uc, 0) & 0xffff_ffff);
            let msr = read_gpr(uc, 1) as u32;
            uc.get_data_mut().vcpu.wrmsr(msr, v);
        }
        Mnemonic::In => {
            let width = reg(0).size() as u8;
            let port = if insn.op1_kind() == OpKind::Immediate8 {
                insn.immediate8() as u16
            } else {
                read_gpr(uc, 2) as u16
            };
            let v = uc.get_data_mut().vcpu.port_in(port, width) as u64;
            let old = read_gpr(uc, 0);
            let new = match width {
                1 => (old & !0xff) | v,
                2 => (old & !0xffff) | v,
                _ => v,
            };
            write_gpr(uc, 0, new);
        }
        Mnemonic::Out => {
            let width = reg(1).size() as u8;
            let port = if insn.op0_kind() == OpKind::Immediate8 {
                insn.immediate8() as u16
            } else {
                read_gpr(uc, 2) as u16
            };
            let v = read_gpr(uc, 0) as u32;
            uc.get_data_mut().vcpu.port_out(port, width, v);
        }
        Mnemonic::Invlpg => {
            let regs: Vec<u64> = (0..16).map(|i| read_gpr(uc, i)).collect();
            let a = insn
                .virtual_address(0, 0, |r, _, _| gpr_index(r).map(|i| regs[i]).or(Some(0)))
                .ok_or("no address")?;
            uc.get_data_mut().vcpu.record(Effect::Invlpg(a));
        }
        Mnemonic::Wbinvd => uc
            .get_data_mut()
            .vcpu
            .record(Effect::Caches { discard: false }),
        Mnemonic::Invd => uc
            .get_data_mut()
            .vcpu
            .record(Effect::Caches { discard: true }),
        Mnemonic::Hlt => uc.get_data_mut().vcpu.halt(rflags & trap::IF != 0),
        Mnemonic::Cpuid => {
            let r = uc
                .get_data()
                .vcpu
                .cpuid(read_gpr(uc, 0) as u32, read_gpr(uc, 1) as u32);
            write_gpr(uc, 0, r[0] as u64);
            write_gpr(uc, 3, r[1] as u64);
            write_gpr(uc, 1, r[2] as u64);
            write_gpr(uc, 2, r[3] as u64);
        }
        Mnemonic::Rdtsc => {
            let t = uc.get_data_mut().vcpu.rdtsc();
            write_gpr(uc, 0, t & 0xffff_ffff);
            write_gpr(uc, 2, t >> 32);
        }
        Mnemonic::Rdtscp => {
            let t = uc.get_data_mut().vcpu.rdtsc();
            let aux = uc.get_data().vcpu.rdmsr(super::vcpu::MSR_TSC_AUX) & 0xffff_ffff;
            write_gpr(uc, 0, t & 0xffff_ffff);
            write_gpr(uc, 2, t >> 32);
            write_gpr(uc, 1, aux);
        }
        Mnemonic::Rdrand | Mnemonic::Rdseed => {
            let r = reg(0);
            let i = gpr_index(r).ok_or("not a general register")?;
            let v = uc.get_data_mut().vcpu.random();
            let old = read_gpr(uc, i);
            write_gpr(
                uc,
                i,
                match r.size() {
                    2 => (old & !0xffff) | (v & 0xffff),
                    4 => v & 0xffff_ffff,
                    _ => v,
                },
            );
            // A value was ready: CF set; OF, SF, ZF, AF and PF clear.
            const CLEAR: u64 = (1 << 11) | (1 << 7) | (1 << 6) | (1 << 4) | (1 << 2);
            let _ = uc.reg_write(RegisterX86::RFLAGS, (rflags & !CLEAR) | 1);
        }
        Mnemonic::Swapgs => uc.get_data_mut().vcpu.swapgs(),
        Mnemonic::Lgdt | Mnemonic::Lidt => {
            let which = u8::from(insn.mnemonic() == Mnemonic::Lidt);
            let a = address(uc, insn, 0)?;
            let Some(b) = load::<10>(uc, a) else {
                return Ok(Step::Next);
            };
            let limit = u16::from_le_bytes([b[0], b[1]]);
            let base = u64::from_le_bytes(b[2..].try_into().unwrap_or([0; 8]));
            let v = &mut uc.get_data_mut().vcpu;
            v.tables[which as usize] = (limit, base);
            v.record(Effect::LoadTable { which, limit, base });
        }
        Mnemonic::Sgdt | Mnemonic::Sidt => {
            let which = usize::from(insn.mnemonic() == Mnemonic::Sidt);
            let (limit, base) = uc.get_data().vcpu.tables[which];
            let mut b = [0u8; 10];
            b[..2].copy_from_slice(&limit.to_le_bytes());
            b[2..].copy_from_slice(&base.to_le_bytes());
            let a = address(uc, insn, 0)?;
            store(uc, a, &b);
        }
        Mnemonic::Lldt | Mnemonic::Ltr => {
            let which = u8::from(insn.mnemonic() == Mnemonic::Ltr);
            let selector = if insn.op0_kind() == OpKind::Register {
                read_gpr(uc, gpr_index(reg(0)).ok_or("not a GPR")?) as u16
            } else {
                let a = address(uc, insn, 0)?;
                match load::<2>(uc, a) {
                    Some(b) => u16::from_le_bytes(b),
                    None => return Ok(Step::Next),
                }
            };
            let v = &mut uc.get_data_mut().vcpu;
            v.selectors[which as usize] = selector;
            v.record(Effect::LoadSelector { which, selector });
        }
        Mnemonic::Sldt | Mnemonic::Str | Mnemonic::Smsw => {
            let value = match insn.mnemonic() {
                Mnemonic::Sldt => uc.get_data().vcpu.selectors[0] as u64,
                Mnemonic::Str => uc.get_data().vcpu.selectors[1] as u64,
                _ => uc.get_data().vcpu.cr[0],
            };
            if insn.op0_kind() == OpKind::Register {
                let r = reg(0);
                let i = gpr_index(r).ok_or("not a GPR")?;
                let old = read_gpr(uc, i);
                // A 16-bit destination keeps the rest of the register; wider ones get the
                // selector zero-extended, or CR0 (smsw stores all of it a register holds).
                let new = match (r.size(), insn.mnemonic() == Mnemonic::Smsw) {
                    (2, _) => (old & !0xffff) | (value & 0xffff),
                    (4, true) => value & 0xffff_ffff,
                    (_, true) => value,
                    (_, false) => value & 0xffff,
                };
                write_gpr(uc, i, new);
            } else {
                let a = address(uc, insn, 0)?;
                store(uc, a, &(value as u16).to_le_bytes());
            }
        }
        Mnemonic::Insb
        | Mnemonic::Insw
        | Mnemonic::Insd
        | Mnemonic::Outsb
        | Mnemonic::Outsw
        | Mnemonic::Outsd => {
            let width: u8 = match insn.mnemonic() {
                Mnemonic::Insb | Mnemonic::Outsb => 1,
                Mnemonic::Insw | Mnemonic::Outsw => 2,
                _ => 4,
            };
            let rep = insn.has_rep_prefix();
            if rep && read_gpr(uc, 1) == 0 {
                return Ok(Step::Next);
            }
            let port = read_gpr(uc, 2) as u16;
            let step = if rflags & 0x400 != 0 {
                (width as u64).wrapping_neg()
            } else {
                width as u64
            };
            let ins = matches!(
                insn.mnemonic(),
                Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd
            );
            if ins {
                let at = read_gpr(uc, 7);
                let v = uc.get_data_mut().vcpu.port_in(port, width);
                if !store(uc, at, &v.to_le_bytes()[..width as usize]) {
                    return Ok(Step::Next);
                }
                write_gpr(uc, 7, at.wrapping_add(step));
            } else {
                let at = read_gpr(uc, 6);
                let Some(b) = load::<4>(uc, at) else {
                    return Ok(Step::Next);
                };
                let v = u32::from_le_bytes(b) & (u32::MAX >> (32 - 8 * width as u32));
                uc.get_data_mut().vcpu.port_out(port, width, v);
                write_gpr(uc, 6, at.wrapping_add(step));
            }
            if rep {
                let n = read_gpr(uc, 1) - 1;
                write_gpr(uc, 1, n);
                if n != 0 {
                    return Ok(Step::Again);
                }
            }
        }
        Mnemonic::Xsetbv => {
            let value = (read_gpr(uc, 2) << 32) | (read_gpr(uc, 0) & 0xffff_ffff);
            let xcr = read_gpr(uc, 1) as u32;
            uc.get_data_mut().vcpu.record(Effect::Xsetbv { xcr, value });
        }
        Mnemonic::Rdpmc => {
            let v = uc.get_data().vcpu.rdpmc(read_gpr(uc, 1) as u32);
            write_gpr(uc, 0, v & 0xffff_ffff);
            write_gpr(uc, 2, v >> 32);
        }
        Mnemonic::Invpcid => {
            let kind = read_gpr(uc, gpr_index(reg(0)).ok_or("the type is not a GPR")?);
            let a = address(uc, insn, 1)?;
            let Some(raw) = load::<16>(uc, a) else {
                return Ok(Step::Next);
            };
            let desc = [
                u64::from_le_bytes(raw[..8].try_into().unwrap_or([0; 8])),
                u64::from_le_bytes(raw[8..].try_into().unwrap_or([0; 8])),
            ];
            uc.get_data_mut()
                .vcpu
                .record(Effect::Invpcid { kind, desc });
        }
        Mnemonic::Clts => uc.get_data_mut().vcpu.clts(),
        _ => return Ok(Step::Emulate),
    }
    Ok(Step::Next)
}

/// `#UD` (unicorn reports invalid instructions apart from other exceptions): a trap site's
/// `ud2` goes to the runtime's emulator; anything else is a fault.
fn on_invalid(uc: &mut Uc<'_>) -> bool {
    let rip = uc.reg_read(RegisterX86::RIP).unwrap_or(0);
    if emulate_trap(uc, rip) {
        return true;
    }
    // An instruction unicorn does not implement (invpcid) that the model owns.
    let rflags = uc.reg_read(RegisterX86::RFLAGS).unwrap_or(0);
    if let Some(insn) = fetch(uc, rip)
        && run_model(uc, rip, &insn, rflags)
    {
        return true;
    }
    let h = uc.get_data_mut();
    h.fault = Some(6);
    h.vcpu.record(Effect::Fault(6));
    false
}

/// Any other exception: `int3` at a trap site goes to the emulator (it reports the address
/// after it); anything else is a fault that ends the run.
fn on_interrupt(uc: &mut Uc<'_>, intno: u32) {
    let rip = uc.reg_read(RegisterX86::RIP).unwrap_or(0);
    if intno == 3 && emulate_trap(uc, rip.wrapping_sub(1)) {
        return;
    }
    let h = uc.get_data_mut();
    h.fault = Some(intno as u8);
    h.vcpu.record(Effect::Fault(intno as u8));
    let _ = uc.emu_stop();
}

/// The kernel's `#UD`/`#BP` handler for trap sites: the runtime's emulator on the virtual CPU,
/// if the trap at `at` is the trap site's.
fn emulate_trap(uc: &mut Uc<'_>, at: u64) -> bool {
    let Some(site) = uc.get_data().trap_site.filter(|s| s.patch_addr() == at) else {
        return false;
    };
    let mut frame = Frame {
        gpr: [0; 16],
        rip: at,
        rflags: uc.reg_read(RegisterX86::RFLAGS).unwrap_or(0),
    };
    for (i, g) in frame.gpr.iter_mut().enumerate() {
        *g = read_gpr(uc, i);
    }
    let mut exec = UcExec { uc };
    if let Err(e) = trap::emulate(&site, &mut frame, &mut exec) {
        fail(uc, format!("trap at {at:#x}: {e}"));
        return true;
    }
    for (i, g) in frame.gpr.iter().enumerate() {
        write_gpr(uc, i, *g);
    }
    let _ = uc.reg_write(RegisterX86::RFLAGS, frame.rflags);
    resume_at(uc, frame.rip);
    true
}

/// The runtime's [`Exec`] on the virtual CPU and the engine's memory.
struct UcExec<'u, 'a> {
    uc: &'u mut Uc<'a>,
}

impl Exec for UcExec<'_, '_> {
    fn port_in(&mut self, port: u16, width: u8) -> u32 {
        self.uc.get_data_mut().vcpu.port_in(port, width)
    }
    fn port_out(&mut self, port: u16, width: u8, value: u32) {
        self.uc.get_data_mut().vcpu.port_out(port, width, value)
    }
    fn read_cr(&mut self, n: u8) -> u64 {
        self.uc.get_data().vcpu.read_cr(n)
    }
    fn write_cr(&mut self, n: u8, v: u64) {
        self.uc.get_data_mut().vcpu.write_cr(n, v)
    }
    fn read_dr(&mut self, n: u8) -> u64 {
        self.uc.get_data().vcpu.read_dr(n)
    }
    fn write_dr(&mut self, n: u8, v: u64) {
        self.uc.get_data_mut().vcpu.write_dr(n, v)
    }
    fn rdmsr(&mut self, msr: u32) -> u64 {
        self.uc.get_data().vcpu.rdmsr(msr)
    }
    fn wrmsr(&mut self, msr: u32, v: u64) {
        self.uc.get_data_mut().vcpu.wrmsr(msr, v)
    }
    fn cpuid(&mut self, leaf: u32, sub: u32) -> [u32; 4] {
        self.uc.get_data().vcpu.cpuid(leaf, sub)
    }
    fn invlpg(&mut self, addr: u64) {
        self.uc.get_data_mut().vcpu.record(Effect::Invlpg(addr))
    }
    fn flush_caches(&mut self, discard: bool) {
        self.uc
            .get_data_mut()
            .vcpu
            .record(Effect::Caches { discard })
    }
    fn halt(&mut self, interrupts: bool) {
        self.uc.get_data_mut().vcpu.halt(interrupts)
    }
    fn rdtsc(&mut self) -> u64 {
        self.uc.get_data_mut().vcpu.rdtsc()
    }
    fn swapgs(&mut self) {
        self.uc.get_data_mut().vcpu.swapgs()
    }
    fn clts(&mut self) {
        self.uc.get_data_mut().vcpu.clts()
    }
    fn read_u64(&mut self, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        if self.uc.mem_read(addr, &mut b).is_err() {
            fail(self.uc, format!("trap handler: read of {addr:#x} faults"));
        }
        u64::from_le_bytes(b)
    }
    fn write_u64(&mut self, addr: u64, v: u64) {
        if self.uc.mem_write(addr, &v.to_le_bytes()).is_err() {
            fail(self.uc, format!("trap handler: write of {addr:#x} faults"));
        }
    }
}
