//! The report's charts: horizontal bars, grouped (one bar per series) or stacked, on a log or a
//! linear axis, drawn by plotters into SVG.
//!
//! A chart is a plain value ([`Bars`]) and [`render`] is a pure function of it: the same value
//! gives the same bytes. Every SVG carries the value it was drawn from, as JSON in its
//! `<metadata>` ([`embedded`] reads it back), so a committed chart can be checked against what
//! the current code draws from the same data.
//!
//! Both axes are this module's own [`Ranged`] types: categories at fixed slots, and values on
//! whole decades (log) or round steps (linear), so that ticks and labels do not depend on
//! floating-point accidents. Text is left to the browser (no font files): label widths are
//! estimated from the character count.

use std::ops::Range;

use anyhow::{Context, Result, bail};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

/// A chart: one row (group) per category, one bar per series in it, or the series stacked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bars {
    /// Drawn at the top, in bold.
    pub title: String,
    /// One line under the title: what is measured, where.
    pub subtitle: String,
    /// The value axis' description.
    pub axis: String,
    /// Log or linear value axis.
    pub scale: Scale,
    /// Grouped (a bar per series) or stacked.
    pub layout: Layout,
    /// The series, in the order of each group's values and of the legend.
    pub series: Vec<Series>,
    /// The rows, top to bottom.
    pub groups: Vec<Group>,
}

/// The value axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// Whole decades, with the 2..9 multiples as light lines; bars start at the first decade.
    Log,
    /// From zero, in round steps.
    Linear,
}

/// How a group's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One thin bar per series, each labelled with its value.
    Grouped,
    /// One bar, the series one after the other, each segment labelled if it has room.
    Stacked,
}

/// A series: its name in the legend and its colour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// The legend's text.
    pub name: String,
    /// The colour of its bars.
    pub colour: Colour,
}

/// One row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The category axis' label.
    pub label: String,
    /// One value per series; `None` where there is no figure (drawn as "n/a").
    pub values: Vec<Option<f64>>,
    /// Text after the row's last label (a total, a share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The palette: Okabe and Ito's colours, which stay distinct to colour-blind readers, and a grey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Neutral: what stays as it was.
    Grey,
    /// Blue.
    Blue,
    /// Orange.
    Orange,
    /// Vermillion: the costly path.
    Vermillion,
    /// Bluish green: the patched path.
    Green,
    /// Sky blue.
    Sky,
    /// Yellow.
    Yellow,
    /// Reddish purple.
    Purple,
}

impl Colour {
    fn rgb(self) -> RGBColor {
        match self {
            Colour::Grey => RGBColor(0xa0, 0xa0, 0xa0),
            Colour::Blue => RGBColor(0x00, 0x72, 0xb2),
            Colour::Orange => RGBColor(0xe6, 0x9f, 0x00),
            Colour::Vermillion => RGBColor(0xd5, 0x5e, 0x00),
            Colour::Green => RGBColor(0x00, 0x9e, 0x73),
            Colour::Sky => RGBColor(0x56, 0xb4, 0xe9),
            Colour::Yellow => RGBColor(0xf0, 0xe4, 0x42),
            Colour::Purple => RGBColor(0xcc, 0x79, 0xa7),
        }
    }

    /// Text on this colour: black on the light ones, white on the dark ones.
    fn ink(self) -> RGBColor {
        match self {
            Colour::Grey | Colour::Orange | Colour::Sky | Colour::Yellow | Colour::Purple => BLACK,
            Colour::Blue | Colour::Vermillion | Colour::Green => WHITE,
        }
    }
}

const WIDTH: u32 = 980;
const FONT: &str = "sans-serif";
const LABEL_PX: f64 = 13.0;
const VALUE_PX: f64 = 11.0;
/// Header: title, subtitle, legend.
const HEAD_PX: u32 = 78;
const AXIS_PX: u32 = 46;
/// Room right of the plot for the longest bar's label.
const RIGHT_PX: u32 = 150;
const BAR_PX: f64 = 12.0;
const GROUP_GAP_PX: f64 = 12.0;
const STACK_PX: f64 = 30.0;
const TEXT_GREY: RGBColor = RGBColor(0x33, 0x33, 0x33);
const GRID_BOLD: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);
const GRID_LIGHT: RGBColor = RGBColor(0xe8, 0xe8, 0xe8);
const METADATA_ID: &str = "pvpatch-chart-data";

