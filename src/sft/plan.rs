//! The dry-run plan of an SFT run: the data mix, the step arithmetic, the parameter counts and a
//! memory estimate, computed from the recipe, the model config and the record counts only.
//!
//! Rules:
//! - **Mix** ([`mix_counts`]): per source and per epoch, `samples = N` takes N records, `weight = w`
//!   takes `round(w * available)`, neither takes every record once. N (or the weighted count) may
//!   exceed the file: the source is then **upsampled** — every record `N / available` times plus
//!   a seeded random subset of `N % available` records (LLaMA-Factory's `max_samples` truncates
//!   instead; we repeat, so that a `+20K` ablation on a small source means 20K more examples).
//!   When N < available the N records are a seeded random subset (not the first N: files are
//!   often sorted by origin dataset). The selection depends on `seed` only, so it is the same
//!   every epoch; the order of the mixed epoch is reshuffled with `seed + epoch`
//!   ([`mixed_order`]). Both are pure functions: a resumed run recomputes them exactly.
//! - **Steps** (HF Trainer, one process = one device): micro-batches per epoch
//!   `B = ceil(samples / per_device_batch)` (the last batch may be short, no drop_last);
//!   optimizer steps per epoch `S = ceil(B / grad_accum)` (= `ceil(samples / (per_device_batch *
//!   grad_accum))`; the last step of an epoch accumulates the leftover micro-batches); total
//!   `T = ceil(epochs * S)` (fractional epochs allowed), then `min(T, max_steps)` when `max_steps`
//!   is set — the schedule runs over that T. Warmup `W = ceil(T * warmup_ratio)`.
//! - **Memory** ([`MemoryEstimate`]): an estimate, not a measurement (expect +-50%; allocator
//!   overhead, the tokenizer, image buffers and backend workspaces are not counted). See
//!   [`MemoryEstimate`] for the formulas.

use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::backend::BackendKind;
use crate::backend::GradientCheckpointing;
use crate::data::lengths::SampleLength;
use crate::learn::checkpoint::DiskPlan;
use crate::learn::schedule::warmup_steps;
use crate::model::{Qwen25VlConfig, Tiles};
use crate::sft::data::{padding_stats, PaddingStats, SampleId};
pub use crate::sft::mix::{
    count_available, count_records, mix_counts, mixed_order, selected_records,
};
use crate::sft::recipe::{FreezeConfig, Mix, Precision, ScheduleConfig, SftRecipe};

/// The Qwen2.5-VL preprocessor's default `max_pixels` (used when the recipe sets none).
pub const DEFAULT_MAX_PIXELS: usize = 12_845_056;

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// Parameter counts of a Qwen2.5-VL checkpoint, every weight and bias, from the config alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParamCounts {
    /// `visual.patch_embed.proj.weight` (Conv3d without bias).
    pub patch_embed: u64,
    /// `visual.blocks.*`: norms, qkv + proj with bias, SwiGLU MLP with bias.
    pub vision_blocks: u64,
    /// `visual.merger`: ln_q + two linears with bias.
    pub projector: u64,
    /// `model.embed_tokens.weight`.
    pub embed_tokens: u64,
    /// `model.layers.*`: norms, q/k/v with bias, o without, SwiGLU MLP without bias.
    pub decoder_layers: u64,
    /// `model.norm.weight`.
    pub final_norm: u64,
    /// `lm_head.weight`; 0 when tied to the embeddings (counted once, in `embed_tokens`).
    pub lm_head: u64,
}

/// Parameters per trainable part (LLaMA-Factory's freezing units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartCounts {
    pub vision_tower: u64,
    pub projector: u64,
    pub language_model: u64,
}

impl PartCounts {
    pub fn total(&self) -> u64 {
        self.vision_tower + self.projector + self.language_model
    }
}

