//! The boot shim's two records (`docs/shim.md`): the **parameters** that `pvpatch annotate
//! --boot-shim` writes into the shim's segment and the shim reads at boot, and the **report**
//! the shim leaves in a reserved page for whoever wants to know what it did. Both are fixed
//! little-endian layouts, read without trusting any count.

use crate::le::{put, u32_at, u64_at};

/// The parameters' magic (the first 8 bytes of the shim's `PVPATCH_SHIM_PARAMS`).
pub const PARAMS_MAGIC: [u8; 8] = *b"PVPSHIM2";
/// The report's magic.
pub const REPORT_MAGIC: [u8; 8] = *b"PVPSHRPT";
/// The most kernel segments the parameters describe.
pub const MAX_SEGMENTS: usize = 8;
/// The most code ranges the parameters describe.
pub const MAX_CODE: usize = 8;
/// Bytes of the parameters: magic, then 6 u64 fields, two counts, the segments, the code, and
/// the prepared plans' place and length.
pub const PARAMS_SIZE: usize = 8 + 6 * 8 + 8 + MAX_SEGMENTS * 24 + MAX_CODE * 16 + 16;
/// Offset of the prepared plans' fields in the parameters.
const PLANS_AT: usize = 64 + 24 * MAX_SEGMENTS + 16 * MAX_CODE;
const _: () = assert!(PARAMS_SIZE.is_multiple_of(8) && PLANS_AT + 16 == PARAMS_SIZE);
/// Bytes of the report's fixed part (the page holds the memory map's copy after it).
pub const REPORT_SIZE: usize = 256;
/// Bytes of the report's reason text.
pub const REASON_LEN: usize = 128;

/// One loadable segment of the kernel: where it is linked and where it loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Virtual address.
    pub vaddr: u64,
    /// Physical address (as linked).
    pub paddr: u64,
    /// Bytes in memory.
    pub memsz: u64,
}

/// What the shim needs to know of the kernel it stands in front of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// The kernel's own PVH entry (physical, as linked).
    pub linux_entry: u64,
    /// Where the shim's segment loads (physical, as linked); a loader that moves the image
    /// moves it too, and the difference is applied to every physical address here.
    pub shim_phys: u64,
    /// The site table (virtual address).
    pub table_vaddr: u64,
    /// Its length.
    pub table_len: u64,
    /// Offset of the report page in the shim's segment.
    pub report_offset: u64,
    /// Flags, reserved: zero.
    pub flags: u64,
    /// The kernel's loadable segments (virtual to physical), `nsegments` of them.
    pub segments: [Segment; MAX_SEGMENTS],
    /// How many segments.
    pub nsegments: u32,
    /// The kernel's code ranges (virtual), where sites may lie, `ncode` of them.
    pub code: [(u64, u64); MAX_CODE],
    /// How many code ranges.
    pub ncode: u32,
    /// Where the plans prepared at link time load (physical, as linked; zero: none), a blob
    /// [`crate::prepared::Plans`] reads.
    pub plans_phys: u64,
    /// Their length.
    pub plans_len: u64,
}

impl Params {
    /// Reads parameters; `None` if the magic is wrong or a count is out of range. (Built in
    /// place from fixed offsets, without a copy or a loop: the shim reads them where every
    /// block of code costs its translation.)
    pub fn read(b: &[u8]) -> Option<Params> {
        let b: &[u8; PARAMS_SIZE] = b.get(..PARAMS_SIZE)?.try_into().ok()?;
        if b[..8] != PARAMS_MAGIC {
            return None;
        }
        let q = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let (seg, code) = (64, 64 + 24 * MAX_SEGMENTS);
        let counts = q(56);
        let p = Params {
            linux_entry: q(8),
            shim_phys: q(16),
            table_vaddr: q(24),
            table_len: q(32),
            report_offset: q(40),
            flags: q(48),
            segments: core::array::from_fn(|i| Segment {
                vaddr: q(seg + 24 * i),
                paddr: q(seg + 24 * i + 8),
                memsz: q(seg + 24 * i + 16),
            }),
            nsegments: counts as u32,
            code: core::array::from_fn(|i| (q(code + 16 * i), q(code + 16 * i + 8))),
            ncode: (counts >> 32) as u32,
            plans_phys: q(PLANS_AT),
            plans_len: q(PLANS_AT + 8),
        };
        if p.nsegments as usize > MAX_SEGMENTS || p.ncode as usize > MAX_CODE || p.flags != 0 {
            return None;
        }
        Some(p)
    }

