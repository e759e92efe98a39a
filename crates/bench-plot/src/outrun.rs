//! The outrun chart: `scripts/bench-migration --mode qemu --profiles outrun` (a guest writing
//! new data faster than the link), one group of bars per link and one bar per variant, in
//! three panels stacked: the guest's achieved write rate as a share of what it asked, its
//! worst write latency (log scale), and the downtime of the runs that converged against the
//! downtime budget.

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use serde_json::Value;

use super::group_label;

/// The downtime budget when the results do not say (row-migrate's default `--downtime-limit`).
const DEFAULT_BUDGET_MS: f64 = 300.0;

/// The variants of the outrun mode in the order the chart shows them: name, legend label (as
/// the bench's table heads its columns) and colour.
const VARIANTS: &[(&str, &str, RGBColor)] = &[
    ("row-precopy", "row, --postcopy never", RGBColor(27, 120, 55)),
    ("row-postcopy", "row, --postcopy always", RGBColor(33, 102, 172)),
    ("row-postcopy-auto", "row, --postcopy auto (the default)", RGBColor(118, 42, 131)),
    ("mirror-background", "qemu-mirror background", RGBColor(224, 130, 20)),
    ("mirror-write-blocking", "qemu-mirror write-blocking", RGBColor(178, 24, 43)),
];

/// The colour of a variant the chart does not know.
const OTHER: RGBColor = RGBColor(110, 110, 110);

/// Text colour of labels that report a problem (over the budget, failed).
const ALERT: RGBColor = RGBColor(180, 0, 0);

/// Whether `doc` holds the results of the outrun mode: `config.profiles` is `["outrun"]`, or
/// the results carry a `variant`.
pub(crate) fn is_outrun(doc: &Value) -> bool {
    let profiles = doc["config"]["profiles"].as_array();
    profiles.is_some_and(|p| p.len() == 1 && p[0] == "outrun")
        || doc["results"].as_array().is_some_and(|rs| rs.iter().any(|r| r["variant"].is_string()))
}

/// One run of the outrun mode (a variant on a link) as the chart sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OutrunRun {
    /// The link (`--link`, e.g. `20mbit`).
    pub link: String,
    /// The variant (e.g. `row-postcopy`; see `VARIANTS`).
    pub variant: String,
    /// row-migrate finished within its timeout (switched over); otherwise it rolled back.
    pub converged: bool,
    /// The run's error when it failed after row-migrate had its result (e.g. the guest's
    /// check on the destination): its figures are still drawn, marked.
    pub error: Option<String>,
    /// The guest's write rate asked, MB/s.
    pub asked_mbps: Option<f64>,
    /// The guest's achieved write rate during the migration as a percentage of the asked one.
    pub achieved_pct: Option<f64>,
    /// The guest's worst write latency during the migration, ms.
    pub max_latency_ms: Option<f64>,
    /// The downtime (guest STOP on A -> RESUME on B), ms; only for runs that converged.
    pub downtime_ms: Option<f64>,
}

/// The outrun results to draw.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outrun {
    /// The chart's title (the JSON's `title`).
    pub title: String,
    /// The links with runs, in the order of `config.links` (then first seen).
    pub links: Vec<String>,
    /// The variants with runs, in the order of `VARIANTS` (then first seen).
    pub variants: Vec<String>,
    /// The runs that have figures.
    pub runs: Vec<OutrunRun>,
    /// Runs that failed before row-migrate had a result, so have no figures: (link, variant, error).
    pub failed: Vec<(String, String, String)>,
    /// The downtime budget, ms: row-migrate's `downtime-limit-ms` from a run's report, or
    /// `config.downtime-limit-ms`, else 300.
    pub budget_ms: f64,
    /// How many times the link's rate the guest asked to write (`config.outrun-factor`).
    pub factor: Option<f64>,
}

