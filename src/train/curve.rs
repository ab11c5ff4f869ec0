//! The training curve of a run (`curve.png` next to its checkpoints): validation Dice per epoch,
//! overall and per lesion type (and, when the multimask outputs train, overall for the output the
//! predicted IoU ranks first), and the training loss.

use super::EpochRecord;
use crate::eval::report::{png, register_font, COLORS};
use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use plotters::prelude::*;
use std::collections::BTreeSet;

pub fn curve_png(history: &[EpochRecord]) -> Result<Vec<u8>> {
    register_font();
    let (w, h) = (1400u32, 520u32);
    let last = history.iter().map(|e| e.epoch).max().unwrap_or(0).max(1) as f64;
    let labels: BTreeSet<&String> = history.iter().flat_map(|e| e.val_by_label.keys()).collect();
    // Dice axis: from just under the lowest trained-epoch score (epoch 0, the untrained start,
    // would flatten the rest) to 1.
    let trained: Vec<&EpochRecord> = history.iter().filter(|e| e.epoch > 0).collect();
    let lowest = trained
        .iter()
        .flat_map(|e| std::iter::once(e.val.dice).chain(e.val_multimask.as_ref().map(|m| m.dice)).chain(e.val_by_label.values().map(|s| s.dice)))
        .fold(1.0f64, f64::min);
    let multimask: Vec<(f64, f64)> = trained.iter().filter_map(|e| e.val_multimask.as_ref().map(|m| (e.epoch as f64, m.dice))).collect();
    let y0 = ((lowest - 0.02) * 20.0).floor() / 20.0;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
        let (left, right) = root.split_horizontally(900);
        let mut chart = ChartBuilder::on(&left)
            .caption("validation Dice per epoch (thick: overall)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(1f64..last.max(2.0), y0.clamp(0.0, 0.95)..1f64)
            .map_err(|e| anyhow!("{e:?}"))?;
        chart.configure_mesh().x_desc("epoch").label_style(("sans-serif", 13)).draw().map_err(|e| anyhow!("{e:?}"))?;
        for (k, label) in labels.iter().enumerate() {
            let color = COLORS[k % COLORS.len()].mix(if k < COLORS.len() { 0.9 } else { 0.5 });
            let pts: Vec<(f64, f64)> = trained.iter().filter_map(|e| e.val_by_label.get(*label).map(|s| (e.epoch as f64, s.dice))).collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(1)))
                .map_err(|e| anyhow!("{e:?}"))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        let overall: Vec<(f64, f64)> = trained.iter().map(|e| (e.epoch as f64, e.val.dice)).collect();
        chart
            .draw_series(LineSeries::new(overall.clone(), BLACK.stroke_width(3)))
            .map_err(|e| anyhow!("{e:?}"))?
            .label("overall")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(3)));
        chart.draw_series(overall.iter().map(|&p| Circle::new(p, 4, BLACK.filled()))).map_err(|e| anyhow!("{e:?}"))?;
        if !multimask.is_empty() {
            let style = BLACK.mix(0.6).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(multimask, 8, 5, style))
                .map_err(|e| anyhow!("{e:?}"))?
                .label("overall, multimask")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;

        let losses: Vec<(f64, f64)> = trained.iter().map(|e| (e.epoch as f64, e.train_loss)).collect();
        let ymax = losses.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
        let mut chart = ChartBuilder::on(&right)
            .caption(
                if trained.iter().any(|e| e.train_multimask_loss > 0.0) { "training loss (Dice + BCE, + multimask + IoU)" } else { "training loss (Dice + BCE)" },
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(1f64..last.max(2.0), 0f64..ymax)
            .map_err(|e| anyhow!("{e:?}"))?;
        chart.configure_mesh().x_desc("epoch").label_style(("sans-serif", 13)).draw().map_err(|e| anyhow!("{e:?}"))?;
        chart.draw_series(LineSeries::new(losses.clone(), COLORS[0].stroke_width(2))).map_err(|e| anyhow!("{e:?}"))?;
        chart.draw_series(losses.iter().map(|&p| Circle::new(p, 4, COLORS[0].filled()))).map_err(|e| anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow!("{e:?}"))?;
    }
    png(&RgbImage::from_raw(w, h, buf).context("plot buffer")?)
}
