//! `infimed eval` (score responses against benchmark records) and `infimed bench-convert` (turn
//! the public benchmark files into benchmark records). See [`crate::eval`] for the formats.
//!
//! `infimed eval --responses R.jsonl --bench B1.jsonl [--bench B2.jsonl ...] --out DIR`:
//! * responses are `{"id", "response"}` lines matched to benchmark records by id;
//! * a benchmark record without a response counts as wrong (reported as missing, never dropped);
//! * a response whose id is in no benchmark file is ignored with a warning, and counted
//!   (`unmatched_responses` in summary.json) — not an error, so a responses file covering more
//!   benchmarks than the ones scored can be reused; when NO response matches, it is an error (almost
//!   always the wrong file);
//! * bad input (malformed JSON, unknown answer_type, MCQ without options, duplicate ids) is an error
//!   naming FILE:LINE, or with `--skip-invalid` a skipped line, counted and listed in the output;
//! * writes `DIR/results.jsonl`, `DIR/summary.json`, `DIR/summary.md` (and, with
//!   `--rules medevalkit`, `DIR/medevalkit.json` in MedEvalKit's layout);
//! * `--rules infimed|medevalkit` picks the scoring rules (see [`crate::eval`]); `--lang en|zh`
//!   scores only the records of that language;
//! * `--judge URL --judge-model NAME [--judge-key-env VAR]` also asks an OpenAI-compatible
//!   endpoint MedEvalKit's judge prompt for the free-text answers ([`crate::eval::judge`]; replies
//!   cached in `DIR/judge_cache.jsonl`); reports give rule-based and judged accuracy side by side.
//!
//! `infimed eval --model DIR --mode direct|reasoning --bench ... --out DIR` generates the responses
//! first: MedEvalKit's prompt for each record ([`crate::eval::build_prompt`]) after the record's
//! images, greedy decoding in length-grouped batches, then the same scoring. The responses are
//! also written to `DIR/responses.jsonl` (re-score them with `--responses`). A record whose prompt
//! cannot be built (missing or corrupt image) is an error naming it, or with `--skip-invalid` a
//! record without response: it counts as wrong and is listed, never dropped from the denominator.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{dispatch, BackendArgs, BackendJob};
use crate::data::template::{ChatMessage, ContentPart};
use crate::engine::generate_batched;
use crate::eval::judge::{self, JudgeConfig};
use crate::eval::medevalkit::judge_verdict;
use crate::eval::report::{summarize, EvalReport};
use crate::eval::{BenchRecord, Rules, Skipped};
use crate::generate::{rng_from_seed, stop_tokens, Prompt, SamplingConfig};
use crate::inputs::Processor;
use crate::model::ModelBackend;
use crate::models::model_files_dir;

use crate::eval::convert::{self, BenchFormat, ConvertOptions};
use crate::eval::{self, Mode};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Responses JSONL: one {"id", "response"} per line.
    #[arg(long)]
    pub responses: Option<PathBuf>,
    /// Benchmark JSONL file(s) (repeat the flag for several benchmarks).
    #[arg(long = "bench", required = true)]
    pub bench: Vec<PathBuf>,
    /// Output folder for results.jsonl, summary.json and summary.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Skip (and count) invalid lines instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Row label in summary.md (default: the responses file name, or "model").
    #[arg(long)]
    pub label: Option<String>,
    /// Scoring rules: infimed (the default; see the README) or medevalkit (MedEvalKit's judges,
    /// prompts and metrics layout, its bugs included, to compare with published numbers).
    #[arg(long, default_value = "infimed")]
    pub rules: Rules,
    /// Score only the records of this language (en or zh; default: all, e.g. SLAKE en + zh).
    #[arg(long)]
    pub lang: Option<String>,
    /// LLM judge for free-text answers: an OpenAI-compatible API base URL
    /// (e.g. http://localhost:8000/v1) or its .../chat/completions address.
    #[arg(long, requires = "judge_model")]
    pub judge: Option<String>,
    /// The judge's model name (sent as `model`).
    #[arg(long, requires = "judge")]
    pub judge_model: Option<String>,
    /// Environment variable holding the judge's API key (sent as a Bearer token).
    #[arg(long, requires = "judge")]
    pub judge_key_env: Option<String>,
    /// Judge requests in flight at most.
    #[arg(long, default_value_t = 8)]
    pub judge_concurrency: usize,
    /// Retries of a failed judge request (connection errors, timeouts, HTTP 429 / 5xx), with
    /// exponential backoff from 1 s.
    #[arg(long, default_value_t = 4)]
    pub judge_retries: u32,
    /// Generate the responses with this model first: an HF model folder, or `builtin:NAME`
    /// (seeded random weights, with --seed).
    #[arg(long, conflicts_with = "responses")]
    pub model: Option<String>,
    /// Prompt mode for --model: direct or reasoning.
    #[arg(long, default_value = "direct")]
    pub mode: Mode,
    /// --model: most new tokens per response.
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// --model: prompts per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// --model: seed of `builtin:` weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// --model: override the processor's max_pixels.
    #[arg(long)]
    pub max_pixels: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if let Some(l) = &args.lang {
        ensure!(l == "en" || l == "zh", "--lang must be en or zh, got {l:?}");
    }
    if args.model.is_some() {
        let backend = args.backend;
        return dispatch(backend, ModelEvalJob(args));
    }
    let Some(responses_path) = args.responses.as_ref() else {
        bail!("give --responses R.jsonl (responses produced elsewhere) or --model DIR (generate them)");
    };
    let (all, mut skipped) = eval::read_bench_files(&args.bench, args.skip_invalid)?;
    let ids: std::collections::HashSet<String> = all.iter().map(|r| r.id.clone()).collect();
    let records = keep_lang(all, args.lang.as_deref())?;
    let (responses, skipped_resp) = eval::read_responses(responses_path, args.skip_invalid)?;
    skipped.extend(skipped_resp);
    let mut report = eval::score_responses(&records, &responses, args.rules);
    // responses of the records --lang leaves out are not "unmatched"
    report.unmatched_responses.retain(|id| !ids.contains(id));
    if !responses.is_empty() && responses.keys().all(|id| !ids.contains(id)) {
        bail!(
            "none of the {} responses in {} matches a benchmark record id (wrong file?)",
            responses.len(),
            responses_path.display()
        );
    }
    let report = judge_report(&args, report)?;
    finish(
        &args,
        report,
        responses_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned()),
        skipped,
    )
}

