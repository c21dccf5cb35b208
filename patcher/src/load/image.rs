//! Loading an x86-64 ELF kernel image.
//!
//! The file is mapped with memmap2 and read with `object`'s low-level ELF reader: it is
//! zero-copy over the mapping (a distro `vmlinux` is ~66 MB, of which we only decode the
//! ~15 MB of code), every accessor is bounds-checked and returns an error rather than
//! panicking on malformed input, and it is the same crate whose `build::elf::Builder` writes
//! the annotated image, so reader and writer agree on what a section is. (The tests read the
//! same images with goblin, independently, to cross-check.)
//!
//! Everything checked here is checked once, so the rest of the tool can index section data
//! without further checks: every section with file data lies inside the file, no two sections
//! share file bytes or addresses, and every executable section's address range does not wrap.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, Sym};
use object::{LittleEndian as LE, read::StringTable};
use patch_sites::table::AddrRange;
use thiserror::Error;

/// Why an image cannot be used.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file cannot be opened or read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not an ELF file, or not one this tool handles.
    #[error("{0}")]
    Unsupported(String),
    /// A bzImage whose vmlinux cannot be extracted.
    #[error("{path}: {source}")]
    BzImage {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: super::bzimage::BzImageError,
    },
    /// The ELF structure is malformed.
    #[error("malformed ELF: {0}")]
    Malformed(String),
}

impl ImageError {
    fn malformed(what: impl fmt::Display) -> Self {
        ImageError::Malformed(what.to_string())
    }
}

/// The result type of this module.
pub type Result<T> = std::result::Result<T, ImageError>;

/// An ELF section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Index in the section header table.
    pub index: usize,
    /// Name (empty if the image has no section-name table).
    pub name: String,
    /// `sh_type`.
    pub kind: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// Virtual address.
    pub addr: u64,
    /// Size in memory.
    pub size: u64,
    /// File offset of the data (meaningless for `SHT_NOBITS`).
    pub offset: u64,
    /// `sh_addralign`.
    pub align: u64,
}

impl Section {
    /// Whether the section holds code.
    pub fn is_exec(&self) -> bool {
        self.flags & elf::SHF_EXECINSTR as u64 != 0
            && self.flags & elf::SHF_ALLOC as u64 != 0
            && self.kind == elf::SHT_PROGBITS
    }

    /// Whether the section has bytes in the file.
    pub fn has_file_data(&self) -> bool {
        self.kind != elf::SHT_NOBITS && self.kind != elf::SHT_NULL && self.size > 0
    }

    /// Whether it occupies memory at run time.
    pub fn is_alloc(&self) -> bool {
        self.flags & elf::SHF_ALLOC as u64 != 0
    }

    /// Its address range.
    pub fn range(&self) -> AddrRange {
        AddrRange::new(self.addr, self.addr.saturating_add(self.size))
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.addr && addr - self.addr < self.size
    }
}

/// An ELF program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `p_type`.
    pub kind: u32,
    /// `p_flags`.
    pub flags: u32,
    /// `p_offset`.
    pub offset: u64,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_paddr`.
    pub paddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_align`.
    pub align: u64,
}

/// A function symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// Name.
    pub name: String,
    /// Address.
    pub addr: u64,
    /// Size (0 if unknown).
    pub size: u64,
}

enum Backing {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// Where an image's symbols came from.
// Serialised (in the ledger) as its `name()`, which a test checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SymbolSource {
    /// The ELF symbol table.
    Symtab,
    /// The kernel's own kallsyms (a stripped `vmlinux`).
    Kallsyms,
    /// None: the image is stripped and has no kallsyms (names and function starts come only
    /// from the section headers and Linux's tables).
    None,
}

impl SymbolSource {
    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            SymbolSource::Symtab => "symtab",
            SymbolSource::Kallsyms => "kallsyms",
            SymbolSource::None => "none",
        }
    }
}

