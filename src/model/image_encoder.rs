//! ViT image encoder (segment_anything/modeling/image_encoder.py): 16-px patches, absolute
//! position embedding, windowed attention with global blocks, decomposed relative position bias,
//! and a neck down to the prompt embedding width.

use super::common::{linear, Activation, LayerNorm2d, MlpBlock};
use super::variant::SamConfig;
use tch::nn;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    num_heads: i64,
}

impl Attention {
    /// `input_size` is the token grid this attention sees: the window, or the whole grid for
    /// global blocks; the relative position tables are sized from it (2 * size - 1 rows).
    fn new(p: &nn::Path, dim: i64, num_heads: i64, input_size: i64) -> Self {
        let head_dim = dim / num_heads;
        Self {
            qkv: nn::linear(p / "qkv", dim, dim * 3, Default::default()),
            proj: nn::linear(p / "proj", dim, dim, Default::default()),
            rel_pos_h: p.var("rel_pos_h", &[2 * input_size - 1, head_dim], nn::Init::Const(0.0)),
            rel_pos_w: p.var("rel_pos_w", &[2 * input_size - 1, head_dim], nn::Init::Const(0.0)),
            num_heads,
        }
    }

    /// x: (B, H, W, C) -> (B, H, W, C).
    fn forward(&self, x: &Tensor) -> Tensor {
        linear(&self.attend(&linear(x, &self.qkv)), &self.proj)
    }

    /// The attention proper, between the qkv and output projections: (B, H, W, 3C) -> (B, H, W, C).
    fn attend(&self, qkv: &Tensor) -> Tensor {
        let (b, h, w, c3) = qkv.size4().expect("attention input is BHWC");
        let c = c3 / 3;
        let n = h * w;
        let heads = self.num_heads;
        let head_dim = c / heads;
        // (3, B, heads, N, head_dim) without materialising a transposed copy of all three.
        let qkv = qkv.reshape([b, n, 3, heads, head_dim]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // Decomposed relative position bias, computed from the unscaled queries as upstream.
        let rh = rel_pos_table(h, &self.rel_pos_h);
        let rw = rel_pos_table(w, &self.rel_pos_w);
        let r_q = q.reshape([b * heads, h, w, head_dim]);
        let rel_h = Tensor::einsum("bhwc,hkc->bhwk", &[&r_q, &rh], None::<i64>);
        let rel_w = Tensor::einsum("bhwc,wkc->bhwk", &[&r_q, &rw], None::<i64>);
        let scale = (head_dim as f64).powf(-0.5);
        let out = if n >= CHUNKED_ATTENTION_MIN_TOKENS {
            let bh = b * heads;
            chunked_rel_pos_attention(
                &q.reshape([bh, n, head_dim]),
                &k.reshape([bh, n, head_dim]),
                &v.reshape([bh, n, head_dim]),
                &rel_h,
                &rel_w,
                scale,
            )
            .reshape([b, heads, n, head_dim])
        } else {
            // Windows: fused attention with the bias as the additive mask (small: 196 x 196).
            let bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape([b, heads, n, n]);
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, scale, false)
        };
        out.permute([0, 2, 1, 3]).reshape([b, h, w, c])
    }

    /// Windowed attention on x (B, H, W, C) with windows of `ws`. Upstream pads x with zeros to
    /// whole windows before the qkv projection; the padded tokens' q, k, v are then the bias
    /// alone. Projecting first and padding with the bias gives the same tokens without
    /// projecting the padding (64 -> 70 px: a fifth of the qkv and output projections' work),
    /// and the output projection runs after the padding is dropped.
    fn forward_windowed(&self, x: &Tensor, ws: i64) -> Tensor {
        let (b, h, w, _) = x.size4().expect("BHWC");
        let qkv = linear(x, &self.qkv);
        let (pad_h, pad_w) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
        let qkv = if pad_h > 0 || pad_w > 0 {
            let bias = self.qkv.bs.as_ref().expect("SAM's qkv has a bias");
            let c3 = bias.size()[0];
            let padded = bias.view([1, 1, 1, c3]).expand([b, h + pad_h, w + pad_w, c3], false).contiguous();
            padded.narrow(1, 0, h).narrow(2, 0, w).f_copy_(&qkv).expect("same shape");
            padded
        } else {
            qkv
        };
        let (windows, pad_hw) = window_partition(&qkv, ws);
        linear(&window_unpartition(&self.attend(&windows), ws, pad_hw, (h, w)), &self.proj)
    }
}

