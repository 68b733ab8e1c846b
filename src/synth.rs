//! Reflective-pattern-injected CoT synthesis (the paper's appendix A.2; `infimed synth-reflective`).
//!
//! Input (JSONL), one question per line:
//!
//! ```json
//! {"id": "q1", "question": "Which organ is abnormal?", "images": ["img/1.png"], "answer": "B",
//!  "task": "mcq", "candidates": [{"text": "...", "correct": true, "score": 8}, {"text": "..."}]}
//! ```
//!
//! * the prompt is either `messages` (sharegpt `[{"role", "content"}]`; trailing assistant turns are
//!   dropped, at least one user turn is needed; copied as they are, so their `<image>` tags must
//!   already match `images`) or `question` (+ `images`): the user turn is then one `<image>` per
//!   image followed directly by the question (unless the question already has `<image>` tags);
//! * `answer`: the ground truth; `task` (optional): `mcq` | `text` | `math` | `grounding`, else
//!   inferred from the answer ([`crate::rewards::infer_task`]);
//! * `candidates`: `text`, optional `correct` (bool) and optional `score` (the judge's 1-10).
//!
//! **Correctness** when `correct` is absent: the accuracy reward of the task
//! ([`crate::rewards::accuracy`]) on the answer span of the candidate (last `\boxed{}`, else first
//! `<answer>` tag, else the whole text); correct when accuracy >= `min_accuracy` (default 1.0, i.e.
//! exactly 1 for mcq/math; for text (Jaccard) and grounding (IoU) lower it to accept partial
//! matches).
//!
//! **Scores** when absent: treated as 0 (so, without any judge score, the pick among the correct
//! candidates is the seeded random tie-break); the count of unscored correct candidates is reported.
//! Judge scores come from a judge model prompted with [`judge_prompt`], its reply parsed with
//! [`parse_judge_reply`] (generation is wired by the CLI later).
//!
//! **Rules** with m = number of correct candidates (an absolute count, as in the paper with 10
//! candidates):
//! * m >= 6: the highest-scored correct candidate (ties broken by the seeded RNG) -> rule `best`;
//! * 1 <= m <= 5: `{y-} Wait, perhaps we could consider it from a different perspective. Let's
//!   re-evaluate the problem step by step to ensure accuracy. {y+}` with y+ the highest-scored
//!   correct candidate and y- a uniformly random incorrect one (both trimmed, joined by single
//!   spaces) -> rule `reflective`. When there is no incorrect candidate (fewer than 10 candidates,
//!   all correct) the item falls back to rule `best` (counted as `best_no_incorrect`);
//! * m = 0: no record.
//!
//! **Randomness**: each item has its own ChaCha8 stream seeded by `seed` and a hash (FNV-1a) of its
//! id, so the output depends only on the seed and the item, not on the order or the other items.
//!
//! Output: sharegpt SFT records `{"messages": [...prompt turns, {"role": "assistant", "content":
//! synthesized}], "images": [...], "id", "rule": "best" | "reflective"}`. Image paths are copied as
//! written (sharegpt resolves relative paths against the data file's folder: write the output
//! beside the input or use absolute paths).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::LazyLock;

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use regex::Regex;
use serde::Serialize;
use serde_json::{json, Value};

use crate::eval::{for_each_jsonl, Skipped};
use crate::rewards::{self, FormatKind, Task};

/// The sentence inserted between the incorrect and the correct answer.
pub const REFLECTION: &str =
    "Wait, perhaps we could consider it from a different perspective. Let's re-evaluate the problem step by step to ensure accuracy.";

/// m at or above which the best correct answer is kept as it is.
pub const BEST_MIN_CORRECT: usize = 6;

/// One candidate answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub text: String,
    pub correct: Option<bool>,
    pub score: Option<f64>,
}

