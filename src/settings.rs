//! The one Settings struct: built-in defaults < a TOML file < SKINSAM__* environment variables
//! (for example SKINSAM__GRPC_ADDR=0.0.0.0:50051, SKINSAM__CACHE__MAX_BYTES=1000000000).

use crate::model::{Precision, SamVariant};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
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
    /// Decoder threads beside the model's thread (0: that thread decodes); absent: the server's
    /// `decoders`.
    #[serde(default)]
    pub decoders: Option<usize>,
}

fn default_precision() -> Precision {
    Precision::Fp32
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// Embedding cache budget per model, in bytes (a vit embedding is 4 MiB).
    pub max_bytes: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Largest image (width x height) decoded; checked from the header before decoding.
    pub max_image_pixels: u64,
    /// Requests in flight per model (queued, or being served) before RESOURCE_EXHAUSTED.
    pub queue_depth: usize,
    /// Prompts in one Segment request.
    pub max_prompts: usize,
    /// Points in one prompt.
    pub max_points: usize,
    /// Prompts x image pixels in one Segment request (its full-size masks are held at once,
    /// about 6 bytes a pixel while they are made).
    pub max_mask_pixels: u64,
    /// Images encoded together when several embed requests wait (micro-batching).
    pub max_embed_batch: usize,
    /// Server-side deadline for one request, in milliseconds (a client deadline can shorten it).
    pub request_timeout_ms: u64,
    /// After SIGTERM, how long in-flight calls may finish before the streams still open (a
    /// health watch, a training or evaluation stream) are closed, in milliseconds.
    pub shutdown_grace_ms: u64,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Dataset evaluation (EvaluationService).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// Folders under which Evaluate may read server-side datasets; empty = none allowed
    /// (clients can still stream images with EvaluateUpload). A TOML list, or in the
    /// environment a comma-separated one (SKINSAM__EVAL__DATASET_ROOTS=/data/a,/data/b).
    #[serde(default, deserialize_with = "list_or_commas")]
    pub dataset_roots: Vec<PathBuf>,
    /// Where image embeddings are persisted (safetensors keyed by checkpoint checksum + image
    /// hash) so a later evaluation or training run does not re-encode; absent = memory only.
    #[serde(default)]
    pub embedding_store: Option<PathBuf>,
}

/// A list of paths from a TOML array, or from one comma-separated string (an environment
/// variable: the environment is read as strings, so that tokens keep their leading zeros).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCommas {
        List(Vec<PathBuf>),
        Commas(String),
    }
    Ok(match ListOrCommas::deserialize(d)? {
        ListOrCommas::List(v) => v,
        ListOrCommas::Commas(s) => s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(PathBuf::from).collect(),
    })
}

/// Fine-tuning (TrainingService).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Where runs write their checkpoints (`<output_dir>/<run_id>/`); empty: training is off.
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
#[serde(deny_unknown_fields)]
pub struct AliasRoute {
    pub model: String,
    pub weight: u32,
}

/// A model id that routes Segment requests between models by weight (online A/B, canary),
/// sticky per image: the same image always goes to the same model.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AliasSettings {
    pub name: String,
    pub routes: Vec<AliasRoute>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub grpc_addr: String,
    /// Prometheus exposition (/metrics); empty disables it.
    pub metrics_addr: String,
    pub default_device: String,
    /// libtorch intra-op threads per process (0: one per core).
    pub threads: i32,
    /// Decoder threads per model, each decoding one request at a time (side by side on an equal
    /// share of the intra-op threads, a lone request on all of them) while the model's own
    /// thread finds or makes embeddings; 0: the model's thread decodes too (BENCHMARKS.md, Serving, "decoder threads"). A model's own `decoders` overrides it.
    pub decoders: usize,
    /// How large CPU products run: "auto" (both ways timed once per process), "matmul" or "conv"
    /// (see `model::common::CpuProducts`).
    #[serde(default)]
    pub cpu_products: crate::model::common::CpuProducts,
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

/// The smallest `limits.max_message_bytes`: embeddings stream in chunks of the limit less 64 KiB.
pub const MIN_MESSAGE_BYTES: usize = 128 * 1024;

const DEFAULTS: &str = r#"
grpc_addr = "127.0.0.1:50051"
metrics_addr = "127.0.0.1:9090"
default_device = "auto"
threads = 0
decoders = 2
cpu_products = "auto"
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
max_mask_pixels = 200000000
max_embed_batch = 4
request_timeout_ms = 120000
shutdown_grace_ms = 30000
"#;

