//! The files `pvpatch` writes and reads: outputs that are not regular files are written, never
//! replaced; `--in-place` follows a link; a refused command writes nothing; an interrupted one
//! leaves no temporary file, and one a killed run left is named; an input that is not a
//! regular file is refused at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn pvpatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pvpatch"))
}

fn write_sample(dir: &Path) -> PathBuf {
    let p = dir.join("sample.elf");
    std::fs::write(&p, pvpatch_testkit::elf::sample()).unwrap();
    p
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pvpatch-") && n.ends_with(".tmp"))
        .collect();
    v.sort();
    v
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for `child` at most `secs` seconds; kills it (and fails) if it is still running.
fn wait_at_most(mut child: Child, secs: u64, what: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success());
}

#[test]
fn scan_to_dev_stdout_writes_standard_output_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let stdout = Path::new("/dev/stdout");
    let before = std::fs::symlink_metadata(stdout).unwrap();
    let link_before = std::fs::read_link(stdout).ok();
    let out = pvpatch()
        .args(["scan", "--json", "-o", "/dev/stdout"])
        .arg(&img)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let after = std::fs::symlink_metadata(stdout).unwrap();
    assert_eq!(
        (after.file_type(), after.ino(), after.mode()),
        (before.file_type(), before.ino(), before.mode()),
        "/dev/stdout was replaced"
    );
    assert_eq!(std::fs::read_link(stdout).ok(), link_before);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], pvpatch::ledger::LEDGER_SCHEMA);
}

#[test]
fn dev_null_is_written_and_stays_a_character_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let null = Path::new("/dev/null");
    let before = std::fs::symlink_metadata(null).unwrap();
    assert!(before.file_type().is_char_device());
    for args in [
        &["scan", "-o", "/dev/null"][..],
        &["annotate", "-o", "/dev/null"],
    ] {
        let out = pvpatch().args(args).arg(&img).output().unwrap();
        let after = std::fs::symlink_metadata(null).unwrap();
        assert!(after.file_type().is_char_device(), "{args:?}: replaced");
        assert_eq!((after.ino(), after.rdev()), (before.ino(), before.rdev()));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_fifo_output_is_written_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let fifo = dir.path().join("out.fifo");
    mkfifo(&fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = fifo.clone();
    std::thread::spawn(move || tx.send(std::fs::read(&reader)));
    let out = pvpatch()
        .args(["scan", "--json", "-o"])
        .arg(&fifo)
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let meta = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(meta.file_type().is_fifo(), "the FIFO was replaced");
    let read = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("nothing was written into the FIFO")
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&read).unwrap();
    assert_eq!(v["schema"], pvpatch::ledger::LEDGER_SCHEMA);
    assert!(temp_files(dir.path()).is_empty());
}

#[test]
fn in_place_through_a_symlink_keeps_the_link_and_replaces_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let link = dir.path().join("link.elf");
    std::os::unix::fs::symlink("sample.elf", &link).unwrap();
    let out = pvpatch()
        .args(["annotate", "--in-place"])
        .arg(&link)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("sample.elf"));
    // The target is the annotated image.
    let out = pvpatch().arg("verify").arg(&img).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(temp_files(dir.path()).is_empty());

    // `-o` through a link writes its target too.
    let report = dir.path().join("report.txt");
    std::fs::write(&report, "old").unwrap();
    let report_link = dir.path().join("report.link");
    std::os::unix::fs::symlink(&report, &report_link).unwrap();
    let out = pvpatch()
        .args(["scan", "-o"])
        .arg(&report_link)
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        std::fs::symlink_metadata(&report_link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_ne!(std::fs::read_to_string(&report).unwrap(), "old");
}

