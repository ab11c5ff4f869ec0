//! Runs an evaluation on the server: for each image, simulate the prompts, segment with every
//! model named (the same prompts for all: paired), score against the ground truth, and send the
//! results in dataset order with running summaries, then the final summary and comparisons.

use super::dataset::{decode_mask, read_file, BinaryMask, Dataset, Problem};
use super::prompts::{box_ellipse, simulate, PromptMode, SimParams, SimPrompt};
use super::scores::{score, ImageScores, Summary};
use super::stats::{paired, Paired};
use crate::engine::{MaskEncoding, Registry, Source};
use crate::error::{invalid, Error, Result};
use crate::masks::from_rle;
use crate::predictor::Prompt;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tokio::sync::mpsc;

/// The model-free baseline, selectable like a model.
pub const BASELINE: &str = "box-ellipse";
/// Images evaluated at once (image reading overlaps the model's work; order is kept).
const PIPELINE_DEPTH: usize = 3;

#[derive(Clone, Debug)]
pub struct EvalRequest {
    pub models: Vec<String>,
    pub mode: PromptMode,
    pub params: SimParams,
    pub seed: u64,
    pub multimask: bool,
    pub return_masks: bool,
    /// A running summary every this many images (0: only the final one).
    pub summary_every: usize,
    /// Largest image or mask (width x height) read.
    pub max_pixels: u64,
}