impl Outrun {
    /// The run of `variant` on `link`, if there is one.
    fn run(&self, link: usize, variant: usize) -> Option<&OutrunRun> {
        self.runs.iter().find(|r| r.link == self.links[link] && r.variant == self.variants[variant])
    }

    /// The rate the guest asked on `link` (MB/s), from its first run that says.
    fn asked(&self, link: &str) -> Option<f64> {
        self.runs.iter().filter(|r| r.link == link).find_map(|r| r.asked_mbps)
    }
}

/// Reads the outrun results: a run is kept when it is `ok`, or when row-migrate had its result
/// (`converged` is true or false) even if the run failed afterwards (as the bench's table
/// does: a migration that finished has its figures); other failed runs go to
/// [`Outrun::failed`].
pub(crate) fn parse_outrun(doc: &Value) -> Result<Outrun> {
    let title = doc["title"].as_str().unwrap_or("Outrun").to_string();
    let results = doc["results"].as_array().ok_or_else(|| anyhow!("no \"results\" array"))?;
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    let mut budget = doc["config"]["downtime-limit-ms"].as_f64();
    for r in results {
        let (Some(link), Some(variant)) = (r["link"].as_str(), r["variant"].as_str()) else { continue };
        let ok = r["ok"] != Value::Bool(false);
        let error = r["error"].as_str().unwrap_or("failed").to_string();
        let Some(converged) = r["converged"].as_bool().or((ok && r["converged"].is_null()).then_some(false)) else {
            failed.push((link.to_string(), variant.to_string(), error));
            continue;
        };
        budget = budget.or_else(|| r["status"]["row-migrate"]["downtime-limit-ms"].as_f64());
        let guest = &r["guest"];
        let asked = guest["asked-mbps"].as_f64();
        let achieved = guest["achieved-mbps"].as_f64();
        runs.push(OutrunRun {
            link: link.to_string(),
            variant: variant.to_string(),
            converged,
            error: (!ok).then_some(error),
            asked_mbps: asked,
            achieved_pct: match (achieved, asked) {
                (Some(a), Some(q)) if q > 0.0 => Some(a / q * 100.0),
                _ => None,
            },
            max_latency_ms: guest["max-latency-ms"].as_f64(),
            downtime_ms: if converged { r["downtime-seconds"].as_f64().map(|s| s * 1e3) } else { None },
        });
    }
    if runs.is_empty() {
        bail!("no outrun result to plot");
    }
    let mut links: Vec<String> = doc["config"]["links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str())
        .filter(|l| runs.iter().any(|r| r.link == *l))
        .map(str::to_string)
        .collect();
    let mut variants: Vec<String> =
        VARIANTS.iter().map(|v| v.0.to_string()).filter(|v| runs.iter().any(|r| r.variant == *v)).collect();
    for r in &runs {
        if !links.contains(&r.link) {
            links.push(r.link.clone());
        }
        if !variants.contains(&r.variant) {
            variants.push(r.variant.clone());
        }
    }
    // A run given twice: the last one counts (`Outrun::run` finds the first).
    let mut seen = Vec::new();
    for r in runs.iter().rev() {
        if !seen.iter().any(|s: &OutrunRun| s.link == r.link && s.variant == r.variant) {
            seen.push(r.clone());
        }
    }
    seen.reverse();
    Ok(Outrun {
        title,
        links,
        variants,
        runs: seen,
        failed,
        budget_ms: budget.filter(|b| *b > 0.0).unwrap_or(DEFAULT_BUDGET_MS),
        factor: doc["config"]["outrun-factor"].as_f64(),
    })
}

/// The legend label and colour of a variant.
fn variant_style(variant: &str) -> (String, RGBColor) {
    match VARIANTS.iter().find(|v| v.0 == variant) {
        Some(&(_, label, color)) => (label.to_string(), color),
        None => (variant.to_string(), OTHER),
    }
}

/// `color` mixed with white: `t` = 0 is the colour, 1 is white.
fn lighter(color: RGBColor, t: f64) -> RGBColor {
    let mix = |c: u8| (c as f64 + (255.0 - c as f64) * t).round() as u8;
    RGBColor(mix(color.0), mix(color.1), mix(color.2))
}

/// A link's name as people write it: `20mbit` -> `20 Mbit/s`.
fn link_name(link: &str) -> String {
    for (suffix, unit) in [("kbit", "kbit/s"), ("mbit", "Mbit/s"), ("gbit", "Gbit/s")] {
        if let Some(n) = link.strip_suffix(suffix).filter(|n| !n.is_empty() && n.parse::<f64>().is_ok()) {
            return format!("{n} {unit}");
        }
    }
    link.to_string()
}

/// Milliseconds for a label: `8751 ms`, `45 ms`, `2.5 ms`.
fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// The drawing area of the whole PNG (pixel coordinates).
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A plotters drawing error as an `anyhow` one.
fn drawing_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// The width of `text` in pixels at `size`, bold or not.
fn text_width(area: &Area, text: &str, size: u32, bold: bool) -> Result<i32> {
    let font = ("sans-serif", size).into_font().style(if bold { FontStyle::Bold } else { FontStyle::Normal });
    let (w, _) = area.estimate_text_size(text, &font.into_text_style(area)).map_err(drawing_error)?;
    Ok(w as i32)
}

/// Breaks `text` into lines of at most `width` pixels at `size`, at spaces.
fn wrap(area: &Area, text: &str, size: u32, bold: bool, width: i32) -> Result<Vec<String>> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let candidate = if line.is_empty() { word.to_string() } else { format!("{line} {word}") };
        if !line.is_empty() && text_width(area, &candidate, size, bold)? > width {
            lines.push(std::mem::replace(&mut line, word.to_string()));
        } else {
            line = candidate;
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    Ok(lines)
}

/// Shortens `text` with "…" to at most `width` pixels at `size`.
fn truncate(area: &Area, text: &str, size: u32, width: i32) -> Result<String> {
    if text_width(area, text, size, false)? <= width {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let t: String = chars.iter().collect::<String>() + "…";
        if text_width(area, &t, size, false)? <= width {
            return Ok(t);
        }
    }
    Ok("…".to_string())
}

/// Draws `text` at pixel `at`, anchored by `pos`.
fn text(area: &Area, text: &str, at: (i32, i32), size: u32, color: &RGBColor, pos: Pos) -> Result<()> {
    let style = ("sans-serif", size).into_font().color(color).pos(pos);
    area.draw(&Text::new(text.to_string(), at, style)).map_err(drawing_error)
}

/// Draws `text` at pixel `at`, anchored at its bottom right, on a white box (readable over bars).
fn boxed(area: &Area, label: &str, at: (i32, i32), size: u32, color: &RGBColor) -> Result<()> {
    let w = text_width(area, label, size, false)?;
    let h = size as i32 + 2;
    area.draw(&Rectangle::new([(at.0 - w - 3, at.1 - h), (at.0 + 2, at.1 + 1)], WHITE.mix(0.85).filled()))
        .map_err(drawing_error)?;
    text(area, label, at, size, color, Pos::new(HPos::Right, VPos::Bottom))
}

/// A bar between pixel corners `a` and `b`: filled with `color`, or for a run that did not
/// converge, a light fill hatched with the colour.
fn bar(area: &Area, a: (i32, i32), b: (i32, i32), color: RGBColor, hatched: bool) -> Result<()> {
    let (x0, x1) = (a.0.min(b.0), a.0.max(b.0));
    let (y0, y1) = (a.1.min(b.1), a.1.max(b.1));
    if !hatched {
        return area.draw(&Rectangle::new([(x0, y0), (x1, y1)], color.filled())).map_err(drawing_error);
    }
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], lighter(color, 0.78).filled())).map_err(drawing_error)?;
    // Lines x + y = c, 45 degrees, clipped to the bar.
    let mut c = x0 + y0 + 4;
    while c < x1 + y1 {
        let xa = x0.max(c - y1);
        let xb = x1.min(c - y0);
        if xa < xb {
            area.draw(&PathElement::new(vec![(xa, c - xa), (xb, c - xb)], color.stroke_width(2)))
                .map_err(drawing_error)?;
        }
        c += 9;
    }
    area.draw(&Rectangle::new([(x0, y0), (x1, y1)], color.stroke_width(1))).map_err(drawing_error)
}

