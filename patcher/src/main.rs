//! `pvpatch`: the post-link tool.
//!
//! Exit status: 0 success; 2 bad command line; 3 unreadable or malformed input; 4 verification
//! found records that do not match the code, or `rom show` entries the runtime would refuse;
//! 5 refused (already annotated, or the output would overwrite the input); 6 the output could
//! not be written; 70 internal error; 128 + the signal's number when interrupted by SIGINT,
//! SIGTERM or SIGHUP (after removing the temporary files being written).
//!
//! For tests only: `PVPATCH_TEST_WRITE_PAUSE_MS` makes every write pause that long once its
//! temporary file is complete, before it replaces the destination (to interrupt it there).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pvpatch::ScanReport;
use pvpatch::annotate::{AnnotateError, AnnotateOptions, annotate};
use pvpatch::ledger::{Ledger, hex};
use pvpatch::load::bzimage;
use pvpatch::load::image::{Image, ImageError};
use pvpatch::output::{OutputError, file_kind, same_file, write_bytes};
use pvpatch::rewrite::{BackendSpec, PlanLedger, RewriteError, apply_to_file, plan_image};
use pvpatch::summary::human_summary_with_counts;
use pvpatch::{catalogue, sweep, verify};

/// `print!` that does not panic when standard output is a closed pipe (`pvpatch ... | head`).
macro_rules! out {
    ($($t:tt)*) => {{
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// `println!` that does not panic when standard output is a closed pipe.
macro_rules! outln {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Exit statuses.
mod status {
    pub const USAGE: u8 = 2;
    pub const INPUT: u8 = 3;
    pub const MISMATCH: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const OUTPUT: u8 = 6;
    pub const INTERNAL: u8 = 70;
}

#[derive(Parser)]
#[command(
    name = "pvpatch",
    version,
    about = "Find, classify and annotate the sensitive instructions of x86-64 kernel images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Find and classify every sensitive instruction; print a summary, or the ledger as JSON.
    Scan {
        /// The ELF image (a vmlinux, or any x86-64 ELF executable).
        image: PathBuf,
        /// Print the ledger (docs/ledger.md) as JSON instead of the summary.
        #[arg(long)]
        json: bool,
        /// Write the output to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Write a site table into a new section of the image.
    Annotate {
        /// The ELF image.
        image: PathBuf,
        /// The annotated image to write.
        #[arg(short, long, required_unless_present = "in_place")]
        output: Option<PathBuf>,
        /// Replace the input file (atomically).
        #[arg(long)]
        in_place: bool,
        /// Replace the table of an already annotated image.
        #[arg(long)]
        force: bool,
        /// Record swept sites only in this executable section (repeatable; default: all).
        #[arg(long = "section")]
        sections: Vec<String>,
        /// Also write the ledger of the input to this file.
        #[arg(long)]
        ledger: Option<PathBuf>,
        /// Put the boot shim (the ELF `cargo xtask shim` builds) in front of the kernel's PVH
        /// entry: it rewrites the kernel for the backend it finds at every boot (docs/shim.md).
        #[arg(long, value_name = "SHIM")]
        boot_shim: Option<PathBuf>,
    },
    /// What one backend makes of every site: planned by the boot-time runtime's own planner.
    Plan {
        /// The image (annotated, or not: then the table annotate would write is used).
        image: PathBuf,
        /// The backend: native, tcg, kvm, vmware, xen, hyperv, rom (with --rom), outofline.
        #[arg(long)]
        backend: String,
        /// The ROM, for the rom backend.
        #[arg(long)]
        rom: Option<PathBuf>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Write the output to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Apply one backend's plan to the image file itself (offline specialisation).
    Rewrite {
        /// The image.
        image: PathBuf,
        /// The backend (as for `plan`).
        #[arg(long)]
        backend: String,
        /// The ROM, for the rom backend.
        #[arg(long)]
        rom: Option<PathBuf>,
        /// The rewritten image to write.
        #[arg(short, long, required_unless_present = "in_place")]
        output: Option<PathBuf>,
        /// Replace the input file (atomically).
        #[arg(long)]
        in_place: bool,
    },
    /// Check that every record of an annotated image's table lands on the instruction it names.
    Verify {
        /// The annotated image.
        image: PathBuf,
    },
    /// Extract the ELF vmlinux from a bzImage (xz, lzma, zstd, lz4 or gzip payload).
    ExtractVmlinux {
        /// The bzImage (e.g. /boot/vmlinuz-*).
        bzimage: PathBuf,
        /// Where to write the vmlinux.
        #[arg(short, long)]
        output: PathBuf,
        /// Refuse a payload that would decompress to more than this: bytes, or a number with
        /// K, M, G or T (powers of 1024), e.g. 512M, 2G.
        #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = bzimage::parse_size)]
        max_decompressed: u64,
    },
    /// Print the op catalogue.
    Ops,
    /// Backend ROMs: build one from a description, show one, list the sequences.
    Rom {
        #[command(subcommand)]
        command: RomCommand,
    },
}

#[derive(Subcommand)]
enum RomCommand {
    /// Assemble a ROM from a description (TOML), checked as the runtime will check it.
    Build {
        /// The description.
        description: PathBuf,
        /// Where to write the ROM.
        #[arg(short, long)]
        output: PathBuf,
        /// Also check it against every site of this (annotated) kernel.
        #[arg(long = "for")]
        kernel: Option<PathBuf>,
    },
    /// Print a ROM.
    Show {
        /// The ROM.
        rom: PathBuf,
    },
    /// List the sequences descriptions can name.
    Sequences,
}

/// An error with the exit status it maps to.
struct Failure(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let e = e.into();
        let code = if e.is::<ImageError>()
            || e.is::<bzimage::BzImageError>()
            || e.is::<pvpatch::ScanError>()
        {
            status::INPUT
        } else if let Some(a) = e.downcast_ref::<AnnotateError>() {
            match a {
                AnnotateError::AlreadyAnnotated(_) => status::REFUSED,
                AnnotateError::Usage(_) => status::USAGE,
                AnnotateError::LinkedTable(_)
                | AnnotateError::NotRewritable(_)
                | AnnotateError::NoLoadSegment
                | AnnotateError::Elf(_)
                | AnnotateError::Table(_) => status::INPUT,
                AnnotateError::Output(OutputError::WouldOverwriteInput(_)) => status::REFUSED,
                AnnotateError::Output(_) => status::OUTPUT,
                AnnotateError::Shim(_) => status::INPUT,
                _ => status::INTERNAL,
            }
        } else if e.downcast_ref::<pvpatch::shim::ShimError>().is_some() {
            status::INPUT
        } else if let Some(o) = e.downcast_ref::<OutputError>() {
            match o {
                OutputError::WouldOverwriteInput(_) => status::REFUSED,
                _ => status::OUTPUT,
            }
        } else if let Some(r) = e.downcast_ref::<RewriteError>() {
            match r {
                RewriteError::UnknownBackend(_) | RewriteError::Usage(_) => status::USAGE,
                RewriteError::Apply(_) => status::INTERNAL,
                _ => status::INPUT,
            }
        } else if e.is::<verify::VerifyError>() {
            status::MISMATCH
        } else {
            status::INTERNAL
        };
        Failure(code, e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    remove_temp_files_on_signals();
    if let Some(ms) = std::env::var("PVPATCH_TEST_WRITE_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        pvpatch::output::pause_before_replacing(std::time::Duration::from_millis(ms));
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("pvpatch: error: {}", bounded(&format!("{e:#}")));
            ExitCode::from(code)
        }
    }
}

/// `message` with every line longer than 1,024 bytes cut to its first 512 (and how much was
/// left out said): an error may quote a line of its input, and an input line may be megabytes.
fn bounded(message: &str) -> String {
    const LONG: usize = 1024;
    const KEEP: usize = 512;
    message
        .lines()
        .map(|l| match l.char_indices().nth(KEEP) {
            Some((cut, _)) if l.len() > LONG => {
                format!("{}... ({} more bytes)", &l[..cut], l.len() - cut)
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// On SIGINT, SIGTERM or SIGHUP: removes the temporary files being written and exits with 128
/// + the signal's number. On a thread of its own (a signal handler may take no lock).
fn remove_temp_files_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // Held until the process is gone: no output is renamed into place after this.
                let _held = pvpatch::output::abandon_temp_files();
                std::process::exit(128 + signal);
            }
        });
}

/// Names the temporary files that a killed run left where `dest` is about to be written.
fn warn_stale(dest: &Path) {
    for p in pvpatch::output::stale_temp_files(dest) {
        eprintln!(
            "pvpatch: warning: {} is left from an interrupted pvpatch run (or one is writing it \
             now); remove it if none is running",
            p.display()
        );
    }
}

/// Writes `bytes` to `dest` (atomically, if a regular file).
fn write_output(dest: &Path, bytes: &[u8]) -> Result<(), Failure> {
    warn_stale(dest);
    Ok(write_bytes(dest, bytes)?)
}

/// Refuses an input that is not a regular file (reading a FIFO blocks, a directory has no
/// bytes).
fn regular_input(path: &Path) -> Result<(), Failure> {
    let meta = std::fs::metadata(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_file() {
        return Ok(());
    }
    Err(ImageError::Unsupported(format!(
        "{}: {}, not a regular file",
        path.display(),
        file_kind(&meta)
    ))
    .into())
}

fn open(path: &Path) -> Result<Image, Failure> {
    Ok(Image::open(path)?)
}

/// Scans with a progress bar on a terminal, keeping every site (at most
/// [`pvpatch::MAX_KEPT_SITES`]).
fn scan_with_progress(
    image: &Image,
    threads: Option<usize>,
) -> Result<ScanReport<'_>, pvpatch::ScanError> {
    progress_scan(image, threads, |i, o, p| {
        pvpatch::scan_image_at_most(i, o, p, pvpatch::MAX_KEPT_SITES)
    })
}

/// Runs `scan` (keeping the sites or not) with a progress bar on a terminal.
fn progress_scan<'a, T>(
    image: &'a Image,
    threads: Option<usize>,
    scan: impl FnOnce(&'a Image, sweep::Options, Option<&(dyn Fn(u64) + Sync)>) -> T,
) -> T {
    let mut opts = sweep::Options::default();
    if let Some(t) = threads {
        opts.threads = t.max(1);
    }
    let total: u64 = image.exec_sections().map(|s| s.size).sum();
    if std::io::stderr().is_terminal() && total > 4 << 20 {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message("sweeping");
        let tick = |n: u64| bar.inc(n);
        let r = scan(image, opts, Some(&tick));
        bar.finish_and_clear();
        r
    } else {
        scan(image, opts, None)
    }
}

fn emit(output: Option<&Path>, input: &Path, text: &str) -> Result<(), Failure> {
    match output {
        Some(p) => {
            if same_file(p, input) {
                return Err(OutputError::WouldOverwriteInput(p.to_owned()).into());
            }
            write_output(p, text.as_bytes())?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) is not an error worth a status.
            let _ = out.write_all(text.as_bytes());
        }
    }
    Ok(())
}

/// As [`emit`], with what `fill` writes as it goes (nothing held whole).
fn emit_with(
    output: Option<&Path>,
    input: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), Failure> {
    match output {
        Some(p) => {
            if same_file(p, input) {
                return Err(OutputError::WouldOverwriteInput(p.to_owned()).into());
            }
            warn_stale(p);
            pvpatch::output::write_atomic(p, None, None, |w| {
                fill(w).map_err(|source| OutputError::Io {
                    path: p.to_owned(),
                    source,
                })
            })?;
        }
        None => {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            // A closed pipe (`| head`) is not an error worth a status: writing stops there.
            let _ = fill(&mut out).and_then(|()| out.flush());
        }
    }
    Ok(())
}

fn read_input(path: &Path) -> Result<Vec<u8>, Failure> {
    regular_input(path)?;
    std::fs::read(path).map_err(|source| {
        ImageError::Io {
            path: path.to_owned(),
            source,
        }
        .into()
    })
}

fn rom_command(command: RomCommand) -> Result<(), Failure> {
    match command {
        RomCommand::Build {
            description,
            output,
            kernel,
        } => {
            if same_file(&output, &description) {
                return Err(OutputError::WouldOverwriteInput(output).into());
            }
            let text = String::from_utf8(read_input(&description)?).map_err(|_| {
                Failure(
                    status::INPUT,
                    anyhow::anyhow!("{} is not UTF-8", description.display()),
                )
            })?;
            let rom = match kernel.as_deref().map(open).transpose()? {
                Some(img) => pvpatch::rom::build_for(&text, &img),
                None => pvpatch::rom::build(&text, None),
            }
            .map_err(|e| Failure(status::INPUT, anyhow::Error::new(e)))?;
            write_output(&output, &rom)?;
            out!(
                "{}",
                pvpatch::rom::show(&rom).map(|s| s.text).unwrap_or_default()
            );
            outln!("written to {}", output.display());
        }
        RomCommand::Show { rom } => {
            let bytes = read_input(&rom)?;
            let shown = pvpatch::rom::show(&bytes)
                .map_err(|e| Failure(status::INPUT, anyhow::anyhow!("{}: {e}", rom.display())))?;
            out!("{}", shown.text);
            if !shown.refused.is_empty() {
                // What the runtime would refuse is a mismatch, as for verify (status 4).
                return Err(Failure(
                    status::MISMATCH,
                    anyhow::anyhow!(
                        "{}: the runtime would refuse {} of {} entries, and so the whole ROM",
                        rom.display(),
                        shown.refused.len(),
                        shown.entries
                    ),
                ));
            }
        }
        RomCommand::Sequences => {
            for s in pvpatch::rom::library() {
                let slots: Vec<String> = s
                    .slots
                    .iter()
                    .map(|x| format!("{:?}@{}", x.kind, x.offset))
                    .collect();
                outln!(
                    "{:<14} {:<8} {:<20} {:02x?} {}",
                    s.name,
                    if s.entry_point { "call" } else { "inline" },
                    s.asm,
                    s.bytes,
                    slots.join(" ")
                );
            }
        }
    }
    Ok(())
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Ops => out!("{}", catalogue::render()),
        Command::Rom { command } => rom_command(command)?,
        Command::Scan {
            image,
            json,
            output,
            threads,
        } => {
            let img = open(&image)?;
            // No site is kept: the ledger is written as each is analysed again.
            let report = progress_scan(&img, threads, pvpatch::scan_image_streamed)?;
            let counts = pvpatch::sites::count(&report);
            if json {
                emit_with(output.as_deref(), &image, |w| {
                    serde_json::to_writer_pretty(&mut *w, &Ledger::with_counts(&report, &counts))?;
                    w.write_all(b"\n")
                })?;
            } else {
                let text = human_summary_with_counts(&report, &counts);
                emit(output.as_deref(), &image, &text)?;
            }
        }
        Command::Annotate {
            image,
            output,
            in_place,
            force,
            sections,
            ledger,
            boot_shim,
        } => {
            if let Some(s) = &boot_shim {
                regular_input(s)?;
            }
            let boot_shim = boot_shim
                .as_deref()
                .map(pvpatch::shim::Shim::load)
                .transpose()?;
            let out = match (&output, in_place) {
                (Some(o), _) => o.clone(),
                (None, true) => image.clone(),
                (None, false) => unreachable!("clap requires -o unless --in-place"),
            };
            if !in_place && same_file(&out, &image) {
                return Err(OutputError::WouldOverwriteInput(out).into());
            }
            if let Some(l) = &ledger {
                if same_file(l, &image) {
                    return Err(OutputError::WouldOverwriteInput(l.clone()).into());
                }
                if same_file(l, &out) {
                    return Err(Failure(
                        status::REFUSED,
                        anyhow::anyhow!("the ledger {} would overwrite the output", l.display()),
                    ));
                }
            }
            let img = open(&image)?;
            let report = scan_with_progress(&img, None)?;
            let ledger_text = match &ledger {
                Some(_) => {
                    let mut s =
                        serde_json::to_string_pretty(&Ledger::new(&report)).context("ledger")?;
                    s.push('\n');
                    Some(s)
                }
                None => None,
            };
            let t = std::time::Instant::now();
            let opts = AnnotateOptions {
                force,
                sections,
                boot_shim,
            };
            warn_stale(&out);
            let a = annotate(&report, &out, &opts)?;
            // Only once the image is written: a refused annotate writes nothing.
            if let (Some(l), Some(s)) = (&ledger, &ledger_text) {
                write_output(l, s.as_bytes())?;
            }
            outln!(
                "{}: {} sites recorded ({} from the image's macros, {} found by the sweep) in a \
                 {}-byte table at {}; written to {} in {:.0} ms",
                image.display(),
                a.sites,
                a.from_macros,
                a.from_scan,
                a.table_size,
                hex(a.table_addr),
                out.display(),
                (report.elapsed + t.elapsed()).as_secs_f64() * 1e3,
            );
            if let Some((shim, report)) = a.shim {
                outln!(
                    "  boot shim at physical {} (the PVH entry now), its report page at {}",
                    hex(shim),
                    hex(report)
                );
            }
            if a.trailing > 0 {
                outln!(
                    "  {} trailing bytes that no section covers were carried over",
                    a.trailing
                );
            }
        }
        Command::Plan {
            image,
            backend,
            rom,
            json,
            output,
        } => {
            let spec = BackendSpec::new(&backend, rom.as_deref().map(read_input).transpose()?)?;
            let img = open(&image)?;
            let report = scan_with_progress(&img, None)?;
            let plan = plan_image(&report, &spec)?;
            let ledger = PlanLedger::new(&report, &plan);
            let text = if json {
                let mut s = serde_json::to_string_pretty(&ledger).context("plan")?;
                s.push('\n');
                s
            } else {
                ledger.human()
            };
            emit(output.as_deref(), &image, &text)?;
        }
        Command::Rewrite {
            image,
            backend,
            rom,
            output,
            in_place,
        } => {
            let out = match (&output, in_place) {
                (Some(o), _) => o.clone(),
                (None, true) => image.clone(),
                (None, false) => unreachable!("clap requires -o unless --in-place"),
            };
            if !in_place && same_file(&out, &image) {
                return Err(OutputError::WouldOverwriteInput(out).into());
            }
            let spec = BackendSpec::new(&backend, rom.as_deref().map(read_input).transpose()?)?;
            let img = open(&image)?;
            let report = scan_with_progress(&img, None)?;
            let plan = plan_image(&report, &spec)?;
            let bytes = apply_to_file(&img, &plan)?;
            drop(report);
            drop(img);
            write_output(&out, &bytes)?;
            let ledger_counts: Vec<String> = pvpatch::rewrite::ImagePlan::by_outcome(&plan)
                .iter()
                .zip(patch_sites::Outcome::ALL)
                .filter(|(n, _)| **n > 0)
                .map(|(n, o)| format!("{} {n}", o.name()))
                .collect();
            outln!(
                "{}: rewritten for {}: {}; {} detours installed, {} bytes of out-of-line code; \
                 written to {}",
                image.display(),
                plan.backend,
                ledger_counts.join(", "),
                plan.plan.detours.len(),
                plan.code_bytes,
                out.display()
            );
        }
        Command::Verify { image } => {
            let img = open(&image)?;
            let v = verify::verify(&img)?;
            for m in &v.mismatches {
                outln!("record {} at {}: {}", m.index, hex(m.addr), m.what);
            }
            for d in &v.detour_mismatches {
                outln!("detour {}: {}", d.index, d.what);
            }
            if v.detours > 0 {
                outln!(
                    "{} load-time detours: {} check (moved bytes, free cave, stub against the \
                     moved instructions), {} do not",
                    v.detours,
                    v.detours - v.detour_mismatches.len(),
                    v.detour_mismatches.len()
                );
            }
            if !v.placement_ok {
                outln!(
                    "the table at {} is not where a runtime looks for it",
                    hex(v.table_addr)
                );
            }
            if let Some(s) = &v.shim {
                for p in &s.problems {
                    outln!("boot shim: {p}");
                }
                outln!(
                    "boot shim at physical {} (the PVH entry), handing over to {}, its report \
                     page at {}: {}",
                    hex(s.phys),
                    hex(s.linux_entry),
                    hex(s.report),
                    if s.problems.is_empty() {
                        "checks"
                    } else {
                        "does not check"
                    }
                );
            }
            outln!(
                "{}: {} records at {}: {} match, {} do not, {} name ops this tool does not know",
                image.display(),
                v.sites,
                hex(v.table_addr),
                v.sites - v.mismatches.len() - v.unknown_ops,
                v.mismatches.len(),
                v.unknown_ops
            );
            if !v.ok() {
                return Err(Failure(
                    status::MISMATCH,
                    anyhow::anyhow!("verification failed"),
                ));
            }
        }
        Command::ExtractVmlinux {
            bzimage: bz,
            output,
            max_decompressed,
        } => {
            if same_file(&output, &bz) {
                return Err(OutputError::WouldOverwriteInput(output).into());
            }
            let bytes = read_input(&bz)?;
            let x = bzimage::extract_vmlinux(&bytes, max_decompressed)?;
            let (fmt, vmlinux) = (x.format, x.vmlinux);
            // Check it is an image this tool can read before writing it.
            Image::from_bytes(&output.display().to_string(), vmlinux.clone())?;
            write_output(&output, &vmlinux)?;
            outln!(
                "{}: {fmt} payload (checks: {}), {} bytes of ELF written to {}",
                bz.display(),
                x.checks.join(", "),
                vmlinux.len(),
                output.display()
            );
        }
    }
    Ok(())
}
