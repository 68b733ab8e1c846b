//! Everything that turns records into model inputs for one model directory: its tokenizer,
//! its own chat template and its image processor (with an optional max_pixels override).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::data::encode::{encode_conversation, encode_prompt, Encoded, TrainOn};
use crate::data::image::ImageProcessorConfig;
use crate::data::sharegpt::Conversation;
use crate::data::template::{ChatMessage, ChatTemplate};
use crate::data::tokenizer::TextTokenizer;
use crate::generate::Prompt;

/// HF's "processor" for Qwen2.5-VL: tokenizer + chat template + image processor.
#[derive(Debug)]
pub struct Processor {
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub images: ImageProcessorConfig,
}

impl Processor {
    pub fn from_dir(dir: &Path, max_pixels: Option<usize>) -> Result<Self> {
        let tokenizer = TextTokenizer::from_dir(dir)
            .with_context(|| format!("tokenizer of {}", dir.display()))?;
        let template = ChatTemplate::from_dir(dir)
            .with_context(|| format!("chat template of {}", dir.display()))?;
        let mut images = ImageProcessorConfig::from_dir(dir)
            .with_context(|| format!("image processor of {}", dir.display()))?;
        if let Some(m) = max_pixels {
            images = images.with_max_pixels(m);
        }
        Ok(Self {
            tokenizer,
            template,
            images,
        })
    }

    /// A conversation ending with an assistant turn, labelled as SFT trains it.
    pub fn encode(&self, conv: &Conversation, train_on: TrainOn) -> Result<Encoded> {
        encode_conversation(
            &self.tokenizer,
            &self.template,
            &self.images,
            conv,
            train_on,
        )
    }

    /// A generation prompt (chat template with the assistant header appended).
    pub fn encode_prompt(&self, messages: &[ChatMessage], images: &[PathBuf]) -> Result<Encoded> {
        encode_prompt(
            &self.tokenizer,
            &self.template,
            &self.images,
            messages,
            images,
        )
    }

    /// A generation prompt ready for [`crate::generate::generate`].
    pub fn prompt(&self, messages: &[ChatMessage], images: &[PathBuf]) -> Result<Prompt> {
        let e = self.encode_prompt(messages, images)?;
        Ok(Prompt {
            input_ids: e.input_ids,
            pixel_values: e.pixel_values,
            image_grids: e.image_grids,
        })
    }

    /// The generation prompt of a sharegpt record: every message before its last assistant turn
    /// (all messages when it has none), with the images those messages use.
    pub fn conversation_prompt(&self, conv: &Conversation) -> Result<Prompt> {
        let end = match conv.last_assistant() {
            Some(i) if i + 1 == conv.messages.len() => i,
            _ => conv.messages.len(),
        };
        let msgs = &conv.messages[..end];
        anyhow::ensure!(
            msgs.iter().any(|m| m.role == "user"),
            "{}: no user message to answer",
            conv.origin
        );
        let n_img: usize = msgs.iter().map(ChatMessage::num_images).sum();
        anyhow::ensure!(
            n_img <= conv.images.len(),
            "{}: {} <image> tags but {} images",
            conv.origin,
            n_img,
            conv.images.len()
        );
        self.prompt(msgs, &conv.images[..n_img])
            .with_context(|| conv.origin.clone())
    }
}
