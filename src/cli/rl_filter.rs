//! `infimed rl-filter --model M --data rl.jsonl --n 8 --keep 0.1..0.9 --out kept.jsonl [--recipe R]
//! [--seed S]`: pass-rate data selection for GRPO. Every prompt is sampled `n` times with the
//! rollout engine (as GRPO samples: the recipe's prompt template, temperature, top-p/k and
//! `max_response_len` when `--recipe` is given), each answer is scored with the recipe's rewards,
//! and the prompts whose pass rate lies in the `--keep` range (inclusive) are written to `--out`
//! with `"pass_rate"` and `"mean_reward"` added (other fields kept). `--rates F` also writes every
//! prompt's `{origin, task, pass_rate, mean_reward, kept}`. An answer passes when its format holds
//! and its accuracy is 1 (a correct choice, number or exact text; IoU 1 for grounding). Prompts
//! that the model always or never solves give a GRPO group no signal (all rewards equal).
//!
//! Sample `j` of prompt `i` draws from the seed `S`'s first random value + `i` (the engine's
//! per-sample RNG), so the same seed writes the same files, whatever `--batch-size`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use rand::Rng;
use serde_json::Value;

use crate::backend::{dispatch, BackendArgs, BackendJob};
use crate::engine::{generate_requests, EngineConfig, Request};
use crate::generate::{rng_from_seed, SamplingConfig};
use crate::grpo::data::{prompt_messages, read_rl_records, RlRecord};
use crate::grpo::GrpoRecipe;
use crate::learn::recipe::Recipe;
use crate::model::ModelBackend;
use crate::models::load_generator;
use crate::rewards::{self, RewardBreakdown, RewardConfig};

#[derive(clap::Args, Debug, Clone)]
pub struct RlFilterArgs {
    /// The policy to sample from: HF folder or `builtin:NAME`.
    #[arg(long)]
    pub model: String,
    /// EasyR1 JSONL prompts (`{"problem", "answer", "images"?, "task"?}`).
    #[arg(long)]
    pub data: PathBuf,
    /// Answers sampled per prompt.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Pass rates kept, `LOW..HIGH` (inclusive).
    #[arg(long, default_value = "0.1..0.9")]
    pub keep: String,
    /// The kept prompts (JSONL, with `pass_rate` and `mean_reward`).
    #[arg(long)]
    pub out: PathBuf,
    /// Every prompt's pass rate (JSONL).
    #[arg(long)]
    pub rates: Option<PathBuf>,
    /// A GRPO recipe: its rewards, prompt template, system prompt, sampling and
    /// max_response_len (defaults otherwise: think_boxed rewards, temperature 1).
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature (default: the recipe's, else 1).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// New tokens per answer at most (default: the recipe's max_response_len, else 512).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Rows decoded together at most.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long)]
    pub max_pixels: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// `LOW..HIGH` with `0 <= LOW <= HIGH <= 1`.
pub fn parse_keep(s: &str) -> Result<(f64, f64)> {
    let bad = || anyhow!("--keep must be LOW..HIGH with 0 <= LOW <= HIGH <= 1, got {s:?}");
    let (lo, hi) = s.split_once("..").ok_or_else(bad)?;
    let (lo, hi): (f64, f64) = (
        lo.trim().parse().map_err(|_| bad())?,
        hi.trim().parse().map_err(|_| bad())?,
    );
    ensure!((0.0..=hi).contains(&lo) && hi <= 1.0, bad());
    Ok((lo, hi))
}

/// Whether a scored answer passes: format holds and accuracy is 1.
fn passes(r: &RewardBreakdown) -> bool {
    r.format > 0.0 && r.accuracy >= 1.0
}

/// One prompt's result.
struct Rate {
    pass_rate: f64,
    mean_reward: f64,
    kept: bool,
}

pub fn run(args: RlFilterArgs) -> Result<()> {
    ensure!(args.n >= 1, "--n must be at least 1");
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    parse_keep(&args.keep)?;
    let backend = args.backend;
    dispatch(backend, RlFilterJob(args))
}

struct RlFilterJob(RlFilterArgs);

