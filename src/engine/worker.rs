//! The thread that owns one model: loads it, warms it up, then serves its queue.

use super::cache::{EmbeddingCache, Lookup};
use super::store::image_key;
use super::{Command, EmbedOutput, Reply, EmbeddingFormat, MaskEncoding, MaskOutput, ModelInfo, ModelState, Registry, SegmentOutput, Source};
use crate::error::{Error, Result};
use crate::image_io::decode_rgb;
use crate::masks::{to_png, to_rle};
use crate::metrics as m;
use crate::model::{DecoderParts, Sam, SamDecoder};
use crate::predictor::{ImageEmbedding, Masks, Predictor, Prompt};
use crate::settings::ModelSettings;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tch::{Device, Kind};
use tokio::sync::mpsc;

struct Worker {
    id: String,
    predictor: Predictor,
    cache: EmbeddingCache,
    max_pixels: u64,
    /// Prompts x image pixels in one Segment request: the full-size masks are held at once.
    max_mask_pixels: u64,
    max_batch: usize,
    store: Option<super::store::EmbeddingStore>,
    /// Decoder threads, when the model has any; else this thread decodes.
    decoders: Option<DecodePool>,
}

pub(super) fn run(registry: Registry, ms: ModelSettings, device: Device, generation: u64, tx: mpsc::Sender<Command>, mut rx: mpsc::Receiver<Command>) {
    let id = ms.id.clone();
    // Resolved by Registry::load.
    let decoders = ms.decoders.unwrap_or(0);
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tch::no_grad(|| {
            let (predictor, info, warm) = load(&ms, device)?;
            let pool = if decoders > 0 { Some(DecodePool::start(&registry, generation, &ms.id, &predictor.sam, decoders, &warm)?) } else { None };
            Ok((predictor, info, pool))
        })
    }))
    .unwrap_or_else(|_| Err(Error::Internal("loading the model panicked (see the server log)".into())));
    let (worker, info) = match loaded {
        Ok((predictor, info, pool)) => {
            let s = registry.settings();
            let w = Worker {
                decoders: pool,
                id: id.clone(),
                predictor,
                cache: EmbeddingCache::new(s.cache.max_bytes),
                max_pixels: s.limits.max_image_pixels,
                max_mask_pixels: s.limits.max_mask_pixels,
                max_batch: s.limits.max_embed_batch.max(1),
                store: super::store::EmbeddingStore::new(
                    s.eval.embedding_store.as_deref(),
                    info.checkpoint_sha256.as_deref(),
                    info.precision,
                    device,
                ),
            };
            (w, info)
        }
        Err(e) => {
            tracing::error!(model = %id, error = %e, "model failed to load");
            // Shown to clients (GetModel, UNAVAILABLE): a checkpoint problem as it is, a libtorch
            // failure without its details.
            let shown = match &e {
                Error::Torch(_) | Error::Internal(_) => "internal error while loading (details in the server log)".to_owned(),
                other => other.to_string(),
            };
            registry.finish_load(&id, generation, Err(shown));
            return;
        }
    };
    tracing::info!(model = %id, variant = %info.variant, device = %info.device, sha256 = ?info.checkpoint_sha256, "model ready");
    if !registry.finish_load(&id, generation, Ok((info, tx))) {
        return; // unloaded while loading
    }
    worker.serve(&mut rx, &registry, generation);
    // Its cache is gone with it; a model loaded under the same id since keeps its own figure.
    if registry.generation_of(&id).is_none_or(|g| g == generation) {
        metrics::gauge!(m::CACHE_BYTES, "model" => id.clone()).set(0.0);
    }
    tracing::info!(model = %id, "model unloaded");
}

