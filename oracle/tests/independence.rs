//! The oracle owes nothing to the code it checks: its reference encodings come from its own use
//! of iced-x86's encoder, its Xen and Hyper-V facts from its own transcription of the published
//! interfaces. Here the runtime is checked against both (every op, operand and width the ABI
//! allows; every constant the runtime's Xen and Hyper-V code uses), and the oracle's sources
//! are checked not to reach for the runtime's encoder or constants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use patch_sites::op::check_operand;
use patch_sites::table::{Form, SITE_FLAG_REP, Site};
use patch_sites::{ALL_OPS, Gpr, Op, Operand, RegSet};
use pvpatch_oracle::oracle::published::{hyperv, xen};
use pvpatch_oracle::oracle::reference;
use pvpatch_runtime::pv::{hyperv_abi, xen_abi};

fn decode_all(b: &[u8]) -> Vec<Instruction> {
    let mut d = Decoder::with_ip(64, b, 0, DecoderOptions::NONE);
    let mut v = Vec::new();
    while d.can_decode() {
        v.push(d.decode());
    }
    v
}

/// What an instruction does, whatever bytes encode it: mnemonic, and each operand.
fn meaning(i: &Instruction) -> String {
    let ops: Vec<String> = (0..i.op_count())
        .map(|n| match i.op_kind(n) {
            OpKind::Register => format!("{:?}", i.op_register(n)),
            OpKind::Memory => format!(
                "[{:?}+{:?}*{}+{:#x}]",
                i.memory_base(),
                i.memory_index(),
                i.memory_index_scale(),
                i.memory_displacement64()
            ),
            OpKind::Immediate8 => format!("{:#x}", i.immediate8()),
            k => format!("{k:?}"),
        })
        .collect();
    let rep = if i.has_rep_prefix() { "rep " } else { "" };
    format!("{rep}{:?} {}", i.mnemonic(), ops.join(", "))
}

fn operands() -> Vec<Operand> {
    let mut v = vec![
        Operand::None,
        Operand::PortDx,
        Operand::PortImm(0x80),
        Operand::PortImm(0x71),
    ];
    for g in Gpr::ALL {
        v.push(Operand::Reg(g));
        v.push(Operand::MemBase(g));
        v.push(Operand::DebugReg { dr: 7, reg: g });
        v.push(Operand::DebugReg { dr: 0, reg: g });
        v.push(Operand::RegMemBase {
            reg: g,
            base: Gpr::Rsi,
        });
    }
    v
}

