//! EvaluationService: dataset evaluation and paired A/B comparison (see crate::eval).

use super::pb::{self, evaluation_service_server::EvaluationService};
use super::{to_status, Observe, ResponseStream};
use crate::engine::Registry;
use crate::error::{invalid, Error, Result};
use crate::eval::dataset::{Dataset, Problem};
use crate::eval::prompts::{PromptMode, SimParams};
use crate::eval::runner::{self, EvalInput, EvalRequest, EvalSummary, Event};
use crate::eval::scores::{GroupSummary, Stat};
use crate::eval::stats::Paired;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

/// Events buffered before the evaluation waits for the client to read.
const EVENT_BUFFER: usize = 16;
const DEFAULT_SUMMARY_EVERY: usize = 100;

pub struct Evaluation {
    pub registry: Registry,
}

pub fn mode_from_pb(v: i32) -> Result<PromptMode> {
    match pb::PromptMode::try_from(v) {
        Ok(pb::PromptMode::Unspecified | pb::PromptMode::BoxPoint) => Ok(PromptMode::BoxPoint),
        Ok(pb::PromptMode::None) => Ok(PromptMode::None),
        Ok(pb::PromptMode::Point) => Ok(PromptMode::Point),
        Ok(pb::PromptMode::Box) => Ok(PromptMode::Box),
        Err(_) => Err(invalid("settings.prompts.mode", format!("unknown prompt mode {v}"))),
    }
}

pub fn mode_to_pb(m: PromptMode) -> pb::PromptMode {
    match m {
        PromptMode::None => pb::PromptMode::None,
        PromptMode::Point => pb::PromptMode::Point,
        PromptMode::Box => pb::PromptMode::Box,
        PromptMode::BoxPoint => pb::PromptMode::BoxPoint,
    }
}

/// The request's settings with the paper's defaults filled in.
pub fn request_from_pb(s: &pb::EvaluateSettings, max_pixels: u64) -> Result<EvalRequest> {
    let p = s.prompts.clone().unwrap_or_default();
    let d = SimParams::default();
    let params = SimParams {
        margin: p.margin.unwrap_or(d.margin),
        max_shift: p.max_shift.unwrap_or(d.max_shift),
        max_scale: p.max_scale.unwrap_or(d.max_scale),
        reference_width: p.reference_width,
    };
    // shard_count 0 or 1 means one shard, so any index but 0 is a mistake (it was ignored).
    if s.shard_index >= s.shard_count.max(1) {
        return Err(invalid("settings.shard_index", format!("{} is not below shard_count {}", s.shard_index, s.shard_count)));
    }
    Ok(EvalRequest {
        models: s.model_ids.clone(),
        mode: mode_from_pb(p.mode)?,
        params,
        seed: p.seed,
        multimask: !s.single_mask,
        return_masks: s.return_masks,
        summary_every: if s.summary_every == 0 { DEFAULT_SUMMARY_EVERY } else { s.summary_every as usize },
        max_pixels,
    })
}

/// The settings in effect, echoed in the summaries.
fn settings_echo(s: &pb::EvaluateSettings, r: &EvalRequest) -> pb::EvaluateSettings {
    let mut s = s.clone();
    s.prompts = Some(pb::PromptSimulation {
        mode: mode_to_pb(r.mode) as i32,
        seed: r.seed,
        margin: Some(r.params.margin),
        max_shift: Some(r.params.max_shift),
        max_scale: Some(r.params.max_scale),
        reference_width: r.params.reference_width,
    });
    s.summary_every = r.summary_every as u32;
    s
}

/// `dataset` resolved, and only when it lies under one of the configured roots.
pub fn allowed_dataset(roots: &[PathBuf], dataset: &str) -> Result<PathBuf> {
    if dataset.is_empty() {
        return Err(invalid("dataset", "is empty"));
    }
    let path = Path::new(dataset)
        .canonicalize()
        .map_err(|e| invalid("dataset", format!("{dataset:?} cannot be opened on the server: {e}")))?;
    let allowed = roots.iter().filter_map(|r| r.canonicalize().ok()).any(|r| path.starts_with(&r));
    if !allowed {
        return Err(invalid(
            "dataset",
            format!("{dataset:?} is not under the server's eval.dataset_roots ({} configured); stream the images with EvaluateUpload instead", roots.len()),
        ));
    }
    Ok(path)
}

fn stat(s: &Stat) -> pb::MetricStats {
    pb::MetricStats { mean: s.mean, variance: s.variance, median: s.median, p2_5: s.p2_5, p97_5: s.p97_5 }
}

