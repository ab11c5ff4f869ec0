//! Parity with the official implementation: runs the golden cases written by
//! scripts/make_golden.py (official SamPredictor, random weights) and measures the differences.

use crate::error::{Error, Result};
use crate::model::{Precision, Sam, SamVariant};
use crate::predictor::{PointPrompt, Prediction, Predictor, Prompt};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Manifest {
    variant: String,
    checkpoint: String,
    images_dir: String,
    subsample: i64,
    images: Vec<ManifestImage>,
}

#[derive(Deserialize)]
struct ManifestImage {
    file: String,
    golden: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    points: Vec<[f64; 3]>,
    #[serde(rename = "box")]
    bbox: Option<[f64; 4]>,
    multimask: bool,
    mask_input: Option<String>,
    batch: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct CaseReport {
    pub image: String,
    pub case: String,
    pub low_res_max_abs: f64,
    pub iou_max_abs: f64,
    pub mask_iou_min: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ParityReport {
    pub variant: String,
    pub precision: Precision,
    /// Largest |ours - official| over the resized u8 image (sampled every `subsample` pixels).
    pub resize_max_abs: i64,
    /// Fraction of sampled resized values that differ at all.
    pub resize_mismatch_fraction: f64,
    pub features_max_abs: f64,
    pub low_res_max_abs: f64,
    pub iou_max_abs: f64,
    pub mask_iou_min: f64,
    pub cases: Vec<CaseReport>,
}

/// IoU of two boolean masks; 1 when both are empty.
pub fn mask_iou(a: &Tensor, b: &Tensor) -> f64 {
    let inter = a.logical_and(b).sum(Kind::Int64).int64_value(&[]) as f64;
    let union = a.logical_or(b).sum(Kind::Int64).int64_value(&[]) as f64;
    if union == 0.0 {
        1.0
    } else {
        inter / union
    }
}

/// Unpacks numpy.packbits rows (big-endian bit order) to a (K, h, w) bool tensor.
fn unpack_masks(packed: &Tensor, h: i64, w: i64) -> Tensor {
    let k = packed.size()[0];
    let shifts = Tensor::from_slice(&[7u8, 6, 5, 4, 3, 2, 1, 0]).to_kind(Kind::Uint8);
    let bits = packed.unsqueeze(-1).bitwise_right_shift(&shifts).bitwise_and(1);
    bits.reshape([k, -1]).narrow(1, 0, h * w).reshape([k, h, w]).to_kind(Kind::Bool)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Runs every golden case in `dir` and returns the differences (no thresholds applied here).
pub fn check_golden(dir: &Path, device: Device, precision: Precision) -> Result<ParityReport> {
    let io = |e: std::io::Error| Error::Internal(format!("{}: {e}", dir.display()));
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).map_err(io)?)
        .map_err(|e| Error::Internal(format!("manifest.json: {e}")))?;
    let variant: SamVariant = manifest.variant.parse().map_err(Error::Internal)?;
    let (mut sam, _) = Sam::load(variant, &dir.join(&manifest.checkpoint), device)?;
    sam.set_precision(precision);
    let predictor = Predictor::new(sam);
    let images_dir = dir.join(&manifest.images_dir);
    let s = manifest.subsample;
    let mut report = ParityReport {
        variant: manifest.variant.clone(),
        precision,
        resize_max_abs: 0,
        resize_mismatch_fraction: 0.0,
        features_max_abs: 0.0,
        low_res_max_abs: 0.0,
        iou_max_abs: 0.0,
        mask_iou_min: 1.0,
        cases: Vec::new(),
    };
    let mut mismatched = 0i64;
    let mut sampled = 0i64;
    for img in &manifest.images {
        let path: PathBuf = images_dir.join(&img.file);
        let bytes = std::fs::read(&path).map_err(io)?;
        let image = crate::image_io::decode_rgb(&bytes, "image", u64::MAX)?;
        let golden: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join(&img.golden))?.into_iter().collect();
        let get = |k: &str| golden.get(k).ok_or_else(|| Error::Internal(format!("{}: no tensor {k}", img.golden)));

        let resized = predictor.image_tensor(&image)?.squeeze_dim(0).permute([1, 2, 0]).to_device(Device::Cpu);
        let ours = resized.slice(0, 0, None, s).slice(1, 0, None, s).to_kind(Kind::Int64);
        let diff = (ours - get("resized")?.to_kind(Kind::Int64)).abs();
        report.resize_max_abs = report.resize_max_abs.max(diff.max().int64_value(&[]));
        mismatched += diff.gt(0).sum(Kind::Int64).int64_value(&[]);
        sampled += diff.numel() as i64;

        let emb = predictor.set_image(&image)?;
        report.features_max_abs = report.features_max_abs.max(max_abs(&emb.features.to_device(Device::Cpu), get("features")?));

        let to_prompt = |c: &Case| -> Result<Prompt> {
            Ok(Prompt {
                points: c.points.iter().map(|p| PointPrompt { x: p[0] as f32, y: p[1] as f32, label: p[2] as i64 }).collect(),
                bbox: c.bbox.map(|b| [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32]),
                mask_input: match &c.mask_input {
                    Some(_) => Some(Vec::<f32>::try_from(get(&format!("{}.mask_input", c.name))?.flatten(0, -1))?),
                    None => None,
                },
            })
        };
        // Cases of one batch go through one predict call, like the official predict_torch.
        let mut runs: Vec<(Vec<&Case>, bool)> = Vec::new();
        for c in &img.cases {
            match (&c.batch, runs.last_mut()) {
                (Some(b), Some((prev, _))) if prev[0].batch.as_ref() == Some(b) => prev.push(c),
                _ => runs.push((vec![c], c.multimask)),
            }
        }
        for (cases, multimask) in runs {
            let prompts = cases.iter().map(|c| to_prompt(c)).collect::<Result<Vec<_>>>()?;
            let preds: Vec<Prediction> = predictor.predict(&emb, &prompts, multimask)?;
            for (c, p) in cases.iter().zip(preds) {
                let low = p.low_res_logits.slice(1, 0, None, s).slice(2, 0, None, s);
                let low_d = max_abs(&low, get(&format!("{}.low_res", c.name))?);
                let iou_d = max_abs(&Tensor::from_slice(&p.iou_predictions), get(&format!("{}.iou", c.name))?);
                let (_, h, w) = p.masks.size3()?;
                let theirs = unpack_masks(get(&format!("{}.masks", c.name))?, h, w);
                let k = theirs.size()[0];
                let miou = (0..k).map(|i| mask_iou(&p.masks.get(i), &theirs.get(i))).fold(1.0, f64::min);
                report.low_res_max_abs = report.low_res_max_abs.max(low_d);
                report.iou_max_abs = report.iou_max_abs.max(iou_d);
                report.mask_iou_min = report.mask_iou_min.min(miou);
                report.cases.push(CaseReport {
                    image: img.file.clone(),
                    case: c.name.clone(),
                    low_res_max_abs: low_d,
                    iou_max_abs: iou_d,
                    mask_iou_min: miou,
                });
            }
        }
    }
    report.resize_mismatch_fraction = mismatched as f64 / sampled.max(1) as f64;
    Ok(report)
}
