//! The rollout engine's key/value cache: sequences in **groups** that share a prompt (GRPO's `n`
//! samples of one question; `n = 1` for plain generation), and groups in **cohorts**: the groups
//! one prefill admitted together.
//!
//! - A cohort holds its prompts' keys and values (the shared prefixes) **once** per group, as
//!   the prefill left them: `[groups, kv_heads, P, d]` per layer, left-padded to the cohort's
//!   longest prompt, with a key mask for the padding. No copy is made of them per sample, nor
//!   per group.
//! - Each sequence's own tokens go into a buffer preallocated for `capacity` tokens,
//!   `[rows, kv_heads, capacity, d]` per layer (the cohort's rows, group by group), written **in
//!   place** one position per step (`slice_assign` on a uniquely held tensor: no copy of the
//!   cache per token).
//! - A decode step runs the linear layers over every row of every cohort at once; attention runs
//!   per cohort in two parts merged by their log-sum-exp: every group's query rows against its
//!   prefix (one batched matrix product for the whole cohort: groups that have fewer live rows
//!   than the cohort's largest get zero query rows, whose results are dropped), and each row
//!   against its own tokens. The result is attention over `prefix ++ own tokens`, as one
//!   sequence alone. The number of small attention products per step is the number of cohorts,
//!   not of groups or rows.
//! - Rows that finish are dropped (`retain`): the rows' own buffers are compacted, and a group
//!   left without rows leaves the cohort with its prefix.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// One cohort's cache, for every layer.
#[derive(Debug)]
pub struct CohortKv<B: Backend> {
    /// Per layer `(k, v)` of the groups' prompts: `[groups, kv_heads, P, head_dim]`, left-padded.
    pub prefix: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// `[groups, 1, 1, P]`: 0 at a group's real prompt positions, `-inf` at its padding; `None`
    /// when no group is padded.
    prefix_mask: Option<Tensor<B, 4>>,
    /// Per group: real prompt tokens, and the M-RoPE offset of its own tokens (own token `i` of
    /// group `g` is at position `prefix_lens[g] + i + rope_deltas[g]` on all three rows).
    pub prefix_lens: Vec<usize>,
    pub rope_deltas: Vec<i64>,
    /// Per group: live rows (each at least 1; rows are ordered group by group).
    group_rows: Vec<usize>,
    /// Per layer `(k, v)` of the rows' own tokens: `[rows, kv_heads, capacity, head_dim]`,
    /// positions `0..len` filled (`None` only while a write is under way).
    own: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Own tokens cached per row (all rows of a cohort advance together).
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> CohortKv<B> {
    /// A cohort from a prefill's per-layer `(k, v)` `[G, kvh, P, d]` (left-padded: `key_valid[g]`
    /// says which of the `P` positions are real), with `rows[g]` sequences of up to `capacity`
    /// own tokens for group `g`. `rope_deltas[g]`: the padded row's offset (cache index `i` at
    /// position `i + rope_deltas[g]`).
    pub fn new(
        prefix: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
        key_valid: &[Vec<bool>],
        rope_deltas: &[i64],
        rows: &[usize],
        capacity: usize,
    ) -> Result<Self> {
        let g = rows.len();
        if key_valid.len() != g || rope_deltas.len() != g {
            bail!(
                "cohort: {g} groups but {} key masks and {} rope offsets",
                key_valid.len(),
                rope_deltas.len()
            );
        }
        if let Some(i) = rows.iter().position(|&n| n == 0) {
            bail!("cohort: group {i} has no rows");
        }
        let Some((k0, _)) = prefix.first() else {
            bail!("cohort: no layer")
        };
        let [pg, kvh, p, d] = k0.dims();
        if pg != g || key_valid.iter().any(|v| v.len() != p) {
            bail!("cohort: a prefix of {pg} x {p} positions for {g} groups");
        }
        let device = k0.device();
        let dtype = FloatDType::from(k0.dtype());
        let pads: Vec<usize> = key_valid
            .iter()
            .map(|v| v.iter().take_while(|&&x| !x).count())
            .collect();
        if key_valid
            .iter()
            .zip(&pads)
            .any(|(v, &pad)| v[pad..].iter().any(|&x| !x))
        {
            bail!("cohort: a prompt's padding is not all on the left");
        }
        let prefix_mask = pads.iter().any(|&x| x > 0).then(|| {
            let m: Vec<f32> = key_valid
                .iter()
                .flat_map(|v| v.iter().map(|&x| if x { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            Tensor::<B, 4>::from_data(TensorData::new(m, [g, 1, 1, p]), &device)
        });
        // Contiguous once here (a prefill's keys may be a transposed view), not at every step.
        let contiguous = |x: Tensor<B, 4>| x.reshape([g * kvh * p * d]).reshape([g, kvh, p, d]);
        let prefix: Vec<_> = prefix
            .into_iter()
            .map(|(k, v)| (contiguous(k), contiguous(v)))
            .collect();
        let total: usize = rows.iter().sum();
        // Separate buffers (one shared by k and v would be copied on the first write).
        let zeros = || Tensor::<B, 4>::zeros([total, kvh, capacity.max(1), d], &device).cast(dtype);
        let own = prefix.iter().map(|_| Some((zeros(), zeros()))).collect();
        Ok(Self {
            prefix,
            prefix_mask,
            prefix_lens: pads.iter().map(|&pad| p - pad).collect(),
            rope_deltas: rope_deltas
                .iter()
                .zip(&pads)
                .map(|(&r, &pad)| r + pad as i64)
                .collect(),
            group_rows: rows.to_vec(),
            own,
            len: 0,
            capacity,
        })
    }

    /// Live rows per group.
    pub fn group_rows(&self) -> &[usize] {
        &self.group_rows
    }

    pub fn groups(&self) -> usize {
        self.group_rows.len()
    }

    pub fn rows(&self) -> usize {
        self.group_rows.iter().sum()
    }

    /// M-RoPE position of every row's next own token (rows group by group).
    pub fn next_positions(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.rows());
        for ((&p, &delta), &n) in self
            .prefix_lens
            .iter()
            .zip(&self.rope_deltas)
            .zip(&self.group_rows)
        {
            out.extend(std::iter::repeat_n((p + self.len) as i64 + delta, n));
        }
        out
    }

    /// Bytes held by the prefixes (padding included) and by the rows' own buffers.
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
        let o = self
            .own
            .iter()
            .flatten()
            .map(|(k, v)| size(k) + size(v))
            .sum();
        (p, o)
    }

    /// Keep, of group `g`, the rows `keep[g]` (indices within the group, in order), e.g. when
    /// sequences finish. A group left without rows leaves the cohort (and its prefix with it).
    pub fn retain(&mut self, keep: &[Vec<usize>]) {
        assert_eq!(
            keep.len(),
            self.groups(),
            "retain: one list of rows per group"
        );
        if keep
            .iter()
            .zip(&self.group_rows)
            .all(|(k, &n)| k.len() == n && k.iter().enumerate().all(|(i, &r)| i == r))
        {
            return;
        }
        let kept: Vec<usize> = (0..keep.len()).filter(|&g| !keep[g].is_empty()).collect();
        if kept.is_empty() {
            // Nothing left to decode: the cohort is about to be dropped.
            (self.group_rows, self.prefix_lens, self.rope_deltas) = (vec![], vec![], vec![]);
            return;
        }
        let mut rows = vec![];
        let mut start = 0;
        for (k, &n) in keep.iter().zip(&self.group_rows) {
            rows.extend(k.iter().map(|&r| {
                assert!(r < n, "retain: row {r} of a group of {n}");
                start + r
            }));
            start += n;
        }
        let device = self.prefix[0].0.device();
        let idx = crate::nn::int1::<B>(&rows, &device);
        for pair in self.own.iter_mut() {
            let (k, v) = pair
                .take()
                .expect("own buffers are in place between writes");
            *pair = Some((k.select(0, idx.clone()), v.select(0, idx.clone())));
        }
        if kept.len() < keep.len() {
            let gi = crate::nn::int1::<B>(&kept, &device);
            for (k, v) in self.prefix.iter_mut() {
                *k = k.clone().select(0, gi.clone());
                *v = v.clone().select(0, gi.clone());
            }
            self.prefix_mask = self.prefix_mask.take().map(|m| m.select(0, gi));
            self.prefix_lens = kept.iter().map(|&g| self.prefix_lens[g]).collect();
            self.rope_deltas = kept.iter().map(|&g| self.rope_deltas[g]).collect();
        }
        self.group_rows = kept.iter().map(|&g| keep[g].len()).collect();
    }

    /// Write layer `layer`'s keys and values of the rows' next token (`[rows, kvh, 1, d]`) at
    /// position `len`, in place (the buffers are taken out while written, so the backend holds
    /// them uniquely and does not copy them).
    pub(crate) fn write(&mut self, layer: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<()> {
        if self.len >= self.capacity {
            bail!(
                "a sequence ran past the cache capacity of {} tokens",
                self.capacity
            );
        }
        let (ok, ov) = self.own[layer]
            .take()
            .expect("own buffers are in place between writes");
        let [rows, kvh, _, d] = ok.dims();
        let at = self.len;
        let range = [0..rows, 0..kvh, at..at + 1, 0..d];
        self.own[layer] = Some((ok.slice_assign(range.clone(), k), ov.slice_assign(range, v)));
        Ok(())
    }

    /// Layer `layer`'s own keys and values of the filled positions `[rows, kvh, len + 1, d]`
    /// (after this step's write).
    fn own_filled(&self, layer: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = self.own[layer]
            .as_ref()
            .expect("own buffers are in place between writes");
        let filled = self.len + 1;
        (
            k.clone().narrow(2, 0, filled),
            v.clone().narrow(2, 0, filled),
        )
    }
}

/// Attention of one decode step of one cohort at layer `layer` (after this step's keys and
/// values were written): queries `[rows, heads, 1, d]` over each row's group prefix and its own
/// tokens; `[rows, heads, 1, d]`.
pub fn cohort_decode_attention<B: Backend>(
    q: Tensor<B, 4>,
    kv: &CohortKv<B>,
    layer: usize,
) -> Tensor<B, 4> {
    let [n, h, _, d] = q.dims();
    let (pk, pv) = &kv.prefix[layer];
    let [g, kvh, _, _] = pk.dims();
    let n_rep = h / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let dtype = FloatDType::from(q.dtype());
    let device = q.device();
    let f32_of = |x: Tensor<B, 4>| match x.dtype() {
        DType::F32 | DType::F64 => x,
        _ => x.cast(FloatDType::F32),
    };
    let q = q.reshape([n, kvh, n_rep, d]);
    // Part A: the query rows of each group against its prefix, as one batched product. Rows go
    // to `[groups, m, ...]` slots (m: the most rows of a group); when groups differ in live rows,
    // the empty slots hold zero queries (a zero row appended to q) and are dropped after.
    let m = kv.group_rows.iter().copied().max().unwrap_or(0);
    let even = kv.group_rows.iter().all(|&r| r == m);
    let (slots, back) = if even {
        (q.clone(), None)
    } else {
        let (mut to_slot, mut to_row) = (Vec::with_capacity(g * m), Vec::with_capacity(n));
        let mut start = 0;
        for (gi, &r) in kv.group_rows.iter().enumerate() {
            to_slot.extend((0..m).map(|j| if j < r { start + j } else { n }));
            to_row.extend((0..r).map(|j| gi * m + j));
            start += r;
        }
        let padded = Tensor::cat(vec![q.clone(), q.clone().narrow(0, 0, 1).zeros_like()], 0);
        (
            padded.select(0, crate::nn::int1::<B>(&to_slot, &device)),
            Some(crate::nn::int1::<B>(&to_row, &device)),
        )
    };
    // [g * m, kvh, n_rep, d] -> [g, kvh, m * n_rep, d]
    let qa = slots
        .reshape([g, m, kvh, n_rep, d])
        .swap_dims(1, 2)
        .reshape([g, kvh, m * n_rep, d]);
    let mut sa = f32_of(qa.matmul(pk.clone().swap_dims(2, 3))).mul_scalar(scale);
    if let Some(mask) = &kv.prefix_mask {
        sa = sa + mask.clone();
    }
    let ma = sa.clone().max_dim(3);
    let pa = (sa - ma.clone()).exp();
    let la = pa.clone().sum_dim(3);
    let aa = f32_of(pa.cast(dtype).matmul(pv.clone()));
    debug_assert_eq!(aa.dims(), [g, kvh, m * n_rep, d]);
    // Back to rows: [g, kvh, m * n_rep, w] -> [g * m, kvh, n_rep, w] (-> the live rows).
    let to_rows = |x: Tensor<B, 4>, w: usize| {
        let x = x
            .reshape([g, kvh, m, n_rep, w])
            .swap_dims(1, 2)
            .reshape([g * m, kvh, n_rep, w]);
        match &back {
            Some(idx) => x.select(0, idx.clone()),
            None => x,
        }
    };
    let (ma, la, aa) = (to_rows(ma, 1), to_rows(la, 1), to_rows(aa, d));
    // Part B: each row against its own tokens.
    let (ok, ov) = kv.own_filled(layer);
    let sb = f32_of(q.matmul(ok.swap_dims(2, 3))).mul_scalar(scale);
    let mb = sb.clone().max_dim(3);
    let pb = (sb - mb.clone()).exp();
    let lb = pb.clone().sum_dim(3);
    let ab = f32_of(pb.cast(dtype).matmul(ov));
    // Merge the two softmaxes.
    let mx = ma.clone().max_pair(mb.clone());
    let (wa, wb) = ((ma - mx.clone()).exp(), (mb - mx).exp());
    let l = la * wa.clone() + lb * wb.clone();
    let out = (aa * wa + ab * wb) / l;
    out.cast(dtype).reshape([n, h, 1, d])
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorPrimitive;

    /// Where the tensor's values live.
    fn address(t: &Tensor<Flex, 4>) -> usize {
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
            unreachable!("a float tensor")
        };
        p.storage::<f32>().as_ptr() as usize
    }

    /// Each step's keys and values go into the preallocated buffers themselves (no copy of the
    /// cache per token: burn-flex's slice_assign copied before the vendored fix).
    #[test]
    fn own_tokens_are_written_in_place() {
        let device = Default::default();
        let zeros = || Tensor::<Flex, 4>::zeros([2, 1, 3, 4], &device);
        let valid = vec![vec![false, true, true], vec![true; 3]];
        let mut kv = CohortKv::new(vec![(zeros(), zeros())], &valid, &[0, 0], &[2, 1], 5).unwrap();
        let at = |kv: &CohortKv<Flex>| {
            kv.own[0]
                .as_ref()
                .map(|(k, v)| (address(k), address(v)))
                .unwrap()
        };
        let before = at(&kv);
        for step in 0..3 {
            let k = Tensor::<Flex, 4>::full([3, 1, 1, 4], step as f32 + 1.0, &device);
            kv.write(0, k.clone(), k.neg()).unwrap();
            kv.len += 1;
            assert_eq!(at(&kv), before, "step {step}: the buffers moved (copied)");
        }
        kv.len -= 1;
        let (k, v) = kv.own_filled(0);
        let k: Vec<f32> = k.into_data().to_vec().unwrap();
        let v: Vec<f32> = v.into_data().to_vec().unwrap();
        // Row 0, position p holds p + 1 (and its negation in v).
        assert_eq!(
            &k[..12],
            &[1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]
        );
        assert!(k.iter().zip(&v).all(|(a, b)| *a == -b));
        assert_eq!(kv.prefix_lens, [2, 3]);
        // Own token 2 of group 0 (prompt of 2 after 1 pad, offset 0 + 1) and of group 1 (3 + 0).
        assert_eq!(kv.next_positions(), [5, 5, 5]);
    }
}