/// The bzImage an image was extracted from (in memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromBzImage {
    /// The bzImage's size in bytes.
    pub size: u64,
    /// The bzImage's SHA-256, as hex.
    pub sha256: String,
    /// The payload's compression (`xz`, `gzip`, ...).
    pub compression: &'static str,
    /// The integrity checks the bzImage allowed, all of which passed
    /// ([`super::bzimage::Extracted::checks`]).
    pub checks: Vec<&'static str>,
}

/// A loaded, checked image.
pub struct Image {
    /// Where it came from (for reports): the file given, which is the bzImage when
    /// [`Image::bzimage`] says so.
    pub path: PathBuf,
    /// The bzImage the ELF image was extracted from, if it came from one.
    pub bzimage: Option<FromBzImage>,
    data: Backing,
    /// `ET_EXEC` or `ET_DYN`.
    pub elf_type: u16,
    /// Entry point.
    pub entry: u64,
    /// Every section, in header order.
    pub sections: Vec<Section>,
    /// Every program header.
    pub segments: Vec<Segment>,
    /// Function symbols, sorted by address (from the ELF symbol table, else from the kernel's
    /// kallsyms; empty for a stripped image without kallsyms).
    pub symbols: Vec<Symbol>,
    /// Where the symbols came from.
    pub symbol_source: SymbolSource,
    /// The kernel's kallsyms, when the symbols came from it.
    pub kallsyms: Option<super::kallsyms::Kallsyms>,
    /// Every named symbol's address (functions and data), from the same source.
    names: std::collections::HashMap<String, u64>,
    /// The GNU build id, if the image has one.
    pub build_id: Option<Vec<u8>>,
    /// Every ELF note of the note sections: `(name, type, descriptor)`.
    pub notes: Vec<(Vec<u8>, u32, Vec<u8>)>,
    /// Where a boot shim's parameters are in its section (`.pvpatch_shim`), found once by
    /// their magic, if the image has a shim.
    pub shim_params_at: Option<usize>,
    /// The allocated sections with bytes in the file, by address.
    by_addr: crate::spans::SpanIndex,
}

/// What [`ImageError::Unsupported`] ends with for a file that is not ELF.
const NO_MAGIC: &str = "not an ELF file (no \\x7fELF magic)";

/// Whether the regular file at `path` has a bzImage's setup header (`HdrS` at 0x202) and no
/// ELF magic: read from its first bytes only.
fn looks_like_bzimage(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok_and(|()| head[..4] != elf::ELFMAG && &head[0x202..0x206] == b"HdrS")
}

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the physical address of a kernel's 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("len", &self.bytes().len())
            .field("sections", &self.sections.len())
            .field("symbols", &self.symbols.len())
            .finish()
    }
}

impl Image {
    /// Maps and checks the ELF file at `path`, or extracts the vmlinux of the bzImage at
    /// `path` (in memory, at most [`super::bzimage::DEFAULT_MAX_DECOMPRESSED`] bytes of it) and
    /// checks that.
    pub fn open(path: &Path) -> Result<Image> {
        Image::open_kernel(path, super::bzimage::DEFAULT_MAX_DECOMPRESSED)
    }

    /// As [`Image::open`], a bzImage's payload decompressing to at most `max_decompressed`
    /// bytes.
    pub fn open_kernel(path: &Path, max_decompressed: u64) -> Result<Image> {
        if !looks_like_bzimage(path) {
            return Image::open_with(path, true).map_err(|e| match e {
                ImageError::Unsupported(m) if m.ends_with(NO_MAGIC) => ImageError::Unsupported(
                    format!("{m}, and not a bzImage (no \"HdrS\" setup header at 0x202)"),
                ),
                e => e,
            });
        }
        let bz = std::fs::read(path).map_err(|source| ImageError::Io {
            path: path.to_owned(),
            source,
        })?;
        let bzerr = |source| ImageError::BzImage {
            path: path.to_owned(),
            source,
        };
        let x = super::bzimage::extract_vmlinux(&bz, max_decompressed).map_err(bzerr)?;
        let from = FromBzImage {
            size: bz.len() as u64,
            sha256: crate::ledger::sha256_hex(&bz),
            compression: x.format,
            checks: x.checks,
        };
        drop(bz);
        let mut image = Image::parse(path.to_owned(), Backing::Owned(x.vmlinux), true)?;
        image.bzimage = Some(from);
        Ok(image)
    }

