//! `--rules medevalkit`: each benchmark scored as MedEvalKit's `cal_metrics` scores it (at
//! [`super::medevalkit::MEDEVALKIT_COMMIT`]), and its metrics in MedEvalKit's layout, with and without its LLM judge.
//!
//! Per benchmark (the judges are [`super::medevalkit`]'s):
//! * **VQA-RAD, PathVQA**: response = box, else `<answer>` contents, else the response
//!   ([`box_then_tag`]), lowercased and stripped; gold lowercased and stripped. Gold `yes`/`no`:
//!   bucket `close`, [`judge_judgement`]; else bucket `open`, [`judge_open_end_vqa`] exact match.
//!   With the judge, the open items are judged. VQA-RAD: total right = close right (rules) + open
//!   items the judge accepts. PathVQA (its bug): total and close right are reset to 0 and only
//!   the open items the judge accepts are added back (close accuracy 0).
//! * **SLAKE**: response = [`box_then_tag`] (not lowercased); gold as stored. OPEN: bucket `open`,
//!   exact match; CLOSED: bucket `close`, [`judge_judgement`] when the gold is exactly `yes`/`no`
//!   (case-sensitive: SLAKE stores "Yes"/"No", so its closed items all take the other branch),
//!   else [`judge_close_end_vqa`] (exact match: "Yes." is right, "Yes, it is" wrong).
//!   With the judge EVERY item is judged and (its bug) total right = close right (rules) + every
//!   item the judge accepts; close right = close right (rules) + closed items the judge accepts:
//!   closed items count twice.
//! * **PMC-VQA**: [`judge_multi_choice`] on the raw response with the raw CSV choices
//!   (`meta.choices`, e.g. `" A: Right Coronary Artery "`; `"A:text"` when absent).
//! * **OmniMedVQA**: response = `extract(response, "answer")`; choices `"A. text"` (A-D); gold =
//!   the letter of an option EXACTLY equal to `meta.gt_answer`, else that text. Breakdown by
//!   `question_type` and `modality_type`.
//! * **MedXpertQA**: response = `extract(response, "answer")`; choices `"A. text"`; breakdown by
//!   `question_type` and `medical_task`.
//! * **MMMU** (`MMMU-Medical-val`): response = `<answer>` contents, then box ([`tag_then_box`]);
//!   multiple choice: [`mmmu_parse_multi_choice`] (no letter: MedEvalKit guesses at random; here
//!   wrong and counted); open questions are never correct (its bug: `eval_open` iterates the
//!   response string character by character). Per-subject and micro-averaged total.
//! * Any other benchmark: mcq as OmniMedVQA (without its breakdowns); other types as VQA-RAD.
//!
//! A record whose `meta` lacks a field MedEvalKit indexes for its breakdown (OmniMedVQA
//! `question_type`/`modality_type`, MedXpertQA `question_type`/`medical_task`) raises a `KeyError`
//! there: counted as a crash, like open answers on which `judge_open_end_vqa` raises. Crashes are
//! scored wrong and not judged.

use serde_json::{json, Map, Value};

use super::medevalkit::{
    box_then_tag, compare_prompt, extract, judge_close_end_vqa, judge_judgement,
    judge_multi_choice, judge_open_end_vqa, mmmu_parse_multi_choice, py_strip, tag_then_box,
};
use super::score::ScoredRecord;
use super::{table1_column, AnswerType, BenchRecord};

/// Which of MedEvalKit's benchmark scripts scores a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kit {
    Mmmu,
    VqaRad,
    Slake,
    PathVqa,
    PmcVqa,
    OmniMedVqa,
    MedXpertQa,
    Other,
}

impl Kit {
    /// The script of a benchmark name (any spelling of the seven; `Other` for the rest).
    pub fn of(benchmark: &str) -> Kit {
        match table1_column(benchmark) {
            Some(0) => Kit::Mmmu,
            Some(1) => Kit::VqaRad,
            Some(2) => Kit::Slake,
            Some(3) => Kit::PathVqa,
            Some(4) => Kit::PmcVqa,
            Some(5) => Kit::OmniMedVqa,
            Some(6) => Kit::MedXpertQa,
            _ => Kit::Other,
        }
    }

