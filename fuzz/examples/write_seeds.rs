//! Writes the seed corpora of the cargo-fuzz targets: a few valid site tables and ROMs, so that
//! fuzzing starts from inputs that pass the outer checks.
//!
//! `cargo run -p pvpatch-fuzz --example write_seeds -- fuzz/cargo-fuzz/corpus`

use std::path::Path;

use patch_sites::rom::{
    NO_REX, RomEntrySpec, RomKind, Slot, SlotKind, SlotSource, rom_size, write_rom,
};
use patch_sites::table::{self, Form, Site, sealed_table_size, write_sealed_table};
use patch_sites::{Gpr, Op, Operand, RegSet};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: write_seeds CORPUS_DIR")?;
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir.join("site_table"))?;
    std::fs::create_dir_all(dir.join("rom"))?;
    std::fs::create_dir_all(dir.join("image"))?;
    std::fs::write(
        dir.join("image/seed-sample"),
        pvpatch_testkit::elf::sample(),
    )?;

    let table_addr = 0xffff_ffff_8200_0000u64;
    let text = 0xffff_ffff_8100_0000u64;
    let site = |addr, op: Op, len, insn_len, operand, width, form| Site {
        addr,
        site_len: len,
        insn_len,
        op_id: op.id(),
        form,
        operand,
        width,
        flags: 0,
        clobbers: RegSet::EMPTY,
        stub: None,
    };
    let mut sites = vec![
        site(text + 0x10, Op::Cli, 5, 1, Operand::None, 0, Form::Native),
        site(
            text + 0x20,
            Op::MovToCr3,
            5,
            3,
            Operand::Reg(Gpr::Rdi),
            8,
            Form::Native,
        ),
        site(
            text + 0x30,
            Op::IoDelay,
            6,
            6,
            Operand::PortImm(0x80),
            1,
            Form::IndirectCall,
        ),
        site(text + 0x40, Op::In, 1, 1, Operand::PortDx, 4, Form::Trap),
        site(
            text + 0x50,
            Op::Invlpg,
            5,
            3,
            Operand::MemBase(Gpr::Rax),
            0,
            Form::Native,
        ),
    ];
    let mut detour = site(text + 0x60, Op::Sti, 5, 1, Operand::None, 0, Form::Detour);
    detour.stub = Some(0xffff_ffff_81c0_0000);
    sites.push(detour);
    for n in [1, sites.len()] {
        let mut buf = vec![0u8; sealed_table_size(n)];
        write_sealed_table(&sites[..n], table_addr, &mut buf)?;
        std::fs::write(dir.join(format!("site_table/seed-sealed-{n}")), &buf)?;
    }
    // An unsealed (linker-gathered) table: header, then records, no count or checksum.
    let begin = table_addr + table::HEADER_SIZE as u64;
    let end = begin + (2 * table::RECORD_SIZE) as u64;
    let mut buf = table::unsealed_header(table_addr, begin, end)
        .ok_or("header")?
        .to_vec();
    for (i, s) in sites[..2].iter().enumerate() {
        let at = begin + (i * table::RECORD_SIZE) as u64;
        buf.extend_from_slice(&s.to_raw(at)?.to_bytes());
    }
    std::fs::write(dir.join("site_table/seed-unsealed-2"), &buf)?;

    let slots = [Slot {
        kind: SlotKind::ModrmRm,
        offset: 2,
        rex_offset: NO_REX,
        source: SlotSource::Reg,
    }];
    let entries = [
        RomEntrySpec {
            op_id: Op::IoDelay.id(),
            kind: RomKind::Nothing,
            code: &[],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::Sti.id(),
            kind: RomKind::Native,
            code: &[],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
        RomEntrySpec {
            op_id: Op::MovToCr3.id(),
            kind: RomKind::Inline,
            code: &[0x0f, 0x22, 0xdf],
            slots: &slots,
            clobbers: RegSet::FLAGS,
        },
        RomEntrySpec {
            op_id: Op::Cli.id(),
            kind: RomKind::Call,
            code: &[0xfa, 0xc3],
            slots: &[],
            clobbers: RegSet::EMPTY,
        },
    ];
    let mut rom = vec![0u8; rom_size(&entries)];
    write_rom("seed", *b"TCGTCGTCGTCG", &entries, &mut rom)?;
    std::fs::write(dir.join("rom/seed-4"), &rom)?;
    Ok(())
}
