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

use crate::attention::{AttentionImpl, AttentionMask};
use crate::backend::ModelBackend;
use crate::config::VisionConfig;
use crate::nn::{apply_rotary, int1, silu, tensor2, upcast, LayerAttention, RmsNorm, Weights};
use crate::rope;

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

impl<B: Backend> VisionBlock<B> {
    /// The block's weights under `{p}.` (`visual.blocks.{i}`): see [`Weights`].
    pub fn weights(
        w: &mut Weights<B>,
        p: &str,
        cfg: &VisionConfig,
        this: Option<&Self>,
    ) -> Result<Self> {
        let (c, mi, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let at = |name: &str| format!("{p}.{name}");
        Ok(Self {
            norm1: w.norm(&at("norm1.weight"), c, eps, this.map(|b| &b.norm1))?,
            norm2: w.norm(&at("norm2.weight"), c, eps, this.map(|b| &b.norm2))?,
            attn: VisionAttention {
                qkv: w.linear(&at("attn.qkv"), c, 3 * c, true, this.map(|b| &b.attn.qkv))?,
                proj: w.linear(&at("attn.proj"), c, c, true, this.map(|b| &b.attn.proj))?,
                num_heads: cfg.num_heads,
            },
            mlp: VisionMlp {
                gate_proj: w.linear(
                    &at("mlp.gate_proj"),
                    c,
                    mi,
                    true,
                    this.map(|b| &b.mlp.gate_proj),
                )?,
                up_proj: w.linear(
                    &at("mlp.up_proj"),
                    c,
                    mi,
                    true,
                    this.map(|b| &b.mlp.up_proj),
                )?,
                down_proj: w.linear(
                    &at("mlp.down_proj"),
                    mi,
                    c,
                    true,
                    this.map(|b| &b.mlp.down_proj),
                )?,
            },
        })
    }
}

impl<B: Backend> VisionTower<B> {
    /// A randomly initialised tower (HF's initialisation; seed the backend first).
    pub fn init(cfg: &VisionConfig, device: &B::Device) -> Self {
        Self::weights(&mut Weights::Init(device), cfg, None)
            .expect("a random initialisation reads nothing")
    }

    /// The tower's weights (`visual.*`): see [`Weights`]. The blocks come first, the order of
    /// HF's random initialisation here. The patch embedding is a Conv3d `[C, in, t, p, p]`, the
    /// linear map `[C, patch_dim]` in the processor's order.
    pub fn weights(w: &mut Weights<B>, cfg: &VisionConfig, this: Option<&Self>) -> Result<Self> {
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let block = this.map(|t| &t.blocks[i]);
            blocks.push(VisionBlock::weights(
                w,
                &format!("visual.blocks.{i}"),
                cfg,
                block,
            )?);
        }
        let (c, unit, eps) = (cfg.hidden_size, cfg.merge_unit(), cfg.rms_norm_eps);
        let (t, p) = (cfg.temporal_patch_size, cfg.patch_size);
        let conv = [c, cfg.in_channels, t, p, p];
        let merger = this.map(|t| &t.merger);
        Ok(Self {
            patch_embed: w.linear_shaped(
                "visual.patch_embed.proj.weight",
                &conv,
                cfg.patch_dim(),
                c,
                this.map(|t| &t.patch_embed),
            )?,
            blocks,
            merger: PatchMerger {
                ln_q: w.norm("visual.merger.ln_q.weight", c, eps, merger.map(|m| &m.ln_q))?,
                mlp0: w.linear(
                    "visual.merger.mlp.0",
                    c * unit,
                    c * unit,
                    true,
                    merger.map(|m| &m.mlp0),
                )?,
                mlp2: w.linear(
                    "visual.merger.mlp.2",
                    c * unit,
                    cfg.out_hidden_size,
                    true,
                    merger.map(|m| &m.mlp2),
                )?,
                unit,
            },
            config: cfg.clone(),
        })
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
