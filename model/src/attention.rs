//! Memory-efficient attention ("flash": tiled, online softmax) with its own backward pass, for
//! every backend.
//!
//! burn 0.21's `attention` under autodiff is a composition of tensor ops that keeps the whole
//! `[batch, heads, Tq, Tk]` score matrix (and its softmax, mask and gradient) from the forward
//! to the backward pass: 288 GiB for the 3B recipe at 4 x 4,096 tokens. Here the scores exist
//! one tile at a time:
//!
//! - **forward** ([`flash_forward`]): for each query tile, the key tiles it can see are visited
//!   in order with a running maximum `m`, running sum `l` and accumulator `acc` in f32
//!   (`acc = acc * exp(m_old - m) + exp(s - m) v`); the output is `acc / l` and the log-sum-exp
//!   `lse = m + ln l` of every query row is kept;
//! - **backward** ([`flash_backward`], FlashAttention-2's): `D = rowsum(dO * O)`; for each key tile
//!   and each query tile that sees it, the tile's probabilities are recomputed from q, k and the
//!   saved `lse` (`P = exp(s - lse)`), then `dV += P^T dO`, `dS = P * (dO V^T - D)`,
//!   `dQ += dS K * scale`, `dK += dS^T Q * scale`.
//!
//! Peak extra memory is one `[batch, heads, q_tile, k_tile]` tile (plus the per-row statistics),
//! so it grows linearly with the sequence. GQA never materialises the repeated keys/values: the
//! `n_rep` query heads of a key/value head are laid out as `n_rep * q_tile` rows of one matrix
//! product, so `dK`/`dV` come out summed over the group.
//!
//! Which keys a query sees is given by an [`AttentionMask`]: a segment id per key position
//! (padding is -1 and seen by nobody; packed samples have their own ids, so attention is
//! block-diagonal) and an optional causal rule, aligned bottom-right as burn's and PyTorch's
//! (query `i` of `Tq` is at position `Tk - Tq + i`). Tile pairs that no query of the tile can see
//! are skipped; pairs that every query sees entirely take no mask; the others get a mask built
//! once per forward ([`AttentionPlan`]) and shared by every layer.
//!
//! The custom op is reached through [`crate::backend::ModelBackend::flash_attention`]: on a plain backend it is
//! the forward above; on `Autodiff<B, C>` it records one node with three parents (q, k, v) whose
//! backward is [`flash_backward`] on `B`. A query row that sees no key (padding) outputs 0 with a
//! zero gradient, as burn's attention does.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, TensorData, TensorPrimitive};

/// Which keys each query may attend to (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMask {
    /// Per batch row, per key position: the segment the key belongs to (a packed sample, a
    /// window, an image); -1 for padding. The queries are the last `Tq` positions and carry
    /// their segment ids; a query sees a key of its own segment (and none when it is padding).
    pub key_segments: Vec<Vec<i32>>,
    /// Query `i` sees keys at positions `<= Tk - Tq + i` only.
    pub causal: bool,
}

impl AttentionMask {
    /// One segment per row with `valid[b][j] = false` marking padding.
    pub fn from_valid(valid: &[Vec<bool>], causal: bool) -> Self {
        let key_segments = valid
            .iter()
            .map(|r| r.iter().map(|&v| if v { 0 } else { -1 }).collect())
            .collect();
        Self {
            key_segments,
            causal,
        }
    }

    /// Rows of `len` keys, all real.
    pub fn dense(batch: usize, len: usize, causal: bool) -> Self {
        Self {
            key_segments: vec![vec![0; len]; batch],
            causal,
        }
    }

    pub fn batch(&self) -> usize {
        self.key_segments.len()
    }

    pub fn len_k(&self) -> usize {
        self.key_segments.first().map(Vec::len).unwrap_or(0)
    }

    /// Whether query `i` (of `len_q`) of row `b` sees key `j`.
    pub fn visible(&self, b: usize, len_q: usize, i: usize, j: usize) -> bool {
        let row = &self.key_segments[b];
        let qpos = row.len() - len_q + i;
        let (qs, ks) = (row[qpos], row[j]);
        ks >= 0 && ks == qs && (!self.causal || j <= qpos)
    }

    /// The mask as burn's `attention` takes it: `[batch, 1, Tq, Tk]`, true where masked.
    pub fn dense_mask<B: Backend>(&self, len_q: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
        let (b, lk) = (self.batch(), self.len_k());
        let mut m = Vec::with_capacity(b * len_q * lk);
        for r in 0..b {
            for i in 0..len_q {
                for j in 0..lk {
                    m.push(!self.visible(r, len_q, i, j));
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [b, 1, len_q, lk]), device)
    }
}

/// Tile sizes of the memory-efficient attention (query rows, key columns per tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    pub q: usize,
    pub k: usize,
}