/// The records of `lang` (all when `None`); an error when none is left.
fn keep_lang(records: Vec<BenchRecord>, lang: Option<&str>) -> Result<Vec<BenchRecord>> {
    ensure!(!records.is_empty(), "the benchmark file(s) hold no record");
    let n = records.len();
    let kept: Vec<BenchRecord> = records
        .into_iter()
        .filter(|r| lang.is_none_or(|l| r.lang() == l))
        .collect();
    ensure!(
        !kept.is_empty(),
        "none of the {n} benchmark records is in language {:?}",
        lang.unwrap_or_default()
    );
    Ok(kept)
}

/// With `--judge`: ask the judge about every record that has a judge prompt, apply its verdicts
/// and summarise with rule-based and judged figures side by side.
fn judge_report(args: &EvalArgs, report: EvalReport) -> Result<EvalReport> {
    let (Some(url), Some(model)) = (&args.judge, &args.judge_model) else {
        return Ok(report);
    };
    let api_key = match &args.judge_key_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!("--judge-key-env {var}: the environment variable {var} is not set")
        })?),
        None => None,
    };
    let cfg = JudgeConfig {
        url: url.clone(),
        model: model.clone(),
        api_key,
        concurrency: args.judge_concurrency,
        retries: args.judge_retries,
        backoff: std::time::Duration::from_secs(1),
        timeout: std::time::Duration::from_secs(180),
        cache: args.out.join("judge_cache.jsonl"),
    };
    let EvalReport {
        mut results,
        unmatched_responses,
        ..
    } = report;
    let asked: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].judge_prompt.is_some())
        .collect();
    let prompts: Vec<String> = asked
        .iter()
        .filter_map(|&i| results[i].judge_prompt.clone())
        .collect();
    let (replies, stats) = judge::ask_all(&cfg, &prompts)?;
    eprintln!(
        "judge {model} at {}: {} record(s) judged, {} prompt(s) asked, {} from {}",
        judge::endpoint(url),
        prompts.len(),
        stats.asked,
        stats.cached,
        cfg.cache.display()
    );
    for (i, reply) in asked.into_iter().zip(replies) {
        results[i].judge = Some(judge_verdict(Some(&reply)));
    }
    let mut judged = summarize(results, args.rules, Some(model.clone()));
    judged.unmatched_responses = unmatched_responses;
    Ok(judged)
}

