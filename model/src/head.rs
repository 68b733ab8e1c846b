//! Log-probabilities of target tokens through the head without the `[tokens, vocab]` logits
//! ("fused linear cross-entropy"): `logp[n] = log_softmax(h[n] W / T)[target[n]]` computed over
//! chunks of rows, each chunk's logits living only while the chunk is processed, in the forward
//! pass and again in the backward pass:
//!
//! ```text
//! forward:  z = h_c W / T (f32), lse = logsumexp(z), logp = z[target] - lse
//! backward: g_z = g * (onehot(target) - softmax(z)) / T
//!           dh_c = g_z W^T,  dW += h_c^T g_z
//! ```
//!
//! For Qwen2.5-VL-3B (vocabulary 151,936) the logits of 4 x 4,096 target tokens would be 10 GB
//! in f32, and autodiff keeps several tensors of that size (bf16 logits, their f32 copy, the
//! log-softmax, its gradient); here one chunk of `chunk` rows, `chunk x vocab x 4` bytes a tensor.
//! The matmuls run in the compute dtype of `h` and `W`, the softmax in f32, as before.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, TensorData, TensorPrimitive};

/// Rows of the head processed at once (the logits of one chunk are `chunk x vocab` floats).
pub const HEAD_CHUNK: usize = 1024;

/// The targets and settings of one [`target_logprobs`] call.
#[derive(Debug, Clone)]
pub struct HeadTargets {
    /// One target id per row of `h`.
    pub targets: Vec<u32>,
    /// The logits are divided by this before the softmax (GRPO's sampling temperature; 1 for SFT).
    pub temperature: f64,
    /// Rows per chunk.
    pub chunk: usize,
}

fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn f32_of<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F32 | DType::F64 => x,
        _ => x.cast(FloatDType::F32),
    }
}

fn chunk_targets<B: Backend>(
    t: &HeadTargets,
    start: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = t.targets[start..start + len]
        .iter()
        .map(|&x| x as i64)
        .collect();
    Tensor::from_data(TensorData::new(ids, [len, 1]), device)
}

/// Forward pass: `logp [N]` (f32) for rows `h [N, C]` and head `w [C, V]`.
pub fn head_logprobs_forward<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    t: &HeadTargets,
) -> Tensor<B, 1> {
    let [n, _] = h.dims();
    let device = h.device();
    let mut out = Vec::with_capacity(n.div_ceil(t.chunk.max(1)));
    for start in (0..n).step_by(t.chunk.max(1)) {
        let len = t.chunk.min(n - start);
        let z = f32_of(h.clone().narrow(0, start, len).matmul(w.clone()));
        let z = if t.temperature == 1.0 {
            z
        } else {
            z.div_scalar(t.temperature)
        };
        let logp = log_softmax(z, 1).gather(1, chunk_targets::<B>(t, start, len, &device));
        out.push(logp.reshape([len]));
    }
    if out.is_empty() {
        return Tensor::zeros([0], &device);
    }
    Tensor::cat(out, 0)
}

/// Backward pass: `(dh [N, C], dw [C, V])` for the gradient `g [N]` of `logp`.
pub fn head_logprobs_backward<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    g: Tensor<B, 1>,
    t: &HeadTargets,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [n, c] = h.dims();
    let [_, v] = w.dims();
    let device = h.device();
    let (h_dtype, w_dtype) = (FloatDType::from(h.dtype()), FloatDType::from(w.dtype()));
    let g = f32_of(g);
    let mut dh = Vec::with_capacity(n.div_ceil(t.chunk.max(1)));
    let mut dw = Tensor::<B, 2>::zeros([c, v], &device);
    for start in (0..n).step_by(t.chunk.max(1)) {
        let len = t.chunk.min(n - start);
        let hc = h.clone().narrow(0, start, len);
        let z = f32_of(hc.clone().matmul(w.clone()));
        let z = if t.temperature == 1.0 {
            z
        } else {
            z.div_scalar(t.temperature)
        };
        let onehot = Tensor::<B, 2>::zeros([len, v], &device).scatter(
            1,
            chunk_targets::<B>(t, start, len, &device),
            Tensor::ones([len, 1], &device),
            burn::tensor::IndexingUpdateOp::Add,
        );
        let gz = (onehot - softmax(z, 1)) * g.clone().narrow(0, start, len).reshape([len, 1]);
        let gz = if t.temperature == 1.0 {
            gz
        } else {
            gz.div_scalar(t.temperature)
        };
        let gz = gz.cast(h_dtype);
        dh.push(f32_of(gz.clone().matmul(w.clone().transpose())).cast(h_dtype));
        dw = dw + f32_of(hc.transpose().matmul(gz));
    }
    let dh = if dh.is_empty() {
        Tensor::zeros([0, c], &device)
    } else {
        Tensor::cat(dh, 0)
    };
    (dh, dw.cast(w_dtype))
}

#[derive(Debug)]
pub(crate) struct HeadLogprobsBackward;

impl<B: Backend> Backward<B, 2> for HeadLogprobsBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, Arc<HeadTargets>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_h, node_w] = ops.parents;
        let g = float::<B, 1>(grads.consume::<B>(&ops.node));
        let (h, w, t) = ops.state;
        let (dh, dw) = head_logprobs_backward(float(h), float(w), g, &t);
        if let Some(node) = node_h {
            grads.register::<B>(node.id, dh.into_primitive().tensor());
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, dw.into_primitive().tensor());
        }
    }
}
