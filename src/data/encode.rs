//! Conversations -> model inputs, as LLaMA-Factory builds SFT examples.
//!
//! The text is built from the model's chat template in segments: for each assistant turn `k`,
//! the prompt segment is `render(messages[..k], add_generation_prompt=true)` minus what was
//! already emitted, the response segment is `render(messages[..=k])` minus that prompt (for
//! Qwen: `content + "<|im_end|>\n"`). Segments are tokenised separately and concatenated;
//! response tokens are the labels, everything else is ignored (-100). Each `<|image_pad|>`
//! is then expanded to `t*h*w/merge^2` copies.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};

use super::image::{ImageProcessorConfig, ProcessedImage};
use super::sharegpt::Conversation;
use super::template::{ChatMessage, ChatTemplate};
use super::tokenizer::{SpecialTokens, TextTokenizer};

/// Label value of ignored positions in PyTorch conventions.
pub const IGNORE_INDEX: i64 = -100;

/// Which assistant turns are trained (recipe key `train_on`: `all_assistant`, `last_assistant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant turn (LLaMA-Factory's default).
    #[default]
    AllAssistant,
    /// Only the last assistant turn (LLaMA-Factory's `mask_history`).
    LastAssistant,
}

/// One encoded example.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    /// `None` = ignored (-100); same length as `input_ids`.
    pub labels: Vec<Option<u32>>,
    /// All images' patch rows concatenated, `pixel_rows x pixel_cols` row-major.
    pub pixel_values: Vec<f32>,
    pub pixel_rows: usize,
    /// Patch dimension (1176 for Qwen); 0 when there is no image.
    pub pixel_cols: usize,
    /// `[t, h, w]` per image, in order.
    pub image_grids: Vec<[usize; 3]>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of trained positions.
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().filter(|l| l.is_some()).count()
    }

    /// Labels with -100 for ignored positions.
    pub fn labels_i64(&self) -> Vec<i64> {
        self.labels
            .iter()
            .map(|l| l.map_or(IGNORE_INDEX, i64::from))
            .collect()
    }
}

/// Loads and processes image files in order (errors name the file).
pub fn process_images(
    processor: &ImageProcessorConfig,
    paths: &[PathBuf],
) -> Result<Vec<ProcessedImage>> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            processor
                .process_path(p)
                .with_context(|| format!("image {} of the record", i + 1))
        })
        .collect()
}

fn check_roles(messages: &[ChatMessage]) -> Result<()> {
    ensure!(!messages.is_empty(), "empty conversation");
    let start = usize::from(messages[0].role == "system");
    for (i, m) in messages.iter().enumerate().skip(start) {
        let expected = if (i - start) % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        ensure!(
            m.role == expected,
            "message {i} has role {:?} where {expected:?} was expected (optional system, then user/assistant alternating)",
            m.role
        );
    }
    Ok(())
}

/// Builds token ids from text segments: `(text, trained)`.
fn tokenize_segments(
    tok: &TextTokenizer,
    segments: &[(String, bool)],
) -> Result<(Vec<u32>, Vec<Option<u32>>)> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for (text, trained) in segments {
        let seg = tok.encode(text)?;
        labels.extend(seg.iter().map(|&t| trained.then_some(t)));
        ids.extend(seg);
    }
    Ok((ids, labels))
}

