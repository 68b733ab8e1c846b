//! The SFT recipe (`infimed sft --recipe R`): every setting of a run, TOML (see `recipes/*.toml`
//! and [`crate::learn::recipe`] for the rules all recipes share: unknown keys rejected, `--set`
//! overrides, paths relative to the working directory).
//!
//! - `epochs` is a float: fractional epochs are allowed, as in HF (`num_train_epochs = 2.5`); the
//!   total number of optimizer steps is then `ceil(epochs * steps_per_epoch)` (see [`crate::sft::plan`]).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

/// Which assistant turns are trained (LLaMA-Factory: all by default, `mask_history` = last only).
pub use crate::data::encode::TrainOn;
pub use crate::learn::freeze::FreezeConfig;
pub use crate::learn::optim::OptimizerConfig;
pub use crate::learn::recipe::{
    check_model, check_precision_backend, BackendKind, ModelSource, Precision, Recipe, DEMO_TINY,
};
pub use crate::learn::schedule::{ScheduleConfig, ScheduleKind};

use crate::backend::BackendArgs;
use crate::learn::run::{NanPolicy, TraineeSpec};
use crate::learn::trainer::RunSettings;

/// Dataset file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// LLaMA-Factory sharegpt: JSONL (or a JSON array) of `{"messages": [...], "images": [...]}`
    /// (or the older `conversations` / `from` / `value`).
    #[default]
    Sharegpt,
}

/// How many records a source contributes per epoch (see [`DataSource::mix`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mix {
    /// Every record once.
    All,
    /// Exactly N records per epoch (a random subset when N < available, repeats when N > available).
    Samples(usize),
    /// `round(w * available)` records per epoch.
    Weight(f64),
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mix::All => f.write_str("all"),
            Mix::Samples(n) => write!(f, "samples={n}"),
            Mix::Weight(w) => write!(f, "weight={w}"),
        }
    }
}

/// One dataset file of the mix (`[[data]]`, `[[eval_data]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// The dataset file, relative to the current working directory.
    pub path: PathBuf,
    /// File format (only `sharegpt`).
    #[serde(default)]
    pub format: DataFormat,
    /// Group, for reporting and ablations: `general_mm`, `medical_mm`, `medical_text`, or any name.
    #[serde(default = "default_group")]
    pub group: String,
    /// Display name (default: the file name without extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Records per epoch: a seeded subset if fewer than the file holds, repeats (upsampling) if more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
    /// Records per epoch as a multiple of the file's size (0.5 = half, 2.0 = twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Directory that relative image paths resolve against (default: the dataset file's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_dir: Option<PathBuf>,
}

fn default_group() -> String {
    "default".into()
}

impl DataSource {
    /// A source taking every record of `path` once.
    pub fn new(path: impl Into<PathBuf>, group: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            format: DataFormat::Sharegpt,
            group: group.into(),
            name: None,
            samples: None,
            weight: None,
            media_dir: None,
        }
    }

    /// The mixing rule (call after validation: with both `samples` and `weight`, `samples` wins).
    pub fn mix(&self) -> Mix {
        match (self.samples, self.weight) {
            (Some(n), _) => Mix::Samples(n),
            (None, Some(w)) => Mix::Weight(w),
            (None, None) => Mix::All,
        }
    }

    /// `name`, else the file name without its extension.
    pub fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// Checks this source; `field` is its address (`data.0`).
    pub fn check(&self, field: &str, errors: &mut Vec<String>) {
        if self.path.as_os_str().is_empty() {
            errors.push(format!("{field}.path must not be empty"));
        }
        if self.group.trim().is_empty() {
            errors.push(format!("{field}.group must not be empty"));
        }
        if let (Some(samples), Some(weight)) = (self.samples, self.weight) {
            errors.push(format!(
                "{field}: set either samples or weight, not both (samples = {samples}, weight = {weight})"
            ));
        }
        if let Some(w) = self.weight {
            if !w.is_finite() || w < 0.0 {
                errors.push(format!(
                    "{field}.weight must be a finite number >= 0, got {w}"
                ));
            }
        }
    }
}

