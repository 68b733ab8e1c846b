//! Converters from the public benchmark files to [`BenchRecord`] JSONL (`infimed bench-convert`).
//!
//! Every converter writes image paths as ABSOLUTE paths (the input folder is canonicalised), so the
//! output file can live anywhere. Ids are `"<key>/<native id>"` (`<key>` = the format name below);
//! an id that repeats within one conversion gets `#2`, `#3`, ... appended. Records that cannot be
//! converted (e.g. an OmniMedVQA answer that is none of its options) are an error naming the file
//! and record, or, with `skip_invalid`, counted skips.
//!
//! Layouts (what we read; where we are unsure it is said):
//!
//! * `slake` — SLAKE (`BoKelvin/SLAKE` / Slake1.0): `test.json`, a JSON array of
//!   `{"qid", "img_name", "question", "answer", "answer_type": "OPEN"|"CLOSED", "q_lang": "en"|"zh", ...}`,
//!   images under `imgs/<img_name>`. `--input` is the folder or the JSON file. CLOSED -> `closed`,
//!   OPEN -> `open`. Both languages (as MedEvalKit: all 2,094 test questions; Chinese records get
//!   `lang: "zh"`) unless `lang` keeps one. The answer is kept as written ("Yes", "是的").
//! * `vqa-rad` — VQA-RAD, two layouts: (a) the official OSF release `VQA_RAD Dataset Public.json`
//!   (JSON array of `{"qid", "image_name", "question", "answer", "answer_type", "phrase_type", ...}`;
//!   the test split is `phrase_type` `test_freeform` + `test_para`, 451 questions; images in
//!   `VQA_RAD Image Folder/`); (b) rows exported from the Hugging Face copy
//!   (`flaviagiammarino/vqa-rad`, which ships parquet only): a JSON array or JSONL of
//!   `{"question", "answer", "image": PATH | {"path": PATH}, "id"?}` (paths relative to the file).
//!   yes/no answers -> `yes_no`, others -> `open` (MedEvalKit's rule; the OSF `answer_type`
//!   field is not used).
//! * `pathvqa` — PathVQA: (a) the official `pvqa` release, `qas/test/test_qa.pkl`, a Python pickle
//!   that we read as a list of `{"image": "test_0000", "question", "answer"}` (images
//!   `images/test/<image>.jpg` under the `pvqa` folder) — we have not seen this file ourselves, the
//!   layout is the one the PathVQA code uses; any pickled list of dicts with those keys works;
//!   (b) rows exported from the Hugging Face copy `flaviagiammarino/path-vqa` (parquet only) as for
//!   VQA-RAD (b). yes/no -> `yes_no`, else `open`. Note: the Hugging Face copy drops duplicate
//!   question-answer pairs, so its test split is a little smaller than the pickle's.
//! * `pmc-vqa` — PMC-VQA (`xmcmic/PMC-VQA`, `RadGenome/PMC-VQA`): `test_2.csv` (MedEvalKit's
//!   choice; `test.csv` has the same layout), a CSV with a header naming (case and punctuation
//!   ignored) `Figure_path`, `Question`, `Choice A`..`Choice D`, `Answer` and optionally
//!   `Answer_label`, `Caption`, `split` and a leading index column. Choices look like `A:CT` (the
//!   `A:` prefix is removed); the answer is a letter or an option text (`Answer_label` is tried
//!   when `Answer` is neither; we have not checked every release of the file, so all three answer
//!   forms are accepted). Images: `figures/<Figure_path>` if that folder exists, else
//!   `images/<Figure_path>`. `--input` is the folder (then `test_2.csv`) or the CSV file. `meta`
//!   keeps the choice cells and the question as published (`choices`, `question`: MedEvalKit's
//!   prompt and judge use them).
//! * `omnimedvqa` — OmniMedVQA: `QA_information/Open-access/*.json` (the Restricted-access part is
//!   not public), each a JSON array of `{"question_id", "question", "gt_answer", "option_A"..
//!   "option_D", "image_path", "dataset", "question_type", "modality_type"}`; `image_path` is
//!   relative to the OmniMedVQA folder. The answer letter is the option whose text equals
//!   `gt_answer` (exactly, else after lowercasing and dropping punctuation); `meta` keeps
//!   `gt_answer` as published (MedEvalKit keeps a gold that is not exactly an option as text). `--input` is the
//!   OmniMedVQA folder, the `Open-access` folder or one JSON file.
//! * `medxpertqa` — MedXpertQA MM (`TsinghuaC3I/MedXpertQA`): `MM/test.jsonl`, lines
//!   `{"id", "question", "options": {"A".."E"}, "label", "images": [...], "medical_task",
//!   "body_system", "question_type"}`, images in `images/` (of the dataset folder); or the
//!   authors' official eval input `eval/data/medxpertqa/input/medxpertqa_mm_input.jsonl`
//!   (`"options": [{"letter", "content"}]`, `"label": ["A"]`, `"images": [{"image_path"}]`). The
//!   question text already ends with the answer choices; it is kept as published (MedEvalKit
//!   does too). `--input` is the dataset folder, the input folder or the JSONL file.
//! * `mmmu` — MMMU Health & Medicine (`MMMU/MMMU`, subjects Basic_Medical_Science,
//!   Clinical_Medicine, Diagnostics_and_Laboratory_Medicine, Pharmacy, Public_Health; the
//!   validation split is the one with public answers). MMMU ships parquet only, with the images
//!   embedded: `--input` is the downloaded repository folder (`<Subject>/validation-*.parquet`),
//!   one parquet file, or rows exported from it as a JSON array or JSONL (or a folder of them),
//!   each `{"id": "validation_Clinical_Medicine_1", "question", "options": "['..', '..']" (the
//!   published Python-list string) or a JSON list, "answer", "question_type": "multiple-choice" |
//!   "open", "image_1".."image_7": PATH | {"path": PATH} | {"bytes", "path"} (parquet) | null}`.
//!   Embedded images are written under `media_dir`. Rows of other subjects (by the id) are
//!   filtered out. multiple-choice -> `mcq` (options A, B, ...), open -> `closed`. The
//!   `<image 1>` tags stay in the question text.
//!
//! Every reader that takes JSON rows (all but the CSV and pickle layouts) also takes parquet
//! files of the same columns, as the Hugging Face Hub republishes these benchmarks (e.g.
//! `flaviagiammarino/vqa-rad` and `flaviagiammarino/path-vqa`: `image` {bytes, path},
//! `question`, `answer`).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use super::{csv, norm_words, resolve_mcq_answer, AnswerType, BenchRecord, Skipped};