fn group(g: &GroupSummary) -> pb::GroupStats {
    pb::GroupStats { n: g.n as u32, accuracy: Some(stat(&g.accuracy)), dice: Some(stat(&g.dice)), iou: Some(stat(&g.iou)) }
}

fn paired(p: &Paired) -> pb::PairedStats {
    pb::PairedStats {
        n: p.n as u32,
        mean_diff: p.mean_diff,
        ci95_low: p.ci95_low,
        ci95_high: p.ci95_high,
        wilcoxon_p: p.wilcoxon_p,
        wins: p.wins as u32,
        ties: p.ties as u32,
        losses: p.losses as u32,
    }
}

pub fn summary_to_pb(s: &EvalSummary, settings: &pb::EvaluateSettings, dataset: &str) -> pb::EvaluationSummary {
    pb::EvaluationSummary {
        r#final: s.is_final,
        images_done: s.images_done as u32,
        images_total: s.images_total as u32,
        skipped: s.skipped as u32,
        masks_resized: s.masks_resized as u32,
        models: settings
            .model_ids
            .iter()
            .filter_map(|m| s.models.get(m).map(|sum| (m, sum)))
            .map(|(m, sum)| pb::ModelSummary {
                model_id: m.clone(),
                overall: Some(group(&sum.overall)),
                by_label: sum.by_label.iter().map(|(k, v)| (k.clone(), group(v))).collect(),
            })
            .collect(),
        comparisons: s
            .comparisons
            .iter()
            .map(|c| pb::Comparison {
                model_a: c.model_a.clone(),
                model_b: c.model_b.clone(),
                metric: c.metric.clone(),
                overall: Some(paired(&c.overall)),
                by_label: c.by_label.iter().map(|(k, v)| (k.clone(), paired(v))).collect(),
            })
            .collect(),
        settings: Some(settings.clone()),
        dataset: dataset.to_owned(),
    }
}

fn event_to_pb(e: Event, settings: &pb::EvaluateSettings, dataset: &str) -> pb::EvaluateResponse {
    use pb::evaluate_response::Event as E;
    let event = match e {
        Event::Image(r) => E::Image(pb::ImageResult {
            index: r.index as u32,
            id: r.id,
            label: r.label.unwrap_or_default(),
            group: r.group.unwrap_or_default(),
            width: r.width,
            height: r.height,
            mask_resized: r.mask_resized,
            prompt: Some(pb::SimulatedPrompt {
                point: r.prompt.point.map(|[x, y]| pb::Point { x, y, label: pb::PointLabel::Foreground as i32 }),
                r#box: r.prompt.bbox.map(|[x0, y0, x1, y1]| pb::Box { x0, y0, x1, y1 }),
            }),
            results: r
                .results
                .into_iter()
                .map(|m| pb::ModelImageResult {
                    model_id: m.model,
                    accuracy: m.scores.accuracy,
                    dice: m.scores.dice,
                    iou: m.scores.iou,
                    predicted_iou: m.predicted_iou,
                    mask: m.mask_rle.map(|counts| pb::Rle { height: r.height as i32, width: r.width as i32, counts }),
                })
                .collect(),
        }),
        Event::Skipped(p) => E::Skipped(pb::SkippedImage { id: p.id, reason: p.message }),
        Event::Summary(s) => E::Summary(summary_to_pb(&s, settings, dataset)),
    };
    pb::EvaluateResponse { event: Some(event) }
}