/// About how wide `text` is at `px` pixels in a sans-serif font (a browser's is narrower for
/// most text: this errs on the side of room).
fn text_width(text: &str, px: f64) -> f64 {
    text.chars().count() as f64 * px * 0.6
}

/// About how wide `text` is, for spacing the legend (a closer guess: too much room there
/// shows as uneven gaps).
fn legend_width(text: &str, px: f64) -> f64 {
    text.chars().count() as f64 * px * 0.5
}

/// A value as the bars' labels show it: whole and thousands separated from 100 up, else with
/// one or two decimals.
pub fn figure(v: f64) -> String {
    if v.is_finite() && v.abs() < 10.0 {
        format!("{v:.2}")
    } else if v.is_finite() && v.abs() < 100.0 {
        format!("{v:.1}")
    } else {
        whole(v)
    }
}

/// A count (or a large figure): whole, thousands separated.
pub fn whole(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v <= -0.5 { format!("-{out}") } else { out }
}

/// A decade as an axis label: 1, 10, 100, 1k, ... 1G.
fn decade_label(v: f64) -> String {
    let e = v.log10().round() as i32;
    let (m, suffix) = match e {
        i32::MIN..=-1 => return format!("{v}"),
        0..=2 => (10f64.powi(e), ""),
        3..=5 => (10f64.powi(e - 3), "k"),
        6..=8 => (10f64.powi(e - 6), "M"),
        _ => (10f64.powi(e - 9), "G"),
    };
    format!("{m:.0}{suffix}")
}

/// The value axis: log over whole decades, or linear from zero in round steps.
#[derive(Debug, Clone)]
struct ValueAxis {
    scale: Scale,
    lo: f64,
    hi: f64,
    /// The linear axis' step between ticks.
    step: f64,
}

impl ValueAxis {
    /// An axis that holds `values` (the finite, and for log the positive, ones).
    fn holding(scale: Scale, values: impl Iterator<Item = f64>) -> Self {
        let max = values
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold(None, |m: Option<(f64, f64)>, v| {
                Some(m.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
            });
        match scale {
            Scale::Log => {
                // Bars start at 1 cycle at the lowest: what is under 1 has no bar, only its label.
                let (min, max) = max.unwrap_or((1.0, 10.0));
                let lo = 10f64.powi(min.max(1.0).log10().floor() as i32);
                let hi = 10f64.powi(max.log10().ceil().max(lo.log10() + 1.0) as i32);
                ValueAxis {
                    scale,
                    lo,
                    hi,
                    step: 0.0,
                }
            }
            Scale::Linear => {
                let max = max.map_or(1.0, |m| m.1);
                let step = Self::step(max);
                ValueAxis {
                    scale,
                    lo: 0.0,
                    hi: (max / step).ceil().max(1.0) * step,
                    step,
                }
            }
        }
    }

    /// A round step (1, 2 or 5 times a power of ten) that cuts `0..max` into at most 8 parts.
    fn step(max: f64) -> f64 {
        let raw = max.max(1.0) / 8.0;
        let p = 10f64.powi(raw.log10().floor() as i32);
        [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * p)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * p)
    }

