//! `pvpatch verify`: re-read an annotated image and check that every record of its table lands on
//! the instruction it names, with the operand it names, followed by the padding it claims.

use patch_sites::prepared::Plans;
use patch_sites::shim::Params;
use patch_sites::table::{Form, SEALED_SECTION, Site, SiteTable, TableError};
use pvpatch_isa::check;
use thiserror::Error;

use crate::annotate::{sealed_table, table_address};
use crate::ledger::hex;
use crate::load::image::Image;

/// Why verification could not even start.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// The image has no table.
    #[error("{0} has no {SEALED_SECTION} section: it is not annotated")]
    NotAnnotated(String),
    /// The table is refused as a whole.
    #[error("the site table is invalid")]
    Table(#[source] TableError),
}

/// One record that does not match the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Record index.
    pub index: usize,
    /// Site address.
    pub addr: u64,
    /// What is wrong.
    pub what: String,
}

/// One load-time detour that does not match the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetourMismatch {
    /// Its index.
    pub index: u16,
    /// What is wrong.
    pub what: String,
}

/// The result of verification.
#[derive(Clone, Debug)]
pub struct Verified {
    /// Where the table is.
    pub table_addr: u64,
    /// Whether it is where a runtime looks for it.
    pub placement_ok: bool,
    /// Sites checked.
    pub sites: usize,
    /// Sites whose op this tool does not know (not checkable).
    pub unknown_ops: usize,
    /// Records that do not match.
    pub mismatches: Vec<Mismatch>,
    /// Load-time detours checked (their stubs against the instructions they move).
    pub detours: usize,
    /// Detours that do not match.
    pub detour_mismatches: Vec<DetourMismatch>,
    /// The boot shim, if the image has one: where it loads, where its report page is, and what
    /// is wrong with it.
    pub shim: Option<ShimCheck>,
}

/// The boot shim of an image, checked.
#[derive(Clone, Debug, Default)]
pub struct ShimCheck {
    /// Its physical address.
    pub phys: u64,
    /// Its report page's.
    pub report: u64,
    /// The kernel's own PVH entry it hands over to.
    pub linux_entry: u64,
    /// The backends it has plans prepared at link time for (each checked: framing,
    /// checksums, made from this table, every change inside the kernel's code and its old bytes
    /// the image's).
    pub prepared: Vec<String>,
    /// What is wrong (empty when nothing is).
    pub problems: Vec<String>,
}

impl Verified {
    /// Whether everything matched.
    pub fn ok(&self) -> bool {
        self.placement_ok
            && self.mismatches.is_empty()
            && self.detour_mismatches.is_empty()
            && self.shim.as_ref().is_none_or(|s| s.problems.is_empty())
    }
}

/// Checks an image's boot shim: its parameters there, naming the sealed table and the kernel's
/// segments; the PVH entry note pointing at it; the kernel's entry inside a segment.
fn check_shim(image: &Image, table: (u64, &[u8])) -> Option<ShimCheck> {
    let section = image.section(crate::shim::SHIM_SECTION)?;
    let seg = image
        .segments
        .iter()
        .find(|g| g.kind == object::elf::PT_LOAD && g.vaddr == section.addr);
    let mut c = ShimCheck::default();
    let Some(seg) = seg else {
        c.problems
            .push("its section has no loadable segment".into());
        return Some(c);
    };
    c.phys = seg.paddr;
    let Some(p) = crate::shim::existing(image) else {
        c.problems
            .push("its parameters are missing or invalid".into());
        return Some(c);
    };
    c.report = seg.paddr + p.report_offset;
    c.linux_entry = p.linux_entry;
    if p.shim_phys != seg.paddr {
        c.problems.push(format!(
            "its parameters say it loads at {:#x}, its segment at {:#x}",
            p.shim_phys, seg.paddr
        ));
    }
    if image.pvh_entry() != Some(seg.paddr) {
        c.problems
            .push("the PVH entry note does not point at it: the loader would not enter it".into());
    }
    if (p.table_vaddr, p.table_len as usize) != (table.0, table.1.len()) {
        c.problems
            .push("its parameters name another site table".into());
    }
    if !p
        .segments()
        .iter()
        .any(|s| p.linux_entry >= s.paddr && p.linux_entry < s.paddr + s.memsz)
    {
        c.problems.push(format!(
            "the kernel's entry {:#x} is in none of its segments",
            p.linux_entry
        ));
    }
    let plans = image.section(crate::shim::PLANS_SECTION);
    let kernel_loads = image
        .segments
        .iter()
        .filter(|g| {
            g.kind == object::elf::PT_LOAD
                && g.vaddr != section.addr
                && plans.is_none_or(|s| g.vaddr != s.addr)
        })
        .count();
    if p.segments().len() != kernel_loads {
        c.problems.push(format!(
            "its parameters list {} segments, the kernel has {kernel_loads}",
            p.segments().len()
        ));
    }
    check_plans(image, &p, table.1, &mut c);
    Some(c)
}