#[test]
fn the_runtimes_encoder_agrees_with_the_oracles() {
    let (mut shapes, mut same_bytes) = (0, 0);
    let mut wrong = Vec::new();
    for &op in ALL_OPS {
        for operand in operands() {
            for width in [0u8, 1, 2, 4, 8] {
                if check_operand(op, operand, width).is_err() {
                    continue;
                }
                for rep in [false, true] {
                    if rep && !matches!(op, Op::Ins | Op::Outs) {
                        continue;
                    }
                    let site = Site {
                        addr: 0,
                        site_len: 15,
                        insn_len: 15,
                        op_id: op.id(),
                        form: Form::Native,
                        operand,
                        width,
                        flags: if rep { SITE_FLAG_REP } else { 0 },
                        clobbers: RegSet::EMPTY,
                        stub: None,
                    };
                    let theirs = pvpatch_isa::encode::native(&site);
                    let ours = reference::native(op, operand, width, rep);
                    match (theirs, ours) {
                        (None, None) => {}
                        (Some(t), Some(o)) => {
                            shapes += 1;
                            if t.as_slice() == o.as_slice() {
                                same_bytes += 1;
                            }
                            let (a, b): (Vec<_>, Vec<_>) = (
                                decode_all(t.as_slice()).iter().map(meaning).collect(),
                                decode_all(&o).iter().map(meaning).collect(),
                            );
                            if a != b {
                                wrong.push(format!(
                                    "{op} {operand:?} w{width}: runtime {a:?}, oracle {b:?}"
                                ));
                            }
                        }
                        (t, o) => wrong.push(format!(
                            "{op} {operand:?} w{width}: runtime {}, oracle {}",
                            if t.is_some() { "encodes" } else { "does not" },
                            if o.is_some() { "encodes" } else { "does not" }
                        )),
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} differences:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(shapes > 600, "{shapes} shapes compared");
    eprintln!(
        "{shapes} op/operand/width shapes: the runtime's encoding means what the oracle's does \
         ({same_bytes} byte for byte, {} with other bytes)",
        shapes - same_bytes
    );
}

#[test]
fn nops_of_every_length_are_nops() {
    for n in 0..40 {
        let mut ours = vec![0u8; n];
        reference::nops(&mut ours);
        let mut theirs = vec![0u8; n];
        pvpatch_isa::encode::fill_nops(&mut theirs);
        for (who, b) in [("oracle", &ours), ("runtime", &theirs)] {
            let total: usize = decode_all(b)
                .iter()
                .inspect(|i| assert_eq!(i.mnemonic(), iced_x86::Mnemonic::Nop, "{who}: {b:02x?}"))
                .map(|i| i.len())
                .sum();
            assert_eq!(total, n, "{who}");
        }
    }
}

#[test]
fn the_runtimes_hypervisor_constants_are_the_published_ones() {
    let pairs: [(&str, u64, u64); 12] = [
        (
            "__HYPERVISOR_xen_version",
            xen_abi::XEN_VERSION,
            xen::HYPERVISOR_XEN_VERSION,
        ),
        (
            "__HYPERVISOR_mmuext_op",
            xen_abi::MMUEXT_OP,
            xen::HYPERVISOR_MMUEXT_OP,
        ),
        (
            "__HYPERVISOR_sched_op",
            xen_abi::SCHED_OP,
            xen::HYPERVISOR_SCHED_OP,
        ),
        ("SCHEDOP_block", xen_abi::SCHEDOP_BLOCK, xen::SCHEDOP_BLOCK),
        (
            "MMUEXT_NEW_BASEPTR",
            xen_abi::MMUEXT_NEW_BASEPTR.into(),
            xen::MMUEXT_NEW_BASEPTR.into(),
        ),
        (
            "MMUEXT_INVLPG_LOCAL",
            xen_abi::MMUEXT_INVLPG_LOCAL.into(),
            xen::MMUEXT_INVLPG_LOCAL.into(),
        ),
        (
            "DOMID_SELF",
            xen_abi::DOMID_SELF.into(),
            xen::DOMID_SELF.into(),
        ),
        (
            "the hypercall page's stride",
            xen_abi::STRIDE,
            xen::HYPERCALL_STRIDE,
        ),
        (
            "HvCallFlushVirtualAddressSpace",
            hyperv_abi::FLUSH_VIRTUAL_ADDRESS_SPACE,
            hyperv::CALL_FLUSH_VIRTUAL_ADDRESS_SPACE,
        ),
        (
            "HvCallFlushVirtualAddressSpaceList",
            hyperv_abi::FLUSH_VIRTUAL_ADDRESS_LIST,
            hyperv::CALL_FLUSH_VIRTUAL_ADDRESS_LIST,
        ),
        (
            "HV_FLUSH_ALL_PROCESSORS",
            hyperv_abi::FLUSH_ALL_PROCESSORS,
            hyperv::FLUSH_ALL_PROCESSORS,
        ),
        (
            "HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES",
            hyperv_abi::FLUSH_ALL_ADDRESS_SPACES,
            hyperv::FLUSH_ALL_VIRTUAL_ADDRESS_SPACES,
        ),
    ];
    let mut wrong: Vec<String> = pairs
        .iter()
        .filter(|(_, r, o)| r != o)
        .map(|(n, r, o)| format!("{n}: the runtime says {r:#x}, the published value is {o:#x}"))
        .collect();
    if hyperv_abi::FLUSH_NON_GLOBAL_ONLY != hyperv::FLUSH_NON_GLOBAL_MAPPINGS_ONLY {
        wrong.push("HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY".into());
    }
    if hyperv_abi::REP_COUNT_SHIFT != hyperv::CONTROL_REP_COUNT_SHIFT {
        wrong.push("the control word's rep count".into());
    }
    if hyperv_abi::SYNTHETIC_APIC_MSRS != [hyperv::MSR_EOI, hyperv::MSR_ICR, hyperv::MSR_TPR] {
        wrong.push("the synthetic APIC MSRs and their x2APIC registers".into());
    }
    // The hypercall-page MSR values the runtime writes.
    let (msr, value) = pvpatch_runtime::pv::hyperv_hypercall_page_msr(0x1234_5678);
    if (msr, value) != (hyperv::MSR_HYPERCALL, 0x1234_5000 | 1) {
        wrong.push(format!(
            "HV_X64_MSR_HYPERCALL: the runtime writes {value:#x} to {msr:#x} (enable bit 0, frame in 63:12)"
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The oracle's sources do not reach for what they check.
#[test]
fn the_oracle_does_not_use_the_runtimes_encoder_or_constants() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for banned in [
                    "pvpatch_isa::encode",
                    "xen_abi",
                    "hyperv_abi",
                    "encode::native",
                    "fill_nops",
                ] {
                    if code.contains(banned) {
                        found.push(format!("{}:{}: {banned}", p.display(), n + 1));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
