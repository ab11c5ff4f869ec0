//! CLI side of evaluation: `eval` / `compare` call a running server (server-side dataset, or
//! `--upload` to stream local images) and write the report folder; `merge-reports` joins the
//! report folders of a sharded run into one.

use super::dataset::{decode_mask, read_file, BinaryMask, Dataset};
use super::prompts::{PromptMode, SimPrompt};
use super::report::{read_results_csv, write_report, RunInfo, SUMMARY_JSON};
use super::runner::{ImageResult, ModelResult};
use super::scores::ImageScores;
use crate::cli::{say, Conn};
use crate::grpc::pb;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio_stream::StreamExt;

/// Images read ahead of the server when uploading.
const UPLOAD_BUFFER: usize = 8;

pub struct EvalArgs {
    pub models: Vec<String>,
    pub dataset: PathBuf,
    /// Stream the images from here instead of asking the server to read `dataset`.
    pub upload: bool,
    pub out: PathBuf,
    pub mode: PromptMode,
    pub seed: u64,
    pub reference_width: u32,
    pub margin: Option<f32>,
    pub max_shift: Option<f32>,
    pub max_scale: Option<f32>,
    pub limit: u32,
    pub labels: Vec<String>,
    pub shard_index: u32,
    pub shard_count: u32,
    pub single_mask: bool,
    pub summary_every: u32,
    pub quiet: bool,
    /// Only these image ids (e.g. a training run's validation split).
    pub ids: Vec<String>,
}

fn row_from_pb(r: pb::ImageResult) -> ImageResult {
    let (h, w) = (r.height, r.width);
    ImageResult {
        index: r.index as usize,
        id: r.id,
        label: Some(r.label).filter(|l| !l.is_empty()),
        group: Some(r.group).filter(|g| !g.is_empty()),
        width: w,
        height: h,
        mask_resized: r.mask_resized,
        prompt: SimPrompt {
            point: r.prompt.as_ref().and_then(|p| p.point.as_ref()).map(|p| [p.x, p.y]),
            bbox: r.prompt.as_ref().and_then(|p| p.r#box.as_ref()).map(|b| [b.x0, b.y0, b.x1, b.y1]),
        },
        results: r
            .results
            .into_iter()
            .map(|m| ModelResult {
                model: m.model_id,
                scores: ImageScores { accuracy: m.accuracy, dice: m.dice, iou: m.iou },
                predicted_iou: m.predicted_iou,
                mask_rle: m.mask.map(|r| r.counts),
            })
            .collect(),
    }
}

/// An image and its ground truth (resized to the image) by id, for the overlays.
fn loader(ds: Dataset) -> impl Fn(&str) -> Result<(image::RgbImage, BinaryMask)> {
    let by_id: HashMap<String, super::dataset::Item> = ds.items.into_iter().map(|i| (i.id.clone(), i)).collect();
    move |id: &str| {
        let item = by_id.get(id).with_context(|| format!("{id} is not in the local dataset"))?;
        let img = crate::image_io::decode_rgb(&read_file(&item.image)?, "image", u64::MAX)?;
        let m = decode_mask(&read_file(&item.mask)?, "mask")?;
        let (m, _) = m.fitted_to(img.width(), img.height());
        Ok((img, m))
    }
}

pub fn eval(conn: &Conn, a: EvalArgs) -> Result<()> {
    let settings = pb::EvaluateSettings {
        model_ids: a.models.clone(),
        prompts: Some(pb::PromptSimulation {
            mode: crate::grpc::evaluation::mode_to_pb(a.mode) as i32,
            seed: a.seed,
            margin: a.margin,
            max_shift: a.max_shift,
            max_scale: a.max_scale,
            reference_width: a.reference_width,
        }),
        labels: if a.upload { vec![] } else { a.labels.clone() },
        limit: if a.upload { 0 } else { a.limit },
        summary_every: a.summary_every,
        single_mask: a.single_mask,
        return_masks: true,
        shard_index: if a.upload { 0 } else { a.shard_index },
        shard_count: if a.upload { 0 } else { a.shard_count },
        ids: if a.upload { vec![] } else { a.ids.clone() },
    };
    // The local copy of the dataset (when readable here): progress total, uploads and overlays.
    let local = Dataset::open(&a.dataset).ok().map(|mut ds| {
        ds.keep_ids(&a.ids, 0);
        ds.filter(&a.labels, a.limit as usize);
        ds.shard(a.shard_index as usize, a.shard_count as usize);
        ds
    });
    if a.upload && local.is_none() {
        Dataset::open(&a.dataset)?; // the reader's error says what is wrong
    }
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (rows, skipped, server_summary) = rt.block_on(async {
        let channel = conn.channel().await?;
        let mut client = pb::evaluation_service_client::EvaluationServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let mut stream = if a.upload {
            let ds = local.clone().expect("checked above");
            let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_BUFFER);
            let first = pb::EvaluateUploadRequest { item: Some(pb::evaluate_upload_request::Item::Settings(settings.clone())) };
            tx.send(first).await.ok();
            tokio::spawn(async move {
                for item in ds.items {
                    let read = tokio::task::spawn_blocking(move || -> Result<pb::UploadedImage> {
                        Ok(pb::UploadedImage {
                            image: read_file(&item.image)?,
                            mask: read_file(&item.mask)?,
                            label: item.label.unwrap_or_default(),
                            group: item.group.unwrap_or_default(),
                            id: item.id,
                        })
                    })
                    .await;
                    match read {
                        Ok(Ok(img)) => {
                            if tx.send(pb::EvaluateUploadRequest { item: Some(pb::evaluate_upload_request::Item::Image(img)) }).await.is_err() {
                                break;
                            }
                        }
                        Ok(Err(e)) => eprintln!("skipping an image: {e}"),
                        Err(e) => eprintln!("skipping an image: {e}"),
                    }
                }
            });
            client.evaluate_upload(conn.request(tokio_stream::wrappers::ReceiverStream::new(rx))?).await?.into_inner()
        } else {
            let dataset = a.dataset.canonicalize().unwrap_or_else(|_| a.dataset.clone()).display().to_string();
            client.evaluate(conn.request(pb::EvaluateRequest { settings: Some(settings.clone()), dataset })?).await?.into_inner()
        };
        let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(local.as_ref().map_or(0, |d| d.items.len() as u64)) };
        bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} images, {elapsed} elapsed, ETA {eta} {msg}")?);
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        let mut last = None;
        while let Some(msg) = stream.next().await {
            match msg?.event {
                Some(pb::evaluate_response::Event::Image(r)) => {
                    rows.push(row_from_pb(r));
                    bar.inc(1);
                }
                Some(pb::evaluate_response::Event::Skipped(s)) => {
                    say(&bar, format!("skipped {}: {}", s.id, s.reason));
                    skipped.push((s.id, s.reason));
                }
                Some(pb::evaluate_response::Event::Summary(s)) => {
                    if s.images_total > 0 {
                        bar.set_length(u64::from(s.images_total));
                    }
                    if let Some(m) = s.models.first().and_then(|m| m.overall.as_ref()).and_then(|o| o.dice.as_ref()) {
                        bar.set_message(format!("mean Dice {} {:.4}", s.models[0].model_id, m.mean));
                    }
                    let done = s.r#final;
                    last = Some(s);
                    if done {
                        break;
                    }
                }
                None => {}
            }
        }
        bar.finish();
        anyhow::Ok((rows, skipped, last))
    })?;
    let Some(server_summary) = server_summary.filter(|s| s.r#final) else { bail!("the server ended the evaluation without a final summary") };
    let info = RunInfo {
        dataset: a.dataset.display().to_string(),
        models: a.models.clone(),
        settings: settings_json(server_summary.settings.as_ref().unwrap_or(&settings)),
        skipped,
    };
    let evaluated = started.elapsed();
    let load = local.map(loader);
    let summary = write_report(&a.out, &info, &rows, a.seed, load.as_ref().map(|f| f as &dyn Fn(&str) -> Result<(image::RgbImage, BinaryMask)>))?;
    for m in &a.models {
        if let Some(s) = summary.models.get(m) {
            println!("{m}: {} images, mean Dice {:.4}, IoU {:.4}, accuracy {:.4}", s.overall.n, s.overall.dice.mean, s.overall.iou.mean, s.overall.accuracy.mean);
        }
    }
    println!(
        "{} images evaluated in {:.1} s; report written to {} in {:.1} s",
        rows.len(),
        evaluated.as_secs_f64(),
        a.out.display(),
        (started.elapsed() - evaluated).as_secs_f64()
    );
    Ok(())
}

