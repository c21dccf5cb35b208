//! The sweep: decode every executable section with iced-x86 and classify every instruction.
//!
//! Decoding is a linear sweep that restarts at every *known instruction start*: function
//! symbols when the image has them, and the addresses Linux's own tables name (ORC IPs,
//! alternatives, exception-table entries, ...), which a stripped distro `vmlinux` still has.
//! If a decoded instruction would run across a known start, the sweep drops it and restarts
//! at the known start; undecodable bytes are skipped one at a time. Both are reported as
//! resynchronisations with their addresses.
//!
//! Sections are split into chunks at known starts and decoded on every core.

use std::sync::atomic::{AtomicU64, Ordering};

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use patch_sites::{Op, Operand};

use crate::load::image::Image;
use pvpatch_isa::classify::{Classified, classify};

/// A sensitive instruction found by the sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its address.
    pub addr: u64,
    /// Its length.
    pub len: u8,
    /// What it is.
    pub class: Classified,
    /// Index of its section in [`Image::sections`].
    pub section: usize,
}

impl Found {
    /// The op (the class).
    pub fn op(&self) -> Op {
        self.class.op
    }

    /// The operand.
    pub fn operand(&self) -> Operand {
        self.class.operand
    }
}

/// Why the sweep resynchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// The bytes do not decode.
    Undecodable,
    /// The instruction decoded there would run across a known instruction start (an address
    /// a symbol or a Linux table names as one).
    CrossedKnownStart,
}

/// Where the sweep resynchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resync {
    /// Where decoding went wrong.
    pub addr: u64,
    /// Where it resumed.
    pub resumed_at: u64,
    /// Why.
    pub reason: ResyncReason,
}

/// A bitmap over one section's bytes.
#[derive(Clone, Debug, Default)]
pub struct ByteMap {
    base: u64,
    len: u64,
    words: Vec<u64>,
}

impl ByteMap {
    fn new(base: u64, len: u64) -> Self {
        ByteMap {
            base,
            len,
            words: vec![0; len.div_ceil(64) as usize],
        }
    }

    #[inline]
    fn set(&mut self, addr: u64) {
        let off = addr.wrapping_sub(self.base);
        if off < self.len {
            self.words[(off / 64) as usize] |= 1 << (off % 64);
        }
    }

    /// Whether the bit for `addr` is set (false outside the section).
    #[inline]
    pub fn get(&self, addr: u64) -> bool {
        let off = addr.wrapping_sub(self.base);
        off < self.len && self.words[(off / 64) as usize] & (1 << (off % 64)) != 0
    }

    /// The first address in `[from, to)` whose bit is set (a word at a time).
    pub fn first_in(&self, from: u64, to: u64) -> Option<u64> {
        let lo = from.saturating_sub(self.base).min(self.len);
        let hi = to.saturating_sub(self.base).min(self.len);
        let mut off = lo;
        while off < hi {
            let w = self.words[(off / 64) as usize] >> (off % 64);
            if w != 0 {
                let hit = off + w.trailing_zeros() as u64;
                return (hit < hi).then_some(self.base + hit);
            }
            off = (off / 64 + 1) * 64;
        }
        None
    }

    /// Sets every bit set in `other` (a map over a part of this one's bytes, or any bytes:
    /// what lies outside this map is ignored).
    fn set_all_from(&mut self, other: &ByteMap) {
        // A part of this map: a word at a time, shifted into place.
        if let Some(shift) = other.base.checked_sub(self.base)
            && shift
                .checked_add(other.len)
                .is_some_and(|end| end <= self.len)
        {
            let (w0, b) = ((shift / 64) as usize, shift % 64);
            for (i, &word) in other.words.iter().enumerate() {
                if word == 0 {
                    continue;
                }
                self.words[w0 + i] |= word << b;
                let high = if b == 0 { 0 } else { word >> (64 - b) };
                if high != 0 {
                    self.words[w0 + i + 1] |= high;
                }
            }
            return;
        }
        for (w, &word) in other.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                self.set(other.base + w as u64 * 64 + b);
            }
        }
    }

    /// Number of bits set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// What the sweep learned about one executable section.