/// A whole SFT run (`infimed sft RECIPE [--set key=value]...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftRecipe {
    /// HF model directory, or `builtin:demo-tiny` ([`DEMO_TINY`]).
    pub model: String,
    #[serde(default = "default_backend")]
    pub backend: BackendKind,
    /// Device index (GPU backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<usize>,
    #[serde(default)]
    pub precision: Precision,
    /// What the backward pass recomputes: `false` / `"off"`, `true` / `"balanced"` (burn's
    /// balanced checkpointing), `"layer"` (HF's per-layer checkpointing); see
    /// [`crate::backend::GradientCheckpointing`].
    #[serde(default)]
    pub gradient_checkpointing: crate::backend::GradientCheckpointing,

    /// Training sources, mixed per [`DataSource::mix`].
    pub data: Vec<DataSource>,
    /// Validation sources (optional).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval_data: Vec<DataSource>,
    /// Image pixel budget (default: the model's preprocessor_config.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pixels: Option<usize>,
    /// Maximum tokens per example (image tokens included; truncation never cuts an image).
    #[serde(default = "default_cutoff_len")]
    pub cutoff_len: usize,
    #[serde(default = "default_train_on")]
    pub train_on: TrainOn,
    /// Sort mega-batches of 50 batches by length (HF `group_by_length`; default false).
    #[serde(default)]
    pub group_by_length: bool,
    /// Pack several samples into each row of up to `cutoff_len` tokens (LLaMA-Factory's
    /// `neat_packing`: attention stays within each sample, positions restart per sample; the
    /// loss is the same token mean). `per_device_batch` then counts rows.
    #[serde(default)]
    pub packing: bool,
    /// Threads that read images and encode the samples of upcoming steps while one trains
    /// (0: encode each step when it is taken).
    #[serde(default = "default_loader_workers")]
    pub loader_workers: usize,
    /// How many steps ahead the loader may encode.
    #[serde(default = "default_prefetch")]
    pub prefetch_steps: usize,
    /// false: an invalid record is an error; true: it is skipped, counted and reported.
    #[serde(default)]
    pub skip_invalid: bool,

    #[serde(default)]
    pub freeze: FreezeConfig,
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,

    /// Passes over the mix; fractional values allowed (HF `num_train_epochs`).
    pub epochs: f64,
    /// Examples per micro-batch on each device (rank); a micro-batch of the run holds
    /// `per_device_batch x parallel world size` examples.
    pub per_device_batch: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Optional cap on optimizer steps (the schedule is then computed over the cap, as HF's max_steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Seed of the data order, the subset selection and (builtin models) the initial weights.
    #[serde(default = "default_seed")]
    pub seed: u64,

    pub output_dir: PathBuf,
    /// Checkpoint every N optimizer steps; 0 = only at the end.
    #[serde(default)]
    pub save_every: usize,
    /// Complete checkpoints kept: the newest N, older ones removed once a newer one is complete
    /// (HF's `save_total_limit`; 0 = all). The default 2 keeps ~75 GiB for the 3B recipes
    /// (f32 weights + AdamW moments: ~37 GiB a checkpoint) instead of ~1 TB over a paper run.
    #[serde(default = "crate::learn::recipe::default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Checkpoints hold AdamW's moments (exact resume); `false`: weights only (a third of the
    /// size; a resume then starts the moments from zero).
    #[serde(default = "crate::learn::recipe::yes")]
    pub save_optimizer: bool,
    /// An update whose loss or gradient norm is not finite: `"stop"` the run (an error naming
    /// the step, its samples and the last good checkpoint) or `"skip"` it (counted in the
    /// metrics as `skipped_updates`).
    #[serde(default)]
    pub nan_policy: NanPolicy,
    /// Evaluate on eval_data every N optimizer steps; 0 = off.
    #[serde(default)]
    pub eval_every: usize,
    /// Log every N optimizer steps.
    #[serde(default = "one")]
    pub log_every: usize,
    /// Write the samples of every optimizer step (`[source, record]` pairs, all ranks) to
    /// `output_dir/samples.jsonl`: an audit of the data order (what a resumed run saw).
    #[serde(default)]
    pub log_samples: bool,
    /// Data parallelism: devices of this node, nodes (see [`crate::learn::parallel`]).
    #[serde(default)]
    pub parallel: crate::learn::parallel::ParallelConfig,
}

