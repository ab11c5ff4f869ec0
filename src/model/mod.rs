//! The Segment Anything model in tch. Parameter paths equal the official state_dict keys
//! (`image_encoder.blocks.0.attn.qkv.weight`, ...), so official checkpoints load as they are.

pub mod checkpoint;
pub mod common;
pub mod image_encoder;
pub mod mask_decoder;
pub mod prompt_encoder;
mod rel_pos_softmax;
pub mod transformer;
pub mod variant;
mod window_ops;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use image_encoder::ImageEncoderViT;
pub use mask_decoder::MaskDecoder;
pub use prompt_encoder::{PromptBatch, PromptEncoder};
pub use transformer::ImageProjections;
pub use variant::{SamConfig, SamVariant};

use tch::{nn, Device, Kind, Tensor};

/// Per-channel RGB mean and std of the official pre-processing (0..255 scale).
pub const PIXEL_MEAN: [f64; 3] = [123.675, 116.28, 103.53];
pub const PIXEL_STD: [f64; 3] = [58.395, 57.12, 57.375];
/// Mask logits above this are foreground.
pub const MASK_THRESHOLD: f64 = 0.0;

/// The same (B, C, H, W) values laid out channels-last (strides of (B, H, W, C)), so that the
/// mask decoder's (B, HW, C) token view of an embedding needs no copy.
pub fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Numeric precision of the image encoder. The prompt encoder and mask decoder always run in
/// fp32: they are cheap, and the Fourier positional encoding loses its meaning in 8-bit mantissas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Self::Fp32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
            Self::Fp16 => Kind::Half,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Self::Fp32),
            "bf16" => Ok(Self::Bf16),
            "fp16" => Ok(Self::Fp16),
            _ => Err(format!("unknown precision {s:?} (expected fp32, bf16 or fp16)")),
        }
    }
}

/// A SAM model: the three modules in one VarStore.
pub struct Sam {
    pub variant: SamVariant,
    pub config: SamConfig,
    pub vs: nn::VarStore,
    pub image_encoder: ImageEncoderViT,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
    precision: Precision,
}

impl Sam {
    /// A model with freshly initialised (random) weights on `device`.
    pub fn new(variant: SamVariant, device: Device) -> Self {
        let config = variant.config();
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let image_encoder = ImageEncoderViT::new(&(&root / "image_encoder"), &config);
        let prompt_encoder = PromptEncoder::new(&(&root / "prompt_encoder"), &config);
        let mask_decoder = MaskDecoder::new(&(&root / "mask_decoder"), &config);
        Self { variant, config, vs, image_encoder, prompt_encoder, mask_decoder, precision: Precision::Fp32 }
    }

    /// Builds the variant and loads `path` strictly (.pth state_dict or .safetensors).
    pub fn load(variant: SamVariant, path: &std::path::Path, device: Device) -> Result<(Self, Checkpoint), CheckpointError> {
        let mut sam = Self::new(variant, device);
        let ckpt = checkpoint::load_strict(&mut sam.vs, path)?;
        Ok((sam, ckpt))
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Casts the image encoder's weights; call before inference, not during training.
    pub fn set_precision(&mut self, precision: Precision) {
        let kind = precision.kind();
        tch::no_grad(|| {
            for (name, var) in self.vs.variables() {
                if name.starts_with("image_encoder.") {
                    let mut var = var;
                    var.set_data(&var.to_kind(kind));
                }
            }
        });
        self.precision = precision;
    }

    /// Official pre-processing of a (1, 3, h, w) u8 tensor already resized so that its longest
    /// side is `img_size`: normalise, then zero-pad bottom and right to a square.
    pub fn preprocess(&self, image: &Tensor) -> Tensor {
        let device = image.device();
        let mean = Tensor::from_slice(&PIXEL_MEAN).to_kind(Kind::Float).to_device(device).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&PIXEL_STD).to_kind(Kind::Float).to_device(device).view([1, 3, 1, 1]);
        let x = (image.to_kind(Kind::Float) - mean) / std;
        let (_, _, h, w) = x.size4().expect("NCHW image");
        let s = self.config.img_size;
        x.constant_pad_nd([0, s - w, 0, s - h])
    }

    /// Image embedding (B, C, 64, 64) in fp32, whatever the encoder's precision.
    pub fn embed(&self, preprocessed: &Tensor) -> Tensor {
        self.image_encoder.forward(&preprocessed.to_kind(self.precision.kind())).to_kind(Kind::Float)
    }

