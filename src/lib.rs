//! infimed: the InfiMed recipe (SFT with reflective CoT, then GRPO) for Qwen2.5-VL, on Burn.
//!
//! The model lives in the `infimed-model` crate (re-exported as [`model`]); this crate holds
//! everything around it: inputs (tokenizer, chat template, image processor, datasets), the
//! learners, generation, rewards, evaluation and the command line.

pub use infimed_model as model;

pub mod alloc;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod data;
pub mod demo;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod grpo;
pub mod inputs;
pub mod learn;
pub mod models;
pub mod rewards;
pub mod sft;
pub mod synth;