/// One input question.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthItem {
    pub id: String,
    /// The prompt turns (sharegpt messages, no trailing assistant turn).
    pub messages: Vec<Value>,
    pub images: Vec<String>,
    /// The question text (for the judge prompt): `question`, or the last user turn without `<image>` tags.
    pub question: String,
    pub answer: String,
    pub task: Option<Task>,
    pub candidates: Vec<Candidate>,
}

/// Which rule produced a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Best,
    Reflective,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Best => "best",
            Rule::Reflective => "reflective",
        }
    }
}

/// Synthesis settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthConfig {
    pub seed: u64,
    /// A candidate without `correct` is correct when its task accuracy is >= this.
    pub min_accuracy: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            min_accuracy: 1.0,
        }
    }
}

/// The synthesized answer of one item.
#[derive(Debug, Clone, PartialEq)]
pub struct Synthesized {
    pub rule: Rule,
    pub text: String,
    /// Number of correct candidates.
    pub m: usize,
    /// True when 1 <= m <= 5 but there was no incorrect candidate (rule `best` used instead).
    pub no_incorrect: bool,
    /// Correct candidates without a score (taken as 0).
    pub unscored_correct: usize,
}

/// `{y-} REFLECTION {y+}` (both trimmed, single spaces).
pub fn reflective_text(incorrect: &str, correct: &str) -> String {
    format!("{} {REFLECTION} {}", incorrect.trim(), correct.trim())
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether a candidate is correct: its `correct` flag, else the task accuracy >= `min_accuracy`.
pub fn candidate_correct(item: &SynthItem, cand: &Candidate, min_accuracy: f64) -> bool {
    if let Some(c) = cand.correct {
        return c;
    }
    let task = item
        .task
        .unwrap_or_else(|| rewards::infer_task(&item.answer));
    let Some(span) = rewards::extract_answer(FormatKind::None, &cand.text) else {
        return false;
    };
    rewards::accuracy(task, &span, &item.answer) >= min_accuracy
}

/// Apply the rules to one item (`None` when m = 0).
pub fn synthesize(item: &SynthItem, cfg: &SynthConfig) -> Option<Synthesized> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ fnv1a(&item.id));
    let (correct, incorrect): (Vec<&Candidate>, Vec<&Candidate>) = item
        .candidates
        .iter()
        .partition(|c| candidate_correct(item, c, cfg.min_accuracy));
    let m = correct.len();
    if m == 0 {
        return None;
    }
    let score = |c: &Candidate| c.score.filter(|s| s.is_finite()).unwrap_or(0.0);
    let top = correct
        .iter()
        .map(|c| score(c))
        .fold(f64::NEG_INFINITY, f64::max);
    let best: Vec<&&Candidate> = correct.iter().filter(|c| score(c) == top).collect();
    let y_pos = best[rng.random_range(0..best.len())];
    let unscored_correct = correct.iter().filter(|c| c.score.is_none()).count();
    if m >= BEST_MIN_CORRECT || incorrect.is_empty() {
        return Some(Synthesized {
            rule: Rule::Best,
            text: y_pos.text.trim().to_string(),
            m,
            no_incorrect: m < BEST_MIN_CORRECT,
            unscored_correct,
        });
    }
    let y_neg = incorrect[rng.random_range(0..incorrect.len())];
    Some(Synthesized {
        rule: Rule::Reflective,
        text: reflective_text(&y_neg.text, &y_pos.text),
        m,
        no_incorrect: false,
        unscored_correct,
    })
}

/// The sharegpt SFT record of a synthesized item.
pub fn sft_record(item: &SynthItem, s: &Synthesized) -> Value {
    let mut messages = item.messages.clone();
    messages.push(json!({"role": "assistant", "content": s.text}));
    json!({"messages": messages, "images": item.images, "id": item.id, "rule": s.rule.as_str()})
}

const IMAGE_TAG: &str = "<image>";

