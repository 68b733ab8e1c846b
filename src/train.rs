//! What both learners (SFT and GRPO) share: stable parameter ids, freezing, AdamW with
//! PyTorch's semantics, global gradient-norm clipping as HF does it, atomic checkpoints with
//! exact resume, metrics JSONL and SVG plots.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;

use crate::model::{copy_aux_files, Qwen25VL, SaveDtype};
use crate::recipe::{FreezeConfig, OptimizerConfig};

/// Give every parameter an id from its position in the module tree, so optimizer state saved
/// by one process matches the parameters of the next (burn draws ids at random by default).
pub fn assign_stable_param_ids<B: Backend, M: Module<B>>(module: M) -> M {
    struct Ids(u64);
    impl<B: Backend> ModuleMapper<B> for Ids {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (_, tensor, mapper) = param.consume();
            self.0 += 1;
            Param::from_mapped_value(ParamId::from(self.0), tensor, mapper)
        }
    }
    module.map(&mut Ids(0))
}

/// Freeze parts of the model as LLaMA-Factory does for qwen2_5_vl: vision tower =
/// `visual.patch_embed` + `visual.blocks`; projector = `visual.merger`; language model =
/// `model.*` + `lm_head`. Frozen parameters get no gradient and no optimizer state.
pub fn apply_freeze<B: AutodiffBackend>(mut model: Qwen25VL<B>, freeze: &FreezeConfig) -> Qwen25VL<B> {
    if freeze.vision_tower {
        model.visual.patch_embed = model.visual.patch_embed.no_grad();
        model.visual.blocks = model.visual.blocks.into_iter().map(|b| b.no_grad()).collect();
    }
    if freeze.projector {
        model.visual.merger = model.visual.merger.no_grad();
    }
    if freeze.language_model {
        model.model = model.model.no_grad();
        model.lm_head = model.lm_head.map(|h| h.no_grad());
    }
    model
}

/// Trainable and frozen parameter counts of a model as it is.
pub fn count_params<B: Backend, M: Module<B>>(module: &M) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.shape().num_elements();
            if param.is_require_grad() {
                self.0 += n
            } else {
                self.1 += n
            }
        }
    }
    let mut c = Count(0, 0);
    module.visit(&mut c);
    (c.0, c.1)
}

/// AdamW with the recipe's values (burn's defaults, eps 1e-5 and weight decay 1e-4, differ
/// from PyTorch's; the update rule itself is PyTorch's decoupled one).
pub fn adamw(cfg: &OptimizerConfig) -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(cfg.betas[0] as f32)
        .with_beta_2(cfg.betas[1] as f32)
        .with_epsilon(cfg.eps as f32)
        .with_weight_decay(cfg.weight_decay as f32)
}

/// The optimizer type of the learners.
pub type Adam<B> = burn::optim::adaptor::OptimizerAdaptor<AdamW, Qwen25VL<B>, B>;

/// Clip the gradients to a global L2 norm as `torch.nn.utils.clip_grad_norm_` (HF Trainer):
/// `coef = max_norm / (norm + 1e-6)`, applied when `coef < 1`. Returns the norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SumSq<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        parts: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSq<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.parts.push(g.powi_scalar(2).sum());
            }
        }
    }
    let mut v = SumSq::<B> { grads, parts: vec![] };
    module.visit(&mut v);
    if v.parts.is_empty() {
        return 0.0;
    }
    let total: f64 = Tensor::cat(v.parts, 0).sum().into_scalar().elem::<f64>();
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            struct Scale<'a> {
                grads: &'a mut GradientsParams,
                coef: f64,
            }
            impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
                fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                    if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                        self.grads.register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.coef));
                    }
                }
            }
            module.visit(&mut Scale { grads, coef });
        }
    }
    norm
}