/// The model, what the admin API shows of it, and the embedding its warm-up made.
fn load(ms: &ModelSettings, device: Device) -> Result<(Predictor, ModelInfo, ImageEmbedding)> {
    let (mut sam, ckpt) = match &ms.checkpoint {
        Some(path) => {
            let (sam, c) = Sam::load(ms.variant, path, device)?;
            (sam, Some(c))
        }
        None => (Sam::new(ms.variant, device), None),
    };
    sam.set_precision(ms.precision);
    let info = ModelInfo {
        id: ms.id.clone(),
        variant: ms.variant,
        checkpoint: ms.checkpoint.clone(),
        checkpoint_sha256: ckpt.map(|c| c.sha256),
        device: format!("{device:?}").to_lowercase(),
        precision: ms.precision,
        state: ModelState::Ready,
        error: None,
        num_parameters: sam.num_parameters(),
        image_size: sam.config.img_size,
        decoders: ms.decoders.unwrap_or(0),
    };
    let predictor = Predictor::new(sam);
    // Warm-up: the first pass allocates and picks kernels; keep that out of the first request.
    let img = image::RgbImage::from_pixel(64, 48, image::Rgb([128, 100, 90]));
    let emb = predictor.set_image(&img)?;
    predictor.predict(&emb, &[Prompt { bbox: Some([8.0, 8.0, 40.0, 30.0]), ..Default::default() }], true)?;
    Ok((predictor, info, emb))
}

/// Failed requests in a row after which a model is marked failed instead of going on.
const MAX_PANICS_IN_A_ROW: u32 = 3;

fn stage(model: &str, stage: &'static str, d: Duration) {
    metrics::histogram!(m::STAGE_SECONDS, "model" => model.to_owned(), "stage" => stage).record(d.as_secs_f64());
}

