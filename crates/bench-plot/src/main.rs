//! `bench-plot`: draws the chart of `scripts/bench-migration` from its JSON results.
//!
//! ```text
//! bench-plot --input bench-migration.json --output bench-migration.png [--font TTF] [--size WxH]
//! ```
//!
//! The workload-profile runs (the default): two panels, one group of bars per workload profile
//! and one bar per strategy in a group:
//! - the bytes each strategy put on the wire after round 1 (the update data), stacked by
//!   round (the base round is the same for all strategies and would dwarf them: its size is
//!   printed in the panel's caption and under each profile's name);
//! - the downtime per strategy: the final round (`downtime-seconds`), and on top of it the
//!   rest of the wall time of migrate-finish (`finish-wall-seconds`, when given).
//!
//! Input: `{"title": ..., "results": [{"profile", "strategy", "ok", "downtime-seconds",
//! "rounds": [{"round", "kind", "wire-bytes"}, ...]}, ...]}`; results with `ok: false` or no
//! rounds are left out.
//!
//! The outrun runs (`--profiles outrun`: `config.profiles` is `["outrun"]`, or the results
//! carry a `variant`; see `src/outrun.rs`): three panels, one group of bars per link and one bar
//! per variant (row-migrate `--postcopy never|always|auto`, qemu-mirror background and
//! write-blocking), runs that did not converge hatched:
//! - the guest's achieved write rate during the migration, % of the rate it asked
//!   (`guest.achieved-mbps / guest.asked-mbps`);
//! - its worst write latency during the migration (`guest.max-latency-ms`, log scale);
//! - the downtime of the runs that converged (`downtime-seconds`), against the downtime
//!   budget (row-migrate's `downtime-limit-ms` in a run's report, else 300 ms).
//!
//! Text is drawn with a TrueType font read at run time (plotters' `ab_glyph` backend;
//! default: DejaVu Sans from Debian's fonts-dejavu-core).

mod outrun;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use serde_json::Value;

const USAGE: &str = "usage: bench-plot --input RESULTS.json --output CHART.png [--font FONT.ttf] [--size WxH]";

/// Fonts tried when `--font` is not given.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// One migration as the chart sees it.
#[derive(Debug, Clone)]
struct Run {
    profile: String,
    strategy: String,
    /// (round number, kind, wire bytes), in order.
    rounds: Vec<(u64, String, u64)>,
    /// The final round's time.
    downtime: f64,
    /// The wall time of migrate-finish (final round delivered and durable), if measured.
    finish_wall: Option<f64>,
}

impl Run {
    fn base_bytes(&self) -> u64 {
        self.rounds.iter().filter(|r| r.0 == 1).map(|r| r.2).sum()
    }
}

