//! An index of address ranges (sections, code maps) for lookups by address in logarithmic time
//! whatever their number: a hostile image may have tens of thousands of sections, and a linear
//! search per site made the scan quadratic.

/// Ranges `[start, end)` with an item index each, sorted by start, with the highest end up to
/// each position, so that the ranges holding an address are found by walking down from the
/// last one starting at or below it until no range further down reaches it. Overlapping
/// ranges are allowed.
#[derive(Clone, Debug, Default)]
pub struct SpanIndex {
    spans: Vec<(u64, u64, usize)>,
    max_end: Vec<u64>,
}

impl SpanIndex {
    /// The index of `spans`: `(start, end, item)`.
    pub fn new(spans: impl IntoIterator<Item = (u64, u64, usize)>) -> Self {
        let mut spans: Vec<(u64, u64, usize)> = spans.into_iter().filter(|s| s.1 > s.0).collect();
        spans.sort_unstable();
        let mut high = 0;
        let max_end = spans
            .iter()
            .map(|&(_, end, _)| {
                high = high.max(end);
                high
            })
            .collect();
        SpanIndex { spans, max_end }
    }

    /// The items of the ranges that overlap `[from, to)`, highest start first.
    pub fn overlapping(&self, from: u64, to: u64) -> impl Iterator<Item = usize> + '_ {
        let mut i = self.spans.partition_point(|&(start, _, _)| start < to);
        std::iter::from_fn(move || {
            while i > 0 && self.max_end[i - 1] > from {
                i -= 1;
                let (_, end, item) = self.spans[i];
                if end > from {
                    return Some(item);
                }
            }
            None
        })
    }

    /// The lowest item whose range holds `addr` (of overlapping ranges, the first one).
    pub fn first_at(&self, addr: u64) -> Option<usize> {
        self.overlapping(addr, addr.saturating_add(1)).min()
    }
}

/// Two lists sorted by `key` merged, in order; at one key, `first`'s come first.
pub fn merge_sorted<'a, T: Copy>(
    first: &'a [T],
    then: &'a [T],
    key: impl Fn(&T) -> u64 + 'a,
) -> impl Iterator<Item = T> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || {
        let take_first = match (first.get(i), then.get(j)) {
            (None, None) => return None,
            (Some(a), Some(b)) => key(a) <= key(b),
            (a, _) => a.is_some(),
        };
        if take_first {
            i += 1;
            Some(first[i - 1])
        } else {
            j += 1;
            Some(then[j - 1])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Merging is a stable sort of the two lists by key, `first`'s before `then`'s.
        #[test]
        fn merge_sorted_is_a_stable_sort(
            mut a in proptest::collection::vec(0u64..50, 0..30),
            mut b in proptest::collection::vec(0u64..50, 0..30),
        ) {
            a.sort_unstable();
            b.sort_unstable();
            let tagged = |v: &[u64], t: u8| v.iter().map(|&k| (k, t)).collect::<Vec<_>>();
            let (a, b) = (tagged(&a, 0), tagged(&b, 1));
            let mut want: Vec<(u64, u8)> = a.iter().chain(&b).copied().collect();
            want.sort_by_key(|x| x.0);
            let got: Vec<(u64, u8)> = merge_sorted(&a, &b, |x| x.0).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn finds_what_a_linear_search_finds() {
        // Overlaps, nesting, gaps, empty ranges, the top of the address space.
        let spans = [
            (0x1000, 0x2000, 0),
            (0x1800, 0x1900, 1),
            (0x1000, 0x1000, 2),
            (0x3000, 0x8000, 3),
            (0x4000, 0x5000, 4),
            (u64::MAX - 0x10, u64::MAX, 5),
            (0x0, 0x10, 6),
        ];
        let idx = SpanIndex::new(spans);
        let linear_at = |a: u64| {
            spans
                .iter()
                .filter(|s| a >= s.0 && a < s.1)
                .map(|s| s.2)
                .min()
        };
        let probes = [
            0,
            0xf,
            0x10,
            0xfff,
            0x1000,
            0x17ff,
            0x1800,
            0x18ff,
            0x1900,
            0x1fff,
            0x2000,
            0x2fff,
            0x3000,
            0x4800,
            0x5000,
            0x7fff,
            0x8000,
            u64::MAX - 0x11,
            u64::MAX - 0x10,
            u64::MAX - 1,
            u64::MAX,
        ];
        for a in probes {
            assert_eq!(idx.first_at(a), linear_at(a), "{a:#x}");
        }
        for (from, to) in [
            (0x0, 0x1001),
            (0x1900, 0x3001),
            (0x2000, 0x3000),
            (0x4fff, 0x5001),
        ] {
            let mut got: Vec<usize> = idx.overlapping(from, to).collect();
            got.sort_unstable();
            let mut want: Vec<usize> = spans
                .iter()
                .filter(|s| s.1 > s.0 && s.0 < to && s.1 > from)
                .map(|s| s.2)
                .collect();
            want.sort_unstable();
            assert_eq!(got, want, "[{from:#x}, {to:#x})");
        }
    }
}
