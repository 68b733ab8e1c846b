//! GRPO (RLVR) for the InfiMed-RL stage: [`recipe`], [`plan`] (`--dry-run`), [`data`] (prompt
//! records and their order), [`rollout`] (sampled responses, rewards, advantages), [`sampling`]
//! (the groups a step trains on: dynamic sampling), [`algos`], the
//! [`objective`] assembled from them, the updates of a [`step`], its [`metrics`], and the
//! [`learner`] that the training loop ([`crate::learn::trainer`]) runs.
//!
//! [`algos`] holds the core algorithms as small pure functions, one per formula, as verl keeps them in
//! `verl/trainer/ppo/core_algos.py`: group-normalised advantages, the clipped (dual-clip) policy loss,
//! GSPO's sequence-level loss, the KL estimators, the loss aggregation modes, per-token entropy, TIS
//! weights and DAPO's overlong penalty. They take plain slices or Burn tensors of shape
//! `[responses, max_len]` with a float response mask, hold no state, and are checked against values
//! computed by verl's own functions (`tests/fixtures/verl/`; see the tests in `algos.rs`).
//!
//! How a learner puts them together (verl with `use_kl_loss`, the usual GRPO choice):
//!
//! ```text
//! A       = group_advantages(rewards, n, norm_by_std)          // per response, before the update
//! pg      = policy_loss(logp, old_logp, A, mask, clip_low, clip_high, Some(3.0), agg)
//! kl      = agg_loss(kl_penalty(logp, ref_logp, KlKind::LowVarKl), mask, agg)
//! loss    = pg.loss + kl_coef * kl
//! ```
//!
//! with `logp`, `old_logp`, `ref_logp` the log-probabilities of the sampled tokens computed from logits
//! divided by the rollout temperature; `old_logp` is `logp.detach()` when there is one mini-batch and one
//! PPO epoch.

pub mod algos;
pub mod data;
pub mod learner;
pub mod metrics;
pub mod objective;
pub mod plan;
pub mod recipe;
pub mod rollout;
pub mod sampling;
pub mod step;

pub use learner::{train_grpo, GrpoSummary};
pub use recipe::GrpoRecipe;
