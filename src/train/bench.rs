//! The training-step benchmark (`skinsam train-bench`, scripts/bench_train.sh): the trainer's
//! step on cached embeddings, timed, beside scripts/bench_train_official.py doing the same step
//! with the official modules.

use super::adam::Adam;
use super::{data, dice_bce, Recipe};
use crate::model::prompt_encoder::PromptBatch;
use crate::model::{Sam, SamVariant};
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Serialize)]
pub struct StepReport {
    pub r#impl: &'static str,
    pub variant: String,
    pub batch: usize,
    pub threads: i32,
    pub steps_per_s: f64,
    pub ms_per_step: f64,
    pub peak_rss_mb: f64,
    /// Mean time of the forward pass (with the loss), the backward pass and the Adam update.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub update_ms: f64,
    /// Bytes of the batch's embeddings (B x C x 64 x 64 fp32).
    pub embedding_batch_mb: f64,
}

/// Random embeddings, box + point prompts and targets of the trainer's shapes; `steps` timed
/// steps (prompt encoder, mask decoder, Dice + BCE, backward, Adam on the mask decoder) after two
/// warm-up steps.
pub fn time_steps(variant: SamVariant, batch: usize, steps: usize, device: Device) -> StepReport {
    tch::manual_seed(0);
    let mut sam = tch::no_grad(|| Sam::new(variant, device));
    let recipe = Recipe { batch_size: batch, ..Recipe::default() };
    data::set_trainable(&mut sam, &recipe);
    let mut adam = Adam::new(&sam, &recipe);
    let c = sam.config.prompt_embed_dim;
    let e = sam.config.embedding_size();
    let b = batch as i64;
    let features = Tensor::randn([b, c, e, e], (Kind::Float, device));
    let points = Tensor::rand([b, 1, 2], (Kind::Float, device)) * sam.config.img_size as f64;
    let labels = Tensor::ones([b, 1], (Kind::Int64, device));
    let boxes = Tensor::from_slice(&[200.0f32, 200.0, 800.0, 800.0]).view([1, 4]).repeat([b, 1]).to_device(device);
    let low = sam.config.low_res_size();
    let target = Tensor::rand([b, 1, low, low], (Kind::Float, device)).gt(0.5).to_kind(Kind::Float);
    let step = |adam: &mut Adam| -> [f64; 3] {
        let mut parts = [0.0f64; 3];
        let t = Instant::now();
        let pb = PromptBatch { points: Some((&points, &labels)), boxes: Some(&boxes), masks: None };
        let (logits, _) = sam.decode(&features, &pb, false);
        let (d, bce) = dice_bce(&logits, &target);
        let loss = d + bce;
        let _ = loss.double_value(&[]);
        parts[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        adam.zero_grad();
        loss.backward();
        parts[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        adam.step(1.0);
        parts[2] += t.elapsed().as_secs_f64();
        parts
    };
    for _ in 0..2 {
        step(&mut adam);
    }
    let mut parts = [0.0f64; 3];
    let t = Instant::now();
    for _ in 0..steps.max(1) {
        let p = step(&mut adam);
        for (a, b) in parts.iter_mut().zip(p) {
            *a += b;
        }
    }
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let s = t.elapsed().as_secs_f64();
    StepReport {
        r#impl: "skinsam",
        variant: variant.to_string(),
        batch,
        threads: tch::get_num_threads(),
        steps_per_s: steps.max(1) as f64 / s,
        ms_per_step: 1e3 * s / steps.max(1) as f64,
        peak_rss_mb: crate::bench::peak_rss_mb(),
        forward_ms: 1e3 * parts[0] / steps.max(1) as f64,
        backward_ms: 1e3 * parts[1] / steps.max(1) as f64,
        update_ms: 1e3 * parts[2] / steps.max(1) as f64,
        embedding_batch_mb: (b * c * e * e * 4) as f64 / (1024.0 * 1024.0),
    }
}
