//! Small building blocks shared by the vision tower and the language model: RMSNorm, linear
//! layers loaded from / exported to HF's `[out, in]` layout, the attention of a layer
//! ([`LayerAttention`]), and host <-> tensor helpers.

use anyhow::Result;
use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType, TensorData};

use std::sync::Arc;

use crate::attention::{AttentionImpl, AttentionMask, AttentionPlan, Tiles};
use crate::backend::{attention, ModelBackend};
use crate::weights::{Chunk, ExportTensor, NamedTensor, WeightReader};

/// Standard deviation of the random init (HF `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// Root-mean-square norm, computed in f32: `w * (x * rsqrt(mean(x^2) + eps))`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn init(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            eps,
        }
    }

    pub fn load(
        r: &mut WeightReader,
        name: &str,
        dim: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(tensor1(r.take(name, &[dim])?, device)),
            eps,
        })
    }

    pub fn export(&self, name: &str, out: &mut Vec<ExportTensor>) {
        out.push(ExportTensor::of(name, self.weight.val()));
    }

    /// As HF's `Qwen2RMSNorm`: the statistics in f32 (half inputs are upcast), the result cast
    /// back to the input dtype before the weight multiplies it.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = upcast(x);
        let var = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = (x * (var + self.eps).sqrt().recip()).cast(FloatDType::from(dtype));
        normed * self.weight.val().unsqueeze()
    }
}

/// A linear layer with HF's init (normal, std 0.02; zero bias).
pub fn linear_init<B: Backend>(
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Linear<B> {
    let mut lin = LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: INIT_STD,
        })
        .init(device);
    if bias {
        lin.bias = Some(Param::from_tensor(Tensor::zeros([d_out], device)));
    }
    lin
}

/// `lin` applied over the last dimension of `x` as one matrix multiply: the leading dimensions
/// are flattened into rows first (`[.., d_in]` -> `[n, d_in]`), as PyTorch's `F.linear` does.
/// burn's `Linear` on a 3-D input is a batched matmul against the broadcast weight: one gemm per
/// leading index (ndarray packs the weight again for each, so a decode step of 16 rows is 16
/// one-row products) and, in the backward pass, one weight-sized gradient per leading index
/// that is summed afterwards.
pub fn linear_rows<B: Backend, const D: usize>(lin: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    over_rows(x, |rows| lin.forward(rows))
}

