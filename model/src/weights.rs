//! HF safetensors in and out.
//!
//! Reading: a single `model.safetensors` or shards listed in `model.safetensors.index.json`;
//! bf16 / f16 / f32 (f64 too) on disk, converted to f32 on the host and then to the backend's
//! float type. Both key schemes are accepted: `visual.*` / `model.*` (original) and
//! `model.visual.*` / `model.language_model.*` (transformers >= 4.52); names are canonicalised
//! to the original scheme. Every tensor taken is checked against the shape the model expects,
//! and tensors left over at the end are reported: errors name the tensor, the file and both shapes.
//!
//! Writing: HF names (original scheme), `[out, in]` layout, sharded with an index when large.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// Map a checkpoint name to the original (canonical) scheme.
pub fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else {
        name.to_string()
    }
}

struct Entry {
    shard: usize,
    file_name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Lazily-read tensors of a checkpoint directory, handed out by canonical name.
pub struct WeightReader {
    dir: PathBuf,
    shards: Vec<(PathBuf, Mmap, usize)>, // path, map, data start
    entries: HashMap<String, Entry>,
    taken: HashSet<String>,
}

/// Which safetensors files make up a checkpoint.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        if files.is_empty() {
            bail!("{} lists no shards", index.display());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading model directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        bail!(
            "no model.safetensors, model.safetensors.index.json or *.safetensors in {}",
            dir.display()
        );
    }
    Ok(found)
}

impl WeightReader {
    pub fn open(dir: &Path) -> Result<Self> {
        let files = checkpoint_files(dir)?;
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for (si, path) in files.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the file is opened read-only and not modified while mapped by this process.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a valid safetensors file ({e:?}); truncated or corrupt?",
                        path.display()
                    )
                })?;
            let data_start = 8 + header_len;
            let data_len = map.len().saturating_sub(data_start);
            let file_name = path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                if end > data_len || start > end {
                    bail!(
                        "{}: tensor `{name}` needs bytes {start}..{end} of the data section but the file holds {data_len}: the file is truncated",
                        path.display()
                    );
                }
                let canon = canonical_name(&name);
                if let Some(prev) = entries.get(&canon) {
                    let prev: &Entry = prev;
                    bail!(
                        "tensor `{canon}` appears twice: in {} and {}",
                        prev.file_name,
                        file_name
                    );
                }
                entries.insert(
                    canon,
                    Entry {
                        shard: si,
                        file_name: file_name.clone(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            shards.push((path.clone(), map, data_start));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            entries,
            taken: HashSet::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Take tensor `name` (canonical), checking its shape; returns the values as f32.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.take_as(name, shape, None)
    }

    /// Take the `[rows, cols]` matrix `name` (HF's `[out, in]`) transposed to `[cols, rows]`
    /// (Burn's `[in, out]`), in one pass over the file's bytes.
    pub fn take_transposed(&mut self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        self.take_as(name, &[rows, cols], Some((rows, cols)))
    }

    /// [`Self::take_transposed`] for a tensor of `shape` read as a `rows x cols` matrix.
    pub fn take_transposed_as(
        &mut self,
        name: &str,
        shape: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>> {
        self.take_as(name, shape, Some((rows, cols)))
    }

    fn take_as(
        &mut self,
        name: &str,
        shape: &[usize],
        transposed: Option<(usize, usize)>,
    ) -> Result<Vec<f32>> {
        let Some(e) = self.entries.get(name) else {
            bail!(
                "missing tensor `{name}` (expected shape {shape:?}) in checkpoint {}",
                self.dir.display()
            );
        };
        if e.shape != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, but the model (from config.json) expects {shape:?}",
                self.dir.join(&e.file_name).display(),
                e.shape
            );
        }
        let (path, map, data_start) = &self.shards[e.shard];
        let (lo, hi) = (data_start + e.start, data_start + e.end);
        let n: usize = shape.iter().product();
        let out = decode(&map[lo..hi], e.dtype, n, transposed)
            .with_context(|| format!("tensor `{name}` in {}", path.display()))?;
        // The file's pages are not needed again: drop them from this process's memory (a
        // file-backed mapping; the kernel rereads them if ever touched again).
        release(map, lo, hi);
        self.taken.insert(name.to_string());
        Ok(out)
    }

    /// Error on tensors nobody took (a checkpoint of another shape or model).
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !self.taken.contains(*k))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        let e = &self.entries[left[0]];
        bail!(
            "unexpected tensor `{}` (shape {:?}) in {} ({} unexpected in all{}); does config.json match the weights?",
            left[0],
            e.shape,
            self.dir.join(&e.file_name).display(),
            left.len(),
            if left.len() > 1 { format!(", e.g. also `{}`", left[1]) } else { String::new() }
        )
    }
}

/// Tell the kernel that bytes `lo..hi` of `map` will not be read again.
fn release(map: &Mmap, lo: usize, hi: usize) {
    let page = 4096;
    let (a, b) = (lo.div_ceil(page) * page, hi / page * page);
    if b > a {
        // SAFETY: the mapping is private and read-only; dropping its pages only makes a later read
        // fetch them again from the file, which nothing here modifies.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
    }
}

