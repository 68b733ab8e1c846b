//! Scoring of benchmark responses (MedEvalKit's rules, with the fixes listed below).
//!
//! 1. **Answer span** ([`answer_span`]): the content of the last brace-matched `\boxed{}`, else the
//!    first `<answer>...</answer>`, else the whole response; stripped
//!    ([`crate::rewards::extract_answer`] with format `none`).
//! 2. Per [`AnswerType`]:
//!    * **mcq**: the option letter ([`extract_mcq`]): when the whole span is exactly the text of
//!      one option (case and punctuation ignored) that option; else the letter rules of
//!      [`crate::rewards::mcq`] (`(C)`, `C.`, answer markers such as "The answer is C"; when
//!      several explicit choices appear the LAST one wins; then a standalone capital letter);
//!      else the option whose text appears in the span (whole words). Correct when the letter
//!      equals the ground-truth letter. Never random (MedEvalKit falls back to the most similar
//!      option; we do not guess).
//!    * **yes_no**: after [`strip_answer_markers`] (MedEvalKit's `parse_response`: the text after
//!      the last "answer is", "answer:", "final answer", ...), newlines and periods removed, the
//!      span is cut into whole words (letters and digits); exactly one of the words `yes` / `no`
//!      must be present and equal the ground truth ("normal" and "not" are not "no"; "yes and no"
//!      is wrong). MedEvalKit tests substrings, so "normal" counts as "no" there: fixed here.
//!    * **closed**: when the ground truth is `yes`/`no` (SLAKE CLOSED yes/no questions), the yes/no
//!      rule; else exact match of [`normalize_answer`] (lowercase, periods removed, newlines and
//!      runs of whitespace made one space, stripped) of the marker-stripped span and of the ground truth.
//!    * **open**: `correct` = the same exact match; also token-set precision, recall and F1
//!      ([`token_prf`]: tokens of [`crate::rewards::jaccard_tokens`], i.e. lowercase, `[,.;@#?!&$]`
//!      deleted, split on whitespace, as sets; all 0 when either side is empty). F1 is reported as a
//!      metric (mean per benchmark), it does not decide `correct`. (MedEvalKit's `calculate_f1`
//!      returns `(f1, precision, recall)` into `precision, recall, f1`: its "f1" column is the
//!      recall; ours are named correctly.)
//! 3. A benchmark record with no response counts as wrong (`missing: true`) and stays in the
//!    denominator.

use std::collections::HashSet;

use serde::Serialize;

use super::{canonical_benchmark, norm_words, AnswerType, BenchRecord};
use crate::rewards::{self, FormatKind};

/// The scored result of one benchmark record (one line of `results.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoredRecord {
    pub id: String,
    /// The benchmark as reported ([`canonical_benchmark`]).
    pub benchmark: String,
    pub answer_type: AnswerType,
    /// The ground truth (the letter for MCQ).
    pub answer: String,
    /// The response; `null` when the record had none.
    pub response: Option<String>,
    /// The answer span: boxed content, else answer tag, else the whole response (stripped).
    pub span: Option<String>,
    /// What was compared with the ground truth: the letter (mcq), `yes`/`no` (yes/no; null when
    /// neither or both appear), the normalised text (closed / open).
    pub extracted: Option<String>,
    pub correct: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
    /// Token-set F1 (open questions only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// True when no response was given for this record.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub missing: bool,
}

/// The answer span of a response: last `\boxed{}`, else first `<answer>` tag, else the whole
/// response, stripped.
pub fn answer_span(response: &str) -> String {
    rewards::extract_answer(FormatKind::None, response).unwrap_or_default()
}

/// MedEvalKit's answer markers, applied in this order.
const ANSWER_MARKERS: &[&str] = &[
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
];

/// MedEvalKit's `parse_response` marker split, case-insensitive: for each marker in order, when the
/// (lowercased) text contains it, keep only what follows its last occurrence. The result is
/// lowercased.
pub fn strip_answer_markers(span: &str) -> String {
    let mut t = span.to_lowercase();
    for m in ANSWER_MARKERS {
        if let Some(i) = t.rfind(m) {
            t = t[i + m.len()..].to_string();
        }
    }
    t
}

/// Lowercase, delete periods, strip, with newlines (and runs of whitespace) made one space
/// (MedEvalKit deletes newlines outright, gluing "left\nlung" into "leftlung"; we keep the word
/// boundary).
pub fn normalize_answer(s: &str) -> String {
    let t: String = s.to_lowercase().chars().filter(|c| *c != '.').collect();
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The yes/no answer of a span: `Some("yes")`/`Some("no")` when exactly one of the whole words
/// `yes` and `no` appears (after [`strip_answer_markers`]), else `None`.
pub fn judge_yes_no(span: &str) -> Option<&'static str> {
    let t = strip_answer_markers(span);
    let words: HashSet<&str> = t
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    match (words.contains("yes"), words.contains("no")) {
        (true, false) => Some("yes"),
        (false, true) => Some("no"),
        _ => None,
    }
}

