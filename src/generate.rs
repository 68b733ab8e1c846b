//! What generation is about: prompts, sampling settings, stop tokens, what a prompt produced;
//! the rollout engine that does it is [`crate::engine`] (KV cache written in place, continuous
//! batching, prompts prefilled once per group, sampling on the device).
//!
//! Sampling follows transformers' order: temperature, top-k, top-p, then a draw from the
//! softmax; each sequence has its own seeded ChaCha RNG, so the same seed gives the same tokens
//! whatever else is in the batch. [`sample_from_logits`] is the host reference of that draw.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::ModelInput;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    pub max_new_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 512,
        }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// One prompt: token ids (image pads already expanded) and its images.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub input_ids: Vec<u32>,
    pub pixel_values: Vec<f32>,
    pub image_grids: Vec<[usize; 3]>,
}

/// What one prompt produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Generation {
    /// New tokens, including the stop token when one ended the row.
    pub tokens: Vec<u32>,
    /// True when a stop token ended the row (false: max_new_tokens reached).
    pub stopped: bool,
}

/// Stop tokens of a model directory: `generation_config.json`'s `eos_token_id` and
/// `config.json`'s, deduplicated.
pub fn stop_tokens(model_dir: &Path, config_eos: &[u32]) -> Result<Vec<u32>> {
    let mut out: Vec<u32> = config_eos.to_vec();
    let gc = model_dir.join("generation_config.json");
    if gc.exists() {
        let text =
            std::fs::read_to_string(&gc).with_context(|| format!("reading {}", gc.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", gc.display()))?;
        match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => {
                out.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)))
            }
            Some(x) => out.extend(x.as_u64().map(|x| x as u32)),
            None => {}
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Left-pad prompts into one model input (pad id is irrelevant: padding is masked).
pub fn left_padded_batch(prompts: &[&Prompt], pad_id: u32) -> ModelInput {
    let max_len = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    let mut input = ModelInput {
        attention_mask: Some(vec![]),
        ..Default::default()
    };
    for p in prompts {
        let pad = max_len - p.input_ids.len();
        let mut ids = vec![pad_id; pad];
        ids.extend_from_slice(&p.input_ids);
        let mut mask = vec![false; pad];
        mask.extend(std::iter::repeat_n(true, p.input_ids.len()));
        input.input_ids.push(ids);
        input.attention_mask.as_mut().unwrap().push(mask);
        input.pixel_values.extend_from_slice(&p.pixel_values);
        input.image_grids.extend_from_slice(&p.image_grids);
    }
    input
}

/// Sample one token: temperature, top-k, top-p (nucleus), then a categorical draw.
pub fn sample_from_logits(logits: &[f32], cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> u32 {
    if cfg.is_greedy() {
        return argmax(logits);
    }
    let t = cfg.temperature as f64;
    // Candidates sorted by logit, descending (stable: lower id first on ties).
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        // Keep ties with the k-th logit, as transformers' `< kth value` filter does.
        let kth = logits[idx[cfg.top_k - 1] as usize];
        let keep = idx
            .iter()
            .take_while(|&&i| logits[i as usize] >= kth)
            .count();
        idx.truncate(keep);
    }
    let max = logits[idx[0] as usize] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = 0;
        for &p in &probs {
            keep += 1;
            cum += p;
            if cum >= cfg.top_p as f64 {
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let u: f64 = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for (k, &p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[k];
        }
    }
    *idx.last().unwrap()
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The RNG used for sampling, from a seed.
pub fn rng_from_seed(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// The tokens a top-p filter keeps for `logits` at temperature `t` (for tests and debugging).
pub fn nucleus(logits: &[f32], temperature: f32, top_p: f32) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .partial_cmp(&logits[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let max = logits[idx[0] as usize] as f64;
    let probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) / temperature as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut cum = 0.0;
    let mut out = vec![];
    for (k, p) in probs.iter().enumerate() {
        out.push(idx[k]);
        cum += p / total;
        if cum >= top_p as f64 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 1,
        };
        let draw = |seed| {
            let mut rng = rng_from_seed(seed);
            (0..100)
                .map(|_| sample_from_logits(&logits, &cfg, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn temperature_one_matches_softmax_chi_square() {
        let logits = [1.0f32, 0.0, -1.0, 2.0, 0.5, -0.5];
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 1,
        };
        let mut rng = rng_from_seed(42);
        let n = 60_000;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[sample_from_logits(&logits, &cfg, &mut rng) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let chi2: f64 = logits
            .iter()
            .zip(counts)
            .map(|(&l, c)| {
                let e = n as f64 * (l as f64).exp() / z;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        // 5 degrees of freedom: P(chi2 > 20.52) = 0.001.
        assert!(chi2 < 20.52, "chi-square {chi2} for counts {counts:?}");
    }

    #[test]
    fn top_p_never_leaves_the_nucleus() {
        let logits: Vec<f32> = (0..40).map(|i| (i as f32 * 0.77).sin() * 3.0).collect();
        for &top_p in &[0.1f32, 0.5, 0.9] {
            let cfg = SamplingConfig {
                temperature: 0.7,
                top_k: 0,
                top_p,
                max_new_tokens: 1,
            };
            let allowed = nucleus(&logits, 0.7, top_p);
            let mut rng = rng_from_seed(1);
            for _ in 0..5000 {
                let t = sample_from_logits(&logits, &cfg, &mut rng);
                assert!(
                    allowed.contains(&t),
                    "top_p {top_p}: token {t} outside nucleus {allowed:?}"
                );
            }
        }
    }

    #[test]
    fn top_k_keeps_k_best() {
        let logits = [0.0f32, 5.0, 1.0, 4.0, 2.0];
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            max_new_tokens: 1,
        };
        let mut rng = rng_from_seed(3);
        for _ in 0..2000 {
            let t = sample_from_logits(&logits, &cfg, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
    }
}
