//! # pvpatch
//!
//! The post-link tool's library. It reads as its pipeline, one module per step:
//!
//! 1. [`load`]: an x86-64 ELF kernel image (or the vmlinux inside a bzImage);
//! 2. [`linux`]: Linux's own patch tables, each layout detected by checking every entry;
//! 3. [`sweep`]: every executable section decoded, every sensitive instruction classified;
//! 4. [`analyse`]: per site, what covers it and the room it offers a rewrite (in place, a
//!    detour built by [`analyse::detour`]);
//! 5. [`ledger`]: all of it, machine-readable (and [`summary`] for people);
//! 6. [`annotate`]: a sealed site table written into a copy of the image;
//! 7. [`verify`]: every record of an annotated image checked against its code.
//!
//! [`scan_image`] runs steps 2 to 4, keeping every site; [`scan_image_streamed`] keeps none
//! (memory in the code's bytes, whatever the number of sites): [`sites`] visits them in either
//! case, and the ledger and the summary are written from those visits. Beside the pipeline: [`rewrite`] plans one backend's
//! rewrites and applies them to the file (through the boot-time runtime's own planner), [`rom`]
//! builds and shows backend ROMs, [`output`] writes files atomically, [`catalogue`] prints the
//! op catalogue, [`schema`] gives the JSON Schemas of the ledger and the plan.
//!
//! The x86 rules (what an instruction is, its native encoding, whether bytes hold what a record
//! says) are `pvpatch-isa`'s, shared with the boot-time runtime.

pub mod analyse;
pub mod annotate;
pub mod catalogue;
#[cfg(feature = "cli")]
pub mod cli;
pub mod ledger;
pub mod linux;
pub mod load;
pub mod output;
pub mod rewrite;
pub mod rom;
pub mod schema;
pub mod shim;
pub mod sites;
pub mod spans;
pub mod summary;
pub mod sweep;
pub mod verify;

use std::time::Duration;

use crate::analyse::{Analysis, analyse};
use crate::linux::LinuxTables;
use crate::load::Image;
use crate::sweep::Sweep;

/// A scanned image: steps 2 to 4 of the pipeline.
#[derive(Debug)]
pub struct ScanReport<'a> {
    /// The image.
    pub image: &'a Image,
    /// Linux's tables.
    pub tables: LinuxTables,
    /// The sweep.
    pub sweep: Sweep,
    /// Per-site facts.
    pub analysis: Analysis,
    /// Time spent (tables, sweep, analysis).
    pub elapsed: Duration,
}

/// `s` quoted for a message, cut to its first 64 characters (and its length said) when it is
/// longer: a name given on the command line or in a file may be megabytes long.
pub fn quoted(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// Why a scan was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// A stock kernel's detours are planned over all its sites at once, so they are kept: more
    /// than [`MAX_STOCK_SITES`] is no kernel Linux builds.
    #[error(
        "{sites} sensitive instructions in what looks like a stock kernel (it has _text and \
         _etext): at most {max} are analysed together (a Linux kernel has a few thousand)"
    )]
    TooManyStockSites {
        /// Sites found.
        sites: u64,
        /// [`MAX_STOCK_SITES`].
        max: u64,
    },
    /// Annotating, planning or rewriting keeps every site in memory: more than
    /// [`MAX_KEPT_SITES`] is refused (`scan` streams and has no such limit).
    #[error(
        "more than {max} sensitive instructions ({sites} found before stopping): annotate, \
         plan and rewrite keep each one in memory, and refuse an image with more (`pvpatch \
         scan` streams and reports on any number)"
    )]
    TooManySites {
        /// Sites found.
        sites: u64,
        /// [`MAX_KEPT_SITES`].
        max: u64,
    },
}

/// [`scan_image`], keeping at most `max_sites` sites: past that, the sites are dropped and the
/// image refused ([`ScanError::TooManySites`]).
pub fn scan_image_at_most<'a>(
    image: &'a Image,
    opts: sweep::Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    max_sites: u64,
) -> Result<ScanReport<'a>, ScanError> {
    scan_with(
        image,
        |known| {
            sweep::sweep_at_most(image, known, opts, progress, max_sites).map_err(|sites| {
                ScanError::TooManySites {
                    sites,
                    max: max_sites,
                }
            })
        },
        |tables, sweep| analyse(image, tables, sweep),
    )
}

