//! The language model: Qwen2 decoder layers with GQA, q/k/v bias, M-RoPE and a KV cache.

use crate::attention::{LayerAttention, ModelBackend};
use crate::config::TextConfig;
use crate::kv::{cohort_decode_attention, CohortKv};
use crate::nn::{
    apply_rotary, linear_export, linear_init, linear_load, linear_rows, silu, tensor2, RmsNorm,
    INIT_STD,
};
use crate::weights::{ExportTensor, WeightReader};
use anyhow::Result;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear};
use burn::prelude::*;

/// Keys and values of every layer for the tokens seen so far, plus what decoding needs to
/// continue: the per-row `rope_delta` and which cached positions are real (left padding).
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    /// Per layer `(k, v)`, each `[batch, kv_heads, cached, head_dim]`.
    pub layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Per batch row: position of cache index `i` is `i + rope_delta` on all three M-RoPE rows.
    pub rope_deltas: Vec<i64>,
    /// Per batch row and cached position: false for padding.
    pub key_valid: Vec<Vec<bool>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            rope_deltas: vec![],
            key_valid: vec![],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.key_valid.first().map(Vec::len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn batch_size(&self) -> usize {
        self.key_valid.len()
    }

    /// Keep only the given batch rows (in that order), e.g. to drop finished sequences.
    pub fn retain_rows(&mut self, rows: &[usize]) {
        if rows.len() == self.batch_size() && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return;
        }
        let device = match self.layers.iter().flatten().next() {
            Some((k, _)) => k.device(),
            None => return,
        };
        let idx = crate::nn::int1::<B>(rows, &device);
        for layer in self.layers.iter_mut().flatten() {
            layer.0 = layer.0.clone().select(0, idx.clone());
            layer.1 = layer.1.clone().select(0, idx.clone());
        }
        self.rope_deltas = rows.iter().map(|&r| self.rope_deltas[r]).collect();
        self.key_valid = rows.iter().map(|&r| self.key_valid[r].clone()).collect();
    }
}

#[derive(Module, Debug)]
pub struct TextAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: ModelBackend> TextAttention<B> {
    /// x: `[B, T, C]`; cos/sin: `[B, 1, T, head_dim]`; `attn`: which keys each query sees (see
    /// [`LayerAttention`]); with a cache, the new keys and values are appended to it first.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        attn: &LayerAttention<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = linear_rows(&self.q_proj, x.clone())
            .reshape([b, t, h, d])
            .swap_dims(1, 2);
        let k = linear_rows(&self.k_proj, x.clone())
            .reshape([b, t, kvh, d])
            .swap_dims(1, 2);
        let v = linear_rows(&self.v_proj, x)
            .reshape([b, t, kvh, d])
            .swap_dims(1, 2);
        let q = apply_rotary(q, cos.clone(), sin.clone());
        let k = apply_rotary(k, cos, sin);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        // GQA: the key/value heads are never repeated (the attention groups the query heads).
        let out = attn.attend(q, k, v);
        linear_rows(&self.o_proj, out.swap_dims(1, 2).reshape([b, t, h * d]))
    }
}

impl<B: ModelBackend> TextAttention<B> {
    /// One decode step of every row of `cohorts` (rows cohort by cohort, group by group): x
    /// `[rows, 1, C]`, cos/sin `[rows, 1, 1, head_dim]`. Each cohort's new keys and values are
    /// written into its cache in place, then attended with its prefixes (see [`crate::kv`]).
    pub fn forward_groups(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        cohorts: &mut [&mut CohortKv<B>],
        layer: usize,
    ) -> Result<Tensor<B, 3>> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = linear_rows(&self.q_proj, x.clone())
            .reshape([b, t, h, d])
            .swap_dims(1, 2);
        let k = linear_rows(&self.k_proj, x.clone())
            .reshape([b, t, kvh, d])
            .swap_dims(1, 2);
        let v = linear_rows(&self.v_proj, x)
            .reshape([b, t, kvh, d])
            .swap_dims(1, 2);
        let q = apply_rotary(q, cos.clone(), sin.clone());
        let k = apply_rotary(k, cos, sin);
        let mut outs = Vec::with_capacity(cohorts.len());
        let mut row = 0;
        for kv in cohorts.iter_mut() {
            let kv: &mut CohortKv<B> = kv;
            let n = kv.rows();
            let narrow = |x: &Tensor<B, 4>| {
                if n == b {
                    x.clone()
                } else {
                    x.clone().narrow(0, row, n)
                }
            };
            kv.write(layer, narrow(&k), narrow(&v))?;
            outs.push(cohort_decode_attention(narrow(&q), kv, layer));
            row += n;
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one cohort")
        } else {
            Tensor::cat(outs, 0)
        };
        Ok(linear_rows(
            &self.o_proj,
            out.swap_dims(1, 2).reshape([b, t, h * d]),
        ))
    }
}

#[derive(Module, Debug)]
pub struct TextMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> TextMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear_rows(
            &self.down_proj,
            silu(linear_rows(&self.gate_proj, x.clone())) * linear_rows(&self.up_proj, x),
        )
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: TextAttention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: TextMlp<B>,
}

impl<B: ModelBackend> DecoderLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        attn: &LayerAttention<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cos, sin, attn, cache);
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }
}

/// Embedding, decoder layers and the final norm (`model.*` in HF names).
#[derive(Module, Debug)]
pub struct TextModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

