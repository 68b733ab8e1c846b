//! `Qwen2_5_VLForConditionalGeneration`: vision tower + language model + head, with the
//! embedding merge at image pad positions, M-RoPE positions and incremental decoding.

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::attention::{AttentionImpl, AttentionMask};
use crate::backend::ModelBackend;
use crate::config::Qwen25VlConfig;
use crate::kv::CohortKv;
use crate::nn::LayerAttention;
use crate::nn::{cast_like, int1, tensor2, Weights};
use crate::rope;
use crate::text::{KvCache, TextModel};
use crate::vision::VisionTower;
use crate::weights::{save_exports, ExportTensor, NamedTensor, SaveDtype, WeightReader};

/// One row's M-RoPE positions: temporal, height and width, each `[T]`.
pub type RowPositions = [Vec<i64>; 3];

/// A batch of token sequences (all of the same, padded length) and the images they refer to.
#[derive(Debug, Clone, Default)]
pub struct ModelInput {
    /// `[batch][seq]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[batch][seq]`, false for padding. `None`: every token is real.
    pub attention_mask: Option<Vec<Vec<bool>>>,
    /// Flattened patches of every image of the batch, rows in processor order: `[rows, patch_dim]`.
    pub pixel_values: Vec<f32>,
    /// `[t, h, w]` of every image, in the order the image pad runs appear (row by row).
    pub image_grids: Vec<[usize; 3]>,
    /// Packed rows (training): `[batch][seq]`, the sample each token belongs to (0, 1, ... in
    /// order; -1 for padding). Attention is block-diagonal, M-RoPE positions restart per sample.
    /// `None`: one sample per row, padding from `attention_mask`.
    pub segments: Option<Vec<Vec<i32>>>,
}

impl ModelInput {
    pub fn text(input_ids: Vec<Vec<u32>>) -> Self {
        Self {
            input_ids,
            ..Default::default()
        }
    }

    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map(Vec::len).unwrap_or(0)
    }

    fn valid(&self, b: usize) -> Vec<bool> {
        if let Some(s) = &self.segments {
            return s[b].iter().map(|&x| x >= 0).collect();
        }
        match &self.attention_mask {
            Some(m) => m[b].clone(),
            None => vec![true; self.input_ids[b].len()],
        }
    }

    /// Tokens that are not padding.
    pub fn real_tokens(&self) -> usize {
        (0..self.batch_size())
            .map(|b| self.valid(b).iter().filter(|&&v| v).count())
            .sum()
    }

    /// Per row and position: the sample id (one sample per unpacked row), -1 for padding.
    pub fn segment_ids(&self) -> Vec<Vec<i32>> {
        match &self.segments {
            Some(s) => s.clone(),
            None => (0..self.batch_size())
                .map(|b| {
                    self.valid(b)
                        .iter()
                        .map(|&v| if v { 0 } else { -1 })
                        .collect()
                })
                .collect(),
        }
    }
}

/// What every decoder layer of one forward pass takes besides its input (see
/// [`Qwen25VL::layer_inputs`]).
#[derive(Debug, Clone)]
pub struct LayerInputs<B: Backend> {
    /// `[B, 1, T, head_dim]` M-RoPE tables.
    pub cos: Tensor<B, 4>,
    pub sin: Tensor<B, 4>,
    pub attn: LayerAttention<B>,
}

#[derive(Module, Debug)]
pub struct Qwen25VL<B: Backend> {
    pub visual: VisionTower<B>,
    pub model: TextModel<B>,
    /// `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: Qwen25VlConfig,
    /// Which attention the forward passes run (memory-efficient by default).
    #[module(skip)]
    pub attention: AttentionImpl,
}

impl<B: Backend> Qwen25VL<B> {
    /// The model's weights: the vision tower, the language model and the head (see
    /// [`Weights`]: init, load and export all run through this).
    fn weights(w: &mut Weights<B>, config: &Qwen25VlConfig, this: Option<&Self>) -> Result<Self> {
        let t = &config.text;
        let visual = VisionTower::weights(w, &config.vision, this.map(|m| &m.visual))?;
        let model = TextModel::weights(w, t, this.map(|m| &m.model))?;
        let lm_head = if t.tie_word_embeddings {
            // Tied: the head is the embedding (a stored copy is dropped).
            w.skip_if_present("lm_head.weight", &[t.vocab_size, t.hidden_size])?;
            None
        } else {
            let head = this.and_then(|m| m.lm_head.as_ref());
            Some(w.linear("lm_head", t.hidden_size, t.vocab_size, false, head)?)
        };
        Ok(Self {
            visual,
            model,
            lm_head,
            config: config.clone(),
            attention: AttentionImpl::default(),
        })
    }

