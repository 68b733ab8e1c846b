//! GRPO core algorithms as small pure functions, following verl's `verl/trainer/ppo/core_algos.py`.
//!
//! Per-token quantities are Burn tensors of shape `[responses, max_len]` (right-padded), with a float
//! `mask` of the same shape (1 = response token, 0 = padding). Masked reductions first replace the
//! padded entries by 0, so a non-finite value in the padding (e.g. a `-inf` log-prob) cannot leak into a
//! result or a gradient as NaN.
//!
//! Conventions, and where they differ from verl (all differences are confined to degenerate inputs):
//! - Advantages ([`group_advantages`]): `A = (r - mean) / (std + 1e-6)` over each group of consecutive
//!   responses, std unbiased (n - 1); a group of one has mean 0 and std 1 (so `A = r / (1 + 1e-6)`);
//!   `norm_by_std = false` gives `A = r - mean` (Dr.GRPO). A group whose rewards are all equal gets
//!   exactly 0 (verl gets 0 up to rounding: `(r - mean)` can be ~1e-17, divided by `0 + 1e-6`).
//! - Policy loss ([`policy_loss`]): verl's `compute_policy_loss_vanilla` (ratio clamp, clip, dual clip).
//! - Aggregation ([`agg_loss`]): verl's `agg_loss`. `token-mean` and `seq-mean-token-mean` are the same in
//!   every verl revision; for the rest see [`LossAgg`]. Denominators that can be 0 (a batch or a row with
//!   no response token) give 0 instead of NaN, as current verl does.
//! - `low_var_kl` ([`kl_penalty`]): verl clamps to `[-10, 10]`; the estimator `e^x - x - 1` is >= 0, so we
//!   clamp to `[0, 10]`, which only removes negative rounding noise (~1e-7 in f32 near x = 0).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// verl's `epsilon` in the GRPO advantage.
pub const ADV_EPS: f64 = 1e-6;

/// Floor for denominators that count mask weight (token-mean, per-row token counts). For 0/1 masks a
/// non-empty sum is >= 1, so the floor only matters for an all-padding batch or row (result 0, not NaN).
const DENOM_FLOOR: f64 = 1e-6;

// ---------------------------------------------------------------------------------------------------
// Advantages
// ---------------------------------------------------------------------------------------------------

fn all_equal(g: &[f64]) -> bool {
    g.iter().all(|r| *r == g[0])
}

/// GRPO advantages, one per response: responses `[k * group_size, (k + 1) * group_size)` answer prompt
/// `k`. See the module docs for the conventions (verl's `compute_grpo_outcome_advantage`).
///
/// Panics when `group_size == 0` or `rewards.len()` is not a multiple of `group_size`.
pub fn group_advantages(rewards: &[f64], group_size: usize, norm_by_std: bool) -> Vec<f64> {
    assert!(group_size > 0, "group_size must be positive");
    assert_eq!(
        rewards.len() % group_size,
        0,
        "{} rewards do not split into groups of {group_size}",
        rewards.len()
    );
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group_size) {
        if g.len() == 1 {
            // verl: a prompt with a single response has mean 0 and std 1.
            out.push(if norm_by_std {
                g[0] / (1.0 + ADV_EPS)
            } else {
                g[0]
            });
            continue;
        }
        if all_equal(g) {
            out.extend(std::iter::repeat_n(0.0, g.len()));
            continue;
        }
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        if norm_by_std {
            let std = (g.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / (n - 1.0)).sqrt();
            out.extend(g.iter().map(|r| (r - mean) / (std + ADV_EPS)));
        } else {
            out.extend(g.iter().map(|r| r - mean));
        }
    }
    out
}

/// Number of groups (of at least two responses) whose rewards are all equal: they get advantage 0 and
/// give no learning signal. A group of one is not counted (its advantage is `r / (1 + 1e-6)`).
///
/// Panics like [`group_advantages`].
pub fn zero_variance_groups(rewards: &[f64], group_size: usize) -> usize {
    assert!(group_size > 0, "group_size must be positive");
    assert_eq!(
        rewards.len() % group_size,
        0,
        "{} rewards do not split into groups of {group_size}",
        rewards.len()
    );
    rewards
        .chunks(group_size)
        .filter(|g| g.len() > 1 && all_equal(g))
        .count()
}

// ---------------------------------------------------------------------------------------------------
// Loss aggregation
// ---------------------------------------------------------------------------------------------------

/// verl's `loss_agg_mode`. Serde names are snake_case (`token_mean`, ...) and verl's hyphenated names
/// (`token-mean`, ...) are accepted too; [`std::str::FromStr`] accepts the same strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAgg {
    /// `sum(L * mask) / sum(mask)` over the whole (mini-)batch. verl's and EasyR1's default.
    #[default]
    #[serde(alias = "token-mean")]
    TokenMean,
    /// Mean over responses of each response's token mean (`1/|o_i|` then `1/G`: the paper's objective).
    /// Responses without tokens are left out of the mean (current verl; older verl gives NaN).
    #[serde(alias = "seq-mean-token-mean")]
    SeqMeanTokenMean,
    /// Mean over responses of each response's token sum. Responses without tokens are left out of the
    /// mean (current verl; older verl divides by all rows; the same when every response has a token).
    #[serde(alias = "seq-mean-token-sum")]
    SeqMeanTokenSum,
    /// `sum(L * mask) / max_len` with `max_len` the mask width: verl's `loss_scale_factor` default
    /// (`loss_mask.shape[-1]`), the Dr.GRPO constant normaliser. This is verl's formula up to mid 2025;
    /// later revisions (and TRL's `dr_grpo`) also divide by the number of responses, a constant factor
    /// for a fixed batch (equivalent to a learning-rate rescale). Note `max_len` is the padded width of
    /// this batch, so it is only constant if the batch is padded to a fixed length.
    #[serde(alias = "seq-mean-token-sum-norm")]
    SeqMeanTokenSumNorm,
}

impl LossAgg {
    /// verl's name for the mode.
    pub fn verl_name(self) -> &'static str {
        match self {
            LossAgg::TokenMean => "token-mean",
            LossAgg::SeqMeanTokenMean => "seq-mean-token-mean",
            LossAgg::SeqMeanTokenSum => "seq-mean-token-sum",
            LossAgg::SeqMeanTokenSumNorm => "seq-mean-token-sum-norm",
        }
    }
}

impl std::fmt::Display for LossAgg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verl_name())
    }
}

impl std::str::FromStr for LossAgg {
    type Err = serde::de::value::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use serde::de::IntoDeserializer;
        Self::deserialize(s.into_deserializer())
    }
}

/// `x * mask` with the padded entries of `x` zeroed first (no NaN from `inf * 0`).
fn masked<B: Backend>(x: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
    x.mask_fill(mask.clone().equal_elem(0.0), 0.0) * mask
}