fn default_backend() -> BackendKind {
    BackendKind::cpu_default()
}
fn default_cutoff_len() -> usize {
    4096
}
fn default_train_on() -> TrainOn {
    TrainOn::AllAssistant
}
fn default_loader_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    2
}
fn one() -> usize {
    1
}
fn default_seed() -> u64 {
    42
}

impl Recipe for SftRecipe {
    /// Every problem of this recipe, each naming its field (empty when valid).
    fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        check_model(&self.model, "model", &mut errors);
        check_precision_backend(self.precision, self.backend, &mut errors);
        self.parallel.check(&mut errors);
        if self.data.is_empty() {
            errors.push("data: at least one [[data]] source is required".into());
        }
        for (i, d) in self.data.iter().enumerate() {
            d.check(&format!("data.{i}"), &mut errors);
        }
        for (i, d) in self.eval_data.iter().enumerate() {
            d.check(&format!("eval_data.{i}"), &mut errors);
        }
        if let Some(p) = self.max_pixels {
            if p < 28 * 28 {
                errors.push(format!(
                    "max_pixels must be >= 784 (one 28 x 28 merged patch), got {p}"
                ));
            }
        }
        if self.cutoff_len == 0 {
            errors.push("cutoff_len must be > 0, got 0".into());
        }
        self.freeze.check("freeze", &mut errors);
        self.optimizer.check("optimizer", &mut errors);
        self.schedule.check("schedule", &mut errors);
        if !(self.epochs.is_finite() && self.epochs > 0.0) {
            errors.push(format!("epochs must be > 0, got {}", self.epochs));
        }
        if self.per_device_batch == 0 {
            errors.push("per_device_batch must be >= 1, got 0".into());
        }
        if self.packing && self.group_by_length {
            errors.push("packing and group_by_length cannot both be on (packing already groups samples into full rows)".into());
        }
        if self.prefetch_steps == 0 {
            errors.push("prefetch_steps must be >= 1, got 0".into());
        }
        if self.grad_accum == 0 {
            errors.push("grad_accum must be >= 1, got 0".into());
        }
        if self.max_steps == Some(0) {
            errors.push("max_steps must be >= 1 when set, got 0".into());
        }
        if self.output_dir.as_os_str().is_empty() {
            errors.push("output_dir must not be empty".into());
        }
        if self.log_every == 0 {
            errors.push("log_every must be >= 1, got 0".into());
        }
        if self.eval_every > 0 && self.eval_data.is_empty() {
            errors.push(format!(
                "eval_every = {} but there is no [[eval_data]] source",
                self.eval_every
            ));
        }
        errors
    }
}

impl SftRecipe {
    /// Checks the recipe (an error lists every problem).
    pub fn validate(&self) -> Result<()> {
        let errors = self.errors();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("{}", errors.join("\n")))
        }
    }

    pub fn model_source(&self) -> ModelSource {
        ModelSource::parse(&self.model)
    }

    /// Rows of one micro-batch over all ranks (`per_device_batch * world size`).
    pub fn global_batch(&self) -> usize {
        self.per_device_batch * self.parallel.world_size()
    }

    /// How the training loop runs this recipe.
    pub fn run_settings<'a>(&'a self, files: &'a Path, resume: bool) -> RunSettings<'a> {
        RunSettings {
            name: "sft",
            trainee: TraineeSpec {
                model: &self.model,
                seed: self.seed,
                freeze: &self.freeze,
                optimizer: &self.optimizer,
                precision: self.precision,
                checkpointing: self.gradient_checkpointing,
                nan_policy: self.nan_policy,
                save_optimizer: self.save_optimizer,
                out_dir: &self.output_dir,
                resume,
            },
            files,
            log_every: self.log_every,
            eval_every: self.eval_every,
            save_every: self.save_every,
            keep_checkpoints: self.keep_checkpoints,
        }
    }

    pub fn backend_args(&self) -> BackendArgs {
        BackendArgs {
            backend: self.backend,
            device: self.device,
            precision: self.precision,
        }
    }
}
