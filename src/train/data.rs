//! Training data: the split (by lesion by default), samples with their frozen-encoder embeddings
//! or their images (full training), and per-epoch prompts, augmentation and targets.

use super::{Recipe, SplitInfo};
use crate::eval::dataset::{decode_mask, read_file, BinaryMask, Dataset};
use crate::eval::prompts::{image_rng, simulate, PromptMode, SimPrompt};
use crate::error::{Error, Result};
use crate::model::Sam;
use crate::predictor::{preprocess_shape, resize_longest_side, Predictor};
use image::{GrayImage, RgbImage};
use rand::seq::SliceRandom;
use rand::distr::Distribution;
use rand::Rng;
use std::collections::{BTreeSet, HashMap};
use tch::{Device, Kind, Tensor};

/// The "epoch" whose prompts the validation uses: fixed for the whole run.
pub const VALIDATION_EPOCH: usize = usize::MAX;

pub struct Sample {
    pub id: String,
    pub label: Option<String>,
    /// Ground truth at the image's size.
    pub truth: BinaryMask,
    /// (1, C, 64, 64) embedding from the frozen encoder, when it is not trained.
    pub features: Option<Tensor>,
    /// The image, when the encoder is trained (encoded at every step).
    pub image: Option<RgbImage>,
}

/// A sample as one step sees it.
pub struct Prepared {
    pub features: Option<Tensor>,
    /// (1, 3, S, S) pre-processed image for live encoding.
    pub image: Option<Tensor>,
    pub prompt: SimPrompt,
    pub input_size: (i64, i64),
    pub original_size: (i64, i64),
    /// (1, 1, L, L) 0/1 target in the low-res logits' frame (padding is background).
    pub target_low: Tensor,
    /// (1, 1, h, w) 0/1 target at the image's size (for the full-size loss).
    pub truth_full: Tensor,
}

fn mix(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Train / validation ids: whole lesions (the dataset's group ids) go to one side unless the
/// recipe asks for the paper's plain random split. Seeded; limits applied in split order.
pub fn split(ds: &Dataset, r: &Recipe) -> SplitInfo {
    let grouped = !r.random_split && ds.items.iter().any(|i| i.group.is_some());
    let group_of = |i: &crate::eval::dataset::Item| if grouped { i.group.clone().unwrap_or_else(|| i.id.clone()) } else { i.id.clone() };
    let mut groups: Vec<String> = ds.items.iter().map(group_of).collect::<BTreeSet<_>>().into_iter().collect();
    let mut rng = image_rng(r.split_seed, "split");
    groups.shuffle(&mut rng);
    let n_val = ((groups.len() as f64 * f64::from(r.val_fraction)).round() as usize).clamp(1, groups.len().saturating_sub(1).max(1));
    let val_groups: BTreeSet<&String> = groups[..n_val].iter().collect();
    let rank: HashMap<&String, usize> = groups.iter().enumerate().map(|(k, g)| (g, k)).collect();
    let mut items: Vec<(usize, &crate::eval::dataset::Item)> = ds.items.iter().map(|i| (rank[&group_of(i)], i)).collect();
    items.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.id.cmp(&b.1.id)));
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (_, i) in items {
        if val_groups.contains(&group_of(i)) {
            val.push(i.id.clone());
        } else {
            train.push(i.id.clone());
        }
    }
    if r.max_train_images > 0 {
        train.truncate(r.max_train_images);
    }
    if r.max_val_images > 0 {
        val.truncate(r.max_val_images);
    }
    SplitInfo { seed: r.split_seed, grouped_by_lesion: grouped, train, val }
}

type Skipped = Vec<(String, String)>;

/// Reads the split's images and masks; embeds them with the frozen encoder (`precompute`),
/// through the embedding store when there is one. Unreadable items and empty masks are skipped
/// and listed.
pub fn load(
    ds: &Dataset,
    split: &SplitInfo,
    predictor: &Predictor,
    precompute: bool,
    store: Option<&crate::engine::store::EmbeddingStore>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<(Vec<Sample>, Vec<Sample>, Skipped)>> {
    let by_id: HashMap<&str, &crate::eval::dataset::Item> = ds.items.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut skipped = Vec::new();
    // None: cancelled. Checked per image: precomputing the embeddings of a large split takes
    // hours on a CPU, and a cancelled run must free its device.
    let mut side = |ids: &[String]| -> Result<Option<Vec<Sample>>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if cancelled() {
                return Ok(None);
            }
            let Some(item) = by_id.get(id.as_str()) else {
                skipped.push((id.clone(), "no longer in the dataset".into()));
                continue;
            };
            match load_one(item, predictor, precompute, store) {
                Ok(s) => out.push(s),
                Err(Error::InvalidArgument { field, message }) => skipped.push((id.clone(), format!("{field}: {message}"))),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(out))
    };
    let Some(train) = side(&split.train)? else { return Ok(None) };
    let Some(val) = side(&split.val)? else { return Ok(None) };
    Ok(Some((train, val, skipped)))
}