/// Expands each `<|image_pad|>` into its images' token count and attaches the pixel values.
fn attach_images(
    ids: Vec<u32>,
    labels: Vec<Option<u32>>,
    images: Vec<ProcessedImage>,
    special: &SpecialTokens,
    merge_size: usize,
) -> Result<Encoded> {
    let pads = ids.iter().filter(|&&t| t == special.image_pad).count();
    ensure!(
        pads == images.len(),
        "the text has {pads} <|image_pad|> token(s) but there are {} image(s)",
        images.len()
    );
    ensure!(
        !ids.contains(&special.video_pad),
        "the text contains <|video_pad|> tokens; videos are not supported"
    );
    let counts: Vec<usize> = images
        .iter()
        .map(|im| super::image::num_image_tokens(im.grid_thw, merge_size))
        .collect();
    let total: usize = counts.iter().sum();
    let mut out_ids = Vec::with_capacity(ids.len() + total);
    let mut out_labels = Vec::with_capacity(ids.len() + total);
    let mut next = 0;
    for (t, l) in ids.into_iter().zip(labels) {
        if t == special.image_pad {
            ensure!(
                l.is_none(),
                "an image is inside a trained (assistant) segment"
            );
            out_ids.extend(std::iter::repeat_n(t, counts[next]));
            out_labels.extend(std::iter::repeat_n(None, counts[next]));
            next += 1;
        } else {
            out_ids.push(t);
            out_labels.push(l);
        }
    }
    let pixel_cols = images.first().map_or(0, |im| im.cols);
    ensure!(
        images.iter().all(|im| im.cols == pixel_cols),
        "images with different patch sizes"
    );
    let pixel_rows = images.iter().map(|im| im.rows).sum();
    let mut pixel_values = Vec::with_capacity(pixel_rows * pixel_cols);
    let mut image_grids = Vec::with_capacity(images.len());
    for im in images {
        pixel_values.extend_from_slice(&im.pixel_values);
        image_grids.push(im.grid_thw);
    }
    Ok(Encoded {
        input_ids: out_ids,
        labels: out_labels,
        pixel_values,
        pixel_rows,
        pixel_cols,
        image_grids,
    })
}

/// The prompt/response text segments of a conversation (see the module doc); `bool` = trained.
pub fn conversation_segments(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    train_on: TrainOn,
) -> Result<Vec<(String, bool)>> {
    check_roles(messages)?;
    let last = messages.len() - 1;
    ensure!(
        messages[last].role == "assistant",
        "the last message is {:?}, not an assistant turn (training and scoring need an assistant answer last)",
        messages[last].role
    );
    for (i, m) in messages.iter().enumerate() {
        if m.role == "assistant" && m.num_images() > 0 {
            bail!("message {i} (assistant) contains an image; images are only supported in user/system turns");
        }
    }
    let mut segments = Vec::new();
    let mut done = String::new();
    for k in (0..messages.len()).filter(|&k| messages[k].role == "assistant") {
        let prompt = template.render(&messages[..k], true)?;
        let Some(seg) = prompt.strip_prefix(done.as_str()) else {
            bail!(
                "chat template from {} does not extend the previous turns when rendering turn {k} \
                 (the rendered prefix changes); it cannot be used for multi-turn training",
                template.origin()
            );
        };
        segments.push((seg.to_string(), false));
        let full = template.render(&messages[..=k], false)?;
        let Some(resp) = full.strip_prefix(prompt.as_str()) else {
            bail!(
                "chat template from {}: the rendered assistant turn {k} does not start with the \
                 generation prompt",
                template.origin()
            );
        };
        let trained = match train_on {
            TrainOn::AllAssistant => true,
            TrainOn::LastAssistant => k == last,
        };
        segments.push((resp.to_string(), trained));
        done = full;
    }
    Ok(segments)
}

/// Encodes a conversation for SFT or scoring (its last message must be an assistant turn).
pub fn encode_conversation(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    processor: &ImageProcessorConfig,
    conv: &Conversation,
    train_on: TrainOn,
) -> Result<Encoded> {
    encode_with(tok, template, processor, conv, train_on, |paths| {
        process_images(processor, paths)
    })
}

/// [`encode_conversation`] without the pixels: the same token ids, labels and image grids
/// (each image's size read from its file header), `pixel_values` empty. What planning and
/// batching need, at a fraction of the cost.
pub fn encode_conversation_shape(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    processor: &ImageProcessorConfig,
    conv: &Conversation,
    train_on: TrainOn,
) -> Result<Encoded> {
    encode_with(tok, template, processor, conv, train_on, |paths| {
        paths.iter().map(|p| processor.shape_of_path(p)).collect()
    })
}

