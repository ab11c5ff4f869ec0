//! Prompt encoder (segment_anything/modeling/prompt_encoder.py): points, boxes and a low-res
//! mask become sparse and dense embeddings for the mask decoder.

use super::common::LayerNorm2d;
use super::variant::SamConfig;
use tch::nn;
use tch::{Kind, Tensor};

/// Point labels as the official code uses them.
pub const LABEL_PADDING: i64 = -1;
pub const LABEL_BACKGROUND: i64 = 0;
pub const LABEL_FOREGROUND: i64 = 1;

/// Random-Fourier positional encoding (`PositionEmbeddingRandom`).
#[derive(Debug)]
pub struct PositionEmbeddingRandom {
    gaussian: Tensor,
}

impl PositionEmbeddingRandom {
    fn new(p: &nn::Path, num_pos_feats: i64) -> Self {
        // A buffer, saved in the checkpoint, not trained.
        Self { gaussian: p.zeros_no_train("positional_encoding_gaussian_matrix", &[2, num_pos_feats]) }
    }

    /// Coordinates normalised to [0, 1] -> sin/cos features.
    fn pe_encoding(&self, coords: &Tensor) -> Tensor {
        let coords = coords * 2.0 - 1.0;
        let coords = coords.matmul(&self.gaussian) * (2.0 * std::f64::consts::PI);
        Tensor::cat(&[coords.sin(), coords.cos()], -1)
    }

    /// Dense encoding of an (h, w) grid of pixel centres: (C, h, w).
    pub fn forward_grid(&self, h: i64, w: i64) -> Tensor {
        let grid = Tensor::ones([h, w], (Kind::Float, self.gaussian.device()));
        let y = (grid.cumsum(0, Kind::Float) - 0.5) / h as f64;
        let x = (grid.cumsum(1, Kind::Float) - 0.5) / w as f64;
        self.pe_encoding(&Tensor::stack(&[x, y], -1)).permute([2, 0, 1])
    }

    /// Unnormalised (B, N, 2) pixel coordinates in the model's input frame -> (B, N, C).
    pub fn forward_with_coords(&self, coords: &Tensor, (h, w): (i64, i64)) -> Tensor {
        let x = coords.select(2, 0) / w as f64;
        let y = coords.select(2, 1) / h as f64;
        self.pe_encoding(&Tensor::stack(&[x, y], -1))
    }
}

#[derive(Debug)]
pub struct PromptEncoder {
    pub embed_dim: i64,
    image_embedding_size: i64,
    input_image_size: i64,
    pe_layer: PositionEmbeddingRandom,
    /// `get_dense_pe`'s grid, (1, HW, C) contiguous, with the Gaussian matrix it was computed
    /// from: its sin/cos cost more than a millisecond per decode, and the matrix (a buffer no
    /// training changes) only changes when weights are loaded, which the comparison catches.
    dense_pe: std::cell::RefCell<Option<(Tensor, Tensor)>>,
    /// 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
    point_embeddings: Vec<Tensor>,
    not_a_point_embed: Tensor,
    mask_conv0: nn::Conv2D,
    mask_ln1: LayerNorm2d,
    mask_conv3: nn::Conv2D,
    mask_ln4: LayerNorm2d,
    mask_conv6: nn::Conv2D,
    no_mask_embed: Tensor,
}

/// A batch of prompts in the model's 1024-px input frame.
#[derive(Default)]
pub struct PromptBatch<'a> {
    /// (B, N, 2) coordinates and (B, N) integer labels.
    pub points: Option<(&'a Tensor, &'a Tensor)>,
    /// (B, 4) boxes as x0, y0, x1, y1.
    pub boxes: Option<&'a Tensor>,
    /// (B, 1, L, L) low-res mask logits (L = 4x the embedding grid).
    pub masks: Option<&'a Tensor>,
}

impl PromptBatch<'_> {
    pub fn batch_size(&self) -> i64 {
        if let Some((c, _)) = self.points {
            c.size()[0]
        } else if let Some(b) = self.boxes {
            b.size()[0]
        } else if let Some(m) = self.masks {
            m.size()[0]
        } else {
            1
        }
    }
}

fn embedding(p: &nn::Path, n: i64, dim: i64) -> Tensor {
    nn::embedding(p, n, dim, Default::default()).ws
}