#[derive(Clone, Debug)]
pub struct SectionCode {
    /// Index in [`Image::sections`].
    pub section: usize,
    /// Where each decoded instruction starts.
    pub starts: ByteMap,
    /// Targets of direct branches and calls decoded anywhere in the image.
    pub targets: ByteMap,
    /// Code addresses reached in more than one way, so far as the sweep can tell: the targets
    /// of more than one branch (or of one decoded twice), and addresses something takes (a
    /// RIP-relative operand or an immediate in the code, an aligned 8-byte word in a data
    /// section), which an indirect branch may reach.
    pub shared: ByteMap,
}

/// Everything the sweep produced.
#[derive(Clone, Debug, Default)]
pub struct Sweep {
    /// Sensitive instructions, sorted by address (empty when the sweep did not keep them:
    /// [`sweep_counting`]; [`Sweep::replay`] finds them again).
    pub found: Vec<Found>,
    /// Resynchronisations, sorted by address (empty when the sweep did not keep them).
    pub resyncs: Vec<Resync>,
    /// Per executable section: instruction starts and branch targets.
    pub code: Vec<SectionCode>,
    /// Instructions decoded.
    pub instructions: u64,
    /// Bytes of code swept.
    pub bytes: u64,
    /// Sensitive instructions found (kept or not).
    pub sites: u64,
    /// Resynchronisations (kept or not).
    pub resync_count: u64,
    /// Whether [`Sweep::found`] and [`Sweep::resyncs`] hold them.
    pub kept: bool,
    /// `code` by address.
    index: crate::spans::SpanIndex,
    /// The chunks swept, by address (sections do not overlap in memory), for replays.
    chunks: Vec<Chunk>,
    /// Resynchronisations per chunk.
    chunk_resyncs: Vec<u64>,
    /// Where the sensitive instructions start, per code map (a sweep that did not keep them).
    site_maps: Vec<ByteMap>,
    /// The known instruction starts the sweep restarted at.
    known: Vec<u64>,
    /// The worker threads it ran on.
    threads: usize,
}

impl Sweep {
    /// The code map of the section holding `addr`.
    pub fn code_at(&self, addr: u64) -> Option<&SectionCode> {
        self.index.first_at(addr).map(|i| &self.code[i])
    }

    /// Whether an instruction was decoded starting at `addr`.
    pub fn is_insn_start(&self, addr: u64) -> bool {
        self.code_at(addr).is_some_and(|c| c.starts.get(addr))
    }

    /// Whether a direct branch or call targets `addr`.
    pub fn is_branch_target(&self, addr: u64) -> bool {
        self.index
            .overlapping(addr, addr.saturating_add(1))
            .any(|i| self.code[i].targets.get(addr))
    }

    /// Whether exactly one direct branch or call decoded anywhere targets `addr`, and nothing
    /// takes its address.
    pub fn is_sole_target(&self, addr: u64) -> bool {
        self.code_at(addr)
            .is_some_and(|c| c.targets.get(addr) && !c.shared.get(addr))
    }

    /// The first branch target in `[from, to)`.
    pub fn branch_target_in(&self, from: u64, to: u64) -> Option<u64> {
        self.index
            .overlapping(from, to)
            .filter_map(|i| self.code[i].targets.first_in(from, to))
            .min()
    }

    /// The worker threads the sweep ran on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Chunks swept (the units of [`Sweep::replay`]).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The sensitive instructions of chunks `range` (of a sweep that did not keep them), in
    /// address order: each decoded again where the sweep found it (the decoder then sees the
    /// same bytes), nothing kept.
    pub fn replay_sites(
        &self,
        image: &Image,
        range: std::ops::Range<usize>,
        visit: &mut dyn FnMut(Found),
    ) {
        for chunk in self.chunks.get(range).unwrap_or_default() {
            let (Some(map), Some(s)) = (
                self.index
                    .first_at(chunk.start)
                    .and_then(|i| self.site_maps.get(i)),
                image.sections.get(chunk.section),
            ) else {
                continue;
            };
            let data = image.section_data(s);
            let mut at = chunk.start;
            while let Some(x) = map.first_in(at, chunk.end) {
                at = x + 1;
                let bytes = data.get((x - s.addr) as usize..).unwrap_or_default();
                let insn = Decoder::with_ip(64, bytes, x, DecoderOptions::NONE).decode();
                if let Some(class) = classify(&insn) {
                    visit(Found {
                        addr: x,
                        len: insn.len() as u8,
                        class,
                        section: chunk.section,
                    });
                }
            }
        }
    }