    /// Writes the parameters into `b` (at least [`PARAMS_SIZE`] bytes).
    pub fn write(&self, b: &mut [u8]) -> Option<()> {
        put(b, 0, &PARAMS_MAGIC)?;
        for (i, v) in [
            self.linux_entry,
            self.shim_phys,
            self.table_vaddr,
            self.table_len,
            self.report_offset,
            self.flags,
        ]
        .iter()
        .enumerate()
        {
            put(b, 8 + 8 * i, &v.to_le_bytes())?;
        }
        put(b, 56, &self.nsegments.to_le_bytes())?;
        put(b, 60, &self.ncode.to_le_bytes())?;
        for (i, s) in self.segments.iter().enumerate() {
            let at = 64 + 24 * i;
            put(b, at, &s.vaddr.to_le_bytes())?;
            put(b, at + 8, &s.paddr.to_le_bytes())?;
            put(b, at + 16, &s.memsz.to_le_bytes())?;
        }
        for (i, c) in self.code.iter().enumerate() {
            let at = 64 + 24 * MAX_SEGMENTS + 16 * i;
            put(b, at, &c.0.to_le_bytes())?;
            put(b, at + 8, &c.1.to_le_bytes())?;
        }
        put(b, PLANS_AT, &self.plans_phys.to_le_bytes())?;
        put(b, PLANS_AT + 8, &self.plans_len.to_le_bytes())?;
        Some(())
    }

    /// The segments in use.
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..(self.nsegments as usize).min(MAX_SEGMENTS)]
    }

    /// The code ranges in use.
    pub fn code(&self) -> &[(u64, u64)] {
        &self.code[..(self.ncode as usize).min(MAX_CODE)]
    }
}

/// What the shim did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Not written yet (the shim did not run, or did not get that far).
    #[default]
    None = 0,
    /// The kernel's text was rewritten for the backend (perhaps no site changed).
    Patched = 1,
    /// `pvpatch=off` on the command line.
    Off = 2,
    /// The backend patches the kernel itself (Xen, Hyper-V), or `pvpatch.backend=none`: every
    /// site left native.
    LeftNative = 3,
    /// Something did not validate (table, ROM, plan, read-back): nothing written.
    Refused = 4,
}

impl Status {
    /// From its code.
    pub fn from_code(c: u32) -> Option<Status> {
        Some(match c {
            0 => Status::None,
            1 => Status::Patched,
            2 => Status::Off,
            3 => Status::LeftNative,
            4 => Status::Refused,
            _ => return None,
        })
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Patched => "patched",
            Status::Off => "off",
            Status::LeftNative => "left native",
            Status::Refused => "refused",
        }
    }
}

/// Where the plan the shim applied was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u32)]
pub enum PlanSource {
    /// At boot: the image holds no plan prepared for this backend (or the shim did not plan).
    #[default]
    Boot = 0,
    /// At link time (`annotate --boot-shim`): the prepared plan was applied.
    Link = 1,
    /// At boot, because the command line said `pvpatch.plan=boot`.
    BootAsked = 2,
    /// At boot, because the prepared plans did not check out (the reason says why).
    BootRefused = 3,
}

impl PlanSource {
    /// From its code.
    pub fn from_code(c: u32) -> Option<PlanSource> {
        Some(match c {
            0 => PlanSource::Boot,
            1 => PlanSource::Link,
            2 => PlanSource::BootAsked,
            3 => PlanSource::BootRefused,
            _ => return None,
        })
    }

    /// How reports say it.
    pub fn name(self) -> &'static str {
        match self {
            PlanSource::Link => "planned at link time",
            _ => "planned at boot",
        }
    }
}

/// A count with its thousands separated by commas (`1,103`): how the shim's line and
/// `pvpatch report` print counts. Written digit by digit, without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouped(pub u64);

impl core::fmt::Display for Grouped {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use core::fmt::Write as _;
        // Least significant first; u64 has at most 20 digits.
        let (mut digits, mut len, mut n) = ([0u8; 20], 0, self.0);
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in (0..len).rev() {
            f.write_char(char::from(digits[i]))?;
            if i > 0 && i % 3 == 0 {
                f.write_char(',')?;
            }
        }
        Ok(())
    }
}

