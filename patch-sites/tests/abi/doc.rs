//! The worked examples in `docs/abi.md` are the writer's real output: this test rebuilds them
//! and compares them with the hex dumps in the document.

use patch_sites::rom::{
    NO_REX, RomEntrySpec, RomKind, Slot, SlotKind, SlotSource, rom_size, write_rom,
};
use patch_sites::table::{AddrRange, Form, Site, SiteTable, sealed_table_size, write_sealed_table};
use patch_sites::{Gpr, Op, Operand, RegSet, Rom};

/// The example table: `cli` at 0xffffffff81000010 and `mov cr3, rdi` at 0xffffffff81000020,
/// both padded to 5 bytes, in a table at 0xffffffff82000000.
pub fn example_table() -> Vec<u8> {
    let sites = [
        Site {
            addr: 0xffff_ffff_8100_0010,
            site_len: 5,
            insn_len: 1,
            op_id: Op::Cli.id(),
            form: Form::Native,
            operand: Operand::None,
            width: 0,
            flags: 0,
            clobbers: RegSet::EMPTY,
            stub: None,
        },
        Site {
            addr: 0xffff_ffff_8100_0020,
            site_len: 5,
            insn_len: 3,
            op_id: Op::MovToCr3.id(),
            form: Form::Native,
            operand: Operand::Reg(Gpr::Rdi),
            width: 8,
            flags: 0,
            clobbers: RegSet::FLAGS,
            stub: None,
        },
    ];
    let mut b = vec![0u8; sealed_table_size(2)];
    write_sealed_table(&sites, 0xffff_ffff_8200_0000, &mut b).unwrap();
    b
}

/// The example ROM: `io_delay` becomes nothing; `mov cr3, reg` is an inline template whose
/// register goes into ModRM.rm.
pub fn example_rom() -> Vec<u8> {
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
            op_id: Op::MovToCr3.id(),
            kind: RomKind::Inline,
            code: &[0x0f, 0x22, 0xd8],
            slots: &slots,
            clobbers: RegSet::EMPTY,
        },
    ];
    let mut b = vec![0u8; rom_size(&entries)];
    write_rom("example", *b"KVMKVMKVM\0\0\0", &entries, &mut b).unwrap();
    b
}

fn hex_lines(b: &[u8]) -> String {
    b.chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let h: Vec<String> = c.iter().map(|x| format!("{x:02x}")).collect();
            format!("{:04x}: {}\n", i * 16, h.join(" "))
        })
        .collect()
}

/// The hex block after `marker` in the document.
fn doc_block(doc: &str, marker: &str) -> String {
    let start = doc
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} missing from docs/abi.md"));
    let rest = &doc[start..];
    let open = rest.find("```text\n").unwrap() + 8;
    let close = rest[open..].find("```").unwrap();
    rest[open..open + close].to_owned()
}

#[test]
fn the_documented_examples_are_what_the_writer_writes() {
    let doc = include_str!("../../../docs/abi.md");
    let t = example_table();
    let r = example_rom();
    if std::env::var_os("PVPATCH_PRINT_DOC_EXAMPLES").is_some() {
        print!("table:\n{}rom:\n{}", hex_lines(&t), hex_lines(&r));
    }
    assert_eq!(doc_block(doc, "<!-- example-table -->"), hex_lines(&t));
    assert_eq!(doc_block(doc, "<!-- example-rom -->"), hex_lines(&r));
    // And both parse.
    let text = AddrRange::new(0xffff_ffff_8100_0000, 0xffff_ffff_8110_0000);
    assert_eq!(
        SiteTable::parse_contiguous(&t, 0xffff_ffff_8200_0000, &[text])
            .unwrap()
            .len(),
        2
    );
    assert_eq!(Rom::parse(&r).unwrap().len(), 2);
}

#[test]
fn the_documented_op_table_is_the_catalogue() {
    let doc = include_str!("../../../docs/abi.md");
    // Rows of the form `| id | `name` | ...` whose name is an op's (other tables have numeric
    // first columns too, but their second column is never an op name).
    let doc_ops: Vec<(u16, String)> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let id = cells.get(1)?.parse().ok()?;
            let name = cells
                .get(2)?
                .strip_prefix('`')?
                .strip_suffix('`')?
                .to_owned();
            Op::from_name(&name).map(|_| (id, name))
        })
        .collect();
    let code: Vec<(u16, String)> = patch_sites::ALL_OPS
        .iter()
        .map(|o| (o.id(), o.name().to_owned()))
        .collect();
    assert_eq!(
        doc_ops, code,
        "docs/abi.md's op table differs from the catalogue"
    );
}
