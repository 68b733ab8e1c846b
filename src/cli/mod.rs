//! The `infimed` command line: one subcommand per job, each in its own module.

use clap::{Parser, Subcommand};

pub mod reward;
pub mod score;

#[derive(Parser, Debug)]
#[command(name = "infimed", version, about = "InfiMed: SFT + GRPO for Qwen2.5-VL medical MLLMs, on Burn")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Log-likelihood of the last assistant turn of each sharegpt record.
    Score(score::ScoreArgs),
    /// Score responses with the verifiable rewards (format + accuracy) and print a summary.
    Reward(reward::RewardArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Score(args) => score::run(args),
        Command::Reward(args) => reward::run(args),
    }
}

pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("INFIMED_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
