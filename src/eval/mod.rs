//! Benchmark evaluation: the record format, MedEvalKit prompts, answer scoring and reports.
//!
//! # Benchmark records (JSONL)
//!
//! One JSON object per line:
//!
//! ```json
//! {"id": "vqa-rad/0", "benchmark": "VQA-RAD", "question": "Is there a fracture?",
//!  "answer": "no", "answer_type": "yes_no", "images": ["imgs/synpic123.jpg"]}
//! {"id": "pmc-vqa/7", "benchmark": "PMC-VQA", "question": "What is shown?",
//!  "options": {"A": "CT", "B": "MRI", "C": "X-ray", "D": "PET"}, "answer": "B",
//!  "answer_type": "mcq", "images": ["figures/PMC1.jpg"]}
//! ```
//!
//! * `id` (string; a number is accepted and written as a string): unique over all the benchmark
//!   files of one evaluation, because responses are matched by `id` alone. The converters write
//!   `"<benchmark key>/<native id>"`.
//! * `benchmark`: the benchmark name. The seven of the paper's Table 1 are recognised whatever the
//!   spelling (`MMMU-H&M`, `VQA-RAD`, `SLAKE`, `PathVQA`, `PMC-VQA`, `OmniMedVQA`, `MedXpertQA`;
//!   e.g. `vqa_rad`, `medxpertqa-mm`, `mmmu` also map to their column, see [`canonical_benchmark`]);
//!   any other name is scored too and reported under its own name.
//! * `question`: the question text, without options.
//! * `options`: required for `mcq` (a non-empty object `{"A": "...", "B": "..."}` keyed by single
//!   capital letters), ignored otherwise.
//! * `answer`: for `mcq` the correct letter (`"B"`, `"(B)"`, `"b"` are accepted, as is the exact
//!   text of one option; it is stored as the letter); for `yes_no` `"yes"` or `"no"` (any case);
//!   otherwise the reference text. A number is accepted and written as a string.
//! * `answer_type`: `"mcq"` | `"yes_no"` | `"closed"` | `"open"` (see [`AnswerType`]).
//! * `images`: image paths (possibly empty); relative paths are relative to the benchmark file's
//!   folder (as for sharegpt data). Images are attached by the caller as image parts before the
//!   prompt text.
//! * `lang` (optional, `"en"` default, or `"zh"`): selects MedEvalKit's Chinese prompts (SLAKE has
//!   Chinese questions); reports break accuracy down by language.
//! * `meta` (optional, any JSON object): `question_type`, `modality_type`, `medical_task` and
//!   `subject` (strings) give the reports' breakdowns; `--rules medevalkit` also reads PMC-VQA's
//!   raw `choices` (a list of the CSV's choice cells) and OmniMedVQA's raw `gt_answer` (see
//!   [`kit`]). The converters write them.
//!
//! [`read_bench_file`] reads and validates such a file; a bad line is an error naming `FILE:LINE`
//! (or, with `skip_invalid`, a counted and reported skip).
//!
//! # Prompts
//!
//! [`build_prompt`] gives MedEvalKit's prompt for a record (no system prompt), see its docs;
//! [`build_prompt_with`] its per-benchmark layouts under `--rules medevalkit`.
//!
//! # Scoring
//!
//! Two rule sets ([`Rules`]): `infimed` (the default, [`score`]: the answer a reply commits to,
//! one normalisation that keeps numbers, never a guess) and `medevalkit` ([`kit`], with the
//! ported functions in [`medevalkit`]: MedEvalKit's judges per benchmark, bugs included, so that
//! numbers can be put beside published ones). An optional LLM judge ([`judge`]) re-scores free-text
//! answers with MedEvalKit's judge prompt; reports give rule-based and judged accuracy side by
//! side ([`report`]).
//!
//! # Converters
//!
//! [`convert`] turns the public files of the seven benchmarks into records
//! (`infimed bench-convert`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod convert;
pub mod csv;
pub mod judge;
pub mod kit;
pub mod medevalkit;
pub mod parquet;
pub mod report;
pub mod score;

