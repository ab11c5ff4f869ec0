//! TrainingService: fine-tuning runs (admin only), one per device at a time, each on its own OS
//! thread; the best checkpoint is registered as a model next to its base.

use super::evaluation::{allowed_dataset, mode_from_pb};
use super::pb::{self, training_service_server::TrainingService};
use super::{check_bearer, to_status, ResponseStream};
use crate::engine::Registry;
use crate::error::{invalid, Error, Result};
use crate::eval::prompts::SimParams;
use crate::settings::ModelSettings;
use crate::train::{self, BaseModel, EpochRecord, Job, LabelScores, LrSchedule, Recipe};
use dashmap::DashMap;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const EVENT_BUFFER: usize = 16;

#[derive(Clone)]
pub struct Training {
    pub registry: Registry,
    runs: Arc<DashMap<String, pb::RunStatus>>,
    /// Device label -> the run using it.
    busy: Arc<DashMap<String, String>>,
}

impl Training {
    pub fn new(registry: Registry) -> Self {
        Self { registry, runs: Arc::default(), busy: Arc::default() }
    }
}

pub fn recipe_from_pb(r: &pb::TrainRecipe) -> Result<Recipe> {
    let d = Recipe::default();
    let p = r.prompts.unwrap_or_default();
    let sp = SimParams::default();
    let lr = r.learning_rate.unwrap_or(d.learning_rate);
    let recipe = Recipe {
        val_fraction: r.val_fraction.unwrap_or(d.val_fraction),
        split_seed: r.split_seed,
        random_split: r.random_split,
        mode: mode_from_pb(p.mode).map_err(|_| invalid("recipe.prompts.mode", format!("unknown prompt mode {}", p.mode)))?,
        params: SimParams {
            margin: p.margin.unwrap_or(sp.margin),
            max_shift: p.max_shift.unwrap_or(sp.max_shift),
            max_scale: p.max_scale.unwrap_or(sp.max_scale),
            reference_width: p.reference_width,
        },
        prompt_seed: p.seed,
        train_mask_decoder: r.train_mask_decoder.unwrap_or(true),
        train_prompt_encoder: r.train_prompt_encoder,
        train_image_encoder: r.train_image_encoder,
        learning_rate: lr,
        image_encoder_learning_rate: r.image_encoder_learning_rate.unwrap_or(lr),
        batch_size: if r.batch_size == 0 { d.batch_size } else { r.batch_size as usize },
        epochs: if r.epochs == 0 { d.epochs } else { r.epochs as usize },
        patience: r.patience.map_or(d.patience, |v| v as usize),
        min_delta: r.min_delta.unwrap_or(d.min_delta),
        loss_full_size: r.loss_full_size,
        augment: r.augment,
        max_train_images: r.max_train_images as usize,
        max_val_images: r.max_val_images as usize,
        progress_every: r.progress_every as usize,
        prompt_mix: r
            .prompt_mix
            .iter()
            .map(|k| Ok((mode_from_pb(k.mode).map_err(|_| invalid("recipe.prompt_mix.mode", format!("unknown prompt mode {}", k.mode)))?, k.weight)))
            .collect::<Result<_>>()?,
        lr_schedule: lr_schedule_from_pb(r.lr_schedule)?,
        warmup_steps: r.warmup_steps as usize,
        weight_decay: r.weight_decay,
        multimask: r.multimask,
        class_balance: r.class_balance,
    };
    recipe.validate()?;
    Ok(recipe)
}

pub fn lr_schedule_to_pb(s: LrSchedule) -> pb::LrSchedule {
    match s {
        LrSchedule::Constant => pb::LrSchedule::Constant,
        LrSchedule::Cosine => pb::LrSchedule::Cosine,
    }
}

pub fn lr_schedule_from_pb(v: i32) -> Result<LrSchedule> {
    match pb::LrSchedule::try_from(v) {
        Ok(pb::LrSchedule::Unspecified | pb::LrSchedule::Constant) => Ok(LrSchedule::Constant),
        Ok(pb::LrSchedule::Cosine) => Ok(LrSchedule::Cosine),
        Err(_) => Err(invalid("recipe.lr_schedule", format!("unknown schedule {v}"))),
    }
}