impl Worker {
    fn serve(mut self, rx: &mut mpsc::Receiver<Command>, registry: &Registry, generation: u64) {
        let mut pending: std::collections::VecDeque<Command> = Default::default();
        let mut panics_in_a_row = 0;
        loop {
            let cmd = match pending.pop_front() {
                Some(c) => c,
                None => match rx.blocking_recv() {
                    Some(c) => c,
                    None => return,
                },
            };
            // Decoder threads failing every request in a row fail the model too; this command
            // then never runs.
            let decoders_failing = self.decoders.as_ref().map_or(0, |p| p.load.panics_in_a_row.load(Ordering::SeqCst));
            if decoders_failing >= MAX_PANICS_IN_A_ROW {
                pending.push_front(cmd);
                panics_in_a_row = decoders_failing;
            } else {
                // A panic (a libtorch error that tch unwraps, say) fails the request it happened
                // in, not the model: the unwinding drops the command's Reply, which answers INTERNAL.
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(cmd, rx, &mut pending)));
                if let Err(panic) = served {
                    let what = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic without a message");
                    tracing::error!(model = %self.id, error = %what, "the model thread failed on a request");
                    panics_in_a_row += 1;
                } else {
                    panics_in_a_row = 0;
                }
            }
            if panics_in_a_row >= MAX_PANICS_IN_A_ROW {
                // Every request failing (a lost GPU, say): stop claiming to be ready. The
                // commands still queued never ran: UNAVAILABLE, which clients retry elsewhere.
                tracing::error!(model = %self.id, "{panics_in_a_row} requests in a row failed: marking the model failed");
                registry.fail(&self.id, generation, format!("{panics_in_a_row} requests in a row failed (see the server log); unload and load it again"));
                rx.close();
                let unavailable = || Error::Unavailable(format!("model {:?} failed before serving this request", self.id));
                for cmd in pending.drain(..) {
                    cmd.refuse(unavailable());
                }
                while let Ok(cmd) = rx.try_recv() {
                    cmd.refuse(unavailable());
                }
                return;
            }
            // A thread draining after an unload leaves the series to the model loaded after it.
            if registry.generation_of(&self.id) == Some(generation) {
                metrics::gauge!(m::CACHE_BYTES, "model" => self.id.clone()).set(self.cache.bytes() as f64);
            }
        }
    }

    fn handle(&mut self, cmd: Command, rx: &mut mpsc::Receiver<Command>, pending: &mut std::collections::VecDeque<Command>) {
        #[cfg(test)]
        if tests::PANICS_TO_INJECT.take(&self.id) {
            panic!("injected by a test");
        }
        #[cfg(test)]
        while tests::PAUSED.lock().unwrap().contains(&self.id) {
            std::thread::sleep(Duration::from_millis(2));
        }
        match cmd {
            Command::Embed { image, format, enqueued, reply } => {
                // Micro-batching: encode the embed requests already waiting together.
                let mut batch = vec![(image, format, enqueued, reply)];
                while batch.len() < self.max_batch {
                    match rx.try_recv() {
                        Ok(Command::Embed { image, format, enqueued, reply }) => batch.push((image, format, enqueued, reply)),
                        Ok(other) => {
                            pending.push_back(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                tch::no_grad(|| self.embed_batch(batch));
            }
            Command::Segment { source, prompts, multimask, low_res, encoding, enqueued, reply } => {
                if reply.is_closed() {
                    return; // the client went away
                }
                let queue = enqueued.elapsed();
                metrics::histogram!(m::QUEUE_SECONDS, "model" => self.id.clone()).record(queue.as_secs_f64());
                let t = Instant::now();
                let found = tch::no_grad(|| self.embedding_for(source, &prompts));
                match (found, &self.decoders) {
                    (Err(e), _) => reply.send(Err(e)),
                    (Ok((handle, emb)), Some(pool)) => {
                        let (resolve, handed_over) = (t.elapsed(), Instant::now());
                        pool.send(DecodeJob { handle, emb, prompts, multimask, low_res, encoding, queue, resolve, handed_over, reply });
                    }
                    (Ok((handle, emb)), None) => {
                        let r = tch::no_grad(|| decode(&self.id, self.predictor.sam.parts(), handle, &emb, &prompts, multimask, low_res, encoding));
                        reply.send(r.map(|mut o| {
                            o.queue = queue;
                            o.compute = t.elapsed();
                            o
                        }));
                    }
                }
            }
        }
    }

    /// Embeds (or finds cached) images; cache misses are encoded in one batch.
    fn embed_batch(&mut self, batch: Vec<(Vec<u8>, EmbeddingFormat, Instant, Reply<EmbedOutput>)>) {
        let mut todo = Vec::new();
        for (bytes, format, enqueued, reply) in batch {
            if reply.is_closed() {
                continue;
            }
            let queue = enqueued.elapsed();
            metrics::histogram!(m::QUEUE_SECONDS, "model" => self.id.clone()).record(queue.as_secs_f64());
            let key = image_key(&bytes);
            if let Some(emb) = self.cached(&key) {
                let out = self.output(&key, emb, true, format, queue, Instant::now());
                reply.send(out);
                continue;
            }
            let t = Instant::now();
            match decode_rgb(&bytes, "image", self.max_pixels).and_then(|img| self.predictor.check_image(&img).map(|()| img)) {
                Ok(img) => {
                    stage(&self.id, "decode", t.elapsed());
                    todo.push((key, img, format, queue, reply, t));
                }
                Err(e) => {
                    reply.send(Err(e));
                }
            }
        }
        if todo.is_empty() {
            return;
        }
        let t = Instant::now();
        let images: Vec<&image::RgbImage> = todo.iter().map(|x| &x.1).collect();
        let embs = self.predictor.set_images(&images);
        stage(&self.id, "encode", t.elapsed());
        match embs {
            Ok(embs) => {
                for ((key, _, format, queue, reply, t0), emb) in todo.into_iter().zip(embs) {
                    // A batched embedding is a view into the batch: copy so the cache holds only its own.
                    let emb = emb.copy();
                    if let Some(store) = &self.store {
                        store.put(&key, &emb);
                    }
                    self.cache.insert(key.clone(), emb.shallow_clone());
                    reply.send(self.output(&key, emb, false, format, queue, t0));
                }
            }
            Err(e) => {
                tracing::error!(model = %self.id, error = %e, "encoding failed");
                for (_, _, _, _, reply, _) in todo {
                    reply.send(Err(Error::Internal("image encoding failed".into())));
                }
            }
        }
    }

    /// The cached embedding of an image key (memory, then the disk store), counted as a cache
    /// hit, a disk hit or a miss.
    fn cached(&mut self, key: &str) -> Option<ImageEmbedding> {
        let mut hit = match self.cache.get(key) {
            Lookup::Hit(e) => Some(e.shallow_clone()),
            _ => None,
        };
        let mut result = if hit.is_some() { "hit" } else { "miss" };
        if hit.is_none() {
            if let Some(mut e) = self.store.as_ref().and_then(|s| s.get(key)) {
                // The store keeps only the embedding; the decoder prefix is cheap to redo.
                e.prefix = Some(tch::no_grad(|| self.predictor.sam.decoder_prefix(&e.features)));
                self.cache.insert(key.to_owned(), e.shallow_clone());
                hit = Some(e);
                result = "disk";
            }
        }
        metrics::counter!(m::CACHE_LOOKUPS_TOTAL, "model" => self.id.clone(), "result" => result).increment(1);
        hit
    }

    /// Decodes and encodes one image, and caches its embedding.
    fn encode_one(&mut self, key: String, bytes: &[u8]) -> Result<ImageEmbedding> {
        let t = Instant::now();
        let img = decode_rgb(bytes, "image", self.max_pixels)?;
        stage(&self.id, "decode", t.elapsed());
        let t = Instant::now();
        let e = self.predictor.set_image(&img)?;
        stage(&self.id, "encode", t.elapsed());
        if let Some(store) = &self.store {
            store.put(&key, &e);
        }
        self.cache.insert(key, e.shallow_clone());
        Ok(e)
    }

    fn output(&self, key: &str, emb: ImageEmbedding, hit: bool, format: EmbeddingFormat, queue: Duration, t: Instant) -> Result<EmbedOutput> {
        let embedding = match format {
            EmbeddingFormat::None => None,
            EmbeddingFormat::Fp32 | EmbeddingFormat::Fp16 => {
                let kind = if format == EmbeddingFormat::Fp32 { Kind::Float } else { Kind::Half };
                let t = emb.features.to_device(Device::Cpu).to_kind(kind).contiguous();
                let mut bytes = vec![0u8; t.numel() * kind.elt_size_in_bytes()];
                t.copy_data_u8(&mut bytes, t.numel());
                Some((t.size(), bytes))
            }
        };
        Ok(EmbedOutput {
            handle: format!("{}/{key}", self.id),
            cache_hit: hit,
            original_size: emb.original_size,
            embedding,
            queue,
            compute: t.elapsed(),
        })
    }

    fn lookup(&mut self, handle: &str) -> Result<ImageEmbedding> {
        let key = match handle.split_once('/') {
            Some((model, key)) if model == self.id => key,
            Some((model, _)) => {
                return Err(Error::NotFound(format!("embedding handle {handle:?} belongs to model {model:?}, not {:?}", self.id)))
            }
            None => return Err(crate::error::invalid("embedding_handle", format!("{handle:?} is not a handle from Embed"))),
        };
        match self.cache.get(key) {
            Lookup::Hit(e) => {
                metrics::counter!(m::CACHE_LOOKUPS_TOTAL, "model" => self.id.clone(), "result" => "hit").increment(1);
                Ok(e.shallow_clone())
            }
            Lookup::Evicted => {
                metrics::counter!(m::CACHE_LOOKUPS_TOTAL, "model" => self.id.clone(), "result" => "evicted").increment(1);
                Err(Error::NotFound(format!("embedding {handle:?} was evicted from the cache: embed the image again")))
            }
            Lookup::Unknown => Err(Error::NotFound(format!("no embedding {handle:?} on this server"))),
        }
    }

    /// The embedding a Segment request names (found, or encoded from its image) and its handle,
    /// once its prompts' masks are known to fit the limit.
    fn embedding_for(&mut self, source: Source, prompts: &[Prompt]) -> Result<(String, ImageEmbedding)> {
        let (handle, emb) = match source {
            Source::Handle(h) => {
                let e = self.lookup(&h)?;
                (h, e)
            }
            Source::Image(bytes) => {
                let key = image_key(&bytes);
                let handle = format!("{}/{key}", self.id);
                let e = match self.cached(&key) {
                    Some(e) => e,
                    None => self.encode_one(key, &bytes)?,
                };
                (handle, e)
            }
        };
        let (h, w) = emb.original_size;
        let mask_pixels = (prompts.len() as u64).saturating_mul(h as u64).saturating_mul(w as u64);
        if mask_pixels > self.max_mask_pixels {
            return Err(crate::error::invalid(
                "prompts",
                format!(
                    "{} prompts on a {w}x{h} image make {mask_pixels} mask pixels, over limits.max_mask_pixels ({}): send fewer prompts per request",
                    prompts.len(),
                    self.max_mask_pixels
                ),
            ));
        }
        Ok((handle, emb))
    }
}

/// Decodes a Segment request's prompts and encodes the chosen masks as asked.
#[allow(clippy::too_many_arguments)]
fn decode(id: &str, dec: DecoderParts, handle: String, emb: &ImageEmbedding, prompts: &[Prompt], multimask: bool, low_res: bool, encoding: MaskEncoding) -> Result<SegmentOutput> {
    let (h, w) = emb.original_size;
    let t = Instant::now();
    let preds = dec.predict_masks(emb, prompts, multimask, Masks::Best)?;
    stage(id, "prompt_decode", t.elapsed());
    metrics::counter!(m::PROMPTS_TOTAL, "model" => id.to_owned()).increment(prompts.len() as u64);
    let t = Instant::now();
    let mut masks = Vec::with_capacity(preds.len());
    for p in preds {
        let best = p.best as i64;
        let mask = Vec::<u8>::try_from(p.best_mask().to_kind(Kind::Uint8).flatten(0, -1))?;
        let low = if low_res { Some(Vec::<f32>::try_from(p.low_res_logits.get(best).flatten(0, -1))?) } else { None };
        let t_enc = Instant::now();
        // Encoded here, on the thread that decoded: handing masks to another thread for this
        // cost more latency than the encoding itself.
        let png = if encoding.png { Some(to_png(&mask, h as u32, w as u32)?) } else { None };
        let rle = encoding.rle.then(|| to_rle(&mask, h as usize, w as usize));
        stage(id, "encode_mask", t_enc.elapsed());
        let area = mask.iter().map(|&v| i64::from(v)).sum();
        masks.push(MaskOutput { png, rle, area, scores: p.iou_predictions, best: p.best, low_res_logits: low, clipped: p.clipped });
    }
    stage(id, "postprocess", t.elapsed());
    Ok(SegmentOutput { handle, height: h, width: w, masks, queue: Duration::ZERO, compute: Duration::ZERO })
}

/// A model's decoder threads ([`ModelSettings::decoders`]): Segment requests whose embedding the
/// model thread has found (or made) are decoded there, side by side, each on its share of the
/// intra-op threads, while the model thread goes on to the next request. On a CPU a prompt's
/// decode is many small operations that spread poorly over cores, and its post-processing and
/// PNG run on one: prompts decoded side by side serve more per second than one at a time on all
/// cores (BENCHMARKS.md, Serving, "decoder threads").
struct DecodePool {
    tx: Option<std::sync::mpsc::SyncSender<DecodeJob>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    load: std::sync::Arc<PoolLoad>,
}

/// Jobs handed over and not yet finished: a job alone in the pool decodes on all the process's
/// intra-op threads, as the model thread would (one core is slower for a lone request), and
/// jobs side by side on an equal share of them (one each with as many decoders as threads).
/// Also counts the decoder threads' failed jobs in a row ([`MAX_PANICS_IN_A_ROW`] fail the model).
#[derive(Default)]
struct PoolLoad {
    unfinished: std::sync::atomic::AtomicUsize,
    panics_in_a_row: std::sync::atomic::AtomicU32,
}

/// A Segment request the model thread hands to its decoder threads.
struct DecodeJob {
    handle: String,
    emb: ImageEmbedding,
    prompts: Vec<Prompt>,
    multimask: bool,
    low_res: bool,
    encoding: MaskEncoding,
    /// Its wait in the model's queue, and the model thread's work on it (finding or encoding
    /// the embedding): the response's queue and compute times include them.
    queue: Duration,
    resolve: Duration,
    handed_over: Instant,
    reply: Reply<SegmentOutput>,
}

impl DecodePool {
    /// `n` threads sharing `sam`'s decoder weights; each decodes `warm` once before serving.
    fn start(registry: &Registry, generation: u64, id: &str, sam: &Sam, n: usize, warm: &ImageEmbedding) -> Result<Self> {
        // Room for one job per thread waiting: more would only move the queue from the model's
        // bounded channel, where a full queue is RESOURCE_EXHAUSTED, to here.
        let (tx, rx) = std::sync::mpsc::sync_channel::<DecodeJob>(n);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let load = std::sync::Arc::new(PoolLoad::default());
        let all = tch::get_num_threads().max(1);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (id, dec, rx, load, warm) = (id.to_owned(), sam.decoder_replica(), rx.clone(), load.clone(), warm.shallow_clone());
            let model = (registry.clone(), generation);
            let t = std::thread::Builder::new()
                .name(format!("decode-{id}-{i}"))
                .spawn(move || decoder_thread(&id, &model, &dec, &rx, &load, n, all, warm))
                .map_err(|e| Error::Internal(format!("spawning a decoder thread: {e}")))?;
            threads.push(t);
        }
        Ok(Self { tx: Some(tx), threads, load })
    }

    /// Hands a job over, waiting while every thread is busy and one job waits for each.
    fn send(&self, job: DecodeJob) {
        self.load.unfinished.fetch_add(1, Ordering::SeqCst);
        if let Err(std::sync::mpsc::SendError(job)) = self.tx.as_ref().expect("open until dropped").send(job) {
            self.load.unfinished.fetch_sub(1, Ordering::SeqCst);
            job.reply.send(Err(Error::Internal("the model's decoder threads have stopped".into())));
        }
    }
}

impl Drop for DecodePool {
    /// The threads finish the jobs handed over, then end.
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Ends a job's count in [`PoolLoad`] however the job ends.
struct Unfinished<'a>(&'a PoolLoad);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.0.unfinished.fetch_sub(1, Ordering::SeqCst);
    }
}

