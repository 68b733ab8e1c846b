//! `infimed synth-reflective`: reflective-pattern-injected CoT synthesis (see [`crate::synth`]).
//!
//! `infimed synth-reflective --candidates C.jsonl --out SFT.jsonl [--seed S] [--min-accuracy A]
//! [--skip-invalid]` applies the paper's rules to questions whose candidates are already
//! generated (and optionally judged).
//!
//! `--generate-with DIR --n 10 --temperature T` first samples `n` candidates per question with a
//! local model (the question's prompt turns, its images; records need no `candidates` then), and
//! `--judge-model DIR` asks a local model the paper's judge prompt for every correct candidate
//! without a score and parses its `{'score': n, ...}` reply (an unparsable reply is counted and the
//! candidate stays unscored). The questions with their generated / judged candidates are written to
//! `OUT.candidates.jsonl` (re-run the rules on it without the models), then the rules apply.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::backend::{dispatch, BackendArgs, BackendJob, Precision};
use crate::data::sharegpt::parse_record;
use crate::data::template::ChatMessage;
use crate::engine::generate_batched;
use crate::eval::for_each_jsonl;
use crate::generate::{rng_from_seed, Prompt, SamplingConfig};
use crate::inputs::Processor;
use crate::model::ModelBackend;
use crate::model::Qwen25VL;
use crate::models::load_generator;
use crate::synth::{
    self, candidate_correct, judge_prompt, parse_judge_reply, SynthConfig, SynthItem,
};

#[derive(Args, Debug, Clone)]
pub struct SynthArgs {
    /// Input JSONL: {"id", "messages" | "question" + "images", "answer", "task"?, "candidates": [{"text", "correct"?, "score"?}]}.
    #[arg(long)]
    pub candidates: PathBuf,
    /// Output sharegpt JSONL (SFT records with "rule": best | reflective).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the tie-breaks and of the choice of the incorrect answer.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A candidate without "correct" is correct when its task accuracy is >= this (1.0: exact).
    #[arg(long, default_value_t = 1.0)]
    pub min_accuracy: f64,
    /// Skip (and count) invalid input lines instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Score the correct candidates that have no score with this judge model (HF folder).
    #[arg(long)]
    pub judge_model: Option<PathBuf>,
    /// Generate the candidates with this model (HF folder) first.
    #[arg(long)]
    pub generate_with: Option<PathBuf>,
    /// Candidates per question for --generate-with.
    #[arg(long, default_value_t = 10)]
    pub n: usize,
    /// Sampling temperature for --generate-with.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Most new tokens per generated candidate.
    #[arg(long, default_value_t = 2048)]
    pub max_new_tokens: usize,
    /// Most new tokens per judge reply.
    #[arg(long, default_value_t = 256)]
    pub judge_max_new_tokens: usize,
    /// Sequences generated together.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[command(flatten)]
    pub backend: BackendArgs,
}

pub fn run(args: SynthArgs) -> Result<()> {
    let mut args = args;
    if args.generate_with.is_some() || args.judge_model.is_some() {
        ensure!(args.n >= 1, "--n must be at least 1");
        let prepared = args.out.with_extension("candidates.jsonl");
        let backend = args.backend;
        dispatch(
            backend,
            PrepareJob {
                args: args.clone(),
                out: prepared.clone(),
            },
        )?;
        args.candidates = prepared;
    }
    ensure!(
        args.min_accuracy.is_finite() && (0.0..=1.0).contains(&args.min_accuracy),
        "--min-accuracy must be in [0, 1]"
    );
    let cfg = SynthConfig {
        seed: args.seed,
        min_accuracy: args.min_accuracy,
    };
    let s = synth::synthesize_file(&args.candidates, &args.out, &cfg, args.skip_invalid)?;
    for sk in &s.skipped {
        tracing::warn!("skipped {sk}");
    }
    let best = s.rules.get("best").copied().unwrap_or(0);
    let reflective = s.rules.get("reflective").copied().unwrap_or(0);
    println!(
        "{} questions: best {best} (of which {} had 1-5 correct but no incorrect candidate), reflective {reflective}, \
         no correct candidate (dropped) {}; {} correct candidate(s) without a score (taken as 0); {} invalid line(s) skipped -> {}",
        s.questions,
        s.best_no_incorrect,
        s.dropped_no_correct,
        s.unscored_correct_candidates,
        s.skipped.len(),
        args.out.display()
    );
    Ok(())
}

/// Generate and/or judge candidates, writing the augmented question records to `out`.
struct PrepareJob {
    args: SynthArgs,
    out: PathBuf,
}

/// A generator or judge model from an HF folder.
fn load<B: ModelBackend>(
    dir: &Path,
    precision: Precision,
    device: &B::Device,
) -> Result<(Qwen25VL<B>, Processor, Vec<u32>)> {
    load_generator::<B>(&dir.to_string_lossy(), 0, None, precision, device)
}