/// Lines of text stacked upwards from pixel `(cx, bottom)`, centred on `cx`: the first line
/// of `lines` is the lowest.
fn stack_up(area: &Area, cx: i32, bottom: i32, lines: &[(String, u32, RGBColor)]) -> Result<()> {
    let mut y = bottom;
    for (t, size, color) in lines {
        text(area, t, (cx, y), *size, color, Pos::new(HPos::Center, VPos::Bottom))?;
        y -= *size as i32 + 3;
    }
    Ok(())
}

/// The note over a bar of a run that did not converge, on one line if it fits in `width`
/// pixels, else on two.
fn not_converged_note(area: &Area, width: i32, size: u32) -> Result<Vec<String>> {
    Ok(if text_width(area, "did not converge", size, false)? <= width {
        vec!["did not converge".to_string()]
    } else {
        vec!["converge".to_string(), "did not".to_string()]
    })
}

/// The labelled values of a log axis from `lo` to `hi` (`lo` a power of 10): 1, 2 and 5 times
/// the powers of 10.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut power = lo;
    while power <= hi {
        ticks.extend([1.0, 2.0, 5.0].iter().map(|m| m * power).filter(|v| *v <= hi));
        power *= 10.0;
    }
    ticks
}

/// Bar geometry inside a group of width 1 (a margin of 0.1 on each side) for `per` bars.
fn bar_x(group: usize, slot: usize, per: usize) -> (f64, f64) {
    let w = 0.8 / per as f64;
    (group as f64 + 0.1 + slot as f64 * w, group as f64 + 0.1 + (slot as f64 + 0.88) * w)
}

