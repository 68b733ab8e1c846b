//! Per-layer activation checkpointing (`gradient_checkpointing = "layer"`), as HF's
//! `gradient_checkpointing_enable()` does it for Qwen2.5-VL's decoder: the forward pass runs
//! without recording anything and keeps only the input of every decoder layer; the backward
//! pass then goes down the stack one layer at a time, running that layer again with autodiff
//! from its saved input and back-propagating the gradient of its output into the layer's
//! parameters and its input:
//!
//! ```text
//! x_0 = embed(input); x_{l+1} = layer_l(x_l)          (no graph; keep x_0 .. x_L)
//! loss = head(norm(x_L)); g = dloss/dx_L                (autodiff from a leaf x_L)
//! for l = L-1 .. 0: y = layer_l(x_l); backprop sum(y * g); g = d/dx_l   (one layer's graph)
//! backprop sum(embed(input) * g)                          (embeddings, and the vision tower if trained)
//! ```
//!
//! The activations held are `layers x B x T x C` (the saved inputs) plus one layer's working
//! set; the price is a second forward pass of every layer. The gradients are those of plain
//! autodiff (`tests/layer_checkpointing.rs`).

use anyhow::{Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use crate::backend::{compute_model, Precision};
use crate::learn::freeze::count_params;
use crate::model::text::TextModel;
use crate::model::{LayerInputs, ModelInput, Qwen25VL, TrainBackend};

/// The step's loss from the final hidden states and its gradients, with per-layer
/// checkpointing. `head(model, hidden)` maps the final hidden states (after the last norm) to
/// the loss, using `model` for the logits. Returns the loss and the gradients of `model`'s
/// parameters (f32: the master weights under mixed precision).
pub fn layerwise_backward<B: TrainBackend>(
    model: &Qwen25VL<B>,
    precision: Precision,
    input: &ModelInput,
    head: impl FnOnce(&Qwen25VL<B>, Tensor<B, 3>) -> Result<Tensor<B, 1>>,
) -> Result<(f64, GradientsParams)> {
    let device = model
        .devices()
        .into_iter()
        .next()
        .context("model has no parameters")?;
    let mut acc = GradientsAccumulator::<Qwen25VL<B>>::new();

    // Forward without a graph, keeping every layer's input.
    let inner = compute_model(&model.valid(), precision);
    let inner_device = inner
        .devices()
        .into_iter()
        .next()
        .context("model has no parameters")?;
    let mut x = inner.embed(input, &inner_device)?;
    let dtype = x.dtype();
    let (LayerInputs { cos, sin, attn }, _) = inner.layer_inputs(input, dtype, &inner_device)?;
    let mut saved = Vec::with_capacity(inner.model.layers.len());
    for layer in &inner.model.layers {
        saved.push(x.clone());
        x = layer.forward(x, cos.clone(), sin.clone(), &attn, None);
    }
    drop((inner, cos, sin, attn));

    // The head: final norm, logits, loss, from a leaf holding the last layer's output.
    let top = shallow(model, precision, Part::Head);
    let h = Tensor::<B, 3>::from_inner(x).require_grad();
    let loss = head(&top, top.model.norm.forward(h.clone()))?;
    let value: f64 = loss.clone().into_scalar().elem::<f64>();
    let grads = loss.backward();
    let Some(mut g) = h.grad(&grads) else {
        // The loss does not depend on the hidden states (no target token): no gradient.
        return Ok((value, GradientsParams::new()));
    };
    acc.accumulate(model, GradientsParams::from_grads(grads, model));

    // Down the stack, one layer's graph at a time.
    let (LayerInputs { cos, sin, attn }, _) = model.layer_inputs(input, dtype, &device)?;
    for (l, layer) in model.model.layers.iter().enumerate().rev() {
        let layer = compute_model(layer, precision);
        let x = Tensor::<B, 3>::from_inner(saved.pop().expect("one saved input per layer"))
            .require_grad();
        let y = layer.forward(x.clone(), cos.clone(), sin.clone(), &attn, None);
        let grads = (y * Tensor::from_inner(g)).sum().backward();
        g = x
            .grad(&grads)
            .with_context(|| format!("layer {l}: no gradient reached its input"))?;
        acc.accumulate(model, GradientsParams::from_grads(grads, model));
    }

    // The embeddings (and the vision tower and projector, when they train).
    let embed_trains =
        count_params(&model.model.embed_tokens).0 + count_params(&model.visual).0 > 0;
    if embed_trains {
        let bottom = shallow(model, precision, Part::Embed);
        let embeds = bottom.embed(input, &device)?;
        let grads = (embeds * Tensor::from_inner(g)).sum().backward();
        acc.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    Ok((value, acc.grads()))
}

enum Part {
    /// Final norm and head (the tied embedding or `lm_head`).
    Head,
    /// Token embeddings and the vision tower.
    Embed,
}

/// The model without its decoder layers, the part needed cast to the compute precision. A cast
/// is recorded per backward pass: each piece gets its own, so that the gradients of a weight
/// used by two pieces (the tied embedding) both reach the f32 parameter.
fn shallow<B: TrainBackend>(model: &Qwen25VL<B>, precision: Precision, part: Part) -> Qwen25VL<B> {
    let text = &model.model;
    let (embed_tokens, visual, norm, lm_head) = match part {
        Part::Head => (
            compute_model(&text.embed_tokens, precision),
            model.visual.clone(),
            compute_model(&text.norm, precision),
            model.lm_head.as_ref().map(|h| compute_model(h, precision)),
        ),
        Part::Embed => (
            compute_model(&text.embed_tokens, precision),
            compute_model(&model.visual, precision),
            text.norm.clone(),
            None,
        ),
    };
    Qwen25VL {
        visual,
        model: TextModel {
            embed_tokens,
            layers: vec![],
            norm,
        },
        lm_head,
        config: model.config.clone(),
        attention: model.attention,
    }
}
