//! The symbol table a stripped `vmlinux` still carries: kallsyms, compressed in `.rodata`
//! (`CONFIG_KALLSYMS`, with `CONFIG_KALLSYMS_ALL` every data symbol too). Reading it needs no
//! `-dbg` package; it gives function starts (where decoding restarts), section ends (`_etext`),
//! the bounds of the tables a stripped image hides inside `.rodata` and `.init.data`
//! (`__mcount_loc`, `__jump_table`, `.static_call_sites`), and names for the ledger.
//!
//! The arrays `scripts/kallsyms` emits, each 8-aligned, little-endian (facts measured on Debian's
//! 6.1 and 6.12, checked against their `System.map`):
//!
//! * `kallsyms_num_syms`: u32 `N` (then 4 zero bytes);
//! * `kallsyms_names`: `N` entries, each a length (one byte below 0x80; else two,
//!   `(b0 & 0x7f) | b1 << 7`) and that many token indices; the expanded string is the type
//!   letter, then the name;
//! * `kallsyms_markers`: u32 per 256 symbols, the offset of entry `256 k` in the names;
//! * `kallsyms_token_table`: 256 NUL-terminated strings; `kallsyms_token_index`: 256 u16 offsets
//!   into it;
//! * `kallsyms_offsets`: `N` s32; `kallsyms_relative_base`: u64. With absolute per-CPU symbols an
//!   offset `o >= 0` is the address itself and `o < 0` means `relative_base - 1 - o`; without,
//!   the address is `relative_base + (o as u32)`;
//! * 6.2 and later add `kallsyms_seqs_of_names` (3 bytes a symbol, name order), unused here.
//!
//! Their order changed in 6.4 (Debian's 6.1.192 has the seqs array of 6.2 but the older order):
//! before, `offsets, relative_base, num_syms, names, markers, [seqs,] token_table, token_index`;
//! since, `num_syms, names, markers, token_table, token_index, offsets, relative_base, seqs`.
//!
//! Nothing is trusted: the arrays are found by their shape (the token table by its digits and an
//! index that must match it exactly, the names by a count and a markers array that must agree
//! with them, the offsets by decoding to addresses sorted as kallsyms sorts them), every read is
//! bounds-checked, and an image whose kallsyms is malformed is refused with what is wrong.

/// One symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KSym {
    /// Address.
    pub addr: u64,
    /// Type letter (`T`, `t`, `D`, `A`, ...).
    pub kind: u8,
    /// Name.
    pub name: String,
}

impl KSym {
    /// Whether the type letter is a function's (`T`, `t`, `W`, `w`).
    pub fn is_text(&self) -> bool {
        matches!(self.kind, b'T' | b't' | b'W' | b'w')
    }
}

/// Where the arrays were found (virtual addresses), for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// `kallsyms_num_syms`.
    pub num_syms: u64,
    /// `kallsyms_names`.
    pub names: u64,
    /// `kallsyms_markers`.
    pub markers: u64,
    /// `kallsyms_token_table`.
    pub token_table: u64,
    /// `kallsyms_token_index`.
    pub token_index: u64,
    /// `kallsyms_offsets`.
    pub offsets: u64,
    /// `kallsyms_relative_base` (its value).
    pub relative_base: u64,
    /// Whether the offsets follow the token index (the 6.4 and later order).
    pub offsets_after_tokens: bool,
    /// Whether non-negative offsets are absolute addresses (per-CPU symbols).
    pub absolute_percpu: bool,
}

/// A kernel's kallsyms, decoded.
#[derive(Clone, Debug, Default)]
pub struct Kallsyms {
    /// Every symbol, in kallsyms' order (by address).
    pub symbols: Vec<KSym>,
    /// Where the arrays are.
    pub layout: Layout,
    /// `(hash of the name, index)`, sorted: a name's symbols without a copy of every name (a
    /// kernel has 150,000 of them).
    by_name: Vec<(u64, u32)>,
}

impl Kallsyms {
    /// The address of the (first) symbol named `name`.
    pub fn address(&self, name: &str) -> Option<u64> {
        let h = name_hash(name.as_bytes());
        let from = self.by_name.partition_point(|e| e.0 < h);
        self.by_name[from..]
            .iter()
            .take_while(|e| e.0 == h)
            .map(|e| &self.symbols[e.1 as usize])
            .find(|s| s.name == name)
            .map(|s| s.addr)
    }
}