impl BackendJob for PrepareJob {
    type Output = ();
    fn run<B: ModelBackend>(self, device: B::Device) -> Result<()> {
        let args = self.args;
        let base = args
            .candidates
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut records: Vec<(Value, String)> = vec![];
        let mut skipped = vec![];
        for_each_jsonl(
            &args.candidates,
            args.skip_invalid,
            &mut skipped,
            |mut v, loc| {
                let o = v
                    .as_object_mut()
                    .ok_or_else(|| anyhow::anyhow!("a record must be a JSON object"))?;
                if args.generate_with.is_some() || !o.contains_key("candidates") {
                    o.insert("candidates".into(), json!([]));
                }
                SynthItem::from_value(&v)?; // validate early, with FILE:LINE
                records.push((v, loc.to_string()));
                Ok(())
            },
        )?;
        for s in &skipped {
            tracing::warn!("skipped {s}");
        }
        let mut cache: HashMap<PathBuf, (Qwen25VL<B>, Processor, Vec<u32>)> = HashMap::new();

        if let Some(dir) = &args.generate_with {
            let (model, processor, stop) = load::<B>(dir, args.backend.precision, &device)?;
            let mut prompts: Vec<Prompt> = vec![];
            for (v, loc) in &records {
                let item = SynthItem::from_value(v)?;
                let conv = parse_record(
                    &json!({"messages": item.messages, "images": item.images}),
                    &base,
                    loc,
                )?;
                let p = processor.conversation_prompt(&conv)?;
                prompts.extend(std::iter::repeat_n(p, args.n));
            }
            let cfg = SamplingConfig {
                temperature: args.temperature as f32,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: args.max_new_tokens,
            };
            cfg.validate()?;
            let gens = generate_batched(
                &model,
                &prompts,
                &cfg,
                &stop,
                &mut rng_from_seed(args.seed),
                args.batch_size,
                |_, _| {},
            )?;
            for (k, (v, _)) in records.iter_mut().enumerate() {
                let cands: Vec<Value> = gens[k * args.n..(k + 1) * args.n]
                    .iter()
                    .map(|g| {
                        processor
                            .tokenizer
                            .decode(&g.tokens, true)
                            .map(|t| json!({"text": t}))
                    })
                    .collect::<Result<_>>()?;
                v["candidates"] = Value::Array(cands);
            }
            eprintln!(
                "generated {} candidates for {} questions with {}",
                gens.len(),
                records.len(),
                dir.display()
            );
            cache.insert(dir.clone(), (model, processor, stop));
        }

        if let Some(dir) = &args.judge_model {
            if !cache.contains_key(dir) {
                let loaded = load::<B>(dir, args.backend.precision, &device)?;
                cache.insert(dir.clone(), loaded);
            }
            let (model, processor, stop) = &cache[dir];
            // (record, candidate) of every correct candidate without a score.
            let mut slots = vec![];
            let mut prompts = vec![];
            for (r, (v, _)) in records.iter().enumerate() {
                let item = SynthItem::from_value(v)?;
                for (c, cand) in item.candidates.iter().enumerate() {
                    if cand.score.is_none() && candidate_correct(&item, cand, args.min_accuracy) {
                        let msgs = vec![ChatMessage::text(
                            "user",
                            judge_prompt(&item.question, &cand.text),
                        )];
                        prompts.push(processor.prompt(&msgs, &[])?);
                        slots.push((r, c));
                    }
                }
            }
            let cfg = SamplingConfig::greedy(args.judge_max_new_tokens);
            let gens = generate_batched(
                model,
                &prompts,
                &cfg,
                stop,
                &mut rng_from_seed(0),
                args.batch_size,
                |_, _| {},
            )?;
            let mut unparsable = 0;
            for (g, &(r, c)) in gens.iter().zip(&slots) {
                let reply = processor.tokenizer.decode(&g.tokens, true)?;
                match parse_judge_reply(&reply) {
                    Some(score) => records[r].0["candidates"][c]["score"] = json!(score),
                    None => {
                        unparsable += 1;
                        records[r].0["candidates"][c]["judge_reply"] = json!(reply);
                    }
                }
            }
            eprintln!(
                "judged {} correct candidates with {}: {} scored, {unparsable} unparsable replies (left unscored)",
                slots.len(),
                dir.display(),
                slots.len() - unparsable
            );
        }

        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&self.out)
                .with_context(|| format!("creating {}", self.out.display()))?,
        );
        for (v, _) in &records {
            serde_json::to_writer(&mut w, v)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        eprintln!("questions with their candidates -> {}", self.out.display());
        Ok(())
    }
}