fn scores(s: &LabelScores) -> pb::LabelScores {
    pb::LabelScores { dice: s.dice, iou: s.iou, accuracy: s.accuracy, n: s.n as u32 }
}

pub fn epoch_to_pb(e: &EpochRecord) -> pb::EpochResult {
    pb::EpochResult {
        epoch: e.epoch as u32,
        train_loss: e.train_loss,
        train_dice_loss: e.train_dice_loss,
        train_bce_loss: e.train_bce_loss,
        train_multimask_loss: e.train_multimask_loss,
        train_iou_loss: e.train_iou_loss,
        val: Some(scores(&e.val)),
        val_by_label: e.val_by_label.iter().map(|(k, v)| (k.clone(), scores(v))).collect(),
        val_multimask: e.val_multimask.as_ref().map(scores),
        seconds: e.seconds,
        learning_rate: e.learning_rate,
        best: e.best,
    }
}

fn valid_run_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The device string a model reports ("cpu", "cuda(0)") as settings write it ("cpu", "cuda:0").
fn device_setting(reported: &str) -> String {
    crate::device::cuda_index(reported).map_or_else(|| reported.to_owned(), |i| format!("cuda:{i}"))
}

/// The status of a run from its sidecar on disk (runs of earlier server processes).
fn status_from_disk(dir: &Path) -> Option<pb::RunStatus> {
    let s = train::read_sidecar(dir, train::LAST).ok()?;
    Some(pb::RunStatus {
        run_id: s.run_id,
        base_model_id: s.base.id,
        state: "stopped".into(),
        dir: dir.display().to_string(),
        train_images: s.split.train.len() as u32,
        val_images: s.split.val.len() as u32,
        epochs_done: s.epoch as u32,
        best_epoch: s.best_epoch as u32,
        best_val_dice: s.best_val_dice,
        device: String::new(),
        error: String::new(),
    })
}

/// A run id taken in the run table while a Train request is being checked and started. Dropped
/// without [`Self::keep`] (the request was refused), it puts back what the table held before.
struct RunReservation<'a> {
    runs: &'a DashMap<String, pb::RunStatus>,
    run_id: String,
    previous: Option<pb::RunStatus>,
    kept: bool,
}

impl<'a> RunReservation<'a> {
    fn take(runs: &'a DashMap<String, pb::RunStatus>, run_id: &str) -> Result<Self> {
        let starting = pb::RunStatus { run_id: run_id.to_owned(), state: "starting".into(), ..Default::default() };
        let previous = match runs.entry(run_id.to_owned()) {
            dashmap::mapref::entry::Entry::Occupied(mut e) => {
                if matches!(e.get().state.as_str(), "running" | "starting") {
                    return Err(Error::FailedPrecondition(format!(
                        "run {run_id:?} is {} on {}: wait for it, cancel it, or choose another run_id",
                        e.get().state,
                        if e.get().device.is_empty() { "this server" } else { e.get().device.as_str() }
                    )));
                }
                Some(e.insert(starting))
            }
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(starting);
                None
            }
        };
        Ok(Self { runs, run_id: run_id.to_owned(), previous, kept: false })
    }

    /// The run started: `status` replaces the reservation.
    fn keep(mut self, status: pb::RunStatus) {
        self.runs.insert(self.run_id.clone(), status);
        self.kept = true;
    }
}

impl Drop for RunReservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            match self.previous.take() {
                Some(p) => {
                    self.runs.insert(self.run_id.clone(), p);
                }
                None => {
                    self.runs.remove(&self.run_id);
                }
            }
        }
    }
}