impl SynthItem {
    /// Parse one input record (see the module docs).
    pub fn from_value(v: &Value) -> Result<SynthItem> {
        let o = v.as_object().context("a record must be a JSON object")?;
        let id = match o.get("id") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => bail!("missing string field `id`"),
        };
        let answer = match o.get("answer") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(v @ (Value::Array(_) | Value::Object(_))) => v.to_string(),
            _ => bail!("missing field `answer`"),
        };
        let task = match o.get("task") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.parse::<Task>()?),
            Some(other) => bail!("`task` must be a string, got {other}"),
        };
        let images: Vec<String> = match o.get("images") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_string)
                        .with_context(|| format!("images[{i}] must be a string"))
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("`images` must be a list of paths, got {other}"),
        };
        let (messages, question) = if let Some(m) = o.get("messages") {
            let mut msgs = m.as_array().context("`messages` must be a list")?.clone();
            while msgs
                .last()
                .and_then(|m| m.get("role"))
                .and_then(Value::as_str)
                == Some("assistant")
            {
                msgs.pop();
            }
            let mut question = None;
            for (i, m) in msgs.iter().enumerate() {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .with_context(|| format!("messages[{i}] has no string `role`"))?;
                ensure!(m.get("content").is_some(), "messages[{i}] has no `content`");
                if role == "user" {
                    question = Some(content_text(&m["content"]));
                }
            }
            let q = question.context("`messages` has no user turn")?;
            (msgs, q.replace(IMAGE_TAG, "").trim().to_string())
        } else if let Some(q) = o.get("question") {
            let q = q
                .as_str()
                .context("`question` must be a string")?
                .to_string();
            let content = if q.contains(IMAGE_TAG) {
                q.clone()
            } else {
                format!("{}{q}", IMAGE_TAG.repeat(images.len()))
            };
            (
                vec![json!({"role": "user", "content": content})],
                q.replace(IMAGE_TAG, "").trim().to_string(),
            )
        } else {
            bail!("record has neither `messages` nor `question`");
        };
        let cands = o
            .get("candidates")
            .and_then(Value::as_array)
            .context("missing `candidates` list")?;
        let candidates = cands
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let text = c
                    .get("text")
                    .and_then(Value::as_str)
                    .with_context(|| format!("candidates[{i}] has no string `text`"))?;
                let correct = match c.get("correct") {
                    None | Some(Value::Null) => None,
                    Some(Value::Bool(b)) => Some(*b),
                    Some(other) => bail!("candidates[{i}].correct must be a bool, got {other}"),
                };
                let score = match c.get("score") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_f64().filter(|s| s.is_finite()).with_context(|| {
                        format!("candidates[{i}].score must be a number, got {v}")
                    })?),
                };
                Ok(Candidate {
                    text: text.to_string(),
                    correct,
                    score,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SynthItem {
            id,
            messages,
            images,
            question,
            answer,
            task,
            candidates,
        })
    }
}

fn content_text(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        other => other.to_string(),
    }
}

/// Counts of a synthesis run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SynthSummary {
    pub questions: usize,
    /// Records written per rule.
    pub rules: BTreeMap<String, usize>,
    /// Items with m = 0 (no record).
    pub dropped_no_correct: usize,
    /// Items with 1 <= m <= 5 written with rule `best` because no candidate was incorrect.
    pub best_no_incorrect: usize,
    /// Correct candidates that had no score (taken as 0).
    pub unscored_correct_candidates: usize,
    /// Input lines skipped (`--skip-invalid`).
    pub skipped: Vec<Skipped>,
}

