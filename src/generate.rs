//! What generation is about: prompts, sampling settings, stop tokens, what a prompt produced;
//! the rollout engine that does it is [`crate::engine`] (KV cache written in place, continuous
//! batching, prompts prefilled once per group, sampling on the device).
//!
//! Sampling follows transformers' order: temperature, top-k, top-p, then a draw from the
//! softmax; each sequence has its own seeded ChaCha RNG, so the same seed gives the same tokens
//! whatever else is in the batch ([`crate::engine::sample_on_device`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
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
    /// The log-prob of each token under the distribution the engine drew it from,
    /// `log_softmax(logits / temperature)` (GRPO compares them with the trainer's).
    pub logprobs: Vec<f32>,
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

/// The RNG used for sampling, from a seed.
pub fn rng_from_seed(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}