    /// Maps and checks the ELF file at `path`; a stripped kernel's kallsyms is recovered only
    /// if `kallsyms` (checking a written image's table needs no symbols, and recovering them
    /// reads megabytes of `.rodata`).
    pub fn open_with(path: &Path, kallsyms: bool) -> Result<Image> {
        let io = |source| ImageError::Io {
            path: path.to_owned(),
            source,
        };
        // Before opening: opening a FIFO blocks until something writes to it.
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(ImageError::Unsupported(format!(
                "{}: {}, not a regular file",
                path.display(),
                crate::output::file_kind(&meta)
            )));
        }
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Err(ImageError::Unsupported(format!(
                "{}: empty file",
                path.display()
            )));
        }
        // SAFETY: the mapping is read-only and private to this process. If another process
        // truncates or rewrites the file while it is mapped, reads may fault or see new bytes;
        // the tool reads each byte through bounds-checked slices of the mapping, and the
        // documented contract is that the input is not modified while pvpatch runs.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Image::parse(path.to_owned(), Backing::Mapped(map), kallsyms)
    }

    /// Checks an image held in memory (tests, fuzzing).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Image> {
        Image::parse(PathBuf::from(name), Backing::Owned(bytes), true)
    }

    fn parse(path: PathBuf, data: Backing, recover_kallsyms: bool) -> Result<Image> {
        let bytes = data.bytes();
        if bytes.len() < 4 || bytes[..4] != elf::ELFMAG {
            return Err(ImageError::Unsupported(format!(
                "{}: {NO_MAGIC}",
                path.display()
            )));
        }
        if bytes.get(4) != Some(&elf::ELFCLASS64) {
            return Err(ImageError::Unsupported(format!(
                "{}: not a 64-bit ELF file",
                path.display()
            )));
        }
        if bytes.get(5) != Some(&elf::ELFDATA2LSB) {
            return Err(ImageError::Unsupported(format!(
                "{}: not a little-endian ELF file",
                path.display()
            )));
        }
        let header = elf::FileHeader64::<LE>::parse(bytes).map_err(ImageError::malformed)?;
        let endian = header.endian().map_err(ImageError::malformed)?;
        let machine = header.e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(ImageError::Unsupported(format!(
                "{}: ELF machine {machine} is not x86-64 ({})",
                path.display(),
                elf::EM_X86_64
            )));
        }
        let elf_type = header.e_type(endian);
        if elf_type != elf::ET_EXEC && elf_type != elf::ET_DYN {
            return Err(ImageError::Unsupported(format!(
                "{}: ELF type {elf_type} is neither an executable (ET_EXEC) nor a shared \
                 object/PIE (ET_DYN)",
                path.display()
            )));
        }
        let file_len = bytes.len() as u64;

        let phdrs = header
            .program_headers(endian, bytes)
            .map_err(|e| ImageError::malformed(format!("program headers: {e}")))?;
        let mut segments = Vec::with_capacity(phdrs.len());
        for (i, p) in phdrs.iter().enumerate() {
            let s = Segment {
                kind: p.p_type(endian),
                flags: p.p_flags(endian),
                offset: p.p_offset(endian),
                vaddr: p.p_vaddr(endian),
                paddr: p.p_paddr(endian),
                filesz: p.p_filesz(endian),
                memsz: p.p_memsz(endian),
                align: p.p_align(endian),
            };
            if s.kind == elf::PT_LOAD {
                let end = s.offset.checked_add(s.filesz);
                if end.is_none_or(|e| e > file_len) {
                    return Err(ImageError::malformed(format!(
                        "program header {i} (PT_LOAD at {:#x}): file range {:#x}+{:#x} exceeds \
                         the file's {file_len:#x} bytes",
                        s.vaddr, s.offset, s.filesz
                    )));
                }
                if s.vaddr.checked_add(s.memsz).is_none() || s.filesz > s.memsz {
                    return Err(ImageError::malformed(format!(
                        "program header {i}: memory range {:#x}+{:#x} (file size {:#x}) is \
                         invalid",
                        s.vaddr, s.memsz, s.filesz
                    )));
                }
            }
            segments.push(s);
        }

        let table = header
            .sections(endian, bytes)
            .map_err(|e| ImageError::malformed(format!("section headers: {e}")))?;
        let mut sections = Vec::with_capacity(table.len());
        for (index, sh) in table.enumerate() {
            let index = index.0;
            let name = table
                .section_name(endian, sh)
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .map_err(|e| ImageError::malformed(format!("section {index}: name: {e}")))?;
            let s = Section {
                index,
                name,
                kind: sh.sh_type(endian),
                flags: sh.sh_flags(endian),
                addr: sh.sh_addr(endian),
                size: sh.sh_size(endian),
                offset: sh.sh_offset(endian),
                align: sh.sh_addralign(endian),
            };
            if s.has_file_data() {
                let end = s.offset.checked_add(s.size);
                if end.is_none_or(|e| e > file_len) {
                    return Err(ImageError::malformed(format!(
                        "section [{index}] {}: file range {:#x}+{:#x} exceeds the file's \
                         {file_len:#x} bytes",
                        s.name, s.offset, s.size
                    )));
                }
            }
            if s.is_alloc() && s.addr.checked_add(s.size).is_none() {
                return Err(ImageError::malformed(format!(
                    "section [{index}] {}: address range {:#x}+{:#x} wraps around",
                    s.name, s.addr, s.size
                )));
            }
            sections.push(s);
        }
        check_overlaps(&sections)?;
        check_tables(&sections, bytes, header.e_shstrndx(endian) as usize, |i| {
            table
                .section(object::read::SectionIndex(i))
                .ok()
                .map(|sh| sh.sh_link(endian))
        })?;

        let mut symbols = Vec::new();
        let mut names = std::collections::HashMap::new();
        let symtab = table
            .symbols(endian, bytes, elf::SHT_SYMTAB)
            .map_err(|e| ImageError::malformed(format!("symbol table: {e}")))?;
        let strings: StringTable<'_> = symtab.strings();
        for (k, sym) in symtab.symbols().iter().enumerate() {
            if sym.st_shndx(endian) == elf::SHN_UNDEF {
                continue;
            }
            let name = sym
                .name(endian, strings)
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .map_err(|_| {
                    ImageError::malformed(format!(
                        "symbol {k} of the symbol table: its name offset {:#x} lies outside the \
                         string table",
                        sym.st_name(endian)
                    ))
                })?;
            if !name.is_empty() {
                names.entry(name.clone()).or_insert(sym.st_value(endian));
            }
            if sym.st_type() == elf::STT_FUNC {
                symbols.push(Symbol {
                    name,
                    addr: sym.st_value(endian),
                    size: sym.st_size(endian),
                });
            }
        }
        let mut symbol_source = SymbolSource::Symtab;
        let mut kallsyms = None;
        if symbols.is_empty() {
            symbol_source = SymbolSource::None;
        }
        if symbols.is_empty() && recover_kallsyms {
            let rodata = sections
                .iter()
                .find(|s| s.name == ".rodata" && s.is_alloc() && s.has_file_data());
            if let Some(r) = rodata {
                let data = bytes
                    .get(r.offset as usize..(r.offset + r.size) as usize)
                    .unwrap_or(&[]);
                if let Some(k) =
                    super::kallsyms::read(data, r.addr).map_err(ImageError::Malformed)?
                {
                    symbols = kallsyms_functions(&k, &sections);
                    // Names are looked up in kallsyms itself (`symbol_address`).
                    symbol_source = SymbolSource::Kallsyms;
                    kallsyms = Some(k);
                }
            }
        }
        symbols.sort_by(|a, b| a.addr.cmp(&b.addr).then_with(|| a.name.cmp(&b.name)));
        symbols.dedup_by_key(|s| s.addr);

        let mut build_id = None;
        let mut all_notes = Vec::new();
        for sh in table.iter() {
            if sh.sh_type(endian) != elf::SHT_NOTE {
                continue;
            }
            if let Ok(Some(mut notes)) = sh.notes(endian, bytes) {
                while let Ok(Some(note)) = notes.next() {
                    if note.name() == elf::ELF_NOTE_GNU
                        && note.n_type(endian) == elf::NT_GNU_BUILD_ID
                    {
                        build_id = Some(note.desc().to_vec());
                    }
                    // Notes are small; a file full of them is bounded by its size.
                    if all_notes.len() < 4096 {
                        all_notes.push((
                            note.name().to_vec(),
                            note.n_type(endian),
                            note.desc().to_vec(),
                        ));
                    }
                }
            }
        }

        let entry = header.e_entry(endian);
        let mut image = Image {
            bzimage: None,
            path,
            data,
            elf_type,
            entry,
            sections,
            segments,
            symbols,
            symbol_source,
            kallsyms,
            names,
            build_id,
            notes: all_notes,
            shim_params_at: None,
            by_addr: Default::default(),
        };
        image.by_addr = crate::spans::SpanIndex::new(
            image
                .sections
                .iter()
                .filter(|s| s.is_alloc() && s.has_file_data())
                .map(|s| (s.addr, s.addr.saturating_add(s.size), s.index)),
        );
        if !image.sections.iter().any(Section::is_exec) {
            return Err(ImageError::Unsupported(format!(
                "{}: no executable section (no SHF_EXECINSTR PROGBITS section)",
                image.path.display()
            )));
        }
        image.shim_params_at = image
            .section(crate::shim::SHIM_SECTION)
            .and_then(|sec| crate::shim::params_offset(image.section_data(sec)));
        Ok(image)
    }

    /// The address of the symbol named `name` (any kind: function, data, linker-defined), from
    /// the symbol table or the kernel's kallsyms.
    pub fn symbol_address(&self, name: &str) -> Option<u64> {
        match &self.kallsyms {
            Some(k) => k.address(name),
            None => self.names.get(name).copied(),
        }
    }

    /// Every symbol whose name begins with `prefix` (any kind), with its address: from the
    /// kernel's kallsyms when it has one, else from the symbol table.
    pub fn symbols_with_prefix(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = match &self.kallsyms {
            Some(k) => k
                .symbols
                .iter()
                .filter(|s| s.name.starts_with(prefix))
                .map(|s| (s.name.clone(), s.addr))
                .collect(),
            None => self
                .names
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(n, a)| (n.clone(), *a))
                .collect(),
        };
        v.sort();
        v.dedup();
        v
    }

    /// The descriptor of the `Xen` note of type `kind`, if the image has one.
    pub fn xen_note(&self, kind: u32) -> Option<&[u8]> {
        self.notes
            .iter()
            .find(|(n, t, _)| n.as_slice() == b"Xen" && *t == kind)
            .map(|n| n.2.as_slice())
    }

    /// The physical address of the 32-bit PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`), if any.
    pub fn pvh_entry(&self) -> Option<u64> {
        let d = self.xen_note(XEN_ELFNOTE_PHYS32_ENTRY)?;
        match d.len() {
            4 => Some(u32::from_le_bytes(d.try_into().ok()?) as u64),
            8 => Some(u64::from_le_bytes(d.try_into().ok()?)),
            _ => None,
        }
    }

    /// The virtual address of physical address `phys`, through the loadable segment that holds
    /// it.
    pub fn virt_of_phys(&self, phys: u64) -> Option<u64> {
        self.segments
            .iter()
            .filter(|s| s.kind == elf::PT_LOAD)
            .find(|s| phys >= s.paddr && phys - s.paddr < s.memsz)
            .map(|s| s.vaddr + (phys - s.paddr))
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// A section's bytes (empty for `SHT_NOBITS`). Checked at load time to lie in the file.
    pub fn section_data(&self, s: &Section) -> &[u8] {
        if !s.has_file_data() {
            return &[];
        }
        self.bytes()
            .get(s.offset as usize..(s.offset + s.size) as usize)
            .unwrap_or(&[])
    }

    /// The section named `name`.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The executable sections.
    pub fn exec_sections(&self) -> impl Iterator<Item = &Section> {
        // The boot shim a previous annotation added is pvpatch's code, not the kernel's.
        self.sections
            .iter()
            .filter(|s| s.is_exec() && s.name != ".pvpatch_shim")
    }

    /// The executable sections' address ranges.
    pub fn code_ranges(&self) -> Vec<AddrRange> {
        self.exec_sections().map(Section::range).collect()
    }

    /// The allocated section with file data that holds `addr`.
    pub fn section_at(&self, addr: u64) -> Option<&Section> {
        // Of several that hold it (overlapping sections), the first in header order.
        self.by_addr.first_at(addr).map(|i| &self.sections[i])
    }

    /// `len` bytes of the image at virtual address `addr`, if they lie inside one section.
    pub fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let s = self.section_at(addr)?;
        let off = (addr - s.addr) as usize;
        self.section_data(s).get(off..off.checked_add(len)?)
    }

    /// The function symbol at or before `addr`, and the offset into it, if `addr` lies inside
    /// the symbol (or the symbol has no size and is the nearest one before `addr`).
    pub fn symbolize(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.symbols.partition_point(|s| s.addr <= addr);
        let s = self.symbols.get(i.checked_sub(1)?)?;
        let off = addr - s.addr;
        (s.size == 0 || off < s.size).then_some((s.name.as_str(), off))
    }

    /// The end of the highest loadable segment (`p_vaddr + p_memsz`).
    pub fn load_end(&self) -> Option<u64> {
        self.segments
            .iter()
            .filter(|s| s.kind == elf::PT_LOAD)
            .filter_map(|s| s.vaddr.checked_add(s.memsz))
            .max()
    }
}