    /// Random init (HF's: normal std 0.02, zero biases, unit norms). Seed the backend first
    /// (`B::seed`) for a reproducible model.
    pub fn init(config: &Qwen25VlConfig, device: &B::Device) -> Self {
        Self::weights(&mut Weights::Init(device), config, None)
            .expect("a random initialisation reads nothing")
    }

    /// Load an HF model directory (config.json + safetensors, single or sharded).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = Qwen25VlConfig::from_dir(dir)?;
        Self::load_with_config(dir, config, device)
    }

    pub fn load_with_config(
        dir: &Path,
        config: Qwen25VlConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let mut r = WeightReader::open(dir)?;
        let model = Self::weights(&mut Weights::Load(&mut r, device), &config, None)?;
        r.finish()?;
        Ok(model)
    }

    /// Every tensor under its HF name (original scheme) and `[out, in]` layout, read from the
    /// device one at a time when asked for (see [`ExportTensor`]).
    pub fn exports(&self) -> Vec<ExportTensor> {
        let mut out = Vec::new();
        Self::weights(&mut Weights::Export(&mut out), &self.config, Some(self))
            .expect("every part of the model is there to export");
        out
    }

    /// Every tensor under its HF name (original scheme) and `[out, in]` layout, as host values.
    pub fn export_tensors(&self) -> Vec<NamedTensor> {
        self.exports()
            .into_iter()
            .map(ExportTensor::materialize)
            .collect()
    }

    /// Write `config.json` and safetensors (sharded past `max_shard_bytes`) into `dir`.
    /// Tokenizer, template and processor files are the caller's to copy (see `copy_aux_files`).
    pub fn save(&self, dir: &Path, dtype: SaveDtype, max_shard_bytes: usize) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        save_exports(dir, &self.exports(), dtype, max_shard_bytes)?;
        let mut cfg = self.config.to_hf_json();
        if let Some(obj) = cfg.as_object_mut() {
            let key = if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            obj.insert(key.into(), serde_json::json!(dtype.torch_name()));
            if self.lm_head.is_none() {
                obj.insert("tie_word_embeddings".into(), serde_json::json!(true));
            }
        }
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Logits of the head for hidden states `[.., C]`.
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        crate::nn::over_rows(hidden, |rows| rows.matmul(self.head_weight()))
    }

    /// The head as a `[C, V]` matrix (Qwen's `lm_head` has no bias): the untied `lm_head`'s
    /// weight, or a transposed view of the tied embedding.
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.model.embed_tokens.weight.val().transpose(),
        }
    }

    /// [`Self::head_weight`] laid out row-major, for computing logits of a few rows again and
    /// again (decoding): `hidden.matmul(head)` = [`Self::logits`]. A matmul against the tied
    /// head's transposed view makes the CPU backends copy the whole embedding (`V x C`) into
    /// row-major order on every call; this copies it once (the untied weight is used as it is).
    pub fn head_matrix(&self) -> Tensor<B, 2> {
        let w = self.head_weight();
        if self.lm_head.is_some() {
            return w;
        }
        let [c, v] = w.dims();
        w.reshape([c * v]).reshape([c, v])
    }

    /// The same model running `attention` (e.g. [`AttentionImpl::Reference`] in tests).
    pub fn with_attention(mut self, attention: AttentionImpl) -> Self {
        self.attention = attention;
        self
    }

    /// A new empty cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config.text.num_hidden_layers)
    }
}

impl<B: ModelBackend> Qwen25VL<B> {
    /// `log_softmax(logits / temperature)` at `targets` for final hidden states `rows [N, C]`
    /// (one target per row): `[N]`, f32. The logits are computed a chunk of rows at a time and
    /// never all at once, forward and backward ([`crate::head`]).
    pub fn target_logprobs(
        &self,
        rows: Tensor<B, 2>,
        targets: Vec<u32>,
        temperature: f64,
    ) -> Tensor<B, 1> {
        let w = self.head_matrix();
        let t = std::sync::Arc::new(crate::head::HeadTargets {
            targets,
            temperature,
            chunk: crate::head::HEAD_CHUNK,
        });
        crate::backend::target_logprobs(rows, w, &t)
    }