fn load_one(item: &crate::eval::dataset::Item, predictor: &Predictor, precompute: bool, store: Option<&crate::engine::store::EmbeddingStore>) -> Result<Sample> {
    let bytes = read_file(&item.image)?;
    let image = crate::image_io::decode_rgb(&bytes, "image", 100_000_000)?;
    // An image the model cannot take (too elongated to resize) is skipped here in every mode,
    // not found failing a training step hours into a run that trains the image encoder.
    predictor.check_image(&image)?;
    let truth = decode_mask(&read_file(&item.mask)?, "mask")?;
    let (truth, _) = truth.fitted_to(image.width(), image.height());
    if truth.area() == 0 {
        return Err(crate::error::invalid("mask", "the ground truth is empty (no prompt can be simulated)"));
    }
    let features = if precompute {
        let key = crate::engine::store::image_key(&bytes);
        match store.and_then(|s| s.get(&key)) {
            Some(e) => Some(e.features),
            None => {
                let e = predictor.set_image(&image)?;
                if let Some(s) = store {
                    s.put(&key, &e);
                }
                Some(e.features)
            }
        }
    } else {
        None
    };
    Ok(Sample { id: item.id.clone(), label: item.label.clone(), truth, image: (!precompute).then_some(image), features })
}

/// Which variables train: the recipe's modules (the prompt encoder's random Fourier matrix is a
/// buffer in the official model and never trains).
pub fn set_trainable(sam: &mut Sam, r: &Recipe) {
    for (name, var) in sam.vs.variables() {
        let on = (name.starts_with("mask_decoder.") && r.train_mask_decoder)
            || (name.starts_with("prompt_encoder.") && r.train_prompt_encoder && !name.contains("positional_encoding_gaussian_matrix"))
            || (name.starts_with("image_encoder.") && r.train_image_encoder);
        let _ = var.set_requires_grad(on);
    }
}

/// The prompt kind of a training step: `mode`, or one drawn from the recipe's mix (seeded by
/// epoch and step, so a resumed run draws the same).
pub fn step_mode(r: &Recipe, epoch: usize, step: usize) -> PromptMode {
    if r.prompt_mix.is_empty() {
        return r.mode;
    }
    let total: f64 = r.prompt_mix.iter().map(|(_, w)| w).sum();
    let mut x = image_rng(mix(r.prompt_seed, epoch), &format!("mode/{step}")).random_range(0.0..total);
    for (m, w) in &r.prompt_mix {
        if x < *w {
            return *m;
        }
        x -= w;
    }
    r.prompt_mix.last().map_or(r.mode, |(m, _)| *m)
}

/// The training samples of an epoch, in order (seeded), given each one's label: every sample
/// once, shuffled; or with `class_balance` > 0 as many draws with replacement, weighted by
/// n(label)^-class_balance so that rare lesion types are seen more often.
pub fn epoch_order(labels: &[Option<&str>], r: &Recipe, epoch: usize) -> Vec<usize> {
    let n = labels.len();
    let mut rng = image_rng(mix(r.split_seed ^ r.prompt_seed.rotate_left(17), epoch), "order");
    if r.class_balance == 0.0 || n == 0 {
        let mut v: Vec<usize> = (0..n).collect();
        v.shuffle(&mut rng);
        return v;
    }
    let mut counts: HashMap<Option<&str>, usize> = HashMap::new();
    for l in labels {
        *counts.entry(*l).or_default() += 1;
    }
    let weights = labels.iter().map(|l| (counts[l] as f64).powf(-r.class_balance));
    let draw = rand::distr::weighted::WeightedIndex::new(weights).expect("positive finite weights");
    (0..n).map(|_| draw.sample(&mut rng)).collect()
}

fn mask_to_gray(m: &BinaryMask) -> GrayImage {
    GrayImage::from_raw(m.width, m.height, m.data.clone()).expect("mask size")
}

fn gray_to_mask(g: GrayImage) -> BinaryMask {
    let (width, height) = g.dimensions();
    BinaryMask { width, height, data: g.into_raw() }
}

