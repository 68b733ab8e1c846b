//! `infimed demo-data --out DIR [--seed S] [--train N] [--val N] [--image-size PX] [--image-pool N]`: writes the
//! bundled demo's synthetic data set (see [`crate::demo`]) and prints its summary.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::demo::{self, DemoDataConfig};

#[derive(Args, Debug, Clone)]
pub struct DemoDataArgs {
    /// Output folder (created; files of the same names are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of everything (same seed, byte-identical files).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training records (train.jsonl, rl_train.jsonl).
    #[arg(long, default_value_t = 1200)]
    pub train: usize,
    /// Validation records (val.jsonl, rl_val.jsonl, bench_val.jsonl).
    #[arg(long, default_value_t = 200)]
    pub val: usize,
    /// Image side in pixels, a multiple of 28 (assets/demo-tiny expects 56).
    #[arg(long, default_value_t = 56)]
    pub image_size: u32,
    /// At most this many distinct records and images; record i repeats record i % N (data sets
    /// at paper scale, e.g. `--train 188000 --image-pool 2000`).
    #[arg(long)]
    pub image_pool: Option<usize>,
}

pub fn run(args: DemoDataArgs) -> Result<()> {
    let cfg = DemoDataConfig {
        seed: args.seed,
        train: args.train,
        val: args.val,
        image_size: args.image_size,
        image_pool: args.image_pool,
    };
    let summary = demo::write_demo_data(&args.out, &cfg)?;
    print!("{}", summary.to_text());
    println!("written to {}", args.out.display());
    Ok(())
}
