//! The ledger: what a scan found, machine-readable (JSON, documented in `docs/ledger.md`): the
//! image, the code swept, Linux's tables, every sensitive instruction with what covers it and the
//! room it offers a rewrite.
//!
//! Its sites and resynchronisations are written as they are visited ([`crate::sites`]), never
//! all held: a ledger's memory does not grow with its sites (a scan that keeps none, from
//! [`crate::scan_image_streamed`], decodes and analyses each one again as it is written).

use std::borrow::Cow;
use std::collections::BTreeMap;

use iced_x86::{Decoder, DecoderOptions, FastFormatter};
use patch_sites::{Gpr, Operand};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::ScanReport;
use crate::analyse::{Direction, SiteInfo};
use crate::load::SymbolSource;
use crate::load::image::Image;
use crate::schema::{
    Address, Arena, ClassCounts, Compression, FoundBy, HexBytes, OpId, OpName, OutcomeName,
    RegName, Sha256Hex, TableName,
};
use crate::sites::{SiteCounts, for_each_resync, for_each_site};
use crate::sweep::ResyncReason;

/// The version of the ledger's schema.
pub const LEDGER_SCHEMA: &str = "pvpatch-ledger/2";

/// `0x`-prefixed lowercase hex.
pub fn hex(v: u64) -> String {
    format!("{v:#x}")
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The SHA-256 of the ELF image (the vmlinux extracted, for a bzImage), as hex.
pub fn sha256(image: &Image) -> String {
    sha256_hex(image.bytes())
}

/// The SHA-256 of `bytes`, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex_bytes(&Sha256::digest(bytes))
}

/// The ledger (see `docs/ledger.md`; its JSON Schema is [`crate::schema::ledger`]).
#[derive(Debug, Serialize, JsonSchema)]
pub struct Ledger<'a> {
    /// The schema's name and version, `pvpatch-ledger/2`: a consumer must check it.
    #[schemars(extend("const" = LEDGER_SCHEMA))]
    pub schema: &'static str,
    /// The tool.
    pub tool: ToolInfo,
    /// The image.
    pub image: ImageInfo,
    /// The code swept.
    pub code: CodeInfo,
    /// Linux's tables.
    pub tables: Vec<TableInfo>,
    /// Where the sweep resynchronised (written as visited).
    pub resyncs: Resyncs<'a>,
    /// The code caves of a stock kernel, in address order (empty otherwise).
    pub caves: Vec<CaveInfo>,
    /// Counts.
    pub summary: Summary,
    /// Every sensitive instruction (written as visited).
    pub sites: Sites<'a>,
}

/// The sites of a ledger: each one's [`SiteEntry`] made and written as it is visited.
#[derive(Clone, Copy)]
pub struct Sites<'a> {
    report: &'a ScanReport<'a>,
    len: usize,
}

impl Sites<'_> {
    /// How many.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` with each site's entry, in address order, until it fails.
    pub fn try_for_each<E>(&self, mut f: impl FnMut(SiteEntry) -> Result<(), E>) -> Result<(), E> {
        for_each_site(self.report, |s| f(site_entry(self.report, s)))
    }
}

impl std::fmt::Debug for Sites<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sites({})", self.len)
    }
}

impl Serialize for Sites<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len))?;
        self.try_for_each(|e| seq.serialize_element(&e))?;
        seq.end()
    }
}

/// What [`Sites`] writes: an array of [`SiteEntry`].
impl JsonSchema for Sites<'_> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Sites".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        Vec::<SiteEntry>::json_schema(generator)
    }
}

/// The resynchronisations of a ledger, each one's [`ResyncInfo`] made and written as it is
/// visited.
#[derive(Clone, Copy)]
pub struct Resyncs<'a> {
    report: &'a ScanReport<'a>,
}

impl std::fmt::Debug for Resyncs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resyncs({})", self.report.sweep.resync_count)
    }
}

