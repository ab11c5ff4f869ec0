//! Model benchmarks for BENCHMARKS.md: timings of the predictor and reduced-precision agreement.

use crate::error::{Error, Result};
use crate::image_io::decode_rgb;
use crate::model::{Precision, Sam, SamVariant};
use crate::predictor::{PointPrompt, Predictor, Prompt};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

#[derive(Serialize)]
pub struct TimingReport {
    pub r#impl: &'static str,
    pub variant: String,
    pub precision: Precision,
    pub threads: i32,
    pub load_s: f64,
    pub embed_ms: f64,
    /// The image encoder alone on the pre-processed image (no resize, normalisation or padding).
    pub encoder_ms: f64,
    pub predict_ms: f64,
    pub peak_rss_mb: f64,
    /// Device-wide CUDA memory in use after the runs (cudaMemGetInfo), on CUDA only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_used_mb: Option<f64>,
    pub device: String,
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load(variant: SamVariant, checkpoint: Option<&Path>, device: Device, precision: Precision) -> Result<Predictor> {
    let mut sam = match checkpoint {
        Some(p) => Sam::load(variant, p, device)?.0,
        None => tch::no_grad(|| Sam::new(variant, device)),
    };
    sam.set_precision(precision);
    Ok(Predictor::new(sam))
}

pub struct TimingArgs<'a> {
    pub variant: SamVariant,
    pub checkpoint: Option<&'a Path>,
    pub device: Device,
    pub precision: Precision,
    pub image: &'a Path,
    pub prompt: Prompt,
    pub embed_repeat: usize,
    pub predict_repeat: usize,
}

/// Times set_image, the image encoder alone, and one box + point multimask predict (post-processing included), as
/// scripts/bench_official.py does for the official package.
pub fn time_predictor(a: TimingArgs) -> Result<TimingReport> {
    let bytes = std::fs::read(a.image).map_err(|e| Error::Internal(format!("{}: {e}", a.image.display())))?;
    let img = decode_rgb(&bytes, "image", u64::MAX)?;
    let t = Instant::now();
    let p = load(a.variant, a.checkpoint, a.device, a.precision)?;
    let load_s = t.elapsed().as_secs_f64();
    let sync = || {
        if let Device::Cuda(i) = a.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    p.set_image(&img)?; // warm-up
    let mut embed = Vec::new();
    for _ in 0..a.embed_repeat.max(1) {
        let t = Instant::now();
        let _e = p.set_image(&img)?;
        sync();
        embed.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let x = p.sam.preprocess(&p.image_tensor(&img)?);
    let mut encoder = Vec::new();
    tch::no_grad(|| {
        for _ in 0..a.embed_repeat.max(1) {
            let t = Instant::now();
            let _f = p.sam.embed(&x);
            sync();
            encoder.push(t.elapsed().as_secs_f64() * 1e3);
        }
    });
    let emb = p.set_image(&img)?;
    p.predict(&emb, std::slice::from_ref(&a.prompt), true)?;
    let mut pred = Vec::new();
    for _ in 0..a.predict_repeat.max(1) {
        let t = Instant::now();
        let _r = p.predict(&emb, std::slice::from_ref(&a.prompt), true)?;
        sync();
        pred.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(TimingReport {
        r#impl: "skinsam",
        variant: a.variant.to_string(),
        precision: a.precision,
        threads: tch::get_num_threads(),
        load_s,
        embed_ms: median(embed),
        encoder_ms: median(encoder),
        predict_ms: median(pred),
        peak_rss_mb: peak_rss_mb(),
        gpu_used_mb: match a.device {
            Device::Cuda(i) => crate::device::cuda_memory(i).map(|(used, _)| used as f64 / (1024.0 * 1024.0)),
            _ => None,
        },
        device: format!("{:?}", a.device).to_lowercase(),
    })
}

#[derive(Serialize)]
pub struct AgreementReport {
    pub variant: String,
    pub precision: Precision,
    pub images: usize,
    pub mask_iou_mean: f64,
    pub mask_iou_min: f64,
    pub embedding_rel_err_mean: f64,
}

/// Mask agreement of `precision` against fp32 on real images: the same weights, the box of each
/// image's ground-truth mask as the prompt, the best mask of each compared by IoU.
pub fn precision_agreement(
    variant: SamVariant,
    checkpoint: Option<&Path>,
    device: Device,
    precision: Precision,
    images: &[(PathBuf, PathBuf)],
) -> Result<AgreementReport> {
    tch::manual_seed(0);
    let fp32 = load(variant, checkpoint, device, Precision::Fp32)?;
    let mut low = load(variant, None, device, Precision::Fp32)?;
    tch::no_grad(|| low.sam.vs.copy(&fp32.sam.vs))?;
    low.sam.set_precision(precision);
    let (mut ious, mut errs) = (Vec::new(), Vec::new());
    for (image, mask) in images {
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::Internal(format!("{}: {e}", p.display())));
        let img = decode_rgb(&read(image)?, "image", u64::MAX)?;
        let gt = image::load_from_memory(&read(mask)?).map_err(|e| Error::Internal(e.to_string()))?.into_luma8();
        let (sx, sy) = (img.width() as f32 / gt.width() as f32, img.height() as f32 / gt.height() as f32);
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for (x, y, v) in gt.enumerate_pixels() {
            if v.0[0] > 127 {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
        if x0 > x1 {
            continue;
        }
        let prompt = Prompt {
            bbox: Some([x0 as f32 * sx, y0 as f32 * sy, x1 as f32 * sx, y1 as f32 * sy]),
            points: vec![PointPrompt { x: (x0 + x1) as f32 / 2.0 * sx, y: (y0 + y1) as f32 / 2.0 * sy, label: 1 }],
            mask_input: None,
        };
        let (ea, eb) = (fp32.set_image(&img)?, low.set_image(&img)?);
        let rel = (&ea.features - &eb.features).norm().double_value(&[]) / ea.features.norm().double_value(&[]);
        errs.push(rel);
        let a = fp32.predict(&ea, std::slice::from_ref(&prompt), true)?.remove(0);
        let b = low.predict(&eb, std::slice::from_ref(&prompt), true)?.remove(0);
        let (ma, mb) = (a.masks.get(a.best as i64), b.masks.get(b.best as i64));
        ious.push(crate::parity::mask_iou(&ma, &mb));
    }
    let n = ious.len().max(1) as f64;
    Ok(AgreementReport {
        variant: variant.to_string(),
        precision,
        images: ious.len(),
        mask_iou_mean: ious.iter().sum::<f64>() / n,
        mask_iou_min: ious.iter().copied().fold(1.0, f64::min),
        embedding_rel_err_mean: errs.iter().sum::<f64>() / errs.len().max(1) as f64,
    })
}
