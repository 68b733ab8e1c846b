//! Qwen2.5-VL configuration, read from an HF `config.json` in either layout.
//!
//! Old (flat) layout: text fields at the top level, `rope_scaling: {type: "mrope", mrope_section}`,
//! `vision_config.in_chans`. New layout: text fields under `text_config`, `rope_parameters:
//! {rope_type, mrope_section, rope_theta}`, `vision_config.in_channels`. Both exist in the wild.
//! Vision fields missing from the file take the Qwen2.5-VL-3B values (never the class defaults,
//! two of which are wrong for the 3B: hidden size 3584 and tokens_per_second 4).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The vision tower (ViT with window attention and a patch merger).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// Window size in pixels (112 for Qwen2.5-VL: 8 x 8 patches, 4 x 4 merged units).
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub out_hidden_size: usize,
    pub in_channels: usize,
    pub tokens_per_second: usize,
    pub rms_norm_eps: f64,
}

impl VisionConfig {
    /// The Qwen2.5-VL-3B vision tower.
    pub fn qwen2_5_vl_3b() -> Self {
        Self {
            depth: 32,
            hidden_size: 1280,
            num_heads: 16,
            intermediate_size: 3420,
            hidden_act: "silu".into(),
            patch_size: 14,
            temporal_patch_size: 2,
            spatial_merge_size: 2,
            window_size: 112,
            fullatt_block_indexes: vec![7, 15, 23, 31],
            out_hidden_size: 2048,
            in_channels: 3,
            tokens_per_second: 2,
            rms_norm_eps: 1e-6,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Number of values in one flattened patch: channels x temporal x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches per merged unit (4 for a 2 x 2 merge).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Window side in merged units: `window_size / merge / patch` (4 for Qwen2.5-VL).
    pub fn window_units(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }
}

/// The language model (Qwen2 decoder with M-RoPE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// M-RoPE sections (t, h, w) in frequency pairs; sums to head_dim / 2.
    pub mrope_section: [usize; 3],
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

impl TextConfig {
    pub fn qwen2_5_vl_3b() -> Self {
        Self {
            vocab_size: 151936,
            hidden_size: 2048,
            intermediate_size: 11008,
            num_hidden_layers: 36,
            num_attention_heads: 16,
            num_key_value_heads: 2,
            head_dim: 128,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            mrope_section: [16, 24, 24],
            tie_word_embeddings: true,
            max_position_embeddings: 128000,
        }
    }
}

/// Special token ids the model itself needs (read from the config, never hard-coded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TokenIds {
    pub image_token_id: Option<u32>,
    pub video_token_id: Option<u32>,
    pub vision_start_token_id: Option<u32>,
    pub vision_end_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// The whole Qwen2.5-VL configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen25VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tokens: TokenIds,
    /// `torch_dtype` / `dtype` of the file ("bfloat16", "float32", ...), if given.
    pub torch_dtype: Option<String>,
    /// The file as read, so that saving keeps every field we do not model.
    pub raw: Option<Value>,
}

fn get<'a>(objs: &[&'a Map<String, Value>], key: &str) -> Option<&'a Value> {
    objs.iter()
        .find_map(|o| o.get(key).filter(|v| !v.is_null()))
}

fn get_usize(objs: &[&Map<String, Value>], key: &str) -> Result<Option<usize>> {
    match get(objs, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .with_context(|| format!("`{key}` must be a non-negative integer, found {v}")),
    }
}

fn get_f64(objs: &[&Map<String, Value>], key: &str) -> Result<Option<f64>> {
    match get(objs, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("`{key}` must be a number, found {v}")),
    }
}

fn get_u32(objs: &[&Map<String, Value>], key: &str) -> Result<Option<u32>> {
    Ok(get_usize(objs, key)?.map(|x| x as u32))
}

fn req_usize(objs: &[&Map<String, Value>], key: &str) -> Result<usize> {
    get_usize(objs, key)?.with_context(|| format!("missing `{key}`"))
}

