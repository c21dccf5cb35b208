//! Building a ROM from its description (TOML), checked exactly as the runtime will check it.

use patch_sites::rom::{Rom, RomEntrySpec, RomKind, RomWriteError, Slot, rom_size, write_rom};
use patch_sites::table::SiteTable;
use patch_sites::{Gpr, Op, RegSet};
use pvpatch_runtime::romcheck::{self, RomRefusal};
use serde::Deserialize;
use thiserror::Error;

use super::library::library;

/// Why a ROM could not be built.
#[derive(Debug, Error)]
pub enum RomBuildError {
    /// The description does not parse.
    #[error("the description does not parse: {0}")]
    Parse(String),
    /// An op name this tool does not know.
    #[error(
        "entry {index}: unknown op {} (`pvpatch ops` lists them)",
        crate::quoted(name)
    )]
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
    kernel: &crate::load::image::Image,
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

/// The signature field: `any` (all zero), or the CPUID 0x40000000 signature as CPUID gives
/// it: 1 to 12 printable ASCII characters, spaces included (`Microsoft Hv`), NUL-padded when
/// shorter (`KVMKVMKVM` is `KVMKVMKVM\0\0\0`). Empty is refused: it would mean "any" unsaid.
fn signature(s: &str) -> Result<[u8; 12], RomBuildError> {
    if s == "any" {
        return Ok([0; 12]);
    }
    if s.is_empty() {
        return Err(RomBuildError::Field(
            "the signature is empty: write \"any\" for a ROM that serves every hypervisor, or \
             the CPUID 0x40000000 signature it serves"
                .into(),
        ));
    }
    let b = s.as_bytes();
    if b.len() > 12 || !b.iter().all(|&c| c.is_ascii_graphic() || c == b' ') {
        return Err(RomBuildError::Field(format!(
            "signature {}: \"any\" or 1 to 12 printable ASCII characters, spaces included \
             (the CPUID 0x40000000 signature, e.g. \"Microsoft Hv\" or \"KVMKVMKVM\")",
            crate::quoted(s)
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
                                "no sequence named {} (`pvpatch rom sequences` lists them)",
                                crate::quoted(name)
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
                        why: format!("{} is {what}, not for kind {}", crate::quoted(name), e.kind),
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
        // The signature check is the runtime's business on the machine it runs on: check
        // for the hypervisor the ROM serves.
        romcheck::validate(&rom, &sig, t).map_err(RomBuildError::Refused)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rom::library::library;
    use crate::rom::show::show;

    const DEMO: &str = include_str!("../../../guest/roms/demo.toml");

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
        let shown = show(&rom).unwrap();
        assert!(shown.refused.is_empty(), "{:?}", shown.refused);
        let text = shown.text;
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

    fn signature_of(sig: &str) -> Result<[u8; 12], RomBuildError> {
        let rom = build(&format!("name = \"x\"\nsignature = {sig:?}\n"), None)?;
        Ok(Rom::parse(&rom).map(|r| r.signature()).unwrap())
    }

    #[test]
    fn signatures_are_as_cpuid_gives_them() {
        assert_eq!(signature_of("Microsoft Hv").unwrap(), *b"Microsoft Hv");
        assert_eq!(signature_of("KVMKVMKVM").unwrap(), *b"KVMKVMKVM\0\0\0");
        assert_eq!(signature_of(" lrpepyh  vr").unwrap(), *b" lrpepyh  vr");
        assert_eq!(signature_of("any").unwrap(), [0; 12]);
        for bad in ["toolongsignature", "tab\there", "caf\u{e9}"] {
            let e = signature_of(bad);
            assert!(matches!(e, Err(RomBuildError::Field(_))), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn an_empty_signature_is_refused_not_any() {
        let e = signature_of("");
        assert!(matches!(e, Err(RomBuildError::Field(_))), "{e:?}");
        let shown = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(shown.contains("\"any\""), "{shown}");
    }

    proptest::proptest! {
        /// Every printable signature of 1 to 12 characters builds, NUL-padded, and shows as
        /// it was written.
        #[test]
        fn every_printable_signature_builds(sig in "[ -~]{1,12}") {
            proptest::prop_assume!(sig != "any");
            let got = signature_of(&sig).unwrap();
            let mut want = [0u8; 12];
            want[..sig.len()].copy_from_slice(sig.as_bytes());
            proptest::prop_assert_eq!(got, want);
            let rom = build(&format!("name = \"x\"\nsignature = {sig:?}\n"), None).unwrap();
            let text = show(&rom).unwrap().text;
            proptest::prop_assert!(text.contains(&format!("serves {sig:?}")), "{}", text);
        }
    }
}
