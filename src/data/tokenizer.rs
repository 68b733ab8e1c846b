//! The text tokenizer (`DIR/tokenizer.json`, HF `tokenizers`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// Ids of the special tokens the pipeline needs, resolved from the tokenizer by their strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub image_pad: u32,
    pub video_pad: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    pub im_start: u32,
    pub im_end: u32,
    /// `<|endoftext|>`: the pad token, also a stop token.
    pub endoftext: u32,
}

impl SpecialTokens {
    pub const IMAGE_PAD: &'static str = "<|image_pad|>";
    pub const VIDEO_PAD: &'static str = "<|video_pad|>";
    pub const VISION_START: &'static str = "<|vision_start|>";
    pub const VISION_END: &'static str = "<|vision_end|>";
    pub const IM_START: &'static str = "<|im_start|>";
    pub const IM_END: &'static str = "<|im_end|>";
    pub const ENDOFTEXT: &'static str = "<|endoftext|>";

    /// The pad token id (`<|endoftext|>`).
    pub fn pad(&self) -> u32 {
        self.endoftext
    }
}

/// A `tokenizers::Tokenizer` with the behaviour the pipeline needs.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("special", &self.special)
            .finish()
    }
}

impl TextTokenizer {
    /// A hash of the whole tokenizer (vocabulary, merges, normalisation, special tokens): equal
    /// for tokenizers that encode alike. Keys caches of encoded lengths.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.to_string(false).unwrap_or_default().hash(&mut h);
        h.finish()
    }

    /// Loads `DIR/tokenizer.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading tokenizer {}", path.display()))?;
        Self::from_tokenizer(inner, path.to_path_buf())
    }

    /// Wraps an already built tokenizer (`origin` only labels error messages).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, origin: PathBuf) -> Result<Self> {
        let id = |s: &str| {
            inner
                .token_to_id(s)
                .with_context(|| format!("tokenizer {} has no special token {s}", origin.display()))
        };
        let special = SpecialTokens {
            image_pad: id(SpecialTokens::IMAGE_PAD)?,
            video_pad: id(SpecialTokens::VIDEO_PAD)?,
            vision_start: id(SpecialTokens::VISION_START)?,
            vision_end: id(SpecialTokens::VISION_END)?,
            im_start: id(SpecialTokens::IM_START)?,
            im_end: id(SpecialTokens::IM_END)?,
            endoftext: id(SpecialTokens::ENDOFTEXT)?,
        };
        Ok(Self {
            inner,
            special,
            path: origin,
        })
    }

    /// Token ids of `text`: no special tokens are added, but special tokens written in the text
    /// (`<|im_start|>`, `<|image_pad|>`, ...) are recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("tokenizing with {}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("decoding with {}", self.path.display()))
    }

    /// Id of a token string (regular or added).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// String of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// A tiny byte-level BPE tokenizer with the Qwen2 special tokens, for tests.
///
/// Vocabulary: the 256 byte-level symbols (ids 0..256), six merges (256..262, "hell" = 258),
/// then the special tokens (`<|endoftext|>` = 262, `<|im_start|>` = 263, `<|im_end|>` = 264,
/// `<|vision_start|>` = 265, `<|vision_end|>` = 266, `<|image_pad|>` = 267,
/// `<|video_pad|>` = 268).
#[cfg(test)]
pub(crate) fn tiny_tokenizer_json() -> String {
    use serde_json::{json, Map, Value};
    // GPT-2 byte-to-unicode table.
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
    pairs.sort();
    let mut vocab = Map::new();
    for (b, c) in &pairs {
        vocab.insert(char::from_u32(*c).unwrap().to_string(), json!(*b));
    }
    // A few merges so that segmentation is not purely per byte.
    let merges = [
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ċ", "Ċ"),
    ];
    let mut next = 256u32;
    for (a, b) in merges {
        vocab.insert(format!("{a}{b}"), json!(next));
        next += 1;
    }
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ];
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": next as usize + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab,
                  "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    })
    .to_string()
}

#[cfg(test)]
pub(crate) fn tiny_tokenizer() -> TextTokenizer {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    TextTokenizer::from_dir(dir.path()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_resolved_and_recognised() {
        let tok = tiny_tokenizer();
        let sp = *tok.special();
        assert_eq!(sp.endoftext, 262);
        assert_eq!(sp.im_start, 263);
        assert_eq!(sp.image_pad, 267);
        assert_eq!(tok.token_id("<|im_end|>"), Some(264));
        assert_eq!(tok.token_id("<|nope|>"), None);

        let ids = tok
            .encode("<|im_start|>user\nhello world<|im_end|>\n")
            .unwrap();
        assert_eq!(ids[0], sp.im_start);
        assert!(ids.contains(&sp.im_end));
        assert!(ids.contains(&258)); // "hell" merge
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<|im_start|>user\nhello world<|im_end|>\n"
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhello world\n");
        // No special tokens are added.
        assert_eq!(tok.encode("a").unwrap(), vec![b'a' as u32]);
        // Non-ASCII round trip.
        let s = "café — 肺";
        assert_eq!(tok.decode(&tok.encode(s).unwrap(), false).unwrap(), s);
    }

    #[test]
    fn errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("tokenizer.json"), "{err:#}");
        // A tokenizer without the vision tokens.
        let mut v: serde_json::Value = serde_json::from_str(&tiny_tokenizer_json()).unwrap();
        v["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["content"] != "<|image_pad|>");
        std::fs::write(dir.path().join("tokenizer.json"), v.to_string()).unwrap();
        let err = TextTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("<|image_pad|>"), "{err:#}");
    }
}
