//! Where models come from: `builtin:NAME` (a bundled config, seeded random weights) or an HF model
//! folder; loaded for training (f32 parameters), for inference in the compute precision, or
//! ready to generate (with its processor and stop tokens).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::prelude::*;

use crate::backend::{check_precision, compute_model, Precision};
use crate::inputs::Processor;
use crate::learn::recipe::ModelSource;
use crate::model::{Qwen25VL, Qwen25VlConfig};

/// Directory of the bundled model assets (`builtin:NAME` -> `assets/NAME`).
pub fn builtin_dir(name: &str) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("assets").join(name),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets")
            .join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("config.json").exists())
        .with_context(|| {
            format!("unknown builtin model `builtin:{name}` (no assets/{name}/config.json)")
        })
}

/// Where the model's config, tokenizer and processor files live.
pub fn model_files_dir(model: &str) -> Result<PathBuf> {
    match ModelSource::parse(model) {
        ModelSource::Builtin(name) => builtin_dir(&name),
        ModelSource::Dir(d) => {
            if !d.join("config.json").exists() {
                bail!("model directory {} has no config.json", d.display());
            }
            Ok(d)
        }
    }
}

/// Load (or, for `builtin:`, seed-initialise) the model the recipe names.
pub fn load_model<B: Backend>(model: &str, seed: u64, device: &B::Device) -> Result<Qwen25VL<B>> {
    match ModelSource::parse(model) {
        ModelSource::Builtin(name) => {
            let dir = builtin_dir(&name)?;
            let cfg = Qwen25VlConfig::from_dir(&dir)?;
            // The backend's RNG is one per process and burn draws a parameter's values when it
            // is first read: seed, build and read every parameter under one lock, so that the
            // weights depend on the seed alone, not on other threads (data-parallel ranks)
            // drawing at the same time.
            static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _lock = INIT.lock().unwrap_or_else(|e| e.into_inner());
            B::seed(device, seed);
            let model = Qwen25VL::init(&cfg, device);
            struct Touch;
            impl<B: Backend> burn::module::ModuleVisitor<B> for Touch {
                fn visit_float<const D: usize>(
                    &mut self,
                    param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
                ) {
                    let _ = param.val();
                }
            }
            burn::module::Module::visit(&model, &mut Touch);
            Ok(model)
        }
        ModelSource::Dir(d) => {
            Qwen25VL::load(&d, device).with_context(|| format!("loading model {}", d.display()))
        }
    }
}

/// A model for inference in the compute precision: its weights (an HF folder, or
/// `builtin:NAME` seeded by `seed`), cast to bf16 under `Precision::Bf16` (an error on a
/// backend without bf16).
pub fn load_inference_model<B: Backend>(
    model: &str,
    seed: u64,
    precision: Precision,
    device: &B::Device,
) -> Result<Qwen25VL<B>> {
    check_precision::<B>(precision, device)?;
    Ok(compute_model(
        &load_model::<B>(model, seed, device)?,
        precision,
    ))
}

/// A model ready to generate: its weights (see [`load_inference_model`]), its processor and
/// its stop tokens.
pub fn load_generator<B: Backend>(
    model: &str,
    seed: u64,
    max_pixels: Option<usize>,
    precision: Precision,
    device: &B::Device,
) -> Result<(Qwen25VL<B>, Processor, Vec<u32>)> {
    let files = model_files_dir(model)?;
    let processor = Processor::from_dir(&files, max_pixels)?;
    let weights = load_inference_model::<B>(model, seed, precision, device)?;
    let stop = crate::generate::stop_tokens(&files, &weights.config.tokens.eos_token_ids)?;
    Ok((weights, processor, stop))
}
