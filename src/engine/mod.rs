//! The engine: a registry of hosted models, each owned by one OS thread (tch tensors are Send
//! but not Sync) fed through a bounded queue; handlers send commands with a oneshot reply. That
//! thread hands Segment prompts to the model's decoder threads, which hold handles of their own
//! on the decoder's weights.

pub mod cache;
pub mod store;
pub mod worker;

use crate::device::parse_device;
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::model::{Precision, SamVariant};
use crate::predictor::Prompt;
use crate::settings::{ModelSettings, Settings};
use dashmap::DashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Failed,
}

/// What the admin API shows of a model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub id: String,
    pub variant: SamVariant,
    pub checkpoint: Option<PathBuf>,
    pub checkpoint_sha256: Option<String>,
    pub device: String,
    pub precision: Precision,
    pub state: ModelState,
    pub error: Option<String>,
    pub num_parameters: i64,
    pub image_size: i64,
    /// Decoder threads beside the model's thread (0: that thread decodes).
    pub decoders: usize,
}

/// Raw embedding wanted back with an embed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingFormat {
    None,
    Fp32,
    Fp16,
}

pub struct EmbedOutput {
    pub handle: String,
    pub cache_hit: bool,
    pub original_size: (i64, i64),
    /// Shape and little-endian bytes, when asked for.
    pub embedding: Option<(Vec<i64>, Vec<u8>)>,
    pub queue: Duration,
    pub compute: Duration,
}

pub enum Source {
    Handle(String),
    Image(Vec<u8>),
}

/// Encodings of the chosen mask wanted in a segment response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskEncoding {
    pub png: bool,
    pub rle: bool,
}

pub struct MaskOutput {
    /// Chosen mask as an 8-bit grey PNG (0 / 255), when asked for.
    pub png: Option<Vec<u8>>,
    /// Chosen mask as COCO uncompressed RLE counts, when asked for.
    pub rle: Option<Vec<u32>>,
    /// Foreground pixels of the chosen mask.
    pub area: i64,
    pub scores: Vec<f32>,
    pub best: usize,
    pub low_res_logits: Option<Vec<f32>>,
    pub clipped: bool,
}

pub struct SegmentOutput {
    pub handle: String,
    pub height: i64,
    pub width: i64,
    pub masks: Vec<MaskOutput>,
    pub queue: Duration,
    pub compute: Duration,
}

/// The answer channel of one command. Dropped unanswered (the model thread panicked while
/// serving it, and unwound), it answers INTERNAL, so the caller is not told the model was unloaded.
pub struct Reply<T>(Option<oneshot::Sender<Result<T>>>);

impl<T> Reply<T> {
    fn new(tx: oneshot::Sender<Result<T>>) -> Self {
        Self(Some(tx))
    }

    pub fn send(mut self, r: Result<T>) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(r);
        }
    }

    /// The caller went away (cancelled, deadline passed).
    pub fn is_closed(&self) -> bool {
        self.0.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Err(Error::Internal("the model failed while serving this request (see the server log)".into())));
        }
    }
}

pub enum Command {
    Embed { image: Vec<u8>, format: EmbeddingFormat, enqueued: Instant, reply: Reply<EmbedOutput> },
    Segment {
        source: Source,
        prompts: Vec<Prompt>,
        multimask: bool,
        low_res: bool,
        encoding: MaskEncoding,
        enqueued: Instant,
        reply: Reply<SegmentOutput>,
    },
}

impl Command {
    /// Answers a command that will not be served with `e`.
    pub(crate) fn refuse(self, e: Error) {
        match self {
            Command::Embed { reply, .. } => reply.send(Err(e)),
            Command::Segment { reply, .. } => reply.send(Err(e)),
        }
    }
}

struct Entry {
    info: ModelInfo,
    generation: u64,
    tx: Option<mpsc::Sender<Command>>,
    /// `limits.queue_depth` permits: one held by each request in flight (queued, or being
    /// served) until its caller has the answer or goes away. A caller that goes away gives its
    /// permit back at once, though its command waits in the channel until the model's thread
    /// skips it: a client cancelling takes no room from live ones.
    permits: Arc<tokio::sync::Semaphore>,
}

/// The model's channel holds this many times `limits.queue_depth` commands: the rest is room
/// for commands whose callers went away (each waits, unserved, until the model's thread reaches
/// it). Bounded, so that clients cancelling in a loop cannot queue without limit.
const CHANNEL_ROOM: usize = 2;

