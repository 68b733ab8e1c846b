//! The updates of one GRPO step: `ppo.epochs` passes over the step's scored responses in
//! mini-batches of `ppo.mini_batch` groups, one optimizer update per mini-batch, its
//! micro-batches of `ppo.micro_batch` responses accumulated (each micro-batch's share of the
//! mini-batch's objective is exact: [`crate::grpo::objective`]).

use anyhow::Result;
use burn::prelude::*;

use crate::data::encode::Encoded;
use crate::grpo::algos::rollout_drift;
use crate::grpo::objective::{grpo_objective, micro_share, MicroInputs};
use crate::grpo::recipe::GrpoRecipe;
use crate::grpo::rollout::{host_matrix, to_matrix, ScoredGroups};
use crate::learn::batch::{collate, MicroBatch};
use crate::learn::logprobs::{entropy_sum, target_hidden, token_entropy};
use crate::learn::parallel::Rank;
use crate::learn::run::{NonFinite, Trainee};
use crate::learn::schedule::lr_at;
use crate::model::{ModelInput, TrainBackend};

/// This rank's responses of the step as training sequences, and their token log-probs computed
/// before the updates.
pub struct StepResponses<'a> {
    /// Prompt + response of this rank's responses, the step's responses `first..first + len`.
    pub seqs: &'a [Encoded],
    pub first: usize,
    /// Under the policy that sampled them (`None`: one update per step, where old = current).
    pub old: Option<&'a [Vec<f32>]>,
    /// Under the frozen reference (`None`: no KL term).
    pub reference: Option<&'a [Vec<f32>]>,
    /// `FILE:LINE` of the record of each of the step's responses (errors name them).
    pub origins: &'a [String],
}

/// What the updates of one step measured (first PPO epoch; token-weighted sums over all ranks).
#[derive(Default)]
pub struct UpdateStats {
    pub pg_sum: f64,
    pub kl_sum: f64,
    pub clip_sum: f64,
    pub loss_tokens: usize,
    pub entropy_sum: f64,
    pub entropy_tokens: usize,
    pub grad_norms: Vec<f64>,
    /// |rollout log-prob - trainer log-prob| over the response tokens (before any update): sum,
    /// max and count.
    pub drift_sum: f64,
    pub drift_max: f64,
    pub drift_tokens: usize,
    /// Updates skipped for a non-finite loss or gradient norm (`nan_policy = "skip"`).
    pub skipped_updates: usize,
    pub lr: f64,
    /// Tokens (prompt + response) run through forward + backward, every epoch.
    pub tokens: usize,
}

