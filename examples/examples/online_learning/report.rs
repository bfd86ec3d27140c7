//! Progress lines, the JSON report and the SVG plot of the timelines.

use crate::common::{ModeReport, TimelinePoint};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Writes an SVG with three stacked panels over time (`t_s`): window AUC,
/// window logloss and p99 ingest-to-serving latency (ms, log scale), one
/// line per named series. Non-finite values are left out.
pub fn write_plot_svg(path: &Path, series: &[(&str, &[TimelinePoint])]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (960, 960)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let t_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.t_s))
        .filter(|t| t.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let values = |f: fn(&TimelinePoint) -> f64| {
        series
            .iter()
            .flat_map(|(_, points)| points.iter().map(f))
            .filter(|v| v.is_finite())
            .collect::<Vec<f64>>()
    };
    let [auc_area, ll_area, lat_area] = panels.as_slice() else {
        anyhow::bail!("cannot split the plot into three panels");
    };

    let auc = |p: &TimelinePoint| p.window_auc;
    draw_panel(
        auc_area,
        "window AUC",
        series,
        t_max,
        linear_range(&values(auc)),
        auc,
        true,
    )?;
    let logloss = |p: &TimelinePoint| p.window_logloss;
    draw_panel(
        ll_area,
        "window logloss",
        series,
        t_max,
        linear_range(&values(logloss)),
        logloss,
        false,
    )?;
    let latency = |p: &TimelinePoint| p.latency_ms_p99;
    let positive: Vec<f64> = values(latency).into_iter().filter(|v| *v > 0.0).collect();
    let (lo, hi) = log_range(&positive);
    draw_panel(
        lat_area,
        "p99 ingest-to-serving latency (ms)",
        series,
        t_max,
        (lo..hi).log_scale(),
        |p: &TimelinePoint| {
            if p.latency_ms_p99 > 0.0 {
                p.latency_ms_p99
            } else {
                f64::NAN
            }
        },
        false,
    )?;
    root.present()?;
    Ok(())
}

/// The data range padded by 5 %, or `0..1` without data.
fn linear_range(values: &[f64]) -> std::ops::Range<f64> {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

/// Decades around the positive data, or `0.1..1000` without data.
fn log_range(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.1, 1000.0);
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
    (lo, hi)
}

fn draw_panel<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[(&str, &[TimelinePoint])],
    t_max: f64,
    y: Y,
    value: fn(&TimelinePoint) -> f64,
    legend: bool,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, y)?;
    chart
        .configure_mesh()
        .x_desc("t (s)")
        .y_label_formatter(&|v: &f64| tick(*v))
        .light_line_style(WHITE)
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.t_s, value(p)))
            .filter(|(t, v)| t.is_finite() && v.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    if legend && !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// An axis label with as many decimals as its magnitude needs.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// `n` with thousands separators: `1234567` → `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Milliseconds with two significant-ish digits, `-` when unknown.
fn ms(v: f64) -> String {
    if !v.is_finite() {
        "-".to_owned()
    } else if v >= 10.0 {
        format!("{v:.0}ms")
    } else {
        format!("{v:.1}ms")
    }
}

/// One progress line, e.g.
/// `fused    t=3.2s rows=1,234,567 ev/s=612,345 winAUC=0.7412 winLL=0.3921 lag=12ms p99=4.1ms`.
pub fn progress_line(mode: &str, p: &TimelinePoint) -> String {
    let per_s = if p.events_per_s.is_finite() {
        grouped(p.events_per_s.max(0.0).round() as u64)
    } else {
        "-".to_owned()
    };
    format!(
        "{mode:<8} t={:.1}s rows={} ev/s={per_s} winAUC={:.4} winLL={:.4} lag={} p99={}",
        p.t_s,
        grouped(p.rows),
        p.window_auc,
        p.window_logloss,
        ms(p.model_lag_ms),
        ms(p.latency_ms_p99)
    )
}

/// The report as JSON: the summary figures, `skipped_lines` and the
/// stream job's `edges`, without the timeline. Non-finite figures become
/// `null`.
pub fn report_json(r: &ModeReport) -> serde_json::Value {
    serde_json::json!({
        "edges": r.edges,
        "rows": r.rows,
        "seconds": r.seconds,
        "events_per_s": r.events_per_s,
        "logloss": r.logloss,
        "auc": r.auc,
        "latency_ms_p50": r.latency_ms_p50,
        "latency_ms_p99": r.latency_ms_p99,
        "model_lag_ms_p99": r.model_lag_ms_p99,
        "cpu_seconds_per_million": r.cpu_seconds_per_million,
        "skipped_lines": r.skipped_lines,
    })
}

/// The end of a run for people: what each mode learned and how fast,
/// from the summary JSON (`--json` prints that instead).
pub fn human_summary(summary: &serde_json::Value) -> String {
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mode_line = |name: &str, m: &serde_json::Value| {
        format!(
            "{name:<9} {} rows in {:.1} s ({} rows/s): AUC {:.4}, logloss {:.4}; \
             ingest-to-serving p50 {} p99 {}, model lag p99 {}; {:.2} CPU-s per million rows\n",
            grouped(m["rows"].as_u64().unwrap_or(0)),
            num(&m["seconds"]),
            grouped(num(&m["events_per_s"]).max(0.0).round() as u64),
            num(&m["auc"]),
            num(&m["logloss"]),
            ms(num(&m["latency_ms_p50"])),
            ms(num(&m["latency_ms_p99"])),
            ms(num(&m["model_lag_ms_p99"])),
            num(&m["cpu_seconds_per_million"]),
        )
    };
    let mut out = String::from(
        "\nOnline learning, progressive validation (each row scored before it trains):\n",
    );
    if summary.get("rows").is_some() {
        let name = summary["runner"].as_str().map_or("separate", |r| {
            if r == "cluster" {
                "actors"
            } else {
                "fused"
            }
        });
        out.push_str(&mode_line(name, summary));
        if let Some(failures) = summary["failures"].as_u64().filter(|f| *f > 0) {
            out.push_str(&format!(
                "          {failures} failure(s) recovered from checkpoints (resumed from epoch {})\n",
                summary["resumed_from_epoch"]
            ));
        }
    } else {
        for name in ["chained", "actors", "separate"] {
            if let Some(m) = summary.get(name) {
                out.push_str(&mode_line(name, m));
            }
        }
        let r = &summary["ratios"]["fused_over_separate"];
        out.push_str(&format!(
            "fused ({}) over separate: {:.2}x the rows/s at saturation, {:.2}x the CPU per row, \
             {:.2}x the p99 latency, {:.2}x the model lag\n",
            summary["fused"]["mode"].as_str().unwrap_or("-"),
            num(&r["events_per_s_saturation"]),
            num(&r["cpu_seconds_per_million"]),
            num(&r["latency_ms_p99"]),
            num(&r["model_lag_ms_p99"]),
        ));
    }
    out
}
