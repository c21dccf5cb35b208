//! Extracting the ELF `vmlinux` from an x86 bzImage.
//!
//! The boot protocol's setup header (at offset 0x1f1) gives the number of 512-byte setup
//! sectors; the protected-mode code starts after them, and the header's `payload_offset` (0x248)
//! and `payload_length` (0x24c), both relative to that start, locate the compressed kernel
//! (boot protocol 2.08 and later). The payload's first bytes say how it is compressed. What it
//! decompresses to is the kernel ELF (`vmlinux.bin`: symbols stripped), possibly followed by the
//! relocation table the decompressor needs for KASLR.
//!
//! The payload is untrusted input, so extraction is bounded and checked:
//!
//! - **bounded**: the decoder streams into a buffer that stops one byte past the least of the
//!   cap (`max_decompressed`, [`DEFAULT_MAX_DECOMPRESSED`] by default) and the size the payload
//!   records; nothing is allocated from a size the input claims beyond that bound.
//! - **the size trailer**: Linux's build appends the decompressed size, a little-endian `u32`,
//!   to every compressed kernel (`size_append` in `scripts/Makefile.lib`; gzip's own `ISIZE`
//!   serves for gzip), and `mkpiggy` makes the payload end with it. The compressed stream must
//!   end exactly there and decompress to exactly that many bytes, and that size may not exceed
//!   the setup header's `init_size` (protocol 2.10+), the memory the boot loader reserves for
//!   the decompressed kernel.
//! - **the format's own checks**: xz's check (CRC32, CRC64 or SHA-256, verified by liblzma),
//!   gzip's CRC32 and `ISIZE`, zstd's content checksum (XXH64) and frame content size, a legacy
//!   lzma header's size; legacy lz4 has no checksum, only its 8 MiB blocks.
//! - **the Authenticode digest**: a bzImage signed for Secure Boot (every distribution kernel)
//!   carries the SHA-256 of the whole file in its PE certificate table; when it does, the file
//!   must match it.
//! - **Linux's CRC32**: until 6.15, the build (`arch/x86/boot/tools/build.c`) appended the
//!   CRC32 of the whole bzImage; it is checked when it matches, and required of an unsigned
//!   kernel whose version string says it is older than 6.15.
//!
//! For legacy lz4, which has no checksum, the last two are what catch a changed literal byte:
//! an unsigned lz4 kernel from 6.15 on has only the trailer and the block sizes, and says so.
//!
//! [`Extracted::checks`] says which of these the image allowed.

use std::io::Read;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The cap on the decompressed size when none is given: 1 GiB (a distribution kernel
/// decompresses to 50–70 MiB).
pub const DEFAULT_MAX_DECOMPRESSED: u64 = 1 << 30;

/// The size trailer: Linux's build appends the decompressed size to the payload.
pub const CHECK_SIZE_TRAILER: &str = "size trailer";
/// The SHA-256 Authenticode digest of a signed bzImage.
pub const CHECK_AUTHENTICODE: &str = "Authenticode SHA-256";
/// The CRC32 of the whole bzImage, which Linux's build appended before 6.15.
pub const CHECK_BUILD_CRC: &str = "bzImage CRC32";

/// Why a bzImage cannot be unpacked.
#[derive(Debug, Error)]
pub enum BzImageError {
    /// Not a bzImage, or one too old to have a payload header.
    #[error("not a bzImage: {0}")]
    NotBzImage(String),
    /// The header's payload lies outside the file.
    #[error("payload at {offset:#x}+{length:#x} lies outside the {file_len:#x}-byte file")]
    PayloadOutOfBounds {
        /// Offset in the file.
        offset: u64,
        /// Length.
        length: u64,
        /// File size.
        file_len: u64,
    },
    /// A compression this tool does not decode.
    #[error(
        "payload compressed with {0}, which this tool does not decode (xz, lzma, zstd, lz4, gzip are supported)"
    )]
    Unsupported(&'static str),
    /// The payload does not decompress.
    #[error("{format} payload does not decompress")]
    Decompress {
        /// Format.
        format: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The payload records a decompressed size above the cap.
    #[error(
        "the {format} payload would decompress to {claimed} bytes (its {by} says so), more than \
         the {} cap (--max-decompressed): refused",
        human_size(*cap)
    )]
    TooLarge {
        /// Format.
        format: &'static str,
        /// The cap, in bytes.
        cap: u64,
        /// The size the payload records.
        claimed: u64,
        /// Where it records it: its size trailer, or the format's own header or index.
        by: &'static str,
    },
    /// The payload decompresses past the cap (decoding stopped there).
    #[error(
        "the {format} payload decompresses to more than the {} cap (--max-decompressed), and \
         past the size its trailer records (decoding stopped there): refused",
        human_size(*cap)
    )]
    CapExceeded {
        /// Format.
        format: &'static str,
        /// The cap, in bytes.
        cap: u64,
    },
    /// The payload decompresses past the size it records (decoding stopped there).
    #[error(
        "the {format} payload decompresses past the {trailer} bytes its size trailer records \
         (decoding stopped there, within the {} cap): corrupt, or a decompression bomb",
        human_size(*cap)
    )]
    Overrun {
        /// Format.
        format: &'static str,
        /// The size its trailer records.
        trailer: u64,
        /// The cap, in bytes.
        cap: u64,
    },
    /// The payload decompresses to fewer bytes than its trailer records.
    #[error(
        "the {format} payload decompresses to {got} bytes, not the {trailer} its size trailer \
         records: corrupt"
    )]
    SizeMismatch {
        /// Format.
        format: &'static str,
        /// The size its trailer records.
        trailer: u64,
        /// Bytes produced.
        got: u64,
    },
    /// The compressed stream does not end where the size trailer begins.
    #[error(
        "the {format} stream ends after {consumed} bytes, not at the size trailer {expected} \
         bytes into the payload: corrupt"
    )]
    StreamEnd {
        /// Format.
        format: &'static str,
        /// Bytes of the payload the decoder consumed.
        consumed: u64,
        /// Where the trailer begins.
        expected: u64,
    },
    /// A check the format carries fails.
    #[error("the {format} payload fails its {check}: corrupt")]
    CheckFailed {
        /// Format.
        format: &'static str,
        /// Which check.
        check: &'static str,
    },
    /// The size trailer exceeds what the setup header reserves for the decompressed kernel.
    #[error(
        "the size trailer records {trailer} bytes, more than the {init_size} the setup header's \
         init_size reserves: corrupt"
    )]
    InitSize {
        /// The size the trailer records.
        trailer: u64,
        /// The header's `init_size`.
        init_size: u64,
    },
    /// A bzImage of a kernel that appends a CRC32 to it does not match that CRC.
    #[error("the bzImage does not match the CRC32 that Linux (before 6.15) appends to it: corrupt")]
    BuildCrc,
    /// The signed bzImage does not match its Authenticode digest.
    #[error(
        "the bzImage does not match the SHA-256 Authenticode digest it is signed with: corrupt \
         (or modified after signing)"
    )]
    Authenticode,
    /// The payload decompressed to something that is not an ELF file.
    #[error("the payload ({format}) decompressed to {len} bytes that are not an ELF file")]
    NotElf {
        /// Format.
        format: &'static str,
        /// Bytes produced.
        len: usize,
    },
}