    /// Where a value is, from 0 (the axis' start) to 1 (its end), clamped.
    fn fraction(&self, v: f64) -> f64 {
        let f = match self.scale {
            Scale::Log => {
                let v = if v.is_finite() {
                    v.max(self.lo)
                } else {
                    self.lo
                };
                (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
            }
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
        };
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    fn label(&self, v: f64) -> String {
        match self.scale {
            Scale::Log => decade_label(v),
            Scale::Linear => whole(v),
        }
    }
}

impl Ranged for ValueAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = f64::from(limit.1 - limit.0);
        limit.0 + (self.fraction(*v) * span).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        match self.scale {
            Scale::Log => {
                let (a, b) = (
                    self.lo.log10().round() as i32,
                    self.hi.log10().round() as i32,
                );
                let multiples: &[f64] = if hint.weight().allow_light_points() {
                    &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
                } else {
                    &[1.0]
                };
                (a..=b)
                    .flat_map(|e| multiples.iter().map(move |m| m * 10f64.powi(e)))
                    .filter(|v| *v <= self.hi)
                    .collect()
            }
            Scale::Linear => {
                if hint.weight().allow_light_points() {
                    return Vec::new();
                }
                let n = (self.hi / self.step).round() as u32;
                (0..=n).map(|i| f64::from(i) * self.step).collect()
            }
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// The category axis: slot `i` (0 at the bottom) is centred on `i`, from -0.5 to `n - 0.5`.
#[derive(Debug, Clone, Copy)]
struct Slots(usize);

impl Ranged for Slots {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let n = self.0.max(1) as f64;
        let span = f64::from(limit.1 - limit.0);
        limit.0 + (((v + 0.5) / n) * span).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        (0..self.0).map(|i| i as f64).collect()
    }

    fn range(&self) -> Range<f64> {
        -0.5..self.0 as f64 - 0.5
    }
}

/// Draws a chart: SVG text, the chart's JSON in its `<metadata>`.
pub fn render(bars: &Bars) -> Result<String> {
    if bars.groups.is_empty() || bars.series.is_empty() {
        bail!("chart \"{}\": nothing to draw", bars.title);
    }
    if let Some(g) = bars
        .groups
        .iter()
        .find(|g| g.values.len() != bars.series.len())
    {
        bail!(
            "chart \"{}\": row \"{}\" has {} values for {} series",
            bars.title,
            g.label,
            g.values.len(),
            bars.series.len()
        );
    }
    let n = bars.groups.len();
    let row_px = match bars.layout {
        Layout::Grouped => bars.series.len() as f64 * BAR_PX + GROUP_GAP_PX,
        Layout::Stacked => STACK_PX,
    };
    let plot_px = (n as f64 * row_px).ceil() as u32;
    // The legend's line only where there is a legend.
    let head_px = if bars.series.len() > 1 {
        HEAD_PX
    } else {
        HEAD_PX - 22
    };
    let height = head_px + plot_px + AXIS_PX + 8;
    let label_px = bars
        .groups
        .iter()
        .map(|g| text_width(&g.label, LABEL_PX))
        .fold(0.0, f64::max)
        .ceil() as u32
        + 18;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (head, body) = root.split_vertically(head_px);
        header(&head, bars)?;

        let values = bars.groups.iter().flat_map(|g| {
            let v: Vec<f64> = match bars.layout {
                Layout::Grouped => g.values.iter().flatten().copied().collect(),
                Layout::Stacked => vec![g.values.iter().flatten().filter(|v| **v > 0.0).sum()],
            };
            v
        });
        let x = ValueAxis::holding(bars.scale, values);
        let mut chart = ChartBuilder::on(&body)
            .margin_left(8)
            .margin_right(RIGHT_PX)
            .margin_top(2)
            .margin_bottom(6)
            .x_label_area_size(AXIS_PX)
            .y_label_area_size(label_px)
            .build_cartesian_2d(x.clone(), Slots(n))?;
        let label_of = |p: &f64| -> String {
            let i = n.checked_sub(1 + p.round().max(0.0) as usize);
            i.and_then(|i| bars.groups.get(i))
                .map(|g| g.label.clone())
                .unwrap_or_default()
        };
        let value_label = |v: &f64| x.label(*v);
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&label_of)
            .x_labels(12)
            .x_label_formatter(&value_label)
            .x_desc(bars.axis.as_str())
            .label_style((FONT, LABEL_PX).into_font().color(&TEXT_GREY))
            .axis_desc_style((FONT, LABEL_PX).into_font().color(&TEXT_GREY))
            .bold_line_style(GRID_BOLD.stroke_width(1))
            .light_line_style(GRID_LIGHT.stroke_width(1))
            .axis_style(TEXT_GREY.stroke_width(1))
            .draw()?;

        for (i, g) in bars.groups.iter().enumerate() {
            // Slot of the first row is the top one.
            let slot = (n - 1 - i) as f64;
            match bars.layout {
                Layout::Grouped => grouped(&mut chart, &x, bars, g, slot)?,
                Layout::Stacked => stacked(&mut chart, &x, bars, g, slot)?,
            }
        }
        root.present()?;
    }
    embed(&svg, bars)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<ValueAxis, Slots>>;

/// The title, the subtitle and (for more than one series) the legend.
fn header(head: &DrawingArea<SVGBackend, plotters::coord::Shift>, bars: &Bars) -> Result<()> {
    let title = (FONT, 18.0)
        .into_font()
        .style(FontStyle::Bold)
        .color(&BLACK);
    head.draw_text(&bars.title, &title, (12, 8))?;
    let sub = (FONT, 12.5).into_font().color(&TEXT_GREY);
    head.draw_text(&bars.subtitle, &sub, (12, 32))?;
    if bars.series.len() < 2 {
        return Ok(());
    }
    let mut at = 12i32;
    let legend = (FONT, LABEL_PX).into_font().color(&BLACK);
    for s in &bars.series {
        head.draw(&Rectangle::new(
            [(at, 55), (at + 14, 69)],
            s.colour.rgb().filled(),
        ))?;
        head.draw_text(&s.name, &legend, (at + 19, 55))?;
        at += 19 + legend_width(&s.name, LABEL_PX).ceil() as i32 + 24;
    }
    Ok(())
}

/// One bar per series, each with its value after it.
fn grouped(chart: &mut Chart, x: &ValueAxis, bars: &Bars, g: &Group, slot: f64) -> Result<()> {
    let k = bars.series.len() as f64;
    let bar = (1.0 - GROUP_GAP_PX / (k * BAR_PX + GROUP_GAP_PX)) / k;
    let top = slot + bar * k / 2.0;
    let style = (FONT, VALUE_PX)
        .into_font()
        .color(&TEXT_GREY)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let last = g.values.len().saturating_sub(1);
    for (j, (s, v)) in bars.series.iter().zip(&g.values).enumerate() {
        let y1 = top - bar * j as f64;
        let y0 = y1 - bar * 0.92;
        let mid = (y0 + y1) / 2.0;
        let mut text = match v {
            Some(v) if v.is_finite() => {
                if *v > x.lo {
                    chart.draw_series(std::iter::once(Rectangle::new(
                        [(x.lo, y0), (*v, y1)],
                        s.colour.rgb().filled(),
                    )))?;
                }
                figure(*v)
            }
            _ => "n/a".to_owned(),
        };
        if let (true, Some(note)) = (j == last, &g.note) {
            text.push_str(note);
        }
        let at = v.filter(|v| v.is_finite()).unwrap_or(x.lo).max(x.lo);
        chart.draw_series(std::iter::once(
            EmptyElement::at((at, mid)) + Text::new(text, (4, 0), style.clone()),
        ))?;
    }
    Ok(())
}

/// The series one after the other; a segment's value inside it where it fits.
fn stacked(chart: &mut Chart, x: &ValueAxis, bars: &Bars, g: &Group, slot: f64) -> Result<()> {
    let (y0, y1) = (slot - 0.3, slot + 0.3);
    let mut from = 0.0;
    for (s, v) in bars.series.iter().zip(&g.values) {
        let Some(v) = v.filter(|v| v.is_finite() && *v > 0.0) else {
            continue;
        };
        let to = from + v;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(from, y0), (to, y1)],
            s.colour.rgb().filled(),
        )))?;
        let text = whole(v);
        let px = chart.backend_coord(&(to, slot)).0 - chart.backend_coord(&(from, slot)).0;
        if f64::from(px) >= text_width(&text, VALUE_PX) + 6.0 {
            let style = (FONT, VALUE_PX)
                .into_font()
                .color(&s.colour.ink())
                .pos(Pos::new(HPos::Center, VPos::Center));
            chart.draw_series(std::iter::once(Text::new(
                text,
                ((from + to) / 2.0, slot),
                style,
            )))?;
        }
        from = to;
    }
    if let Some(note) = &g.note {
        let style = (FONT, VALUE_PX)
            .into_font()
            .color(&TEXT_GREY)
            .pos(Pos::new(HPos::Left, VPos::Center));
        chart.draw_series(std::iter::once(
            EmptyElement::at((from.max(x.lo), slot)) + Text::new(note.clone(), (6, 0), style),
        ))?;
    }
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Puts the chart's JSON in a `<metadata>` element, first in the `<svg>`.
fn embed(svg: &str, bars: &Bars) -> Result<String> {
    let open = svg
        .find("<svg")
        .and_then(|at| svg[at..].find('>').map(|end| at + end + 1))
        .context("plotters wrote no <svg> element")?;
    let json = serde_json::to_string(bars)?;
    let mut out = String::with_capacity(svg.len() + json.len() + 64);
    out.push_str(&svg[..open]);
    out.push_str(&format!(
        "\n<metadata id=\"{METADATA_ID}\">{}</metadata>",
        escape(&json)
    ));
    out.push_str(&svg[open..]);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// The chart an SVG written by [`render`] was drawn from.
pub fn embedded(svg: &str) -> Result<Bars> {
    let start = format!("<metadata id=\"{METADATA_ID}\">");
    let from = svg
        .find(&start)
        .map(|at| at + start.len())
        .context("no chart data in the SVG (<metadata> missing)")?;
    let len = svg[from..]
        .find("</metadata>")
        .context("the SVG's <metadata> is not closed")?;
    serde_json::from_str(&unescape(&svg[from..from + len])).context("the SVG's chart data")
}
