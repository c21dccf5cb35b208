//! One backend's rewrites of an image, planned and applied offline (`pvpatch plan`, `pvpatch
//! rewrite`): through the boot-time runtime's own planner, checks and poker, on the file's bytes
//! instead of a running kernel's text. A vendor who ships a kernel for one hypervisor can
//! specialise it once; anyone can see what a backend would make of every site.
//!
//! The site table is the image's own (an annotated image) or the one `pvpatch annotate` would
//! write (built in memory). A ROM is validated against it as the runtime validates it, and its
//! code goes into the table's arena, as do the out-of-line backend's thunks.

use std::fmt;

use patch_sites::table::{SiteTable, TableError};
use patch_sites::{Outcome, Rom};
use pvpatch_runtime::apply::{self, TextPoke};
use pvpatch_runtime::arena;
use pvpatch_runtime::backend::{Backend, LoadedRom};
use pvpatch_runtime::detect::{BackendKind, Detected, KVM_FEATURE_NOP_IO_DELAY};
use pvpatch_runtime::plan::{self, Plan, TextRead};
use thiserror::Error;

use crate::ScanReport;
use crate::annotate::{self, AnnotateOptions};
use crate::load::Image;

/// The backends `plan` and `rewrite` know.
pub const BACKENDS: [&str; 8] = [
    "native",
    "tcg",
    "kvm",
    "vmware",
    "xen",
    "hyperv",
    "rom",
    "outofline",
];

/// Why a plan cannot be made or applied.
#[derive(Debug, Error)]
pub enum RewriteError {
    /// A backend name this tool does not know.
    #[error("unknown backend {} (native, tcg, kvm, vmware, xen, hyperv, rom, outofline)", crate::quoted(.0))]
    UnknownBackend(String),
    /// `rom` without a ROM, or a ROM with another backend.
    #[error("{0}")]
    Usage(String),
    /// The ROM does not parse.
    #[error("the ROM is invalid")]
    BadRom(#[source] patch_sites::RomError),
    /// The site table cannot be built or is invalid.
    #[error("the site table")]
    Table(#[source] TableError),
    /// Annotating in memory failed.
    #[error("building the site table")]
    Annotate(#[source] annotate::AnnotateError),
    /// The backend needs an arena the table does not name.
    #[error(
        "the {0} backend needs out-of-line code, and the table names no arena (only stock kernels have one)"
    )]
    NoArena(&'static str),
    /// The backend's code does not fit the arena, or the arena is not free.
    #[error("the arena at {0:#x}: {1}")]
    Arena(u64, String),
    /// The runtime's planner refused the table.
    #[error("the planner refused the table: {0}")]
    Plan(plan::PlanError),
    /// Applying the plan to the file's bytes failed.
    #[error("applying the plan: {0}")]
    Apply(apply::ApplyError),
}

/// A backend to plan for: a name of [`BACKENDS`], and the ROM for `rom`.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// Which.
    pub kind: BackendKind,
    /// The ROM's bytes.
    pub rom: Option<Vec<u8>>,
}

impl BackendSpec {
    /// The backend named `name` (with `rom` for `rom`).
    pub fn new(name: &str, rom: Option<Vec<u8>>) -> Result<BackendSpec, RewriteError> {
        let kind = BackendKind::from_name(name)
            .filter(|_| BACKENDS.contains(&name))
            .ok_or_else(|| RewriteError::UnknownBackend(name.to_owned()))?;
        match (kind, &rom) {
            (BackendKind::Rom, None) => Err(RewriteError::Usage(
                "the rom backend needs --rom FILE".into(),
            )),
            (k, Some(_)) if k != BackendKind::Rom => Err(RewriteError::Usage(format!(
                "--rom is for the rom backend, not {name}"
            ))),
            _ => Ok(BackendSpec { kind, rom }),
        }
    }
}

/// An image's bytes as kernel text: addresses map to file offsets through the sections.
pub struct FileText<'a> {
    image: &'a Image,
    /// The file's bytes (a copy, for writing).
    pub bytes: Vec<u8>,
}

impl fmt::Debug for FileText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileText")
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl<'a> FileText<'a> {
    /// The image's bytes, copied.
    pub fn new(image: &'a Image) -> Self {
        FileText {
            image,
            bytes: image.bytes().to_vec(),
        }
    }

    fn offset(&self, addr: u64, len: usize) -> Option<usize> {
        let s = self.image.section_at(addr)?;
        let end = addr.checked_add(len as u64)?;
        if end > s.addr + s.size {
            return None;
        }
        usize::try_from(s.offset + (addr - s.addr)).ok()
    }
}

