//! The GRPO objective of one micro-batch of responses, assembled from the formulas of
//! [`crate::grpo::algos`] as verl's actor (`dp_actor.update_policy`) assembles it:
//!
//! ```text
//! w    = tis_weights(old, rollout, cap)                  with rollout_is = "tis" (else none)
//! loss = share x ( policy_loss(logp, old, A, w)         "vanilla" (clipped token ratio) or
//!                                                        "gspo" (clipped sequence ratio), `loss_agg`
//!                + kl_coef x agg_loss(kl(logp, ref))     when kl_coef > 0
//!                - entropy_coef x agg_loss(entropy) )    when entropy_coef > 0
//! ```
//!
//! `share` is the micro-batch's part of its mini-batch (tokens for `token_mean`, responses
//! otherwise), so the micro-batches' gradients add up to the mini-batch's.

use burn::prelude::*;

use crate::grpo::algos::{
    agg_loss, kl_penalty, masked_mean, policy_loss, policy_loss_gspo, tis_weights, LossAgg,
    PolicyLossOut,
};
use crate::grpo::recipe::{AlgorithmConfig, PolicyLoss, RolloutIs};

/// The objective of a micro-batch and what it measured (detached, `[1]` each).
pub struct Objective<B: Backend> {
    /// `share x` the micro-batch's loss (differentiable w.r.t. `logp`).
    pub loss: Tensor<B, 1>,
    /// The policy loss (before `share`).
    pub pg_loss: Tensor<B, 1>,
    /// `pg_clipfrac`: the fraction of tokens where the clipped term is the larger.
    pub clip_frac: Tensor<B, 1>,
    /// Mean KL to the reference over the response tokens (`None`: no KL term).
    pub kl: Option<Tensor<B, 1>>,
}

/// The `[responses, max_len]` matrices of a micro-batch: token log-probs under the policy being
/// trained (`logp`), under the policy that sampled them as the trainer computes them (`old`), as
/// the rollout engine reported them (`rollout`), under the frozen reference (`reference`), the
/// per-token entropy of the policy (`entropy`, differentiable), and the loss `mask`; advantages
/// `adv` one per response.
pub struct MicroInputs<B: Backend> {
    pub logp: Tensor<B, 2>,
    pub old: Tensor<B, 2>,
    pub rollout: Option<Tensor<B, 2>>,
    pub reference: Option<Tensor<B, 2>>,
    pub entropy: Option<Tensor<B, 2>>,
    pub adv: Tensor<B, 1>,
    pub mask: Tensor<B, 2>,
}

/// The share of a micro-batch of `micro_tokens` tokens in `micro_responses` responses in its
/// mini-batch of `mini_tokens` / `mini_responses`.
pub fn micro_share(
    agg: LossAgg,
    (micro_tokens, micro_responses): (usize, usize),
    (mini_tokens, mini_responses): (usize, usize),
) -> f64 {
    match agg {
        LossAgg::TokenMean => micro_tokens as f64 / mini_tokens.max(1) as f64,
        _ => micro_responses as f64 / mini_responses.max(1) as f64,
    }
}

/// The objective (see the module docs) of a micro-batch.
pub fn grpo_objective<B: Backend>(
    x: MicroInputs<B>,
    alg: &AlgorithmConfig,
    share: f64,
) -> Objective<B> {
    let MicroInputs {
        logp,
        old,
        rollout,
        reference,
        entropy,
        adv,
        mask,
    } = x;
    let weights = match (alg.rollout_is, rollout) {
        (Some(RolloutIs::Tis), Some(r)) => Some(tis_weights(
            old.clone(),
            r,
            mask.clone(),
            alg.rollout_is_cap,
        )),
        _ => None,
    };
    let (clip_low, clip_high, agg) = (alg.clip_low, alg.clip_high, alg.loss_agg);
    let pg: PolicyLossOut<B> = match alg.policy_loss {
        PolicyLoss::Vanilla => policy_loss(
            logp.clone(),
            old,
            adv,
            mask.clone(),
            clip_low,
            clip_high,
            alg.dual_clip,
            agg,
            weights,
        ),
        PolicyLoss::Gspo => policy_loss_gspo(
            logp.clone(),
            old,
            adv,
            mask.clone(),
            clip_low,
            clip_high,
            weights,
        ),
    };
    let mut loss = pg.loss.clone().mul_scalar(share);
    let mut kl = None;
    if let (Some(r), true) = (reference, alg.kl_coef > 0.0) {
        let kl_tok = kl_penalty(logp, r, alg.kl_kind);
        kl = Some(masked_mean(kl_tok.clone().detach(), mask.clone()));
        loss = loss + agg_loss(kl_tok, mask.clone(), agg).mul_scalar(alg.kl_coef * share);
    }
    if let (Some(h), true) = (entropy, alg.entropy_coef > 0.0) {
        loss = loss - agg_loss(h, mask, agg).mul_scalar(alg.entropy_coef * share);
    }
    Objective {
        loss,
        pg_loss: pg.loss.detach(),
        clip_frac: pg.clip_frac,
        kl,
    }
}
