//! ViT image encoder (segment_anything/modeling/image_encoder.py): 16-px patches, absolute
//! position embedding, windowed attention with global blocks, decomposed relative position bias,
//! and a neck down to the prompt embedding width.

use super::common::{linear, Activation, LayerNorm2d, MlpBlock};
use super::rel_pos_softmax::{bias_softmax_bf16_, bias_softmax_f32_cols_, bias_softmax_f32_rows_};
use super::variant::SamConfig;
use std::sync::Mutex;
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
            let (rows, kh, kw) = (b * heads * n, rel_h.size()[3], rel_w.size()[3]);
            let bias = super::window_ops::outer_sum(&rel_h.reshape([rows, kh]), &rel_w.reshape([rows, kw]))
                .unwrap_or_else(|| rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2))
                .reshape([b, heads, n, n]);
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
        let bias = self.qkv.bs.as_ref().expect("SAM's qkv has a bias");
        let pad_hw = (h + pad_h, w + pad_w);
        // Padding and partitioning in one copy where it applies (CPU inference).
        let windows = super::window_ops::partition_padded(&qkv, ws, bias).unwrap_or_else(|| {
            let qkv = if pad_h > 0 || pad_w > 0 {
                let c3 = bias.size()[0];
                let padded = bias.view([1, 1, 1, c3]).expand([b, pad_hw.0, pad_hw.1, c3], false).contiguous();
                padded.narrow(1, 0, h).narrow(2, 0, w).f_copy_(&qkv).expect("same shape");
                padded
            } else {
                qkv
            };
            window_partition(&qkv, ws).0
        });
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
/// is added to each chunk's logits while they are in cache, together with the softmax, one
/// query row at a time: for bf16 on an AVX-512 CPU ([`bias_softmax_bf16_`]), for fp32 on an
/// AVX2 one ([`bias_softmax_f32_rows_`]); otherwise in place, then libtorch's softmax.
///
/// q, k, v: (BH, N, C) with N = h * w; rel_h: (BH, h, w, h); rel_w: (BH, h, w, w).
fn chunked_rel_pos_attention(q: &Tensor, k: &Tensor, v: &Tensor, rel_h: &Tensor, rel_w: &Tensor, scale: f64) -> Tensor {
    if q.device() == Device::Cpu && q.kind() == Kind::Float && super::common::products_as_conv(Kind::Float) {
        return chunked_rel_pos_attention_transposed(q, k, v, rel_h, rel_w, scale);
    }
    chunked_rel_pos_attention_rows(q, k, v, rel_h, rel_w, scale)
}

/// [`chunked_rel_pos_attention`] with matrix products: each chunk's logits laid out queries by
/// keys.
fn chunked_rel_pos_attention_rows(q: &Tensor, k: &Tensor, v: &Tensor, rel_h: &Tensor, rel_w: &Tensor, scale: f64) -> Tensor {
    let (_, h, w, _) = rel_h.size4().expect("rel_h is (BH, h, w, h)");
    let rows = (QUERIES_PER_CHUNK / w).max(1);
    let q = q * scale;
    let kind = q.kind();
    let head = move |[qi, ki, vi, rh, rw]: [Tensor; 5]| -> Tensor {
        let kt = ki.transpose(0, 1);
        let (rh, rw) = (rh.contiguous(), rw.contiguous());
        let mut outs = Vec::with_capacity(((h + rows - 1) / rows) as usize);
        let mut r0 = 0;
        while r0 < h {
            let r = rows.min(h - r0);
            let mut logits = qi.narrow(0, r0 * w, r * w).matmul(&kt);
            let (rh_chunk, rw_chunk) = (rh.narrow(0, r0, r), rw.narrow(0, r0, r));
            let (rh_rows, rw_rows) = (rh_chunk.reshape([r * w, h]), rw_chunk.reshape([r * w, w]));
            let probs = if bias_softmax_bf16_(&mut logits, &rh_rows, &rw_rows) || bias_softmax_f32_rows_(&mut logits, &rh_rows, &rw_rows) {
                logits
            } else {
                let mut logits = logits.view([r, w, h, w]);
                let _ = logits.g_add_(&rh_chunk.unsqueeze(-1));
                let _ = logits.g_add_(&rw_chunk.unsqueeze(-2));
                logits.view([r * w, h * w]).softmax(-1, kind)
            };
            outs.push(probs.matmul(&vi));
            r0 += r;
        }
        Tensor::cat(&outs, 0)
    };
    by_heads(&q, k, v, rel_h, rel_w, head)
}