/// Token-set precision, recall and F1 of a prediction against a reference (tokens of
/// [`rewards::jaccard_tokens`]); all 0 when either side has no token or nothing overlaps.
pub fn token_prf(prediction: &str, reference: &str) -> (f64, f64, f64) {
    let p = rewards::jaccard_tokens(prediction);
    let r = rewards::jaccard_tokens(reference);
    if p.is_empty() || r.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let common = p.intersection(&r).count() as f64;
    if common == 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let precision = common / p.len() as f64;
    let recall = common / r.len() as f64;
    (
        precision,
        recall,
        2.0 * precision * recall / (precision + recall),
    )
}

/// The option letter named by an answer span (see the module docs, mcq).
pub fn extract_mcq(span: &str, options: &[(char, &str)]) -> Option<char> {
    let n = norm_words(span);
    if !n.is_empty() {
        let exact: Vec<char> = options
            .iter()
            .filter(|(_, t)| {
                let t = norm_words(t);
                t.chars().count() > 1 && t == n
            })
            .map(|(l, _)| *l)
            .collect();
        if exact.len() == 1 {
            return Some(exact[0]);
        }
    }
    rewards::extract_choice_with_options(span, options)
}

fn is_yes_no(s: &str) -> bool {
    let t = normalize_answer(s);
    t == "yes" || t == "no"
}

