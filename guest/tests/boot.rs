//! Boots the guest under QEMU (TCG) and checks what it reports.

use pvguest::harness::{self, Qemu};

#[test]
fn guest_boots_and_validates_its_own_site_table() {
    if let Err(why) = harness::qemu_available() {
        return harness::skip("guest_boots_and_validates_its_own_site_table", &why);
    }
    let elf = harness::build_guest().expect("guest builds");
    let boot = Qemu::tcg().boot(&elf).expect("QEMU runs");
    assert!(
        boot.passed(),
        "exit {:?}\nserial:\n{}\nstderr:\n{}",
        boot.exit_code,
        boot.serial,
        boot.stderr
    );
    assert!(
        boot.serial.contains("pvguest: site table valid:"),
        "{}",
        boot.serial
    );
    let n: usize = boot
        .serial
        .split("site table valid: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a site count");
    assert!(n > 0);
}
