//! Parity with the transformers references in `tests/fixtures` (written by
//! `tests/fixtures/make_fixtures.py`): tokenizer cases, chat template, processor pixel values
//! and the encoded samples. Skipped when the fixtures are absent.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::encode::{encode_conversation, TrainOn};
use super::image::ImageProcessorConfig;
use super::sharegpt::read_sharegpt;
use super::template::{ChatMessage, ChatTemplate, ContentPart};
use super::tokenizer::TextTokenizer;

fn fixtures() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if dir.join("refs/samples.json").exists() {
        Some(dir)
    } else {
        eprintln!("{} has no refs/samples.json: skipping", dir.display());
        None
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// One f32 tensor of a safetensors file (little-endian), without the safetensors crate.
fn safetensors_f32(p: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[name];
    assert_eq!(t["dtype"], "F32");
    let shape = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let off = t["data_offsets"].as_array().unwrap();
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    let data = bytes[8 + n + a..8 + n + b]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

#[test]
fn tokenizer_cases() {
    let Some(dir) = fixtures() else { return };
    let tok = TextTokenizer::from_dir(dir.join("tokenizer")).unwrap();
    let cases = read_json(&dir.join("tokenizer/tokenizer_cases.json"));
    for (s, id) in cases["special_token_ids"].as_object().unwrap() {
        assert_eq!(tok.token_id(s), Some(id.as_u64().unwrap() as u32), "{s}");
    }
    assert_eq!(tok.special().image_pad, 612);
    assert_eq!(
        tok.vocab_size(),
        cases["tokenizer_len"].as_u64().unwrap() as usize
    );
    for c in cases["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, ids(&c["ids"]), "{text:?}");
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        assert_eq!(
            tok.decode(&got, true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn samples_match_transformers() {
    let Some(dir) = fixtures() else { return };
    let model = dir.join("models/tiny-gqa2");
    let tok = TextTokenizer::from_dir(&model).unwrap();
    let template = ChatTemplate::from_dir(&model).unwrap();
    assert!(template.origin().ends_with("chat_template.json"));
    let processor = ImageProcessorConfig::from_dir(&model).unwrap();
    assert_eq!((processor.min_pixels, processor.max_pixels), (3136, 12544));
    let refs = read_json(&dir.join("refs/samples.json"));
    let samples = refs["samples"].as_array().unwrap();
    let convs = read_sharegpt(dir.join("samples.jsonl")).unwrap();
    assert_eq!(convs.len(), samples.len());
    let mut max_pixel_diff = 0f32;
    for (conv, s) in convs.iter().zip(samples) {
        let name = s["name"].as_str().unwrap();
        // Messages as the fixture converted them.
        let msgs: Vec<ChatMessage> = s["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let parts = m["content"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "image" => ContentPart::Image,
                        _ => ContentPart::Text(p["text"].as_str().unwrap().to_string()),
                    })
                    .collect();
                ChatMessage::new(m["role"].as_str().unwrap(), parts)
            })
            .collect();
        assert_eq!(conv.messages, msgs, "{name}");
        let images: Vec<PathBuf> = s["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| dir.join(p.as_str().unwrap()))
            .collect();
        assert_eq!(conv.images, images, "{name}");
        let n = msgs.len();
        assert_eq!(
            template.render(&msgs[..n - 1], true).unwrap(),
            s["prompt_text"].as_str().unwrap(),
            "{name}"
        );

        let e =
            encode_conversation(&tok, &template, &processor, conv, TrainOn::LastAssistant).unwrap();
        assert_eq!(e.input_ids, ids(&s["input_ids"]), "{name}");
        let start = s["target_start"].as_u64().unwrap() as usize;
        assert!(e.labels[..start].iter().all(Option::is_none), "{name}");
        let target: Vec<u32> = e.labels[start..].iter().map(|l| l.unwrap()).collect();
        assert_eq!(target, ids(&s["target_ids"]), "{name}");
        let grids: Vec<[usize; 3]> = s["image_grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let g = ids(g);
                [g[0] as usize, g[1] as usize, g[2] as usize]
            })
            .collect();
        assert_eq!(e.image_grids, grids, "{name}");
        if let Some(file) = s["pixel_values_file"].as_str() {
            let (shape, expected) = safetensors_f32(&dir.join(file), "pixel_values");
            assert_eq!(shape, vec![e.pixel_rows, e.pixel_cols], "{name}");
            let diff = e
                .pixel_values
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{name}: {} ids, grids {grids:?}, max |pixel diff| {diff:e}",
                e.input_ids.len()
            );
            max_pixel_diff = max_pixel_diff.max(diff);
        } else {
            assert!(e.pixel_values.is_empty());
        }
    }
    assert_eq!(max_pixel_diff, 0.0, "pixel values differ from transformers");
}