/// Label, warnings, the report files and the printed table.
fn finish(
    args: &EvalArgs,
    mut report: EvalReport,
    default_label: Option<String>,
    skipped: Vec<Skipped>,
) -> Result<()> {
    report.label = args
        .label
        .clone()
        .or(default_label)
        .unwrap_or_else(|| "model".into());
    report.skipped = skipped;
    for s in &report.skipped {
        tracing::warn!("skipped {s}");
    }
    if !report.unmatched_responses.is_empty() {
        let shown: Vec<&str> = report
            .unmatched_responses
            .iter()
            .take(5)
            .map(String::as_str)
            .collect();
        tracing::warn!(
            "{} response id(s) match no benchmark record and were ignored (e.g. {})",
            report.unmatched_responses.len(),
            shown.join(", ")
        );
    }
    if report.missing_responses > 0 {
        tracing::warn!(
            "{} benchmark record(s) have no response and count as wrong",
            report.missing_responses
        );
    }
    eval::write_report(&args.out, &report)?;
    print!("{}", report.summary_markdown());
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The chat messages of a benchmark record: one user turn, its images first, then the prompt
/// ([`eval::build_prompt_with`]). Under `--rules medevalkit` the images are sent as MedEvalKit's
/// Qwen2.5-VL wrapper sends them: MMMU only its first image; a record with several images (as
/// MedXpertQA's) each after a text part `"<image_{i}>: "`.
pub fn bench_messages(record: &BenchRecord, mode: Mode, rules: Rules) -> Vec<ChatMessage> {
    let mut parts = Vec::new();
    let n = bench_image_count(record, rules);
    for i in 0..n {
        if rules == Rules::Medevalkit && record.images.len() > 1 {
            parts.push(ContentPart::Text(format!("<image_{}>: ", i + 1)));
        }
        parts.push(ContentPart::Image);
    }
    parts.push(ContentPart::Text(eval::build_prompt_with(
        record, mode, rules,
    )));
    vec![ChatMessage::new("user", parts)]
}

/// How many of a record's images are sent (all; MMMU's first only under `--rules medevalkit`).
fn bench_image_count(record: &BenchRecord, rules: Rules) -> usize {
    let mmmu = eval::kit::Kit::of(&record.benchmark) == eval::kit::Kit::Mmmu;
    if rules == Rules::Medevalkit && mmmu {
        record.images.len().min(1)
    } else {
        record.images.len()
    }
}

/// Image paths of a record (those [`bench_messages`] sends), relative ones resolved against its
/// benchmark file's folder.
pub fn bench_images(record: &BenchRecord, base: &Path, rules: Rules) -> Vec<PathBuf> {
    record
        .images
        .iter()
        .take(bench_image_count(record, rules))
        .map(|i| {
            let p = PathBuf::from(i);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        })
        .collect()
}

struct ModelEvalJob(EvalArgs);

impl BackendJob for ModelEvalJob {
    type Output = ();
    fn run<B: ModelBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let model_name = args.model.clone().expect("checked in run");
        let files = model_files_dir(&model_name)?;
        let processor = Processor::from_dir(&files, args.max_pixels)?;
        // Benchmark files one by one: relative image paths resolve against each file's folder.
        let mut seen = HashMap::new();
        let mut records: Vec<BenchRecord> = vec![];
        let mut skipped: Vec<Skipped> = vec![];
        let mut prompts: Vec<Prompt> = vec![];
        let mut prompt_of: Vec<usize> = vec![]; // prompt index -> record index
        for path in &args.bench {
            let (recs, skip) = eval::read_bench_file(path, args.skip_invalid, &mut seen)?;
            skipped.extend(skip);
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let lang = args.lang.as_deref();
            for rec in recs
                .into_iter()
                .filter(|r| lang.is_none_or(|l| r.lang() == l))
            {
                let msgs = bench_messages(&rec, args.mode, args.rules);
                match processor.prompt(&msgs, &bench_images(&rec, &base, args.rules)) {
                    Ok(p) => {
                        prompts.push(p);
                        prompt_of.push(records.len());
                    }
                    Err(e) if args.skip_invalid => {
                        skipped.push(Skipped {
                            location: format!("{} id {}", path.display(), rec.id),
                            reason: format!("{e:#} (counted as wrong)"),
                        });
                    }
                    Err(e) => bail!(
                        "{} id {}: {e:#} (--skip-invalid counts it as wrong instead)",
                        path.display(),
                        rec.id
                    ),
                }
                records.push(rec);
            }
        }
        ensure!(!records.is_empty(), "the benchmark file(s) hold no record");
        let model = crate::models::load_inference_model::<B>(
            &model_name,
            args.seed,
            args.backend.precision,
            &device,
        )?;
        let stop = stop_tokens(&files, &model.config.tokens.eos_token_ids)?;
        let cfg = SamplingConfig::greedy(args.max_new_tokens);
        let bar = ProgressBar::new(records.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} records, {msg} [{elapsed} < {eta}]")
                .expect("style"),
        );
        bar.inc((records.len() - prompts.len()) as u64);
        let (mut done, mut correct) = (0usize, 0usize);
        let start = std::time::Instant::now();
        let mut new_tokens = 0usize;
        // Decoded once, as each batch finishes (for the running accuracy and the results).
        let mut texts: Vec<Option<Result<String>>> = (0..prompts.len()).map(|_| None).collect();
        let gens = generate_batched(
            &model,
            &prompts,
            &cfg,
            &stop,
            &mut rng_from_seed(0),
            args.batch_size,
            |idx, gens| {
                for (&i, g) in idx.iter().zip(gens) {
                    let text = processor.tokenizer.decode(&g.tokens, true);
                    if let Ok(t) = &text {
                        correct +=
                            args.rules.score(&records[prompt_of[i]], Some(t)).correct as usize;
                    }
                    texts[i] = Some(text);
                    new_tokens += g.tokens.len();
                }
                done += idx.len();
                bar.inc(idx.len() as u64);
                bar.set_message(format!(
                    "accuracy {:.1}%, {:.0} tokens/s",
                    100.0 * correct as f64 / done.max(1) as f64,
                    new_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
                ));
            },
        )?;
        bar.finish_and_clear();
        let mut responses = HashMap::new();
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        let resp_path = args.out.join("responses.jsonl");
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&resp_path)
                .with_context(|| format!("creating {}", resp_path.display()))?,
        );
        for ((g, &r), text) in gens.iter().zip(&prompt_of).zip(texts) {
            let text = text.expect("every prompt generated")?;
            let line = serde_json::json!({"id": records[r].id, "response": text, "num_tokens": g.tokens.len(), "stopped": g.stopped});
            serde_json::to_writer(&mut w, &line)?;
            w.write_all(b"\n")?;
            responses.insert(records[r].id.clone(), text);
        }
        w.flush()?;
        eprintln!(
            "generated {} responses ({new_tokens} tokens, {:.1} tokens/s, {} mode) -> {}",
            gens.len(),
            new_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9),
            args.mode.as_str(),
            resp_path.display()
        );
        let report = eval::score_responses(&records, &responses, args.rules);
        let report = judge_report(&args, report)?;
        let label = format!("{model_name} ({})", args.mode.as_str());
        finish(&args, report, Some(label), skipped)
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchConvertArgs {
    /// Benchmark: mmmu, vqa-rad, slake, pathvqa, pmc-vqa, omnimedvqa or medxpertqa.
    #[arg(long)]
    pub format: BenchFormat,
    /// The benchmark's public file or folder (see `infimed::eval::convert` for the layouts).
    #[arg(long)]
    pub input: PathBuf,
    /// Output benchmark JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// SLAKE: keep only the questions of this language, en or zh (default: both, as MedEvalKit
    /// scores all 2,094 test questions).
    #[arg(long)]
    pub lang: Option<String>,
    /// Split: VQA-RAD OSF file test|train|all (default test); PathVQA pickle folder test|val|train
    /// (default test); MMMU id prefix (default validation).
    #[arg(long)]
    pub split: Option<String>,
    /// Skip (and count) records that cannot be converted instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Where images embedded in parquet files are written (default: `<out stem>-images/` next
    /// to the output file).
    #[arg(long)]
    pub media_dir: Option<PathBuf>,
}

