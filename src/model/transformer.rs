//! Two-way transformer of the mask decoder (segment_anything/modeling/transformer.py).

use super::common::{Activation, MlpBlock};
use tch::nn;
use tch::Tensor;

/// Attention with optional down-projection of the embedding width (`downsample_rate`).
#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    num_heads: i64,
}

impl Attention {
    fn new(p: &nn::Path, embedding_dim: i64, num_heads: i64, downsample_rate: i64) -> Self {
        let internal = embedding_dim / downsample_rate;
        Self {
            q_proj: nn::linear(p / "q_proj", embedding_dim, internal, Default::default()),
            k_proj: nn::linear(p / "k_proj", embedding_dim, internal, Default::default()),
            v_proj: nn::linear(p / "v_proj", embedding_dim, internal, Default::default()),
            out_proj: nn::linear(p / "out_proj", internal, embedding_dim, Default::default()),
            num_heads,
        }
    }

    fn separate_heads(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("BNC");
        x.reshape([b, n, self.num_heads, c / self.num_heads]).transpose(1, 2)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let q = self.separate_heads(&q.apply(&self.q_proj));
        let k = self.separate_heads(&k.apply(&self.k_proj));
        let v = self.separate_heads(&v.apply(&self.v_proj));
        let c_per_head = q.size()[3];
        let attn = (q.matmul(&k.transpose(2, 3)) / (c_per_head as f64).sqrt()).softmax(-1, q.kind());
        let out = attn.matmul(&v);
        let (b, h, n, c) = out.size4().expect("BHNC");
        out.transpose(1, 2).reshape([b, n, h * c]).apply(&self.out_proj)
    }
}

#[derive(Debug)]
struct TwoWayAttentionBlock {
    self_attn: Attention,
    norm1: nn::LayerNorm,
    cross_attn_token_to_image: Attention,
    norm2: nn::LayerNorm,
    mlp: MlpBlock,
    norm3: nn::LayerNorm,
    norm4: nn::LayerNorm,
    cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    fn new(p: &nn::Path, dim: i64, heads: i64, mlp_dim: i64, downsample: i64, skip_first_layer_pe: bool) -> Self {
        // nn.LayerNorm's default eps (1e-5), unlike the image encoder's 1e-6.
        let ln = |name: &str| nn::layer_norm(p / name, vec![dim], Default::default());
        Self {
            self_attn: Attention::new(&(p / "self_attn"), dim, heads, 1),
            norm1: ln("norm1"),
            cross_attn_token_to_image: Attention::new(&(p / "cross_attn_token_to_image"), dim, heads, downsample),
            norm2: ln("norm2"),
            mlp: MlpBlock::new(&(p / "mlp"), dim, mlp_dim, Activation::Relu),
            norm3: ln("norm3"),
            norm4: ln("norm4"),
            cross_attn_image_to_token: Attention::new(&(p / "cross_attn_image_to_token"), dim, heads, downsample),
            skip_first_layer_pe,
        }
    }

    fn forward(&self, queries: &Tensor, keys: &Tensor, query_pe: &Tensor, key_pe: &Tensor) -> (Tensor, Tensor) {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let q = queries + query_pe;
            queries + self.self_attn.forward(&q, &q, queries)
        }
        .apply(&self.norm1);
        let q = &queries + query_pe;
        let k = keys + key_pe;
        let queries = (&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)).apply(&self.norm2);
        let queries = (&queries + queries.apply(&self.mlp)).apply(&self.norm3);
        let q = &queries + query_pe;
        let keys = (keys + self.cross_attn_image_to_token.forward(&k, &q, &queries)).apply(&self.norm4);
        (queries, keys)
    }
}

#[derive(Debug)]
pub struct TwoWayTransformer {
    layers: Vec<TwoWayAttentionBlock>,
    final_attn_token_to_image: Attention,
    norm_final_attn: nn::LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(p: &nn::Path, depth: i64, dim: i64, heads: i64, mlp_dim: i64, downsample: i64) -> Self {
        let lp = p / "layers";
        Self {
            layers: (0..depth)
                .map(|i| TwoWayAttentionBlock::new(&(&lp / i), dim, heads, mlp_dim, downsample, i == 0))
                .collect(),
            final_attn_token_to_image: Attention::new(&(p / "final_attn_token_to_image"), dim, heads, downsample),
            norm_final_attn: nn::layer_norm(p / "norm_final_attn", vec![dim], Default::default()),
        }
    }

    /// image (B, C, H, W), pe (B, C, H, W), tokens (B, N, C) -> (tokens (B, N, C), image (B, HW, C)).
    pub fn forward(&self, image_embedding: &Tensor, image_pe: &Tensor, point_embedding: &Tensor) -> (Tensor, Tensor) {
        let image_embedding = image_embedding.flatten(2, -1).permute([0, 2, 1]);
        let image_pe = image_pe.flatten(2, -1).permute([0, 2, 1]);
        let mut queries = point_embedding.shallow_clone();
        let mut keys = image_embedding;
        for layer in &self.layers {
            (queries, keys) = layer.forward(&queries, &keys, point_embedding, &image_pe);
        }
        let q = &queries + point_embedding;
        let k = &keys + &image_pe;
        let queries = (&queries + self.final_attn_token_to_image.forward(&q, &k, &keys)).apply(&self.norm_final_attn);
        (queries, keys)
    }
}
