//! The official mask post-processing (bilinear up-sampling of the low-res logits to the padded
//! input square, crop of the un-padded part, bilinear resize to the original size, threshold) as
//! one separable resampling straight from the low-res logits to the original size.
//!
//! Both bilinear steps are linear and separable, so their composition is too: each output row
//! (column) is a weighted sum of at most three low-res rows (columns). On the CPU this took
//! 0.7 ms where libtorch's two `upsample_bilinear2d` calls took 3.2-4.2 ms for a vit_b predict
//! (three 600x450 masks, through a 1024x768 intermediate each). It gives the same values up to
//! float rounding (summed in another order; checked against the two libtorch calls in the
//! tests), so a mask can differ only at pixels whose logit is within rounding of the threshold.

/// Taps per output index, enough for the composition of SAM's two steps: two intermediate
/// samples, each between two low-res ones at most a low-res pixel apart, span three; a fixed
/// four (zero-padded) lets the compiler unroll the inner products.
const TAPS: usize = 4;

/// Composite 1-D weights: output index -> first low-res index and the weights of `TAPS`
/// consecutive ones.
#[derive(Debug)]
struct Taps {
    start: Vec<usize>,
    weights: Vec<[f32; TAPS]>,
}

/// PyTorch's bilinear source index (align_corners=False) for output index `dst` with
/// `ratio` = input / output: the two input indices and the second one's weight, computed in f32
/// as `upsample_bilinear2d` does. Its CPU kernels are built with FMA contraction, so
/// `ratio * (dst + 0.5) - 0.5` is rounded once; rounded twice, the weights of a 768 -> 1500 resize
/// moved the values by up to 7e-4.
fn source(dst: usize, ratio: f32, in_size: usize) -> (usize, usize, f32) {
    let src = ratio.mul_add(dst as f32 + 0.5, -0.5).max(0.0);
    let i0 = (src as usize).min(in_size - 1);
    let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
    (i0, i1, src - i0 as f32)
}

impl Taps {
    /// `low` logits side, `square` the model's padded input side (at least `low`, and `low` at
    /// least `TAPS`), `input` the un-padded extent along this axis, `out` the original image's.
    fn new(low: usize, square: usize, input: usize, out: usize) -> Self {
        assert!(TAPS <= low && low <= square, "post-processing up-samples {low} to {square}");
        let r1 = low as f32 / square as f32;
        let r2 = input as f32 / out as f32;
        let mut start = Vec::with_capacity(out);
        let mut weights = Vec::with_capacity(out);
        for y in 0..out {
            let (i0, i1, m) = source(y, r2, input);
            let mut taps = [(0usize, 0.0f64); 4];
            for (j, (i, wi)) in [(i0, 1.0 - m as f64), (i1, m as f64)].into_iter().enumerate() {
                let (a0, a1, l) = source(i, r1, low);
                taps[2 * j] = (a0, wi * (1.0 - l as f64));
                taps[2 * j + 1] = (a1, wi * l as f64);
            }
            // Near the end of the grid the window starts earlier; its extra taps weigh zero.
            let first = taps.iter().map(|&(a, _)| a).min().expect("four taps").min(low - TAPS);
            let mut w = [0.0f64; TAPS];
            for (a, v) in taps {
                w[a - first] += v;
            }
            start.push(first);
            weights.push(w.map(|v| v as f32));
        }
        Self { start, weights }
    }
}

/// Resamples (K masks of) low-res logits to the original size, as the official post-processing.
#[derive(Debug)]
pub struct MaskResampler {
    low: usize,
    rows: Taps,
    cols: Taps,
}

impl MaskResampler {
    /// `low`: side of the low-res logits (256 for SAM); `square`: the model's input side (1024);
    /// `input_size` and `original_size`: (height, width) of the resized image and of the original.
    pub fn new(low: usize, square: usize, input_size: (usize, usize), original_size: (usize, usize)) -> Self {
        Self {
            low,
            rows: Taps::new(low, square, input_size.0, original_size.0),
            cols: Taps::new(low, square, input_size.1, original_size.1),
        }
    }

    /// (height, width) of the output.
    pub fn output_size(&self) -> (usize, usize) {
        (self.rows.start.len(), self.cols.start.len())
    }