    /// The resynchronisations of chunks `range`, in address order: the chunks that had any
    /// decoded again exactly as the sweep did, nothing kept.
    pub fn replay_resyncs(
        &self,
        image: &Image,
        range: std::ops::Range<usize>,
        visit: &mut dyn FnMut(Resync),
    ) {
        let chunks = self.chunks.get(range.clone()).unwrap_or_default();
        let counts = self.chunk_resyncs.get(range).unwrap_or_default();
        for (chunk, &n) in chunks.iter().zip(counts) {
            if n > 0 {
                decode_chunk(image, *chunk, &self.known, &mut Replay(visit));
            }
        }
    }
}

/// How to sweep.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Worker threads (at least 1).
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// A piece of one section swept by one worker.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    section: usize,
    start: u64,
    end: u64,
}

/// What decoding a chunk meets, to whoever decodes it.
trait Visitor {
    /// A decoded instruction (not one dropped for crossing a known start).
    fn insn(&mut self, ip: u64, insn: &Instruction);
    /// A sensitive one (after [`Visitor::insn`]).
    fn found(&mut self, f: Found);
    /// A resynchronisation.
    fn resync(&mut self, r: Resync);
}

struct ChunkResult<'k> {
    /// The chunk's section (its index among the image's sections).
    section: usize,
    /// Kept only if the sweep keeps them.
    found: Vec<Found>,
    /// Kept only if the sweep keeps them.
    resyncs: Vec<Resync>,
    keep: bool,
    /// Sites the whole sweep may still keep (once none, it keeps no more), if it is limited.
    room: Option<&'k AtomicU64>,
    sites: u64,
    resync_count: u64,
    /// Instruction starts, over the chunk's bytes only.
    starts: ByteMap,
    /// Where the sensitive instructions start (when they are not kept), over the chunk's bytes.
    site_starts: ByteMap,
    /// The chunk's index.
    index: usize,
    /// Near-branch targets, wherever they point (sorted into sections when merged): memory
    /// linear in the branches, whatever the number of sections.
    targets: Vec<u64>,
    /// The code maps' ranges ([`code_of`]).
    code: &'k [(u64, u64, usize)],
    /// Code addresses the chunk's instructions take (RIP-relative operands, immediates).
    taken: Vec<u64>,
    instructions: u64,
}

/// The code map holding `a`, of `code`: each map's `(start, end, index)`, sorted, apart (the
/// executable sections do not overlap). A binary search, for the sweep's millions of targets
/// and taken addresses; most of those are not code, and fail the bounds first.
#[inline]
fn code_of(code: &[(u64, u64, usize)], a: u64) -> Option<usize> {
    match (code.first(), code.last()) {
        (Some(lo), Some(hi)) if lo.0 <= a && a < hi.1 => {
            let k = code.partition_point(|r| r.1 <= a);
            code.get(k).filter(|r| r.0 <= a).map(|r| r.2)
        }
        _ => None,
    }
}

/// Marks the code addresses in `taken` as reached more than one way.
fn mark_shared(scan: &mut Sweep, code: &[(u64, u64, usize)], taken: Vec<u64>) {
    for a in taken {
        if let Some(i) = code_of(code, a) {
            scan.code[i].shared.set(a);
        }
    }
}

impl ChunkResult<'_> {
    /// Notes that an instruction takes address `a`, if it is code.
    #[inline]
    fn take(&mut self, a: u64) {
        if code_of(self.code, a).is_some() {
            self.taken.push(a);
        }
    }
}

impl Visitor for ChunkResult<'_> {
    fn insn(&mut self, ip: u64, insn: &Instruction) {
        self.instructions += 1;
        self.starts.set(ip);
        if matches!(insn.op0_kind(), OpKind::NearBranch64) {
            self.targets.push(insn.near_branch64());
        }
        // An address an operand takes: RIP-relative, or an immediate (always the last operand).
        if insn.is_ip_rel_memory_operand() {
            self.take(insn.ip_rel_memory_address());
        }
        match insn.op_count().checked_sub(1).map(|k| insn.op_kind(k)) {
            Some(OpKind::Immediate32to64) => self.take(insn.immediate32to64() as u64),
            Some(OpKind::Immediate64) => self.take(insn.immediate64()),
            _ => {}
        }
    }

    fn found(&mut self, f: Found) {
        self.sites += 1;
        self.site_starts.set(f.addr);
        if self.keep {
            let room = self.room.map_or(Ok(0), |r| {
                r.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            });
            if room.is_ok() {
                self.found.push(f);
            } else {
                self.keep = false;
                self.found = Vec::new();
                self.resyncs = Vec::new();
            }
        }
    }

    fn resync(&mut self, r: Resync) {
        self.resync_count += 1;
        if self.keep {
            self.resyncs.push(r);
        }
    }
}

