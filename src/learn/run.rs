//! A training run's life, the same for SFT and GRPO: the output folder, the trainee (model +
//! optimizer + position, fresh or resumed), the gradients of one optimizer step accumulated over
//! its micro-batches, the update, and at the end the final checkpoint and the HF export.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{compute_model, GradientCheckpointing, Precision};
use crate::learn::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint, TrainState};
use crate::learn::freeze::{apply_freeze, assign_stable_param_ids, FreezeConfig};
use crate::learn::layerwise::layerwise_backward;
use crate::learn::optim::{adamw, clip_grad_norm, Adam, OptimizerConfig};
use crate::learn::parallel::Rank;
use crate::model::TrainBackend;
use crate::model::{copy_aux_files, ModelInput, Qwen25VL, SaveDtype};
use crate::models::load_model;

/// Create `out_dir` and write the resolved recipe (defaults and overrides included) into it.
pub fn prepare_output_dir(out_dir: &Path, resolved_recipe: &str) -> Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join("recipe.toml");
    std::fs::write(&path, resolved_recipe).with_context(|| format!("writing {}", path.display()))
}

/// What a run trains: the model (f32 parameters with stable ids, frozen parts frozen), its AdamW
/// state, the learner's position, and how its gradients are computed (precision, gradient
/// checkpointing, clipping); from the newest complete checkpoint when resuming.
pub struct Trainee<B: TrainBackend> {
    /// Always `Some` outside [`Trainee::update`] (see [`Trainee::model`]).
    model: Option<Qwen25VL<B>>,
    pub optim: Adam<B>,
    pub state: TrainState,
    /// The checkpoint this run continues from (`--resume`), if any.
    pub resumed_from: Option<PathBuf>,
    pub precision: Precision,
    pub checkpointing: GradientCheckpointing,
    /// Global gradient-norm clip (0: none).
    pub max_grad_norm: f64,
    /// What an update with a non-finite loss or gradient norm does.
    pub nan_policy: NanPolicy,
    /// Checkpoints hold the AdamW state too (else weights only).
    pub save_optimizer: bool,
    /// Test hook (`INFIMED_FAULT_NAN_AT_STEP=k`): the loss of optimizer step `k` is made NaN.
    fault_nan_step: Option<usize>,
}

/// `nan_policy`: what an update whose loss (on any rank) or global gradient norm is not finite
/// does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Stop the run with an error naming the step, its samples and the last good checkpoint.
    #[default]
    Stop,
    /// Skip the update (the weights and AdamW state stay as they are); counted in the metrics.
    Skip,
}

/// An update that did not happen: the step's loss or gradient norm is not finite.
#[derive(Debug, thiserror::Error)]
#[error(
    "non-finite {what} ({value}) at optimizer step {step}{}{}; nan_policy = \"skip\" skips such updates instead",
    if samples.is_empty() { String::new() } else { format!(" (samples: {})", samples.join(", ")) },
    match last_checkpoint {
        Some(c) => format!("; the last good checkpoint is {} (--resume continues from it)", c.display()),
        None => "; there is no checkpoint yet".into(),
    }
)]
pub struct NonFinite {
    pub step: usize,
    /// "loss" or "gradient norm".
    pub what: &'static str,
    pub value: f64,
    /// This rank's micro-batches whose loss is not finite.
    pub micro_batches: Vec<usize>,
    /// Where their samples come from (`FILE:LINE`), named by the learner.
    pub samples: Vec<String>,
    /// Named by the training loop.
    pub last_checkpoint: Option<PathBuf>,
}

impl NonFinite {
    /// `e` with the samples of its micro-batches named (`samples_of(k)` for micro-batch `k`), if
    /// it is a [`NonFinite`]; else `e`.
    pub fn name_samples(
        e: anyhow::Error,
        samples_of: impl Fn(usize) -> Vec<String>,
    ) -> anyhow::Error {
        match e.downcast::<NonFinite>() {
            Ok(mut nf) => {
                nf.samples = nf
                    .micro_batches
                    .iter()
                    .flat_map(|&k| samples_of(k))
                    .collect();
                nf.into()
            }
            Err(e) => e,
        }
    }
}

/// The gradients of one optimizer step on this rank: each micro-batch's share of the step's loss
/// and the summed gradients.
pub struct StepGradients {
    pub shares: Vec<f64>,
    pub grads: GradientsParams,
}