impl ParamCounts {
    /// Patch embedding + blocks.
    pub fn vision_tower(&self) -> u64 {
        self.patch_embed + self.vision_blocks
    }
    /// Vision tower + projector.
    pub fn vision_total(&self) -> u64 {
        self.vision_tower() + self.projector
    }
    /// Embeddings, layers, final norm and (untied) head.
    pub fn language_model(&self) -> u64 {
        self.embed_tokens + self.decoder_layers + self.final_norm + self.lm_head
    }
    pub fn total(&self) -> u64 {
        self.vision_total() + self.language_model()
    }
    pub fn parts(&self) -> PartCounts {
        PartCounts {
            vision_tower: self.vision_tower(),
            projector: self.projector,
            language_model: self.language_model(),
        }
    }
    pub fn trainable(&self, freeze: &FreezeConfig) -> PartCounts {
        let p = self.parts();
        PartCounts {
            vision_tower: if freeze.vision_tower {
                0
            } else {
                p.vision_tower
            },
            projector: if freeze.projector { 0 } else { p.projector },
            language_model: if freeze.language_model {
                0
            } else {
                p.language_model
            },
        }
    }
    pub fn frozen(&self, freeze: &FreezeConfig) -> PartCounts {
        let (p, t) = (self.parts(), self.trainable(freeze));
        PartCounts {
            vision_tower: p.vision_tower - t.vision_tower,
            projector: p.projector - t.projector,
            language_model: p.language_model - t.language_model,
        }
    }
}

/// Exact parameter counts of a Qwen2.5-VL model (weight list of `qwen2_5_vl.md` section 5).
pub fn param_counts(cfg: &Qwen25VlConfig) -> ParamCounts {
    let v = &cfg.vision;
    let (vh, vi) = (v.hidden_size as u64, v.intermediate_size as u64);
    let linear = |i: u64, o: u64, bias: bool| i * o + if bias { o } else { 0 };
    let patch_embed = vh * v.patch_dim() as u64;
    let block = 2 * vh // norm1, norm2
        + linear(vh, 3 * vh, true) // attn.qkv
        + linear(vh, vh, true) // attn.proj
        + 2 * linear(vh, vi, true) // mlp.gate_proj, mlp.up_proj
        + linear(vi, vh, true); // mlp.down_proj
    let merged = vh * v.merge_unit() as u64;
    let projector = vh // merger.ln_q
        + linear(merged, merged, true) // merger.mlp.0
        + linear(merged, v.out_hidden_size as u64, true); // merger.mlp.2

    let t = &cfg.text;
    let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
    let q = (t.num_attention_heads * t.head_dim) as u64;
    let kv = (t.num_key_value_heads * t.head_dim) as u64;
    let layer = 2 * h // input_layernorm, post_attention_layernorm
        + linear(h, q, true) // q_proj
        + 2 * linear(h, kv, true) // k_proj, v_proj
        + linear(q, h, false) // o_proj
        + 3 * linear(h, i, false); // gate, up, down (h*i each)
    let embed = t.vocab_size as u64 * h;
    ParamCounts {
        patch_embed,
        vision_blocks: v.depth as u64 * block,
        projector,
        embed_tokens: embed,
        decoder_layers: t.num_hidden_layers as u64 * layer,
        final_norm: h,
        lm_head: if t.tie_word_embeddings { 0 } else { embed },
    }
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// Device memory estimate in bytes for one process (one device), following what the learner
/// allocates. Terms (`P` all parameters, `N` the trainable ones, `e` bytes of the compute
/// dtype, `b x s` the batch at `cutoff_len`, `h`/`kv`/`i` the hidden, key/value and MLP widths,
/// `L` decoder layers, `V` the vocabulary):
///
/// - `master_weights`: every parameter in f32 (`4 P`; frozen ones too, as loaded);
/// - `compute_weights`: bf16 only, the compute copy of every parameter (`2 P`; f32 computes on
///   the master weights themselves);
/// - `gradients`: f32 gradients of the trainable parameters (`4 N`), and as much again for the
///   running sum when `grad_accum > 1` (`accumulation`);
/// - `optimizer_state`: AdamW's two moments in f32 (`8 N`), plus `optimizer_transient`, the
///   temporaries of one tensor's update (3 x the largest tensor in f32);
/// - `activations`: what the backward pass needs, by `gradient_checkpointing`:
///   - `off`: per layer `b s (10 h + 4 kv + 6 i) e` (norm inputs and outputs, q/k/v before and
///     after rotary, the attention output, the MLP's gate, SiLU pieces, up and product);
///   - `balanced`: matmul and reduction results only, per layer `b s (5 h + 3 kv + 2 i) e`;
///   - `layer`: the input of every layer `L b s h e`, plus the working set of the one layer being
///     recomputed and back-propagated `b s (10 h + 4 kv + 6 i) e`;
///   - the embeddings and the final norm `3 b s h e`; the vision tower's blocks when it trains
///     (`b n (11 hv + 4 iv) e` per block, `n` patches per sample);
/// - `attention_working_set`: the memory-efficient attention holds tiles, not `s x s` scores:
///   four `b x heads x q_tile x k_tile` f32 tiles (scores, probabilities and their gradients in
///   the backward) and the f32 `dQ` accumulator `4 b s h`; the reference attention instead keeps
///   `6 x b x heads x s^2 x 4` bytes per layer (shown as `reference attention`, not counted);
/// - `logits`: the head runs over chunks of `HEAD_CHUNK` rows: four `chunk x V` f32 tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    pub master_weights: u64,
    pub compute_weights: u64,
    pub gradients: u64,
    pub accumulation: u64,
    pub optimizer_state: u64,
    pub optimizer_transient: u64,
    pub activations: u64,
    pub attention_working_set: u64,
    pub logits: u64,
    /// What the reference (materialising) attention would keep over all layers (not in the total).
    pub reference_attention: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.master_weights
            + self.compute_weights
            + self.gradients
            + self.accumulation
            + self.optimizer_state
            + self.optimizer_transient
            + self.activations
            + self.attention_working_set
            + self.logits
    }
}

