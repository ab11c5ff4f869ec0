//! Serving load generator (a tonic client) and the in-process reference it is compared with.

use crate::cli::Conn as Cli;
use crate::error::{Error, Result};
use crate::grpc::pb;
use crate::model::{Sam, SamVariant};
use crate::predictor::{Masks, Predictor, Prompt};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct LatencyReport {
    pub mode: &'static str,
    pub model: String,
    pub concurrency: usize,
    pub requests: usize,
    pub prompts_per_request: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests_per_s: f64,
    pub prompts_per_s: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn report(mode: &'static str, model: &str, concurrency: usize, prompts: usize, mut lat: Vec<f64>, errors: usize, wall: Duration) -> LatencyReport {
    lat.sort_by(f64::total_cmp);
    let n = lat.len();
    LatencyReport {
        mode,
        model: model.to_owned(),
        concurrency,
        requests: n,
        prompts_per_request: prompts,
        errors,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        requests_per_s: n as f64 / wall.as_secs_f64(),
        prompts_per_s: (n * prompts) as f64 / wall.as_secs_f64(),
    }
}

pub fn to_pb_prompt(p: &Prompt) -> pb::Prompt {
    pb::Prompt {
        points: p
            .points
            .iter()
            .map(|q| pb::Point {
                x: q.x,
                y: q.y,
                label: if q.label == 1 { pb::PointLabel::Foreground } else { pb::PointLabel::Background } as i32,
            })
            .collect(),
        r#box: p.bbox.map(|b| pb::Box { x0: b[0], y0: b[1], x1: b[2], y1: b[3] }),
        mask_input: p.mask_input.clone().unwrap_or_default(),
    }
}

/// The connection's bearer token on every call (none: calls go as they are).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

type Conn = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// A channel to the server (TLS when the connection names a CA) that carries its token.
async fn connect(conn: &Cli) -> Result<Conn> {
    let token = match &conn.token {
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| crate::error::invalid("token", "is not a valid header value"))?),
        None => None,
    };
    let ch = conn.channel().await.map_err(|e| Error::Unavailable(format!("{e:#}")))?;
    Ok(tonic::service::interceptor::InterceptedService::new(ch, Bearer(token)))
}

type SegmentClient = pb::segmentation_service_client::SegmentationServiceClient<Conn>;

/// Embeds `image` once on the server; a client and the Segment request (by that embedding's
/// handle: `prompts` copies of `prompt`, multimask, PNG mask) to send against it.
async fn by_handle(conn: &Cli, model: &str, image: Vec<u8>, prompt: &Prompt, prompts: usize) -> Result<(SegmentClient, pb::SegmentRequest)> {
    let ch = connect(conn).await?;
    let mut emb = pb::embedding_service_client::EmbeddingServiceClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let handle = emb
        .embed(pb::EmbedRequest { model_id: model.to_owned(), image, ..Default::default() })
        .await
        .map_err(|s| Error::Unavailable(format!("embed: {s}")))?
        .into_inner()
        .embedding_handle;
    let req = pb::SegmentRequest {
        model_id: model.to_owned(),
        source: Some(pb::segment_request::Source::EmbeddingHandle(handle)),
        prompts: vec![to_pb_prompt(prompt); prompts],
        multimask_output: true,
        mask_format: pb::MaskFormat::Png as i32,
        ..Default::default()
    };
    Ok((SegmentClient::new(ch).max_decoding_message_size(64 << 20), req))
}

/// Embeds `image` once, then sends `total` Segment requests by handle from `concurrency`
/// concurrent clients (each request: `prompts` copies of `prompt`, PNG masks).
pub async fn segment_load(conn: &Cli, model: &str, image: Vec<u8>, prompt: &Prompt, prompts: usize, concurrency: usize, total: usize) -> Result<LatencyReport> {
    let (mut seg, req) = by_handle(conn, model, image, prompt, prompts).await?;
    // Warm-up, outside the measurement.
    seg.segment(req.clone()).await.map_err(|s| Error::Unavailable(format!("segment: {s}")))?;
    let per_client = total.div_ceil(concurrency.max(1));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut seg = seg.clone();
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            let mut errors = 0;
            for _ in 0..per_client {
                let t = Instant::now();
                match seg.segment(req.clone()).await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.map_err(|e| Error::Internal(e.to_string()))?;
        lat.extend(l);
        errors += e;
    }
    Ok(report("grpc_segment", model, concurrency, prompts, lat, errors, start.elapsed()))
}

