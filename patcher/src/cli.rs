//! The `pvpatch` command line: its arguments, its help (examples and exit statuses for every
//! command) and its exit statuses, defined once here for the binary, `pvpatch help`, and the
//! man page and shell completions `cargo xtask dist` generates.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::load::bzimage;

/// Exit statuses.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Bad command line.
    pub const USAGE: u8 = 2;
    /// Unreadable or malformed input.
    pub const INPUT: u8 = 3;
    /// Verification found records that do not match (or a ROM the runtime would refuse).
    pub const MISMATCH: u8 = 4;
    /// Refused: already annotated, or the output would overwrite the input.
    pub const REFUSED: u8 = 5;
    /// The output could not be written.
    pub const OUTPUT: u8 = 6;
    /// Internal error.
    pub const INTERNAL: u8 = 70;
}

/// Every exit status with what it means: `(status, meaning)`; `None` is 128 + a signal's number.
pub const EXIT_STATUSES: [(Option<u8>, &str); 8] = [
    (Some(status::OK), "success"),
    (Some(status::USAGE), "bad command line"),
    (
        Some(status::INPUT),
        "the input cannot be read, is not a regular file, is neither an x86-64 ELF image nor a \
         bzImage, is malformed, is a bzImage whose payload fails a check or would decompress \
         past --max-decompressed, or cannot safely be rewritten; report: the dump does not \
         start with a shim's report",
    ),
    (
        Some(status::MISMATCH),
        "verify: a record does not match the code, the table is misplaced or invalid, or the \
         image is not annotated; rom show: the runtime would refuse an entry of the ROM",
    ),
    (
        Some(status::REFUSED),
        "refused: the image is already annotated (use --force), or the output would overwrite \
         the input (use --in-place)",
    ),
    (Some(status::OUTPUT), "the output cannot be written"),
    (
        Some(status::INTERNAL),
        "internal error (a bug: please report it)",
    ),
    (
        None,
        "interrupted by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP): the temporary files \
         being written were removed, no output was replaced",
    ),
];

/// The exit statuses, as `pvpatch help exit-codes` prints them: `only` those (every one if
/// empty), each meaning wrapped to `width` columns.
pub fn exit_statuses_text(only: &[u8], width: usize) -> String {
    let mut o = String::new();
    for (code, meaning) in EXIT_STATUSES {
        if !only.is_empty() && code.is_some_and(|c| !only.contains(&c)) {
            continue;
        }
        let label = code.map_or_else(|| "128+N".to_owned(), |c| c.to_string());
        let mut first = true;
        for line in wrap(meaning, width.saturating_sub(9).max(20)) {
            let l = if first { label.as_str() } else { "" };
            o.push_str(&format!("  {l:>5}  {line}\n"));
            first = false;
        }
    }
    o
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let Some(last) = lines.last_mut() else { break };
        if !last.is_empty() && last.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

/// When to colour the output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Colour {
    // On a terminal, unless `NO_COLOR` is set (to anything but the empty string) or `TERM` is
    // `dumb`.
    #[default]
    Auto,
    // Always, unless `NO_COLOR` is set.
    Always,
    // Never.
    Never,
}

impl Colour {
    /// Whether to colour a stream that `is_terminal` or not, given the environment.
    pub fn enabled(self, is_terminal: bool) -> bool {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        !no_color
            && match self {
                Colour::Always => true,
                Colour::Never => false,
                Colour::Auto => is_terminal && !dumb,
            }
    }
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "pvpatch",
    version,
    about = "Find, classify, annotate and rewrite the sensitive instructions of x86-64 kernel \
             images",
    long_about = "Find, classify, annotate and rewrite the sensitive instructions of x86-64 \
                  kernel images (cli/sti, pushf/popf, control registers, MSRs, ports, invlpg, \
                  hlt, cpuid, ...), so that a boot-time runtime rewrites them for the \
                  hypervisor it finds. The input is an ELF vmlinux or a bzImage \
                  (/boot/vmlinuz-*), told apart by content.",
    disable_help_subcommand = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Print only errors, and the results asked for as data (--json, -o).
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    pub quiet: bool,
    /// Also say what is being done and how long it took (on standard error).
    #[arg(short, long, global = true, help_heading = "Global options")]
    pub verbose: bool,
    /// Colour: auto (on a terminal, unless TERM=dumb), always, never; never when NO_COLOR is
    /// set.
    #[arg(
        long,
        global = true,
        value_name = "WHEN",
        default_value = "auto",
        help_heading = "Global options"
    )]
    pub color: Colour,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The kernel a command reads.