    /// MedEvalKit's `--eval_datasets` name (the key of its `total_results.json`).
    pub fn dataset(self) -> Option<&'static str> {
        Some(match self {
            Kit::Mmmu => "MMMU-Medical-val",
            Kit::VqaRad => "VQA_RAD",
            Kit::Slake => "SLAKE",
            Kit::PathVqa => "PATH_VQA",
            Kit::PmcVqa => "PMC_VQA",
            Kit::OmniMedVqa => "OmniMedVQA",
            Kit::MedXpertQa => "MedXpertQA-MM",
            Kit::Other => return None,
        })
    }

    /// Whether `--judge` asks about this benchmark's items (the VQA benchmarks' open items; every
    /// SLAKE item).
    fn judged(self, bucket: Option<&str>) -> bool {
        match self {
            Kit::Slake => true,
            Kit::VqaRad | Kit::PathVqa | Kit::Other => bucket == Some("open"),
            _ => false,
        }
    }
}

/// MedEvalKit's choice strings of an MCQ record.
fn choices(record: &BenchRecord, kit: Kit) -> Vec<String> {
    if kit == Kit::PmcVqa {
        if let Some(Value::Array(a)) = record.meta.as_ref().and_then(|m| m.get("choices")) {
            return a
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect();
        }
    }
    record
        .option_pairs()
        .iter()
        .filter(|(l, _)| kit != Kit::OmniMedVqa || ('A'..='D').contains(l))
        .map(|(l, t)| {
            if kit == Kit::PmcVqa {
                format!("{l}:{t}")
            } else {
                format!("{l}. {t}")
            }
        })
        .collect()
}

/// OmniMedVQA's gold: the letter of the (last) option exactly equal to `gt_answer`, else the
/// `gt_answer` text itself.
fn omni_gold(record: &BenchRecord) -> String {
    let Some(gt) = record.meta_str("gt_answer") else {
        return record.answer.clone();
    };
    record
        .option_pairs()
        .iter()
        .rev()
        .find(|(l, t)| ('A'..='D').contains(l) && *t == gt)
        .map_or_else(|| gt.to_string(), |(l, _)| l.to_string())
}

/// The meta fields MedEvalKit indexes for a benchmark's breakdowns.
fn required_meta(kit: Kit) -> &'static [&'static str] {
    match kit {
        Kit::OmniMedVqa => &["question_type", "modality_type"],
        Kit::MedXpertQa => &["question_type", "medical_task"],
        _ => &[],
    }
}

