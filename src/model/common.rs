//! Small building blocks shared by the SAM modules (segment_anything/modeling/common.py).

use tch::nn::{self, Module};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Rows (tokens) from which a CPU fp32 or bf16 linear layer may run as a 1x1 convolution ([`linear_with`]).
const CONV_MIN_ROWS: i64 = 256;

/// `x.apply(layer)`: a linear layer over the last axis of x.
pub fn linear(x: &Tensor, layer: &nn::Linear) -> Tensor {
    linear_with(x, &layer.ws, layer.bs.as_ref())
}

/// x (.., K) times weight (N, K) transposed, plus bias (N). On the CPU in fp32 or bf16, for
/// many rows, as a 1x1 convolution over the rows as channels-last pixels when
/// [`products_as_conv`] says so. Same sums, in another order. Few rows (the decoder's tokens)
/// stay matrix products.
pub fn linear_with(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let k = *x.size().last().expect("linear input has a last axis");
    let rows = if k > 0 { x.numel() as i64 / k } else { 0 };
    if x.device() != Device::Cpu || rows < CONV_MIN_ROWS || !products_as_conv(x.kind()) {
        return x.linear(weight, bias);
    }
    conv1x1(x, weight, bias)
}

/// [`linear_with`]'s convolution route, whatever the route setting.
fn conv1x1(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let mut shape = x.size();
    let k = *shape.last().expect("linear input has a last axis");
    let rows = if k > 0 { x.numel() as i64 / k } else { 0 };
    let n = weight.size()[0];
    let pixels = x.reshape([1, 1, rows, k]).permute([0, 3, 1, 2]);
    let out = pixels.conv2d(&weight.reshape([n, k, 1, 1]), bias, [1, 1], [0, 0], [1, 1], 1);
    *shape.last_mut().expect("checked above") = n;
    out.permute([0, 2, 3, 1]).reshape(shape)
}

/// How SAM's large CPU products run: as matrix products (libtorch sends fp32 ones to MKL, bf16
/// ones to oneDNN's matmul) or as 1x1 convolutions (oneDNN). Which is faster depends on the CPU
/// (`scripts/bench_gemm_paths.py`): on the 2-core AMD EPYC VMs the convolution (fp32: 310-430
/// against MKL's 160-200 GFLOP/s; bf16 3-10% faster), on the Intel Xeon VM with AMX the matrix
/// product for bf16 (about 2,500 against 1,700 GFLOP/s) and for fp32 about even
/// (`benchmarks/gemm-paths-cpu-*.jsonl`). `Auto` times both on the first use of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuProducts {
    #[default]
    Auto,
    Matmul,
    Conv,
}

impl std::str::FromStr for CpuProducts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "matmul" => Ok(Self::Matmul),
            "conv" => Ok(Self::Conv),
            _ => Err(format!("unknown CPU product route {s:?} (expected auto, matmul or conv)")),
        }
    }
}

static CPU_PRODUCTS: AtomicU8 = AtomicU8::new(CpuProducts::Auto as u8);
/// `Auto`'s timed choice per kind (fp32, bf16): true for the convolution.
static TIMED_CHOICE: [OnceLock<bool>; 2] = [OnceLock::new(), OnceLock::new()];

/// Sets the route of large CPU products for the whole process (settings `cpu_products`).
pub fn set_cpu_products(route: CpuProducts) {
    CPU_PRODUCTS.store(route as u8, Ordering::Relaxed);
}

