//! Model inputs: the Qwen2-VL image processor ([`image`]), the tokenizer ([`tokenizer`]), the
//! chat template ([`template`]), sharegpt datasets ([`sharegpt`]) and their encoding into
//! training / generation examples ([`encode`]).

pub mod encode;
pub mod image;
pub mod lengths;
pub mod sharegpt;
pub mod template;
pub mod tokenizer;

pub use encode::{
    encode_conversation, encode_prompt, encode_prompt_processed, process_images, truncate, Encoded,
    TrainOn, IGNORE_INDEX,
};
pub use image::{
    load_image, num_image_tokens, pil_resize_bicubic, pil_resize_bicubic_as, smart_resize,
    ImageProcessorConfig, PillowVersion, PreResize, ProcessedImage,
};
pub use sharegpt::{read_sharegpt, Conversation, SharegptReader};
pub use template::{ChatMessage, ChatTemplate, ContentPart};
pub use tokenizer::{SpecialTokens, TextTokenizer};

#[cfg(test)]
mod fixture_tests;