#[test]
fn a_refused_annotate_writes_no_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let annotated = dir.path().join("a.elf");
    let out = pvpatch()
        .arg("annotate")
        .arg(&img)
        .arg("-o")
        .arg(&annotated)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ledger = dir.path().join("l.json");
    let again = dir.path().join("b.elf");
    let annotate_again = |extra: &[&str]| {
        pvpatch()
            .arg("annotate")
            .arg(&annotated)
            .arg("-o")
            .arg(&again)
            .arg("--ledger")
            .arg(&ledger)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = annotate_again(&[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(!ledger.exists(), "the refused annotate wrote its ledger");
    assert!(!again.exists());

    // With --force it is written, after the image.
    let out = annotate_again(&["--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(ledger.exists() && again.exists());
    assert!(temp_files(dir.path()).is_empty());
}

/// Starts a write that pauses with its temporary file complete, waits for that file, sends
/// `signal`, and checks the command exits with `status`, leaving nothing behind.
fn interrupt(signal: &str, status: i32, args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let original = std::fs::read(&img).unwrap();
    let mut cmd = pvpatch();
    cmd.args(args)
        .arg(&img)
        .current_dir(dir.path())
        .env("PVPATCH_TEST_WRITE_PAUSE_MS", "30000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    while temp_files(dir.path()).is_empty() {
        if start.elapsed() > Duration::from_secs(20) {
            let out = wait_at_most(child, 1, "the write");
            panic!(
                "{args:?}: no temporary file appeared (exit {:?}): {}",
                out.status,
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = wait_at_most(child, 20, "the interrupted write");
    assert_eq!(
        out.status.code(),
        Some(status),
        "{args:?} {signal}: {:?}: {}",
        out.status,
        stderr(&out)
    );
    assert_eq!(temp_files(dir.path()), Vec::<String>::new(), "{args:?}");
    assert!(!dir.path().join("out").exists(), "{args:?}");
    assert_eq!(std::fs::read(&img).unwrap(), original, "{args:?}");
}

#[test]
fn sigterm_mid_write_leaves_no_temporary_file() {
    interrupt("TERM", 143, &["scan", "--json", "-o", "out"]);
    interrupt("TERM", 143, &["annotate", "--in-place"]);
}

#[test]
fn sigint_mid_write_leaves_no_temporary_file() {
    interrupt("INT", 130, &["scan", "-o", "out"]);
    interrupt("INT", 130, &["rewrite", "--backend", "kvm", "--in-place"]);
}

#[test]
fn a_stale_temporary_file_is_named_in_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let stale = dir.path().join(".pvpatch-Kq3xYz.tmp");
    std::fs::write(&stale, b"half a file").unwrap();
    for (args, dest) in [
        (&["scan", "-o"][..], "summary.txt"),
        (&["annotate", "-o"], "a.elf"),
    ] {
        let out = pvpatch()
            .args(args)
            .arg(dir.path().join(dest))
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("warning") && err.contains(".pvpatch-Kq3xYz.tmp"),
            "{args:?}: {err}"
        );
        // Named, not removed.
        assert!(stale.exists());
    }
    // Nothing to say where there is none.
    let other = tempfile::tempdir().unwrap();
    let out = pvpatch()
        .arg("scan")
        .arg("-o")
        .arg(other.path().join("s.txt"))
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn fifo_and_directory_inputs_exit_3_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = write_sample(dir.path());
    let fifo = dir.path().join("in.fifo");
    mkfifo(&fifo);
    let d = dir.path().join("a-directory");
    std::fs::create_dir(&d).unwrap();
    let out_path = dir.path().join("out");
    for (input, kind) in [(&fifo, "FIFO"), (&d, "directory")] {
        let cases: Vec<Vec<&std::ffi::OsStr>> = vec![
            vec!["scan".as_ref(), input.as_os_str()],
            vec!["verify".as_ref(), input.as_os_str()],
            vec!["report".as_ref(), input.as_os_str()],
            vec![
                "annotate".as_ref(),
                input.as_os_str(),
                "-o".as_ref(),
                out_path.as_os_str(),
            ],
            vec![
                "extract-vmlinux".as_ref(),
                input.as_os_str(),
                "-o".as_ref(),
                out_path.as_os_str(),
            ],
            vec!["rom".as_ref(), "show".as_ref(), input.as_os_str()],
            vec![
                "rom".as_ref(),
                "build".as_ref(),
                input.as_os_str(),
                "-o".as_ref(),
                out_path.as_os_str(),
            ],
            vec![
                "plan".as_ref(),
                img.as_os_str(),
                "--backend".as_ref(),
                "rom".as_ref(),
                "--rom".as_ref(),
                input.as_os_str(),
            ],
            vec![
                "annotate".as_ref(),
                img.as_os_str(),
                "-o".as_ref(),
                out_path.as_os_str(),
                "--boot-shim".as_ref(),
                input.as_os_str(),
            ],
        ];
        for args in cases {
            let child = pvpatch()
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = wait_at_most(child, 20, &format!("{args:?}"));
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
            assert!(
                err.contains(kind) && err.contains("not a regular file"),
                "{args:?}: {err}"
            );
            assert!(!out_path.exists(), "{args:?}");
        }
    }
}