    /// One low x low mask of logits (row-major) -> the original-size logits (row-major).
    pub fn logits(&self, low_res: &[f32]) -> Vec<f32> {
        let n = self.low;
        assert_eq!(low_res.len(), n * n, "low-res logits are {n}x{n}");
        let (oh, ow) = self.output_size();
        // The low-res rows some output row reads, each resampled along x first.
        let first_row = self.rows.start.iter().copied().min().unwrap_or(0);
        let last_row = self.rows.start.iter().map(|s| s + TAPS).max().unwrap_or(0);
        let mut tmp = vec![0.0f32; (last_row - first_row) * ow];
        for (r, out) in (first_row..last_row).zip(tmp.chunks_exact_mut(ow)) {
            let src = &low_res[r * n..(r + 1) * n];
            for ((o, &s), w) in out.iter_mut().zip(&self.cols.start).zip(&self.cols.weights) {
                let v: &[f32; TAPS] = src[s..s + TAPS].try_into().expect("TAPS values");
                *o = w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3];
            }
        }
        // Then along y: each output row a weighted sum of whole rows (vectorises).
        let mut out = vec![0.0f32; oh * ow];
        for ((row, &s), w) in out.chunks_exact_mut(ow).zip(&self.rows.start).zip(&self.rows.weights) {
            let s = s - first_row;
            for (k, &wk) in w.iter().enumerate() {
                if wk != 0.0 {
                    for (o, t) in row.iter_mut().zip(&tmp[(s + k) * ow..(s + k + 1) * ow]) {
                        *o += wk * t;
                    }
                }
            }
        }
        out
    }

    /// One low x low mask of logits -> the original-size mask, `logit > threshold`.
    pub fn mask(&self, low_res: &[f32], threshold: f32) -> Vec<bool> {
        self.logits(low_res).into_iter().map(|v| v > threshold).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// The official two-step post-processing in libtorch, for comparison.
    fn reference(low_res: &Tensor, square: i64, input: (i64, i64), original: (i64, i64)) -> Tensor {
        let up = low_res.upsample_bilinear2d([square, square], false, None, None);
        let cropped = up.narrow(2, 0, input.0).narrow(3, 0, input.1);
        cropped.upsample_bilinear2d([original.0, original.1], false, None, None)
    }

    #[test]
    fn equals_the_two_bilinear_steps() {
        tch::manual_seed(3);
        // (low, square, input, original): SAM on 4:3 and 3:4 images, up- and down-sampling,
        // the 256-px default model, and sides that do not divide evenly.
        let cases = [
            (256, 1024, (768, 1024), (450, 600)),
            (256, 1024, (1024, 768), (600, 450)),
            (256, 1024, (768, 1024), (1500, 2000)),
            (64, 256, (192, 256), (150, 200)),
            (64, 256, (256, 171), (7, 5)),
            (16, 100, (100, 37), (33, 1)),
            (4, 4, (4, 3), (2, 9)),
        ];
        for (low, square, input, original) in cases {
            let l = Tensor::randn([1, 1, low, low], (Kind::Float, tch::Device::Cpu)) * 5.0;
            let want = reference(&l, square, input, original);
            let r = MaskResampler::new(low as usize, square as usize, (input.0 as usize, input.1 as usize), (original.0 as usize, original.1 as usize));
            assert_eq!(r.output_size(), (original.0 as usize, original.1 as usize));
            let values: Vec<f32> = Vec::try_from(l.flatten(0, -1)).unwrap();
            let got = Tensor::from_slice(&r.logits(&values)).view([1, 1, original.0, original.1]);
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 2e-5, "{low} -> {square} -> {input:?} -> {original:?}: max abs diff {diff}");
            let masks: Vec<bool> = r.mask(&values, 0.0);
            let want_masks: Vec<bool> = Vec::try_from(want.gt(0.0).flatten(0, -1)).unwrap();
            let differ = masks.iter().zip(&want_masks).filter(|(a, b)| a != b).count();
            assert!(differ * 10_000 <= masks.len(), "{differ} of {} mask pixels differ", masks.len());
        }
    }
}
