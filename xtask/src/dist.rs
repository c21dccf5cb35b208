//! `cargo xtask dist [--out DIR]`: what a packager installs beside the `pvpatch` binary, all made
//! from its one clap definition ([`pvpatch::cli::command`]):
//!
//! * `bin/pvpatch`, built in release mode;
//! * `completions/`: bash (`pvpatch.bash`), zsh (`_pvpatch`), fish (`pvpatch.fish`), elvish
//!   (`pvpatch.elv`) and PowerShell (`_pvpatch.ps1`);
//! * `man/man1/`: `pvpatch.1` and a page per command (`pvpatch-scan.1`, `pvpatch-rom-build.1`,
//!   ...), each with its examples and exit statuses as sections of their own.
//!
//! The default directory is `target/dist`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap_complete::Shell;
use roff::{Roff, bold, italic, roman};

use crate::util::{cargo, root, run};

/// Runs `cargo xtask dist`.
pub fn command(args: &[String]) -> Result<()> {
    let out = match args {
        [] => target_dir().join("dist"),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask dist [--out DIR]"),
    };
    run(cargo().args(["build", "--release", "--locked", "-p", "pvpatch"]))?;
    let bin = out.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| bin.display().to_string())?;
    let built = target_dir().join("release/pvpatch");
    std::fs::copy(&built, bin.join("pvpatch")).with_context(|| built.display().to_string())?;
    let files = generate(&out)?;
    println!("{}", bin.join("pvpatch").display());
    for f in &files {
        println!("{}", f.display());
    }
    println!(
        "\ninstall, e.g.: install -Dm755 {0}/bin/pvpatch /usr/local/bin/pvpatch; \
         cp {0}/man/man1/*.1 /usr/local/share/man/man1/; \
         cp {0}/completions/pvpatch.bash /etc/bash_completion.d/pvpatch",
        out.display()
    );
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Writes the completions and man pages under `out`; returns the files written.
pub fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [
        Shell::Bash,
        Shell::Zsh,
        Shell::Fish,
        Shell::Elvish,
        Shell::PowerShell,
    ] {
        let mut cmd = pvpatch::cli::command();
        let path = clap_complete::generate_to(shell, &mut cmd, "pvpatch", &completions)
            .with_context(|| format!("{shell} completions"))?;
        files.push(path);
    }
    let man = out.join("man/man1");
    std::fs::create_dir_all(&man)?;
    let mut cmd = pvpatch::cli::command();
    cmd.build();
    man_pages(&cmd, &mut Vec::new(), &man, &mut files)?;
    Ok(files)
}

/// The man page of `cmd` (at `path` under `pvpatch`) and of each of its commands.
fn man_pages(
    cmd: &clap::Command,
    path: &mut Vec<String>,
    dir: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<()> {
    let page = man_page(cmd, path)?;
    let name = std::iter::once("pvpatch")
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("-");
    let file = dir.join(format!("{name}.1"));
    std::fs::write(&file, page).with_context(|| file.display().to_string())?;
    files.push(file);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        path.push(sub.get_name().to_owned());
        man_pages(sub, path, dir, files)?;
        path.pop();
    }
    Ok(())
}