impl BackendJob for RlFilterJob {
    type Output = ();
    fn run<B: ModelBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let (lo, hi) = parse_keep(&args.keep)?;
        let recipe = args
            .recipe
            .as_ref()
            .map(|r| GrpoRecipe::from_file(r, &[]))
            .transpose()?;
        let (records, _) = read_rl_records(&args.data, false)?;
        ensure!(!records.is_empty(), "{}: no RL record", args.data.display());
        let (model, processor, stop) = load_generator::<B>(
            &args.model,
            args.seed,
            args.max_pixels,
            args.backend.precision,
            &device,
        )?;
        let sampling = sampling(&args, recipe.as_ref());
        sampling.validate()?;
        let rewards_cfg = recipe
            .as_ref()
            .map_or_else(RewardConfig::default, |r| r.reward.config());
        let (template, system) = match &recipe {
            Some(r) => (r.prompt_template.as_str(), r.system_prompt.as_deref()),
            None => ("{problem}", None),
        };
        let base: u64 = rng_from_seed(args.seed).random();
        let requests = records
            .iter()
            .enumerate()
            .map(|(i, rec)| {
                let prompt = processor
                    .prompt(&prompt_messages(template, system, rec), &rec.images)
                    .with_context(|| rec.origin.clone())?;
                Ok(Request {
                    prompt,
                    n: args.n,
                    seed: base.wrapping_add(i as u64),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let engine = EngineConfig::rows(args.batch_size);
        let (gens, _) = generate_requests(&model, &requests, &sampling, &stop, &engine, |_, _| {})?;
        let mut rates = Vec::with_capacity(records.len());
        for (rec, group) in records.iter().zip(&gens) {
            let mut scores = Vec::with_capacity(group.len());
            for g in group {
                let text = processor.tokenizer.decode(&g.tokens, true)?;
                scores.push(rewards::score(&rewards_cfg, &text, &rec.answer, rec.task));
            }
            let n = scores.len() as f64;
            let pass_rate = scores.iter().filter(|r| passes(r)).count() as f64 / n;
            rates.push(Rate {
                pass_rate,
                mean_reward: scores.iter().map(|r| r.reward).sum::<f64>() / n,
                kept: pass_rate >= lo && pass_rate <= hi,
            });
        }
        write_outputs(&args, &records, &rates)?;
        let tasks: Vec<String> = records
            .iter()
            .map(|r| {
                let task = r.task.unwrap_or_else(|| rewards::infer_task(&r.answer));
                task.as_str().to_string()
            })
            .collect();
        print!("{}", summary(&tasks, &rates, args.n));
        Ok(())
    }
}

/// The sampling of the rollouts: the recipe's, with the flags over it.
fn sampling(args: &RlFilterArgs, recipe: Option<&GrpoRecipe>) -> SamplingConfig {
    let mut cfg = recipe.map_or(
        SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 512,
        },
        GrpoRecipe::sampling,
    );
    cfg.temperature = args.temperature.unwrap_or(cfg.temperature);
    cfg.max_new_tokens = args.max_new_tokens.unwrap_or(cfg.max_new_tokens);
    cfg
}

/// The kept records (their input lines with the rates added) and, with `--rates`, every prompt's.
fn write_outputs(args: &RlFilterArgs, records: &[RlRecord], rates: &[Rate]) -> Result<()> {
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == records.len(),
        "{}: changed while read",
        args.data.display()
    );
    let create = |p: &Path| -> Result<std::io::BufWriter<std::fs::File>> {
        let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        Ok(std::io::BufWriter::new(f))
    };
    let mut out = create(&args.out)?;
    let mut all = args.rates.as_deref().map(create).transpose()?;
    for ((line, rec), rate) in lines.iter().zip(records).zip(rates) {
        if rate.kept {
            let mut v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}: malformed JSON", rec.origin))?;
            let obj = v
                .as_object_mut()
                .ok_or_else(|| anyhow!("{}: expected a JSON object", rec.origin))?;
            obj.insert("pass_rate".into(), rate.pass_rate.into());
            obj.insert("mean_reward".into(), rate.mean_reward.into());
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
        }
        if let Some(all) = &mut all {
            let task = rec.task.unwrap_or_else(|| rewards::infer_task(&rec.answer));
            let line = serde_json::json!({
                "origin": rec.origin, "task": task.as_str(), "pass_rate": rate.pass_rate,
                "mean_reward": rate.mean_reward, "kept": rate.kept,
            });
            writeln!(all, "{line}")?;
        }
    }
    out.flush()?;
    if let Some(mut all) = all {
        all.flush()?;
    }
    Ok(())
}

/// The summary: per task the prompts, mean pass rate and kept count, then the histogram of
/// pass rates (`k / n` correct answers).
fn summary(tasks: &[String], rates: &[Rate], n: usize) -> String {
    let mut by: BTreeMap<&str, (usize, f64, usize)> = BTreeMap::new();
    for (t, r) in tasks.iter().zip(rates) {
        let e = by.entry(t.as_str()).or_default();
        e.0 += 1;
        e.1 += r.pass_rate;
        e.2 += r.kept as usize;
    }
    let total = (
        rates.len(),
        rates.iter().map(|r| r.pass_rate).sum::<f64>(),
        { rates.iter().filter(|r| r.kept).count() },
    );
    let mut s = format!(
        "{:<10} {:>7} {:>10} {:>7}\n",
        "task", "prompts", "pass rate", "kept"
    );
    for (t, (count, sum, kept)) in by.iter().map(|(t, v)| (*t, *v)).chain([("all", total)]) {
        s.push_str(&format!(
            "{t:<10} {count:>7} {:>10.3} {kept:>7}\n",
            sum / count.max(1) as f64
        ));
    }
    s.push_str(&format!("\npass rate histogram ({n} answers per prompt)\n"));
    let mut hist = vec![0usize; n + 1];
    for r in rates {
        hist[(r.pass_rate * n as f64).round() as usize] += 1;
    }
    let widest = hist.iter().copied().max().unwrap_or(1).max(1);
    for (k, c) in hist.iter().enumerate() {
        let bar = "#".repeat((c * 40).div_ceil(widest));
        s.push_str(&format!(
            "{k:>3}/{n:<3} {:>5.3} {c:>6} {bar}\n",
            k as f64 / n as f64
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_ranges() {
        assert_eq!(parse_keep("0.1..0.9").unwrap(), (0.1, 0.9));
        assert_eq!(parse_keep("0..1").unwrap(), (0.0, 1.0));
        for bad in ["0.9..0.1", "0.1-0.9", "x..1", "0..1.5", "-0.1..0.5"] {
            let e = parse_keep(bad).unwrap_err().to_string();
            assert!(e.contains("--keep"), "{bad}: {e}");
        }
    }

    #[test]
    fn summary_counts_and_histogram() {
        let rate = |p: f64, kept| Rate {
            pass_rate: p,
            mean_reward: p,
            kept,
        };
        let rates = [
            rate(0.0, false),
            rate(0.5, true),
            rate(0.75, true),
            rate(1.0, false),
        ];
        let tasks = ["mcq", "mcq", "math", "math"].map(String::from);
        let s = summary(&tasks, &rates, 4);
        assert!(s.contains("mcq              2      0.250       1"), "{s}");
        assert!(s.contains("all              4      0.562       2"), "{s}");
        assert!(s.contains("  2/4   0.500      1 "), "{s}");
    }
}