impl Serialize for Resyncs<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.report.sweep.resync_count as usize))?;
        for_each_resync(self.report, |r| {
            seq.serialize_element(&ResyncInfo {
                address: hex(r.addr),
                resumed_at: hex(r.resumed_at),
                reason: r.reason,
            })
        })?;
        seq.end()
    }
}

/// What [`Resyncs`] writes: an array of [`ResyncInfo`].
impl JsonSchema for Resyncs<'_> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Resyncs".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        Vec::<ResyncInfo>::json_schema(generator)
    }
}

/// The tool that wrote the ledger.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ToolInfo {
    /// `pvpatch`.
    #[schemars(extend("const" = "pvpatch"))]
    pub name: &'static str,
    /// Its version.
    pub version: &'static str,
}

/// The image.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ImageInfo {
    /// Path as given.
    pub path: String,
    /// Size in bytes of the ELF image scanned (for a bzImage, of the vmlinux extracted from it).
    pub size: u64,
    /// SHA-256 of the ELF image scanned (for a bzImage, of the vmlinux extracted from it).
    #[schemars(with = "Sha256Hex")]
    pub sha256: String,
    /// The bzImage at `path` the ELF image was extracted from in memory; null for an ELF file.
    pub extracted_from: Option<BzImageInfo>,
    /// GNU build id (hex), if any.
    #[schemars(with = "Option<HexBytes>")]
    pub build_id: Option<String>,
    /// `exec` (ET_EXEC) or `dyn` (ET_DYN).
    pub elf_type: ElfType,
    /// Entry point.
    #[schemars(with = "Address")]
    pub entry: String,
    /// Function symbols (0 when stripped and without kallsyms).
    pub symbols: usize,
    /// Where the symbols came from: `symtab`, `kallsyms` (a stripped kernel's own table) or
    /// `none`.
    pub symbol_source: SymbolSource,
    /// Whether it is a stock kernel (a Linux image we did not build: no trap form, out-of-line
    /// code only in caves inside its text).
    pub stock_kernel: bool,
}

/// The bzImage an image was extracted from.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BzImageInfo {
    /// `bzimage`.
    #[schemars(extend("const" = "bzimage"))]
    pub format: &'static str,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    #[schemars(with = "Sha256Hex")]
    pub sha256: String,
    /// Its payload's compression: `xz`, `lzma`, `zstd`, `lz4` or `gzip`.
    #[schemars(with = "Compression")]
    pub compression: &'static str,
    /// The integrity checks it allowed, all of which passed (`size trailer`, `content
    /// checksum`, `Authenticode SHA-256`, ...).
    pub checks: Vec<&'static str>,
}

/// The code swept.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CodeInfo {
    /// Bytes swept.
    pub bytes: u64,
    /// Instructions decoded.
    pub instructions: u64,
    /// Per executable section.
    pub sections: Vec<SectionInfo>,
}

/// One executable section.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SectionInfo {
    /// Name.
    pub name: String,
    /// Address.
    #[schemars(with = "Address")]
    pub address: String,
    /// Size.
    pub size: u64,
    /// Instructions decoded.
    pub instructions: u64,
    /// Sensitive instructions.
    pub sites: usize,
}

/// One Linux table.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TableInfo {
    /// Section name.
    #[schemars(with = "TableName")]
    pub name: &'static str,
    /// Whether the image has it.
    pub present: bool,
    /// How it was found: `section`, or `symbols` (its `__start_`/`__stop_` symbols); null if
    /// absent.
    #[schemars(with = "Option<FoundBy>")]
    pub found_by: Option<&'static str>,
    /// Address (null if absent).
    #[schemars(with = "Option<Address>")]
    pub address: Option<String>,
    /// Size.
    pub size: u64,
    /// Layout recognised.
    pub layout: Option<&'static str>,
    /// Entry size.
    pub entry_size: usize,
    /// Entries.
    pub entries: usize,
    /// Trailing zero entries (padding).
    pub padding: usize,
    /// Why it could not be used.
    pub problem: Option<String>,
}

