//! A kallsyms writer, for test images: the arrays `scripts/kallsyms` emits, laid out in either of
//! the two orders kernels use, without compression (each character is its own token, as every
//! character of every name is in a real kernel). Tests then corrupt what they need: the count,
//! a name's length, a token index entry, an offset.

/// The order of the arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Before 6.4: `offsets, relative_base, num_syms, names, markers, seqs, token_table,
    /// token_index` (Debian's 6.1, with the seqs array of 6.2).
    Old,
    /// 6.4 and later: `num_syms, names, markers, token_table, token_index, offsets,
    /// relative_base, seqs`.
    New,
}

/// Where the arrays are, as offsets into the bytes [`encode`] returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `kallsyms_num_syms`.
    pub num_syms: usize,
    /// `kallsyms_names`.
    pub names: usize,
    /// `kallsyms_markers`.
    pub markers: usize,
    /// `kallsyms_token_table`.
    pub token_table: usize,
    /// `kallsyms_token_index`.
    pub token_index: usize,
    /// `kallsyms_offsets`.
    pub offsets: usize,
    /// `kallsyms_relative_base`.
    pub relative_base: usize,
}

fn pad8(b: &mut Vec<u8>) {
    while !b.len().is_multiple_of(8) {
        b.push(0);
    }
}

/// The token of code `c`: the character itself where names may use it, else a two-character
/// string (real kernels put multi-character tokens there).
fn token(c: u8) -> Vec<u8> {
    if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' {
        vec![c]
    } else {
        vec![b'_', b'a' + c % 26]
    }
}

/// The kallsyms arrays for `symbols` (`(address, type letter, name)`, sorted by address; names
/// of `[A-Za-z0-9_.]`), starting at an 8-aligned address, with `relative_base` and absolute
/// per-CPU offsets for addresses below `relative_base`.
pub fn encode(symbols: &[(u64, u8, &str)], relative_base: u64, order: Order) -> (Vec<u8>, Offsets) {
    let n = symbols.len();
    let mut names = Vec::new();
    let mut starts = Vec::new();
    for (_, kind, name) in symbols {
        starts.push(names.len() as u32);
        let len = 1 + name.len();
        if len < 0x80 {
            names.push(len as u8);
        } else {
            names.push(0x80 | (len & 0x7f) as u8);
            names.push((len >> 7) as u8);
        }
        names.push(*kind);
        names.extend_from_slice(name.as_bytes());
    }
    let markers: Vec<u8> = (0..n.div_ceil(256))
        .flat_map(|k| starts[256 * k].to_le_bytes())
        .collect();
    let mut table = Vec::new();
    let mut index = Vec::new();
    for c in 0..=255u8 {
        index.extend_from_slice(&(table.len() as u16).to_le_bytes());
        table.extend_from_slice(&token(c));
        table.push(0);
    }
    let offsets: Vec<u8> = symbols
        .iter()
        .flat_map(|(a, _, _)| {
            let o = if *a < relative_base {
                *a as i32
            } else {
                -((a - relative_base) as i64) as i32 - 1
            };
            o.to_le_bytes()
        })
        .collect();
    let seqs = vec![0u8; 3 * n];
    let mut out = Vec::new();
    let mut at = Offsets::default();
    let put = |out: &mut Vec<u8>, bytes: &[u8]| -> usize {
        pad8(out);
        let here = out.len();
        out.extend_from_slice(bytes);
        here
    };
    let count = [(n as u32).to_le_bytes(), [0; 4]].concat();
    match order {
        Order::Old => {
            at.offsets = put(&mut out, &offsets);
            at.relative_base = put(&mut out, &relative_base.to_le_bytes());
            at.num_syms = put(&mut out, &count);
            at.names = put(&mut out, &names);
            at.markers = put(&mut out, &markers);
            put(&mut out, &seqs);
            at.token_table = put(&mut out, &table);
            at.token_index = put(&mut out, &index);
        }
        Order::New => {
            at.num_syms = put(&mut out, &count);
            at.names = put(&mut out, &names);
            at.markers = put(&mut out, &markers);
            at.token_table = put(&mut out, &table);
            at.token_index = put(&mut out, &index);
            at.offsets = put(&mut out, &offsets);
            at.relative_base = put(&mut out, &relative_base.to_le_bytes());
            put(&mut out, &seqs);
        }
    }
    pad8(&mut out);
    (out, at)
}