impl StepGradients {
    /// This rank's part of the step's loss.
    pub fn loss(&self) -> f64 {
        self.shares.iter().sum()
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Skipped (`nan_policy = "skip"`, non-finite loss or norm).
    pub skipped: bool,
}

/// Where the run's parameters come from and how they are optimised.
pub struct TraineeSpec<'a> {
    /// The recipe's `model` (`builtin:NAME` or an HF folder).
    pub model: &'a str,
    pub seed: u64,
    pub freeze: &'a FreezeConfig,
    pub optimizer: &'a OptimizerConfig,
    pub precision: Precision,
    pub checkpointing: GradientCheckpointing,
    pub nan_policy: NanPolicy,
    pub save_optimizer: bool,
    pub out_dir: &'a Path,
    pub resume: bool,
}

impl<B: TrainBackend> Trainee<B> {
    pub fn start(spec: &TraineeSpec, device: &B::Device) -> Result<Self> {
        let resumed_from = if spec.resume {
            latest_checkpoint(spec.out_dir)?
        } else {
            None
        };
        let model: Qwen25VL<B> = match &resumed_from {
            Some(ck) => Qwen25VL::load(&ck.join("hf"), device)?,
            None => load_model(spec.model, spec.seed, device)?,
        };
        let model = apply_freeze(assign_stable_param_ids(model), spec.freeze);
        let mut trainee = Self::new(model, spec.optimizer, spec.precision, spec.checkpointing);
        trainee.state.seed = spec.seed;
        (trainee.nan_policy, trainee.save_optimizer) = (spec.nan_policy, spec.save_optimizer);
        if let Some(ck) = &resumed_from {
            let (optim, state) = load_checkpoint::<B>(ck, trainee.optim, device)?;
            trainee.optim = optim;
            trainee.state = state;
            eprintln!(
                "resuming from {} (step {})",
                ck.display(),
                trainee.state.step
            );
        }
        trainee.resumed_from = resumed_from;
        Ok(trainee)
    }

