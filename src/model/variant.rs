//! The SAM variants and their build numbers (segment_anything/build_sam.py).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A SAM architecture. vit_b/vit_l/vit_h are the official ones; `Tiny` is a small random-weight
/// variant with the same structure, used by the tests; `SkinsamTiny` is the project's own small
/// model (256-px input, trained from scratch on HAM10000: see MODEL_CARD.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamVariant {
    VitB,
    VitL,
    VitH,
    Tiny,
    SkinsamTiny,
}

/// Every number `build_sam` passes to the three modules.
#[derive(Clone, Debug, PartialEq)]
pub struct SamConfig {
    pub img_size: i64,
    pub patch_size: i64,
    pub in_chans: i64,
    pub encoder_embed_dim: i64,
    pub encoder_depth: i64,
    pub encoder_num_heads: i64,
    pub encoder_global_attn_indexes: &'static [i64],
    pub window_size: i64,
    pub mlp_ratio: i64,
    pub encoder_norm_eps: f64,
    pub prompt_embed_dim: i64,
    pub mask_in_chans: i64,
    pub decoder_depth: i64,
    pub decoder_num_heads: i64,
    pub decoder_mlp_dim: i64,
    pub attention_downsample_rate: i64,
    pub num_multimask_outputs: i64,
    pub iou_head_depth: i64,
    pub iou_head_hidden_dim: i64,
}

impl SamConfig {
    /// Side of the (square) image embedding grid: 64 for the official 1024-px models.
    pub fn embedding_size(&self) -> i64 {
        self.img_size / self.patch_size
    }
    /// Side of the low-resolution mask logits (and of a mask prompt): 4x the embedding grid.
    pub fn low_res_size(&self) -> i64 {
        4 * self.embedding_size()
    }
}

const COMMON: SamConfig = SamConfig {
    img_size: 1024,
    patch_size: 16,
    in_chans: 3,
    encoder_embed_dim: 768,
    encoder_depth: 12,
    encoder_num_heads: 12,
    encoder_global_attn_indexes: &[2, 5, 8, 11],
    window_size: 14,
    mlp_ratio: 4,
    encoder_norm_eps: 1e-6,
    prompt_embed_dim: 256,
    mask_in_chans: 16,
    decoder_depth: 2,
    decoder_num_heads: 8,
    decoder_mlp_dim: 2048,
    attention_downsample_rate: 2,
    num_multimask_outputs: 3,
    iou_head_depth: 3,
    iou_head_hidden_dim: 256,
};

impl SamVariant {
    pub const ALL: [SamVariant; 5] = [Self::VitB, Self::VitL, Self::VitH, Self::Tiny, Self::SkinsamTiny];

    pub fn config(self) -> SamConfig {
        match self {
            Self::VitB => COMMON,
            Self::VitL => SamConfig {
                encoder_embed_dim: 1024,
                encoder_depth: 24,
                encoder_num_heads: 16,
                encoder_global_attn_indexes: &[5, 11, 17, 23],
                ..COMMON
            },
            Self::VitH => SamConfig {
                encoder_embed_dim: 1280,
                encoder_depth: 32,
                encoder_num_heads: 16,
                encoder_global_attn_indexes: &[7, 15, 23, 31],
                ..COMMON
            },
            // Same pipeline (1024-px input, windowed + global attention, full decoder structure)
            // with narrow layers, so tests and golden files stay small.
            Self::Tiny => SamConfig {
                encoder_embed_dim: 32,
                encoder_depth: 2,
                encoder_num_heads: 2,
                encoder_global_attn_indexes: &[1],
                prompt_embed_dim: 32,
                decoder_num_heads: 4,
                decoder_mlp_dim: 64,
                iou_head_hidden_dim: 32,
                ..COMMON
            },
            // Dermoscopy images are small (HAM10000's copies here are 200x150), so a 256-px input
            // loses nothing; 16x16 tokens make global attention in every block cheap, so there
            // are no windows. The prompt encoder and the two-way decoder keep vit_b's widths,
            // with a narrower decoder MLP (1024).
            Self::SkinsamTiny => SamConfig {
                img_size: 256,
                encoder_embed_dim: 192,
                encoder_depth: 6,
                encoder_num_heads: 3,
                encoder_global_attn_indexes: &[0, 1, 2, 3, 4, 5],
                decoder_mlp_dim: 1024,
                ..COMMON
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::VitB => "vit_b",
            Self::VitL => "vit_l",
            Self::VitH => "vit_h",
            Self::Tiny => "tiny",
            Self::SkinsamTiny => "skinsam_tiny",
        }
    }
}

impl fmt::Display for SamVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamVariant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("unknown SAM variant {s:?} (expected one of vit_b, vit_l, vit_h, tiny, skinsam_tiny)"))
    }
}
