//! Strict checkpoint loading: official `.pth` files (a torch.save'd state_dict, PyTorch's
//! zip + pickle format, read with candle-core's pickle reader because tch's loader cannot read a
//! pickled OrderedDict) and `.safetensors`.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path} is not a readable {format} file: {detail}")]
    Format { path: PathBuf, format: &'static str, detail: String },
    #[error("checkpoint {path} has an unsupported extension (expected .pth, .pt or .safetensors)")]
    Extension { path: PathBuf },
    /// Writing (training, conversion, the embedding store): the server's problem, not the
    /// request's.
    #[error("cannot write {path}: {detail}")]
    Write { path: PathBuf, detail: String },
    #[error("checkpoint {path} is for {found}, not {expected}")]
    WrongVariant { path: PathBuf, expected: String, found: String },
    #[error("checkpoint {path} does not match the model: {problems}")]
    Mismatch { path: PathBuf, problems: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFormat {
    Pth,
    Safetensors,
}

/// What was loaded: shown by the admin API and logged.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: CheckpointFormat,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    pub num_tensors: usize,
    pub num_elements: i64,
}

pub fn format_of(path: &Path) -> Result<CheckpointFormat, CheckpointError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt" | "bin") => Ok(CheckpointFormat::Pth),
        Some("safetensors") => Ok(CheckpointFormat::Safetensors),
        _ => Err(CheckpointError::Extension { path: path.to_owned() }),
    }
}

pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let io = |source| CheckpointError::Io { path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A source of named tensors that can list shapes before reading any data.
trait TensorSource {
    fn shapes(&self) -> BTreeMap<String, Vec<i64>>;
    fn read(&mut self, name: &str) -> Result<Tensor, String>;
}

struct PthSource(candle_core::pickle::PthTensors);

impl TensorSource for PthSource {
    fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.0
            .tensor_infos()
            .iter()
            .map(|(k, info)| (k.clone(), info.layout.shape().dims().iter().map(|&d| d as i64).collect()))
            .collect()
    }

    fn read(&mut self, name: &str) -> Result<Tensor, String> {
        let t = self.0.get(name).map_err(|e| e.to_string())?.ok_or_else(|| format!("tensor {name} vanished"))?;
        if !t.dtype().is_float() {
            return Err(format!("tensor {name} has dtype {:?}, expected a float type", t.dtype()));
        }
        let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let data: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| e.to_string())?;
        Ok(Tensor::from_slice(&data).reshape(&shape))
    }
}

struct SafetensorsSource(HashMap<String, Tensor>);

impl TensorSource for SafetensorsSource {
    fn shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.0.iter().map(|(k, t)| (k.clone(), t.size())).collect()
    }
    fn read(&mut self, name: &str) -> Result<Tensor, String> {
        self.0.remove(name).ok_or_else(|| format!("tensor {name} vanished"))
    }
}