    /// Input embeddings `[B, T, C]` with the vision tower's output placed at the image pad tokens.
    pub fn embed(&self, input: &ModelInput, device: &B::Device) -> Result<Tensor<B, 3>> {
        let (b, t) = (input.batch_size(), input.seq_len());
        let c = self.config.text.hidden_size;
        let flat: Vec<i64> = input
            .input_ids
            .iter()
            .flat_map(|r| r.iter().map(|&x| x as i64))
            .collect();
        if flat.len() != b * t {
            bail!("input rows have different lengths");
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, t]), device);
        let text = self.model.embed_tokens.forward(ids);
        if input.image_grids.is_empty() {
            if let Some(img) = self.config.tokens.image_token_id {
                let n = input
                    .input_ids
                    .iter()
                    .flatten()
                    .filter(|&&x| x == img)
                    .count();
                if n > 0 {
                    bail!("the input holds {n} image tokens but no image was given");
                }
            }
            return Ok(text);
        }
        let image_token = self.config.image_token_id()?;
        let vcfg = &self.config.vision;
        let rows: usize = input.image_grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if input.pixel_values.len() != rows * vcfg.patch_dim() {
            bail!(
                "pixel_values hold {} values, the image grids need {rows} rows of {}",
                input.pixel_values.len(),
                vcfg.patch_dim()
            );
        }
        // In the patch embedding's dtype, as HF does (`pixel_values.to(proj.weight.dtype)`).
        let pixels = tensor2::<B>(input.pixel_values.clone(), [rows, vcfg.patch_dim()], device);
        let pixels = cast_like(pixels, &self.visual.patch_embed.weight.val());
        let image_embeds = self
            .visual
            .forward_with(pixels, &input.image_grids, self.attention);
        let n_embeds = rows / vcfg.merge_unit();
        // Where each position takes its embedding from: itself, or image embedding k.
        let mut map = Vec::with_capacity(b * t);
        let mut k = 0usize;
        for (p, &id) in input.input_ids.iter().flatten().enumerate() {
            if id == image_token {
                map.push(b * t + k);
                k += 1;
            } else {
                map.push(p);
            }
        }
        if k != n_embeds {
            bail!("image features and image tokens do not match: {k} image tokens in the text, {n_embeds} image embeddings");
        }
        let table = Tensor::cat(vec![text.reshape([b * t, c]), image_embeds], 0);
        Ok(table.select(0, int1::<B>(&map, device)).reshape([b, t, c]))
    }

    /// M-RoPE positions of a batch: per row `[3][T]` positions and the row's `rope_delta`.
    pub fn rope_positions(&self, input: &ModelInput) -> Result<(Vec<RowPositions>, Vec<i64>)> {
        let merge = self.config.vision.spatial_merge_size;
        let unit = merge * merge;
        let image_token = self.config.tokens.image_token_id;
        let mut grids = input.image_grids.iter();
        let mut positions = Vec::with_capacity(input.batch_size());
        let mut deltas = Vec::with_capacity(input.batch_size());
        if let Some(segments) = &input.segments {
            for (b, (row, seg)) in input.input_ids.iter().zip(segments).enumerate() {
                let n_img_tokens = row
                    .iter()
                    .zip(seg)
                    .filter(|(&x, &s)| s >= 0 && Some(x) == image_token)
                    .count();
                let mut row_grids = Vec::new();
                let mut have = 0;
                while have < n_img_tokens {
                    let Some(g) = grids.next() else {
                        bail!("row {b} holds {n_img_tokens} image tokens but the image grids run out after {have}");
                    };
                    have += g[0] * g[1] * g[2] / unit;
                    row_grids.push(*g);
                }
                let p = rope::rope_index_packed(row, seg, image_token, &row_grids, merge)
                    .with_context(|| format!("positions of packed row {b}"))?;
                positions.push(p);
                deltas.push(0);
            }
            if grids.next().is_some() {
                bail!("more images than image token runs in the batch");
            }
            return Ok((positions, deltas));
        }
        for (b, row) in input.input_ids.iter().enumerate() {
            let valid = input.valid(b);
            let n_img_tokens = row
                .iter()
                .zip(&valid)
                .filter(|(&x, &v)| v && Some(x) == image_token)
                .count();
            let mut row_grids = Vec::new();
            let mut have = 0;
            while have < n_img_tokens {
                let Some(g) = grids.next() else {
                    bail!("row {b} holds {n_img_tokens} image tokens but the image grids run out after {have}");
                };
                have += g[0] * g[1] * g[2] / unit;
                row_grids.push(*g);
            }
            if have != n_img_tokens {
                bail!("row {b}: {n_img_tokens} image tokens do not match the grids of its images ({have} tokens)");
            }
            let (p, d) = rope::rope_index_padded(row, &valid, image_token, &row_grids, merge)
                .with_context(|| format!("positions of batch row {b}"))?;
            positions.push(p);
            deltas.push(d);
        }
        if grids.next().is_some() {
            bail!("more images than image token runs in the batch");
        }
        Ok((positions, deltas))
    }

    /// cos / sin `[B, 1, T, head_dim]` for the given position rows.
    fn cos_sin(
        &self,
        positions: &[[Vec<i64>; 3]],
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let t = &self.config.text;
        let b = positions.len();
        let n = positions.first().map(|p| p[0].len()).unwrap_or(0);
        let mut cos = Vec::with_capacity(b * n * t.head_dim);
        let mut sin = Vec::with_capacity(b * n * t.head_dim);
        for p in positions {
            let (c, s) = rope::mrope_cos_sin(
                [&p[0], &p[1], &p[2]],
                t.head_dim,
                t.rope_theta,
                t.mrope_section,
            );
            cos.extend(c);
            sin.extend(s);
        }
        let shape = [b, 1, n, t.head_dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }

    /// Final hidden states `[B, T, C]` (after the last norm). With a cache, this is the prefill:
    /// the cache must be empty and is filled with the keys and values of every position.
    pub fn forward_hidden(
        &self,
        input: &ModelInput,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let device = self
            .devices()
            .into_iter()
            .next()
            .context("model has no parameters")?;
        let embeds = self.embed(input, &device)?;
        let (layer_inputs, deltas) = self.layer_inputs(input, embeds.dtype(), &device)?;
        let cache = match cache {
            Some(c) => {
                if !c.is_empty() {
                    bail!("forward_hidden with a cache is a prefill: the cache must be empty");
                }
                if input.segments.is_some() {
                    bail!("packed rows are for training: a prefill takes one sample per row");
                }
                c.rope_deltas = deltas;
                c.key_valid = (0..input.batch_size()).map(|b| input.valid(b)).collect();
                Some(c)
            }
            None => None,
        };
        let LayerInputs { cos, sin, attn } = layer_inputs;
        Ok(self.model.forward_embeds(embeds, cos, sin, &attn, cache))
    }

    /// What every decoder layer takes besides its input, for a batch: the M-RoPE tables (in the
    /// compute dtype `dtype`) and the attention (mask and plan); with each row's `rope_delta`.
    pub fn layer_inputs(
        &self,
        input: &ModelInput,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Result<(LayerInputs<B>, Vec<i64>)> {
        let (positions, deltas) = self.rope_positions(input)?;
        let (cos, sin) = self.cos_sin(&positions, device);
        // The tables are computed in f32 and used in the compute dtype (HF: `cos.to(x.dtype)`).
        let dtype = burn::tensor::FloatDType::from(dtype);
        let (cos, sin) = (cos.cast(dtype), sin.cast(dtype));
        let mask = AttentionMask {
            key_segments: input.segment_ids(),
            causal: true,
        };
        let attn = LayerAttention::new(self.attention, &mask, input.seq_len(), device);
        Ok((LayerInputs { cos, sin, attn }, deltas))
    }

    /// Logits `[B, T, V]` of every position.
    pub fn forward(&self, input: &ModelInput) -> Result<Tensor<B, 3>> {
        Ok(self.logits(self.forward_hidden(input, None)?))
    }

    /// Feed new text tokens (`[B][n]`, all real) after what the cache holds; returns the final
    /// hidden states `[B, n, C]`. Positions continue at `cache index + rope_delta`.
    pub fn decode_hidden(
        &self,
        tokens: &[Vec<u32>],
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let device = self
            .devices()
            .into_iter()
            .next()
            .context("model has no parameters")?;
        let b = tokens.len();
        if b != cache.batch_size() {
            bail!(
                "decode: {b} rows but the cache holds {}",
                cache.batch_size()
            );
        }
        let n = tokens[0].len();
        let start = cache.len() as i64;
        let positions: Vec<[Vec<i64>; 3]> = cache
            .rope_deltas
            .iter()
            .map(|&d| {
                let row: Vec<i64> = (0..n as i64).map(|i| start + i + d).collect();
                [row.clone(), row.clone(), row]
            })
            .collect();
        let (cos, sin) = self.cos_sin(&positions, &device);
        for v in cache.key_valid.iter_mut() {
            v.extend(std::iter::repeat_n(true, n));
        }
        let attn = LayerAttention::new(
            self.attention,
            &AttentionMask::from_valid(&cache.key_valid, true),
            n,
            &device,
        );
        let flat: Vec<i64> = tokens
            .iter()
            .flat_map(|r| r.iter().map(|&x| x as i64))
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, n]), &device);
        let embeds = self.model.embed_tokens.forward(ids);
        let (cos, sin) = (cast_like(cos, &embeds), cast_like(sin, &embeds));
        Ok(self
            .model
            .forward_embeds(embeds, cos, sin, &attn, Some(cache)))
    }
}