/// `sum(x * mask) / sum(mask)` (verl's `masked_mean` over all elements); 0 when the mask is empty.
pub fn masked_mean<B: Backend>(x: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let denom = mask.clone().sum().clamp_min(DENOM_FLOOR);
    masked(x, mask).sum() / denom
}

/// Aggregate a per-token loss matrix `[responses, max_len]` into a scalar (shape `[1]`), as verl's
/// `agg_loss` (see [`LossAgg`] for each mode).
pub fn agg_loss<B: Backend>(
    loss_mat: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    agg: LossAgg,
) -> Tensor<B, 1> {
    let [_, width] = loss_mat.dims();
    match agg {
        LossAgg::TokenMean => masked_mean(loss_mat, mask),
        LossAgg::SeqMeanTokenSum => {
            let rows = masked(loss_mat, mask.clone()).sum_dim(1); // [n, 1]
            let nonempty = mask
                .sum_dim(1)
                .greater_elem(0.0)
                .float()
                .sum()
                .clamp_min(1.0);
            rows.sum() / nonempty
        }
        LossAgg::SeqMeanTokenMean => {
            let counts = mask.clone().sum_dim(1); // [n, 1]
            let rows = masked(loss_mat, mask).sum_dim(1) / counts.clone().clamp_min(DENOM_FLOOR);
            let nonempty = counts.greater_elem(0.0).float().sum().clamp_min(1.0);
            rows.sum() / nonempty
        }
        LossAgg::SeqMeanTokenSumNorm => {
            masked(loss_mat, mask).sum().div_scalar(width.max(1) as f64)
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Policy loss
// ---------------------------------------------------------------------------------------------------

/// Advantages accepted by [`policy_loss`]: one per response (`Tensor<B, 1>` of length `responses`, or a
/// `Tensor<B, 2>` of shape `[responses, 1]`), broadcast over the row, or one per token
/// (`[responses, max_len]`, as verl stores them).
pub trait TokenAdvantages<B: Backend> {
    /// The advantages as a `[responses, max_len]` tensor.
    fn into_token_advantages(self, dims: [usize; 2]) -> Tensor<B, 2>;
}

impl<B: Backend> TokenAdvantages<B> for Tensor<B, 1> {
    fn into_token_advantages(self, [n, t]: [usize; 2]) -> Tensor<B, 2> {
        assert_eq!(self.dims()[0], n, "one advantage per response expected");
        self.unsqueeze_dim::<2>(1).expand([n, t])
    }
}

impl<B: Backend> TokenAdvantages<B> for Tensor<B, 2> {
    fn into_token_advantages(self, [n, t]: [usize; 2]) -> Tensor<B, 2> {
        let [r, c] = self.dims();
        assert_eq!(r, n, "one row of advantages per response expected");
        if c == t {
            self
        } else {
            assert_eq!(
                c, 1,
                "advantages must be [responses, 1] or [responses, max_len], got [{r}, {c}]"
            );
            self.expand([n, t])
        }
    }
}

/// Output of [`policy_loss`]: the aggregated loss (differentiable w.r.t. `logp`) and verl's metrics
/// (detached, masked token means). All have shape `[1]`.
#[derive(Debug, Clone)]
pub struct PolicyLossOut<B: Backend> {
    /// The aggregated clipped policy-gradient loss.
    pub loss: Tensor<B, 1>,
    /// `pg_clipfrac`: fraction of response tokens where the clipped term is the larger (`L2 > L1`).
    pub clip_frac: Tensor<B, 1>,
    /// `ppo_kl`: mean of `old_logp - logp` (after the ±20 clamp) over response tokens.
    pub ppo_kl: Tensor<B, 1>,
    /// `pg_clipfrac_lower`: fraction of response tokens where the dual clip bound is active
    /// (`A < 0` and `max(L1, L2) > -A * c`); 0 without dual clip.
    pub clip_frac_lower: Tensor<B, 1>,
}

/// verl's clipped policy loss (`compute_policy_loss_vanilla`), per token:
///
/// ```text
/// ratio   = exp(clamp(logp - old_logp, -20, 20))
/// L1      = -A * ratio
/// L2      = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
/// clipped = max(L1, L2)
/// L3      = -A * c                                        (dual clip, c = dual_clip, verl default 3.0)
/// loss    = where(A < 0, min(L3, clipped), clipped)       (just `clipped` when dual_clip is None)
/// ```
///
/// multiplied by the rollout importance weights `is_weights` when given (verl's
/// `rollout_is_weights`, e.g. [`tis_weights`]) and aggregated with [`agg_loss`]. `old_logp` and the
/// advantages are treated as constants (detached). `clip_low` / `clip_high` are the epsilons (0.2 /
/// 0.2 in verl; EasyR1 0.2 / 0.3).
///
/// Panics when `dual_clip` is `Some(c)` with `c <= 1` (verl asserts the same).
#[allow(clippy::too_many_arguments)] // verl's compute_policy_loss, argument for argument
pub fn policy_loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    advantages: impl TokenAdvantages<B>,
    mask: Tensor<B, 2>,
    clip_low: f64,
    clip_high: f64,
    dual_clip: Option<f64>,
    agg: LossAgg,
    is_weights: Option<Tensor<B, 2>>,
) -> PolicyLossOut<B> {
    if let Some(c) = dual_clip {
        assert!(c > 1.0, "the dual clip bound c must be > 1.0, got {c}");
    }
    let dims = logp.dims();
    let adv = advantages.into_token_advantages(dims).detach();
    let neg_approx_kl = (logp - old_logp.detach()).clamp(-20.0, 20.0);
    let ratio = neg_approx_kl.clone().exp();
    let ppo_kl = masked_mean(neg_approx_kl.neg(), mask.clone()).detach();

    let neg_adv = adv.clone().neg();
    let l1 = neg_adv.clone() * ratio.clone();
    let l2 = neg_adv.clone() * ratio.clamp(1.0 - clip_low, 1.0 + clip_high);
    let clip_frac = masked_mean(l2.clone().greater(l1.clone()).float(), mask.clone()).detach();
    let clipped = l1.max_pair(l2);

    let (loss_tok, clip_frac_lower) = match dual_clip {
        Some(c) => {
            let l3 = neg_adv.mul_scalar(c);
            let negative = adv.lower_elem(0.0);
            let lower = clipped.clone().greater(l3.clone()).float() * negative.clone().float();
            let lower = masked_mean(lower, mask.clone()).detach();
            let dual = l3.min_pair(clipped.clone());
            (clipped.mask_where(negative, dual), lower)
        }
        None => {
            let zero = Tensor::zeros([1], &mask.device());
            (clipped, zero)
        }
    };
    let loss_tok = match is_weights {
        Some(w) => loss_tok * w,
        None => loss_tok,
    };
    let loss = agg_loss(loss_tok, mask, agg);
    PolicyLossOut {
        loss,
        clip_frac,
        ppo_kl,
        clip_frac_lower,
    }
}

/// verl's GSPO policy loss (`compute_policy_loss_gspo`, arXiv 2507.18071): the sequence-level
/// ratio `s_i = exp(mean over the response's tokens of (logp - old_logp))`, clipped per response:
///
/// ```text
/// log s_i,t = min(logp_t - sg(logp_t) + sg(log s_i), 10)     value log s_i, gradient d logp_t
/// L1        = -A * s_i,t
/// L2        = -A * clamp(s_i,t, 1 - clip_low, 1 + clip_high)
/// loss      = max(L1, L2)  (x is_weights when given)
/// ```
///
/// aggregated with `seq-mean-token-mean` whatever the recipe's `loss_agg` (as verl does; the
/// recipe requires `loss_agg = "seq_mean_token_mean"` with GSPO so that the KL term agrees). No
/// dual clip (`clip_frac_lower` is 0); `ppo_kl` is the unclamped token mean of `old_logp - logp`.
/// GSPO's clip ranges are ~1e-3 times PPO's (the paper: 3e-4 / 4e-4).
pub fn policy_loss_gspo<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    advantages: impl TokenAdvantages<B>,
    mask: Tensor<B, 2>,
    clip_low: f64,
    clip_high: f64,
    is_weights: Option<Tensor<B, 2>>,
) -> PolicyLossOut<B> {
    let dims = logp.dims();
    let adv = advantages.into_token_advantages(dims).detach();
    let neg_approx_kl = masked(logp.clone() - old_logp.detach(), mask.clone());
    let lens = mask.clone().sum_dim(1).clamp_min(1.0);
    let seq = (neg_approx_kl.clone().sum_dim(1) / lens).detach(); // [n, 1]
    let log_ratio = (logp.clone() - logp.detach() + seq.expand(dims)).clamp_max(10.0);
    let ratio = log_ratio.exp();
    let neg_adv = adv.neg();
    let l1 = neg_adv.clone() * ratio.clone();
    let l2 = neg_adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high);
    let clip_frac = masked_mean(l2.clone().greater(l1.clone()).float(), mask.clone()).detach();
    let loss_tok = l1.max_pair(l2);
    let loss_tok = match is_weights {
        Some(w) => loss_tok * w,
        None => loss_tok,
    };
    let ppo_kl = masked_mean(neg_approx_kl.neg(), mask.clone()).detach();
    let device = mask.device();
    PolicyLossOut {
        loss: agg_loss(loss_tok, mask, LossAgg::SeqMeanTokenMean),
        clip_frac,
        ppo_kl,
        clip_frac_lower: Tensor::zeros([1], &device),
    }
}