#[allow(clippy::too_many_arguments)]
fn decoder_thread(
    id: &str,
    (registry, generation): &(Registry, u64),
    dec: &SamDecoder,
    rx: &std::sync::Mutex<std::sync::mpsc::Receiver<DecodeJob>>,
    load: &PoolLoad,
    n: usize,
    all: i32,
    warm: ImageEmbedding,
) {
    // Side by side, the decoders share the process's threads out.
    let busy = (all / n as i32).max(1);
    // Where a thread's count cannot be set, every job runs on the process's count.
    let per_thread = crate::device::set_intra_op_threads_for_this_thread(busy);
    if !per_thread {
        tracing::warn!(model = %id, "cannot set a decoder thread's intra-op threads: it uses the process's count");
    }
    let mut threads = busy;
    // The first pass allocates and picks kernels; keep that out of the first request.
    let warmed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tch::no_grad(|| dec.parts().predict_masks(&warm, &[Prompt { bbox: Some([8.0, 8.0, 40.0, 30.0]), ..Default::default() }], true, Masks::Best))
    }));
    if !matches!(warmed, Ok(Ok(_))) {
        tracing::warn!(model = %id, "a decoder thread's warm-up failed");
    }
    drop(warm);
    loop {
        // Held while waiting: the other idle threads wait on the lock instead of the channel.
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let _unfinished = Unfinished(load);
        let DecodeJob { handle, emb, prompts, multimask, low_res, encoding, queue, resolve, handed_over, reply } = job;
        if reply.is_closed() {
            continue; // the client went away
        }
        let want = if load.unfinished.load(Ordering::SeqCst) <= 1 { all } else { busy };
        if per_thread && want != threads {
            crate::device::set_intra_op_threads_for_this_thread(want);
            threads = want;
        }
        let wait = handed_over.elapsed();
        stage(id, "decoder_wait", wait);
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            if tests::DECODER_PANICS_TO_INJECT.take(id) {
                panic!("injected by a test");
            }
            tch::no_grad(|| decode(id, dec.parts(), handle, &emb, &prompts, multimask, low_res, encoding))
        }));
        match r {
            Ok(r) => {
                load.panics_in_a_row.store(0, Ordering::SeqCst);
                reply.send(r.map(|mut o| {
                    o.queue = queue + wait;
                    o.compute = resolve + t.elapsed();
                    o
                }))
            }
            Err(_) => {
                tracing::error!(model = %id, "a decoder thread failed on a request");
                let failed = load.panics_in_a_row.fetch_add(1, Ordering::SeqCst) + 1;
                if failed == MAX_PANICS_IN_A_ROW {
                    // Marked now, so that health and new requests see it; the model's thread
                    // refuses what is queued when it next looks (Worker::serve).
                    tracing::error!(model = %id, "{failed} requests in a row failed on the decoder threads: marking the model failed");
                    registry.fail(id, *generation, format!("{failed} requests in a row failed (see the server log); unload and load it again"));
                }
                // Dropping the reply unanswered answers INTERNAL.
                drop(reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EmbeddingFormat;
    use crate::settings::Settings;
    use crate::test_support::InjectedPanics;

    /// Commands that panic before being served, per model.
    pub(super) static PANICS_TO_INJECT: InjectedPanics = InjectedPanics::new();
    /// Decoder-thread jobs that panic before being decoded, per model.
    pub(super) static DECODER_PANICS_TO_INJECT: InjectedPanics = InjectedPanics::new();
    /// Models whose thread waits before serving its next command.
    pub(super) static PAUSED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    /// A caller that goes away gives its room back at once, though its command still waits in
    /// the channel for the model's thread to skip it; live requests stay limited to queue_depth.
    #[tokio::test]
    async fn callers_that_went_away_take_no_room_from_live_ones() {
        let mut s = Settings::load(None).unwrap();
        s.limits.queue_depth = 2;
        let r = crate::test_support::registry_with_tiny_model(s, "paused").await;
        let image = std::fs::read("tests/fixtures/images/ISIC_0024306.jpg").unwrap();
        let handle = r.embed("paused", image, EmbeddingFormat::None).await.unwrap().handle;
        let segment = |r: Registry, h: String| async move {
            r.segment("paused", Source::Handle(h), vec![Prompt::default()], false, false, MaskEncoding { png: false, rle: true }).await
        };
        PAUSED.lock().unwrap().push("paused".into());
        // Two callers give up while the model's thread is held: their commands stay queued.
        for _ in 0..2 {
            assert!(tokio::time::timeout(Duration::from_millis(20), segment(r.clone(), handle.clone())).await.is_err());
        }
        // Two live ones still get in; a third is over the limit.
        let live: Vec<_> = (0..2).map(|_| tokio::spawn(segment(r.clone(), handle.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(segment(r.clone(), handle.clone()).await, Err(Error::ResourceExhausted(_))));
        PAUSED.lock().unwrap().retain(|m| m != "paused");
        for t in live {
            assert!(t.await.unwrap().is_ok());
        }
    }

    /// The same Segment requests, sent at once, decoded by the model's thread and by decoder
    /// threads: the same masks and scores, each answer for its own request. A panic in a decoder
    /// thread fails only its request, and the thread serves on.
    #[tokio::test]
    async fn decoder_threads_answer_as_the_model_thread_does() {
        let mut s = Settings::load(None).unwrap();
        s.decoders = 0;
        let alone = crate::test_support::registry_with_tiny_model(s.clone(), "alone").await;
        s.decoders = 3;
        let pooled = crate::test_support::registry_with_tiny_model(s, "pooled").await;
        assert_eq!((alone.get("alone").unwrap().decoders, pooled.get("pooled").unwrap().decoders), (0, 3));
        let image = std::fs::read("tests/fixtures/images/ISIC_0024306.jpg").unwrap();
        let boxes: Vec<[f32; 4]> = (0..12).map(|i| [10.0 + 8.0 * i as f32, 20.0, 300.0 + 10.0 * i as f32, 280.0]).collect();
        let answers = |r: Registry, id: &'static str| {
            let (image, boxes) = (image.clone(), boxes.clone());
            async move {
                let handle = r.embed(id, image, EmbeddingFormat::None).await.unwrap().handle;
                let calls = boxes.iter().map(|b| {
                    let prompts = vec![Prompt { bbox: Some(*b), ..Default::default() }];
                    r.segment(id, Source::Handle(handle.clone()), prompts, true, false, MaskEncoding { png: false, rle: true })
                });
                futures::future::join_all(calls).await.into_iter().map(|o| o.unwrap()).collect::<Vec<_>>()
            }
        };
        let (a, b) = (answers(alone, "alone").await, answers(pooled.clone(), "pooled").await);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            let (a, b) = (&a.masks[0], &b.masks[0]);
            // One intra-op thread or two may round a sum differently: a pixel at the threshold may flip.
            assert!((a.area - b.area).abs() <= a.area / 1000, "{i}: area {} vs {}", a.area, b.area);
            for (x, y) in a.scores.iter().zip(&b.scores) {
                assert!((x - y).abs() < 1e-4, "{i}: scores {:?} vs {:?}", a.scores, b.scores);
            }
        }
        let areas: std::collections::HashSet<i64> = b.iter().map(|o| o.masks[0].area).collect();
        assert!(areas.len() > 6, "the boxes give different masks, so a swapped answer would show: {areas:?}");
        DECODER_PANICS_TO_INJECT.set("pooled", 1);
        let handle = pooled.embed("pooled", image.clone(), EmbeddingFormat::None).await.unwrap().handle;
        let segment = || pooled.segment("pooled", Source::Handle(handle.clone()), vec![Prompt::default()], true, false, MaskEncoding { png: true, rle: false });
        assert!(matches!(segment().await, Err(Error::Internal(_))));
        for _ in 0..4 {
            assert!(segment().await.is_ok(), "the decoder threads serve on after a panic");
        }
        assert_eq!(pooled.get("pooled").unwrap().state, ModelState::Ready);
        // Failing every request in a row, they fail the model at once, as its own thread would.
        DECODER_PANICS_TO_INJECT.set("pooled", MAX_PANICS_IN_A_ROW);
        for _ in 0..MAX_PANICS_IN_A_ROW {
            assert!(matches!(segment().await, Err(Error::Internal(_))));
        }
        assert_eq!(pooled.get("pooled").unwrap().state, ModelState::Failed);
        assert!(matches!(segment().await, Err(Error::Unavailable(m)) if m.contains("in a row")));
    }

    #[tokio::test]
    async fn a_panic_fails_only_its_request_and_repeated_panics_fail_the_model() {
        let registry = crate::test_support::registry_with_tiny_model(Settings::load(None).unwrap(), "panics").await;
        let image = std::fs::read("tests/fixtures/images/ISIC_0024306.jpg").unwrap();
        let embed = || registry.embed("panics", image.clone(), EmbeddingFormat::None);
        PANICS_TO_INJECT.set("panics", 1);
        assert!(matches!(embed().await, Err(Error::Internal(_))));
        assert!(embed().await.is_ok(), "the model serves on after a panic");
        PANICS_TO_INJECT.set("panics", MAX_PANICS_IN_A_ROW);
        // Sent at once: those queued behind the failing ones never ran, and are UNAVAILABLE.
        let all = futures::future::join_all((0..MAX_PANICS_IN_A_ROW + 2).map(|_| embed())).await;
        for (i, r) in all.iter().enumerate() {
            if i < MAX_PANICS_IN_A_ROW as usize {
                assert!(matches!(r, Err(Error::Internal(_))), "{i}: {:?}", r.as_ref().err());
            } else {
                assert!(matches!(r, Err(Error::Unavailable(_))), "{i}: {:?}", r.as_ref().err());
            }
        }
        // The last reply is sent as its command unwinds, just before the thread marks the model.
        for _ in 0..100 {
            if registry.get("panics").unwrap().state == ModelState::Failed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(registry.get("panics").unwrap().state, ModelState::Failed);
        assert!(matches!(embed().await, Err(Error::Unavailable(m)) if m.contains("in a row")));
    }
}