/// Why bytes are not a shim's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportError {
    /// Shorter than the report.
    Short {
        /// How many bytes there are.
        len: usize,
    },
    /// The report's magic is not at the start.
    NoMagic,
    /// A status this ABI does not define.
    Status(u32),
    /// A plan source this ABI does not define.
    PlanSource(u32),
}

impl core::fmt::Display for ReportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ReportError::Short { len } => {
                write!(
                    f,
                    "{len} bytes, shorter than a report ({REPORT_SIZE} bytes)"
                )
            }
            ReportError::NoMagic => {
                f.write_str("no report: the report's magic is not at the start")
            }
            ReportError::Status(c) => write!(f, "a report with an unknown status ({c})"),
            ReportError::PlanSource(c) => {
                write!(f, "a report with an unknown plan source ({c})")
            }
        }
    }
}

impl core::error::Error for ReportError {}

/// The report the shim leaves in its reserved page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// What happened.
    pub status: Status,
    /// The backend, NUL-padded.
    pub backend: [u8; 16],
    /// Sites in the table.
    pub sites: u32,
    /// Sites rewritten.
    pub rewritten: u32,
    /// Detours installed.
    pub detours: u32,
    /// Bytes of out-of-line code copied to the arena.
    pub code_bytes: u32,
    /// Bytes written in all.
    pub bytes_written: u32,
    /// The TSC at the shim's entry.
    pub tsc_entry: u64,
    /// TSC cycles from entry to the hand-over.
    pub cycles_total: u64,
    /// Detection, the table's validation and the ROM.
    pub cycles_prepare: u64,
    /// Planning.
    pub cycles_plan: u64,
    /// Writing and reading back.
    pub cycles_apply: u64,
    /// The physical address of the load as the loader placed it, minus as linked.
    pub load_delta: u64,
    /// Why nothing was rewritten (or, when something was, why a prepared plan was not used),
    /// NUL-padded.
    pub reason: [u8; REASON_LEN],
    /// Bytes of heap the shim used.
    pub heap_used: u32,
    /// Where the plan was made.
    pub planned: PlanSource,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            status: Status::None,
            backend: [0; 16],
            sites: 0,
            rewritten: 0,
            detours: 0,
            code_bytes: 0,
            bytes_written: 0,
            tsc_entry: 0,
            cycles_total: 0,
            cycles_prepare: 0,
            cycles_plan: 0,
            cycles_apply: 0,
            load_delta: 0,
            reason: [0; REASON_LEN],
            heap_used: 0,
            planned: PlanSource::Boot,
        }
    }
}

fn text(b: &[u8]) -> &str {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..n]).unwrap_or("?")
}