// ---------------------------------------------------------------------------------------------------
// Rollout correction
// ---------------------------------------------------------------------------------------------------

/// Truncated importance sampling weights (TIS; verl's `compute_rollout_correction_weights` with
/// `rollout_is = "token"`): `min(exp(clamp(trainer_logp - rollout_logp, -20, 20)), cap)` per
/// response token, 0 on padding, detached. `trainer_logp` are the log-probs of the sampled tokens
/// as the trainer computes them before the update (verl's `old_log_prob`), `rollout_logp` as the
/// rollout engine reported them; the policy loss is multiplied by the weights.
pub fn tis_weights<B: Backend>(
    trainer_logp: Tensor<B, 2>,
    rollout_logp: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    cap: f64,
) -> Tensor<B, 2> {
    let w = (trainer_logp - rollout_logp).clamp(-20.0, 20.0).exp();
    masked(w, mask).clamp_max(cap).detach()
}

/// `|rollout_logp - trainer_logp|` over the response tokens: `(sum, max)`, each `[1]` and
/// detached (the `rollout_drift_mean` / `rollout_drift_max` metrics; 0 on an empty mask).
pub fn rollout_drift<B: Backend>(
    trainer_logp: Tensor<B, 2>,
    rollout_logp: Tensor<B, 2>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let d = masked((trainer_logp - rollout_logp).abs(), mask).detach();
    (d.clone().sum(), d.max())
}

// ---------------------------------------------------------------------------------------------------
// Overlong responses
// ---------------------------------------------------------------------------------------------------

/// DAPO's soft overlong penalty, added to the reward of a response of `len` tokens (verl's
/// `DAPORewardManager` with `overlong_buffer`): 0 up to `max_len - buffer` tokens, then falling
/// linearly to `-factor` at `max_len`: `min(-(len - (max_len - buffer)) / buffer * factor, 0)`.
///
/// Panics when `buffer == 0` or `buffer > max_len` (the recipe checks both).
pub fn overlong_penalty(len: usize, max_len: usize, buffer: usize, factor: f64) -> f64 {
    assert!(
        buffer > 0 && buffer <= max_len,
        "overlong buffer {buffer} must be in 1..={max_len}"
    );
    let exceed = len as f64 - (max_len - buffer) as f64;
    (-exceed / buffer as f64 * factor).min(0.0)
}

// ---------------------------------------------------------------------------------------------------
// KL
// ---------------------------------------------------------------------------------------------------

/// verl's `kl_penalty` estimator names. Serde names are snake_case (`k1`, `abs`, `k2`, `low_var_kl`)
/// with verl's aliases (`kl` = k1, `mse` = k2, `k3` = `low-var-kl` = low_var_kl); [`std::str::FromStr`]
/// accepts the same strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlKind {
    /// `logp - ref`.
    #[serde(alias = "kl")]
    K1,
    /// `|logp - ref|`.
    Abs,
    /// `0.5 * (logp - ref)^2`.
    #[serde(alias = "mse")]
    K2,
    /// Schulman's k3: `x = clamp(ref - logp, -20, 20); clamp(e^x - x - 1, 0, 10)`. The usual GRPO choice
    /// (EasyR1 default, coefficient 1e-2).
    #[default]
    #[serde(alias = "k3", alias = "low-var-kl")]
    LowVarKl,
}

impl KlKind {
    /// verl's name for the estimator.
    pub fn verl_name(self) -> &'static str {
        match self {
            KlKind::K1 => "k1",
            KlKind::Abs => "abs",
            KlKind::K2 => "k2",
            KlKind::LowVarKl => "low_var_kl",
        }
    }
}

impl std::fmt::Display for KlKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verl_name())
    }
}

impl std::str::FromStr for KlKind {
    type Err = serde::de::value::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use serde::de::IntoDeserializer;
        Self::deserialize(s.into_deserializer())
    }
}

