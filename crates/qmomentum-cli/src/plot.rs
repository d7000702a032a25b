//! PNG plots with plotters and an embedded font (no system fonts needed).
//!
//! Each plot is drawn into memory and written with the same atomic, device-aware write as every
//! other output, so a failure is one plain message naming the file (not a nested Rust error) and
//! never leaves half a PNG behind.

use anyhow::{anyhow, Context, Result};
use plotters::coord::types::{RangedCoordf32, RangedCoordi32};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use qmomentum::train::History;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

fn init_font() {
    FONT.call_once(|| {
        let _ = register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../../assets/DejaVuSans.ttf"),
        );
    });
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

/// Encode an RGB buffer as PNG and write it to `path`.
fn save_png(path: &Path, rgb: Vec<u8>, (w, h): (u32, u32)) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| anyhow!("internal: plot buffer size"))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| anyhow!("{}: cannot encode the plot: {e}", path.display()))?;
    crate::output::write_output(path, &png).with_context(|| format!("cannot write the plot {}", path.display()))
}

/// The y range of finite values, padded; a fixed range when there is nothing finite to show.
fn y_range(values: &[f32]) -> (f32, f32) {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let (a, b) = (lo - pad, hi + pad);
    if a.is_finite() && b.is_finite() {
        (a, b)
    } else {
        (lo, hi.max(lo + 1.0))
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type EpochChart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordi32, RangedCoordf32>>;

/// A panel with whole-number epochs 1..=last on x (half an epoch of margin each side) and
/// `[lo, hi]` on y, its mesh drawn.
fn epoch_chart<'a, 'b>(area: &'a Area<'b>, last: i32, lo: f32, hi: f32, name: &str) -> Result<EpochChart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0i32..last + 1, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(name)
        .x_labels((last as usize + 2).min(12))
        .x_label_formatter(&|x| {
            if *x >= 1 && *x <= last {
                x.to_string()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// Loss and accuracy per epoch (train and validation), two panels. Points carry markers, so a
/// one-epoch run still shows its values; epoch ticks are whole numbers.
pub fn curves(h: &History, path: &Path, title: &str) -> Result<()> {
    init_font();
    let (w, hgt) = (1000u32, 420u32);
    let mut buf = vec![255u8; (w * hgt * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, hgt)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (left, right) = root.split_horizontally(500);
        let last = h.epochs.iter().map(|r| r.epoch).max().unwrap_or(1).max(1) as i32;
        let series = |f: &dyn Fn(&qmomentum::train::EpochRecord) -> Option<f32>| -> Vec<(i32, f32)> {
            h.epochs
                .iter()
                .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.epoch as i32, v)))
                .collect()
        };
        for (area, name, train, val) in [
            (&left, "loss", series(&|r| Some(r.loss)), series(&|r| r.val_loss)),
            (
                &right,
                "accuracy",
                series(&|r| Some(r.accuracy)),
                series(&|r| r.val_accuracy),
            ),
        ] {
            let all: Vec<f32> = train.iter().chain(val.iter()).map(|p| p.1).collect();
            let (lo, hi) = y_range(&all);
            // Whole-number epochs from 1 to the last (half an epoch of margin each side).
            let mut chart = epoch_chart(area, last, lo, hi, name)?;
            for (points, colour, label) in [(train, BLUE, "train"), (val, RED, "validation")] {
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                    .map_err(err)?
                    .label(format!("{label} {name}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    save_png(path, buf, (w, hgt))
}

/// What a bar of the comparison is (its colour).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// The float reference.
    Float,
    /// Post-training quantization.
    Ptq,
    /// Quantization-aware training.
    Qat,
}

/// One bar: mean with a ± std whisker.
pub struct Bar {
    pub label: String,
    pub kind: BarKind,
    pub mean: f32,
    pub std: f32,
}

/// A bar chart with error bars. The y axis starts at a round value below the lowest whisker
/// (a tenth: 0.7, 0.8, …), stated on the axis, so gaps are not exaggerated by an arbitrary start.
pub fn bars(rows: &[Bar], path: &Path, title: &str, y_desc: &str) -> Result<()> {
    init_font();
    let (w, hgt) = (1000u32, 480u32);
    let mut buf = vec![255u8; (w * hgt * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, hgt)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let finite = |v: f32| if v.is_finite() { v } else { 0.0 };
        let lo = rows.iter().map(|r| finite(r.mean - r.std)).fold(1.0f32, f32::min);
        let y0 = ((lo * 10.0).floor() / 10.0).clamp(0.0, 0.9);
        let n = rows.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f32..n as f32, y0..1.0f32)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(format!("{y_desc} (axis from {y0:.1})"))
            .draw()
            .map_err(err)?;
        let colour = |k: BarKind| match k {
            BarKind::Float => RGBColor(90, 90, 90),
            BarKind::Ptq => RGBColor(230, 140, 30),
            BarKind::Qat => RGBColor(40, 100, 200),
        };
        for (i, r) in rows.iter().enumerate() {
            let x = i as f32;
            let top = finite(r.mean).max(y0);
            let c = colour(r.kind);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.12, y0), (x + 0.88, top)],
                    c.filled(),
                )))
                .map_err(err)?;
            let (a, b) = (finite(r.mean - r.std).max(y0), finite(r.mean + r.std).min(1.0));
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x + 0.5, a), (x + 0.5, b)],
                    BLACK.stroke_width(2),
                )))
                .map_err(err)?;
            let kind = match r.kind {
                BarKind::Float => "",
                BarKind::Ptq => " PTQ",
                BarKind::Qat => " QAT",
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{}{kind}", r.label),
                    (x + 0.5, y0),
                    ("sans-serif", 14)
                        .into_font()
                        .color(&BLACK)
                        .pos(plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Center,
                            plotters::style::text_anchor::VPos::Top,
                        )),
                )))
                .map_err(err)?;
        }
        for (k, label) in [(BarKind::Float, "float"), (BarKind::Ptq, "PTQ"), (BarKind::Qat, "QAT")] {
            if rows.iter().any(|r| r.kind == k) {
                let c = colour(k);
                chart
                    .draw_series(std::iter::empty::<Circle<(f32, f32), i32>>())
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    save_png(path, buf, (w, hgt))
}

/// Oscillation per quantized layer and epoch: the fraction of weights whose oscillation frequency
/// exceeds the threshold (left) and code flips per step (right), one line per layer.
pub fn oscillations(h: &History, path: &Path, title: &str) -> Result<()> {
    init_font();
    let (w, hgt) = (1000u32, 420u32);
    let mut buf = vec![255u8; (w * hgt * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, hgt)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (left, right) = root.split_horizontally(500);
        let last = h.epochs.iter().map(|r| r.epoch).max().unwrap_or(1).max(1) as i32;
        let layers: Vec<usize> = h
            .epochs
            .first()
            .map(|r| r.oscillation.iter().map(|o| o.layer).collect())
            .unwrap_or_default();
        let colours = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (area, name, pick) in [
            (&left, "fraction oscillating", 0usize),
            (&right, "code flips per step", 1usize),
        ] {
            let series: Vec<(usize, Vec<(i32, f32)>)> = layers
                .iter()
                .map(|&l| {
                    let pts = h
                        .epochs
                        .iter()
                        .filter_map(|r| {
                            r.oscillation.iter().find(|o| o.layer == l).map(|o| {
                                (
                                    r.epoch as i32,
                                    if pick == 0 {
                                        o.fraction_oscillating
                                    } else {
                                        o.flips_per_step
                                    },
                                )
                            })
                        })
                        .filter(|p| p.1.is_finite())
                        .collect();
                    (l, pts)
                })
                .collect();
            let all: Vec<f32> = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).collect();
            let (_, hi) = y_range(&all);
            let mut chart = epoch_chart(area, last, 0.0, hi.max(1e-6), name)?;
            for (k, (l, pts)) in series.into_iter().enumerate() {
                let c = colours[k % colours.len()];
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(err)?
                    .label(format!("layer {l}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    save_png(path, buf, (w, hgt))
}

/// A heat map: `values[r][c]` over `rows × cols` (None: no data, drawn grey), each cell coloured
/// from the lowest to the highest value shown (viridis-like, from plotters' palette) and labelled
/// with its value formatted as `fmt` (`{:.3}` or `{:.4}`).
#[allow(clippy::too_many_arguments)]
pub fn heatmap(
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f32>>],
    path: &Path,
    title: &str,
    fmt: &str,
) -> Result<()> {
    init_font();
    let (w, hgt) = (
        (160 + 110 * cols.len() as u32).max(680),
        (120 + 60 * rows.len() as u32).max(240),
    );
    let finite: Vec<f32> = values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let lo = finite.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let digits = if fmt.contains(".4") { 4 } else { 3 };
    let mut buf = vec![255u8; (w * hgt * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, hgt)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (nr, nc) = (rows.len().max(1) as i32, cols.len().max(1) as i32);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(90)
            .build_cartesian_2d(0f32..nc as f32, 0f32..nr as f32)
            .map_err(err)?;
        let pos = |h, v| plotters::style::text_anchor::Pos::new(h, v);
        use plotters::style::text_anchor::{HPos, VPos};
        // Axis names at the centres of the cells, placed in pixels (plotters' mesh labels sit on
        // tick positions, not between them). Row 0 at the top.
        for (r, name) in rows.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(0.0, (nr - 1 - r as i32) as f32 + 0.5));
            root.draw(&Text::new(
                name.clone(),
                (px - 8, py),
                ("sans-serif", 15)
                    .into_font()
                    .color(&BLACK)
                    .pos(pos(HPos::Right, VPos::Center)),
            ))
            .map_err(err)?;
        }
        for (c, name) in cols.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(c as f32 + 0.5, 0.0));
            root.draw(&Text::new(
                name.clone(),
                (px, py + 8),
                ("sans-serif", 15)
                    .into_font()
                    .color(&BLACK)
                    .pos(pos(HPos::Center, VPos::Top)),
            ))
            .map_err(err)?;
        }
        for (r, row) in values.iter().enumerate() {
            let y = (nr - 1 - r as i32) as f32;
            for (c, v) in row.iter().enumerate() {
                let x = c as f32;
                let t = match v {
                    Some(v) if v.is_finite() => Some(if hi > lo { ((v - lo) / (hi - lo)) as f64 } else { 0.5 }),
                    _ => None,
                };
                let colour = t.map_or(RGBColor(200, 200, 200), viridis);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        colour.filled(),
                    )))
                    .map_err(err)?;
                let label = match v {
                    Some(v) => format!("{v:.digits$}"),
                    None => "–".into(),
                };
                let text_colour = if t.is_some_and(|t| t < 0.55) { WHITE } else { BLACK };
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (x + 0.5, y + 0.5),
                        ("sans-serif", 16)
                            .into_font()
                            .color(&text_colour)
                            .pos(pos(HPos::Center, VPos::Center)),
                    )))
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    save_png(path, buf, (w, hgt))
}

/// Viridis, interpolated between five of its anchors (plotters' colour maps are behind a feature
/// this build does not need otherwise).
fn viridis(t: f64) -> RGBColor {
    const A: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f64;
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(
        mix(A[i].0, A[i + 1].0),
        mix(A[i].1, A[i + 1].1),
        mix(A[i].2, A[i + 1].2),
    )
}