impl<B: ModelBackend> Qwen25VL<B> {
    /// Prefill the prompts of a left-padded batch (one row per group) into one [`CohortKv`]:
    /// the batch's keys and values kept as they are (no copy per group or sample), for `rows[g]`
    /// sequences of up to `capacity` new tokens each in group `g`. Returns the cohort and the
    /// last prompt position's hidden state `[G, C]`.
    pub fn prefill_groups(
        &self,
        input: &ModelInput,
        rows: &[usize],
        capacity: usize,
    ) -> Result<(CohortKv<B>, Tensor<B, 2>)> {
        let (g, t) = (input.batch_size(), input.seq_len());
        if rows.len() != g {
            bail!("prefill: {g} prompts but {} group sizes", rows.len());
        }
        let mut cache = self.new_cache();
        let hidden = self.forward_hidden(input, Some(&mut cache))?;
        let c = hidden.dims()[2];
        let last = hidden.narrow(1, t - 1, 1).reshape([g, c]);
        let prefix = cache
            .layers
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .context("prefill left a layer's cache empty")?;
        let cohort = CohortKv::new(prefix, &cache.key_valid, &cache.rope_deltas, rows, capacity)?;
        Ok((cohort, last))
    }

    /// One decode step: `tokens[i]` is the next input of row `i` (rows cohort by cohort, group
    /// by group); the final hidden states `[rows, C]`.
    pub fn decode_groups(
        &self,
        tokens: &[u32],
        cohorts: &mut [&mut CohortKv<B>],
    ) -> Result<Tensor<B, 2>> {
        let device = self
            .devices()
            .into_iter()
            .next()
            .context("model has no parameters")?;
        let rows: usize = cohorts.iter().map(|c| c.rows()).sum();
        if rows != tokens.len() {
            bail!("decode: {} tokens for {rows} rows", tokens.len());
        }
        let positions: Vec<[Vec<i64>; 3]> = cohorts
            .iter()
            .flat_map(|c| c.next_positions())
            .map(|p| [vec![p], vec![p], vec![p]])
            .collect();
        let (cos, sin) = self.cos_sin(&positions, &device);
        let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, 1]), &device);
        let embeds = self.model.embed_tokens.forward(ids);
        let (cos, sin) = (cast_like(cos, &embeds), cast_like(sin, &embeds));
        let h = self.model.forward_groups(embeds, cos, sin, cohorts)?;
        let c = h.dims()[2];
        Ok(h.reshape([rows, c]))
    }
}

/// The tokenizer, chat template, processor and generation files of an HF model directory: what
/// [`copy_aux_files`] copies beside an export.
pub const AUX_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
];

/// Copy the [`AUX_FILES`] of an HF model directory that exist.
pub fn copy_aux_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for f in AUX_FILES {
        let src = from.join(f);
        if src.exists() {
            std::fs::copy(&src, to.join(f))
                .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
            copied.push(f.to_string());
        }
    }
    Ok(copied)
}
