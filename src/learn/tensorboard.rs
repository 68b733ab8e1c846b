//! TensorBoard event files: what `tensorboard --logdir OUTPUT_DIR/tensorboard` (and the tools
//! built on it) reads, written without TensorFlow.
//!
//! The format, as TensorFlow's `tf.summary` and PyTorch's `SummaryWriter` write it:
//!
//! - a file `events.out.tfevents.{unix seconds}.{host}.infimed` of **TFRecords**: each record is
//!   `u64 length (LE) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)`, where
//!   `masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8` (wrapping) with `c` the CRC-32C
//!   (Castagnoli) of `x`;
//! - each record's data is a protobuf `tensorflow.Event` (`event.proto`): `wall_time` (1, double),
//!   `step` (2, int64), and one of `file_version` (3, string: the first record says
//!   `"brain.Event:2"`) or `summary` (5, `tensorflow.Summary`);
//! - a `Summary` holds `Value`s (1): `tag` (1), and `simple_value` (2, float) for a scalar, or
//!   `metadata` (9, `SummaryMetadata` with `plugin_data` (1) = {`plugin_name` (1) = "text"}) and
//!   `tensor` (8, a `TensorProto` of `dtype` (1) = DT_STRING (7), `tensor_shape` (2) = [1] and
//!   `string_val` (8)) for text, as the text plugin reads it.
//!
//! Scalars are f32 in this format (`simple_value`), so TensorBoard shows the metrics rounded to
//! f32; `metrics.jsonl` keeps the f64 values. The encoder is checked byte for byte against
//! TensorBoard's own writer on a committed file (`tests/fixtures/tensorboard/`).

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use prost::Message;

/// `tensorflow.Event`, the fields infimed writes.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar (`simple_value`) or a tensor with its plugin.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorflow.TensorProto`, as a string tensor.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto`.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// `DT_STRING` of `tensorflow.DataType`.
const DT_STRING: i32 = 7;

impl Event {
    /// The first record of every event file.
    pub fn version(wall_time: f64) -> Self {
        Self {
            wall_time,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        }
    }

    /// Scalars at `step`, one `Value` each.
    pub fn scalars(wall_time: f64, step: i64, scalars: &[(String, f64)]) -> Self {
        let value = scalars
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                simple_value: Some(*v as f32),
                ..Default::default()
            })
            .collect();
        Self {
            wall_time,
            step,
            file_version: None,
            summary: Some(Summary { value }),
        }
    }

    /// A text summary (the text plugin renders it as Markdown), tagged `{tag}/text_summary`
    /// as TensorBoard's and PyTorch's writers tag it.
    pub fn text(wall_time: f64, step: i64, tag: &str, text: &str) -> Self {
        let value = SummaryValue {
            tag: format!("{tag}/text_summary"),
            simple_value: None,
            tensor: Some(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShape {
                    dim: vec![Dim { size: 1 }],
                }),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                    content: vec![],
                }),
            }),
        };
        Self {
            wall_time,
            step,
            file_version: None,
            summary: Some(Summary { value: vec![value] }),
        }
    }
}

/// CRC-32C of `data`, masked as TFRecord stores it.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord holding `data`.
pub fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The events of one event file, in order; a corrupt record (bad CRC, cut short) is an error
/// naming the file and the record's byte offset.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = vec![];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    let mut events = vec![];
    let mut at = 0usize;
    while at < bytes.len() {
        let bad = |what: &str| format!("{}: record at byte {at}: {what}", path.display());
        if bytes.len() - at < 12 {
            bail!(bad("cut short (a run stopped while writing it?)"));
        }
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            bail!(bad("length CRC mismatch"));
        }
        let end = at + 12 + len;
        if bytes.len() < end + 4 {
            bail!(bad("cut short (a run stopped while writing it?)"));
        }
        let data = &bytes[at + 12..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            bail!(bad("data CRC mismatch"));
        }
        events.push(Event::decode(data).with_context(|| bad("not a tensorflow.Event"))?);
        at = end + 4;
    }
    Ok(events)
}

