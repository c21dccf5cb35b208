//! Plans prepared at link time (`docs/shim.md`, "Plans prepared at link time"): for each
//! backend whose choices are known before boot, `pvpatch annotate --boot-shim` runs the
//! runtime's own validation and planner over the kernel and records the result as a list of
//! changes (where, the bytes there now, the bytes to write). The boot shim applies the list for
//! the backend it detects instead of planning at boot, but only if the list and the site table
//! are exactly what was planned from (their digests), and only after every change's old bytes
//! are found in the text; otherwise it validates and plans at boot as before.
//!
//! Layout, little-endian, read without trusting any count, offset or length:
//!
//! ```text
//! header (48 bytes)     magic "PVPPLAN2", the site table's length (u64) and digest (u64),
//!                       plans (u32), zero (u32), the directory's digest (u64), zero (u64)
//! directory             an entry of 72 bytes per plan: backend name (16 bytes, NUL-padded),
//!                       features mask, features value, sites, sites rewritten, detours, bytes
//!                       of out-of-line code, changes, zero (u32 each); the plan's offset in the
//!                       blob, its length and its digest (u64 each)
//! plan                  its changes, one after the other: record index (u32), length (u32),
//!                       address (u64), old bytes, new bytes
//! ```
//!
//! A plan serves a backend when its name is the backend's and the detected feature bits, masked
//! with its mask, equal its value (KVM's port-0x80 delay depends on a feature bit). Changes are
//! listed in the order they are written; they are taken back in the reverse order. The shim
//! checks the header, the directory and the one plan it uses, and digests the whole site
//! table ([`digest64`]): at boot under an emulator every byte read costs, so the plans of
//! other backends are not read at all.

use core::fmt;

use crate::le::{put, u32_at, u64_at};

/// The magic of a prepared plans' blob.
pub const PLANS_MAGIC: [u8; 8] = *b"PVPPLAN2";
/// Bytes of the blob's header.
pub const PLANS_HEADER: usize = 48;
/// Bytes of a directory entry.
pub const DIR_ENTRY: usize = 72;
/// Bytes of a change's header (its old and new bytes follow).
pub const CHANGE_HEADER: usize = 16;
/// Bytes of a backend's name field.
pub const NAME_LEN: usize = 16;

const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// A 64-bit digest of `b`, eight bytes a step, for telling a changed or damaged copy from the
/// original (not an adversary: whoever can write the image can write the shim). Each step
/// (`h ^ word`, times an odd constant, rotated) is a bijection of the state for a given word and
/// of the word for a given state, so two inputs of one length that differ in one 8-byte word
/// (any number of bits in it) always digest differently; the length is mixed in first.
pub fn digest64(b: &[u8]) -> u64 {
    let mut h = (b.len() as u64 ^ 0x7076_7061_7463_6821).wrapping_mul(K);
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let mut x = [0u8; 8];
        x.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(x)).wrapping_mul(K).rotate_left(29);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut x = [0u8; 8];
        x[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(x)).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 31;
    h = h.wrapping_mul(K);
    h ^ (h >> 32)
}

/// One change of the text: the bytes at `addr` now, and the bytes to write there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change<'a> {
    /// The site record it is for (`u32::MAX`: the backend's out-of-line code).
    pub index: u32,
    /// Where (a kernel virtual address).
    pub addr: u64,
    /// The bytes there now.
    pub old: &'a [u8],
    /// The bytes to write (as long as `old`).
    pub new: &'a [u8],
}

/// A plan for one backend, as written or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanSummary {
    /// The backend's name, NUL-padded.
    pub backend: [u8; NAME_LEN],
    /// Which detected feature bits the plan depends on.
    pub features_mask: u32,
    /// What they must be.
    pub features_value: u32,
    /// Sites in the table.
    pub sites: u32,
    /// Sites rewritten.
    pub rewritten: u32,
    /// Detours installed.
    pub detours: u32,
    /// Bytes of out-of-line code.
    pub code_bytes: u32,
}