/// The function symbols of a kernel's kallsyms (types `T`, `t`, `W`, `w` inside an executable
/// section), each as long as the distance to the next symbol of any kind in the same section
/// (kallsyms has no sizes; 6.12's `__pfx_` padding symbols end the function before them).
fn kallsyms_functions(k: &super::kallsyms::Kallsyms, sections: &[Section]) -> Vec<Symbol> {
    let exec: Vec<&Section> = sections.iter().filter(|s| s.is_exec()).collect();
    let section_of = |a: u64| exec.iter().find(|s| s.contains(a)).copied();
    // The next greater address after each symbol, from the end (kallsyms is sorted).
    let mut next = vec![u64::MAX; k.symbols.len()];
    let mut greater = u64::MAX;
    for i in (0..k.symbols.len()).rev() {
        next[i] = greater;
        if i > 0 && k.symbols[i - 1].addr < k.symbols[i].addr {
            greater = k.symbols[i].addr;
        }
    }
    let mut out = Vec::new();
    for (i, s) in k.symbols.iter().enumerate() {
        if !s.is_text() {
            continue;
        }
        let Some(sec) = section_of(s.addr) else {
            continue;
        };
        let end = next[i].min(sec.addr + sec.size);
        out.push(Symbol {
            name: s.name.clone(),
            addr: s.addr,
            size: end - s.addr,
        });
    }
    out
}

