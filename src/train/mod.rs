//! Fine-tuning with the SkinSAM paper's recipe: image embeddings computed once with the frozen
//! encoder (persisted in the embedding store when one is configured), the mask decoder trained
//! with Dice + binary cross-entropy (unweighted) on the single-mask output, Adam, a split by
//! lesion, early stopping on validation Dice. Optionally the prompt encoder, or the image encoder
//! too (full training, with augmentation and its own learning rate), and the three multimask
//! outputs with the IoU head (SAM's best-of-three loss and IoU MSE).
//!
//! Deterministic: the split, the batch order, the prompts and the augmentation come from seeded
//! ChaCha streams, and Adam's state is checkpointed with the weights, so a run resumed from its
//! last checkpoint continues exactly as an uninterrupted one.

pub mod adam;
pub mod bench;
pub mod client;
pub mod curve;
pub mod data;

use crate::eval::dataset::Dataset;
use crate::eval::prompts::{PromptMode, SimParams};
use crate::eval::scores::{score, ImageScores, Summary};
use crate::error::{invalid, Error, Result};
use crate::model::{checkpoint, Sam, SamVariant};
use crate::predictor::Predictor;
use adam::Adam;
use data::{prompts_tensors, Sample};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub val_fraction: f32,
    pub split_seed: u64,
    /// The paper's plain random split instead of one grouped by lesion id.
    pub random_split: bool,
    pub mode: PromptMode,
    pub params: SimParams,
    pub prompt_seed: u64,
    pub train_mask_decoder: bool,
    pub train_prompt_encoder: bool,
    pub train_image_encoder: bool,
    pub learning_rate: f64,
    pub image_encoder_learning_rate: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub patience: usize,
    pub min_delta: f64,
    pub loss_full_size: bool,
    pub augment: bool,
    pub max_train_images: usize,
    pub max_val_images: usize,
    pub progress_every: usize,
    /// Prompt kinds drawn per step with these weights; empty = always `mode`.
    #[serde(default)]
    pub prompt_mix: Vec<(PromptMode, f64)>,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decoupled (AdamW) weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Also train the three multimask outputs (SAM's loss: only the best of the three counts per
    /// sample) and the IoU head (MSE against each output's actual IoU), not only the single mask.
    #[serde(default)]
    pub multimask: bool,
    /// Per-epoch sampling weight n(label)^-class_balance (with replacement); 0 = every image
    /// once, shuffled.
    #[serde(default)]
    pub class_balance: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Cosine decay to zero at the last planned step.
    Cosine,
}

impl LrSchedule {
    /// The factor on the learning rates at optimiser step `step` (1-based) of `total`.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        if step <= warmup && warmup > 0 {
            return step as f64 / warmup as f64;
        }
        match self {
            Self::Constant => 1.0,
            Self::Cosine => {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let t = ((step - warmup) as f64 / span).min(1.0);
                0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            val_fraction: 0.2,
            split_seed: 0,
            random_split: false,
            mode: PromptMode::BoxPoint,
            params: SimParams::default(),
            prompt_seed: 0,
            train_mask_decoder: true,
            train_prompt_encoder: false,
            train_image_encoder: false,
            learning_rate: 1e-5,
            image_encoder_learning_rate: 1e-5,
            batch_size: 8,
            epochs: 20,
            patience: 3,
            min_delta: 1e-3,
            loss_full_size: false,
            augment: false,
            max_train_images: 0,
            max_val_images: 0,
            progress_every: 0,
            prompt_mix: Vec::new(),
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            weight_decay: 0.0,
            multimask: false,
            class_balance: 0.0,
        }
    }
}