/// What the activation terms depend on.
#[derive(Debug, Clone, Copy)]
pub struct ActivationShape {
    pub batch: usize,
    pub seq: usize,
    pub max_pixels: usize,
    pub precision: Precision,
    pub checkpointing: GradientCheckpointing,
    pub tiles: Tiles,
}

/// The memory estimate (see [`MemoryEstimate`]) of training `cfg` with `freeze` and `grad_accum`.
pub fn memory_estimate(
    cfg: &Qwen25VlConfig,
    freeze: &FreezeConfig,
    grad_accum: usize,
    a: &ActivationShape,
) -> MemoryEstimate {
    let params = param_counts(cfg);
    let (p, n) = (params.total(), params.trainable(freeze).total());
    let largest = (cfg.text.vocab_size * cfg.text.hidden_size)
        .max(cfg.text.hidden_size * cfg.text.intermediate_size) as u64;
    let (activations, attention_working_set, logits, reference_attention) =
        activation_terms(cfg, freeze, a);
    MemoryEstimate {
        master_weights: 4 * p,
        compute_weights: if a.precision == Precision::Bf16 {
            2 * p
        } else {
            0
        },
        gradients: 4 * n,
        accumulation: if grad_accum > 1 { 4 * n } else { 0 },
        optimizer_state: 8 * n,
        optimizer_transient: if n > 0 { 3 * 4 * largest } else { 0 },
        activations,
        attention_working_set,
        logits,
        reference_attention,
    }
}

/// `(activations, attention working set, logits, reference attention)` in bytes.
pub fn activation_terms(
    cfg: &Qwen25VlConfig,
    freeze: &FreezeConfig,
    a: &ActivationShape,
) -> (u64, u64, u64, u64) {
    if freeze.vision_tower && freeze.projector && freeze.language_model {
        return (0, 0, 0, 0);
    }
    let e = a.precision.bytes();
    let (b, s) = (a.batch as u64, a.seq as u64);
    let t = &cfg.text;
    let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
    let kv = (t.num_key_value_heads * t.head_dim) as u64;
    let heads = t.num_attention_heads as u64;
    let layers = t.num_hidden_layers as u64;
    let layer_off = b * s * (10 * h + 4 * kv + 6 * i) * e;
    let mut act = match a.checkpointing {
        GradientCheckpointing::Off => layers * layer_off,
        GradientCheckpointing::Balanced => layers * b * s * (5 * h + 3 * kv + 2 * i) * e,
        GradientCheckpointing::Layer => layers * b * s * h * e + layer_off,
    };
    act += 3 * b * s * h * e;
    let (tq, tk) = (a.tiles.q.min(a.seq) as u64, a.tiles.k.min(a.seq) as u64);
    let mut working = 4 * b * heads * tq * tk * 4 + 4 * b * s * h;
    let mut reference = layers * 6 * b * heads * s * s * 4;
    let logits = 4 * (crate::model::head::HEAD_CHUNK as u64).min(b * s) * t.vocab_size as u64 * 4;
    if !freeze.vision_tower {
        let v = &cfg.vision;
        let patch_area = (v.patch_size * v.patch_size).max(1);
        let np = ((a.max_pixels / patch_area) as u64).min(v.merge_unit() as u64 * s);
        let (vh, vi, vheads) = (
            v.hidden_size as u64,
            v.intermediate_size as u64,
            v.num_heads as u64,
        );
        let win_side = (v.window_size / v.patch_size.max(1)) as u64;
        let win = (win_side * win_side).min(np);
        act += v.depth as u64 * b * np * (11 * vh + 4 * vi) * e;
        working = working.max(4 * b * vheads * tq.min(np) * tk.min(np) * 4 + 4 * b * np * vh);
        for blk in 0..v.depth {
            let w = if v.fullatt_block_indexes.contains(&blk) {
                np
            } else {
                win
            };
            reference += 6 * b * vheads * np * w * 4;
        }
    }
    (act, working, logits, reference)
}

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