fn encode_with(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    processor: &ImageProcessorConfig,
    conv: &Conversation,
    train_on: TrainOn,
    images: impl FnOnce(&[PathBuf]) -> Result<Vec<ProcessedImage>>,
) -> Result<Encoded> {
    (|| {
        let segments = conversation_segments(template, &conv.messages, train_on)?;
        ensure!(
            conv.num_image_parts() == conv.images.len(),
            "{} image placeholder(s) but {} image(s)",
            conv.num_image_parts(),
            conv.images.len()
        );
        let images = images(&conv.images)?;
        let (ids, labels) = tokenize_segments(tok, &segments)?;
        attach_images(ids, labels, images, tok.special(), processor.merge_size)
    })()
    .with_context(|| format!("encoding {}", conv.origin))
}

/// Encodes a prompt for generation (`add_generation_prompt`, no labels). `images` are the
/// files of the image parts, in order.
pub fn encode_prompt(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    processor: &ImageProcessorConfig,
    messages: &[ChatMessage],
    images: &[PathBuf],
) -> Result<Encoded> {
    let processed = process_images(processor, images)?;
    encode_prompt_processed(tok, template, messages, processed, processor.merge_size)
}

/// [`encode_prompt`] with images already processed (e.g. cached across GRPO samples).
pub fn encode_prompt_processed(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
    images: Vec<ProcessedImage>,
    merge_size: usize,
) -> Result<Encoded> {
    check_roles(messages)?;
    let last = messages.last().map(|m| m.role.as_str());
    ensure!(
        last == Some("user"),
        "a generation prompt must end with a user message, got {last:?}"
    );
    let n: usize = messages.iter().map(ChatMessage::num_images).sum();
    ensure!(
        n == images.len(),
        "{n} image placeholder(s) but {} image(s)",
        images.len()
    );
    let text = template.render(messages, true)?;
    let ids = tok.encode(&text)?;
    let labels = vec![None; ids.len()];
    attach_images(ids, labels, images, tok.special(), merge_size)
}

/// Marks the positions that truncation must keep: image/video pad tokens and the
/// `<|vision_start|>` / `<|vision_end|>` around each pad run.
fn protected_mask(ids: &[u32], special: &SpecialTokens) -> Vec<bool> {
    let is_pad = |t: u32| t == special.image_pad || t == special.video_pad;
    let mut keep: Vec<bool> = ids.iter().map(|&t| is_pad(t)).collect();
    for i in 0..ids.len() {
        if ids[i] == special.vision_start && i + 1 < ids.len() && is_pad(ids[i + 1]) {
            keep[i] = true;
        }
        if ids[i] == special.vision_end && i > 0 && is_pad(ids[i - 1]) {
            keep[i] = true;
        }
    }
    keep
}