impl Recipe {
    pub fn validate(&self) -> Result<()> {
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return Err(invalid("recipe.val_fraction", format!("{} is not in (0, 1)", self.val_fraction)));
        }
        if !(self.train_mask_decoder || self.train_prompt_encoder || self.train_image_encoder) {
            return Err(invalid("recipe", "nothing to train: enable the mask decoder, the prompt encoder or the image encoder"));
        }
        for (f, v) in [("recipe.learning_rate", self.learning_rate), ("recipe.image_encoder_learning_rate", self.image_encoder_learning_rate)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(f, format!("{v} is not a positive number")));
            }
        }
        if self.batch_size == 0 || self.epochs == 0 {
            return Err(invalid("recipe", "batch_size and epochs must be at least 1"));
        }
        if self.batch_size > MAX_BATCH_SIZE {
            return Err(invalid("recipe.batch_size", format!("{} is over the limit of {MAX_BATCH_SIZE}", self.batch_size)));
        }
        if self.augment && !self.train_image_encoder {
            return Err(invalid("recipe.augment", "augmentation needs train_image_encoder (precomputed embeddings cannot be augmented)"));
        }
        // The sum too: the kinds are drawn from [0, sum), which must be a finite range.
        let mix_sum: f64 = self.prompt_mix.iter().map(|(_, w)| w).sum();
        if self.prompt_mix.iter().any(|(_, w)| !(w.is_finite() && *w >= 0.0))
            || (!self.prompt_mix.is_empty() && (mix_sum == 0.0 || !mix_sum.is_finite()))
        {
            return Err(invalid("recipe.prompt_mix", "weights must be finite, >= 0, not all 0, and with a finite sum"));
        }
        if self.patience == 0 {
            // 0 would stop after the first epoch even when it improved.
            return Err(invalid("recipe.patience", "must be at least 1 (epochs without improvement before stopping)"));
        }
        if !(0.0..=1.0).contains(&self.class_balance) {
            // Also refuses NaN.
            return Err(invalid("recipe.class_balance", format!("{} is not in [0, 1]", self.class_balance)));
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            return Err(invalid("recipe.weight_decay", format!("{} is not in [0, 1)", self.weight_decay)));
        }
        if self.multimask && !self.train_mask_decoder {
            return Err(invalid("recipe.multimask", "trains the mask decoder's outputs and IoU head: it needs train_mask_decoder"));
        }
        self.params.validate("recipe.prompts")?;
        if self.multimask && self.loss_full_size {
            // The multimask and IoU terms are defined on the low-res logits only.
            return Err(invalid("recipe.multimask", "cannot be combined with loss_full_size"));
        }
        if !(self.min_delta.is_finite() && self.min_delta >= 0.0) {
            return Err(invalid("recipe.min_delta", "must be >= 0"));
        }
        Ok(())
    }
}

/// What the run starts from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaseModel {
    pub id: String,
    pub variant: SamVariant,
    pub checkpoint: PathBuf,
    pub sha256: String,
}

