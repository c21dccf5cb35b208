//! The boot shim's work on the host, for instruction-level profiling: an annotated kernel's
//! table parsed and planned for a backend (with the arena's code) over and over.
//!
//! ```sh
//! cargo build --release -p pvpatch-benches --example profile_shim_plan
//! valgrind --tool=callgrind target/release/examples/profile_shim_plan VMLINUX BACKEND [ROUNDS]
//! ```

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: profile_shim_plan VMLINUX BACKEND [ROUNDS]")?;
    let backend = args.next().unwrap_or_else(|| "outofline".into());
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(10);
    let img = pvpatch::load::image::Image::open(std::path::Path::new(&path))?;
    let report = pvpatch::scan_image(&img, Default::default(), None);
    let spec = pvpatch::rewrite::BackendSpec::new(&backend, None)?;
    let mut n = 0;
    for _ in 0..rounds {
        n = pvpatch::rewrite::plan_image(&report, &spec)?
            .plan
            .sites
            .len();
    }
    println!("{n} sites planned {rounds} times for {backend}");
    Ok(())
}
