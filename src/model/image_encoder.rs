//! ViT image encoder (segment_anything/modeling/image_encoder.py): 16-px patches, absolute
//! position embedding, windowed attention with global blocks, decomposed relative position bias,
//! and a neck down to the prompt embedding width.

use super::common::{Activation, LayerNorm2d, MlpBlock};
use super::variant::SamConfig;
use tch::nn;
use tch::Tensor;

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
        self.attend(&x.apply(&self.qkv)).apply(&self.proj)
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
        let qkv = x.apply(&self.qkv);
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
        window_unpartition(&self.attend(&windows), ws, pad_hw, (h, w)).apply(&self.proj)
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
