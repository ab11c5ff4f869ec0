//! The SamPredictor contract: encode an image once, then decode any number of prompts against
//! its embedding, with the official pre- and post-processing.

use crate::error::{invalid, Result};
use crate::model::prompt_encoder::{LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_PADDING};
use crate::model::{DecoderParts, ImageProjections, PromptBatch, Sam, MASK_THRESHOLD};
use crate::postprocess::MaskResampler;
use image::RgbImage;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// An encoded image: the embedding and the geometry needed to map prompts and masks.
pub struct ImageEmbedding {
    /// (1, C, 64, 64) fp32, on the model's device.
    pub features: Tensor,
    /// (height, width) of the image as given.
    pub original_size: (i64, i64),
    /// (height, width) after resizing the longest side to the model's input size.
    pub input_size: (i64, i64),
    /// The decoder's prompt-independent projections of `features` ([`Sam::decoder_prefix`]),
    /// computed with the embedding; None (e.g. read back from disk) means each decode computes them.
    pub prefix: Option<ImageProjections>,
}

impl ImageEmbedding {
    /// Shares the tensors (no copy).
    pub fn shallow_clone(&self) -> Self {
        Self {
            features: self.features.shallow_clone(),
            original_size: self.original_size,
            input_size: self.input_size,
            prefix: self.prefix.as_ref().map(ImageProjections::shallow_clone),
        }
    }

    /// A copy that owns its storage, e.g. of one image out of a batch, so that caching it does
    /// not keep the whole batch alive.
    pub fn copy(&self) -> Self {
        Self {
            features: self.features.copy(),
            original_size: self.original_size,
            input_size: self.input_size,
            prefix: self.prefix.as_ref().map(ImageProjections::copy),
        }
    }

    /// Bytes held: the embedding and its decoder prefix.
    pub fn nbytes(&self) -> u64 {
        crate::model::tensor_bytes(&self.features) + self.prefix.as_ref().map_or(0, ImageProjections::nbytes)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PointPrompt {
    pub x: f32,
    pub y: f32,
    /// 1 foreground, 0 background, -1 padding ("not a point").
    pub label: i64,
}

/// One prompt in original-image pixel coordinates. Empty = the no-prompt case.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prompt {
    pub points: Vec<PointPrompt>,
    /// x0, y0, x1, y1.
    pub bbox: Option<[f32; 4]>,
    /// Low-res logits (low_res x low_res, row-major), e.g. a previous prediction's, to refine.
    pub mask_input: Option<Vec<f32>>,
}

pub struct Prediction {
    /// (K, H, W) bool masks at the original size; K = 3 with multimask output, else 1.
    pub masks: Tensor,
    /// (K,) predicted IoU per mask.
    pub iou_predictions: Vec<f32>,
    /// (K, L, L) fp32 logits (L = 4x the embedding grid: 256 for vit_b/l/h, 64 for skinsam_tiny), usable as a later `mask_input`.
    pub low_res_logits: Tensor,
    /// Index of the mask with the highest predicted IoU (the SkinSAM paper's choice).
    pub best: usize,
    /// A point or box coordinate lay outside the image and was clipped to its bounds.
    pub clipped: bool,
}

impl Prediction {
    /// The same prediction, its tensors sharing storage with this one's.
    pub fn shallow_clone(&self) -> Self {
        Self {
            masks: self.masks.shallow_clone(),
            iou_predictions: self.iou_predictions.clone(),
            low_res_logits: self.low_res_logits.shallow_clone(),
            best: self.best,
            clipped: self.clipped,
        }
    }
}

/// Which candidate masks to post-process to full resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Masks {
    /// All K candidates (the SamPredictor contract).
    All,
    /// Only the one with the highest predicted IoU: a serving response returns just that one,
    /// and full-resolution post-processing is most of the decode time.
    Best,
}

impl Prediction {
    /// The mask with the highest predicted IoU, (H, W) bool.
    pub fn best_mask(&self) -> Tensor {
        if self.masks.size()[0] == self.iou_predictions.len() as i64 {
            self.masks.get(self.best as i64)
        } else {
            self.masks.get(0)
        }
    }
}

/// Longest side resized to `target` with the official rounding: int(side * scale + 0.5).
pub fn preprocess_shape(h: i64, w: i64, target: i64) -> (i64, i64) {
    let scale = target as f64 / h.max(w) as f64;
    ((h as f64 * scale + 0.5) as i64, (w as f64 * scale + 0.5) as i64)
}

/// Resizes so that the longest side is `target`, with Pillow's bilinear filter (what the
/// official predictor uses through torchvision on a PIL image): antialiased when shrinking.
pub fn resize_longest_side(img: &RgbImage, target: i64) -> Result<RgbImage> {
    let (nh, nw) = resized_shape(img, target)?;
    if (nh, nw) == (img.height() as i64, img.width() as i64) {
        return Ok(img.clone());
    }
    Ok(crate::resize::resize_bilinear_pil(img, nw as u32, nh as u32))
}

