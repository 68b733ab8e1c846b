//! The GRPO data: EasyR1 prompt records, their chat messages, and the seeded prompt order.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::data::sharegpt::{split_image_tags, IMAGE_TAG};
use crate::data::template::ChatMessage;
use crate::eval::{for_each_jsonl, Skipped};
use crate::learn::checkpoint::TrainState;
use crate::rewards::{answer_text, Task};

/// One RL prompt (EasyR1 layout).
#[derive(Debug, Clone, PartialEq)]
pub struct RlRecord {
    /// The question; `<image>` tags mark where the images go.
    pub problem: String,
    /// The ground truth as text (numbers and box lists are kept as their JSON text).
    pub answer: String,
    /// Image paths, relative ones resolved against the data file's folder.
    pub images: Vec<PathBuf>,
    /// The reward's task; inferred from the answer when absent.
    pub task: Option<Task>,
    /// `FILE:LINE`.
    pub origin: String,
}

/// Read EasyR1 JSONL: `{"problem", "answer", "images"?, "task"?}` per line. A malformed line, a
/// missing field or an `<image>` count that differs from the number of images is an error
/// `FILE:LINE: ...`, or with `skip_invalid` a counted skip.
pub fn read_rl_records(path: &Path, skip_invalid: bool) -> Result<(Vec<RlRecord>, Vec<Skipped>)> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut out = vec![];
    let mut skipped = vec![];
    for_each_jsonl(path, skip_invalid, &mut skipped, |v, location| {
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("expected a JSON object"))?;
        let problem = match obj.get("problem").or_else(|| obj.get("prompt")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!("`problem` must be a string, got {other}"),
            None => bail!("missing `problem`"),
        };
        let answer = match obj.get("answer") {
            Some(v) => answer_text(v).ok_or_else(|| anyhow!("`answer` is null"))?,
            None => bail!("missing `answer`"),
        };
        let images: Vec<PathBuf> = match obj.get("images") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => {
                        let p = PathBuf::from(s);
                        Ok(if p.is_absolute() { p } else { base.join(p) })
                    }
                    Value::Object(o) => match o.get("path").or_else(|| o.get("image")) {
                        Some(Value::String(s)) => Ok(base.join(s)),
                        _ => Err(anyhow!("an image entry must be a path string, got {x}")),
                    },
                    other => Err(anyhow!("an image entry must be a path string, got {other}")),
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("`images` must be a list, got {other}"),
        };
        let tags = problem.matches(IMAGE_TAG).count();
        ensure!(
            tags == images.len(),
            "the problem has {tags} <image> tags but the record has {} images",
            images.len()
        );
        let task = match obj.get("task") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.parse::<Task>()?),
            Some(other) => bail!("`task` must be a string, got {other}"),
        };
        out.push(RlRecord {
            problem,
            answer,
            images,
            task,
            origin: location.to_string(),
        });
        Ok(())
    })?;
    Ok((out, skipped))
}

/// The chat messages of a record under a prompt template (`{problem}` replaced by the record's
/// problem) and system prompt (a recipe's `prompt_template` and `system_prompt`).
pub fn prompt_messages(template: &str, system: Option<&str>, rec: &RlRecord) -> Vec<ChatMessage> {
    let mut msgs = vec![];
    if let Some(s) = system {
        msgs.push(ChatMessage::text("system", s));
    }
    let text = template.replace("{problem}", &rec.problem);
    msgs.push(ChatMessage::new("user", split_image_tags(&text)));
    msgs
}

/// The prompt order of one epoch: a permutation of `0..n` seeded by `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    order.shuffle(&mut rng);
    order
}

/// The sampler of rollout step `step`.
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ (step as u64).wrapping_add(0x5851_F42D_4C95_7F2D),
    )
}

/// The record indices of the next `count` prompts of the seeded order, moving `state` on (and
/// into the next epoch's order past the end of this one).
pub fn next_prompts(
    state: &mut TrainState,
    order: &mut Vec<usize>,
    n_records: usize,
    count: usize,
    seed: u64,
) -> Vec<usize> {
    let mut picked = Vec::with_capacity(count);
    while picked.len() < count {
        if state.batch_in_epoch >= order.len() {
            state.epoch += 1;
            state.batch_in_epoch = 0;
            *order = epoch_order(n_records, seed, state.epoch);
        }
        picked.push(order[state.batch_in_epoch]);
        state.batch_in_epoch += 1;
    }
    picked
}