/// One source of the mix, as planned.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcePlan {
    pub name: String,
    pub path: PathBuf,
    pub group: String,
    pub mix: Mix,
    /// Records in the file.
    pub available: usize,
    /// Records per epoch after mixing.
    pub selected: usize,
}

/// Everything an SFT run will do, computed before loading any weight.
#[derive(Debug, Clone, PartialEq)]
pub struct SftPlan {
    pub model: String,
    pub backend: BackendKind,
    pub precision: Precision,
    pub gradient_checkpointing: crate::backend::GradientCheckpointing,
    pub sources: Vec<SourcePlan>,
    /// Examples per epoch (sum of `selected`).
    pub total_samples: usize,
    pub per_device_batch: usize,
    pub grad_accum: usize,
    /// Ranks (`parallel.devices x parallel.nodes`) and nodes.
    pub world_size: usize,
    pub nodes: usize,
    pub epochs: f64,
    /// `ceil(rows / (per_device_batch x world_size))` (a row is a sample, or with packing a
    /// packed row).
    pub micro_batches_per_epoch: usize,
    /// `ceil(micro_batches_per_epoch / grad_accum)`.
    pub steps_per_epoch: usize,
    /// `ceil(epochs * steps_per_epoch)`, capped by `max_steps`.
    pub total_steps: usize,
    /// Whether `max_steps` lowered `total_steps`.
    pub capped_by_max_steps: bool,
    /// `ceil(total_steps * warmup_ratio)`.
    pub warmup_steps: usize,
    pub base_lr: f64,
    pub schedule: ScheduleConfig,
    pub cutoff_len: usize,
    /// The recipe's max_pixels, or [`DEFAULT_MAX_PIXELS`] (the preprocessor's default).
    pub max_pixels: usize,
    pub max_pixels_from_recipe: bool,
    pub freeze: FreezeConfig,
    pub params: ParamCounts,
    pub trainable: PartCounts,
    pub frozen: PartCounts,
    pub trainable_params: u64,
    pub frozen_params: u64,
    pub memory: MemoryEstimate,
    pub packing: bool,
    /// Padding with and without packing (when the records' lengths are known).
    pub padding: Option<PaddingStats>,
    pub disk: DiskPlan,
}

impl SftPlan {
    /// Selected examples per group, in first-appearance order.
    pub fn group_totals(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for s in &self.sources {
            match out.iter_mut().find(|(g, _)| *g == s.group) {
                Some((_, n)) => *n += s.selected,
                None => out.push((s.group.clone(), s.selected)),
            }
        }
        out
    }
}

/// Optimizer steps per epoch and in total (see the module docs): `(micro_batches_per_epoch,
/// steps_per_epoch, total_steps, capped)`.
pub fn step_counts(
    samples: usize,
    per_device_batch: usize,
    grad_accum: usize,
    epochs: f64,
    max_steps: Option<usize>,
) -> (usize, usize, usize, bool) {
    let micro = samples.div_ceil(per_device_batch.max(1));
    let per_epoch = micro.div_ceil(grad_accum.max(1));
    let total = (epochs * per_epoch as f64).ceil() as usize;
    match max_steps {
        Some(m) if m < total => (micro, per_epoch, m, true),
        _ => (micro, per_epoch, total, false),
    }
}

