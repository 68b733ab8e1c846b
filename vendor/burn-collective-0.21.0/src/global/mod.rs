pub(crate) mod node;
pub(crate) mod shared;
// infimed: named by callers that tell a lost peer from other failures
pub use shared::GlobalCollectiveError;

#[cfg(feature = "orchestrator")]
pub mod orchestrator;
#[cfg(feature = "orchestrator")]
pub use orchestrator::*;

mod base;
pub use base::*;