impl TextRead for FileText<'_> {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        match self.offset(addr, out.len()) {
            Some(o) => match self.bytes.get(o..o + out.len()) {
                Some(b) => {
                    out.copy_from_slice(b);
                    true
                }
                None => false,
            },
            None => false,
        }
    }
}

impl TextPoke for FileText<'_> {
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        if let Some(o) = self.offset(addr, bytes.len())
            && let Some(dst) = self.bytes.get_mut(o..o + bytes.len())
        {
            dst.copy_from_slice(bytes);
        }
    }

    fn sync(&mut self) {}
}

/// A plan for one backend.
#[derive(Debug)]
pub struct ImagePlan {
    /// The backend's name.
    pub backend: &'static str,
    /// Where the table is (in the image, or where annotate would put it).
    pub table_addr: u64,
    /// Whether the table was built in memory (the image is not annotated).
    pub table_in_memory: bool,
    /// The runtime's plan.
    pub plan: Plan,
    /// Bytes of out-of-line code placed in the arena.
    pub code_bytes: usize,
}

impl ImagePlan {
    /// Sites by outcome.
    pub fn by_outcome(&self) -> [u32; Outcome::ALL.len()] {
        let mut n = [0u32; Outcome::ALL.len()];
        for p in &self.plan.sites {
            n[outcome_of(p).index()] += 1;
        }
        n
    }
}

/// What a planned site becomes: a site moved into its stub runs out of line even when it
/// stays native there.
fn outcome_of(p: &plan::Planned) -> Outcome {
    match (p.changed(), p.detour) {
        (_, Some(_)) => Outcome::Detour,
        (false, None) => Outcome::Unchanged,
        (true, None) => p.outcome,
    }
}

/// The image's site table: its own sealed one, or the one annotate would write, built from
/// `report`. Returns the bytes, their address, and whether they were built here.
pub fn site_table(report: &ScanReport<'_>) -> Result<(Vec<u8>, u64, bool), RewriteError> {
    if let Some((addr, bytes)) = annotate::sealed_table(report.image) {
        return Ok((bytes.to_vec(), addr, false));
    }
    let (table, addr) = annotate::table_bytes(report, &AnnotateOptions::default())
        .map_err(RewriteError::Annotate)?;
    Ok((table, addr, true))
}

/// Plans `spec` for the image of `report` with the runtime's planner. Nothing is written.
pub fn plan_image(report: &ScanReport<'_>, spec: &BackendSpec) -> Result<ImagePlan, RewriteError> {
    let (bytes, table_addr, in_memory) = site_table(report)?;
    // Offline, KVM is taken to say that port-0x80 delays are unnecessary (as it does).
    let features = if spec.kind == BackendKind::Kvm {
        KVM_FEATURE_NOP_IO_DELAY
    } else {
        0
    };
    let table = SiteTable::parse_contiguous(&bytes, table_addr, &report.image.code_ranges())
        .map_err(RewriteError::Table)?;
    let (plan, code_bytes) = plan_table(report.image, &table, spec, features)?;
    Ok(ImagePlan {
        backend: spec.kind.name(),
        table_addr,
        table_in_memory: in_memory,
        plan,
        code_bytes,
    })
}

/// Plans `spec`, with the detected feature bits `features`, for `image` and its parsed site
/// table (in the image or not), exactly as the runtime would at boot: the backend's code
/// prepared, every site planned. Returns the plan and the bytes of out-of-line code it places.
pub fn plan_table(
    image: &Image,
    table: &SiteTable<'_>,
    spec: &BackendSpec,
    features: u32,
) -> Result<(Plan, usize), RewriteError> {
    // Reads go to the image itself (a copy is only made for writing).
    let view = ImageView(image);
    // Offline, the hypervisor a ROM serves is the one it says it serves.
    let rom_signature = spec
        .rom
        .as_deref()
        .and_then(|b| Rom::parse(b).ok())
        .map(|r| r.signature());
    let code = arena::prepare(
        table,
        spec.kind,
        spec.rom.as_deref(),
        &rom_signature.unwrap_or([0; 12]),
        &view,
    )
    .map_err(|e| match e {
        arena::ArenaError::NoArena => RewriteError::NoArena(spec.kind.name()),
        arena::ArenaError::BadRom(e) => RewriteError::BadRom(e),
        arena::ArenaError::RomRefused(e) => {
            RewriteError::Usage(format!("the runtime would refuse the ROM: {e}"))
        }
        other => RewriteError::Arena(table.arena().map_or(0, |a| a.start), other.to_string()),
    })?;
    let backend = Backend {
        detected: Detected::assumed(spec.kind, features),
        rom: code.rom.map(|rom| LoadedRom {
            rom,
            base: code.base,
        }),
        pv: None,
        thunks: code.thunks.as_ref(),
    };
    let code_bytes = code.write.as_ref().map_or(0, |w| w.new.len());
    let mut plan = plan::plan(table, &backend, &view, None).map_err(RewriteError::Plan)?;
    plan.take_code(code.write);
    Ok((plan, code_bytes))
}

