//! Two-way transformer of the mask decoder (segment_anything/modeling/transformer.py).

use super::common::{linear, linear_with, Activation, MlpBlock};
use tch::nn;
use tch::Tensor;

/// Image tokens x (B or 1, HW, C) times a (B, M, C) transposed, plus `bias` (B, M) when given:
/// (B, HW, M). Through [`linear_with`] with x's rows as the rows and a's as the weights, so that
/// on the CPU in fp32 the image tokens go through oneDNN rather than MKL (0.43 against 1.08 ms
/// for SAM's 64 x 256 by 4096 x 256 product on the 2-core AMD machine).
fn image_times(x: &Tensor, a: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let b = a.size()[0];
    let outs: Vec<Tensor> = (0..b)
        .map(|i| {
            let xi = x.get(if x.size()[0] == 1 { 0 } else { i });
            linear_with(&xi, &a.get(i), bias.map(|t| t.get(i)).as_ref())
        })
        .collect();
    Tensor::stack(&outs, 0)
}

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
        self.attend(&q.apply(&self.q_proj), &k.apply(&self.k_proj), &v.apply(&self.v_proj))
    }

    /// Attention over already projected q, k, v. Their batch sizes may differ (1 against B): the
    /// prompt-independent image side is projected once and broadcast over the prompts.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (q, k, v) = (self.separate_heads(q), self.separate_heads(k), self.separate_heads(v));
        let c_per_head = q.size()[3];
        let attn = (q.matmul(&k.transpose(2, 3)) / (c_per_head as f64).sqrt()).softmax(-1, q.kind());
        let out = attn.matmul(&v);
        let (b, h, n, c) = out.size4().expect("BHNC");
        out.transpose(1, 2).reshape([b, n, h * c]).apply(&self.out_proj)
    }

    /// Whether `n` tokens are few enough for the projections to move to the token side: with
    /// h heads, a product with the C-wide image tokens costs h * n per token instead of the
    /// projection's internal width (16 tokens for SAM's decoder).
    fn few_tokens(&self, n: i64) -> bool {
        n > 0 && n * self.num_heads < self.q_proj.ws.size()[0]
    }

    /// Prompt tokens q (B, N, C) attending to image tokens k, v (B or 1, HW, C), unprojected.
    /// Same result as [`Self::forward`], but for few tokens the image tokens are never projected:
    /// per head, q_h (x W_k,h)^T = (q_h W_k,h) x^T, the key bias only shifts each query's scores
    /// (softmax ignores it), and p (x W_v,h^T + b_v,h) = (p x) W_v,h^T + b_v,h since each query's
    /// probabilities sum to one. That halves the work of SAM's token-to-image attentions. The scores stay laid out
    /// (B, HW, hN), as the product gives them, with the softmax over HW: transposing them to
    /// (B, hN, HW) first cost a copy.
    fn tokens_to_image(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, n, c) = q.size3().expect("BNC");
        if !self.few_tokens(n) {
            return self.forward(q, k, v);
        }
        let h = self.num_heads;
        let q = self.separate_heads(&q.apply(&self.q_proj));
        let d = q.size()[3];
        let per_head = |w: &Tensor| w.view([h, d, c]).unsqueeze(0);
        // (B, h, N, d) @ (1, h, d, C): the queries in the image tokens' space, scaled already.
        let a = (q / (d as f64).sqrt()).matmul(&per_head(&self.k_proj.ws)).reshape([b, h * n, c]);
        let p = image_times(k, &a, None).softmax(1, a.kind()); // (B, HW, hN)
        let px = p.transpose(1, 2).matmul(v).view([b, h, n, c]);
        let bias = self.v_proj.bs.as_ref().expect("attention projections have a bias");
        let out = px.matmul(&per_head(&self.v_proj.ws).transpose(2, 3)) + bias.view([1, h, 1, d]);
        out.transpose(1, 2).reshape([b, n, h * d]).apply(&self.out_proj)
    }

    /// `residual` + image tokens (B or 1, HW, C) attending to prompt tokens k, v (B, N, C),
    /// unprojected. For few tokens the image side's queries and output projections fold into the
    /// token side: (x W_q,h^T + b_q,h) k_h^T = x (W_q,h^T k_h^T) + b_q,h k_h^T, and the output
    /// projection sum_h p_h (v_h W_o,h^T) + b_o needs v_h W_o,h^T only for the N tokens. Each
    /// head's probabilities sum to one over the tokens, so b_o / h added to every token's row
    /// adds b_o, and the residual goes in as the product's starting value: no separate pass over
    /// the image tokens for either.
    fn image_to_tokens(&self, queries: ImageQueries, k: &Tensor, v: &Tensor, residual: &Tensor) -> Tensor {
        let (b, n, c) = k.size3().expect("BNC");
        if !self.few_tokens(n) {
            let q = match queries {
                ImageQueries::Projected(q) => q.shallow_clone(),
                ImageQueries::Raw(x) => x.apply(&self.q_proj),
            };
            return residual + self.attend(&q, &k.apply(&self.k_proj), &v.apply(&self.v_proj));
        }
        let h = self.num_heads;
        let k = self.separate_heads(&k.apply(&self.k_proj)); // (B, h, N, d)
        let d = k.size()[3];
        let k = k / (d as f64).sqrt();
        // Scores laid out (B, h, N, HW), the softmax over N: with the HW image positions as the
        // inner axis it is vectorised over them, where a (.., N) last axis of 5-16 tokens made
        // libtorch's softmax crawl (an eighth of a vit_b decode).
        let st = match queries {
            ImageQueries::Projected(q) => k.matmul(&self.separate_heads(q).transpose(2, 3)), // (B, h, N, HW)
            ImageQueries::Raw(x) => {
                let wq = self.q_proj.ws.view([h, d, c]).unsqueeze(0); // (1, h, d, C)
                let m = k.matmul(&wq).reshape([b, h * n, c]); // (B, hN, C)
                let bq = self.q_proj.bs.as_ref().expect("attention projections have a bias");
                let r = k.matmul(&bq.view([1, h, d, 1])).reshape([b, h * n]);
                let s = image_times(x, &m, Some(&r)).transpose(1, 2).contiguous(); // (B, hN, HW)
                let hw = s.size()[2];
                s.view([b, h, n, hw])
            }
        };
        let hw = st.size()[3];
        let pt = st.softmax(2, st.kind()).view([b, h * n, hw]);
        let v = self.separate_heads(&v.apply(&self.v_proj)); // (B, h, N, d)
        let cout = self.out_proj.ws.size()[0];
        let wo = self.out_proj.ws.view([cout, h, d]).permute([1, 2, 0]).unsqueeze(0); // (1, h, d, C)
        let bo = self.out_proj.bs.as_ref().expect("attention projections have a bias");
        let vw = v.matmul(&wo).reshape([b, h * n, cout]) + bo / (h as f64);
        residual.baddbmm(&pt.transpose(1, 2), &vw, 1, 1)
    }
}

