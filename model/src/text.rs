//! The language model: Qwen2 decoder layers with GQA, q/k/v bias, M-RoPE and a KV cache.

use crate::backend::ModelBackend;
use crate::config::TextConfig;
use crate::kv::{cohort_decode_attention, CohortKv};
use crate::nn::{apply_rotary, linear_rows, silu, LayerAttention, RmsNorm, Weights};
use anyhow::Result;
use burn::module::Module;
use burn::nn::{Embedding, Linear};
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

impl<B: Backend> DecoderLayer<B> {
    /// The layer's weights under `{p}.` (`model.layers.{i}`): see [`Weights`].
    pub fn weights(
        w: &mut Weights<B>,
        p: &str,
        cfg: &TextConfig,
        this: Option<&Self>,
    ) -> Result<Self> {
        let (c, mi, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let (h, kvh, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let at = |name: &str| format!("{p}.{name}");
        Ok(Self {
            input_layernorm: w.norm(
                &at("input_layernorm.weight"),
                c,
                eps,
                this.map(|l| &l.input_layernorm),
            )?,
            post_attention_layernorm: w.norm(
                &at("post_attention_layernorm.weight"),
                c,
                eps,
                this.map(|l| &l.post_attention_layernorm),
            )?,
            self_attn: TextAttention {
                q_proj: w.linear(
                    &at("self_attn.q_proj"),
                    c,
                    h * d,
                    true,
                    this.map(|l| &l.self_attn.q_proj),
                )?,
                k_proj: w.linear(
                    &at("self_attn.k_proj"),
                    c,
                    kvh * d,
                    true,
                    this.map(|l| &l.self_attn.k_proj),
                )?,
                v_proj: w.linear(
                    &at("self_attn.v_proj"),
                    c,
                    kvh * d,
                    true,
                    this.map(|l| &l.self_attn.v_proj),
                )?,
                o_proj: w.linear(
                    &at("self_attn.o_proj"),
                    h * d,
                    c,
                    false,
                    this.map(|l| &l.self_attn.o_proj),
                )?,
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: d,
            },
            mlp: TextMlp {
                gate_proj: w.linear(
                    &at("mlp.gate_proj"),
                    c,
                    mi,
                    false,
                    this.map(|l| &l.mlp.gate_proj),
                )?,
                up_proj: w.linear(
                    &at("mlp.up_proj"),
                    c,
                    mi,
                    false,
                    this.map(|l| &l.mlp.up_proj),
                )?,
                down_proj: w.linear(
                    &at("mlp.down_proj"),
                    mi,
                    c,
                    false,
                    this.map(|l| &l.mlp.down_proj),
                )?,
            },
        })
    }
}

impl<B: Backend> TextModel<B> {
    /// The language model's weights (`model.*`): see [`Weights`]. The layers come before the
    /// embedding, the order of HF's random initialisation here.
    pub fn weights(w: &mut Weights<B>, cfg: &TextConfig, this: Option<&Self>) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let layer = this.map(|m| &m.layers[i]);
            layers.push(DecoderLayer::weights(
                w,
                &format!("model.layers.{i}"),
                cfg,
                layer,
            )?);
        }
        let (vocab, c) = (cfg.vocab_size, cfg.hidden_size);
        Ok(Self {
            embed_tokens: w.embedding(
                "model.embed_tokens.weight",
                vocab,
                c,
                this.map(|m| &m.embed_tokens),
            )?,
            layers,
            norm: w.norm(
                "model.norm.weight",
                c,
                cfg.rms_norm_eps,
                this.map(|m| &m.norm),
            )?,
        })
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
