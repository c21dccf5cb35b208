//! Property tests of the boot-time patcher on simulated kernel text: the native encoder agrees
//! with the decoder for every op, operand and width; planning and applying for any backend
//! writes only inside sites, only what decodes as intended, and reverting restores every byte.
//! `PROPTEST_CASES` raises the case count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;

use patch_sites::Outcome;
use patch_sites::op::Kind;
use patch_sites::table::{AddrRange, Form, Site, SiteTable, sealed_table_size, write_sealed_table};
use patch_sites::{Op, Operand, RegSet};
use proptest::prelude::*;
use pvpatch_isa::check;
use pvpatch_isa::encode;
use pvpatch_oracle::strategies as strat;
use pvpatch_runtime::apply::{self, TextPoke};
use pvpatch_runtime::backend::Backend;
use pvpatch_runtime::detect::{BackendKind, Detected, KVM_FEATURE_NOP_IO_DELAY};
use pvpatch_runtime::plan::{self, TextRead};

const BASE: u64 = 0xffff_ffff_8100_0000;

fn site_of(op_id: u16, operand: Operand, width: u8, flags: u8) -> Site {
    Site {
        addr: BASE,
        site_len: 0,
        insn_len: 0,
        op_id,
        form: Form::Native,
        operand,
        width,
        flags,
        clobbers: RegSet::EMPTY,
        stub: None,
    }
}

/// Kernel text in a vector.
struct Text {
    bytes: Vec<u8>,
    writes: Cell<usize>,
}

impl TextRead for Text {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        let Some(at) = addr.checked_sub(BASE).map(|a| a as usize) else {
            return false;
        };
        match self.bytes.get(at..at + out.len()) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

impl TextPoke for Text {
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let at = (addr - BASE) as usize;
        self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
        self.writes.set(self.writes.get() + 1);
    }

    fn sync(&mut self) {}
}

fn backend(kind: BackendKind, features: u32) -> Backend<'static> {
    Backend {
        detected: Detected::assumed(kind, features),
        rom: None,
        pv: None,
        thunks: None,
    }
}

/// One site of generated text: its record, and the bytes an annotated kernel holds there.
fn placed(
    (op_id, operand, width, flags): (u16, Operand, u8, u8),
    call_form: bool,
    pad: u8,
) -> Option<(Site, Vec<u8>)> {
    let s = site_of(op_id, operand, width, flags);
    let op = s.op()?;
    let native = encode::native(&s)?;
    if call_form && matches!(op.info().kind, Kind::Instruction | Kind::Idiom) {
        // `call [rip + disp32]`, as the indirect-call form emits it.
        let mut b = vec![0xff, 0x15, 0, 0x10, 0, 0];
        b.resize(6 + pad as usize, 0);
        encode::fill_nops(&mut b[6..]);
        let room = b.len().max(native.len()) as u8;
        b.resize(room as usize, 0);
        encode::fill_nops(&mut b[6..]);
        return Some((
            Site {
                form: Form::IndirectCall,
                insn_len: 6,
                site_len: room,
                ..s
            },
            b,
        ));
    }
    let mut b = native.as_slice().to_vec();
    b.resize(native.len() + pad as usize, 0);
    encode::fill_nops(&mut b[native.len()..]);
    Some((
        Site {
            insn_len: native.len() as u8,
            site_len: b.len() as u8,
            ..s
        },
        b,
    ))
}