fn settings_json(s: &pb::EvaluateSettings) -> serde_json::Value {
    let p = s.prompts.clone().unwrap_or_default();
    serde_json::json!({
        "models": s.model_ids,
        "prompt_mode": pb::PromptMode::try_from(p.mode).map(|m| m.as_str_name()).unwrap_or("?"),
        "seed": p.seed,
        "margin": p.margin,
        "max_shift": p.max_shift,
        "max_scale": p.max_scale,
        "reference_width": p.reference_width,
        "labels": s.labels,
        "limit": s.limit,
        "multimask": !s.single_mask,
        "shard_index": s.shard_index,
        "shard_count": s.shard_count,
    })
}

/// Joins the report folders of a sharded evaluation into one report (no overlays: they need
/// the predicted masks, which only the shards had).
pub fn merge_reports(out: &Path, shards: &[PathBuf]) -> Result<()> {
    let mut all: Vec<ImageResult> = Vec::new();
    let mut models: Option<Vec<String>> = None;
    let mut info: Option<RunInfo> = None;
    for dir in shards {
        let (m, rows) = read_results_csv(&dir.join(super::report::RESULTS_CSV))?;
        match &models {
            None => models = Some(m),
            Some(first) if *first != m => bail!("{} evaluated models {m:?}, the first shard {first:?}", dir.display()),
            _ => {}
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(SUMMARY_JSON)).with_context(|| format!("reading {}", dir.join(SUMMARY_JSON).display()))?)?;
        let run: RunInfo = serde_json::from_value(v["run"].clone()).with_context(|| format!("{}: no run section", dir.display()))?;
        match &mut info {
            None => info = Some(run),
            Some(i) => i.skipped.extend(run.skipped),
        }
        all.extend(rows);
    }
    let (Some(models), Some(mut info)) = (models, info) else { bail!("no shard folders given") };
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all.dedup_by(|a, b| a.id == b.id);
    for (i, r) in all.iter_mut().enumerate() {
        r.index = i;
    }
    info.models = models;
    let seed = info.settings["seed"].as_u64().unwrap_or(0);
    let s = write_report(out, &info, &all, seed, None)?;
    println!("merged {} shards: {} images into {}", shards.len(), s.images_done, out.display());
    Ok(())
}