/// Score one response as MedEvalKit does (see the module docs).
pub fn score_record(record: &BenchRecord, response: Option<&str>) -> ScoredRecord {
    let kit = Kit::of(&record.benchmark);
    let mut out = ScoredRecord::new(record, response);
    out.options = record.options.as_ref().map_or(0, |o| o.len());
    if let Some(meta) = record.meta.as_ref().and_then(Value::as_object) {
        if let Some(k) = required_meta(kit).iter().find(|k| !meta.contains_key(**k)) {
            out.crash = Some(format!("KeyError: '{k}'"));
        }
    }
    let Some(response) = response else {
        return out;
    };
    let mcq = record.answer_type == AnswerType::Mcq;
    match kit {
        Kit::Mmmu => {
            let r = tag_then_box(response);
            if mcq {
                let pred = mmmu_parse_multi_choice(&r, &record.option_pairs_owned());
                out.random_guess = pred.is_none();
                out.correct = pred.is_some_and(|p| p.to_string() == record.answer);
                out.extracted = pred.map(|p| p.to_string());
            } else {
                out.extracted = Some(r.clone());
            }
            out.span = Some(r);
        }
        Kit::PmcVqa | Kit::OmniMedVqa | Kit::MedXpertQa | Kit::Other if mcq => {
            let r = if kit == Kit::PmcVqa {
                response.to_string()
            } else {
                extract(response, "answer")
            };
            let gold = if kit == Kit::OmniMedVqa {
                omni_gold(record)
            } else {
                record.answer.clone()
            };
            let m = judge_multi_choice(&choices(record, kit), &gold, &r);
            out.correct = m.correct;
            out.extracted = Some(m.split_response);
            out.similarity_pick = m
                .similarity_pick
                .and_then(|i| char::from_u32('A' as u32 + i as u32))
                .map(String::from);
            out.span = Some(r);
        }
        Kit::Slake => {
            let r = box_then_tag(response);
            let gold = &record.answer;
            if record.answer_type == AnswerType::Open {
                open_item(&mut out, gold, &r);
            } else {
                out.bucket = Some("close".into());
                let (ok, ext) = if gold == "yes" || gold == "no" {
                    judge_judgement(gold, &r)
                } else {
                    judge_close_end_vqa(gold, &r)
                };
                (out.correct, out.extracted) = (ok, Some(ext));
            }
            out.judge_prompt = Some(compare_prompt(&record.question, &r, gold));
            out.span = Some(r);
        }
        _ => {
            // VQA-RAD, PathVQA and other non-mcq benchmarks
            let r = py_strip(&box_then_tag(response).to_lowercase()).to_string();
            let gold = py_strip(&record.answer.to_lowercase()).to_string();
            if gold == "yes" || gold == "no" {
                out.bucket = Some("close".into());
                let (ok, ext) = judge_judgement(&gold, &r);
                (out.correct, out.extracted) = (ok, Some(ext));
            } else {
                open_item(&mut out, &gold, &r);
                out.judge_prompt = Some(compare_prompt(&record.question, &r, &gold));
            }
            out.span = Some(r);
        }
    }
    if out.crash.is_some() {
        out.correct = false;
    }
    if out.crash.is_some() || !kit.judged(out.bucket.as_deref()) {
        out.judge_prompt = None;
    }
    out
}

/// An item of the `open` bucket: [`judge_open_end_vqa`]'s exact match and F1 values, or a crash.
fn open_item(out: &mut ScoredRecord, gold: &str, response: &str) {
    out.bucket = Some("open".into());
    match judge_open_end_vqa(gold, response) {
        Ok((o, ext)) => {
            out.correct = o.em;
            (out.precision, out.recall, out.f1) = (Some(o.precision), Some(o.recall), Some(o.f1));
            out.extracted = Some(ext);
        }
        Err(e) => out.crash = Some(e),
    }
}

fn acc(right: usize, total: usize) -> Value {
    if total == 0 {
        Value::Null
    } else {
        json!(right as f64 / total as f64)
    }
}

fn counts(total: usize, right: usize) -> Value {
    json!({"total": total, "right": right, "acc": acc(right, total)})
}

/// A `{group: {total, right, acc}}` object over the records having `dim`.
fn by_group(results: &[&ScoredRecord], dim: &str, right: impl Fn(&ScoredRecord) -> bool) -> Value {
    let mut m: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for r in results {
        if let Some((_, v)) = r.groups.iter().find(|(d, _)| d == dim) {
            let e = m.entry(v.clone()).or_default();
            e.0 += 1;
            e.1 += usize::from(right(r));
        }
    }
    Value::Object(m.into_iter().map(|(k, (t, c))| (k, counts(t, c))).collect())
}

/// The judge's verdict on a record (no verdict: wrong, as MedEvalKit's failed request).
fn accepted(r: &ScoredRecord) -> bool {
    r.judge == Some(true)
}