impl Default for Tiles {
    fn default() -> Self {
        Self { q: 128, k: 128 }
    }
}

/// How one (query tile, key tile) pair is masked.
#[derive(Debug, Clone)]
pub enum TileMask {
    /// Every query of the tile sees every key of the tile, in every row.
    Full,
    /// `[batch, q_tile, k_tile]`, true where masked.
    Partial(Arc<Vec<bool>>),
}

/// The tile pairs of one attention shape and mask: computed once per forward pass on the host
/// and shared by every layer (and by the backward pass).
#[derive(Debug)]
pub struct AttentionPlan {
    pub batch: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub tiles: Tiles,
    /// Per query tile: the key tiles it sees and how.
    pub pairs: Vec<Vec<(usize, TileMask)>>,
}

impl AttentionPlan {
    pub fn new(mask: &AttentionMask, len_q: usize, tiles: Tiles) -> Self {
        let (batch, len_k) = (mask.batch(), mask.len_k());
        assert!(
            len_q <= len_k,
            "attention plan: {len_q} queries but only {len_k} keys"
        );
        assert!(
            tiles.q > 0 && tiles.k > 0,
            "attention tiles must be positive"
        );
        let nq = len_q.div_ceil(tiles.q);
        let nk = len_k.div_ceil(tiles.k);
        // Per row and tile: (min, max) valid segment id and whether it holds padding.
        let summary = |b: usize, range: std::ops::Range<usize>| {
            let mut lo = i32::MAX;
            let mut hi = i32::MIN;
            let mut pad = false;
            for &s in &mask.key_segments[b][range] {
                if s < 0 {
                    pad = true;
                } else {
                    lo = lo.min(s);
                    hi = hi.max(s);
                }
            }
            (lo, hi, pad)
        };
        let offset = len_k - len_q;
        let mut pairs = Vec::with_capacity(nq);
        for qi in 0..nq {
            let (i0, i1) = (qi * tiles.q, ((qi + 1) * tiles.q).min(len_q));
            let mut row = vec![];
            for kj in 0..nk {
                let (j0, j1) = (kj * tiles.k, ((kj + 1) * tiles.k).min(len_k));
                if mask.causal && j0 > offset + i1 - 1 {
                    break; // this and every later key tile is in the future of the whole query tile
                }
                let (mut all_full, mut all_empty) = (true, true);
                for b in 0..batch {
                    let (qlo, qhi, qpad) = summary(b, offset + i0..offset + i1);
                    let (klo, khi, kpad) = summary(b, j0..j1);
                    let empty = qlo > qhi || klo > khi || qhi < klo || khi < qlo;
                    let full = !qpad
                        && !kpad
                        && qlo == qhi
                        && klo == khi
                        && qlo == klo
                        && (!mask.causal || j1 - 1 <= offset + i0);
                    all_full &= full;
                    all_empty &= empty;
                }
                if all_empty {
                    continue;
                }
                if all_full {
                    row.push((kj, TileMask::Full));
                    continue;
                }
                let (tq, tk) = (i1 - i0, j1 - j0);
                let mut m = Vec::with_capacity(batch * tq * tk);
                for b in 0..batch {
                    for i in i0..i1 {
                        for j in j0..j1 {
                            m.push(!mask.visible(b, len_q, i, j));
                        }
                    }
                }
                row.push((kj, TileMask::Partial(Arc::new(m))));
            }
            pairs.push(row);
        }
        Self {
            batch,
            len_q,
            len_k,
            tiles,
            pairs,
        }
    }

    fn q_range(&self, qi: usize) -> (usize, usize) {
        let i0 = qi * self.tiles.q;
        (i0, self.tiles.q.min(self.len_q - i0))
    }

    fn k_range(&self, kj: usize) -> (usize, usize) {
        let j0 = kj * self.tiles.k;
        (j0, self.tiles.k.min(self.len_k - j0))
    }

    /// Score elements one layer's attention computes (for the memory plan and the FLOP count).
    pub fn score_elements(&self) -> usize {
        self.pairs
            .iter()
            .enumerate()
            .map(|(qi, row)| {
                row.iter()
                    .map(|(kj, _)| self.q_range(qi).1 * self.k_range(*kj).1)
                    .sum::<usize>()
            })
            .sum::<usize>()
            * self.batch
    }
}

#[derive(Debug)]
pub(crate) struct FlashAttentionBackward;

