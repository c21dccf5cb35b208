//! The backend's out-of-line code in a stock kernel: a published ROM, or the out-of-line test
//! backend's thunks, copied into the arena the site table names (`int3` padding inside the
//! kernel's text, where Linux keeps code executable). The same steps for the boot shim and for
//! `pvpatch rewrite`: the ROM validated against the table, the arena checked to be free padding
//! and large enough, and one [`CodeWrite`] that the plan applies with its sites.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use patch_sites::Rom;
use patch_sites::table::{AddrRange, SiteTable};

use crate::detect::BackendKind;
use crate::plan::{CodeWrite, TextRead};
use crate::romcheck::{self, RomRefusal};
use crate::thunks::{self, Thunks};

/// Why a backend's code cannot go into the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArenaError {
    /// The backend needs out-of-line code and the table names no arena.
    NoArena,
    /// The code is larger than the arena.
    TooLarge {
        /// Bytes of code.
        need: usize,
        /// Bytes of arena.
        have: u64,
    },
    /// The arena cannot be read, or is not `int3` padding (the text is not the one the table
    /// was made for).
    NotPadding(u64),
    /// The ROM does not parse.
    BadRom(patch_sites::RomError),
    /// The runtime refuses the ROM for this table.
    RomRefused(RomRefusal),
    /// The thunks could not be assembled.
    Thunks,
}

impl fmt::Display for ArenaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArenaError::NoArena => f.write_str(
                "the backend needs out-of-line code, and the table names no arena (only stock \
                 kernels have one)",
            ),
            ArenaError::TooLarge { need, have } => {
                write!(f, "{need} bytes of code do not fit the arena's {have}")
            }
            ArenaError::NotPadding(a) => {
                write!(f, "the arena at {a:#x} is not int3 padding")
            }
            ArenaError::BadRom(e) => write!(f, "the ROM is invalid: {e}"),
            ArenaError::RomRefused(e) => write!(f, "the ROM is refused: {e}"),
            ArenaError::Thunks => f.write_str("the thunks could not be assembled"),
        }
    }
}

impl core::error::Error for ArenaError {}

/// What goes into the arena, and where.
#[derive(Debug, Default)]
pub struct ArenaCode<'a> {
    /// The ROM, parsed from the bytes given (its code runs from [`ArenaCode::base`]).
    pub rom: Option<Rom<'a>>,
    /// The generated thunks (they run where [`Thunks::base`] says: the arena).
    pub thunks: Option<Thunks>,
    /// Where the code runs.
    pub base: u64,
    /// The copy into the arena, to be applied with the plan (and only if a site calls it).
    pub write: Option<CodeWrite>,
}

/// Checks that `len` bytes of `arena` are free `int3` padding in `text`; returns them.
fn free(arena: Option<AddrRange>, len: usize, text: &dyn TextRead) -> Result<Vec<u8>, ArenaError> {
    let a = arena.ok_or(ArenaError::NoArena)?;
    if len as u64 > a.end - a.start {
        return Err(ArenaError::TooLarge {
            need: len,
            have: a.end - a.start,
        });
    }
    let mut old = vec![0u8; len];
    if !text.read(a.start, &mut old) || old.iter().any(|&b| b != 0xcc) {
        return Err(ArenaError::NotPadding(a.start));
    }
    Ok(old)
}

/// The code `kind` needs in `table`'s arena: for `rom`, the ROM `rom_bytes` (validated for the
/// hypervisor `signature` and the table); for `outofline`, the thunks for every shape of site
/// (read through `text`); nothing for the others.
pub fn prepare<'a>(
    table: &SiteTable<'_>,
    kind: BackendKind,
    rom_bytes: Option<&'a [u8]>,
    signature: &[u8; 12],
    text: &dyn TextRead,
) -> Result<ArenaCode<'a>, ArenaError> {
    let arena = table.arena();
    let base = arena.map_or(0, |a| a.start);
    match kind {
        BackendKind::OutOfLine => {
            let a = arena.ok_or(ArenaError::NoArena)?;
            let t = thunks::generate(table, a.start, text).map_err(|_| ArenaError::Thunks)?;
            let old = free(arena, t.code.len(), text)?;
            Ok(ArenaCode {
                write: Some(CodeWrite {
                    addr: a.start,
                    old,
                    new: t.code.clone(),
                }),
                thunks: Some(t),
                rom: None,
                base,
            })
        }
        BackendKind::Rom => {
            let bytes = rom_bytes.unwrap_or(&[]);
            let rom = Rom::parse(bytes).map_err(ArenaError::BadRom)?;
            romcheck::validate(&rom, signature, table).map_err(ArenaError::RomRefused)?;
            let old = free(arena, bytes.len(), text)?;
            Ok(ArenaCode {
                write: Some(CodeWrite {
                    addr: base,
                    old,
                    new: bytes.to_vec(),
                }),
                rom: Some(rom),
                thunks: None,
                base,
            })
        }
        _ => Ok(ArenaCode {
            base,
            ..ArenaCode::default()
        }),
    }
}