/// The hosted models. Cheap to clone (shared).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    models: DashMap<String, Entry>,
    settings: Settings,
    generation: AtomicU64,
    /// Bumped on every state change: health reporting and tests watch it.
    changes: watch::Sender<u64>,
    /// Set on the shutdown signal: long runs (training, evaluation) stop at their next step.
    shutting_down: AtomicBool,
}

impl Registry {
    pub fn new(settings: Settings) -> Self {
        let (changes, _) = watch::channel(0);
        Self { inner: Arc::new(Inner { models: DashMap::new(), settings, generation: AtomicU64::new(1), changes, shutting_down: AtomicBool::new(false) }) }
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The server got its shutdown signal: training and evaluation runs end at their next step
    /// (a training run keeps its last saved epoch, to resume) instead of being cut off when the
    /// grace period is over, and streams at their next message. Subscribers are told, so that a
    /// health update computed just before the signal is followed by one computed after it.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.changes.send_modify(|v| *v += 1);
    }

    pub fn shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|v| *v += 1);
        for state in [ModelState::Loading, ModelState::Ready, ModelState::Failed] {
            let n = self.inner.models.iter().filter(|e| e.info.state == state).count();
            metrics::gauge!(m::MODELS, "state" => state_label(state)).set(n as f64);
        }
    }

    pub fn list(&self) -> Vec<ModelInfo> {
        let mut v: Vec<ModelInfo> = self.inner.models.iter().map(|e| e.info.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn get(&self, id: &str) -> Result<ModelInfo> {
        self.inner.models.get(id).map(|e| e.info.clone()).ok_or_else(|| not_found(id))
    }

    /// The `model` label of a request's metrics: the id when it names a model this server has
    /// (in any state) or an alias, else "unknown". Label values are never taken from the request
    /// as they are: one series per id a client makes up would grow without bound.
    pub fn metric_label(&self, id: &str) -> String {
        if self.inner.models.contains_key(id) || self.inner.settings.aliases.iter().any(|a| a.name == id) {
            id.to_owned()
        } else {
            UNKNOWN_MODEL_LABEL.to_owned()
        }
    }

    pub fn any_ready(&self) -> bool {
        self.inner.models.iter().any(|e| e.info.state == ModelState::Ready)
    }

    /// Starts loading a model on its own thread; returns at once with state Loading.
    pub fn load(&self, mut ms: ModelSettings) -> Result<ModelInfo> {
        if ms.id.is_empty() || ms.id.len() > 128 || !ms.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(crate::error::invalid("id", format!("{:?} must be 1-128 characters of A-Z a-z 0-9 - _ .", ms.id)));
        }
        if self.inner.settings.aliases.iter().any(|a| a.name == ms.id) {
            // Requests naming it would go to the alias's routes, never to this model.
            return Err(crate::error::invalid("id", format!("{:?} is the name of an alias in the server's settings", ms.id)));
        }
        let decoders = ms.decoders.unwrap_or(self.inner.settings.decoders);
        if decoders > MAX_DECODERS {
            return Err(crate::error::invalid("decoders", format!("{decoders} decoder threads, the limit is {MAX_DECODERS}")));
        }
        ms.decoders = Some(decoders);
        let device_name = ms.device.clone().unwrap_or_else(|| self.inner.settings.default_device.clone());
        let device = parse_device(&device_name)?;
        if ms.precision == Precision::Fp16 && device == tch::Device::Cpu {
            return Err(crate::error::invalid("precision", "fp16 needs a CUDA device; use bf16 on CPU"));
        }
        if let Some(c) = &ms.checkpoint {
            if !c.is_file() {
                return Err(crate::error::invalid("checkpoint", format!("{} is not a file on the server", c.display())));
            }
        }
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed);
        let info = ModelInfo {
            id: ms.id.clone(),
            variant: ms.variant,
            checkpoint: ms.checkpoint.clone(),
            checkpoint_sha256: None,
            device: format!("{device:?}").to_lowercase(),
            precision: ms.precision,
            state: ModelState::Loading,
            error: None,
            num_parameters: 0,
            image_size: ms.variant.config().img_size,
            decoders,
        };
        match self.inner.models.entry(ms.id.clone()) {
            dashmap::Entry::Occupied(_) => {
                return Err(Error::FailedPrecondition(format!("model {:?} is already loaded: unload it first", ms.id)))
            }
            dashmap::Entry::Vacant(v) => {
                let permits = Arc::new(tokio::sync::Semaphore::new(self.inner.settings.limits.queue_depth.max(1)));
                v.insert(Entry { info: info.clone(), generation, tx: None, permits });
            }
        }
        self.changed();
        let registry = self.clone();
        let (tx, rx) = mpsc::channel(self.inner.settings.limits.queue_depth.max(1) * CHANNEL_ROOM);
        let id = ms.id.clone();
        if let Err(e) = std::thread::Builder::new().name(format!("model-{id}")).spawn(move || worker::run(registry, ms, device, generation, tx, rx)) {
            // Not left "loading" for ever, which would also refuse every later load of the id.
            self.inner.models.remove_if(&id, |_, e| e.generation == generation);
            self.changed();
            return Err(Error::Internal(format!("spawning the model thread: {e}")));
        }
        Ok(info)
    }

    /// Called by the model thread when loading ended. False when the model was unloaded meanwhile.
    fn finish_load(&self, id: &str, generation: u64, result: std::result::Result<(ModelInfo, mpsc::Sender<Command>), String>) -> bool {
        let ok = match self.inner.models.get_mut(id) {
            Some(mut e) if e.generation == generation => {
                match result {
                    Ok((info, tx)) => {
                        e.info = info;
                        e.tx = Some(tx);
                    }
                    Err(msg) => {
                        e.info.state = ModelState::Failed;
                        e.info.error = Some(msg);
                    }
                }
                true
            }
            _ => false,
        };
        self.changed();
        ok
    }

    /// Marks a serving model failed (its thread gave up): requests get UNAVAILABLE with `msg`,
    /// health turns NOT_SERVING, and an unload and load brings it back.
    fn fail(&self, id: &str, generation: u64, msg: String) {
        if let Some(mut e) = self.inner.models.get_mut(id).filter(|e| e.generation == generation) {
            e.info.state = ModelState::Failed;
            e.info.error = Some(msg);
            e.tx = None;
        }
        self.changed();
    }

    /// The generation of the model loaded as `id` now, if any (a model thread draining after
    /// an unload, or a reload, is not it).
    fn generation_of(&self, id: &str) -> Option<u64> {
        self.inner.models.get(id).map(|e| e.generation)
    }

    /// Removes a model; its thread finishes the queued commands, then exits.
    pub fn unload(&self, id: &str) -> Result<()> {
        self.inner.models.remove(id).ok_or_else(|| not_found(id))?;
        self.changed();
        Ok(())
    }

    fn sender(&self, id: &str) -> Result<(mpsc::Sender<Command>, Arc<tokio::sync::Semaphore>)> {
        let e = self.inner.models.get(id).ok_or_else(|| not_found(id))?;
        match (&e.info.state, &e.tx) {
            (ModelState::Ready, Some(tx)) => Ok((tx.clone(), e.permits.clone())),
            (ModelState::Failed, _) => Err(Error::Unavailable(format!(
                "model {id:?} failed: {}",
                e.info.error.as_deref().unwrap_or("unknown error")
            ))),
            _ => Err(Error::Unavailable(format!("model {id:?} is still loading"))),
        }
    }

    /// Queues a command for a model without waiting: a model with `limits.queue_depth` requests
    /// in flight is RESOURCE_EXHAUSTED. The caller keeps the permit until it has the answer.
    fn send(&self, id: &str, cmd: Command) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let (tx, permits) = self.sender(id)?;
        let depth = self.inner.settings.limits.queue_depth;
        let permit = permits.try_acquire_owned().map_err(|_| Error::ResourceExhausted(format!("model {id:?} has {depth} requests in flight; retry later")))?;
        tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::ResourceExhausted(format!("model {id:?} has its queue full of requests whose callers went away; retry later"))
            }
            mpsc::error::TrySendError::Closed(_) => Error::Unavailable(format!("model {id:?} is shutting down")),
        })?;
        Ok(permit)
    }

    pub async fn embed(&self, id: &str, image: Vec<u8>, format: EmbeddingFormat) -> Result<EmbedOutput> {
        // Through an alias, the model Segment would pick for the same image: the handle then
        // keeps later Segment calls on it.
        let id = &self.route_key(id, &image);
        let (reply, rx) = oneshot::channel();
        let _permit = self.send(id, Command::Embed { image, format, enqueued: Instant::now(), reply: Reply::new(reply) })?;
        rx.await.map_err(|_| stopped(id))?
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn segment(
        &self,
        id: &str,
        source: Source,
        prompts: Vec<Prompt>,
        multimask: bool,
        low_res: bool,
        encoding: MaskEncoding,
    ) -> Result<SegmentOutput> {
        let max = self.inner.settings.limits.max_prompts;
        if prompts.len() > max {
            return Err(crate::error::invalid("prompts", format!("{} prompts in one request, the limit is {max}", prompts.len())));
        }
        if prompts.is_empty() {
            return Err(crate::error::invalid("prompts", "no prompt given (send an empty Prompt for the no-prompt case)"));
        }
        let max = self.inner.settings.limits.max_points;
        if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.points.len() > max) {
            return Err(crate::error::invalid(format!("prompts[{i}].points"), format!("{} points in one prompt, the limit is {max}", p.points.len())));
        }
        let id = &self.route(id, &source);
        let (reply, rx) = oneshot::channel();
        let _permit = self.send(id, Command::Segment { source, prompts, multimask, low_res, encoding, enqueued: Instant::now(), reply: Reply::new(reply) })?;
        rx.await.map_err(|_| stopped(id))?
    }
}

