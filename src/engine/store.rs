//! Embeddings persisted on disk, so that a second evaluation or a training run does not
//! re-encode: `<root>/<checkpoint sha256 prefix>/<image key>.safetensors`. Only models loaded
//! from a checkpoint have a checksum; random-weight models never persist. Writes are atomic
//! (temporary file, fsync, rename) so a crash leaves no truncated file behind.

use crate::predictor::ImageEmbedding;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The key of an image in the caches: its bytes' SHA-256 (first 128 bits, hex).
pub fn image_key(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(bytes)[..16])
}

pub struct EmbeddingStore {
    dir: PathBuf,
    device: Device,
}

impl EmbeddingStore {
    /// A store for one model: None without a root or a checksum.
    pub fn new(root: Option<&Path>, checksum: Option<&str>, precision: crate::model::Precision, device: Device) -> Option<Self> {
        let (root, sum) = (root?, checksum?);
        // The encoder's precision changes the embedding: keep them apart.
        Some(Self { dir: root.join(format!("{}-{precision:?}", &sum[..16.min(sum.len())]).to_lowercase()), device })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.safetensors"))
    }

    /// The stored embedding of `key`; a missing or unreadable file is a miss.
    pub fn get(&self, key: &str) -> Option<ImageEmbedding> {
        let path = self.path(key);
        if !path.is_file() {
            return None;
        }
        let named = match Tensor::read_safetensors(&path) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable stored embedding; encoding again");
                return None;
            }
        };
        let get = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
        let (features, sizes) = (get("features")?, get("sizes")?);
        let s = Vec::<i64>::try_from(sizes).ok()?;
        (s.len() == 4).then(|| ImageEmbedding {
            features: crate::model::channels_last(&features.to_device(self.device)),
            original_size: (s[0], s[1]),
            input_size: (s[2], s[3]),
            prefix: None,
        })
    }

    pub fn put(&self, key: &str, e: &ImageEmbedding) {
        if let Err(err) = self.write(key, e) {
            tracing::warn!(dir = %self.dir.display(), error = %err, "could not persist an embedding");
        }
    }

    fn write(&self, key: &str, e: &ImageEmbedding) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let sizes = Tensor::from_slice(&[e.original_size.0, e.original_size.1, e.input_size.0, e.input_size.1]);
        let features = e.features.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let path = self.path(key);
        // The temporary name carries the process id: servers may share a store.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        crate::model::checkpoint::write_safetensors_atomic(&[("features", features), ("sizes", sizes)], &path, &tmp)?;
        Ok(())
    }
}
