//! Qwen2.5-VL over any Burn backend: configuration, vision tower (window attention, 2D rotary,
//! patch merger), language model (GQA, M-RoPE, KV cache) and HF safetensors in and out.
//!
//! What it computes is HF transformers' `Qwen2_5_VLForConditionalGeneration`; see
//! `shared/reference/qwen2_5_vl.md` for the formulas. No training code lives here.

pub mod attention;
pub mod backend;
pub mod config;
pub mod head;
pub mod kv;
pub mod model;
pub mod nn;
pub mod rope;
pub mod text;
pub mod vision;
pub mod weights;

pub use attention::{AttentionImpl, AttentionMask, Tiles};
pub use backend::{ModelBackend, TrainBackend};
pub use config::{Qwen25VlConfig, TextConfig, TokenIds, VisionConfig};
pub use model::{copy_aux_files, LayerInputs, ModelInput, Qwen25VL, AUX_FILES};
pub use text::KvCache;
pub use weights::{SaveDtype, WeightReader};
