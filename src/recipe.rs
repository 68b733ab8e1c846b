//! Training recipes: TOML files that hold every setting of a run (`recipes/*.toml`).
//!
//! One [`SftRecipe`] per SFT run; its parts ([`DataSource`], [`OptimizerConfig`],
//! [`ScheduleConfig`], [`FreezeConfig`]) are public so that the GRPO recipe can reuse them, and so
//! are the loading helpers ([`load_toml`], [`apply_override`]).
//!
//! Rules (the same for every recipe):
//! - Every table rejects unknown keys (`deny_unknown_fields`): a typo is an error naming the key,
//!   never a silently ignored setting.
//! - Every value is checked after parsing; errors read `FILE: optimizer.lr must be > 0, got -1`.
//! - Overrides (`--set key=value`, repeatable) are applied to the parsed TOML before it is
//!   deserialised, so they can change any field and are checked exactly like the file: dotted keys
//!   address tables (`optimizer.lr=1e-5`, `freeze.vision_tower=false`), numbers address the entries
//!   of an array of tables (`data.0.samples=20000`). The value is parsed as a TOML value
//!   (`1e-5`, `false`, `[0.9, 0.95]`, `"text"`), and taken as a plain string when it is not one
//!   (`output_dir=runs/x`, `schedule.kind=linear`). Missing tables are created; an array index
//!   must exist.
//! - Relative paths (`model`, `data.path`, `data.media_dir`, `output_dir`) are relative to the
//!   **current working directory**, as in LLaMA-Factory, not to the recipe file: the README runs
//!   every command from the repository root, so `runs/demo/data/train.jsonl` means the same in the
//!   recipe and on the command line. Relative image paths inside a dataset resolve against
//!   `media_dir` when set, else against the dataset file's directory (see `data::sharegpt`).
//! - `epochs` is a float: fractional epochs are allowed, as in HF (`num_train_epochs = 2.5`); the
//!   total number of optimizer steps is then `ceil(epochs * steps_per_epoch)` (see [`crate::plan`]).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::backend::BackendKind;

/// The `model` value that selects the bundled tiny configuration (`assets/demo-tiny/`),
/// initialised randomly from `seed`.
pub const DEMO_TINY: &str = "builtin:demo-tiny";

/// Names accepted after `builtin:`.
pub const BUILTIN_MODELS: &[&str] = &["demo-tiny"];

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// `builtin:NAME`: a bundled configuration, randomly initialised from the recipe's seed.
    Builtin(String),
    /// An HF model directory (config.json, safetensors, tokenizer, preprocessor config).
    Dir(PathBuf),
}

impl ModelSource {
    pub fn parse(model: &str) -> Self {
        match model.strip_prefix("builtin:") {
            Some(name) => ModelSource::Builtin(name.to_string()),
            None => ModelSource::Dir(PathBuf::from(model)),
        }
    }
}

pub use crate::backend::Precision;

/// `precision = "bf16"` needs a backend that computes in bf16.
pub fn check_precision_backend(precision: Precision, backend: BackendKind, errors: &mut Vec<String>) {
    if precision == Precision::Bf16 && !backend.supports_bf16() {
        errors.push(format!("precision = \"bf16\" needs backend = \"cuda\" (or \"flex\" on the CPU), got backend = \"{backend}\""));
    }
}

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
        if self.samples.is_some() && self.weight.is_some() {
            errors.push(format!(
                "{field}: set either samples or weight, not both (samples = {}, weight = {})",
                self.samples.unwrap(),
                self.weight.unwrap()
            ));
        }
        if let Some(w) = self.weight {
            if !w.is_finite() || w < 0.0 {
                errors.push(format!("{field}.weight must be a finite number >= 0, got {w}"));
            }
        }
    }
}

/// Which parts of Qwen2.5-VL are frozen. LLaMA-Factory's parts for qwen2_5_vl: vision tower =
/// `visual.patch_embed` + `visual.blocks`; projector = `visual.merger`; language model =
/// `language_model` (embeddings, layers, final norm) + `lm_head` (tied to the embeddings in the 3B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    #[serde(default = "yes")]
    pub vision_tower: bool,
    #[serde(default = "yes")]
    pub projector: bool,
    #[serde(default)]
    pub language_model: bool,
}

fn yes() -> bool {
    true
}

