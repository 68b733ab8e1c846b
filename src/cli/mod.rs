//! The `infimed` command line: one subcommand per job, each in its own module.

use clap::{Parser, Subcommand};

pub mod demo;
pub mod eval;
pub mod generate;
pub mod reward;
pub mod rl_filter;
pub mod score;
pub mod synth;

#[derive(Parser, Debug)]
#[command(
    name = "infimed",
    version,
    about = "InfiMed: SFT + GRPO for Qwen2.5-VL medical MLLMs, on Burn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Log-likelihood of the last assistant turn of each sharegpt record.
    Score(score::ScoreArgs),
    /// Supervised fine-tuning from a TOML recipe (`--dry-run` prints the plan).
    Sft(crate::learn::trainer::TrainArgs),
    /// Generate answers (greedy or sampled) for one prompt or a sharegpt JSONL.
    Generate(generate::GenerateArgs),
    /// GRPO (RL with verifiable rewards) from a TOML recipe (`--dry-run` prints the plan).
    Grpo(crate::learn::trainer::TrainArgs),
    /// Pass-rate data selection for GRPO: sample n answers per prompt, keep those solved
    /// neither always nor never.
    RlFilter(rl_filter::RlFilterArgs),
    /// Score responses with the verifiable rewards (format + accuracy) and print a summary.
    Reward(reward::RewardArgs),
    /// Score benchmark responses (accuracy per benchmark, Table 1 layout).
    Eval(eval::EvalArgs),
    /// Convert a benchmark's public files to benchmark records (JSONL).
    BenchConvert(eval::BenchConvertArgs),
    /// Reflective CoT synthesis from candidate answers (sharegpt SFT records).
    SynthReflective(synth::SynthArgs),
    /// Write the bundled demo's synthetic data set (seeded scans + medical QA).
    DemoData(demo::DemoDataArgs),
    /// Measure this machine: an SFT step on random weights of a model shape (one JSON line).
    Bench(crate::bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Score(args) => score::run(args),
        Command::Sft(args) => crate::sft::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Grpo(args) => crate::grpo::learner::run(args),
        Command::RlFilter(args) => rl_filter::run(args),
        Command::Reward(args) => reward::run(args),
        Command::Eval(args) => eval::run(args),
        Command::BenchConvert(args) => eval::run_convert(args),
        Command::SynthReflective(args) => synth::run(args),
        Command::DemoData(args) => demo::run(args),
        Command::Bench(args) => crate::bench::run(args),
    }
}

/// Logging to stderr: infimed's own messages from `info` up, other crates' from `warn` up (burn's
/// collective logs every tensor transfer of a multi-node run at `info`: ~25 KB per GRPO step of
/// the demo). `INFIMED_LOG` overrides it (an `EnvFilter` directive, e.g. `debug` or
/// `info,burn_collective=debug`).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("INFIMED_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,infimed=info,infimed_model=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
