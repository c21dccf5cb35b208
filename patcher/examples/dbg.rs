fn main() {
    let p = std::env::args().nth(1).unwrap();
    let img = pvpatch::load::Image::open(std::path::Path::new(&p)).unwrap();
    let r = pvpatch::scan_image(&img, Default::default(), None);
    for (i, d) in r.analysis.detours.iter().enumerate().skip(129).take(4) {
        println!(
            "{i}: moved {:x}+{} stub {:x}+{} tramp {:x?} members {:?}",
            d.start,
            d.len,
            d.stub_addr,
            d.stub.len(),
            d.trampoline.as_ref().map(|t| t.0),
            d.members
                .iter()
                .map(|&m| r.analysis.sites[m].found.addr)
                .map(|a| format!("{a:x}"))
                .collect::<Vec<_>>()
        );
    }
}
