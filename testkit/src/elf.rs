//! Small ELF images built byte by byte, for tests, fuzzing and benchmarks: an ET_EXEC x86-64
//! file with one loadable segment holding `.text` and any extra sections, an optional symbol
//! table, and a section-name table. Every field is where the tests can find and corrupt it.

use object::elf;

/// Where `.text` is linked.
pub const TEXT: u64 = 0xffff_ffff_8100_0000;
/// File offset of the first section's data.
pub const DATA_OFFSET: u64 = 0x1000;

/// An extra section: name, address, flags, data.
#[derive(Clone, Debug)]
pub struct Extra {
    /// Name.
    pub name: String,
    /// Address.
    pub addr: u64,
    /// `sh_flags`.
    pub flags: u64,
    /// Contents.
    pub data: Vec<u8>,
}

impl Extra {
    /// A read-only allocated data section.
    pub fn data(name: &str, addr: u64, data: Vec<u8>) -> Self {
        Extra {
            name: name.into(),
            addr,
            flags: elf::SHF_ALLOC as u64,
            data,
        }
    }
}

/// An image with `code` as `.text` at [`TEXT`] and function symbols `(name, offset, size)`.
pub fn elf_with_code(code: &[u8], symbols: &[(&str, u64, u64)]) -> pvpatch::load::Image {
    let bytes = build(code, symbols, &[]);
    pvpatch::load::Image::from_bytes("test.elf", bytes).unwrap_or_else(|e| panic!("{e}"))
}

fn push_shdr(out: &mut Vec<u8>, f: [u64; 10]) {
    // name, type, flags, addr, offset, size, link, info, addralign, entsize
    out.extend_from_slice(&(f[0] as u32).to_le_bytes());
    out.extend_from_slice(&(f[1] as u32).to_le_bytes());
    out.extend_from_slice(&f[2].to_le_bytes());
    out.extend_from_slice(&f[3].to_le_bytes());
    out.extend_from_slice(&f[4].to_le_bytes());
    out.extend_from_slice(&f[5].to_le_bytes());
    out.extend_from_slice(&(f[6] as u32).to_le_bytes());
    out.extend_from_slice(&(f[7] as u32).to_le_bytes());
    out.extend_from_slice(&f[8].to_le_bytes());
    out.extend_from_slice(&f[9].to_le_bytes());
}

