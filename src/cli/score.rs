//! `infimed score`: per-token log-likelihood of the last assistant turn of sharegpt records.
//!
//! Targets are the label tokens of the last assistant turn as SFT trains them
//! (`content<|im_end|>\n`); each log-prob is `log_softmax(logits)` (temperature 1) at the
//! position before the token. One JSON object per input record, same order:
//! `{"index", "target_ids", "logprobs", "sum_logprob"}`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{check_precision, compute_model, dispatch, BackendArgs, BackendJob};
use crate::data::encode::{Encoded, TrainOn};
use crate::data::sharegpt::read_sharegpt;
use crate::inputs::Processor;
use crate::learn::batch::collate;
use crate::learn::logprobs::target_logprobs;
use crate::model::nn::to_vec;
use crate::model::ModelBackend;
use crate::model::Qwen25VL;

#[derive(clap::Args, Debug, Clone)]
pub struct ScoreArgs {
    /// HF model directory (config.json, safetensors, tokenizer, chat template, preprocessor config).
    #[arg(long)]
    pub model: PathBuf,
    /// sharegpt JSONL; relative image paths resolve against its directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSONL, one object per input record.
    #[arg(long)]
    pub out: PathBuf,
    /// Override the processor's max_pixels (InfiMed trains with 262144).
    #[arg(long)]
    pub max_pixels: Option<usize>,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The scores of one record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecordScore {
    pub index: usize,
    pub target_ids: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub sum_logprob: f64,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let backend = args.backend;
    let n = dispatch(backend, ScoreJob(args.clone()))?;
    eprintln!("scored {n} records -> {}", args.out.display());
    Ok(())
}

struct ScoreJob(ScoreArgs);

impl BackendJob for ScoreJob {
    type Output = usize;
    fn run<B: ModelBackend>(self, device: B::Device) -> Result<usize> {
        let args = self.0;
        let processor = Processor::from_dir(&args.model, args.max_pixels)?;
        let records = read_sharegpt(&args.data)?;
        check_precision::<B>(args.backend.precision, &device)?;
        let model = Qwen25VL::<B>::load(&args.model, &device)
            .with_context(|| format!("loading model from {}", args.model.display()))?;
        let model = compute_model(&model, args.backend.precision);
        let file = std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        let mut out = std::io::BufWriter::new(file);
        let bar = ProgressBar::new(records.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} records [{elapsed} < {eta}]")
                .expect("style"),
        );
        for (index, rec) in records.iter().enumerate() {
            let enc = processor.encode(rec, TrainOn::LastAssistant)?;
            let score = score_encoded(&model, &enc, index).with_context(|| rec.origin.clone())?;
            serde_json::to_writer(&mut out, &score)?;
            out.write_all(b"\n")?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        out.flush()?;
        Ok(records.len())
    }
}

/// Log-probs of the labelled tokens of one encoded sample.
pub fn score_encoded<B: ModelBackend>(
    model: &Qwen25VL<B>,
    enc: &Encoded,
    index: usize,
) -> Result<RecordScore> {
    // One sample: no padding, so the pad id is irrelevant.
    let (logp, target_ids) = target_logprobs(model, &collate(&[enc], 0))?;
    let logprobs: Vec<f64> = if target_ids.is_empty() {
        vec![]
    } else {
        to_vec(logp).iter().map(|&x| x as f64).collect()
    };
    let sum_logprob = logprobs.iter().sum();
    Ok(RecordScore {
        index,
        target_ids,
        logprobs,
        sum_logprob,
    })
}
