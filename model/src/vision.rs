//! The Qwen2.5-VL vision tower: patch embedding, 2D rotary, window / full attention blocks,
//! patch merger.
//!
//! Attention runs within segments (windows or whole frames) and never builds an N x N mask
//! over all patches: segments are gathered into a `[segments, heads, L, head_dim]` batch padded
//! to the longest segment, padding keys unseen, and attended with the memory-efficient attention
//! (`crate::attention`): windowed blocks hold `segments x L^2` scores (linear in the number of
//! windows), full-attention blocks one tile per head at a time.

use anyhow::Result;
use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::FloatDType;

use crate::attention::{AttentionImpl, AttentionMask, LayerAttention, ModelBackend};
use crate::config::VisionConfig;
use crate::nn::{
    apply_rotary, int1, linear_export, linear_init, linear_load, silu, tensor2, upcast, RmsNorm,
};
use crate::rope;
use crate::weights::{ExportTensor, WeightReader};

thread_local! {
    static FORWARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Vision tower forward passes called from this thread so far (the rollout engine's tests count
/// that a prompt's image goes through the tower once for all its samples; per thread, so tests
/// running in parallel do not see each other's forwards).
pub fn forward_count() -> usize {
    FORWARDS.with(|c| c.get())
}

/// How the tokens of one forward pass split into attention segments.
pub struct SegmentPlan<B: Backend> {
    n_tokens: usize,
    n_seg: usize,
    max_len: usize,
    /// `Some` when segments differ in length: gather / scatter indices.
    ragged: Option<Ragged<B>>,
    /// Non-causal attention within each segment row, padding keys (ragged segments) unseen.
    attn: LayerAttention<B>,
}

struct Ragged<B: Backend> {
    /// `[n_seg * max_len]`: token index of each padded slot (0 for padding).
    gather: Tensor<B, 1, Int>,
    /// `[n_tokens]`: padded slot of each token.
    scatter: Tensor<B, 1, Int>,
}

impl<B: ModelBackend> SegmentPlan<B> {
    /// From cumulative boundaries `cu = [0, a, b, ..., N]`.
    pub fn new(cu: &[usize], imp: AttentionImpl, device: &B::Device) -> Self {
        let lens: Vec<usize> = cu
            .windows(2)
            .map(|w| w[1] - w[0])
            .filter(|&l| l > 0)
            .collect();
        let n_tokens = *cu.last().unwrap_or(&0);
        let n_seg = lens.len();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let valid: Vec<Vec<bool>> = lens
            .iter()
            .map(|&l| (0..max_len).map(|j| j < l).collect())
            .collect();
        let attn = LayerAttention::new(
            imp,
            &AttentionMask::from_valid(&valid, false),
            max_len,
            device,
        );
        if lens.iter().all(|&l| l == max_len) {
            return Self {
                n_tokens,
                n_seg,
                max_len,
                ragged: None,
                attn,
            };
        }
        let mut gather = vec![0usize; n_seg * max_len];
        let mut scatter = Vec::with_capacity(n_tokens);
        let mut start = 0;
        for (s, &l) in lens.iter().enumerate() {
            for j in 0..l {
                gather[s * max_len + j] = start + j;
                scatter.push(s * max_len + j);
            }
            start += l;
        }
        let ragged = Some(Ragged {
            gather: int1(&gather, device),
            scatter: int1(&scatter, device),
        });
        Self {
            n_tokens,
            n_seg,
            max_len,
            ragged,
            attn,
        }
    }

    /// Attention scores one head computes (flash: the visited tiles).
    pub fn score_elements(&self) -> usize {
        self.attn.score_elements()
    }

    /// Segments x (longest segment)^2: what a dense attention over the padded segments holds.
    pub fn dense_score_elements(&self) -> usize {
        self.n_seg * self.max_len * self.max_len
    }

    /// Non-causal attention within segments. q, k, v: `[N, heads, head_dim]` -> `[N, heads * head_dim]`.
    pub fn attend(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 2> {
        let [n, h, d] = q.dims();
        debug_assert_eq!(n, self.n_tokens);
        let (s, l) = (self.n_seg, self.max_len);
        match &self.ragged {
            None => {
                let split = |x: Tensor<B, 3>| x.reshape([s, l, h, d]).swap_dims(1, 2);
                let out = self.attn.attend(split(q), split(k), split(v));
                out.swap_dims(1, 2).reshape([n, h * d])
            }
            Some(r) => {
                let split = |x: Tensor<B, 3>| {
                    x.select(0, r.gather.clone())
                        .reshape([s, l, h, d])
                        .swap_dims(1, 2)
                };
                let out = self.attn.attend(split(q), split(k), split(v));
                out.swap_dims(1, 2)
                    .reshape([s * l, h * d])
                    .select(0, r.scatter.clone())
            }
        }
    }
}

#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub num_heads: usize,
}

impl<B: ModelBackend> VisionAttention<B> {
    /// x: `[N, C]`; cos/sin: `[N, 1, head_dim]`.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: Tensor<B, 3>,
        sin: Tensor<B, 3>,
        plan: &SegmentPlan<B>,
    ) -> Tensor<B, 2> {
        let [n, c] = x.dims();
        let h = self.num_heads;
        let d = c / h;
        let qkv = self.qkv.forward(x).reshape([n, 3, h, d]);
        let q = qkv.clone().narrow(1, 0, 1).reshape([n, h, d]);
        let k = qkv.clone().narrow(1, 1, 1).reshape([n, h, d]);
        let v = qkv.narrow(1, 2, 1).reshape([n, h, d]);
        // As HF's apply_rotary_pos_emb_vision: the rotation in f32, then back to the compute dtype.
        let dtype = FloatDType::from(q.dtype());
        let q = apply_rotary(upcast(q), cos.clone(), sin.clone()).cast(dtype);
        let k = apply_rotary(upcast(k), cos, sin).cast(dtype);
        self.proj.forward(plan.attend(q, k, v))
    }
}

#[derive(Module, Debug)]
pub struct VisionMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> VisionMlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct VisionBlock<B: Backend> {
    pub norm1: RmsNorm<B>,
    pub norm2: RmsNorm<B>,
    pub attn: VisionAttention<B>,
    pub mlp: VisionMlp<B>,
}

impl<B: ModelBackend> VisionBlock<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: Tensor<B, 3>,
        sin: Tensor<B, 3>,
        plan: &SegmentPlan<B>,
    ) -> Tensor<B, 2> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), cos, sin, plan);
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// `ln_q`, then each merged unit's `merge^2` patches concatenated, Linear, exact GELU, Linear.
#[derive(Module, Debug)]
pub struct PatchMerger<B: Backend> {
    pub ln_q: RmsNorm<B>,
    pub mlp0: Linear<B>,
    pub mlp2: Linear<B>,
    pub unit: usize,
}

