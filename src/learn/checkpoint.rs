//! Atomic checkpoints with exact resume: `checkpoint-N/` holds the model (an HF folder), the
//! optimizer state and the learner's position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;

use crate::learn::optim::Adam;
use crate::model::{copy_aux_files, Qwen25VL, SaveDtype};

/// Where a learner is in its run: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within its epoch (GRPO: the next prompt of the epoch's order).
    pub batch_in_epoch: usize,
    /// SFT: rows of the epoch done (`None` in checkpoints older than data parallelism, whose
    /// position is `batch_in_epoch x per_device_batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_in_epoch: Option<usize>,
    /// Ranks of the run that wrote the state (a resume may use another number).
    #[serde(default = "one")]
    pub world_size: usize,
    pub samples_seen: usize,
    pub tokens_seen: usize,
    /// Seed of the run (data order and sampling derive from it and the counters above).
    pub seed: u64,
    /// Learner-specific extras (e.g. the GRPO RNG position).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn one() -> usize {
    1
}

impl Default for TrainState {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            rows_in_epoch: None,
            world_size: 1,
            samples_seen: 0,
            tokens_seen: 0,
            seed: 0,
            extra: BTreeMap::new(),
        }
    }
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer";

/// Write `output_dir/checkpoint-{step}` atomically: everything goes into a hidden temporary
/// directory that is renamed into place once complete (a crash leaves no half checkpoint
/// under a valid name). Holds `hf/` (an HF model directory, f32 for exact resume),
/// `optimizer.bin` and `trainer_state.json`.
pub fn save_checkpoint<B: AutodiffBackend>(
    output_dir: &Path,
    model: &Qwen25VL<B>,
    optim: &Adam<B>,
    state: &TrainState,
    aux_from: &Path,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.step));
    let tmp = output_dir.join(format!(".tmp-checkpoint-{}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let hf = tmp.join("hf");
    model.valid().save(&hf, SaveDtype::F32, usize::MAX)?;
    copy_aux_files(aux_from, &hf)?;
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(optim.to_record(), tmp.join(OPTIMIZER_FILE))
        .map_err(|e| anyhow::anyhow!("writing optimizer state: {e:?}"))?;
    let pause_step = std::env::var("INFIMED_CHECKPOINT_PAUSE_STEP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let pause_ms = std::env::var("INFIMED_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(ms), true) = (pause_ms, pause_step.is_none_or(|s| s == state.step)) {
        // Test hook: widen the window in which a crash leaves an incomplete checkpoint.
        eprintln!(
            "checkpoint {}: pausing {ms} ms before completing",
            state.step
        );
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    Ok(final_dir)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    if !output_dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(output_dir)
        .with_context(|| format!("reading {}", output_dir.display()))?
    {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if !p.join(STATE_FILE).exists() {
            continue;
        }
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, p));
        }
    }
    Ok(best.map(|b| b.1))
}

/// Load a checkpoint's state and optimizer record; the model is loaded by the caller from `hf/`.
pub fn load_checkpoint<B: AutodiffBackend>(
    dir: &Path,
    optim: Adam<B>,
    device: &B::Device,
) -> Result<(Adam<B>, TrainState)> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE))
        .with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", dir.join(STATE_FILE).display()))?;
    let record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join(OPTIMIZER_FILE), device)
        .map_err(|e| anyhow::anyhow!("reading optimizer state of {}: {e:?}", dir.display()))?;
    Ok((optim.load_record(record), state))
}