/// The most sites a streamed scan keeps for a stock kernel's whole-image planning (a few
/// hundred bytes each; Linux has a few thousand).
pub const MAX_STOCK_SITES: u64 = 1 << 18;

/// The most sites the commands that keep every site (annotate, plan, rewrite: a few hundred
/// bytes each in memory, and a 24-byte record each in the table) take on: 2 Mi sites, about
/// 600 MB. Linux has a few thousand; past this the image is refused, not swapped or aborted.
pub const MAX_KEPT_SITES: u64 = 1 << 21;

/// Linux's tables and the known instruction starts (tables and symbols, sorted).
fn tables_and_starts(image: &Image) -> (LinuxTables, Vec<u64>) {
    let tables = linux::read(image);
    let mut known: Vec<u64> = tables.starts.iter().map(|s| s.0).collect();
    known.extend(image.symbols.iter().map(|s| s.addr));
    known.sort_unstable();
    known.dedup();
    (tables, known)
}

/// Reads Linux's tables, sweeps the code with `sweep` (given the known instruction starts),
/// then analyses with `analysis`: the report, timed from the start, or `sweep`'s error.
fn scan_with<'a, E>(
    image: &'a Image,
    sweep: impl FnOnce(&[u64]) -> Result<Sweep, E>,
    analysis: impl FnOnce(&LinuxTables, &Sweep) -> Analysis,
) -> Result<ScanReport<'a>, E> {
    let t = std::time::Instant::now();
    let (tables, known) = tables_and_starts(image);
    let sweep = sweep(&known)?;
    drop(known);
    let analysis = analysis(&tables, &sweep);
    Ok(ScanReport {
        image,
        tables,
        sweep,
        analysis,
        elapsed: t.elapsed(),
    })
}

/// Reads Linux's tables, sweeps the code (restarting at every instruction start a table or a
/// symbol names), analyses every site, keeping them all (in [`Analysis::sites`]).
pub fn scan_image<'a>(
    image: &'a Image,
    opts: sweep::Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> ScanReport<'a> {
    let Ok(report) = scan_with::<std::convert::Infallible>(
        image,
        |known| Ok(sweep::sweep(image, known, opts, progress)),
        |tables, sweep| analyse(image, tables, sweep),
    );
    report
}

/// As [`scan_image`], keeping no site: the sweep keeps its maps of the code (four bits a byte)
/// and counts, and [`sites::for_each_site`] decodes and analyses each site again when visited,
/// in address order. [`Analysis::sites`] and [`sweep::Sweep::found`] are empty. A stock
/// kernel's sites are planned together, so kept (at most [`MAX_STOCK_SITES`]).
pub fn scan_image_streamed<'a>(
    image: &'a Image,
    opts: sweep::Options,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<ScanReport<'a>, ScanError> {
    if analyse::is_stock(image) {
        return scan_with(
            image,
            |known| {
                sweep::sweep_at_most(image, known, opts, progress, MAX_STOCK_SITES).map_err(
                    |sites| ScanError::TooManyStockSites {
                        sites,
                        max: MAX_STOCK_SITES,
                    },
                )
            },
            |tables, sweep| analyse(image, tables, sweep),
        );
    }
    scan_with(
        image,
        |known| Ok(sweep::sweep_counting(image, known, opts, progress)),
        |tables, _| analyse::analyse_without_sites(image, tables),
    )
}

/// Test images for the unit tests: the test kit's ELF builder, loaded by this crate's loader.
#[cfg(test)]
pub(crate) mod testing {
    pub use pvpatch_testkit::elf::TEXT;

    /// An image with `code` as `.text` at [`TEXT`] and function symbols `(name, offset, size)`.
    pub fn elf_with_code(code: &[u8], symbols: &[(&str, u64, u64)]) -> crate::load::Image {
        let bytes = pvpatch_testkit::elf::build(code, symbols, &[]);
        crate::load::Image::from_bytes("test.elf", bytes).unwrap_or_else(|e| panic!("{e}"))
    }
}