/// A size that [`parse_size`] does not read.
#[derive(Debug, Error)]
#[error(
    "{0:?} is not a size: give bytes, or a number with K, M, G or T (powers of 1024), e.g. 512M"
)]
pub struct SizeError(String);

/// Reads a size: plain bytes (`1073741824`), or a number with a binary suffix `K`, `M`, `G`,
/// `T` (also `KiB`, `MB`, ...; case-insensitive; all powers of 1024): `512M`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError(s.to_owned());
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// `1 GiB`, or `1000 bytes` when the size is no whole number of KiB.
fn human_size(n: u64) -> String {
    let unit = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
        .into_iter()
        .find(|(s, _)| n >= 1 << s && n.trailing_zeros() >= *s);
    match unit {
        Some((s, u)) => format!("{} {u}", n >> s),
        None => format!("{n}-byte"),
    }
}

/// A vmlinux extracted from a bzImage.
#[derive(Debug, Clone)]
pub struct Extracted {
    /// The ELF file.
    pub vmlinux: Vec<u8>,
    /// The payload's compression.
    pub format: &'static str,
    /// The integrity checks the image allowed, all of which passed: the format's own (e.g.
    /// `"content checksum"`), [`CHECK_SIZE_TRAILER`] always, [`CHECK_AUTHENTICODE`] for a signed
    /// image.
    pub checks: Vec<&'static str>,
}

/// Every compression [`compression`] names (the ledger's schema lists them).
pub const COMPRESSIONS: [&str; 5] = ["gzip", "xz", "zstd", "lz4", "lzma"];

/// The compression of a payload, from its magic bytes: one of [`COMPRESSIONS`].
pub fn compression(payload: &[u8]) -> Result<&'static str, BzImageError> {
    Ok(match payload {
        [0x1f, 0x8b, ..] | [0x1f, 0x9e, ..] => "gzip",
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        [0x5d, 0x00, 0x00, ..] => "lzma",
        [b'B', b'Z', b'h', ..] => return Err(BzImageError::Unsupported("bzip2")),
        [0x89, b'L', b'Z', b'O', ..] => return Err(BzImageError::Unsupported("lzo")),
        _ => return Err(BzImageError::Unsupported("an unknown format")),
    })
}

/// The compressed payload inside `bz`.
pub fn payload(bz: &[u8]) -> Result<&[u8], BzImageError> {
    Ok(&bz[payload_range(bz)?])
}