impl PlanSummary {
    /// A summary for `backend` (cut to [`NAME_LEN`] - 1 bytes).
    pub fn new(backend: &str) -> PlanSummary {
        let mut name = [0u8; NAME_LEN];
        let n = backend.len().min(NAME_LEN - 1);
        name[..n].copy_from_slice(&backend.as_bytes()[..n]);
        PlanSummary {
            backend: name,
            features_mask: 0,
            features_value: 0,
            sites: 0,
            rewritten: 0,
            detours: 0,
            code_bytes: 0,
        }
    }

    /// The backend's name.
    pub fn backend(&self) -> &str {
        let n = self
            .backend
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(NAME_LEN);
        core::str::from_utf8(&self.backend[..n]).unwrap_or("?")
    }

    /// Whether the plan serves `backend` with the detected feature bits `features`.
    pub fn serves(&self, backend: &str, features: u32) -> bool {
        self.backend() == backend && features & self.features_mask == self.features_value
    }
}

/// Why a blob of prepared plans, or one of its plans, is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlansError {
    /// No magic: not prepared plans.
    BadMagic,
    /// Shorter than its header or than its directory.
    Truncated,
    /// The directory's digest does not hold.
    BadDirectory,
    /// A reserved field is not zero.
    Reserved,
    /// A plan lies outside the blob, or its changes do not fill it exactly.
    Malformed {
        /// Its index.
        plan: u32,
    },
    /// A plan's digest does not hold.
    BadPlan {
        /// Its index.
        plan: u32,
    },
}

impl fmt::Display for PlansError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlansError::BadMagic => f.write_str("no magic"),
            PlansError::Truncated => f.write_str("truncated"),
            PlansError::BadDirectory => f.write_str("the directory's digest does not hold"),
            PlansError::Reserved => f.write_str("a reserved field is not zero"),
            PlansError::Malformed { plan } => write!(f, "plan {plan} is malformed"),
            PlansError::BadPlan { plan } => write!(f, "plan {plan}: its digest does not hold"),
        }
    }
}

/// A blob of prepared plans, its header and directory checked.
#[derive(Clone, Copy, Debug)]
pub struct Plans<'a> {
    blob: &'a [u8],
    nplans: u32,
    table_digest: u64,
    table_len: u64,
}

/// A directory entry: a plan's summary and where its changes are.
#[derive(Clone, Copy, Debug)]
pub struct PlanEntry {
    /// Its index in the directory.
    pub index: u32,
    /// What it does.
    pub summary: PlanSummary,
    nchanges: u32,
    offset: u64,
    len: u64,
    digest: u64,
}

/// One plan of a blob, checked.
#[derive(Clone, Copy, Debug)]
pub struct PreparedPlan<'a> {
    /// What it does.
    pub summary: PlanSummary,
    nchanges: u32,
    changes: &'a [u8],
}

/// Reads a change at `at` in `b`; returns it and where the next one starts.
fn change_at(b: &[u8], at: usize) -> Option<(Change<'_>, usize)> {
    let index = u32_at(b, at)?;
    let len = u32_at(b, at.checked_add(4)?)? as usize;
    let addr = u64_at(b, at.checked_add(8)?)?;
    let old_at = at.checked_add(CHANGE_HEADER)?;
    let new_at = old_at.checked_add(len)?;
    let end = new_at.checked_add(len)?;
    Some((
        Change {
            index,
            addr,
            old: b.get(old_at..new_at)?,
            new: b.get(new_at..end)?,
        },
        end,
    ))
}

/// Reads directory entry `i` (its bytes `e`).
fn entry_at(e: &[u8], index: u32) -> Option<PlanEntry> {
    let mut s = PlanSummary::new("");
    s.backend.copy_from_slice(e.get(..NAME_LEN)?);
    s.features_mask = u32_at(e, 16)?;
    s.features_value = u32_at(e, 20)?;
    s.sites = u32_at(e, 24)?;
    s.rewritten = u32_at(e, 28)?;
    s.detours = u32_at(e, 32)?;
    s.code_bytes = u32_at(e, 36)?;
    Some(PlanEntry {
        index,
        summary: s,
        nchanges: u32_at(e, 40)?,
        offset: u64_at(e, 48)?,
        len: u64_at(e, 56)?,
        digest: u64_at(e, 64)?,
    })
}

