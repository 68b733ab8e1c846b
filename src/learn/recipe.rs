//! What every recipe shares: TOML with unknown keys rejected, `--set key=value` overrides, the
//! `model` value (`builtin:NAME` or an HF folder) and the backend/precision check.
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

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use crate::backend::{BackendKind, GradientCheckpointing, Precision};

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

/// `precision = "bf16"` needs a backend that computes in bf16.
pub fn check_precision_backend(
    precision: Precision,
    backend: BackendKind,
    errors: &mut Vec<String>,
) {
    if precision == Precision::Bf16 && !backend.supports_bf16() {
        errors.push(format!("precision = \"bf16\" needs backend = \"cuda\" (or \"flex\" on the CPU), got backend = \"{backend}\""));
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
                BUILTIN_MODELS
                    .iter()
                    .map(|n| format!("builtin:{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
}

/// `keep_checkpoints`' default (see the learners' recipes).
pub fn default_keep_checkpoints() -> usize {
    2
}

pub fn yes() -> bool {
    true
}

/// A learner's recipe: read from TOML with `--set` overrides, validated, written back resolved
/// (defaults and overrides included) into the run's `recipe.toml`.
pub trait Recipe: Sized + DeserializeOwned + Serialize {
    /// Every problem of the recipe, each naming its field (empty when valid).
    fn errors(&self) -> Vec<String>;

    /// Reads `path`, applies `overrides` (`key=value`, see the module docs), deserialises and
    /// validates. Every error names the file.
    fn from_file(path: impl AsRef<Path>, overrides: &[String]) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read recipe", path.display()))?;
        Self::from_str_with(&text, &path.display().to_string(), overrides)
    }

    /// [`Recipe::from_file`] on a string; `origin` names it in errors.
    fn from_str_with(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let recipe: Self = load_toml(text, origin, overrides)?;
        let errors = recipe.errors();
        if !errors.is_empty() {
            let lines: Vec<String> = errors.iter().map(|e| format!("{origin}: {e}")).collect();
            bail!("{}", lines.join("\n"));
        }
        Ok(recipe)
    }

    /// The recipe as TOML, every field written.
    fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).context("serialising the recipe")
    }
}

/// Parses a recipe text, applies `overrides`, and deserialises it into `T` (no validation).
/// Errors start with `origin`. Without overrides the error of an unknown key or a bad type points at
/// its line in the file; with overrides it names the key.
pub fn load_toml<T: DeserializeOwned>(text: &str, origin: &str, overrides: &[String]) -> Result<T> {
    if overrides.is_empty() {
        return toml::from_str::<T>(text)
            .map_err(|e| anyhow!("{origin}: {}", e.to_string().trim_end()));
    }
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| anyhow!("{origin}: {}", e.to_string().trim_end()))?;
    for o in overrides {
        apply_override(&mut table, o).map_err(|e| anyhow!("{origin}: --set {o}: {e:#}"))?;
    }
    toml::Value::Table(table).try_into::<T>().map_err(|e| {
        anyhow!(
            "{origin} (with --set {}): {}",
            overrides.join(" "),
            e.to_string().trim_end()
        )
    })
}

/// Parses an override value: a TOML value (`1e-5`, `false`, `[0.9, 0.95]`, `"quoted"`), else the
/// raw text as a string.
pub fn parse_override_value(raw: &str) -> toml::Value {
    let raw = raw.trim();
    raw.parse::<toml::Value>()
        .unwrap_or_else(|_| toml::Value::String(raw.to_string()))
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
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("expected key=value (e.g. optimizer.lr=1e-5)"))?;
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
        let here = if parent.is_empty() {
            part.to_string()
        } else {
            format!("{parent}.{part}")
        };
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
                t.entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let idx: usize = part.parse().map_err(|_| {
                    anyhow!("`{parent}` is an array: expected an index, got `{part}`")
                })?;
                let len = a.len();
                let slot = a
                    .get_mut(idx)
                    .ok_or_else(|| anyhow!("`{here}`: index {idx} out of range ({len} entries)"))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            other => bail!(
                "`{parent}` is a {}, not a table: cannot set `{here}`",
                other.type_str()
            ),
        };
        parent = here;
    }
    Ok(())
}