/// The image's bytes, read-only, as kernel text.
struct ImageView<'a>(&'a Image);

impl TextRead for ImageView<'_> {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        match self.0.read(addr, out.len()) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

/// The image's bytes with `plan` applied (through the runtime's own `apply`: every write read
/// back, all or nothing).
pub fn apply_to_file(image: &Image, plan: &ImagePlan) -> Result<Vec<u8>, RewriteError> {
    let mut text = FileText::new(image);
    apply::apply(&plan.plan, &mut text).map_err(RewriteError::Apply)?;
    Ok(text.bytes)
}

/// The version of the plan's schema.
pub const PLAN_SCHEMA: &str = "pvpatch-plan/1";

/// One site of a plan, for people and programs.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct PlannedSite {
    /// Address.
    #[schemars(with = "crate::schema::Address")]
    pub address: String,
    /// `name+0xoff`, if known.
    pub symbol: Option<String>,
    /// The op.
    #[schemars(with = "crate::schema::PlannedOpName")]
    pub op: &'static str,
    /// What it becomes (`unchanged`, `native`, `nothing`, `inline`, `call`, `trap`; a rewrite
    /// written into a detour's stub is `detour`).
    #[schemars(with = "crate::schema::OutcomeName")]
    pub outcome: &'static str,
    /// What it becomes in its own bytes or its stub (`call` for a call in a stub).
    #[schemars(with = "crate::schema::OutcomeName")]
    pub rewrite: &'static str,
    /// Where the rewrite is written: the site, or its copy in a stub.
    #[schemars(with = "crate::schema::Address")]
    pub written_at: String,
    /// Why it stays as it is, when it does.
    pub why: Option<String>,
}

/// A plan, for people and programs (`pvpatch plan --json`; its JSON Schema is
/// [`crate::schema::plan`]).
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct PlanLedger {
    /// The schema's name and version, `pvpatch-plan/1`: a consumer must check it.
    #[schemars(extend("const" = PLAN_SCHEMA))]
    pub schema: &'static str,
    /// The image.
    pub image: String,
    /// The backend.
    pub backend: &'static str,
    /// Where the site table is (built in memory when the image is not annotated).
    #[schemars(with = "crate::schema::Address")]
    pub table: String,
    /// Whether the table was built in memory.
    pub table_in_memory: bool,
    /// Sites by outcome.
    #[schemars(with = "crate::schema::OutcomeCounts")]
    pub by_outcome: std::collections::BTreeMap<&'static str, u32>,
    /// Detours installed.
    pub detours: usize,
    /// Bytes of the backend's out-of-line code placed in the arena.
    pub code_bytes: usize,
    /// Rewritable sites (instructions and idioms no Linux table covers) the image's table holds.
    pub rewritable: usize,
    /// Of the table's sites, those rewritten to a call or through a detour.
    pub out_of_line: usize,
    /// Why the rewritable sites that stay where they are do, with how many: the patcher's
    /// reason when it found no way out of line, else the planner's.
    pub native_reasons: std::collections::BTreeMap<String, usize>,
    /// The part of `native_reasons` that Linux's own design keeps in place, whatever the
    /// rewriter: code Linux copies elsewhere to run, entry code whose address it checks, `sti`'s
    /// interrupt shadow, one byte fenced by protected bytes or a named instruction start.
    pub pinned_reasons: std::collections::BTreeMap<String, usize>,
    /// Every site of the table.
    pub sites: Vec<PlannedSite>,
}

