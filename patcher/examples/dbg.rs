fn main() {
    let p = std::env::args().nth(1).unwrap();
    let img = pvpatch::load::Image::open(std::path::Path::new(&p)).unwrap();
    let r = pvpatch::scan_image(&img, Default::default(), None);
    let pads = pvpatch::analyse::caves::runs(&img, &r.analysis.guards, &r.sweep, 5, false);
    println!("{} runs >=5", pads.len());
    for c in pads
        .iter()
        .filter(|c| c.start > 0xffffffff8103e700 && c.start < 0xffffffff8103e800)
    {
        println!("{:x}-{:x}", c.start, c.end);
    }
    let s = r
        .analysis
        .sites
        .iter()
        .find(|s| s.found.addr == 0xffffffff8103e740)
        .unwrap();
    println!("{:?}", s.room);
}
