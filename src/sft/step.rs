//! One SFT optimizer step: batch -> loss -> update.

use anyhow::Result;

use crate::learn::batch::MicroBatch;
use crate::learn::logprobs::token_nll_sum_of;
use crate::learn::parallel::Rank;
use crate::learn::run::Trainee;
use crate::model::{ModelInput, TrainBackend};

/// What one SFT optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct SftStepOutcome {
    /// This rank's share of the step's loss (the shares of all ranks add up to the loss).
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens of the step over all ranks: the loss's denominator.
    pub target_tokens: f64,
    /// The update was skipped (`nan_policy = "skip"`).
    pub skipped: bool,
}

/// One optimizer step on this rank's micro-batches of the step. The loss is the mean negative
/// log-likelihood over every target token of the step (all ranks: each rank divides its sum by
/// the all-reduced count, so the shares add up to the loss of one rank taking the whole step);
/// one backward pass per micro-batch, the gradients summed over micro-batches and ranks, clipped
/// to the global norm, one AdamW update at `lr` (unless the loss or the norm is not finite:
/// [`Trainee::update`]).
pub fn sft_step<B: TrainBackend>(
    trainee: &mut Trainee<B>,
    micro: &[MicroBatch],
    lr: f64,
    rank: &Rank,
    device: &B::Device,
) -> Result<SftStepOutcome> {
    let local_targets = micro.iter().map(|m| m.target_tokens).sum::<usize>() as f64;
    let target_tokens = rank.sum_values::<B::InnerBackend>(&[local_targets], device)?[0].max(1.0);
    let inputs: Vec<&ModelInput> = micro.iter().map(|m| &m.input).collect();
    let grads = trainee.gradients(&inputs, |model, k, hidden| {
        Ok(token_nll_sum_of(model, &micro[k], hidden).div_scalar(target_tokens))
    })?;
    let loss = grads.loss();
    let update = trainee.update(grads, lr, rank, device)?;
    Ok(SftStepOutcome {
        loss,
        grad_norm: update.grad_norm,
        target_tokens,
        skipped: update.skipped,
    })
}