/// Read `input`, synthesize, write the SFT records to `out`; returns the counts.
pub fn synthesize_file(
    input: &Path,
    out: &Path,
    cfg: &SynthConfig,
    skip_invalid: bool,
) -> Result<SynthSummary> {
    let mut summary = SynthSummary::default();
    for r in ["best", "reflective"] {
        summary.rules.insert(r.to_string(), 0);
    }
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for_each_jsonl(input, skip_invalid, &mut skipped, |v, _| {
        let item = SynthItem::from_value(&v)?;
        summary.questions += 1;
        match synthesize(&item, cfg) {
            None => summary.dropped_no_correct += 1,
            Some(s) => {
                *summary
                    .rules
                    .entry(s.rule.as_str().to_string())
                    .or_insert(0) += 1;
                summary.best_no_incorrect += usize::from(s.no_incorrect);
                summary.unscored_correct_candidates += s.unscored_correct;
                records.push(sft_record(&item, &s));
            }
        }
        Ok(())
    })?;
    summary.skipped = skipped;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    for r in &records {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(summary)
}

/// The judge prompt of the paper (appendix A.2). The framing sentences, the four criterion names,
/// the `Question:` / `Response:` layout and the closing instruction are the paper's; the one-line
/// criterion descriptions are ours (our reference copy of the prompt elides them).
pub fn judge_prompt(question: &str, response: &str) -> String {
    format!(
        "You are a medical reasoning evaluator. Assess the following response based on these criteria:\n\
         1. Clinical accuracy: are the medical facts, clinical guidelines and evidence used correctly and appropriately?\n\
         2. Logical reasoning: does the reasoning follow a coherent, well-supported chain to the answer?\n\
         3. Factual correctness: is every statement free of factual errors?\n\
         4. Completeness: does the response address all the key aspects of the question?\n\
         \n\
         Question: {question}\n\
         Response: {response}\n\
         \n\
         Please evaluate the response on the above criteria and ONLY provide the Dict object with two keys: \
         {{ 'score': integer between 1 and 10, 'justification': concise explanation of the score. }}"
    )
}

static SCORE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)["']?\bscore\b["']?\s*[:=]\s*["']?\s*(-?\d+(?:\.\d+)?)"#)
        .expect("valid regex")
});