/// Where the compressed payload lies in `bz`.
fn payload_range(bz: &[u8]) -> Result<std::ops::Range<usize>, BzImageError> {
    if bz.len() < 0x250 || &bz[0x202..0x206] != b"HdrS" {
        return Err(BzImageError::NotBzImage(
            "no \"HdrS\" setup header at 0x202".into(),
        ));
    }
    let version = u16::from_le_bytes([bz[0x206], bz[0x207]]);
    if version < 0x0208 {
        return Err(BzImageError::NotBzImage(format!(
            "boot protocol {}.{:02}: payload fields need 2.08 or later",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as u64,
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = u32::from_le_bytes([bz[0x248], bz[0x249], bz[0x24a], bz[0x24b]]) as u64;
    let length = u32::from_le_bytes([bz[0x24c], bz[0x24d], bz[0x24e], bz[0x24f]]) as u64;
    let start = pm_start + offset;
    let file_len = bz.len() as u64;
    if start.checked_add(length).is_none_or(|e| e > file_len) || length == 0 {
        return Err(BzImageError::PayloadOutOfBounds {
            offset: start,
            length,
            file_len,
        });
    }
    Ok(start as usize..(start + length) as usize)
}

/// Decompresses the payload of `bz`, at most `max_decompressed` bytes of it, checks it with
/// every check the image allows (the module's documentation lists them) and that it is an ELF
/// file.
pub fn extract_vmlinux(bz: &[u8], max_decompressed: u64) -> Result<Extracted, BzImageError> {
    let range = payload_range(bz)?;
    let p = &bz[range.clone()];
    let format = compression(p)?;
    let bad = |m: &str| BzImageError::Decompress {
        format,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned()),
    };
    let mut checks = Vec::new();
    let signed = authenticode(bz, range.end)?;
    if signed {
        checks.push(CHECK_AUTHENTICODE);
    }
    // Linux's CRC32: proof when it matches; required of a kernel before 6.15 (which always has
    // one) unless its signature's digest already vouched for the file.
    if build_crc(bz, range.end) {
        checks.push(CHECK_BUILD_CRC);
    } else if !signed && kernel_release(bz).is_some_and(|v| v < (6, 15)) {
        return Err(BzImageError::BuildCrc);
    }
    let Some(split) = p.len().checked_sub(4).filter(|&n| n > 0) else {
        return Err(bad("too short for a stream and its size trailer"));
    };
    let (stream, tail) = p.split_at(split);
    let trailer = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    let dec = Decoding {
        format,
        stream,
        limit: trailer,
        cap: max_decompressed,
        memlimit: max_decompressed.max(128 << 20),
    };
    dec.claimed(trailer, "size trailer")?;
    if let Some(init_size) = init_size(bz)
        && trailer > init_size
    {
        return Err(BzImageError::InitSize { trailer, init_size });
    }
    let out = match format {
        "xz" => dec.xz(&mut checks)?,
        "lzma" => dec.lzma(&mut checks)?,
        "gzip" => dec.gzip(p, &mut checks)?,
        "zstd" => dec.zstd(&mut checks)?,
        "lz4" => dec.lz4_legacy(&mut checks)?,
        _ => return Err(BzImageError::Unsupported("an unknown format")),
    };
    let got = out.len() as u64;
    if got > max_decompressed {
        return Err(BzImageError::CapExceeded {
            format,
            cap: max_decompressed,
        });
    }
    if got > trailer {
        return Err(BzImageError::Overrun {
            format,
            trailer,
            cap: max_decompressed,
        });
    }
    if got != trailer {
        return Err(BzImageError::SizeMismatch {
            format,
            trailer,
            got,
        });
    }
    checks.push(if format == "gzip" {
        "size trailer (ISIZE)"
    } else {
        CHECK_SIZE_TRAILER
    });
    if out.len() < 4 || out[..4] != object::elf::ELFMAG {
        return Err(BzImageError::NotElf {
            format,
            len: out.len(),
        });
    }
    Ok(Extracted {
        vmlinux: out,
        format,
        checks,
    })
}

/// The setup header's `init_size` (boot protocol 2.10 and later), when it gives one.
fn init_size(bz: &[u8]) -> Option<u64> {
    let version = u16::from_le_bytes([bz[0x206], bz[0x207]]);
    let field = bz.get(0x260..0x264)?;
    let n = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
    (version >= 0x020a && n != 0).then_some(u64::from(n))
}

/// One payload's decoding: its compressed stream (the payload without the size trailer), and
/// the size the trailer records, past which decoding stops.
struct Decoding<'a> {
    format: &'static str,
    stream: &'a [u8],
    limit: u64,
    /// The cap.
    cap: u64,
    /// liblzma's memory limit (its dictionary).
    memlimit: u64,
}

impl Decoding<'_> {
    fn err(&self, source: std::io::Error) -> BzImageError {
        BzImageError::Decompress {
            format: self.format,
            source,
        }
    }

    /// A decompressed size the payload records (`by` says where): not past the cap, and the
    /// same as the trailer's. Checked before decoding, so that a decompression bomb made with
    /// the ordinary tools is refused at once.
    fn claimed(&self, n: u64, by: &'static str) -> Result<(), BzImageError> {
        if n > self.cap {
            return Err(BzImageError::TooLarge {
                format: self.format,
                cap: self.cap,
                claimed: n,
                by,
            });
        }
        if n != self.limit {
            return Err(BzImageError::CheckFailed {
                format: self.format,
                check: by,
            });
        }
        Ok(())
    }

    /// Reads `r` to its end or to one byte past the limit, whichever comes first. The buffer
    /// starts no larger than a few times the compressed size and grows as bytes arrive.
    fn read_bounded(&self, r: impl Read) -> Result<Vec<u8>, BzImageError> {
        let first = self.limit.min(8 * self.stream.len() as u64) as usize + 1;
        let mut out = Vec::with_capacity(first);
        r.take(self.limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// The stream must end where the size trailer begins.
    fn ends_at_trailer(&self, consumed: u64) -> Result<(), BzImageError> {
        let expected = self.stream.len() as u64;
        if consumed != expected {
            return Err(BzImageError::StreamEnd {
                format: self.format,
                consumed,
                expected,
            });
        }
        Ok(())
    }

    /// Whether decoding stopped at the limit (so that the stream was not read to its end).
    fn overran(&self, out: &[u8]) -> bool {
        out.len() as u64 > self.limit
    }

    fn xz(&self, checks: &mut Vec<&'static str>) -> Result<Vec<u8>, BzImageError> {
        // The stream header's flags name the check every block and the index carry; liblzma
        // verifies it (a check it cannot compute would be reported, never skipped silently).
        let check = match self.stream.get(7).map(|f| f & 0x0f) {
            Some(0x01) => Some("xz check (CRC32)"),
            Some(0x04) => Some("xz check (CRC64)"),
            Some(0x0a) => Some("xz check (SHA-256)"),
            _ => None,
        };
        // The index at the stream's end records every block's uncompressed size (liblzma
        // checks it against the blocks once decoded).
        let indexed = xz_index_size(self.stream);
        if let Some(n) = indexed {
            self.claimed(n, "index")?;
        }
        let stream = liblzma::stream::Stream::new_stream_decoder(
            self.memlimit,
            liblzma::stream::TELL_UNSUPPORTED_CHECK,
        )
        .map_err(|e| self.err(std::io::Error::other(e)))?;
        // The kernel's xz payload uses the x86 BCJ filter: only liblzma decodes it.
        let mut d = liblzma::bufread::XzDecoder::new_stream(self.stream, stream);
        let out = self.read_bounded(&mut d)?;
        if !self.overran(&out) {
            self.ends_at_trailer(d.total_in())?;
        }
        checks.extend(check);
        if indexed.is_some() {
            checks.push("index size");
        }
        Ok(out)
    }

    fn lzma(&self, checks: &mut Vec<&'static str>) -> Result<Vec<u8>, BzImageError> {
        // The legacy header: properties, dictionary size, then the uncompressed size (all ones
        // when unknown, as when the kernel's build pipes the image through `lzma`).
        let header_size = self
            .stream
            .get(5..13)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .filter(|&n| n != u64::MAX);
        if let Some(n) = header_size {
            self.claimed(n, "header size")?;
        }
        let stream = liblzma::stream::Stream::new_lzma_decoder(self.memlimit)
            .map_err(|e| self.err(std::io::Error::other(e)))?;
        let mut d = liblzma::bufread::XzDecoder::new_stream(self.stream, stream);
        let out = self.read_bounded(&mut d)?;
        if !self.overran(&out) {
            self.ends_at_trailer(d.total_in())?;
            if header_size.is_some() {
                // liblzma stops at that size; the trailer's comparison does the rest.
                checks.push("header size");
            }
        }
        Ok(out)
    }

    /// gzip ends with its own CRC32 and ISIZE; the latter is the size trailer, so the member
    /// is the whole payload.
    fn gzip(
        &self,
        payload: &[u8],
        checks: &mut Vec<&'static str>,
    ) -> Result<Vec<u8>, BzImageError> {
        let mut rest = payload;
        let mut d = flate2::bufread::GzDecoder::new(&mut rest);
        // flate2 compares the CRC32 and ISIZE when it reaches the end of the member.
        let out = self.read_bounded(&mut d)?;
        drop(d);
        if !self.overran(&out) {
            self.ends_at_trailer(((payload.len() - rest.len()) as u64).saturating_sub(4))?;
            checks.push("CRC32");
        }
        Ok(out)
    }

    fn zstd(&self, checks: &mut Vec<&'static str>) -> Result<Vec<u8>, BzImageError> {
        // The frame header descriptor says whether the frame carries its content size and a
        // content checksum (the low 32 bits of the XXH64 of the decompressed bytes).
        let fhd = self.stream.get(4).copied().unwrap_or(0);
        let has_size = fhd >> 6 != 0 || fhd & 0x20 != 0;
        let has_checksum = fhd & 0x04 != 0;
        let mut rest = self.stream;
        let mut d = ruzstd::decoding::StreamingDecoder::new(&mut rest)
            .map_err(|e| self.err(std::io::Error::other(e.to_string())))?;
        if has_size {
            self.claimed(d.decoder.content_size(), "frame content size")?;
        }
        let out = self.read_bounded(&mut d)?;
        if self.overran(&out) {
            return Ok(out);
        }
        let fd = &d.decoder;
        if !fd.is_finished() {
            return Err(self.err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the frame is cut short",
            )));
        }
        if has_size {
            checks.push("frame content size"); // the trailer's comparison checks it
        }
        if has_checksum {
            let read = fd.get_checksum_from_data();
            if read.is_none() || read != fd.get_calculated_checksum() {
                return Err(BzImageError::CheckFailed {
                    format: self.format,
                    check: "content checksum",
                });
            }
            checks.push("content checksum");
        }
        drop(d);
        self.ends_at_trailer((self.stream.len() - rest.len()) as u64)?;
        Ok(out)
    }

    /// The kernel's lz4 payload uses the legacy frame format: magic 0x184C2102, then blocks each
    /// prefixed by its compressed size (little-endian u32); every block but a stream's last
    /// decompresses to exactly 8 MiB. The format has no checksum.
    fn lz4_legacy(&self, checks: &mut Vec<&'static str>) -> Result<Vec<u8>, BzImageError> {
        const MAGIC: usize = 0x184C_2102;
        const BLOCK: usize = 8 << 20;
        let bad = |m: String| self.err(std::io::Error::new(std::io::ErrorKind::InvalidData, m));
        let p = self.stream;
        let limit = self.limit as usize + 1;
        let mut at = 4;
        let mut out = Vec::with_capacity(limit.min(8 * p.len()));
        let mut block = vec![0u8; BLOCK];
        // The size of the stream's previous block, if it was short of 8 MiB.
        let mut short: Option<usize> = None;
        while at < p.len() {
            let Some(size) = p.get(at..at + 4) else {
                return Err(bad(format!("a block header cut short at {at}")));
            };
            let n = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
            at += 4;
            if n == MAGIC {
                short = None; // a concatenated stream
                continue;
            }
            if n == 0 && at == p.len() {
                break; // an end mark
            }
            if n == 0 || n > p.len() - at || n > lz4_flex::block::get_maximum_output_size(BLOCK) {
                return Err(bad(format!("a block of {n} bytes at {}", at - 4)));
            }
            if let Some(len) = short {
                return Err(bad(format!(
                    "a block of {len} bytes before another: only a stream's last block may be \
                     shorter than 8 MiB"
                )));
            }
            let got = lz4_flex::block::decompress_into(&p[at..at + n], &mut block)
                .map_err(|e| bad(format!("block at {}: {e}", at - 4)))?;
            at += n;
            if got < BLOCK {
                short = Some(got);
            }
            let room = limit - out.len();
            out.extend_from_slice(&block[..got.min(room)]);
            if out.len() == limit {
                return Ok(out); // past the limit
            }
        }
        checks.push("8 MiB blocks");
        Ok(out)
    }
}

/// The uncompressed size an xz stream's index records (the sum over its blocks), if the stream
/// ends with a well-formed footer and index (their CRC32s match).
fn xz_index_size(s: &[u8]) -> Option<u64> {
    let crc32 = |b: &[u8]| {
        let mut c = flate2::Crc::new();
        c.update(b);
        c.sum() as usize
    };
    let footer_at = s.len().checked_sub(12)?;
    let footer = &s[footer_at..];
    if &footer[10..] != b"YZ" || crc32(&footer[4..10]) != le32(footer, 0)? {
        return None;
    }
    let index_at = footer_at.checked_sub((le32(footer, 4)? + 1) * 4)?;
    let (index, crc) = s[index_at..footer_at].split_at(footer_at - index_at - 4);
    if index.first() != Some(&0) || crc32(index) != le32(crc, 0)? {
        return None;
    }
    // Variable-length integers: 7 bits a byte, least significant first, at most 9 bytes.
    let mut at = 1;
    let mut vli = || {
        let mut n = 0u64;
        for i in 0..9 {
            let b = *index.get(at)?;
            at += 1;
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    };
    let records = vli()?;
    let mut total = 0u64;
    for _ in 0..records {
        vli()?; // the block's unpadded size
        total = total.checked_add(vli()?)?;
    }
    Some(total)
}

/// Whether `bz` ends with the CRC32 that Linux's `arch/x86/boot/tools/build.c` appended to
/// every bzImage before 6.15, and it matches.
///
/// The CRC (the register, initialised to all ones and not inverted) covers the setup and the
/// protected-mode part, whose size the setup header gives in 16-byte units (`syssize`), less
/// the CRC's own last 4 bytes. Signing came later: it writes the PE checksum and the
/// certificate table's entry (both zero before) and appends its table, so those two fields
/// count as zeros and what follows is outside.
fn build_crc(bz: &[u8], payload_end: usize) -> bool {
    let Some(syssize) = le32(bz, 0x1f4) else {
        return false;
    };
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let end = pm_start + syssize * 16;
    if end > bz.len() || end < payload_end + 4 {
        return false;
    }
    let mut crc = flate2::Crc::new();
    let mut at = 0;
    if let Some(pe) = PeHeader::find(bz).filter(|pe| pe.cert_entry + 8 <= end) {
        for (field, len) in [(pe.checksum, 4), (pe.cert_entry, 8)] {
            crc.update(&bz[at..field]);
            crc.update(&[0; 8][..len]);
            at = field + len;
        }
    }
    crc.update(&bz[at..end - 4]);
    le32(bz, end - 4) == Some(!crc.sum() as usize)
}

/// The `major.minor` release of the kernel, from the setup header's version string.
fn kernel_release(bz: &[u8]) -> Option<(u32, u32)> {
    let at = 0x200 + le16(bz, 0x20e).filter(|&o| o != 0)?;
    // "6.12.95+deb12-amd64 (debian-kernel@lists.debian.org) #1 SMP ..."
    let s = bz.get(at..bz.len().min(at + 16))?;
    let end = s
        .iter()
        .position(|c| !(c.is_ascii_digit() || *c == b'.'))
        .unwrap_or(s.len());
    let mut parts = std::str::from_utf8(&s[..end]).ok()?.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Checks a signed bzImage against its Authenticode digest: whether it had a SHA-256 one that
/// covers the payload (and matched), or an error if it did not match.
///
/// An EFI-stub kernel is a PE image; signing it for Secure Boot appends a certificate table
/// (PKCS#7 `SignedData`) whose `SpcIndirectDataContent` holds the SHA-256 of the file, except
/// the PE checksum field, the certificate table's directory entry and the table itself. Only
/// that digest is checked, not the signature or whom it is from.
fn authenticode(bz: &[u8], payload_end: usize) -> Result<bool, BzImageError> {
    let Some(pe) = PeSignature::find(bz) else {
        return Ok(false);
    };
    if payload_end > pe.table.start {
        return Ok(false); // the table overlaps the payload: no digest covers it
    }
    let digests = sha256_digest_infos(&bz[pe.table.clone()]);
    if digests.is_empty() {
        return Ok(false); // signed with another algorithm: not checked
    }
    if digests.contains(&pe.flat_digest(bz))
        || pe.section_digest(bz).is_some_and(|d| digests.contains(&d))
    {
        Ok(true)
    } else {
        Err(BzImageError::Authenticode)
    }
}

/// The fields of an EFI-stub kernel's PE header that signing changes (the Authenticode digest
/// and Linux's CRC32 skip them), and its layout.
struct PeHeader {
    /// The optional header's checksum field.
    checksum: usize,
    /// The certificate table's data-directory entry.
    cert_entry: usize,
    /// The optional header's `SizeOfHeaders`.
    headers: usize,
    /// The section table, and how many entries it has.
    sections: usize,
    nsections: usize,
}

/// Where a PE image's signature is.
struct PeSignature {
    pe: PeHeader,
    /// The certificate table (a file range).
    table: std::ops::Range<usize>,
}

fn le16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn le32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

impl PeHeader {
    /// The PE header of `b`, if it has one with a certificate table's entry.
    fn find(b: &[u8]) -> Option<PeHeader> {
        if b.get(..2)? != b"MZ" {
            return None;
        }
        let pe = le32(b, 0x3c)?;
        if b.get(pe..pe.checked_add(4)?)? != b"PE\0\0" {
            return None;
        }
        let nsections = le16(b, pe + 6)?;
        let opt_size = le16(b, pe + 20)?;
        let opt = pe + 24;
        let (nrva_at, dirs) = match le16(b, opt)? {
            0x20b => (opt + 108, opt + 112),
            0x10b => (opt + 92, opt + 96),
            _ => return None,
        };
        let cert_entry = dirs + 4 * 8;
        if le32(b, nrva_at)? < 5 || cert_entry + 8 > opt + opt_size {
            return None;
        }
        Some(PeHeader {
            checksum: opt + 64,
            cert_entry,
            headers: le32(b, opt + 60)?,
            sections: opt + opt_size,
            nsections,
        })
    }
}

impl PeSignature {
    /// The signature of a signed PE image; `None` for anything else.
    fn find(b: &[u8]) -> Option<PeSignature> {
        let pe = PeHeader::find(b)?;
        let (start, len) = (le32(b, pe.cert_entry)?, le32(b, pe.cert_entry + 4)?);
        if len == 0 || start.checked_add(len)? > b.len() || start < pe.cert_entry + 8 {
            return None;
        }
        Some(PeSignature {
            pe,
            table: start..start + len,
        })
    }

    /// The digest of everything before the table, less the two skipped fields (what sbsign and
    /// pesign compute when the sections cover the file, as a kernel's do).
    fn flat_digest(&self, b: &[u8]) -> [u8; 32] {
        let pe = &self.pe;
        let mut h = Sha256::new();
        h.update(&b[..pe.checksum]);
        h.update(&b[pe.checksum + 4..pe.cert_entry]);
        h.update(&b[pe.cert_entry + 8..self.table.start]);
        h.finalize().into()
    }

    /// The digest as the Authenticode specification puts it: the headers, then each section's
    /// raw data in file order, then whatever lies between them and the table.
    fn section_digest(&self, b: &[u8]) -> Option<[u8; 32]> {
        let pe = &self.pe;
        if pe.headers < pe.cert_entry + 8 || pe.headers > self.table.start {
            return None;
        }
        let mut h = Sha256::new();
        h.update(&b[..pe.checksum]);
        h.update(&b[pe.checksum + 4..pe.cert_entry]);
        h.update(&b[pe.cert_entry + 8..pe.headers]);
        let mut raw = Vec::new();
        for i in 0..pe.nsections.min(96) {
            let s = pe.sections + 40 * i;
            let (size, at) = (le32(b, s + 16)?, le32(b, s + 20)?);
            if size > 0 {
                raw.push((at, size));
            }
        }
        raw.sort_unstable();
        let mut hashed = pe.headers;
        for (at, size) in raw {
            h.update(b.get(at..at.checked_add(size)?)?);
            hashed = hashed.checked_add(size)?;
        }
        h.update(b.get(hashed..self.table.start)?);
        Some(h.finalize().into())
    }
}

/// Every SHA-256 `DigestInfo` (the algorithm's OID, optional NULL parameters, a 32-byte OCTET
/// STRING) in a certificate table.
fn sha256_digest_infos(table: &[u8]) -> Vec<[u8; 32]> {
    const OID: [u8; 11] = [
        0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
    ];
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = table[at..].windows(OID.len()).position(|w| w == OID) {
        let mut rest = &table[at + i + OID.len()..];
        if let Some(r) = rest.strip_prefix(&[0x05, 0x00]) {
            rest = r;
        }
        if let Some(d) = rest.strip_prefix(&[0x04, 0x20]).and_then(|r| r.get(..32))
            && let Ok(d) = d.try_into()
        {
            found.push(d);
        }
        at += i + 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn fake_bz(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512];
        b[0x1f1] = 4;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(payload);
        b
    }

    /// A compressed stream followed by Linux's size trailer.
    fn with_trailer(stream: &[u8], size: u64) -> Vec<u8> {
        let mut p = stream.to_vec();
        p.extend_from_slice(&(size as u32).to_le_bytes());
        p
    }

    fn elf_like() -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..100_000u32).map(|i| (i % 251) as u8));
        v
    }

    /// Compressible but not trivially so: words of a small vocabulary in a pseudo-random
    /// order, so that the streams have literals and matches.
    fn text_like(len: usize) -> Vec<u8> {
        const WORDS: [&[u8]; 8] = [
            b"mov ",
            b"rax, ",
            b"[rbp-8]",
            b"\x0f\x01\xd9",
            b"call ",
            b"0x",
            b"ffff",
            b"\n",
        ];
        let mut v = b"\x7fELF".to_vec();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(WORDS[(x % 8) as usize]);
            if x.is_multiple_of(5) {
                v.push((x >> 32) as u8); // a literal now and then
            }
        }
        v.truncate(len);
        v
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    /// The legacy lz4 format, as `lz4 -l` writes it: 8 MiB blocks.
    fn lz4(data: &[u8]) -> Vec<u8> {
        let mut p = vec![0x02, 0x21, 0x4c, 0x18];
        for chunk in data.chunks(8 << 20) {
            let block = lz4_flex::block::compress(chunk);
            p.extend_from_slice(&(block.len() as u32).to_le_bytes());
            p.extend_from_slice(&block);
        }
        p
    }

    /// The payload (stream and trailer) of `data` in each format.
    fn payloads(data: &[u8]) -> [(&'static str, Vec<u8>); 4] {
        let n = data.len() as u64;
        [
            ("xz", with_trailer(&xz(data), n)),
            ("gzip", gzip(data)), // its ISIZE is the trailer
            ("zstd", with_trailer(&zstd(data), n)),
            ("lz4", with_trailer(&lz4(data), n)),
        ]
    }

    /// `bz` with the PE header of an EFI-stub kernel (at 0x40, before the setup header).
    fn with_pe(mut bz: Vec<u8>) -> Vec<u8> {
        let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(&mut bz, 0, b"MZ");
        put(&mut bz, 0x3c, &0x40u32.to_le_bytes());
        put(&mut bz, 0x40, b"PE\0\0");
        put(&mut bz, 0x44, &0x8664u16.to_le_bytes()); // x86-64, no sections
        put(&mut bz, 0x54, &(112u16 + 5 * 8).to_le_bytes()); // the optional header's size
        let opt = 0x58;
        put(&mut bz, opt, &0x20bu16.to_le_bytes()); // PE32+
        put(&mut bz, opt + 60, &0x200u32.to_le_bytes()); // SizeOfHeaders
        put(&mut bz, opt + 108, &5u32.to_le_bytes()); // data directories
        bz
    }

    /// `bz` signed as sbsign signs a kernel: its PE header (added if it has none) gets a
    /// certificate table holding the SHA-256 Authenticode digest, appended to the file.
    fn signed(bz: Vec<u8>) -> Vec<u8> {
        let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        let mut bz = if bz.starts_with(b"MZ") {
            bz
        } else {
            with_pe(bz)
        };
        let opt = 0x58;
        bz.resize(bz.len().next_multiple_of(8), 0);
        let start = bz.len();
        let mut table = vec![0u8; 8];
        table.extend_from_slice(&[0x30, 0x31, 0x30, 0x0d]);
        table.extend_from_slice(&[
            0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04,
            0x20,
        ]);
        let digest_at = start + table.len();
        table.extend_from_slice(&[0; 32]);
        table.resize(table.len().next_multiple_of(8), 0);
        let len = table.len() as u32;
        table[..4].copy_from_slice(&len.to_le_bytes());
        table[4..8].copy_from_slice(&[0x00, 0x02, 0x02, 0x00]); // revision 2.0, PKCS#7
        bz.extend_from_slice(&table);
        put(&mut bz, opt + 112 + 32, &(start as u32).to_le_bytes());
        put(&mut bz, opt + 112 + 36, &len.to_le_bytes());
        let digest = PeSignature::find(&bz).unwrap().flat_digest(&bz);
        put(&mut bz, digest_at, &digest);
        bz
    }

    /// `bz` with a kernel version string in its setup.
    fn with_release(mut bz: Vec<u8>, release: &str) -> Vec<u8> {
        let s = format!("{release} (test@example) #1 SMP\0");
        bz[0x280..0x280 + s.len()].copy_from_slice(s.as_bytes());
        bz[0x20e..0x210].copy_from_slice(&0x80u16.to_le_bytes());
        bz
    }

    /// `bz` as Linux's build wrote it before 6.15: `syssize` covering the file, which ends with
    /// the CRC32 of the rest.
    fn with_crc(mut bz: Vec<u8>) -> Vec<u8> {
        let pm_start = 5 * 512;
        let syssize = (bz.len() - pm_start + 4).div_ceil(16);
        bz[0x1f4..0x1f8].copy_from_slice(&(syssize as u32).to_le_bytes());
        bz.resize(pm_start + syssize * 16 - 4, 0);
        let mut crc = flate2::Crc::new();
        crc.update(&bz);
        bz.extend_from_slice(&(!crc.sum()).to_le_bytes());
        bz
    }

    fn extract(bz: &[u8]) -> Result<Extracted, BzImageError> {
        extract_vmlinux(bz, DEFAULT_MAX_DECOMPRESSED)
    }

    #[test]
    fn gzip_and_xz_payloads() {
        let data = elf_like();
        let bz = fake_bz(&gzip(&data));
        assert_eq!(extract(&bz).unwrap().vmlinux, data);
        let bz = fake_bz(&with_trailer(&xz(&data), data.len() as u64));
        assert_eq!(extract(&bz).unwrap().vmlinux, data);
    }

    #[test]
    fn lz4_legacy_payload() {
        let data = elf_like();
        let p = with_trailer(&lz4(&data), data.len() as u64);
        assert_eq!(extract(&fake_bz(&p)).unwrap().vmlinux, data);
        // Only a stream's last block may be short of 8 MiB.
        let mut two = lz4(&data[..1000]);
        two.extend_from_slice(&lz4(&data[1000..])[4..]);
        let bz = fake_bz(&with_trailer(&two, data.len() as u64));
        assert!(matches!(extract(&bz), Err(BzImageError::Decompress { .. })));
    }

    #[test]
    fn each_format_says_which_checks_it_allowed() {
        let data = text_like(300_000);
        for (format, p) in payloads(&data) {
            let x = extract(&fake_bz(&p)).unwrap();
            assert_eq!((x.format, &x.vmlinux), (format, &data));
            let want: &[&str] = match format {
                "xz" => &["xz check (CRC64)", "index size", "size trailer"],
                "gzip" => &["CRC32", "size trailer (ISIZE)"],
                "zstd" => &["content checksum", "size trailer"],
                _ => &["8 MiB blocks", "size trailer"],
            };
            assert_eq!(x.checks, want, "{format}");
            let x = extract(&signed(fake_bz(&p))).unwrap();
            assert_eq!(x.vmlinux, data);
            assert_eq!(x.checks[0], CHECK_AUTHENTICODE, "{format}");
        }
    }

    #[test]
    fn sizes() {
        for (s, n) in [
            ("1073741824", 1 << 30),
            ("512M", 512 << 20),
            ("2G", 2 << 30),
            ("2g", 2 << 30),
            ("64KiB", 64 << 10),
            ("1 GB", 1 << 30),
            ("1T", 1 << 40),
            ("0", 0),
        ] {
            assert_eq!(parse_size(s).unwrap(), n, "{s}");
        }
        for s in [
            "",
            "M",
            "12X",
            "-1",
            "1.5G",
            "99999999999999999999",
            "20000000000T",
        ] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }

    /// A bomb (zeros) is refused with an error naming the cap, in well under a second, whatever
    /// its trailer claims: refused on the claim itself, on the format's own record of the size,
    /// or when decoding reaches one byte past the trailer's size or the cap.
    #[test]
    fn bombs_are_refused_at_the_cap() {
        const CAP: u64 = 1 << 20;
        let zeros = vec![0u8; 32 << 20];
        let streams = [
            ("xz", xz(&zeros)),
            ("zstd", zstd(&zeros)),
            ("lz4", lz4(&zeros)),
            ("gzip", gzip(&zeros)),
        ];
        for (format, stream) in &streams {
            let mut stream = stream.clone();
            if *format == "gzip" {
                stream.truncate(stream.len() - 4); // its ISIZE is the trailer
            }
            // The trailer's honest claim, a small lie (a 4 GiB output wraps to a small
            // trailer), the cap itself; a 4 GiB claim against the default cap.
            for (trailer, cap) in [
                (32 << 20, CAP),
                (4096, CAP),
                (CAP, CAP),
                (u64::from(u32::MAX), DEFAULT_MAX_DECOMPRESSED),
            ] {
                let mut s = stream.clone();
                if *format == "xz" && trailer == CAP {
                    let n = s.len();
                    s[n - 12] ^= 1; // spoil the footer, so that the index is not read
                }
                let bz = fake_bz(&with_trailer(&s, trailer));
                let t = Instant::now();
                let r = extract_vmlinux(&bz, cap);
                let took = t.elapsed();
                assert!(
                    took < Duration::from_secs(1),
                    "{format} {trailer}: {took:?}"
                );
                let e = r.unwrap_err();
                match (&e, trailer) {
                    (BzImageError::TooLarge { cap: c, .. }, _) => assert_eq!(*c, cap),
                    (BzImageError::CapExceeded { cap: c, .. }, CAP) => assert_eq!(*c, cap),
                    (BzImageError::Overrun { trailer: t, .. }, 4096) => assert_eq!(*t, 4096),
                    _ => panic!("{format} {trailer}: {e}"),
                }
                let shown = e.to_string();
                let named = if cap == CAP { "1 MiB cap" } else { "1 GiB cap" };
                assert!(shown.contains(named), "{shown}");
            }
        }
    }

    /// Every single-byte change at a sample of positions of a payload is refused, or leaves the
    /// decompressed bytes as they were: by zstd's content checksum, gzip's CRC32, xz's check;
    /// for legacy lz4, which has no checksum, by a signed image's Authenticode digest, or by
    /// the CRC32 Linux appended to a bzImage before 6.15.
    #[test]
    fn flipped_payload_bytes_are_refused() {
        let data = text_like(200_000);
        let mut images = Vec::new();
        for (format, p) in payloads(&data) {
            if format == "lz4" {
                images.push(("lz4, signed", signed(fake_bz(&p)), p.len()));
                let old = with_crc(with_release(fake_bz(&p), "6.1.0-26-cloud-amd64"));
                images.push(("lz4, 6.1 with its CRC32", old, p.len()));
            } else {
                images.push((format, fake_bz(&p), p.len()));
            }
        }
        for (format, bz, n) in images {
            let start = payload_range(&bz).unwrap().start;
            let positions = (0..32)
                .chain((32..n - 32).step_by(n / 300))
                .chain(n - 32..n);
            let (mut refused, mut harmless) = (0, 0);
            for at in positions {
                for mask in [0x01, 0x80, 0xff] {
                    let mut bad = bz.clone();
                    bad[start + at] ^= mask;
                    match extract(&bad) {
                        Err(_) => refused += 1,
                        Ok(x) => {
                            assert_eq!(x.vmlinux, data, "{format}: byte {at} ^ {mask:#x}");
                            harmless += 1;
                        }
                    }
                }
            }
            assert!(
                refused > 900,
                "{format}: {refused} refused, {harmless} harmless"
            );
        }
    }

    /// Linux's CRC32 is checked when it matches, and required of an unsigned kernel older than
    /// 6.15; a signed one's digest vouches for it instead.
    #[test]
    fn linux_crc32() {
        let data = text_like(50_000);
        let p = with_trailer(&lz4(&data), data.len() as u64);
        let old = with_crc(with_pe(with_release(fake_bz(&p), "6.1.0")));
        let x = extract(&old).unwrap();
        assert_eq!(x.checks, [CHECK_BUILD_CRC, "8 MiB blocks", "size trailer"]);
        let mut bad = old.clone();
        bad[0x300] ^= 1; // in the setup, outside the payload
        assert!(matches!(extract(&bad), Err(BzImageError::BuildCrc)));
        // Signed afterwards (the PE checksum and certificate entry change): still matches.
        let x = extract(&signed(old.clone())).unwrap();
        assert_eq!(x.checks[..2], [CHECK_AUTHENTICODE, CHECK_BUILD_CRC]);
        // Without the CRC: refused for 6.1, unless signed; not expected from 6.15 on, nor
        // without a version string.
        let without = with_release(fake_bz(&p), "6.1.0");
        assert!(matches!(extract(&without), Err(BzImageError::BuildCrc)));
        assert!(extract(&signed(without)).is_ok());
        let x = extract(&with_release(fake_bz(&p), "6.15.2")).unwrap();
        assert_eq!(x.checks, ["8 MiB blocks", "size trailer"]);
        assert!(extract(&fake_bz(&p)).is_ok());
        assert_eq!(
            kernel_release(&with_release(fake_bz(&p), "10.3")),
            Some((10, 3))
        );
    }

    #[test]
    fn authenticode_digest() {
        let data = text_like(50_000);
        let p = with_trailer(&lz4(&data), data.len() as u64);
        let bz = signed(fake_bz(&p));
        assert!(extract(&bz).is_ok());
        // A changed setup header, or a changed digest, does not match.
        for at in [0x300, bz.len() - 20] {
            let mut bad = bz.clone();
            bad[at] ^= 1;
            assert!(matches!(extract(&bad), Err(BzImageError::Authenticode)));
        }
        // The digest skips the PE checksum field.
        let mut ok = bz.clone();
        ok[0x58 + 64] ^= 1;
        assert!(extract(&ok).is_ok());
    }

    #[test]
    fn trailer_and_init_size() {
        let data = elf_like();
        let n = data.len() as u64;
        let z = zstd(&data);
        assert!(matches!(
            extract(&fake_bz(&with_trailer(&z, n + 1))),
            Err(BzImageError::SizeMismatch { got, .. }) if got == n
        ));
        assert!(matches!(
            extract(&fake_bz(&with_trailer(&z, n - 1))),
            Err(BzImageError::Overrun { .. })
        ));
        // Bytes between the stream and the trailer.
        let mut padded = z.clone();
        padded.extend_from_slice(&[0; 4]);
        assert!(matches!(
            extract(&fake_bz(&with_trailer(&padded, n))),
            Err(BzImageError::StreamEnd { .. })
        ));
        // More than the setup header's init_size reserves.
        let mut b = fake_bz(&with_trailer(&z, n));
        b[0x260..0x264].copy_from_slice(&(n as u32 - 1).to_le_bytes());
        assert!(matches!(extract(&b), Err(BzImageError::InitSize { .. })));
        b[0x260..0x264].copy_from_slice(&(n as u32 + 4096).to_le_bytes());
        assert!(extract(&b).is_ok());
    }

    #[test]
    fn bad_inputs() {
        assert!(matches!(
            extract(b"short"),
            Err(BzImageError::NotBzImage(_))
        ));
        let mut bz = fake_bz(&[0x1f, 0x8b, 0, 0]);
        assert!(matches!(extract(&bz), Err(BzImageError::Decompress { .. })));
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            extract(&bz),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        let bz = fake_bz(b"BZh91AY&SY");
        assert!(matches!(
            extract(&bz),
            Err(BzImageError::Unsupported("bzip2"))
        ));
    }
}
