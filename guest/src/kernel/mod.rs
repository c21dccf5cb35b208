//! The kernel proper (only built for `x86_64-unknown-none`).

mod console;

use core::fmt::Write;

use patch_sites::table::{AddrRange, HEADER_SIZE};
use patch_sites::{pv_out, pv_site_table_header};

use console::Console;

core::arch::global_asm!(include_str!("../boot.s"), options(att_syntax));
pv_site_table_header!();

unsafe extern "C" {
    static pvpatch_site_table: [u8; HEADER_SIZE];
    static __text_start: u8;
    static __text_end: u8;
}

/// QEMU's `isa-debug-exit` port: writing `v` makes QEMU exit with status `(v << 1) | 1`.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Written on success: QEMU exits with 33.
pub const EXIT_PASS: u32 = 0x10;
/// Written on failure: QEMU exits with 35.
pub const EXIT_FAIL: u32 = 0x11;

/// Leaves QEMU with `code`.
pub fn exit(code: u32) -> ! {
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit device; writing it ends the VM.
    unsafe { pv_out!(u32, dx DEBUG_EXIT_PORT, code) };
    loop {
        core::hint::spin_loop();
    }
}

#[unsafe(no_mangle)]
extern "C" fn kmain(_start_info: u32) -> ! {
    let mut con = Console::new();
    let _ = writeln!(con, "pvguest: booted");
    // SAFETY: the header symbol comes from `pv_site_table_header!` and the records from the
    // linker script's `pv_sites` section, both part of the loaded kernel image; the text bounds
    // are the linker's.
    let result = unsafe {
        let text = AddrRange::new(&raw const __text_start as u64, &raw const __text_end as u64);
        pvpatch_runtime::locate::table_at(pvpatch_site_table.as_ptr(), &[text])
            .map(|t| (t.len(), t.unknown_ops()))
    };
    match result {
        Ok((n, unknown)) if n > 0 => {
            let _ = writeln!(
                con,
                "pvguest: site table valid: {n} sites, {unknown} unknown ops"
            );
            exit(EXIT_PASS)
        }
        Ok(_) => {
            let _ = writeln!(con, "pvguest: site table is empty");
            exit(EXIT_FAIL)
        }
        Err(e) => {
            let _ = writeln!(con, "pvguest: site table invalid: {e}");
            exit(EXIT_FAIL)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(Console::new(), "pvguest: panic: {info}");
    exit(EXIT_FAIL)
}
