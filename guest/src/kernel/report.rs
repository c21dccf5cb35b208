//! The one-line JSON report the guest prints on the serial port (prefixed `PVPATCH-REPORT `),
//! which the host harness parses.

use core::fmt::{self, Write};

/// A minimal JSON writer over `core::fmt::Write`.
pub struct Json<'w, W: Write> {
    w: &'w mut W,
    first: bool,
}

impl<'w, W: Write> Json<'w, W> {
    /// Starts an object.
    pub fn object(w: &'w mut W) -> Result<Self, fmt::Error> {
        w.write_char('{')?;
        Ok(Json { w, first: true })
    }

    fn key(&mut self, k: &str) -> fmt::Result {
        if !self.first {
            self.w.write_char(',')?;
        }
        self.first = false;
        string(self.w, k)?;
        self.w.write_char(':')
    }

    /// `"k": "v"`.
    pub fn str(&mut self, k: &str, v: &str) -> fmt::Result {
        self.key(k)?;
        string(self.w, v)
    }

    /// `"k": v` for a number.
    pub fn num(&mut self, k: &str, v: impl fmt::Display) -> fmt::Result {
        self.key(k)?;
        write!(self.w, "{v}")
    }

    /// `"k": v` for a bool.
    pub fn bool(&mut self, k: &str, v: bool) -> fmt::Result {
        self.key(k)?;
        self.w.write_str(if v { "true" } else { "false" })
    }

    /// `"k": null`.
    pub fn null(&mut self, k: &str) -> fmt::Result {
        self.key(k)?;
        self.w.write_str("null")
    }

    /// `"k": "v"` or null.
    pub fn opt_str(&mut self, k: &str, v: Option<&str>) -> fmt::Result {
        match v {
            Some(s) => self.str(k, s),
            None => self.null(k),
        }
    }

    /// `"k": v` or null for a number.
    pub fn opt_num(&mut self, k: &str, v: Option<impl fmt::Display>) -> fmt::Result {
        match v {
            Some(n) => self.num(k, n),
            None => self.null(k),
        }
    }

    /// `"k": { ... }`.
    pub fn obj(&mut self, k: &str, f: impl FnOnce(&mut Json<'_, W>) -> fmt::Result) -> fmt::Result {
        self.key(k)?;
        let mut j = Json::object(self.w)?;
        f(&mut j)?;
        j.end()
    }

    /// `"k": [ {...}, ... ]`.
    pub fn array<T>(
        &mut self,
        k: &str,
        items: impl IntoIterator<Item = T>,
        mut f: impl FnMut(&mut Json<'_, W>, T) -> fmt::Result,
    ) -> fmt::Result {
        self.key(k)?;
        self.w.write_char('[')?;
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.w.write_char(',')?;
            }
            let mut j = Json::object(self.w)?;
            f(&mut j, item)?;
            j.end()?;
        }
        self.w.write_char(']')
    }

    /// Ends the object.
    pub fn end(self) -> fmt::Result {
        self.w.write_char('}')
    }
}

fn string<W: Write>(w: &mut W, s: &str) -> fmt::Result {
    w.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            c if (c as u32) < 0x20 => write!(w, "\\u{:04x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

/// Hundredths as a decimal (`1234` -> `12.34`).
pub struct Centi(pub u64);

impl fmt::Display for Centi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// `bytes` as text, with `.` for what is not a printable ASCII character (a CPUID signature).
pub fn printable(bytes: &[u8]) -> alloc::string::String {
    bytes
        .iter()
        .map(|&c| if c.is_ascii_graphic() { c as char } else { '.' })
        .collect()
}

/// The `selftests` array of a report.
pub fn selftests<W: Write>(j: &mut Json<'_, W>, tests: &[super::selftest::Test]) -> fmt::Result {
    use super::selftest::Verdict;
    j.array("selftests", tests.iter(), |o, t| {
        o.str("name", t.name)?;
        o.str("ops", t.ops)?;
        match &t.verdict {
            Verdict::Pass => o.str("result", "pass"),
            Verdict::Fail(why) => {
                o.str("result", "fail")?;
                o.str("why", why)
            }
            Verdict::Skip(why) => {
                o.str("result", "skip")?;
                o.str("why", why)
            }
        }
    })
}

/// A patch pass's `sites_by_outcome` object and `by_op` array.
pub fn outcomes<W: Write>(
    p: &mut Json<'_, W>,
    stats: &pvpatch_runtime::stats::Stats,
) -> fmt::Result {
    use patch_sites::Outcome;
    p.obj("sites_by_outcome", |o| {
        for k in Outcome::ALL {
            o.num(k.name(), stats.count(k))?;
        }
        Ok(())
    })?;
    p.array("by_op", stats.by_op.iter(), |o, (id, counts)| {
        o.str("op", pvpatch_runtime::stats::Stats::op_name(*id))?;
        for (k, n) in Outcome::ALL.iter().zip(counts) {
            if *n > 0 {
                o.num(k.name(), n)?;
            }
        }
        Ok(())
    })
}
