//! The one Settings struct: built-in defaults < a TOML file < SKINSAM__* environment variables
//! (for example SKINSAM__GRPC_ADDR=0.0.0.0:50051, SKINSAM__CACHE__MAX_BYTES=1000000000).

use crate::model::{Precision, SamVariant};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ModelSettings {
    pub id: String,
    pub variant: SamVariant,
    /// A .pth or .safetensors file; absent means random weights (for tests and benchmarks).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// "auto", "cpu", "cuda" or "cuda:N"; absent means `default_device`.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default = "default_precision")]
    pub precision: Precision,
}

fn default_precision() -> Precision {
    Precision::Fp32
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CacheSettings {
    /// Embedding cache budget per model, in bytes (a vit embedding is 4 MiB).
    pub max_bytes: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LimitSettings {
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Largest image (width x height) decoded; checked from the header before decoding.
    pub max_image_pixels: u64,
    /// Commands queued per model before RESOURCE_EXHAUSTED.
    pub queue_depth: usize,
    /// Prompts in one Segment request.
    pub max_prompts: usize,
    /// Points in one prompt.
    pub max_points: usize,
    /// Images encoded together when several embed requests wait (micro-batching).
    pub max_embed_batch: usize,
    /// Server-side deadline for one request, in milliseconds (a client deadline can shorten it).
    pub request_timeout_ms: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct AuthSettings {
    /// Bearer token required on every RPC when set.
    #[serde(default)]
    pub token: Option<String>,
    /// Bearer token required for admin RPCs (LoadModel, UnloadModel, training) when set; it
    /// also opens every other RPC.
    #[serde(default)]
    pub admin_token: Option<String>,
}

/// TLS for the gRPC port: both files (PEM) or neither.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct TlsSettings {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Dataset evaluation (EvaluationService).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct EvalSettings {
    /// Folders under which Evaluate may read server-side datasets; empty = none allowed
    /// (clients can still stream images with EvaluateUpload).
    #[serde(default)]
    pub dataset_roots: Vec<PathBuf>,
    /// Where image embeddings are persisted (safetensors keyed by checkpoint checksum + image
    /// hash) so a later evaluation or training run does not re-encode; absent = memory only.
    #[serde(default)]
    pub embedding_store: Option<PathBuf>,
}

/// Fine-tuning (TrainingService).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TrainSettings {
    /// Where runs write their checkpoints (`<output_dir>/<run_id>/`).
    #[serde(default = "default_runs_dir")]
    pub output_dir: PathBuf,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self { output_dir: default_runs_dir() }
    }
}

fn default_runs_dir() -> PathBuf {
    PathBuf::from("runs")
}

/// One target of an alias.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AliasRoute {
    pub model: String,
    pub weight: u32,
}

/// A model id that routes Segment requests between models by weight (online A/B, canary),
/// sticky per image: the same image always goes to the same model.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AliasSettings {
    pub name: String,
    pub routes: Vec<AliasRoute>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Settings {
    pub grpc_addr: String,
    /// Prometheus exposition (/metrics); empty disables it.
    pub metrics_addr: String,
    pub default_device: String,
    /// libtorch intra-op threads per process (0: one per core).
    pub threads: i32,
    /// "text" or "json".
    pub log_format: String,
    pub models: Vec<ModelSettings>,
    pub cache: CacheSettings,
    pub limits: LimitSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub tls: TlsSettings,
    #[serde(default)]
    pub eval: EvalSettings,
    #[serde(default)]
    pub aliases: Vec<AliasSettings>,
    #[serde(default)]
    pub train: TrainSettings,
}

const DEFAULTS: &str = r#"
grpc_addr = "127.0.0.1:50051"
metrics_addr = "127.0.0.1:9090"
default_device = "auto"
threads = 0
log_format = "text"

# The project's own model, trained on HAM10000 with scripts/train_skinsam_tiny.sh (MODEL_CARD.md):
# segments skin lesions out of the box on a fresh clone. Official checkpoints: see README.
[[models]]
id = "skinsam-tiny"
variant = "skinsam_tiny"
checkpoint = "models/skinsam_tiny.safetensors"

[cache]
max_bytes = 536870912

[limits]
max_message_bytes = 16777216
max_image_pixels = 50000000
queue_depth = 64
max_prompts = 256
max_points = 64
max_embed_batch = 4
request_timeout_ms = 120000
"#;

impl Settings {
    /// Defaults, then `file` (TOML) if given, then SKINSAM__* environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        let mut b = config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(f) = file {
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml).required(true));
        }
        b.add_source(config::Environment::with_prefix("SKINSAM").prefix_separator("__").separator("__").try_parsing(true))
            .build()?
            .try_deserialize()
    }

    /// Defaults only (no file, no environment): for tests.
    pub fn defaults() -> Self {
        config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("built-in defaults parse")
    }
}