pub use report::{score_responses, write_report, BenchSummary, EvalReport, TypeSummary};
pub use score::{score_record, ScoredRecord};

/// The scoring rules of `infimed eval --rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rules {
    /// infimed's rules ([`score`]).
    #[default]
    Infimed,
    /// MedEvalKit's rules, reproduced exactly ([`kit`]).
    Medevalkit,
}

impl Rules {
    pub fn as_str(self) -> &'static str {
        match self {
            Rules::Infimed => "infimed",
            Rules::Medevalkit => "medevalkit",
        }
    }

    /// Score one response under these rules.
    pub fn score(self, record: &BenchRecord, response: Option<&str>) -> ScoredRecord {
        match self {
            Rules::Infimed => {
                let mut s = score::score_record(record, response);
                s.judge_prompt = score::judge_prompt(record, response);
                s
            }
            Rules::Medevalkit => kit::score_record(record, response),
        }
    }
}

impl std::fmt::Display for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Rules {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "infimed" => Ok(Rules::Infimed),
            "medevalkit" => Ok(Rules::Medevalkit),
            _ => bail!("unknown rules {s:?} (expected infimed or medevalkit)"),
        }
    }
}

/// How a benchmark answer is graded (and which prompt asks for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerType {
    /// Multiple choice: the option letter.
    Mcq,
    /// Yes / no question (VQA-RAD and PathVQA closed questions).
    YesNo,
    /// Closed question answered with a single word or phrase (SLAKE CLOSED, MMMU open).
    Closed,
    /// Open question answered concisely (free text).
    Open,
}

impl AnswerType {
    pub const ALL: [AnswerType; 4] = [
        AnswerType::Mcq,
        AnswerType::YesNo,
        AnswerType::Closed,
        AnswerType::Open,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AnswerType::Mcq => "mcq",
            AnswerType::YesNo => "yes_no",
            AnswerType::Closed => "closed",
            AnswerType::Open => "open",
        }
    }
}

impl std::fmt::Display for AnswerType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AnswerType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let k = s.trim().to_ascii_lowercase().replace('-', "_");
        let k = if k == "yesno" {
            "yes_no".to_string()
        } else {
            k
        };
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == k)
            .ok_or_else(|| {
                anyhow!("unknown answer_type {s:?} (expected mcq, yes_no, closed or open)")
            })
    }
}

/// Prompt mode: MedEvalKit's direct-answer prompts, or the reasoning prompts that ask for the
/// answer in `\boxed{}` (the paper's Fig. 4 compares both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Direct,
    Reasoning,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Reasoning => "reasoning",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Ok(Mode::Direct),
            "reasoning" => Ok(Mode::Reasoning),
            _ => bail!("unknown mode {s:?} (expected direct or reasoning)"),
        }
    }
}

/// One benchmark question (see the module docs for the JSONL layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRecord {
    pub id: String,
    pub benchmark: String,
    pub question: String,
    /// Option letter -> text (MCQ only), in letter order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<BTreeMap<String, String>>,
    /// The letter for MCQ, `yes`/`no` for yes/no, else the reference text.
    pub answer: String,
    pub answer_type: AnswerType,
    #[serde(default)]
    pub images: Vec<String>,
    /// `"en"` (default when absent) or `"zh"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
}

/// The Table 1 columns, in the paper's order: (display name, normalised aliases).
pub const TABLE1: [(&str, &[&str]); 7] = [
    (
        "MMMU-H&M",
        &[
            "mmmuhm",
            "mmmuhealthmedicine",
            "mmmuhealthandmedicine",
            "mmmu",
        ],
    ),
    ("VQA-RAD", &["vqarad"]),
    ("SLAKE", &["slake", "slakeen", "slakevqa"]),
    ("PathVQA", &["pathvqa"]),
    ("PMC-VQA", &["pmcvqa"]),
    ("OmniMedVQA", &["omnimedvqa"]),
    ("MedXpertQA", &["medxpertqa", "medxpertqamm"]),
];

