//! The SkinSAM paper's prompt simulation (section 2.3), seeded per image.
//!
//! Point: one pixel drawn uniformly from the ground-truth foreground. Box: the mask's bounds plus
//! a margin on each side, its centre shifted by up to `max_shift` in x and in y, its width and
//! height scaled by a factor drawn from [1 - max_scale, 1 + max_scale], clipped to the image.
//! Margin and shift are stated in pixels at `reference_width` (the paper's 600-px originals):
//! on a copy of another width they scale by width / reference_width.
//!
//! The random stream of an image depends only on the seed and the image id, so every model,
//! every prompt mode, a filtered run and a shard of a run all see the same prompts.

use super::dataset::BinaryMask;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptMode {
    None,
    Point,
    Box,
    /// The paper's: box and one point.
    #[default]
    BoxPoint,
}

impl std::str::FromStr for PromptMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "point" => Ok(Self::Point),
            "box" => Ok(Self::Box),
            "box_point" | "box+point" => Ok(Self::BoxPoint),
            _ => Err(format!("unknown prompt mode {s:?} (expected none, point, box or box_point)")),
        }
    }
}

impl std::fmt::Display for PromptMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Point => "point",
            Self::Box => "box",
            Self::BoxPoint => "box_point",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimParams {
    /// Pixels added on each side of the mask bounds, at the reference width.
    pub margin: f32,
    /// Largest shift of the box centre in x and in y, at the reference width.
    pub max_shift: f32,
    /// Largest relative change of the box size (0.1 = +-10%).
    pub max_scale: f32,
    /// Width the pixel amounts refer to; 0 = the image's own width.
    pub reference_width: u32,
}

impl Default for SimParams {
    fn default() -> Self {
        Self { margin: 20.0, max_shift: 30.0, max_scale: 0.1, reference_width: 0 }
    }
}

/// Bound on `margin` and `max_shift`: far beyond any image, small enough that scaling to an
/// image's width stays finite (an infinite shift would make the random range invalid).
pub const MAX_SIM_PIXELS: f32 = 1e6;

impl SimParams {
    /// Checks the parameters before any prompt is drawn; `field` prefixes the field names.
    pub fn validate(&self, field: &str) -> crate::error::Result<()> {
        for (name, v) in [("margin", self.margin), ("max_shift", self.max_shift)] {
            if !(v.is_finite() && (0.0..=MAX_SIM_PIXELS).contains(&v)) {
                return Err(crate::error::invalid(format!("{field}.{name}"), format!("{v} is not in [0, {MAX_SIM_PIXELS}] pixels")));
            }
        }
        if !(self.max_scale.is_finite() && (0.0..1.0).contains(&self.max_scale)) {
            return Err(crate::error::invalid(format!("{field}.max_scale"), format!("{} is not in [0, 1)", self.max_scale)));
        }
        Ok(())
    }
}

/// The prompts given to the model for one image, in image pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SimPrompt {
    pub point: Option<[f32; 2]>,
    #[serde(rename = "box")]
    pub bbox: Option<[f32; 4]>,
}

/// The random stream of one image: ChaCha8 seeded from SHA-256(seed, id).
pub fn image_rng(seed: u64, id: &str) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(id.as_bytes());
    let d = h.finalize();
    let mut s = [0u8; 32];
    s.copy_from_slice(&d);
    ChaCha8Rng::from_seed(s)
}

/// Simulates the prompts of `mode` for a ground-truth mask. The box and the point are always
/// both drawn (box first), so that modes share them. An empty mask gives no box and no point.
pub fn simulate(mask: &BinaryMask, mode: PromptMode, params: &SimParams, seed: u64, id: &str) -> SimPrompt {
    let mut rng = image_rng(seed, id);
    let (bbox, point) = draw(mask, params, &mut rng);
    match mode {
        PromptMode::None => SimPrompt::default(),
        PromptMode::Point => SimPrompt { point, bbox: None },
        PromptMode::Box => SimPrompt { point: None, bbox },
        PromptMode::BoxPoint => SimPrompt { point, bbox },
    }
}

/// One box and one point from `rng` (None for an empty mask).
pub fn draw(mask: &BinaryMask, params: &SimParams, rng: &mut impl Rng) -> (Option<[f32; 4]>, Option<[f32; 2]>) {
    let Some((x0, y0, x1, y1)) = mask.bounds() else { return (None, None) };
    let (w, h) = (mask.width as f32, mask.height as f32);
    let scale = if params.reference_width == 0 { 1.0 } else { w / params.reference_width as f32 };
    let margin = params.margin * scale;
    let shift = params.max_shift * scale;
    let (bx0, by0) = (x0 as f32 - margin, y0 as f32 - margin);
    let (bx1, by1) = (x1 as f32 + margin, y1 as f32 + margin);
    let dx = rng.random_range(-shift..=shift);
    let dy = rng.random_range(-shift..=shift);
    let s = rng.random_range((1.0 - params.max_scale)..=(1.0 + params.max_scale));
    let (cx, cy) = ((bx0 + bx1) / 2.0 + dx, (by0 + by1) / 2.0 + dy);
    let (hw, hh) = ((bx1 - bx0) * s / 2.0, (by1 - by0) * s / 2.0);
    let bbox = [(cx - hw).clamp(0.0, w - 1.0), (cy - hh).clamp(0.0, h - 1.0), (cx + hw).clamp(0.0, w - 1.0), (cy + hh).clamp(0.0, h - 1.0)];
    // The k-th foreground pixel in row-major order, k uniform.
    let k = rng.random_range(0..mask.area());
    let idx = mask.data.iter().enumerate().filter(|(_, &v)| v != 0).nth(k as usize).map(|(i, _)| i).unwrap_or(0);
    let point = [(idx % mask.width as usize) as f32, (idx / mask.width as usize) as f32];
    (Some(bbox), Some(point))
}

/// The model-free baseline: the ellipse inscribed in the box (pixels whose index lies inside
/// it). Box coordinates are pixel indices, as SAM reads them (it adds 0.5 to reach the pixel's
/// centre), so the box [10, 10, 20, 20] spans pixels 10 to 20 and its ellipse is centred on
/// pixel 15.
pub fn box_ellipse(bbox: Option<[f32; 4]>, width: u32, height: u32) -> BinaryMask {
    let mut data = vec![0u8; width as usize * height as usize];
    if let Some([x0, y0, x1, y1]) = bbox {
        let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        let (rx, ry) = (((x1 - x0) / 2.0).max(0.5), ((y1 - y0) / 2.0).max(0.5));
        for y in 0..height as usize {
            let ny = (y as f32 - cy) / ry;
            for x in 0..width as usize {
                let nx = (x as f32 - cx) / rx;
                data[y * width as usize + x] = u8::from(nx * nx + ny * ny <= 1.0);
            }
        }
    }
    BinaryMask { width, height, data }
}