/// Copies `s` into a NUL-padded field, cut to fit.
pub fn set_text(field: &mut [u8], s: &str) {
    field.fill(0);
    let n = s.len().min(field.len().saturating_sub(1));
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl Report {
    /// The backend's name.
    pub fn backend(&self) -> &str {
        text(&self.backend)
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        text(&self.reason)
    }

    /// Reads a report; `None` without its magic or with an unknown status.
    pub fn read(b: &[u8]) -> Option<Report> {
        Report::parse(b).ok()
    }

    /// Reads a report from the start of `b` (a dump of the report page), saying why not.
    pub fn parse(b: &[u8]) -> Result<Report, ReportError> {
        let field = |at: usize| u32_at(b, at).ok_or(ReportError::Short { len: b.len() });
        let wide = |at: usize| u64_at(b, at).ok_or(ReportError::Short { len: b.len() });
        if b.len() < REPORT_SIZE {
            return Err(ReportError::Short { len: b.len() });
        }
        if b[..8] != REPORT_MAGIC {
            return Err(ReportError::NoMagic);
        }
        let status = field(8)?;
        let planned = field(100 + REASON_LEN)?;
        let mut r = Report {
            status: Status::from_code(status).ok_or(ReportError::Status(status))?,
            sites: field(28)?,
            rewritten: field(32)?,
            detours: field(36)?,
            code_bytes: field(40)?,
            bytes_written: field(44)?,
            tsc_entry: wide(48)?,
            cycles_total: wide(56)?,
            cycles_prepare: wide(64)?,
            cycles_plan: wide(72)?,
            cycles_apply: wide(80)?,
            load_delta: wide(88)?,
            heap_used: field(96 + REASON_LEN)?,
            planned: PlanSource::from_code(planned).ok_or(ReportError::PlanSource(planned))?,
            ..Report::default()
        };
        r.backend.copy_from_slice(&b[12..28]);
        r.reason.copy_from_slice(&b[96..96 + REASON_LEN]);
        Ok(r)
    }

    /// Writes the report into `b` (at least [`REPORT_SIZE`] bytes).
    pub fn write(&self, b: &mut [u8]) -> Option<()> {
        put(b, 0, &REPORT_MAGIC)?;
        put(b, 8, &(self.status as u32).to_le_bytes())?;
        put(b, 12, &self.backend)?;
        for (i, v) in [
            self.sites,
            self.rewritten,
            self.detours,
            self.code_bytes,
            self.bytes_written,
        ]
        .iter()
        .enumerate()
        {
            put(b, 28 + 4 * i, &v.to_le_bytes())?;
        }
        for (i, v) in [
            self.tsc_entry,
            self.cycles_total,
            self.cycles_prepare,
            self.cycles_plan,
            self.cycles_apply,
            self.load_delta,
        ]
        .iter()
        .enumerate()
        {
            put(b, 48 + 8 * i, &v.to_le_bytes())?;
        }
        put(b, 96, &self.reason)?;
        put(b, 96 + REASON_LEN, &self.heap_used.to_le_bytes())?;
        put(b, 100 + REASON_LEN, &(self.planned as u32).to_le_bytes())?;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_reports_read_back_what_was_written() {
        let mut p = Params {
            linux_entry: 0x100_0850,
            shim_phys: 0x4c0_0000,
            table_vaddr: 0xffff_ffff_84a0_0000,
            table_len: 0x1234,
            report_offset: 0x3000,
            nsegments: 2,
            ncode: 1,
            plans_phys: 0x500_0000,
            plans_len: 0x2345,
            ..Params::default()
        };
        p.segments[1] = Segment {
            vaddr: 0xffff_ffff_8100_0000,
            paddr: 0x100_0000,
            memsz: 0x20_0000,
        };
        p.code[0] = (0xffff_ffff_8100_0000, 0xffff_ffff_8200_0000);
        let mut b = [0u8; PARAMS_SIZE];
        p.write(&mut b).unwrap();
        assert_eq!(Params::read(&b), Some(p));
        assert_eq!(p.segments().len(), 2);
        b[56] = 9; // more segments than there is room for
        assert_eq!(Params::read(&b), None);
        assert_eq!(Params::read(&b[..20]), None);

        let mut r = Report {
            status: Status::Patched,
            sites: 1104,
            rewritten: 3,
            cycles_total: 123_456,
            heap_used: 4096,
            planned: PlanSource::Link,
            ..Report::default()
        };
        set_text(&mut r.backend, "kvm");
        set_text(&mut r.reason, "a reason longer than nothing");
        let mut page = [0u8; REPORT_SIZE];
        r.write(&mut page).unwrap();
        let back = Report::read(&page).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            (back.backend(), back.reason()),
            ("kvm", "a reason longer than nothing")
        );
        for (n, text) in [
            (0, "0"),
            (7, "7"),
            (999, "999"),
            (1_103, "1,103"),
            (100_000, "100,000"),
            (1_234_567, "1,234,567"),
            (u64::MAX, "18,446,744,073,709,551,615"),
        ] {
            assert_eq!(std::format!("{}", Grouped(n)), text);
        }

        page[8] = 77;
        assert_eq!(Report::read(&page), None);
        assert_eq!(Report::parse(&page), Err(ReportError::Status(77)));
        page[8] = 1;
        page[100 + REASON_LEN] = 9;
        assert_eq!(Report::parse(&page), Err(ReportError::PlanSource(9)));
        assert_eq!(
            Report::parse(&page[..REPORT_SIZE - 1]),
            Err(ReportError::Short {
                len: REPORT_SIZE - 1
            })
        );
        page[0] = b'X';
        assert_eq!(Report::parse(&page), Err(ReportError::NoMagic));
    }
}

/// A PVH memory-map entry (`struct hvm_memmap_table_entry`, 24 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    /// Base.
    pub addr: u64,
    /// Size.
    pub size: u64,
    /// Type: 1 RAM, 2 reserved, others as E820.
    pub kind: u32,
}