impl Default for FreezeConfig {
    /// The paper's setting (and LLaMA-Factory's defaults): vision tower and projector frozen,
    /// language model trained.
    fn default() -> Self {
        Self { vision_tower: true, projector: true, language_model: false }
    }
}

impl FreezeConfig {
    pub fn check(&self, field: &str, errors: &mut Vec<String>) {
        if self.vision_tower && self.projector && self.language_model {
            errors.push(format!(
                "{field}: every part is frozen (vision_tower, projector, language_model): nothing to train"
            ));
        }
    }
}

/// AdamW with PyTorch / HF defaults (not Burn's).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate (required).
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay (AdamW), 0 by default as in HF.
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off (as in HF).
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    1.0
}

impl OptimizerConfig {
    /// HF defaults with the given learning rate.
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            max_grad_norm: default_max_grad_norm(),
        }
    }

    pub fn check(&self, field: &str, errors: &mut Vec<String>) {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            errors.push(format!("{field}.lr must be > 0, got {}", self.lr));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(b.is_finite() && (0.0..1.0).contains(b)) {
                errors.push(format!("{field}.betas[{i}] must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            errors.push(format!("{field}.eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            errors.push(format!("{field}.weight_decay must be >= 0, got {}", self.weight_decay));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            errors.push(format!("{field}.max_grad_norm must be >= 0 (0 = no clipping), got {}", self.max_grad_norm));
        }
    }
}

/// Learning-rate schedule shape (see [`crate::schedule::lr_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// HF `get_cosine_schedule_with_warmup` (LLaMA-Factory's default).
    #[default]
    Cosine,
    /// HF `get_constant_schedule_with_warmup`.
    Constant,
    /// HF `get_linear_schedule_with_warmup`.
    Linear,
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
        })
    }
}

/// `[schedule]`: shape, linear warmup over `ceil(total_steps * warmup_ratio)` optimizer steps,
/// and an optional floor `min_lr_ratio * lr` after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub kind: ScheduleKind,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub min_lr_ratio: f64,
}

impl ScheduleConfig {
    pub fn check(&self, field: &str, errors: &mut Vec<String>) {
        if !(self.warmup_ratio.is_finite() && (0.0..=1.0).contains(&self.warmup_ratio)) {
            errors.push(format!("{field}.warmup_ratio must be in [0, 1], got {}", self.warmup_ratio));
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            errors.push(format!("{field}.min_lr_ratio must be in [0, 1], got {}", self.min_lr_ratio));
        }
    }
}

/// Which assistant turns are trained (LLaMA-Factory: all by default, `mask_history` = last only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    #[default]
    AllAssistant,
    LastAssistant,
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
    /// Recompute memory-bound intermediates in the backward pass instead of keeping them
    /// (burn's balanced checkpointing, [`crate::backend::CheckpointedAutodiff`]): less
    /// activation memory for long sequences, same gradients, some extra compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,

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
    /// Examples per micro-batch on the one device this process drives.
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
    /// Evaluate on eval_data every N optimizer steps; 0 = off.
    #[serde(default)]
    pub eval_every: usize,
    /// Log every N optimizer steps.
    #[serde(default = "one")]
    pub log_every: usize,
}

fn default_backend() -> BackendKind {
    BackendKind::Ndarray
}
fn default_cutoff_len() -> usize {
    4096
}
fn default_train_on() -> TrainOn {
    TrainOn::AllAssistant
}
fn one() -> usize {
    1
}
fn default_seed() -> u64 {
    42
}

impl SftRecipe {
    /// Reads `path`, applies `overrides` (`key=value`, see the module docs), deserialises and
    /// validates. Every error names the file.
    pub fn from_file(path: impl AsRef<Path>, overrides: &[String]) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read recipe", path.display()))?;
        Self::from_str_with(&text, &path.display().to_string(), overrides)
    }

    /// [`SftRecipe::from_file`] on a string; `origin` names it in errors.
    pub fn from_str_with(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let recipe: SftRecipe = load_toml(text, origin, overrides)?;
        let errors = recipe.errors();
        if !errors.is_empty() {
            bail!("{}", errors.iter().map(|e| format!("{origin}: {e}")).collect::<Vec<_>>().join("\n"));
        }
        Ok(recipe)
    }

    /// Every problem of this recipe, each naming its field (empty when valid).
    pub fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        check_model(&self.model, "model", &mut errors);
        check_precision_backend(self.precision, self.backend, &mut errors);
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
                errors.push(format!("max_pixels must be >= 784 (one 28 x 28 merged patch), got {p}"));
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
            errors.push(format!("eval_every = {} but there is no [[eval_data]] source", self.eval_every));
        }
        errors
    }

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

    /// Samples per optimizer step on this device (`per_device_batch * grad_accum`).
    pub fn samples_per_step(&self) -> usize {
        self.per_device_batch * self.grad_accum
    }

    /// The resolved recipe as TOML (defaults and overrides included), to save next to checkpoints.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).context("serialising the recipe")
    }
}