/// One image and its ground truth, read.
pub struct EvalInput {
    pub id: String,
    pub label: Option<String>,
    pub group: Option<String>,
    pub image: Vec<u8>,
    pub mask: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelResult {
    pub model: String,
    pub scores: ImageScores,
    /// The decoder's predicted IoU of the chosen mask (NaN for the baseline).
    pub predicted_iou: f32,
    /// The predicted mask (COCO column-major RLE counts), when asked for.
    #[serde(skip)]
    pub mask_rle: Option<Vec<u32>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageResult {
    pub index: usize,
    pub id: String,
    pub label: Option<String>,
    pub group: Option<String>,
    pub width: u32,
    pub height: u32,
    /// The ground-truth mask had another size and was resized (nearest) to the image's.
    pub mask_resized: bool,
    pub prompt: SimPrompt,
    pub results: Vec<ModelResult>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Comparison {
    pub model_a: String,
    pub model_b: String,
    pub metric: String,
    pub overall: Paired,
    pub by_label: BTreeMap<String, Paired>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalSummary {
    pub is_final: bool,
    pub images_done: usize,
    pub images_total: usize,
    pub skipped: usize,
    pub masks_resized: usize,
    pub models: BTreeMap<String, Summary>,
    /// Every pair of models (A named before B), when there are several (final only).
    pub comparisons: Vec<Comparison>,
}

pub enum Event {
    Image(Box<ImageResult>),
    Skipped(Problem),
    Summary(Box<EvalSummary>),
}

/// Checks a request against the registry before any work starts.
pub fn validate(registry: &Registry, r: &EvalRequest) -> Result<()> {
    if r.models.is_empty() {
        return Err(invalid("settings.model_ids", "name at least one model (or the baseline \"box-ellipse\")"));
    }
    for (i, m) in r.models.iter().enumerate() {
        if r.models[..i].contains(m) {
            return Err(invalid("settings.model_ids", format!("{m:?} is named twice")));
        }
        if m == BASELINE {
            if !matches!(r.mode, PromptMode::Box | PromptMode::BoxPoint) {
                return Err(invalid("settings.model_ids", "the box-ellipse baseline needs prompt mode box or box_point"));
            }
        } else {
            let info = registry.get(m)?;
            if info.state != crate::engine::ModelState::Ready {
                // Checked here, not found failing the run at its first image.
                return Err(Error::Unavailable(format!("model {m:?} is not ready ({:?})", info.state)));
            }
        }
    }
    r.params.validate("settings.prompts")
}

/// Reads the dataset's items as inputs (each read on the blocking pool); unreadable ones become
/// problems. Listing problems (an image without a mask) come first.
pub fn dataset_inputs(ds: Dataset) -> impl futures::Stream<Item = InputResult> + Send {
    let problems = futures::stream::iter(ds.problems.into_iter().map(|p| Err(Ok(p))));
    let items = futures::stream::iter(ds.items).then(|item| async move {
        let id = item.id.clone();
        tokio::task::spawn_blocking(move || -> Result<EvalInput> {
            Ok(EvalInput { image: read_file(&item.image)?, mask: read_file(&item.mask)?, id: item.id, label: item.label, group: item.group })
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| Ok(Problem { id, message: e.to_string() }))
    });
    problems.chain(items)
}

/// One input of a run: an image to score; Err(Ok(problem)) one to skip; Err(Err(e)) the end of
/// the run (the inputs themselves failed, e.g. an upload stream broke off).
pub type InputResult = std::result::Result<EvalInput, std::result::Result<Problem, Error>>;

/// Runs the evaluation over `inputs`, sending events to `tx` until done or the receiver is gone.
pub async fn run(
    registry: Registry,
    req: EvalRequest,
    inputs: impl futures::Stream<Item = InputResult> + Send,
    total: usize,
    tx: mpsc::Sender<Result<Event>>,
) {
    let req = std::sync::Arc::new(req);
    let mut rows: Vec<ImageResult> = Vec::new();
    let mut skipped = 0;
    let mut index = 0usize;
    let results = inputs
        .map(|input| {
            let i = index;
            index += usize::from(input.is_ok());
            let (registry, req) = (registry.clone(), req.clone());
            async move {
                match input {
                    Ok(input) => evaluate_one(&registry, &req, i, input).await,
                    Err(e) => Err(e),
                }
            }
        })
        .buffered(PIPELINE_DEPTH);
    futures::pin_mut!(results);
    while let Some(r) = results.next().await {
        if registry.shutting_down() {
            // No resume for evaluations: the client is told to run it again (elsewhere).
            let why = format!("the server is shutting down: the evaluation stopped after {} scored images; run it again", rows.len());
            let _ = tx.send(Err(Error::Unavailable(why))).await;
            return;
        }
        let event = match r {
            Ok(row) => {
                for m in &req.models {
                    metrics::counter!(crate::metrics::EVAL_IMAGES_TOTAL, "model" => m.clone(), "result" => "scored").increment(1);
                }
                // Kept for the summaries, which need the scores, not the masks: a long upload
                // stream must not hold every mask it was sent back.
                let mut kept = row.clone();
                kept.results.iter_mut().for_each(|r| r.mask_rle = None);
                rows.push(kept);
                Event::Image(Box::new(row))
            }
            Err(Ok(problem)) => {
                for m in &req.models {
                    metrics::counter!(crate::metrics::EVAL_IMAGES_TOTAL, "model" => m.clone(), "result" => "skipped").increment(1);
                }
                skipped += 1;
                Event::Skipped(problem)
            }
            Err(Err(fatal)) => {
                let _ = tx.send(Err(fatal)).await;
                return;
            }
        };
        // A running summary after every summary_every-th scored image: not again after the
        // images skipped behind it.
        let scored = matches!(event, Event::Image(_));
        if tx.send(Ok(event)).await.is_err() {
            return; // the client went away: stop
        }
        if scored && req.summary_every > 0 && rows.len() % req.summary_every == 0 {
            let s = summarize(&req.models, &rows, total, skipped, false, req.seed);
            if tx.send(Ok(Event::Summary(Box::new(s)))).await.is_err() {
                return;
            }
        }
    }
    // The final summary's bootstrap (2000 resamples per pair of models, metric and label) takes
    // seconds over a whole dataset: on the blocking pool, not on a thread serving RPCs.
    let (models, seed) = (req.models.clone(), req.seed);
    let s = tokio::task::spawn_blocking(move || summarize(&models, &rows, total, skipped, true, seed)).await;
    let _ = match s {
        Ok(s) => tx.send(Ok(Event::Summary(Box::new(s)))).await,
        Err(e) => tx.send(Err(Error::Internal(format!("summarising the run failed: {e}")))).await,
    };
}

/// Ok(row); Err(Ok(problem)) skips the image; Err(Err(e)) ends the run (a model failed).
async fn evaluate_one(
    registry: &Registry,
    req: &EvalRequest,
    index: usize,
    input: EvalInput,
) -> std::result::Result<ImageResult, std::result::Result<Problem, Error>> {
    let problem = |e: Error| Ok(Problem { id: input.id.clone(), message: e.to_string() });
    // The image's size as the model sees it (EXIF orientation applied), to fit the truth to.
    let (width, height) = crate::image_io::oriented_size(&input.image, "image", req.max_pixels).map_err(problem)?;
    crate::image_io::oriented_size(&input.mask, "mask", req.max_pixels).map_err(problem)?;
    let truth = decode_mask(&input.mask, "mask").map_err(problem)?;
    let (truth, mask_resized) = truth.fitted_to(width, height);
    if truth.area() == 0 && req.mode != PromptMode::None {
        // No point or box can be drawn from an empty ground truth: scored, the model would be
        // judged on the no-prompt case beside a baseline that cannot miss an empty mask.
        return Err(problem(invalid("mask", "the ground truth is empty: no prompt can be simulated from it")));
    }
    let prompt = simulate(&truth, req.mode, &req.params, req.seed, &input.id);
    let calls = req.models.iter().map(|m| model_result(registry, req, m, &input.image, &prompt, &truth));
    let mut results = Vec::with_capacity(req.models.len());
    for r in futures::future::join_all(calls).await {
        match r {
            Ok(r) => results.push(r),
            // A bad image is skipped; anything else (a model unloaded, libtorch) ends the run.
            Err(e @ Error::InvalidArgument { .. }) => return Err(problem(e)),
            Err(e) => return Err(Err(e)),
        }
    }
    Ok(ImageResult { index, id: input.id, label: input.label, group: input.group, width, height, mask_resized, prompt, results })
}

async fn model_result(registry: &Registry, req: &EvalRequest, model: &str, image: &[u8], prompt: &SimPrompt, truth: &BinaryMask) -> Result<ModelResult> {
    let (w, h) = (truth.width as usize, truth.height as usize);
    if model == BASELINE {
        let m = box_ellipse(prompt.bbox, truth.width, truth.height);
        let rle = req.return_masks.then(|| crate::masks::to_rle(&m.data, h, w));
        return Ok(ModelResult { model: model.to_owned(), scores: score(&m.data, &truth.data), predicted_iou: f32::NAN, mask_rle: rle });
    }
    let p = Prompt { points: prompt.point.map(|[x, y]| vec![crate::predictor::PointPrompt { x, y, label: 1 }]).unwrap_or_default(), bbox: prompt.bbox, mask_input: None };
    // A model queue full of other clients' requests is a reason to wait, not to end a run that
    // may be hours in: retried with a growing pause, then given up with the overload status.
    let mut pause = OVERLOAD_FIRST_PAUSE;
    let mut tries = 1;
    let out = loop {
        let encoding = MaskEncoding { png: false, rle: true };
        match registry.segment(model, Source::Image(image.to_vec()), vec![p.clone()], req.multimask, false, encoding).await {
            Err(Error::ResourceExhausted(_)) if tries < OVERLOAD_TRIES => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(OVERLOAD_MAX_PAUSE);
                tries += 1;
            }
            other => break other?,
        }
    };
    let m = out.masks.into_iter().next().ok_or_else(|| Error::Internal("no mask returned".into()))?;
    let counts = m.rle.unwrap_or_default();
    let pred = from_rle(&counts, h, w);
    Ok(ModelResult {
        model: model.to_owned(),
        scores: score(&pred, &truth.data),
        predicted_iou: m.scores.get(m.best).copied().unwrap_or(f32::NAN),
        mask_rle: req.return_masks.then_some(counts),
    })
}

/// Attempts of one image's Segment call while the model answers RESOURCE_EXHAUSTED, and the
/// pauses between them (doubling, at most 1 s): about 4.6 s in all.
const OVERLOAD_TRIES: u32 = 10;
const OVERLOAD_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);
const OVERLOAD_MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Summaries per model, and (final) paired comparisons of every pair of models.
pub fn summarize(models: &[String], rows: &[ImageResult], total: usize, skipped: usize, is_final: bool, seed: u64) -> EvalSummary {
    let mut out = EvalSummary {
        is_final,
        images_done: rows.len(),
        images_total: total,
        skipped,
        masks_resized: rows.iter().filter(|r| r.mask_resized).count(),
        ..Default::default()
    };
    for (k, m) in models.iter().enumerate() {
        out.models.insert(m.clone(), Summary::of(rows.iter().map(|r| (r.label.as_deref(), r.results[k].scores))));
    }
    if is_final {
        out.comparisons = comparisons(models, rows, seed);
    }
    out
}

pub fn comparisons(models: &[String], rows: &[ImageResult], seed: u64) -> Vec<Comparison> {
    let mut out = Vec::new();
    let metrics: [(&str, fn(&ImageScores) -> f64); 3] = [("dice", |s| s.dice), ("iou", |s| s.iou), ("accuracy", |s| s.accuracy)];
    for a in 0..models.len() {
        for b in a + 1..models.len() {
            for (metric, f) in metrics {
                let pair = |rows: &[&ImageResult]| {
                    let xa: Vec<f64> = rows.iter().map(|r| f(&r.results[a].scores)).collect();
                    let xb: Vec<f64> = rows.iter().map(|r| f(&r.results[b].scores)).collect();
                    paired(&xa, &xb, seed)
                };
                let all: Vec<&ImageResult> = rows.iter().collect();
                let mut by_label: BTreeMap<String, Vec<&ImageResult>> = BTreeMap::new();
                for r in rows {
                    by_label.entry(r.label.clone().unwrap_or_else(|| super::scores::UNLABELLED.into())).or_default().push(r);
                }
                out.push(Comparison {
                    model_a: models[a].clone(),
                    model_b: models[b].clone(),
                    metric: metric.into(),
                    overall: pair(&all),
                    by_label: by_label.into_iter().map(|(l, rs)| (l, pair(&rs))).collect(),
                });
            }
        }
    }
    out
}