/// A run's mark in the labels when it failed after row-migrate's result: a `*` pointing to
/// the footnote.
fn failed_mark(run: &OutrunRun) -> &'static str {
    if run.error.is_some() {
        " *"
    } else {
        ""
    }
}

/// A panel of the chart with a linear y axis from 0 to `top` over the link groups, its mesh
/// drawn (the write-rate and downtime panels; the latency panel's axis is logarithmic).
fn linear_panel<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    caption: FontDesc,
    groups: usize,
    top: f64,
    y_desc: &str,
    y_label: &dyn Fn(&f64) -> String,
) -> Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, caption)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..groups as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.15))
        .x_labels(0)
        .y_labels(8)
        .y_desc(y_desc)
        .y_label_formatter(y_label)
        .y_label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    Ok(chart)
}

/// Draws the outrun chart of `o` into the PNG `output` of `size` pixels.
pub(crate) fn draw_outrun(o: &Outrun, output: &std::path::Path, size: (u32, u32)) -> Result<()> {
    let full: Area = BitMapBackend::new(output, size).into_drawing_area();
    full.fill(&WHITE).map_err(drawing_error)?;
    let width = size.0 as i32;
    let margin = 16;

    // Header: the title, wrapped, and the legend (one entry per variant, and the hatching).
    let mut y = 10;
    for line in wrap(&full, &o.title, 18, true, width - 2 * margin)? {
        let style =
            ("sans-serif", 18).into_font().style(FontStyle::Bold).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        full.draw(&Text::new(line, (width / 2, y), style)).map_err(drawing_error)?;
        y += 24;
    }
    y += 6;
    let mut entries: Vec<(String, RGBColor, bool)> =
        o.variants.iter().map(|v| variant_style(v)).map(|(l, c)| (l, c, false)).collect();
    if o.runs.iter().any(|r| !r.converged) {
        entries.push(("did not converge (rolled back after the timeout)".to_string(), OTHER, true));
    }
    let legend_size = 15;
    let mut rows: Vec<Vec<(String, RGBColor, bool, i32)>> = vec![Vec::new()];
    let mut row_w = 0;
    for (label, color, hatched) in entries {
        let w = 22 + text_width(&full, &label, legend_size, false)? + 26;
        if row_w + w > width - 2 * margin && !rows.last().unwrap().is_empty() {
            rows.push(Vec::new());
            row_w = 0;
        }
        row_w += w;
        rows.last_mut().unwrap().push((label, color, hatched, w));
    }
    for row in &rows {
        let total: i32 = row.iter().map(|e| e.3).sum();
        let mut x = (width - total) / 2;
        for (label, color, hatched, w) in row {
            bar(&full, (x, y + 2), (x + 16, y + 18), *color, *hatched)?;
            text(&full, label, (x + 22, y + 10), legend_size, &BLACK, Pos::new(HPos::Left, VPos::Center))?;
            x += w;
        }
        y += 24;
    }
    let header = y + 4;

    // Footnotes: runs that failed (at most MAX_NOTES lines).
    const MAX_NOTES: usize = 4;
    let mut notes: Vec<String> = o
        .runs
        .iter()
        .filter_map(|r| {
            let error = r.error.as_deref()?;
            let variant = variant_style(&r.variant).0;
            Some(format!("* {} / {variant}: the migration finished, then the run failed: {error}", link_name(&r.link)))
        })
        .collect();
    notes.extend(o.failed.iter().map(|(link, variant, error)| {
        let variant = variant_style(variant).0;
        format!("{} / {variant}: failed before row-migrate's result (no figures): {error}", link_name(link))
    }));
    if notes.len() > MAX_NOTES {
        let more = notes.len() - (MAX_NOTES - 1);
        notes.truncate(MAX_NOTES - 1);
        notes.push(format!("… and {more} more failed runs (see the JSON's \"error\")"));
    }
    let foot = if notes.is_empty() { 6 } else { notes.len() as i32 * 19 + 12 };
    for (i, note) in notes.iter().enumerate() {
        let line = truncate(&full, note, 13, width - 2 * margin)?;
        let y = size.1 as i32 - foot + 4 + i as i32 * 19;
        text(&full, &line, (margin, y), 13, &ALERT, Pos::new(HPos::Left, VPos::Top))?;
    }

    let (_, body) = full.split_vertically(header);
    let (body, _) = body.split_vertically(size.1 as i32 - header - foot);
    let panels = body.split_evenly((3, 1));
    let groups = o.links.len();
    let per = o.variants.len();
    let factor = o.factor.map(|f| format!(" ({f}x the link)")).unwrap_or_default();
    let group_names = |with_rate: bool| {
        o.links
            .iter()
            .map(|l| match o.asked(l) {
                Some(a) if with_rate => format!("link {}: the guest asks {a:.1} MB/s", link_name(l)),
                _ => format!("link {}", link_name(l)),
            })
            .collect::<Vec<_>>()
    };
    let caption = ("sans-serif", 18).into_font().style(FontStyle::Bold);
    let slot_px = |x: &dyn Fn(f64) -> i32, g: usize, s: usize| {
        let (x0, x1) = bar_x(g, s, per);
        (x(x0), x(x1))
    };

    // Panel 1: achieved write rate, % of asked.
    let max_pct = o.runs.iter().filter_map(|r| r.achieved_pct).fold(100.0, f64::max);
    let y1 = max_pct * 1.32;
    let title = format!("Guest writes achieved during the migration, % of the rate asked{factor}");
    let chart = linear_panel(&panels[0], &title, caption.clone(), groups, y1, "% of asked", &|v| format!("{v:.0}%"))?;
    let px = |x: f64, y: f64| chart.backend_coord(&(x, y));
    let (left, right) = (px(0.0, 100.0), px(groups as f64, 100.0));
    full.draw(&DashedPathElement::new(vec![left, right], 6, 5, BLACK.mix(0.6).stroke_width(1)))
        .map_err(drawing_error)?;
    boxed(&full, "asked", (right.0 - 4, right.1 - 3), 13, &BLACK)?;
    for (g, name) in group_names(true).iter().enumerate() {
        group_label(&full, px(g as f64 + 0.5, 0.0), name)?;
    }
    for g in 0..groups {
        for s in 0..per {
            let Some(run) = o.run(g, s) else { continue };
            let Some(pct) = run.achieved_pct else { continue };
            let color = variant_style(&run.variant).1;
            let (x0, x1) = slot_px(&|x| px(x, 0.0).0, g, s);
            let top = px(0.0, pct).1;
            bar(&full, (x0, px(0.0, 0.0).1), (x1, top), color, !run.converged)?;
            let mut lines = vec![(format!("{pct:.0}%{}", failed_mark(run)), 15, BLACK)];
            if !run.converged {
                let room = ((x1 - x0) as f64 / 0.88) as i32 - 4;
                lines.extend(not_converged_note(&full, room, 13)?.into_iter().map(|t| (t, 13, ALERT)));
            }
            stack_up(&full, (x0 + x1) / 2, top - 3, &lines)?;
        }
    }

    // Panel 2: worst write latency, log scale.
    let lat: Vec<f64> = o.runs.iter().filter_map(|r| r.max_latency_ms).filter(|v| *v > 0.0).collect();
    let lo = 10f64.powf(lat.iter().copied().fold(f64::INFINITY, f64::min).min(10.0).log10().floor());
    let hi = lat.iter().copied().fold(lo * 10.0, f64::max) * 6.0;
    let mut chart = ChartBuilder::on(&panels[1])
        .caption(
            "Worst guest write latency during the migration (guest clock: the downtime is not in it; log scale)",
            caption.clone(),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..groups as f64, (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.15))
        .x_labels(0)
        .y_desc("ms")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    let px = |x: f64, y: f64| chart.backend_coord(&(x, y));
    for (g, name) in group_names(false).iter().enumerate() {
        group_label(&full, px(g as f64 + 0.5, lo), name)?;
    }
    for g in 0..groups {
        for s in 0..per {
            let Some(run) = o.run(g, s) else { continue };
            let Some(v) = run.max_latency_ms.filter(|v| *v > 0.0) else { continue };
            let color = variant_style(&run.variant).1;
            let (x0, x1) = slot_px(&|x| px(x, lo).0, g, s);
            let top = px(0.0, v).1;
            bar(&full, (x0, px(0.0, lo).1), (x1, top), color, !run.converged)?;
            stack_up(&full, (x0 + x1) / 2, top - 3, &[(format!("{}{}", ms(v), failed_mark(run)), 14, BLACK)])?;
        }
    }

    // Panel 3: downtime of the runs that converged, against the budget.
    let max_down = o.runs.iter().filter_map(|r| r.downtime_ms).fold(o.budget_ms, f64::max);
    let y3 = max_down * 1.3;
    let title =
        format!("Downtime, guest STOP on A -> RESUME on B (ms), runs that converged; budget {:.0} ms", o.budget_ms);
    let chart = linear_panel(&panels[2], &title, caption, groups, y3, "ms", &|v| format!("{v:.0}"))?;
    let px = |x: f64, y: f64| chart.backend_coord(&(x, y));
    for (g, name) in group_names(false).iter().enumerate() {
        group_label(&full, px(g as f64 + 0.5, 0.0), name)?;
    }
    for g in 0..groups {
        for s in 0..per {
            let Some(run) = o.run(g, s) else { continue };
            let color = variant_style(&run.variant).1;
            let (x0, x1) = slot_px(&|x| px(x, 0.0).0, g, s);
            let base = px(0.0, 0.0).1;
            match run.downtime_ms {
                Some(v) => {
                    let top = px(0.0, v).1;
                    bar(&full, (x0, base), (x1, top), color, false)?;
                    let label_color = if v > o.budget_ms { ALERT } else { BLACK };
                    stack_up(
                        &full,
                        (x0 + x1) / 2,
                        top - 3,
                        &[(format!("{}{}", ms(v), failed_mark(run)), 14, label_color)],
                    )?;
                }
                None => {
                    let lines = if run.converged {
                        vec![("n/a".to_string(), 14, BLACK)]
                    } else {
                        vec![("rolled back".to_string(), 12, OTHER), ("–".to_string(), 22, BLACK)]
                    };
                    stack_up(&full, (x0 + x1) / 2, base - 3, &lines)?;
                }
            }
        }
    }
    let (left, right) = (px(0.0, o.budget_ms), px(groups as f64, o.budget_ms));
    full.draw(&DashedPathElement::new(vec![left, right], 8, 5, ALERT.stroke_width(2))).map_err(drawing_error)?;
    boxed(&full, &format!("budget {:.0} ms", o.budget_ms), (right.0 - 4, right.1 - 4), 14, &ALERT)?;
    if o.runs.iter().any(|r| !r.converged) {
        text(
            &full,
            "–: did not converge (rolled back: no switchover, so no downtime)",
            (left.0 + 6, px(0.0, y3).1 + 4),
            13,
            &BLACK,
            Pos::new(HPos::Left, VPos::Top),
        )?;
    }
    full.present().with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A run of the outrun mode as the bench writes it (the figures the chart reads).
    fn run(variant: &str, link: &str, ok: bool, converged: Option<bool>, achieved: f64, down: Option<f64>) -> Value {
        json!({
            "profile": "outrun", "strategy": if variant.starts_with("row") { "row" } else { "qemu-mirror" },
            "ok": ok, "variant": variant, "link": link, "converged": converged,
            "guest": {"asked-mbps": 25.0, "achieved-mbps": achieved, "max-latency-ms": 45.0},
            "downtime-seconds": down, "postcopy": null,
        })
    }

    fn sample() -> Value {
        json!({"title": "outrun test", "mode": "qemu",
        "config": {"profiles": ["outrun"], "links": ["20mbit", "100mbit"], "outrun-factor": 2.0,
                   "variants": ["row-precopy", "row-postcopy", "mirror-background", "mirror-write-blocking"]},
        "results": [
            // Listed out of the chart's order on purpose.
            run("mirror-background", "100mbit", true, Some(false), 24.9, None),
            run("row-postcopy", "100mbit", true, Some(true), 25.0, Some(0.222)),
            run("row-precopy", "100mbit", true, Some(false), 11.0, Some(9.9)),
            // Failed after the switchover: kept, with its error.
            {"ok": false, "variant": "mirror-write-blocking", "link": "100mbit", "converged": true,
             "guest": {"asked-mbps": 25.0, "achieved-mbps": 5.0, "max-latency-ms": 1558.4},
             "downtime-seconds": 0.527, "error": "guest panicked",
             "status": {"row-migrate": {"downtime-limit-ms": 250.0}}},
            // Failed before row-migrate's result: no figures.
            {"ok": false, "variant": "row-postcopy", "link": "20mbit", "converged": null, "guest": {},
             "error": "QEMU did not start"},
        ]})
    }

    #[test]
    fn recognises_outrun_input() {
        assert!(is_outrun(&sample()));
        assert!(is_outrun(&json!({"results": [{"variant": "row-precopy"}]})));
        assert!(!is_outrun(&json!({"config": {"profiles": ["msn"]}, "results": [{"profile": "msn"}]})));
    }

    #[test]
    fn keeps_runs_with_figures_and_orders_them() {
        let o = parse_outrun(&sample()).unwrap();
        assert_eq!(o.title, "outrun test");
        // 20mbit's only run failed before row-migrate's result: the link is absent.
        assert_eq!(o.links, ["100mbit"]);
        assert_eq!(o.variants, ["row-precopy", "row-postcopy", "mirror-background", "mirror-write-blocking"]);
        assert_eq!(o.runs.len(), 4);
        assert_eq!(o.failed, [("20mbit".to_string(), "row-postcopy".to_string(), "QEMU did not start".to_string())]);
        assert_eq!(o.run(0, 1).unwrap().variant, "row-postcopy");
        let blocking = o.run(0, 3).unwrap();
        assert_eq!(blocking.error.as_deref(), Some("guest panicked"));
        assert!(blocking.converged);
        // The budget from row-migrate's report.
        assert_eq!(o.budget_ms, 250.0);
        assert_eq!(o.factor, Some(2.0));
    }

    #[test]
    fn computes_the_share_and_flags_runs_that_did_not_converge() {
        let o = parse_outrun(&sample()).unwrap();
        let precopy = o.run(0, 0).unwrap();
        assert!(!precopy.converged);
        assert!((precopy.achieved_pct.unwrap() - 44.0).abs() < 1e-9);
        // No downtime for a run that rolled back, whatever the JSON says.
        assert_eq!(precopy.downtime_ms, None);
        let postcopy = o.run(0, 1).unwrap();
        assert!(postcopy.converged);
        assert!((postcopy.achieved_pct.unwrap() - 100.0).abs() < 1e-9);
        assert!((postcopy.downtime_ms.unwrap() - 222.0).abs() < 1e-9);
        assert_eq!(postcopy.max_latency_ms, Some(45.0));
        assert_eq!(postcopy.error, None);
        let background = o.run(0, 2).unwrap();
        assert!(!background.converged);
        assert!((background.achieved_pct.unwrap() - 99.6).abs() < 1e-9);
    }

    #[test]
    fn subsets_and_defaults() {
        // One variant on one link, no config, no budget in the data, no asked rate.
        let doc = json!({"results": [
            {"ok": true, "variant": "row-postcopy-auto", "link": "100mbit", "converged": true,
             "guest": {"achieved-mbps": 25.0}, "downtime-seconds": 0.25},
        ]});
        let o = parse_outrun(&doc).unwrap();
        assert_eq!(o.links, ["100mbit"]);
        assert_eq!(o.variants, ["row-postcopy-auto"]);
        assert_eq!(o.budget_ms, DEFAULT_BUDGET_MS);
        assert_eq!(o.runs[0].achieved_pct, None);
        assert_eq!(o.title, "Outrun");
        // Nothing with figures: an error.
        let doc = json!({"results": [{"ok": false, "variant": "row-precopy", "link": "20mbit", "converged": null}]});
        assert!(parse_outrun(&doc).is_err());
    }

    #[test]
    fn log_axis_ticks() {
        assert_eq!(log_ticks(10.0, 600.0), [10.0, 20.0, 50.0, 100.0, 200.0, 500.0]);
        assert_eq!(log_ticks(1.0, 1.5), [1.0]);
    }

    #[test]
    fn link_names() {
        assert_eq!(link_name("20mbit"), "20 Mbit/s");
        assert_eq!(link_name("1gbit"), "1 Gbit/s");
        assert_eq!(link_name("lan"), "lan");
    }

    #[test]
    fn draws_a_png_when_a_font_is_there() {
        if super::super::load_font(None).is_err() {
            eprintln!("skipped: no font installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("bench-plot-outrun-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("chart.png");
        draw_outrun(&parse_outrun(&sample()).unwrap(), &out, (900, 1000)).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
