//! Prometheus metric names (all here), their descriptions and the exporter.
//! Labels stay low-cardinality: rpc, model, stage, code, result, device.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;

pub const REQUEST_SECONDS: &str = "skinsam_request_duration_seconds";
pub const STAGE_SECONDS: &str = "skinsam_stage_duration_seconds";
pub const QUEUE_SECONDS: &str = "skinsam_queue_wait_seconds";
pub const REQUESTS_TOTAL: &str = "skinsam_requests_total";
pub const IN_FLIGHT: &str = "skinsam_in_flight_requests";
pub const CACHE_LOOKUPS_TOTAL: &str = "skinsam_embedding_cache_lookups_total";
pub const CACHE_BYTES: &str = "skinsam_embedding_cache_bytes";
pub const MODELS: &str = "skinsam_models";
pub const PROMPTS_TOTAL: &str = "skinsam_prompts_total";
pub const ALIAS_ROUTED_TOTAL: &str = "skinsam_alias_routed_total";
pub const EVAL_IMAGES_TOTAL: &str = "skinsam_eval_images_total";
pub const GPU_MEMORY_USED_BYTES: &str = "skinsam_gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL_BYTES: &str = "skinsam_gpu_memory_total_bytes";

/// Request latencies: 1 ms (a cached decode) to 2 minutes (vit_h on CPU).
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

pub fn describe() {
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "gRPC request latency by rpc and model");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Time per stage: decode, encode, prompt_decode, postprocess, encode_mask (PNG/RLE), decoder_wait (for a decoder thread)");
    describe_histogram!(QUEUE_SECONDS, Unit::Seconds, "Time a command waited for its model's worker");
    describe_counter!(REQUESTS_TOTAL, "gRPC requests by rpc and status code");
    describe_gauge!(IN_FLIGHT, "Requests being handled, by rpc");
    describe_counter!(CACHE_LOOKUPS_TOTAL, "Embedding cache lookups by model and result (hit, disk, miss, evicted)");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Bytes held by the embedding cache, by model");
    describe_gauge!(MODELS, "Hosted models by state (loading, ready, failed)");
    describe_counter!(PROMPTS_TOTAL, "Prompts decoded, by model");
    describe_counter!(ALIAS_ROUTED_TOTAL, "Segment requests an alias routed, by alias and model (online A/B)");
    describe_counter!(EVAL_IMAGES_TOTAL, "Images evaluated, by model and result (scored, skipped)");
    describe_gauge!(GPU_MEMORY_USED_BYTES, Unit::Bytes, "Memory in use on a CUDA device hosting a model (device-wide), by device");
    describe_gauge!(GPU_MEMORY_TOTAL_BYTES, Unit::Bytes, "Memory of a CUDA device hosting a model, by device");
}

/// Starts the /metrics HTTP listener. Call inside the tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install()?;
    describe();
    Ok(())
}
