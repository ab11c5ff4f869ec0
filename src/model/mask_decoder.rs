//! Mask decoder (segment_anything/modeling/mask_decoder.py): IoU token + mask tokens through the
//! two-way transformer, upscaled image features, per-token hypernetwork MLPs and an IoU head.

use super::common::{LayerNorm2d, Mlp};
use super::transformer::TwoWayTransformer;
use super::variant::SamConfig;
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug)]
pub struct MaskDecoder {
    transformer: TwoWayTransformer,
    iou_token: Tensor,
    mask_tokens: Tensor,
    num_mask_tokens: i64,
    upscale_conv0: nn::ConvTranspose2D,
    upscale_ln1: LayerNorm2d,
    upscale_conv3: nn::ConvTranspose2D,
    output_hypernetworks_mlps: Vec<Mlp>,
    iou_prediction_head: Mlp,
}

impl MaskDecoder {
    pub fn new(p: &nn::Path, cfg: &SamConfig) -> Self {
        let dim = cfg.prompt_embed_dim;
        let num_mask_tokens = cfg.num_multimask_outputs + 1;
        let up = p / "output_upscaling";
        let s2 = nn::ConvTransposeConfig { stride: 2, ..Default::default() };
        let hyper = p / "output_hypernetworks_mlps";
        Self {
            transformer: TwoWayTransformer::new(
                &(p / "transformer"),
                cfg.decoder_depth,
                dim,
                cfg.decoder_num_heads,
                cfg.decoder_mlp_dim,
                cfg.attention_downsample_rate,
            ),
            iou_token: nn::embedding(p / "iou_token", 1, dim, Default::default()).ws,
            mask_tokens: nn::embedding(p / "mask_tokens", num_mask_tokens, dim, Default::default()).ws,
            num_mask_tokens,
            upscale_conv0: nn::conv_transpose2d(&up / 0, dim, dim / 4, 2, s2),
            upscale_ln1: LayerNorm2d::new(&(&up / 1), dim / 4),
            upscale_conv3: nn::conv_transpose2d(&up / 3, dim / 4, dim / 8, 2, s2),
            output_hypernetworks_mlps: (0..num_mask_tokens).map(|i| Mlp::new(&(&hyper / i), dim, dim, dim / 8, 3)).collect(),
            iou_prediction_head: Mlp::new(
                &(p / "iou_prediction_head"),
                dim,
                cfg.iou_head_hidden_dim,
                num_mask_tokens,
                cfg.iou_head_depth,
            ),
        }
    }

    /// The outputs a caller asked for out of all of `predict_masks`'s: tokens 1..3 (multimask) or
    /// token 0 (single mask).
    pub fn select_outputs(&self, masks: &Tensor, iou: &Tensor, multimask_output: bool) -> (Tensor, Tensor) {
        if multimask_output {
            (masks.narrow(1, 1, self.num_mask_tokens - 1), iou.narrow(1, 1, self.num_mask_tokens - 1))
        } else {
            (masks.narrow(1, 0, 1), iou.narrow(1, 0, 1))
        }
    }

    /// All outputs: low-res mask logits (B, 4, 256, 256) and IoU predictions (B, 4), token 0 first.
    /// `image_embeddings` is (1, C, H, W), shared by all B prompts, or (B, C, H, W), one per prompt.
    pub fn predict_masks(&self, image_embeddings: &Tensor, image_pe: &Tensor, sparse: &Tensor, dense: &Tensor) -> (Tensor, Tensor) {
        let bsz = sparse.size()[0];
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0);
        let output_tokens = output_tokens.unsqueeze(0).expand([bsz, -1, -1], false);
        let sparse = sparse.to_kind(output_tokens.kind());
        let tokens = Tensor::cat(&[output_tokens, sparse], 1);
        let src = if image_embeddings.size()[0] == bsz {
            image_embeddings.shallow_clone()
        } else {
            image_embeddings.expand([bsz, -1, -1, -1], false)
        };
        let src = src + dense;
        let pos_src = image_pe.expand([bsz, -1, -1, -1], false);
        let (b, c, h, w) = src.size4().expect("BCHW");
        let (hs, src) = self.transformer.forward(&src, &pos_src, &tokens);
        let iou_token_out = hs.select(1, 0);
        let src = src.transpose(1, 2).reshape([b, c, h, w]);
        let upscaled = self.upscale_ln1.forward(&src.apply(&self.upscale_conv0)).gelu("none");
        let upscaled = upscaled.apply(&self.upscale_conv3).gelu("none");
        let hyper_in: Vec<Tensor> = self
            .output_hypernetworks_mlps
            .iter()
            .enumerate()
            .map(|(i, mlp)| hs.select(1, 1 + i as i64).apply(mlp))
            .collect();
        let hyper_in = Tensor::stack(&hyper_in, 1);
        let (b, c, h, w) = upscaled.size4().expect("BCHW");
        let masks = hyper_in.matmul(&upscaled.view([b, c, h * w])).view([b, -1, h, w]);
        let iou_pred = iou_token_out.apply(&self.iou_prediction_head);
        (masks, iou_pred)
    }
}
