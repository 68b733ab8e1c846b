//! SFT (the paper's first stage): supervised fine-tuning on reflective chain-of-thought data.
//!
//! - [`recipe`]: the TOML recipe (data mix, freezing, optimizer, schedule, batch, checkpoints);
//! - [`plan`]: what a run will do, from the recipe alone (`--dry-run`): the mix, the step
//!   arithmetic, parameter counts and the memory estimate;
//! - [`mix`]: records per source and the seeded order of each epoch;
//! - [`data`]: the sources read, their lengths, the schedule of steps and the background loader;
//! - [`learner`]: the training loop (`infimed sft`).

pub mod data;
pub mod learner;
pub mod mix;
pub mod plan;
pub mod recipe;

pub use learner::{run, train_sft, SftArgs, SftSummary};
pub use recipe::SftRecipe;
