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
use crate::learn::metrics::check_finite;
use crate::learn::optim::{adamw, clip_grad_norm, Adam, OptimizerConfig};
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

    /// The summed gradients of one optimizer step over its micro-batches and the step's loss
    /// ([`accumulate_gradients`] in the trainee's precision and checkpointing).
    pub fn gradients(
        &self,
        inputs: &[&ModelInput],
        what: impl Fn(usize) -> String,
        loss_of: impl FnMut(&Qwen25VL<B>, usize, Tensor<B, 3>) -> Result<Tensor<B, 1>>,
    ) -> Result<(f64, GradientsParams)> {
        let (model, step) = (self.model(), self.state.step);
        accumulate_gradients(
            model,
            self.precision,
            self.checkpointing,
            inputs,
            step,
            what,
            loss_of,
        )
    }

    /// Clip the step's gradients to the global norm `max_grad_norm` and take one AdamW step at
    /// `lr`. Returns the norm before clipping.
    pub fn update(&mut self, mut grads: GradientsParams, lr: f64) -> f64 {
        let norm = clip_grad_norm(self.model(), &mut grads, self.max_grad_norm);
        // The optimizer takes the module by value (so that it can update tensors in place).
        let model = self
            .model
            .take()
            .expect("the trainee holds its model between updates");
        self.model = Some(self.optim.step(lr, model, grads));
        norm
    }

    /// Write `checkpoint-{step}` (atomic) into `out_dir`, with the model's tokenizer and
    /// processor files from `files`.
    pub fn save_checkpoint(&self, out_dir: &Path, files: &Path) -> Result<PathBuf> {
        save_checkpoint(out_dir, self.model(), &self.optim, &self.state, files)
    }

    /// The end of a run: the final checkpoint (for resume) and the HF export at `out_dir`
    /// (bf16 runs export bf16, as LLaMA-Factory does). Returns the trained model without autodiff.
    pub fn finish(&self, out_dir: &Path, files: &Path) -> Result<Qwen25VL<B::InnerBackend>> {
        self.save_checkpoint(out_dir, files)?;
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
/// per-layer checkpointed one ([`crate::learn::layerwise`]). Returns the step's loss (the sum
/// of the shares) and the summed gradients; a non-finite share is an error naming the
/// optimizer step and `what(k)`.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_gradients<B: TrainBackend>(
    model: &Qwen25VL<B>,
    precision: Precision,
    checkpointing: GradientCheckpointing,
    inputs: &[&ModelInput],
    step: usize,
    what: impl Fn(usize) -> String,
    mut loss_of: impl FnMut(&Qwen25VL<B>, usize, Tensor<B, 3>) -> Result<Tensor<B, 1>>,
) -> Result<(f64, GradientsParams)> {
    let mut acc = GradientsAccumulator::<Qwen25VL<B>>::new();
    let mut total = 0.0;
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
        check_finite(value, step, &what(k))?;
        total += value;
        acc.accumulate(model, grads);
    }
    Ok((total, acc.grads()))
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