/// A replay of a chunk, for its resynchronisations.
struct Replay<'v>(&'v mut dyn FnMut(Resync));

impl Visitor for Replay<'_> {
    fn insn(&mut self, _: u64, _: &Instruction) {}

    fn found(&mut self, _: Found) {}

    fn resync(&mut self, r: Resync) {
        (self.0)(r)
    }
}

/// Sweeps every executable section of `image`, keeping every sensitive instruction and
/// resynchronisation. `known_starts` must be sorted; starts outside code are ignored.
/// `progress`, if given, is advanced by the bytes swept.
pub fn sweep(
    image: &Image,
    known_starts: &[u64],
    opts: Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Sweep {
    sweep_with(image, known_starts, opts, progress, Keep::All)
}

/// As [`sweep`], keeping at most `max_sites` sensitive instructions: past them, the number
/// found (nothing more is kept).
pub fn sweep_at_most(
    image: &Image,
    known_starts: &[u64],
    opts: Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    max_sites: u64,
) -> Result<Sweep, u64> {
    let s = sweep_with(image, known_starts, opts, progress, Keep::AtMost(max_sites));
    if s.kept { Ok(s) } else { Err(s.sites) }
}

/// As [`sweep`], but only counting the sensitive instructions and resynchronisations: memory
/// in the code's bytes (four bits a byte: instruction starts, branch targets, targets reached more
/// than one way, site starts; and the known starts), whatever the sites.
/// [`Sweep::replay`] finds them again.
pub fn sweep_counting(
    image: &Image,
    known_starts: &[u64],
    opts: Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Sweep {
    sweep_with(image, known_starts, opts, progress, Keep::None)
}

/// What a sweep keeps.
#[derive(Clone, Copy)]
enum Keep {
    All,
    /// Past this many sites, none (and [`Sweep::kept`] is false).
    AtMost(u64),
    None,
}

fn sweep_with(
    image: &Image,
    known_starts: &[u64],
    opts: Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    keep: Keep,
) -> Sweep {
    let room = AtomicU64::new(match keep {
        Keep::AtMost(n) => n,
        _ => 0,
    });
    let room = matches!(keep, Keep::AtMost(_)).then_some(&room);
    let keep = !matches!(keep, Keep::None);
    let exec: Vec<usize> = image.exec_sections().map(|s| s.index).collect();
    let total: u64 = exec.iter().map(|&i| image.sections[i].size).sum();
    let threads = opts.threads.max(1);
    // Chunks of about total/(4*threads) bytes, cut at known starts, so that workers balance.
    let target_len = (total / (4 * threads as u64)).max(64 * 1024);
    let mut chunks = Vec::new();
    for &si in &exec {
        let s = &image.sections[si];
        let (start, end) = (s.addr, s.addr + s.size);
        let mut cur = start;
        while end - cur > target_len {
            let want = cur + target_len;
            let k = known_starts.partition_point(|&a| a < want);
            match known_starts.get(k) {
                Some(&cut) if cut < end && cut > cur => {
                    chunks.push(Chunk {
                        section: si,
                        start: cur,
                        end: cut,
                    });
                    cur = cut;
                }
                _ => break,
            }
        }
        chunks.push(Chunk {
            section: si,
            start: cur,
            end,
        });
    }
    // By address: what a replay meets is then in address order (executable sections do not
    // overlap in memory), as the kept sites are once sorted.
    chunks.sort_by_key(|c| c.start);

    let mut scan = Sweep {
        bytes: total,
        kept: keep,
        threads,
        ..Sweep::default()
    };
    for &si in &exec {
        let s = &image.sections[si];
        scan.code.push(SectionCode {
            section: si,
            starts: ByteMap::new(s.addr, s.size),
            targets: ByteMap::new(s.addr, s.size),
            shared: ByteMap::new(s.addr, s.size),
        });
    }
    // The code maps by section index, and the sections by address, for the merge: lookups
    // in O(1) and O(log n), so that the merge stays linear in what the chunks found however
    // many sections there are.
    let mut by_section = vec![usize::MAX; image.sections.len()];
    for (i, c) in scan.code.iter().enumerate() {
        by_section[c.section] = i;
    }
    // The code maps by address ([`code_of`]).
    let mut by_addr: Vec<(u64, u64, usize)> = scan
        .code
        .iter()
        .enumerate()
        .map(|(i, c)| (c.starts.base, c.starts.base.saturating_add(c.starts.len), i))
        .collect();
    by_addr.sort_unstable();
    scan.index = crate::spans::SpanIndex::new(by_addr.iter().copied());

    // Each chunk's result is merged as soon as it is done: what is held at once is the merged
    // maps and one chunk's result per worker.
    if !keep {
        scan.site_maps = scan
            .code
            .iter()
            .map(|c| ByteMap::new(c.starts.base, c.starts.len))
            .collect();
    }
    scan.chunk_resyncs = vec![0; chunks.len()];
    let merged = std::sync::Mutex::new(scan);
    let merge = |r: ChunkResult| {
        let mut scan = merged.lock().unwrap_or_else(|p| p.into_inner());
        scan.instructions += r.instructions;
        scan.sites += r.sites;
        scan.resync_count += r.resync_count;
        if let Some(n) = scan.chunk_resyncs.get_mut(r.index) {
            *n = r.resync_count;
        }
        if r.keep && scan.kept {
            scan.found.extend(r.found);
            scan.resyncs.extend(r.resyncs);
        } else {
            // Past the limit: nothing more is kept, and what was is dropped.
            scan.kept = false;
            scan.found = Vec::new();
            scan.resyncs = Vec::new();
        }
        if let Some(&i) = by_section.get(r.section)
            && let Some(c) = scan.code.get_mut(i)
        {
            c.starts.set_all_from(&r.starts);
        }
        if let Some(&i) = by_section.get(r.section)
            && let Some(m) = scan.site_maps.get_mut(i)
        {
            m.set_all_from(&r.site_starts);
        }
        let scan = &mut *scan;
        mark_shared(scan, &by_addr, r.taken);
        for t in r.targets {
            if let Some(i) = code_of(&by_addr, t) {
                let c = &mut scan.code[i];
                if c.targets.get(t) {
                    c.shared.set(t);
                } else {
                    c.targets.set(t);
                }
            }
        }
    };
    // Pieces of the data sections, scanned for the code addresses they hold by the same
    // workers, after the code.
    let data_chunks: Vec<(usize, usize, usize)> = image
        .sections
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_alloc() && !s.is_exec() && s.has_file_data())
        .flat_map(|(i, s)| {
            let len = image.section_data(s).len();
            let skip = (s.addr.wrapping_neg() % 8) as usize;
            (skip..len)
                .step_by(DATA_CHUNK)
                .map(move |a| (i, a, (a + DATA_CHUNK).min(len)))
        })
        .collect();
    let work = |index: usize| {
        let Some(chunk) = chunks.get(index) else {
            if let Some(&(si, lo, hi)) = data_chunks.get(index - chunks.len()) {
                let data = image.section_data(&image.sections[si]);
                let taken = taken_by_data(data, lo, hi, &by_addr);
                let mut scan = merged.lock().unwrap_or_else(|p| p.into_inner());
                mark_shared(&mut scan, &by_addr, taken);
            }
            return;
        };
        let mut r = ChunkResult {
            section: chunk.section,
            found: Vec::new(),
            resyncs: Vec::new(),
            keep,
            room,
            sites: 0,
            resync_count: 0,
            starts: ByteMap::new(chunk.start, chunk.end - chunk.start),
            site_starts: if keep {
                ByteMap::default()
            } else {
                ByteMap::new(chunk.start, chunk.end - chunk.start)
            },
            index,
            targets: Vec::new(),
            code: &by_addr,
            taken: Vec::new(),
            instructions: 0,
        };
        decode_chunk(image, *chunk, known_starts, &mut r);
        merge(r);
        if let Some(p) = progress {
            p(chunk.end - chunk.start);
        }
    };
    let jobs = chunks.len() + data_chunks.len();
    if threads == 1 {
        (0..jobs).for_each(work);
    } else {
        let next = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads.min(jobs).max(1) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= jobs {
                            break;
                        }
                        work(i);
                    }
                });
            }
        });
    }
    let mut scan = merged.into_inner().unwrap_or_else(|p| p.into_inner());
    scan.found.sort_by_key(|f| f.addr);
    scan.resyncs.sort_by_key(|r| r.addr);
    scan.chunks = chunks;
    scan.known = known_starts.to_vec();
    scan
}

