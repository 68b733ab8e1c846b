//! SFT (the paper's first stage): supervised fine-tuning on reflective chain-of-thought data.
//!
//! - [`recipe`]: the TOML recipe (data mix, freezing, optimizer, schedule, batch, checkpoints);
//! - [`plan`]: what a run will do, from the recipe alone (`--dry-run`): the mix, the step
//!   arithmetic, parameter counts and the memory estimate;
//! - [`mix`]: records per source and the seeded order of each epoch;
//! - [`data`]: the sources read, their lengths, the schedule of steps and the background loader;
//! - [`step`]: one optimizer step: batch -> loss -> update;
//! - [`learner`]: the learner the training loop ([`crate::learn::trainer`]) runs (`infimed sft`).

pub mod data;
pub mod learner;
pub mod mix;
pub mod plan;
pub mod recipe;
pub mod step;

pub use learner::{run, train_sft, SftSummary};
pub use recipe::SftRecipe;