impl Training {
    fn start(&self, r: pb::TrainRequest) -> Result<ResponseStream<pb::TrainEvent>> {
        let recipe = recipe_from_pb(&r.recipe.unwrap_or_default())?;
        if r.base_model_id.is_empty() {
            return Err(invalid("base_model_id", "is empty"));
        }
        let info = self.registry.get(&r.base_model_id)?;
        if info.state != crate::engine::ModelState::Ready {
            return Err(Error::Unavailable(format!("model {:?} is not ready ({:?})", info.id, info.state)));
        }
        let (Some(checkpoint), Some(sha256)) = (info.checkpoint.clone(), info.checkpoint_sha256.clone()) else {
            return Err(Error::FailedPrecondition(format!("model {:?} has random weights (no checkpoint) to start from", info.id)));
        };
        let settings = self.registry.settings();
        if settings.train.output_dir.as_os_str().is_empty() {
            // The Helm chart's "empty: off": nowhere to write checkpoints.
            return Err(Error::FailedPrecondition("training is off on this server: set train.output_dir".into()));
        }
        let dataset = allowed_dataset(&settings.eval.dataset_roots, &r.dataset)?;
        let run_id = if r.run_id.is_empty() {
            // Milliseconds: two runs started in the same second on two devices get two ids.
            format!("run-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0))
        } else if valid_run_id(&r.run_id) {
            r.run_id.clone()
        } else {
            return Err(invalid("run_id", format!("{:?}: use 1-64 letters, digits, '-' or '_'", r.run_id)));
        };
        // Held from here until the run's thread owns the id: a second request for the same run
        // (a resume, or a new run in the folder not created yet) cannot start beside it.
        let reservation = RunReservation::take(&self.runs, &run_id)?;
        let dir = settings.train.output_dir.join(&run_id);
        // The sidecar is a run's commit point (written after its checkpoint files): without it the
        // run ended before its first epoch was saved, and a new run may take the folder over.
        let has_last = train::sidecar_path(&dir, train::LAST).exists();
        if r.resume && !has_last {
            return Err(Error::NotFound(format!("run {run_id:?} has no checkpoint to resume from in {}", dir.display())));
        }
        if !r.resume && has_last {
            return Err(Error::FailedPrecondition(format!("run {run_id:?} already exists in {}: resume it or choose another run_id", dir.display())));
        }
        // The dataset and the split, checked before the stream starts; the run uses this listing.
        let ds = crate::eval::dataset::Dataset::open(&dataset)?;
        if !r.resume {
            let split = crate::train::data::split(&ds, &recipe);
            if split.train.is_empty() || split.val.is_empty() {
                return Err(invalid(
                    "dataset",
                    format!("{} images split into {} for training and {} for validation: need at least one of each", ds.items.len(), split.train.len(), split.val.len()),
                ));
            }
        }
        let device_label = info.device.clone();
        let device = crate::device::parse_device(&device_setting(&device_label))?;
        // One run per device: the reservation is taken here and released by the run's thread.
        match self.busy.entry(device_label.clone()) {
            dashmap::mapref::entry::Entry::Occupied(e) => {
                return Err(Error::FailedPrecondition(format!("training run {:?} is already using {device_label}", e.get())));
            }
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(run_id.clone());
            }
        }
        let job = Job {
            run_id: run_id.clone(),
            base: BaseModel { id: info.id.clone(), variant: info.variant, checkpoint, sha256 },
            dataset,
            listing: ds,
            recipe,
            dir: dir.clone(),
            device,
            resume: r.resume,
            embedding_store: settings.eval.embedding_store.clone(),
        };
        let status = pb::RunStatus {
            run_id: run_id.clone(),
            base_model_id: info.id.clone(),
            state: "running".into(),
            dir: dir.display().to_string(),
            device: device_label.clone(),
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let this = self.clone();
        let precision = info.precision;
        let label = device_label.clone();
        // The run's status is in the table before its thread updates it.
        reservation.keep(status);
        let spawned = std::thread::Builder::new().name(format!("train-{run_id}")).spawn(move || {
            this.run_thread(job, tx, label, precision);
        });
        if let Err(e) = spawned {
            self.busy.remove(&device_label);
            if let Some(mut st) = self.runs.get_mut(&run_id) {
                st.state = "failed".into();
                st.error = "the training thread could not be started".into();
            }
            return Err(Error::Internal(format!("spawning the training thread: {e}")));
        }
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    fn run_thread(&self, job: Job, tx: mpsc::Sender<Result<pb::TrainEvent, Status>>, device_label: String, precision: crate::model::Precision) {
        use pb::train_event::Event as E;
        let run_id = job.run_id.clone();
        let send = |e: E| tx.blocking_send(Ok(pb::TrainEvent { event: Some(e) })).is_ok();
        let runs = self.runs.clone();
        let emit = |ev: train::Event| -> bool {
            match ev {
                train::Event::Started(s) => {
                    let mut st = runs.get(&run_id).map(|r| r.clone()).unwrap_or_default();
                    st.train_images = s.train_images as u32;
                    st.val_images = s.val_images as u32;
                    st.epochs_done = s.resumed_from_epoch as u32;
                    runs.insert(run_id.clone(), st.clone());
                    for (id, why) in &s.skipped {
                        tracing::warn!(run = %run_id, image = %id, reason = %why, "training image skipped");
                    }
                    send(E::Started(st))
                }
                train::Event::Progress { epoch, step, steps, loss } => {
                    send(E::Progress(pb::StepProgress { epoch: epoch as u32, step: step as u32, steps: steps as u32, loss }))
                }
                train::Event::Epoch(rec) => {
                    if let Some(mut st) = runs.get_mut(&run_id) {
                        st.epochs_done = rec.epoch as u32;
                        if rec.best {
                            st.best_epoch = rec.epoch as u32;
                            st.best_val_dice = rec.val.dice;
                        }
                    }
                    tracing::info!(run = %run_id, epoch = rec.epoch, val_dice = rec.val.dice, loss = rec.train_loss, "epoch done");
                    send(E::Epoch(epoch_to_pb(&rec)))
                }
            }
        };
        // A panic in the run (a libtorch error that tch unwraps) fails the run, not the server:
        // the device is released and the client gets a status instead of a stream that just ends.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            if crate::test_support::take_injected_panic(&tests::PANICS_TO_INJECT) {
                panic!("injected by a test");
            }
            // The client going away or the server's shutdown signal ends the run at its next step.
            train::run(&job, emit, || tx.is_closed() || self.registry.shutting_down())
        }))
            .unwrap_or_else(|_| Err(Error::Internal(format!("training run {run_id:?} panicked (see the server log)"))));
        // The rest (registering the fine-tuned model, the final status) must not leave the run
        // "running" either: that would block resuming it until the server restarts.
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.finish_run(&job, result, &tx, &device_label, precision)));
        if ended.is_err() {
            if let Some(mut st) = self.runs.get_mut(&run_id) {
                st.state = "failed".into();
                st.error = "internal error after the run (see the server log)".into();
            }
            let _ = tx.blocking_send(Err(Status::internal("internal error (details in the server log)")));
        }
        self.busy.remove(&device_label);
    }

    /// The end of a run: the best checkpoint registered as a model, the status, the last event.
    fn finish_run(
        &self,
        job: &Job,
        result: Result<train::Finished>,
        tx: &mpsc::Sender<Result<pb::TrainEvent, Status>>,
        device_label: &str,
        precision: crate::model::Precision,
    ) {
        use pb::train_event::Event as E;
        match result {
            Ok(mut fin) => {
                let mut model_id = String::new();
                let mut message = String::new();
                let shutdown = fin.stopped == "cancelled" && self.registry.shutting_down();
                if shutdown {
                    // Not registered: the server is going away. The saved epochs stay, to resume.
                    fin.stopped = "shutdown".into();
                    message = "the server is shutting down: resume the run (resume = true) to continue from its last saved epoch".into();
                } else if fin.best_epoch > 0 && fin.best_checkpoint.exists() {
                    let id = format!("{}-ft-{}", job.base.id, job.run_id);
                    // A resumed run replaces the model its earlier part registered.
                    let _ = self.registry.unload(&id);
                    let ms = ModelSettings {
                        id: id.clone(),
                        variant: job.base.variant,
                        checkpoint: Some(fin.best_checkpoint.clone()),
                        device: Some(device_setting(&device_label)),
                        precision,
                        decoders: None,
                    };
                    match self.registry.load(ms) {
                        Ok(_) => model_id = id,
                        Err(e) => message = format!("the best checkpoint was not registered: {e}"),
                    }
                } else if fin.best_epoch == 0 {
                    message = "no epoch improved on the base model; nothing registered".into();
                }
                if let Some(mut st) = self.runs.get_mut(&job.run_id) {
                    st.state = if fin.stopped == "cancelled" { "cancelled".into() } else { "finished".into() };
                }
                tracing::info!(run = %job.run_id, best_epoch = fin.best_epoch, best = fin.best_val_dice, stopped = %fin.stopped, model = %model_id, "training finished");
                let _ = tx.blocking_send(Ok(pb::TrainEvent {
                    event: Some(E::Finished(pb::TrainFinished {
                        run_id: job.run_id.clone(),
                        best_epoch: fin.best_epoch as u32,
                        best_val_dice: fin.best_val_dice,
                        best_checkpoint: fin.best_checkpoint.display().to_string(),
                        last_checkpoint: fin.last_checkpoint.display().to_string(),
                        model_id,
                        stopped: fin.stopped,
                        message,
                    })),
                }));
            }
            Err(e) => {
                tracing::error!(run = %job.run_id, error = %e, "training failed");
                if let Some(mut st) = self.runs.get_mut(&job.run_id) {
                    st.state = "failed".into();
                    st.error = e.to_string();
                }
                let _ = tx.blocking_send(Err(to_status(e)));
            }
        }
    }
}

