//! Mask decoder (segment_anything/modeling/mask_decoder.py): IoU token + mask tokens through the
//! two-way transformer, upscaled image features, per-token hypernetwork MLPs and an IoU head.

use super::common::{linear_with, LayerNorm2d, Mlp};
use super::transformer::{ImageProjections, TwoWayTransformer};
use super::variant::SamConfig;
use tch::nn;
use tch::{Device, Kind, Tensor};

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

    /// The prompt-independent part of decoding `image_embeddings` (1, C, H, W) with a dense prompt
    /// embedding shared by all prompts (`dense` (1, C, H, W): the no-mask embedding), to pass to
    /// [`Self::predict_masks_with`].
    pub fn prefix(&self, image_embeddings: &Tensor, image_pe: &Tensor, dense: &Tensor) -> ImageProjections {
        self.transformer.prefix(&image_tokens(&(image_embeddings + dense)), &image_tokens(image_pe))
    }

    /// All outputs: low-res mask logits (B, 4, L, L) (L = 4x the embedding grid) and IoU predictions (B, 4), token 0 first.
    /// `image_embeddings` and `dense` are (1, C, H, W), shared by all B prompts, or (B, C, H, W),
    /// one per prompt.
    pub fn predict_masks(&self, image_embeddings: &Tensor, image_pe: &Tensor, sparse: &Tensor, dense: &Tensor) -> (Tensor, Tensor) {
        self.predict_masks_with(image_embeddings, image_pe, sparse, dense, None)
    }

    /// [`Self::predict_masks`] with the prefix of these `image_embeddings` and `dense` computed
    /// before (the same numbers, without the work).
    pub fn predict_masks_with(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        prefix: Option<&ImageProjections>,
    ) -> (Tensor, Tensor) {
        let bsz = sparse.size()[0];
        let output_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0);
        let output_tokens = output_tokens.unsqueeze(0).expand([bsz, -1, -1], false);
        let sparse = sparse.to_kind(output_tokens.kind());
        let tokens = Tensor::cat(&[output_tokens, sparse], 1);
        // Image tokens stay at batch 1 when every prompt shares them: SAM repeats them per prompt,
        // but the first block's projections of them are the same for each.
        let keys = image_tokens(&(image_embeddings + dense));
        let pe = image_tokens(image_pe);
        let computed;
        let prefix = match prefix {
            Some(p) => p,
            None => {
                computed = self.transformer.prefix(&keys, &pe);
                &computed
            }
        };
        let (_, _, h, w) = image_embeddings.size4().expect("BCHW");
        let (hs, src) = self.transformer.forward(&keys, &pe, &tokens, prefix);
        let iou_token_out = hs.select(1, 0);
        let hyper_in: Vec<Tensor> =
            self.output_hypernetworks_mlps.iter().enumerate().map(|(i, mlp)| hs.select(1, 1 + i as i64).apply(mlp)).collect();
        let masks = self.upscaled_masks(&src, (h, w), &Tensor::stack(&hyper_in, 1));
        let iou_pred = iou_token_out.apply(&self.iou_prediction_head);
        (masks, iou_pred)
    }

    /// `output_upscaling` then the hypernetwork product: src (B, HW, C) -> masks (B, K, 4H, 4W)
    /// for hyper_in (B, K, C/8). The two stride-2 transposed convolutions are done as matrix
    /// products on channels-last tokens, with their LayerNorm2d as a plain LayerNorm over the last
    /// axis and one small permutation of the K masks at the end: libtorch's CPU
    /// conv_transpose2d, the NCHW channel norm and the two pixel shuffles took a third of the
    /// decoder's time. Same arithmetic as the module, summed in another order.
    fn upscaled_masks(&self, src: &Tensor, (h, w): (i64, i64), hyper_in: &Tensor) -> Tensor {
        let b = src.size()[0];
        let (w0, b0) = kernel_as_matrix(&self.upscale_conv0);
        let x = linear_with(&src.reshape([-1, src.size()[2]]), &w0, Some(&b0));
        // Rows (b, i, j), columns (kh, kw, c1) -> rows (b, i, j, kh, kw), c1 columns.
        let c1 = self.upscale_ln1.weight.size()[0];
        let x = x
            .view([-1, c1])
            .layer_norm([c1], Some(&self.upscale_ln1.weight), Some(&self.upscale_ln1.bias), LayerNorm2d::EPS, false);
        let x = gelu_owned(x);
        let (w1, b1) = kernel_as_matrix(&self.upscale_conv3);
        let c2 = w1.size()[0] / (UPSCALE_STRIDE * UPSCALE_STRIDE);
        // Rows (b, i, j, kh1, kw1, kh2, kw2): output pixel (4i + 2kh1 + kh2, 4j + 2kw1 + kw2).
        let x = gelu_owned(linear_with(&x, &w1, Some(&b1)));
        let per_pixel = x.view([b, -1, c2]).matmul(&hyper_in.transpose(1, 2)); // (B, 16HW, K)
        pixels_to_masks(&per_pixel, (h, w))
    }
}

/// Kernel size and stride of both transposed convolutions of `output_upscaling`.
const UPSCALE_STRIDE: i64 = 2;

