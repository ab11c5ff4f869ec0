//! The report folder the CLI writes: per-image CSV, summary JSON, a Markdown table in the
//! paper's Table 1 format (plus median, 95% interval and paired comparisons), histograms of
//! Dice / IoU / accuracy per lesion type, and overlays of the best and worst cases.
//! Every file is written atomically (temporary file, fsync, rename).

use super::dataset::BinaryMask;
use super::runner::{summarize, EvalSummary, ImageResult, ModelResult};
use super::scores::{ImageScores, UNLABELLED};
use super::prompts::SimPrompt;
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

pub const RESULTS_CSV: &str = "results.csv";
pub const SUMMARY_JSON: &str = "summary.json";
pub const REPORT_MD: &str = "report.md";
/// Overlays written per model: this many best and this many worst images.
pub const OVERLAYS_EACH: usize = 3;
/// Overlays of smaller images are enlarged by an integer factor to at least this width.
const OVERLAY_MIN_WIDTH: u32 = 400;

/// What the report says about the run besides the numbers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunInfo {
    pub dataset: String,
    pub models: Vec<String>,
    pub settings: serde_json::Value,
    pub skipped: Vec<(String, String)>,
}

#[derive(Serialize)]
struct SummaryFile<'a> {
    run: &'a RunInfo,
    summary: &'a EvalSummary,
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp{}", path.extension().and_then(|e| e.to_str()).unwrap_or(""), std::process::id()));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    crate::model::checkpoint::sync_parent(path);
    Ok(())
}

/// One CSV row per image and model.
#[derive(Debug, Serialize, Deserialize)]
struct CsvRow {
    index: usize,
    id: String,
    label: String,
    group: String,
    width: u32,
    height: u32,
    mask_resized: bool,
    point_x: Option<f32>,
    point_y: Option<f32>,
    box_x0: Option<f32>,
    box_y0: Option<f32>,
    box_x1: Option<f32>,
    box_y1: Option<f32>,
    model: String,
    accuracy: f64,
    dice: f64,
    iou: f64,
    predicted_iou: f32,
}

pub fn results_csv(rows: &[ImageResult]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        for m in &r.results {
            let (p, b) = (r.prompt.point, r.prompt.bbox);
            w.serialize(CsvRow {
                index: r.index,
                id: r.id.clone(),
                label: r.label.clone().unwrap_or_default(),
                group: r.group.clone().unwrap_or_default(),
                width: r.width,
                height: r.height,
                mask_resized: r.mask_resized,
                point_x: p.map(|p| p[0]),
                point_y: p.map(|p| p[1]),
                box_x0: b.map(|b| b[0]),
                box_y0: b.map(|b| b[1]),
                box_x1: b.map(|b| b[2]),
                box_y1: b.map(|b| b[3]),
                model: m.model.clone(),
                accuracy: m.scores.accuracy,
                dice: m.scores.dice,
                iou: m.scores.iou,
                predicted_iou: m.predicted_iou,
            })?;
        }
    }
    Ok(w.into_inner()?)
}

/// Reads a results.csv back (for merging shards): rows in index order, models in file order.
pub fn read_results_csv(path: &Path) -> Result<(Vec<String>, Vec<ImageResult>)> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let mut models: Vec<String> = Vec::new();
    let mut rows: BTreeMap<(usize, String), ImageResult> = BTreeMap::new();
    for rec in r.deserialize::<CsvRow>() {
        let c = rec.with_context(|| format!("parsing {}", path.display()))?;
        if !models.contains(&c.model) {
            models.push(c.model.clone());
        }
        let prompt = SimPrompt {
            point: c.point_x.zip(c.point_y).map(|(x, y)| [x, y]),
            bbox: match (c.box_x0, c.box_y0, c.box_x1, c.box_y1) {
                (Some(a), Some(b), Some(cc), Some(d)) => Some([a, b, cc, d]),
                _ => None,
            },
        };
        let row = rows.entry((c.index, c.id.clone())).or_insert_with(|| ImageResult {
            index: c.index,
            id: c.id.clone(),
            label: Some(c.label.clone()).filter(|l| !l.is_empty()),
            group: Some(c.group.clone()).filter(|g| !g.is_empty()),
            width: c.width,
            height: c.height,
            mask_resized: c.mask_resized,
            prompt,
            results: Vec::new(),
        });
        row.results.push(ModelResult {
            model: c.model,
            scores: ImageScores { accuracy: c.accuracy, dice: c.dice, iou: c.iou },
            predicted_iou: c.predicted_iou,
            mask_rle: None,
        });
    }
    Ok((models, rows.into_values().collect()))
}

