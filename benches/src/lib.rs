//! Inputs and measurements shared by the benchmarks.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, Instruction};
use patch_sites::table::{Form, Site};
use patch_sites::{ALL_OPS, Operand, RegSet};
use pvpatch::load::image::Image;

/// `n` sorted, non-overlapping native sites spread over kernel text, deterministic.
pub fn synthetic_sites(n: usize) -> Vec<Site> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut addr = 0xffff_ffff_8100_0000u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            addr += 16 + (x % 512);
            let op = ALL_OPS[(x >> 32) as usize % 5]; // cli, sti, pushf, popf, hlt
            let width = if op.info().widths.allows(0) { 0 } else { 8 };
            Site {
                addr,
                site_len: 5,
                insn_len: 1,
                op_id: op.id(),
                form: Form::Native,
                operand: Operand::None,
                width,
                flags: 0,
                clobbers: RegSet::EMPTY,
                stub: None,
            }
        })
        .collect()
}

/// The whole scan as `pvpatch scan` does it: load, Linux's tables, sweep, analysis.
pub fn scan_file(path: &Path) -> Result<usize, pvpatch::load::image::ImageError> {
    let img = Image::open(path)?;
    let r = pvpatch::scan_image(&img, Default::default(), None);
    Ok(r.analysis.sites.len())
}

/// Decoding alone, one thread, no classification: the lower bound of a sweep.
pub fn decode_only(img: &Image) -> u64 {
    let mut n = 0;
    let mut insn = Instruction::default();
    for s in img.exec_sections() {
        let mut d = Decoder::with_ip(64, img.section_data(s), s.addr, DecoderOptions::NONE);
        while d.can_decode() {
            d.decode_out(&mut insn);
            n += 1;
        }
    }
    n
}

/// `objdump -d --no-show-raw-insn` over the same image, output discarded (without the raw
/// bytes objdump writes less and runs faster than plain `-d`: the harder baseline).
pub fn objdump(path: &Path) -> std::io::Result<()> {
    let st = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("objdump: {st}")))
    }
}

/// The median of `n` timed runs of `f`.
pub fn median(n: usize, mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[v.len() / 2]
}

/// The line a child prints last: its own peak resident set size.
pub const PEAK_RSS_PREFIX: &str = "peak-rss-kib ";

/// This process's peak resident set size in KiB (`VmHWM` in `/proc/self/status`).
pub fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `exe` with `args` as a child process and returns its peak resident set size in bytes,
/// as the child reports it (a line [`PEAK_RSS_PREFIX`] `N`, from [`own_peak_rss_kib`]), and its
/// wall time. The child's own `VmHWM` is used rather than `wait4`'s `ru_maxrss`: Linux carries
/// `ru_maxrss` across `execve`, so a child spawned from a large parent would report the
/// parent's size.
pub fn child_peak_rss(
    exe: &Path,
    args: &[&std::ffi::OsStr],
    env: (&str, &str),
) -> std::io::Result<(u64, Duration)> {
    let t = Instant::now();
    let out = Command::new(exe).args(args).env(env.0, env.1).output()?;
    let wall = t.elapsed();
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "child failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let kib = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(PEAK_RSS_PREFIX)?.trim().parse::<u64>().ok())
        .ok_or_else(|| std::io::Error::other("the child did not report its peak RSS"))?;
    Ok((kib * 1024, wall))
}

/// An annotated image's code as writable host memory, for running the boot-time planner and
/// poker over a real kernel's table on the host.
#[derive(Debug)]
pub struct HostText {
    sections: Vec<(u64, Vec<u8>)>,
}

impl HostText {
    /// The executable sections of `img`.
    pub fn of(img: &Image) -> HostText {
        HostText {
            sections: img
                .exec_sections()
                .map(|s| (s.addr, img.section_data(s).to_vec()))
                .collect(),
        }
    }

    fn find(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        self.sections.iter_mut().find_map(|(base, b)| {
            let at = addr.checked_sub(*base)? as usize;
            b.get_mut(at..at.checked_add(len)?)
        })
    }
}

impl pvpatch_runtime::plan::TextRead for HostText {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        let found = self.sections.iter().find_map(|(base, b)| {
            let at = addr.checked_sub(*base)? as usize;
            b.get(at..at.checked_add(out.len())?)
        });
        match found {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

impl pvpatch_runtime::apply::TextPoke for HostText {
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        if let Some(b) = self.find(addr, bytes.len()) {
            b.copy_from_slice(bytes);
        }
    }

    fn sync(&mut self) {}
}

/// The sealed table of an annotated image: its bytes and address.
pub fn sealed_table(img: &Image) -> Option<(Vec<u8>, u64)> {
    let (addr, bytes) = pvpatch::annotate::sealed_table(img)?;
    Some((bytes.to_vec(), addr))
}

/// A backend taken as given (no probing on the host).
pub fn backend(
    kind: pvpatch_runtime::detect::BackendKind,
) -> pvpatch_runtime::backend::Backend<'static> {
    pvpatch_runtime::backend::Backend {
        detected: pvpatch_runtime::detect::Detected::assumed(
            kind,
            pvpatch_runtime::detect::KVM_FEATURE_NOP_IO_DELAY,
        ),
        rom: None,
        pv: None,
        thunks: None,
    }
}