#[derive(Debug, Args)]
pub struct KernelArg {
    /// The kernel: an ELF vmlinux (or any x86-64 ELF executable), or a bzImage
    /// (/boot/vmlinuz-*), whose vmlinux is extracted in memory.
    pub image: PathBuf,
    /// For a bzImage: refuse a payload that would decompress to more than SIZE (bytes, or a
    /// number with K, M, G or T: powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = bzimage::parse_size)]
    pub max_decompressed: u64,
}

/// The backend `plan` and `rewrite` plan for.
#[derive(Debug, Args)]
pub struct BackendArg {
    /// The backend: native, tcg, kvm, vmware, xen, hyperv, rom (with --rom), outofline.
    #[arg(long)]
    pub backend: String,
    /// The ROM, for the rom backend.
    #[arg(long)]
    pub rom: Option<PathBuf>,
}

/// How many threads parallel work may use.
#[derive(Debug, Args)]
pub struct ThreadsArg {
    /// Worker threads for the sweep (default: every core).
    #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Find and classify every sensitive instruction; print a summary, or the ledger as JSON.
    Scan {
        #[command(flatten)]
        kernel: KernelArg,
        /// Print the ledger (docs/ledger.md; docs/ledger.schema.json) as JSON instead of the
        /// summary.
        #[arg(long)]
        json: bool,
        /// Write the output to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        threads: ThreadsArg,
    },
    /// Write a site table into a new section of the image.
    Annotate {
        #[command(flatten)]
        kernel: KernelArg,
        /// The annotated image to write (an ELF vmlinux, also for a bzImage input).
        #[arg(short, long, required_unless_present = "in_place")]
        output: Option<PathBuf>,
        /// Replace the input file (atomically; not for a bzImage).
        #[arg(long)]
        in_place: bool,
        /// Replace the table of an already annotated image.
        #[arg(long)]
        force: bool,
        /// Record swept sites only in this executable section (repeatable; default: all).
        #[arg(long = "section", value_name = "NAME")]
        sections: Vec<String>,
        /// Also write the ledger of the input to this file.
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
        /// Put the boot shim (the ELF `cargo xtask shim` builds) in front of the kernel's PVH
        /// entry: it rewrites the kernel for the backend it finds at every boot (docs/shim.md).
        #[arg(long, value_name = "SHIM")]
        boot_shim: Option<PathBuf>,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        threads: ThreadsArg,
    },
    /// What one backend makes of every site: planned by the boot-time runtime's own planner.
    Plan {
        #[command(flatten)]
        kernel: KernelArg,
        #[command(flatten)]
        backend: BackendArg,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Write the output to this file (atomically) instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        threads: ThreadsArg,
    },
    /// Apply one backend's plan to the image file itself (offline specialisation).
    Rewrite {
        #[command(flatten)]
        kernel: KernelArg,
        #[command(flatten)]
        backend: BackendArg,
        /// The rewritten image to write (an ELF vmlinux, also for a bzImage input).
        #[arg(short, long, required_unless_present = "in_place")]
        output: Option<PathBuf>,
        /// Replace the input file (atomically; not for a bzImage).
        #[arg(long)]
        in_place: bool,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        threads: ThreadsArg,
    },
    /// Check that every record of an annotated image's table lands on the instruction it names.
    Verify {
        #[command(flatten)]
        kernel: KernelArg,
        /// Print the verdict and every mismatch as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read what the boot shim did from its report page, dumped from the guest's memory
    /// (QEMU's monitor: `pmemsave ADDR 4096 "FILE"`, ADDR as `pvpatch verify` prints it).
    Report {
        /// The dump: the report page from its first byte (at least its first 256 bytes).
        dump: PathBuf,
        /// The TSC's rate in kHz (the `tsc_early_khz=` Linux was given, or the host's): the
        /// time in microseconds too.
        #[arg(long, value_name = "KHZ")]
        tsc_khz: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
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
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the op catalogue: every sensitive operation, its native form and its contract.
    Ops {
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Backend ROMs: build one from a description, show one, list the sequences.
    Rom {
        /// What to do with ROMs.
        #[command(subcommand)]
        command: RomCommand,
    },
    /// Help on a command (`pvpatch help scan`), or on the exit statuses (`pvpatch help
    /// exit-codes`).
    Help {
        /// A command (`scan`, `rom build`, ...) or `exit-codes`.
        topic: Vec<String>,
    },
}

/// The ROM commands.
#[derive(Debug, Subcommand)]
pub enum RomCommand {
    /// Assemble a ROM from a description (TOML), checked as the runtime will check it.
    Build {
        /// The description.
        description: PathBuf,
        /// Where to write the ROM.
        #[arg(short, long)]
        output: PathBuf,
        /// Also check it against every site of this (annotated) kernel.
        #[arg(long = "for", value_name = "KERNEL")]
        kernel: Option<PathBuf>,
        /// Print the ROM written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a ROM, checked entry by entry as the runtime checks it.
    Show {
        /// The ROM.
        rom: PathBuf,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the sequences descriptions can name.
    Sequences {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A command's examples (`(command line, what it does)`) and the exit statuses it can return
/// besides 0, 2, 70 and 128+N, which every command can.
struct Help {
    path: &'static [&'static str],
    examples: ExampleList,
    statuses: &'static [u8],
}

const HELP: &[Help] = &[
    Help {
        path: &[],
        examples: &[
            (
                "pvpatch scan /boot/vmlinuz-$(uname -r)",
                "what the running kernel's sensitive instructions are, by class and section",
            ),
            (
                "pvpatch annotate vmlinux -o vmlinux.pv --boot-shim shim.elf",
                "annotate a kernel and put the boot shim in front of its PVH entry",
            ),
            (
                "pvpatch verify vmlinux.pv",
                "check every record of the table against the code",
            ),
        ],
        statuses: &[
            status::INPUT,
            status::MISMATCH,
            status::REFUSED,
            status::OUTPUT,
        ],
    },
    Help {
        path: &["scan"],
        examples: &[
            (
                "pvpatch scan /boot/vmlinuz-$(uname -r)",
                "a bzImage: its vmlinux is extracted in memory, then scanned",
            ),
            (
                "pvpatch scan vmlinux --json -o ledger.json",
                "the ledger of every site (docs/ledger.md), written atomically",
            ),
            (
                "pvpatch scan vmlinux --json | jq '.summary'",
                "the counts alone",
            ),
        ],
        statuses: &[status::INPUT, status::REFUSED, status::OUTPUT],
    },
    Help {
        path: &["annotate"],
        examples: &[
            (
                "pvpatch annotate vmlinux -o vmlinux.annotated",
                "write the site table into a new section",
            ),
            (
                "pvpatch annotate /boot/vmlinuz-$(uname -r) -o vmlinux.pv --boot-shim shim.elf",
                "a bzImage in, an ELF vmlinux with the boot shim out (boot it as a PVH kernel)",
            ),
            (
                "pvpatch annotate vmlinux --in-place --force --ledger ledger.json",
                "replace the table of an annotated image in place, and keep the ledger",
            ),
        ],
        statuses: &[status::INPUT, status::REFUSED, status::OUTPUT],
    },
    Help {
        path: &["plan"],
        examples: &[
            (
                "pvpatch plan vmlinux.annotated --backend kvm",
                "what the KVM backend makes of each site: inline, call, native, refused",
            ),
            (
                "pvpatch plan vmlinux --backend rom --rom backend.rom --json -o plan.json",
                "a ROM's plan for every site, as JSON",
            ),
        ],
        statuses: &[status::INPUT, status::REFUSED, status::OUTPUT],
    },
    Help {
        path: &["rewrite"],
        examples: &[
            (
                "pvpatch rewrite vmlinux.annotated --backend xen -o vmlinux.xen",
                "specialise a kernel for Xen offline",
            ),
            (
                "pvpatch rewrite vmlinux --backend rom --rom backend.rom --in-place",
                "apply a ROM's plan to the file itself",
            ),
        ],
        statuses: &[status::INPUT, status::REFUSED, status::OUTPUT],
    },
    Help {
        path: &["verify"],
        examples: &[
            (
                "pvpatch verify vmlinux.annotated",
                "every record against the instruction it names",
            ),
            (
                "pvpatch verify vmlinux.pv --json | jq .ok",
                "the verdict for a script",
            ),
        ],
        statuses: &[status::INPUT, status::MISMATCH],
    },
    Help {
        path: &["report"],
        examples: &[
            (
                "pvpatch report report.bin",
                "what the shim did: status, backend, sites rewritten, cycles, and why not if \
                 nothing was",
            ),
            (
                "pvpatch report report.bin --json --tsc-khz 2600000 | jq .microseconds",
                "the same for a script, with the shim's time in microseconds",
            ),
        ],
        statuses: &[status::INPUT],
    },
    Help {
        path: &["extract-vmlinux"],
        examples: &[
            (
                "pvpatch extract-vmlinux /boot/vmlinuz-$(uname -r) -o vmlinux",
                "the ELF vmlinux inside a bzImage, every check the image allows passed",
            ),
            (
                "pvpatch extract-vmlinux vmlinuz --max-decompressed 256M -o vmlinux",
                "with a tighter cap on what the payload may decompress to",
            ),
        ],
        statuses: &[status::INPUT, status::REFUSED, status::OUTPUT],
    },
    Help {
        path: &["ops"],
        examples: &[
            ("pvpatch ops", "the catalogue as a table"),
            (
                "pvpatch ops --json | jq '.[] | select(.kind == \"insn\") | .name'",
                "the names of the instruction ops",
            ),
        ],
        statuses: &[],
    },
    Help {
        path: &["rom"],
        examples: &[
            (
                "pvpatch rom sequences",
                "the sequences a description can name",
            ),
            (
                "pvpatch rom build backend.toml -o backend.rom --for vmlinux.annotated",
                "assemble a ROM and check it against a kernel's sites",
            ),
            (
                "pvpatch rom show backend.rom",
                "print a ROM as the runtime sees it",
            ),
        ],
        statuses: &[
            status::INPUT,
            status::MISMATCH,
            status::REFUSED,
            status::OUTPUT,
        ],
    },
    Help {
        path: &["rom", "build"],
        examples: &[
            (
                "pvpatch rom build backend.toml -o backend.rom",
                "assemble and check a ROM",
            ),
            (
                "pvpatch rom build backend.toml -o backend.rom --for vmlinux.annotated",
                "also check it against every site of a kernel",
            ),
        ],
        statuses: &[status::INPUT, status::REFUSED, status::OUTPUT],
    },
    Help {
        path: &["rom", "show"],
        examples: &[
            (
                "pvpatch rom show backend.rom",
                "each entry, and why the runtime would refuse it",
            ),
            (
                "pvpatch rom show backend.rom --json | jq '.refused'",
                "the entries it would refuse",
            ),
        ],
        statuses: &[status::INPUT, status::MISMATCH],
    },
    Help {
        path: &["rom", "sequences"],
        examples: &[
            (
                "pvpatch rom sequences",
                "name, kind, assembly, bytes, slots",
            ),
            ("pvpatch rom sequences --json", "the same, as JSON"),
        ],
        statuses: &[],
    },
    Help {
        path: &["help"],
        examples: &[
            ("pvpatch help scan", "this help for `scan`"),
            (
                "pvpatch help exit-codes",
                "every exit status and what it means",
            ),
        ],
        statuses: &[],
    },
];

/// The examples of the command at `path` (`[]` for `pvpatch`, `["rom", "build"]`), as
/// `(command line, what it does)`, and the exit statuses it can return, 0, 2, 70 and 128+N
/// included (`None` for 128+N).
pub fn examples_and_statuses(path: &[&str]) -> Option<(ExampleList, Vec<Option<u8>>)> {
    let h = HELP.iter().find(|h| h.path == path)?;
    let codes = EXIT_STATUSES
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| c.is_none_or(|c| statuses_of(h).contains(&c)))
        .collect();
    Some((h.examples, codes))
}

/// A command's examples: `(command line, what it does)`.
pub type ExampleList = &'static [(&'static str, &'static str)];

/// The statuses `h`'s command can return: 0, 2 and 70 besides its own.
fn statuses_of(h: &Help) -> Vec<u8> {
    let mut codes = vec![status::OK, status::USAGE];
    codes.extend_from_slice(h.statuses);
    codes.push(status::INTERNAL);
    codes
}

/// The text after a command's options: its examples and its exit statuses.
fn after_help(h: &Help) -> String {
    let mut o = String::from("Examples:\n");
    for (line, what) in h.examples {
        o.push_str(&format!("  {line}\n      {what}\n"));
    }
    o.push_str("\nExit status:\n");
    o.push_str(&exit_statuses_text(&statuses_of(h), 92));
    if !h.path.is_empty() {
        o.push_str("\n`pvpatch help exit-codes` explains every status.");
    }
    o
}

/// The command line's definition, with each command's examples and exit statuses: what the
/// binary parses, and what the man page and completions are made from.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for h in HELP {
        cmd = with_help(cmd, h.path, &after_help(h));
    }
    cmd
}

fn with_help(cmd: clap::Command, path: &[&str], text: &str) -> clap::Command {
    match path {
        [] => cmd.after_help(text.to_owned()),
        [first, rest @ ..] => {
            let name = (*first).to_owned();
            cmd.mut_subcommand(name, |c| with_help(c, rest, text))
        }
    }
}

/// What `pvpatch help TOPIC...` prints: the exit statuses, or a command's help (`None` if
/// `topic` names no command), with terminal styles if `styled`.
pub fn help_text(topic: &[String], styled: bool) -> Option<String> {
    if matches!(topic, [t] if t == "exit-codes" || t == "exit-status") {
        return Some(format!(
            "Exit statuses of pvpatch (every command):\n\n{}",
            exit_statuses_text(&[], 100)
        ));
    }
    // Exactly what `pvpatch TOPIC... --help` prints: clap answers `--help` with an "error" that
    // holds the help, and anything else (a topic that names no command) with another kind.
    let args = std::iter::once("pvpatch")
        .chain(topic.iter().map(String::as_str))
        .chain(["--help"]);
    match command().try_get_matches_from(args) {
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => Some(if styled {
            e.render().ansi().to_string()
        } else {
            e.render().to_string()
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn every_command_has_examples_that_parse() {
        let cmd = command();
        for sub in cmd.get_subcommands() {
            let mut paths = vec![vec![sub.get_name()]];
            paths.extend(
                sub.get_subcommands()
                    .map(|s| vec![sub.get_name(), s.get_name()]),
            );
            for p in paths {
                assert!(
                    HELP.iter().any(|h| h.path == p.as_slice()),
                    "{p:?} has no examples"
                );
            }
        }
        for h in HELP {
            assert!(
                h.examples.len() >= 2,
                "{:?}: fewer than two examples",
                h.path
            );
            for (line, _) in h.examples {
                // The command line as a shell would split it, before any pipe.
                let line = line.replace("$(uname -r)", "6.1.0-1-amd64");
                let words: Vec<&str> = line
                    .split(" | ")
                    .next()
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect();
                if let Err(e) = command().try_get_matches_from(&words) {
                    panic!("example {line:?} does not parse: {e}");
                }
            }
        }
    }

    #[test]
    fn help_topics() {
        let codes = help_text(&["exit-codes".into()], false).unwrap_or_default();
        for (code, _) in EXIT_STATUSES {
            let label = code.map_or_else(|| "128+N".to_owned(), |c| c.to_string());
            assert!(
                codes.lines().any(|l| l.trim_start().starts_with(&label)),
                "{label} missing:\n{codes}"
            );
        }
        let rom_build = help_text(&["rom".into(), "build".into()], false).unwrap_or_default();
        assert!(rom_build.contains("pvpatch rom build backend.toml"));
        assert!(help_text(&["nothing".into()], false).is_none());
    }

    #[test]
    fn wrapping_keeps_every_word() {
        let text = "a bb ccc dddd eeeee ffffff";
        let lines = wrap(text, 7);
        assert!(lines.iter().all(|l| l.len() <= 7), "{lines:?}");
        assert_eq!(lines.join(" "), text);
    }
}