/// A code cave: `int3` padding inside the kernel's text where stubs and the arena go.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CaveInfo {
    /// First byte.
    #[schemars(with = "Address")]
    pub address: String,
    /// Bytes.
    pub length: u64,
}

/// A resynchronisation of the sweep.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ResyncInfo {
    /// Where decoding went wrong.
    #[schemars(with = "Address")]
    pub address: String,
    /// Where it resumed.
    #[schemars(with = "Address")]
    pub resumed_at: String,
    /// `undecodable` or `crossed_known_start`.
    pub reason: ResyncReason,
}

/// Counts over the sites, their detours and the caves.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Summary {
    /// Sensitive instructions (including hypervisor interfaces).
    pub sites: usize,
    /// Covered by one of Linux's tables.
    pub covered: usize,
    /// Sites pvpatch may record.
    pub patchable: usize,
    /// Hypervisor interfaces (vmcall, vmmcall, vmgexit).
    pub hypervisor_interfaces: usize,
    /// Sites a backend may rewrite: instructions and idioms no Linux table covers.
    pub rewritable: usize,
    /// Of those, the sites from which out-of-line code can be reached (a call in place, or a
    /// detour with cave space).
    pub out_of_line: usize,
    /// Sites whose detour moves the instructions after them.
    pub detours_forward: usize,
    /// Sites whose detour moves the instructions before them.
    pub detours_backward: usize,
    /// Sites whose detour moves instructions on both sides, or shares a stub with other sites.
    pub detours_around: usize,
    /// Detours reached through a trampoline (in nearby padding, or in a host's dead tail).
    pub trampolines: usize,
    /// Of those, the trampolines in another detour's moved range (its dead tail, after the
    /// `jmp rel32`): that detour, the host, is installed with them.
    pub hosted: usize,
    /// Detours that carry no site: ranges moved only to make room for a trampoline (eviction).
    pub evicted: usize,
    /// Stubs planned (one per detour; sites may share one).
    pub stubs: usize,
    /// Why rewritable sites have no way out of line, with how many.
    pub native_reasons: BTreeMap<String, usize>,
    /// The part of `native_reasons` that Linux's own design keeps in place, whatever the
    /// rewriter: code Linux copies elsewhere to run, entry code whose address it checks, `sti`'s
    /// interrupt shadow, one byte fenced by protected bytes or a named instruction start.
    pub pinned_reasons: BTreeMap<String, usize>,
    /// Caves found (stock kernels).
    pub caves: usize,
    /// Bytes in caves.
    pub cave_bytes: u64,
    /// The arena reserved for the backend's out-of-line code.
    #[schemars(with = "Option<Arena>")]
    pub arena: Option<String>,
    /// Per class.
    #[schemars(with = "ClassCounts")]
    pub by_class: BTreeMap<&'static str, usize>,
}

/// One site: a sensitive instruction.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SiteEntry {
    /// Address (`0x...`).
    #[schemars(with = "Address")]
    pub address: String,
    /// Instruction length.
    #[schemars(range(min = 1, max = 15))]
    pub length: u8,
    /// Class: the op's name.
    #[schemars(with = "OpName")]
    pub class: &'static str,
    /// Our op.
    pub op: OpRef,
    /// Operands.
    pub operands: Operands,
    /// Instruction bytes (hex).
    #[schemars(with = "HexBytes")]
    pub bytes: String,
    /// Disassembly.
    pub disasm: String,
    /// Section name.
    pub section: String,
    /// `name+0xoff`, or null for a stripped image.
    pub symbol: Option<String>,
    /// The Linux table entry that covers it.
    pub covered_by: Option<CoveredBy>,
    /// The room a rewrite has.
    pub room: RoomInfo,
}