fn norm_key(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// The Table 1 column index of a benchmark name (case, spaces and punctuation ignored).
pub fn table1_column(benchmark: &str) -> Option<usize> {
    let k = norm_key(benchmark);
    TABLE1
        .iter()
        .position(|(_, aliases)| aliases.contains(&k.as_str()))
}

/// The name a benchmark is reported under: the Table 1 display name when it is one of the seven,
/// else the name as written (trimmed).
pub fn canonical_benchmark(benchmark: &str) -> String {
    match table1_column(benchmark) {
        Some(i) => TABLE1[i].0.to_string(),
        None => benchmark.trim().to_string(),
    }
}

fn string_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        None | Some(Value::Null) => bail!("missing field `{key}`"),
        Some(other) => bail!("field `{key}` must be a string, got {other}"),
    }
}

/// Normalised option text for matching (lowercase, alphanumeric words joined by one space).
pub(crate) fn norm_words(s: &str) -> String {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Resolve an MCQ ground truth to an option letter: a letter form (`B`, `(B)`, `b`, `B.`), else the
/// exact (normalised) text of one option.
pub fn resolve_mcq_answer(answer: &str, options: &BTreeMap<String, String>) -> Option<String> {
    let t = answer.trim();
    let c: Vec<char> = t.chars().collect();
    let letter = match c.as_slice() {
        [l] | ['(', l, ')'] | [l, '.' | ')' | ':'] if l.is_ascii_alphabetic() => {
            Some(l.to_ascii_uppercase())
        }
        _ => None,
    };
    if let Some(l) = letter {
        let key = l.to_string();
        if options.contains_key(&key) {
            return Some(key);
        }
    }
    let n = norm_words(t);
    if !n.is_empty() {
        let hits: Vec<&String> = options
            .iter()
            .filter(|(_, v)| norm_words(v) == n)
            .map(|(k, _)| k)
            .collect();
        if hits.len() == 1 {
            return Some(hits[0].clone());
        }
    }
    // "B. text" / "(B) text" whose letter exists
    crate::rewards::parse_gt_choice(t)
        .map(|l| l.to_string())
        .filter(|k| options.contains_key(k))
}

impl BenchRecord {
    /// Parse and validate one record (errors name the offending field).
    pub fn from_value(v: &Value) -> Result<BenchRecord> {
        let obj = v
            .as_object()
            .context("a benchmark record must be a JSON object")?;
        let id = string_field(obj, "id")?;
        ensure!(!id.trim().is_empty(), "`id` is empty");
        let benchmark = string_field(obj, "benchmark")?;
        ensure!(!benchmark.trim().is_empty(), "`benchmark` is empty");
        let question = string_field(obj, "question")?;
        let answer = string_field(obj, "answer")?;
        let answer_type: AnswerType = match obj.get("answer_type") {
            Some(Value::String(s)) => s.parse()?,
            None | Some(Value::Null) => {
                bail!("missing field `answer_type` (mcq, yes_no, closed or open)")
            }
            Some(other) => bail!("`answer_type` must be a string, got {other}"),
        };
        let options = match obj.get("options") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    let key = k.trim().to_ascii_uppercase();
                    ensure!(
                        key.len() == 1 && key.chars().all(|c| c.is_ascii_uppercase()),
                        "option key {k:?} is not a single letter A-Z"
                    );
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        other => bail!("option {k:?} must be a string, got {other}"),
                    };
                    ensure!(
                        out.insert(key, text).is_none(),
                        "option {k:?} appears twice"
                    );
                }
                Some(out)
            }
            Some(other) => bail!("`options` must be an object {{\"A\": \"...\"}}, got {other}"),
        };
        let images = match obj.get("images") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_string)
                        .with_context(|| format!("images[{i}] must be a string path, got {v}"))
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("`images` must be a list of paths, got {other}"),
        };
        let lang = match obj.get("lang") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                let l = s.trim().to_ascii_lowercase();
                ensure!(
                    l == "en" || l == "zh",
                    "`lang` must be \"en\" or \"zh\", got {s:?}"
                );
                Some(l)
            }
            Some(other) => bail!("`lang` must be a string, got {other}"),
        };
        let meta = obj.get("meta").filter(|m| !m.is_null()).cloned();
        let mut rec = BenchRecord {
            id,
            benchmark,
            question,
            options,
            answer,
            answer_type,
            images,
            lang,
            meta,
        };
        rec.validate()?;
        Ok(rec)
    }

    /// Check the type-specific constraints and normalise the answer (MCQ: the letter; yes/no:
    /// lowercase `yes`/`no`). Options are dropped for non-MCQ records.
    pub fn validate(&mut self) -> Result<()> {
        match self.answer_type {
            AnswerType::Mcq => {
                let opts = self
                    .options
                    .as_ref()
                    .filter(|o| !o.is_empty())
                    .context("an mcq record needs a non-empty `options` object")?;
                let letter = resolve_mcq_answer(&self.answer, opts).with_context(|| {
                    format!(
                        "mcq answer {:?} is neither one of the option letters {:?} nor the text of exactly one option",
                        self.answer,
                        opts.keys().collect::<Vec<_>>()
                    )
                })?;
                self.answer = letter;
            }
            AnswerType::YesNo => {
                let a = self.answer.trim().trim_end_matches('.').to_lowercase();
                ensure!(
                    a == "yes" || a == "no",
                    "a yes_no record needs answer \"yes\" or \"no\", got {:?}",
                    self.answer
                );
                self.answer = a;
                self.options = None;
            }
            AnswerType::Closed | AnswerType::Open => {
                ensure!(!self.answer.trim().is_empty(), "`answer` is empty");
                self.options = None;
            }
        }
        Ok(())
    }

    /// `"zh"` when the record is Chinese, else `"en"`.
    pub fn lang(&self) -> &str {
        self.lang.as_deref().unwrap_or("en")
    }

    /// A string field of `meta` (`None` when absent or not a string).
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta.as_ref()?.get(key)?.as_str()
    }

    /// [`Self::option_pairs`] with owned texts.
    pub fn option_pairs_owned(&self) -> Vec<(char, String)> {
        self.option_pairs()
            .into_iter()
            .map(|(l, t)| (l, t.to_string()))
            .collect()
    }

    /// The options as `(letter, text)` pairs in letter order (empty when absent).
    pub fn option_pairs(&self) -> Vec<(char, &str)> {
        self.options
            .iter()
            .flatten()
            .filter_map(|(k, v)| k.chars().next().map(|c| (c, v.as_str())))
            .collect()
    }
}