/// GELU of a tensor nothing else holds, in place outside autograd: the upscaling's activations
/// are 4-8 MiB per prompt, and each fresh one costs page faults as well as the pass.
fn gelu_owned(mut x: Tensor) -> Tensor {
    if x.requires_grad() {
        return x.gelu("none");
    }
    let _ = x.gelu_("none");
    x
}

/// Per-pixel mask values (B, 16HW, K), rows ordered (i, j, kh1, kw1, kh2, kw2) as the two
/// transposed convolutions leave them, -> masks (B, K, 4H, 4W) with row 4i + 2kh1 + kh2 and column
/// 4j + 2kw1 + kw2. On the CPU in fp32 one pass in Rust: libtorch's 8-dimensional permuting copy
/// took 1.1 ms per vit_b prompt, about a twentieth of the decode.
fn pixels_to_masks(per_pixel: &Tensor, (h, w): (i64, i64)) -> Tensor {
    let (b, rows, k) = per_pixel.size3().expect("(B, 16HW, K)");
    let s = UPSCALE_STRIDE;
    assert_eq!(rows, h * w * s.pow(4), "one row per output pixel");
    if per_pixel.device() != Device::Cpu || per_pixel.kind() != Kind::Float || per_pixel.requires_grad() || per_pixel.numel() == 0 {
        return per_pixel.view(&[b, h, w, s, s, s, s, k][..]).permute([0, 7, 1, 3, 5, 2, 4, 6]).reshape([b, k, h * s * s, w * s * s]);
    }
    let n = per_pixel.numel();
    let mut src = vec![0f32; n];
    per_pixel.contiguous().copy_data(&mut src, n);
    let (k, s, h, w) = (k as usize, s as usize, h as usize, w as usize);
    let (out_h, out_w) = (h * s * s, w * s * s);
    let mut dst = vec![0f32; n];
    for (src, dst) in src.chunks_exact(n / b as usize).zip(dst.chunks_exact_mut(n / b as usize)) {
        for (r, values) in src.chunks_exact(k).enumerate() {
            // r = ((((i * w + j) * s + kh1) * s + kw1) * s + kh2) * s + kw2
            let (rest, kw2) = (r / s, r % s);
            let (rest, kh2) = (rest / s, rest % s);
            let (rest, kw1) = (rest / s, rest % s);
            let (ij, kh1) = (rest / s, rest % s);
            let (i, j) = (ij / w, ij % w);
            let (y, x) = ((i * s + kh1) * s + kh2, (j * s + kw1) * s + kw2);
            for (m, &v) in values.iter().enumerate() {
                dst[(m * out_h + y) * out_w + x] = v;
            }
        }
    }
    Tensor::from_slice(&dst).view([b, k as i64, out_h as i64, out_w as i64])
}

/// A ConvTranspose2d with kernel = stride as a linear layer: weight (Cin, Cout, kh, kw) ->
/// (kh * kw * Cout, Cin) with rows ordered (kh, kw, Cout), and the bias tiled to match.
fn kernel_as_matrix(conv: &nn::ConvTranspose2D) -> (Tensor, Tensor) {
    let (cin, cout, kh, kw) = conv.ws.size4().expect("ConvTranspose2d weight");
    debug_assert_eq!((kh, kw), (UPSCALE_STRIDE, UPSCALE_STRIDE));
    let bias = conv.bs.as_ref().expect("output_upscaling convolutions have a bias");
    (conv.ws.permute([2, 3, 1, 0]).reshape([kh * kw * cout, cin]), bias.repeat([kh * kw]))
}

/// (B, C, H, W) -> tokens (B, HW, C), contiguous: a free view of a channels-last embedding
/// ([`super::channels_last`]), else a copy. Strided image tokens made every add and norm after
/// them copy or crawl.
fn image_tokens(image: &Tensor) -> Tensor {
    image.flatten(2, -1).transpose(1, 2).contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SamVariant;
    use tch::nn::Module;

    #[test]
    fn upscaling_as_matrix_products_equals_the_transposed_convolutions() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let d = MaskDecoder::new(&vs.root(), &SamVariant::SkinsamTiny.config());
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let _ = v.normal_(0.0, 0.2);
            }
        });
        let (b, c, h, w) = (2, 256, 6, 5);
        let opts = (Kind::Float, Device::Cpu);
        let src = Tensor::randn([b, h * w, c], opts);
        let hyper = Tensor::randn([b, 4, c / 8], opts);
        // Inference (in-place GELUs, the masks laid out in Rust) and autograd (libtorch's ops).
        let fast = tch::no_grad(|| d.upscaled_masks(&src, (h, w), &hyper));
        let tracked = d.upscaled_masks(&src, (h, w), &hyper);
        assert!(!fast.requires_grad() && tracked.requires_grad());
        // The module as upstream runs it: NCHW, ConvTranspose2d, LayerNorm2d, GELU.
        let x = src.transpose(1, 2).reshape([b, c, h, w]);
        let x = d.upscale_ln1.forward(&x.apply(&d.upscale_conv0)).gelu("none");
        let x = x.apply(&d.upscale_conv3).gelu("none");
        let want = hyper.matmul(&x.view([b, c / 8, -1])).view([b, 4, 4 * h, 4 * w]);
        for got in [&fast, &tracked] {
            assert_eq!(got.size(), want.size());
            let diff = (got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "max abs diff {diff}");
        }
    }
}