/// The benchmarks `bench-convert` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BenchFormat {
    Mmmu,
    VqaRad,
    Slake,
    PathVqa,
    PmcVqa,
    OmniMedVqa,
    MedXpertQa,
}

impl BenchFormat {
    pub const ALL: [BenchFormat; 7] = [
        BenchFormat::Mmmu,
        BenchFormat::VqaRad,
        BenchFormat::Slake,
        BenchFormat::PathVqa,
        BenchFormat::PmcVqa,
        BenchFormat::OmniMedVqa,
        BenchFormat::MedXpertQa,
    ];

    /// The `--format` name (also the id prefix).
    pub fn key(self) -> &'static str {
        match self {
            BenchFormat::Mmmu => "mmmu",
            BenchFormat::VqaRad => "vqa-rad",
            BenchFormat::Slake => "slake",
            BenchFormat::PathVqa => "pathvqa",
            BenchFormat::PmcVqa => "pmc-vqa",
            BenchFormat::OmniMedVqa => "omnimedvqa",
            BenchFormat::MedXpertQa => "medxpertqa",
        }
    }

    /// The `benchmark` field written (a Table 1 column name).
    pub fn benchmark(self) -> &'static str {
        match self {
            BenchFormat::Mmmu => "MMMU-H&M",
            BenchFormat::VqaRad => "VQA-RAD",
            BenchFormat::Slake => "SLAKE",
            BenchFormat::PathVqa => "PathVQA",
            BenchFormat::PmcVqa => "PMC-VQA",
            BenchFormat::OmniMedVqa => "OmniMedVQA",
            BenchFormat::MedXpertQa => "MedXpertQA",
        }
    }
}

impl std::fmt::Display for BenchFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

impl std::str::FromStr for BenchFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let k = super::norm_key(s);
        let k = match k.as_str() {
            "mmmuhm" | "mmmuhealthmedicine" => "mmmu".to_string(),
            "medxpertqamm" => "medxpertqa".to_string(),
            _ => k,
        };
        Self::ALL.into_iter().find(|f| super::norm_key(f.key()) == k).ok_or_else(|| {
            anyhow!("unknown benchmark format {s:?} (expected one of mmmu, vqa-rad, slake, pathvqa, pmc-vqa, omnimedvqa, medxpertqa)")
        })
    }
}

/// Options of a conversion.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// SLAKE: keep only this language (`en` or `zh`; default: both).
    pub lang: Option<String>,
    /// Split where the source has several in one file (VQA-RAD OSF: `test` (default), `train`,
    /// `all`) or in its folder layout (PathVQA pickle: `test` default, `val`, `train`; MMMU:
    /// keep ids of this split, default `validation`).
    pub split: Option<String>,
    /// Skip (and count) records that cannot be converted instead of failing.
    pub skip_invalid: bool,
    /// Where images embedded in parquet rows are written (`bench-convert` uses
    /// `<out folder>/<out stem>-images/`).
    pub media_dir: Option<PathBuf>,
}

/// The result of a conversion.
#[derive(Debug, Clone, Default)]
pub struct Conversion {
    pub records: Vec<BenchRecord>,
    /// Records left out on purpose (other language, split or subject).
    pub filtered: usize,
    /// Records that could not be converted (`skip_invalid`).
    pub skipped: Vec<Skipped>,
}

impl Conversion {
    /// Count of records per answer type.
    pub fn counts(&self) -> BTreeMap<AnswerType, usize> {
        let mut m = BTreeMap::new();
        for r in &self.records {
            *m.entry(r.answer_type).or_insert(0) += 1;
        }
        m
    }
}