/// The score of a judge reply like `{'score': 8, 'justification': '...'}`: single or double quotes
/// (or none) around the key, text around the dict, the value as a number or a quoted number; the
/// first `score:` wins. `None` when there is none or it is not an integer in 1..=10.
pub fn parse_judge_reply(text: &str) -> Option<u32> {
    let caps = SCORE.captures(text)?;
    let v: f64 = caps[1].parse().ok()?;
    if v.fract() != 0.0 || !(1.0..=10.0).contains(&v) {
        return None;
    }
    Some(v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n_correct: usize, n_total: usize) -> SynthItem {
        let candidates = (0..n_total)
            .map(|i| Candidate {
                text: if i < n_correct {
                    format!("reasoning {i}. The answer is (B).")
                } else {
                    format!("reasoning {i}. The answer is (A).")
                },
                correct: None,
                score: Some((i % 3) as f64 + 5.0),
            })
            .collect();
        SynthItem {
            id: format!("q{n_correct}"),
            messages: vec![json!({"role": "user", "content": "<image>Which?"})],
            images: vec!["a.png".into()],
            question: "Which?".into(),
            answer: "B".into(),
            task: Some(Task::Mcq),
            candidates,
        }
    }

    #[test]
    fn rule_by_m() {
        let cfg = SynthConfig {
            seed: 7,
            min_accuracy: 1.0,
        };
        assert_eq!(synthesize(&item(0, 10), &cfg), None);
        for m in [1, 5] {
            let s = synthesize(&item(m, 10), &cfg).unwrap();
            assert_eq!((s.rule, s.m), (Rule::Reflective, m));
            let (neg, pos) = s.text.split_once(&format!(" {REFLECTION} ")).unwrap();
            assert!(neg.ends_with("(A)."), "{neg}");
            assert!(pos.ends_with("(B)."), "{pos}");
        }
        for m in [6, 10] {
            let s = synthesize(&item(m, 10), &cfg).unwrap();
            assert_eq!((s.rule, s.m), (Rule::Best, m));
            // highest score among the correct ones: i % 3 == 2
            let i: usize = s
                .text
                .split_whitespace()
                .nth(1)
                .unwrap()
                .trim_end_matches('.')
                .parse()
                .unwrap();
            assert!(i < m && i % 3 == 2, "{}", s.text);
        }
        // m = 1: y+ is the only correct one
        let s = synthesize(&item(1, 10), &cfg).unwrap();
        assert!(s.text.ends_with("reasoning 0. The answer is (B)."));
        // 1..5 correct and no incorrect -> best
        let s = synthesize(&item(3, 3), &cfg).unwrap();
        assert_eq!((s.rule, s.no_incorrect), (Rule::Best, true));
    }

    #[test]
    fn reflective_exact_text() {
        assert_eq!(
            reflective_text(" wrong \n", "\nright "),
            "wrong Wait, perhaps we could consider it from a different perspective. Let's re-evaluate the problem step by step to ensure accuracy. right"
        );
    }

    #[test]
    fn seeded_determinism() {
        let it = item(4, 10);
        let a: Vec<_> = (0..5)
            .map(|_| {
                synthesize(
                    &it,
                    &SynthConfig {
                        seed: 1,
                        min_accuracy: 1.0,
                    },
                )
            })
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        // different seeds eventually pick a different y-
        let texts: std::collections::HashSet<String> = (0..20)
            .map(|s| {
                synthesize(
                    &it,
                    &SynthConfig {
                        seed: s,
                        min_accuracy: 1.0,
                    },
                )
                .unwrap()
                .text
            })
            .collect();
        assert!(texts.len() > 1);
    }

    #[test]
    fn judge_reply_parsing() {
        assert_eq!(
            parse_judge_reply("{'score': 8, 'justification': 'good'}"),
            Some(8)
        );
        assert_eq!(
            parse_judge_reply(
                "Here it is:\n```json\n{\"score\": 10, \"justification\": \"x\"}\n```"
            ),
            Some(10)
        );
        assert_eq!(
            parse_judge_reply("{ 'score' : '7', 'justification': 'a score: 3'}"),
            Some(7)
        );
        assert_eq!(parse_judge_reply("{score: 3}"), Some(3));
        assert_eq!(parse_judge_reply("{'score': 9.0}"), Some(9));
        assert_eq!(parse_judge_reply("{'score': 11}"), None);
        assert_eq!(parse_judge_reply("{'score': 0}"), None);
        assert_eq!(parse_judge_reply("{'score': 7.5}"), None);
        assert_eq!(parse_judge_reply("I would give it a score of 8"), None);
        assert_eq!(parse_judge_reply(""), None);
        let p = judge_prompt("Q?", "R.");
        assert!(p.starts_with("You are a medical reasoning evaluator. Assess the following response based on these criteria:"));
        assert!(p.contains("Question: Q?\nResponse: R.\n"));
        assert!(p.ends_with("ONLY provide the Dict object with two keys: { 'score': integer between 1 and 10, 'justification': concise explanation of the score. }"));
    }

    #[test]
    fn parse_item_forms() {
        let v = json!({"id": 3, "question": "What?", "images": ["a.png", "b.png"], "answer": "B",
                       "candidates": [{"text": "B", "score": 2}]});
        let it = SynthItem::from_value(&v).unwrap();
        assert_eq!(
            it.messages,
            vec![json!({"role": "user", "content": "<image><image>What?"})]
        );
        assert_eq!(it.id, "3");
        let v = json!({"id": "x", "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "old"}],
                       "images": ["a.png"], "answer": "B", "candidates": []});
        let it = SynthItem::from_value(&v).unwrap();
        assert_eq!(it.messages.len(), 1);
        assert_eq!(it.question, "Q");
        assert!(
            SynthItem::from_value(&json!({"id": "x", "answer": "B", "candidates": []})).is_err()
        );
        assert!(SynthItem::from_value(
            &json!({"id": "x", "question": "q", "answer": "B", "candidates": [{"text": 1}]})
        )
        .is_err());
    }
}