/// Bytes of a data section one worker scans at a time.
const DATA_CHUNK: usize = 1 << 20;

/// The code addresses that the 8-byte words at `data[lo..hi]` hold (`lo` aligned to the
/// section's address: tables of labels, `&&label`, which an indirect branch may reach).
fn taken_by_data(data: &[u8], lo: usize, hi: usize, code: &[(u64, u64, usize)]) -> Vec<u64> {
    data.get(lo..hi)
        .unwrap_or_default()
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
        .filter(|&a| code_of(code, a).is_some())
        .collect()
}

fn decode_chunk(image: &Image, chunk: Chunk, known: &[u64], out: &mut dyn Visitor) {
    let s = &image.sections[chunk.section];
    let data = image.section_data(s);
    let lo = (chunk.start - s.addr) as usize;
    let hi = (chunk.end - s.addr) as usize;
    // The decoder may read past the chunk's end into the rest of the section: an instruction
    // that starts before the end belongs to this chunk.
    let bytes = data.get(lo..).unwrap_or_default();
    let mut dec = Decoder::with_ip(64, bytes, chunk.start, DecoderOptions::NONE);
    let mut k = known.partition_point(|&a| a <= chunk.start);
    let mut insn = Instruction::default();
    let mut pending_bad: Option<u64> = None;
    while dec.position() < hi - lo {
        let ip = dec.ip();
        dec.decode_out(&mut insn);
        if insn.is_invalid() {
            pending_bad.get_or_insert(ip);
            let pos = (ip - chunk.start) as usize + 1;
            resume(&mut dec, pos, chunk.start);
            continue;
        }
        if let Some(bad) = pending_bad.take() {
            out.resync(Resync {
                addr: bad,
                resumed_at: ip,
                reason: ResyncReason::Undecodable,
            });
        }
        let next_ip = ip + insn.len() as u64;
        while k < known.len() && known[k] <= ip {
            k += 1;
        }
        if let Some(&ks) = known.get(k)
            && ks < next_ip
        {
            out.resync(Resync {
                addr: ip,
                resumed_at: ks,
                reason: ResyncReason::CrossedKnownStart,
            });
            resume(&mut dec, (ks - chunk.start) as usize, chunk.start);
            continue;
        }
        out.insn(ip, &insn);
        if let Some(class) = classify(&insn) {
            out.found(Found {
                addr: ip,
                len: insn.len() as u8,
                class,
                section: chunk.section,
            });
        }
    }
    if let Some(bad) = pending_bad {
        out.resync(Resync {
            addr: bad,
            resumed_at: chunk.end,
            reason: ResyncReason::Undecodable,
        });
    }
}