/// One man page: clap_mangen's sections (name, synopsis, description, options, commands), then
/// EXAMPLES and EXIT STATUS from the help's own tables, then SEE ALSO.
fn man_page(cmd: &clap::Command, path: &[String]) -> Result<Vec<u8>> {
    let keys: Vec<&str> = path.iter().map(String::as_str).collect();
    let (examples, statuses) = pvpatch::cli::examples_and_statuses(&keys)
        .with_context(|| format!("no examples for {keys:?}"))?;
    // Without the after-help (examples and statuses as text): they get sections of their own.
    let man = clap_mangen::Man::new(cmd.clone().after_help("").after_long_help(""))
        .manual("pvpatch manual")
        .source(format!("pvpatch {}", env!("CARGO_PKG_VERSION")));
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut page)?;
    }
    let mut roff = Roff::new();
    roff.control("SH", ["EXAMPLES"]);
    for (line, what) in examples {
        roff.control("TP", [])
            .text([bold(*line)])
            .text([roman(*what)]);
    }
    roff.control("SH", ["EXIT STATUS"]);
    for code in statuses {
        let meaning = pvpatch::cli::EXIT_STATUSES
            .iter()
            .find(|(c, _)| *c == code)
            .map_or("", |(_, m)| m);
        let label = code.map_or_else(|| "128+N".to_owned(), |c| c.to_string());
        roff.control("TP", [])
            .text([bold(label)])
            .text([roman(meaning)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut see: Vec<String> = Vec::new();
    if !path.is_empty() {
        see.push("pvpatch(1)".into());
    }
    see.extend(
        cmd.get_subcommands()
            .filter(|s| s.get_name() != "help")
            .map(|s| {
                let mut p = vec!["pvpatch"];
                p.extend(path.iter().map(String::as_str));
                p.push(s.get_name());
                format!("{}(1)", p.join("-"))
            }),
    );
    see.push("docs/ledger.md (the ledger), docs/shim.md (the boot shim)".into());
    roff.text([italic(see.join(", "))]);
    roff.to_writer(&mut page)?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn generated() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let files = generate(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        (dir, files)
    }

    fn sh(script: &str) -> String {
        let out = Command::new("bash")
            .args(["-c", script])
            .output()
            .unwrap_or_else(|e| panic!("bash: {e}"));
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn bash_completes_commands_and_options() {
        let (dir, _) = generated();
        let script = dir.path().join("completions/pvpatch.bash");
        // What bash's programmable completion offers after `pvpatch s<TAB>` and
        // `pvpatch scan --j<TAB>`, with the generated function.
        let complete = |words: &str, cword: usize| {
            sh(&format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; \
                 COMP_POINT=${{#COMP_LINE}}; _pvpatch pvpatch \"${{COMP_WORDS[$COMP_CWORD]}}\" \
                 \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
        };
        let commands = complete("pvpatch s", 1);
        assert!(commands.lines().any(|l| l == "scan"), "{commands}");
        let options = complete("pvpatch scan --j", 2);
        assert!(options.lines().any(|l| l == "--json"), "{options}");
        let colours = complete("pvpatch --color ", 2);
        assert!(colours.contains("never"), "{colours}");
    }

    #[test]
    fn man_pages_render_with_examples_and_exit_statuses() {
        let (dir, files) = generated();
        let man1 = dir.path().join("man/man1");
        for name in [
            "pvpatch",
            "pvpatch-scan",
            "pvpatch-verify",
            "pvpatch-rom-build",
        ] {
            let page = man1.join(format!("{name}.1"));
            assert!(files.contains(&page), "{name}.1 not generated");
            // Rendered by man-db (groff) as a reader sees it.
            let text = sh(&format!("MANWIDTH=100 man -l {} | col -b", page.display()));
            for heading in ["NAME", "SYNOPSIS", "EXAMPLES", "EXIT STATUS"] {
                assert!(
                    text.lines().any(|l| l.trim() == heading),
                    "{name}: no {heading}:\n{text}"
                );
            }
            assert!(text.contains("128+N"), "{name}");
            assert!(text.contains("pvpatch "), "{name}");
        }
        let scan = sh(&format!(
            "MANWIDTH=100 man -l {} | col -b",
            man1.join("pvpatch-scan.1").display()
        ));
        assert!(scan.contains("--threads"), "{scan}");
        assert!(
            scan.contains("pvpatch scan /boot/vmlinuz-$(uname -r)"),
            "{scan}"
        );
        // No help page for the help command, and every other command has one.
        assert!(!man1.join("pvpatch-help.1").exists());
        assert_eq!(
            std::fs::read_dir(&man1).map(|d| d.count()).unwrap_or(0),
            13,
            "pvpatch and its 12 commands"
        );
    }
}