pub fn run_convert(args: BenchConvertArgs) -> Result<()> {
    if let Some(l) = &args.lang {
        ensure!(l == "en" || l == "zh", "--lang must be en or zh, got {l:?}");
    }
    let media_dir = args.media_dir.clone().unwrap_or_else(|| {
        let stem = args
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bench".into());
        args.out.with_file_name(format!("{stem}-images"))
    });
    let media_dir = if media_dir.is_absolute() {
        media_dir
    } else {
        std::env::current_dir()?.join(media_dir)
    };
    let opts = ConvertOptions {
        lang: args.lang.clone(),
        split: args.split.clone(),
        skip_invalid: args.skip_invalid,
        media_dir: Some(media_dir),
    };
    let conv = convert::convert(args.format, &args.input, &opts)?;
    ensure!(
        !conv.records.is_empty(),
        "no record converted from {}",
        args.input.display()
    );
    convert::write_records(&args.out, &conv.records)?;
    for s in &conv.skipped {
        tracing::warn!("skipped {s}");
    }
    let counts: Vec<String> = conv
        .counts()
        .iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    println!(
        "{}: {} records ({}); {} filtered out (language/split/subject); {} skipped as invalid -> {}",
        args.format.benchmark(),
        conv.records.len(),
        counts.join(", "),
        conv.filtered,
        conv.skipped.len(),
        args.out.display()
    );
    Ok(())
}
