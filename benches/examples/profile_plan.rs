//! Plans an annotated kernel's table for `kvm` over and over, for instruction-level profiling of
//! the boot-time planner on the host:
//!
//! ```sh
//! cargo build --release -p pvpatch-benches --example profile_plan
//! valgrind --tool=callgrind target/release/examples/profile_plan KERNEL.annotated [ROUNDS]
//! callgrind_annotate callgrind.out.*
//! ```
//!
//! Instructions per site is what matters at boot where every kernel instruction is emulated
//! (this host's KVM); with enough rounds, iced-x86's one-time table set-up drops out.

use patch_sites::table::SiteTable;
use pvpatch_benches::{HostText, backend, sealed_table};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: profile_plan KERNEL.annotated [ROUNDS]")?;
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(500);
    let img = pvpatch::load::image::Image::open(std::path::Path::new(&path))?;
    let (tb, addr) = sealed_table(&img).ok_or("the kernel is not annotated")?;
    let code = img.code_ranges();
    let text = HostText::of(&img);
    let b = backend(pvpatch_runtime::detect::BackendKind::Kvm);
    let mut sites = 0;
    for _ in 0..rounds {
        let t = SiteTable::parse_contiguous(&tb, addr, &code)?;
        sites = t.len();
        let p = pvpatch_runtime::plan::plan(&t, &b, &text, None)
            .map_err(|e| format!("the plan is refused: {e}"))?;
        std::hint::black_box(p);
    }
    println!("{rounds} rounds of {sites} sites");
    Ok(())
}