/// The bytes of an image: `.text` (`code`), then `extra` sections (each placed in the file after
/// the previous one, at its own address), a symbol table if `symbols` is not empty, and
/// `.shstrtab`. One PT_LOAD covers `.text`.
pub fn build(code: &[u8], symbols: &[(&str, u64, u64)], extra: &[Extra]) -> Vec<u8> {
    let mut shstr = vec![0u8];
    let mut name = |n: &str| {
        let off = shstr.len() as u64;
        shstr.extend_from_slice(n.as_bytes());
        shstr.push(0);
        off
    };
    let mut body = Vec::new(); // file bytes from DATA_OFFSET
    let mut shdrs = Vec::new();
    push_shdr(&mut shdrs, [0; 10]);
    let text_name = name(".text");
    push_shdr(
        &mut shdrs,
        [
            text_name,
            elf::SHT_PROGBITS as u64,
            (elf::SHF_ALLOC | elf::SHF_EXECINSTR) as u64,
            TEXT,
            DATA_OFFSET,
            code.len() as u64,
            0,
            0,
            16,
            0,
        ],
    );
    body.extend_from_slice(code);
    for e in extra {
        while !body.len().is_multiple_of(8) {
            body.push(0);
        }
        let off = DATA_OFFSET + body.len() as u64;
        let n = name(&e.name);
        push_shdr(
            &mut shdrs,
            [
                n,
                elf::SHT_PROGBITS as u64,
                e.flags,
                e.addr,
                off,
                e.data.len() as u64,
                0,
                0,
                1,
                0,
            ],
        );
        body.extend_from_slice(&e.data);
    }
    let mut nsections = 2 + extra.len() as u64;
    if !symbols.is_empty() {
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; 24];
        for (n, off, size) in symbols {
            let no = strtab.len() as u32;
            strtab.extend_from_slice(n.as_bytes());
            strtab.push(0);
            symtab.extend_from_slice(&no.to_le_bytes());
            symtab.push((elf::STB_GLOBAL << 4) | elf::STT_FUNC);
            symtab.push(0);
            symtab.extend_from_slice(&1u16.to_le_bytes()); // .text
            symtab.extend_from_slice(&(TEXT + off).to_le_bytes());
            symtab.extend_from_slice(&size.to_le_bytes());
        }
        while !body.len().is_multiple_of(8) {
            body.push(0);
        }
        let sym_off = DATA_OFFSET + body.len() as u64;
        let symtab_index = nsections;
        let strtab_index = nsections + 1;
        let n = name(".symtab");
        push_shdr(
            &mut shdrs,
            [
                n,
                elf::SHT_SYMTAB as u64,
                0,
                0,
                sym_off,
                symtab.len() as u64,
                strtab_index,
                1,
                8,
                24,
            ],
        );
        body.extend_from_slice(&symtab);
        let str_off = DATA_OFFSET + body.len() as u64;
        let n = name(".strtab");
        push_shdr(
            &mut shdrs,
            [
                n,
                elf::SHT_STRTAB as u64,
                0,
                0,
                str_off,
                strtab.len() as u64,
                0,
                0,
                1,
                0,
            ],
        );
        body.extend_from_slice(&strtab);
        nsections = symtab_index + 2;
    }
    let shstr_name = name(".shstrtab");
    let shstr_off = DATA_OFFSET + body.len() as u64;
    push_shdr(
        &mut shdrs,
        [
            shstr_name,
            elf::SHT_STRTAB as u64,
            0,
            0,
            shstr_off,
            shstr.len() as u64,
            0,
            0,
            1,
            0,
        ],
    );
    body.extend_from_slice(&shstr);
    let shstrndx = nsections;
    nsections += 1;
    while !body.len().is_multiple_of(8) {
        body.push(0);
    }
    let shoff = DATA_OFFSET + body.len() as u64;

    let mut out = Vec::new();
    out.extend_from_slice(&elf::ELFMAG);
    out.extend_from_slice(&[elf::ELFCLASS64, elf::ELFDATA2LSB, elf::EV_CURRENT, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&elf::ET_EXEC.to_le_bytes());
    out.extend_from_slice(&elf::EM_X86_64.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&TEXT.to_le_bytes()); // entry
    out.extend_from_slice(&64u64.to_le_bytes()); // phoff
    out.extend_from_slice(&shoff.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    out.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    out.extend_from_slice(&1u16.to_le_bytes()); // phnum
    out.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    out.extend_from_slice(&(nsections as u16).to_le_bytes());
    out.extend_from_slice(&(shstrndx as u16).to_le_bytes());
    // PT_LOAD for .text
    out.extend_from_slice(&elf::PT_LOAD.to_le_bytes());
    out.extend_from_slice(&(elf::PF_R | elf::PF_X).to_le_bytes());
    out.extend_from_slice(&DATA_OFFSET.to_le_bytes());
    out.extend_from_slice(&TEXT.to_le_bytes());
    out.extend_from_slice(&(TEXT - 0xffff_ffff_8000_0000).to_le_bytes());
    out.extend_from_slice(&(code.len() as u64).to_le_bytes());
    out.extend_from_slice(&(code.len() as u64).to_le_bytes());
    out.extend_from_slice(&0x1000u64.to_le_bytes());
    out.resize(DATA_OFFSET as usize, 0);
    out.extend_from_slice(&body);
    out.extend_from_slice(&shdrs);
    out
}

/// A small image with a few sensitive instructions in two functions, and an `__ex_table` entry
/// for its `rdmsr`: the sample of the CLI tests and a seed of the fuzz target.
pub fn sample() -> Vec<u8> {
    let code: Vec<u8> = [
        &[0xfa, 0x0f, 0x1f, 0x40, 0x00][..], // cli; nop4          (f: +0)
        &[0x0f, 0x22, 0xdf],                 // mov cr3, rdi       (+5)
        &[0x48, 0x89, 0xd8, 0x48, 0x83, 0xc0, 0x01], // mov rax, rbx; add rax, 1 (+8)
        &[0xe6, 0x80],                       // out 0x80, al       (+15)
        &[0xc3],                             // ret                (+17)
        &[0x0f, 0x32],                       // rdmsr              (g: +18)
        &[0xfb],                             // sti                (+20)
        &[0x0f, 0x01, 0xc1],                 // vmcall             (+21)
        &[0xc3],                             // ret                (+24)
    ]
    .concat();
    // __ex_table: one entry for the rdmsr at +18, fixup at +24.
    let ex_addr = TEXT + 0x10_0000;
    let mut ex = Vec::new();
    ex.extend_from_slice(&(((TEXT + 18) as i64 - ex_addr as i64) as i32).to_le_bytes());
    ex.extend_from_slice(&(((TEXT + 24) as i64 - (ex_addr + 4) as i64) as i32).to_le_bytes());
    ex.extend_from_slice(&0u32.to_le_bytes());
    build(
        &code,
        &[("f", 0, 18), ("g", 18, 7)],
        &[Extra::data("__ex_table", ex_addr, ex)],
    )
}

/// A stripped stock-kernel sample: no symbol table, its symbols in kallsyms arrays in
/// `.rodata` (6.4 order), an `__mcount_loc` folded into `.rodata` that only its kallsyms
/// `__start_`/`__stop_` symbols find, an ORC table, and a cave of `int3` padding inside
/// `[_text, _etext)`: sites too small for a call (`cli` before a movable `mov`, `rdtsc` after
/// a protected `call __fentry__`) get detours. A seed of the `image` fuzz target (hostile
/// kallsyms start from it) and a test image of the stock-kernel path.
pub fn stock_sample() -> Vec<u8> {
    let fentry = TEXT;
    let mut code = vec![0xc3];
    code.resize(16, 0xcc);
    let f = TEXT + code.len() as u64;
    code.push(0xe8); // call __fentry__ (named by __mcount_loc)
    code.extend_from_slice(&((fentry as i64 - (f + 5) as i64) as i32).to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x31]); // rdtsc
    code.extend_from_slice(&[0x48, 0x89, 0xd8, 0x48, 0x83, 0xc0, 0x01]); // mov rax, rbx; add
    code.push(0xfa); // cli
    code.extend_from_slice(&[0x48, 0x8d, 0x40, 0x10, 0x31, 0xc0]); // lea rax, [rax+16]; xor
    code.push(0xc3);
    code.resize(48, 0xcc);
    let cave = TEXT + code.len() as u64;
    code.resize(code.len() + 72 * 1024, 0xcc);
    let etext = TEXT + code.len() as u64;
    // .rodata: the mcount table, then kallsyms.
    let rodata = TEXT + 0x100_0000;
    let mcount = f.to_le_bytes().to_vec();
    let mut symbols = vec![
        (TEXT, b'T', "_text"),
        (TEXT, b'T', "__fentry__"),
        (f, b'T', "f"),
        (cave, b't', "cave_start"),
        (etext, b'T', "_etext"),
        (rodata, b'D', "__start_mcount_loc"),
        (rodata + 8, b'D', "__stop_mcount_loc"),
    ];
    symbols.sort_by_key(|s| s.0);
    let (ks, _) = super::kallsyms::encode(&symbols, TEXT, super::kallsyms::Order::New);
    let mut ro = mcount;
    ro.resize(64, 0);
    ro.extend_from_slice(&ks);
    // ORC: defined at _text and f, undefined at the cave and at _etext.
    let orc_ip_addr = rodata + 0x10_0000;
    let orc: [(u64, u8); 4] = [(TEXT, 0x52), (f, 0x52), (cave, 0), (etext, 0)];
    let ips: Vec<u8> = orc
        .iter()
        .enumerate()
        .flat_map(|(i, (a, _))| {
            ((*a as i64 - (orc_ip_addr + 4 * i as u64) as i64) as i32).to_le_bytes()
        })
        .collect();
    let units: Vec<u8> = orc.iter().flat_map(|(_, r)| [0, 0, 0, 0, *r, 0]).collect();
    build(
        &code,
        &[],
        &[
            Extra::data(".rodata", rodata, ro),
            Extra::data(".orc_unwind_ip", orc_ip_addr, ips),
            Extra::data(".orc_unwind", orc_ip_addr + 0x1000, units),
        ],
    )
}

/// An image with `.text` (`code`) and `n` more executable sections, each holding `each`, one
/// after the other in memory: the shape whose per-section costs must stay linear (a chunk of
/// the sweep once kept a map per section of the image: 20,000 sections took 16 GB).
pub fn many_exec_sections(code: &[u8], n: usize, each: &[u8]) -> Vec<u8> {
    let extra: Vec<Extra> = (0..n)
        .map(|i| Extra {
            name: ".text".into(),
            addr: TEXT + 0x100_0000 + (i * each.len().next_multiple_of(8)) as u64,
            flags: (elf::SHF_ALLOC | elf::SHF_EXECINSTR) as u64,
            data: each.to_vec(),
        })
        .collect();
    build(code, &[], &extra)
}