/// Where a run of `recipe` ends, as (epoch, rows of it done), for `rows_in_epoch` rows per epoch:
/// after `min(ceil(epochs x steps_per_epoch), max_steps)` steps of `per_device_batch x world`
/// rows per micro-batch and `grad_accum` micro-batches per step.
pub fn run_end(recipe: &SftRecipe, rows_in_epoch: usize) -> (usize, usize) {
    let (_, per_epoch, total, _) = step_counts(
        rows_in_epoch,
        recipe.global_batch(),
        recipe.grad_accum,
        recipe.epochs,
        recipe.max_steps,
    );
    let per_epoch = per_epoch.max(1);
    let (e, k) = (total / per_epoch, total % per_epoch);
    (
        e,
        (k * recipe.grad_accum * recipe.global_batch()).min(rows_in_epoch),
    )
}

/// Builds the plan of `recipe` for a model with config `model_cfg`, given the number of records
/// of each `[[data]]` source (e.g. from [`count_available`]).
pub fn build_plan(
    recipe: &SftRecipe,
    model_cfg: &Qwen25VlConfig,
    available_counts: &[usize],
) -> Result<SftPlan> {
    build_plan_with_lengths(recipe, model_cfg, available_counts, None)
}

/// [`build_plan`] knowing every record's length (`lengths[source][record]`): the plan then
/// also reports padding with and without packing, and with `packing` the steps count rows.
pub fn build_plan_with_lengths(
    recipe: &SftRecipe,
    model_cfg: &Qwen25VlConfig,
    available_counts: &[usize],
    lengths: Option<&[Vec<SampleLength>]>,
) -> Result<SftPlan> {
    recipe.validate()?;
    let counts = mix_counts(&recipe.data, available_counts)?;
    let total_samples: usize = counts.iter().sum();
    if total_samples == 0 {
        bail!("the data mix is empty: every [[data]] source contributes 0 records");
    }
    let sources = recipe
        .data
        .iter()
        .zip(available_counts.iter().zip(&counts))
        .map(|(d, (&available, &selected))| SourcePlan {
            name: d.display_name(),
            path: d.path.clone(),
            group: d.group.clone(),
            mix: d.mix(),
            available,
            selected,
        })
        .collect();
    let padding = lengths.map(|l| {
        padding_stats(recipe, &counts, available_counts, &|(s, r): SampleId| {
            l[s][r].tokens()
        })
    });
    // Rows per epoch: samples, or with packing the packed rows (which need the lengths).
    let rows = match (recipe.packing, &padding) {
        (false, _) => total_samples,
        (true, Some(p)) => p.packed_rows,
        (true, None) => {
            bail!("packing = true: the plan needs the records' lengths (the data files)")
        }
    };
    let (micro, per_epoch, total_steps, capped) = step_counts(
        rows,
        recipe.global_batch(),
        recipe.grad_accum,
        recipe.epochs,
        recipe.max_steps,
    );
    let params = param_counts(model_cfg);
    let trainable = params.trainable(&recipe.freeze);
    let frozen = params.frozen(&recipe.freeze);
    let max_pixels = recipe.max_pixels.unwrap_or(DEFAULT_MAX_PIXELS);
    let tr = trainable.total();
    let shape = ActivationShape {
        batch: recipe.per_device_batch,
        seq: recipe.cutoff_len,
        max_pixels,
        precision: recipe.precision,
        checkpointing: recipe.gradient_checkpointing,
        tiles: Tiles::default(),
    };
    let memory = memory_estimate(model_cfg, &recipe.freeze, recipe.grad_accum, &shape);
    Ok(SftPlan {
        model: recipe.model.clone(),
        backend: recipe.backend,
        precision: recipe.precision,
        gradient_checkpointing: recipe.gradient_checkpointing,
        sources,
        total_samples,
        per_device_batch: recipe.per_device_batch,
        grad_accum: recipe.grad_accum,
        world_size: recipe.parallel.world_size(),
        nodes: recipe.parallel.nodes,
        epochs: recipe.epochs,
        micro_batches_per_epoch: micro,
        steps_per_epoch: per_epoch,
        total_steps,
        capped_by_max_steps: capped,
        warmup_steps: warmup_steps(total_steps, recipe.schedule.warmup_ratio),
        base_lr: recipe.optimizer.lr,
        schedule: recipe.schedule,
        cutoff_len: recipe.cutoff_len,
        max_pixels,
        max_pixels_from_recipe: recipe.max_pixels.is_some(),
        freeze: recipe.freeze,
        params,
        trainable,
        frozen,
        trainable_params: tr,
        frozen_params: frozen.total(),
        memory,
        packing: recipe.packing,
        padding,
        disk: DiskPlan::new(
            tr + frozen.total(),
            tr,
            recipe.save_optimizer,
            recipe.precision.bytes(),
            total_steps,
            recipe.save_every,
            recipe.keep_checkpoints,
        ),
    })
}

