//! Small building blocks shared by the SAM modules (segment_anything/modeling/common.py).

use tch::nn::{self, Module};
use tch::Tensor;

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
        self.act.apply(&x.apply(&self.lin1)).apply(&self.lin2)
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