fn open_source(path: &Path) -> Result<(CheckpointFormat, Box<dyn TensorSource>), CheckpointError> {
    let format = format_of(path)?;
    if !path.is_file() {
        return Err(CheckpointError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let source: Box<dyn TensorSource> = match format {
        CheckpointFormat::Pth => {
            let t = candle_core::pickle::PthTensors::new(path, None).map_err(|e| CheckpointError::Format {
                path: path.to_owned(),
                format: "PyTorch (zip + pickle)",
                detail: e.to_string(),
            })?;
            Box::new(PthSource(t))
        }
        CheckpointFormat::Safetensors => {
            let t = Tensor::read_safetensors(path).map_err(|e| CheckpointError::Format {
                path: path.to_owned(),
                format: "safetensors",
                detail: e.to_string(),
            })?;
            Box::new(SafetensorsSource(t.into_iter().collect()))
        }
    };
    Ok((format, source))
}

/// Describes the encoder a state_dict holds ("embed dim 1024, depth 24"), to name a wrong variant.
fn describe_encoder(shapes: &BTreeMap<String, Vec<i64>>) -> Option<String> {
    let dim = shapes.get("image_encoder.patch_embed.proj.weight")?.first().copied()?;
    let depth = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("image_encoder.blocks.")?.split('.').next()?.parse::<i64>().ok())
        .max()?
        + 1;
    let name = super::SamVariant::ALL
        .into_iter()
        .find(|v| {
            let c = v.config();
            c.encoder_embed_dim == dim && c.encoder_depth == depth
        })
        .map(|v| v.name().to_owned());
    Some(match name {
        Some(n) => format!("{n} (embed dim {dim}, depth {depth})"),
        None => format!("an unknown variant (embed dim {dim}, depth {depth})"),
    })
}

/// Loads every tensor of `path` into `vs`, strictly: a missing, unexpected or wrongly shaped
/// tensor is an error naming the key (and both shapes), raised before any weight is changed.
pub fn load_strict(vs: &mut nn::VarStore, path: &Path) -> Result<Checkpoint, CheckpointError> {
    let (format, mut source) = open_source(path)?;
    let found = source.shapes();
    let vars = vs.variables();
    let expected: BTreeMap<String, Vec<i64>> = vars.iter().map(|(k, t)| (k.clone(), t.size())).collect();

    // A different encoder is the common mistake: say which variant the file is.
    let exp_desc = describe_encoder(&expected);
    let found_desc = describe_encoder(&found);
    if let (Some(e), Some(f)) = (&exp_desc, &found_desc) {
        if e != f {
            return Err(CheckpointError::WrongVariant { path: path.to_owned(), expected: e.clone(), found: f.clone() });
        }
    }
    let mut problems = Vec::new();
    for (k, shape) in &expected {
        match found.get(k) {
            None => problems.push(format!("missing key {k} (expected shape {shape:?})")),
            Some(s) if s != shape => problems.push(format!("key {k} has shape {s:?}, expected {shape:?}")),
            Some(_) => {}
        }
    }
    for (k, s) in &found {
        if !expected.contains_key(k) {
            problems.push(format!("unexpected key {k} (shape {s:?})"));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        let mut text = problems.into_iter().take(10).collect::<Vec<_>>().join("; ");
        if n > 10 {
            text.push_str(&format!("; and {} more", n - 10));
        }
        return Err(CheckpointError::Mismatch { path: path.to_owned(), problems: text });
    }
    let mut num_elements = 0;
    tch::no_grad(|| -> Result<(), CheckpointError> {
        for (k, var) in &vars {
            let t = source.read(k).map_err(|detail| CheckpointError::Format {
                path: path.to_owned(),
                format: "checkpoint",
                detail,
            })?;
            num_elements += t.numel() as i64;
            let mut var = var.shallow_clone();
            var.copy_(&t.to_kind(var.kind()).to_device(var.device()));
        }
        Ok(())
    })?;
    Ok(Checkpoint { path: path.to_owned(), format, sha256: sha256_file(path)?, num_tensors: vars.len(), num_elements })
}

/// Writes named tensors as safetensors atomically: to `tmp`, fsync, then rename onto `path`, so a
/// crash or a full disk never leaves a truncated file and the previous `path` stays intact.
pub fn write_safetensors_atomic<T: AsRef<str>>(named: &[(T, Tensor)], path: &Path, tmp: &Path) -> Result<(), CheckpointError> {
    let write = |detail: String| CheckpointError::Write { path: path.to_owned(), detail };
    Tensor::write_safetensors(named, tmp).map_err(|e| write(format!("writing {}: {e}", tmp.display())))?;
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| write(format!("syncing {}: {e}", tmp.display())))?;
    std::fs::rename(tmp, path).map_err(|e| write(format!("renaming {}: {e}", tmp.display())))
}

/// [`write_safetensors_atomic`], and the folder synced so that the rename survives a power cut
/// too: for checkpoints, not for cache files a loss of which costs only a recomputation.
pub fn write_safetensors_durable<T: AsRef<str>>(named: &[(T, Tensor)], path: &Path, tmp: &Path) -> Result<(), CheckpointError> {
    write_safetensors_atomic(named, path, tmp)?;
    sync_parent(path);
    Ok(())
}

/// Flushes the folder holding `path`, so that a rename onto it survives a power cut too. Best
/// effort: the file itself is already complete and synced, and some file systems refuse it.
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
}

/// Writes the model's weights as safetensors, atomically (see [`write_safetensors_atomic`]).
pub fn save_safetensors(vs: &nn::VarStore, path: &Path) -> Result<(), CheckpointError> {
    save_safetensors_as(vs, path, Kind::Float)
}

/// Tensors smaller than this stay fp32 in a half-precision file: biases, norms, the prompt
/// encoder's Fourier matrix; they cost nothing and keep their precision.
const HALF_MIN_ELEMENTS: i64 = 4096;

/// As [`save_safetensors`], with the large tensors stored as `kind` (fp16 halves the file; the
/// loader converts back to the model's precision).
pub fn save_safetensors_as(vs: &nn::VarStore, path: &Path, kind: Kind) -> Result<(), CheckpointError> {
    let vars = vs.variables();
    let mut named: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(k, t)| {
            let kind = if t.numel() as i64 >= HALF_MIN_ELEMENTS { kind } else { Kind::Float };
            (k, t.to_kind(kind).to_device(tch::Device::Cpu).contiguous())
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors_durable(&named, path, &path.with_extension("safetensors.tmp"))
}