impl Qwen25VlConfig {
    /// Qwen2.5-VL-3B-Instruct with the given token ids.
    pub fn qwen2_5_vl_3b() -> Self {
        Self {
            text: TextConfig::qwen2_5_vl_3b(),
            vision: VisionConfig::qwen2_5_vl_3b(),
            tokens: TokenIds {
                image_token_id: Some(151655),
                video_token_id: Some(151656),
                vision_start_token_id: Some(151652),
                vision_end_token_id: Some(151653),
                eos_token_ids: vec![151645],
                bos_token_id: Some(151643),
                pad_token_id: Some(151643),
            },
            torch_dtype: Some("bfloat16".into()),
            raw: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in model config {}", path.display()))
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        Self::from_json(raw)
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let root = raw
            .as_object()
            .context("config.json must be a JSON object")?;
        let empty = Map::new();
        let text_cfg = root
            .get("text_config")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        // The text fields: `text_config` first (new layout), then the top level (old layout).
        let t: [&Map<String, Value>; 2] = [text_cfg, root];
        let rope = get(&t, "rope_parameters")
            .or_else(|| get(&t, "rope_scaling"))
            .and_then(Value::as_object)
            .unwrap_or(&empty);

        let hidden_size = req_usize(&t, "hidden_size")?;
        let num_attention_heads = req_usize(&t, "num_attention_heads")?;
        let num_key_value_heads =
            get_usize(&t, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim =
            get_usize(&t, "head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1));
        let mrope_section = match rope.get("mrope_section") {
            Some(Value::Array(a)) if a.len() == 3 => {
                let mut s = [0usize; 3];
                for (i, v) in a.iter().enumerate() {
                    s[i] = v.as_u64().context("mrope_section must hold integers")? as usize;
                }
                s
            }
            Some(v) => bail!("mrope_section must be a list of 3 integers, found {v}"),
            None => bail!("missing `rope_scaling.mrope_section` / `rope_parameters.mrope_section`"),
        };
        let rope_theta = match rope.get("rope_theta").and_then(Value::as_f64) {
            Some(x) => x,
            None => get_f64(&t, "rope_theta")?.unwrap_or(1e6),
        };
        let text = TextConfig {
            vocab_size: req_usize(&t, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(&t, "intermediate_size")?,
            num_hidden_layers: req_usize(&t, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act: get(&t, "hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu")
                .to_string(),
            rms_norm_eps: get_f64(&t, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            mrope_section,
            tie_word_embeddings: get(&[root, text_cfg], "tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: get_usize(&t, "max_position_embeddings")?.unwrap_or(128000),
        };

        let vobj = root
            .get("vision_config")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let v: [&Map<String, Value>; 1] = [vobj];
        let d = VisionConfig::qwen2_5_vl_3b();
        let vision = VisionConfig {
            depth: get_usize(&v, "depth")?.unwrap_or(d.depth),
            hidden_size: get_usize(&v, "hidden_size")?
                .or(get_usize(&v, "embed_dim")?)
                .unwrap_or(d.hidden_size),
            num_heads: get_usize(&v, "num_heads")?.unwrap_or(d.num_heads),
            intermediate_size: get_usize(&v, "intermediate_size")?.unwrap_or(d.intermediate_size),
            hidden_act: get(&v, "hidden_act")
                .and_then(Value::as_str)
                .unwrap_or("silu")
                .to_string(),
            patch_size: get_usize(&v, "patch_size")?
                .or(get_usize(&v, "spatial_patch_size")?)
                .unwrap_or(d.patch_size),
            temporal_patch_size: get_usize(&v, "temporal_patch_size")?
                .unwrap_or(d.temporal_patch_size),
            spatial_merge_size: get_usize(&v, "spatial_merge_size")?
                .unwrap_or(d.spatial_merge_size),
            window_size: get_usize(&v, "window_size")?.unwrap_or(d.window_size),
            fullatt_block_indexes: match v[0].get("fullatt_block_indexes") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|x| x as usize)
                            .context("fullatt_block_indexes must hold integers")
                    })
                    .collect::<Result<_>>()?,
                Some(other) => bail!("fullatt_block_indexes must be a list, found {other}"),
                None => d.fullatt_block_indexes.clone(),
            },
            // When absent, the merger must produce the language model's width.
            out_hidden_size: get_usize(&v, "out_hidden_size")?.unwrap_or(text.hidden_size),
            in_channels: get_usize(&v, "in_channels")?
                .or(get_usize(&v, "in_chans")?)
                .unwrap_or(d.in_channels),
            tokens_per_second: get_usize(&v, "tokens_per_second")?.unwrap_or(d.tokens_per_second),
            rms_norm_eps: get_f64(&v, "rms_norm_eps")?.unwrap_or(1e-6),
        };

        let all: [&Map<String, Value>; 2] = [root, text_cfg];
        let eos_token_ids = match get(&all, "eos_token_id") {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        };
        let tokens = TokenIds {
            image_token_id: get_u32(&all, "image_token_id")?,
            video_token_id: get_u32(&all, "video_token_id")?,
            vision_start_token_id: get_u32(&all, "vision_start_token_id")?,
            vision_end_token_id: get_u32(&all, "vision_end_token_id")?,
            eos_token_ids,
            bos_token_id: get_u32(&all, "bos_token_id")?,
            pad_token_id: get_u32(&all, "pad_token_id")?,
        };
        let torch_dtype = get(&all, "torch_dtype")
            .or_else(|| get(&all, "dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let cfg = Self {
            text,
            vision,
            tokens,
            torch_dtype,
            raw: Some(raw.clone()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Structural checks that would otherwise surface as shape errors deep in a forward pass.
    pub fn validate(&self) -> Result<()> {
        let t = &self.text;
        if t.num_attention_heads == 0 || t.num_key_value_heads == 0 {
            bail!("attention heads must be > 0");
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                t.num_attention_heads,
                t.num_key_value_heads
            );
        }
        let s: usize = t.mrope_section.iter().sum();
        if s * 2 != t.head_dim {
            bail!(
                "mrope_section {:?} sums to {s}, but head_dim / 2 is {}",
                t.mrope_section,
                t.head_dim / 2
            );
        }
        let v = &self.vision;
        if v.num_heads == 0
            || !v.hidden_size.is_multiple_of(v.num_heads)
            || !v.head_dim().is_multiple_of(4)
        {
            bail!(
                "vision hidden_size {} must split into {} heads of a size divisible by 4",
                v.hidden_size,
                v.num_heads
            );
        }
        if v.window_units() == 0 {
            bail!(
                "vision window_size {} is smaller than one merged unit",
                v.window_size
            );
        }
        if let Some(&b) = v.fullatt_block_indexes.iter().find(|&&b| b >= v.depth) {
            bail!(
                "fullatt_block_indexes holds {b} but the vision tower has depth {}",
                v.depth
            );
        }
        if v.out_hidden_size != t.hidden_size {
            bail!(
                "vision out_hidden_size {} differs from the text hidden_size {}",
                v.out_hidden_size,
                t.hidden_size
            );
        }
        if !matches!(t.hidden_act.as_str(), "silu" | "swish") {
            bail!(
                "text hidden_act `{}` is not supported (Qwen2.5-VL uses silu)",
                t.hidden_act
            );
        }
        if !matches!(v.hidden_act.as_str(), "silu" | "swish") {
            bail!(
                "vision hidden_act `{}` is not supported (Qwen2.5-VL uses silu)",
                v.hidden_act
            );
        }
        Ok(())
    }

    /// The configuration as an HF `config.json`. A config read from a file is written back as
    /// read (every field we do not model survives); a config built in code is written in the
    /// old flat layout, which every transformers version with Qwen2.5-VL reads.
    pub fn to_hf_json(&self) -> Value {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let t = &self.text;
        let v = &self.vision;
        let k = &self.tokens;
        let mut root = json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": t.mrope_section},
            "tie_word_embeddings": t.tie_word_embeddings,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "use_sliding_window": false,
            "sliding_window": t.max_position_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": self.torch_dtype.clone().unwrap_or_else(|| "float32".into()),
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "num_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "hidden_act": v.hidden_act,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": v.fullatt_block_indexes,
                "out_hidden_size": v.out_hidden_size,
                "in_chans": v.in_channels,
                "in_channels": v.in_channels,
                "tokens_per_second": v.tokens_per_second,
                "model_type": "qwen2_5_vl",
            },
        });
        let obj = root.as_object_mut().expect("object");
        let mut put = |key: &str, val: Option<u32>| {
            if let Some(x) = val {
                obj.insert(key.into(), json!(x));
            }
        };
        put("image_token_id", k.image_token_id);
        put("video_token_id", k.video_token_id);
        put("vision_start_token_id", k.vision_start_token_id);
        put("vision_end_token_id", k.vision_end_token_id);
        put("bos_token_id", k.bos_token_id);
        put("pad_token_id", k.pad_token_id);
        match k.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), json!(one));
            }
            many => {
                obj.insert("eos_token_id".into(), json!(many));
            }
        }
        root
    }

    /// The image token id, required whenever images are given.
    pub fn image_token_id(&self) -> Result<u32> {
        self.tokens
            .image_token_id
            .context("config.json has no `image_token_id`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_layout_with_sparse_vision_config_gets_3b_values() {
        let cfg = Qwen25VlConfig::from_json_str(
            r#"{"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                "image_token_id": 151655, "eos_token_id": 151645,
                "vision_config": {"hidden_size": 1280, "in_chans": 3, "out_hidden_size": 2048,
                                  "spatial_patch_size": 14, "tokens_per_second": 2}}"#,
        )
        .unwrap();
        assert_eq!(cfg.vision, VisionConfig::qwen2_5_vl_3b());
        assert_eq!(cfg.text, TextConfig::qwen2_5_vl_3b());
        assert_eq!(cfg.tokens.image_token_id, Some(151655));
    }

    #[test]
    fn new_layout_reads_text_config_and_rope_parameters() {
        let cfg = Qwen25VlConfig::from_json_str(
            r#"{"text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3]}}, "tie_word_embeddings": false, "image_token_id": 290,
                "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
                "in_channels": 3, "out_hidden_size": 64, "window_size": 56, "fullatt_block_indexes": [1]}}"#,
        )
        .unwrap();
        assert_eq!(cfg.text.head_dim, 16);
        assert_eq!(cfg.text.rope_theta, 10000.0);
        assert_eq!(cfg.text.rms_norm_eps, 1e-5);
        assert_eq!(cfg.text.mrope_section, [2, 3, 3]);
        assert!(!cfg.text.tie_word_embeddings);
        assert_eq!(cfg.vision.window_units(), 2);
        assert_eq!(cfg.vision.fullatt_block_indexes, vec![1]);
    }

    #[test]
    fn bad_mrope_section_is_an_error() {
        let err = Qwen25VlConfig::from_json_str(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 300,
                "rope_scaling": {"mrope_section": [2, 3, 4]}, "vision_config": {"out_hidden_size": 64}}"#,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("mrope_section"), "{err:#}");
    }

    #[test]
    fn built_config_round_trips_through_json() {
        let mut cfg = Qwen25VlConfig::qwen2_5_vl_3b();
        let back = Qwen25VlConfig::from_json(cfg.to_hf_json()).unwrap();
        cfg.raw = back.raw.clone();
        assert_eq!(back, cfg);
    }
}