/// Convert the public files of `format` at `input` (a file or the dataset folder).
pub fn convert(format: BenchFormat, input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    ensure!(input.exists(), "{} does not exist", input.display());
    let mut conv = match format {
        BenchFormat::Slake => slake(input, opts)?,
        BenchFormat::VqaRad => vqa_rad(input, opts)?,
        BenchFormat::PathVqa => path_vqa(input, opts)?,
        BenchFormat::PmcVqa => pmc_vqa(input, opts)?,
        BenchFormat::OmniMedVqa => omnimedvqa(input, opts)?,
        BenchFormat::MedXpertQa => medxpertqa(input, opts)?,
        BenchFormat::Mmmu => mmmu(input, opts)?,
    };
    dedupe_ids(&mut conv.records);
    Ok(conv)
}

/// Write records as JSONL (the parent folder is created).
pub fn write_records(path: &Path, records: &[BenchRecord]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::io::BufWriter::new(
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for r in records {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn dedupe_ids(records: &mut [BenchRecord]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in records.iter_mut() {
        let n = seen.entry(r.id.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            r.id = format!("{}#{}", r.id, n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

fn canon(p: &Path) -> Result<PathBuf> {
    fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The rows of a JSON array file, a JSONL file or a parquet file (`.parquet`: images embedded as
/// `{bytes, path}` structs are written under `opts.media_dir`, see [`super::parquet`]).
fn read_rows(path: &Path, opts: &ConvertOptions) -> Result<Vec<(String, Value)>> {
    if is_parquet(path) {
        return super::parquet::parquet_rows(path, opts.media_dir.as_deref());
    }
    read_json_rows(path)
}

fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// A JSON array file, or JSONL (one object per line). Each value comes with its location
/// (`FILE:LINE` for JSONL, `FILE[index]` for an array).
fn read_json_rows(path: &Path) -> Result<Vec<(String, Value)>> {
    let text = read_text(path)?;
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(trimmed)
            .with_context(|| format!("{}: malformed JSON", path.display()))?;
        let arr = v.as_array().cloned().unwrap_or_default();
        return Ok(arr
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{}[{i}]", path.display()), v))
            .collect());
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = if i == 0 {
            line.trim_start_matches('\u{feff}')
        } else {
            line
        };
        if line.trim().is_empty() {
            continue;
        }
        let loc = format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{loc}: malformed JSON: {e}"))?;
        out.push((loc, v));
    }
    Ok(out)
}

fn get_str(obj: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match obj.get(*k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    })
}

fn need_str(obj: &Map<String, Value>, key: &str) -> Result<String> {
    get_str(obj, &[key]).ok_or_else(|| anyhow!("missing string field `{key}`"))
}

/// An image reference: a string path, or an object with a `path` (Hugging Face `Image` export) or
/// an `image_path` (MedXpertQA's official eval input).
fn image_ref(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(o) => o
            .get("path")
            .or_else(|| o.get("image_path"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        _ => None,
    }
}

fn join_str(root: &Path, rel: &str) -> String {
    let p = Path::new(rel);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
    .to_string_lossy()
    .into_owned()
}

fn is_yes_no(answer: &str) -> bool {
    let a = answer.trim().to_lowercase();
    a == "yes" || a == "no"
}

/// Run `f` on each (location, value); an error is fatal or a skip.
fn each_row(
    rows: Vec<(String, Value)>,
    opts: &ConvertOptions,
    conv: &mut Conversion,
    mut f: impl FnMut(&Map<String, Value>, usize) -> Result<Option<BenchRecord>>,
) -> Result<()> {
    for (i, (loc, v)) in rows.into_iter().enumerate() {
        let res = v
            .as_object()
            .context("a row must be a JSON object")
            .and_then(|o| f(o, i))
            .and_then(|r| match r {
                Some(mut r) => {
                    r.validate()?;
                    Ok(Some(r))
                }
                None => Ok(None),
            });
        match res {
            Ok(Some(r)) => conv.records.push(r),
            Ok(None) => conv.filtered += 1,
            Err(e) if opts.skip_invalid => conv.skipped.push(Skipped {
                location: loc,
                reason: format!("{e:#}"),
            }),
            Err(e) => return Err(anyhow!("{loc}: {e:#}")),
        }
    }
    Ok(())
}

fn record(
    format: BenchFormat,
    id: String,
    question: String,
    answer: String,
    answer_type: AnswerType,
) -> BenchRecord {
    BenchRecord {
        id: format!("{}/{}", format.key(), id),
        benchmark: format.benchmark().to_string(),
        question,
        options: None,
        answer,
        answer_type,
        images: Vec::new(),
        lang: None,
        meta: None,
    }
}

fn meta_of(obj: &Map<String, Value>, keys: &[&str]) -> Option<Value> {
    let m: Map<String, Value> = keys
        .iter()
        .filter_map(|k| {
            obj.get(*k)
                .filter(|v| !v.is_null())
                .map(|v| (k.to_string(), v.clone()))
        })
        .collect();
    (!m.is_empty()).then_some(Value::Object(m))
}

// ---------------------------------------------------------------------------------------------
// SLAKE

fn slake(input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    let file = if input.is_dir() {
        input.join("test.json")
    } else {
        input.to_path_buf()
    };
    let root = canon(&parent_of(&file))?;
    let mut conv = Conversion::default();
    each_row(read_rows(&file, opts)?, opts, &mut conv, |o, i| {
        let lang = get_str(o, &["q_lang"])
            .unwrap_or_else(|| "en".into())
            .to_lowercase();
        if opts.lang.as_ref().is_some_and(|l| *l != lang) {
            return Ok(None);
        }
        let t = need_str(o, "answer_type")?;
        let answer_type = match t.trim().to_ascii_uppercase().as_str() {
            "OPEN" => AnswerType::Open,
            "CLOSED" => AnswerType::Closed,
            _ => bail!("SLAKE answer_type must be OPEN or CLOSED, got {t:?}"),
        };
        let id = get_str(o, &["qid"]).unwrap_or_else(|| i.to_string());
        let mut r = record(
            BenchFormat::Slake,
            id,
            need_str(o, "question")?,
            need_str(o, "answer")?,
            answer_type,
        );
        r.images = vec![join_str(&root.join("imgs"), &need_str(o, "img_name")?)];
        r.lang = (lang != "en").then_some(lang);
        r.meta = meta_of(o, &["modality", "location", "content_type", "base_type"]);
        Ok(Some(r))
    })?;
    Ok(conv)
}

// ---------------------------------------------------------------------------------------------
// VQA-RAD and PathVQA rows

/// `{"question", "answer", "image"}` rows (Hugging Face export); yes/no -> yes_no, else open.
fn qa_row(
    format: BenchFormat,
    o: &Map<String, Value>,
    i: usize,
    root: &Path,
) -> Result<BenchRecord> {
    let answer = need_str(o, "answer")?;
    let t = if is_yes_no(&answer) {
        AnswerType::YesNo
    } else {
        AnswerType::Open
    };
    let id = get_str(o, &["id", "qid"]).unwrap_or_else(|| i.to_string());
    let mut r = record(format, id, need_str(o, "question")?, answer, t);
    let img = o
        .get("image")
        .or_else(|| o.get("images"))
        .context("missing field `image`")?;
    r.images = match img {
        Value::Array(a) => a
            .iter()
            .filter_map(image_ref)
            .map(|p| join_str(root, &p))
            .collect(),
        v => vec![join_str(
            root,
            &image_ref(v).context("`image` must be a path or {\"path\": ...}")?,
        )],
    };
    Ok(r)
}

fn vqa_rad(input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    let file = if input.is_dir() {
        let osf = input.join("VQA_RAD Dataset Public.json");
        ensure!(
            osf.exists(),
            "{} has no `VQA_RAD Dataset Public.json`; pass the file itself",
            input.display()
        );
        osf
    } else {
        input.to_path_buf()
    };
    let root = canon(&parent_of(&file))?;
    let split = opts
        .split
        .clone()
        .unwrap_or_else(|| "test".into())
        .to_lowercase();
    ensure!(
        matches!(split.as_str(), "test" | "train" | "all"),
        "VQA-RAD --split must be test, train or all, got {split:?}"
    );
    let img_dir = {
        let d = root.join("VQA_RAD Image Folder");
        if d.is_dir() {
            d
        } else {
            root.clone()
        }
    };
    let mut conv = Conversion::default();
    each_row(read_rows(&file, opts)?, opts, &mut conv, |o, i| {
        if let Some(phrase) = get_str(o, &["phrase_type"]) {
            let is_test = phrase.to_lowercase().starts_with("test");
            let keep = match split.as_str() {
                "test" => is_test,
                "train" => !is_test,
                _ => true,
            };
            if !keep {
                return Ok(None);
            }
            let answer = need_str(o, "answer")?;
            let t = if is_yes_no(&answer) {
                AnswerType::YesNo
            } else {
                AnswerType::Open
            };
            let id = get_str(o, &["qid"]).unwrap_or_else(|| i.to_string());
            let mut r = record(BenchFormat::VqaRad, id, need_str(o, "question")?, answer, t);
            r.images = vec![join_str(&img_dir, &need_str(o, "image_name")?)];
            r.meta = meta_of(
                o,
                &["image_organ", "question_type", "answer_type", "phrase_type"],
            );
            Ok(Some(r))
        } else {
            Ok(Some(qa_row(BenchFormat::VqaRad, o, i, &root)?))
        }
    })?;
    Ok(conv)
}

/// Convert a pickle value to JSON (dicts with non-string keys use their display form).
fn pickle_to_json(v: serde_pickle::Value) -> Value {
    use serde_pickle::{HashableValue as H, Value as P};
    fn key(h: H) -> String {
        match h {
            H::String(s) => s,
            H::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
            H::I64(i) => i.to_string(),
            other => format!("{other:?}"),
        }
    }
    match v {
        P::None => Value::Null,
        P::Bool(b) => Value::Bool(b),
        P::I64(i) => json!(i),
        P::Int(i) => Value::String(i.to_string()),
        P::F64(f) => json!(f),
        P::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        P::String(s) => Value::String(s),
        P::List(l) | P::Tuple(l) => Value::Array(l.into_iter().map(pickle_to_json).collect()),
        P::Set(s) | P::FrozenSet(s) => {
            Value::Array(s.into_iter().map(|h| Value::String(key(h))).collect())
        }
        P::Dict(d) => Value::Object(
            d.into_iter()
                .map(|(k, v)| (key(k), pickle_to_json(v)))
                .collect(),
        ),
    }
}

fn path_vqa(input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    let split = opts
        .split
        .clone()
        .unwrap_or_else(|| "test".into())
        .to_lowercase();
    let file = if input.is_dir() {
        let cands = [
            input
                .join("qas")
                .join(&split)
                .join(format!("{split}_qa.pkl")),
            input
                .join("pvqa")
                .join("qas")
                .join(&split)
                .join(format!("{split}_qa.pkl")),
            input.join(format!("{split}_qa.pkl")),
        ];
        cands
            .iter()
            .find(|p| p.exists())
            .cloned()
            .with_context(|| {
                format!(
                    "{} has no qas/{split}/{split}_qa.pkl; pass the pickle or a JSON/JSONL export",
                    input.display()
                )
            })?
    } else {
        input.to_path_buf()
    };
    let is_pickle = file
        .extension()
        .is_some_and(|e| e == "pkl" || e == "pickle");
    let mut conv = Conversion::default();
    if !is_pickle {
        let root = canon(&parent_of(&file))?;
        each_row(read_rows(&file, opts)?, opts, &mut conv, |o, i| {
            Ok(Some(qa_row(BenchFormat::PathVqa, o, i, &root)?))
        })?;
        return Ok(conv);
    }
    let bytes = fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let value: serde_pickle::Value = serde_pickle::value_from_slice(
        &bytes,
        serde_pickle::DeOptions::new()
            .decode_strings()
            .replace_unresolved_globals(),
    )
    .map_err(|e| anyhow!("{}: not a readable pickle: {e}", file.display()))?;
    let rows = match pickle_to_json(value) {
        Value::Array(a) => a,
        other => bail!(
            "{}: expected a pickled list of dicts, got {}",
            file.display(),
            kind(&other)
        ),
    };
    // The pvqa folder: the nearest ancestor with an images/ folder.
    let abs = canon(&file)?;
    let pvqa = abs
        .ancestors()
        .skip(1)
        .find(|d| d.join("images").is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| parent_of(&abs));
    let img_dir = pvqa.join("images").join(&split);
    let rows: Vec<(String, Value)> = rows
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("{}[{i}]", file.display()), v))
        .collect();
    each_row(rows, opts, &mut conv, |o, i| {
        let answer = need_str(o, "answer")?;
        let t = if is_yes_no(&answer) {
            AnswerType::YesNo
        } else {
            AnswerType::Open
        };
        let mut r = record(
            BenchFormat::PathVqa,
            i.to_string(),
            need_str(o, "question")?,
            answer,
            t,
        );
        let img = need_str(o, "image")?;
        let img = if Path::new(&img).extension().is_some() {
            img
        } else {
            format!("{img}.jpg")
        };
        r.images = vec![join_str(&img_dir, &img)];
        Ok(Some(r))
    })?;
    Ok(conv)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "None",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

// ---------------------------------------------------------------------------------------------
// PMC-VQA

/// `A:CT` / `A. CT` / `(A) CT` -> `CT` when the prefix letter is `letter`.
fn strip_choice_prefix(text: &str, letter: char) -> String {
    let t = text.trim();
    let c: Vec<char> = t.chars().collect();
    let skip = match c.as_slice() {
        ['(', l, ')', ..] if l.eq_ignore_ascii_case(&letter) => 3,
        [l, ':' | '.' | ')', ..] if l.eq_ignore_ascii_case(&letter) => 2,
        _ => 0,
    };
    c[skip..].iter().collect::<String>().trim().to_string()
}

fn pmc_vqa(input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    let file = if input.is_dir() {
        let cands = [input.join("test_2.csv"), input.join("test.csv")];
        cands
            .iter()
            .find(|p| p.exists())
            .cloned()
            .with_context(|| format!("{} has no test_2.csv or test.csv", input.display()))?
    } else {
        input.to_path_buf()
    };
    let root = canon(&parent_of(&file))?;
    let img_dir = if root.join("figures").is_dir() {
        root.join("figures")
    } else {
        root.join("images")
    };
    let rows = csv::parse(&read_text(&file)?).with_context(|| file.display().to_string())?;
    let (header, body) = rows
        .split_first()
        .with_context(|| format!("{}: empty CSV", file.display()))?;
    let col = |name: &str| {
        header
            .fields
            .iter()
            .position(|h| super::norm_key(h) == name)
    };
    let fig =
        col("figurepath").with_context(|| format!("{}: no Figure_path column", file.display()))?;
    let q = col("question").with_context(|| format!("{}: no Question column", file.display()))?;
    let ans = col("answer").with_context(|| format!("{}: no Answer column", file.display()))?;
    let label = col("answerlabel");
    let index = col("index").or_else(|| {
        header
            .fields
            .first()
            .filter(|h| h.trim().is_empty())
            .map(|_| 0)
    });
    let choices: Vec<(char, usize)> = ['A', 'B', 'C', 'D', 'E', 'F']
        .into_iter()
        .filter_map(|l| col(&format!("choice{}", l.to_ascii_lowercase())).map(|i| (l, i)))
        .collect();
    ensure!(
        !choices.is_empty(),
        "{}: no `Choice A`.. columns",
        file.display()
    );
    let mut conv = Conversion::default();
    for (n, row) in body.iter().enumerate() {
        let loc = format!("{}:{}", file.display(), row.line);
        let res = (|| -> Result<BenchRecord> {
            let field = |i: usize| row.fields.get(i).map(String::as_str).unwrap_or("");
            ensure!(
                row.fields.len() >= header.fields.len(),
                "{} fields where the header has {}",
                row.fields.len(),
                header.fields.len()
            );
            let mut options = BTreeMap::new();
            for &(l, i) in &choices {
                let t = strip_choice_prefix(field(i), l);
                if !t.is_empty() {
                    options.insert(l.to_string(), t);
                }
            }
            let id = index
                .map(|i| field(i).trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| n.to_string());
            let answer_raw = field(ans).trim().to_string();
            let answer = resolve_mcq_answer(&answer_raw, &options)
                .or_else(|| {
                    let l = label.map(field)?;
                    resolve_mcq_answer(l, &options)
                })
                .or_else(|| {
                    // "A:CT" style answers
                    let c = answer_raw.chars().next()?;
                    resolve_mcq_answer(&strip_choice_prefix(&answer_raw, c), &options)
                })
                .with_context(|| format!("answer {answer_raw:?} matches no option"))?;
            let mut r = record(
                BenchFormat::PmcVqa,
                id,
                field(q).trim().to_string(),
                answer,
                AnswerType::Mcq,
            );
            r.options = Some(options);
            // MedEvalKit's prompt and judge use the cells as published (`--rules medevalkit`)
            r.meta = Some(json!({
                "choices": choices.iter().map(|&(_, i)| field(i)).collect::<Vec<_>>(),
                "question": field(q),
            }));
            r.images = vec![join_str(&img_dir, field(fig).trim())];
            r.validate()?;
            Ok(r)
        })();
        match res {
            Ok(r) => conv.records.push(r),
            Err(e) if opts.skip_invalid => conv.skipped.push(Skipped {
                location: loc,
                reason: format!("{e:#}"),
            }),
            Err(e) => return Err(anyhow!("{loc}: {e:#}")),
        }
    }
    Ok(conv)
}

// ---------------------------------------------------------------------------------------------
// OmniMedVQA

fn omnimedvqa(input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    let (files, root) = if input.is_dir() {
        let oa = [
            input.join("QA_information").join("Open-access"),
            input.join("Open-access"),
            input.to_path_buf(),
        ]
        .into_iter()
        .find(|d| {
            d.is_dir()
                && fs::read_dir(d)
                    .map(|mut r| {
                        r.any(|e| {
                            e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
                        })
                    })
                    .unwrap_or(false)
        })
        .with_context(|| {
            format!(
                "{} has no QA_information/Open-access/*.json",
                input.display()
            )
        })?;
        let mut files: Vec<PathBuf> = fs::read_dir(&oa)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        (files, omni_root(&canon(&oa)?))
    } else {
        (
            vec![input.to_path_buf()],
            omni_root(&canon(&parent_of(input))?),
        )
    };
    let mut conv = Conversion::default();
    for file in files {
        each_row(read_rows(&file, opts)?, opts, &mut conv, |o, i| {
            let gt = need_str(o, "gt_answer")?;
            let mut options = BTreeMap::new();
            for l in ['A', 'B', 'C', 'D', 'E', 'F'] {
                if let Some(t) = get_str(o, &[&format!("option_{l}")]) {
                    options.insert(l.to_string(), t);
                }
            }
            ensure!(!options.is_empty(), "no option_A.. fields");
            let exact: Vec<&String> = options
                .iter()
                .filter(|(_, t)| **t == gt)
                .map(|(k, _)| k)
                .collect();
            let letter = match exact.as_slice() {
                [k] => (*k).clone(),
                _ => {
                    let n = norm_words(&gt);
                    let loose: Vec<&String> = options
                        .iter()
                        .filter(|(_, t)| norm_words(t) == n)
                        .map(|(k, _)| k)
                        .collect();
                    match loose.as_slice() {
                        [k] => (*k).clone(),
                        _ => bail!(
                            "gt_answer {gt:?} matches {} of the options {:?}",
                            loose.len(),
                            options.values().collect::<Vec<_>>()
                        ),
                    }
                }
            };
            let id = get_str(o, &["question_id"]).unwrap_or_else(|| {
                format!(
                    "{}/{i}",
                    file.file_stem().unwrap_or_default().to_string_lossy()
                )
            });
            let mut r = record(
                BenchFormat::OmniMedVqa,
                id,
                need_str(o, "question")?,
                letter,
                AnswerType::Mcq,
            );
            r.options = Some(options);
            r.images = vec![join_str(&root, &need_str(o, "image_path")?)];
            r.meta = meta_of(
                o,
                &[
                    "dataset",
                    "question_type",
                    "modality_type",
                    "modality",
                    "gt_answer",
                ],
            );
            Ok(Some(r))
        })?;
    }
    Ok(conv)
}

/// The OmniMedVQA folder: the parent of `QA_information` when the JSONs are inside it.
fn omni_root(json_dir: &Path) -> PathBuf {
    json_dir
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "QA_information"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| json_dir.to_path_buf())
}

// ---------------------------------------------------------------------------------------------
// MedXpertQA MM

fn medxpertqa(input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    let file = if input.is_dir() {
        let cands = [
            input.join("MM").join("test.jsonl"),
            input.join("test.jsonl"),
            input.join("medxpertqa_mm_input.jsonl"),
            input.join("input").join("medxpertqa_mm_input.jsonl"),
        ];
        cands
            .iter()
            .find(|p| p.exists())
            .cloned()
            .with_context(|| {
                format!(
                    "{} has no MM/test.jsonl or medxpertqa_mm_input.jsonl",
                    input.display()
                )
            })?
    } else {
        input.to_path_buf()
    };
    let abs = canon(&file)?;
    let img_dir = abs
        .ancestors()
        .skip(1)
        .map(|d| d.join("images"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| parent_of(&abs).join("images"));
    let mut conv = Conversion::default();
    each_row(read_rows(&file, opts)?, opts, &mut conv, |o, i| {
        let options = medxpertqa_options(o.get("options"))?;
        let label = match o.get("label") {
            Some(Value::Array(a)) => match a.as_slice() {
                [Value::String(l)] => l.clone(),
                _ => bail!("`label` must be one letter or a list of one letter, got {a:?}"),
            },
            _ => need_str(o, "label")?,
        };
        let id = get_str(o, &["id"]).unwrap_or_else(|| i.to_string());
        let mut r = record(
            BenchFormat::MedXpertQa,
            id,
            need_str(o, "question")?,
            label,
            AnswerType::Mcq,
        );
        r.options = Some(options);
        r.images = match o.get("images") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(image_ref)
                .map(|p| join_str(&img_dir, &p))
                .collect(),
            Some(v) => image_ref(v)
                .map(|p| vec![join_str(&img_dir, &p)])
                .unwrap_or_default(),
            None => Vec::new(),
        };
        r.meta = meta_of(o, &["medical_task", "body_system", "question_type"]);
        Ok(Some(r))
    })?;
    Ok(conv)
}

/// MedXpertQA's options: the Hugging Face object `{"A": "..", ...}`, or the official eval input's
/// list `[{"letter": "A", "content": ".."}, ...]`.
fn medxpertqa_options(v: Option<&Value>) -> Result<BTreeMap<String, String>> {
    let pairs: Vec<(String, &Value)> = match v {
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|e| {
                let letter = e.get("letter").and_then(Value::as_str);
                let content = e.get("content");
                match (letter, content) {
                    (Some(l), Some(c)) => Ok((l.to_string(), c)),
                    _ => bail!("an option must be {{\"letter\", \"content\"}}, got {e}"),
                }
            })
            .collect::<Result<_>>()?,
        _ => bail!("missing `options` (an object, or a list of {{\"letter\", \"content\"}})"),
    };
    pairs
        .into_iter()
        .map(|(k, v)| {
            Ok((
                k.trim().to_ascii_uppercase(),
                v.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("option {k} is not a string"))?,
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// MMMU (Health & Medicine)

/// The five MMMU Health & Medicine subjects.
pub const MMMU_HM_SUBJECTS: [&str; 5] = [
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
];

/// Parse a Python list literal of strings (`['a', "b's", 'c\'d']`), as MMMU publishes `options`;
/// a JSON list is accepted too.
pub fn parse_py_str_list(s: &str) -> Result<Vec<String>> {
    if let Ok(v) = serde_json::from_str::<Vec<String>>(s) {
        return Ok(v);
    }
    let c: Vec<char> = s.trim().chars().collect();
    ensure!(
        c.first() == Some(&'[') && c.last() == Some(&']'),
        "not a list literal: {s:?}"
    );
    let mut out = Vec::new();
    let mut i = 1;
    let n = c.len() - 1;
    loop {
        while i < n && (c[i].is_whitespace() || c[i] == ',') {
            i += 1;
        }
        if i >= n {
            break;
        }
        let q = c[i];
        ensure!(
            q == '\'' || q == '"',
            "expected a quoted string at {i} in {s:?}"
        );
        i += 1;
        let mut item = String::new();
        loop {
            ensure!(i < n, "unterminated string in {s:?}");
            let ch = c[i];
            if ch == q {
                i += 1;
                break;
            }
            if ch == '\\' && i + 1 < n {
                let e = c[i + 1];
                i += 2;
                match e {
                    'n' => item.push('\n'),
                    't' => item.push('\t'),
                    'r' => item.push('\r'),
                    'x' | 'u' | 'U' => {
                        let len = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex: String = c
                            .get(i..i + len)
                            .map(|h| h.iter().collect())
                            .unwrap_or_default();
                        let cp = u32::from_str_radix(&hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .with_context(|| format!("bad escape \\{e}{hex} in {s:?}"))?;
                        item.push(cp);
                        i += len;
                    }
                    other => item.push(other),
                }
                continue;
            }
            item.push(ch);
            i += 1;
        }
        out.push(item);
    }
    Ok(out)
}

fn mmmu(input: &Path, opts: &ConvertOptions) -> Result<Conversion> {
    let files: Vec<PathBuf> = if input.is_dir() {
        let mut v = Vec::new();
        collect_files(input, &mut v)?;
        v.retain(|p| {
            p.extension()
                .is_some_and(|e| e == "json" || e == "jsonl" || e == "parquet")
        });
        v.sort();
        ensure!(
            !v.is_empty(),
            "{} has no .parquet/.json/.jsonl files",
            input.display()
        );
        v
    } else {
        vec![input.to_path_buf()]
    };
    let split = opts.split.clone().unwrap_or_else(|| "validation".into());
    let mut conv = Conversion::default();
    for file in files {
        let root = canon(&parent_of(&file))?;
        each_row(read_rows(&file, opts)?, opts, &mut conv, |o, _| {
            let id = need_str(o, "id")?;
            let subject = MMMU_HM_SUBJECTS.iter().find(|s| {
                id.strip_prefix(&format!("{split}_"))
                    .and_then(|rest| rest.strip_prefix(**s))
                    .is_some_and(|tail| {
                        tail.starts_with('_') && tail[1..].chars().all(|c| c.is_ascii_digit())
                    })
            });
            let Some(subject) = subject else {
                return Ok(None);
            };
            let qt = get_str(o, &["question_type"]).unwrap_or_else(|| "multiple-choice".into());
            let question = need_str(o, "question")?;
            let answer = need_str(o, "answer")?;
            let mut r = if qt == "multiple-choice" {
                let raw = match o.get("options") {
                    Some(Value::String(s)) => parse_py_str_list(s)?,
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(str::to_string)
                                .context("option is not a string")
                        })
                        .collect::<Result<_>>()?,
                    _ => bail!("missing `options`"),
                };
                ensure!(!raw.is_empty() && raw.len() <= 26, "{} options", raw.len());
                let options: BTreeMap<String, String> = raw
                    .into_iter()
                    .enumerate()
                    .map(|(k, t)| (((b'A' + k as u8) as char).to_string(), t))
                    .collect();
                let mut r = record(
                    BenchFormat::Mmmu,
                    id.clone(),
                    question,
                    answer,
                    AnswerType::Mcq,
                );
                r.options = Some(options);
                r
            } else {
                record(
                    BenchFormat::Mmmu,
                    id.clone(),
                    question,
                    answer,
                    AnswerType::Closed,
                )
            };
            r.images = (1..=7)
                .filter_map(|k| o.get(&format!("image_{k}")).and_then(image_ref))
                .map(|p| join_str(&root, &p))
                .collect();
            let mut meta = meta_of(o, &["img_type", "topic_difficulty", "subfield"])
                .unwrap_or_else(|| json!({}));
            meta["subject"] = json!(subject);
            r.meta = Some(meta);
            Ok(Some(r))
        })?;
    }
    Ok(conv)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn py_list_literal() {
        assert_eq!(
            parse_py_str_list("['a', \"b's\", 'c\\'d', '\\u00e9']").unwrap(),
            vec!["a", "b's", "c'd", "é"]
        );
        assert_eq!(parse_py_str_list("[]").unwrap(), Vec::<String>::new());
        assert_eq!(parse_py_str_list("[\"x\", \"y\"]").unwrap(), vec!["x", "y"]);
        assert!(parse_py_str_list("['a'").is_err());
        assert!(parse_py_str_list("[a]").is_err());
    }

    #[test]
    fn choice_prefix() {
        assert_eq!(
            strip_choice_prefix(" A:Computed tomography ", 'A'),
            "Computed tomography"
        );
        assert_eq!(strip_choice_prefix("B. MRI", 'B'), "MRI");
        assert_eq!(strip_choice_prefix("(C) PET", 'C'), "PET");
        assert_eq!(strip_choice_prefix("A:x", 'B'), "A:x");
    }

    #[test]
    fn format_names() {
        assert_eq!(
            "VQA_RAD".parse::<BenchFormat>().unwrap(),
            BenchFormat::VqaRad
        );
        assert_eq!(
            "MedXpertQA-MM".parse::<BenchFormat>().unwrap(),
            BenchFormat::MedXpertQa
        );
        assert_eq!(
            "mmmu-h&m".parse::<BenchFormat>().unwrap(),
            BenchFormat::Mmmu
        );
        assert!("nope".parse::<BenchFormat>().is_err());
    }
}
