//! Sample lengths at scale: the token count (and target-token count) of every record of a
//! dataset after encoding and truncation, without decoding any image: the text is tokenized as
//! for training and each image contributes the tokens of the grid `smart_resize` gives its
//! stored size (read from the file header). What batching, packing and the dry-run plan need.
//!
//! The lengths are cached next to the dataset (`<file>.lengths.json`), keyed by the file's size
//! and modification time and by everything that changes an encoding (tokenizer, chat template,
//! image processor settings, `cutoff_len`, `train_on`): the second start is a file read. A
//! changed file (or setting) recomputes them. The scan runs on every core, with a progress bar.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::encode::{encode_conversation_shape, truncate, Encoded, TrainOn};
use super::image::ImageProcessorConfig;
use super::sharegpt::Conversation;
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;

/// One record's length after encoding and truncation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SampleLength {
    /// `(tokens, target tokens)`: what training sees.
    Ok(u32, u32),
    /// The image tokens alone exceed `cutoff_len`, or truncation left no label: skipped.
    TooLong,
    /// The record cannot be encoded (the reason, naming FILE:LINE).
    Invalid(String),
}

impl SampleLength {
    pub fn tokens(&self) -> Option<usize> {
        match self {
            SampleLength::Ok(t, _) => Some(*t as usize),
            _ => None,
        }
    }

    /// Target (label) tokens, 0 when skipped.
    pub fn targets(&self) -> u32 {
        match self {
            SampleLength::Ok(_, l) => *l,
            _ => 0,
        }
    }
}

/// What encodes a record: tokenizer, chat template, image processor, truncation, labels.
pub struct LengthEncoder<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a ChatTemplate,
    pub images: &'a ImageProcessorConfig,
    pub cutoff_len: usize,
    pub train_on: TrainOn,
}

impl LengthEncoder<'_> {
    /// The encoded record as training truncates it (`None`: skipped as too long), pixels left out.
    pub fn shape(&self, conv: &Conversation) -> Result<Option<Encoded>> {
        let e = encode_conversation_shape(
            self.tokenizer,
            self.template,
            self.images,
            conv,
            self.train_on,
        )?;
        truncate(e, self.cutoff_len, self.tokenizer.special())
    }

    pub fn length(&self, conv: &Conversation) -> SampleLength {
        match self.shape(conv) {
            Ok(Some(e)) => SampleLength::Ok(
                e.input_ids.len() as u32,
                e.labels.iter().skip(1).filter(|l| l.is_some()).count() as u32,
            ),
            Ok(None) => SampleLength::TooLong,
            Err(err) => SampleLength::Invalid(format!("{err:#}")),
        }
    }

    /// Everything that changes an encoding, hashed (the cache key's settings part).
    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.tokenizer.fingerprint().hash(&mut h);
        self.template.source().hash(&mut h);
        format!("{:?}", self.images).hash(&mut h);
        self.cutoff_len.hash(&mut h);
        format!("{:?}", self.train_on).hash(&mut h);
        h.finish()
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    key: String,
    lengths: Vec<SampleLength>,
}

/// Where the lengths of `data` are cached.
pub fn cache_path(data: &Path) -> PathBuf {
    let mut name = data
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".lengths.json");
    data.with_file_name(name)
}

fn cache_key(data: &Path, encoder: &LengthEncoder) -> Result<String> {
    let meta = std::fs::metadata(data)
        .with_context(|| format!("dataset {}: cannot read", data.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!(
        "v1 size={} mtime={} settings={:016x}",
        meta.len(),
        mtime,
        encoder.fingerprint()
    ))
}

/// How a length scan went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanReport {
    /// Read from the cache.
    pub cached: bool,
    pub records: usize,
}

/// The lengths of `convs` (the records of the file `data`, in order), from the cache when it
/// is current, else computed (in parallel, with a progress bar unless `quiet`) and cached.
pub fn sample_lengths(
    data: &Path,
    convs: &[Conversation],
    encoder: &LengthEncoder,
    quiet: bool,
) -> Result<(Vec<SampleLength>, ScanReport)> {
    let key = cache_key(data, encoder)?;
    let cache = cache_path(data);
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok(c) = serde_json::from_str::<CacheFile>(&text) {
            if c.key == key && c.lengths.len() == convs.len() {
                return Ok((
                    c.lengths,
                    ScanReport {
                        cached: true,
                        records: convs.len(),
                    },
                ));
            }
        }
    }
    let lengths = scan(convs, encoder, quiet);
    let file = CacheFile { key, lengths };
    // A cache that cannot be written (read-only data folder) only costs the next start a scan.
    let tmp = cache.with_extension(format!("json.{}.tmp", std::process::id())); // one per process: the nodes of a run may share the data folder
    let written = serde_json::to_vec(&file)
        .ok()
        .and_then(|b| std::fs::write(&tmp, b).ok())
        .and_then(|_| std::fs::rename(&tmp, &cache).ok());
    if written.is_none() && !quiet {
        eprintln!("note: could not write the length cache {}", cache.display());
    }
    Ok((
        file.lengths,
        ScanReport {
            cached: false,
            records: convs.len(),
        },
    ))
}

fn scan(convs: &[Conversation], encoder: &LengthEncoder, quiet: bool) -> Vec<SampleLength> {
    let bar = if quiet || convs.len() < 1000 {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(convs.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("lengths {bar:30} {pos}/{len} records [{elapsed} < {eta}]")
            .expect("progress template"),
    );
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(convs.len().max(1));
    let next = AtomicUsize::new(0);
    const BLOCK: usize = 256;
    let mut out: Vec<Option<SampleLength>> = vec![None; convs.len()];
    let parts: Vec<Vec<(usize, SampleLength)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = vec![];
                    loop {
                        let start = next.fetch_add(BLOCK, Ordering::Relaxed);
                        if start >= convs.len() {
                            break;
                        }
                        let end = (start + BLOCK).min(convs.len());
                        for (i, c) in convs[start..end].iter().enumerate() {
                            mine.push((start + i, encoder.length(c)));
                        }
                        bar.inc((end - start) as u64);
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("length scan thread"))
            .collect()
    });
    for (i, l) in parts.into_iter().flatten() {
        out[i] = Some(l);
    }
    bar.finish_and_clear();
    out.into_iter()
        .map(|l| l.expect("every record scanned"))
        .collect()
}
