//! Log-probabilities of target tokens: what the SFT loss, the GRPO policy loss and `infimed score`
//! compute from the model (logits only at the positions before a target).

use anyhow::{Context, Result};
use burn::module::Module;
use burn::prelude::*;

use crate::grpo::algos::entropy_from_logits;
use crate::learn::batch::MicroBatch;
use crate::model::nn::int1;
use crate::model::ModelBackend;
use crate::model::Qwen25VL;

/// Row indices (`row * seq + position`) of the positions before the batch's target tokens, and
/// the target ids, in batch order (row by row, left to right).
pub fn target_rows(batch: &MicroBatch) -> (Vec<usize>, Vec<u32>) {
    let mut rows = vec![];
    let mut targets = vec![];
    let t = batch.input.seq_len();
    for (bi, l) in batch.labels.iter().enumerate() {
        for (j, tok) in l.iter().enumerate() {
            if let (Some(tok), true) = (tok, j > 0) {
                rows.push(bi * t + j - 1);
                targets.push(*tok);
            }
        }
    }
    (rows, targets)
}

/// The final hidden states `[targets, C]` at the positions before the batch's target tokens,
/// with the target ids.
pub fn target_hidden<B: Backend>(
    batch: &MicroBatch,
    hidden: Tensor<B, 3>,
) -> (Tensor<B, 2>, Vec<u32>) {
    let device = hidden.device();
    let (rows, targets) = target_rows(batch);
    let [b, t, c] = hidden.dims();
    if rows.is_empty() {
        return (Tensor::zeros([0, c], &device), targets);
    }
    (
        hidden
            .reshape([b * t, c])
            .select(0, int1::<B>(&rows, &device)),
        targets,
    )
}

/// `log_softmax(logits / temperature)` of the batch's target tokens from its final hidden
/// states, in batch order, with the target ids; the logits are never materialised for all
/// targets at once (see `infimed_model::head`).
pub fn target_logprobs_of<B: ModelBackend>(
    model: &Qwen25VL<B>,
    batch: &MicroBatch,
    hidden: Tensor<B, 3>,
    temperature: f64,
) -> (Tensor<B, 1>, Vec<u32>) {
    let (rows, targets) = target_hidden(batch, hidden);
    if targets.is_empty() {
        return (Tensor::zeros([0], &rows.device()), targets);
    }
    (
        model.target_logprobs(rows, targets.clone(), temperature),
        targets,
    )
}

/// Sum over the batch's target tokens of `-log p(token)`, from the batch's final hidden states.
pub fn token_nll_sum_of<B: ModelBackend>(
    model: &Qwen25VL<B>,
    batch: &MicroBatch,
    hidden: Tensor<B, 3>,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let (logp, targets) = target_logprobs_of(model, batch, hidden, 1.0);
    if targets.is_empty() {
        return Tensor::zeros([1], &device);
    }
    logp.sum().neg()
}

/// Sum over rows of the entropy of `softmax(logits / temperature)` for final hidden states
/// `rows [N, C]` (a metric: no gradient).
pub fn entropy_sum<B: ModelBackend>(
    model: &Qwen25VL<B>,
    rows: Tensor<B, 2>,
    temperature: f64,
) -> f64 {
    token_entropy(
        model,
        rows.detach(),
        Some(model.head_matrix().detach()),
        temperature,
    )
    .sum()
    .into_scalar()
    .elem::<f64>()
}

/// The entropy of `softmax(logits / temperature)` of each row of final hidden states `rows [N,
/// C]`: `[N]`, differentiable w.r.t. `rows` and the head (`head`: the head matrix to use, `None`:
/// the model's). The logits are formed a chunk of rows at a time, but autodiff keeps each
/// chunk's softmax for the backward pass (memory ~ N x vocab).
pub fn token_entropy<B: ModelBackend>(
    model: &Qwen25VL<B>,
    rows: Tensor<B, 2>,
    head: Option<Tensor<B, 2>>,
    temperature: f64,
) -> Tensor<B, 1> {
    let head = head.unwrap_or_else(|| model.head_matrix());
    let [n, _] = rows.dims();
    if n == 0 {
        return Tensor::zeros([0], &rows.device());
    }
    let chunks: Vec<Tensor<B, 1>> = (0..n)
        .step_by(crate::model::head::HEAD_CHUNK)
        .map(|start| {
            let len = crate::model::head::HEAD_CHUNK.min(n - start);
            let z =
                crate::model::nn::upcast(rows.clone().narrow(0, start, len).matmul(head.clone()))
                    .div_scalar(temperature);
            entropy_from_logits(z)
        })
        .collect();
    Tensor::cat(chunks, 0)
}

/// Log-probs of the batch's target tokens (each from the logits at the position before it;
/// logits are computed only at those positions), with the target ids, in batch order.
pub fn target_logprobs<B: ModelBackend>(
    model: &Qwen25VL<B>,
    batch: &MicroBatch,
) -> Result<(Tensor<B, 1>, Vec<u32>)> {
    let device = model
        .devices()
        .into_iter()
        .next()
        .context("model has no parameters")?;
    if target_rows(batch).0.is_empty() {
        return Ok((Tensor::zeros([0], &device), vec![]));
    }
    let hidden = model.forward_hidden(&batch.input, None)?;
    Ok(target_logprobs_of(model, batch, hidden, 1.0))
}

/// Sum over the batch's target tokens of `-log p(token)`.
pub fn token_nll_sum<B: ModelBackend>(
    model: &Qwen25VL<B>,
    batch: &MicroBatch,
) -> Result<Tensor<B, 1>> {
    let (logp, targets) = target_logprobs(model, batch)?;
    if targets.is_empty() {
        let device = model
            .devices()
            .into_iter()
            .next()
            .context("model has no parameters")?;
        return Ok(Tensor::zeros([1], &device));
    }
    Ok(logp.sum().neg())
}
