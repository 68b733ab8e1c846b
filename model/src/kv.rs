//! The rollout engine's key/value cache: sequences in **groups** that share a prompt (GRPO's `n`
//! samples of one question; `n = 1` for plain generation).
//!
//! - The prompt's keys and values (the shared prefix) are held **once** per group, from one
//!   prefill (vision tower included) — `[1, kv_heads, P, d]` per layer.
//! - Each sequence's own tokens go into a buffer preallocated for `capacity` tokens,
//!   `[n, kv_heads, capacity, d]` per layer, written **in place** one position per step
//!   (`slice_assign` on a uniquely held tensor: no copy of the cache per token).
//! - A decode step runs the linear layers over every row of every group at once; attention runs
//!   per group in two parts merged by their log-sum-exp: the group's `n x n_rep` query rows
//!   against the one prefix (one matrix product for the whole group), and each row against its
//!   own tokens. The result is attention over `prefix ++ own tokens`, as one sequence alone.
//! - A group whose rows finish drops them (`retain`): only the rows' own buffers are compacted,
//!   the prefix stays.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// One group's cache, for every layer.
#[derive(Debug, Clone)]
pub struct GroupKv<B: Backend> {
    /// Per layer `(k, v)` of the prompt: `[1, kv_heads, prefix_len, head_dim]`.
    pub prefix: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Per layer `(k, v)` of the rows' own tokens: `[rows, kv_heads, capacity, head_dim]`,
    /// positions `0..len` filled.
    pub own: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    pub prefix_len: usize,
    /// Own tokens cached per row (all rows of a group advance together).
    pub len: usize,
    pub capacity: usize,
    /// Position of own token `i` is `prefix_len + i + rope_delta` on all three M-RoPE rows.
    pub rope_delta: i64,
}

impl<B: Backend> GroupKv<B> {
    /// A group of `rows` sequences after a prefix of per-layer `(k, v)` `[1, kvh, P, d]`, with
    /// room for `capacity` own tokens each.
    pub fn new(prefix: Vec<(Tensor<B, 4>, Tensor<B, 4>)>, rope_delta: i64, rows: usize, capacity: usize) -> Self {
        let prefix_len = prefix.first().map(|(k, _)| k.dims()[2]).unwrap_or(0);
        let own = prefix
            .iter()
            .map(|(k, _)| {
                let [_, kvh, _, d] = k.dims();
                let dtype = FloatDType::from(k.dtype());
                let z = Tensor::<B, 4>::zeros([rows, kvh, capacity.max(1), d], &k.device()).cast(dtype);
                (z.clone(), z)
            })
            .collect();
        Self { prefix, own, prefix_len, len: 0, capacity, rope_delta }
    }

    pub fn rows(&self) -> usize {
        self.own.first().map(|(k, _)| k.dims()[0]).unwrap_or(0)
    }

    /// Bytes held by the shared prefix and by the rows' own buffers.
    pub fn bytes(&self) -> (usize, usize) {
        let size = |t: &Tensor<B, 4>| {
            let w = match t.dtype() {
                DType::F64 => 8,
                DType::F32 => 4,
                _ => 2,
            };
            t.dims().iter().product::<usize>() * w
        };
        let p = self.prefix.iter().map(|(k, v)| size(k) + size(v)).sum();
        let o = self.own.iter().map(|(k, v)| size(k) + size(v)).sum();
        (p, o)
    }

    /// Keep only the given rows (in that order), e.g. when sequences finish.
    pub fn retain(&mut self, rows: &[usize]) {
        if rows.len() == self.rows() && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return;
        }
        let Some((k0, _)) = self.own.first() else { return };
        let idx = crate::nn::int1::<B>(rows, &k0.device());
        for (k, v) in self.own.iter_mut() {
            *k = k.clone().select(0, idx.clone());
            *v = v.clone().select(0, idx.clone());
        }
    }

    /// Write layer `layer`'s keys and values of the rows' next token (`[rows, kvh, 1, d]`) at
    /// position `len` (in place).
    pub(crate) fn write(&mut self, layer: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<()> {
        if self.len >= self.capacity {
            bail!("a sequence ran past the cache capacity of {} tokens", self.capacity);
        }
        let (ok, ov) = &mut self.own[layer];
        let [rows, kvh, _, d] = ok.dims();
        let at = self.len;
        let range = [0..rows, 0..kvh, at..at + 1, 0..d];
        *ok = ok.clone().slice_assign(range.clone(), k);
        *ov = ov.clone().slice_assign(range, v);
        Ok(())
    }
}

/// Attention of one decode step of one group: queries `[n, heads, 1, d]` over the group's
/// prefix `(k, v)` `[1, kvh, P, d]` and the rows' own `(k, v)` `[n, kvh, t, d]`; `[n, heads, 1, d]`.
pub fn group_decode_attention<B: Backend>(
    q: Tensor<B, 4>,
    prefix: (&Tensor<B, 4>, &Tensor<B, 4>),
    own: (Tensor<B, 4>, Tensor<B, 4>),
) -> Tensor<B, 4> {
    let [n, h, _, d] = q.dims();
    let kvh = prefix.0.dims()[1];
    let n_rep = h / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let dtype = FloatDType::from(q.dtype());
    let f32_of = |x: Tensor<B, 4>| match x.dtype() {
        DType::F32 | DType::F64 => x,
        _ => x.cast(FloatDType::F32),
    };
    // Part A: all n x n_rep query rows of the group against the one prefix.
    let qa = q.clone().reshape([n, kvh, n_rep, d]).swap_dims(0, 1).reshape([1, kvh, n * n_rep, d]);
    let sa = f32_of(qa.matmul(prefix.0.clone().swap_dims(2, 3))).mul_scalar(scale);
    let ma = sa.clone().max_dim(3);
    let pa = (sa - ma.clone()).exp();
    let la = pa.clone().sum_dim(3);
    let aa = f32_of(pa.cast(dtype).matmul(prefix.1.clone()));
    let back = |x: Tensor<B, 4>, w: usize| x.reshape([kvh, n, n_rep, w]).swap_dims(0, 1);
    let (ma, la, aa) = (back(ma, 1), back(la, 1), back(aa, d));
    // Part B: each row against its own tokens.
    let qb = q.reshape([n, kvh, n_rep, d]);
    let sb = f32_of(qb.matmul(own.0.swap_dims(2, 3))).mul_scalar(scale);
    let mb = sb.clone().max_dim(3);
    let pb = (sb - mb.clone()).exp();
    let lb = pb.clone().sum_dim(3);
    let ab = f32_of(pb.cast(dtype).matmul(own.1));
    // Merge the two softmaxes.
    let m = ma.clone().max_pair(mb.clone());
    let (wa, wb) = ((ma - m.clone()).exp(), (mb - m).exp());
    let l = la * wa.clone() + lb * wb.clone();
    let out = (aa * wa + ab * wb) / l;
    out.cast(dtype).reshape([n, h, 1, d])
}
