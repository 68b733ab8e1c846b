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
/// `optimizer.bin` (unless `optim` is `None`: a weights-only checkpoint) and `trainer_state.json`.
pub fn save_checkpoint<B: AutodiffBackend>(
    output_dir: &Path,
    model: &Qwen25VL<B>,
    optim: Option<&Adam<B>>,
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
    if let Some(optim) = optim {
        BinFileRecorder::<FullPrecisionSettings>::new()
            .record(optim.to_record(), tmp.join(OPTIMIZER_FILE))
            .map_err(|e| anyhow::anyhow!("writing optimizer state: {e:?}"))?;
    }
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

/// The complete checkpoints of a run (`checkpoint-N/` with its `trainer_state.json`, written
/// last), by step, ascending.
pub fn complete_checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !output_dir.exists() {
        return Ok(vec![]);
    }
    let mut found = vec![];
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
        if p.join(STATE_FILE).exists() {
            found.push((step, p));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(complete_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// Load a checkpoint's state and optimizer record; the model is loaded by the caller from `hf/`.
/// A weights-only checkpoint (`save_optimizer = false`) gives back `optim` as it is (AdamW's
/// moments from zero), and says so.
pub fn load_checkpoint<B: AutodiffBackend>(
    dir: &Path,
    optim: Adam<B>,
    device: &B::Device,
) -> Result<(Adam<B>, TrainState)> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE))
        .with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", dir.join(STATE_FILE).display()))?;
    if !dir.join(format!("{OPTIMIZER_FILE}.bin")).exists() {
        eprintln!(
            "{}: no optimizer state (saved with save_optimizer = false): AdamW's moments start from zero",
            dir.display()
        );
        return Ok((optim, state));
    }
    let record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join(OPTIMIZER_FILE), device)
        .map_err(|e| anyhow::anyhow!("reading optimizer state of {}: {e:?}", dir.display()))?;
    Ok((optim.load_record(record), state))
}

/// What a run keeps on disk (the dry runs print it): a checkpoint's size, how many are written
/// and kept, the export, and the most the run holds at once.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DiskPlan {
    /// f32 weights of every parameter (exact resume).
    pub checkpoint_weights: u64,
    /// AdamW's two f32 moments of the trainable parameters (0 with `save_optimizer = false`).
    pub checkpoint_optimizer: u64,
    /// Checkpoints the run writes (every `save_every` steps, and the last step's).
    pub written: usize,
    /// Checkpoints kept at the end (`keep_checkpoints`).
    pub kept: usize,
    /// The HF export in the compute precision.
    pub export: u64,
}

impl DiskPlan {
    #[allow(clippy::too_many_arguments)] // the plan's terms, each a number from the recipe
    pub fn new(
        params: u64,
        trainable: u64,
        save_optimizer: bool,
        export_bytes_per_param: u64,
        total_steps: usize,
        save_every: usize,
        keep_checkpoints: usize,
    ) -> Self {
        let periodic = total_steps
            .saturating_sub(1)
            .checked_div(save_every)
            .unwrap_or(0);
        let written = periodic + 1;
        let kept = if keep_checkpoints == 0 {
            written
        } else {
            written.min(keep_checkpoints)
        };
        Self {
            checkpoint_weights: 4 * params,
            checkpoint_optimizer: if save_optimizer { 8 * trainable } else { 0 },
            written,
            kept,
            export: export_bytes_per_param * params,
        }
    }

    pub fn checkpoint(&self) -> u64 {
        self.checkpoint_weights + self.checkpoint_optimizer
    }

    /// The most the run holds at once: the kept checkpoints plus one being written, or at the
    /// end the kept ones plus the export.
    pub fn peak(&self) -> u64 {
        let while_saving = (self.kept + 1).min(self.written) as u64 * self.checkpoint();
        while_saving.max(self.kept as u64 * self.checkpoint() + self.export)
    }
}

impl std::fmt::Display for DiskPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        write!(
            f,
            "disk: a checkpoint {} (f32 weights {}, AdamW moments {}); {} written, {} kept ({}); export {}; at most {} at once",
            gib(self.checkpoint()),
            gib(self.checkpoint_weights),
            gib(self.checkpoint_optimizer),
            self.written,
            self.kept,
            gib(self.kept as u64 * self.checkpoint()),
            gib(self.export),
            gib(self.peak())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_plan_of_the_paper_sft() {
        // 3.755B parameters, 3.086B trainable, 29,375 steps, a checkpoint every 1,000, keep 2.
        let d = DiskPlan::new(3_755_000_000, 3_086_000_000, true, 2, 29_375, 1000, 2);
        assert_eq!((d.written, d.kept), (30, 2));
        assert_eq!(d.checkpoint(), 4 * 3_755_000_000 + 8 * 3_086_000_000);
        assert_eq!(d.peak(), 3 * d.checkpoint());
        let all = DiskPlan::new(3_755_000_000, 3_086_000_000, true, 2, 29_375, 1000, 0);
        assert_eq!(all.kept, 30);
        let weights_only = DiskPlan::new(10, 5, false, 2, 5, 0, 2);
        assert_eq!(
            (
                weights_only.written,
                weights_only.kept,
                weights_only.checkpoint()
            ),
            (1, 1, 40)
        );
        assert_eq!(weights_only.peak(), 40 + 20);
    }
}