/// Where the route for `kind` comes from: a fixed setting (true for the convolution), or
/// `Auto`'s timed choice for that kind. None for kinds without a route (only fp32 and bf16 have one).
enum Route {
    Fixed(bool),
    Timed(&'static OnceLock<bool>),
}

fn route(kind: Kind) -> Option<Route> {
    let slot = match kind {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        _ => return None,
    };
    Some(match CPU_PRODUCTS.load(Ordering::Relaxed) {
        r if r == CpuProducts::Matmul as u8 => Route::Fixed(false),
        r if r == CpuProducts::Conv as u8 => Route::Fixed(true),
        _ => Route::Timed(&TIMED_CHOICE[slot]),
    })
}

/// Whether large CPU products of `kind` run as 1x1 convolutions (only fp32 and bf16 may).
pub fn products_as_conv(kind: Kind) -> bool {
    match route(kind) {
        None => false,
        Some(Route::Fixed(conv)) => conv,
        Some(Route::Timed(choice)) => *choice.get_or_init(|| time_routes(kind)),
    }
}

/// The route CPU products of `kind` have taken so far ("conv" or "matmul"), without timing:
/// None for kinds without a route choice, or under `Auto` before the first large product.
pub fn route_taken(kind: Kind) -> Option<&'static str> {
    let conv = match route(kind)? {
        Route::Fixed(conv) => conv,
        Route::Timed(choice) => *choice.get()?,
    };
    Some(if conv { "conv" } else { "matmul" })
}

/// Times vit_b's MLP pair (2048 tokens, 768 -> 3072 -> 768: 19 GFLOP in all) both ways on the
/// calling thread, alternately, best of three after a warm-up (oneDNN generates its kernels on
/// first use; this VM's speed drifts by minutes, which alternating cancels). About 0.5 s in
/// fp32 on 2 cores, once per process and kind.
fn time_routes(kind: Kind) -> bool {
    tch::no_grad(|| {
        let opts = (kind, Device::Cpu);
        let x = Tensor::randn([2048, 768], opts);
        let (w1, b1) = (Tensor::randn([3072, 768], opts), Tensor::randn([3072], opts));
        let (w2, b2) = (Tensor::randn([768, 3072], opts), Tensor::randn([768], opts));
        let pass = |conv: bool| {
            let t = Instant::now();
            let _ = if conv {
                conv1x1(&conv1x1(&x, &w1, Some(&b1)), &w2, Some(&b2))
            } else {
                x.linear(&w1, Some(&b1)).linear(&w2, Some(&b2))
            };
            t.elapsed()
        };
        pass(true);
        pass(false);
        let (mut conv, mut matmul) = (Duration::MAX, Duration::MAX);
        for _ in 0..3 {
            conv = conv.min(pass(true));
            matmul = matmul.min(pass(false));
        }
        let as_conv = conv < matmul;
        tracing::info!(
            kind = ?kind,
            conv_ms = conv.as_secs_f64() * 1e3,
            matmul_ms = matmul.as_secs_f64() * 1e3,
            route = if as_conv { "conv" } else { "matmul" },
            "CPU product route timed"
        );
        as_conv
    })
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

    /// The route setting decides, and "auto" times both routes once and keeps its choice. Other
    /// tests may run meanwhile: both routes give the same products, so they are not disturbed.
    #[test]
    fn the_product_route_follows_its_setting() {
        set_cpu_products(CpuProducts::Conv);
        assert!(products_as_conv(Kind::Float) && products_as_conv(Kind::BFloat16));
        set_cpu_products(CpuProducts::Matmul);
        assert!(!products_as_conv(Kind::Float) && !products_as_conv(Kind::BFloat16));
        set_cpu_products(CpuProducts::Auto);
        let timed = products_as_conv(Kind::BFloat16);
        assert_eq!(TIMED_CHOICE[1].get(), Some(&timed));
        assert_eq!(products_as_conv(Kind::BFloat16), timed);
        assert_eq!(route_taken(Kind::BFloat16), Some(if timed { "conv" } else { "matmul" }));
        // fp16 has no convolution route and is never timed.
        assert!(!products_as_conv(Kind::Half));
        assert_eq!(route_taken(Kind::Half), None);
        assert_eq!("matmul".parse::<CpuProducts>(), Ok(CpuProducts::Matmul));
        assert!("fast".parse::<CpuProducts>().unwrap_err().contains("auto, matmul or conv"));
    }

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
                let got = if shape.iter().product::<i64>() / 48 >= CONV_MIN_ROWS { conv1x1(&x, &w, Some(&b)) } else { linear_with(&x, &w, Some(&b)) };
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