/// Shortens `encoded` to at most `cutoff_len` tokens without ever cutting into an image:
/// text tokens are removed from the end (skipping over image blocks, which are kept whole
/// with their `<|vision_start|>`/`<|vision_end|>`), so images and pixel values are unchanged.
///
/// Returns `None` (the caller skips and counts the example) when the image blocks alone
/// exceed `cutoff_len`, or when the example had labels and truncation removed all of them.
pub fn truncate(
    encoded: Encoded,
    cutoff_len: usize,
    special: &SpecialTokens,
) -> Result<Option<Encoded>> {
    ensure!(cutoff_len > 0, "cutoff_len must be > 0");
    ensure!(
        encoded.labels.len() == encoded.input_ids.len(),
        "labels and input_ids differ in length"
    );
    if encoded.len() <= cutoff_len {
        return Ok(Some(encoded));
    }
    let keep = protected_mask(&encoded.input_ids, special);
    let protected = keep.iter().filter(|&&k| k).count();
    if protected > cutoff_len {
        return Ok(None);
    }
    let had_labels = encoded.num_label_tokens() > 0;
    let mut to_remove = encoded.len() - cutoff_len;
    let mut drop = vec![false; encoded.len()];
    for i in (0..encoded.len()).rev() {
        if to_remove == 0 {
            break;
        }
        if !keep[i] {
            drop[i] = true;
            to_remove -= 1;
        }
    }
    let Encoded {
        input_ids,
        labels,
        pixel_values,
        pixel_rows,
        pixel_cols,
        image_grids,
    } = encoded;
    let (input_ids, labels): (Vec<u32>, Vec<Option<u32>>) = input_ids
        .into_iter()
        .zip(labels)
        .zip(&drop)
        .filter(|(_, &d)| !d)
        .map(|(x, _)| x)
        .unzip();
    let out = Encoded {
        input_ids,
        labels,
        pixel_values,
        pixel_rows,
        pixel_cols,
        image_grids,
    };
    if had_labels && out.num_label_tokens() == 0 {
        return Ok(None);
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::tests::pattern;
    use crate::data::template::ContentPart;
    use crate::data::tokenizer::tiny_tokenizer;
    use proptest::prelude::*;

    fn save_png(dir: &std::path::Path, name: &str, w: u32, h: u32) -> PathBuf {
        let p = dir.join(name);
        pattern(w, h).save(&p).unwrap();
        p
    }

    fn conv(messages: Vec<ChatMessage>, images: Vec<PathBuf>) -> Conversation {
        Conversation {
            messages,
            images,
            origin: "test:1".into(),
        }
    }

    #[test]
    fn single_turn_with_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = save_png(dir.path(), "a.png", 56, 84); // grid [1, 6, 4] -> 6 tokens
        let tok = tiny_tokenizer();
        let sp = *tok.special();
        let t = ChatTemplate::qwen2_vl();
        let p = ImageProcessorConfig::qwen2_5_vl();
        let c = conv(
            vec![
                ChatMessage::new(
                    "user",
                    vec![ContentPart::Image, ContentPart::Text("Describe.".into())],
                ),
                ChatMessage::text("assistant", "A cat."),
            ],
            vec![img.clone()],
        );
        let e = encode_conversation(&tok, &t, &p, &c, TrainOn::AllAssistant).unwrap();
        assert_eq!(e.image_grids, vec![[1, 6, 4]]);
        assert_eq!((e.pixel_rows, e.pixel_cols), (24, 1176));
        assert_eq!(e.pixel_values.len(), 24 * 1176);
        assert_eq!(
            e.input_ids.iter().filter(|&&x| x == sp.image_pad).count(),
            6
        );
        let prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n";
        let mut expect_ids = tok.encode(prompt).unwrap();
        let pos = expect_ids.iter().position(|&x| x == sp.image_pad).unwrap();
        expect_ids.splice(pos..pos + 1, std::iter::repeat_n(sp.image_pad, 6));
        let n_prompt = expect_ids.len();
        let resp = tok.encode("A cat.<|im_end|>\n").unwrap();
        expect_ids.extend(&resp);
        assert_eq!(e.input_ids, expect_ids);
        assert!(e.labels[..n_prompt].iter().all(Option::is_none));
        assert_eq!(
            e.labels[n_prompt..]
                .iter()
                .map(|l| l.unwrap())
                .collect::<Vec<_>>(),
            resp
        );
        assert_eq!(
            tok.decode(&e.input_ids[n_prompt..], false).unwrap(),
            "A cat.<|im_end|>\n"
        );
        assert_eq!(e.labels_i64()[0], IGNORE_INDEX);

        // The generation prompt is the same prefix.
        let g = encode_prompt(&tok, &t, &p, &c.messages[..1], &[img]).unwrap();
        assert_eq!(g.input_ids, e.input_ids[..n_prompt]);
        assert_eq!(g.pixel_values, e.pixel_values);
        assert_eq!(g.num_label_tokens(), 0);
    }

    #[test]
    fn multi_turn_labels() {
        let tok = tiny_tokenizer();
        let t = ChatTemplate::qwen2_vl();
        let p = ImageProcessorConfig::qwen2_5_vl();
        let msgs = vec![
            ChatMessage::text("system", "Sys."),
            ChatMessage::text("user", "Q1"),
            ChatMessage::text("assistant", "A1"),
            ChatMessage::text("user", "Q2"),
            ChatMessage::text("assistant", "A2"),
        ];
        let c = conv(msgs.clone(), vec![]);
        let all = encode_conversation(&tok, &t, &p, &c, TrainOn::AllAssistant).unwrap();
        let last = encode_conversation(&tok, &t, &p, &c, TrainOn::LastAssistant).unwrap();
        assert_eq!(all.input_ids, last.input_ids);
        let text = t.render(&msgs, false).unwrap();
        assert_eq!(tok.decode(&all.input_ids, false).unwrap(), text);
        let labelled = |e: &Encoded| {
            let ids: Vec<u32> = e.labels.iter().flatten().copied().collect();
            tok.decode(&ids, false).unwrap()
        };
        assert_eq!(labelled(&all), "A1<|im_end|>\nA2<|im_end|>\n");
        assert_eq!(labelled(&last), "A2<|im_end|>\n");
        assert!(all.image_grids.is_empty() && all.pixel_values.is_empty());
    }

    #[test]
    fn encode_errors() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tiny_tokenizer();
        let t = ChatTemplate::qwen2_vl();
        let p = ImageProcessorConfig::qwen2_5_vl();
        let e = |c: Conversation| {
            format!(
                "{:#}",
                encode_conversation(&tok, &t, &p, &c, TrainOn::AllAssistant).unwrap_err()
            )
        };
        // Trailing user turn.
        let msg = e(conv(vec![ChatMessage::text("user", "Q")], vec![]));
        assert!(
            msg.contains("test:1") && msg.contains("not an assistant turn"),
            "{msg}"
        );
        // Missing image file.
        let msg = e(conv(
            vec![
                ChatMessage::new("user", vec![ContentPart::Image]),
                ChatMessage::text("assistant", "A"),
            ],
            vec![dir.path().join("missing.png")],
        ));
        assert!(msg.contains("missing.png"), "{msg}");
        // Count mismatch.
        let msg = e(conv(
            vec![
                ChatMessage::text("user", "Q"),
                ChatMessage::text("assistant", "A"),
            ],
            vec![dir.path().join("x.png")],
        ));
        assert!(
            msg.contains("0 image placeholder(s) but 1 image(s)"),
            "{msg}"
        );
        // A literal <|image_pad|> in the text.
        let img = save_png(dir.path(), "a.png", 28, 28);
        let msg = e(conv(
            vec![
                ChatMessage::new(
                    "user",
                    vec![
                        ContentPart::Image,
                        ContentPart::Text("<|image_pad|>".into()),
                    ],
                ),
                ChatMessage::text("assistant", "A"),
            ],
            vec![img],
        ));
        assert!(
            msg.contains("2 <|image_pad|> token(s) but there are 1 image(s)"),
            "{msg}"
        );
        // A template without the prefix property (drops history).
        let bad = ChatTemplate::from_source(
            "{% for m in messages[-1:] %}{{ m.role }}:{{ m.content[0].text }};{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
            "bad",
        )
        .unwrap();
        let c = conv(
            vec![
                ChatMessage::text("user", "Q1"),
                ChatMessage::text("assistant", "A1"),
                ChatMessage::text("user", "Q2"),
                ChatMessage::text("assistant", "A2"),
            ],
            vec![],
        );
        let msg = format!(
            "{:#}",
            encode_conversation(&tok, &bad, &p, &c, TrainOn::AllAssistant).unwrap_err()
        );
        assert!(msg.contains("does not"), "{msg}");
        // Generation prompt must end with a user turn.
        let msg = format!(
            "{:#}",
            encode_prompt(&tok, &t, &p, &c.messages, &[]).unwrap_err()
        );
        assert!(msg.contains("must end with a user message"), "{msg}");
    }

    fn sp() -> SpecialTokens {
        SpecialTokens {
            image_pad: 1005,
            video_pad: 1006,
            vision_start: 1003,
            vision_end: 1004,
            im_start: 1001,
            im_end: 1002,
            endoftext: 1000,
        }
    }

    #[test]
    fn truncate_keeps_images() {
        let s = sp();
        // text(3) [vs pad pad vs_end] text(2, labelled)
        let ids = vec![
            1,
            2,
            3,
            s.vision_start,
            s.image_pad,
            s.image_pad,
            s.vision_end,
            7,
            8,
        ];
        let labels = vec![None, None, None, None, None, None, None, Some(7), Some(8)];
        let e = Encoded {
            input_ids: ids.clone(),
            labels,
            image_grids: vec![[1, 2, 4]],
            ..Default::default()
        };
        assert_eq!(truncate(e.clone(), 9, &s).unwrap().unwrap(), e);
        let t = truncate(e.clone(), 8, &s).unwrap().unwrap();
        assert_eq!(t.input_ids, ids[..8]);
        assert_eq!(t.num_label_tokens(), 1);
        // Removing both labels -> None.
        assert!(truncate(e.clone(), 7, &s).unwrap().is_none());
        // No labels: text before the image goes, the image block stays.
        let mut nolab = e.clone();
        nolab.labels = vec![None; 9];
        let t = truncate(nolab, 5, &s).unwrap().unwrap();
        assert_eq!(
            t.input_ids,
            vec![1, s.vision_start, s.image_pad, s.image_pad, s.vision_end]
        );
        assert_eq!(t.image_grids, e.image_grids);
        // Image block alone larger than the cutoff.
        assert!(truncate(e.clone(), 3, &s).unwrap().is_none());
        assert!(truncate(e, 0, &s).is_err());
    }

    /// Random token sequences: text tokens (some labelled) and image blocks.
    fn arb_encoded() -> impl Strategy<Value = Encoded> {
        let s = sp();
        prop::collection::vec(
            prop_oneof![
                (1u32..900, any::<bool>()).prop_map(|(t, l)| vec![(t, l.then_some(t))]),
                (1usize..12).prop_map(move |n| {
                    let mut v = vec![(s.vision_start, None)];
                    v.extend(std::iter::repeat_n((s.image_pad, None), n));
                    v.push((s.vision_end, None));
                    v
                }),
                Just(vec![(s.vision_start, None)]),
                Just(vec![(s.vision_end, None)]),
            ],
            0..40,
        )
        .prop_map(|chunks| {
            let flat: Vec<(u32, Option<u32>)> = chunks.into_iter().flatten().collect();
            Encoded {
                input_ids: flat.iter().map(|x| x.0).collect(),
                labels: flat.iter().map(|x| x.1).collect(),
                ..Default::default()
            }
        })
    }

    /// Random multi-turn conversations (optional system turn, 1-3 user/assistant rounds).
    fn arb_turns() -> impl Strategy<Value = (bool, Vec<(String, String)>)> {
        let word = prop::sample::select(vec![
            "lung", "x-ray", "no", "yes", "B", "nodule", "3 mm", "left.", "Why?", "ok",
        ]);
        let text = prop::collection::vec(word, 1..6).prop_map(|w| w.join(" "));
        (
            any::<bool>(),
            prop::collection::vec((text.clone(), text), 1..4),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Label masking: the input ids are the rendered template whichever turns are trained;
        /// a position is labelled iff it is a target token (label = its own id), and the targets
        /// are exactly `content<|im_end|>\n` of every assistant turn (all_assistant) or of the
        /// last one (last_assistant), in order.
        #[test]
        fn labels_are_exactly_the_trained_assistant_turns((system, rounds) in arb_turns()) {
            let tok = tiny_tokenizer();
            let t = ChatTemplate::qwen2_vl();
            let p = ImageProcessorConfig::qwen2_5_vl();
            let mut msgs = vec![];
            if system {
                msgs.push(ChatMessage::text("system", "You are careful."));
            }
            for (q, a) in &rounds {
                msgs.push(ChatMessage::text("user", q.clone()));
                msgs.push(ChatMessage::text("assistant", a.clone()));
            }
            let c = conv(msgs.clone(), vec![]);
            let all = encode_conversation(&tok, &t, &p, &c, TrainOn::AllAssistant).unwrap();
            let last = encode_conversation(&tok, &t, &p, &c, TrainOn::LastAssistant).unwrap();
            prop_assert_eq!(&all.input_ids, &last.input_ids);
            prop_assert_eq!(tok.decode(&all.input_ids, false).unwrap(), t.render(&msgs, false).unwrap());
            for (e, trained) in [(&all, rounds.len()), (&last, 1)] {
                prop_assert_eq!(e.labels.len(), e.input_ids.len());
                for (l, id) in e.labels.iter().zip(&e.input_ids) {
                    if let Some(l) = l {
                        prop_assert_eq!(l, id);
                    }
                }
                let expected: String = rounds[rounds.len() - trained..].iter().map(|(_, a)| format!("{a}<|im_end|>\n")).collect();
                let ids: Vec<u32> = e.labels.iter().flatten().copied().collect();
                prop_assert_eq!(tok.decode(&ids, false).unwrap(), expected.clone());
                // Contiguous spans: one per trained turn, each ending with <|im_end|> and "\n".
                let mut spans = 0;
                let mut prev = false;
                for l in &e.labels {
                    if l.is_some() && !prev {
                        spans += 1;
                    }
                    prev = l.is_some();
                }
                prop_assert_eq!(spans, trained);
                // Everything else is ignored: the unlabelled tokens are the prompt parts.
                let n_target: usize = rounds[rounds.len() - trained..]
                    .iter()
                    .map(|(_, a)| tok.encode(&format!("{a}<|im_end|>\n")).unwrap().len())
                    .sum();
                prop_assert_eq!(e.num_label_tokens(), n_target);
            }
        }
    }

    proptest! {
        #[test]
        fn truncate_properties(e in arb_encoded(), cutoff in 1usize..80) {
            let s = sp();
            let keep = protected_mask(&e.input_ids, &s);
            let protected = keep.iter().filter(|&&k| k).count();
            let pads = e.input_ids.iter().filter(|&&t| t == s.image_pad).count();
            match truncate(e.clone(), cutoff, &s).unwrap() {
                None => prop_assert!(protected > cutoff || (e.num_label_tokens() > 0 && e.len() > cutoff)),
                Some(t) => {
                    prop_assert!(t.len() <= cutoff);
                    prop_assert_eq!(t.labels.len(), t.input_ids.len());
                    if e.len() <= cutoff {
                        prop_assert_eq!(&t, &e);
                    } else {
                        prop_assert_eq!(t.len(), cutoff);
                    }
                    // Every image pad survives and the kept tokens are a subsequence of the
                    // original, with their labels.
                    prop_assert_eq!(t.input_ids.iter().filter(|&&x| x == s.image_pad).count(), pads);
                    let mut j = 0;
                    for (&id, &lab) in e.input_ids.iter().zip(&e.labels) {
                        if j < t.len() && t.input_ids[j] == id && t.labels[j] == lab {
                            j += 1;
                        }
                    }
                    prop_assert_eq!(j, t.len());
                    // Image blocks stay contiguous: a pad run is framed by its vision tokens.
                    let tk = protected_mask(&t.input_ids, &s);
                    prop_assert_eq!(tk.iter().filter(|&&k| k).count(), protected);
                }
            }
        }
    }
}
