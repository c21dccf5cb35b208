//! Backend ROMs: `pvpatch rom build` assembles a ROM from a readable description, and
//! `pvpatch rom show` prints one.
//!
//! A description (TOML) names the backend, the CPUID signature it serves, and per op what its
//! sites become: `nothing`, `native`, an `inline` template or a `call` to an entry point, both
//! named from a library of sequences assembled with dynasmrt (`pvpatch rom sequences` lists
//! them, with their assembly and operand slots):
//!
//! ```toml
//! name = "pvpatch-demo"
//! signature = "any"            # or the 12 characters of CPUID 0x40000000, e.g. "TCGTCGTCGTCG"
//!
//! [[entry]]
//! op = "io_delay"
//! kind = "nothing"
//!
//! [[entry]]
//! op = "mov_to_cr3"
//! kind = "inline"
//! sequence = "mov_to_cr3"
//! clobbers = ["flags"]
//!
//! [[entry]]
//! op = "wbinvd"
//! kind = "call"
//! sequence = "wbinvd_ret"
//! ```
//!
//! The ROM built is checked exactly as the runtime will check it (structure, then every
//! template and entry point decoded), and, given the kernel it is for, against every site of
//! that kernel's table.

use std::fmt::Write as _;

use dynasmrt::x64::X64Relocation;
use dynasmrt::{DynasmApi, VecAssembler, dynasm};
use patch_sites::rom::{
    NO_REX, Rom, RomAction, RomEntrySpec, RomKind, RomWriteError, Slot, SlotKind, SlotSource,
    rom_size, write_rom,
};
use patch_sites::table::SiteTable;
use patch_sites::{Gpr, Op, RegSet};
use pvpatch_runtime::romcheck::{self, RomRefusal};
use serde::Deserialize;
use thiserror::Error;

/// A sequence of the library.
#[derive(Clone, Debug)]
pub struct Sequence {
    /// Its name in descriptions.
    pub name: &'static str,
    /// Its assembly, for people.
    pub asm: &'static str,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Where the site's operands go.
    pub slots: Vec<Slot>,
    /// Whether it is an entry point (ends in `ret`) rather than an inline template.
    pub entry_point: bool,
}

type Asm = VecAssembler<X64Relocation>;

fn assemble(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
    let mut a = Asm::new(0);
    f(&mut a);
    // Assembling a fixed sequence without labels cannot fail.
    a.finalize().unwrap_or_default()
}

fn slot(kind: SlotKind, offset: u8, rex_offset: u8) -> Slot {
    let source = if kind == SlotKind::Imm8 {
        SlotSource::Port
    } else {
        SlotSource::Reg
    };
    Slot {
        kind,
        offset,
        rex_offset,
        source,
    }
}

fn inline(name: &'static str, asm: &'static str, bytes: Vec<u8>, slots: Vec<Slot>) -> Sequence {
    Sequence {
        name,
        asm,
        bytes,
        slots,
        entry_point: false,
    }
}

fn entry(name: &'static str, asm: &'static str, bytes: Vec<u8>) -> Sequence {
    Sequence {
        name,
        asm,
        bytes,
        slots: Vec::new(),
        entry_point: true,
    }
}