impl<B: Backend> PatchMerger<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, c] = x.dims();
        let x = self.ln_q.forward(x).reshape([n / self.unit, c * self.unit]);
        self.mlp2.forward(gelu(self.mlp0.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct VisionTower<B: Backend> {
    /// The Conv3d with stride = kernel, as a linear map of the flattened patch (no bias).
    pub patch_embed: Linear<B>,
    pub blocks: Vec<VisionBlock<B>>,
    pub merger: PatchMerger<B>,
    #[module(skip)]
    pub config: VisionConfig,
}

impl<B: Backend> VisionTower<B> {
    pub fn init(cfg: &VisionConfig, device: &B::Device) -> Self {
        let c = cfg.hidden_size;
        let unit = cfg.merge_unit();
        let blocks = (0..cfg.depth)
            .map(|_| VisionBlock {
                norm1: RmsNorm::init(c, cfg.rms_norm_eps, device),
                norm2: RmsNorm::init(c, cfg.rms_norm_eps, device),
                attn: VisionAttention {
                    qkv: linear_init(c, 3 * c, true, device),
                    proj: linear_init(c, c, true, device),
                    num_heads: cfg.num_heads,
                },
                mlp: VisionMlp {
                    gate_proj: linear_init(c, cfg.intermediate_size, true, device),
                    up_proj: linear_init(c, cfg.intermediate_size, true, device),
                    down_proj: linear_init(cfg.intermediate_size, c, true, device),
                },
            })
            .collect();
        Self {
            patch_embed: linear_init(cfg.patch_dim(), c, false, device),
            blocks,
            merger: PatchMerger {
                ln_q: RmsNorm::init(c, cfg.rms_norm_eps, device),
                mlp0: linear_init(c * unit, c * unit, true, device),
                mlp2: linear_init(c * unit, cfg.out_hidden_size, true, device),
                unit,
            },
            config: cfg.clone(),
        }
    }

    pub fn load(cfg: &VisionConfig, r: &mut WeightReader, device: &B::Device) -> Result<Self> {
        let c = cfg.hidden_size;
        let unit = cfg.merge_unit();
        let eps = cfg.rms_norm_eps;
        let mi = cfg.intermediate_size;
        // Conv3d weight [C, in, t, p, p] is the linear map [C, patch_dim] in the processor's order.
        let pe = r.take_transposed_as(
            "visual.patch_embed.proj.weight",
            &[
                c,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ],
            c,
            cfg.patch_dim(),
        )?;
        let patch_embed = Linear {
            weight: burn::module::Param::from_tensor(tensor2(pe, [cfg.patch_dim(), c], device)),
            bias: None,
        };
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let p = format!("visual.blocks.{i}");
            blocks.push(VisionBlock {
                norm1: RmsNorm::load(r, &format!("{p}.norm1.weight"), c, eps, device)?,
                norm2: RmsNorm::load(r, &format!("{p}.norm2.weight"), c, eps, device)?,
                attn: VisionAttention {
                    qkv: linear_load(r, &format!("{p}.attn.qkv"), c, 3 * c, true, device)?,
                    proj: linear_load(r, &format!("{p}.attn.proj"), c, c, true, device)?,
                    num_heads: cfg.num_heads,
                },
                mlp: VisionMlp {
                    gate_proj: linear_load(r, &format!("{p}.mlp.gate_proj"), c, mi, true, device)?,
                    up_proj: linear_load(r, &format!("{p}.mlp.up_proj"), c, mi, true, device)?,
                    down_proj: linear_load(r, &format!("{p}.mlp.down_proj"), mi, c, true, device)?,
                },
            });
        }
        let merger = PatchMerger {
            ln_q: RmsNorm::load(r, "visual.merger.ln_q.weight", c, eps, device)?,
            mlp0: linear_load(r, "visual.merger.mlp.0", c * unit, c * unit, true, device)?,
            mlp2: linear_load(
                r,
                "visual.merger.mlp.2",
                c * unit,
                cfg.out_hidden_size,
                true,
                device,
            )?,
            unit,
        };
        Ok(Self {
            patch_embed,
            blocks,
            merger,
            config: cfg.clone(),
        })
    }

    pub fn export(&self, out: &mut Vec<ExportTensor>) {
        let cfg = &self.config;
        let c = cfg.hidden_size;
        let w = self.patch_embed.weight.val();
        out.push(crate::nn::export_transposed(
            "visual.patch_embed.proj.weight".into(),
            vec![
                c,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ],
            w,
        ));
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("visual.blocks.{i}");
            b.norm1.export(&format!("{p}.norm1.weight"), out);
            b.norm2.export(&format!("{p}.norm2.weight"), out);
            linear_export(&b.attn.qkv, &format!("{p}.attn.qkv"), out);
            linear_export(&b.attn.proj, &format!("{p}.attn.proj"), out);
            linear_export(&b.mlp.gate_proj, &format!("{p}.mlp.gate_proj"), out);
            linear_export(&b.mlp.up_proj, &format!("{p}.mlp.up_proj"), out);
            linear_export(&b.mlp.down_proj, &format!("{p}.mlp.down_proj"), out);
        }
        self.merger.ln_q.export("visual.merger.ln_q.weight", out);
        linear_export(&self.merger.mlp0, "visual.merger.mlp.0", out);
        linear_export(&self.merger.mlp2, "visual.merger.mlp.2", out);
    }
}