/// A line that was skipped (`--skip-invalid`): `FILE:LINE` and the reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub location: String,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

/// Read JSON lines, calling `f(value)` for each non-blank line; errors become `FILE:LINE: ...`
/// (or skips when `skip_invalid`).
pub(crate) fn for_each_jsonl(
    path: &Path,
    skip_invalid: bool,
    skipped: &mut Vec<Skipped>,
    mut f: impl FnMut(Value, &str) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let location = format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{location}: reading"))?;
        if line.trim().is_empty() {
            continue;
        }
        let res = serde_json::from_str::<Value>(&line)
            .map_err(|e| anyhow!("malformed JSON: {e}"))
            .and_then(|v| f(v, &location));
        if let Err(e) = res {
            if skip_invalid {
                skipped.push(Skipped {
                    location,
                    reason: format!("{e:#}"),
                });
            } else {
                return Err(anyhow!("{location}: {e:#}"));
            }
        }
    }
    Ok(())
}

/// Read a benchmark JSONL file. Blank lines are skipped; a malformed line, an invalid record or an
/// id seen earlier in `seen` (ids must be unique over all files) is an error `FILE:LINE: ...`, or,
/// with `skip_invalid`, a [`Skipped`] entry.
pub fn read_bench_file(
    path: &Path,
    skip_invalid: bool,
    seen: &mut HashMap<String, String>,
) -> Result<(Vec<BenchRecord>, Vec<Skipped>)> {
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for_each_jsonl(path, skip_invalid, &mut skipped, |v, location| {
        let rec = BenchRecord::from_value(&v)?;
        if let Some(prev) = seen.get(&rec.id) {
            bail!(
                "duplicate id {:?} (first at {prev}); ids must be unique over all benchmark files",
                rec.id
            );
        }
        seen.insert(rec.id.clone(), location.to_string());
        records.push(rec);
        Ok(())
    })?;
    Ok((records, skipped))
}