/// Decode `n` little-endian values of `dtype` to f32, optionally as the transpose of a
/// `rows x cols` matrix, on every core for large tensors.
fn decode(
    bytes: &[u8],
    dtype: Dtype,
    n: usize,
    transposed: Option<(usize, usize)>,
) -> Result<Vec<f32>> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F64 => 8,
        other => bail!("unsupported dtype {other:?} (expected F32, BF16, F16 or F64)"),
    };
    if bytes.len() != n * width {
        bail!(
            "holds {} bytes, {n} values of {dtype:?} need {}",
            bytes.len(),
            n * width
        );
    }
    Ok(match dtype {
        Dtype::F32 => decode_as::<4, _>(bytes, n, transposed, f32::from_le_bytes),
        Dtype::BF16 => decode_as::<2, _>(bytes, n, transposed, |c| {
            f32::from_bits((u16::from_le_bytes(c) as u32) << 16)
        }),
        Dtype::F16 => decode_as::<2, _>(bytes, n, transposed, |c| {
            half::f16::from_bits(u16::from_le_bytes(c)).to_f32()
        }),
        _ => decode_as::<8, _>(bytes, n, transposed, |c| f64::from_le_bytes(c) as f32),
    })
}

/// [`decode`] for values of `W` bytes converted by `conv` (generic over the conversion, so that
/// each dtype gets its own inner loops, which the compiler vectorises; a `fn` pointer here was an
/// indirect call per value).
fn decode_as<const W: usize, F>(
    bytes: &[u8],
    n: usize,
    transposed: Option<(usize, usize)>,
    conv: F,
) -> Vec<f32>
where
    F: Fn([u8; W]) -> f32 + Copy + Send + Sync,
{
    let mut out = vec![0f32; n];
    huge_pages(&out);
    let at = move |c: &[u8]| conv(c.try_into().expect("W bytes"));
    match transposed {
        Some((rows, cols)) => transpose_rows(rows, cols, cols, rows, &mut out, |i| {
            at(&bytes[i * W..(i + 1) * W])
        }),
        None => {
            let threads = if n >= 1 << 20 {
                std::thread::available_parallelism()
                    .map(|t| t.get())
                    .unwrap_or(1)
            } else {
                1
            };
            let per = n.div_ceil(threads).max(1);
            std::thread::scope(|s| {
                for (chunk, src) in out.chunks_mut(per).zip(bytes.chunks(per * W)) {
                    s.spawn(move || {
                        for (o, v) in chunk.iter_mut().zip(src.chunks_exact(W)) {
                            *o = at(v);
                        }
                    });
                }
            });
        }
    }
    out
}

/// Ask Linux to back `v` (fresh, not yet touched) with 2 MiB pages where it spans them. Every
/// weight is a new allocation that the kernel must fault in and zero page by page; with 4 KiB
/// pages that was over half of a 3B load (BENCHMARKS.md, "Checkpoints"), with huge pages the
/// same 14 GiB fault in 2.4x faster. A hint only: without THP (or on other systems) nothing
/// changes.
fn huge_pages(v: &[f32]) {
    huge_pages_at(v.as_ptr() as usize, std::mem::size_of_val(v));
}

/// [`huge_pages`] for the `len` bytes of one allocation at `p`.
fn huge_pages_at(p: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 1 << 21;
        let (a, b) = (p.div_ceil(HUGE) * HUGE, (p + len) / HUGE * HUGE);
        if b > a {
            // SAFETY: advice on whole pages inside `v`'s own allocation; MADV_HUGEPAGE changes
            // how the kernel backs them, never their contents.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, len);
}

/// The transpose of columns `0..n_c` of the `rows x cols` matrix whose value `[r][c]` is
/// `get(r * cols + c)`, into rows `ld` values apart: `out[c * ld + r] = [r][c]` (`out` holds at
/// least `(n_c - 1) * ld + rows` values), split over every core for large matrices.
fn transpose_rows<T: Copy + Default + Send>(
    rows: usize,
    cols: usize,
    n_c: usize,
    ld: usize,
    out: &mut [T],
    get: impl Fn(usize) -> T + Sync,
) {
    if rows == 0 || n_c == 0 {
        return;
    }
    assert!(
        n_c <= cols && ld >= rows && out.len() >= (n_c - 1) * ld + rows,
        "transpose: {} values for {n_c} rows of {rows} every {ld}",
        out.len()
    );
    if rows * n_c < 1 << 20 {
        return transpose_block(rows, cols, 0, n_c, ld, out, get);
    }
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1);
    let per = n_c.div_ceil(threads);
    let get = &get;
    std::thread::scope(|s| {
        let mut rest = out;
        for c0 in (0..n_c).step_by(per) {
            let k = per.min(n_c - c0);
            let (mine, more) = if c0 + k < n_c {
                rest.split_at_mut(k * ld)
            } else {
                (rest, &mut [][..])
            };
            rest = more;
            s.spawn(move || transpose_block(rows, cols, c0, k, ld, mine, get));
        }
    });
}