/// Global attention (64 x 64 = 4096 tokens) goes through [`chunked_rel_pos_attention`].
const CHUNKED_ATTENTION_MIN_TOKENS: i64 = 1024;
/// Queries per chunk: the chunk's logits (256 x 4096 fp32, 4 MiB) stay in cache.
const QUERIES_PER_CHUNK: i64 = 256;

/// softmax(q k^T * scale + rel_h + rel_w) v, a few image rows of queries at a time. The fused
/// kernel needs the bias as a full (heads, N, N) mask: 805 MB for vit_b's global blocks, whose
/// writing and reading cost as much as the attention itself on a CPU. Here the decomposed bias
/// is added in place to each chunk's logits while they are in cache.
///
/// q, k, v: (BH, N, C) with N = h * w; rel_h: (BH, h, w, h); rel_w: (BH, h, w, w).
fn chunked_rel_pos_attention(q: &Tensor, k: &Tensor, v: &Tensor, rel_h: &Tensor, rel_w: &Tensor, scale: f64) -> Tensor {
    if q.device() == Device::Cpu && q.kind() == Kind::Float {
        return chunked_rel_pos_attention_transposed(q, k, v, rel_h, rel_w, scale);
    }
    let (bh, h, w, _) = rel_h.size4().expect("rel_h is (BH, h, w, h)");
    let rows = (QUERIES_PER_CHUNK / w).max(1);
    let q = q * scale;
    let mut outs = Vec::with_capacity((bh * ((h + rows - 1) / rows)) as usize);
    for i in 0..bh {
        let (qi, kt, vi) = (q.get(i), k.get(i).transpose(0, 1), v.get(i));
        let (rh, rw) = (rel_h.get(i), rel_w.get(i));
        let mut r0 = 0;
        while r0 < h {
            let r = rows.min(h - r0);
            let mut logits = qi.narrow(0, r0 * w, r * w).matmul(&kt).view([r, w, h, w]);
            let _ = logits.g_add_(&rh.narrow(0, r0, r).unsqueeze(-1));
            let _ = logits.g_add_(&rw.narrow(0, r0, r).unsqueeze(-2));
            let probs = logits.view([r * w, h * w]).softmax(-1, q.kind());
            outs.push(probs.matmul(&vi));
            r0 += r;
        }
    }
    Tensor::cat(&outs, 0).view([bh, h * w, -1])
}