/// An op reference.
#[derive(Debug, Serialize, JsonSchema)]
pub struct OpRef {
    /// Stable id.
    #[schemars(with = "OpId")]
    pub id: u16,
    /// Name.
    #[schemars(with = "OpName")]
    pub name: &'static str,
}

/// Operands in the ABI's terms.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Operands {
    /// `none`, `reg`, `port_imm`, `port_dx`, `mem_base`, `mem_other`, `debug_reg`,
    /// `reg_mem_base`.
    pub kind: OperandKind,
    /// Register (kinds `reg`, `debug_reg`, `reg_mem_base`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "RegName")]
    pub reg: Option<&'static str>,
    /// Memory base register (kinds `mem_base`, `reg_mem_base`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "RegName")]
    pub base: Option<&'static str>,
    /// Debug register number (kind `debug_reg`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "u8")]
    pub dr: Option<u8>,
    /// Immediate port (kind `port_imm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Address")]
    pub port: Option<String>,
    /// Width in bytes (0: none).
    pub width: u8,
    /// `rep` prefix (ins/outs).
    pub rep: bool,
}

/// A Linux table entry.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CoveredBy {
    /// Table (section name).
    #[schemars(with = "TableName")]
    pub table: &'static str,
    /// Entry index.
    pub entry: u32,
    /// First byte the entry protects.
    #[schemars(with = "Address")]
    pub start: String,
    /// One past the last.
    #[schemars(with = "Address")]
    pub end: String,
}

/// A site's detour.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DetourInfo {
    /// `forward`, `backward` or `around`.
    pub direction: Direction,
    /// The first moved byte.
    #[schemars(with = "Address")]
    pub start: String,
    /// Bytes moved.
    pub length: u8,
    /// Where its stub runs (a cave), or null in a kernel of our own (no stub planned).
    #[schemars(with = "Option<Address>")]
    pub stub: Option<String>,
    /// The stub's length.
    pub stub_length: Option<usize>,
    /// Where the site's patchable copy is in the stub.
    pub copy_offset: Option<u8>,
    /// The trampoline the moved range jumps through (a `jmp rel8` to nearby padding), if any.
    #[schemars(with = "Option<Address>")]
    pub trampoline: Option<String>,
    /// The first byte of the other detour's moved range that holds the trampoline in its dead
    /// tail (installed with this one), or null (the trampoline is in padding, or there is none).
    #[schemars(with = "Option<Address>")]
    pub trampoline_host: Option<String>,
    /// The other sites that share the detour.
    #[schemars(with = "Vec<Address>")]
    pub shared_with: Vec<String>,
}

/// The room a rewrite has.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RoomInfo {
    /// Bytes patchable in place.
    pub in_place: u8,
    /// The detour the site can take, or null.
    pub detour: Option<DetourInfo>,
    /// Forms the site allows.
    #[schemars(with = "Vec<OutcomeName>")]
    pub forms: Vec<&'static str>,
    /// Why nothing, or no detour.
    pub reason: Option<String>,
}

/// Whether the image is an executable or position-independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ElfType {
    /// `ET_EXEC`.
    Exec,
    /// `ET_DYN`.
    Dyn,
}

/// The kind of a site's operand, as the ABI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperandKind {
    /// No operand.
    None,
    /// A general-purpose register.
    Reg,
    /// An immediate port.
    PortImm,
    /// The port in `dx`.
    PortDx,
    /// A memory operand `[base]`.
    MemBase,
    /// Any other memory operand.
    MemOther,
    /// A debug register and a general-purpose register.
    DebugReg,
    /// A register and a memory operand `[base]`.
    RegMemBase,
}

/// The ABI's operand kind.
pub fn operand_kind(o: Operand) -> OperandKind {
    match o {
        Operand::None => OperandKind::None,
        Operand::Reg(_) => OperandKind::Reg,
        Operand::PortImm(_) => OperandKind::PortImm,
        Operand::PortDx => OperandKind::PortDx,
        Operand::MemBase(_) => OperandKind::MemBase,
        Operand::MemOther => OperandKind::MemOther,
        Operand::DebugReg { .. } => OperandKind::DebugReg,
        Operand::RegMemBase { .. } => OperandKind::RegMemBase,
    }
}