/// Runs the evaluation in its own task and returns its events as the response stream.
fn spawn_run(
    registry: Registry,
    req: EvalRequest,
    settings: pb::EvaluateSettings,
    dataset: String,
    inputs: impl futures::Stream<Item = runner::InputResult> + Send + 'static,
    total: usize,
) -> ResponseStream<pb::EvaluateResponse> {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    // A one-model run is labelled with its model (when the server knows it); a comparison of
    // several with none, so that combinations of models make no series of their own.
    let label = if req.models.len() == 1 { registry.metric_label(&req.models[0]) } else { String::new() };
    tokio::spawn(runner::run(registry, req, inputs, total, tx));
    let obs = std::sync::Mutex::new(Some(Observe::start("Evaluate", &label)));
    Box::pin(ReceiverStream::new(rx).map(move |r| {
        let r = r.map(|e| event_to_pb(e, &settings, &dataset)).map_err(to_status);
        let is_final = matches!(&r, Ok(pb::EvaluateResponse { event: Some(pb::evaluate_response::Event::Summary(s)) }) if s.r#final);
        if r.is_err() || is_final {
            if let Some(o) = obs.lock().ok().and_then(|mut o| o.take()) {
                o.finish(&r);
            }
        }
        r
    }))
}

#[tonic::async_trait]
impl EvaluationService for Evaluation {
    type EvaluateStream = ResponseStream<pb::EvaluateResponse>;

    async fn evaluate(&self, req: Request<pb::EvaluateRequest>) -> Result<Response<Self::EvaluateStream>, Status> {
        let r = req.into_inner();
        let settings = r.settings.unwrap_or_default();
        let eval = request_from_pb(&settings, self.registry.settings().limits.max_image_pixels).map_err(to_status)?;
        runner::validate(&self.registry, &eval).map_err(to_status)?;
        let root = allowed_dataset(&self.registry.settings().eval.dataset_roots, &r.dataset).map_err(to_status)?;
        let s = settings.clone();
        let ds = tokio::task::spawn_blocking(move || -> Result<Dataset> {
            let mut ds = Dataset::open(&root)?;
            // The dataset's labels, for the error when the label filter selects nothing.
            let known_labels: std::collections::BTreeSet<String> =
                if s.labels.is_empty() { Default::default() } else { ds.items.iter().filter_map(|i| i.label.clone()).collect() };
            ds.keep_ids(&s.ids, 0);
            if !s.ids.is_empty() && ds.items.is_empty() {
                return Err(invalid("settings.ids", format!("none of the {} ids is in the dataset", s.ids.len())));
            }
            ds.filter(&s.labels, s.limit as usize);
            if !s.labels.is_empty() && ds.items.is_empty() {
                let known: Vec<String> = known_labels.into_iter().collect();
                return Err(invalid("settings.labels", format!("no image has the labels {:?} (the dataset's labels: {})", s.labels, known.join(", "))));
            }
            ds.shard(s.shard_index as usize, s.shard_count as usize);
            Ok(ds)
        })
        .await
        .map_err(|e| to_status(Error::Internal(e.to_string())))?
        .map_err(to_status)?;
        let total = ds.items.len();
        let echo = settings_echo(&settings, &eval);
        Ok(Response::new(spawn_run(self.registry.clone(), eval, echo, r.dataset, runner::dataset_inputs(ds), total)))
    }

    type EvaluateUploadStream = ResponseStream<pb::EvaluateResponse>;

    async fn evaluate_upload(&self, req: Request<Streaming<pb::EvaluateUploadRequest>>) -> Result<Response<Self::EvaluateUploadStream>, Status> {
        let mut input = req.into_inner();
        let first = input.message().await?.ok_or_else(|| Status::invalid_argument("item: the stream is empty; send settings first"))?;
        let Some(pb::evaluate_upload_request::Item::Settings(settings)) = first.item else {
            return Err(Status::invalid_argument("item: the first message must carry the settings"));
        };
        if settings.shard_count > 1 || settings.limit > 0 || !settings.labels.is_empty() || !settings.ids.is_empty() {
            return Err(Status::invalid_argument("settings: limit, labels, ids and shards apply to server-side datasets; filter the images you send"));
        }
        let eval = request_from_pb(&settings, self.registry.settings().limits.max_image_pixels).map_err(to_status)?;
        runner::validate(&self.registry, &eval).map_err(to_status)?;
        // The state is None once the client's stream failed: the run ends there.
        let inputs = futures::stream::unfold(Some(input), |input| async move {
            let mut input = input?;
            let item = match input.message().await {
                Ok(Some(m)) => m.item,
                Ok(None) => return None,
                // Not the end of the data (a message over the size limit, a broken stream): the
                // run must not finish as if every image had been sent. A client that went away
                // reads nothing anyway.
                Err(s) => {
                    let message = format!("the upload stream broke off: {}", s.message());
                    let e = match s.code() {
                        Code::OutOfRange | Code::ResourceExhausted => Error::ResourceExhausted(format!("item: {message}")),
                        _ => invalid("item", message),
                    };
                    return Some((Err(Err(e)), None));
                }
            };
            let r = match item {
                Some(pb::evaluate_upload_request::Item::Image(i)) if !i.id.is_empty() => Ok(EvalInput {
                    id: i.id,
                    label: Some(i.label).filter(|l| !l.is_empty()),
                    group: Some(i.group).filter(|g| !g.is_empty()),
                    image: i.image,
                    mask: i.mask,
                }),
                Some(pb::evaluate_upload_request::Item::Image(_)) => Err(Ok(Problem { id: String::new(), message: "image.id is empty".into() })),
                _ => Err(Ok(Problem { id: String::new(), message: "item: settings may only come first; send images".into() })),
            };
            Some((r, Some(input)))
        });
        let echo = settings_echo(&settings, &eval);
        Ok(Response::new(spawn_run(self.registry.clone(), eval, echo, String::new(), inputs, 0)))
    }
}