    /// The prompt encoder and mask decoder, borrowed: what decoding needs.
    pub fn parts(&self) -> DecoderParts<'_> {
        DecoderParts { config: &self.config, prompt_encoder: &self.prompt_encoder, mask_decoder: &self.mask_decoder }
    }

    /// A decoder of its own sharing this model's prompt encoder and mask decoder weights (no
    /// copy), for another thread: tch tensors are Send but not Sync, so each thread needs its own
    /// handles, and decoding only reads the weights.
    pub fn decoder_replica(&self) -> SamDecoder {
        let vs = nn::VarStore::new(self.device());
        let root = vs.root();
        let prompt_encoder = PromptEncoder::new(&(&root / "prompt_encoder"), &self.config);
        let mask_decoder = MaskDecoder::new(&(&root / "mask_decoder"), &self.config);
        let ours = self.vs.variables();
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                let src = ours.get(&name).unwrap_or_else(|| panic!("{name} is built by Sam::new too"));
                var.set_data(src);
            }
        });
        SamDecoder { config: self.config.clone(), _vs: vs, prompt_encoder, mask_decoder }
    }

    /// Low-res logits (B, K, L, L) (L = 4x the embedding grid) and IoU predictions (B, K) for a batch of prompts on
    /// one image embedding (1, C, 64, 64), or one embedding per prompt (B, C, 64, 64).
    pub fn decode(&self, embedding: &Tensor, prompts: &PromptBatch, multimask_output: bool) -> (Tensor, Tensor) {
        self.parts().decode_with(embedding, None, prompts, multimask_output)
    }

    /// [`DecoderParts::decode_with`].
    pub fn decode_with(&self, embedding: &Tensor, prefix: Option<&ImageProjections>, prompts: &PromptBatch, multimask_output: bool) -> (Tensor, Tensor) {
        self.parts().decode_with(embedding, prefix, prompts, multimask_output)
    }

    /// Every output of the decoder, (B, 4, L, L) logits (L = 4x the embedding grid) and (B, 4) IoU predictions: token 0
    /// (the single-mask output) then the three multimask ones. Training uses all of them.
    pub fn decode_all(&self, embedding: &Tensor, prompts: &PromptBatch) -> (Tensor, Tensor) {
        self.parts().decode_all_with(embedding, None, prompts)
    }

    /// [`DecoderParts::decoder_prefix`].
    pub fn decoder_prefix(&self, embedding: &Tensor) -> ImageProjections {
        self.parts().decoder_prefix(embedding)
    }

    /// [`DecoderParts::decode_all_with`].
    pub fn decode_all_with(&self, embedding: &Tensor, prefix: Option<&ImageProjections>, prompts: &PromptBatch) -> (Tensor, Tensor) {
        self.parts().decode_all_with(embedding, prefix, prompts)
    }

    /// [`DecoderParts::postprocess_masks`].
    pub fn postprocess_masks(&self, low_res: &Tensor, input_size: (i64, i64), original_size: (i64, i64)) -> Tensor {
        self.parts().postprocess_masks(low_res, input_size, original_size)
    }

    /// Number of parameters (weights and buffers in the state_dict).
    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }
}

/// What decoding prompts needs of a model, borrowed from a [`Sam`] or a [`SamDecoder`].
#[derive(Clone, Copy)]
pub struct DecoderParts<'a> {
    pub config: &'a SamConfig,
    pub prompt_encoder: &'a PromptEncoder,
    pub mask_decoder: &'a MaskDecoder,
}