/// `f` applied to `x` viewed as rows: `[.., n_in]` is flattened to `[rows, n_in]`, `f` maps it
/// to `[rows, n_out]`, and the result gets `x`'s leading dimensions back (`[.., n_out]`).
pub fn over_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let n: usize = dims[..D - 1].iter().product();
    let y = f(x.reshape([n, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// Load `{prefix}.weight` (HF `[out, in]`) and optionally `{prefix}.bias` into a Burn linear
/// layer (`[in, out]`).
pub fn linear_load<B: Backend>(
    r: &mut WeightReader,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>> {
    let w = r.take_transposed(&format!("{prefix}.weight"), d_out, d_in)?;
    let weight = Param::from_tensor(tensor2(w, [d_in, d_out], device));
    let bias = if bias {
        Some(Param::from_tensor(tensor1(
            r.take(&format!("{prefix}.bias"), &[d_out])?,
            device,
        )))
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

/// Export a Burn linear layer under HF names and layout.
pub fn linear_export<B: Backend>(lin: &Linear<B>, prefix: &str, out: &mut Vec<ExportTensor>) {
    let w = lin.weight.val();
    let [d_in, d_out] = w.dims();
    out.push(export_transposed(
        format!("{prefix}.weight"),
        vec![d_out, d_in],
        w,
    ));
    if let Some(b) = &lin.bias {
        out.push(ExportTensor::of(&format!("{prefix}.bias"), b.val()));
    }
}

/// Where the weights of a layer come from, or go: HF's random initialisation (normal, std 0.02;
/// zero biases, unit norms), a checkpoint, or, to export, the layer itself, whose tensors are
/// written under their HF names and layout. Each layer declares its weights once, by HF name,
/// shape and field, in a `weights` function that all three run through; `this` is the layer
/// being exported (`None` when initialising or loading), and the function returns the layer
/// (when exporting: a copy of it, sharing its tensors).
pub enum Weights<'a, B: Backend> {
    Init(&'a B::Device),
    Load(&'a mut WeightReader, &'a B::Device),
    Export(&'a mut Vec<ExportTensor>),
}

impl<B: Backend> Weights<'_, B> {
    /// A linear layer `d_in -> d_out`: HF `{name}.weight` `[d_out, d_in]` (+ `{name}.bias`).
    pub fn linear(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        this: Option<&Linear<B>>,
    ) -> Result<Linear<B>> {
        match self {
            Weights::Init(device) => Ok(linear_init(d_in, d_out, bias, *device)),
            Weights::Load(r, device) => linear_load(r, name, d_in, d_out, bias, *device),
            Weights::Export(out) => {
                let lin = exported(this, name)?;
                linear_export(&lin, name, out);
                Ok(lin)
            }
        }
    }

    /// A bias-free linear layer `d_in -> d_out` whose HF weight `name` has `shape` (a
    /// convolution's, read as the `[d_out, d_in]` matrix).
    pub fn linear_shaped(
        &mut self,
        name: &str,
        shape: &[usize],
        d_in: usize,
        d_out: usize,
        this: Option<&Linear<B>>,
    ) -> Result<Linear<B>> {
        match self {
            Weights::Init(device) => Ok(linear_init(d_in, d_out, false, *device)),
            Weights::Load(r, device) => {
                let w = r.take_transposed_as(name, shape, d_out, d_in)?;
                let weight = Param::from_tensor(tensor2(w, [d_in, d_out], *device));
                Ok(Linear { weight, bias: None })
            }
            Weights::Export(out) => {
                let lin = exported(this, name)?;
                out.push(export_transposed(
                    name.into(),
                    shape.to_vec(),
                    lin.weight.val(),
                ));
                Ok(lin)
            }
        }
    }

    /// An RMSNorm of `dim` (HF `{name}`, the weight itself).
    pub fn norm(
        &mut self,
        name: &str,
        dim: usize,
        eps: f64,
        this: Option<&RmsNorm<B>>,
    ) -> Result<RmsNorm<B>> {
        match self {
            Weights::Init(device) => Ok(RmsNorm::init(dim, eps, *device)),
            Weights::Load(r, device) => RmsNorm::load(r, name, dim, eps, *device),
            Weights::Export(out) => {
                let norm = exported(this, name)?;
                norm.export(name, out);
                Ok(norm)
            }
        }
    }

    /// An embedding table `[vocab, dim]` (HF `{name}`).
    pub fn embedding(
        &mut self,
        name: &str,
        vocab: usize,
        dim: usize,
        this: Option<&Embedding<B>>,
    ) -> Result<Embedding<B>> {
        match self {
            Weights::Init(device) => Ok(EmbeddingConfig::new(vocab, dim)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: INIT_STD,
                })
                .init(*device)),
            Weights::Load(r, device) => {
                let w = r.take(name, &[vocab, dim])?;
                Ok(Embedding {
                    weight: Param::from_tensor(tensor2(w, [vocab, dim], *device)),
                })
            }
            Weights::Export(out) => {
                let emb = exported(this, name)?;
                out.push(ExportTensor::of(name, emb.weight.val()));
                Ok(emb)
            }
        }
    }

    /// A stored tensor the model does not keep (a tied head's copy of the embedding): read and
    /// dropped when loading, so that it is not reported as unexpected, as transformers does.
    pub fn skip_if_present(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        if let Weights::Load(r, _) = self {
            if r.contains(name) {
                r.take(name, shape)?;
            }
        }
        Ok(())
    }
}

/// The part being exported.
fn exported<T: Clone>(this: Option<&T>, name: &str) -> Result<T> {
    this.cloned()
        .ok_or_else(|| anyhow::anyhow!("exporting `{name}`: the layer to export is missing"))
}

pub fn tensor1<B: Backend>(v: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

pub fn tensor2<B: Backend>(v: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

pub fn int1<B: Backend>(v: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = v.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(data, [v.len()]), device)
}

/// Host copy of a float tensor as f32.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

pub fn named<B: Backend, const D: usize>(name: &str, t: Tensor<B, D>) -> NamedTensor {
    let shape = t.dims().to_vec();
    NamedTensor {
        name: name.to_string(),
        shape,
        values: to_vec(t),
    }
}

/// `f` of the tensor's f32 values in row-major order, read in place, where the backend keeps them
/// in host memory (flex, contiguous f32): saving then copies nothing besides the encoding. `None`
/// elsewhere (the caller copies blocks through `into_data`).
fn with_host_values<B: Backend, const D: usize, R>(
    t: &Tensor<B, D>,
    f: impl FnOnce(&[f32]) -> R,
) -> Option<R> {
    #[cfg(feature = "flex")]
    {
        use burn::tensor::TensorPrimitive;
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
            return None;
        };
        let flex = (&p as &dyn std::any::Any).downcast_ref::<burn::backend::flex::FlexTensor>()?;
        let n = t.shape().num_elements();
        let start = flex.layout().start_offset();
        if flex.dtype() != DType::F32 || !flex.is_contiguous() {
            return None;
        }
        flex.storage::<f32>().get(start..start + n).map(f)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (t, f);
        None
    }
}

impl ExportTensor {
    /// A tensor exported as it is (row-major): read in place where the backend allows it (see
    /// `with_host_values`), else read from the device a block of rows (first dimension) at a time.
    pub fn of<B: Backend, const D: usize>(name: &str, t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        ExportTensor::chunked(name.to_string(), shape.clone(), move |max, sink| {
            // A 0-d tensor has one "row": the whole-tensor branch below.
            let rows = shape.first().copied().unwrap_or(1);
            let per_row: usize = shape.iter().skip(1).product();
            let step = (max / per_row.max(1)).max(1);
            let in_place = with_host_values(&t, |v| -> Result<()> {
                for block in v.chunks((step * per_row).max(1)) {
                    sink(Chunk::Values(block))?;
                }
                Ok(())
            });
            if let Some(done) = in_place {
                return done;
            }
            if rows <= step {
                return sink(Chunk::Values(&to_vec(t.clone())));
            }
            for r0 in (0..rows).step_by(step) {
                sink(Chunk::Values(&to_vec(t.clone().narrow(
                    0,
                    r0,
                    step.min(rows - r0),
                ))))?;
            }
            Ok(())
        })
    }
}

/// Export the `[rows, cols]` matrix `w` (Burn's `[in, out]`) transposed to HF's `[out, in]`
/// under `shape`, as strips that the writer transposes and encodes into the tensor's bytes
/// ([`Chunk::Strip`]). Where the values can be read in place (see `with_host_values`): blocks of
/// at most `max` output values straight from them (small blocks: the kernel's copy into the
/// page cache then reads them from the CPU's cache); else strips of whole rows read from the
/// device (contiguous: a plain copy each) into one block for the tensor.
pub fn export_transposed<B: Backend>(
    name: String,
    shape: Vec<usize>,
    w: Tensor<B, 2>,
) -> ExportTensor {
    let [rows, cols] = w.dims();
    ExportTensor::chunked(name, shape, move |max, sink| {
        let in_place = with_host_values(&w, |src| -> Result<()> {
            let step = (max / rows.max(1)).max(1);
            for first in (0..cols).step_by(step) {
                sink(Chunk::Strip {
                    src,
                    row0: 0,
                    rows,
                    total_rows: rows,
                    cols,
                    first,
                    count: step.min(cols - first),
                })?;
            }
            Ok(())
        });
        if let Some(done) = in_place {
            return done;
        }
        let step = (max / cols.max(1)).max(1);
        for row0 in (0..rows).step_by(step) {
            let k = step.min(rows - row0);
            let src = to_vec(if k == rows {
                w.clone()
            } else {
                w.clone().narrow(0, row0, k)
            });
            sink(Chunk::Strip {
                src: &src,
                row0,
                rows: k,
                total_rows: rows,
                cols,
                first: 0,
                count: cols,
            })?;
        }
        Ok(())
    })
}

/// SiLU, `x * sigmoid(x)`, written as `x / (1 + exp(-x))`: one `exp` per element. Burn's
/// generic `sigmoid` (used by `activation::silu` on backends without their own, ndarray among
/// them) computes `exp(-log(1 + exp(-x)))` and recomputes it in the backward pass: three
/// transcendental passes forward and three more backward. The two agree to float rounding; for
/// very negative x, `exp(-x)` overflows to inf and the result is -0, the limit.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() / x.neg().exp().add_scalar(1.0)
}

/// `rotate_half(x) = cat(-x[.., d/2..], x[.., ..d/2])` on the last dimension.
pub fn rotate_half<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let d = x.dims()[D - 1];
    let x1 = x.clone().narrow(D - 1, 0, d / 2);
    let x2 = x.narrow(D - 1, d / 2, d - d / 2);
    Tensor::cat(vec![x2.neg(), x1], D - 1)
}

/// `x * cos + rotate_half(x) * sin`.
pub fn apply_rotary<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    cos: Tensor<B, D>,
    sin: Tensor<B, D>,
) -> Tensor<B, D> {
    x.clone() * cos + rotate_half(x) * sin
}

/// A half-precision (bf16 / f16) tensor cast to f32; any other tensor as it is (f32 and f64
/// stay untouched, so the f32 and f64 paths pay nothing).
pub fn upcast<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.cast(FloatDType::F32),
        _ => x,
    }
}

