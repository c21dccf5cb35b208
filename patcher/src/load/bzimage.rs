//! Extracting the ELF `vmlinux` from an x86 bzImage.
//!
//! The boot protocol's setup header (at offset 0x1f1) gives the number of 512-byte setup
//! sectors; the protected-mode code starts after them, and the header's `payload_offset` (0x248)
//! and `payload_length` (0x24c), both relative to that start, locate the compressed kernel
//! (boot protocol 2.08 and later). The payload's first bytes say how it is compressed. What it
//! decompresses to is the kernel ELF (`vmlinux.bin`: symbols stripped), possibly followed by the
//! relocation table the decompressor needs for KASLR.

use std::io::Read;

use thiserror::Error;

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
    /// The payload decompressed to something that is not an ELF file.
    #[error("the payload ({format}) decompressed to {len} bytes that are not an ELF file")]
    NotElf {
        /// Format.
        format: &'static str,
        /// Bytes produced.
        len: usize,
    },
}

/// The compression of a payload, from its magic bytes.
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
    Ok(&bz[start as usize..(start + length) as usize])
}

/// Decompresses the payload of `bz` and checks that it is an ELF file.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let p = payload(bz)?;
    let format = compression(p)?;
    let err = |source| BzImageError::Decompress { format, source };
    let mut out = Vec::with_capacity(p.len() * 4);
    match format {
        "xz" => {
            // The kernel's xz payload uses the x86 BCJ filter: only liblzma decodes it.
            liblzma::read::XzDecoder::new(p)
                .read_to_end(&mut out)
                .map_err(err)?;
        }
        "lzma" => {
            let stream = liblzma::stream::Stream::new_lzma_decoder(u64::MAX)
                .map_err(|e| err(std::io::Error::other(e)))?;
            liblzma::read::XzDecoder::new_stream(p, stream)
                .read_to_end(&mut out)
                .map_err(err)?;
        }
        "gzip" => {
            flate2::read::GzDecoder::new(p)
                .read_to_end(&mut out)
                .map_err(err)?;
        }
        "zstd" => {
            let mut d = ruzstd::decoding::StreamingDecoder::new(p)
                .map_err(|e| err(std::io::Error::other(e.to_string())))?;
            d.read_to_end(&mut out).map_err(err)?;
        }
        "lz4" => out = lz4_legacy(p).map_err(err)?,
        _ => return Err(BzImageError::Unsupported("an unknown format")),
    }
    if out.len() < 4 || out[..4] != object::elf::ELFMAG {
        return Err(BzImageError::NotElf {
            format,
            len: out.len(),
        });
    }
    Ok(out)
}

/// The kernel's lz4 payload uses the legacy frame format: magic 0x184C2102, then blocks each
/// prefixed by its compressed size (little-endian u32), each decompressing to at most 8 MiB.
/// The stream may be followed by the uncompressed size the kernel build appends.
fn lz4_legacy(p: &[u8]) -> std::io::Result<Vec<u8>> {
    const BLOCK: usize = 8 << 20;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let mut at = 4;
    let mut out = Vec::new();
    let mut block = vec![0u8; BLOCK];
    while at + 4 <= p.len() {
        let n = u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]) as usize;
        if n == 0 {
            break; // a zero chunk size ends the stream, as the kernel's decoder reads it
        }
        if n == 0x184C_2102 {
            at += 4; // a concatenated stream
            continue;
        }
        at += 4;
        if n > p.len() - at || n > BLOCK + BLOCK / 255 + 16 {
            // The trailing size field (or garbage) after the last block ends the stream.
            if out.is_empty() {
                return Err(bad("lz4 block size exceeds the payload"));
            }
            break;
        }
        let got = lz4_flex::block::decompress_into(&p[at..at + n], &mut block)
            .map_err(|e| bad(&e.to_string()))?;
        out.extend_from_slice(&block[..got]);
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn elf_like() -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..100_000u32).map(|i| (i % 251) as u8));
        v
    }

    #[test]
    fn gzip_and_xz_payloads() {
        use std::io::Write;
        let data = elf_like();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let bz = fake_bz(&gz.finish().unwrap());
        assert_eq!(extract_vmlinux(&bz).unwrap(), data);

        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&data).unwrap();
        let bz = fake_bz(&xz.finish().unwrap());
        assert_eq!(extract_vmlinux(&bz).unwrap(), data);
    }

    #[test]
    fn lz4_legacy_payload() {
        let data = elf_like();
        let block = lz4_flex::block::compress(&data);
        let mut p = vec![0x02, 0x21, 0x4c, 0x18];
        p.extend_from_slice(&(block.len() as u32).to_le_bytes());
        p.extend_from_slice(&block);
        p.extend_from_slice(&(data.len() as u32).to_le_bytes()); // appended size
        assert_eq!(extract_vmlinux(&fake_bz(&p)).unwrap(), data);
    }

    #[test]
    fn bad_inputs() {
        assert!(matches!(
            extract_vmlinux(b"short"),
            Err(BzImageError::NotBzImage(_))
        ));
        let mut bz = fake_bz(&[0x1f, 0x8b, 0, 0]);
        assert!(matches!(
            extract_vmlinux(&bz),
            Err(BzImageError::Decompress { .. })
        ));
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&bz),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        let bz = fake_bz(b"BZh91AY&SY");
        assert!(matches!(
            extract_vmlinux(&bz),
            Err(BzImageError::Unsupported("bzip2"))
        ));
    }
}