impl<'a> Plans<'a> {
    /// Reads a blob's header and directory (its digest checked); the plans themselves are
    /// checked when one is taken ([`Plans::plan`]).
    pub fn read(blob: &'a [u8]) -> Result<Plans<'a>, PlansError> {
        if blob.get(..8) != Some(&PLANS_MAGIC[..]) {
            return Err(PlansError::BadMagic);
        }
        let h = blob.get(..PLANS_HEADER).ok_or(PlansError::Truncated)?;
        let q = |at| u64_at(h, at).unwrap_or(0);
        let nplans = u32_at(h, 24).unwrap_or(0);
        if u32_at(h, 28) != Some(0) || q(40) != 0 {
            return Err(PlansError::Reserved);
        }
        let dir = (nplans as usize)
            .checked_mul(DIR_ENTRY)
            .and_then(|n| blob.get(PLANS_HEADER..PLANS_HEADER.checked_add(n)?))
            .ok_or(PlansError::Truncated)?;
        if digest64(dir) != q(32) {
            return Err(PlansError::BadDirectory);
        }
        if dir
            .chunks_exact(DIR_ENTRY)
            .any(|e| u32_at(e, 44) != Some(0))
        {
            return Err(PlansError::Reserved);
        }
        Ok(Plans {
            blob,
            nplans,
            table_digest: q(16),
            table_len: q(8),
        })
    }

    /// Whether `table` is the site table the plans were made from (its length and digest).
    pub fn matches_table(&self, table: &[u8]) -> bool {
        table.len() as u64 == self.table_len && digest64(table) == self.table_digest
    }

    /// The directory's entries.
    pub fn entries(&self) -> impl Iterator<Item = PlanEntry> + 'a {
        let blob = self.blob;
        (0..self.nplans).filter_map(move |i| {
            let at = PLANS_HEADER + i as usize * DIR_ENTRY;
            entry_at(blob.get(at..at + DIR_ENTRY)?, i)
        })
    }

    /// The entry of the plan that serves `backend` with the detected feature bits `features`
    /// (see [`PlanSummary::serves`]; only the entry found is read whole).
    pub fn find(&self, backend: &str, features: u32) -> Option<PlanEntry> {
        let name = backend.as_bytes();
        if name.len() >= NAME_LEN {
            return None;
        }
        (0..self.nplans).find_map(|i| {
            let at = PLANS_HEADER + i as usize * DIR_ENTRY;
            let e = self.blob.get(at..at + DIR_ENTRY)?;
            let named = e[..name.len()] == *name && e[name.len()] == 0;
            (named && features & u32_at(e, 16)? == u32_at(e, 20)?)
                .then(|| entry_at(e, i))
                .flatten()
        })
    }

    /// The plan of `entry`, checked: inside the blob, its digest, and its changes filling it
    /// exactly (so that iterating them cannot fail).
    pub fn plan(&self, entry: &PlanEntry) -> Result<PreparedPlan<'a>, PlansError> {
        let malformed = PlansError::Malformed { plan: entry.index };
        let start = usize::try_from(entry.offset).map_err(|_| malformed)?;
        let len = usize::try_from(entry.len).map_err(|_| malformed)?;
        let b = start
            .checked_add(len)
            .and_then(|end| self.blob.get(start..end))
            .ok_or(malformed)?;
        if digest64(b) != entry.digest {
            return Err(PlansError::BadPlan { plan: entry.index });
        }
        let mut at = 0;
        for _ in 0..entry.nchanges {
            at = change_at(b, at).ok_or(malformed)?.1;
        }
        if at != b.len() {
            return Err(malformed);
        }
        Ok(PreparedPlan {
            summary: entry.summary,
            nchanges: entry.nchanges,
            changes: b,
        })
    }
}

impl<'a> PreparedPlan<'a> {
    /// How many changes.
    pub fn len(&self) -> usize {
        self.nchanges as usize
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.nchanges == 0
    }

    /// Its changes, in the order they are written.
    pub fn changes(&self) -> impl Iterator<Item = Change<'a>> + 'a {
        let b = self.changes;
        let mut at = 0;
        (0..self.nchanges).map_while(move |_| {
            let (c, next) = change_at(b, at)?;
            at = next;
            Some(c)
        })
    }
}