/// Where a learner is in its run: enough to continue exactly.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within its epoch.
    pub batch_in_epoch: usize,
    pub samples_seen: usize,
    pub tokens_seen: usize,
    /// Seed of the run (data order and sampling derive from it and the counters above).
    pub seed: u64,
    /// Learner-specific extras (e.g. the GRPO RNG position).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
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
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let hf = tmp.join("hf");
    model.valid().save(&hf, SaveDtype::F32, usize::MAX)?;
    copy_aux_files(aux_from, &hf)?;
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(optim.to_record(), tmp.join(OPTIMIZER_FILE))
        .map_err(|e| anyhow::anyhow!("writing optimizer state: {e:?}"))?;
    let pause_step = std::env::var("INFIMED_CHECKPOINT_PAUSE_STEP").ok().and_then(|v| v.parse::<usize>().ok());
    let pause_ms = std::env::var("INFIMED_CHECKPOINT_PAUSE_MS").ok().and_then(|v| v.parse::<u64>().ok());
    if let (Some(ms), true) = (pause_ms, pause_step.is_none_or(|s| s == state.step)) {
        // Test hook: widen the window in which a crash leaves an incomplete checkpoint.
        eprintln!("checkpoint {}: pausing {ms} ms before completing", state.step);
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    Ok(final_dir)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    if !output_dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(output_dir).with_context(|| format!("reading {}", output_dir.display()))? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else { continue };
        let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) else { continue };
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
pub fn load_checkpoint<B: AutodiffBackend>(dir: &Path, optim: Adam<B>, device: &B::Device) -> Result<(Adam<B>, TrainState)> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).with_context(|| format!("reading {}", dir.join(STATE_FILE).display()))?;
    let state: TrainState = serde_json::from_str(&text).with_context(|| format!("parsing {}", dir.join(STATE_FILE).display()))?;
    let record = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(dir.join(OPTIMIZER_FILE), device)
        .map_err(|e| anyhow::anyhow!("reading optimizer state of {}: {e:?}", dir.display()))?;
    Ok((optim.load_record(record), state))
}

/// Append-only metrics log (one JSON object per line).
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path`; on a fresh run it is truncated, on resume the lines past `keep_until_step`
    /// are dropped so the log continues without duplicates.
    pub fn open(path: &Path, keep_until_step: Option<usize>) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let kept: Vec<String> = match keep_until_step {
            Some(s) if path.exists() => std::fs::read_to_string(path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|x| x.as_u64()))
                        .is_some_and(|st| (st as usize) <= s)
                })
                .map(String::from)
                .collect(),
            _ => vec![],
        };
        let mut file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for l in kept {
            writeln!(file, "{l}")?;
        }
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(v)?)?;
        self.file.flush()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Write one SVG line plot per requested key of a metrics JSONL (x = step).
pub fn plot_metrics(metrics: &Path, keys: &[&str], out_dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let rows: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut written = vec![];
    for key in keys {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path = out_dir.join(format!("{}.svg", key.replace('/', "_")));
        std::fs::write(&path, svg_line_plot(key, &pts)).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A small self-contained SVG line chart with axes and min/max labels.
pub fn svg_line_plot(title: &str, pts: &[(f64, f64)]) -> String {
    let (w, h, m) = (640.0, 360.0, 50.0);
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let sx = |x: f64| m + (x - x0) / (x1 - x0).max(1e-12) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0).max(1e-12) * (h - 2.0 * m);
    let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{tx}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{m}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{yb}" stroke="black"/>
<text x="{m}" y="{lx}" text-anchor="middle">{x0}</text><text x="{xr}" y="{lx}" text-anchor="middle">{x1}</text>
<text x="{ly}" y="{yb}" text-anchor="end">{y0:.4}</text><text x="{ly}" y="{m}" text-anchor="end">{y1:.4}</text>
<text x="{tx}" y="{xl}" text-anchor="middle">step</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>
</svg>
"##,
        tx = w / 2.0,
        yb = h - m,
        xr = w - m,
        lx = h - m + 16.0,
        ly = m - 4.0,
        xl = h - 10.0,
        pts = path.join(" "),
    )
}

/// Stop on a non-finite loss, naming where it happened.
pub fn check_finite(loss: f64, step: usize, what: &str) -> Result<()> {
    if !loss.is_finite() {
        bail!("loss is {loss} at optimizer step {step} ({what}); stopping (try a lower lr or check the data)");
    }
    Ok(())
}