/// FNV-1a, 64 bits.
fn name_hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Upper bound on the symbol count (Debian's 6.12 has 162,756).
const MAX_SYMS: u32 = 1 << 24;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// `x` rounded up to a multiple of 8, relative to a section whose address is `base` (the arrays
/// are aligned in address, not in file offset).
fn align8(base: u64, x: usize) -> usize {
    let a = base.wrapping_add(x as u64);
    x + ((8 - (a & 7)) & 7) as usize
}

fn aligned(base: u64, x: usize) -> bool {
    base.wrapping_add(x as u64) & 7 == 0
}

/// The token table at `start`: the 256 strings and where they end, if the 256 u16 that follow
/// (8-aligned) are exactly their offsets.
fn token_table(data: &[u8], base: u64, start: usize) -> Option<(Vec<&[u8]>, usize, usize)> {
    let mut tokens = Vec::with_capacity(256);
    let mut offsets = Vec::with_capacity(256);
    let mut at = start;
    for _ in 0..256 {
        let rest = data.get(at..)?;
        let n = rest.iter().take(64).position(|&c| c == 0)?;
        if n == 0 {
            return None;
        }
        offsets.push(at - start);
        tokens.push(&rest[..n]);
        at += n + 1;
    }
    let index = align8(base, at);
    for (k, off) in offsets.iter().enumerate() {
        if u16_at(data, index + 2 * k)? as usize != *off {
            return None;
        }
    }
    Some((tokens, at, index))
}

/// Finds the token table: the digits `0` to `9` are one-character tokens, in order.
fn find_tokens(data: &[u8], base: u64) -> Option<(Vec<&[u8]>, usize, usize, usize)> {
    const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
    let mut from = 0;
    while let Some(hit) = find(&data[from..], DIGITS).map(|h| h + from) {
        from = hit + 1;
        // A plain character table goes on with ':', which is never a one-character token.
        if data.get(hit + DIGITS.len()..hit + DIGITS.len() + 2) == Some(b":\0") {
            continue;
        }
        // The table starts at most 256 strings of at most 64 bytes before the digits.
        let lo = hit.saturating_sub(256 * 65);
        let mut s = hit;
        while s >= lo {
            if aligned(base, s)
                && let Some((t, end, index)) = token_table(data, base, s)
            {
                return Some((t, s, end, index));
            }
            if s == 0 {
                break;
            }
            s -= 1;
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut at = 0;
    while let Some(p) = hay.get(at..)?.iter().position(|&c| c == first) {
        let i = at + p;
        if hay.get(i..i + needle.len()) == Some(needle) {
            return Some(i);
        }
        at = i + 1;
    }
    None
}

/// The length of the names entry at `at` and where its bytes start.
fn entry(data: &[u8], at: usize) -> Option<(usize, usize)> {
    let b0 = *data.get(at)?;
    if b0 < 0x80 {
        return Some((b0 as usize, at + 1));
    }
    let b1 = *data.get(at + 1)?;
    Some(((b0 & 0x7f) as usize | (b1 as usize) << 7, at + 2))
}

/// The names' entries: for `n` entries from `start`, their starts, if they end before `limit`.
fn walk_names(data: &[u8], start: usize, n: usize, limit: usize) -> Option<(Vec<u32>, usize)> {
    let mut starts = Vec::with_capacity(n);
    let mut at = start;
    for _ in 0..n {
        starts.push(u32::try_from(at - start).ok()?);
        let (len, body) = entry(data, at)?;
        if len == 0 {
            return None;
        }
        at = body.checked_add(len)?;
        if at > limit {
            return None;
        }
    }
    Some((starts, at))
}

/// The symbols' names: `num_syms` at `p`, then the names, then the markers, which must end
/// where `tokens` (the token table) or a seqs array before it begins.
fn find_names(data: &[u8], base: u64, tokens: usize) -> Option<(usize, usize, Vec<u32>, usize)> {
    let mut p = tokens.saturating_sub(8);
    loop {
        if aligned(base, p)
            && let (Some(n), Some(0)) = (u32_at(data, p), u32_at(data, p + 4))
            && n > 0
            && n < MAX_SYMS
        {
            let n = n as usize;
            let markers_len = n.div_ceil(256) * 4;
            // Where the markers would start if they end at the token table (6.4 and later, or
            // older without seqs) or at a seqs array of 3 bytes a symbol before it (6.2 to 6.3,
            // and Debian's 6.1).
            let ends = [tokens, tokens.saturating_sub(align8(0, 3 * n))];
            for end in ends {
                let Some(m) = end.checked_sub(align8(0, markers_len)) else {
                    continue;
                };
                if m <= p + 8 || !aligned(base, m) || u32_at(data, m) != Some(0) {
                    continue;
                }
                let Some((starts, names_end)) = walk_names(data, p + 8, n, m) else {
                    continue;
                };
                if align8(base, names_end) != m {
                    continue;
                }
                let agree = (0..n.div_ceil(256))
                    .all(|k| u32_at(data, m + 4 * k) == starts.get(256 * k).copied());
                if agree {
                    return Some((p, n, starts, m));
                }
            }
        }
        if p < 8 {
            return None;
        }
        p -= 8;
    }
}

/// The addresses, from the offsets at `at` and the relative base, under either rule; `None`
/// unless they are sorted as kallsyms sorts them.
fn addresses(data: &[u8], at: usize, n: usize, base: u64, absolute: bool) -> Option<Vec<u64>> {
    let mut out = Vec::with_capacity(n);
    let mut last = 0u64;
    for i in 0..n {
        let o = u32_at(data, at + 4 * i)? as i32;
        let a = if absolute {
            if o >= 0 {
                o as u64
            } else {
                base.wrapping_sub(1).wrapping_sub(o as i64 as u64)
            }
        } else {
            base.wrapping_add(o as u32 as u64)
        };
        if a < last {
            return None;
        }
        last = a;
        out.push(a);
    }
    Some(out)
}

/// Finds and decodes the kallsyms of a kernel whose `.rodata` is `data` at address `base`.
/// `Ok(None)` if there is no token table; an error if there is one but the rest is not
/// consistent with it.
pub fn read(data: &[u8], base: u64) -> Result<Option<Kallsyms>, String> {
    let Some((tokens, tt, tt_end, ti)) = find_tokens(data, base) else {
        return Ok(None);
    };
    let at = |off: usize| base.wrapping_add(off as u64);
    let ctx = |what: &str| format!("kallsyms: a token table at {:#x}, but {what}", at(tt));
    let _ = tt_end;
    let (p, n, starts, markers) = find_names(data, base, tt)
        .ok_or_else(|| ctx("no count, names and markers that agree before it"))?;
    // The offsets and relative base: before the count (the older order) or after the token
    // index (6.4 and later).
    let before = p
        .checked_sub(8)
        .and_then(|rb| Some((rb.checked_sub(align8(0, 4 * n))?, rb)));
    let after = {
        let offs = align8(base, ti + 512);
        Some((offs, align8(base, offs + 4 * n)))
    };
    let mut found = None;
    'search: for (place, after_tokens) in [(after, true), (before, false)] {
        let Some((offs, rb)) = place else { continue };
        let Some(relative_base) = u64_at(data, rb) else {
            continue;
        };
        for absolute in [true, false] {
            if let Some(addrs) = addresses(data, offs, n, relative_base, absolute) {
                found = Some((offs, relative_base, after_tokens, absolute, addrs));
                break 'search;
            }
        }
    }
    let (offs, relative_base, offsets_after_tokens, absolute_percpu, addrs) =
        found.ok_or_else(|| {
            ctx(
                "no offsets and relative base that decode to sorted addresses (neither after \
                 the token index nor before the count)",
            )
        })?;
    let mut symbols = Vec::with_capacity(n);
    let mut by_name = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(64);
    for (i, start) in starts.iter().enumerate() {
        let (len, body) = entry(data, p + 8 + *start as usize)
            .ok_or_else(|| ctx("a name runs past the section"))?;
        name.clear();
        for &t in data
            .get(body..body + len)
            .ok_or_else(|| ctx("a name runs past the section"))?
        {
            name.extend_from_slice(tokens[t as usize]);
        }
        let (&kind, rest) = name
            .split_first()
            .ok_or_else(|| ctx(&format!("symbol {i} has an empty name")))?;
        if !kind.is_ascii_alphabetic() {
            return Err(ctx(&format!(
                "symbol {i} has no type letter ({:?})",
                kind as char
            )));
        }
        let s = KSym {
            addr: addrs[i],
            kind,
            name: String::from_utf8_lossy(rest).into_owned(),
        };
        by_name.push((name_hash(s.name.as_bytes()), i as u32));
        symbols.push(s);
    }
    Ok(Some(Kallsyms {
        symbols,
        layout: Layout {
            num_syms: at(p),
            names: at(p + 8),
            markers: at(markers),
            token_table: at(tt),
            token_index: at(ti),
            offsets: at(offs),
            relative_base,
            offsets_after_tokens,
            absolute_percpu,
        },
        by_name: {
            by_name.sort_unstable();
            by_name
        },
    }))
}

#[cfg(test)]
mod tests {
    use pvpatch_testkit::kallsyms::{Order, encode};

    use super::*;

    const BASE: u64 = 0xffff_ffff_8200_0000;
    const TEXT: u64 = 0xffff_ffff_8100_0000;

    fn symbols(n: usize) -> Vec<(u64, u8, String)> {
        let mut v = vec![(0x0, b'A', "fixed_percpu_data".to_owned())];
        v.push((TEXT, b'T', "_text".to_owned()));
        for i in 0..n {
            v.push((TEXT + 0x10 * i as u64 + 0x10, b't', format!("f{i}")));
        }
        v.push((TEXT + 0x10 * n as u64 + 0x10, b'T', "_etext".to_owned()));
        v
    }

    /// Some unrelated bytes, then the arrays (so that nothing is found by its offset alone).
    fn rodata(syms: &[(u64, u8, String)], order: Order) -> (Vec<u8>, usize) {
        let s: Vec<(u64, u8, &str)> = syms.iter().map(|(a, k, n)| (*a, *k, n.as_str())).collect();
        let (arrays, _) = encode(&s, TEXT, order);
        let mut data = vec![0x5au8; 0x128];
        data.extend_from_slice(b"$\0%\0&\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00:\0");
        while !data.len().is_multiple_of(8) {
            data.push(0);
        }
        let at = data.len();
        data.extend_from_slice(&arrays);
        (data, at)
    }

    #[test]
    fn both_orders_decode_to_the_symbols_written() {
        for order in [Order::Old, Order::New] {
            for n in [1, 255, 256, 700] {
                let syms = symbols(n);
                let (data, _) = rodata(&syms, order);
                let k = read(&data, BASE).unwrap().unwrap();
                let got: Vec<(u64, u8, String)> = k
                    .symbols
                    .iter()
                    .map(|s| (s.addr, s.kind, s.name.clone()))
                    .collect();
                assert_eq!(got, syms, "{order:?} {n}");
                assert_eq!(k.address("_etext"), Some(syms.last().unwrap().0));
                assert_eq!(k.layout.offsets_after_tokens, order == Order::New);
                assert!(k.layout.absolute_percpu);
            }
        }
    }

    #[test]
    fn long_names_use_the_two_byte_length() {
        let mut syms = symbols(3);
        syms[2].2 = "x".repeat(300);
        let (data, _) = rodata(&syms, Order::New);
        let k = read(&data, BASE).unwrap().unwrap();
        assert_eq!(k.symbols[2].name.len(), 300);
    }

    #[test]
    fn no_token_table_is_no_kallsyms() {
        assert!(read(&[0u8; 4096], BASE).unwrap().is_none());
        assert!(read(&[], BASE).unwrap().is_none());
    }

    #[test]
    fn hostile_kallsyms_are_errors_not_panics() {
        let syms = symbols(600);
        for order in [Order::Old, Order::New] {
            let (data, at) = rodata(&syms, order);
            let s: Vec<(u64, u8, &str)> =
                syms.iter().map(|(a, k, n)| (*a, *k, n.as_str())).collect();
            let (_, off) = encode(&s, TEXT, order);
            let shift = |o: usize| at + o;
            // A count past the end of the section.
            let mut d = data.clone();
            d[shift(off.num_syms)..shift(off.num_syms) + 4]
                .copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
            let e = read(&d, BASE).unwrap_err();
            assert!(e.contains("no count, names and markers"), "{e}");
            // A name whose length runs into the markers.
            let mut d = data.clone();
            d[shift(off.names)] = 0x7f;
            assert!(read(&d, BASE).is_err());
            // Unsorted addresses: two offsets swapped.
            let mut d = data.clone();
            let o = shift(off.offsets) + 4 * 100;
            let (a, b) = (d[o..o + 4].to_vec(), d[o + 4..o + 8].to_vec());
            d[o..o + 4].copy_from_slice(&b);
            d[o + 4..o + 8].copy_from_slice(&a);
            let e = read(&d, BASE).unwrap_err();
            assert!(e.contains("sorted"), "{e}");
            // A token index that points elsewhere: no token table at all.
            let mut d = data.clone();
            d[shift(off.token_index) + 2 * 0x41] ^= 1;
            assert!(read(&d, BASE).unwrap().is_none());
            // A name that is not a type letter.
            let mut d = data.clone();
            d[shift(off.names) + 1] = b'0';
            assert!(read(&d, BASE).unwrap_err().contains("type letter"));
            // Every truncation of the section: an error or nothing, never a panic.
            for cut in (0..data.len()).step_by(97) {
                let _ = read(&data[..cut], BASE);
            }
        }
    }
}