impl DecoderParts<'_> {
    /// Low-res logits (B, K, L, L) and IoU predictions (B, K) ([`Sam::decode`]) with the embedding's decoder prefix, when known (see [`Self::decoder_prefix`]).
    pub fn decode_with(&self, embedding: &Tensor, prefix: Option<&ImageProjections>, prompts: &PromptBatch, multimask_output: bool) -> (Tensor, Tensor) {
        let (masks, iou) = self.decode_all_with(embedding, prefix, prompts);
        self.mask_decoder.select_outputs(&masks, &iou, multimask_output)
    }

    /// The decoder's work on `embedding` that no prompt without a mask input changes; computed
    /// once per image (at embedding time), it makes each later decode cheaper.
    pub fn decoder_prefix(&self, embedding: &Tensor) -> ImageProjections {
        let (_, dense) = self.prompt_encoder.forward(&PromptBatch::default());
        self.mask_decoder.prefix(embedding, &self.prompt_encoder.get_dense_pe(), &dense)
    }

    /// [`Sam::decode_all`] with `prefix` = `self.decoder_prefix(embedding)` when known; it is
    /// used only for prompts without a mask input.
    pub fn decode_all_with(&self, embedding: &Tensor, prefix: Option<&ImageProjections>, prompts: &PromptBatch) -> (Tensor, Tensor) {
        let (mut sparse, mut dense) = self.prompt_encoder.forward(prompts);
        let shared_dense = prompts.masks.is_none();
        if shared_dense {
            // The no-mask embedding, the same for every prompt: batch 1 keeps the image side shared.
            dense = dense.narrow(0, 0, 1);
        }
        let n = embedding.size()[0];
        if n > 1 && prompts.points.is_none() && prompts.boxes.is_none() && prompts.masks.is_none() {
            // No prompt at all for a batch of images: the same empty prompt for each of them.
            sparse = sparse.expand([n, -1, -1], false);
        }
        let pe = self.prompt_encoder.get_dense_pe();
        let prefix = if shared_dense { prefix } else { None };
        self.mask_decoder.predict_masks_with(embedding, &pe, &sparse, &dense, prefix)
    }

    /// Official post-processing: logits -> img_size square -> crop the un-padded part -> original size.
    pub fn postprocess_masks(&self, low_res: &Tensor, input_size: (i64, i64), original_size: (i64, i64)) -> Tensor {
        let s = self.config.img_size;
        let low = low_res.size()[3];
        let cropped = if s % low == 0 {
            // Only the un-padded part: with the scale given, the bilinear source coordinates of
            // each output pixel are those of the full square's, so this is its crop, computed
            // without the padding rows and columns (a quarter of the work for a 4:3 image).
            let scale = Some((s / low) as f64);
            low_res.upsample_bilinear2d([input_size.0, input_size.1], false, scale, scale)
        } else {
            let up = low_res.upsample_bilinear2d([s, s], false, None, None);
            up.narrow(2, 0, input_size.0).narrow(3, 0, input_size.1)
        };
        cropped.upsample_bilinear2d([original_size.0, original_size.1], false, None, None)
    }
}

/// A model's prompt encoder and mask decoder on their own, sharing the model's weights
/// ([`Sam::decoder_replica`]).
pub struct SamDecoder {
    pub config: SamConfig,
    /// Owns the replica's variables (their data is the model's).
    _vs: nn::VarStore,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
}

impl SamDecoder {
    pub fn parts(&self) -> DecoderParts<'_> {
        DecoderParts { config: &self.config, prompt_encoder: &self.prompt_encoder, mask_decoder: &self.mask_decoder }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica decodes as the model does, because it reads the model's own weights: changed in
    /// the model, they are changed in the replica.
    #[test]
    fn a_decoder_replica_shares_the_models_weights() {
        tch::manual_seed(0);
        let sam = Sam::new(SamVariant::Tiny, Device::Cpu);
        let replica = sam.decoder_replica();
        let g = sam.config.embedding_size();
        let emb = Tensor::randn([1, sam.config.prompt_embed_dim, g, g], (Kind::Float, Device::Cpu));
        let boxes = Tensor::from_slice(&[10.0f32, 20.0, 120.0, 90.0]).view([1, 4]);
        let prompts = PromptBatch { boxes: Some(&boxes), ..Default::default() };
        let decode = |p: DecoderParts| tch::no_grad(|| p.decode_with(&emb, None, &prompts, true));
        let (a, ai) = decode(sam.parts());
        let (b, bi) = decode(replica.parts());
        assert!(a.equal(&b) && ai.equal(&bi));
        tch::no_grad(|| {
            for (name, mut v) in sam.vs.variables() {
                if name.starts_with("mask_decoder.output_hypernetworks_mlps.") {
                    let _ = v.fill_(0.01);
                }
            }
        });
        let (c, _) = decode(sam.parts());
        let (d, _) = decode(replica.parts());
        assert!(!c.equal(&a), "the change reaches the model's output");
        assert!(c.equal(&d), "and the replica's");
    }
}
