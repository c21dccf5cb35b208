//! What a newcomer meets: help with examples and exit statuses, `pvpatch help exit-codes`,
//! `--json` on every command that prints a result, `--threads`, `--quiet`/`--verbose`, and
//! colour only on a terminal and never with `NO_COLOR`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::cli::{fake_bzimage, write_sample};

const ESC: &str = "\x1b[";

fn pvpatch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pvpatch"));
    c.env_remove("NO_COLOR").env_remove("TERM");
    c
}

fn run(args: &[&str]) -> Output {
    pvpatch().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", stdout(o), stderr(o)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every command's help, `-h` and `--help`, as `pvpatch help CMD` gives it too.
#[test]
fn every_command_has_examples_and_exit_statuses() {
    let commands: &[&[&str]] = &[
        &[],
        &["scan"],
        &["annotate"],
        &["plan"],
        &["rewrite"],
        &["verify"],
        &["report"],
        &["extract-vmlinux"],
        &["ops"],
        &["rom"],
        &["rom", "build"],
        &["rom", "show"],
        &["rom", "sequences"],
        &["help"],
    ];
    for cmd in commands {
        for flag in ["-h", "--help"] {
            let mut args = cmd.to_vec();
            args.push(flag);
            let out = run(&args);
            assert_eq!(out.status.code(), Some(0), "{args:?}");
            let text = stdout(&out);
            let examples = text
                .split("Examples:")
                .nth(1)
                .unwrap_or_else(|| panic!("{args:?} has no examples:\n{text}"));
            // Two or three examples, each a pvpatch command line.
            let lines = examples
                .lines()
                .take_while(|l| !l.starts_with("Exit status:"))
                .filter(|l| l.trim_start().starts_with("pvpatch "))
                .count();
            assert!((2..=3).contains(&lines), "{args:?}: {lines} examples");
            assert!(text.contains("Exit status:"), "{args:?}");
            for code in ["0  success", "2  bad command line", "70  internal error"] {
                assert!(text.contains(code), "{args:?} lacks {code:?}");
            }
            assert!(!text.contains(ESC), "{args:?}: colour in a pipe");
        }
        if !cmd.is_empty() {
            let mut args = vec!["help"];
            args.extend_from_slice(cmd);
            let via_help = run(&args);
            let mut long = cmd.to_vec();
            long.push("--help");
            assert_eq!(stdout(&via_help), stdout(&run(&long)), "{args:?}");
        }
    }
    // The top-level help is `pvpatch help`, and it mentions the statuses a command may return.
    let top = run(&["help"]);
    assert_eq!(top.status.code(), Some(0));
    assert!(stdout(&top).contains("Examples:") && stdout(&top).contains("128+N"));
    let verify = stdout(&run(&["verify", "--help"]));
    assert!(verify.contains("4  verify: a record does not match"));
}

#[test]
fn help_exit_codes_lists_every_status_and_matches_the_documentation() {
    let out = run(&["help", "exit-codes"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ledger.md"))
            .unwrap();
    for code in ["0", "2", "3", "4", "5", "6", "70", "128+N"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{code}  "))),
            "{code} missing:\n{text}"
        );
        let doc = if code == "128+N" { "128 + N" } else { code };
        assert!(
            docs.contains(&format!("| {doc} |")),
            "docs/ledger.md has no row for {code}"
        );
    }
    let bad = run(&["help", "no-such-thing"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("pvpatch help exit-codes"));
    assert_eq!(run(&["scan"]).status.code(), Some(2));
}

/// A temporary directory with the sample image, annotated, as ELF and as a bzImage.
struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
    elf: PathBuf,
    annotated: PathBuf,
    bz: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let elf = write_sample(&root);
    let annotated = root.join("annotated");
    assert!(
        run(&["annotate", "-q", s(&elf), "-o", s(&annotated)])
            .status
            .success()
    );
    let bz = root.join("vmlinuz");
    std::fs::write(&bz, fake_bzimage("gzip", &std::fs::read(&elf).unwrap())).unwrap();
    Files {
        _dir: dir,
        root,
        elf,
        annotated,
        bz,
    }
}

#[test]
fn every_command_that_prints_a_result_prints_json() {
    let f = files();
    let out = |name: &str| f.root.join(name);
    let ops = json(&run(&["ops", "--json"]));
    assert!(ops.as_array().unwrap().len() > 20);
    assert!(ops[0]["name"].is_string() && ops[0]["id"].is_u64());

    let annotated = json(&run(&[
        "annotate",
        "--json",
        s(&f.elf),
        "-o",
        s(&out("a2")),
    ]));
    assert_eq!(annotated["output"], s(&out("a2")));
    assert!(annotated["sites"].as_u64().unwrap() > 0);
    assert_eq!(annotated["note"], Value::Null);

    let verified = json(&run(&["verify", "--json", s(&f.annotated)]));
    assert_eq!(verified["ok"], true);
    assert_eq!(verified["records"], verified["matching"]);
    assert_eq!(verified["mismatches"], serde_json::json!([]));
    // A record that does not match: the image's code changed under its table.
    let mut bytes = std::fs::read(&f.annotated).unwrap();
    let img = pvpatch::load::Image::from_bytes("a", bytes.clone()).unwrap();
    let text = img.section(".text").unwrap();
    let off = text.offset as usize;
    bytes[off..off + text.size as usize].fill(0x90);
    std::fs::write(out("broken"), &bytes).unwrap();
    let broken = run(&["verify", "--json", s(&out("broken"))]);
    assert_eq!(broken.status.code(), Some(4));
    let v = json(&broken);
    assert_eq!(v["ok"], false);
    assert!(!v["mismatches"].as_array().unwrap().is_empty());
    assert!(
        v["mismatches"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("0x")
    );

    let rewritten = json(&run(&[
        "rewrite",
        "--json",
        "--backend",
        "kvm",
        s(&f.annotated),
        "-o",
        s(&out("kvm")),
    ]));
    assert_eq!(rewritten["backend"], "kvm");
    assert!(
        rewritten["sites_by_outcome"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    );

    let extracted = json(&run(&[
        "extract-vmlinux",
        "--json",
        s(&f.bz),
        "-o",
        s(&out("vmlinux")),
    ]));
    assert_eq!(extracted["compression"], "gzip");
    assert_eq!(
        extracted["size"].as_u64(),
        Some(std::fs::metadata(&f.elf).unwrap().len())
    );

    // A report page as the shim leaves it, and bytes that are not one.
    let mut report = patch_sites::shim::Report {
        status: patch_sites::shim::Status::Patched,
        sites: 12,
        rewritten: 3,
        cycles_total: 26_000,
        ..Default::default()
    };
    patch_sites::shim::set_text(&mut report.backend, "kvm");
    let mut page = vec![0u8; 4096];
    report.write(&mut page).unwrap();
    std::fs::write(out("report.bin"), &page).unwrap();
    let shown = json(&run(&[
        "report",
        "--json",
        "--tsc-khz",
        "2600",
        s(&out("report.bin")),
    ]));
    assert_eq!(
        (
            &shown["status"],
            &shown["backend"],
            &shown["sites"],
            &shown["rewritten"],
            &shown["microseconds"]
        ),
        (
            &Value::from("patched"),
            &Value::from("kvm"),
            &Value::from(12),
            &Value::from(3),
            &Value::from(10_000)
        )
    );
    let not_a_report = run(&["report", s(&f.elf)]);
    assert_eq!(not_a_report.status.code(), Some(3));
    assert!(stderr(&not_a_report).contains("no report"));

    let sequences = json(&run(&["rom", "sequences", "--json"]));
    assert!(
        sequences
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["bytes"].is_string())
    );
    let desc = out("rom.toml");
    std::fs::write(
        &desc,
        "name = \"json\"\nsignature = \"any\"\n[[entry]]\nop = \"io_delay\"\nkind = \"nothing\"\n",
    )
    .unwrap();
    let built = json(&run(&[
        "rom",
        "build",
        "--json",
        s(&desc),
        "-o",
        s(&out("rom")),
    ]));
    assert_eq!(built["rom"]["name"], "json");
    let shown = json(&run(&["rom", "show", "--json", s(&out("rom"))]));
    assert_eq!(shown["entries"][0]["op"], "io_delay");
    assert_eq!(shown["entries"][0]["action"], "nothing");
    assert_eq!(shown["accepted"], true);
}

#[test]
fn quiet_prints_only_data_and_verbose_says_what_it_does() {
    let f = files();
    let quiet_verify = run(&["verify", "-q", s(&f.annotated)]);
    assert_eq!(quiet_verify.status.code(), Some(0));
    assert_eq!(stdout(&quiet_verify), "");
    assert_eq!(stderr(&quiet_verify), "");
    let quiet_annotate = run(&["annotate", "--quiet", s(&f.bz), "-o", s(&f.root.join("q"))]);
    assert!(quiet_annotate.status.success());
    assert_eq!(stdout(&quiet_annotate), "");
    assert_eq!(stderr(&quiet_annotate), "", "the bzImage note is not quiet");
    // Data asked for is still printed.
    let quiet_json = run(&["scan", "-q", "--json", s(&f.elf)]);
    assert!(json(&quiet_json)["sites"].is_array());
    // Errors are never quiet.
    let missing = run(&["scan", "-q", "/nonexistent/kernel"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(stderr(&missing).contains("error:"));
    assert_eq!(run(&["scan", "-q", "-v", s(&f.elf)]).status.code(), Some(2));

    let verbose = run(&["scan", "--verbose", s(&f.bz)]);
    let said = stderr(&verbose);
    assert!(
        said.contains("a bzImage") && said.contains("gzip payload extracted in memory"),
        "{said}"
    );
    assert!(
        said.contains("sweeping") && said.contains("threads"),
        "{said}"
    );
    assert!(stdout(&verbose).contains("function symbols"));
}

#[test]
fn threads_change_nothing_but_the_work_split() {
    let f = files();
    let one = run(&["scan", "--json", "-j", "1", s(&f.elf)]);
    let two = run(&["scan", "--json", "--threads", "2", s(&f.elf)]);
    assert!(one.status.success() && two.status.success());
    assert!(json(&one) == json(&two));
    for cmd in ["scan", "annotate", "plan", "rewrite"] {
        let help = stdout(&run(&[cmd, "--help"]));
        assert!(help.contains("--threads <N>"), "{cmd}");
    }
    assert_eq!(run(&["scan", "-j", "0", s(&f.elf)]).status.code(), Some(2));
}

/// Runs `pvpatch ARGS` on a pseudo-terminal (util-linux `script`), with `env`.
fn on_a_terminal(args: &str, env: &[(&str, &str)]) -> String {
    let mut c = Command::new("script");
    c.args([
        "-qec",
        &format!("{} {args}", env!("CARGO_BIN_EXE_pvpatch")),
        "/dev/null",
    ])
    .env_remove("NO_COLOR")
    .env("TERM", "xterm");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let f = files();
    let verify = format!("verify {}", s(&f.annotated));
    let missing = "scan /nonexistent/kernel";
    // On a terminal: coloured.
    assert!(on_a_terminal(&verify, &[]).contains(ESC));
    assert!(on_a_terminal(missing, &[]).contains(&format!("{ESC}1;31merror:")));
    assert!(
        on_a_terminal("--help", &[]).contains(ESC),
        "clap's help follows"
    );
    // NO_COLOR, TERM=dumb, --color never: not.
    for (args, env) in [
        (verify.as_str(), &[("NO_COLOR", "1")][..]),
        (missing, &[("NO_COLOR", "1")][..]),
        ("--help", &[("NO_COLOR", "1")][..]),
        (verify.as_str(), &[("TERM", "dumb")][..]),
        (&format!("--color never {verify}"), &[][..]),
    ] {
        let text = on_a_terminal(args, env);
        assert!(!text.contains(ESC), "{args} {env:?}: {text:?}");
    }
    // NO_COLOR set but empty is not set.
    assert!(on_a_terminal(&verify, &[("NO_COLOR", "")]).contains(ESC));
    // In a pipe: not, unless asked; and never with NO_COLOR, even when asked.
    let piped = run(&["verify", s(&f.annotated)]);
    assert!(!stdout(&piped).contains(ESC));
    let asked = run(&["--color", "always", "verify", s(&f.annotated)]);
    assert!(stdout(&asked).contains(ESC));
    let refused = pvpatch()
        .args(["--color=always", "verify", s(&f.annotated)])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!stdout(&refused).contains(ESC));
}