/// The updates of the step (see the module docs) on the scored responses; `total_steps` places
/// the updates on the lr schedule.
#[allow(clippy::too_many_arguments)] // the step's inputs, as the learner holds them
pub fn policy_update<B: TrainBackend>(
    trainee: &mut Trainee<B>,
    recipe: &GrpoRecipe,
    scored: &ScoredGroups,
    responses: &StepResponses,
    pad_id: u32,
    total_steps: usize,
    rank: &Rank,
    device: &B::Device,
) -> Result<UpdateStats> {
    let alg = &recipe.algorithm;
    let (g, temperature) = (recipe.rollout.n, recipe.rollout.temperature as f64);
    let (ups, per_mini) = (recipe.updates_per_step(), recipe.ppo.mini_batch);
    let (groups, first, seqs) = (scored.in_update.len(), responses.first, responses.seqs);
    let lens: Vec<usize> = scored.rollouts.iter().map(|r| r.tokens.len()).collect();
    // Tokens that take part in the loss: none of a truncated response with `mask_truncated`.
    let loss_lens: Vec<usize> = scored
        .rollouts
        .iter()
        .map(|r| match alg.mask_truncated && !r.stopped {
            true => 0,
            false => r.tokens.len(),
        })
        .collect();
    let mut st = UpdateStats::default();
    for epoch in 0..recipe.ppo.epochs {
        for mini_start in (0..recipe.rollout.prompts_per_step).step_by(per_mini) {
            let update = trainee.state.step * ups
                + epoch * (recipe.rollout.prompts_per_step / per_mini)
                + mini_start / per_mini;
            st.lr = lr_at(
                &recipe.schedule,
                recipe.optimizer.lr,
                update,
                total_steps * ups,
            );
            let members: Vec<usize> = (mini_start..(mini_start + per_mini).min(groups))
                .filter(|&k| scored.in_update[k])
                .flat_map(|k| k * g..(k + 1) * g)
                .collect();
            if members.is_empty() {
                continue;
            }
            let mini_tokens: usize = members.iter().map(|&i| loss_lens[i]).sum();
            let mini_responses = members.iter().filter(|&&i| loss_lens[i] > 0).count();
            // This rank's responses of the mini-batch; the shares are of the whole mini-batch,
            // over all ranks.
            let local: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| i >= first && i < first + seqs.len())
                .collect();
            let micros: Vec<&[usize]> = local.chunks(recipe.ppo.micro_batch).collect();
            let batches: Vec<MicroBatch> = micros
                .iter()
                .map(|micro| {
                    collate(
                        &micro.iter().map(|&i| &seqs[i - first]).collect::<Vec<_>>(),
                        pad_id,
                    )
                })
                .collect();
            let inputs: Vec<&ModelInput> = batches.iter().map(|mb| &mb.input).collect();
            let grads = trainee.gradients(&inputs, |model, k, hidden| {
                let (micro, mb) = (micros[k], &batches[k]);
                let micro_lens: Vec<usize> = micro.iter().map(|&i| lens[i]).collect();
                let all_tokens: usize = micro_lens.iter().sum();
                let micro_tokens: usize = micro.iter().map(|&i| loss_lens[i]).sum();
                let micro_responses = micro.iter().filter(|&&i| loss_lens[i] > 0).count();
                let (rows, targets) = target_hidden(mb, hidden);
                // Entropy of the sampling distribution: differentiable for the entropy bonus,
                // else a metric only.
                let entropy = (alg.entropy_coef > 0.0)
                    .then(|| token_entropy(model, rows.clone(), None, temperature));
                if epoch == 0 {
                    st.entropy_sum += match &entropy {
                        Some(h) => h.clone().detach().sum().into_scalar().elem::<f64>(),
                        None => entropy_sum(model, rows.clone(), temperature),
                    };
                    st.entropy_tokens += all_tokens;
                }
                let logp = if targets.is_empty() {
                    Tensor::zeros([0], device)
                } else {
                    model.target_logprobs(rows, targets, temperature)
                };
                let entropy = entropy.map(|h| to_matrix(h, &micro_lens).0);
                let (logp, full_mask) = to_matrix(logp, &micro_lens);
                let keep: Vec<f32> = micro
                    .iter()
                    .map(|&i| (loss_lens[i] > 0) as u8 as f32)
                    .collect();
                let keep = Tensor::<B, 1>::from_data(TensorData::new(keep, [micro.len()]), device);
                let mask = full_mask.clone() * keep.unsqueeze_dim::<2>(1);
                let matrix = |m: &[Vec<f32>]| {
                    let rows: Vec<&[f32]> =
                        micro.iter().map(|&i| m[i - first].as_slice()).collect();
                    host_matrix::<B>(&rows, device)
                };
                let old = match responses.old {
                    Some(o) => matrix(o),
                    None => logp.clone().detach(),
                };
                let advs: Vec<f32> = micro
                    .iter()
                    .map(|&i| scored.rollouts[i].advantage as f32)
                    .collect();
                let adv = Tensor::<B, 1>::from_data(TensorData::new(advs, [micro.len()]), device);
                let share = micro_share(
                    alg.loss_agg,
                    (micro_tokens, micro_responses),
                    (mini_tokens, mini_responses),
                );
                let rollout_rows: Vec<&[f32]> = micro
                    .iter()
                    .map(|&i| scored.rollouts[i].logprobs.as_slice())
                    .collect();
                let rollout = host_matrix::<B>(&rollout_rows, device);
                if epoch == 0 {
                    let (sum, max) = rollout_drift(old.clone(), rollout.clone(), full_mask);
                    st.drift_sum += sum.into_scalar().elem::<f64>();
                    st.drift_max = st.drift_max.max(max.into_scalar().elem::<f64>());
                    st.drift_tokens += all_tokens;
                }
                let inputs = MicroInputs {
                    logp,
                    old,
                    rollout: Some(rollout),
                    reference: responses.reference.map(matrix),
                    entropy,
                    adv,
                    mask,
                };
                let obj = grpo_objective(inputs, alg, share);
                if epoch == 0 {
                    let value =
                        |t: Tensor<B, 1>| t.into_scalar().elem::<f64>() * micro_tokens as f64;
                    st.kl_sum += obj.kl.map(value).unwrap_or(0.0);
                    st.pg_sum += value(obj.pg_loss);
                    st.clip_sum += value(obj.clip_frac);
                    st.loss_tokens += micro_tokens;
                }
                st.tokens += mb.input.input_ids.iter().map(Vec::len).sum::<usize>();
                Ok(obj.loss)
            })?;
            let update = trainee.update(grads, st.lr, rank, device).map_err(|e| {
                NonFinite::name_samples(e, |k| {
                    micros[k]
                        .iter()
                        .map(|&i| responses.origins[i].clone())
                        .collect()
                })
            })?;
            st.grad_norms.push(update.grad_norm);
            st.skipped_updates += update.skipped as usize;
        }
    }
    // The measurements of every rank's responses.
    let sums = [
        st.pg_sum,
        st.kl_sum,
        st.clip_sum,
        st.loss_tokens as f64,
        st.entropy_sum,
        st.entropy_tokens as f64,
        st.tokens as f64,
        st.drift_sum,
        st.drift_tokens as f64,
    ];
    // The largest drift of any rank: each rank's in its own slot, summed.
    let mut maxes = vec![0.0; rank.world];
    maxes[rank.rank] = st.drift_max;
    let sums = [sums.as_slice(), &maxes].concat();
    let sums = rank.sum_values::<B::InnerBackend>(&sums, device)?;
    (st.pg_sum, st.kl_sum, st.clip_sum, st.loss_tokens) =
        (sums[0], sums[1], sums[2], sums[3] as usize);
    (st.entropy_sum, st.entropy_tokens, st.tokens) = (sums[4], sums[5] as usize, sums[6] as usize);
    (st.drift_sum, st.drift_tokens) = (sums[7], sums[8] as usize);
    st.drift_max = sums[9..].iter().copied().fold(0.0, f64::max);
    Ok(st)
}