/// E820 RAM.
pub const MEM_RAM: u32 = 1;
/// E820 reserved.
pub const MEM_RESERVED: u32 = 2;
/// Bytes of a memory-map entry.
pub const MEM_ENTRY_SIZE: usize = 24;

impl MemEntry {
    /// Reads entry `i` of a map.
    pub fn read(b: &[u8], i: usize) -> Option<MemEntry> {
        let at = i.checked_mul(MEM_ENTRY_SIZE)?;
        Some(MemEntry {
            addr: u64_at(b, at)?,
            size: u64_at(b, at + 8)?,
            kind: u32_at(b, at + 16)?,
        })
    }

    /// Writes it as entry `i` of a map.
    pub fn write(&self, b: &mut [u8], i: usize) -> Option<()> {
        let at = i.checked_mul(MEM_ENTRY_SIZE)?;
        put(b, at, &self.addr.to_le_bytes())?;
        put(b, at + 8, &self.size.to_le_bytes())?;
        put(b, at + 16, &self.kind.to_le_bytes())?;
        put(b, at + 20, &0u32.to_le_bytes())
    }
}

/// The memory map `map` (`n` entries) with `[start, end)` carved out of the RAM entry that
/// holds it as reserved, written into `out`; the number of entries written. `None` if no RAM
/// entry holds the range whole, or `out` is too small.
pub fn reserve(map: &[u8], n: usize, start: u64, end: u64, out: &mut [u8]) -> Option<usize> {
    let mut k = 0;
    let mut done = false;
    for i in 0..n {
        let e = MemEntry::read(map, i)?;
        let e_end = e.addr.checked_add(e.size)?;
        if !done && e.kind == MEM_RAM && e.addr <= start && end <= e_end && start < end {
            done = true;
            for piece in [
                MemEntry {
                    addr: e.addr,
                    size: start - e.addr,
                    kind: MEM_RAM,
                },
                MemEntry {
                    addr: start,
                    size: end - start,
                    kind: MEM_RESERVED,
                },
                MemEntry {
                    addr: end,
                    size: e_end - end,
                    kind: MEM_RAM,
                },
            ] {
                if piece.size > 0 {
                    piece.write(out, k)?;
                    k += 1;
                }
            }
        } else {
            e.write(out, k)?;
            k += 1;
        }
    }
    done.then_some(k)
}

#[cfg(test)]
mod memmap_tests {
    use super::*;

    #[test]
    fn a_page_is_carved_out_of_the_ram_that_holds_it() {
        let mut map = [0u8; 3 * MEM_ENTRY_SIZE];
        MemEntry {
            addr: 0,
            size: 0x9fc00,
            kind: MEM_RAM,
        }
        .write(&mut map, 0)
        .unwrap();
        MemEntry {
            addr: 0xf0000,
            size: 0x10000,
            kind: MEM_RESERVED,
        }
        .write(&mut map, 1)
        .unwrap();
        MemEntry {
            addr: 0x100000,
            size: 0x1ff0_0000,
            kind: MEM_RAM,
        }
        .write(&mut map, 2)
        .unwrap();
        let mut out = [0u8; 8 * MEM_ENTRY_SIZE];
        let n = reserve(&map, 3, 0x4c0_3000, 0x4c0_4000, &mut out).unwrap();
        assert_eq!(n, 5);
        let e: std::vec::Vec<MemEntry> = (0..n).map(|i| MemEntry::read(&out, i).unwrap()).collect();
        assert_eq!(
            e[2],
            MemEntry {
                addr: 0x100000,
                size: 0x4c0_3000 - 0x100000,
                kind: MEM_RAM
            }
        );
        assert_eq!(
            e[3],
            MemEntry {
                addr: 0x4c0_3000,
                size: 0x1000,
                kind: MEM_RESERVED
            }
        );
        assert_eq!(e[4].addr + e[4].size, 0x2000_0000);
        // Not inside RAM, or no room: refused.
        assert_eq!(reserve(&map, 3, 0xf0000, 0xf1000, &mut out), None);
        assert_eq!(
            reserve(&map, 3, 0x4c0_3000, 0x4c0_4000, &mut out[..3 * 24]),
            None
        );
        assert_eq!(reserve(&map, 4, 0x4c0_3000, 0x4c0_4000, &mut out), None);
    }
}