/// Flips, a rotation by a multiple of 90 degrees and brightness / contrast jitter (+-20%), the
/// geometric ones applied to the mask too.
fn augment(img: &RgbImage, truth: &BinaryMask, rng: &mut impl Rng) -> (RgbImage, BinaryMask) {
    use image::imageops;
    let (mut i, mut m) = (img.clone(), mask_to_gray(truth));
    if rng.random_bool(0.5) {
        i = imageops::flip_horizontal(&i);
        m = imageops::flip_horizontal(&m);
    }
    if rng.random_bool(0.5) {
        i = imageops::flip_vertical(&i);
        m = imageops::flip_vertical(&m);
    }
    match rng.random_range(0..4) {
        1 => (i, m) = (imageops::rotate90(&i), imageops::rotate90(&m)),
        2 => (i, m) = (imageops::rotate180(&i), imageops::rotate180(&m)),
        3 => (i, m) = (imageops::rotate270(&i), imageops::rotate270(&m)),
        _ => {}
    }
    let (b, c): (f32, f32) = (rng.random_range(0.8..1.2), rng.random_range(0.8..1.2));
    let mean = i.pixels().map(|p| p.0.iter().map(|&v| f32::from(v)).sum::<f32>()).sum::<f32>() / (3.0 * (i.width() * i.height()).max(1) as f32);
    for p in i.pixels_mut() {
        for v in p.0.iter_mut() {
            *v = (((f32::from(*v) - mean) * c + mean) * b).round().clamp(0.0, 255.0) as u8;
        }
    }
    (i, gray_to_mask(m))
}

/// The sample as seen at `epoch`: augmented (full training with augmentation), with prompts drawn
/// from the epoch's stream, and its targets.
pub fn prepare(s: &Sample, r: &Recipe, epoch: usize, sam: &Sam) -> Result<Prepared> {
    let seed = mix(r.prompt_seed, epoch);
    let (image, truth) = match &s.image {
        Some(img) if r.augment && epoch != VALIDATION_EPOCH => {
            let (i, t) = augment(img, &s.truth, &mut image_rng(seed, &format!("augment/{}", s.id)));
            (Some(i), t)
        }
        Some(img) => (Some(img.clone()), s.truth.clone()),
        None => (None, s.truth.clone()),
    };
    // With a mix of kinds, training samples get box and point; each step keeps what its kind uses.
    let sim_mode = if r.prompt_mix.is_empty() || epoch == VALIDATION_EPOCH { r.mode } else { PromptMode::BoxPoint };
    let prompt = simulate(&truth, sim_mode, &r.params, seed, &s.id);
    let size = sam.config.img_size;
    let (h, w) = (i64::from(truth.height), i64::from(truth.width));
    let input_size = preprocess_shape(h, w, size);
    let device = sam.device();
    let image = match image {
        Some(img) => {
            let resized = resize_longest_side(&img, size)?;
            let t = Tensor::from_slice(resized.as_raw()).view([input_size.0, input_size.1, 3]).permute([2, 0, 1]).unsqueeze(0).to_device(device);
            Some(sam.preprocess(&t))
        }
        None => None,
    };
    let truth_full = Tensor::from_slice(&truth.data).view([1, 1, h, w]).to_kind(Kind::Float).to_device(device);
    let low = sam.config.low_res_size();
    let scale = low as f64 / size as f64;
    let (lh, lw) = (((input_size.0 as f64 * scale).round() as i64).clamp(1, low), ((input_size.1 as f64 * scale).round() as i64).clamp(1, low));
    let target_low = truth_full.upsample_nearest2d([lh, lw], None, None).constant_pad_nd([0, low - lw, 0, low - lh]);
    Ok(Prepared { features: s.features.as_ref().map(|f| f.shallow_clone()), image, prompt, input_size, original_size: (h, w), target_low, truth_full })
}

type PromptTensors = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Points (B, 1, 2) with labels (B, 1) and boxes (B, 4) in the model's input frame, as the mode
/// asks (every sample has both: its ground truth is not empty).
pub fn prompts_tensors(prompts: &[(SimPrompt, (i64, i64), (i64, i64))], mode: PromptMode, device: Device) -> PromptTensors {
    let scale = |(ih, iw): (i64, i64), (oh, ow): (i64, i64)| (iw as f32 / ow as f32, ih as f32 / oh as f32);
    let want_points = matches!(mode, PromptMode::Point | PromptMode::BoxPoint);
    let want_boxes = matches!(mode, PromptMode::Box | PromptMode::BoxPoint);
    let b = prompts.len() as i64;
    let points = want_points.then(|| {
        let v: Vec<f32> = prompts
            .iter()
            .flat_map(|(p, i, o)| {
                let (sx, sy) = scale(*i, *o);
                let [x, y] = p.point.unwrap_or([0.0, 0.0]);
                [x * sx, y * sy]
            })
            .collect();
        Tensor::from_slice(&v).view([b, 1, 2]).to_device(device)
    });
    let labels = want_points.then(|| Tensor::ones([b, 1], (Kind::Int64, device)));
    let boxes = want_boxes.then(|| {
        let v: Vec<f32> = prompts
            .iter()
            .flat_map(|(p, i, o)| {
                let (sx, sy) = scale(*i, *o);
                let [x0, y0, x1, y1] = p.bbox.unwrap_or([0.0, 0.0, 0.0, 0.0]);
                [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
            })
            .collect();
        Tensor::from_slice(&v).view([b, 4]).to_device(device)
    });
    (points, labels, boxes)
}