fn parse(doc: &Value) -> Result<(String, Vec<Run>)> {
    let title = doc["title"].as_str().unwrap_or("Disk migration").to_string();
    let results = doc["results"].as_array().ok_or_else(|| anyhow!("no \"results\" array"))?;
    let mut runs = Vec::new();
    for r in results {
        if r["ok"] == Value::Bool(false) {
            continue;
        }
        let Some(rounds) = r["rounds"].as_array().filter(|a| !a.is_empty()) else { continue };
        let rounds = rounds
            .iter()
            .map(|x| {
                Ok((
                    x["round"].as_u64().ok_or_else(|| anyhow!("round without a number: {x}"))?,
                    x["kind"].as_str().unwrap_or("?").to_string(),
                    x["wire-bytes"].as_u64().ok_or_else(|| anyhow!("round without wire-bytes: {x}"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        runs.push(Run {
            profile: r["profile"].as_str().unwrap_or("?").to_string(),
            strategy: r["strategy"].as_str().unwrap_or("?").to_string(),
            rounds,
            downtime: r["downtime-seconds"].as_f64().unwrap_or(0.0),
            finish_wall: r["finish-wall-seconds"].as_f64(),
        });
    }
    if runs.is_empty() {
        bail!("no successful result to plot");
    }
    Ok((title, runs))
}

/// The base hue of a strategy.
fn hue(strategy: &str) -> (u8, u8, u8) {
    match strategy {
        "row" => (27, 120, 55),
        "bitmap" => (33, 102, 172),
        "qemu-mirror" => (204, 102, 0),
        _ => (110, 110, 110),
    }
}

/// The shade of round `i` of `n` update rounds: lighter early, the full hue for the final one.
fn shade(strategy: &str, i: usize, n: usize) -> RGBColor {
    let (r, g, b) = hue(strategy);
    let t = if n <= 1 { 0.0 } else { 0.6 * (n - 1 - i) as f64 / (n - 1) as f64 };
    let mix = |c: u8| (c as f64 + (255.0 - c as f64) * t).round() as u8;
    RGBColor(mix(r), mix(g), mix(b))
}

fn load_font(explicit: Option<PathBuf>) -> Result<()> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p],
        None => FONTS.iter().map(PathBuf::from).collect(),
    };
    for path in &candidates {
        let Ok(bytes) = std::fs::read(path) else { continue };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font("sans-serif", style, bytes)
                .map_err(|_| anyhow!("{} is not a usable TrueType font", path.display()))?;
        }
        return Ok(());
    }
    bail!(
        "no font found (tried {}); install fonts-dejavu-core or pass --font FILE.ttf",
        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// A group's name centred under the x axis at backend pixel `at`.
fn group_label<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    at: (i32, i32),
    text: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let style = ("sans-serif", 15).into_font().into_text_style(area).pos(Pos::new(HPos::Center, VPos::Top));
    area.draw(&Text::new(text.to_string(), (at.0, at.1 + 8), style)).map_err(|e| anyhow!("drawing a label: {e}"))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn draw(title: &str, runs: &[Run], output: &PathBuf, size: (u32, u32)) -> Result<()> {
    // Profiles and strategies in first-seen order.
    let mut profiles: Vec<String> = Vec::new();
    let mut strategies: Vec<String> = Vec::new();
    for r in runs {
        if !profiles.contains(&r.profile) {
            profiles.push(r.profile.clone());
        }
        if !strategies.contains(&r.strategy) {
            strategies.push(r.strategy.clone());
        }
    }
    let by_key: BTreeMap<(usize, usize), &Run> = runs
        .iter()
        .map(|r| {
            let p = profiles.iter().position(|x| *x == r.profile).unwrap();
            let s = strategies.iter().position(|x| *x == r.strategy).unwrap();
            ((p, s), r)
        })
        .collect();
    let groups = profiles.len();
    let per = strategies.len();
    // Bar geometry inside a group of width 1: a margin of 0.1 on each side.
    let bar_w = 0.8 / per as f64;
    let bar_x = |p: usize, s: usize| (p as f64 + 0.1 + s as f64 * bar_w, p as f64 + 0.1 + (s as f64 + 0.9) * bar_w);
    let base_label = |p: usize| {
        let bases: Vec<u64> = (0..per).filter_map(|s| by_key.get(&(p, s)).map(|r| r.base_bytes())).collect();
        let max = bases.iter().copied().max().unwrap_or(0);
        format!("{} (round 1: {:.0} MB)", profiles[p], mb(max))
    };

    let full = BitMapBackend::new(output, size).into_drawing_area();
    full.fill(&WHITE)?;
    let root = full.titled(title, ("sans-serif", 26).into_font().style(FontStyle::Bold))?;
    let (top, bottom) = root.split_vertically((size.1 as f64 * 0.55) as u32);

    // Panel 1: update data by round.
    let max_update =
        runs.iter().map(|r| r.rounds.iter().filter(|x| x.0 > 1).map(|x| x.2).sum::<u64>()).max().unwrap_or(0);
    // Headroom above the tallest bar for its label and the legend (up to ~8 entries).
    let y1 = (mb(max_update) * 1.5).max(0.01);
    let mut chart = ChartBuilder::on(&top)
        .caption("Bytes on the wire after round 1 (update data), stacked by round", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups as f64, 0.0..y1)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("MB on the wire")
        .y_label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for p in 0..groups {
        group_label(&full, chart.backend_coord(&(p as f64 + 0.5, 0.0)), &base_label(p))?;
    }
    // One legend entry per (strategy, update round position).
    for (s, strategy) in strategies.iter().enumerate() {
        let n_rounds = (0..groups)
            .filter_map(|p| by_key.get(&(p, s)))
            .map(|r| r.rounds.iter().filter(|x| x.0 > 1).count())
            .max()
            .unwrap_or(0);
        for i in 0..n_rounds {
            let color = shade(strategy, i, n_rounds);
            let mut rects = Vec::new();
            let mut label = String::new();
            for p in 0..groups {
                let Some(run) = by_key.get(&(p, s)) else { continue };
                let updates: Vec<&(u64, String, u64)> = run.rounds.iter().filter(|x| x.0 > 1).collect();
                // Align the final round with the last shade, earlier rounds from the first.
                let k =
                    if i == n_rounds - 1 { updates.len().checked_sub(1) } else { (i < updates.len() - 1).then_some(i) };
                let Some(k) = k else { continue };
                let below: u64 = updates[..k].iter().map(|x| x.2).sum();
                let (x0, x1) = bar_x(p, s);
                rects.push(Rectangle::new([(x0, mb(below)), (x1, mb(below + updates[k].2))], color.filled()));
                if label.is_empty() {
                    label = if updates[k].1 == "final" {
                        format!("{strategy}: final round")
                    } else {
                        format!("{strategy}: round {}", updates[k].0)
                    };
                }
            }
            if rects.is_empty() {
                continue;
            }
            chart
                .draw_series(rects)?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        }
    }
    // The strategy and its total above each bar.
    let mut texts = Vec::new();
    for (&(p, s), run) in &by_key {
        let total: u64 = run.rounds.iter().filter(|x| x.0 > 1).map(|x| x.2).sum();
        let (x0, _) = bar_x(p, s);
        texts.push(Text::new(
            format!("{} {:.2} MB", run.strategy, mb(total)),
            (x0, mb(total) + y1 * 0.05),
            ("sans-serif", 13).into_font(),
        ));
    }
    chart.draw_series(texts)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;

    // Panel 2: downtime: the final round (dark), and the rest of migrate-finish (light).
    let wall = |r: &Run| r.finish_wall.unwrap_or(r.downtime).max(r.downtime);
    let max_down = runs.iter().map(wall).fold(0.0, f64::max);
    let y2 = (max_down * 1000.0 * 1.6).max(1.0);
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "Downtime, VM paused (ms): final round sent (dark) + delivered and durable on the destination (light)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups as f64, 0.0..y2)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ms")
        .y_label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (p, name) in profiles.iter().enumerate() {
        group_label(&full, chart.backend_coord(&(p as f64 + 0.5, 0.0)), name)?;
    }
    for (s, strategy) in strategies.iter().enumerate() {
        let dark = shade(strategy, 1, 2);
        let light = shade(strategy, 0, 2);
        let mine: Vec<(usize, &Run)> = (0..groups).filter_map(|p| by_key.get(&(p, s)).map(|r| (p, *r))).collect();
        let finals: Vec<_> = mine
            .iter()
            .map(|&(p, r)| {
                let (x0, x1) = bar_x(p, s);
                Rectangle::new([(x0, 0.0), (x1, r.downtime * 1000.0)], dark.filled())
            })
            .collect();
        chart
            .draw_series(finals)?
            .label(format!("{strategy}: final round"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], dark.filled()));
        let rests: Vec<_> = mine
            .iter()
            .filter(|(_, r)| r.finish_wall.is_some())
            .map(|&(p, r)| {
                let (x0, x1) = bar_x(p, s);
                Rectangle::new([(x0, r.downtime * 1000.0), (x1, wall(r) * 1000.0)], light.filled())
            })
            .collect();
        if !rests.is_empty() {
            chart
                .draw_series(rests)?
                .label(format!("{strategy}: until durable on the destination"))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], light.filled()));
        }
    }
    let ms_label = |ms: f64| if ms < 10.0 { format!("{ms:.1}") } else { format!("{ms:.0}") };
    let texts: Vec<_> = by_key
        .iter()
        .map(|(&(p, s), r)| {
            let (x0, _) = bar_x(p, s);
            let label = match r.finish_wall {
                Some(_) => format!("{} / {}", ms_label(r.downtime * 1000.0), ms_label(wall(r) * 1000.0)),
                None => ms_label(r.downtime * 1000.0),
            };
            Text::new(label, (x0, wall(r) * 1000.0 + y2 * 0.07), ("sans-serif", 13).into_font())
        })
        .collect();
    chart.draw_series(texts)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present().with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-plot: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut input = None;
    let mut output = None;
    let mut font = None;
    let mut size = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--input" => input = Some(PathBuf::from(value()?)),
            "--output" => output = Some(PathBuf::from(value()?)),
            "--font" => font = Some(PathBuf::from(value()?)),
            "--size" => {
                let v = value()?;
                let (w, h) = v.split_once('x').ok_or_else(|| anyhow!("--size wants WxH, not {v:?}"))?;
                size = Some((w.parse()?, h.parse()?));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let input = input.ok_or_else(|| anyhow!("--input is required\n{USAGE}"))?;
    let output = output.ok_or_else(|| anyhow!("--output is required\n{USAGE}"))?;
    let text = std::fs::read_to_string(&input).with_context(|| format!("reading {}", input.display()))?;
    let doc: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))?;
    if outrun::is_outrun(&doc) {
        let o = outrun::parse_outrun(&doc)?;
        load_font(font)?;
        return outrun::draw_outrun(&o, &output, size.unwrap_or((1400, 1500)));
    }
    let (title, runs) = parse(&doc)?;
    load_font(font)?;
    draw(&title, &runs, &output, size.unwrap_or((1400, 1000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        let run = |profile: &str, strategy: &str, rounds: &[(u64, &str, u64)], down: f64| {
            serde_json::json!({
                "profile": profile, "strategy": strategy, "ok": true, "downtime-seconds": down,
                "rounds": rounds.iter().map(|(n, k, w)| serde_json::json!({"round": n, "kind": k, "wire-bytes": w})).collect::<Vec<_>>(),
            })
        };
        serde_json::json!({"title": "test", "results": [
            run("msn", "row", &[(1, "base", 100_000_000), (2, "update", 2_000_000), (3, "final", 1_000_000)], 0.05),
            run("msn", "bitmap", &[(1, "base", 100_000_000), (2, "update", 3_000_000), (3, "update", 500_000), (4, "update", 400_000), (5, "final", 900_000)], 0.04),
            run("bonnie", "row", &[(1, "base", 100_000_000), (2, "update", 0), (3, "final", 1_000)], 0.01),
            {"profile": "bonnie", "strategy": "bitmap", "ok": false},
        ]})
    }

    #[test]
    fn parses_results_and_skips_failed_runs() {
        let (title, runs) = parse(&sample()).unwrap();
        assert_eq!(title, "test");
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[1].rounds.len(), 5);
        assert_eq!(runs[0].base_bytes(), 100_000_000);
        assert!(parse(&serde_json::json!({"results": []})).is_err());
    }

    #[test]
    fn draws_a_png_when_a_font_is_there() {
        if load_font(None).is_err() {
            eprintln!("skipped: no font installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("bench-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("chart.png");
        let (title, runs) = parse(&sample()).unwrap();
        draw(&title, &runs, &out, (800, 600)).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