/// Checks a `model` value: non-empty; `builtin:NAME` with a known NAME.
pub fn check_model(model: &str, field: &str, errors: &mut Vec<String>) {
    if model.trim().is_empty() {
        errors.push(format!("{field} must not be empty"));
    } else if let ModelSource::Builtin(name) = ModelSource::parse(model) {
        if !BUILTIN_MODELS.contains(&name.as_str()) {
            errors.push(format!(
                "{field} = \"{model}\": unknown builtin model `{name}` (known: {})",
                BUILTIN_MODELS.iter().map(|n| format!("builtin:{n}")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
}

/// Parses a recipe text, applies `overrides`, and deserialises it into `T` (no validation).
/// Errors start with `origin`. Without overrides the error of an unknown key or a bad type points at
/// its line in the file; with overrides it names the key.
pub fn load_toml<T: DeserializeOwned>(text: &str, origin: &str, overrides: &[String]) -> Result<T> {
    if overrides.is_empty() {
        return toml::from_str::<T>(text).map_err(|e| anyhow!("{origin}: {}", e.to_string().trim_end()));
    }
    let mut table: toml::Table = toml::from_str(text).map_err(|e| anyhow!("{origin}: {}", e.to_string().trim_end()))?;
    for o in overrides {
        apply_override(&mut table, o).map_err(|e| anyhow!("{origin}: --set {o}: {e:#}"))?;
    }
    toml::Value::Table(table)
        .try_into::<T>()
        .map_err(|e| anyhow!("{origin} (with --set {}): {}", overrides.join(" "), e.to_string().trim_end()))
}

/// Parses an override value: a TOML value (`1e-5`, `false`, `[0.9, 0.95]`, `"quoted"`), else the
/// raw text as a string.
pub fn parse_override_value(raw: &str) -> toml::Value {
    let raw = raw.trim();
    raw.parse::<toml::Value>().unwrap_or_else(|_| toml::Value::String(raw.to_string()))
}

/// Applies one `key=value` override to a parsed recipe (see the module docs).
pub fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<()> {
    let mut value = toml::Value::Table(std::mem::take(root));
    let result = apply_override_value(&mut value, assignment);
    if let toml::Value::Table(t) = value {
        *root = t;
    }
    result
}

fn apply_override_value(root: &mut toml::Value, assignment: &str) -> Result<()> {
    let (key, raw) =
        assignment.split_once('=').ok_or_else(|| anyhow!("expected key=value (e.g. optimizer.lr=1e-5)"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("bad key `{key}`");
    }
    let mut value = parse_override_value(raw);

    let mut node = root;
    let mut parent = String::new();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let here = if parent.is_empty() { part.to_string() } else { format!("{parent}.{part}") };
        node = match node {
            toml::Value::Table(t) => {
                if last {
                    // A string field given text that parses as another type (`output_dir=2024`)
                    // keeps the text.
                    if matches!(t.get(*part), Some(toml::Value::String(_))) && !value.is_str() {
                        value = toml::Value::String(raw.trim().to_string());
                    }
                    t.insert(part.to_string(), value);
                    return Ok(());
                }
                t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let idx: usize =
                    part.parse().map_err(|_| anyhow!("`{parent}` is an array: expected an index, got `{part}`"))?;
                let len = a.len();
                let slot =
                    a.get_mut(idx).ok_or_else(|| anyhow!("`{here}`: index {idx} out of range ({len} entries)"))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            other => bail!("`{parent}` is a {}, not a table: cannot set `{here}`", other.type_str()),
        };
        parent = here;
    }
    Ok(())
}