/// Read several benchmark files (ids unique over all of them).
pub fn read_bench_files(
    paths: &[impl AsRef<Path>],
    skip_invalid: bool,
) -> Result<(Vec<BenchRecord>, Vec<Skipped>)> {
    let mut seen = HashMap::new();
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for p in paths {
        let (r, s) = read_bench_file(p.as_ref(), skip_invalid, &mut seen)?;
        records.extend(r);
        skipped.extend(s);
    }
    Ok((records, skipped))
}

/// Read a responses JSONL file: `{"id", "response"}` per line (other fields ignored; `response`
/// null counts as no response). A malformed line, a missing id or a duplicate id is an error
/// `FILE:LINE: ...`, or a [`Skipped`] entry with `skip_invalid`.
pub fn read_responses(
    path: &Path,
    skip_invalid: bool,
) -> Result<(HashMap<String, String>, Vec<Skipped>)> {
    let mut out = HashMap::new();
    let mut first: HashMap<String, String> = HashMap::new();
    let mut skipped = Vec::new();
    for_each_jsonl(path, skip_invalid, &mut skipped, |v, location| {
        let obj = v
            .as_object()
            .context("a response record must be a JSON object")?;
        let id = string_field(obj, "id")?;
        let response = match obj.get("response") {
            None => bail!("missing field `response`"),
            Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => bail!("`response` must be a string, got {other}"),
        };
        if let Some(prev) = first.get(&id) {
            bail!("duplicate response id {id:?} (first at {prev})");
        }
        first.insert(id.clone(), location.to_string());
        if let Some(r) = response {
            out.insert(id, r);
        }
        Ok(())
    })?;
    Ok((out, skipped))
}

const MCQ_DIRECT: &str = "Answer with the option's letter from the given choices directly.";
const MCQ_REASONING: &str = "Answer with the option's letter from the given choices and put the letter in one \"\\boxed{}\".";
const YES_NO_DIRECT: &str = "Please output 'yes' or 'no'(no extra output).";
const YES_NO_REASONING: &str =
    "Please output \"yes\" or \"no\" and put the answer in one \"\\boxed{}\".";
const CLOSED_DIRECT: &str = "Answer the question using a single word or phrase.";
const CLOSED_REASONING: &str =
    "Answer the question using a single word or phrase and put the answer in one \"\\boxed{}\".";
const OPEN_DIRECT: &str = "Please answer the question concisely.";
const OPEN_REASONING: &str =
    "Please answer the question concisely and put the answer in one \"\\boxed{}\".";

const ZH_MCQ_DIRECT: &str = "请直接使用给定选项中的选项字母来回答该问题。";
const ZH_MCQ_REASONING: &str =
    "请直接使用给定选项中的选项字母来回答该问题,并将答案包裹在\"\\boxed{}\"里";
const ZH_YES_NO_DIRECT: &str = "请输出'是'或'否'(不要有任何其它输出)。";
const ZH_YES_NO_REASONING: &str = "请输出'是'或'否'，并将答案放在一个'\\boxed{}'中。";
const ZH_CLOSED_DIRECT: &str = "请用一个单词或者短语回答该问题。";
const ZH_CLOSED_REASONING: &str = "请用一个单词或者短语回答该问题，并将答案放在一个'\\boxed{}'中。";
const ZH_OPEN_DIRECT: &str = "请简要回答该问题。";
const ZH_OPEN_REASONING: &str = "请简要回答该问题，并将答案放在一个'\\boxed{}'中。";

