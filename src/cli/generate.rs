//! `infimed generate`: batched generation with the KV cache (greedy or sampled, seeded).
//!
//! * One prompt from flags: `--prompt TEXT [--image PATH ...] [--system TEXT]`; the response goes
//!   to stdout. Images go where the text has `<image>` tags, or before the text when it has none.
//! * A sharegpt JSONL: `--data F --out F`. Each record's prompt is every message before its last
//!   assistant turn (all messages when the record ends with a user turn). Output: one line per
//!   record and sample, `{"index", "sample", "origin", "response", "num_tokens", "stopped"}`, in
//!   input order.
//!
//! Sampling: `--temperature 0` (default) is greedy; otherwise temperature, `--top-k`, `--top-p`,
//! seeded by `--seed` (same seed and batch size -> same tokens). Stop tokens come from the model's
//! `generation_config.json` and `config.json`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{dispatch, BackendArgs, BackendJob};
use crate::data::sharegpt::{read_sharegpt, split_image_tags, IMAGE_TAG};
use crate::data::template::{ChatMessage, ContentPart};
use crate::engine::generate_batched;
use crate::generate::{rng_from_seed, Prompt, SamplingConfig};
use crate::model::ModelBackend;
use crate::models::load_generator;

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// HF model directory, or `builtin:NAME` (seeded random weights, with --seed).
    #[arg(long)]
    pub model: String,
    /// One prompt (the user message); `<image>` tags mark where the images go.
    #[arg(long, conflicts_with = "data")]
    pub prompt: Option<String>,
    /// Image file(s) for --prompt, in order.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// System message for --prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// sharegpt JSONL of prompts (relative image paths resolve against its folder).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output JSONL for --data.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (and of `builtin:` weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Override the processor's max_pixels.
    #[arg(long)]
    pub max_pixels: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

impl GenerateArgs {
    pub fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

/// One generated answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GeneratedRecord {
    pub index: usize,
    pub sample: usize,
    pub origin: String,
    pub response: String,
    /// The new token ids (the stop token included when one ended the answer).
    pub tokens: Vec<u32>,
    pub num_tokens: usize,
    pub stopped: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    ensure!(args.n >= 1, "--n must be at least 1");
    args.sampling().validate()?;
    match (&args.prompt, &args.data) {
        (Some(_), _) => {}
        (None, Some(_)) => ensure!(args.out.is_some(), "--data needs --out"),
        (None, None) => {
            bail!("give --prompt TEXT (with --image PATH ...) or --data F.jsonl --out F.jsonl")
        }
    }
    let backend = args.backend;
    dispatch(backend, GenerateJob(args))
}

/// The user message of `--prompt`: images at the `<image>` tags, or all before the text.
pub fn flag_messages(
    text: &str,
    n_images: usize,
    system: Option<&str>,
) -> Result<Vec<ChatMessage>> {
    let tags = text.matches(IMAGE_TAG).count();
    let parts = if tags == 0 {
        let mut p = vec![ContentPart::Image; n_images];
        p.push(ContentPart::Text(text.to_string()));
        p
    } else {
        ensure!(
            tags == n_images,
            "the prompt has {tags} <image> tags but {n_images} --image files were given"
        );
        split_image_tags(text)
    };
    let mut msgs = vec![];
    if let Some(s) = system {
        msgs.push(ChatMessage::text("system", s));
    }
    msgs.push(ChatMessage::new("user", parts));
    Ok(msgs)
}

struct GenerateJob(GenerateArgs);

impl BackendJob for GenerateJob {
    type Output = ();
    fn run<B: ModelBackend>(self, device: B::Device) -> Result<()> {
        let args = self.0;
        let (model, processor, stop) = load_generator::<B>(
            &args.model,
            args.seed,
            args.max_pixels,
            args.backend.precision,
            &device,
        )?;
        let cfg = args.sampling();
        let mut rng = rng_from_seed(args.seed);

        if let Some(text) = &args.prompt {
            for img in &args.images {
                ensure!(img.exists(), "image {} does not exist", img.display());
            }
            let msgs = flag_messages(text, args.images.len(), args.system.as_deref())?;
            let prompt = processor.prompt(&msgs, &args.images)?;
            let prompts = vec![prompt; args.n];
            let gens = generate_batched(
                &model,
                &prompts,
                &cfg,
                &stop,
                &mut rng,
                args.batch_size,
                |_, _| {},
            )?;
            for (k, g) in gens.iter().enumerate() {
                if args.n > 1 {
                    println!("--- sample {k}");
                }
                println!("{}", processor.tokenizer.decode(&g.tokens, true)?);
            }
            return Ok(());
        }

        let data = args.data.as_ref().expect("checked in run");
        let out_path = args.out.as_ref().expect("checked in run");
        let records = read_sharegpt(data)?;
        ensure!(!records.is_empty(), "{} holds no record", data.display());
        let mut prompts: Vec<Prompt> = Vec::with_capacity(records.len() * args.n);
        let mut keys: Vec<(usize, usize)> = vec![];
        for (i, rec) in records.iter().enumerate() {
            let p = processor.conversation_prompt(rec)?;
            for k in 0..args.n {
                prompts.push(p.clone());
                keys.push((i, k));
            }
        }
        let bar = ProgressBar::new(prompts.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} answers, {msg} [{elapsed} < {eta}]")
                .expect("style"),
        );
        let start = std::time::Instant::now();
        let mut new_tokens = 0usize;
        let gens = generate_batched(
            &model,
            &prompts,
            &cfg,
            &stop,
            &mut rng,
            args.batch_size,
            |idx, gens| {
                new_tokens += gens.iter().map(|g| g.tokens.len()).sum::<usize>();
                bar.inc(idx.len() as u64);
                bar.set_message(format!(
                    "{:.1} tokens/s",
                    new_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
                ));
            },
        )?;
        bar.finish_and_clear();
        let file = std::fs::File::create(out_path)
            .with_context(|| format!("creating {}", out_path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        for (g, &(index, sample)) in gens.iter().zip(&keys) {
            let rec = GeneratedRecord {
                index,
                sample,
                origin: records[index].origin.clone(),
                response: processor.tokenizer.decode(&g.tokens, true)?,
                tokens: g.tokens.clone(),
                num_tokens: g.tokens.len(),
                stopped: g.stopped,
            };
            serde_json::to_writer(&mut out, &rec)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "generated {} answers ({} tokens, {:.1} tokens/s) -> {}",
            gens.len(),
            new_tokens,
            new_tokens as f64 / secs.max(1e-9),
            out_path.display()
        );
        Ok(())
    }
}
