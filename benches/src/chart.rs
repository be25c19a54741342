//! An SVG bar chart of a report: GB/s per mode, each bar labelled with its ratio to the
//! plaintext baseline.

use std::path::Path;

use plotters::prelude::*;

use crate::mode::Mode;
use crate::report::ModeSummary;

/// Draws `summary` into an SVG file at `path`, titled `title`.
pub fn svg(path: &Path, title: &str, summary: &[ModeSummary]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let top = summary
        .iter()
        .map(|m| m.gbps)
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.25;
    let n = summary.len() as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0u32..n).into_segmented(), 0f64..top)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("GB/s (median)")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => summary
                .get(*i as usize)
                .map_or_else(String::new, |m| m.mode.to_owned()),
            _ => String::new(),
        })
        .draw()
        .map_err(draw)?;
    // A mode's pulls into a file share its colour; their labels tell them apart.
    let colour = |row: &str| match Mode::parse_row(row).map_or(row, |(mode, _, _)| mode.name()) {
        "plaintext-tcp" => RGBColor(150, 150, 150),
        "tls-tcp" => RGBColor(52, 101, 164),
        "quic" => RGBColor(78, 154, 6),
        _ => RGBColor(204, 0, 0),
    };
    for (i, m) in summary.iter().enumerate() {
        let i = i as u32;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), m.gbps),
                ],
                colour(&m.mode).filled(),
            )))
            .map_err(draw)?;
        let label = match m.ratio_to_plaintext {
            Some(r) => format!("{:.2} GB/s ({r:.2}x)", m.gbps),
            None => format!("{:.2} GB/s", m.gbps),
        };
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (SegmentValue::CenterOf(i), m.gbps + top * 0.03),
                ("sans-serif", 14).into_font().color(&BLACK),
            )))
            .map_err(draw)?;
    }
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e:?}")
}
