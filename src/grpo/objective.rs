//! The GRPO objective of one micro-batch of responses, assembled from the formulas of
//! [`crate::grpo::algos`] as verl's actor (`dp_actor.update_policy`) assembles it:
//!
//! ```text
//! loss = share x ( policy_loss(logp, old, A)                    clipped ratio, `loss_agg`
//!                + kl_coef x agg_loss(kl(logp, ref), `loss_agg`) )   when kl_coef > 0
//! ```
//!
//! `share` is the micro-batch's part of its mini-batch (tokens for `token_mean`, responses
//! otherwise), so the micro-batches' gradients add up to the mini-batch's.

use burn::prelude::*;

use crate::grpo::algos::{agg_loss, kl_penalty, masked_mean, policy_loss, LossAgg};
use crate::grpo::recipe::AlgorithmConfig;

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

/// The share of a micro-batch of `micro_tokens` tokens in `micro_responses` responses in its
/// mini-batch of `mini_tokens` / `mini_responses`.
pub fn micro_share(
    agg: LossAgg,
    (micro_tokens, micro_responses): (usize, usize),
    (mini_tokens, mini_responses): (usize, usize),
) -> f64 {
    match agg {
        LossAgg::TokenMean => micro_tokens as f64 / mini_tokens.max(1) as f64,
        _ => micro_responses as f64 / mini_responses as f64,
    }
}

/// The objective (see the module docs) of responses with token log-probs `logp` under the
/// policy being trained, `old` under the policy that sampled them, `reference` under the frozen
/// reference, advantages `adv` (one per response) and the response `mask`, all
/// `[responses, max_len]`.
pub fn grpo_objective<B: Backend>(
    logp: Tensor<B, 2>,
    old: Tensor<B, 2>,
    reference: Option<Tensor<B, 2>>,
    adv: Tensor<B, 1>,
    mask: Tensor<B, 2>,
    alg: &AlgorithmConfig,
    share: f64,
) -> Objective<B> {
    let (clip_low, clip_high, dual_clip, agg) =
        (alg.clip_low, alg.clip_high, alg.dual_clip, alg.loss_agg);
    let pg = policy_loss(
        logp.clone(),
        old,
        adv,
        mask.clone(),
        clip_low,
        clip_high,
        dual_clip,
        agg,
    );
    let mut loss = pg.loss.clone().mul_scalar(share);
    let mut kl = None;
    if let (Some(r), true) = (reference, alg.kl_coef > 0.0) {
        let kl_tok = kl_penalty(logp, r, alg.kl_kind);
        kl = Some(masked_mean(kl_tok.clone().detach(), mask.clone()));
        loss = loss + agg_loss(kl_tok, mask, agg).mul_scalar(alg.kl_coef * share);
    }
    Objective {
        loss,
        pg_loss: pg.loss.detach(),
        clip_frac: pg.clip_frac,
        kl,
    }
}