/// Output rows `first..first + n_c` of the transpose of the `rows x cols` matrix whose value
/// `[r][c]` is `get(r * cols + c)`: `out[(c - first) * ld + r] = [r][c]`. A block of `TR`
/// source rows is consumed whole before the next: each of its rows is read `TC` values at a
/// time (contiguous reads) into a tile, which is written out `TR` contiguous values per output
/// row. 32 x 256 was the fastest tile shape tried on the 3B matrices (BENCHMARKS.md,
/// "Checkpoints"); walking one column block down all rows reads one 128-byte piece of every
/// source page per pass and ran 1.5-4x slower.
fn transpose_block<T: Copy + Default>(
    rows: usize,
    cols: usize,
    first: usize,
    n_c: usize,
    ld: usize,
    out: &mut [T],
    get: impl Fn(usize) -> T,
) {
    const TR: usize = 32;
    const TC: usize = 256;
    let mut tile = [T::default(); TR * TC];
    for r0 in (0..rows).step_by(TR) {
        let tr = TR.min(rows - r0);
        for c0 in (0..n_c).step_by(TC) {
            let tc = TC.min(n_c - c0);
            for i in 0..tr {
                let from = (r0 + i) * cols + first + c0;
                for (j, t) in tile[i * TC..i * TC + tc].iter_mut().enumerate() {
                    *t = get(from + j);
                }
            }
            for j in 0..tc {
                let dst = &mut out[(c0 + j) * ld + r0..][..tr];
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = tile[i * TC + j];
                }
            }
        }
    }
}

/// On-disk dtype of a saved checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
    F16,
}

impl SaveDtype {
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    /// Bytes per value on disk.
    fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
        }
    }

    /// `x` as `width()` little-endian bytes into `dst`.
    #[inline]
    fn put(self, x: f32, dst: &mut [u8]) {
        match self {
            Self::F32 => dst.copy_from_slice(&x.to_le_bytes()),
            Self::BF16 => dst.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes()),
            Self::F16 => dst.copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes()),
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(self, values, &mut out);
        out
    }
}

/// One tensor to save: HF name, shape, row-major f32 values.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A piece of an export's values.
#[derive(Debug, Clone, Copy)]
pub enum Chunk<'a> {
    /// The next values, in HF's row-major order.
    Values(&'a [f32]),
    /// Rows `row0..row0 + rows` (row-major in `src`) of the `total_rows x cols` matrix whose
    /// transpose is the tensor (Burn's `[in, out]` linear weights, saved in HF's `[out, in]`),
    /// of which columns `first..first + count` are this chunk's: output rows `first..first +
    /// count`, columns `row0..row0 + rows`. The strips of a block of output rows come in row
    /// order, the block complete with its last; blocks in order. The writer transposes and
    /// encodes each strip straight into the block's bytes, in one pass.
    Strip {
        src: &'a [f32],
        row0: usize,
        rows: usize,
        total_rows: usize,
        cols: usize,
        first: usize,
        count: usize,
    },
}

impl Chunk<'_> {
    pub fn len(&self) -> usize {
        match *self {
            Chunk::Values(v) => v.len(),
            Chunk::Strip { rows, count, .. } => rows * count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Values of an export in chunks: called with the most values a chunk may hold and a sink that
/// receives each chunk in order.
pub type ChunkFn = dyn Fn(usize, &mut dyn FnMut(Chunk) -> Result<()>) -> Result<()>;

/// Where a strip goes in its tensor: checks that strips come in order, and says whether this one
/// completes the tensor.
fn strip_place(
    next_row: &mut usize,
    row0: usize,
    rows: usize,
    total_rows: usize,
    name: &str,
) -> Result<bool> {
    if row0 != *next_row || row0 + rows > total_rows {
        bail!(
            "tensor `{name}`: a strip of rows {row0}..{} after row {next_row} of {total_rows}",
            row0 + rows
        );
    }
    *next_row = if row0 + rows == total_rows {
        0
    } else {
        row0 + rows
    };
    Ok(*next_row == 0)
}

/// At most this many values (16 MiB of f32) of one tensor are on the host at once when saving.
/// Blocks under glibc's largest mmap threshold (32 MiB) reuse freed heap memory; larger ones
/// were fresh mappings each time, which the kernel faulted in and zeroed page by page (a quarter
/// of a 3B save's time with 64 MiB blocks).
pub const EXPORT_CHUNK_VALUES: usize = 1 << 22;

/// One tensor of a model to export: its HF name and shape, and how to get its row-major f32
/// values (read from the device, transposed to HF's layout) when they are written. A model is
/// saved a chunk at a time: never more than [`EXPORT_CHUNK_VALUES`] of host values at once, so
/// saving needs little more memory than the model itself.
pub struct ExportTensor {
    pub name: String,
    pub shape: Vec<usize>,
    chunks: Box<ChunkFn>,
}

impl ExportTensor {
    /// An export whose values come whole from `values`.
    pub fn new(name: String, shape: Vec<usize>, values: impl Fn() -> Vec<f32> + 'static) -> Self {
        Self::chunked(name, shape, move |_, sink| sink(Chunk::Values(&values())))
    }

    /// An export whose values come in chunks (see [`ChunkFn`]).
    pub fn chunked(
        name: String,
        shape: Vec<usize>,
        chunks: impl Fn(usize, &mut dyn FnMut(Chunk) -> Result<()>) -> Result<()> + 'static,
    ) -> Self {
        Self {
            name,
            shape,
            chunks: Box::new(chunks),
        }
    }

    /// Feed the values to `sink` in chunks of at most `max_values` (a chunk may be larger
    /// when one row is).
    pub fn for_each_chunk(
        &self,
        max_values: usize,
        sink: &mut dyn FnMut(Chunk) -> Result<()>,
    ) -> Result<()> {
        (self.chunks)(max_values, sink)
    }

    /// All values at once.
    pub fn values(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len());
        let (mut start, mut next_row) = (0, 0);
        self.for_each_chunk(EXPORT_CHUNK_VALUES, &mut |c| match c {
            Chunk::Values(v) => {
                out.extend_from_slice(v);
                Ok(())
            }
            Chunk::Strip {
                src,
                row0,
                rows,
                total_rows,
                cols,
                first,
                count,
            } => {
                if row0 == 0 {
                    start = out.len();
                    out.resize(start + total_rows * count, 0.0);
                }
                strip_place(&mut next_row, row0, rows, total_rows, &self.name)?;
                transpose_rows(
                    rows,
                    cols,
                    count,
                    total_rows,
                    &mut out[start + row0..],
                    |i| src[first + i],
                );
                Ok(())
            }
        })
        .expect("collecting values cannot fail");
        out
    }

    pub fn materialize(self) -> NamedTensor {
        let values = self.values();
        NamedTensor {
            name: self.name,
            shape: self.shape,
            values,
        }
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Encode `values` into `out` (cleared first) as little-endian `dtype`, on every core for
/// large chunks.
fn encode_into(dtype: SaveDtype, values: &[f32], out: &mut Vec<u8>) {
    let w = dtype.width();
    out.clear();
    out.resize(values.len() * w, 0);
    // One loop per dtype (the match outside: each loop is vectorised on its own).
    let encode = move |src: &[f32], dst: &mut [u8]| match dtype {
        SaveDtype::F32 => {
            for (d, x) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        SaveDtype::BF16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
            }
        }
        SaveDtype::F16 => {
            for (d, &x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
            }
        }
    };
    if values.len() < 1 << 20 {
        return encode(values, out);
    }
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1);
    let per = values.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (src, dst) in values.chunks(per).zip(out.chunks_mut(per * w)) {
            s.spawn(move || encode(src, dst));
        }
    });
}