/// `head` applied to each head's (q, k, v, rel_h, rel_w), the results stacked: (BH, N, C).
///
/// On the CPU with more than one intra-op thread (and no autograd), the heads are shared out
/// over that many threads, each running its heads' products and softmax on its own core,
/// single-threaded. With every small product split over both cores instead, the cores wait for
/// each other at each product's end, and one of them idles through the bf16 path's
/// single-threaded softmax: sharing out took vit_b's four global blocks from about 1030 to
/// 790 ms per bf16 embedding on the 2-core build machine.
fn by_heads(q: &Tensor, k: &Tensor, v: &Tensor, rel_h: &Tensor, rel_w: &Tensor, head: impl Fn([Tensor; 5]) -> Tensor + Sync) -> Tensor {
    let bh = q.size()[0];
    let per_head = |i: i64| [q.get(i), k.get(i), v.get(i), rel_h.get(i), rel_w.get(i)];
    let threads = tch::get_num_threads().max(1) as i64;
    // Only for inference: the threads share nothing with the caller's autograd graph.
    let split = threads > 1
        && bh > 1
        && q.device() == Device::Cpu
        && [q, k, v, rel_h, rel_w].iter().all(|t| !t.requires_grad())
        && crate::device::thread_local_intra_op_available();
    if !split {
        return Tensor::stack(&(0..bh).map(|i| head(per_head(i))).collect::<Vec<_>>(), 0);
    }
    let threads = threads.min(bh);
    let mut work: Vec<Vec<(i64, [Tensor; 5])>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..bh {
        work[(i % threads) as usize].push((i, per_head(i)));
    }
    let head = &head;
    let slots: Vec<Mutex<Option<Vec<(i64, [Tensor; 5])>>>> = work.into_iter().map(|w| Mutex::new(Some(w))).collect();
    let run = |slot: &Mutex<Option<Vec<(i64, [Tensor; 5])>>>| -> Vec<(i64, Tensor)> {
        let items = slot.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        // Grad mode is per thread; a new thread starts with it on.
        tch::no_grad(|| items.into_iter().map(|(i, tensors)| (i, head(tensors))).collect())
    };
    let mut outs: Vec<(i64, Tensor)> = std::thread::scope(|scope| {
        let handles: Vec<_> = slots
            .iter()
            .map(|slot| {
                let spawned = std::thread::Builder::new().spawn_scoped(scope, move || {
                    crate::device::set_intra_op_threads_for_this_thread(1);
                    run(slot)
                });
                spawned.ok()
            })
            .collect();
        // A thread the OS would not start: its heads run here, while the others work.
        let mut outs: Vec<(i64, Tensor)> =
            slots.iter().zip(&handles).filter(|(_, h)| h.is_none()).flat_map(|(slot, _)| run(slot)).collect();
        for t in handles.into_iter().flatten() {
            // A panic in a head (a libtorch error) is re-raised here, as it would be unsplit.
            outs.extend(t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        outs
    });
    outs.sort_by_key(|(i, _)| *i);
    Tensor::stack(&outs.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)
}

/// [`chunked_rel_pos_attention`] for fp32 on the CPU when products run as convolutions
/// ([`super::common::products_as_conv`]), with both products as 1x1 convolutions (oneDNN)
/// instead of matrix products (MKL, which on the AMD build machine ran at about half the
/// speed). Each chunk's logits come out transposed, keys x queries: the keys are the convolution's pixels and the chunk's queries its filters.
/// The bias is added and the softmax taken over the keys in that layout (fused on AVX2 CPUs:
/// [`bias_softmax_f32_cols_`]), and the transposed
/// probabilities are the next convolution's input as they are (keys as channels). A vit_b head
/// chunk took 1.31 ms this way against 1.76 ms.
fn chunked_rel_pos_attention_transposed(q: &Tensor, k: &Tensor, v: &Tensor, rel_h: &Tensor, rel_w: &Tensor, scale: f64) -> Tensor {
    let (_, h, w, _) = rel_h.size4().expect("rel_h is (BH, h, w, h)");
    let n = h * w;
    let rows = (QUERIES_PER_CHUNK / w).max(1);
    let q = q * scale;
    let d = q.size()[2];
    let head = move |[qi, ki, vi, rh, rw]: [Tensor; 5]| -> Tensor {
        // Keys as channels-last pixels (1, d, 1, N); values transposed as filters (d, N, 1, 1).
        let keys = ki.contiguous().view([1, 1, n, d]).permute([0, 3, 1, 2]);
        let values = vi.transpose(0, 1).contiguous().view([d, n, 1, 1]);
        let mut chunks = Vec::with_capacity(((h + rows - 1) / rows) as usize);
        let mut r0 = 0;
        while r0 < h {
            let r = rows.min(h - r0);
            let m = r * w;
            let filters = qi.narrow(0, r0 * w, m).contiguous().view([m, d, 1, 1]);
            // (1, m, 1, N) channels-last: memory laid out (N, m), keys (kh, kw) by queries.
            let logits = keys.conv2d(&filters, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
            let mut lt = logits.permute([0, 2, 3, 1]).reshape([h, w, m]);
            let bias_h = rh.narrow(0, r0, r).reshape([m, h]).transpose(0, 1).contiguous(); // (h, m)
            let bias_w = rw.narrow(0, r0, r).reshape([m, w]).transpose(0, 1).contiguous(); // (w, m)
            let mut keys_by_queries = lt.view([n, m]);
            let probs = if bias_softmax_f32_cols_(&mut keys_by_queries, &bias_h, &bias_w) {
                keys_by_queries
            } else {
                let _ = lt.g_add_(&bias_h.unsqueeze(1));
                let _ = lt.g_add_(&bias_w.unsqueeze(0));
                lt.view([n, m]).softmax(0, Kind::Float)
            };
            // Keys as the channels of m pixels: (1, N, 1, m) -> (1, d, 1, m).
            let out = probs.view([1, n, 1, m]).conv2d(&values, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
            chunks.push(out.view([d, m]));
            r0 += r;
        }
        Tensor::cat(&chunks, 1).transpose(0, 1)
    };
    by_heads(&q, k, v, rel_h, rel_w, head)
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
        // The matrix-product layout in fp32 (the fused query-row kernel on AVX2 CPUs), on a grid
        // that is not square, so that the key row and column terms cannot be swapped unnoticed.
        let (h2, w2) = (24, 16);
        let n2 = h2 * w2;
        let (q2, k2, v2) = (Tensor::randn([bh, n2, d], opts), Tensor::randn([bh, n2, d], opts), Tensor::randn([bh, n2, d], opts));
        let (rh2, rw2) = (Tensor::randn([bh, h2, w2, h2], opts), Tensor::randn([bh, h2, w2, w2], opts));
        let want2 = plain(&q2, &k2, &v2, &rh2, &rw2, scale);
        let rows = chunked_rel_pos_attention_rows(&q2, &k2, &v2, &rh2, &rw2, scale);
        let diff = (&rows - &want2).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "matrix-product layout, fp32: max abs diff {diff}");
        let transposed2 = chunked_rel_pos_attention_transposed(&q2, &k2, &v2, &rh2, &rw2, scale);
        let diff = (&transposed2 - &want2).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "transposed layout, {h2} x {w2}: max abs diff {diff}");
        // The matrix-product layout, taken for other kinds and devices.
        let q16 = q.to_kind(Kind::Double);
        let (k16, v16) = (k.to_kind(Kind::Double), v.to_kind(Kind::Double));
        let (rh16, rw16) = (rel_h.to_kind(Kind::Double), rel_w.to_kind(Kind::Double));
        let by_matmul = chunked_rel_pos_attention(&q16, &k16, &v16, &rh16, &rw16, scale).to_kind(Kind::Float);
        let diff = (&by_matmul - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "matrix-product layout: max abs diff {diff}");
    }

    /// bf16 on the CPU: the fused bias-and-softmax (on AVX-512 CPUs) and the heads shared out
    /// over the intra-op threads (with more than one), against the plain fp32 computation from
    /// the same bf16-rounded inputs.
    #[test]
    fn bf16_chunked_attention_agrees_with_fp32() {
        // Two intra-op threads on this test's thread (only), so that the heads are shared out
        // wherever that is possible, whatever the process default.
        let shared_out = crate::device::set_intra_op_threads_for_this_thread(2);
        eprintln!("heads shared out over threads: {shared_out}");
        tch::manual_seed(5);
        // 32 x 32 tokens (rows a multiple of 16: the fused path applies), 5 heads: an odd
        // number to share out.
        let (bh, h, w, d) = (5, 32, 32, 16);
        let n = h * w;
        let bf = |shape: &[i64], s: f64| (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * s).to_kind(Kind::BFloat16);
        let (q, k, v) = (bf(&[bh, n, d], 1.0), bf(&[bh, n, d], 1.0), bf(&[bh, n, d], 1.0));
        let (rel_h, rel_w) = (bf(&[bh, h, w, h], 1.0), bf(&[bh, h, w, w], 1.0));
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let scale = 0.25;
        let want = plain(&f(&q), &f(&k), &f(&v), &f(&rel_h), &f(&rel_w), scale);
        let got = chunked_rel_pos_attention(&q, &k, &v, &rel_h, &rel_w, scale);
        assert_eq!(got.kind(), Kind::BFloat16);
        assert_eq!(got.size(), want.size());
        // Outputs are averages of unit-variance values, kept in bf16 (8 significant bits),
        // with bf16 logits and probabilities on the way.
        let diff = (f(&got) - &want).abs().max().double_value(&[]);
        assert!(diff < 0.05, "bf16 against fp32: max abs diff {diff}");
        let mean = (f(&got) - &want).abs().mean(Kind::Float).double_value(&[]);
        assert!(mean < 0.005, "bf16 against fp32: mean abs diff {mean}");
    }
}
