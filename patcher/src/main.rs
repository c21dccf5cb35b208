//! `pvpatch`: the post-link tool. Its command line, help and exit statuses are defined in
//! [`pvpatch::cli`] (`pvpatch help exit-codes` lists the statuses).
//!
//! Output: results go to standard output (`--json` for programs), errors, warnings and
//! `--verbose`'s notes to standard error; `--quiet` leaves only errors and the results asked
//! for as data. Colour only on a terminal, never with `NO_COLOR` (see [`pvpatch::cli::Colour`]).
//!
//! For tests only: `PVPATCH_TEST_WRITE_PAUSE_MS` makes every write pause that long once its
//! temporary file is complete, before it replaces the destination (to interrupt it there).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::FromArgMatches;
use pvpatch::ScanReport;
use pvpatch::annotate::{AnnotateError, AnnotateOptions, annotate};
use pvpatch::cli::{BackendArg, Cli, Colour, Command, KernelArg, RomCommand, ThreadsArg, status};
use pvpatch::ledger::{Ledger, hex};
use pvpatch::load::bzimage;
use pvpatch::load::image::{Image, ImageError};
use pvpatch::output::{OutputError, file_kind, same_file, write_bytes};
use pvpatch::rewrite::{BackendSpec, PlanLedger, RewriteError, apply_to_file, plan_image};
use pvpatch::summary::human_summary_with_counts;
use pvpatch::{catalogue, sweep, verify};
use serde_json::json;

/// How to speak: set once from the command line.
#[derive(Debug, Clone, Copy, Default)]
struct Ui {
    quiet: bool,
    verbose: bool,
    /// Whether standard output, and standard error, are coloured.
    colour_out: bool,
    colour_err: bool,
}

static UI: OnceLock<Ui> = OnceLock::new();

fn ui() -> Ui {
    UI.get().copied().unwrap_or_default()
}