/// `1234567` -> `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn short(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.3}B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.1}M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}K", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

impl fmt::Display for SftPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "SFT plan")?;
        writeln!(
            f,
            "  model      {}  (backend {}, precision {})",
            self.model, self.backend, self.precision
        )?;
        writeln!(f)?;
        let name_w = self
            .sources
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(0)
            .max(6);
        let group_w = self
            .sources
            .iter()
            .map(|s| s.group.len())
            .max()
            .unwrap_or(0)
            .max(5);
        writeln!(
            f,
            "  {:<name_w$}  {:<group_w$}  {:>12}  {:>12}  mix",
            "source", "group", "available", "per epoch"
        )?;
        for s in &self.sources {
            writeln!(
                f,
                "  {:<name_w$}  {:<group_w$}  {:>12}  {:>12}  {}{}",
                s.name,
                s.group,
                thousands(s.available as u64),
                thousands(s.selected as u64),
                s.mix,
                if s.selected > s.available {
                    "  (upsampled)"
                } else {
                    ""
                }
            )?;
        }
        for (g, n) in self.group_totals() {
            writeln!(
                f,
                "  {:<name_w$}  {:<group_w$}  {:>12}  {:>12}",
                "",
                g,
                "",
                thousands(n as u64)
            )?;
        }
        writeln!(
            f,
            "  {:<name_w$}  {:<group_w$}  {:>12}  {:>12}",
            "total",
            "",
            "",
            thousands(self.total_samples as u64)
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "  batch      {} per device x {} accumulation x {} rank(s) ({} node(s) x {} devices) = {} examples per optimizer step",
            self.per_device_batch,
            self.grad_accum,
            self.world_size,
            self.nodes,
            self.world_size / self.nodes.max(1),
            self.per_device_batch * self.grad_accum * self.world_size
        )?;
        if self.world_size > 1 {
            writeln!(
                f,
                "  per rank   {} examples per optimizer step ({} per micro-batch x {}), {} steps; every rank takes every step",
                self.per_device_batch * self.grad_accum,
                self.per_device_batch,
                self.grad_accum,
                thousands(self.total_steps as u64)
            )?;
        }
        writeln!(
            f,
            "  steps      {} per epoch (ceil({} / {}) micro-batches, / {} accumulation, rounded up) x {} epochs = {}{}",
            thousands(self.steps_per_epoch as u64),
            thousands(self.total_samples as u64),
            self.per_device_batch * self.world_size,
            self.grad_accum,
            self.epochs,
            thousands(self.total_steps as u64),
            if self.capped_by_max_steps { " (capped by max_steps)" } else { "" }
        )?;
        writeln!(
            f,
            "  lr         {} {:e}, warmup {} steps (ceil({} x {})), min lr ratio {}",
            self.schedule.kind,
            self.base_lr,
            thousands(self.warmup_steps as u64),
            self.total_steps,
            self.schedule.warmup_ratio,
            self.schedule.min_lr_ratio
        )?;
        writeln!(
            f,
            "  inputs     cutoff_len {} tokens, max_pixels {}{}",
            self.cutoff_len,
            thousands(self.max_pixels as u64),
            if self.max_pixels_from_recipe {
                ""
            } else {
                " (preprocessor default)"
            }
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "  {:<16}  {:>15}  {:>15}  {:>15}",
            "parameters", "total", "trainable", "frozen"
        )?;
        let p = self.params.parts();
        let rows = [
            (
                "vision tower",
                p.vision_tower,
                self.trainable.vision_tower,
                self.frozen.vision_tower,
            ),
            (
                "projector",
                p.projector,
                self.trainable.projector,
                self.frozen.projector,
            ),
            (
                "language model",
                p.language_model,
                self.trainable.language_model,
                self.frozen.language_model,
            ),
            (
                "total",
                p.total(),
                self.trainable_params,
                self.frozen_params,
            ),
        ];
        for (name, total, tr, fr) in rows {
            writeln!(
                f,
                "  {:<16}  {:>15}  {:>15}  {:>15}",
                name,
                thousands(total),
                thousands(tr),
                thousands(fr)
            )?;
        }
        writeln!(
            f,
            "  ({} total; lm_head {})",
            short(self.params.total()),
            if self.params.lm_head == 0 {
                "tied to embed_tokens, counted once"
            } else {
                "untied"
            }
        )?;
        writeln!(f)?;
        if let Some(p) = &self.padding {
            writeln!(
                f,
                "  padding    one sample per row: {:.1}% of {} slots' tokens are padding ({} micro-batches); packed: {:.1}% ({} rows, {} micro-batches){}",
                100.0 * p.padding,
                thousands(p.tokens as u64),
                thousands(p.batches as u64),
                100.0 * p.packed_padding,
                thousands(p.packed_rows as u64),
                thousands(p.packed_batches as u64),
                if self.packing { "  [packing on]" } else { "" }
            )?;
        }
        writeln!(f)?;
        let m = &self.memory;
        writeln!(
            f,
            "  memory (estimate, one device; activations at {} x {} tokens, gradient checkpointing {}, memory-efficient attention)",
            self.per_device_batch, self.cutoff_len, self.gradient_checkpointing
        )?;
        let rows = [
            ("master weights (f32)", m.master_weights),
            ("compute weights (bf16)", m.compute_weights),
            ("gradients (f32)", m.gradients),
            ("gradient accumulation", m.accumulation),
            ("AdamW moments (f32)", m.optimizer_state),
            ("AdamW step temporaries", m.optimizer_transient),
            ("activations", m.activations),
            ("attention working set", m.attention_working_set),
            ("logits (chunked head)", m.logits),
        ];
        for (name, bytes) in rows {
            if bytes > 0 || name.starts_with("activations") {
                writeln!(f, "    {name:<24} {:>12}", gib(bytes))?;
            }
        }
        writeln!(f, "    {:<24} {:>12}", "total", gib(m.total()))?;
        writeln!(
            f,
            "    (the reference attention would keep {} of scores instead of the working set)",
            gib(m.reference_attention)
        )?;
        writeln!(f, "  {}", self.disk)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_5_vl_3b_param_counts() {
        let p = param_counts(&Qwen25VlConfig::qwen2_5_vl_3b());
        assert_eq!(p.patch_embed, 1280 * 1176);
        assert_eq!(p.vision_blocks, 32 * 19_702_200);
        assert_eq!(p.projector, 36_708_608);
        assert_eq!(p.vision_total(), 668_684_288);
        assert_eq!(p.embed_tokens, 151_936 * 2048);
        assert_eq!(p.decoder_layers, 36 * 77_076_992);
        assert_eq!(p.lm_head, 0);
        assert_eq!(p.language_model(), 3_085_938_688);
        assert_eq!(p.total(), 3_754_622_976);
    }

    #[test]
    fn upsampling_and_subsets() {
        let s = selected_records(7, 3, 1, 0);
        assert_eq!(s.len(), 7);
        for r in 0..3 {
            assert!(s.iter().filter(|&&x| x == r).count() >= 2);
        }
        let s = selected_records(2, 10, 1, 0);
        assert_eq!(s.len(), 2);
        assert!(s[0] != s[1]);
        assert_eq!(selected_records(5, 0, 1, 0), Vec::<usize>::new());
    }

    #[test]
    fn step_rounding() {
        // 10 samples, batch 4 -> 3 micro-batches; accumulation 2 -> 2 steps per epoch.
        assert_eq!(step_counts(10, 4, 2, 3.0, None), (3, 2, 6, false));
        assert_eq!(step_counts(10, 4, 2, 2.5, None), (3, 2, 5, false));
        assert_eq!(step_counts(10, 4, 2, 3.0, Some(4)), (3, 2, 4, true));
        assert_eq!(step_counts(10, 4, 2, 3.0, Some(40)), (3, 2, 6, false));
    }
}