/// Every sequence descriptions can name.
pub fn library() -> Vec<Sequence> {
    use SlotKind::*;
    let mut v = vec![
        inline(
            "cli",
            "cli",
            assemble(|a| dynasm!(a ; .arch x64 ; cli)),
            vec![],
        ),
        inline(
            "sti",
            "sti",
            assemble(|a| dynasm!(a ; .arch x64 ; sti)),
            vec![],
        ),
        inline(
            "hlt",
            "hlt",
            assemble(|a| dynasm!(a ; .arch x64 ; hlt)),
            vec![],
        ),
        inline(
            "safe_halt",
            "sti; hlt",
            assemble(|a| dynasm!(a ; .arch x64 ; sti ; hlt)),
            vec![],
        ),
        inline(
            "pushf",
            "pushfq",
            assemble(|a| dynasm!(a ; .arch x64 ; pushfq)),
            vec![],
        ),
        inline(
            "popf",
            "popfq",
            assemble(|a| dynasm!(a ; .arch x64 ; popfq)),
            vec![],
        ),
        inline(
            "save_fl",
            "pushfq; pop <reg>",
            assemble(|a| dynasm!(a ; .arch x64 ; pushfq ; .bytes [0x40] ; pop rax)),
            vec![slot(OpcodeReg, 2, 1)],
        ),
        inline(
            "restore_fl",
            "push <reg>; popfq",
            assemble(|a| dynasm!(a ; .arch x64 ; .bytes [0x40] ; push rax ; popfq)),
            vec![slot(OpcodeReg, 1, 0)],
        ),
        inline(
            "rdmsr",
            "rdmsr",
            assemble(|a| dynasm!(a ; .arch x64 ; rdmsr)),
            vec![],
        ),
        inline(
            "wrmsr",
            "wrmsr",
            assemble(|a| dynasm!(a ; .arch x64 ; wrmsr)),
            vec![],
        ),
        inline(
            "cpuid",
            "cpuid",
            assemble(|a| dynasm!(a ; .arch x64 ; cpuid)),
            vec![],
        ),
        inline(
            "rdtsc",
            "rdtsc",
            assemble(|a| dynasm!(a ; .arch x64 ; rdtsc)),
            vec![],
        ),
        inline(
            "wbinvd",
            "wbinvd",
            assemble(|a| dynasm!(a ; .arch x64 ; wbinvd)),
            vec![],
        ),
        inline(
            "swapgs",
            "swapgs",
            assemble(|a| dynasm!(a ; .arch x64 ; swapgs)),
            vec![],
        ),
        inline(
            "clts",
            "clts",
            assemble(|a| dynasm!(a ; .arch x64 ; clts)),
            vec![],
        ),
        inline(
            "invlpg",
            "invlpg [<reg>]",
            assemble(|a| dynasm!(a ; .arch x64 ; .bytes [0x40] ; invlpg [rax])),
            vec![slot(ModrmRm, 3, 0)],
        ),
        inline(
            "out_imm8_al",
            "out <port>, al",
            assemble(|a| dynasm!(a ; .arch x64 ; out BYTE 0 as _, al)),
            vec![slot(Imm8, 1, NO_REX)],
        ),
        inline(
            "in_al_imm8",
            "in al, <port>",
            assemble(|a| dynasm!(a ; .arch x64 ; in al, BYTE 0 as _)),
            vec![slot(Imm8, 1, NO_REX)],
        ),
        inline(
            "out_dx_al",
            "out dx, al",
            assemble(|a| dynasm!(a ; .arch x64 ; out dx, al)),
            vec![],
        ),
        inline(
            "in_al_dx",
            "in al, dx",
            assemble(|a| dynasm!(a ; .arch x64 ; in al, dx)),
            vec![],
        ),
        entry(
            "cli_ret",
            "cli; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; cli ; ret)),
        ),
        entry(
            "sti_ret",
            "sti; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; sti ; ret)),
        ),
        entry(
            "wbinvd_ret",
            "wbinvd; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; wbinvd ; ret)),
        ),
        entry(
            "rdtsc_ret",
            "rdtsc; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; rdtsc ; ret)),
        ),
        entry(
            "cpuid_ret",
            "cpuid; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; cpuid ; ret)),
        ),
        entry(
            "io_delay_ret",
            "out 0x80, al; ret",
            assemble(|a| dynasm!(a ; .arch x64 ; out BYTE 0x80 as _, al ; ret)),
        ),
    ];
    // Control-register moves with the register in ModRM.rm and a REX prefix to extend it
    // (CR8 needs REX.R as well).
    for (name, asm, to, cr) in [
        ("mov_to_cr0", "mov cr0, <reg>", true, 0u8),
        ("mov_to_cr2", "mov cr2, <reg>", true, 2),
        ("mov_to_cr3", "mov cr3, <reg>", true, 3),
        ("mov_to_cr4", "mov cr4, <reg>", true, 4),
        ("mov_to_cr8", "mov cr8, <reg>", true, 8),
        ("mov_from_cr0", "mov <reg>, cr0", false, 0),
        ("mov_from_cr2", "mov <reg>, cr2", false, 2),
        ("mov_from_cr3", "mov <reg>, cr3", false, 3),
        ("mov_from_cr4", "mov <reg>, cr4", false, 4),
        ("mov_from_cr8", "mov <reg>, cr8", false, 8),
    ] {
        let bytes = assemble(|a| match (to, cr) {
            (true, 0) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr0, rax),
            (true, 2) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr2, rax),
            (true, 3) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr3, rax),
            (true, 4) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov cr4, rax),
            (true, _) => dynasm!(a ; .arch x64 ; mov cr8, rax),
            (false, 0) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr0),
            (false, 2) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr2),
            (false, 3) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr3),
            (false, 4) => dynasm!(a ; .arch x64 ; .bytes [0x40] ; mov rax, cr4),
            (false, _) => dynasm!(a ; .arch x64 ; mov rax, cr8),
        });
        v.push(inline(name, asm, bytes, vec![slot(ModrmRm, 3, 0)]));
    }
    v
}