/// Encode columns `first..first + count` of the strip `src` (`rows x cols`, rows `row0..` of a
/// `total_rows x cols` matrix) into `out`, the bytes of those columns transposed (`[count,
/// total_rows]`), transposing and converting in one pass: the words are written straight into
/// the bytes (little-endian, the safetensors byte order, which this assumes of the machine).
#[allow(clippy::too_many_arguments)] // an inner loop's geometry, kept as plain integers
fn encode_strip(
    dtype: SaveDtype,
    src: &[f32],
    row0: usize,
    rows: usize,
    total_rows: usize,
    cols: usize,
    first: usize,
    count: usize,
    out: &mut [u8],
) {
    let w = dtype.width();
    let encoded = match dtype {
        SaveDtype::F32 => bytemuck::try_cast_slice_mut::<u8, u32>(out)
            .map(|o| {
                transpose_rows(rows, cols, count, total_rows, &mut o[row0..], |i| {
                    src[first + i].to_bits().to_le()
                })
            })
            .is_ok(),
        SaveDtype::BF16 => bytemuck::try_cast_slice_mut::<u8, u16>(out)
            .map(|o| {
                transpose_rows(rows, cols, count, total_rows, &mut o[row0..], |i| {
                    half::bf16::from_f32(src[first + i]).to_bits().to_le()
                })
            })
            .is_ok(),
        SaveDtype::F16 => bytemuck::try_cast_slice_mut::<u8, u16>(out)
            .map(|o| {
                transpose_rows(rows, cols, count, total_rows, &mut o[row0..], |i| {
                    half::f16::from_f32(src[first + i]).to_bits().to_le()
                })
            })
            .is_ok(),
    };
    if !encoded {
        // Bytes not aligned for words (never from the allocator in practice): value by value.
        for r in 0..rows {
            for c in 0..count {
                let at = (c * total_rows + row0 + r) * w;
                dtype.put(src[r * cols + first + c], &mut out[at..at + w]);
            }
        }
    }
}

/// Where [`write_behind`]'s producer puts its bytes: blocks go to the writer thread, which
/// hands emptied ones back for reuse.
struct Blocks<'a> {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Emptied blocks back from the writer.
    pool: Vec<Vec<u8>>,
    path: &'a Path,
}

impl Blocks<'_> {
    /// An empty block for `bytes` bytes: the smallest spare one that holds them, else a fresh
    /// one backed by huge pages (the transposing encoder writes each tile's values to hundreds
    /// of rows kilobytes apart: with 4 KiB pages, a TLB miss for most of them). At most four
    /// spares are kept (the smallest go).
    fn take(&mut self, bytes: usize) -> Vec<u8> {
        self.pool.extend(self.spare.try_iter());
        let fits = (0..self.pool.len())
            .filter(|&i| self.pool[i].capacity() >= bytes)
            .min_by_key(|&i| self.pool[i].capacity());
        let mut block = match fits {
            Some(i) => self.pool.swap_remove(i),
            None => {
                let block = Vec::with_capacity(bytes);
                huge_pages_at(block.as_ptr() as usize, block.capacity());
                block
            }
        };
        while self.pool.len() > 4 {
            let smallest = (0..self.pool.len())
                .min_by_key(|&i| self.pool[i].capacity())
                .expect("a spare");
            self.pool.swap_remove(smallest);
        }
        block.clear();
        block
    }

    /// Queue a block for writing (`Err` once the writer has stopped).
    fn send(&mut self, block: Vec<u8>) -> Result<()> {
        self.tx
            .send(block)
            .map_err(|_| anyhow::anyhow!("writing {}: the writer stopped", self.path.display()))
    }
}