impl<B: Backend> TextModel<B> {
    pub fn init(cfg: &TextConfig, device: &B::Device) -> Self {
        let c = cfg.hidden_size;
        let (h, kvh, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: RmsNorm::init(c, cfg.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::init(c, cfg.rms_norm_eps, device),
                self_attn: TextAttention {
                    q_proj: linear_init(c, h * d, true, device),
                    k_proj: linear_init(c, kvh * d, true, device),
                    v_proj: linear_init(c, kvh * d, true, device),
                    o_proj: linear_init(h * d, c, false, device),
                    num_heads: h,
                    num_kv_heads: kvh,
                    head_dim: d,
                },
                mlp: TextMlp {
                    gate_proj: linear_init(c, cfg.intermediate_size, false, device),
                    up_proj: linear_init(c, cfg.intermediate_size, false, device),
                    down_proj: linear_init(cfg.intermediate_size, c, false, device),
                },
            })
            .collect();
        Self {
            embed_tokens: EmbeddingConfig::new(cfg.vocab_size, c)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: INIT_STD,
                })
                .init(device),
            layers,
            norm: RmsNorm::init(c, cfg.rms_norm_eps, device),
        }
    }

    pub fn load(cfg: &TextConfig, r: &mut WeightReader, device: &B::Device) -> Result<Self> {
        let c = cfg.hidden_size;
        let (h, kvh, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mi = cfg.intermediate_size;
        let eps = cfg.rms_norm_eps;
        let embed = r.take("model.embed_tokens.weight", &[cfg.vocab_size, c])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(
                    r,
                    &format!("{p}.input_layernorm.weight"),
                    c,
                    eps,
                    device,
                )?,
                post_attention_layernorm: RmsNorm::load(
                    r,
                    &format!("{p}.post_attention_layernorm.weight"),
                    c,
                    eps,
                    device,
                )?,
                self_attn: TextAttention {
                    q_proj: linear_load(
                        r,
                        &format!("{p}.self_attn.q_proj"),
                        c,
                        h * d,
                        true,
                        device,
                    )?,
                    k_proj: linear_load(
                        r,
                        &format!("{p}.self_attn.k_proj"),
                        c,
                        kvh * d,
                        true,
                        device,
                    )?,
                    v_proj: linear_load(
                        r,
                        &format!("{p}.self_attn.v_proj"),
                        c,
                        kvh * d,
                        true,
                        device,
                    )?,
                    o_proj: linear_load(
                        r,
                        &format!("{p}.self_attn.o_proj"),
                        h * d,
                        c,
                        false,
                        device,
                    )?,
                    num_heads: h,
                    num_kv_heads: kvh,
                    head_dim: d,
                },
                mlp: TextMlp {
                    gate_proj: linear_load(r, &format!("{p}.mlp.gate_proj"), c, mi, false, device)?,
                    up_proj: linear_load(r, &format!("{p}.mlp.up_proj"), c, mi, false, device)?,
                    down_proj: linear_load(r, &format!("{p}.mlp.down_proj"), mi, c, false, device)?,
                },
            });
        }
        Ok(Self {
            embed_tokens: Embedding {
                weight: Param::from_tensor(tensor2(embed, [cfg.vocab_size, c], device)),
            },
            layers,
            norm: RmsNorm::load(r, "model.norm.weight", c, eps, device)?,
        })
    }

    pub fn export(&self, out: &mut Vec<ExportTensor>) {
        out.push(ExportTensor::of(
            "model.embed_tokens.weight",
            self.embed_tokens.weight.val(),
        ));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            l.input_layernorm
                .export(&format!("{p}.input_layernorm.weight"), out);
            l.post_attention_layernorm
                .export(&format!("{p}.post_attention_layernorm.weight"), out);
            linear_export(&l.self_attn.q_proj, &format!("{p}.self_attn.q_proj"), out);
            linear_export(&l.self_attn.k_proj, &format!("{p}.self_attn.k_proj"), out);
            linear_export(&l.self_attn.v_proj, &format!("{p}.self_attn.v_proj"), out);
            linear_export(&l.self_attn.o_proj, &format!("{p}.self_attn.o_proj"), out);
            linear_export(&l.mlp.gate_proj, &format!("{p}.mlp.gate_proj"), out);
            linear_export(&l.mlp.up_proj, &format!("{p}.mlp.up_proj"), out);
            linear_export(&l.mlp.down_proj, &format!("{p}.mlp.down_proj"), out);
        }
        self.norm.export("model.norm.weight", out);
    }
}

impl<B: ModelBackend> TextModel<B> {
    /// Decoder layers and final norm for one decode step of the rows of `cohorts` (see
    /// [`TextAttention::forward_groups`]); x `[rows, 1, C]`.
    pub fn forward_groups(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        cohorts: &mut [&mut CohortKv<B>],
    ) -> Result<Tensor<B, 3>> {
        let mut x = x;
        for (i, l) in self.layers.iter().enumerate() {
            let a = l.self_attn.forward_groups(
                l.input_layernorm.forward(x.clone()),
                cos.clone(),
                sin.clone(),
                cohorts,
                i,
            )?;
            let y = x + a;
            x = y.clone() + l.mlp.forward(l.post_attention_layernorm.forward(y));
        }
        for kv in cohorts.iter_mut() {
            kv.len += 1;
        }
        Ok(self.norm.forward(x))
    }

    /// Decoder layers and final norm over input embeddings `[B, T, C]`.
    pub fn forward_embeds(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        attn: &LayerAttention<B>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, cos.clone(), sin.clone(), attn, slot);
        }
        self.norm.forward(x)
    }
}