/// [`preprocess_shape`] of `img`, refused when a side rounds to nothing (a very elongated image).
fn resized_shape(img: &RgbImage, target: i64) -> Result<(i64, i64)> {
    let (h, w) = (img.height() as i64, img.width() as i64);
    match preprocess_shape(h, w, target) {
        (0, _) | (_, 0) => Err(invalid("image", format!("{w}x{h} is too elongated to resize to a {target}-px longest side"))),
        shape => Ok(shape),
    }
}

pub struct Predictor {
    pub sam: Sam,
}

/// Prompts that can share one decoder pass: same number of points, box or not, mask or not.
type Signature = (usize, bool, bool);

impl Predictor {
    pub fn new(sam: Sam) -> Self {
        Self { sam }
    }

    pub fn device(&self) -> Device {
        self.sam.device()
    }

    /// Whether `image` can be encoded: not empty, and not so elongated that its short side
    /// resizes to nothing. Cheap: lets a batch of images refuse one without failing the others.
    pub fn check_image(&self, image: &RgbImage) -> Result<()> {
        if image.width() == 0 || image.height() == 0 {
            return Err(invalid("image", "zero-sized image"));
        }
        resized_shape(image, self.sam.config.img_size).map(|_| ())
    }

    /// The resized image as the (1, 3, h, w) u8 tensor the model pre-processes.
    pub fn image_tensor(&self, image: &RgbImage) -> Result<Tensor> {
        self.check_image(image)?;
        let resized = resize_longest_side(image, self.sam.config.img_size)?;
        let (w, h) = (resized.width() as i64, resized.height() as i64);
        let t = Tensor::from_slice(resized.as_raw()).view([h, w, 3]).permute([2, 0, 1]).unsqueeze(0);
        Ok(t.to_device(self.device()))
    }

    /// `set_image`: resize, normalise, pad and encode once.
    pub fn set_image(&self, image: &RgbImage) -> Result<ImageEmbedding> {
        Ok(self.set_images(&[image])?.remove(0))
    }

    /// Encodes several images in one encoder pass (micro-batching); same results as one by one.
    pub fn set_images(&self, images: &[&RgbImage]) -> Result<Vec<ImageEmbedding>> {
        let mut batch = Vec::with_capacity(images.len());
        let mut geo = Vec::with_capacity(images.len());
        for img in images {
            let t = self.image_tensor(img)?;
            geo.push(((img.height() as i64, img.width() as i64), (t.size()[2], t.size()[3])));
            batch.push(self.sam.preprocess(&t));
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (features, prefix) = tch::no_grad(|| {
            let f = crate::model::channels_last(&self.sam.embed(&Tensor::cat(&batch, 0)));
            let p = self.sam.decoder_prefix(&f);
            (f, p)
        });
        Ok(geo
            .into_iter()
            .enumerate()
            .map(|(i, (original_size, input_size))| ImageEmbedding {
                features: features.narrow(0, i as i64, 1),
                original_size,
                input_size,
                prefix: Some(prefix.narrow(i as i64, 1)),
            })
            .collect())
    }

    /// Decodes prompts against one embedding. Prompts of the same shape share one decoder pass;
    /// results come back in the order given.
    pub fn predict(&self, emb: &ImageEmbedding, prompts: &[Prompt], multimask_output: bool) -> Result<Vec<Prediction>> {
        self.sam.parts().predict_masks(emb, prompts, multimask_output, Masks::All)
    }

    /// [`DecoderParts::predict_masks`] with this model's decoder.
    pub fn predict_masks(&self, emb: &ImageEmbedding, prompts: &[Prompt], multimask_output: bool, which: Masks) -> Result<Vec<Prediction>> {
        self.sam.parts().predict_masks(emb, prompts, multimask_output, which)
    }
}

impl DecoderParts<'_> {
    fn validate(&self, p: &Prompt, field: &str, emb: &ImageEmbedding) -> Result<(Prompt, bool)> {
        validate_prompt(p, field, emb.original_size, emb.input_size, self.config.low_res_size())
    }