/// Files at least this large are written around the page cache (`O_DIRECT`, see [`DirectSink`]).
const DIRECT_MIN_BYTES: usize = 64 << 20;
/// The size of each of [`DirectSink`]'s staging buffers.
const DIRECT_STAGE_BYTES: usize = 32 << 20;

/// Create `path` and run `produce`, which hands bytes to its [`Blocks`], while a second thread
/// writes them (`len` bytes in all, for the choice of the write path): encoding the next block
/// overlaps writing the last (a save is bounded by the disk or by the encoding, not by both one
/// after the other). At most two blocks wait. Returns the file, all bytes written.
fn write_behind(
    path: &Path,
    len: usize,
    produce: impl FnOnce(&mut Blocks) -> Result<()>,
) -> Result<File> {
    let direct = if len >= DIRECT_MIN_BYTES {
        DirectSink::create(path, DIRECT_STAGE_BYTES)
    } else {
        None
    };
    match direct {
        Some(sink) => write_behind_to(Sink::Direct(sink), path, produce),
        None => {
            let file =
                File::create(path).with_context(|| format!("creating {}", path.display()))?;
            write_behind_to(
                Sink::Buffered(std::io::BufWriter::with_capacity(1 << 22, file)),
                path,
                produce,
            )
        }
    }
}

/// [`write_behind`] into a given sink.
fn write_behind_to(
    mut sink: Sink,
    path: &Path,
    produce: impl FnOnce(&mut Blocks) -> Result<()>,
) -> Result<File> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
    let (spare_tx, spare) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<File> {
            for block in rx {
                sink.write(&block)
                    .with_context(|| format!("writing {}", path.display()))?;
                let _ = spare_tx.send(block);
            }
            sink.finish()
                .with_context(|| format!("writing {}", path.display()))
        });
        let produced = produce(&mut Blocks {
            tx,
            spare,
            pool: vec![],
            path,
        });
        let written = writer.join().map_err(|_| {
            anyhow::anyhow!("writing {}: the writer thread panicked", path.display())
        })?;
        // The writer's own error (a full disk, say) explains a failed send better than the send.
        let file = written?;
        produced?;
        Ok(file)
    })
}

/// Where [`write_behind`]'s writer thread puts the bytes.
enum Sink {
    /// Through the page cache.
    Buffered(std::io::BufWriter<File>),
    /// Around it.
    Direct(DirectSink),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match self {
            Sink::Buffered(w) => w.write_all(bytes),
            Sink::Direct(d) => d.write(bytes),
        }
    }

    fn finish(self) -> std::io::Result<File> {
        match self {
            Sink::Buffered(w) => w.into_inner().map_err(|e| e.into_error()),
            Sink::Direct(d) => d.finish(),
        }
    }
}

/// 4 KiB, aligned as `O_DIRECT` wants its buffers.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Writes a file with `O_DIRECT`, around the page cache: the bytes are copied into page-aligned
/// staging buffers, and a full buffer is written by a thread of its own while the next fills.
/// Through the page cache, a 3B save (7.5 GB) spent about 5 s of CPU in the kernel copying into
/// freshly allocated cache pages, on a machine whose model already holds most of the memory, and
/// the writer was throttled to the disk's speed anyway once the dirty-page limit was reached; a
/// copy into a reused aligned buffer is a fraction of that (BENCHMARKS.md, "Checkpoints"). The
/// file is padded to whole pages while written and cut to its length at the end. A file system
/// that refuses a direct write (`EINVAL`) gets this one and the rest through its page cache.
struct DirectSink {
    /// Filling now, and how many of its bytes are filled.
    stage: Vec<Page>,
    filled: usize,
    /// Full buffers to the I/O thread; emptied ones back.
    full: Option<std::sync::mpsc::SyncSender<(Vec<Page>, usize)>>,
    empty: std::sync::mpsc::Receiver<Vec<Page>>,
    io: Option<std::thread::JoinHandle<std::io::Result<File>>>,
    len: u64,
}

