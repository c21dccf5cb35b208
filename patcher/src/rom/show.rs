//! A ROM, printed for people, with what the runtime would refuse in it.

use std::fmt::Write as _;

use patch_sites::rom::{Rom, RomAction};
use pvpatch_runtime::romcheck::{self, RomRefusal};

/// A ROM, shown.
#[derive(Debug, Clone)]
pub struct Shown {
    /// The ROM, for people: a header line, then a line per entry, each entry the runtime would
    /// refuse followed by a `refused:` line saying why.
    pub text: String,
    /// Number of entries.
    pub entries: u16,
    /// The entries the runtime would refuse (by index), with the reason: the checks of
    /// [`romcheck::validate_entry`], the runtime's own, that need no kernel. Any one makes the
    /// runtime refuse the whole ROM.
    pub refused: Vec<(u16, RomRefusal)>,
    /// The ROM, for programs (`pvpatch rom show --json`).
    pub json: ShownRom,
}

/// A ROM, for programs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShownRom {
    /// Its name.
    pub name: String,
    /// Its format version.
    pub version: u16,
    /// Its size in bytes.
    pub size: usize,
    /// The hypervisor signature it serves: `any`, or the quoted signature.
    pub serves: String,
    /// Its entries, in order.
    pub entries: Vec<ShownEntry>,
    /// Whether the runtime would take it (it refuses the whole ROM for any refused entry).
    pub accepted: bool,
}

/// One entry of a ROM, for programs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShownEntry {
    /// The op's name, or `op N (unknown)` for an op this runtime does not know (and ignores).
    pub op: String,
    /// `nothing`, `native`, `inline` or `call`.
    pub action: &'static str,
    /// The inline template or the called code, as hex.
    pub bytes: Option<String>,
    /// An inline template's slots, as `Kind@offset`.
    pub slots: Vec<String>,
    /// For a call: where its code is, from the ROM's code area.
    pub code_offset: Option<u32>,
    /// The registers it clobbers besides the op's own outputs.
    pub clobbers: String,
    /// Why the runtime would refuse it, if it would.
    pub refused: Option<String>,
}

/// The signature as a description writes it: `any`, or quoted, trailing NULs dropped, other
/// bytes that are not printable ASCII as `\xNN`.
fn signature(sig: &[u8; 12]) -> String {
    if *sig == [0; 12] {
        return "any".to_owned();
    }
    let len = sig.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    let mut s = String::from("\"");
    for &c in &sig[..len] {
        match c {
            b'"' | b'\\' => {
                s.push('\\');
                s.push(c as char);
            }
            b' '..=b'~' => s.push(c as char),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s.push('"');
    s
}

/// A ROM, for people, checked entry by entry as the runtime checks it.
pub fn show(bytes: &[u8]) -> Result<Shown, patch_sites::RomError> {
    let rom = Rom::parse(bytes)?;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "backend ROM {:?}: version {}, {} bytes, {} entries, serves {}",
        rom.name(),
        rom.header().version,
        bytes.len(),
        rom.len(),
        signature(&rom.signature())
    );
    let mut refused = Vec::new();
    let mut entries = Vec::new();
    for (index, e) in (0u16..).zip(rom.entries()) {
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
        if e.op().is_none() {
            let _ = writeln!(o, "    ignored: this runtime does not know the op");
        }
        let refusal = romcheck::validate_entry(&e).err();
        if let Some(r) = &refusal {
            let _ = writeln!(o, "    refused: {r}");
            refused.push((index, *r));
        }
        let hexed = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let (action, bytes, code_offset) = match e.action {
            RomAction::Nothing => ("nothing", None, None),
            RomAction::Native => ("native", None, None),
            RomAction::Inline { template, .. } => ("inline", Some(hexed(template)), None),
            RomAction::Call { code_off, code } => ("call", Some(hexed(code)), Some(code_off)),
        };
        entries.push(ShownEntry {
            op,
            action,
            bytes,
            slots: e
                .slots()
                .map(|s| format!("{:?}@{}", s.kind, s.offset))
                .collect(),
            code_offset,
            clobbers: e.clobbers.to_string(),
            refused: refusal.map(|r| r.to_string()),
        });
    }
    let json = ShownRom {
        name: rom.name().to_owned(),
        version: rom.header().version,
        size: bytes.len(),
        serves: signature(&rom.signature()),
        accepted: refused.is_empty(),
        entries,
    };
    Ok(Shown {
        text: o,
        entries: rom.len(),
        refused,
        json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use patch_sites::rom::{RomEntrySpec, RomKind, rom_size, write_rom};
    use patch_sites::{Op, RegSet};

    fn rom(sig: [u8; 12], entries: &[RomEntrySpec<'_>]) -> Vec<u8> {
        let mut b = vec![0u8; rom_size(entries)];
        write_rom("t", sig, entries, &mut b).unwrap();
        b
    }

    #[test]
    fn signatures_show_as_descriptions_write_them() {
        let shown = |sig| show(&rom(sig, &[])).unwrap().text;
        assert!(shown([0; 12]).contains("serves any"));
        assert!(shown(*b"Microsoft Hv").contains("serves \"Microsoft Hv\""));
        assert!(shown(*b"KVMKVMKVM\0\0\0").contains("serves \"KVMKVMKVM\"\n"));
        assert!(shown(*b"KVM\0KVM\"\\\x01\0\0").contains(r#"serves "KVM\x00KVM\"\\\x01""#));
    }

    #[test]
    fn refusals_agree_with_the_runtime() {
        let entry = |op: Op, kind, code| RomEntrySpec {
            op_id: op.id(),
            kind,
            code,
            slots: &[],
            clobbers: RegSet::EMPTY,
        };
        let vmcall = [0x0f, 0x01, 0xc1];
        let entries = [
            entry(Op::IoDelay, RomKind::Nothing, &[]),
            entry(Op::Cli, RomKind::Inline, &vmcall),
        ];
        let b = rom([0; 12], &entries);
        let s = show(&b).unwrap();
        let parsed = Rom::parse(&b).unwrap();
        assert_eq!(s.entries, 2);
        assert_eq!(
            s.refused.first().map(|r| r.1),
            romcheck::validate_code(&parsed).err()
        );
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.refused[0].0, 1);
    }
}
