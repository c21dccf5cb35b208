//! A ROM, printed for people.

use std::fmt::Write as _;

use patch_sites::rom::{Rom, RomAction};

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
