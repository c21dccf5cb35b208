//! A minimal initramfs for booting a real Linux kernel in tests: `/dev/console` and a static
//! `/init` of a few instructions that writes [`MARKER`] to its standard output (the console)
//! and ends QEMU through `isa-debug-exit` with the pass status (33); should `ioperm` fail, it
//! powers the machine off instead, which QEMU reports as exit status 0. The staying variant
//! ([`initramfs_staying`]) waits forever after the marker instead, so that a test can read the
//! machine's memory through QEMU's monitor before it ends QEMU.

/// What `/init` prints.
pub const MARKER: &str = "PVPATCH-INIT-OK";

/// The static x86-64 ELF executable run as `/init`.
pub fn init_elf() -> Vec<u8> {
    init_elf_with(false)
}

/// `/init`, ending QEMU after the marker, or (`stay`) pausing forever.
fn init_elf_with(stay: bool) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const CODE_OFF: usize = 64 + 56;
    let msg = format!("{MARKER}\n");
    let mut code: Vec<u8> = Vec::new();
    // write(1, msg, len)
    code.extend_from_slice(&[0xb8, 1, 0, 0, 0]); // mov eax, 1
    code.extend_from_slice(&[0xbf, 1, 0, 0, 0]); // mov edi, 1
    let lea_at = code.len();
    code.extend_from_slice(&[0x48, 0x8d, 0x35, 0, 0, 0, 0]); // lea rsi, [rip + msg]
    code.push(0xba); // mov edx, len
    code.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x05]); // syscall
    if stay {
        // pause(), forever.
        code.extend_from_slice(&[0xb8, 34, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7]);
    }
    // ioperm(0xf4, 4, 1)
    code.extend_from_slice(&[0xb8, 173, 0, 0, 0]);
    code.extend_from_slice(&[0xbf, 0xf4, 0, 0, 0]);
    code.extend_from_slice(&[0xbe, 4, 0, 0, 0]);
    code.extend_from_slice(&[0xba, 1, 0, 0, 0]);
    code.extend_from_slice(&[0x0f, 0x05]);
    // test eax, eax; jnz poweroff (skip the out if ioperm failed)
    code.extend_from_slice(&[0x85, 0xc0]);
    code.extend_from_slice(&[0x75, 7]);
    // mov eax, 0x10; out 0xf4, eax   -> QEMU exits with (0x10 << 1) | 1 = 33
    code.extend_from_slice(&[0xb8, 0x10, 0, 0, 0]);
    code.extend_from_slice(&[0xe7, 0xf4]);
    // reboot(LINUX_REBOOT_MAGIC1, MAGIC2, LINUX_REBOOT_CMD_POWER_OFF)
    code.extend_from_slice(&[0xb8, 169, 0, 0, 0]);
    code.push(0xbf);
    code.extend_from_slice(&0xfee1_deadu32.to_le_bytes());
    code.push(0xbe);
    code.extend_from_slice(&0x2812_1969u32.to_le_bytes());
    code.push(0xba);
    code.extend_from_slice(&0x4321_fedcu32.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x05]);
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp .
    let msg_at = code.len();
    code.extend_from_slice(msg.as_bytes());
    let disp = (msg_at as i32) - (lea_at as i32 + 7);
    code[lea_at + 3..lea_at + 7].copy_from_slice(&disp.to_le_bytes());

    let total = (CODE_OFF + code.len()) as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + CODE_OFF as u64).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&56u16.to_le_bytes());
    e.extend_from_slice(&1u16.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0u64.to_le_bytes()); // offset
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(&code);
    e
}

fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A newc cpio archive with `/dev`, `/dev/console` and `/init`.
pub fn initramfs() -> Vec<u8> {
    archive(&init_elf())
}

/// The same, with an `/init` that stays after the marker.
pub fn initramfs_staying() -> Vec<u8> {
    archive(&init_elf_with(true))
}

fn archive(init: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    cpio_entry(&mut out, 1, "dev", 0o040_755, (0, 0), &[]);
    cpio_entry(&mut out, 2, "dev/console", 0o020_600, (5, 1), &[]);
    cpio_entry(&mut out, 3, "init", 0o100_755, (0, 0), init);
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}
