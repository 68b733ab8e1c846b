//! LLaMA-Factory sharegpt datasets.
//!
//! One record per line (JSONL) or a JSON array of records (`.json`, as LLaMA-Factory's
//! `mllm_demo.json`). Two record layouts:
//! `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}], "images": [...]}` and
//! the older `{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}], "images": [...]}`,
//! optionally with a top-level `"system"` string. Each `<image>` in a message becomes a
//! [`ContentPart::Image`] at that place; a `content` may also be a list of
//! `{"type": "text", "text": ...}` / `{"type": "image"}` parts.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::template::{ChatMessage, ContentPart};

/// The image placeholder in sharegpt texts.
pub const IMAGE_TAG: &str = "<image>";

/// One training or evaluation record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Optional system message first, then user / assistant turns alternating, user first.
    pub messages: Vec<ChatMessage>,
    /// Image files, in the order of their `<image>` tags; relative paths are resolved against
    /// the data file's directory.
    pub images: Vec<PathBuf>,
    /// `FILE:LINE` (or `FILE: record N` for JSON arrays), for error messages.
    pub origin: String,
}

impl Conversation {
    /// Number of image parts over all messages.
    pub fn num_image_parts(&self) -> usize {
        self.messages.iter().map(ChatMessage::num_images).sum()
    }

    /// Index of the last assistant message, if any.
    pub fn last_assistant(&self) -> Option<usize> {
        self.messages.iter().rposition(|m| m.role == "assistant")
    }
}

/// Splits a sharegpt text on `<image>` tags (empty text pieces dropped).
pub fn split_image_tags(text: &str) -> Vec<ContentPart> {
    let mut parts = Vec::new();
    for (i, piece) in text.split(IMAGE_TAG).enumerate() {
        if i > 0 {
            parts.push(ContentPart::Image);
        }
        if !piece.is_empty() {
            parts.push(ContentPart::Text(piece.to_string()));
        }
    }
    parts
}

fn normalise_role(role: &str) -> Result<&'static str> {
    Ok(match role {
        "system" => "system",
        "user" | "human" => "user",
        "assistant" | "gpt" => "assistant",
        other => bail!("unsupported role {other:?} (expected system, user/human or assistant/gpt)"),
    })
}

fn parse_content(v: &Value) -> Result<Vec<ContentPart>> {
    match v {
        Value::String(s) => Ok(split_image_tags(s)),
        Value::Array(items) => {
            let mut parts = Vec::new();
            for item in items {
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let t = item
                            .get("text")
                            .and_then(Value::as_str)
                            .context("text part without a string `text`")?;
                        parts.extend(split_image_tags(t));
                    }
                    Some("image") => parts.push(ContentPart::Image),
                    other => bail!("unsupported content part type {other:?}"),
                }
            }
            Ok(parts)
        }
        other => bail!("message content must be a string or a list of parts, got {other}"),
    }
}

/// Parses one record; relative image paths are resolved against `base_dir`.
pub fn parse_record(record: &Value, base_dir: &Path, origin: &str) -> Result<Conversation> {
    let obj = record
        .as_object()
        .context("a record must be a JSON object")?;
    let (list, role_key, content_key) = if let Some(m) = obj.get("messages") {
        (m, "role", "content")
    } else if let Some(c) = obj.get("conversations") {
        (c, "from", "value")
    } else {
        bail!("record has neither `messages` nor `conversations`");
    };
    let list = list
        .as_array()
        .context("`messages`/`conversations` must be a list")?;
    let mut messages = Vec::with_capacity(list.len() + 1);
    if let Some(sys) = obj.get("system").filter(|s| !s.is_null()) {
        let sys = sys.as_str().context("`system` must be a string")?;
        if !sys.is_empty() {
            messages.push(ChatMessage::new("system", split_image_tags(sys)));
        }
    }
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get(role_key)
            .and_then(Value::as_str)
            .with_context(|| format!("message {i} has no string `{role_key}`"))?;
        let role = normalise_role(role).with_context(|| format!("message {i}"))?;
        let content = m
            .get(content_key)
            .with_context(|| format!("message {i} has no `{content_key}`"))?;
        let content = parse_content(content).with_context(|| format!("message {i}"))?;
        messages.push(ChatMessage::new(role, content));
    }
    ensure!(!messages.is_empty(), "empty conversation");

    // Roles: optional system first, then user/assistant alternating, user first.
    let start = usize::from(messages[0].role == "system");
    ensure!(
        messages.len() > start,
        "conversation has only a system message"
    );
    for (i, m) in messages.iter().enumerate().skip(start) {
        let expected = if (i - start) % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        ensure!(
            m.role == expected,
            "message {i} has role {:?} where {expected:?} was expected (roles must alternate user/assistant after an optional first system message)",
            m.role
        );
    }

    let images: Vec<PathBuf> = match obj.get("images") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![PathBuf::from(s)],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(PathBuf::from)
                    .with_context(|| format!("images[{i}] must be a string path, got {v}"))
            })
            .collect::<Result<_>>()?,
        Some(other) => bail!("`images` must be a list of paths, got {other}"),
    };
    let images: Vec<PathBuf> = images
        .into_iter()
        .map(|p| if p.is_relative() { base_dir.join(p) } else { p })
        .collect();

    let conv = Conversation {
        messages,
        images,
        origin: origin.to_string(),
    };
    let tags = conv.num_image_parts();
    ensure!(
        tags == conv.images.len(),
        "the record has {tags} {IMAGE_TAG} tag(s) but {} image(s)",
        conv.images.len()
    );
    Ok(conv)
}