/// `text` in the SGR style `sgr` (`"1;31"`: bold red) if `coloured`.
fn paint(coloured: bool, sgr: &str, text: &str) -> String {
    if coloured {
        format!("\x1b[{sgr}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

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

/// A line for people on standard output: not with `--quiet`.
macro_rules! say {
    ($($t:tt)*) => {{
        if !ui().quiet {
            outln!($($t)*);
        }
    }};
}

/// A note on what is being done, on standard error: only with `--verbose`.
macro_rules! note {
    ($($t:tt)*) => {{
        if ui().verbose {
            eprintln!("pvpatch: {}", format!($($t)*));
        }
    }};
}

/// A warning on standard error: not with `--quiet`.
fn warn(text: &str) {
    if !ui().quiet {
        eprintln!(
            "pvpatch: {} {text}",
            paint(ui().colour_err, "1;33", "warning:")
        );
    }
}

/// Prints `value` as pretty JSON on standard output, or into `output`.
fn print_json(
    output: Option<&Path>,
    input: &Path,
    value: &impl serde::Serialize,
) -> Result<(), Failure> {
    let mut s = serde_json::to_string_pretty(value).context("JSON")?;
    s.push('\n');
    emit(output, input, &s)
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

/// The colour asked for on the command line (`--color WHEN` or `--color=WHEN`), read before
/// parsing so that clap's own help and errors follow it.
fn colour_asked() -> Colour {
    let args: Vec<String> = std::env::args().collect();
    let value = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--color") {
            Some(v) if v.starts_with('=') => Some(v[1..].to_owned()),
            Some("") => args.get(i + 1).cloned(),
            _ => None,
        });
    match value.as_deref() {
        Some("always") => Colour::Always,
        Some("never") => Colour::Never,
        _ => Colour::Auto,
    }
}

fn main() -> ExitCode {
    let asked = colour_asked();
    let clap_colour = if asked.enabled(std::io::stdout().is_terminal()) {
        clap::ColorChoice::Always
    } else {
        clap::ColorChoice::Never
    };
    let matches = pvpatch::cli::command().color(clap_colour).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let _ = UI.set(Ui {
        quiet: cli.quiet,
        verbose: cli.verbose,
        colour_out: cli.color.enabled(std::io::stdout().is_terminal()),
        colour_err: cli.color.enabled(std::io::stderr().is_terminal()),
    });
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
            eprintln!(
                "pvpatch: {} {}",
                paint(ui().colour_err, "1;31", "error:"),
                bounded(&format!("{e:#}"))
            );
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
        warn(&format!(
            "{} is left from an interrupted pvpatch run (or one is writing it now); remove it \
             if none is running",
            p.display()
        ));
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

/// Opens the kernel an ELF file or a bzImage (extracted in memory), saying so with `--verbose`.
fn open_kernel(k: &KernelArg) -> Result<Image, Failure> {
    let t = Instant::now();
    let img = Image::open_kernel(&k.image, k.max_decompressed)?;
    match &img.bzimage {
        Some(b) => note!(
            "{}: a bzImage ({} bytes): its {} payload extracted in memory to a {}-byte ELF \
             vmlinux in {:.0} ms (checks: {})",
            k.image.display(),
            b.size,
            b.compression,
            img.bytes().len(),
            t.elapsed().as_secs_f64() * 1e3,
            b.checks.join(", ")
        ),
        None => note!(
            "{}: ELF, {} bytes, {} sections, {} function symbols ({}), loaded in {:.0} ms",
            k.image.display(),
            img.bytes().len(),
            img.sections.len(),
            img.symbols.len(),
            img.symbol_source.name(),
            t.elapsed().as_secs_f64() * 1e3
        ),
    }
    Ok(img)
}

/// Why an output of `annotate` or `rewrite` is an ELF vmlinux when the input is a bzImage.
const ELF_FROM_BZIMAGE: &str = "the input is a bzImage, so the output is an ELF vmlinux: the \
     table (and any rewrite) lives in the kernel's own sections, which a bzImage only holds \
     compressed; boot the vmlinux as a PVH kernel (QEMU -kernel, or Xen), or through the boot shim";

/// The destination of `annotate` or `rewrite`: `-o`, or the input with `--in-place`, which a
/// bzImage input refuses (an ELF vmlinux would replace the bzImage a boot loader expects).
fn destination(output: Option<&Path>, in_place: bool, img: &Image) -> Result<PathBuf, Failure> {
    let out = match (output, in_place) {
        (Some(o), _) => o.to_owned(),
        (None, true) if img.bzimage.is_some() => {
            return Err(Failure(
                status::USAGE,
                anyhow::anyhow!(
                    "{}: --in-place would replace a bzImage with an ELF vmlinux, which boot \
                     loaders that load bzImages cannot boot; write it elsewhere with -o",
                    img.path.display()
                ),
            ));
        }
        (None, true) => img.path.clone(),
        (None, false) => {
            return Err(Failure(
                status::USAGE,
                anyhow::anyhow!("give -o FILE or --in-place"),
            ));
        }
    };
    if !in_place && same_file(&out, &img.path) {
        return Err(OutputError::WouldOverwriteInput(out).into());
    }
    if img.bzimage.is_some() && !ui().quiet {
        eprintln!("pvpatch: note: {ELF_FROM_BZIMAGE}");
    }
    Ok(out)
}

/// Scans with a progress bar on a terminal, keeping every site (at most
/// [`pvpatch::MAX_KEPT_SITES`]).
fn scan_with_progress<'a>(
    image: &'a Image,
    threads: &ThreadsArg,
) -> Result<ScanReport<'a>, pvpatch::ScanError> {
    progress_scan(image, threads, |i, o, p| {
        pvpatch::scan_image_at_most(i, o, p, pvpatch::MAX_KEPT_SITES)
    })
}

/// Runs `scan` (keeping the sites or not) with a progress bar on a terminal.
fn progress_scan<'a, T>(
    image: &'a Image,
    threads: &ThreadsArg,
    scan: impl FnOnce(&'a Image, sweep::Options, Option<&(dyn Fn(u64) + Sync)>) -> T,
) -> T {
    let mut opts = sweep::Options::default();
    if let Some(t) = threads.threads {
        opts.threads = usize::from(t).max(1);
    }
    let total: u64 = image.exec_sections().map(|s| s.size).sum();
    note!(
        "sweeping {total} bytes of code in {} sections on {} threads",
        image.exec_sections().count(),
        opts.threads
    );
    let t = Instant::now();
    let r = progress_bar(total, |tick| scan(image, opts, tick));
    note!(
        "swept and analysed in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    r
}

/// Runs `work` with a progress bar over `total` bytes on a terminal (not with `--quiet`, and
/// only for work big enough to wait for).
fn progress_bar<T>(total: u64, work: impl FnOnce(Option<&(dyn Fn(u64) + Sync)>) -> T) -> T {
    if std::io::stderr().is_terminal() && !ui().quiet && total > 4 << 20 {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message("sweeping");
        let tick = |n: u64| bar.inc(n);
        let r = work(Some(&tick));
        bar.finish_and_clear();
        r
    } else {
        work(None)
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
            json,
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
            let shown = pvpatch::rom::show(&rom).ok();
            if json {
                let rom_json = shown.map(|s| s.json);
                print_json(
                    None,
                    &description,
                    &json!({ "output": output.display().to_string(), "rom": rom_json }),
                )?;
            } else if !ui().quiet {
                out!("{}", shown.map(|s| s.text).unwrap_or_default());
                outln!("written to {}", output.display());
            }
        }
        RomCommand::Show { rom, json } => {
            let bytes = read_input(&rom)?;
            let shown = pvpatch::rom::show(&bytes)
                .map_err(|e| Failure(status::INPUT, anyhow::anyhow!("{}: {e}", rom.display())))?;
            if json {
                print_json(None, &rom, &shown.json)?;
            } else if !ui().quiet {
                out!("{}", shown.text);
            }
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
        RomCommand::Sequences { json } => {
            let library = pvpatch::rom::library();
            let slots = |s: &pvpatch::rom::Sequence| -> Vec<String> {
                s.slots
                    .iter()
                    .map(|x| format!("{:?}@{}", x.kind, x.offset))
                    .collect()
            };
            if json {
                let list: Vec<_> = library
                    .iter()
                    .map(|s| {
                        json!({
                            "name": s.name,
                            "kind": if s.entry_point { "call" } else { "inline" },
                            "asm": s.asm,
                            "bytes": s.bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                            "slots": slots(s),
                        })
                    })
                    .collect();
                print_json(None, Path::new(""), &list)?;
            } else if !ui().quiet {
                for s in &library {
                    outln!(
                        "{:<14} {:<8} {:<20} {:02x?} {}",
                        s.name,
                        if s.entry_point { "call" } else { "inline" },
                        s.asm,
                        s.bytes,
                        slots(s).join(" ")
                    );
                }
            }
        }
    }
    Ok(())
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Help { topic } => {
            let text = if topic.is_empty() {
                let mut cmd = pvpatch::cli::command();
                let styled = cmd.render_long_help();
                if ui().colour_out {
                    styled.ansi().to_string()
                } else {
                    styled.to_string()
                }
            } else {
                pvpatch::cli::help_text(&topic, ui().colour_out).ok_or_else(|| {
                    Failure(
                        status::USAGE,
                        anyhow::anyhow!(
                            "no command or topic {}: `pvpatch help` lists the commands, \
                             `pvpatch help exit-codes` the exit statuses",
                            pvpatch::quoted(&topic.join(" "))
                        ),
                    )
                })?
            };
            out!("{text}");
        }
        Command::Ops { json } => {
            if json {
                print_json(None, Path::new(""), &catalogue::entries())?;
            } else {
                out!("{}", catalogue::render());
            }
        }
        Command::Rom { command } => rom_command(command)?,
        Command::Scan {
            kernel,
            json,
            output,
            threads,
        } => {
            let img = open_kernel(&kernel)?;
            // No site is kept: the ledger is written as each is analysed again.
            let report = progress_scan(&img, &threads, pvpatch::scan_image_streamed)?;
            let counts = pvpatch::sites::count(&report);
            if json {
                emit_with(output.as_deref(), &kernel.image, |w| {
                    serde_json::to_writer_pretty(&mut *w, &Ledger::with_counts(&report, &counts))?;
                    w.write_all(b"\n")
                })?;
            } else if output.is_some() || !ui().quiet {
                let text = human_summary_with_counts(&report, &counts);
                emit(output.as_deref(), &kernel.image, &text)?;
            }
        }
        Command::Annotate {
            kernel,
            output,
            in_place,
            force,
            sections,
            ledger,
            boot_shim,
            json,
            threads,
        } => {
            if let Some(s) = &boot_shim {
                regular_input(s)?;
            }
            let boot_shim = boot_shim
                .as_deref()
                .map(pvpatch::shim::Shim::load)
                .transpose()?;
            let image = &kernel.image;
            if let Some(l) = &ledger
                && same_file(l, image)
            {
                return Err(OutputError::WouldOverwriteInput(l.clone()).into());
            }
            let img = open_kernel(&kernel)?;
            let out = destination(output.as_deref(), in_place, &img)?;
            if let Some(l) = &ledger
                && same_file(l, &out)
            {
                return Err(Failure(
                    status::REFUSED,
                    anyhow::anyhow!("the ledger {} would overwrite the output", l.display()),
                ));
            }
            let report = scan_with_progress(&img, &threads)?;
            let ledger_text = match &ledger {
                Some(_) => {
                    let mut s =
                        serde_json::to_string_pretty(&Ledger::new(&report)).context("ledger")?;
                    s.push('\n');
                    Some(s)
                }
                None => None,
            };
            let t = Instant::now();
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
            let elapsed_ms = (report.elapsed + t.elapsed()).as_secs_f64() * 1e3;
            note!("annotated and written in {elapsed_ms:.0} ms");
            if json {
                print_json(
                    None,
                    image,
                    &json!({
                        "input": image.display().to_string(),
                        "output": out.display().to_string(),
                        "output_format": "elf",
                        "note": img.bzimage.as_ref().map(|_| ELF_FROM_BZIMAGE),
                        "sites": a.sites,
                        "from_macros": a.from_macros,
                        "from_scan": a.from_scan,
                        "table_address": hex(a.table_addr),
                        "table_size": a.table_size,
                        "boot_shim": a.shim.map(|(shim, report)| json!({
                            "address": hex(shim),
                            "report_page": hex(report),
                            "prepared_plans": a.prepared.iter().map(|n| match &n.outcome {
                                Ok((sites, bytes)) => json!({
                                    "backend": n.backend,
                                    "sites_rewritten": sites,
                                    "bytes_changed": bytes,
                                }),
                                Err(why) => json!({
                                    "backend": n.backend,
                                    "planned_at_boot_because": why,
                                }),
                            }).collect::<Vec<_>>(),
                        })),
                        "trailing_bytes": a.trailing,
                        "ledger": ledger.as_ref().map(|l| l.display().to_string()),
                    }),
                )?;
                return Ok(());
            }
            say!(
                "{}: {} sites recorded ({} from the image's macros, {} found by the sweep) in a \
                 {}-byte table at {}; written to {} in {:.0} ms",
                image.display(),
                a.sites,
                a.from_macros,
                a.from_scan,
                a.table_size,
                hex(a.table_addr),
                out.display(),
                elapsed_ms,
            );
            if let Some((shim, report)) = a.shim {
                say!(
                    "  boot shim at physical {} (the PVH entry now), its report page at {}",
                    hex(shim),
                    hex(report)
                );
                let made: Vec<String> = a
                    .prepared
                    .iter()
                    .filter_map(|n| {
                        let (sites, bytes) = n.outcome.as_ref().ok()?;
                        Some(format!("{} ({sites} sites, {bytes} bytes)", n.backend))
                    })
                    .collect();
                say!(
                    "  plans prepared at link time: {}; any other backend (a ROM) is planned at \
                     boot",
                    made.join(", ")
                );
                for n in &a.prepared {
                    if let Err(why) = &n.outcome {
                        say!("  {}: planned at boot ({why})", n.backend);
                    }
                }
            }
            if a.trailing > 0 {
                say!(
                    "  {} trailing bytes that no section covers were carried over",
                    a.trailing
                );
            }
        }
        Command::Plan {
            kernel,
            backend,
            json,
            output,
            threads,
        } => {
            let spec = backend_spec(&backend)?;
            let img = open_kernel(&kernel)?;
            let report = scan_with_progress(&img, &threads)?;
            let plan = plan_image(&report, &spec)?;
            let ledger = PlanLedger::new(&report, &plan);
            if json {
                print_json(output.as_deref(), &kernel.image, &ledger)?;
            } else if output.is_some() || !ui().quiet {
                emit(output.as_deref(), &kernel.image, &ledger.human())?;
            }
        }
        Command::Rewrite {
            kernel,
            backend,
            output,
            in_place,
            json,
            threads,
        } => {
            let spec = backend_spec(&backend)?;
            let img = open_kernel(&kernel)?;
            let out = destination(output.as_deref(), in_place, &img)?;
            let from_bzimage = img.bzimage.is_some();
            let report = scan_with_progress(&img, &threads)?;
            let plan = plan_image(&report, &spec)?;
            let bytes = apply_to_file(&img, &plan)?;
            drop(report);
            drop(img);
            write_output(&out, &bytes)?;
            let outcomes: Vec<(&str, u32)> = pvpatch::rewrite::ImagePlan::by_outcome(&plan)
                .iter()
                .zip(patch_sites::Outcome::ALL)
                .filter(|(n, _)| **n > 0)
                .map(|(n, o)| (o.name(), *n))
                .collect();
            if json {
                let by_outcome: serde_json::Map<String, serde_json::Value> = outcomes
                    .iter()
                    .map(|(o, n)| ((*o).to_owned(), json!(n)))
                    .collect();
                print_json(
                    None,
                    &kernel.image,
                    &json!({
                        "input": kernel.image.display().to_string(),
                        "output": out.display().to_string(),
                        "output_format": "elf",
                        "note": from_bzimage.then_some(ELF_FROM_BZIMAGE),
                        "backend": plan.backend,
                        "sites_by_outcome": by_outcome,
                        "detours": plan.plan.detours.len(),
                        "code_bytes": plan.code_bytes,
                    }),
                )?;
                return Ok(());
            }
            let counts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
            say!(
                "{}: rewritten for {}: {}; {} detours installed, {} bytes of out-of-line code; \
                 written to {}",
                kernel.image.display(),
                plan.backend,
                counts.join(", "),
                plan.plan.detours.len(),
                plan.code_bytes,
                out.display()
            );
        }
        Command::Verify { kernel, json } => verify_command(&kernel, json)?,
        Command::Report {
            dump,
            tsc_khz,
            json,
        } => {
            let bytes = read_input(&dump)?;
            let shown = pvpatch::shim::show_report(&bytes, tsc_khz)
                .map_err(|e| Failure(status::INPUT, anyhow::anyhow!("{}: {e}", dump.display())))?;
            if json {
                print_json(None, &dump, &shown.json)?;
            } else if !ui().quiet {
                out!("{}", shown.text);
            }
        }
        Command::ExtractVmlinux {
            bzimage: bz,
            output,
            max_decompressed,
            json,
        } => {
            if same_file(&output, &bz) {
                return Err(OutputError::WouldOverwriteInput(output).into());
            }
            let bytes = read_input(&bz)?;
            let t = Instant::now();
            let x = bzimage::extract_vmlinux(&bytes, max_decompressed)?;
            note!(
                "{}: decompressed in {:.0} ms",
                bz.display(),
                t.elapsed().as_secs_f64() * 1e3
            );
            let (fmt, vmlinux) = (x.format, x.vmlinux);
            // Check it is an image this tool can read before writing it.
            Image::from_bytes(&output.display().to_string(), vmlinux.clone())?;
            write_output(&output, &vmlinux)?;
            if json {
                print_json(
                    None,
                    &bz,
                    &json!({
                        "input": bz.display().to_string(),
                        "output": output.display().to_string(),
                        "compression": fmt,
                        "checks": x.checks,
                        "size": vmlinux.len(),
                    }),
                )?;
            } else {
                say!(
                    "{}: {fmt} payload (checks: {}), {} bytes of ELF written to {}",
                    bz.display(),
                    x.checks.join(", "),
                    vmlinux.len(),
                    output.display()
                );
            }
        }
    }
    Ok(())
}

/// The backend `--backend` and `--rom` name.
fn backend_spec(b: &BackendArg) -> Result<BackendSpec, Failure> {
    let rom = b.rom.as_deref().map(read_input).transpose()?;
    Ok(BackendSpec::new(&b.backend, rom)?)
}

/// `pvpatch verify`.
fn verify_command(kernel: &KernelArg, json: bool) -> Result<(), Failure> {
    let img = open_kernel(kernel)?;
    let t = Instant::now();
    let v = verify::verify(&img)?;
    note!("verified in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    let matching = v.sites - v.mismatches.len() - v.unknown_ops;
    if json {
        print_json(
            None,
            &kernel.image,
            &json!({
                "image": kernel.image.display().to_string(),
                "ok": v.ok(),
                "table_address": hex(v.table_addr),
                "table_placement_ok": v.placement_ok,
                "records": v.sites,
                "matching": matching,
                "unknown_ops": v.unknown_ops,
                "mismatches": v.mismatches.iter().map(|m| json!({
                    "index": m.index,
                    "address": hex(m.addr),
                    "what": m.what,
                })).collect::<Vec<_>>(),
                "detours": v.detours,
                "detour_mismatches": v.detour_mismatches.iter().map(|d| json!({
                    "index": d.index,
                    "what": d.what,
                })).collect::<Vec<_>>(),
                "boot_shim": v.shim.as_ref().map(|s| json!({
                    "address": hex(s.phys),
                    "linux_entry": hex(s.linux_entry),
                    "report_page": hex(s.report),
                    "prepared_plans": s.prepared,
                    "problems": s.problems,
                })),
            }),
        )?;
    } else if !ui().quiet {
        let (c, bad) = (ui().colour_out, "1;31");
        for m in &v.mismatches {
            outln!(
                "{} record {} at {}: {}",
                paint(c, bad, "mismatch:"),
                m.index,
                hex(m.addr),
                m.what
            );
        }
        for d in &v.detour_mismatches {
            outln!(
                "{} detour {}: {}",
                paint(c, bad, "mismatch:"),
                d.index,
                d.what
            );
        }
        if v.detours > 0 {
            outln!(
                "{} load-time detours: {} check (moved bytes, free cave, stub against the moved \
                 instructions), {} do not",
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
                "boot shim at physical {} (the PVH entry), handing over to {}, its report page \
                 at {}: {}",
                hex(s.phys),
                hex(s.linux_entry),
                hex(s.report),
                if s.problems.is_empty() {
                    paint(c, "32", "checks")
                } else {
                    paint(c, bad, "does not check")
                }
            );
            if !s.prepared.is_empty() {
                outln!(
                    "boot shim: plans prepared at link time for {}",
                    s.prepared.join(", ")
                );
            }
        }
        let do_not = format!("{} do not", v.mismatches.len());
        outln!(
            "{}: {} records at {}: {} match, {}, {} name ops this tool does not know",
            kernel.image.display(),
            v.sites,
            hex(v.table_addr),
            paint(c, "32", &matching.to_string()),
            if v.mismatches.is_empty() {
                do_not
            } else {
                paint(c, bad, &do_not)
            },
            v.unknown_ops
        );
    }
    if !v.ok() {
        return Err(Failure(
            status::MISMATCH,
            anyhow::anyhow!("verification failed"),
        ));
    }
    Ok(())
}