/// Why a site stays as it is, in words.
fn keep_name(k: plan::Keep) -> &'static str {
    use plan::Keep::*;
    match k {
        AlreadyThere => "already what the backend wants",
        UnknownOp => "an op this runtime does not know",
        NotRewritable => "never rewritten (control transfer or hypervisor interface)",
        NoRoom => "no room: too small for the backend's sequence, and no detour",
        Operand => "the operand cannot go into the backend's template",
        NotEncodable => "the native instruction cannot be encoded from the record",
        Clobbers => "the backend's sequence clobbers more than the site allows",
        NoStack => "the site may run with no usable stack and the backend's sequence uses it",
    }
}

impl PlanLedger {
    /// The ledger of `plan` for the image of `report`.
    pub fn new(report: &ScanReport<'_>, plan: &ImagePlan) -> PlanLedger {
        let image = report.image;
        let mut by_outcome = std::collections::BTreeMap::new();
        for (o, n) in Outcome::ALL.iter().zip(plan.by_outcome()) {
            by_outcome.insert(o.name(), n);
        }
        let sites: Vec<PlannedSite> = plan
            .plan
            .sites
            .iter()
            .map(|p| {
                let changed = p.changed();
                let outcome = outcome_of(p);
                PlannedSite {
                    address: crate::ledger::hex(p.site.addr),
                    symbol: image
                        .symbolize(p.site.addr)
                        .map(|(n, off)| format!("{n}+{off:#x}")),
                    op: p.site.op().map_or("unknown", patch_sites::Op::name),
                    outcome: outcome.name(),
                    rewrite: if changed {
                        p.outcome.name()
                    } else {
                        Outcome::Unchanged.name()
                    },
                    written_at: crate::ledger::hex(p.addr),
                    why: p.keep.map(|k| keep_name(k).to_owned()),
                }
            })
            .collect();
        let by_addr: std::collections::HashMap<u64, &plan::Planned> =
            plan.plan.sites.iter().map(|p| (p.site.addr, p)).collect();
        let mut native_reasons = std::collections::BTreeMap::new();
        let mut pinned_reasons = std::collections::BTreeMap::new();
        let mut rewritable = 0;
        for s in report.analysis.sites.iter().filter(|s| s.rewritable()) {
            rewritable += 1;
            let planned = by_addr.get(&s.found.addr);
            if planned.is_some_and(|p| matches!(outcome_of(p), Outcome::Detour | Outcome::Call)) {
                continue;
            }
            let why = match (&s.room.why, planned.and_then(|p| p.keep)) {
                (Some(w), _) => w.clone(),
                (None, Some(k)) => format!("on this backend: {}", keep_name(k)),
                (None, None) => "not in the site table".into(),
            };
            if s.room.pinned {
                *pinned_reasons.entry(why.clone()).or_default() += 1;
            }
            *native_reasons.entry(why).or_default() += 1;
        }
        let out_of_line = plan
            .plan
            .sites
            .iter()
            .filter(|p| matches!(outcome_of(p), Outcome::Detour | Outcome::Call))
            .count();
        PlanLedger {
            schema: PLAN_SCHEMA,
            image: image.path.display().to_string(),
            backend: plan.backend,
            table: crate::ledger::hex(plan.table_addr),
            table_in_memory: plan.table_in_memory,
            by_outcome,
            detours: plan.plan.detours.len(),
            code_bytes: plan.code_bytes,
            rewritable,
            out_of_line,
            native_reasons,
            pinned_reasons,
            sites,
        }
    }

    /// For people: the counts, then every site that is rewritten or stays for a reason other
    /// than being what the backend wants.
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "{}: backend {}, site table at {}{}",
            self.image,
            self.backend,
            self.table,
            if self.table_in_memory {
                " (built in memory: the image is not annotated)"
            } else {
                ""
            }
        );
        let counts: Vec<String> = self
            .by_outcome
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            o,
            "{} sites: {}; {} detours installed, {} bytes of out-of-line code",
            self.sites.len(),
            counts.join(", "),
            self.detours,
            self.code_bytes
        );
        o.push_str(&crate::sites::native_breakdown(
            self.out_of_line,
            self.rewritable,
            &self.native_reasons,
            &self.pinned_reasons,
        ));
        for s in &self.sites {
            if s.outcome == "unchanged"
                && s.why.as_deref() == Some(keep_name(plan::Keep::AlreadyThere))
            {
                continue;
            }
            let _ = writeln!(
                o,
                "  {} {:<40} {:<14} {:<9} {}",
                s.address,
                s.symbol.as_deref().unwrap_or(""),
                s.op,
                s.outcome,
                s.why.as_deref().unwrap_or("")
            );
        }
        o
    }
}