#[tonic::async_trait]
impl TrainingService for Training {
    type TrainStream = ResponseStream<pb::TrainEvent>;

    async fn train(&self, req: Request<pb::TrainRequest>) -> Result<Response<Self::TrainStream>, Status> {
        check_bearer(&req, self.registry.settings().auth.admin_token.as_deref())?;
        let this = self.clone();
        let r = req.into_inner();
        // Validation reads the dataset folder: off the async threads.
        let stream = tokio::task::spawn_blocking(move || this.start(r)).await.map_err(|e| Status::internal(e.to_string()))?.map_err(to_status)?;
        Ok(Response::new(stream))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::RunStatus>, Status> {
        check_bearer(&req, self.registry.settings().auth.admin_token.as_deref())?;
        let id = req.into_inner().run_id;
        if !valid_run_id(&id) {
            return Err(to_status(invalid("run_id", format!("{id:?} is not a run id"))));
        }
        if let Some(s) = self.runs.get(&id) {
            return Ok(Response::new(s.clone()));
        }
        status_from_disk(&self.registry.settings().train.output_dir.join(&id))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no run {id:?}")))
    }

    async fn list_runs(&self, req: Request<pb::ListRunsRequest>) -> Result<Response<pb::ListRunsResponse>, Status> {
        check_bearer(&req, self.registry.settings().auth.admin_token.as_deref())?;
        let mut runs: Vec<pb::RunStatus> = self.runs.iter().map(|r| r.value().clone()).collect();
        if let Ok(rd) = std::fs::read_dir(&self.registry.settings().train.output_dir) {
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if !self.runs.contains_key(&name) {
                    runs.extend(status_from_disk(&e.path()));
                }
            }
        }
        runs.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio_stream::StreamExt;

    /// Runs that panic as they start (the only test here that sets it).
    pub(super) static PANICS_TO_INJECT: AtomicU32 = AtomicU32::new(0);

    #[tokio::test(flavor = "multi_thread")]
    async fn a_panicking_run_ends_with_internal_frees_its_device_and_shows_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let fixtures = Path::new("tests/fixtures").canonicalize().unwrap();
        let mut settings = Settings::load(None).unwrap();
        settings.eval.dataset_roots = vec![fixtures.clone()];
        settings.train.output_dir = tmp.path().join("runs");
        let registry = crate::test_support::registry_with_tiny_model(settings, "t").await;
        let training = Training::new(registry);
        let req = pb::TrainRequest {
            base_model_id: "t".into(),
            dataset: fixtures.join("ham_train").display().to_string(),
            run_id: "p".into(),
            recipe: Some(pb::TrainRecipe { epochs: 1, batch_size: 8, ..Default::default() }),
            ..Default::default()
        };
        PANICS_TO_INJECT.store(1, Ordering::SeqCst);
        let mut events = training.start(req).unwrap();
        let mut status = None;
        while let Some(ev) = events.next().await {
            if let Err(s) = ev {
                status = Some(s);
                break;
            }
        }
        assert_eq!(status.expect("an error status, not a stream that just ends").code(), tonic::Code::Internal);
        for _ in 0..100 {
            if training.busy.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(training.busy.is_empty(), "the device is free again");
        assert_eq!(training.runs.get("p").unwrap().state, "failed");
    }
}