    /// A fresh run of `model` (ids and freezing as the caller set them) with AdamW.
    pub fn new(
        model: Qwen25VL<B>,
        optimizer: &OptimizerConfig,
        precision: Precision,
        checkpointing: GradientCheckpointing,
    ) -> Self {
        Self {
            model: Some(model),
            optim: adamw(optimizer).init::<B, Qwen25VL<B>>(),
            state: TrainState::default(),
            resumed_from: None,
            precision,
            checkpointing,
            max_grad_norm: optimizer.max_grad_norm,
            nan_policy: NanPolicy::Stop,
            save_optimizer: true,
            fault_nan_step: std::env::var("INFIMED_FAULT_NAN_AT_STEP")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    /// Every rank starts from rank 0's weights (data parallelism; a no-op on one rank).
    pub fn sync_weights(&mut self, rank: &crate::learn::parallel::Rank) -> Result<()> {
        let model = self
            .model
            .take()
            .expect("the trainee holds its model between updates");
        self.model = Some(rank.sync_from_main(model)?);
        Ok(())
    }

    /// The model being trained (f32 parameters under autodiff).
    pub fn model(&self) -> &Qwen25VL<B> {
        self.model
            .as_ref()
            .expect("the trainee holds its model between updates")
    }

    /// The gradients of one optimizer step over its micro-batches and their loss shares
    /// ([`accumulate_gradients`] in the trainee's precision and checkpointing).
    pub fn gradients(
        &self,
        inputs: &[&ModelInput],
        mut loss_of: impl FnMut(&Qwen25VL<B>, usize, Tensor<B, 3>) -> Result<Tensor<B, 1>>,
    ) -> Result<StepGradients> {
        let fault = self.fault_nan_step == Some(self.state.step + 1);
        let (shares, grads) = accumulate_gradients(
            self.model(),
            self.precision,
            self.checkpointing,
            inputs,
            |m, k, h| {
                let loss = loss_of(m, k, h)?;
                Ok(if fault && k == 0 {
                    loss.mul_scalar(f64::NAN)
                } else {
                    loss
                })
            },
        )?;
        Ok(StepGradients { shares, grads })
    }

    /// One optimizer update from this rank's gradients: summed over the ranks, clipped to the
    /// global norm `max_grad_norm`, one AdamW step at `lr`. When the step's loss (on any rank)
    /// or the global norm is not finite, the update does not happen: with `nan_policy = "stop"`
    /// an error ([`NonFinite`]), with `"skip"` an [`Update`] marked skipped.
    pub fn update(
        &mut self,
        step: StepGradients,
        lr: f64,
        rank: &Rank,
        device: &B::Device,
    ) -> Result<Update> {
        let bad: Vec<usize> = (0..step.shares.len())
            .filter(|&k| !step.shares[k].is_finite())
            .collect();
        let mut grads = rank.all_reduce_grads(self.model(), step.grads)?;
        let bad_anywhere =
            rank.sum_values::<B::InnerBackend>(&[bad.len() as f64], device)?[0] > 0.0;
        let grad_norm = clip_grad_norm(self.model(), &mut grads, self.max_grad_norm);
        if bad_anywhere || !grad_norm.is_finite() {
            if self.nan_policy == NanPolicy::Skip {
                return Ok(Update {
                    grad_norm,
                    skipped: true,
                });
            }
            let (what, value) = match bad.first() {
                Some(&k) => ("loss", step.shares[k]),
                None if bad_anywhere => ("loss (on another rank)", f64::NAN),
                None => ("gradient norm", grad_norm),
            };
            let step = self.state.step + 1;
            return Err(NonFinite {
                step,
                what,
                value,
                micro_batches: bad,
                samples: vec![],
                last_checkpoint: None,
            }
            .into());
        }
        // The optimizer takes the module by value (so that it can update tensors in place).
        let model = self
            .model
            .take()
            .expect("the trainee holds its model between updates");
        self.model = Some(self.optim.step(lr, model, grads));
        Ok(Update {
            grad_norm,
            skipped: false,
        })
    }

    /// Write `checkpoint-{step}` (atomic) into `out_dir`, with the model's tokenizer and
    /// processor files from `files`.
    pub fn save_checkpoint(&self, out_dir: &Path, files: &Path) -> Result<PathBuf> {
        let optim = self.save_optimizer.then_some(&self.optim);
        save_checkpoint(out_dir, self.model(), optim, &self.state, files)
    }

    /// The HF export at `out_dir` (bf16 runs export bf16, as LLaMA-Factory does), with the
    /// model's tokenizer and processor files from `files`. Returns the trained model without
    /// autodiff.
    pub fn export(&self, out_dir: &Path, files: &Path) -> Result<Qwen25VL<B::InnerBackend>> {
        let inner = self.model().valid();
        let dtype = match self.precision {
            Precision::Bf16 => SaveDtype::BF16,
            Precision::F32 => SaveDtype::F32,
        };
        inner.save(out_dir, dtype, 4 << 30)?;
        copy_aux_files(files, out_dir)?;
        Ok(inner)
    }
}

/// The gradients of one optimizer step over its micro-batches: for micro-batch `k` (model input
/// `inputs[k]`), the final hidden states are computed and `loss_of(compute_model, k, hidden)` is
/// the micro-batch's share of the step's loss (already scaled, so the shares add up to the
/// step's loss); its backward pass runs and the gradients are summed. `compute_model` is the
/// model in the compute precision (bf16: a recorded cast of the f32 parameters, so the gradients
/// arrive in f32 at the master weights). With `checkpointing = Layer` the backward pass is the
/// per-layer checkpointed one ([`crate::learn::layerwise`]). Returns the micro-batches' shares
/// (non-finite ones too: [`Trainee::update`] decides) and the summed gradients.
pub fn accumulate_gradients<B: TrainBackend>(
    model: &Qwen25VL<B>,
    precision: Precision,
    checkpointing: GradientCheckpointing,
    inputs: &[&ModelInput],
    mut loss_of: impl FnMut(&Qwen25VL<B>, usize, Tensor<B, 3>) -> Result<Tensor<B, 1>>,
) -> Result<(Vec<f64>, GradientsParams)> {
    let mut acc = GradientsAccumulator::<Qwen25VL<B>>::new();
    let mut shares = Vec::with_capacity(inputs.len());
    for (k, input) in inputs.iter().enumerate() {
        let (value, grads) = if checkpointing == GradientCheckpointing::Layer {
            layerwise_backward(model, precision, input, |m, hidden| loss_of(m, k, hidden))?
        } else {
            let compute = compute_model(model, precision);
            let hidden = compute.forward_hidden(input, None)?;
            let loss = loss_of(&compute, k, hidden)?;
            let value: f64 = loss.clone().into_scalar().elem::<f64>();
            (value, GradientsParams::from_grads(loss.backward(), model))
        };
        shares.push(value);
        acc.accumulate(model, grads);
    }
    Ok((shares, acc.grads()))
}

/// The progress bar of a learner: optimizer steps, elapsed and estimated time, a message.
pub fn progress_bar(total_steps: usize, position: usize) -> ProgressBar {
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed} < {eta}] {msg}")
            .expect("progress template"),
    );
    bar.set_position(position as u64);
    bar
}