impl PromptEncoder {
    pub fn new(p: &nn::Path, cfg: &SamConfig) -> Self {
        let dim = cfg.prompt_embed_dim;
        let mic = cfg.mask_in_chans;
        let pe = p / "point_embeddings";
        let md = p / "mask_downscaling";
        let s2 = nn::ConvConfig { stride: 2, ..Default::default() };
        Self {
            embed_dim: dim,
            image_embedding_size: cfg.embedding_size(),
            input_image_size: cfg.img_size,
            pe_layer: PositionEmbeddingRandom::new(&(p / "pe_layer"), dim / 2),
            dense_pe: std::cell::RefCell::new(None),
            point_embeddings: (0..4).map(|i| embedding(&(&pe / i), 1, dim)).collect(),
            not_a_point_embed: embedding(&(p / "not_a_point_embed"), 1, dim),
            mask_conv0: nn::conv2d(&md / 0, 1, mic / 4, 2, s2),
            mask_ln1: LayerNorm2d::new(&(&md / 1), mic / 4),
            mask_conv3: nn::conv2d(&md / 3, mic / 4, mic, 2, s2),
            mask_ln4: LayerNorm2d::new(&(&md / 4), mic),
            mask_conv6: nn::conv2d(&md / 6, mic, dim, 1, Default::default()),
            no_mask_embed: embedding(&(p / "no_mask_embed"), 1, dim),
        }
    }

    /// Positional encoding of the image embedding grid: (1, C, 64, 64).
    pub fn get_dense_pe(&self) -> Tensor {
        let s = self.image_embedding_size;
        let gaussian = &self.pe_layer.gaussian;
        let mut cache = self.dense_pe.borrow_mut();
        let fresh = matches!(&*cache, Some((g, _)) if g.device() == gaussian.device() && g.equal(gaussian));
        if !fresh {
            let tokens = tch::no_grad(|| self.pe_layer.forward_grid(s, s).flatten(1, -1).transpose(0, 1).contiguous().unsqueeze(0));
            *cache = Some((gaussian.copy(), tokens));
        }
        let tokens = &cache.as_ref().expect("just filled").1;
        // A (1, C, H, W) view whose flattened (HW, C) layout is contiguous, as the decoder reads it.
        tokens.transpose(1, 2).view([1, self.embed_dim, s, s])
    }

    fn embed_points(&self, coords: &Tensor, labels: &Tensor, pad: bool) -> Tensor {
        let mut coords = coords + 0.5;
        let mut labels = labels.shallow_clone();
        if pad {
            // Without a box, one "not a point" is appended, as upstream does.
            let b = coords.size()[0];
            coords = Tensor::cat(&[coords, Tensor::zeros([b, 1, 2], (Kind::Float, labels.device()))], 1);
            let pad = Tensor::full([b, 1], LABEL_PADDING, (labels.kind(), labels.device()));
            labels = Tensor::cat(&[labels, pad], 1);
        }
        let size = (self.input_image_size, self.input_image_size);
        let pe = self.pe_layer.forward_with_coords(&coords, size);
        let labels = labels.unsqueeze(-1);
        let is = |l: i64| labels.eq(l).to_kind(Kind::Float);
        // Padding points lose their positional encoding and get the learned not-a-point embedding.
        pe * labels.ne(LABEL_PADDING).to_kind(Kind::Float)
            + is(LABEL_PADDING) * &self.not_a_point_embed
            + is(LABEL_BACKGROUND) * &self.point_embeddings[0]
            + is(LABEL_FOREGROUND) * &self.point_embeddings[1]
    }

    fn embed_boxes(&self, boxes: &Tensor) -> Tensor {
        let coords = (boxes + 0.5).reshape([-1, 2, 2]);
        let size = (self.input_image_size, self.input_image_size);
        let corners = self.pe_layer.forward_with_coords(&coords, size);
        let corner_embed = Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0);
        corners + corner_embed.unsqueeze(0)
    }

    fn embed_masks(&self, masks: &Tensor) -> Tensor {
        masks
            .apply(&self.mask_conv0)
            .apply(&self.mask_ln1)
            .gelu("none")
            .apply(&self.mask_conv3)
            .apply(&self.mask_ln4)
            .gelu("none")
            .apply(&self.mask_conv6)
    }

    /// Returns (sparse (B, N, C), dense (B, C, 64, 64)).
    pub fn forward(&self, prompts: &PromptBatch) -> (Tensor, Tensor) {
        let bs = prompts.batch_size();
        let device = self.no_mask_embed.device();
        let mut sparse = Tensor::zeros([bs, 0, self.embed_dim], (Kind::Float, device));
        if let Some((coords, labels)) = prompts.points {
            let pts = self.embed_points(coords, labels, prompts.boxes.is_none());
            sparse = Tensor::cat(&[sparse, pts], 1);
        }
        if let Some(boxes) = prompts.boxes {
            sparse = Tensor::cat(&[sparse, self.embed_boxes(boxes)], 1);
        }
        let dense = match prompts.masks {
            Some(m) => self.embed_masks(m),
            None => {
                let s = self.image_embedding_size;
                self.no_mask_embed.reshape([1, -1, 1, 1]).expand([bs, -1, s, s], false)
            }
        };
        (sparse, dense)
    }
}
