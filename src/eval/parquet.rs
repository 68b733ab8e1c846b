//! Rows of a parquet file as JSON objects, for the benchmark readers: MMMU ships parquet only,
//! and VQA-RAD / PathVQA / SLAKE are also published on the Hugging Face Hub as parquet.
//!
//! Columns become JSON fields (strings, numbers, bools, lists and structs as they are). An image
//! column of the Hugging Face `datasets` layout, a struct `{bytes: binary, path: string}`, is
//! written to `media_dir/<file stem>-<row>-<column>[-<k>].<ext>` (the extension from the stored
//! `path`, else from the bytes' signature) and replaced by that file's path; a struct with a
//! path and no bytes keeps the path. Other binary values are decoded as UTF-8 when they are,
//! else an error naming the file, row and column.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{json, Map, Value};

/// Each row of `path` as `("FILE row N", object)`, N counted from 1.
pub fn parquet_rows(path: &Path, media_dir: Option<&Path>) -> Result<Vec<(String, Value)>> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rows".into());
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in iter.enumerate() {
        let loc = format!("{} row {}", path.display(), i + 1);
        let row = row.map_err(|e| anyhow!("{loc}: {e}"))?;
        let mut sink = Media {
            dir: media_dir,
            stem: &stem,
            row: i + 1,
        };
        let v = row_json(&row, &mut sink, "").with_context(|| loc.clone())?;
        out.push((loc, v));
    }
    Ok(out)
}

struct Media<'a> {
    dir: Option<&'a Path>,
    stem: &'a str,
    row: usize,
}

impl Media<'_> {
    /// Write the bytes of the image at `column` and return its path.
    fn write(&mut self, column: &str, bytes: &[u8], stored_path: Option<&str>) -> Result<String> {
        let Some(dir) = self.dir else {
            bail!(
                "column `{column}` holds image bytes; give a folder to write them to (--media-dir)"
            );
        };
        let ext = stored_path
            .and_then(|p| Path::new(p).extension())
            .map(|e| e.to_string_lossy().to_lowercase())
            .filter(|e| !e.is_empty() && e.len() <= 5)
            .unwrap_or_else(|| sniff_extension(bytes).to_string());
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = format!(
            "{}-{}-{}.{ext}",
            self.stem,
            self.row,
            column.replace(['/', '\\', '.'], "_")
        );
        let p: PathBuf = dir.join(name);
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        Ok(p.to_string_lossy().into_owned())
    }
}

/// The usual file extension of an image's bytes (`bin` when unknown).
fn sniff_extension(b: &[u8]) -> &'static str {
    match b {
        [0x89, b'P', b'N', b'G', ..] => "png",
        [0xFF, 0xD8, 0xFF, ..] => "jpg",
        [b'G', b'I', b'F', b'8', ..] => "gif",
        [b'B', b'M', ..] => "bmp",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "webp",
        [b'I', b'I', 0x2A, 0x00, ..] | [b'M', b'M', 0x00, 0x2A, ..] => "tif",
        _ => "bin",
    }
}

fn row_json(row: &Row, media: &mut Media, prefix: &str) -> Result<Value> {
    let mut obj = Map::new();
    for (name, field) in row.get_column_iter() {
        let col = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        obj.insert(name.clone(), field_json(field, media, &col)?);
    }
    Ok(Value::Object(obj))
}

/// The `{bytes, path}` struct of a `datasets` Image column, if `row` is one.
fn image_struct(row: &Row) -> Option<(Option<&[u8]>, Option<&str>)> {
    let cols: Vec<(&String, &Field)> = row.get_column_iter().collect();
    if cols.len() != 2
        || !cols
            .iter()
            .all(|(n, _)| n.as_str() == "bytes" || n.as_str() == "path")
    {
        return None;
    }
    let mut bytes = None;
    let mut path = None;
    for (n, f) in cols {
        match (n.as_str(), f) {
            ("bytes", Field::Bytes(b)) => bytes = Some(b.data()),
            ("path", Field::Str(s)) => path = Some(s.as_str()),
            (_, Field::Null) => {}
            _ => return None,
        }
    }
    Some((bytes, path))
}

fn field_json(f: &Field, media: &mut Media, col: &str) -> Result<Value> {
    Ok(match f {
        Field::Null => Value::Null,
        Field::Bool(b) => json!(b),
        Field::Byte(x) => json!(x),
        Field::Short(x) => json!(x),
        Field::Int(x) => json!(x),
        Field::Long(x) => json!(x),
        Field::UByte(x) => json!(x),
        Field::UShort(x) => json!(x),
        Field::UInt(x) => json!(x),
        Field::ULong(x) => json!(x),
        Field::Float(x) => json!(x),
        Field::Double(x) => json!(x),
        Field::Str(s) => json!(s),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => json!(s),
            Err(_) => bail!(
                "column `{col}` holds binary data that is not an image struct {{bytes, path}}"
            ),
        },
        Field::Group(row) => match image_struct(row) {
            Some((Some(bytes), path)) => json!(media.write(col, bytes, path)?),
            Some((None, Some(path))) => json!(path),
            Some((None, None)) => Value::Null,
            None => row_json(row, media, col)?,
        },
        Field::ListInternal(list) => {
            let mut v = Vec::new();
            for (k, e) in list.elements().iter().enumerate() {
                v.push(field_json(e, media, &format!("{col}-{k}"))?);
            }
            Value::Array(v)
        }
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let key = match field_json(k, media, col)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key.clone(), field_json(v, media, &format!("{col}-{key}"))?);
            }
            Value::Object(obj)
        }
        // Decimals, dates, times, f16: their display text.
        other => json!(other.to_string()),
    })
}