/// Sends `images` (distinct, so new to the server's embedding cache) from `concurrency`
/// concurrent clients, each in an Embed request (micro-batching shows as the images/s gained
/// over `concurrency` = 1) or, with `segment`, in a Segment request with that prompt (one mask,
/// PNG): the whole call for a new image.
pub async fn new_image_load(conn: &Cli, model: &str, images: Vec<Vec<u8>>, concurrency: usize, segment: Option<&Prompt>) -> Result<LatencyReport> {
    let ch = connect(conn).await?;
    let client = pb::embedding_service_client::EmbeddingServiceClient::new(ch.clone());
    let seg_client = pb::segmentation_service_client::SegmentationServiceClient::new(ch).max_decoding_message_size(64 << 20);
    let seg_prompt = segment.map(to_pb_prompt);
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(images));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut c = client.clone();
        let mut sc = seg_client.clone();
        let queue = queue.clone();
        let model = model.to_owned();
        let seg_prompt = seg_prompt.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0);
            loop {
                let Some(image) = queue.lock().await.pop() else { break };
                let t = Instant::now();
                let ok = match &seg_prompt {
                    None => c.embed(pb::EmbedRequest { model_id: model.clone(), image, ..Default::default() }).await.is_ok(),
                    Some(p) => sc
                        .segment(pb::SegmentRequest {
                            model_id: model.clone(),
                            source: Some(pb::segment_request::Source::Image(image)),
                            prompts: vec![p.clone()],
                            mask_format: pb::MaskFormat::Png as i32,
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                };
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.map_err(|e| Error::Internal(e.to_string()))?;
        lat.extend(l);
        errors += e;
    }
    Ok(report(if segment.is_some() { "grpc_segment_new_image" } else { "grpc_embed" }, model, concurrency, 1, lat, errors, start.elapsed()))
}

/// The decode a Segment request runs, done in-process: predict (best mask post-processed) and
/// PNG encoding of each prompt's mask.
struct InProcess {
    predictor: Predictor,
    emb: crate::predictor::ImageEmbedding,
    batch: Vec<Prompt>,
    size: (u32, u32),
    /// The image file's bytes, for the gRPC side of a paired run to send.
    image_bytes: Vec<u8>,
}

impl InProcess {
    fn new(variant: SamVariant, checkpoint: Option<&Path>, device: tch::Device, image: &Path, prompt: &Prompt, prompts: usize) -> Result<Self> {
        let bytes = std::fs::read(image).map_err(|e| Error::Internal(format!("{}: {e}", image.display())))?;
        let img = crate::image_io::decode_rgb(&bytes, "image", u64::MAX)?;
        let sam = match checkpoint {
            Some(c) => Sam::load(variant, c, device)?.0,
            None => tch::no_grad(|| Sam::new(variant, device)),
        };
        let predictor = Predictor::new(sam);
        let emb = predictor.set_image(&img)?;
        Ok(Self { predictor, emb, batch: vec![prompt.clone(); prompts], size: (img.height(), img.width()), image_bytes: bytes })
    }

    fn run(&self) -> Result<()> {
        for pred in self.predictor.predict_masks(&self.emb, &self.batch, true, Masks::Best)? {
            let m = Vec::<u8>::try_from(pred.best_mask().to_kind(tch::Kind::Uint8).flatten(0, -1))?;
            crate::masks::to_png(&m, self.size.0, self.size.1)?;
        }
        Ok(())
    }

    /// One timed call, in milliseconds.
    fn timed(&self) -> Result<f64> {
        let t = Instant::now();
        self.run()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }
}

/// The same decode as a Segment request, in-process, sequentially.
pub fn in_process_decode(
    variant: SamVariant,
    checkpoint: Option<&Path>,
    device: tch::Device,
    image: &Path,
    prompt: &Prompt,
    prompts: usize,
    n: usize,
) -> Result<LatencyReport> {
    let inproc = InProcess::new(variant, checkpoint, device, image, prompt, prompts)?;
    inproc.run()?;
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        lat.push(inproc.timed()?);
    }
    Ok(report("in_process_decode", variant.name(), 1, prompts, lat, 0, start.elapsed()))
}

