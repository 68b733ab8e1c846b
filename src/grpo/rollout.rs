//! Rollouts: the sampled responses of a step with their rewards and group advantages, as training
//! sequences (prompt + response, labels on the response), and the log-probabilities of their
//! tokens as `[responses, max_len]` matrices.

use anyhow::{anyhow, Result};
use burn::prelude::*;

use crate::data::encode::Encoded;
use crate::generate::Prompt;
use crate::learn::batch::collate;
use crate::learn::logprobs::target_logprobs_of;
use crate::model::ModelBackend;
use crate::model::Qwen25VL;
use crate::rewards::RewardBreakdown;

/// One sampled response with its reward and advantage.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index of its record in the data file.
    pub record: usize,
    pub tokens: Vec<u32>,
    /// The log-probs the rollout engine reported for `tokens`.
    pub logprobs: Vec<f32>,
    pub text: String,
    pub stopped: bool,
    pub reward: RewardBreakdown,
    pub advantage: f64,
}

/// The training sequence of a response: prompt + response, labels on the response tokens.
pub fn rollout_sequence(prompt: &Prompt, tokens: &[u32]) -> Encoded {
    let mut input_ids = prompt.input_ids.clone();
    input_ids.extend_from_slice(tokens);
    let mut labels = vec![None; prompt.input_ids.len()];
    labels.extend(tokens.iter().map(|&t| Some(t)));
    let pixel_rows: usize = prompt.image_grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let pixel_cols = prompt
        .pixel_values
        .len()
        .checked_div(pixel_rows)
        .unwrap_or(0);
    Encoded {
        input_ids,
        labels,
        pixel_values: prompt.pixel_values.clone(),
        pixel_rows,
        pixel_cols,
        image_grids: prompt.image_grids.clone(),
    }
}

/// Per-token log-probs of a micro-batch's responses as `[rows, max_len]` plus the float mask,
/// from the flat target log-probs (row by row).
pub fn to_matrix<B: Backend>(flat: Tensor<B, 1>, lens: &[usize]) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let device = flat.device();
    let width = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut idx = Vec::with_capacity(lens.len() * width);
    let mut mask = Vec::with_capacity(lens.len() * width);
    let mut off = 0usize;
    for &l in lens {
        for j in 0..width {
            idx.push(if j < l { (off + j) as i64 } else { 0 });
            mask.push(if j < l { 1.0f32 } else { 0.0 });
        }
        off += l;
    }
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [lens.len() * width]), &device);
    let m = flat.select(0, idx).reshape([lens.len(), width]);
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [lens.len(), width]), &device);
    (m, mask)
}

/// A host `[rows, max_len]` matrix (zero padded) as a tensor.
pub fn host_matrix<B: Backend>(rows: &[&[f32]], device: &B::Device) -> Tensor<B, 2> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut v = Vec::with_capacity(rows.len() * width);
    for r in rows {
        v.extend_from_slice(r);
        v.extend(std::iter::repeat_n(0.0, width - r.len()));
    }
    Tensor::from_data(TensorData::new(v, [rows.len(), width]), device)
}

/// Log-probs of each response's tokens under `model` (no gradient), split per response.
pub fn response_logprobs<B: ModelBackend>(
    model: &Qwen25VL<B>,
    seqs: &[Encoded],
    pad_id: u32,
    micro: usize,
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(micro.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let mb = collate(&refs, pad_id);
        let hidden = model.forward_hidden(&mb.input, None)?;
        let (logp, _) = target_logprobs_of(model, &mb, hidden, temperature);
        let flat: Vec<f32> = logp
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow!("{e:?}"))?;
        let mut off = 0;
        for e in chunk {
            let n = e.labels.iter().skip(1).filter(|l| l.is_some()).count();
            out.push(flat[off..off + n].to_vec());
            off += n;
        }
    }
    Ok(out)
}

/// The responses of one step scored: rewards per response, group-normalised advantages, and
/// which groups take part in the update.
#[derive(Default)]
pub struct ScoredGroups {
    pub rollouts: Vec<Rollout>,
    pub rewards: Vec<f64>,
    /// Groups whose rewards are all equal (advantage 0 for every member).
    pub zero_variance: usize,
    /// Per group: false when `drop_zero_variance_groups` leaves it out of the update.
    pub in_update: Vec<bool>,
}

/// A group's rewards.
pub struct Group<'a> {
    pub rewards: &'a [f64],
}

impl ScoredGroups {
    /// Group `k` of groups of `g` responses.
    pub fn group(&self, k: usize, g: usize) -> Group<'_> {
        Group {
            rewards: &self.rewards[k * g..(k + 1) * g],
        }
    }

    /// Append group `k` of `from` (groups of `g`), in the update or not.
    pub fn push_group(&mut self, from: &ScoredGroups, k: usize, g: usize, in_update: bool) {
        let rewards = from.group(k, g).rewards;
        self.rollouts
            .extend_from_slice(&from.rollouts[k * g..(k + 1) * g]);
        self.rewards.extend_from_slice(rewards);
        self.zero_variance += (g > 1 && rewards.iter().all(|r| *r == rewards[0])) as usize;
        self.in_update.push(in_update);
    }

    /// Append all the groups of `other` (groups of `g`).
    pub fn append(&mut self, other: ScoredGroups, g: usize) {
        debug_assert_eq!(other.rollouts.len() % g.max(1), 0);
        self.rollouts.extend(other.rollouts);
        self.rewards.extend(other.rewards);
        self.zero_variance += other.zero_variance;
        self.in_update.extend(other.in_update);
    }
}

/// Rewards (`reward(record, text, tokens)`: `crate::rewards::score` of each decoded response
/// against its record's answer, with any length penalty) and the advantages of groups of `g`
/// consecutive responses (`group_advantages`).
pub fn score_groups(
    responses: Vec<(usize, crate::generate::Generation)>,
    decode: impl Fn(&[u32]) -> Result<String>,
    reward: impl Fn(usize, &str, usize) -> RewardBreakdown,
    g: usize,
    norm_by_std: bool,
    drop_zero_variance: bool,
) -> Result<ScoredGroups> {
    let mut rollouts = Vec::with_capacity(responses.len());
    for (record, gen) in responses {
        let text = decode(&gen.tokens)?;
        let reward = reward(record, &text, gen.tokens.len());
        rollouts.push(Rollout {
            record,
            tokens: gen.tokens,
            logprobs: gen.logprobs,
            text,
            stopped: gen.stopped,
            reward,
            advantage: 0.0,
        });
    }
    let rewards: Vec<f64> = rollouts.iter().map(|r| r.reward.reward).collect();
    for (r, a) in rollouts
        .iter_mut()
        .zip(crate::grpo::algos::group_advantages(
            &rewards,
            g,
            norm_by_std,
        ))
    {
        r.advantage = a;
    }
    let zero_variance = crate::grpo::algos::zero_variance_groups(&rewards, g);
    let in_update = rewards
        .chunks(g)
        .map(|grp| !(drop_zero_variance && grp.iter().all(|&x| x == grp[0])))
        .collect();
    Ok(ScoredGroups {
        rollouts,
        rewards,
        zero_variance,
        in_update,
    })
}