/// What the symbol table and the string tables must be for the image to be read (and
/// rewritten) as a whole: every link names a section; a string table is not flagged executable,
/// and ends with a NUL byte (else its last string runs off its end); the section-name table is
/// not loaded.
fn check_tables(
    sections: &[Section],
    bytes: &[u8],
    shstrndx: usize,
    link_of: impl Fn(usize) -> Option<u32>,
) -> Result<()> {
    for s in sections {
        if matches!(s.kind, elf::SHT_SYMTAB | elf::SHT_DYNSYM) {
            let link = link_of(s.index).unwrap_or(0) as usize;
            if link == 0 || link >= sections.len() || sections[link].kind != elf::SHT_STRTAB {
                return Err(ImageError::malformed(format!(
                    "section [{}] {}: its sh_link ({link}) names no string table (the image has \
                     {} sections)",
                    s.index,
                    s.name,
                    sections.len()
                )));
            }
        }
        if s.kind == elf::SHT_STRTAB {
            if s.flags & elf::SHF_EXECINSTR as u64 != 0
                || (s.index == shstrndx && s.flags & elf::SHF_ALLOC as u64 != 0)
            {
                return Err(ImageError::malformed(format!(
                    "section [{}] {}: a string table flagged {} (sh_flags {:#x})",
                    s.index,
                    s.name,
                    if s.flags & elf::SHF_EXECINSTR as u64 != 0 {
                        "executable"
                    } else {
                        "allocated, as the section-name table"
                    },
                    s.flags
                )));
            }
            let end = s.offset.saturating_add(s.size) as usize;
            if s.size > 0 && bytes.get(end.wrapping_sub(1)).is_some_and(|&b| b != 0) {
                return Err(ImageError::malformed(format!(
                    "section [{}] {}: the string table does not end with a NUL byte (its last \
                     string runs off its end)",
                    s.index, s.name
                )));
            }
        }
    }
    Ok(())
}