fn fmt_stat(mean: f64, var: f64) -> String {
    format!("{mean:.4} ({var:.4})")
}

/// The Markdown report: Table 1 (mean (variance)), medians with 95% intervals, comparisons.
pub fn markdown(info: &RunInfo, s: &EvalSummary) -> String {
    let mut md = String::new();
    md.push_str("# Evaluation report\n\n");
    md.push_str(&format!("Dataset: `{}`. Images scored: {}; skipped: {}.", info.dataset, s.images_done, s.skipped));
    if s.masks_resized > 0 {
        md.push_str(&format!(
            " {} ground-truth masks had another size than their image and were resized to the image with nearest-neighbour.",
            s.masks_resized
        ));
        let in_image_pixels = info.settings.get("reference_width").and_then(|v| v.as_u64()) == Some(0);
        let boxes = info.settings.get("prompt_mode").and_then(|v| v.as_str()).is_some_and(|m| m.contains("BOX"));
        if in_image_pixels && boxes {
            // HAM10000's masks keep the originals' size: the paper's 20 / 30 px were meant there.
            md.push_str(" The box offsets (margin, shift) were in the images' own pixels (`reference_width` 0); the SkinSAM paper drew them on the original images: to follow it, give the originals' width as `reference_width` (`--reference-width 600` for HAM10000).");
        }
    }
    md.push_str(&format!("\n\nSettings: `{}`\n\n", info.settings));
    let labels: Vec<String> = s.models.values().next().map(|m| m.by_label.keys().cloned().collect()).unwrap_or_default();
    md.push_str("## Mean (variance) per lesion type\n\n");
    for model in &info.models {
        let Some(sum) = s.models.get(model) else { continue };
        md.push_str(&format!("### {model}\n\n| Lesion type | n | Accuracy | Dice | IoU |\n|---|---:|---|---|---|\n"));
        for (name, g) in sum.by_label.iter().map(|(k, v)| (k.as_str(), v)).chain(std::iter::once(("**overall**", &sum.overall))) {
            md.push_str(&format!(
                "| {name} | {} | {} | {} | {} |\n",
                g.n,
                fmt_stat(g.accuracy.mean, g.accuracy.variance),
                fmt_stat(g.dice.mean, g.dice.variance),
                fmt_stat(g.iou.mean, g.iou.variance)
            ));
        }
        md.push('\n');
    }
    md.push_str("## Dice: median [95% interval of images]\n\n| Lesion type |");
    for m in &info.models {
        md.push_str(&format!(" {m} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(info.models.len()));
    md.push('\n');
    for l in labels.iter().map(String::as_str).chain(std::iter::once("overall")) {
        md.push_str(&format!("| {l} |"));
        for m in &info.models {
            let g = s.models.get(m).and_then(|x| if l == "overall" { Some(&x.overall) } else { x.by_label.get(l) });
            match g {
                Some(g) => md.push_str(&format!(" {:.4} [{:.4}, {:.4}] |", g.dice.median, g.dice.p2_5, g.dice.p97_5)),
                None => md.push_str(" |"),
            }
        }
        md.push('\n');
    }
    if !s.comparisons.is_empty() {
        md.push_str("\n## Paired comparisons (B - A on the same images and prompts, every pair)\n\n");
        md.push_str("Mean difference with a bootstrap 95% confidence interval, two-sided Wilcoxon signed-rank p-value, and B's wins / ties / losses.\n\n");
        md.push_str("| A | B | Metric | Lesion type | n | Mean diff [95% CI] | Wilcoxon p | W / T / L |\n|---|---|---|---|---:|---|---|---|\n");
        for c in &s.comparisons {
            for (l, p) in c.by_label.iter().map(|(k, v)| (k.as_str(), v)).chain(std::iter::once(("**overall**", &c.overall))) {
                md.push_str(&format!(
                    "| {} | {} | {} | {l} | {} | {:+.4} [{:+.4}, {:+.4}] | {:.3e} | {} / {} / {} |\n",
                    c.model_a, c.model_b, c.metric, p.n, p.mean_diff, p.ci95_low, p.ci95_high, p.wilcoxon_p, p.wins, p.ties, p.losses
                ));
            }
        }
    }
    if !info.skipped.is_empty() {
        md.push_str("\n## Skipped images\n\n");
        for (id, why) in &info.skipped {
            md.push_str(&format!("- `{id}`: {why}\n"));
        }
    }
    md.push_str("\nFigures: `hist_dice.png`, `hist_iou.png`, `hist_accuracy.png`; overlays (ground truth red, prediction green, box and point yellow) in `overlays/`.\n");
    md
}

pub(crate) const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];
const BINS: usize = 20;

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, include_bytes!("../../assets/fonts/DejaVuSans.ttf"));
    });
}

