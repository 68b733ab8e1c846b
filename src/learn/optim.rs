//! The optimizer: AdamW with PyTorch's semantics and HF's global gradient-norm clipping.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamW, AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::model::Qwen25VL;

/// AdamW with PyTorch / HF defaults (not Burn's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate (required).
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay (AdamW), 0 by default as in HF.
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off (as in HF).
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    1.0
}

impl OptimizerConfig {
    /// HF defaults with the given learning rate.
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            max_grad_norm: default_max_grad_norm(),
        }
    }

    pub fn check(&self, field: &str, errors: &mut Vec<String>) {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            errors.push(format!("{field}.lr must be > 0, got {}", self.lr));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(b.is_finite() && (0.0..1.0).contains(b)) {
                errors.push(format!("{field}.betas[{i}] must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            errors.push(format!("{field}.eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            errors.push(format!(
                "{field}.weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            errors.push(format!(
                "{field}.max_grad_norm must be >= 0 (0 = no clipping), got {}",
                self.max_grad_norm
            ));
        }
    }
}

/// AdamW with the recipe's values (burn's defaults, eps 1e-5 and weight decay 1e-4, differ
/// from PyTorch's; the update rule itself is PyTorch's decoupled one).
pub fn adamw(cfg: &OptimizerConfig) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(cfg.betas[0] as f32)
        .with_beta_2(cfg.betas[1] as f32)
        .with_epsilon(cfg.eps as f32)
        .with_weight_decay(cfg.weight_decay as f32)
}

/// The optimizer type of the learners.
pub type Adam<B> = burn::optim::adaptor::OptimizerAdaptor<AdamW, Qwen25VL<B>, B>;

/// Clip the gradients to a global L2 norm as `torch.nn.utils.clip_grad_norm_` (HF Trainer):
/// `coef = max_norm / (norm + 1e-6)`, applied when `coef < 1`. Returns the norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    struct SumSq<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSq<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.parts.push(g.powi_scalar(2).sum());
            }
        }
    }
    let mut v = SumSq::<B> {
        grads,
        parts: vec![],
    };
    module.visit(&mut v);
    if v.parts.is_empty() {
        return 0.0;
    }
    let total: f64 = Tensor::cat(v.parts, 0).sum().into_scalar().elem::<f64>();
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            struct Scale<'a> {
                grads: &'a mut GradientsParams,
                coef: f64,
            }
            impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
                fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                    if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                        self.grads
                            .register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.coef));
                    }
                }
            }
            module.visit(&mut Scale { grads, coef });
        }
    }
    norm
}