fn base_dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Streams the records of a JSONL sharegpt file (blank lines skipped). Each item is a record or
/// an error `FILE:LINE: ...`.
pub struct SharegptReader {
    lines: std::io::Lines<BufReader<File>>,
    path: PathBuf,
    base_dir: PathBuf,
    line_no: usize,
}

impl SharegptReader {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file =
            File::open(&path).with_context(|| format!("opening dataset {}", path.display()))?;
        let base_dir = base_dir_of(&path);
        Ok(Self {
            lines: BufReader::new(file).lines(),
            path,
            base_dir,
            line_no: 0,
        })
    }
}

impl Iterator for SharegptReader {
    type Item = Result<Conversation>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = self.lines.next()?;
            self.line_no += 1;
            let origin = format!("{}:{}", self.path.display(), self.line_no);
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    return Some(Err(
                        anyhow::Error::new(e).context(format!("{origin}: read error"))
                    ))
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<Value>(&line)
                .context("invalid JSON")
                .and_then(|v| parse_record(&v, &self.base_dir, &origin));
            return Some(parsed.map_err(|e| anyhow::anyhow!("{origin}: {e:#}")));
        }
    }
}

/// Reads a whole sharegpt dataset: JSONL, or a JSON array when the file starts with `[`.
pub fn read_sharegpt(path: impl AsRef<Path>) -> Result<Vec<Conversation>> {
    read_sharegpt_with_media_dir(path.as_ref(), None)
}