/// Cast `x` to the dtype of `like` (a no-op, and no autodiff node, when they already agree).
pub fn cast_like<B: Backend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    like: &Tensor<B, E>,
) -> Tensor<B, D> {
    x.cast(FloatDType::from(like.dtype()))
}

/// Every float parameter of `module` cast to `dtype`, keeping its id. Under autodiff the cast
/// is recorded, so a loss computed with the cast copy sends its gradients (cast back to f32)
/// to the original parameters: this is how mixed precision keeps f32 master weights while the
/// forward and backward run in bf16. Frozen parameters stay frozen.
pub fn cast_float_params<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.cast(self.0), mapper)
        }
    }
    module.map(&mut Cast(dtype))
}

/// The attention of one forward pass (one mask, one shape), shared by every layer.
#[derive(Debug, Clone)]
pub enum LayerAttention<B: Backend> {
    Flash(Arc<AttentionPlan>),
    /// The dense mask `[B, 1, Tq, Tk]`, true where masked.
    Reference(Tensor<B, 4, Bool>),
}

impl<B: ModelBackend> LayerAttention<B> {
    /// For `len_q` queries over the mask's keys. With few queries (decoding) the keys form one
    /// tile: a single product per layer, as plain attention.
    pub fn new(imp: AttentionImpl, mask: &AttentionMask, len_q: usize, device: &B::Device) -> Self {
        match imp {
            AttentionImpl::Flash(tiles) => {
                let tiles = if len_q <= 16 {
                    Tiles {
                        q: len_q.max(1),
                        k: mask.len_k().max(1),
                    }
                } else {
                    tiles
                };
                LayerAttention::Flash(Arc::new(AttentionPlan::new(mask, len_q, tiles)))
            }
            AttentionImpl::Reference => LayerAttention::Reference(mask.dense_mask(len_q, device)),
        }
    }