impl Settings {
    /// Defaults, then `file` (TOML) if given, then SKINSAM__* environment variables; checked.
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        Self::load_with_env(file, None)
    }

    /// [`Self::load`] reading `env` (variable -> value) instead of the process's environment
    /// when given: for tests.
    pub fn load_with_env(file: Option<&Path>, env: Option<config::Map<String, String>>) -> Result<Self, config::ConfigError> {
        let mut b = config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(f) = file {
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml).required(true));
        }
        // Values stay strings, converted by each field's type: with try_parsing the crate turned
        // a token of digits into a number and back ("0123" -> "123"). Unknown keys are errors
        // (deny_unknown_fields), so a misspelt SKINSAM__AUTH_TOKEN cannot leave auth off unseen.
        let env = config::Environment::with_prefix("SKINSAM").prefix_separator("__").separator("__").source(env);
        let s: Self = b.add_source(env).build()?.try_deserialize()?;
        s.validate().map_err(config::ConfigError::Message)?;
        Ok(s)
    }

    /// Values that would only fail later, or fail open, refused at start with the field named.
    pub fn validate(&self) -> Result<(), String> {
        for (field, token) in [("auth.token", &self.auth.token), ("auth.admin_token", &self.auth.admin_token)] {
            if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
                // An empty token would admit an empty "Bearer " header.
                return Err(format!("{field}: is empty; leave it out to turn it off"));
            }
        }
        let l = &self.limits;
        if l.request_timeout_ms == 0 {
            return Err("limits.request_timeout_ms: must be > 0 (every request would time out at once)".into());
        }
        if l.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(format!("limits.max_message_bytes: {} is under the minimum of {MIN_MESSAGE_BYTES}", l.max_message_bytes));
        }
        for (field, v) in [
            ("limits.max_image_pixels", l.max_image_pixels),
            ("limits.max_prompts", l.max_prompts as u64),
            ("limits.max_points", l.max_points as u64),
            ("limits.max_mask_pixels", l.max_mask_pixels),
            ("cache.max_bytes", self.cache.max_bytes),
        ] {
            if v == 0 {
                return Err(format!("{field}: must be > 0"));
            }
        }
        for (field, n) in std::iter::once(("decoders".to_owned(), self.decoders))
            .chain(self.models.iter().filter_map(|m| m.decoders.map(|n| (format!("models[{}].decoders", m.id), n))))
        {
            if n > crate::engine::MAX_DECODERS {
                return Err(format!("{field}: {n} decoder threads, the limit is {}", crate::engine::MAX_DECODERS));
            }
        }
        if self.threads < 0 {
            return Err(format!("threads: {} is negative (0: one per core)", self.threads));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(format!("log_format: {:?} is not \"text\" or \"json\"", self.log_format));
        }
        let mut ids = std::collections::HashSet::new();
        for m in &self.models {
            if m.id.is_empty() || !ids.insert(m.id.as_str()) {
                return Err(format!("models: id {:?} is empty or named twice", m.id));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, a) in self.aliases.iter().enumerate() {
            if a.name.is_empty() || ids.contains(a.name.as_str()) || !names.insert(a.name.as_str()) {
                return Err(format!("aliases[{i}].name: {:?} is empty, a model's id or named twice", a.name));
            }
            if a.routes.iter().map(|r| u64::from(r.weight)).sum::<u64>() == 0 {
                return Err(format!("aliases[{i}].routes: need at least one route with a weight above 0"));
            }
            if let Some(r) = a.routes.iter().find(|r| !ids.contains(r.model.as_str())) {
                return Err(format!("aliases[{i}].routes: model {:?} is not in models", r.model));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn environment_values_keep_their_text_and_fill_typed_fields() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("SKINSAM__AUTH__TOKEN", "0123"),
                ("SKINSAM__AUTH__ADMIN_TOKEN", "12345678901234567890"),
                ("SKINSAM__LIMITS__QUEUE_DEPTH", "8"),
                ("SKINSAM__EVAL__DATASET_ROOTS", "/a, /b"),
                ("SKINSAM__THREADS", "2"),
                ("SKINSAM__CPU_PRODUCTS", "conv"),
            ]),
        )
        .unwrap();
        assert_eq!(s.auth.token.as_deref(), Some("0123"));
        assert_eq!(s.auth.admin_token.as_deref(), Some("12345678901234567890"));
        assert_eq!((s.limits.queue_depth, s.threads), (8, 2));
        assert_eq!(s.cpu_products, crate::model::common::CpuProducts::Conv);
        assert_eq!(s.eval.dataset_roots, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(Settings::load_with_env(None, env(&[])).unwrap(), Settings::defaults());
    }

    #[test]
    fn misspelt_or_bad_settings_are_refused_with_the_field_named() {
        for (pairs, needle) in [
            (vec![("SKINSAM__AUTH_TOKEN", "s")], "auth_token"),
            (vec![("SKINSAM__AUTH__ADMIN_TOKEN", " ")], "auth.admin_token"),
            (vec![("SKINSAM__LIMITS__REQUEST_TIMEOUT_MS", "0")], "limits.request_timeout_ms"),
            (vec![("SKINSAM__LIMITS__MAX_MESSAGE_BYTES", "1000")], "limits.max_message_bytes"),
            (vec![("SKINSAM__CACHE__MAX_BYTES", "0")], "cache.max_bytes"),
            (vec![("SKINSAM__LOG_FORMAT", "JSON")], "log_format"),
            (vec![("SKINSAM__THREADS", "-1")], "threads"),
            (vec![("SKINSAM__CPU_PRODUCTS", "fast")], "cpu_products"),
            (vec![("SKINSAM__LIMITS__QUEUE_DEPTH", "many")], "queue_depth"),
            (vec![("SKINSAM__DECODERS", "1000")], "decoders"),
        ] {
            let e = Settings::load_with_env(None, env(&pairs)).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} in {e:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        for (toml, needle) in [
            ("[[aliases]]\nname = \"ab\"\nroutes = [{ model = \"nope\", weight = 1 }]\n", "aliases[0].routes"),
            ("[[aliases]]\nname = \"ab\"\nroutes = []\n", "aliases[0].routes"),
            ("[[aliases]]\nname = \"skinsam-tiny\"\nroutes = [{ model = \"skinsam-tiny\", weight = 1 }]\n", "aliases[0].name"),
            ("[limit]\nqueue_depth = 1\n", "limit"),
            ("[[models]]\nid = \"m\"\nvariant = \"tiny\"\ndecoders = 65\n", "models[m].decoders"),
        ] {
            let f = dir.path().join("c.toml");
            std::fs::write(&f, toml).unwrap();
            let e = Settings::load_with_env(Some(&f), env(&[])).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} in {e:?}");
        }
    }
}