/// [`chunked_rel_pos_attention`] for fp32 on the CPU, with both products as 1x1 convolutions
/// (oneDNN) instead of matrix products (MKL, which on the AMD build machine ran at about half
/// the speed; see [`super::common::linear_with`]). Each chunk's logits come out transposed,
/// keys x queries: the keys are the convolution's pixels and the chunk's queries its filters.
/// The bias is added and the softmax taken over the keys in that layout, and the transposed
/// probabilities are the next convolution's input as they are (keys as channels). A vit_b head
/// chunk took 1.31 ms this way against 1.76 ms.
fn chunked_rel_pos_attention_transposed(q: &Tensor, k: &Tensor, v: &Tensor, rel_h: &Tensor, rel_w: &Tensor, scale: f64) -> Tensor {
    let (bh, h, w, _) = rel_h.size4().expect("rel_h is (BH, h, w, h)");
    let n = h * w;
    let rows = (QUERIES_PER_CHUNK / w).max(1);
    let q = q * scale;
    let d = q.size()[2];
    let mut outs = Vec::with_capacity(bh as usize);
    for i in 0..bh {
        // Keys as channels-last pixels (1, d, 1, N); values transposed as filters (d, N, 1, 1).
        let keys = k.get(i).contiguous().view([1, 1, n, d]).permute([0, 3, 1, 2]);
        let values = v.get(i).transpose(0, 1).contiguous().view([d, n, 1, 1]);
        let (qi, rh, rw) = (q.get(i), rel_h.get(i), rel_w.get(i));
        let mut chunks = Vec::with_capacity(((h + rows - 1) / rows) as usize);
        let mut r0 = 0;
        while r0 < h {
            let r = rows.min(h - r0);
            let m = r * w;
            let filters = qi.narrow(0, r0 * w, m).contiguous().view([m, d, 1, 1]);
            // (1, m, 1, N) channels-last: memory laid out (N, m), keys (kh, kw) by queries.
            let logits = keys.conv2d(&filters, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
            let mut lt = logits.permute([0, 2, 3, 1]).reshape([h, w, m]);
            let bias_h = rh.narrow(0, r0, r).reshape([m, h]).transpose(0, 1).contiguous().unsqueeze(1); // (h, 1, m)
            let bias_w = rw.narrow(0, r0, r).reshape([m, w]).transpose(0, 1).contiguous().unsqueeze(0); // (1, w, m)
            let _ = lt.g_add_(&bias_h);
            let _ = lt.g_add_(&bias_w);
            let probs = lt.view([n, m]).softmax(0, Kind::Float);
            // Keys as the channels of m pixels: (1, N, 1, m) -> (1, d, 1, m).
            let out = probs.view([1, n, 1, m]).conv2d(&values, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
            chunks.push(out.view([d, m]));
            r0 += r;
        }
        outs.push(Tensor::cat(&chunks, 1).transpose(0, 1));
    }
    Tensor::stack(&outs, 0)
}

/// Relative positions table (q_size, k_size, C) for equal query and key sizes, as
/// `get_rel_pos` computes it (the tables always match the grid in SAM, so no interpolation).
fn rel_pos_table(size: i64, rel_pos: &Tensor) -> Tensor {
    let device = rel_pos.device();
    let coords = Tensor::arange(size, (tch::Kind::Int64, device));
    let rel = coords.unsqueeze(1) - coords.unsqueeze(0) + (size - 1);
    rel_pos.index_select(0, &rel.flatten(0, 1)).reshape([size, size, -1])
}

#[derive(Debug)]
struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    mlp: MlpBlock,
    window_size: i64,
}

impl Block {
    fn new(p: &nn::Path, cfg: &SamConfig, window_size: i64) -> Self {
        let dim = cfg.encoder_embed_dim;
        let ln = nn::LayerNormConfig { eps: cfg.encoder_norm_eps, ..Default::default() };
        let grid = cfg.embedding_size();
        let attn_size = if window_size == 0 { grid } else { window_size };
        Self {
            norm1: nn::layer_norm(p / "norm1", vec![dim], ln),
            attn: Attention::new(&(p / "attn"), dim, cfg.encoder_num_heads, attn_size),
            norm2: nn::layer_norm(p / "norm2", vec![dim], ln),
            mlp: MlpBlock::new(&(p / "mlp"), dim, dim * cfg.mlp_ratio, Activation::Gelu),
            window_size,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let shortcut = x;
        let h = x.apply(&self.norm1);
        let h = if self.window_size > 0 { self.attn.forward_windowed(&h, self.window_size) } else { self.attn.forward(&h) };
        let x = shortcut + h;
        let m = x.apply(&self.norm2).apply(&self.mlp);
        x + m
    }
}

/// (B, H, W, C) -> (B * nWindows, ws, ws, C), zero-padding H and W up to multiples of ws.
fn window_partition(x: &Tensor, ws: i64) -> (Tensor, (i64, i64)) {
    let (b, h, w, c) = x.size4().expect("BHWC");
    let pad_h = (ws - h % ws) % ws;
    let pad_w = (ws - w % ws) % ws;
    let x = if pad_h > 0 || pad_w > 0 { x.constant_pad_nd([0, 0, 0, pad_w, 0, pad_h]) } else { x.shallow_clone() };
    let (hp, wp) = (h + pad_h, w + pad_w);
    let windows = x
        .view([b, hp / ws, ws, wp / ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([-1, ws, ws, c]);
    (windows, (hp, wp))
}

/// Inverse of [`window_partition`], dropping the padding.
fn window_unpartition(windows: &Tensor, ws: i64, (hp, wp): (i64, i64), (h, w): (i64, i64)) -> Tensor {
    let c = windows.size()[3];
    let b = windows.size()[0] / (hp * wp / ws / ws);
    let x = windows
        .view([b, hp / ws, wp / ws, ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, hp, wp, c]);
    if hp > h || wp > w {
        x.narrow(1, 0, h).narrow(2, 0, w)
    } else {
        x
    }
}

#[derive(Debug)]
pub struct ImageEncoderViT {
    patch_embed: nn::Conv2D,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck_conv1: nn::Conv2D,
    neck_ln1: LayerNorm2d,
    neck_conv2: nn::Conv2D,
    neck_ln2: LayerNorm2d,
}

impl ImageEncoderViT {
    pub fn new(p: &nn::Path, cfg: &SamConfig) -> Self {
        let dim = cfg.encoder_embed_dim;
        let grid = cfg.embedding_size();
        let patch = nn::ConvConfig { stride: cfg.patch_size, ..Default::default() };
        let patch_embed = nn::conv2d(p / "patch_embed" / "proj", cfg.in_chans, dim, cfg.patch_size, patch);
        let pos_embed = p.var("pos_embed", &[1, grid, grid, dim], nn::Init::Const(0.0));
        let blocks_p = p / "blocks";
        let blocks = (0..cfg.encoder_depth)
            .map(|i| {
                let ws = if cfg.encoder_global_attn_indexes.contains(&i) { 0 } else { cfg.window_size };
                Block::new(&(&blocks_p / i), cfg, ws)
            })
            .collect();
        let neck = p / "neck";
        let out = cfg.prompt_embed_dim;
        let no_bias = nn::ConvConfig { bias: false, ..Default::default() };
        Self {
            patch_embed,
            pos_embed,
            blocks,
            neck_conv1: nn::conv2d(&neck / 0, dim, out, 1, no_bias),
            neck_ln1: LayerNorm2d::new(&(&neck / 1), out),
            neck_conv2: nn::conv2d(&neck / 2, out, out, 3, nn::ConvConfig { padding: 1, ..no_bias }),
            neck_ln2: LayerNorm2d::new(&(&neck / 3), out),
        }
    }

    /// (B, 3, S, S) normalised image -> (B, prompt_embed_dim, S/16, S/16) embedding.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.apply(&self.patch_embed).permute([0, 2, 3, 1]) + &self.pos_embed;
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        x.permute([0, 3, 1, 2])
            .apply(&self.neck_conv1)
            .apply(&self.neck_ln1)
            .apply(&self.neck_conv2)
            .apply(&self.neck_ln2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q k^T * scale + rel_h + rel_w) v computed whole, as upstream does.
    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, rel_h: &Tensor, rel_w: &Tensor, scale: f64) -> Tensor {
        let (bh, h, w, _) = rel_h.size4().unwrap();
        let n = h * w;
        let logits = (q * scale).matmul(&k.transpose(1, 2)).view([bh, h, w, h, w]);
        let logits = logits + rel_h.view([bh, h, w, h, 1]) + rel_w.view([bh, h, w, 1, w]);
        logits.view([bh, n, n]).softmax(-1, Kind::Float).matmul(v)
    }

    #[test]
    fn chunked_attention_equals_the_plain_one_in_both_layouts() {
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        // 24 x 24 tokens: chunks of 10, 10 and 4 rows of queries, and enough keys for the
        // convolution path.
        let (bh, h, w, d) = (2, 24, 24, 16);
        let n = h * w;
        let (q, k, v) = (Tensor::randn([bh, n, d], opts), Tensor::randn([bh, n, d], opts), Tensor::randn([bh, n, d], opts));
        let (rel_h, rel_w) = (Tensor::randn([bh, h, w, h], opts), Tensor::randn([bh, h, w, w], opts));
        let scale = 0.25;
        let want = plain(&q, &k, &v, &rel_h, &rel_w, scale);
        let transposed = chunked_rel_pos_attention_transposed(&q, &k, &v, &rel_h, &rel_w, scale);
        let diff = (&transposed - &want).abs().max().double_value(&[]);
        assert_eq!(transposed.size(), want.size());
        assert!(diff < 1e-5, "transposed layout: max abs diff {diff}");
        // The matrix-product layout, taken for other kinds and devices.
        let q16 = q.to_kind(Kind::Double);
        let (k16, v16) = (k.to_kind(Kind::Double), v.to_kind(Kind::Double));
        let (rh16, rw16) = (rel_h.to_kind(Kind::Double), rel_w.to_kind(Kind::Double));
        let by_matmul = chunked_rel_pos_attention(&q16, &k16, &v16, &rh16, &rw16, scale).to_kind(Kind::Float);
        let diff = (&by_matmul - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "matrix-product layout: max abs diff {diff}");
    }
}