/// [`read_sharegpt`] resolving relative image paths against `media_dir` when given.
pub fn read_sharegpt_with_media_dir(
    path: &Path,
    media_dir: Option<&Path>,
) -> Result<Vec<Conversation>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading dataset {}", path.display()))?;
    let base_dir = media_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| base_dir_of(path));
    if text.trim_start().starts_with('[') {
        let records: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON array", path.display()))?;
        return records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let origin = format!("{}: record {}", path.display(), i + 1);
                parse_record(r, &base_dir, &origin).map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
        let conv = serde_json::from_str::<Value>(line)
            .context("invalid JSON")
            .and_then(|v| parse_record(&v, &base_dir, &origin))
            .map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))?;
        out.push(conv);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "d.jsonl",
            concat!(
                r#"{"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "<image>What is <image>this?"}, {"role": "assistant", "content": "A lung."}], "images": ["a.png", "/abs/b.png"]}"#,
                "\n\n   \n",
                r#"{"conversations": [{"from": "human", "value": "Hi<image>"}, {"from": "gpt", "value": "Yo"}, {"from": "human", "value": "More"}, {"from": "gpt", "value": "No"}], "images": ["sub/c.jpg"]}"#,
                "\n",
                r#"{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}], "images": ["d.png"], "system": "S"}"#,
                "\n"
            ),
        );
        let convs = read_sharegpt(&p).unwrap();
        assert_eq!(convs.len(), 3);
        let c = &convs[0];
        assert_eq!(c.messages.len(), 3);
        assert_eq!(c.messages[0], ChatMessage::text("system", "Sys"));
        assert_eq!(
            c.messages[1].content,
            vec![
                ContentPart::Image,
                ContentPart::Text("What is ".into()),
                ContentPart::Image,
                ContentPart::Text("this?".into())
            ]
        );
        assert_eq!(
            c.images,
            vec![dir.path().join("a.png"), PathBuf::from("/abs/b.png")]
        );
        assert!(c.origin.ends_with("d.jsonl:1"));
        assert_eq!(c.last_assistant(), Some(2));
        let c = &convs[1];
        assert_eq!(c.messages[0].role, "user");
        assert_eq!(
            c.messages[0].content,
            vec![ContentPart::Text("Hi".into()), ContentPart::Image]
        );
        assert_eq!(c.messages[3], ChatMessage::text("assistant", "No"));
        assert_eq!(c.images, vec![dir.path().join("sub/c.jpg")]);
        assert!(c.origin.ends_with("d.jsonl:4"));
        let c = &convs[2];
        assert_eq!(c.messages[0], ChatMessage::text("system", "S"));
        assert_eq!(
            c.messages[1].content,
            vec![ContentPart::Image, ContentPart::Text("Q".into())]
        );
        assert_eq!(c.last_assistant(), None);

        // Streaming reader gives the same records.
        let streamed: Vec<Conversation> = SharegptReader::open(&p)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(streamed, convs);
        // JSON array form.
        let a = write(
            dir.path(),
            "d.json",
            r#"[{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]"#,
        );
        let convs = read_sharegpt(&a).unwrap();
        assert_eq!(convs[0].messages[1], ChatMessage::text("assistant", "y"));
        assert!(convs[0].images.is_empty());
    }

    fn err_of(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "bad.jsonl", text);
        let e = format!("{:#}", read_sharegpt(&p).unwrap_err());
        let streamed = SharegptReader::open(&p)
            .unwrap()
            .find_map(|r| r.err())
            .unwrap();
        assert_eq!(format!("{streamed:#}"), e);
        e
    }

    #[test]
    fn errors_name_file_and_line() {
        let ok = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
        let e = err_of(&format!("{ok}\n\n{{not json\n"));
        assert!(
            e.contains("bad.jsonl:3:") && e.contains("invalid JSON"),
            "{e}"
        );
        let e = err_of(
            r#"{"messages": [{"role": "user", "content": "<image><image>"}], "images": ["a.png"]}"#,
        );
        assert!(
            e.contains("bad.jsonl:1:") && e.contains("2 <image> tag(s) but 1 image(s)"),
            "{e}"
        );
        let e = err_of(r#"{"messages": [{"role": "user", "content": "x"}], "images": ["a.png"]}"#);
        assert!(e.contains("0 <image> tag(s) but 1 image(s)"), "{e}");
        let e = err_of(r#"{"messages": [{"role": "assistant", "content": "x"}]}"#);
        assert!(
            e.contains("bad.jsonl:1:") && e.contains("role \"assistant\""),
            "{e}"
        );
        let e = err_of(
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}"#,
        );
        assert!(e.contains("role \"user\""), "{e}");
        let e = err_of(r#"{"conversations": [{"from": "observation", "value": "x"}]}"#);
        assert!(e.contains("unsupported role \"observation\""), "{e}");
        let e = err_of(r#"{"foo": 1}"#);
        assert!(e.contains("neither `messages` nor `conversations`"), "{e}");
        let e = err_of(r#"{"messages": [{"role": "user"}]}"#);
        assert!(e.contains("no `content`"), "{e}");
        let e = err_of(r#"{"messages": [{"role": "user", "content": "x"}], "images": [1]}"#);
        assert!(e.contains("images[0]"), "{e}");
        let e = err_of(r#"{"messages": []}"#);
        assert!(e.contains("empty conversation"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "arr.json", "[1]");
        let e = format!("{:#}", read_sharegpt(&p).unwrap_err());
        assert!(
            e.contains("arr.json: record 1: a record must be a JSON object"),
            "{e}"
        );
        let missing = read_sharegpt("/nonexistent/file.jsonl").unwrap_err();
        assert!(format!("{missing:#}").contains("/nonexistent/file.jsonl"));
    }
}