/// gRPC overhead measured in pairs: each pair is one Segment request to the server (by embedding
/// handle, PNG mask) and the same decode in-process, back to back, the order alternating from
/// pair to pair. On a machine whose speed drifts from minute to minute, the per-pair difference
/// is what a separate run of each cannot give.
#[derive(Serialize)]
pub struct OverheadReport {
    pub mode: &'static str,
    pub model: String,
    pub pairs: usize,
    pub prompts_per_request: usize,
    pub grpc_p50_ms: f64,
    pub in_process_p50_ms: f64,
    /// Percentiles of (gRPC - in-process) over the pairs.
    pub overhead_p10_ms: f64,
    pub overhead_p50_ms: f64,
    pub overhead_p90_ms: f64,
    /// The server's own account of each call (queue + compute on the model thread: decode,
    /// post-processing, PNG), and the rest of the call's latency (gRPC both ways, protobuf,
    /// the handler and the hand-over to the model thread), per call.
    pub server_p50_ms: f64,
    pub transport_p50_ms: f64,
    pub transport_p99_ms: f64,
}

#[allow(clippy::too_many_arguments)]
pub fn paired_overhead(
    conn: &Cli,
    model_id: &str,
    variant: SamVariant,
    checkpoint: Option<&Path>,
    device: tch::Device,
    image: &Path,
    prompt: &Prompt,
    prompts: usize,
    n: usize,
) -> Result<OverheadReport> {
    // Lets either side's idle worker threads stop spinning before the other side runs.
    const PAUSE: Duration = Duration::from_millis(20);
    let inproc = InProcess::new(variant, checkpoint, device, image, prompt, prompts)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::Internal(e.to_string()))?;
    let (mut seg, req) = rt.block_on(by_handle(conn, model_id, inproc.image_bytes.clone(), prompt, prompts))?;
    // The call's latency and the part of it the server's model thread spent (queue + compute,
    // as the response reports them).
    let mut grpc_call = || -> Result<(f64, f64)> {
        let t = Instant::now();
        let r = rt.block_on(seg.segment(req.clone())).map_err(|s| Error::Unavailable(format!("segment: {s}")))?.into_inner();
        let latency = t.elapsed().as_secs_f64() * 1e3;
        let server = r.timing.map_or(f64::NAN, |t| t.queue_ms + t.compute_ms);
        Ok((latency, server))
    };
    // Warm-up of both sides, outside the measurement.
    grpc_call()?;
    inproc.run()?;
    let (mut grpc, mut local, mut diff) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut server, mut transport) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        std::thread::sleep(PAUSE);
        let ((g, sv), l) = if i % 2 == 0 {
            let g = grpc_call()?;
            std::thread::sleep(PAUSE);
            (g, inproc.timed()?)
        } else {
            let l = inproc.timed()?;
            std::thread::sleep(PAUSE);
            (grpc_call()?, l)
        };
        grpc.push(g);
        local.push(l);
        diff.push(g - l);
        server.push(sv);
        transport.push(g - sv);
    }
    for v in [&mut grpc, &mut local, &mut diff, &mut server, &mut transport] {
        v.sort_by(f64::total_cmp);
    }
    Ok(OverheadReport {
        mode: "paired_overhead",
        model: model_id.to_owned(),
        pairs: n,
        prompts_per_request: prompts,
        grpc_p50_ms: percentile(&grpc, 0.5),
        in_process_p50_ms: percentile(&local, 0.5),
        overhead_p10_ms: percentile(&diff, 0.1),
        overhead_p50_ms: percentile(&diff, 0.5),
        overhead_p90_ms: percentile(&diff, 0.9),
        server_p50_ms: percentile(&server, 0.5),
        transport_p50_ms: percentile(&transport, 0.5),
        transport_p99_ms: percentile(&transport, 0.99),
    })
}