/// The options block of an MCQ prompt: one `"{letter}. {text}"` line per option, in letter order,
/// joined by `\n` (MedEvalKit's OmniMedVQA / MedXpertQA layout).
pub fn options_block(record: &BenchRecord) -> String {
    record
        .option_pairs()
        .iter()
        .map(|(l, t)| format!("{l}. {t}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// MedEvalKit's prompt text for a record (no system prompt; the caller puts the record's images
/// as image parts before this text). English (`lang` en):
///
/// * mcq: `"\nQuestion: {q}\nOptions: \n{options}\n"` + `Answer with the option's letter from the
///   given choices directly.` (direct) or `Answer with the option's letter from the given choices
///   and put the letter in one "\boxed{}".` (reasoning); `{options}` is [`options_block`];
/// * yes_no: `"{q}\n"` + `Please output 'yes' or 'no'(no extra output).` /
///   `Please output "yes" or "no" and put the answer in one "\boxed{}".`;
/// * closed: `"{q}\n"` + `Answer the question using a single word or phrase.` / `... and put the
///   answer in one "\boxed{}".`;
/// * open: `"{q}\n"` + `Please answer the question concisely.` / `... and put the answer in one
///   "\boxed{}".`.
///
/// `lang` zh uses MedEvalKit's Chinese versions (`问题：`/`选项：` and the Chinese instructions).
/// Differences from MedEvalKit, on purpose: every MCQ uses the layout above (MedEvalKit's PMC-VQA
/// passes its raw `A:text` choices and its MMMU loader has its own `(A) text` layout: under
/// `--rules medevalkit` [`build_prompt_with`] gives those), and no "The index of the given image
/// is 1." line is added (that is a later fork's addition).
pub fn build_prompt(record: &BenchRecord, mode: Mode) -> String {
    let zh = record.lang() == "zh";
    let reasoning = mode == Mode::Reasoning;
    let q = &record.question;
    let pick = |en_d: &str, en_r: &str, zh_d: &str, zh_r: &str| -> String {
        match (zh, reasoning) {
            (false, false) => en_d,
            (false, true) => en_r,
            (true, false) => zh_d,
            (true, true) => zh_r,
        }
        .to_string()
    };
    match record.answer_type {
        AnswerType::Mcq => {
            let opts = options_block(record);
            let head = if zh {
                format!("\n问题： {q}\n选项： \n{opts}")
            } else {
                format!("\nQuestion: {q}\nOptions: \n{opts}")
            };
            format!(
                "{head}\n{}",
                pick(MCQ_DIRECT, MCQ_REASONING, ZH_MCQ_DIRECT, ZH_MCQ_REASONING)
            )
        }
        AnswerType::YesNo => format!(
            "{q}\n{}",
            pick(
                YES_NO_DIRECT,
                YES_NO_REASONING,
                ZH_YES_NO_DIRECT,
                ZH_YES_NO_REASONING
            )
        ),
        AnswerType::Closed => format!(
            "{q}\n{}",
            pick(
                CLOSED_DIRECT,
                CLOSED_REASONING,
                ZH_CLOSED_DIRECT,
                ZH_CLOSED_REASONING
            )
        ),
        AnswerType::Open => format!(
            "{q}\n{}",
            pick(
                OPEN_DIRECT,
                OPEN_REASONING,
                ZH_OPEN_DIRECT,
                ZH_OPEN_REASONING
            )
        ),
    }
}

/// The prompt under `rules`: [`build_prompt`], except that `--rules medevalkit` gives MedEvalKit's
/// own layouts where they differ: PMC-VQA's question and options are its raw CSV cells
/// (`meta.question`, `meta.choices`, e.g. `" A: Right Coronary Artery "`), and MMMU's prompt is its `construct_prompt`:
/// `"\n{q}\n\n(A) {opt}\n(B) {opt}\n\n\n        "` + the instruction (open questions:
/// `"\n{q}\n\n        "` + `Answer the question using a single word or phrase.`, or its
/// reasoning variant).
pub fn build_prompt_with(record: &BenchRecord, mode: Mode, rules: Rules) -> String {
    if rules == Rules::Infimed {
        return build_prompt(record, mode);
    }
    let reasoning = mode == Mode::Reasoning;
    match kit::Kit::of(&record.benchmark) {
        kit::Kit::Mmmu if record.answer_type == AnswerType::Mcq => {
            let opts: String = record
                .option_pairs()
                .iter()
                .map(|(l, t)| format!("({l}) {t}\n"))
                .collect();
            let suffix = if reasoning { MCQ_REASONING } else { MCQ_DIRECT };
            format!("\n{}\n\n{opts}\n\n        {suffix}", record.question)
        }
        kit::Kit::Mmmu => {
            let suffix = if reasoning {
                CLOSED_REASONING
            } else {
                CLOSED_DIRECT
            };
            format!("\n{}\n\n        {suffix}", record.question)
        }
        kit::Kit::PmcVqa if record.answer_type == AnswerType::Mcq => {
            match record
                .meta
                .as_ref()
                .and_then(|m| m.get("choices"))
                .and_then(Value::as_array)
            {
                Some(cells) => {
                    let opts: Vec<&str> = cells.iter().filter_map(Value::as_str).collect();
                    let q = record.meta_str("question").unwrap_or(&record.question);
                    let suffix = if reasoning { MCQ_REASONING } else { MCQ_DIRECT };
                    format!("\nQuestion: {q}\nOptions: \n{}\n{suffix}", opts.join("\n"))
                }
                None => build_prompt(record, mode),
            }
        }
        _ => build_prompt(record, mode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn medevalkit_prompts_for_mmmu_and_pmc() {
        let m = rec(
            json!({"id": "1", "benchmark": "MMMU", "question": "Which <image 1>?", "options": {"A": "x", "B": "y"}, "answer": "A", "answer_type": "mcq"}),
        );
        assert_eq!(
            build_prompt_with(&m, Mode::Direct, Rules::Medevalkit),
            "\nWhich <image 1>?\n\n(A) x\n(B) y\n\n\n        Answer with the option's letter from the given choices directly."
        );
        assert_eq!(
            build_prompt_with(&m, Mode::Direct, Rules::Infimed),
            build_prompt(&m, Mode::Direct)
        );
        let o = rec(
            json!({"id": "2", "benchmark": "MMMU", "question": "Dose?", "answer": "2", "answer_type": "closed"}),
        );
        assert_eq!(
            build_prompt_with(&o, Mode::Reasoning, Rules::Medevalkit),
            "\nDose?\n\n        Answer the question using a single word or phrase and put the answer in one \"\\boxed{}\"."
        );
        let p = rec(
            json!({"id": "3", "benchmark": "PMC-VQA", "question": " What? ", "options": {"A": "CT", "B": "MRI"}, "answer": "B", "answer_type": "mcq", "meta": {"choices": [" A: CT ", " B: MRI"]}}),
        );
        assert_eq!(
            build_prompt_with(&p, Mode::Direct, Rules::Medevalkit),
            "\nQuestion:  What? \nOptions: \n A: CT \n B: MRI\nAnswer with the option's letter from the given choices directly."
        );
    }

    fn rec(v: Value) -> BenchRecord {
        BenchRecord::from_value(&v).unwrap()
    }

    #[test]
    fn prompts_direct_and_reasoning_exact() {
        let m = rec(
            json!({"id": "1", "benchmark": "PMC-VQA", "question": "What modality?", "options": {"B": "MRI", "A": "CT"}, "answer": "b", "answer_type": "mcq"}),
        );
        assert_eq!(m.answer, "B");
        assert_eq!(
            build_prompt(&m, Mode::Direct),
            "\nQuestion: What modality?\nOptions: \nA. CT\nB. MRI\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(
            build_prompt(&m, Mode::Reasoning),
            "\nQuestion: What modality?\nOptions: \nA. CT\nB. MRI\nAnswer with the option's letter from the given choices and put the letter in one \"\\boxed{}\"."
        );
        let y = rec(
            json!({"id": "2", "benchmark": "VQA-RAD", "question": "Is it normal?", "answer": "Yes", "answer_type": "yes_no"}),
        );
        assert_eq!(y.answer, "yes");
        assert_eq!(
            build_prompt(&y, Mode::Direct),
            "Is it normal?\nPlease output 'yes' or 'no'(no extra output)."
        );
        assert_eq!(build_prompt(&y, Mode::Reasoning), "Is it normal?\nPlease output \"yes\" or \"no\" and put the answer in one \"\\boxed{}\".");
        let c = rec(
            json!({"id": "3", "benchmark": "SLAKE", "question": "Which organ?", "answer": "Liver", "answer_type": "closed"}),
        );
        assert_eq!(
            build_prompt(&c, Mode::Direct),
            "Which organ?\nAnswer the question using a single word or phrase."
        );
        assert_eq!(
            build_prompt(&c, Mode::Reasoning),
            "Which organ?\nAnswer the question using a single word or phrase and put the answer in one \"\\boxed{}\"."
        );
        let o = rec(
            json!({"id": "4", "benchmark": "PathVQA", "question": "What is present?", "answer": "fibrosis", "answer_type": "open"}),
        );
        assert_eq!(
            build_prompt(&o, Mode::Direct),
            "What is present?\nPlease answer the question concisely."
        );
        assert_eq!(
            build_prompt(&o, Mode::Reasoning),
            "What is present?\nPlease answer the question concisely and put the answer in one \"\\boxed{}\"."
        );
        let z = rec(
            json!({"id": "5", "benchmark": "SLAKE", "question": "哪个器官?", "answer": "肝脏", "answer_type": "open", "lang": "zh"}),
        );
        assert_eq!(
            build_prompt(&z, Mode::Direct),
            "哪个器官?\n请简要回答该问题。"
        );
    }

    #[test]
    fn record_validation_errors() {
        let base = json!({"id": "1", "benchmark": "X", "question": "q", "answer": "A", "answer_type": "mcq"});
        let e = BenchRecord::from_value(&base).unwrap_err().to_string();
        assert!(e.contains("options"), "{e}");
        let mut v = base.clone();
        v["answer_type"] = json!("multiple");
        let e = BenchRecord::from_value(&v).unwrap_err().to_string();
        assert!(e.contains("unknown answer_type"), "{e}");
        let mut v = base.clone();
        v["options"] = json!({"A": "x", "B": "y"});
        v["answer"] = json!("E");
        assert!(BenchRecord::from_value(&v).is_err());
        v["answer"] = json!("y");
        assert_eq!(BenchRecord::from_value(&v).unwrap().answer, "B");
        v["options"] = json!({"AA": "x"});
        assert!(BenchRecord::from_value(&v).is_err());
        let y = json!({"id": 7, "benchmark": "X", "question": "q", "answer": "maybe", "answer_type": "yes_no"});
        assert!(BenchRecord::from_value(&y).is_err());
        let n = json!({"id": 7, "benchmark": "X", "question": "q", "answer": 12, "answer_type": "open"});
        let r = BenchRecord::from_value(&n).unwrap();
        assert_eq!((r.id.as_str(), r.answer.as_str()), ("7", "12"));
        assert!(BenchRecord::from_value(&json!([1, 2])).is_err());
    }

    #[test]
    fn benchmark_names() {
        assert_eq!(canonical_benchmark("vqa_rad"), "VQA-RAD");
        assert_eq!(canonical_benchmark("MedXpertQA-MM"), "MedXpertQA");
        assert_eq!(canonical_benchmark("mmmu h&m"), "MMMU-H&M");
        assert_eq!(canonical_benchmark("Path-VQA"), "PathVQA");
        assert_eq!(canonical_benchmark(" my bench "), "my bench");
        assert_eq!(table1_column("omnimedvqa"), Some(5));
    }
}