pub struct Job {
    pub run_id: String,
    pub base: BaseModel,
    pub dataset: PathBuf,
    /// The dataset's listing (read once, when the request was checked).
    pub listing: Dataset,
    pub recipe: Recipe,
    pub dir: PathBuf,
    pub device: Device,
    pub resume: bool,
    pub embedding_store: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LabelScores {
    pub dice: f64,
    pub iou: f64,
    pub accuracy: f64,
    pub n: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_dice_loss: f64,
    pub train_bce_loss: f64,
    /// With `multimask`: the best-of-three loss of the multimask outputs and the IoU head's MSE.
    #[serde(default)]
    pub train_multimask_loss: f64,
    #[serde(default)]
    pub train_iou_loss: f64,
    pub val: LabelScores,
    pub val_by_label: BTreeMap<String, LabelScores>,
    /// With `multimask`: validation of the multimask output the predicted IoU ranks first (the
    /// paper's protocol), same prompts.
    #[serde(default)]
    pub val_multimask: Option<LabelScores>,
    pub seconds: f64,
    pub learning_rate: f64,
    pub best: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Started {
    pub train_images: usize,
    pub val_images: usize,
    pub skipped: Vec<(String, String)>,
    pub resumed_from_epoch: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Finished {
    pub best_epoch: usize,
    pub best_val_dice: f64,
    pub best_checkpoint: PathBuf,
    pub last_checkpoint: PathBuf,
    pub stopped: String,
}

pub enum Event {
    Started(Started),
    Progress { epoch: usize, step: usize, steps: usize, loss: f64 },
    Epoch(EpochRecord),
}

/// The JSON sidecar of a checkpoint: everything needed to know what it is and to resume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sidecar {
    pub run_id: String,
    pub base: BaseModel,
    pub dataset: PathBuf,
    pub recipe: Recipe,
    pub split: SplitInfo,
    /// The epoch these weights are from.
    pub epoch: usize,
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub best_val_dice: f64,
    pub epochs_without_improvement: usize,
    pub adam_step: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub seed: u64,
    pub grouped_by_lesion: bool,
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// The largest batch a recipe may ask for: far above what fits SAM's training on one device
/// (vit_b's activations alone take gigabytes at 64), so a larger one is a mistake, refused
/// before it exhausts the memory of a server that also serves.
pub const MAX_BATCH_SIZE: usize = 256;

pub const BEST: &str = "best";
pub const LAST: &str = "last";

pub fn checkpoint_path(dir: &Path, which: &str) -> PathBuf {
    dir.join(format!("{which}.safetensors"))
}

pub fn sidecar_path(dir: &Path, which: &str) -> PathBuf {
    dir.join(format!("{which}.json"))
}

fn optimizer_path(dir: &Path) -> PathBuf {
    dir.join("last.optimizer.safetensors")
}

/// Reads a checkpoint's sidecar.
pub fn read_sidecar(dir: &Path, which: &str) -> Result<Sidecar> {
    let p = sidecar_path(dir, which);
    let bytes = std::fs::read(&p).map_err(|e| Error::FailedPrecondition(format!("cannot read {}: {e}", p.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::FailedPrecondition(format!("{} is not a valid sidecar: {e}", p.display())))
}

fn write_json_atomic(path: &Path, v: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    crate::eval::report::write_atomic(path, &bytes).map_err(|e| Error::Internal(format!("{e:#}")))
}

/// Dice loss (1 - soft Dice per sample, averaged) and BCE (mean over pixels) of logits against
/// 0/1 targets of the same shape (B, 1, H, W).
pub fn dice_bce(logits: &Tensor, target: &Tensor) -> (Tensor, Tensor) {
    let (dice, bce) = dice_bce_per_mask(logits, target);
    (dice.mean(Kind::Float), bce.mean(Kind::Float))
}

/// Dice loss and BCE (mean over pixels) of each of K masks of logits (B, K, H, W) against a 0/1
/// target (B, 1, H, W): two (B, K) tensors.
pub fn dice_bce_per_mask(logits: &Tensor, target: &Tensor) -> (Tensor, Tensor) {
    let t = target.expand_as(logits);
    let dims = [2i64, 3].as_slice();
    let p = logits.sigmoid();
    let inter = (&p * &t).sum_dim_intlist(dims, false, Kind::Float);
    let denom = p.sum_dim_intlist(dims, false, Kind::Float) + t.sum_dim_intlist(dims, false, Kind::Float);
    let soft_dice: Tensor = (inter * 2.0 + 1.0) / (denom + 1.0);
    let bce = logits.binary_cross_entropy_with_logits::<Tensor>(&t, None, None, tch::Reduction::None).mean_dim(dims, false, Kind::Float);
    (soft_dice.neg() + 1.0, bce)
}

/// IoU of each output's mask (logits > 0) with the target, (B, K), as the IoU head should predict.
/// Two empty masks agree exactly: 1, as in the evaluation's scores (eval::scores).
fn actual_iou(logits: &Tensor, target: &Tensor) -> Tensor {
    let dims = [2i64, 3].as_slice();
    let p = logits.gt(0.0).to_kind(Kind::Float);
    let t = target.expand_as(&p);
    let inter = (&p * &t).sum_dim_intlist(dims, false, Kind::Float);
    let union = p.sum_dim_intlist(dims, false, Kind::Float) + t.sum_dim_intlist(dims, false, Kind::Float) - &inter;
    let empty = union.eq(0.0);
    (inter / union.clamp_min(1.0)).masked_fill(&empty, 1.0)
}

/// Runs (or resumes) a training job. `emit` gets every event and returns false once the client
/// has gone away; so does `cancelled()`, checked before every step: either stops training there
/// (the checkpoints written stay).
pub fn run(job: &Job, mut emit: impl FnMut(Event) -> bool, cancelled_now: impl Fn() -> bool) -> Result<Finished> {
    job.recipe.validate()?;
    std::fs::create_dir_all(&job.dir).map_err(|e| Error::Internal(format!("creating {}: {e}", job.dir.display())))?;
    let r = &job.recipe;
    let (mut sam, _) = Sam::load(job.base.variant, &job.base.checkpoint, job.device)?;
    // Resume: the same recipe and base, then the last weights and Adam's state.
    let resumed = if job.resume { Some(read_sidecar(&job.dir, LAST)?) } else { None };
    if let Some(s) = &resumed {
        if s.recipe != *r || s.base.sha256 != job.base.sha256 {
            return Err(Error::FailedPrecondition(format!("run {} was started with another recipe or base model; start a new run", job.run_id)));
        }
        if s.dataset != job.dataset {
            // The split is a list of image ids: in another dataset they name other images.
            return Err(Error::FailedPrecondition(format!(
                "run {} was started on the dataset {}, not {}; resume it with that one",
                job.run_id,
                s.dataset.display(),
                job.dataset.display()
            )));
        }
        // A run that had already ended (early stopping, or all its epochs) stays ended, as it
        // would have without the interruption: no data to load, nothing to train.
        let ended = if s.epochs_without_improvement >= r.patience {
            Some("early_stopping")
        } else {
            (s.epoch >= r.epochs).then_some("epochs")
        };
        if let Some(stopped) = ended {
            return Ok(Finished {
                best_epoch: s.best_epoch,
                best_val_dice: s.best_val_dice,
                best_checkpoint: checkpoint_path(&job.dir, BEST),
                last_checkpoint: checkpoint_path(&job.dir, LAST),
                stopped: stopped.into(),
            });
        }
        checkpoint::load_strict(&mut sam.vs, &checkpoint_path(&job.dir, LAST))?;
    }
    let ds = &job.listing;
    let split = match &resumed {
        Some(s) => s.split.clone(),
        None => data::split(ds, r),
    };
    let store = crate::engine::store::EmbeddingStore::new(job.embedding_store.as_deref(), Some(&job.base.sha256), crate::model::Precision::Fp32, job.device);
    let predictor = Predictor::new(sam);
    let Some((train, val, skipped)) = data::load(ds, &split, &predictor, !r.train_image_encoder, store.as_ref(), &cancelled_now)? else {
        return Ok(cancelled(job, resumed.as_ref().map_or(0, |s| s.best_epoch), resumed.as_ref().map_or(f64::NEG_INFINITY, |s| s.best_val_dice)));
    };
    if train.is_empty() || val.is_empty() {
        return Err(invalid("dataset", format!("{} training and {} validation images: need at least one of each", train.len(), val.len())));
    }
    let mut sam = predictor.sam;
    data::set_trainable(&mut sam, r);
    let mut adam = Adam::new(&sam, r);
    if let Some(s) = &resumed {
        adam.load(&optimizer_path(&job.dir))?;
        if adam.step != s.adam_step {
            // The weights, Adam's state and the sidecar are three files: a run stopped while
            // writing them leaves them from different epochs, and resuming would not be exact.
            return Err(Error::FailedPrecondition(format!(
                "run {}: the optimizer state is at step {} but the run's record at step {} (interrupted while writing its checkpoint); start a new run",
                job.run_id, adam.step, s.adam_step
            )));
        }
    }
    let mut history = resumed.as_ref().map(|s| s.history.clone()).unwrap_or_default();
    let mut best_epoch = resumed.as_ref().map_or(0, |s| s.best_epoch);
    let mut best = resumed.as_ref().map_or(f64::NEG_INFINITY, |s| s.best_val_dice);
    let mut stale = resumed.as_ref().map_or(0, |s| s.epochs_without_improvement);
    let start_epoch = resumed.as_ref().map_or(1, |s| s.epoch + 1);
    if !emit(Event::Started(Started { train_images: train.len(), val_images: val.len(), skipped, resumed_from_epoch: start_epoch - 1 })) {
        return Ok(cancelled(job, best_epoch, best));
    }
    let sidecar = |epoch: usize, history: &[EpochRecord], best_epoch: usize, best: f64, stale: usize, step: i64| Sidecar {
        run_id: job.run_id.clone(),
        base: job.base.clone(),
        dataset: job.dataset.clone(),
        recipe: r.clone(),
        split: split.clone(),
        epoch,
        history: history.to_vec(),
        best_epoch,
        best_val_dice: best,
        epochs_without_improvement: stale,
        adam_step: step,
    };
    if resumed.is_none() {
        // Epoch 0: the base model's scores, for reference. "Best" starts at the first trained
        // epoch, so that every run has a best checkpoint to register.
        let t = Instant::now();
        let Some((val_all, by_label, val_multimask)) = validate(&sam, &val, r, &cancelled_now) else {
            return Ok(cancelled(job, best_epoch, best));
        };
        let rec = EpochRecord { epoch: 0, val: val_all, val_by_label: by_label, val_multimask, seconds: t.elapsed().as_secs_f64(), learning_rate: r.learning_rate, ..Default::default() };
        history.push(rec.clone());
        if !emit(Event::Epoch(rec)) {
            return Ok(cancelled(job, best_epoch, best));
        }
    }
    let mut stopped = "epochs";
    let labels: Vec<Option<&str>> = train.iter().map(|s| s.label.as_deref()).collect();
    for epoch in start_epoch..=r.epochs {
        let t = Instant::now();
        let order = data::epoch_order(&labels, r, epoch);
        let steps = order.len().div_ceil(r.batch_size);
        let total_steps = steps * r.epochs;
        let (mut sum, mut n) = (StepLosses::default(), 0usize);
        for (step, idx) in order.chunks(r.batch_size).enumerate() {
            let batch: Vec<&Sample> = idx.iter().map(|&i| &train[i]).collect();
            let mode = data::step_mode(r, epoch, step);
            let factor = r.lr_schedule.factor(adam.step as usize + 1, r.warmup_steps, total_steps);
            let losses = train_step(&sam, &mut adam, &batch, r, epoch, mode, factor)?;
            let loss = losses.total;
            sum.add(&losses, batch.len() as f64);
            n += batch.len();
            let progress = r.progress_every > 0 && (step + 1) % r.progress_every == 0;
            let alive = !cancelled_now() && (!progress || emit(Event::Progress { epoch, step: step + 1, steps, loss }));
            if !alive {
                // Cancelled mid-epoch: the last complete epoch's checkpoints stay as they are.
                return Ok(cancelled(job, best_epoch, best));
            }
        }
        let Some((val_all, by_label, val_multimask)) = validate(&sam, &val, r, &cancelled_now) else {
            return Ok(cancelled(job, best_epoch, best));
        };
        let improved = val_all.dice > best + r.min_delta;
        if improved {
            best = val_all.dice;
            best_epoch = epoch;
            stale = 0;
        } else {
            stale += 1;
        }
        let nf = n.max(1) as f64;
        let rec = EpochRecord {
            epoch,
            train_loss: sum.total / nf,
            train_dice_loss: sum.dice / nf,
            train_bce_loss: sum.bce / nf,
            train_multimask_loss: sum.multimask / nf,
            train_iou_loss: sum.iou / nf,
            val: val_all,
            val_by_label: by_label,
            val_multimask,
            seconds: t.elapsed().as_secs_f64(),
            learning_rate: r.learning_rate * r.lr_schedule.factor(adam.step as usize, r.warmup_steps, total_steps),
            best: improved,
        };
        history.push(rec.clone());
        // Checkpoints: the best one first (when this epoch is it), then the weights, Adam's state
        // and last the sidecar that points at them all: the sidecar is the commit point, so a
        // run stopped in between resumes from the previous epoch, whose best_epoch names the
        // weights that best.safetensors holds.
        if improved {
            checkpoint::save_safetensors(&sam.vs, &checkpoint_path(&job.dir, BEST))?;
            write_json_atomic(&sidecar_path(&job.dir, BEST), &sidecar(epoch, &history, best_epoch, best, stale, adam.step))?;
        }
        checkpoint::save_safetensors(&sam.vs, &checkpoint_path(&job.dir, LAST))?;
        adam.save(&optimizer_path(&job.dir))?;
        write_json_atomic(&sidecar_path(&job.dir, LAST), &sidecar(epoch, &history, best_epoch, best, stale, adam.step))?;
        // The curve is a convenience: a plotting failure is logged, never fatal to the run.
        match curve::curve_png(&history) {
            Ok(png) => {
                if let Err(e) = crate::eval::report::write_atomic(&job.dir.join("curve.png"), &png) {
                    tracing::warn!(error = %e, "writing the training curve");
                }
            }
            Err(e) => tracing::warn!(error = %e, "plotting the training curve"),
        }
        if !emit(Event::Epoch(rec)) {
            return Ok(cancelled(job, best_epoch, best));
        }
        if stale >= r.patience {
            stopped = "early_stopping";
            break;
        }
    }
    Ok(Finished {
        best_epoch,
        best_val_dice: best,
        best_checkpoint: checkpoint_path(&job.dir, BEST),
        last_checkpoint: checkpoint_path(&job.dir, LAST),
        stopped: stopped.into(),
    })
}

fn cancelled(job: &Job, best_epoch: usize, best: f64) -> Finished {
    Finished {
        best_epoch,
        best_val_dice: best,
        best_checkpoint: checkpoint_path(&job.dir, BEST),
        last_checkpoint: checkpoint_path(&job.dir, LAST),
        stopped: "cancelled".into(),
    }
}

/// A step's loss and its parts (the multimask and IoU parts are 0 unless the recipe trains them).
#[derive(Clone, Copy, Debug, Default)]
struct StepLosses {
    total: f64,
    dice: f64,
    bce: f64,
    multimask: f64,
    iou: f64,
}

impl StepLosses {
    fn add(&mut self, o: &Self, weight: f64) {
        self.total += o.total * weight;
        self.dice += o.dice * weight;
        self.bce += o.bce * weight;
        self.multimask += o.multimask * weight;
        self.iou += o.iou * weight;
    }
}

/// One optimisation step on a batch: Dice + BCE of the single-mask output and, with `multimask`,
/// the best-of-three Dice + BCE of the multimask outputs plus the IoU head's MSE (SAM's recipe,
/// unweighted).
fn train_step(sam: &Sam, adam: &mut Adam, batch: &[&Sample], r: &Recipe, epoch: usize, mode: PromptMode, lr_factor: f64) -> Result<StepLosses> {
    let prepared: Vec<data::Prepared> = batch.iter().map(|s| data::prepare(s, r, epoch, sam)).collect::<Result<_>>()?;
    let (all, iou_pred) = decode_batch(sam, &prepared, mode, r.multimask);
    let low = all.narrow(1, 0, 1);
    let target = Tensor::cat(&prepared.iter().map(|p| p.target_low.shallow_clone()).collect::<Vec<_>>(), 0);
    let (dice, bce) = if r.loss_full_size {
        let mut d = Vec::new();
        let mut b = Vec::new();
        for (i, p) in prepared.iter().enumerate() {
            let full = sam.postprocess_masks(&low.narrow(0, i as i64, 1), p.input_size, p.original_size);
            let (di, bi) = dice_bce(&full, &p.truth_full);
            d.push(di);
            b.push(bi);
        }
        (Tensor::stack(&d, 0).mean(Kind::Float), Tensor::stack(&b, 0).mean(Kind::Float))
    } else {
        dice_bce(&low, &target)
    };
    let mut loss = &dice + &bce;
    let mut parts = StepLosses::default();
    if r.multimask {
        let multi = all.narrow(1, 1, all.size()[1] - 1);
        let (d, b) = dice_bce_per_mask(&multi, &target);
        let best_of_three = (d + b).amin([1i64].as_slice(), false).mean(Kind::Float);
        let actual = tch::no_grad(|| actual_iou(&all, &target));
        let iou_loss = iou_pred.mse_loss(&actual, tch::Reduction::Mean);
        parts.multimask = best_of_three.double_value(&[]);
        parts.iou = iou_loss.double_value(&[]);
        loss = loss + best_of_three + iou_loss;
    }
    let value = loss.double_value(&[]);
    if !value.is_finite() {
        // Diverged: stop before the update, so that no checkpoint holds non-finite weights.
        return Err(Error::FailedPrecondition(format!(
            "the loss became non-finite ({value}) in epoch {epoch}: training stopped; the checkpoints of the last complete epoch are kept (try a lower learning rate)"
        )));
    }
    adam.zero_grad();
    loss.backward();
    adam.step(lr_factor);
    Ok(StepLosses { total: value, dice: dice.double_value(&[]), bce: bce.double_value(&[]), ..parts })
}

/// Low-res logits and IoU predictions of prepared samples (their cached embeddings, or their
/// images encoded now in full training) decoded with their prompts: every output (B, 4, h, w)
/// when `all_outputs`, else the single-mask one (B, 1, h, w), token 0 first either way.
fn decode_batch(sam: &Sam, prepared: &[data::Prepared], mode: PromptMode, all_outputs: bool) -> (Tensor, Tensor) {
    let features = match &prepared[0].features {
        Some(_) => Tensor::cat(&prepared.iter().map(|p| p.features.as_ref().expect("same mode").shallow_clone()).collect::<Vec<_>>(), 0),
        None => sam.embed(&Tensor::cat(&prepared.iter().map(|p| p.image.as_ref().expect("live encoding").shallow_clone()).collect::<Vec<_>>(), 0)),
    };
    let prompts: Vec<_> = prepared.iter().map(|p| (p.prompt, p.input_size, p.original_size)).collect();
    let (pts, labels, boxes) = prompts_tensors(&prompts, mode, sam.device());
    let pb = crate::model::prompt_encoder::PromptBatch {
        points: pts.as_ref().map(|p| (p, labels.as_ref().expect("labels with points"))),
        boxes: boxes.as_ref(),
        masks: None,
    };
    if all_outputs {
        sam.decode_all(&features, &pb)
    } else {
        sam.decode(&features, &pb, false)
    }
}

/// Validation scores: overall, per lesion type, and overall for the chosen multimask output.
type Validation = (LabelScores, BTreeMap<String, LabelScores>, Option<LabelScores>);

/// Validation Dice / IoU / accuracy at full resolution (as the evaluation measures), overall and
/// per lesion type, with the fixed validation prompts; with `multimask`, also overall for the
/// multimask output with the highest predicted IoU. None when `cancelled()` turns true (checked
/// per batch).
fn validate(sam: &Sam, val: &[Sample], r: &Recipe, cancelled: &dyn Fn() -> bool) -> Option<Validation> {
    let mut rows: Vec<(Option<String>, ImageScores)> = Vec::with_capacity(val.len());
    let mut multi_rows: Vec<(Option<String>, ImageScores)> = Vec::new();
    let to_mask = |t: &Tensor, p: &data::Prepared| {
        let full = sam.postprocess_masks(t, p.input_size, p.original_size);
        Vec::<u8>::try_from(full.gt(0.0).to_kind(Kind::Uint8).flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default()
    };
    let completed = tch::no_grad(|| {
        for chunk in val.chunks(r.batch_size.max(1)) {
            if cancelled() {
                return false;
            }
            // A sample that cannot be prepared is left out of the scores, keeping each with its own.
            let (prepared, samples): (Vec<data::Prepared>, Vec<&Sample>) =
                chunk.iter().filter_map(|s| data::prepare(s, r, data::VALIDATION_EPOCH, sam).ok().map(|p| (p, s))).unzip();
            if prepared.is_empty() {
                continue;
            }
            let (all, iou) = decode_batch(sam, &prepared, r.mode, r.multimask);
            for (i, (p, s)) in prepared.iter().zip(samples).enumerate() {
                let i = i as i64;
                rows.push((s.label.clone(), score(&to_mask(&all.narrow(0, i, 1).narrow(1, 0, 1), p), &s.truth.data)));
                if r.multimask {
                    let k = 1 + iou.get(i).narrow(0, 1, iou.size()[1] - 1).argmax(0, false).int64_value(&[]);
                    multi_rows.push((s.label.clone(), score(&to_mask(&all.narrow(0, i, 1).narrow(1, k, 1), p), &s.truth.data)));
                }
            }
        }
        true
    });
    if !completed {
        return None;
    }
    let conv = |g: &crate::eval::scores::GroupSummary| LabelScores { dice: g.dice.mean, iou: g.iou.mean, accuracy: g.accuracy.mean, n: g.n };
    let summary = Summary::of(rows.iter().map(|(l, s)| (l.as_deref(), *s)));
    let multi = r.multimask.then(|| conv(&Summary::of(multi_rows.iter().map(|(l, s)| (l.as_deref(), *s))).overall));
    Some((conv(&summary.overall), summary.by_label.iter().map(|(k, v)| (k.clone(), conv(v))).collect(), multi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_balance_draws_rare_types_more_often() {
        // 90 nv and 10 bcc images; over 20 epochs of 100 draws each.
        let labels: Vec<Option<&str>> = (0..100).map(|i| Some(if i < 90 { "nv" } else { "bcc" })).collect();
        let share = |balance: f64| {
            let r = Recipe { class_balance: balance, ..Recipe::default() };
            let orders: Vec<Vec<usize>> = (1..=20).map(|e| data::epoch_order(&labels, &r, e)).collect();
            assert!(orders.iter().all(|o| o.len() == 100), "an epoch is as long as the data");
            orders.iter().flatten().filter(|&&i| i >= 90).count() as f64 / 2000.0
        };
        // Off: every image once per epoch.
        let r = Recipe::default();
        let mut once = data::epoch_order(&labels, &r, 1);
        assert_ne!(once, (0..100).collect::<Vec<_>>(), "shuffled");
        once.sort_unstable();
        assert_eq!(once, (0..100).collect::<Vec<_>>());
        // 1: both types equally often; 0.5: by the square roots of their counts, 10^0.5 / (10^0.5 + 90^0.5).
        assert!((share(1.0) - 0.5).abs() < 0.04, "{}", share(1.0));
        assert!((share(0.5) - 0.25).abs() < 0.04, "{}", share(0.5));
    }

    #[test]
    fn schedule_warms_up_then_follows_a_cosine_to_zero() {
        let c = LrSchedule::Cosine;
        assert!((c.factor(5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((c.factor(10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((c.factor(60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(c.factor(110, 10, 110).abs() < 1e-12);
        assert!(c.factor(500, 10, 110).abs() < 1e-12, "stays at zero past the end");
        assert_eq!(LrSchedule::Constant.factor(60, 10, 110), 1.0);
        assert!((LrSchedule::Constant.factor(1, 4, 110) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn per_mask_losses_and_actual_iou() {
        // Target: the left half of a 4x4 mask; outputs: right, left, everything.
        let t = Tensor::from_slice(&[1f32, 1., 0., 0.]).view([1, 1, 1, 4]).repeat([1, 1, 4, 1]);
        let right = (t.neg() + 0.5) * 40.0;
        let left = (&t - 0.5) * 40.0;
        let all = Tensor::full([1, 1, 4, 4], 20.0, (Kind::Float, Device::Cpu));
        let logits = Tensor::cat(&[right, left, all], 1);
        let (d, b) = dice_bce_per_mask(&logits, &t);
        let (d, b) = (Vec::<f32>::try_from(d.flatten(0, -1)).unwrap(), Vec::<f32>::try_from(b.flatten(0, -1)).unwrap());
        assert!(d[1] < 0.01 && b[1] < 1e-6, "the right mask costs nothing: {d:?} {b:?}");
        assert!(d[0] > 0.9 && b[0] > 5.0, "the opposite mask costs most: {d:?} {b:?}");
        assert!(d[2] > d[1] && d[2] < d[0]);
        let iou = Vec::<f32>::try_from(actual_iou(&logits, &t).flatten(0, -1)).unwrap();
        assert_eq!(iou, [0.0, 1.0, 0.5]);
        // Against an empty target: an empty output agrees exactly, a non-empty one not at all.
        let none = Tensor::zeros([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let empty_out = Tensor::full([1, 1, 4, 4], -20.0, (Kind::Float, Device::Cpu));
        let iou = Vec::<f32>::try_from(actual_iou(&Tensor::cat(&[empty_out, logits.narrow(1, 2, 1)], 1), &none).flatten(0, -1)).unwrap();
        assert_eq!(iou, [1.0, 0.0]);
        // The single-output form is the mean of the per-mask one.
        let (d1, b1) = dice_bce(&logits, &t);
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!((d1.double_value(&[]) - mean(&d)).abs() < 1e-6 && (b1.double_value(&[]) - mean(&b)).abs() < 1e-5);
    }

    #[test]
    fn prompt_kinds_follow_the_mix_and_are_reproducible() {
        let r = Recipe { prompt_mix: vec![(PromptMode::BoxPoint, 0.6), (PromptMode::None, 0.4), (PromptMode::Point, 0.0)], ..Recipe::default() };
        let draws: Vec<PromptMode> = (0..2000).map(|s| data::step_mode(&r, 3, s)).collect();
        let again: Vec<PromptMode> = (0..2000).map(|s| data::step_mode(&r, 3, s)).collect();
        assert_eq!(draws, again);
        let none = draws.iter().filter(|m| **m == PromptMode::None).count() as f64 / 2000.0;
        assert!((none - 0.4).abs() < 0.04, "{none}");
        assert!(!draws.contains(&PromptMode::Point), "a zero weight is never drawn");
        assert_ne!(draws, (0..2000).map(|s| data::step_mode(&r, 4, s)).collect::<Vec<_>>(), "another epoch, other draws");
        assert!(Recipe::default().prompt_mix.is_empty() && data::step_mode(&Recipe::default(), 1, 0) == PromptMode::BoxPoint);
    }
}