impl DirectSink {
    /// Create `path` for direct writes, `None` where that cannot be opened (the caller writes
    /// through the page cache).
    #[cfg(target_os = "linux")]
    fn create(path: &Path, stage_bytes: usize) -> Option<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let pages = stage_bytes.div_ceil(4096).max(1);
        let (full, rx) = std::sync::mpsc::sync_channel::<(Vec<Page>, usize)>(1);
        let (empty_tx, empty) = std::sync::mpsc::channel::<Vec<Page>>();
        // Two buffers in all: one filling, one being written.
        empty_tx.send(vec![Page([0; 4096]); pages]).ok()?;
        let io = std::thread::spawn(move || -> std::io::Result<File> {
            use std::os::unix::fs::FileExt;
            let (mut at, mut direct) = (0u64, true);
            for (stage, n) in rx {
                // Whole pages: the tail of the last buffer is padded (cut off again in `finish`).
                let bytes = &Self::bytes(&stage)[..n.div_ceil(4096) * 4096];
                match file.write_all_at(bytes, at) {
                    Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                        // Refused by this file system: this buffer again and the rest through
                        // the page cache.
                        direct = false;
                        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
                        // SAFETY: fcntl on a descriptor this thread owns.
                        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                        if flags < 0
                            || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) }
                                < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                        file.write_all_at(bytes, at)?;
                    }
                    r => r?,
                }
                at += n as u64;
                if empty_tx.send(stage).is_err() {
                    break;
                }
            }
            Ok(file)
        });
        Some(DirectSink {
            stage: vec![Page([0; 4096]); pages],
            filled: 0,
            full: Some(full),
            empty,
            io: Some(io),
            len: 0,
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn create(_: &Path, _: usize) -> Option<Self> {
        None
    }

    fn bytes(stage: &[Page]) -> &[u8] {
        // SAFETY: `Page` is 4096 plain bytes, without padding.
        unsafe { std::slice::from_raw_parts(stage.as_ptr() as *const u8, stage.len() * 4096) }
    }

    fn bytes_mut(stage: &mut [Page]) -> &mut [u8] {
        // SAFETY: as in `bytes`.
        unsafe { std::slice::from_raw_parts_mut(stage.as_mut_ptr() as *mut u8, stage.len() * 4096) }
    }

    fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            let room = self.stage.len() * 4096 - self.filled;
            let n = room.min(bytes.len());
            Self::bytes_mut(&mut self.stage)[self.filled..self.filled + n]
                .copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == self.stage.len() * 4096 {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Hand the filled buffer to the I/O thread and take an empty one.
    fn flush(&mut self) -> std::io::Result<()> {
        self.hand_over()?;
        match self.empty.recv() {
            Ok(stage) => {
                self.stage = stage;
                Ok(())
            }
            Err(_) => Err(self.stopped()),
        }
    }

    /// Queue the filled part of the buffer for the I/O thread.
    fn hand_over(&mut self) -> std::io::Result<()> {
        let job = (
            std::mem::take(&mut self.stage),
            std::mem::replace(&mut self.filled, 0),
        );
        match self.full.as_ref().map(|full| full.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => Err(self.stopped()),
        }
    }

    /// Why the I/O thread stopped early: its error.
    fn stopped(&mut self) -> std::io::Error {
        self.stop()
            .err()
            .unwrap_or_else(|| std::io::Error::other("the writer thread stopped"))
    }

    /// Close the queue and wait for the I/O thread.
    fn stop(&mut self) -> std::io::Result<File> {
        self.full = None;
        match self.io.take().map(|io| io.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the writer thread panicked")),
            None => Err(std::io::Error::other("the writer thread stopped")),
        }
    }

    /// Write what is left, wait for it, and cut the file to the bytes written.
    fn finish(mut self) -> std::io::Result<File> {
        if self.filled > 0 {
            self.hand_over()?;
        }
        let file = self.stop()?;
        file.set_len(self.len)?;
        Ok(file)
    }
}

/// Write a model's tensors as HF safetensors into `dir` (see [`save_safetensors`] for the
/// layout), one tensor at a time: each header is written first from the names and shapes, then
/// every tensor's bytes are computed, written and dropped.
pub fn save_exports(
    dir: &Path,
    tensors: &[ExportTensor],
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let elem = dtype.width();
    let mut shards: Vec<Vec<&ExportTensor>> = vec![vec![]];
    let mut size = 0usize;
    for t in tensors {
        let bytes = t.len() * elem;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(t);
        size += bytes;
    }
    let n = shards.len();
    let (mut weight_map, mut written, mut total) = (serde_json::Map::new(), Vec::new(), 0usize);
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        // The header: names, dtypes, shapes and offsets, in the order the data follows.
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for t in shard {
            let bytes = t.len() * elem;
            header.insert(t.name.clone(), json!({"dtype": format!("{:?}", dtype.dtype()), "shape": t.shape, "data_offsets": [offset, offset + bytes]}));
            offset += bytes;
        }
        let mut head = serde_json::to_vec(&header)?;
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let path = dir.join(&file_name);
        let tmp = dir.join(format!(".{file_name}.tmp"));
        let file = write_behind(&tmp, 8 + head.len() + offset, |blocks| {
            let mut b = blocks.take(8 + head.len());
            b.extend_from_slice(&(head.len() as u64).to_le_bytes());
            b.extend_from_slice(&head);
            blocks.send(b)?;
            for t in shard {
                let (mut count, mut next_row) = (0usize, 0usize);
                // A block of a transposed tensor's bytes, filled strip by strip, written when complete.
                let mut whole: Option<Vec<u8>> = None;
                t.for_each_chunk(EXPORT_CHUNK_VALUES, &mut |chunk| {
                    count += chunk.len();
                    if count > t.len() {
                        bail!(
                            "tensor `{}`: more than {} values for shape {:?}",
                            t.name,
                            t.len(),
                            t.shape
                        );
                    }
                    match chunk {
                        Chunk::Values(v) => {
                            let mut b = blocks.take(v.len() * elem);
                            encode_into(dtype, v, &mut b);
                            blocks.send(b)
                        }
                        Chunk::Strip {
                            src,
                            row0,
                            rows,
                            total_rows,
                            cols,
                            first,
                            count,
                        } => {
                            let mut b = match whole.take() {
                                Some(b) => b,
                                None => {
                                    let mut b = blocks.take(total_rows * count * elem);
                                    b.resize(total_rows * count * elem, 0);
                                    b
                                }
                            };
                            let last = strip_place(&mut next_row, row0, rows, total_rows, &t.name)?;
                            encode_strip(
                                dtype, src, row0, rows, total_rows, cols, first, count, &mut b,
                            );
                            if last {
                                blocks.send(b)
                            } else {
                                whole = Some(b);
                                Ok(())
                            }
                        }
                    }
                })?;
                if count != t.len() {
                    bail!(
                        "tensor `{}`: {count} values for shape {:?}",
                        t.name,
                        t.shape
                    );
                }
                weight_map.insert(t.name.clone(), json!(file_name));
            }
            Ok(())
        })?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        // Complete under its name (the rename is atomic: a killed process leaves no half shard
        // under a valid name); flushed to disk in the background, as the kernel would do a few
        // seconds later anyway. Waiting for the flush here (7.5 GB at the 3B shape) made a save
        // take 3x transformers' `save_pretrained`, which does not flush at all.
        std::thread::spawn(move || file.sync_all());
        total += offset;
        written.push(path);
    }
    let index = dir.join("model.safetensors.index.json");
    if n > 1 {
        let v = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(&index, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", index.display()))?;
    } else if index.exists() {
        std::fs::remove_file(&index).ok();
    }
    Ok(written)
}

/// Write tensors as HF safetensors into `dir`: one `model.safetensors`, or shards
/// `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` when the total exceeds
/// `max_shard_bytes`. Files are written under temporary names and renamed into place.
pub fn save_safetensors(
    dir: &Path,
    tensors: &[NamedTensor],
    dtype: SaveDtype,
    max_shard_bytes: usize,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let elem = dtype.width();
    // Group into shards in order.
    let mut shards: Vec<Vec<&NamedTensor>> = vec![vec![]];
    let mut size = 0usize;
    for t in tensors {
        let bytes = t.values.len() * elem;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(t);
        size += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut written = Vec::new();
    let mut total = 0usize;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = shard
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), dtype.encode(&t.values)))
            .collect();
        let views: Vec<(String, TensorView)> = encoded
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(dtype.dtype(), shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| anyhow::anyhow!("tensor `{name}`: {e:?}"))
            })
            .collect::<Result<_>>()?;
        let path = dir.join(&file_name);
        let tmp = dir.join(format!(".{file_name}.tmp"));
        safetensors::serialize_to_file(views, Some(metadata.clone()), &tmp)
            .map_err(|e| anyhow::anyhow!("writing {}: {e:?}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        for (name, _, bytes) in &encoded {
            weight_map.insert(name.clone(), json!(file_name));
            total += bytes.len();
        }
        written.push(path);
    }
    let index = dir.join("model.safetensors.index.json");
    if n > 1 {
        let v = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(&index, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", index.display()))?;
    } else if index.exists() {
        std::fs::remove_file(&index).ok();
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(
            canonical_name("model.visual.blocks.0.attn.qkv.weight"),
            "visual.blocks.0.attn.qkv.weight"
        );
        assert_eq!(
            canonical_name("model.language_model.layers.0.mlp.up_proj.weight"),
            "model.layers.0.mlp.up_proj.weight"
        );
        assert_eq!(
            canonical_name("model.layers.1.self_attn.q_proj.bias"),
            "model.layers.1.self_attn.q_proj.bias"
        );
        assert_eq!(canonical_name("lm_head.weight"), "lm_head.weight");
        assert_eq!(
            canonical_name("visual.merger.mlp.0.weight"),
            "visual.merger.mlp.0.weight"
        );
    }

    /// Bytes written around the page cache, in blocks of odd sizes through staging buffers of a
    /// few pages, read back the same, the file cut to its length (on file systems without
    /// `O_DIRECT`, the page-cache fallback is what runs).
    #[test]
    fn direct_writes_read_back_the_same() {
        let dir = std::env::temp_dir().join(format!("infimed-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (stage, sizes) in [
            (4096, vec![1usize, 4095, 4096, 4097, 9000, 3]),
            (3 * 4096, vec![5000; 7]),
            (8192, vec![8192, 8192]),
            (4096, vec![]),
        ] {
            let path = dir.join("f");
            let want: Vec<u8> = (0..sizes.iter().sum::<usize>())
                .map(|i| (i * 31 % 251) as u8)
                .collect();
            let sink = match DirectSink::create(&path, stage) {
                Some(d) => Sink::Direct(d),
                None => continue,
            };
            let want2 = want.clone();
            let sizes2 = sizes.clone();
            write_behind_to(sink, &path, move |blocks| {
                let mut at = 0;
                for n in sizes2 {
                    let mut b = blocks.take(n);
                    b.extend_from_slice(&want2[at..at + n]);
                    at += n;
                    blocks.send(b)?;
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                want,
                "stage {stage}, blocks {sizes:?}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A linear weight saved strip by strip (transposed and encoded in one pass) is the bytes of
    /// its transpose, in every dtype, aligned or not; and `values()` assembles the same.
    #[test]
    fn strips_encode_as_the_transposed_values() {
        // Odd shapes, strips of several sizes, and a matrix large enough to be split over threads.
        for (total_rows, cols, step) in [
            (1, 1, 1),
            (3, 700, 2),
            (300, 5, 64),
            (33, 257, 33),
            (1100, 1000, 250),
        ] {
            let src: Vec<f32> = (0..total_rows * cols)
                .map(|i| ((i * 7919) % 10007) as f32 * 1.37e-3 - 6.0)
                .collect();
            let transposed: Vec<f32> = (0..total_rows * cols)
                .map(|k| src[(k % total_rows) * cols + k / total_rows])
                .collect();
            fn feed(
                src: &[f32],
                total_rows: usize,
                cols: usize,
                step: usize,
                sink: &mut dyn FnMut(Chunk) -> Result<()>,
            ) -> Result<()> {
                for row0 in (0..total_rows).step_by(step) {
                    let rows = step.min(total_rows - row0);
                    sink(Chunk::Strip {
                        src: &src[row0 * cols..(row0 + rows) * cols],
                        row0,
                        rows,
                        total_rows,
                        cols,
                        first: 0,
                        count: cols,
                    })?;
                }
                Ok(())
            }
            let strips = |sink: &mut dyn FnMut(Chunk) -> Result<()>| {
                feed(&src, total_rows, cols, step, sink)
            };
            let owned = src.clone();
            let e = ExportTensor::chunked("w".into(), vec![cols, total_rows], move |_, sink| {
                feed(&owned, total_rows, cols, step, sink)
            });
            assert_eq!(e.values(), transposed, "{total_rows}x{cols}");
            for dtype in [SaveDtype::F32, SaveDtype::BF16, SaveDtype::F16] {
                let mut out = vec![0u8; total_rows * cols * dtype.width()];
                strips(&mut |c| {
                    let Chunk::Strip {
                        src,
                        row0,
                        rows,
                        total_rows,
                        cols,
                        first,
                        count,
                    } = c
                    else {
                        unreachable!()
                    };
                    encode_strip(
                        dtype, src, row0, rows, total_rows, cols, first, count, &mut out,
                    );
                    Ok(())
                })
                .unwrap();
                assert_eq!(
                    out,
                    dtype.encode(&transposed),
                    "{dtype:?} {total_rows}x{cols}"
                );
                // Bytes not aligned for words: the value-by-value path, the same bytes.
                let mut odd = vec![0u8; out.len() + 1];
                strips(&mut |c| {
                    let Chunk::Strip {
                        src,
                        row0,
                        rows,
                        total_rows,
                        cols,
                        first,
                        count,
                    } = c
                    else {
                        unreachable!()
                    };
                    encode_strip(
                        dtype,
                        src,
                        row0,
                        rows,
                        total_rows,
                        cols,
                        first,
                        count,
                        &mut odd[1..],
                    );
                    Ok(())
                })
                .unwrap();
                assert_eq!(
                    odd[1..],
                    out[..],
                    "{dtype:?} {total_rows}x{cols}, unaligned"
                );
            }
        }
    }

    /// The tiled, threaded transposing decode against the plain definition, on shapes that
    /// do not divide the tiles and (the last) large enough to be split over threads.
    #[test]
    fn transposed_decode_matches_the_definition() {
        for (rows, cols) in [(1, 1), (3, 700), (300, 5), (33, 257), (1100, 1000)] {
            let bits: Vec<u16> = (0..rows * cols)
                .map(|i| (i as u16).wrapping_mul(40503) >> 2)
                .collect();
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let got = decode(&bytes, Dtype::BF16, rows * cols, Some((rows, cols))).unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    let want = f32::from_bits((bits[r * cols + c] as u32) << 16);
                    assert_eq!(
                        got[c * rows + r].to_bits(),
                        want.to_bits(),
                        "{rows}x{cols} at [{r}, {c}]"
                    );
                }
            }
            let plain = decode(&bytes, Dtype::BF16, rows * cols, None).unwrap();
            assert!(plain
                .iter()
                .zip(&bits)
                .all(|(v, b)| v.to_bits() == (*b as u32) << 16));
        }
    }

    #[test]
    fn save_and_read_back_sharded_bf16() {
        let dir = std::env::temp_dir().join(format!("infimed-wt-{}", std::process::id()));
        let ts = vec![
            NamedTensor {
                name: "a".into(),
                shape: vec![2, 3],
                values: vec![1.0, -2.5, 3.25, 0.0, 1e-3, 7.0],
            },
            NamedTensor {
                name: "b".into(),
                shape: vec![4],
                values: vec![0.5, 0.25, -1.0, 2.0],
            },
        ];
        save_safetensors(&dir, &ts, SaveDtype::BF16, 8).unwrap();
        assert!(dir.join("model.safetensors.index.json").exists());
        let mut r = WeightReader::open(&dir).unwrap();
        let b = r.take("b", &[4]).unwrap();
        assert_eq!(b, vec![0.5, 0.25, -1.0, 2.0]);
        let err = r.take("a", &[3, 2]).unwrap_err().to_string();
        assert!(
            err.contains("`a`") && err.contains("[2, 3]") && err.contains("[3, 2]"),
            "{err}"
        );
        assert!(r
            .finish()
            .unwrap_err()
            .to_string()
            .contains("unexpected tensor `a`"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