/// MedEvalKit's metrics of one benchmark, in its `cal_metrics` layout, and its total `right` (a
/// count that may exceed the total for SLAKE under the judge). `judged`: `use_llm_judge=True`
/// arithmetic, with the verdicts in [`ScoredRecord::judge`]. Accuracies are fractions (`null`
/// where MedEvalKit divides by zero); BLEU and ROUGE are not computed; the open bucket's `acc` is
/// MedEvalKit's `right / total / total` (its averaging loop divides `acc` again) and its
/// `precision`, `recall` and `f1` are its mis-named columns: mean F1, mean precision and mean
/// recall.
pub fn metrics(kit: Kit, results: &[&ScoredRecord], judged: bool) -> (Value, usize) {
    let total = results.len();
    let rule_right = results.iter().filter(|r| r.correct).count();
    match kit {
        Kit::Mmmu => {
            let mut o = Map::new();
            let mut subjects: std::collections::BTreeMap<String, (usize, usize)> =
                Default::default();
            for r in results {
                let s = r
                    .groups
                    .iter()
                    .find(|(d, _)| d == "subject")
                    .map_or("(no subject)".to_string(), |(_, v)| v.clone());
                let e = subjects.entry(s).or_default();
                e.0 += 1;
                e.1 += usize::from(r.correct);
            }
            for (s, (t, c)) in subjects {
                o.insert(
                    s,
                    json!({"acc": acc(c, t), "right": c, "total": t, "num_example": t}),
                );
            }
            o.insert("total".into(), counts(total, rule_right));
            (Value::Object(o), rule_right)
        }
        Kit::PmcVqa => (
            json!({"total metrics": counts(total, rule_right)}),
            rule_right,
        ),
        Kit::OmniMedVqa | Kit::MedXpertQa => {
            let second = if kit == Kit::OmniMedVqa {
                ("modality type metrics", "modality_type")
            } else {
                ("task type metrics", "medical_task")
            };
            let mut o = Map::new();
            o.insert("total metrics".into(), counts(total, rule_right));
            o.insert(
                "question type metrics".into(),
                by_group(results, "question_type", |r| r.correct),
            );
            o.insert(second.0.into(), by_group(results, second.1, |r| r.correct));
            (Value::Object(o), rule_right)
        }
        Kit::VqaRad | Kit::Slake | Kit::PathVqa | Kit::Other => {
            let bucket = |b: &str| -> Vec<&ScoredRecord> {
                results
                    .iter()
                    .copied()
                    .filter(|r| r.bucket.as_deref() == Some(b))
                    .collect()
            };
            let (open, close) = (bucket("open"), bucket("close"));
            let open_rule = open.iter().filter(|r| r.correct).count();
            let close_rule = close.iter().filter(|r| r.correct).count();
            let open_llm = open.iter().filter(|r| accepted(r)).count();
            let close_llm = close.iter().filter(|r| accepted(r)).count();
            let (right, open_right, close_right) = match (judged, kit) {
                (false, _) => (rule_right, open_rule, close_rule),
                (true, Kit::Slake) => (
                    close_rule + open_llm + close_llm,
                    open_llm,
                    close_rule + close_llm,
                ),
                (true, Kit::PathVqa) => (open_llm, open_llm, 0),
                (true, _) => (rule_right - open_rule + open_llm, open_llm, close_rule),
            };
            let mean = |f: &dyn Fn(&ScoredRecord) -> f64| -> Value {
                if open.is_empty() {
                    Value::Null
                } else {
                    json!(open.iter().map(|r| f(r)).sum::<f64>() / open.len() as f64)
                }
            };
            let mut o = Map::new();
            o.insert("total metrics".into(), counts(total, right));
            let mut om = counts(open.len(), open_right);
            // its bug: the loop that averages the open metrics divides "acc" by the count again
            om["acc"] = match open.len() {
                0 => Value::Null,
                n => json!(open_right as f64 / n as f64 / n as f64),
            };
            om["em"] = mean(&|r| f64::from(u8::from(r.correct)));
            om["precision"] = mean(&|r| r.f1.unwrap_or(0.0));
            om["recall"] = mean(&|r| r.precision.unwrap_or(0.0));
            om["f1"] = mean(&|r| r.recall.unwrap_or(0.0));
            o.insert("open".into(), om);
            o.insert("close".into(), counts(close.len(), close_right));
            (Value::Object(o), right)
        }
    }
}