impl Registry {
    /// The model an id names: itself, or for an alias the route its weights pick for this image.
    /// The pick hashes the image (or the handle's key), so an image always goes to the same model;
    /// a handle made by one of the alias's models stays with that model.
    pub fn route(&self, id: &str, source: &Source) -> String {
        match source {
            Source::Handle(h) => {
                if let (Some(alias), Some((m, _))) = (self.alias(id), h.split_once('/')) {
                    if alias.routes.iter().any(|r| r.model == m) {
                        metrics::counter!(crate::metrics::ALIAS_ROUTED_TOTAL, "alias" => id.to_owned(), "model" => m.to_owned()).increment(1);
                        return m.to_owned();
                    }
                }
                self.route_key(id, h.as_bytes())
            }
            Source::Image(b) => self.route_key(id, b),
        }
    }

    fn alias(&self, id: &str) -> Option<&crate::settings::AliasSettings> {
        self.inner.settings.aliases.iter().find(|a| a.name == id)
    }

    /// [`Self::route`] by a key's hash, among the alias's models that serve now: an unloaded,
    /// loading or failed one would turn its share of images into errors on every retry (the pick
    /// is sticky). With none serving, among all, so that the error names one of them.
    fn route_key(&self, id: &str, key: &[u8]) -> String {
        let Some(alias) = self.alias(id) else { return id.to_owned() };
        let serving: Vec<crate::settings::AliasRoute> = alias.routes.iter().filter(|r| self.serving(&r.model)).cloned().collect();
        let routes = if serving.is_empty() { &alias.routes[..] } else { &serving[..] };
        let model = pick_route(routes, key).to_owned();
        metrics::counter!(crate::metrics::ALIAS_ROUTED_TOTAL, "alias" => id.to_owned(), "model" => model.clone()).increment(1);
        model
    }

