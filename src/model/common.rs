//! Small building blocks shared by the SAM modules (segment_anything/modeling/common.py).

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Rows (tokens) from which a CPU fp32 or bf16 linear layer runs as a 1x1 convolution ([`linear_with`]).
const CONV_MIN_ROWS: i64 = 256;

/// `x.apply(layer)`: a linear layer over the last axis of x.
pub fn linear(x: &Tensor, layer: &nn::Linear) -> Tensor {
    linear_with(x, &layer.ws, layer.bs.as_ref())
}

/// x (.., K) times weight (N, K) transposed, plus bias (N). On the CPU in fp32 or bf16, for
/// many rows, as a 1x1 convolution over the rows as channels-last pixels: libtorch sends fp32
/// linear layers to MKL, whose sgemm took 160-200 GFLOP/s for SAM's shapes on the 2-core AMD
/// EPYC build machine, and convolutions to oneDNN, which took 310-430 GFLOP/s for the same
/// products (`scripts/bench_gemm_paths.py`; `benchmarks/gemm-paths-cpu-2026-12-02.jsonl`; on a
/// later VM of the same family 190-220 against 160-200). In bf16 both go to oneDNN, the
/// convolution 3-10% faster for the large shapes (`benchmarks/gemm-paths-cpu-2026-12-03.jsonl`).
/// Same sums, in another order. Few rows (the decoder's tokens) stay linear.
pub fn linear_with(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let mut shape = x.size();
    let k = *shape.last().expect("linear input has a last axis");
    let rows = if k > 0 { x.numel() as i64 / k } else { 0 };
    if x.device() != Device::Cpu || !matches!(x.kind(), Kind::Float | Kind::BFloat16) || rows < CONV_MIN_ROWS {
        return x.linear(weight, bias);
    }
    let n = weight.size()[0];
    let pixels = x.reshape([1, 1, rows, k]).permute([0, 3, 1, 2]);
    let out = pixels.conv2d(&weight.reshape([n, k, 1, 1]), bias, [1, 1], [0, 0], [1, 1], 1);
    *shape.last_mut().expect("checked above") = n;
    out.permute([0, 2, 3, 1]).reshape(shape)
}

/// LayerNorm over the channel axis of an NCHW tensor (eps 1e-6, as in the official code).
#[derive(Debug)]
pub struct LayerNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    pub const EPS: f64 = 1e-6;

    pub fn new(p: &nn::Path, channels: i64) -> Self {
        Self {
            weight: p.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: p.var("bias", &[channels], nn::Init::Const(0.0)),
            eps: Self::EPS,
        }
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        let u = x.mean_dim(1, true, None);
        let d = x - &u;
        let s = d.square().mean_dim(1, true, None);
        let x = d / (s + self.eps).sqrt();
        x * self.weight.view([-1, 1, 1]) + self.bias.view([-1, 1, 1])
    }
}

/// Which non-linearity an MLP block uses: GELU in the image encoder, ReLU in the decoder.
#[derive(Clone, Copy, Debug)]
pub enum Activation {
    Gelu,
    Relu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::Relu => x.relu(),
        }
    }
}

/// Two linear layers with an activation between them (`MLPBlock`: lin1, lin2).
#[derive(Debug)]
pub struct MlpBlock {
    lin1: nn::Linear,
    lin2: nn::Linear,
    act: Activation,
}

impl MlpBlock {
    pub fn new(p: &nn::Path, embedding_dim: i64, mlp_dim: i64, act: Activation) -> Self {
        Self {
            lin1: nn::linear(p / "lin1", embedding_dim, mlp_dim, Default::default()),
            lin2: nn::linear(p / "lin2", mlp_dim, embedding_dim, Default::default()),
            act,
        }
    }
}

impl Module for MlpBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        linear(&self.act.apply(&linear(x, &self.lin1)), &self.lin2)
    }
}

/// The decoder's `MLP`: `num_layers` linear layers under `layers.N`, ReLU between them.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    pub fn new(p: &nn::Path, input_dim: i64, hidden_dim: i64, output_dim: i64, num_layers: i64) -> Self {
        let p = p / "layers";
        let layers = (0..num_layers)
            .map(|i| {
                let n_in = if i == 0 { input_dim } else { hidden_dim };
                let n_out = if i == num_layers - 1 { output_dim } else { hidden_dim };
                nn::linear(&p / i, n_in, n_out, Default::default())
            })
            .collect();
        Self { layers }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let last = self.layers.len() - 1;
        let mut x = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = x.apply(layer);
            if i < last {
                x = x.relu();
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1x1-convolution route gives the linear layer's result, in the input's shape, for both
    /// kinds it takes, and the plain route is kept below the row threshold.
    #[test]
    fn linear_with_equals_the_linear_layer() {
        tch::manual_seed(3);
        for kind in [Kind::Float, Kind::BFloat16] {
            for shape in [vec![2, 300, 48], vec![5, 48], vec![1, 16, 16, 48]] {
                let opts = (kind, Device::Cpu);
                let x = Tensor::randn(shape.as_slice(), opts);
                let w = Tensor::randn([24, 48], opts);
                let b = Tensor::randn([24], opts);
                let want = x.linear(&w, Some(&b)).to_kind(Kind::Float);
                let got = linear_with(&x, &w, Some(&b));
                assert_eq!(got.kind(), kind);
                let mut out_shape = shape.clone();
                *out_shape.last_mut().unwrap() = 24;
                assert_eq!(got.size(), out_shape);
                // Sums of 48 unit products: fp32 to rounding; bf16 results (8 significant bits)
                // may round to neighbouring values, one step (2^-7 relative) apart.
                let rel = if kind == Kind::Float { 1e-5 } else { 2f64.powi(-7) };
                let excess = ((got.to_kind(Kind::Float) - &want).abs() - want.abs() * rel).max().double_value(&[]);
                assert!(excess < 1e-3, "{kind:?} {shape:?}: beyond tolerance by {excess}");
            }
        }
    }
}