/// Why a ROM could not be built.
#[derive(Debug, Error)]
pub enum RomBuildError {
    /// The description does not parse.
    #[error("the description does not parse: {0}")]
    Parse(String),
    /// An op name this tool does not know.
    #[error("entry {index}: unknown op {name:?} (`pvpatch ops` lists them)")]
    UnknownOp {
        /// Entry index.
        index: usize,
        /// The name.
        name: String,
    },
    /// A kind other than nothing, native, inline, call.
    #[error("entry {index}: unknown kind {kind:?} (nothing, native, inline, call)")]
    UnknownKind {
        /// Entry index.
        index: usize,
        /// The kind.
        kind: String,
    },
    /// A sequence name the library does not have, or of the wrong kind.
    #[error("entry {index}: {why}")]
    Sequence {
        /// Entry index.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A bad signature or clobber name.
    #[error("{0}")]
    Field(String),
    /// The ROM cannot be written.
    #[error("the ROM cannot be written")]
    Write(#[source] RomWriteError),
    /// The runtime would refuse it.
    #[error("the runtime would refuse this ROM: {0}")]
    Refused(RomRefusal),
    /// The kernel it is for has no sealed site table.
    #[error("{0} is not annotated (`pvpatch annotate` writes its site table)")]
    NotAnnotated(std::path::PathBuf),
    /// The kernel's sealed site table is invalid.
    #[error("the site table of {0} is invalid: {1}")]
    BadTable(std::path::PathBuf, patch_sites::TableError),
}

/// Builds the ROM a description describes for an annotated kernel: checked against every
/// site of its sealed table (what `pvpatch rom build --for` does).
pub fn build_for(
    description: &str,
    kernel: &crate::image::Image,
) -> Result<Vec<u8>, RomBuildError> {
    let (addr, bytes) = crate::annotate::sealed_table(kernel)
        .ok_or_else(|| RomBuildError::NotAnnotated(kernel.path.clone()))?;
    let table = SiteTable::parse_contiguous(bytes, addr, &kernel.code_ranges())
        .map_err(|e| RomBuildError::BadTable(kernel.path.clone(), e))?;
    build(description, Some(&table))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Description {
    name: String,
    signature: String,
    #[serde(default, rename = "entry")]
    entries: Vec<EntryDesc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDesc {
    op: String,
    kind: String,
    sequence: Option<String>,
    #[serde(default)]
    clobbers: Vec<String>,
}

fn signature(s: &str) -> Result<[u8; 12], RomBuildError> {
    if s == "any" {
        return Ok([0; 12]);
    }
    let b = s.as_bytes();
    if b.len() > 12 || !b.iter().all(|c| c.is_ascii_graphic()) {
        return Err(RomBuildError::Field(format!(
            "signature {s:?}: \"any\" or up to 12 printable characters (CPUID 0x40000000)"
        )));
    }
    let mut out = [0u8; 12];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

fn clobbers(names: &[String]) -> Result<RegSet, RomBuildError> {
    let mut set = RegSet::EMPTY;
    for n in names {
        set = set.union(match n.as_str() {
            "flags" => RegSet::FLAGS,
            r => RegSet::reg(Gpr::from_name(r).ok_or_else(|| {
                RomBuildError::Field(format!(
                    "clobber {r:?}: a 64-bit register name or \"flags\""
                ))
            })?),
        });
    }
    Ok(set)
}

/// One entry, assembled, before it is laid out.
struct OwnedEntry {
    op_id: u16,
    kind: RomKind,
    code: Vec<u8>,
    slots: Vec<Slot>,
    clobbers: RegSet,
}

/// Builds the ROM a description describes, checked as the runtime will check it; with
/// `table` (the kernel's site table), also against every site of that kernel.
pub fn build(description: &str, table: Option<&SiteTable<'_>>) -> Result<Vec<u8>, RomBuildError> {
    let d: Description =
        toml::from_str(description).map_err(|e| RomBuildError::Parse(e.to_string()))?;
    let sig = signature(&d.signature)?;
    let lib = library();
    let mut specs: Vec<OwnedEntry> = Vec::new();
    for (index, e) in d.entries.iter().enumerate() {
        let op = Op::from_name(&e.op).ok_or_else(|| RomBuildError::UnknownOp {
            index,
            name: e.op.clone(),
        })?;
        let kind = match e.kind.as_str() {
            "nothing" => RomKind::Nothing,
            "native" => RomKind::Native,
            "inline" => RomKind::Inline,
            "call" => RomKind::Call,
            k => {
                return Err(RomBuildError::UnknownKind {
                    index,
                    kind: k.into(),
                });
            }
        };
        let (bytes, slots) = match (kind, &e.sequence) {
            (RomKind::Nothing | RomKind::Native, None) => (Vec::new(), Vec::new()),
            (RomKind::Nothing | RomKind::Native, Some(_)) => {
                return Err(RomBuildError::Sequence {
                    index,
                    why: format!("{} takes no sequence", e.kind),
                });
            }
            (_, None) => {
                return Err(RomBuildError::Sequence {
                    index,
                    why: format!("{} needs a sequence", e.kind),
                });
            }
            (_, Some(name)) => {
                let s =
                    lib.iter()
                        .find(|s| s.name == name)
                        .ok_or_else(|| RomBuildError::Sequence {
                            index,
                            why: format!(
                                "no sequence named {name:?} (`pvpatch rom sequences` lists them)"
                            ),
                        })?;
                if s.entry_point != (kind == RomKind::Call) {
                    let what = if s.entry_point {
                        "an entry point"
                    } else {
                        "an inline template"
                    };
                    return Err(RomBuildError::Sequence {
                        index,
                        why: format!("{name:?} is {what}, not for kind {}", e.kind),
                    });
                }
                (s.bytes.clone(), s.slots.clone())
            }
        };
        specs.push(OwnedEntry {
            op_id: op.id(),
            kind,
            code: bytes,
            slots,
            clobbers: clobbers(&e.clobbers)?,
        });
    }
    let entries: Vec<RomEntrySpec<'_>> = specs
        .iter()
        .map(|e| RomEntrySpec {
            op_id: e.op_id,
            kind: e.kind,
            code: &e.code,
            slots: &e.slots,
            clobbers: e.clobbers,
        })
        .collect();
    let mut buf = vec![0u8; rom_size(&entries)];
    write_rom(&d.name, sig, &entries, &mut buf).map_err(RomBuildError::Write)?;
    let rom = Rom::parse(&buf).map_err(|e| RomBuildError::Write(RomWriteError::Invalid(e)))?;
    romcheck::validate_code(&rom).map_err(RomBuildError::Refused)?;
    if let Some(t) = table {
        // The signature check is the runtime's business on the machine it runs on.
        let served = if sig == [0; 12] { [0; 12] } else { sig };
        romcheck::validate(&rom, &served, t).map_err(RomBuildError::Refused)?;
    }
    Ok(buf)
}

/// A ROM, for people.
pub fn show(bytes: &[u8]) -> Result<String, patch_sites::RomError> {
    let rom = Rom::parse(bytes)?;
    let mut o = String::new();
    let sig = rom.signature();
    let sig = if sig == [0; 12] {
        "any".to_owned()
    } else {
        sig.iter()
            .map(|&c| if c.is_ascii_graphic() { c as char } else { '.' })
            .collect()
    };
    let _ = writeln!(
        o,
        "backend ROM {:?}: version {}, {} bytes, {} entries, serves {sig}",
        rom.name(),
        rom.header().version,
        bytes.len(),
        rom.len()
    );
    for e in rom.entries() {
        let op = e.op().map_or_else(
            || format!("op {} (unknown)", e.op_id),
            |o| o.name().to_owned(),
        );
        let clob = if e.clobbers.is_empty() {
            String::new()
        } else {
            format!(", clobbers {}", e.clobbers)
        };
        match e.action {
            RomAction::Nothing => {
                let _ = writeln!(o, "  {op:<14} nothing{clob}");
            }
            RomAction::Native => {
                let _ = writeln!(o, "  {op:<14} native{clob}");
            }
            RomAction::Inline { template, .. } => {
                let slots: Vec<String> = e
                    .slots()
                    .map(|s| format!("{:?}@{}", s.kind, s.offset))
                    .collect();
                let _ = writeln!(
                    o,
                    "  {op:<14} inline {:02x?} slots [{}]{clob}",
                    template,
                    slots.join(", ")
                );
            }
            RomAction::Call { code_off, code } => {
                let _ = writeln!(o, "  {op:<14} call +{code_off:#x}: {code:02x?}{clob}");
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("../../guest/roms/demo.toml");

    #[test]
    fn the_library_assembles_what_it_says() {
        for s in library() {
            assert!(!s.bytes.is_empty(), "{}", s.name);
            let i = pvpatch_isa::check::decode_at(&s.bytes, 0, 0).unwrap();
            assert!(!i.is_invalid(), "{}", s.name);
        }
        let mov = library()
            .into_iter()
            .find(|s| s.name == "mov_to_cr3")
            .unwrap();
        assert_eq!(mov.bytes, [0x40, 0x0f, 0x22, 0xd8]);
    }

    #[test]
    fn the_demo_rom_builds_and_shows() {
        let rom = build(DEMO, None).unwrap();
        let text = show(&rom).unwrap();
        assert!(
            text.contains("io_delay") && text.contains("nothing"),
            "{text}"
        );
        assert!(text.contains("call"), "{text}");
    }

    #[test]
    fn bad_descriptions_are_clear_errors() {
        let e = build(
            "name = \"x\"\nsignature = \"any\"\n[[entry]]\nop = \"frob\"\nkind = \"nothing\"\n",
            None,
        );
        assert!(matches!(e, Err(RomBuildError::UnknownOp { .. })), "{e:?}");
        let e = build(
            "name = \"x\"\nsignature = \"any\"\n[[entry]]\nop = \"cli\"\nkind = \"call\"\nsequence = \"cli\"\n",
            None,
        );
        assert!(matches!(e, Err(RomBuildError::Sequence { .. })), "{e:?}");
        // An inline template that is another op's instruction: the runtime would refuse it.
        let e = build(
            "name = \"x\"\nsignature = \"any\"\n[[entry]]\nop = \"cli\"\nkind = \"inline\"\nsequence = \"wbinvd\"\n",
            None,
        );
        assert!(matches!(e, Err(RomBuildError::Refused(_))), "{e:?}");
        let e = build("name = \"x\"\nsignature = \"toolongsignature\"\n", None);
        assert!(matches!(e, Err(RomBuildError::Field(_))), "{e:?}");
    }
}