/// A block's image tokens as its cross-attentions take them.
enum ImageSide<'a> {
    Projected(&'a ImageProjections),
    /// keys + their positional encoding.
    Raw(Tensor),
}

/// The image side's queries for [`Attention::image_to_tokens`]: projected already (the cached
/// first block), or raw image tokens.
#[derive(Clone, Copy)]
enum ImageQueries<'a> {
    Projected(&'a Tensor),
    Raw(&'a Tensor),
}

/// The projections of the image tokens that a block's two cross-attentions make before the
/// tokens meet the prompt: token-to-image keys and values, image-to-token queries. For the first
/// block they depend on the image embedding alone, so [`TwoWayTransformer::prefix`] computes them
/// once per embedding: (1, HW, C/downsample) each, broadcast over any number of prompts.
#[derive(Debug)]
pub struct ImageProjections {
    t2i_k: Tensor,
    t2i_v: Tensor,
    i2t_q: Tensor,
}

impl ImageProjections {
    /// The same operation on each of the three tensors.
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self { t2i_k: f(&self.t2i_k), t2i_v: f(&self.t2i_v), i2t_q: f(&self.i2t_q) }
    }

    pub fn shallow_clone(&self) -> Self {
        self.map(Tensor::shallow_clone)
    }

    /// A copy that owns its storage (not a view into a batch).
    pub fn copy(&self) -> Self {
        self.map(Tensor::copy)
    }

    /// Images `start..start + len` of a batch's projections.
    pub fn narrow(&self, start: i64, len: i64) -> Self {
        self.map(|t| t.narrow(0, start, len))
    }

    pub fn nbytes(&self) -> u64 {
        [&self.t2i_k, &self.t2i_v, &self.i2t_q].into_iter().map(super::tensor_bytes).sum()
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

    /// keys (B, HW, C) and their positional encoding -> this block's image-side projections.
    fn project_image(&self, keys: &Tensor, key_pe: &Tensor) -> ImageProjections {
        let k = keys + key_pe;
        ImageProjections {
            t2i_k: linear(&k, &self.cross_attn_token_to_image.k_proj),
            t2i_v: linear(keys, &self.cross_attn_token_to_image.v_proj),
            i2t_q: linear(&k, &self.cross_attn_image_to_token.q_proj),
        }
    }

    /// keys (B or 1, HW, C) with their positional encoding; `prefix` = `project_image(keys,
    /// key_pe)` when known (the first block's, cached per embedding).
    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
        prefix: Option<&ImageProjections>,
    ) -> (Tensor, Tensor) {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let q = queries + query_pe;
            queries + self.self_attn.forward(&q, &q, queries)
        }
        .apply(&self.norm1);
        let t2i = &self.cross_attn_token_to_image;
        let q = &queries + query_pe;
        // Without the cached projections, the image tokens with their encoding, raw.
        let image = match prefix {
            Some(p) => ImageSide::Projected(p),
            None => ImageSide::Raw(keys + key_pe),
        };
        let attn = match &image {
            ImageSide::Projected(p) => t2i.attend(&q.apply(&t2i.q_proj), &p.t2i_k, &p.t2i_v),
            ImageSide::Raw(k) => t2i.tokens_to_image(&q, k, keys),
        };
        let queries = (&queries + attn).apply(&self.norm2);
        let queries = (&queries + queries.apply(&self.mlp)).apply(&self.norm3);
        let q = &queries + query_pe;
        let image_queries = match &image {
            ImageSide::Projected(p) => ImageQueries::Projected(&p.i2t_q),
            ImageSide::Raw(k) => ImageQueries::Raw(k),
        };
        let keys = self.cross_attn_image_to_token.image_to_tokens(image_queries, &q, &queries, keys).apply(&self.norm4);
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

    /// The first block's image-side projections of `keys` (B, HW, C) with `pe` (1, HW, C): all
    /// the transformer's work that does not depend on the prompt.
    pub fn prefix(&self, keys: &Tensor, pe: &Tensor) -> ImageProjections {
        self.layers[0].project_image(keys, pe)
    }

    /// keys (B or 1, HW, C) = image embedding + dense prompt embedding, flattened; pe (1, HW, C);
    /// tokens (B, N, C); `prefix` = `self.prefix(keys, pe)`. Returns (tokens (B, N, C), image
    /// (B, HW, C)).
    pub fn forward(&self, keys: &Tensor, pe: &Tensor, tokens: &Tensor, prefix: &ImageProjections) -> (Tensor, Tensor) {
        let (mut queries, mut keys) = self.layers[0].forward(tokens, keys, tokens, pe, Some(prefix));
        for layer in &self.layers[1..] {
            (queries, keys) = layer.forward(&queries, &keys, tokens, pe, None);
        }
        let q = &queries + tokens;
        let k = &keys + pe;
        let attn = self.final_attn_token_to_image.tokens_to_image(&q, &k, &keys);
        let queries = (&queries + attn).apply(&self.norm_final_attn);
        (queries, keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// SAM's decoder attention (256 wide, 8 heads, internal width 128) with random weights.
    fn attention(vs: &nn::VarStore) -> Attention {
        let a = Attention::new(&vs.root(), 256, 8, 2);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let _ = v.normal_(0.0, 0.1);
            }
        });
        a
    }

    /// Training runs the folded paths under autograd: the same gradients as the plain attention
    /// for the inputs, the broadcast residual and the weights and biases the folds move around.
    #[test]
    fn folded_projections_carry_the_same_gradients() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let a = attention(&vs);
        let opts = (Kind::Float, Device::Cpu);
        let (image, tokens, residual) = (Tensor::randn([1, 300, 256], opts), Tensor::randn([2, 7, 256], opts), Tensor::randn([1, 300, 256], opts));
        let weights = (Tensor::randn([2, 300, 256], opts), Tensor::randn([2, 7, 256], opts));
        let grads = |folded: bool| -> Vec<Tensor> {
            for (_, mut v) in vs.variables() {
                v.zero_grad();
            }
            let leaf = |t: &Tensor| t.copy().set_requires_grad(true);
            let (img, tok, res) = (leaf(&image), leaf(&tokens), leaf(&residual));
            let (i2t, t2i) = if folded {
                (a.image_to_tokens(ImageQueries::Raw(&img), &tok, &tok, &res), a.tokens_to_image(&tok, &img, &img))
            } else {
                (&res + a.forward(&img, &tok, &tok), a.forward(&tok, &img, &img))
            };
            ((i2t * &weights.0).sum(Kind::Float) + (t2i * &weights.1).sum(Kind::Float)).backward();
            let bias = |l: &nn::Linear| l.bs.as_ref().expect("bias").grad();
            // Copies: zeroing the next run's gradients works in place.
            [
                img.grad(),
                tok.grad(),
                res.grad(),
                a.q_proj.ws.grad(),
                bias(&a.q_proj),
                a.k_proj.ws.grad(),
                a.v_proj.ws.grad(),
                bias(&a.v_proj),
                bias(&a.out_proj),
            ]
            .iter()
            .map(Tensor::copy)
            .collect()
        };
        let plain = grads(false);
        let folded = grads(true);
        for (i, (p, f)) in plain.iter().zip(&folded).enumerate() {
            let diff = (p - f).abs().max().double_value(&[]);
            let scale = p.abs().max().double_value(&[]).max(1.0);
            assert!(diff <= 1e-4 * scale, "gradient {i}: max abs diff {diff} (scale {scale})");
        }
    }

    #[test]
    fn folded_projections_equal_the_plain_attention() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let a = attention(&vs);
        let opts = (Kind::Float, Device::Cpu);
        let image = Tensor::randn([1, 300, 256], opts);
        let image2 = Tensor::randn([2, 300, 256], opts);
        for n in [7, 15, 16, 20] {
            let tokens = Tensor::randn([2, n, 256], opts);
            assert_eq!(a.few_tokens(n), n < 16);
            for img in [&image, &image2] {
                // Token to image, with the image shared (batch 1) or one per prompt.
                let want = a.forward(&tokens, img, img);
                let got = a.tokens_to_image(&tokens, img, img);
                assert_eq!(got.size(), want.size());
                assert!(max_diff(&got, &want) < 1e-4, "tokens_to_image, n = {n}: {}", max_diff(&got, &want));
                // Image to token, from raw image tokens and from cached query projections.
                // The residual: other image tokens, broadcast over the prompts or one per prompt.
                let residual = Tensor::randn(img.size(), opts);
                let want = &residual + a.forward(img, &tokens, &tokens);
                let raw = a.image_to_tokens(ImageQueries::Raw(img), &tokens, &tokens, &residual);
                let projected = img.apply(&a.q_proj);
                let cached = a.image_to_tokens(ImageQueries::Projected(&projected), &tokens, &tokens, &residual);
                assert_eq!(raw.size(), want.size());
                assert!(max_diff(&raw, &want) < 1e-4, "image_to_tokens raw, n = {n}: {}", max_diff(&raw, &want));
                assert!(max_diff(&cached, &want) < 1e-4, "image_to_tokens cached, n = {n}: {}", max_diff(&cached, &want));
            }
        }
    }
}