    /// Whether `id` is a model that takes requests now.
    fn serving(&self, id: &str) -> bool {
        self.inner.models.get(id).is_some_and(|e| e.info.state == ModelState::Ready && e.tx.is_some())
    }
}

/// Most decoder threads a model may have: each is an OS thread with its own handles on the
/// decoder's weights.
pub const MAX_DECODERS: usize = 64;

/// The route whose share of the total weight holds hash(key): sticky and proportional.
/// The metrics' `model` label for an id that names no model or alias.
pub const UNKNOWN_MODEL_LABEL: &str = "unknown";

pub fn pick_route<'a>(routes: &'a [crate::settings::AliasRoute], key: &[u8]) -> &'a str {
    use sha2::{Digest, Sha256};
    let total: u64 = routes.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return routes.first().map(|r| r.model.as_str()).unwrap_or("");
    }
    let d = Sha256::digest(key);
    let mut x = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % total;
    for r in routes {
        if x < u64::from(r.weight) {
            return &r.model;
        }
        x -= u64::from(r.weight);
    }
    &routes[routes.len() - 1].model
}

/// A reply channel closed unanswered. Not expected: a dropped [`Reply`] answers INTERNAL.
fn stopped(id: &str) -> Error {
    Error::Unavailable(format!("model {id:?} stopped before answering"))
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no model {id:?} is loaded"))
}

pub fn state_label(s: ModelState) -> &'static str {
    match s {
        ModelState::Loading => "loading",
        ModelState::Ready => "ready",
        ModelState::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_dropped_unanswered_answers_internal() {
        let (tx, mut rx) = oneshot::channel::<Result<u8>>();
        drop(Reply::new(tx));
        assert!(matches!(rx.try_recv(), Ok(Err(Error::Internal(_)))));
        let (tx, mut rx) = oneshot::channel::<Result<u8>>();
        Reply::new(tx).send(Ok(7));
        assert!(matches!(rx.try_recv(), Ok(Ok(7))));
    }
}