impl<B: Backend> Backward<B, 3> for FlashAttentionBackward {
    /// q, k, v, out, lse (all inner-backend primitives) and the plan.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        Arc<AttentionPlan>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let dout = float::<B, 4>(grads.consume::<B>(&ops.node));
        let (q, k, v, out, lse, plan) = ops.state;
        let (dq, dk, dv) = flash_backward(
            float(q),
            float(k),
            float(v),
            float(out),
            float(lse),
            dout,
            &plan,
        );
        if let Some(node) = node_q {
            grads.register::<B>(node.id, dq.into_primitive().tensor());
        }
        if let Some(node) = node_k {
            grads.register::<B>(node.id, dk.into_primitive().tensor());
        }
        if let Some(node) = node_v {
            grads.register::<B>(node.id, dv.into_primitive().tensor());
        }
    }
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

fn tile_mask<B: Backend>(
    m: &TileMask,
    shape: [usize; 5],
    device: &B::Device,
) -> Option<Tensor<B, 5, Bool>> {
    match m {
        TileMask::Full => None,
        TileMask::Partial(bits) => {
            let [b, kvh, n_rep, tq, tk] = shape;
            let t = Tensor::<B, 5, Bool>::from_data(
                TensorData::new(bits.as_ref().clone(), [b, 1, 1, tq, tk]),
                device,
            );
            Some(t.expand([b, kvh, n_rep, tq, tk]))
        }
    }
}

/// Scaled scores of one tile in f32, masked: `[B, KV, n_rep * tq, tk]`.
fn tile_scores<B: Backend>(
    qi: &Tensor<B, 4>,
    kj: &Tensor<B, 4>,
    mask: &TileMask,
    scale: f64,
    shape: [usize; 5],
) -> Tensor<B, 4> {
    let [b, kvh, n_rep, tq, tk] = shape;
    let s = f32_of(qi.clone().matmul(kj.clone().swap_dims(2, 3))).mul_scalar(scale);
    match tile_mask::<B>(mask, shape, &s.device()) {
        None => s,
        Some(m) => s
            .reshape([b, kvh, n_rep, tq, tk])
            .mask_fill(m, f32::NEG_INFINITY)
            .reshape([b, kvh, n_rep * tq, tk]),
    }
}

/// Forward pass: `(out [B, H, Tq, d], lse [B, KV, n_rep, Tq])`.
pub fn flash_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    plan: &AttentionPlan,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, tq_all, d] = q.dims();
    let [_, kvh, tk_all, _] = k.dims();
    assert_eq!(
        h % kvh,
        0,
        "{h} query heads do not split over {kvh} key/value heads"
    );
    assert_eq!(
        (plan.batch, plan.len_q, plan.len_k),
        (b, tq_all, tk_all),
        "attention plan does not match the tensors"
    );
    let n_rep = h / kvh;
    let dtype = FloatDType::from(q.dtype());
    let device = q.device();
    let scale = 1.0 / (d as f64).sqrt();
    let q5 = q.reshape([b, kvh, n_rep, tq_all, d]);
    let mut outs = Vec::with_capacity(plan.pairs.len());
    let mut lses = Vec::with_capacity(plan.pairs.len());
    for (qi_idx, row) in plan.pairs.iter().enumerate() {
        let (i0, tq) = plan.q_range(qi_idx);
        let r = n_rep * tq;
        let qi = q5.clone().narrow(3, i0, tq).reshape([b, kvh, r, d]);
        let mut m = Tensor::<B, 4>::full([b, kvh, r, 1], f32::MIN, &device);
        let mut l = Tensor::<B, 4>::zeros([b, kvh, r, 1], &device);
        let mut acc = Tensor::<B, 4>::zeros([b, kvh, r, d], &device);
        for (kj_idx, mask) in row {
            let (j0, tk) = plan.k_range(*kj_idx);
            let kj = k.clone().narrow(2, j0, tk);
            let vj = v.clone().narrow(2, j0, tk);
            let s = tile_scores(&qi, &kj, mask, scale, [b, kvh, n_rep, tq, tk]);
            let m_new = m.clone().max_pair(s.clone().max_dim(3));
            let p = (s - m_new.clone()).exp();
            let alpha = (m - m_new.clone()).exp();
            l = l * alpha.clone() + p.clone().sum_dim(3);
            acc = acc * alpha + f32_of(p.cast(dtype).matmul(vj));
            m = m_new;
        }
        let l = l.clamp_min(f32::MIN_POSITIVE);
        outs.push(
            (acc / l.clone())
                .cast(dtype)
                .reshape([b, kvh, n_rep, tq, d]),
        );
        lses.push((m + l.log()).reshape([b, kvh, n_rep, tq]));
    }
    let out = Tensor::cat(outs, 3).reshape([b, h, tq_all, d]);
    (out, Tensor::cat(lses, 3))
}