    /// Decodes prompts against one embedding ([`Predictor::predict`]), post-processing all
    /// candidates or only the best (`masks` is then (1, H, W)). Prompts of the same shape share
    /// one decoder pass; results come back in the order given.
    pub fn predict_masks(&self, emb: &ImageEmbedding, prompts: &[Prompt], multimask_output: bool, which: Masks) -> Result<Vec<Prediction>> {
        let mut checked = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            checked.push(self.validate(p, &format!("prompts[{i}]"), emb)?);
        }
        let mut groups: BTreeMap<Signature, Vec<usize>> = BTreeMap::new();
        for (i, (p, _)) in checked.iter().enumerate() {
            groups.entry((p.points.len(), p.bbox.is_some(), p.mask_input.is_some())).or_default().push(i);
        }
        let mut results: Vec<Option<Prediction>> = (0..prompts.len()).map(|_| None).collect();
        for ((n_points, has_box, has_mask), idx) in groups {
            let batch: Vec<&Prompt> = idx.iter().map(|&i| &checked[i].0).collect();
            let preds = tch::no_grad(|| self.decode_group(emb, &batch, (n_points, has_box, has_mask), multimask_output, which))?;
            for (i, mut pred) in idx.into_iter().zip(preds) {
                pred.clipped = checked[i].1;
                results[i] = Some(pred);
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every prompt decoded")).collect())
    }

    fn decode_group(
        &self,
        emb: &ImageEmbedding,
        batch: &[&Prompt],
        (n_points, has_box, has_mask): Signature,
        multimask_output: bool,
        which: Masks,
    ) -> Result<Vec<Prediction>> {
        if n_points == 0 && !has_box && !has_mask && batch.len() > 1 {
            // Prompts without points, box or mask are all the same prompt, and the decoder
            // gives one output for them whatever their number: decode once, share the result.
            let one = self.decode_group(emb, &batch[..1], (n_points, has_box, has_mask), multimask_output, which)?;
            let p = one.into_iter().next().expect("one prompt decoded");
            return Ok(batch.iter().map(|_| p.shallow_clone()).collect());
        }
        let dev = emb.features.device();
        let b = batch.len() as i64;
        let (coords, labels) = if n_points > 0 {
            let c: Vec<f32> = batch.iter().flat_map(|p| p.points.iter().flat_map(|q| [q.x, q.y])).collect();
            let l: Vec<i64> = batch.iter().flat_map(|p| p.points.iter().map(|q| q.label)).collect();
            (
                Some(Tensor::from_slice(&c).view([b, n_points as i64, 2]).to_device(dev)),
                Some(Tensor::from_slice(&l).view([b, n_points as i64]).to_device(dev)),
            )
        } else {
            (None, None)
        };
        let boxes = has_box.then(|| {
            let v: Vec<f32> = batch.iter().flat_map(|p| p.bbox.expect("grouped by box")).collect();
            Tensor::from_slice(&v).view([b, 4]).to_device(dev)
        });
        let side = self.config.low_res_size();
        let masks = has_mask.then(|| {
            let v: Vec<f32> = batch.iter().flat_map(|p| p.mask_input.as_deref().expect("grouped by mask").iter().copied()).collect();
            Tensor::from_slice(&v).view([b, 1, side, side]).to_device(dev)
        });
        let prompts = PromptBatch {
            points: coords.as_ref().zip(labels.as_ref()),
            boxes: boxes.as_ref(),
            masks: masks.as_ref(),
        };
        let (low_res, iou) = self.decode_with(&emb.features, emb.prefix.as_ref(), &prompts, multimask_output);
        let iou = iou.to_device(Device::Cpu).to_kind(Kind::Float);
        let low_res_cpu = low_res.to_device(Device::Cpu).to_kind(Kind::Float);
        let low = low_res.size()[3];
        // On the CPU, one separable resampling in Rust (same values, a fraction of the time);
        // on an accelerator the two upsample_bilinear2d calls run where the logits are.
        let resampler = (dev == Device::Cpu).then(|| {
            let size = |(h, w): (i64, i64)| (h as usize, w as usize);
            MaskResampler::new(low as usize, self.config.img_size as usize, size(emb.input_size), size(emb.original_size))
        });
        let mut out = Vec::with_capacity(batch.len());
        for i in 0..b {
            let scores: Vec<f32> = Vec::<f32>::try_from(iou.get(i))?;
            let best = first_argmax(&scores);
            let (first, count) = match which {
                Masks::All => (0, low_res.size()[1]),
                Masks::Best => (best as i64, 1),
            };
            let masks = match &resampler {
                Some(r) => {
                    let logits: Vec<f32> = Vec::try_from(low_res_cpu.get(i).narrow(0, first, count).contiguous().flatten(0, -1))?;
                    let (h, w) = r.output_size();
                    let mut all = Vec::with_capacity(count as usize * h * w);
                    for m in logits.chunks_exact((low * low) as usize) {
                        all.extend(r.mask(m, MASK_THRESHOLD as f32));
                    }
                    Tensor::from_slice(&all).view([count, h as i64, w as i64])
                }
                None => {
                    // One prompt at a time: a 1024x1024 intermediate per mask is large in big batches.
                    let logits = low_res.narrow(0, i, 1).narrow(1, first, count);
                    let logits = self.postprocess_masks(&logits, emb.input_size, emb.original_size);
                    logits.gt(MASK_THRESHOLD).squeeze_dim(0).to_device(Device::Cpu)
                }
            };
            out.push(Prediction {
                masks,
                iou_predictions: scores,
                low_res_logits: low_res_cpu.get(i),
                best,
                clipped: false,
            });
        }
        Ok(out)
    }
}

/// The index of the highest score, the first of equal ones (as torch.argmax picks); 0 when empty.
/// A NaN counts as the highest, as in torch.argmax (whatever its sign bit, which `total_cmp` reads).
pub fn first_argmax(scores: &[f32]) -> usize {
    let key = |v: f32| if v.is_nan() { f32::INFINITY } else { v };
    scores
        .iter()
        .enumerate()
        .max_by(|a, b| key(*a.1).total_cmp(&key(*b.1)).then(a.1.is_nan().cmp(&b.1.is_nan())).then(b.0.cmp(&a.0)))
        .map_or(0, |(k, _)| k)
}

/// Checks a prompt and maps it to the model's input frame (`input_size`, the image resized from
/// `original_size`); `low_res_side` is the side of the mask input. Coordinates outside the image
/// are clipped to [0, width] x [0, height]; the returned flag says that it happened.
pub fn validate_prompt(p: &Prompt, field: &str, original_size: (i64, i64), input_size: (i64, i64), low_res_side: i64) -> Result<(Prompt, bool)> {
    let (oh, ow) = original_size;
    let (ih, iw) = input_size;
    let (sx, sy) = (iw as f64 / ow as f64, ih as f64 / oh as f64);
    let mut clipped = false;
    let mut clip = |v: f32, max: i64| {
        let c = v.clamp(0.0, max as f32);
        clipped |= c != v;
        c
    };
    let mut out = Prompt::default();
    for (j, pt) in p.points.iter().enumerate() {
        let f = format!("{field}.points[{j}]");
        if !pt.x.is_finite() || !pt.y.is_finite() {
            return Err(invalid(f, format!("coordinates ({}, {}) are not finite", pt.x, pt.y)));
        }
        if ![LABEL_FOREGROUND, LABEL_BACKGROUND, LABEL_PADDING].contains(&pt.label) {
            return Err(invalid(format!("{f}.label"), format!("{} is not 1 (foreground), 0 (background) or -1 (padding)", pt.label)));
        }
        let (x, y) = (clip(pt.x, ow), clip(pt.y, oh));
        out.points.push(PointPrompt { x: (x as f64 * sx) as f32, y: (y as f64 * sy) as f32, label: pt.label });
    }
    if let Some(b) = p.bbox {
        let f = format!("{field}.box");
        if b.iter().any(|v| !v.is_finite()) {
            return Err(invalid(f, format!("{b:?} has a non-finite coordinate")));
        }
        if b[2] < b[0] || b[3] < b[1] {
            return Err(invalid(f, format!("{b:?} has x1 < x0 or y1 < y0")));
        }
        let (x0, y0, x1, y1) = (clip(b[0], ow), clip(b[1], oh), clip(b[2], ow), clip(b[3], oh));
        out.bbox = Some([(x0 as f64 * sx) as f32, (y0 as f64 * sy) as f32, (x1 as f64 * sx) as f32, (y1 as f64 * sy) as f32]);
    }
    if let Some(m) = &p.mask_input {
        let side = low_res_side;
        if m.len() as i64 != side * side {
            return Err(invalid(format!("{field}.mask_input"), format!("has {} values, expected {side}x{side}", m.len())));
        }
        if m.iter().any(|v| !v.is_finite()) {
            return Err(invalid(format!("{field}.mask_input"), "has a non-finite value"));
        }
        out.mask_input = Some(m.clone());
    }
    Ok((out, clipped))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ties_pick_the_first_mask_as_torch_argmax_does() {
        assert_eq!(super::first_argmax(&[0.9, 0.9, 0.5]), 0);
        assert_eq!(super::first_argmax(&[0.1, 0.7, 0.7, 0.2]), 1);
        assert_eq!(super::first_argmax(&[0.1, 0.2, 0.3]), 2);
        assert_eq!(super::first_argmax(&[]), 0);
        // NaN is the highest, as in torch.argmax, whatever its sign bit.
        assert_eq!(super::first_argmax(&[0.1, f32::NAN, 0.3]), 1);
        assert_eq!(super::first_argmax(&[-f32::NAN, 0.5]), 0);
        assert_eq!(super::first_argmax(&[f32::INFINITY, f32::NAN, f32::NAN]), 1);
    }
}