/// One PNG per metric: a panel per lesion type (and overall), a histogram per model.
pub fn histogram_png(models: &[String], rows: &[ImageResult], metric: &str, f: fn(&ImageScores) -> f64) -> Result<Vec<u8>> {
    register_font();
    let mut groups: BTreeMap<String, Vec<&ImageResult>> = BTreeMap::new();
    for r in rows {
        groups.entry(r.label.clone().unwrap_or_else(|| UNLABELLED.into())).or_default().push(r);
    }
    let mut panels: Vec<(String, Vec<&ImageResult>)> = groups.into_iter().collect();
    panels.push(("overall".into(), rows.iter().collect()));
    let cols = 4usize;
    let nrows = panels.len().div_ceil(cols);
    let (w, h) = (1400u32, 320 * nrows as u32 + 40);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (title, body) = root.split_vertically(40);
        let legend = models.iter().enumerate().map(|(i, m)| format!("{} = {m}", ["blue", "orange", "green", "red", "purple", "brown"][i % 6])).collect::<Vec<_>>().join(", ");
        title.titled(&format!("{metric} per lesion type ({legend})"), ("sans-serif", 20)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let areas = body.split_evenly((nrows, cols));
        for ((name, items), area) in panels.iter().zip(areas) {
            let counts: Vec<Vec<u32>> = (0..models.len())
                .map(|k| {
                    let mut c = vec![0u32; BINS];
                    for r in items {
                        let v = f(&r.results[k].scores).clamp(0.0, 1.0);
                        c[((v * BINS as f64) as usize).min(BINS - 1)] += 1;
                    }
                    c
                })
                .collect();
            let ymax = counts.iter().flatten().copied().max().unwrap_or(1).max(1);
            let mut chart = ChartBuilder::on(&area)
                .caption(format!("{name} (n={})", items.len()), ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(40)
                .build_cartesian_2d(0f64..1f64, 0u32..ymax + ymax / 10 + 1)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            chart.configure_mesh().disable_mesh().x_labels(6).y_labels(5).label_style(("sans-serif", 12)).draw().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let width = 1.0 / BINS as f64;
            for (k, c) in counts.iter().enumerate() {
                let color = COLORS[k % COLORS.len()];
                let (x_off, bar) = (width * k as f64 / models.len() as f64, width / models.len() as f64);
                chart
                    .draw_series(c.iter().enumerate().filter(|(_, &n)| n > 0).map(|(b, &n)| {
                        let x0 = b as f64 * width + x_off;
                        Rectangle::new([(x0, 0), (x0 + bar, n)], color.filled())
                    }))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
        }
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    png(&RgbImage::from_raw(w, h, buf).context("plot buffer")?)
}

pub(crate) fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// The image with the ground-truth contour in red, the prediction's in green, and the prompts
/// (box and point) in yellow, like the paper's Figure 3.
pub fn overlay(image: &RgbImage, truth: &BinaryMask, pred: &[u8], prompt: &SimPrompt) -> RgbImage {
    let mut out = image.clone();
    let (w, h) = (image.width() as usize, image.height() as usize);
    let edge = |m: &[u8], x: usize, y: usize| {
        m[y * w + x] != 0 && (x == 0 || y == 0 || x + 1 == w || y + 1 == h || m[y * w + x - 1] == 0 || m[y * w + x + 1] == 0 || m[(y - 1) * w + x] == 0 || m[(y + 1) * w + x] == 0)
    };
    let yellow = Rgb([255, 220, 0]);
    if let Some([x0, y0, x1, y1]) = prompt.bbox {
        let (x0, y0, x1, y1) = (x0 as usize, y0 as usize, (x1 as usize).min(w - 1), (y1 as usize).min(h - 1));
        for x in x0..=x1 {
            out.put_pixel(x as u32, y0 as u32, yellow);
            out.put_pixel(x as u32, y1 as u32, yellow);
        }
        for y in y0..=y1 {
            out.put_pixel(x0 as u32, y as u32, yellow);
            out.put_pixel(x1 as u32, y as u32, yellow);
        }
    }
    for y in 0..h {
        for x in 0..w {
            if edge(&truth.data, x, y) {
                out.put_pixel(x as u32, y as u32, Rgb([255, 0, 0]));
            }
            if edge(pred, x, y) {
                out.put_pixel(x as u32, y as u32, Rgb([0, 255, 0]));
            }
        }
    }
    if let Some([px, py]) = prompt.point {
        for dy in -2i64..=2 {
            for dx in -2i64..=2 {
                let (x, y) = (px as i64 + dx, py as i64 + dy);
                if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && (dx == 0 || dy == 0) {
                    out.put_pixel(x as u32, y as u32, yellow);
                }
            }
        }
    }
    out
}

/// The overlay of a small image (the 200-px HAM10000 copies) is drawn on an enlarged copy, so
/// that the contours stay readable.
fn overlay_scaled(img: &RgbImage, truth: &BinaryMask, pred: Vec<u8>, prompt: &SimPrompt) -> RgbImage {
    let k = OVERLAY_MIN_WIDTH.div_ceil(img.width()).max(1);
    if k == 1 {
        return overlay(img, truth, &pred, prompt);
    }
    let (w, h) = (img.width() * k, img.height() * k);
    let big = image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle);
    let pm = BinaryMask { width: img.width(), height: img.height(), data: pred }.resize_nearest(w, h);
    let s = k as f32;
    let scaled = SimPrompt { point: prompt.point.map(|[x, y]| [x * s, y * s]), bbox: prompt.bbox.map(|[a, b, c, d]| [a * s, b * s, c * s, d * s]) };
    overlay(&big, &truth.resize_nearest(w, h), &pm.data, &scaled)
}

/// Writes the whole report into `dir`. `images` gives an image and its ground truth by id, for
/// the overlays (None: no overlays, said in the report).
pub fn write_report(
    dir: &Path,
    info: &RunInfo,
    rows: &[ImageResult],
    seed: u64,
    images: Option<&dyn Fn(&str) -> Result<(RgbImage, BinaryMask)>>,
) -> Result<EvalSummary> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary = summarize(&info.models, rows, rows.len(), info.skipped.len(), true, seed);
    write_atomic(&dir.join(RESULTS_CSV), &results_csv(rows)?)?;
    write_atomic(&dir.join(SUMMARY_JSON), &serde_json::to_vec_pretty(&SummaryFile { run: info, summary: &summary })?)?;
    let mut md = markdown(info, &summary);
    let metrics: [(&str, fn(&ImageScores) -> f64); 3] = [("dice", |s| s.dice), ("iou", |s| s.iou), ("accuracy", |s| s.accuracy)];
    for (name, f) in metrics {
        write_atomic(&dir.join(format!("hist_{name}.png")), &histogram_png(&info.models, rows, name, f)?)?;
    }
    match images {
        Some(load) if !rows.is_empty() => {
            let od = dir.join("overlays");
            // A report rewritten into the same folder keeps no overlays of an earlier run (their
            // names carry scores, so they would not be overwritten).
            if od.is_dir() {
                std::fs::remove_dir_all(&od).with_context(|| format!("clearing {}", od.display()))?;
            }
            std::fs::create_dir_all(&od)?;
            let mut missing = Vec::new();
            for (k, model) in info.models.iter().enumerate() {
                let mut order: Vec<&ImageResult> = rows.iter().filter(|r| r.results[k].mask_rle.is_some()).collect();
                order.sort_by(|a, b| b.results[k].scores.dice.total_cmp(&a.results[k].scores.dice));
                let n = OVERLAYS_EACH.min(order.len() / 2).max(1.min(order.len()));
                let picks = order.iter().take(n).map(|r| ("best", *r)).chain(order.iter().rev().take(n).map(|r| ("worst", *r)));
                for (kind, r) in picks {
                    // Overlays are a convenience: an image this side cannot read, or whose copy
                    // here differs from the one scored, is named in the report, not fatal.
                    let (img, truth) = match load(&r.id) {
                        Ok((img, truth)) if (img.width(), img.height()) == (r.width, r.height) && (truth.width, truth.height) == (r.width, r.height) => {
                            (img, truth)
                        }
                        Ok((img, _)) => {
                            missing.push(format!("{} (here {}x{}, scored at {}x{})", r.id, img.width(), img.height(), r.width, r.height));
                            continue;
                        }
                        Err(e) => {
                            missing.push(format!("{} ({e})", r.id));
                            continue;
                        }
                    };
                    let m = &r.results[k];
                    let pred = crate::masks::from_rle(m.mask_rle.as_deref().unwrap_or_default(), r.height as usize, r.width as usize);
                    let o = overlay_scaled(&img, &truth, pred, &r.prompt);
                    write_atomic(&od.join(format!("{model}_{kind}_{}_dice{:.3}.png", r.id, m.scores.dice)), &png(&o)?)?;
                }
            }
            if !missing.is_empty() {
                // One entry per image, whichever models' picks named it.
                missing.sort_unstable();
                missing.dedup();
                md.push_str(&format!("\nNo overlay for {} image(s): {}.\n", missing.len(), missing.join("; ")));
            }
        }
        _ => md.push_str("\nNo overlays: the images were not readable from here.\n"),
    }
    write_atomic(&dir.join(REPORT_MD), md.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_says_when_box_offsets_were_in_the_images_pixels_while_masks_were_larger() {
        let s = EvalSummary { masks_resized: 3, images_done: 3, ..Default::default() };
        let info = |width: u64, mode: &str| RunInfo {
            dataset: "d".into(),
            models: vec![],
            settings: serde_json::json!({"reference_width": width, "prompt_mode": mode}),
            skipped: vec![],
        };
        assert!(markdown(&info(0, "PROMPT_MODE_BOX_POINT"), &s).contains("--reference-width 600"));
        assert!(!markdown(&info(600, "PROMPT_MODE_BOX_POINT"), &s).contains("--reference-width 600"));
        assert!(!markdown(&info(0, "PROMPT_MODE_POINT"), &s).contains("--reference-width 600"));
        let same_size = EvalSummary { masks_resized: 0, ..s };
        assert!(!markdown(&info(0, "PROMPT_MODE_BOX"), &same_size).contains("--reference-width 600"));
    }
}