/// Backward pass: `(dq, dk, dv)` from the inputs, the forward's output and lse, and `dout`.
pub fn flash_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    dout: Tensor<B, 4>,
    plan: &AttentionPlan,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, tq_all, d] = q.dims();
    let [_, kvh, tk_all, _] = k.dims();
    let n_rep = h / kvh;
    let (q_dtype, k_dtype, v_dtype) = (
        FloatDType::from(q.dtype()),
        FloatDType::from(k.dtype()),
        FloatDType::from(v.dtype()),
    );
    let dtype = q_dtype;
    let device = q.device();
    let scale = 1.0 / (d as f64).sqrt();
    let q5 = q.reshape([b, kvh, n_rep, tq_all, d]);
    let do5 = dout.cast(dtype).reshape([b, kvh, n_rep, tq_all, d]);
    // D = rowsum(dO * O), in f32: [B, KV, n_rep, Tq, 1].
    let delta = (f32_of(do5.clone()) * f32_of(out.reshape([b, kvh, n_rep, tq_all, d]))).sum_dim(4);
    let rows = |x: Tensor<B, 5>, i0: usize, tq: usize, w: usize| {
        x.narrow(3, i0, tq).reshape([b, kvh, n_rep * tq, w])
    };
    // The query tiles that see each key tile.
    let nk = tk_all.div_ceil(plan.tiles.k);
    let mut by_key: Vec<Vec<(usize, &TileMask)>> = vec![vec![]; nk];
    for (qi_idx, row) in plan.pairs.iter().enumerate() {
        for (kj_idx, m) in row {
            by_key[*kj_idx].push((qi_idx, m));
        }
    }
    let mut dq: Vec<Option<Tensor<B, 4>>> = vec![None; plan.pairs.len()];
    let mut dks = Vec::with_capacity(nk);
    let mut dvs = Vec::with_capacity(nk);
    for (kj_idx, queries) in by_key.iter().enumerate() {
        let (j0, tk) = plan.k_range(kj_idx);
        let kj = k.clone().narrow(2, j0, tk).cast(dtype);
        let vj = v.clone().narrow(2, j0, tk).cast(dtype);
        let mut dk = Tensor::<B, 4>::zeros([b, kvh, tk, d], &device);
        let mut dv = Tensor::<B, 4>::zeros([b, kvh, tk, d], &device);
        for &(qi_idx, mask) in queries {
            let (i0, tq) = plan.q_range(qi_idx);
            let qi = rows(q5.clone(), i0, tq, d);
            let doi = rows(do5.clone(), i0, tq, d);
            let lse_i = lse
                .clone()
                .narrow(3, i0, tq)
                .reshape([b, kvh, n_rep * tq, 1]);
            let delta_i = rows(delta.clone(), i0, tq, 1);
            let s = tile_scores(&qi, &kj, mask, scale, [b, kvh, n_rep, tq, tk]);
            let p = (s - lse_i).exp();
            dv = dv + f32_of(p.clone().cast(dtype).swap_dims(2, 3).matmul(doi.clone()));
            let dp = f32_of(doi.matmul(vj.clone().swap_dims(2, 3)));
            let ds = (p * (dp - delta_i)).cast(dtype);
            let dqi = f32_of(ds.clone().matmul(kj.clone())).mul_scalar(scale);
            dq[qi_idx] = Some(match dq[qi_idx].take() {
                Some(acc) => acc + dqi,
                None => dqi,
            });
            dk = dk + f32_of(ds.swap_dims(2, 3).matmul(qi)).mul_scalar(scale);
        }
        dks.push(dk.cast(k_dtype));
        dvs.push(dv.cast(v_dtype));
    }
    let dq: Vec<Tensor<B, 5>> = dq
        .into_iter()
        .enumerate()
        .map(|(qi_idx, t)| {
            let (_, tq) = plan.q_range(qi_idx);
            let t = t.unwrap_or_else(|| Tensor::zeros([b, kvh, n_rep * tq, d], &device));
            t.cast(q_dtype).reshape([b, kvh, n_rep, tq, d])
        })
        .collect();
    (
        Tensor::cat(dq, 3).reshape([b, h, tq_all, d]),
        Tensor::cat(dks, 2),
        Tensor::cat(dvs, 2),
    )
}

/// Which attention the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// The memory-efficient attention of this module, with these tiles (the default).
    Flash(Tiles),
    /// burn's `attention` with a dense mask and the key/value heads repeated for GQA: the
    /// straightforward form, kept as the reference the tests compare against.
    Reference,
}

impl Default for AttentionImpl {
    fn default() -> Self {
        AttentionImpl::Flash(Tiles::default())
    }
}