fn check_overlaps(sections: &[Section]) -> Result<()> {
    // File bytes: no two sections with data share a byte.
    let mut by_off: Vec<&Section> = sections.iter().filter(|s| s.has_file_data()).collect();
    by_off.sort_by_key(|s| s.offset);
    for w in by_off.windows(2) {
        if w[0].offset.saturating_add(w[0].size) > w[1].offset {
            return Err(ImageError::malformed(format!(
                "sections [{}] {} and [{}] {} overlap in the file at {:#x}",
                w[0].index, w[0].name, w[1].index, w[1].name, w[1].offset
            )));
        }
    }
    // Addresses: allocated sections with a nonzero address (per-CPU sections of a kernel are
    // linked at 0 and overlap nothing real) must not share addresses. A `.tbss` (SHF_TLS and
    // NOBITS) takes no room in the image: its address is a template for each thread's block,
    // and the next section may start inside it (every libc has one).
    let tls_bss = |s: &Section| s.flags & elf::SHF_TLS as u64 != 0 && s.kind == elf::SHT_NOBITS;
    let mut by_addr: Vec<&Section> = sections
        .iter()
        .filter(|s| s.is_alloc() && s.size > 0 && s.addr != 0 && !tls_bss(s))
        .collect();
    by_addr.sort_by_key(|s| s.addr);
    for w in by_addr.windows(2) {
        if w[0].addr.saturating_add(w[0].size) > w[1].addr {
            return Err(ImageError::malformed(format!(
                "sections [{}] {} and [{}] {} overlap in memory at {:#x}",
                w[0].index, w[0].name, w[1].index, w[1].name, w[1].addr
            )));
        }
    }
    Ok(())
}