/// One plan to write: what it does, and its changes in the order they are written.
#[derive(Clone, Copy, Debug)]
pub struct PlanSpec<'s, 'a> {
    /// What it does.
    pub summary: PlanSummary,
    /// Its changes.
    pub changes: &'s [Change<'a>],
}

fn changes_size(p: &PlanSpec<'_, '_>) -> usize {
    p.changes
        .iter()
        .map(|c| CHANGE_HEADER + 2 * c.old.len())
        .sum()
}

/// Bytes of the blob that holds `plans`.
pub fn plans_size(plans: &[PlanSpec<'_, '_>]) -> usize {
    PLANS_HEADER
        + plans
            .iter()
            .map(|p| DIR_ENTRY + changes_size(p))
            .sum::<usize>()
}

/// Writes the blob of `plans`, made from the site table `table`, into `out` (at least
/// [`plans_size`] bytes); returns its length, or `None` if it does not fit or a change's old
/// and new bytes differ in length.
pub fn write_plans(table: &[u8], plans: &[PlanSpec<'_, '_>], out: &mut [u8]) -> Option<usize> {
    let size = plans_size(plans);
    let out = out.get_mut(..size)?;
    out.fill(0);
    put(out, 0, &PLANS_MAGIC)?;
    put(out, 8, &(table.len() as u64).to_le_bytes())?;
    put(out, 16, &digest64(table).to_le_bytes())?;
    put(out, 24, &u32::try_from(plans.len()).ok()?.to_le_bytes())?;
    let dir_end = PLANS_HEADER + plans.len() * DIR_ENTRY;
    let mut at = dir_end;
    for (i, p) in plans.iter().enumerate() {
        let start = at;
        for c in p.changes {
            if c.old.len() != c.new.len() {
                return None;
            }
            put(out, at, &c.index.to_le_bytes())?;
            put(out, at + 4, &u32::try_from(c.old.len()).ok()?.to_le_bytes())?;
            put(out, at + 8, &c.addr.to_le_bytes())?;
            put(out, at + CHANGE_HEADER, c.old)?;
            put(out, at + CHANGE_HEADER + c.old.len(), c.new)?;
            at += CHANGE_HEADER + 2 * c.old.len();
        }
        let e = PLANS_HEADER + i * DIR_ENTRY;
        let s = &p.summary;
        put(out, e, &s.backend)?;
        let fields = [
            s.features_mask,
            s.features_value,
            s.sites,
            s.rewritten,
            s.detours,
            s.code_bytes,
            u32::try_from(p.changes.len()).ok()?,
        ];
        for (k, v) in fields.iter().enumerate() {
            put(out, e + NAME_LEN + 4 * k, &v.to_le_bytes())?;
        }
        put(out, e + 48, &(start as u64).to_le_bytes())?;
        put(out, e + 56, &((at - start) as u64).to_le_bytes())?;
        put(out, e + 64, &digest64(&out[start..at]).to_le_bytes())?;
    }
    let dir = digest64(&out[PLANS_HEADER..dir_end]);
    put(out, 32, &dir.to_le_bytes())?;
    Some(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<u8>) {
        let table = b"a site table".to_vec();
        let changes = [
            Change {
                index: 3,
                addr: 0xffff_ffff_8100_0000,
                old: &[0xe6, 0x80],
                new: &[0x66, 0x90],
            },
            Change {
                index: u32::MAX,
                addr: 0xffff_ffff_8200_0000,
                old: &[0xcc; 5],
                new: &[1, 2, 3, 4, 5],
            },
        ];
        let mut kvm = PlanSummary::new("kvm");
        kvm.features_mask = 2;
        kvm.features_value = 2;
        kvm.rewritten = 1;
        let plans = [
            PlanSpec {
                summary: PlanSummary::new("native"),
                changes: &[],
            },
            PlanSpec {
                summary: kvm,
                changes: &changes,
            },
        ];
        let mut out = vec![0u8; plans_size(&plans)];
        let n = write_plans(&table, &plans, &mut out).unwrap();
        assert_eq!(n, out.len());
        (table, out)
    }

    fn plan<'a>(p: &Plans<'a>, name: &str, f: u32) -> Option<PreparedPlan<'a>> {
        p.find(name, f).map(|e| p.plan(&e).unwrap())
    }

    #[test]
    fn plans_read_back_as_written_and_serve_their_backend() {
        let (table, blob) = sample();
        let p = Plans::read(&blob).unwrap();
        assert!(p.matches_table(&table));
        assert!(!p.matches_table(b"a site tablf"));
        assert_eq!(p.entries().count(), 2);
        assert!(plan(&p, "native", 0xffff).unwrap().is_empty());
        assert!(p.find("kvm", 0).is_none());
        let kvm = plan(&p, "kvm", 3).unwrap();
        assert_eq!(kvm.summary.rewritten, 1);
        let c: Vec<_> = kvm.changes().collect();
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].index, c[0].old, c[0].new),
            (3, &[0xe6, 0x80][..], &[0x66, 0x90][..])
        );
        assert_eq!(c[1].new, &[1, 2, 3, 4, 5]);
        assert!(p.find("tcg", 0).is_none());
    }

    /// Whether the blob `b` yields every plan whole and the table matches: what the shim needs.
    fn usable(b: &[u8], table: &[u8]) -> bool {
        let Ok(p) = Plans::read(b) else {
            return false;
        };
        p.matches_table(table)
            && p.entries().count() == 2
            && p.entries().all(|e| p.plan(&e).is_ok())
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_refused() {
        let (table, blob) = sample();
        assert!(usable(&blob, &table));
        for i in 0..blob.len() {
            for bit in 0..8 {
                let mut b = blob.clone();
                b[i] ^= 1 << bit;
                assert!(!usable(&b, &table), "byte {i} bit {bit}");
            }
        }
        for n in 0..blob.len() {
            assert!(!usable(&blob[..n], &table), "{n} bytes");
        }
    }

    #[test]
    fn a_digest_differs_for_any_change_within_one_word() {
        let base: Vec<u8> = (0..61u8).map(|i| i.wrapping_mul(37)).collect();
        let d = digest64(&base);
        for i in 0..base.len() {
            for v in [0u8, 1, 0x80, 0xff] {
                let mut b = base.clone();
                if b[i] == v {
                    continue;
                }
                b[i] = v;
                assert_ne!(digest64(&b), d, "byte {i} = {v}");
            }
        }
        assert_ne!(digest64(&base[..60]), d);
        assert_ne!(digest64(&[]), digest64(&[0]));
        assert_ne!(digest64(&[0; 8]), digest64(&[0; 16]));
    }

    /// With the directory's digest made to hold again, the sample's kvm plan is malformed.
    fn kvm_is_malformed(b: &mut [u8]) {
        let dir = digest64(&b[PLANS_HEADER..PLANS_HEADER + 2 * DIR_ENTRY]);
        b[32..40].copy_from_slice(&dir.to_le_bytes());
        let p = Plans::read(b).unwrap();
        let entry = p.find("kvm", 2).unwrap();
        assert_eq!(
            p.plan(&entry).unwrap_err(),
            PlansError::Malformed { plan: 1 }
        );
    }

    #[test]
    fn a_plan_past_the_blob_or_with_a_huge_change_is_malformed_not_a_panic() {
        let (_, blob) = sample();
        // The kvm plan's length made to reach past the end, its directory digest made to hold.
        let mut b = blob.clone();
        let e = PLANS_HEADER + DIR_ENTRY;
        b[e + 56..e + 64].copy_from_slice(&u64::MAX.to_le_bytes());
        kvm_is_malformed(&mut b);
        // A change length near u32::MAX, both digests made to hold.
        let mut b = blob.clone();
        let first_change = PLANS_HEADER + 2 * DIR_ENTRY;
        b[first_change + 4..first_change + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        let end = b.len();
        let pd = digest64(&b[first_change..end]);
        b[e + 64..e + 72].copy_from_slice(&pd.to_le_bytes());
        kvm_is_malformed(&mut b);
        // A count of plans past the blob.
        let mut b = blob;
        b[24] = 0xff;
        assert_eq!(Plans::read(&b).unwrap_err(), PlansError::Truncated);
    }
}