fn operands(o: Operand, width: u8, rep: bool) -> Operands {
    let name = |g: Gpr| Some(g.name());
    let mut out = Operands {
        kind: operand_kind(o),
        reg: None,
        base: None,
        dr: None,
        port: None,
        width,
        rep,
    };
    match o {
        Operand::Reg(r) => out.reg = name(r),
        Operand::PortImm(p) => out.port = Some(hex(p as u64)),
        Operand::MemBase(b) => out.base = name(b),
        Operand::DebugReg { dr, reg } => {
            out.dr = Some(dr);
            out.reg = name(reg);
        }
        Operand::RegMemBase { reg, base } => {
            out.reg = name(reg);
            out.base = name(base);
        }
        Operand::None | Operand::PortDx | Operand::MemOther => {}
    }
    out
}

/// The instruction at `addr`, formatted.
pub fn disasm(image: &Image, addr: u64, len: u8) -> String {
    let Some(bytes) = image.read(addr, len as usize) else {
        return String::new();
    };
    let mut d = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE);
    let i = d.decode();
    let mut s = String::new();
    FastFormatter::new().format(&i, &mut s);
    s
}

fn site_entry(report: &ScanReport<'_>, s: &SiteInfo) -> SiteEntry {
    let f = &s.found;
    let image = report.image;
    SiteEntry {
        address: hex(f.addr),
        length: f.len,
        class: f.op().name(),
        op: OpRef {
            id: f.op().id(),
            name: f.op().name(),
        },
        operands: operands(f.operand(), f.class.width, f.class.rep),
        bytes: image
            .read(f.addr, f.len as usize)
            .map(hex_bytes)
            .unwrap_or_default(),
        disasm: disasm(image, f.addr, f.len),
        section: image.sections[f.section].name.clone(),
        symbol: image
            .symbolize(f.addr)
            .map(|(n, off)| format!("{n}+{off:#x}")),
        covered_by: s.covered_by.map(|p| CoveredBy {
            table: p.table.section(),
            entry: p.entry,
            start: hex(p.start),
            end: hex(p.end),
        }),
        room: RoomInfo {
            in_place: s.room.in_place,
            detour: s.room.detour.as_ref().map(|m| {
                let plan = m.group.and_then(|g| report.analysis.detours.get(g));
                DetourInfo {
                    direction: m.direction,
                    start: hex(m.start),
                    length: m.len,
                    stub: plan.map(|p| hex(p.stub_addr)),
                    stub_length: plan.map(|p| p.stub.len()),
                    copy_offset: m.copy.map(|c| c.0),
                    trampoline: plan.and_then(|p| p.trampoline.as_ref()).map(|t| hex(t.0)),
                    trampoline_host: plan
                        .and_then(|p| p.host)
                        .and_then(|h| report.analysis.detours.get(h))
                        .map(|h| hex(h.start)),
                    shared_with: plan
                        .map(|p| {
                            p.members
                                .iter()
                                .filter_map(|&k| report.analysis.sites.get(k))
                                .map(|x| x.found.addr)
                                .filter(|&a| a != f.addr)
                                .map(hex)
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            }),
            forms: s.room.forms.iter().map(|f| f.name()).collect(),
            reason: s.room.reason.clone(),
        },
    }
}

impl<'a> Ledger<'a> {
    /// The ledger of a scan (its sites counted: visited once, in parallel if the scan kept
    /// none; and visited again as they are written).
    pub fn new(report: &'a ScanReport<'a>) -> Ledger<'a> {
        Ledger::with_counts(report, &crate::sites::count(report))
    }

    /// The ledger of a scan whose sites are counted already.
    pub fn with_counts(report: &'a ScanReport<'a>, counts: &SiteCounts) -> Ledger<'a> {
        let image = report.image;
        Ledger {
            schema: LEDGER_SCHEMA,
            tool: ToolInfo {
                name: "pvpatch",
                version: env!("CARGO_PKG_VERSION"),
            },
            image: ImageInfo {
                path: image.path.display().to_string(),
                size: image.bytes().len() as u64,
                sha256: sha256(image),
                extracted_from: image.bzimage.as_ref().map(|b| BzImageInfo {
                    format: "bzimage",
                    size: b.size,
                    sha256: b.sha256.clone(),
                    compression: b.compression,
                    checks: b.checks.clone(),
                }),
                build_id: image.build_id.as_deref().map(hex_bytes),
                elf_type: if image.elf_type == object::elf::ET_DYN {
                    ElfType::Dyn
                } else {
                    ElfType::Exec
                },
                entry: hex(image.entry),
                symbols: image.symbols.len(),
                symbol_source: image.symbol_source,
                stock_kernel: report.analysis.stock,
            },
            code: code_info(report, counts),
            tables: report
                .tables
                .reports
                .iter()
                .map(|r| TableInfo {
                    name: r.kind.section(),
                    present: r.present,
                    found_by: r.found_by,
                    address: r.present.then(|| hex(r.addr)),
                    size: r.size,
                    layout: r.layout,
                    entry_size: r.entry_size,
                    entries: r.entries,
                    padding: r.padding,
                    problem: r.problem.clone(),
                })
                .collect(),
            resyncs: Resyncs { report },
            caves: report
                .analysis
                .caves
                .iter()
                .map(|c| CaveInfo {
                    address: hex(c.start),
                    length: c.len(),
                })
                .collect(),
            summary: summary(report, counts),
            sites: Sites {
                report,
                len: counts.sites,
            },
        }
    }
}

pub(crate) fn code_info(report: &ScanReport<'_>, counts: &SiteCounts) -> CodeInfo {
    let image = report.image;
    // Sites per section, counted once (a count per section over every site was quadratic).
    let per_section = &counts.per_section;
    CodeInfo {
        bytes: report.sweep.bytes,
        instructions: report.sweep.instructions,
        sections: report
            .sweep
            .code
            .iter()
            .map(|c| {
                let s = &image.sections[c.section];
                SectionInfo {
                    name: s.name.clone(),
                    address: hex(s.addr),
                    size: s.size,
                    instructions: c.starts.count(),
                    sites: per_section.get(c.section).copied().unwrap_or(0),
                }
            })
            .collect(),
    }
}

pub(crate) fn summary(report: &ScanReport<'_>, c: &SiteCounts) -> Summary {
    Summary {
        sites: c.sites,
        covered: c.covered,
        patchable: c.patchable,
        hypervisor_interfaces: c.hypervisor_interfaces,
        rewritable: c.rewritable,
        out_of_line: c.out_of_line,
        detours_forward: c.detours[0],
        detours_backward: c.detours[1],
        detours_around: c.detours[2],
        trampolines: report
            .analysis
            .detours
            .iter()
            .filter(|d| d.trampoline.is_some())
            .count(),
        hosted: report
            .analysis
            .detours
            .iter()
            .filter(|d| d.host.is_some())
            .count(),
        evicted: report
            .analysis
            .detours
            .iter()
            .filter(|d| d.members.is_empty())
            .count(),
        stubs: report.analysis.detours.len(),
        native_reasons: c.native_reasons.clone(),
        pinned_reasons: c.pinned_reasons.clone(),
        caves: report.analysis.caves.len(),
        cave_bytes: report.analysis.caves.iter().map(|c| c.len()).sum(),
        arena: report
            .analysis
            .arena
            .map(|(a, n)| format!("{} ({n} bytes)", hex(a))),
        by_class: c.by_class.clone(),
    }
}