proptest! {
    #![proptest_config(pvpatch_oracle::proptest_config())]

    /// Whatever the encoder emits for a record decodes and classifies back to that record
    /// (op, operand, width, rep), at its length.
    #[test]
    fn native_encoding_decodes_to_its_record(k in strat::op_and_operand()) {
        let (op_id, operand, width, flags) = k;
        let mut s = site_of(op_id, operand, width, flags);
        let Some(op) = s.op() else { return Ok(()) };
        match encode::native(&s) {
            Some(seq) => {
                s.insn_len = seq.len() as u8;
                s.site_len = s.insn_len;
                prop_assert_eq!(check::native_insn(seq.as_slice(), BASE, &s), Ok(()));
                prop_assert_eq!(check::original(seq.as_slice(), BASE, &s), Ok(()));
            }
            None => {
                // Only what a record cannot describe exactly may be unencodable.
                prop_assert!(
                    operand == Operand::MemOther
                        || op.info().kind == Kind::HypervisorInterface,
                    "{} {:?} width {} has no encoding", op, operand, width
                );
            }
        }
    }

    /// Plan, apply and revert on generated text, for every built-in backend: the plan holds
    /// exactly what decodes as intended; nothing outside a site changes; revert is exact.
    #[test]
    fn plan_apply_revert_touch_only_sites(
        shapes in proptest::collection::vec(
            (strat::op_and_operand(), any::<bool>(), 0u8..8, 0usize..6),
            1..40,
        ),
        kind in prop_oneof![
            Just(BackendKind::Native),
            Just(BackendKind::Tcg),
            Just(BackendKind::Kvm),
            Just(BackendKind::Vmware),
            Just(BackendKind::Xen),
        ],
    ) {
        // Lay the sites out with filler (int3) between them.
        let mut bytes = Vec::new();
        let mut sites = Vec::new();
        for (k, call, pad, gap) in shapes {
            let Some((mut s, b)) = placed(k, call, pad) else { continue };
            bytes.extend(std::iter::repeat_n(0xcc, gap));
            s.addr = BASE + bytes.len() as u64;
            bytes.extend_from_slice(&b);
            sites.push(s);
        }
        prop_assume!(!sites.is_empty());
        let text_range = AddrRange::new(BASE, BASE + bytes.len() as u64);
        let table_addr = BASE + 0x100_0000;
        let mut tb = vec![0u8; sealed_table_size(sites.len())];
        write_sealed_table(&sites, table_addr, &mut tb).unwrap();
        let table = SiteTable::parse_contiguous(&tb, table_addr, &[text_range]).unwrap();
        let mut text = Text { bytes: bytes.clone(), writes: Cell::new(0) };
        let b = backend(kind, KVM_FEATURE_NOP_IO_DELAY);
        let p = plan::plan(&table, &b, &text, None).unwrap();
        apply::apply(&p, &mut text).unwrap();

        let mut in_site = vec![false; bytes.len()];
        for (s, planned) in sites.iter().zip(&p.sites) {
            let at = (s.addr - BASE) as usize;
            let now = &text.bytes[at..at + s.site_len as usize];
            in_site[at..at + s.site_len as usize].iter_mut().for_each(|x| *x = true);
            let op = s.op().unwrap();
            match planned.outcome {
                Outcome::Unchanged => prop_assert_eq!(now, &bytes[at..at + s.site_len as usize]),
                Outcome::Native => {
                    let mut n = *s;
                    n.insn_len = encode::native(s).unwrap().len() as u8;
                    prop_assert_eq!(check::native_insn(now, s.addr, &n), Ok(()));
                    prop_assert_eq!(check::nops(now, s.addr, n.insn_len as usize), Ok(()));
                }
                Outcome::Nothing => {
                    prop_assert_eq!(op, Op::IoDelay);
                    prop_assert!(matches!(kind, BackendKind::Kvm | BackendKind::Vmware | BackendKind::Xen));
                    prop_assert_eq!(check::nops(now, s.addr, 0), Ok(()));
                }
                other => prop_assert!(false, "{:?} from a built-in backend", other),
            }
            // Native sites stay native under every built-in backend but for io_delay.
            if s.form == Form::Native && op != Op::IoDelay {
                prop_assert_eq!(planned.outcome, Outcome::Unchanged);
            }
        }
        for (i, (a, b)) in bytes.iter().zip(&text.bytes).enumerate() {
            prop_assert!(in_site[i] || a == b, "byte {:#x} outside every site changed", i);
        }
        apply::revert(&p, &mut text);
        prop_assert_eq!(&text.bytes, &bytes);
    }
}