/// Checks the plans prepared for the shim: where its parameters say, whole, made from this
/// table, each change inside the kernel's code and finding its old bytes in the image.
fn check_plans(image: &Image, p: &Params, table: &[u8], c: &mut ShimCheck) {
    if p.plans_len == 0 {
        return;
    }
    let Some(s) = image.section(crate::shim::PLANS_SECTION) else {
        return c.problems.push(format!(
            "its parameters name {} bytes of prepared plans, and there is no {} section",
            p.plans_len,
            crate::shim::PLANS_SECTION
        ));
    };
    let at_phys = image
        .segments
        .iter()
        .any(|g| g.kind == object::elf::PT_LOAD && g.vaddr == s.addr && g.paddr == p.plans_phys);
    if !at_phys || s.size != p.plans_len {
        c.problems.push(format!(
            "its prepared plans are not where its parameters say ({:#x}, {} bytes)",
            p.plans_phys, p.plans_len
        ));
    }
    let plans = match Plans::read(image.section_data(s)) {
        Ok(plans) => plans,
        Err(e) => return c.problems.push(format!("its prepared plans: {e}")),
    };
    if !plans.matches_table(table) {
        c.problems
            .push("its prepared plans were made from another site table".into());
    }
    let code = image.code_ranges();
    for entry in plans.entries() {
        let plan = match plans.plan(&entry) {
            Ok(plan) => plan,
            Err(e) => {
                c.problems.push(format!("its prepared plans: {e}"));
                continue;
            }
        };
        let sm = plan.summary;
        let name = match sm.features_mask {
            0 => sm.backend().to_owned(),
            m => format!(
                "{} (features & {m:#x} = {:#x})",
                sm.backend(),
                sm.features_value
            ),
        };
        for ch in plan.changes() {
            let end = ch.addr.saturating_add(ch.old.len() as u64);
            if !code.iter().any(|r| r.start <= ch.addr && end <= r.end) {
                c.problems.push(format!(
                    "the {name} plan changes {:#x}, outside the kernel's code",
                    ch.addr
                ));
            } else if image.read(ch.addr, ch.old.len()) != Some(ch.old) {
                c.problems.push(format!(
                    "the {name} plan expects other bytes at {:#x} than the image holds",
                    ch.addr
                ));
            }
        }
        c.prepared.push(name);
    }
}

/// The image's bytes, as the runtime reads kernel text.
struct ImageText<'a>(&'a Image);

impl pvpatch_runtime::plan::TextRead for ImageText<'_> {
    fn read(&self, addr: u64, out: &mut [u8]) -> bool {
        match self.0.read(addr, out.len()) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
}

fn check_site(image: &Image, site: &Site) -> Result<bool, String> {
    if site.op().is_none() {
        return Ok(false);
    }
    let addr = site.patch_addr();
    let bytes = image
        .read(addr, site.site_len as usize)
        .ok_or("the site cannot be read")?;
    check::original(bytes, addr, site).map_err(|m| m.to_string())?;
    if site.form == Form::Detour {
        // The site itself holds a jmp to its stub.
        let j = check::decode_at(image.read(site.addr, 5).ok_or("unreadable")?, site.addr, 0)
            .map_err(|m| m.to_string())?;
        if j.mnemonic() != iced_x86::Mnemonic::Jmp || j.near_branch_target() != addr {
            return Err(format!("is not a jmp to its stub at {}", hex(addr)));
        }
    }
    Ok(true)
}

/// Verifies the table of an annotated image.
pub fn verify(image: &Image) -> Result<Verified, VerifyError> {
    let (addr, bytes) = sealed_table(image)
        .ok_or_else(|| VerifyError::NotAnnotated(image.path.display().to_string()))?;
    let t = SiteTable::parse_contiguous(bytes, addr, &image.code_ranges())
        .map_err(VerifyError::Table)?;
    let mut out = Verified {
        table_addr: addr,
        placement_ok: table_address(image) == Some(addr),
        sites: t.len(),
        unknown_ops: 0,
        mismatches: Vec::new(),
        detours: t.detour_area().detours as usize,
        detour_mismatches: Vec::new(),
        shim: check_shim(image, (addr, bytes)),
    };
    // Every load-time detour, as the runtime checks it before installing it: the moved bytes
    // by checksum, the cave and trampoline free, the stub against the moved instructions.
    let area = t.detour_area();
    let by_detour = pvpatch_runtime::plan::members_by_detour(area);
    for (g, members) in by_detour.iter().enumerate() {
        if let Err(e) =
            pvpatch_runtime::plan::check_detour(&t, &ImageText(image), g as u16, members)
        {
            out.detour_mismatches.push(DetourMismatch {
                index: g as u16,
                what: e.to_string(),
            });
        }
    }
    for (index, site) in t.sites().enumerate() {
        match check_site(image, &site) {
            Ok(true) => {}
            Ok(false) => out.unknown_ops += 1,
            Err(what) => out.mismatches.push(Mismatch {
                index,
                addr: site.addr,
                what,
            }),
        }
    }
    Ok(out)
}