fn resume(dec: &mut Decoder<'_>, pos: usize, base: u64) {
    // `pos` never exceeds the data the decoder was given: it is either one past a byte that was
    // just decoded, or a known start inside the chunk.
    if dec.set_position(pos).is_ok() {
        dec.set_ip(base + pos as u64);
    } else {
        let _ = dec.set_position(dec.max_position());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::elf_with_code;

    #[test]
    fn finds_and_resynchronises() {
        // cli; mov rax, cr3; <bad byte 0x06 (invalid in 64-bit)>; sti; nop; ret
        let code = [0xfa, 0x0f, 0x20, 0xd8, 0x06, 0xfb, 0x90, 0xc3];
        let img = elf_with_code(&code, &[]);
        let s = sweep(&img, &[], Options { threads: 1 }, None);
        let ops: Vec<Op> = s.found.iter().map(Found::op).collect();
        assert_eq!(ops, [Op::Cli, Op::MovFromCr3, Op::Sti]);
        assert_eq!(s.resyncs.len(), 1);
        assert_eq!(s.resyncs[0].reason, ResyncReason::Undecodable);
        assert_eq!(s.resyncs[0].addr, crate::testing::TEXT + 4);
        assert_eq!(s.resyncs[0].resumed_at, crate::testing::TEXT + 5);
        assert!(s.is_insn_start(crate::testing::TEXT + 5));
        assert!(!s.is_insn_start(crate::testing::TEXT + 2));
    }

    proptest::proptest! {
        /// Merging a chunk's map a word at a time sets exactly the bits one at a time would.
        #[test]
        fn set_all_from_sets_each_bit_of_the_part(
            off in 0u64..300,
            len in 0u64..300,
            extra in 0u64..100,
            bits in proptest::collection::vec(0u64..300, 0..60),
        ) {
            let base = 0x1000;
            let mut whole = ByteMap::new(base, off + len + extra);
            let mut part = ByteMap::new(base + off, len);
            for b in bits.iter().filter(|&&b| b < len) {
                part.set(base + off + b);
            }
            let mut want = whole.clone();
            for a in base + off..base + off + len {
                if part.get(a) {
                    want.set(a);
                }
            }
            whole.set_all_from(&part);
            proptest::prop_assert_eq!(whole.words, want.words);
        }
    }

    /// A label is the sole target of a branch only if nothing else branches to it or takes
    /// its address (in code or in data).
    #[test]
    fn sole_targets_are_those_of_one_branch_whose_address_nothing_takes() {
        use crate::testing::TEXT;
        // 0: 1: hlt; jmp 1b; 3: 2: hlt; jmp 2b; 6: lea rax, [rip + 2b]; 13: 3: hlt; jmp 3b;
        // 16: jmp 3b; 18: 4: hlt; jmp 4b; ret
        let code = [
            0xf4, 0xeb, 0xfd, 0xf4, 0xeb, 0xfd, 0x48, 0x8d, 0x05, 0xf6, 0xff, 0xff, 0xff, 0xf4,
            0xeb, 0xfd, 0xeb, 0xfb, 0xf4, 0xeb, 0xfd, 0xc3,
        ];
        let sole = |extra: &[pvpatch_testkit::elf::Extra]| {
            let bytes = pvpatch_testkit::elf::build(&code, &[], extra);
            let img = Image::from_bytes("t.elf", bytes).unwrap();
            let s = sweep(&img, &[], Options { threads: 1 }, None);
            [0, 3, 13, 18].map(|o| s.is_sole_target(TEXT + o))
        };
        assert_eq!(sole(&[]), [true, false, false, true]);
        // An aligned word of a data section holding the last label: taken too.
        let table = (TEXT + 18).to_le_bytes().to_vec();
        let data = pvpatch_testkit::elf::Extra::data(".rodata", TEXT + 0x10_0000, table);
        assert_eq!(sole(&[data]), [true, false, false, false]);
    }

    #[test]
    fn restarts_at_known_starts() {
        // b8 fa fb 90 90 = mov eax, 0x9090fbfa -- but a known start at +1 says `cli` is there.
        let code = [0xb8, 0xfa, 0xfb, 0x90, 0x90, 0xc3];
        let base = crate::testing::TEXT;
        let img = elf_with_code(&code, &[]);
        let plain = sweep(&img, &[], Options { threads: 1 }, None);
        assert!(plain.found.is_empty());
        let known = [base + 1];
        let s = sweep(&img, &known, Options { threads: 1 }, None);
        let ops: Vec<Op> = s.found.iter().map(Found::op).collect();
        assert_eq!(ops, [Op::Cli, Op::Sti]);
        assert_eq!(s.resyncs[0].reason, ResyncReason::CrossedKnownStart);
    }

    #[test]
    fn threads_do_not_change_the_result() {
        let mut code = Vec::new();
        for i in 0..200_000u32 {
            match i % 7 {
                0 => code.push(0xfa),
                1 => code.extend_from_slice(&[0x0f, 0x22, 0xdf]),
                2 => code.extend_from_slice(&[0xe8, 0, 0, 0, 0]),
                3 => code.push(0x06),
                _ => code.push(0x90),
            }
        }
        let img = elf_with_code(&code, &[]);
        let known: Vec<u64> = (0..code.len() as u64)
            .step_by(4096)
            .map(|o| crate::testing::TEXT + o)
            .collect();
        let a = sweep(&img, &known, Options { threads: 1 }, None);
        let b = sweep(&img, &known, Options { threads: 4 }, None);
        assert_eq!(a.found, b.found);
        assert_eq!(a.resyncs, b.resyncs);
        assert_eq!(a.instructions, b.instructions);
        assert_eq!(a.code[0].starts.count(), b.code[0].starts.count());
        assert_eq!(a.code[0].targets.count(), b.code[0].targets.count());
    }
}
