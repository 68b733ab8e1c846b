//! The model's own chat template, rendered with minijinja the way HF transformers renders it
//! with Jinja2 (`trim_blocks`, `lstrip_blocks`, `raise_exception`, the common Python string and
//! dict methods).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde_json::json;

/// The Qwen2-VL / Qwen2.5-VL chat template (reference doc section 6), used when the model
/// directory has none.
pub const QWEN2_VL_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}<|im_end|>
{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}";

/// One piece of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPart {
    Text(String),
    Image,
}

/// A chat message: `role` is `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: Vec<ContentPart>) -> Self {
        Self {
            role: role.into(),
            content,
        }
    }

    /// A message with a single text part.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: vec![ContentPart::Text(text.into())],
        }
    }

    /// The concatenated text parts.
    pub fn text_content(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                ContentPart::Text(t) => Some(t.as_str()),
                ContentPart::Image => None,
            })
            .collect()
    }

    /// Number of image parts.
    pub fn num_images(&self) -> usize {
        self.content
            .iter()
            .filter(|p| matches!(p, ContentPart::Image))
            .count()
    }

    /// The message as HF passes it to the template: content is a list of
    /// `{"type": "text", "text": ...}` / `{"type": "image"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let parts: Vec<serde_json::Value> = self
            .content
            .iter()
            .map(|p| match p {
                ContentPart::Text(t) => json!({"type": "text", "text": t}),
                ContentPart::Image => json!({"type": "image"}),
            })
            .collect();
        json!({"role": self.role, "content": parts})
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    /// Special-token strings HF passes to the template (`bos_token`, `eos_token`, ...).
    extra: serde_json::Map<String, serde_json::Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles a template source; `origin` labels errors (e.g. the file it came from).
    pub fn from_source(source: impl Into<String>, origin: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.set_unknown_method_callback(pycompat);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| anyhow!("{e:#}"))
            .with_context(|| format!("compiling chat template from {origin}"))?;
        Ok(Self {
            env,
            source,
            origin,
            extra: serde_json::Map::new(),
        })
    }

    /// The Qwen2-VL template of the reference doc.
    pub fn qwen2_vl() -> Self {
        Self::from_source(QWEN2_VL_TEMPLATE, "built-in Qwen2-VL template")
            .expect("built-in template compiles")
    }

    /// The template of a model directory, searched as `chat_template.jinja`,
    /// `chat_template.json` (`{"chat_template": "..."}`), `tokenizer_config.json`
    /// (`chat_template`: a string, or a list of `{name, template}` from which "default" is
    /// taken); the built-in Qwen2-VL template when none has one. Special-token strings of
    /// `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `unk_token`) are passed to
    /// the template as HF does.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg: Option<serde_json::Value> = if tok_cfg_path.exists() {
            let text = std::fs::read_to_string(&tok_cfg_path)
                .with_context(|| format!("reading {}", tok_cfg_path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", tok_cfg_path.display()))?,
            )
        } else {
            None
        };

        let mut tmpl = Self::find_in_dir(dir, tok_cfg.as_ref())?;
        if let Some(cfg) = &tok_cfg {
            for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                let s = match cfg.get(key) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Object(o)) => {
                        o.get("content").and_then(|c| c.as_str()).map(String::from)
                    }
                    _ => None,
                };
                if let Some(s) = s {
                    tmpl.extra
                        .insert(key.to_string(), serde_json::Value::String(s));
                }
            }
        }
        Ok(tmpl)
    }

    fn find_in_dir(dir: &Path, tok_cfg: Option<&serde_json::Value>) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let src = std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?;
            return Self::from_source(src, jinja.display().to_string());
        }
        let json_path = dir.join("chat_template.json");
        if json_path.exists() {
            let text = std::fs::read_to_string(&json_path)
                .with_context(|| format!("reading {}", json_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", json_path.display()))?;
            let src = v
                .get("chat_template")
                .and_then(|t| t.as_str())
                .with_context(|| {
                    format!("{} has no string `chat_template`", json_path.display())
                })?;
            return Self::from_source(src, json_path.display().to_string());
        }
        if let Some(cfg) = tok_cfg {
            let origin = dir.join("tokenizer_config.json").display().to_string();
            match cfg.get("chat_template") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => return Self::from_source(s.clone(), origin),
                Some(serde_json::Value::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                    let src = default
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .with_context(|| {
                            format!("{origin}: `chat_template` list has no \"default\" template")
                        })?;
                    return Self::from_source(src, origin);
                }
                Some(other) => {
                    bail!("{origin}: `chat_template` must be a string or a list, got {other}")
                }
            }
        }
        Ok(Self::qwen2_vl())
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` (as `apply_chat_template(..., tokenize=False)` would).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<serde_json::Value> = messages.iter().map(ChatMessage::to_json).collect();
        self.render_json(&serde_json::Value::Array(msgs), add_generation_prompt)
    }

    /// Renders messages given as JSON (HF's message dicts, e.g. string contents).
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut ctx = self.extra.clone();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), json!(add_generation_prompt));
        let tmpl = self.env.get_template(NAME).map_err(|e| anyhow!("{e:#}"))?;
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| anyhow!("{e:#}"))
            .with_context(|| format!("rendering chat template from {}", self.origin))
    }
}

// ---------------------------------------------------------------------------------------------
// Python-compatible methods
// ---------------------------------------------------------------------------------------------

/// Python's string, dict and list methods in templates (`.strip()`, `.split()`, `.items()`,
/// `.get()`, ...): minijinja-contrib's `pycompat`, plus what it lacks and chat templates use:
/// `str.removeprefix` / `str.removesuffix` and `list.index`.
fn pycompat(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    match minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args) {
        Err(e) if e.kind() == ErrorKind::UnknownMethod => python_extras(value, method, args),
        other => other,
    }
}

fn python_extras(value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let arg = |i: usize| {
        args.get(i).ok_or_else(|| {
            Error::new(
                ErrorKind::MissingArgument,
                format!("{method}: missing argument"),
            )
        })
    };
    match (value.kind(), method) {
        (ValueKind::String, "removeprefix" | "removesuffix") => {
            let (s, affix) = (value.as_str().unwrap_or_default(), arg(0)?.to_string());
            let cut = match method {
                "removeprefix" => s.strip_prefix(affix.as_str()),
                _ => s.strip_suffix(affix.as_str()),
            };
            Ok(Value::from(cut.unwrap_or(s)))
        }
        (ValueKind::Seq, "index") => {
            let x = arg(0)?;
            let at = value.try_iter()?.position(|v| &v == x);
            at.map(Value::from)
                .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "index: value not in list"))
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Vec<ChatMessage> {
        vec![ChatMessage::new(
            "user",
            vec![ContentPart::Image, ContentPart::Text("Describe.".into())],
        )]
    }

    const EXPECTED: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n";

    #[test]
    fn renders_reference_example() {
        let t = ChatTemplate::qwen2_vl();
        assert_eq!(t.render(&example(), true).unwrap(), EXPECTED);
        let mut msgs = example();
        msgs.push(ChatMessage::text("assistant", "A cat."));
        let full = t.render(&msgs, false).unwrap();
        assert_eq!(full, format!("{EXPECTED}A cat.<|im_end|>\n"));
        // Own system prompt; string content through render_json.
        let v =
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
        assert_eq!(
            t.render_json(&v, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn search_order_in_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Nothing: built-in.
        assert_eq!(
            ChatTemplate::from_dir(d)
                .unwrap()
                .render(&example(), true)
                .unwrap(),
            EXPECTED
        );
        // tokenizer_config.json list form.
        std::fs::write(
            d.join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "<|im_end|>"}, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#,
        )
        .unwrap();
        assert_eq!(
            ChatTemplate::from_dir(d)
                .unwrap()
                .render(&example(), true)
                .unwrap(),
            "D<|im_end|>"
        );
        std::fs::write(d.join("tokenizer_config.json"), r#"{"chat_template": "S"}"#).unwrap();
        assert_eq!(
            ChatTemplate::from_dir(d)
                .unwrap()
                .render(&example(), true)
                .unwrap(),
            "S"
        );
        std::fs::write(d.join("chat_template.json"), r#"{"chat_template": "J"}"#).unwrap();
        assert_eq!(
            ChatTemplate::from_dir(d)
                .unwrap()
                .render(&example(), true)
                .unwrap(),
            "J"
        );
        std::fs::write(d.join("chat_template.jinja"), "K\n").unwrap();
        let t = ChatTemplate::from_dir(d).unwrap();
        assert_eq!(t.render(&example(), true).unwrap(), "K");
        assert!(t.origin().ends_with("chat_template.jinja"));
        // Errors name the file.
        std::fs::write(d.join("chat_template.jinja"), "{% if %}").unwrap();
        let err = ChatTemplate::from_dir(d).unwrap_err();
        assert!(
            format!("{err:#}").contains("chat_template.jinja"),
            "{err:#}"
        );
    }

    #[test]
    fn jinja2_compat() {
        let r = |src: &str| {
            ChatTemplate::from_source(src, "test")
                .unwrap()
                .render(&[ChatMessage::text("user", "  Hi there  ")], false)
        };
        assert_eq!(
            r("{{ messages[0].content[0].text.strip() }}|").unwrap(),
            "Hi there|"
        );
        assert_eq!(
            r("{{ messages[0]['content'][0]['text'].lstrip() }}|").unwrap(),
            "Hi there  |"
        );
        assert_eq!(
            r("{{ 'a,b,,c'.split(',') | join('/') }}").unwrap(),
            "a/b//c"
        );
        assert_eq!(r("{{ ' a  b '.split() | length }}").unwrap(), "2");
        assert_eq!(
            r("{% if 'abc'.startswith(('x', 'ab')) %}yes{% endif %}").unwrap(),
            "yes"
        );
        assert_eq!(r("{{ 'xxabcxx'.strip('x') }}").unwrap(), "abc");
        assert_eq!(
            r("{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}").unwrap(),
            "a=1"
        );
        assert_eq!(r("{{ {'a': 1}.get('b', 7) }}").unwrap(), "7");
        // What minijinja-contrib's pycompat lacks.
        assert_eq!(r("{{ 'image_1'.removeprefix('image_') }}").unwrap(), "1");
        assert_eq!(r("{{ 'a.png'.removesuffix('.png') }}").unwrap(), "a");
        assert_eq!(r("{{ ['a', 'b'].index('b') }}").unwrap(), "1");
        // trim_blocks + lstrip_blocks.
        assert_eq!(r("  {% if true %}\nX\n  {% endif %}\nY").unwrap(), "X\nY");
        // Undefined variables are falsy (add_vision_id).
        assert_eq!(
            r("{% if add_vision_id %}A{% else %}B{% endif %}").unwrap(),
            "B"
        );
        // loop controls.
        assert_eq!(
            r("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}")
                .unwrap(),
            "01"
        );
        let err = r("{{ raise_exception('bad roles') }}").unwrap_err();
        assert!(format!("{err:#}").contains("bad roles"), "{err:#}");
    }
}
