//! What both learners (SFT in [`crate::sft`], GRPO in [`crate::grpo`]) share.
//!
//! - [`recipe`]: TOML with unknown keys rejected, `--set` overrides, the `model` value;
//! - [`freeze`], [`optim`], [`schedule`]: what trains, AdamW + global grad-norm clip, HF's schedules;
//! - [`batch`], [`logprobs`]: micro-batches and the log-probabilities of their target tokens;
//! - [`layerwise`]: per-layer activation checkpointing (the backward pass one layer at a time);
//! - [`checkpoint`]: atomic checkpoints with exact resume;
//! - [`metrics`], [`tensorboard`]: typed metric records to `metrics.jsonl` and TensorBoard, plots;
//! - [`parallel`]: data parallelism: ranks, the step's shards, the gradient all-reduce;
//! - [`run`]: a run's life: output folder, model + optimizer (fresh or resumed), gradient
//!   accumulation over micro-batches, the optimizer update, the final checkpoint and HF export;
//! - [`trainer`]: the training loop both learners run (validation, metrics, checkpoints, export);
//! - [`outdir`], [`stop`]: a run's output directory (claim, lock, checkpoint retention) and its
//!   stop on SIGTERM / SIGINT.

pub mod batch;
pub mod checkpoint;
pub mod freeze;
pub mod layerwise;
pub mod logprobs;
pub mod metrics;
pub mod optim;
pub mod outdir;
pub mod parallel;
pub mod recipe;
pub mod run;
pub mod schedule;
pub mod stop;
pub mod tensorboard;
pub mod trainer;
