//! Adam, written out so that its state (moments and step count) is checkpointed with the weights:
//! tch's optimizers keep theirs inside libtorch, where a resumed run could not get it back.

use super::Recipe;
use crate::error::{Error, Result};
use crate::model::Sam;
use std::path::Path;
use tch::{Kind, Tensor};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

struct Param {
    name: String,
    var: Tensor,
    m: Tensor,
    v: Tensor,
    lr: f64,
    /// Whether the variable has had a gradient: from then on a step in which it is not used
    /// updates it as with a zero gradient (momentum and weight decay go on), as in a run whose
    /// gradients stay defined from step to step. Saved with the moments, so that a resumed run,
    /// whose gradients all start undefined, does the same.
    used: bool,
}

pub struct Adam {
    params: Vec<Param>,
    pub step: i64,
    weight_decay: f64,
}

impl Adam {
    /// The trainable variables of `sam` (requires_grad), the image encoder's with its own rate.
    pub fn new(sam: &Sam, r: &Recipe) -> Self {
        let mut vars: Vec<(String, Tensor)> = sam.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let lr = if name.starts_with("image_encoder.") { r.image_encoder_learning_rate } else { r.learning_rate };
                Param { m: var.zeros_like().detach(), v: var.zeros_like().detach(), name, var, lr, used: false }
            })
            .collect();
        Self { params, step: 0, weight_decay: r.weight_decay }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.var.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update with the learning rates scaled by `lr_factor` (the schedule); weight decay is
    /// decoupled from the gradient as in AdamW.
    pub fn step(&mut self, lr_factor: f64) {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        tch::no_grad(|| {
            for p in &mut self.params {
                let g = p.var.grad();
                let g = if g.defined() {
                    p.used = true;
                    g
                } else if p.used {
                    p.var.zeros_like()
                } else {
                    continue;
                };
                let _ = p.m.g_mul_scalar_(BETA1).g_add_(&(&g * (1.0 - BETA1)));
                let _ = p.v.g_mul_scalar_(BETA2).g_add_(&(&g * &g * (1.0 - BETA2)));
                let lr = p.lr * lr_factor;
                if self.weight_decay > 0.0 {
                    let _ = p.var.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let update = (&p.m / c1) / ((&p.v / c2).sqrt() + EPS) * lr;
                let _ = p.var.g_sub_(&update);
            }
        });
    }

    /// Moments and step, written atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            named.push((format!("m.{}", p.name), p.m.to_device(tch::Device::Cpu)));
            named.push((format!("v.{}", p.name), p.v.to_device(tch::Device::Cpu)));
            named.push((format!("used.{}", p.name), Tensor::from_slice(&[u8::from(p.used)])));
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step])));
        crate::model::checkpoint::write_safetensors_durable(&named, path, &path.with_extension("safetensors.tmp"))
            .map_err(|e| Error::Internal(e.to_string()))
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let named = Tensor::read_safetensors(path).map_err(|e| Error::FailedPrecondition(format!("cannot read {}: {e}", path.display())))?;
        let get = |k: &str| named.iter().find(|(n, _)| n == k).map(|(_, t)| t.shallow_clone());
        self.step = get("step").map(|t| t.int64_value(&[0])).ok_or_else(|| Error::FailedPrecondition(format!("{}: no step", path.display())))?;
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let (m, v) = match (get(&format!("m.{}", p.name)), get(&format!("v.{}", p.name))) {
                    (Some(m), Some(v)) => (m, v),
                    _ => return Err(Error::FailedPrecondition(format!("{}: no state for {}", path.display(), p.name))),
                };
                p.m.copy_(&m.to_kind(Kind::Float));
                p.v.copy_(&v.to_kind(Kind::Float));
                // Files written before the flag was saved: a variable that had a gradient has a
                // second moment above zero.
                p.used = match get(&format!("used.{}", p.name)) {
                    Some(u) => u.int64_value(&[0]) != 0,
                    None => p.v.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                };
            }
            Ok(())
        })
    }
}