/// Event files in `dir` (TensorBoard reads them in name order), oldest first.
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut files = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let is_events = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("events.out.tfevents."));
        if is_events && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The event file writer of a run (`output_dir/tensorboard/`).
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `dir`. A fresh run (`keep_until_step = None`) removes the event files
    /// of an earlier run there (as `metrics.jsonl` starts over); a resumed run keeps the events
    /// of steps up to `keep_until_step` (rewritten into the new file, the old files removed),
    /// so the curves continue without the steps the resumed run will log again.
    pub fn open(dir: &Path, keep_until_step: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let old = event_files(dir)?;
        let mut kept = vec![];
        if let Some(s) = keep_until_step {
            for f in &old {
                let events = read_events(f)?;
                kept.extend(
                    events
                        .into_iter()
                        .filter(|e| e.file_version.is_none() && e.step <= s as i64),
                );
            }
        }
        let secs = wall_time();
        let host = hostname();
        let mut path = dir.join(format!(
            "events.out.tfevents.{}.{host}.infimed",
            secs as u64
        ));
        let mut k = 1;
        while old.contains(&path) || path.exists() {
            path = dir.join(format!(
                "events.out.tfevents.{}.{host}.infimed.{k}",
                secs as u64
            ));
            k += 1;
        }
        // Written under a hidden name and renamed: the old files go only once the new one holds
        // what they kept.
        let tmp = dir.join(".events.tmp");
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = Self {
            path: tmp.clone(),
            file: BufWriter::new(file),
        };
        w.write(&Event::version(secs))?;
        for e in &kept {
            w.write(e)?;
        }
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        w.path = path;
        for f in old {
            std::fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event (flushed, so TensorBoard sees it at once).
    pub fn write(&mut self, event: &Event) -> Result<()> {
        self.file
            .write_all(&tf_record(&event.encode_to_vec()))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn scalars(&mut self, step: usize, scalars: &[(String, f64)]) -> Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        self.write(&Event::scalars(wall_time(), step as i64, scalars))
    }

    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        self.write(&Event::text(wall_time(), step as i64, tag, text))
    }
}

/// Seconds since the Unix epoch.
pub fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This machine's host name (letters, digits, `-` and `.`), as event file names carry it.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_of_known_values() {
        // CRC-32C("123456789") = 0xe3069283 (the check value of the Castagnoli polynomial).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let c: u32 = 0xe306_9283;
        assert_eq!(
            masked_crc(b"123456789"),
            c.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn records_read_back_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::open(dir.path(), None).unwrap();
        w.scalars(
            3,
            &[("loss".into(), 0.5), ("by_task/mcq/reward".into(), 1.0)],
        )
        .unwrap();
        w.text(3, "completions", "| a | b |").unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let s = events[1].summary.as_ref().unwrap();
        assert_eq!(
            (
                events[1].step,
                s.value[1].tag.as_str(),
                s.value[1].simple_value
            ),
            (3, "by_task/mcq/reward", Some(1.0))
        );
        let t = events[2].summary.as_ref().unwrap().value[0]
            .tensor
            .as_ref()
            .unwrap();
        assert_eq!(t.string_val, vec![b"| a | b |".to_vec()]);

        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_events(&path).unwrap_err().to_string();
        assert!(
            err.contains("data CRC mismatch") && err.contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_resumed_writer_keeps_the_steps_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::open(dir.path(), None).unwrap();
        for step in 1..=6 {
            w.scalars(step, &[("loss".into(), step as f64)]).unwrap();
        }
        drop(w);
        let w = EventWriter::open(dir.path(), Some(4)).unwrap();
        let files = event_files(dir.path()).unwrap();
        assert_eq!(files, vec![w.path().to_path_buf()]);
        let steps: Vec<i64> = read_events(w.path())
            .unwrap()
            .iter()
            .skip(1)
            .map(|e| e.step)
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        drop(w);
        // A fresh run starts the curves over.
        let w = EventWriter::open(dir.path(), None).unwrap();
        assert_eq!(read_events(w.path()).unwrap().len(), 1);
        assert_eq!(event_files(dir.path()).unwrap().len(), 1);
    }
}