    /// q `[B, H, Tq, d]`, k and v `[B, KV, Tk, d]` -> `[B, H, Tq, d]`.
    pub fn attend(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            LayerAttention::Flash(plan) => attention(q, k, v, plan),
            LayerAttention::Reference(mask) => {
                let [b, h, tq, d] = q.dims();
                let [_, kvh, tk, _] = k.dims();
                let n_rep = h / kvh;
                let repeat = |x: Tensor<B, 4>| {
                    if n_rep == 1 {
                        x
                    } else {
                        x.unsqueeze_dim::<5>(2)
                            .expand([b, kvh, n_rep, tk, d])
                            .reshape([b, h, tk, d])
                    }
                };
                let opts = burn::tensor::ops::AttentionModuleOptions {
                    scale: None,
                    softcap: None,
                    is_causal: false,
                };
                burn::tensor::module::attention(
                    q,
                    repeat(k),
                    repeat(v),
                    Some(mask.clone().expand([b, h, tq, tk])),
                    None,
                    opts,
                )
            }
        }
    }

    /// Score elements the attention of one layer computes per head group (flash: the visited
    /// tiles; reference: the whole `Tq x Tk` matrix per row).
    pub fn score_elements(&self) -> usize {
        match self {
            LayerAttention::Flash(plan) => plan.score_elements(),
            LayerAttention::Reference(mask) => mask.dims().iter().product(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// The values of `e` fed in chunks of at most `max` (strips put in place by hand), and how
    /// many chunks came.
    fn collect(e: &ExportTensor, max: usize) -> (Vec<f32>, usize) {
        let (mut out, mut chunks) = (Vec::new(), 0);
        e.for_each_chunk(max, &mut |c| {
            match c {
                Chunk::Values(v) => out.extend_from_slice(v),
                Chunk::Strip {
                    src,
                    row0,
                    rows,
                    total_rows,
                    cols,
                    first,
                    count,
                } => {
                    out.resize((first + count) * total_rows, f32::NAN);
                    for r in 0..rows {
                        for c in first..first + count {
                            out[c * total_rows + row0 + r] = src[r * cols + c];
                        }
                    }
                }
            }
            chunks += 1;
            Ok(())
        })
        .unwrap();
        (out, chunks)
    }

    /// Saving a tensor a block at a time writes exactly the values of the whole tensor.
    #[test]
    fn chunked_exports_equal_whole() {
        let device = Default::default();
        let v: Vec<f32> = (0..35).map(|i| i as f32 * 0.5 - 3.0).collect();
        let w = tensor2::<NdArray<f32>>(v.clone(), [5, 7], &device);
        let e = export_transposed("w".into(), vec![7, 5], w.clone());
        // HF's [7, 5]: row c holds column c of the [5, 7] matrix.
        let whole: Vec<f32> = (0..35).map(|k| v[(k % 5) * 7 + k / 5]).collect();
        for max in [1, 4, 10, 35, 1000] {
            let (got, chunks) = collect(&e, max);
            assert_eq!(got, whole, "transposed, max {max}");
            assert_eq!(
                chunks,
                5usize.div_ceil((max / 7).max(1)),
                "transposed, max {max}"
            );
        }
        assert_eq!(e.values(), whole);
        let e = ExportTensor::of("w", w);
        for max in [1, 6, 7, 14, 1000] {
            let (got, chunks) = collect(&e, max);
            assert_eq!(got, v, "rows, max {max}");
            assert_eq!(chunks, 5usize.div_ceil((max / 7).max(1)), "rows, max {max}");
        }
        assert_eq!(e.values(), v);
    }
}

/// The vendored burn-flex walks permuted and broadcast tensors a contiguous row at a time
/// (`vendor/README.md`): the same values as ndarray, bit for bit, for the layouts the model
/// makes (a `[b, t, h, d]` projection viewed as `[b, h, t, d]`, cos/sin broadcast over heads).
#[cfg(all(test, feature = "flex"))]
mod flex_rows {
    use super::*;
    use burn::backend::{Flex, NdArray};

    fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn both(shape: [usize; 4]) -> (Tensor<Flex, 4>, Tensor<NdArray<f32>, 4>) {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 5.0)
            .collect();
        (
            Tensor::from_data(TensorData::new(v.clone(), shape), &Default::default()),
            Tensor::from_data(TensorData::new(v, shape), &Default::default()),
        )
    }

    #[test]
    fn permuted_and_broadcast_rows_match_ndarray() {
        let (xf, xn) = both([3, 5, 4, 16]); // [b, t, h, d]
        let (cf, cn) = both([3, 1, 5, 16]); // [b, 1, t, d]
        let (sf, sn) = both([3, 1, 5, 16]);
        let f = apply_rotary(xf.clone().swap_dims(1, 2), cf.clone(), sf);
        let n = apply_rotary(xn.clone().swap_dims(1, 2), cn.clone(), sn);
        assert_eq!(host(f), host(n));
        assert_eq!(
            host(xf.clone().swap_dims(1, 2) * cf.clone()),
            host(xn.clone().swap_dims(1, 2) * cn.clone())
        );
        assert_eq!(
            host(xf.clone().swap_dims(1, 2).mul_scalar(-1.5)),
            host(xn.clone().swap_dims(1, 2).mul_scalar(-1.5))
        );
        assert_eq!(
            host(xf.swap_dims(1, 2).reshape([3, 4, 80])),
            host(xn.swap_dims(1, 2).reshape([3, 4, 80]))
        );
    }
}