impl<B: ModelBackend> VisionTower<B> {
    /// pixel_values: `[N, patch_dim]` rows in the processor's merge-unit order, images
    /// concatenated; grids: `[t, h, w]` per image. Returns `[N / merge^2, out_hidden]` in raster
    /// (merged-unit) order, the order of the image pad tokens.
    pub fn forward(&self, pixel_values: Tensor<B, 2>, grids: &[[usize; 3]]) -> Tensor<B, 2> {
        self.forward_with(pixel_values, grids, AttentionImpl::default())
    }

    /// [`Self::forward`] with the given attention.
    pub fn forward_with(
        &self,
        pixel_values: Tensor<B, 2>,
        grids: &[[usize; 3]],
        imp: AttentionImpl,
    ) -> Tensor<B, 2> {
        FORWARDS.with(|c| c.set(c.get() + 1));
        let cfg = &self.config;
        let device = pixel_values.device();
        let [n, _] = pixel_values.dims();
        let unit = cfg.merge_unit();
        let c = cfg.hidden_size;
        let head_dim = cfg.head_dim();

        let (win_index, cu_window) =
            rope::window_index(grids, cfg.spatial_merge_size, cfg.window_units());
        let win_tensor = int1::<B>(&win_index, &device);

        let x = self.patch_embed.forward(pixel_values);
        let x = x
            .reshape([n / unit, unit * c])
            .select(0, win_tensor)
            .reshape([n, c]);

        // Rotary table in window order.
        let positions = rope::vision_patch_positions(grids, cfg.spatial_merge_size);
        let mut ordered = Vec::with_capacity(n);
        for &u in &win_index {
            ordered.extend_from_slice(&positions[u * unit..(u + 1) * unit]);
        }
        let (cos, sin) = rope::vision_cos_sin(&ordered, head_dim);
        let cos = tensor2::<B>(cos, [n, head_dim], &device).reshape([n, 1, head_dim]);
        let sin = tensor2::<B>(sin, [n, head_dim], &device).reshape([n, 1, head_dim]);

        let window_plan = SegmentPlan::new(&cu_window, imp, &device);
        let full_plan = SegmentPlan::new(&rope::full_cu_seqlens(grids), imp, &device);
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let plan = if cfg.fullatt_block_indexes.contains(&i) {
                &full_plan
            } else {
                &window_plan
            };
            x = block.forward(x, cos.clone(), sin.clone(), plan);
        }
        let merged = self.merger.forward(x);
        let reverse = rope::inverse_permutation(&win_index);
        merged.select(0, int1::<B>(&reverse, &device))
    }
}
