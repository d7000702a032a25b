//! PNG plots with plotters and an embedded font (no system fonts needed).

use anyhow::{anyhow, Result};
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

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// Loss and accuracy per epoch (train and validation), two panels.
pub fn curves(h: &History, path: &Path, title: &str) -> Result<()> {
    init_font();
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
    let (left, right) = root.split_horizontally(500);
    let n = h.epochs.len().max(2) as f32;
    let series = |f: &dyn Fn(&qmomentum::train::EpochRecord) -> Option<f32>| -> Vec<(f32, f32)> {
        h.epochs
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f32, v)))
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
        let (lo, hi) = all
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let pad = ((hi - lo) * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(1f32..n, (lo - pad)..(hi + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(name)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
            .map_err(err)?
            .label(format!("train {name}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val, RED.stroke_width(2)))
                .map_err(err)?
                .label(format!("validation {name}"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A bar chart of `(label, mean, std)` with error bars.
pub fn bars(rows: &[(String, f32, f32)], path: &Path, title: &str, y_desc: &str) -> Result<()> {
    init_font();
    let root = BitMapBackend::new(path, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let lo = rows.iter().map(|r| r.1 - r.2).fold(f32::INFINITY, f32::min);
    let hi = rows.iter().map(|r| r.1 + r.2).fold(f32::NEG_INFINITY, f32::max);
    let pad = ((hi - lo) * 0.15).max(0.005);
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n).into_segmented(), (lo - pad).max(0.0)..(hi + pad).min(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map(|r| r.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let mut b = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), r.1)],
                BLUE.mix(0.6).filled(),
            );
            b.set_margin(0, 0, 12, 12);
            b
        }))
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            PathElement::new(
                vec![
                    (SegmentValue::CenterOf(i), r.1 - r.2),
                    (SegmentValue::CenterOf(i), r.1 + r.2),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