/// Score one response against one benchmark record.
pub fn score_record(record: &BenchRecord, response: Option<&str>) -> ScoredRecord {
    let mut out = ScoredRecord {
        id: record.id.clone(),
        benchmark: canonical_benchmark(&record.benchmark),
        answer_type: record.answer_type,
        answer: record.answer.clone(),
        response: response.map(str::to_string),
        span: None,
        extracted: None,
        correct: false,
        precision: None,
        recall: None,
        f1: None,
        missing: response.is_none(),
    };
    let Some(response) = response else {
        if record.answer_type == AnswerType::Open {
            (out.precision, out.recall, out.f1) = (Some(0.0), Some(0.0), Some(0.0));
        }
        return out;
    };
    let span = answer_span(response);
    let gt_yes_no = matches!(record.answer_type, AnswerType::YesNo)
        || (record.answer_type == AnswerType::Closed && is_yes_no(&record.answer));
    if gt_yes_no {
        let pred = judge_yes_no(&span);
        out.correct = pred.is_some_and(|p| p == normalize_answer(&record.answer));
        out.extracted = pred.map(str::to_string);
    } else {
        match record.answer_type {
            AnswerType::Mcq => {
                let pred = extract_mcq(&span, &record.option_pairs());
                out.correct = pred.is_some_and(|p| p.to_string() == record.answer);
                out.extracted = pred.map(|c| c.to_string());
            }
            AnswerType::Closed | AnswerType::Open | AnswerType::YesNo => {
                let pred = normalize_answer(&strip_answer_markers(&span));
                out.correct = !pred.is_empty() && pred == normalize_answer(&record.answer);
                if record.answer_type == AnswerType::Open {
                    let (p, r, f) = token_prf(&pred, &record.answer);
                    (out.precision, out.recall, out.f1) = (Some(p), Some(r), Some(f));
                }
                out.extracted = Some(pred);
            }
        }
    }
    out.span = Some(span);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::report::score_responses;
    use serde_json::json;
    use std::collections::HashMap;

    fn mcq() -> BenchRecord {
        BenchRecord::from_value(&json!({
            "id": "m", "benchmark": "PMC-VQA", "question": "q",
            "options": {"A": "Pneumonia", "B": "Pleural effusion", "C": "Vitamin A deficiency", "D": "Normal"},
            "answer": "C", "answer_type": "mcq"
        }))
        .unwrap()
    }

    fn typed(t: &str, answer: &str) -> BenchRecord {
        BenchRecord::from_value(&json!({"id": "x", "benchmark": "VQA-RAD", "question": "q", "answer": answer, "answer_type": t})).unwrap()
    }

    fn ok(r: &BenchRecord, resp: &str) -> bool {
        score_record(r, Some(resp)).correct
    }

    #[test]
    fn mcq_letters() {
        let r = mcq();
        assert!(ok(&r, "The answer is (C)."));
        assert_eq!(
            score_record(&r, Some("The answer is (C)."))
                .extracted
                .as_deref(),
            Some("C")
        );
        assert!(ok(&r, "C"));
        assert!(ok(
            &r,
            "(A) is tempting, but on reflection the answer is (C)."
        ));
        assert!(!ok(
            &r,
            "The answer is (C). Wait, re-evaluating: the answer is (B)."
        ));
        assert!(!ok(&r, "A"));
        assert!(!ok(&r, ""));
        assert!(!ok(&r, "I am not sure"));
    }

    #[test]
    fn mcq_reasoning_boxed_preferred() {
        let r = mcq();
        assert!(ok(
            &r,
            "<think>(A) fits the consolidation, the answer is A... no.</think> \\boxed{C}"
        ));
        assert!(!ok(&r, "The answer is C. \\boxed{B}"));
        assert!(ok(&r, "<answer>C</answer>"));
    }

    #[test]
    fn mcq_option_text() {
        let r = mcq();
        // "Vitamin A deficiency" contains a standalone "A": the exact option text wins
        assert!(ok(&r, "Vitamin A deficiency"));
        assert!(ok(&r, "\\boxed{vitamin a deficiency.}"));
        assert!(ok(&r, "It is most likely a vitamin a deficiency"));
        assert_eq!(
            score_record(&r, Some("pleural effusion"))
                .extracted
                .as_deref(),
            Some("B")
        );
    }

    #[test]
    fn yes_no_whole_words() {
        let no = typed("yes_no", "no");
        assert!(ok(&no, "No"));
        assert!(ok(&no, "no."));
        assert!(ok(&no, "\\boxed{No}"));
        assert!(!ok(&no, "normal"));
        assert!(!ok(&no, "The findings are normal"));
        assert!(!ok(&no, "not present"));
        assert!(!ok(&no, "yes and no"));
        assert!(!ok(&no, ""));
        let yes = typed("yes_no", "yes");
        assert!(ok(&yes, "Yes, there is an effusion."));
        assert!(!ok(&yes, "Yesterday"));
        assert!(!ok(&yes, "No"));
        // the answer marker decides
        assert!(ok(
            &yes,
            "No obvious mass at first, but the final answer: yes"
        ));
        assert!(ok(
            &yes,
            "<think>no mass? there is one</think> \\boxed{yes}"
        ));
        assert_eq!(score_record(&no, Some("normal")).extracted, None);
    }

    #[test]
    fn closed_exact_after_normalisation() {
        let c = typed("closed", "Left Lung");
        assert!(ok(&c, "left lung."));
        assert!(ok(&c, "  LEFT\nLung "));
        assert!(ok(&c, "Answer: left lung"));
        assert!(ok(&c, "\\boxed{Left lung}"));
        assert!(!ok(&c, "the left lung"));
        assert!(!ok(&c, "lung"));
        // closed with a yes/no ground truth uses the yes/no rule
        let cy = typed("closed", "No");
        assert!(ok(&cy, "No, it does not."));
        assert!(!ok(&cy, "normal"));
    }

    #[test]
    fn open_em_and_f1() {
        let o = typed("open", "right lower lobe");
        let s = score_record(&o, Some("Right lower lobe."));
        assert!(s.correct);
        assert_eq!(s.f1, Some(1.0));
        let s = score_record(&o, Some("lower lobe"));
        assert!(!s.correct);
        assert_eq!((s.precision, s.recall), (Some(1.0), Some(2.0 / 3.0)));
        assert!((s.f1.unwrap() - 0.8).abs() < 1e-12);
        let s = score_record(&o, Some("<think>x</think>\\boxed{right lower lobe}"));
        assert!(s.correct);
        let s = score_record(&o, Some("heart"));
        assert_eq!((s.correct, s.f1), (false, Some(0.0)));
        let s = score_record(&o, None);
        assert_eq!((s.correct, s.missing, s.f1), (false, true, Some(0.0)));
    }

    #[test]
    fn report_counts_missing_and_unmatched() {
        let recs = vec![mcq(), {
            let mut r = typed("yes_no", "yes");
            r.id = "y".into();
            r
        }];
        let mut resp = HashMap::new();
        resp.insert("m".to_string(), "C".to_string());
        resp.insert("zzz".to_string(), "yes".to_string());
        let rep = score_responses(&recs, &resp);
        assert_eq!(rep.missing_responses, 1);
        assert_eq!(rep.unmatched_responses, vec!["zzz".to_string()]);
        assert_eq!(rep.benchmarks.len(), 2);
        assert_eq!(rep.benchmarks[0].name, "VQA-RAD");
        assert_eq!((rep.benchmarks[0].n, rep.benchmarks[0].correct), (1, 0));
        assert_eq!(rep.benchmarks[1].accuracy, 100.0);
        assert_eq!(rep.average, Some(50.0));
    }
}
