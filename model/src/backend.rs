//! What the model needs of a Burn backend beyond `Backend` ([`ModelBackend`]): its two custom
//! operations, the memory-efficient attention ([`crate::attention`]) and the target log-probs
//! through the head ([`crate::head`]), each with its own backward pass under autodiff
//! (`Autodiff<B, C>` records one node per call whose backward runs the operation's backward on
//! `B`); and [`TrainBackend`], the autodiff backends the learners train on.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorPrimitive;

use crate::attention::{flash_forward, AttentionPlan, FlashAttentionBackward};
use crate::head::{head_logprobs_forward, HeadLogprobsBackward, HeadTargets};

/// What the model needs of a backend beyond burn's `Backend`: the memory-efficient attention,
/// with its own backward pass under autodiff.
pub trait ModelBackend: Backend {
    /// Attention of q `[B, H, Tq, d]` over k, v `[B, KV, Tk, d]` (`H` a multiple of `KV`) as the
    /// plan says; `[B, H, Tq, d]`.
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        plan: &Arc<AttentionPlan>,
    ) -> FloatTensor<Self> {
        let (q, k, v) = (
            float::<Self, 4>(q),
            float::<Self, 4>(k),
            float::<Self, 4>(v),
        );
        flash_forward(q, k, v, plan).0.into_primitive().tensor()
    }

    /// Log-probabilities of target tokens through the head, chunked ([`crate::head`]).
    fn head_logprobs_op(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        t: &Arc<HeadTargets>,
    ) -> FloatTensor<Self> {
        head_logprobs_forward(float::<Self, 2>(h), float(w), t)
            .into_primitive()
            .tensor()
    }
}

/// Training backends: autodiff over a [`ModelBackend`] whose inner backend is one too.
pub trait TrainBackend:
    ModelBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: ModelBackend>
{
}

impl<B> TrainBackend for B where
    B: ModelBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: ModelBackend>
{
}

impl ModelBackend for burn::backend::NdArray<f32> {}
impl ModelBackend for burn::backend::NdArray<f64> {}
#[cfg(feature = "flex")]
impl ModelBackend for burn::backend::Flex<f32, i32> {}
#[cfg(feature = "wgpu")]
impl ModelBackend for burn::backend::Wgpu<f32, i32> {}
#[cfg(feature = "cuda")]
impl ModelBackend for burn::backend::Cuda<f32, i32> {}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        plan: &Arc<AttentionPlan>,
    ) -> FloatTensor<Self> {
        match FlashAttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = flash_forward(
                    float::<B, 4>(q.primitive.clone()),
                    float(k.primitive.clone()),
                    float(v.primitive.clone()),
                    plan,
                );
                let (out, lse) = (out.into_primitive().tensor(), lse.into_primitive().tensor());
                prep.finish(
                    (
                        q.primitive,
                        k.primitive,
                        v.primitive,
                        out.clone(),
                        lse,
                        plan.clone(),
                    ),
                    out,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::flash_attention(
                q.primitive,
                k.primitive,
                v.primitive,
                plan,
            )),
        }
    }

    fn head_logprobs_op(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        t: &Arc<HeadTargets>,
    ) -> FloatTensor<Self> {
        head_logprobs_autodiff::<B, C>(h, w, t)
    }
}

/// The memory-efficient attention (see the module docs): q `[B, H, Tq, d]`, k and v
/// `[B, KV, Tk, d]` -> `[B, H, Tq, d]`.
pub fn attention<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    plan: &Arc<AttentionPlan>,
) -> Tensor<B, 4> {
    float(B::flash_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        plan,
    ))
}

/// `log_softmax(h W / T)[targets]` for rows `h [N, C]` and head `w [C, V]`: `[N]`, f32.
pub fn target_logprobs<B: ModelBackend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    t: &Arc<HeadTargets>,
) -> Tensor<B, 1> {
    float(B::head_logprobs_op(
        h.into_primitive().tensor(),
        w.into_primitive().tensor(),
        t,
    ))
}

/// The autodiff node of [`ModelBackend::head_logprobs_op`] on `Autodiff<B, C>`.
fn head_logprobs_autodiff<B: ModelBackend, C: CheckpointStrategy>(
    h: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    t: &Arc<HeadTargets>,
) -> FloatTensor<Autodiff<B, C>> {
    match HeadLogprobsBackward
        .prepare::<C>([h.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = B::head_logprobs_op(h.primitive.clone(), w.primitive.clone(), t);
            prep.finish((h.primitive, w.primitive, t.clone()), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::head_logprobs_op(h.primitive, w.primitive, t)),
    }
}

fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}
