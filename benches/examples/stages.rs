//! Times each stage of the post-link pipeline on one image, in process, best of N rounds:
//!
//! ```sh
//! cargo run --release -p pvpatch-benches --example stages -- VMLINUX [ROUNDS]
//! ```

use std::time::{Duration, Instant};

fn best<T>(rounds: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let t = Instant::now();
    let mut out = f();
    let mut best = t.elapsed();
    for _ in 1..rounds {
        let t = Instant::now();
        out = f();
        best = best.min(t.elapsed());
    }
    (best, out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: stages VMLINUX [ROUNDS]")?;
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(5);
    let path = std::path::Path::new(&path);
    let (open, img) = best(rounds, || pvpatch::load::image::Image::open(path));
    let img = img?;
    let (tables, t) = best(rounds, || pvpatch::linux::read(&img));
    let mut known: Vec<u64> = t.starts.iter().map(|s| s.0).collect();
    known.extend(img.symbols.iter().map(|s| s.addr));
    known.sort_unstable();
    known.dedup();
    let (sweep, s) = best(rounds, || {
        pvpatch::sweep::sweep(&img, &known, Default::default(), None)
    });
    let (analysis, _) = best(rounds, || pvpatch::analyse::analyse(&img, &t, &s));
    let (scan, report) = best(rounds, || {
        pvpatch::scan_image(&img, Default::default(), None)
    });
    let spec = pvpatch::rewrite::BackendSpec::new("outofline", None)?;
    let (plan, _) = best(rounds, || pvpatch::rewrite::plan_image(&report, &spec));
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("annotated");
    let (annotate, _) = best(rounds, || {
        pvpatch::annotate::annotate(&report, &out, &Default::default())
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("open (ELF, kallsyms): {:>8.1} ms", ms(open));
    println!("Linux's tables:       {:>8.1} ms", ms(tables));
    println!("sweep:                {:>8.1} ms", ms(sweep));
    println!("analysis:             {:>8.1} ms", ms(analysis));
    println!("scan (tables..analysis): {:>5.1} ms", ms(scan));
    println!("plan outofline:       {:>8.1} ms", ms(plan));
    println!("annotate (write):     {:>8.1} ms", ms(annotate));
    Ok(())
}
