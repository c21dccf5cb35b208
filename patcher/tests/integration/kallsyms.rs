//! kallsyms recovered from the stripped Debian kernels (6.1 and 6.12, fetched by `cargo xtask
//! kernel`), checked against two references no one here wrote: the `System.map` of each
//! kernel's `-dbg` package, and vmlinux-to-elf's `kallsyms-finder` (PyPI).

use std::process::Command;

use pvpatch::load::{Image, SymbolSource};
use pvpatch_testkit::kernels::{self, KernelSpec};

use crate::kernels::loaded;

/// `(address, type, name)` of every line of a System.map.
fn system_map(path: &std::path::Path) -> Vec<(u64, u8, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = *f.next()?.as_bytes().first()?;
            Some((addr, kind, f.next()?.to_owned()))
        })
        .collect()
}

fn ours(img: &Image) -> Vec<(u64, u8, String)> {
    img.kallsyms
        .as_ref()
        .expect("the kernel's kallsyms was found")
        .symbols
        .iter()
        .map(|s| (s.addr, s.kind, s.name.clone()))
        .collect()
}

/// The labels of kallsyms' own arrays.
const ARRAYS: [&str; 9] = [
    "kallsyms_addresses",
    "kallsyms_offsets",
    "kallsyms_relative_base",
    "kallsyms_num_syms",
    "kallsyms_names",
    "kallsyms_markers",
    "kallsyms_seqs_of_names",
    "kallsyms_token_table",
    "kallsyms_token_index",
];

/// What `scripts/kallsyms` keeps of a System.map, by its documented rules: absolute symbols
/// (type `A`) are dropped; with absolute per-CPU symbols, those of the per-CPU section (linked at
/// 0, below `__per_cpu_end`) become type `A`; before 6.2 the `kallsyms_*` arrays' own labels are
/// not listed (6.1's `is_ignored_symbol`).
fn kallsyms_view(map: &[(u64, u8, String)], spec: KernelSpec) -> Vec<(u64, u8, String)> {
    let percpu_end = map
        .iter()
        .find(|s| s.2 == "__per_cpu_end")
        .map_or(0, |s| s.0);
    map.iter()
        .filter(|s| s.1 != b'A')
        .filter(|s| !(spec == kernels::BOOKWORM && ARRAYS.contains(&s.2.as_str())))
        .map(|(a, k, n)| {
            let k = if *a <= percpu_end && matches!(k, b'D' | b'd') {
                b'A'
            } else {
                *k
            };
            (*a, k, n.clone())
        })
        .collect::<Vec<_>>()
        .tap_sort()
}

/// Sorting as a value.
trait TapSort {
    fn tap_sort(self) -> Self;
}

impl<T: Ord> TapSort for Vec<T> {
    fn tap_sort(mut self) -> Self {
        self.sort();
        self
    }
}

/// What `a` has that `b` has not, as multisets (both sorted); at most five.
fn missing_from<'a>(
    a: &'a [(u64, u8, String)],
    b: &[(u64, u8, String)],
) -> Vec<&'a (u64, u8, String)> {
    let mut out = Vec::new();
    let mut j = 0;
    for x in a {
        while j < b.len() && b[j] < *x {
            j += 1;
        }
        if j < b.len() && b[j] == *x {
            j += 1;
        } else if out.len() < 5 {
            out.push(x);
        }
    }
    out
}

fn equals_system_map(spec: KernelSpec) {
    let test = format!("kallsyms_equals_system_map_{}", spec.name);
    let Some((k, img)) = loaded(&test, spec) else {
        return;
    };
    assert_eq!(img.symbol_source, SymbolSource::Kallsyms);
    let ours = ours(img).tap_sort();
    let expected = kallsyms_view(&system_map(&k.system_map), spec);
    let missing = missing_from(&expected, &ours);
    let extra = missing_from(&ours, &expected);
    assert!(
        ours == expected,
        "{}: {} symbols, System.map (as kallsyms keeps it) {}; missing {missing:x?}, extra \
         {extra:x?}",
        k.package,
        ours.len(),
        expected.len()
    );
    eprintln!(
        "{}: all {} kallsyms symbols equal to System.map's (address, type, name)",
        k.package,
        ours.len()
    );
}

#[test]
fn kallsyms_equals_system_map_6_1() {
    equals_system_map(kernels::BOOKWORM);
}

#[test]
fn kallsyms_equals_system_map_6_12() {
    equals_system_map(kernels::BACKPORTS);
}

fn equals_vmlinux_to_elf(spec: KernelSpec) {
    let test = format!("kallsyms_equals_vmlinux_to_elf_{}", spec.name);
    let Some((k, img)) = loaded(&test, spec) else {
        return;
    };
    let finder = match pvpatch_testkit::tools::kallsyms_finder() {
        Ok(p) => p,
        Err(why) => return pvpatch_testkit::skip(&test, &why),
    };
    let out = Command::new(&finder).arg(&k.vmlinux).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let ours: Vec<String> = ours(img)
        .iter()
        .map(|(a, t, n)| format!("{a:016x} {} {n}", *t as char))
        .collect();
    assert_eq!(ours.len(), theirs.len(), "{}: symbol count", k.package);
    let first = ours.iter().zip(&theirs).position(|(a, b)| a != b);
    assert_eq!(
        first, None,
        "{}: first difference at line {first:?}",
        k.package
    );
    eprintln!(
        "{}: {} symbols, line for line as vmlinux-to-elf's kallsyms-finder",
        k.package,
        ours.len()
    );
}

#[test]
fn kallsyms_equals_vmlinux_to_elf_6_1() {
    equals_vmlinux_to_elf(kernels::BOOKWORM);
}

#[test]
fn kallsyms_equals_vmlinux_to_elf_6_12() {
    equals_vmlinux_to_elf(kernels::BACKPORTS);
}