/// Per-token KL estimate between the policy and the reference (verl's `kl_penalty`), same shape as the
/// inputs. Differentiable w.r.t. both; aggregate with [`agg_loss`] to use it as a loss term
/// (`loss += kl_coef * agg_loss(kl_penalty(logp, ref, kind), mask, agg)`).
pub fn kl_penalty<B: Backend, const D: usize>(
    logp: Tensor<B, D>,
    ref_logp: Tensor<B, D>,
    kind: KlKind,
) -> Tensor<B, D> {
    match kind {
        KlKind::K1 => logp - ref_logp,
        KlKind::Abs => (logp - ref_logp).abs(),
        KlKind::K2 => (logp - ref_logp).square().mul_scalar(0.5),
        KlKind::LowVarKl => {
            let kl = (ref_logp - logp).clamp(-20.0, 20.0);
            (kl.clone().exp() - kl).sub_scalar(1.0).clamp(0.0, 10.0)
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Entropy
// ---------------------------------------------------------------------------------------------------

/// Entropy of `softmax(logits)` per row of `logits [rows, V]` (verl's
/// `torch_functional.entropy_from_logits`): `[rows]`, differentiable. The entropy bonus is
/// `entropy_coef x agg_loss(entropy, mask, agg)`, subtracted from the loss (verl's
/// `compute_entropy_loss` and `dp_actor`).
pub fn entropy_from_logits<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let lp = log_softmax(logits, 1);
    (lp.clone().exp() * lp).sum_dim(1).neg().squeeze_dim(1)
}

// ---------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{ElementConversion, TensorData};
    use proptest::prelude::*;

    type B = NdArray<f32>;
    type AB = Autodiff<NdArray<f32>>;

    fn dev() -> burn::backend::ndarray::NdArrayDevice {
        Default::default()
    }

    fn t2<Bk: Backend>(rows: &[Vec<f64>], device: &Bk::Device) -> Tensor<Bk, 2> {
        let n = rows.len();
        let t = rows.first().map_or(0, |r| r.len());
        let flat: Vec<f32> = rows
            .iter()
            .flat_map(|r| r.iter().map(|x| *x as f32))
            .collect();
        Tensor::from_data(TensorData::new(flat, [n, t]), device)
    }

    fn t1<Bk: Backend>(xs: &[f64], device: &Bk::Device) -> Tensor<Bk, 1> {
        let flat: Vec<f32> = xs.iter().map(|x| *x as f32).collect();
        Tensor::from_data(TensorData::new(flat, [xs.len()]), device)
    }

    fn scalar<Bk: Backend>(x: Tensor<Bk, 1>) -> f64 {
        x.into_scalar().elem::<f64>()
    }

    fn vec2<Bk: Backend>(x: Tensor<Bk, 2>) -> Vec<f64> {
        x.into_data().convert::<f64>().to_vec::<f64>().unwrap()
    }

    fn add(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
            .collect()
    }

    /// The acceptance case: 2 prompts x G = 3, 4 tokens.
    struct Case {
        rewards: Vec<f64>,
        mask: Vec<Vec<f64>>,
        logp: Vec<Vec<f64>>,
        old: Vec<Vec<f64>>,
        reference: Vec<Vec<f64>>,
    }

    fn case() -> Case {
        let logp = vec![
            vec![-1.0, -0.5, -2.0, 0.0],
            vec![-0.3, -1.2, 0.0, 0.0],
            vec![-0.7, -0.9, -1.1, -0.2],
            vec![-2.5, 0.0, 0.0, 0.0],
            vec![-0.4, -0.6, -0.8, 0.0],
            vec![-1.5, -0.1, 0.0, 0.0],
        ];
        let d_old = vec![
            vec![0.1, -0.3, 0.05, 0.0],
            vec![0.4, -0.2, 0.0, 0.0],
            vec![-0.1, 0.25, 0.0, -0.5],
            vec![0.3, 0.0, 0.0, 0.0],
            vec![0.0, 0.1, -0.1, 0.0],
            vec![0.2, -0.4, 0.0, 0.0],
        ];
        let d_ref = vec![
            vec![0.2, 0.1, -0.3, 0.0],
            vec![0.0, 0.5, 0.0, 0.0],
            vec![0.1, -0.2, 0.3, 0.05],
            vec![-0.4, 0.0, 0.0, 0.0],
            vec![0.15, 0.0, -0.05, 0.0],
            vec![0.3, 0.2, 0.0, 0.0],
        ];
        Case {
            rewards: vec![1.0, 0.1, 0.0, 0.5, 0.5, 0.5],
            mask: vec![
                vec![1.0, 1.0, 1.0, 0.0],
                vec![1.0, 1.0, 0.0, 0.0],
                vec![1.0, 1.0, 1.0, 1.0],
                vec![1.0, 0.0, 0.0, 0.0],
                vec![1.0, 1.0, 1.0, 0.0],
                vec![1.0, 1.0, 0.0, 0.0],
            ],
            old: add(&logp, &d_old),
            reference: add(&logp, &d_ref),
            logp,
        }
    }

    /// f64 reference of verl's vanilla policy loss (token-mean or seq-mean-token-mean), for the
    /// finite-difference and property checks.
    fn ref_policy_loss(
        logp: &[Vec<f64>],
        old: &[Vec<f64>],
        adv: &[f64],
        mask: &[Vec<f64>],
        clip: f64,
        dual: f64,
        agg: LossAgg,
    ) -> f64 {
        let tok = |i: usize, j: usize| {
            let a = adv[i];
            let ratio = (logp[i][j] - old[i][j]).clamp(-20.0, 20.0).exp();
            let l1 = -a * ratio;
            let l2 = -a * ratio.clamp(1.0 - clip, 1.0 + clip);
            let c = l1.max(l2);
            if a < 0.0 {
                (-a * dual).min(c)
            } else {
                c
            }
        };
        let (mut sum, mut cnt, mut seq_sum, mut rows) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (i, row) in mask.iter().enumerate() {
            let (mut rs, mut rc) = (0.0, 0.0);
            for (j, &m) in row.iter().enumerate() {
                if m != 0.0 {
                    rs += tok(i, j) * m;
                    rc += m;
                }
            }
            sum += rs;
            cnt += rc;
            if rc > 0.0 {
                seq_sum += rs / rc;
                rows += 1.0;
            }
        }
        match agg {
            LossAgg::TokenMean => sum / cnt.max(DENOM_FLOOR),
            LossAgg::SeqMeanTokenMean => seq_sum / rows.max(1.0),
            _ => unimplemented!(),
        }
    }

    #[test]
    fn acceptance_against_verl_figures() {
        let c = case();
        let d = dev();
        let adv = group_advantages(&c.rewards, 3, true);
        let want_adv = [
            1.1499302241624274,
            -0.48418114701575904,
            -0.6657490771466686,
            0.0,
            0.0,
            0.0,
        ];
        for (a, w) in adv.iter().zip(want_adv) {
            assert!((a - w).abs() < 1e-12, "advantage {a} vs {w}");
        }
        assert_eq!(zero_variance_groups(&c.rewards, 3), 1);

        let run = |agg: LossAgg| {
            policy_loss(
                t2::<B>(&c.logp, &d),
                t2::<B>(&c.old, &d),
                t1::<B>(&adv, &d),
                t2::<B>(&c.mask, &d),
                0.2,
                0.2,
                Some(3.0),
                agg,
                None,
            )
        };
        let tm = run(LossAgg::TokenMean);
        let pg = scalar(tm.loss);
        let clip_frac = scalar(tm.clip_frac);
        let ppo_kl = scalar(tm.ppo_kl);
        let smtm = scalar(run(LossAgg::SeqMeanTokenMean).loss);
        let smts = scalar(run(LossAgg::SeqMeanTokenSum).loss);
        let norm = scalar(run(LossAgg::SeqMeanTokenSumNorm).loss);
        let k3 = kl_penalty(
            t2::<B>(&c.logp, &d),
            t2::<B>(&c.reference, &d),
            KlKind::LowVarKl,
        );
        let kl = scalar(agg_loss(k3, t2::<B>(&c.mask, &d), LossAgg::TokenMean));
        let total = pg + 0.01 * kl;
        println!(
            "pg token-mean {pg:.17}\npg seq-mean-token-mean {smtm:.17}\npg seq-mean-token-sum {smts:.17}\n\
             pg seq-mean-token-sum-norm {norm:.17}\nk3 token-mean {kl:.17}\ntotal {total:.17}\n\
             clip_frac {clip_frac:.17}\nppo_kl {ppo_kl:.17}"
        );
        let close = |got: f64, want: f64, what: &str| {
            assert!((got - want).abs() < 1e-6, "{what}: {got} vs {want}")
        };
        close(pg, 0.033080733255743115, "policy loss token-mean");
        close(
            smtm,
            0.012646453962434856,
            "policy loss seq-mean-token-mean",
        );
        close(kl, 0.02971933478160865, "k3 token-mean");
        close(total, 0.033377926603559205, "total");
        close(clip_frac, 0.2, "clip fraction");
        // Not in the brief; float64 numpy figures from the same formulas.
        close(smts, 0.08270183313935779, "policy loss seq-mean-token-sum");
        close(
            norm,
            0.12405274970903671,
            "policy loss seq-mean-token-sum-norm",
        );
        close(ppo_kl, -0.013333333333333336, "ppo_kl");
        // No dual-clip token is active here (no ratio > 3 with A < 0), so the loss is the same without it.
        let no_dual = policy_loss(
            t2::<B>(&c.logp, &d),
            t2::<B>(&c.old, &d),
            t1::<B>(&adv, &d),
            t2::<B>(&c.mask, &d),
            0.2,
            0.2,
            None,
            LossAgg::TokenMean,
            None,
        );
        close(
            scalar(no_dual.loss),
            0.033080733255743115,
            "policy loss without dual clip",
        );
        close(scalar(tm.clip_frac_lower), 0.0, "clip_frac_lower");
    }

    #[test]
    fn advantages_per_token_and_per_row_agree() {
        let c = case();
        let d = dev();
        let adv = group_advantages(&c.rewards, 3, true);
        let per_token: Vec<Vec<f64>> = adv
            .iter()
            .zip(&c.mask)
            .map(|(a, m)| m.iter().map(|x| a * x).collect())
            .collect();
        let col: Vec<Vec<f64>> = adv.iter().map(|a| vec![*a]).collect();
        let loss = |a: Tensor<B, 2>| {
            scalar(
                policy_loss(
                    t2::<B>(&c.logp, &d),
                    t2::<B>(&c.old, &d),
                    a,
                    t2::<B>(&c.mask, &d),
                    0.2,
                    0.2,
                    Some(3.0),
                    LossAgg::TokenMean,
                    None,
                )
                .loss,
            )
        };
        let a = loss(t2::<B>(&per_token, &d));
        let b = loss(t2::<B>(&col, &d));
        assert!(
            (a - b).abs() < 1e-7 && (a - 0.033080733255743115).abs() < 1e-6,
            "{a} {b}"
        );
    }

    #[test]
    fn dual_clip_bounds_negative_advantages() {
        let d = dev();
        // ratio = e^1.5 ≈ 4.48 > c = 3 with A = -1: loss = min(3, 4.48) = 3 and no gradient.
        let logp = vec![vec![-0.5, -1.0]];
        let old = vec![vec![-2.0, -1.0]];
        let mask = vec![vec![1.0, 1.0]];
        let lp = t2::<AB>(&logp, &d).require_grad();
        let out = policy_loss(
            lp.clone(),
            t2::<AB>(&old, &d),
            t1::<AB>(&[-1.0], &d),
            t2::<AB>(&mask, &d),
            0.2,
            0.2,
            Some(3.0),
            LossAgg::TokenMean,
            None,
        );
        let loss = scalar(out.loss.clone());
        assert!((loss - (3.0 + 1.0) / 2.0).abs() < 1e-6, "{loss}");
        assert!((scalar(out.clip_frac_lower.clone()) - 0.5).abs() < 1e-7);
        let g = vec2(lp.grad(&out.loss.backward()).unwrap());
        assert!(
            g[0].abs() < 1e-7,
            "dual-clipped token has no gradient: {g:?}"
        );
        assert!(
            (g[1] - 0.5).abs() < 1e-6,
            "unclipped token: d(-A*ratio)/dlogp / 2 = 0.5, got {g:?}"
        );
        // Without dual clip the loss is the unbounded -A * ratio.
        let out = policy_loss(
            t2::<B>(&logp, &d),
            t2::<B>(&old, &d),
            t1::<B>(&[-1.0], &d),
            t2::<B>(&mask, &d),
            0.2,
            0.2,
            None,
            LossAgg::TokenMean,
            None,
        );
        let want = (1.5f64.exp() + 1.0) / 2.0;
        assert!((scalar(out.loss) - want).abs() < 1e-5);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let c = case();
        let d = dev();
        let adv = group_advantages(&c.rewards, 3, true);
        let lp = t2::<AB>(&c.logp, &d).require_grad();
        let out = policy_loss(
            lp.clone(),
            t2::<AB>(&c.old, &d),
            t1::<AB>(&adv, &d),
            t2::<AB>(&c.mask, &d),
            0.2,
            0.2,
            Some(3.0),
            LossAgg::TokenMean,
            None,
        );
        let grad = vec2(lp.grad(&out.loss.backward()).unwrap());

        let f32_loss = |logp: &[Vec<f64>]| {
            scalar(
                policy_loss(
                    t2::<B>(logp, &d),
                    t2::<B>(&c.old, &d),
                    t1::<B>(&adv, &d),
                    t2::<B>(&c.mask, &d),
                    0.2,
                    0.2,
                    Some(3.0),
                    LossAgg::TokenMean,
                    None,
                )
                .loss,
            )
        };
        let f64_loss = |logp: &[Vec<f64>]| {
            ref_policy_loss(logp, &c.old, &adv, &c.mask, 0.2, 3.0, LossAgg::TokenMean)
        };
        let t = c.logp[0].len();
        let mut nonzero = 0;
        for i in 0..c.logp.len() {
            for j in 0..t {
                let fd = |f: &dyn Fn(&[Vec<f64>]) -> f64, h: f64| {
                    let (mut p, mut m) = (c.logp.clone(), c.logp.clone());
                    p[i][j] += h;
                    m[i][j] -= h;
                    (f(&p) - f(&m)) / (2.0 * h)
                };
                let g = grad[i * t + j];
                let fd64 = fd(&f64_loss, 1e-6);
                let fd32 = fd(&f32_loss, 1e-3);
                assert!(
                    (g - fd64).abs() < 1e-5,
                    "[{i},{j}] autodiff {g} vs f64 finite difference {fd64}"
                );
                assert!(
                    (g - fd32).abs() < 1e-4,
                    "[{i},{j}] autodiff {g} vs f32 finite difference {fd32}"
                );
                if c.mask[i][j] == 0.0 {
                    assert_eq!(g, 0.0, "padding gets no gradient");
                }
                if g.abs() > 1e-3 {
                    nonzero += 1;
                }
            }
        }
        // Unclipped tokens of the first group carry gradient; clipped tokens and the zero-advantage
        // group do not.
        assert!(nonzero >= 4, "{nonzero} tokens with gradient");
    }

    #[test]
    fn kl_estimators() {
        let d = dev();
        let logp = vec![vec![-1.0, -0.5, -3.0, -60.0]];
        let rf = vec![vec![-1.2, -0.5, -1.0, 0.0]];
        let get = |k: KlKind| vec2(kl_penalty(t2::<B>(&logp, &d), t2::<B>(&rf, &d), k));
        let k1 = get(KlKind::K1);
        let abs = get(KlKind::Abs);
        let k2 = get(KlKind::K2);
        let k3 = get(KlKind::LowVarKl);
        for j in 0..4 {
            let x = logp[0][j] - rf[0][j];
            assert!((k1[j] - x).abs() < 1e-5);
            assert!((abs[j] - x.abs()).abs() < 1e-5);
            assert!((k2[j] - 0.5 * x * x).abs() < 1e-3 * (1.0 + x * x));
            let y = (-x).clamp(-20.0, 20.0);
            let want = (y.exp() - y - 1.0).clamp(-10.0, 10.0);
            assert!((k3[j] - want).abs() < 1e-5, "k3 {} vs {want}", k3[j]);
        }
        assert_eq!(k3[3], 10.0, "clamped at 10");
    }

    #[test]
    fn aggregation_modes_with_empty_rows() {
        let d = dev();
        let l = vec![
            vec![1.0, 2.0, f64::INFINITY],
            vec![5.0, 6.0, 7.0],
            vec![3.0, f64::NAN, 0.0],
        ];
        let m = vec![
            vec![1.0, 1.0, 0.0],
            vec![0.0, 0.0, 0.0],
            vec![1.0, 0.0, 0.0],
        ];
        let agg = |a: LossAgg| scalar(agg_loss(t2::<B>(&l, &d), t2::<B>(&m, &d), a));
        assert!((agg(LossAgg::TokenMean) - 2.0).abs() < 1e-6);
        assert!((agg(LossAgg::SeqMeanTokenMean) - (1.5 + 3.0) / 2.0).abs() < 1e-6);
        assert!((agg(LossAgg::SeqMeanTokenSum) - (3.0 + 3.0) / 2.0).abs() < 1e-6);
        assert!((agg(LossAgg::SeqMeanTokenSumNorm) - 6.0 / 3.0).abs() < 1e-6);
        let zeros = vec![vec![0.0; 3]; 3];
        for a in [
            LossAgg::TokenMean,
            LossAgg::SeqMeanTokenMean,
            LossAgg::SeqMeanTokenSum,
            LossAgg::SeqMeanTokenSumNorm,
        ] {
            let v = scalar(agg_loss(t2::<B>(&l, &d), t2::<B>(&zeros, &d), a));
            assert_eq!(v, 0.0, "{a}: empty mask gives 0");
        }
        let mm = scalar(masked_mean(t2::<B>(&l, &d), t2::<B>(&m, &d)));
        assert!((mm - 2.0).abs() < 1e-6);
    }

    #[test]
    fn advantages_edge_cases() {
        // Group of one: verl's mean 0, std 1.
        let a = group_advantages(&[0.7, -2.0], 1, true);
        assert!(
            (a[0] - 0.7 / (1.0 + 1e-6)).abs() < 1e-15 && (a[1] + 2.0 / (1.0 + 1e-6)).abs() < 1e-15
        );
        assert_eq!(group_advantages(&[0.7, -2.0], 1, false), vec![0.7, -2.0]);
        assert_eq!(zero_variance_groups(&[0.7, -2.0], 1), 0);
        // Dr.GRPO: no std scaling.
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], 4, false);
        assert_eq!(a, vec![0.5, -0.5, -0.5, 0.5]);
        // Equal rewards: exactly 0, even where (r - mean) would round to ~1e-17.
        assert_eq!(
            group_advantages(&[0.1, 0.1, 0.1, 0.3, 0.3, 0.3], 3, true),
            vec![0.0; 6]
        );
        assert_eq!(zero_variance_groups(&[0.1, 0.1, 0.1, 0.3, 0.3, 0.2], 3), 1);
        // Binary rewards with G = 2: (1 - 0.5) / (0.7071 + 1e-6).
        let a = group_advantages(&[1.0, 0.0], 2, true);
        assert!((a[0] - 0.5 / (0.5f64.sqrt() + 1e-6)).abs() < 1e-12 && (a[0] + a[1]).abs() < 1e-15);
    }

    #[test]
    #[should_panic(expected = "do not split")]
    fn advantages_reject_ragged_groups() {
        group_advantages(&[1.0, 0.0, 1.0], 2, true);
    }

    #[test]
    fn names_and_aliases() {
        for (s, want) in [
            ("\"token-mean\"", LossAgg::TokenMean),
            ("\"token_mean\"", LossAgg::TokenMean),
            ("\"seq-mean-token-mean\"", LossAgg::SeqMeanTokenMean),
            ("\"seq_mean_token_mean\"", LossAgg::SeqMeanTokenMean),
            ("\"seq-mean-token-sum\"", LossAgg::SeqMeanTokenSum),
            ("\"seq-mean-token-sum-norm\"", LossAgg::SeqMeanTokenSumNorm),
            ("\"seq_mean_token_sum_norm\"", LossAgg::SeqMeanTokenSumNorm),
        ] {
            assert_eq!(serde_json::from_str::<LossAgg>(s).unwrap(), want, "{s}");
        }
        for (s, want) in [
            ("k1", KlKind::K1),
            ("kl", KlKind::K1),
            ("abs", KlKind::Abs),
            ("k2", KlKind::K2),
            ("mse", KlKind::K2),
            ("k3", KlKind::LowVarKl),
            ("low_var_kl", KlKind::LowVarKl),
            ("low-var-kl", KlKind::LowVarKl),
        ] {
            assert_eq!(s.parse::<KlKind>().unwrap(), want, "{s}");
        }
        assert_eq!(
            "seq-mean-token-mean".parse::<LossAgg>().unwrap(),
            LossAgg::SeqMeanTokenMean
        );
        assert!("token-sum".parse::<LossAgg>().is_err());
        assert!("k4".parse::<KlKind>().is_err());
        assert_eq!(
            serde_json::to_string(&LossAgg::SeqMeanTokenSumNorm).unwrap(),
            "\"seq_mean_token_sum_norm\""
        );
        assert_eq!(
            serde_json::to_string(&KlKind::LowVarKl).unwrap(),
            "\"low_var_kl\""
        );
        assert_eq!(LossAgg::default(), LossAgg::TokenMean);
        assert_eq!(KlKind::default(), KlKind::LowVarKl);
        #[derive(Deserialize)]
        struct Cfg {
            agg: LossAgg,
            kl: KlKind,
        }
        let cfg: Cfg = toml::from_str("agg = \"seq-mean-token-mean\"\nkl = \"k3\"").unwrap();
        assert_eq!(
            (cfg.agg, cfg.kl),
            (LossAgg::SeqMeanTokenMean, KlKind::LowVarKl)
        );
    }

    // -----------------------------------------------------------------------------------------------
    // Against verl's own functions: tests/fixtures/verl/refs.json, written by make_verl_refs.py
    // beside it (float64, verl commit b178a3cd56f58b2d502255daba591e92833930a7).
    // -----------------------------------------------------------------------------------------------

    fn verl() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/verl/refs.json")).unwrap()
    }

    fn rows(v: &serde_json::Value) -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    }

    fn num(v: &serde_json::Value) -> f64 {
        v.as_f64().unwrap()
    }

    fn nums(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(num).collect()
    }

    fn agg_of(verl_name: &str) -> LossAgg {
        verl_name.parse().unwrap()
    }

    fn close_all(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-6, "{what}[{k}]: {g} vs verl {w}");
        }
    }

    #[test]
    fn agg_loss_equals_verl() {
        let (v, d) = (verl(), dev());
        let (l, m) = (
            rows(&v["inputs"]["loss_mat"]),
            rows(&v["inputs"]["loss_mask"]),
        );
        for (mode, want) in v["agg_loss"].as_object().unwrap() {
            let got = scalar(agg_loss(t2::<B>(&l, &d), t2::<B>(&m, &d), agg_of(mode)));
            close_all(&[got], &[num(want)], mode);
        }
    }

    /// The rollout weights of verl's TIS for a cap, as computed by verl.
    fn verl_tis(v: &serde_json::Value, cap: &str) -> Vec<Vec<f64>> {
        rows(&v["tis_weights"][cap])
    }

    #[test]
    fn tis_weights_equal_verl() {
        let (v, d) = (verl(), dev());
        let i = &v["inputs"];
        for cap in ["2.0", "1.2"] {
            let w = tis_weights(
                t2::<B>(&rows(&i["old"]), &d),
                t2::<B>(&rows(&i["rollout"]), &d),
                t2::<B>(&rows(&i["mask"]), &d),
                cap.parse().unwrap(),
            );
            let want: Vec<f64> = verl_tis(&v, cap).concat();
            close_all(&vec2(w), &want, &format!("tis weights, cap {cap}"));
        }
    }

    #[test]
    fn vanilla_policy_loss_with_and_without_tis_equals_verl() {
        let (v, d) = (verl(), dev());
        let i = &v["inputs"];
        let (logp, old, mask) = (rows(&i["logp"]), rows(&i["old"]), rows(&i["mask"]));
        let adv = nums(&i["adv"]);
        for (key, want) in v["vanilla"].as_object().unwrap() {
            let (mode, weights) = key.split_once('/').unwrap();
            let w = (weights == "tis2").then(|| t2::<AB>(&verl_tis(&v, "2.0"), &d));
            let lp = t2::<AB>(&logp, &d).require_grad();
            let out = policy_loss(
                lp.clone(),
                t2::<AB>(&old, &d),
                t1::<AB>(&adv, &d),
                t2::<AB>(&mask, &d),
                0.2,
                0.28,
                Some(3.0),
                agg_of(mode),
                w,
            );
            let grad = vec2(lp.grad(&out.loss.backward()).unwrap());
            for (got, name) in [
                (scalar(out.loss), "loss"),
                (scalar(out.clip_frac), "clip_frac"),
                (scalar(out.ppo_kl), "ppo_kl"),
                (scalar(out.clip_frac_lower), "clip_frac_lower"),
            ] {
                close_all(&[got], &[num(&want[name])], &format!("{key} {name}"));
            }
            close_all(&grad, &rows(&want["grad"]).concat(), &format!("{key} grad"));
        }
    }

    #[test]
    fn gspo_equals_verl() {
        let (v, d) = (verl(), dev());
        let i = &v["inputs"];
        let (logp, old, mask) = (rows(&i["logp"]), rows(&i["old"]), rows(&i["mask"]));
        let adv = nums(&i["adv_gspo"]);
        let mut clipped = 0.0f64;
        for (key, want) in v["gspo"].as_object().unwrap() {
            let w = key
                .ends_with("tis2")
                .then(|| t2::<AB>(&verl_tis(&v, "2.0"), &d));
            let lp = t2::<AB>(&logp, &d).require_grad();
            let out = policy_loss_gspo(
                lp.clone(),
                t2::<AB>(&old, &d),
                t1::<AB>(&adv, &d),
                t2::<AB>(&mask, &d),
                num(&want["clip_low"]),
                num(&want["clip_high"]),
                w,
            );
            let grad = vec2(lp.grad(&out.loss.backward()).unwrap());
            let clip_frac = scalar(out.clip_frac);
            clipped = clipped.max(clip_frac);
            for (got, name) in [
                (scalar(out.loss), "loss"),
                (clip_frac, "clip_frac"),
                (scalar(out.ppo_kl), "ppo_kl"),
            ] {
                close_all(&[got], &[num(&want[name])], &format!("{key} {name}"));
            }
            close_all(&grad, &rows(&want["grad"]).concat(), &format!("{key} grad"));
        }
        assert!(
            clipped > 0.4,
            "the narrow clip range clips tokens: {clipped}"
        );
    }

    #[test]
    fn entropy_equals_verl() {
        let (v, d) = (verl(), dev());
        let logits: Vec<Vec<f64>> = v["inputs"]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(rows)
            .collect();
        let ent = entropy_from_logits(t2::<B>(&logits, &d));
        let got: Vec<f64> = ent.clone().into_data().convert::<f64>().to_vec().unwrap();
        close_all(
            &got,
            &rows(&v["entropy_tokens"]).concat(),
            "entropy per token",
        );
        let m = rows(&v["inputs"]["loss_mask"]);
        let ent = ent.reshape([m.len(), m[0].len()]);
        for (mode, want) in v["entropy_loss"].as_object().unwrap() {
            let got = scalar(agg_loss(ent.clone(), t2::<B>(&m, &d), agg_of(mode)));
            close_all(&[got], &[num(want)], &format!("entropy loss {mode}"));
        }
    }

    #[test]
    fn overlong_penalty_equals_verl() {
        let v = verl();
        for case in v["overlong"].as_array().unwrap() {
            let (max_len, buffer) = (
                num(&case["max_len"]) as usize,
                num(&case["buffer"]) as usize,
            );
            let got: Vec<f64> = nums(&case["lengths"])
                .iter()
                .map(|&l| overlong_penalty(l as usize, max_len, buffer, num(&case["factor"])))
                .collect();
            close_all(&got, &nums(&case["penalty"]), &format!("overlong {case}"));
        }
    }

    #[test]
    fn rollout_drift_is_the_masked_absolute_difference() {
        let d = dev();
        let a = vec![vec![-1.0, -2.0, 5.0], vec![-0.5, -0.25, -3.0]];
        let b = vec![vec![-1.5, -2.0, -9.0], vec![-0.5, 0.0, 1.0]];
        let m = vec![vec![1.0, 1.0, 0.0], vec![1.0, 1.0, 0.0]];
        let (sum, max) = rollout_drift(t2::<B>(&a, &d), t2::<B>(&b, &d), t2::<B>(&m, &d));
        assert_eq!((scalar(sum), scalar(max)), (0.75, 0.5));
    }

    fn reward() -> impl Strategy<Value = f64> {
        prop_oneof![-10.0..10.0f64, Just(0.0), Just(1.0), Just(0.1)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn advantages_sum_to_zero_per_group(
            g in 2usize..9,
            groups in 1usize..5,
            norm in any::<bool>(),
            seed in proptest::collection::vec(reward(), 40),
        ) {
            let rewards: Vec<f64> = seed.iter().copied().take(g * groups).collect();
            let adv = group_advantages(&rewards, g, norm);
            prop_assert_eq!(adv.len(), rewards.len());
            for (k, (ga, gr)) in adv.chunks(g).zip(rewards.chunks(g)).enumerate() {
                let s: f64 = ga.iter().sum();
                prop_assert!(s.abs() < 1e-9, "group {} sums to {}", k, s);
                prop_assert!(ga.iter().all(|a| a.is_finite()));
                if norm {
                    // |A| <= (n - 1) / sqrt(n) for std-normalised advantages.
                    let bound = (g as f64 - 1.0) / (g as f64).sqrt() + 1e-9;
                    prop_assert!(ga.iter().all(|a| a.abs() <= bound), "{:?}", ga);
                }
                if gr.iter().all(|r| *r == gr[0]) {
                    prop_assert!(ga.iter().all(|a| *a == 0.0));
                }
            }
        }

        #[test]
        fn zero_variance_groups_give_zero(
            g in 2usize..9,
            values in proptest::collection::vec(reward(), 1..6),
            norm in any::<bool>(),
        ) {
            let rewards: Vec<f64> = values.iter().flat_map(|v| std::iter::repeat_n(*v, g)).collect();
            prop_assert_eq!(zero_variance_groups(&rewards, g), values.len());
            prop_assert!(group_advantages(&rewards, g, norm).iter().all(|a| *a == 0.0));
        }

        #[test]
        fn k3_is_nonnegative_and_finite(
            pairs in proptest::collection::vec((-50.0..50.0f64, -50.0..50.0f64), 1..64),
        ) {
            let d = dev();
            let lp: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            let rf: Vec<f64> = pairs.iter().map(|p| p.1).collect();
            let k3 = vec2(kl_penalty(t2::<B>(std::slice::from_ref(&lp), &d), t2::<B>(std::slice::from_ref(&rf), &d), KlKind::LowVarKl));
            for (j, v) in k3.iter().enumerate() {
                prop_assert!(v.is_finite() && *v >= 0.0 && *v <= 10.0, "k3({}, {}) = {}", lp[j], rf[j], v);
            }
            // Near logp == ref too (where e^x - x - 1 cancels).
            let near: Vec<f64> = lp.iter().map(|x| x + 1e-4).collect();
            let k3 = vec2(kl_penalty(t2::<B>(&[lp], &d), t2::<B>(&[near], &d), KlKind::LowVarKl));
            prop_assert!(k3.iter().all(|v| v.is_finite() && *v >= 0.0));
        }

        #[test]
        fn clip_frac_in_unit_interval_and_loss_matches_reference(
            rows in proptest::collection::vec(
                (proptest::collection::vec((-5.0..0.0f64, -1.0..1.0f64, 0u8..3), 5), -3.0..3.0f64),
                1..6,
            ),
            clip in 0.05..0.4f64,
            seq in any::<bool>(),
        ) {
            let d = dev();
            let logp: Vec<Vec<f64>> = rows.iter().map(|(r, _)| r.iter().map(|t| t.0).collect()).collect();
            let old: Vec<Vec<f64>> = rows.iter().map(|(r, _)| r.iter().map(|t| t.0 + t.1).collect()).collect();
            let mask: Vec<Vec<f64>> = rows.iter().map(|(r, _)| r.iter().map(|t| f64::from(t.2 > 0)).collect()).collect();
            let adv: Vec<f64> = rows.iter().map(|(_, a)| *a).collect();
            let agg = if seq { LossAgg::SeqMeanTokenMean } else { LossAgg::TokenMean };
            let out = policy_loss(t2::<B>(&logp, &d), t2::<B>(&old, &d), t1::<B>(&adv, &d), t2::<B>(&mask, &d), clip, clip, Some(3.0), agg, None);
            let cf = scalar(out.clip_frac);
            let cfl = scalar(out.clip_frac_lower);
            prop_assert!((0.0..=1.0).contains(&cf), "clip_frac {}", cf);
            prop_assert!((0.0..=1.0).contains(&cfl), "clip_frac_lower {}", cfl);
            let got = scalar(out.loss);
            let want = ref_policy_loss(&logp, &old, &adv, &mask, clip, 3.0, agg);
            prop_assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "loss {} vs f64 reference {}", got, want);
        }
    }
}
