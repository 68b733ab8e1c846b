//! Evaluation reports: `results.jsonl`, `summary.json`, `summary.md` (the paper's Table 1) and,
//! under `--rules medevalkit`, `medevalkit.json` (and `medevalkit_judged.json` with `--judge`):
//! MedEvalKit's `total_results.json` layout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::kit::{self, Kit};
use super::medevalkit::MEDEVALKIT_COMMIT;
use super::score::ScoredRecord;
use super::{table1_column, AnswerType, BenchRecord, Rules, Skipped, TABLE1};

/// Counts of one group of records (an answer type, a language, a question type, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TypeSummary {
    pub n: usize,
    pub correct: usize,
    /// Percent.
    pub accuracy: f64,
    /// With `--judge`: correct counting the judge's verdicts where it was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judged_correct: Option<usize>,
}

/// One benchmark's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchSummary {
    pub name: String,
    pub n: usize,
    pub correct: usize,
    /// `100 * correct / n`.
    pub accuracy: f64,
    /// With `--judge`: accuracy (percent) with the judge's verdicts; under `--rules medevalkit`
    /// MedEvalKit's `use_llm_judge` arithmetic, bugs included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judged_accuracy: Option<f64>,
    /// Records without a response (counted wrong).
    pub missing: usize,
    pub by_type: BTreeMap<AnswerType, TypeSummary>,
    /// Breakdowns: dimension (`lang`, `question_type`, `modality_type`, `medical_task`,
    /// `subject`) -> group -> counts; only dimensions the records carry (`lang` when a record is
    /// not English).
    pub breakdown: BTreeMap<String, BTreeMap<String, TypeSummary>>,
    /// Mean token-set F1 of the open questions, percent (absent when there are none).
    pub open_f1: Option<f64>,
    /// `--rules medevalkit`: replies MedEvalKit would answer with a random letter (scored wrong
    /// here), and the credit it would give them on average (sum of 1 / options).
    pub random_guesses: usize,
    pub random_expected_credit: f64,
    /// `--rules medevalkit`: records on which MedEvalKit raises (scored wrong here).
    pub crashes: usize,
    /// `--rules medevalkit`: records MedEvalKit scores by its string-similarity fallback.
    pub similarity_picks: usize,
    /// `--rules medevalkit`: MedEvalKit's metrics in its layout (without and with the judge).
    #[serde(skip)]
    pub medevalkit: Option<(Value, Option<Value>)>,
}

/// The result of an evaluation run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Row label of the markdown table (the model's name).
    pub label: String,
    pub rules: Rules,
    /// `--judge`: the judge model's name.
    pub judge_model: Option<String>,
    /// One per benchmark record, in input order.
    pub results: Vec<ScoredRecord>,
    /// Table 1 order, then other benchmarks by name.
    pub benchmarks: Vec<BenchSummary>,
    /// Unweighted mean of the benchmark accuracies (percent); `None` without benchmarks.
    pub average: Option<f64>,
    /// The same mean of the judged accuracies (with `--judge`).
    pub judged_average: Option<f64>,
    /// Benchmark records with no response (all counted wrong).
    pub missing_responses: usize,
    /// Response ids that match no benchmark record (ignored; reported as a warning).
    pub unmatched_responses: Vec<String>,
    /// Input lines skipped with `--skip-invalid`.
    pub skipped: Vec<Skipped>,
}

impl EvalReport {
    /// The `summary.json` object.
    pub fn summary_json(&self) -> Value {
        let group = |s: &TypeSummary| {
            let mut o = json!({"n": s.n, "correct": s.correct, "accuracy": s.accuracy});
            if let Some(j) = s.judged_correct {
                o["judged_correct"] = json!(j);
            }
            o
        };
        let mut benchmarks = serde_json::Map::new();
        for b in &self.benchmarks {
            let by_type: serde_json::Map<String, Value> = b
                .by_type
                .iter()
                .map(|(t, s)| (t.to_string(), group(s)))
                .collect();
            let breakdown: serde_json::Map<String, Value> = b
                .breakdown
                .iter()
                .map(|(d, gs)| {
                    let gs: serde_json::Map<String, Value> =
                        gs.iter().map(|(g, s)| (g.clone(), group(s))).collect();
                    (d.clone(), Value::Object(gs))
                })
                .collect();
            let mut o = json!({"n": b.n, "correct": b.correct, "accuracy": b.accuracy, "missing": b.missing, "by_type": by_type, "breakdown": breakdown});
            if let Some(j) = b.judged_accuracy {
                o["judged_accuracy"] = json!(j);
            }
            if let Some(f1) = b.open_f1 {
                o["open_f1"] = json!(f1);
            }
            if self.rules == Rules::Medevalkit {
                o["random_guesses"] = json!(b.random_guesses);
                o["random_expected_credit"] = json!(b.random_expected_credit);
                o["crashes"] = json!(b.crashes);
                o["similarity_picks"] = json!(b.similarity_picks);
            }
            benchmarks.insert(b.name.clone(), o);
        }
        let mut o = json!({
            "label": self.label,
            "rules": self.rules,
            "benchmarks": benchmarks,
            "average": self.average,
            "missing_responses": self.missing_responses,
            "unmatched_responses": self.unmatched_responses.len(),
            "skipped_invalid": self.skipped.len(),
        });
        if self.rules == Rules::Medevalkit {
            o["medevalkit_commit"] = json!(MEDEVALKIT_COMMIT);
        }
        if let Some(m) = &self.judge_model {
            o["judge_model"] = json!(m);
            o["judged_average"] = json!(self.judged_average);
        }
        o
    }

    /// MedEvalKit's `total_results.json` object (`--rules medevalkit`): dataset name -> its
    /// metrics, without (`judged` false) or with the judge's arithmetic.
    pub fn medevalkit_json(&self, judged: bool) -> Value {
        let mut o = serde_json::Map::new();
        for b in &self.benchmarks {
            if let Some((rule, with_judge)) = &b.medevalkit {
                let m = if judged {
                    with_judge.as_ref()
                } else {
                    Some(rule)
                };
                if let Some(m) = m {
                    let name = Kit::of(&b.name).dataset().unwrap_or(&b.name).to_string();
                    o.insert(name, m.clone());
                }
            }
        }
        Value::Object(o)
    }

    /// The markdown report: a table in the layout of the paper's Table 1 (a benchmark not
    /// evaluated shows `-`; benchmarks outside the seven get extra columns before `Avg.`), a
    /// second row with the judge's figures when there is a judge, accuracies with one decimal,
    /// then per-benchmark lines and notes.
    pub fn summary_markdown(&self) -> String {
        let mut cols: Vec<(String, Option<f64>, Option<f64>)> = TABLE1
            .iter()
            .map(|(name, _)| (name.to_string(), None, None))
            .collect();
        for b in &self.benchmarks {
            match table1_column(&b.name) {
                Some(i) => (cols[i].1, cols[i].2) = (Some(b.accuracy), b.judged_accuracy),
                None => cols.push((b.name.clone(), Some(b.accuracy), b.judged_accuracy)),
            }
        }
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"));
        let mut s = String::new();
        let header: Vec<String> = cols.iter().map(|c| c.0.replace('|', "\\|")).collect();
        let _ = writeln!(s, "| Model | {} | Avg. |", header.join(" | "));
        let _ = writeln!(s, "|---|{}---|", "---|".repeat(cols.len()));
        let label = self.label.replace('|', "\\|");
        let cells: Vec<String> = cols.iter().map(|c| fmt(c.1)).collect();
        let _ = writeln!(
            s,
            "| {label} | {} | {} |",
            cells.join(" | "),
            fmt(self.average)
        );
        if let Some(m) = &self.judge_model {
            let cells: Vec<String> = cols.iter().map(|c| fmt(c.2.or(c.1))).collect();
            let _ = writeln!(
                s,
                "| {label} (judge {}) | {} | {} |",
                m.replace('|', "\\|"),
                cells.join(" | "),
                fmt(self.judged_average)
            );
        }
        let _ = writeln!(s);
        let rules = match self.rules {
            Rules::Infimed => "infimed's rules".to_string(),
            Rules::Medevalkit => format!("MedEvalKit's rules (commit {MEDEVALKIT_COMMIT})"),
        };
        let judge = if self.judge_model.is_some() {
            "; the second row counts the LLM judge's verdicts"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "Accuracy in percent, {rules}; Avg. is the mean of the evaluated benchmarks' accuracies{judge}."
        );
        let _ = writeln!(s);
        for b in &self.benchmarks {
            let types: Vec<String> = b
                .by_type
                .iter()
                .map(|(t, x)| format!("{t} {}/{} ({:.1})", x.correct, x.n, x.accuracy))
                .collect();
            let f1 = b
                .open_f1
                .map(|f| format!("; open F1 {f:.1}"))
                .unwrap_or_default();
            let judged = b
                .judged_accuracy
                .map(|j| format!("; judged {j:.1}%"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "- {}: {}/{} correct ({:.1}%{judged}): {}{f1}",
                b.name,
                b.correct,
                b.n,
                b.accuracy,
                types.join(", ")
            );
            for (dim, groups) in &b.breakdown {
                let gs: Vec<String> = groups
                    .iter()
                    .map(|(g, x)| format!("{g} {}/{} ({:.1})", x.correct, x.n, x.accuracy))
                    .collect();
                let _ = writeln!(s, "  - by {dim}: {}", gs.join(", "));
            }
            if b.random_guesses > 0 {
                let _ = writeln!(
                    s,
                    "  - {} reply(ies) without a letter, where MedEvalKit guesses at random: scored wrong (expected credit under MedEvalKit {:.2}).",
                    b.random_guesses, b.random_expected_credit
                );
            }
            if b.crashes > 0 {
                let _ = writeln!(
                    s,
                    "  - {} record(s) on which MedEvalKit raises (its run of this benchmark would stop): scored wrong.",
                    b.crashes
                );
            }
            if b.similarity_picks > 0 {
                let _ = writeln!(
                    s,
                    "  - {} reply(ies) scored by MedEvalKit's string-similarity fallback.",
                    b.similarity_picks
                );
            }
        }
        if self.missing_responses > 0 {
            let _ = writeln!(
                s,
                "- {} benchmark record(s) had no response (counted wrong).",
                self.missing_responses
            );
        }
        if !self.unmatched_responses.is_empty() {
            let _ = writeln!(
                s,
                "- {} response(s) matched no benchmark record (ignored).",
                self.unmatched_responses.len()
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "- {} invalid input line(s) skipped.", self.skipped.len());
        }
        s
    }
}

/// Write `dir/results.jsonl` (one [`ScoredRecord`] per line), `dir/summary.json`, `dir/summary.md`
/// and, under `--rules medevalkit`, `dir/medevalkit.json` (+ `dir/medevalkit_judged.json` with a
/// judge). The folder is created.
pub fn write_report(dir: &Path, report: &EvalReport) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("results.jsonl");
    let mut f = std::io::BufWriter::new(
        fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    );
    for r in &report.results {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    let mut files = vec![
        (
            "summary.json",
            serde_json::to_string_pretty(&report.summary_json())? + "\n",
        ),
        ("summary.md", report.summary_markdown()),
    ];
    if report.rules == Rules::Medevalkit {
        files.push((
            "medevalkit.json",
            serde_json::to_string_pretty(&report.medevalkit_json(false))? + "\n",
        ));
        if report.judge_model.is_some() {
            files.push((
                "medevalkit_judged.json",
                serde_json::to_string_pretty(&report.medevalkit_json(true))? + "\n",
            ));
        }
    }
    for (name, text) in files {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Score `responses` (id -> response text) against `records` under `rules` and summarise (see
/// [`summarize`]). Response ids that match no record are listed in
/// [`EvalReport::unmatched_responses`] (sorted; a warning, not an error).
pub fn score_responses(
    records: &[BenchRecord],
    responses: &HashMap<String, String>,
    rules: Rules,
) -> EvalReport {
    let results: Vec<ScoredRecord> = records
        .iter()
        .map(|r| rules.score(r, responses.get(&r.id).map(String::as_str)))
        .collect();
    let known: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut unmatched: Vec<String> = responses
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unmatched.sort();
    let mut report = summarize(results, rules, None);
    report.unmatched_responses = unmatched;
    report
}

/// Per benchmark: n, correct, accuracy in percent, per-type counts and breakdowns, the mean
/// open F1; with a judge (`judge_model`, verdicts in [`ScoredRecord::judge`]) the judged
/// figures; under `--rules medevalkit` MedEvalKit's metrics. A record without a response is
/// wrong and counted in `missing`. The average is the unweighted mean of the benchmark
/// accuracies.
pub fn summarize(
    results: Vec<ScoredRecord>,
    rules: Rules,
    judge_model: Option<String>,
) -> EvalReport {
    let judged = judge_model.is_some();
    let judged_ok = |r: &ScoredRecord| r.judge.unwrap_or(r.correct);
    let mut by_bench: BTreeMap<String, Vec<&ScoredRecord>> = BTreeMap::new();
    for r in &results {
        by_bench.entry(r.benchmark.clone()).or_default().push(r);
    }
    let count = |rs: &[&ScoredRecord]| TypeSummary {
        n: rs.len(),
        correct: rs.iter().filter(|r| r.correct).count(),
        accuracy: percent(rs.iter().filter(|r| r.correct).count(), rs.len()),
        judged_correct: judged.then(|| rs.iter().filter(|r| judged_ok(r)).count()),
    };
    let mut benchmarks: Vec<BenchSummary> = by_bench
        .into_iter()
        .map(|(name, rs)| {
            let n = rs.len();
            let correct = rs.iter().filter(|r| r.correct).count();
            let mut by_type: BTreeMap<AnswerType, Vec<&ScoredRecord>> = BTreeMap::new();
            let mut dims: BTreeMap<String, BTreeMap<String, Vec<&ScoredRecord>>> = BTreeMap::new();
            for r in &rs {
                by_type.entry(r.answer_type).or_default().push(r);
                for (d, g) in &r.groups {
                    dims.entry(d.clone())
                        .or_default()
                        .entry(g.clone())
                        .or_default()
                        .push(r);
                }
            }
            // the language dimension only when some record is not English
            if dims
                .get("lang")
                .is_some_and(|g| g.keys().all(|l| l == "en"))
            {
                dims.remove("lang");
            }
            let f1s: Vec<f64> = rs.iter().filter_map(|r| r.f1).collect();
            let open_f1 =
                (!f1s.is_empty()).then(|| 100.0 * f1s.iter().sum::<f64>() / f1s.len() as f64);
            let medevalkit = (rules == Rules::Medevalkit).then(|| {
                let k = Kit::of(&name);
                (
                    kit::metrics(k, &rs, false).0,
                    judged.then(|| kit::metrics(k, &rs, true).0),
                )
            });
            let judged_accuracy = judged.then(|| match rules {
                Rules::Infimed => percent(rs.iter().filter(|r| judged_ok(r)).count(), n),
                Rules::Medevalkit => percent(kit::metrics(Kit::of(&name), &rs, true).1, n),
            });
            let random: Vec<&&ScoredRecord> = rs.iter().filter(|r| r.random_guess).collect();
            BenchSummary {
                n,
                correct,
                accuracy: percent(correct, n),
                judged_accuracy,
                missing: rs.iter().filter(|r| r.missing).count(),
                by_type: by_type.into_iter().map(|(t, v)| (t, count(&v))).collect(),
                breakdown: dims
                    .into_iter()
                    .map(|(d, gs)| (d, gs.into_iter().map(|(g, v)| (g, count(&v))).collect()))
                    .collect(),
                open_f1,
                random_guesses: random.len(),
                random_expected_credit: random.iter().map(|r| 1.0 / r.options.max(1) as f64).sum(),
                crashes: rs.iter().filter(|r| r.crash.is_some()).count(),
                similarity_picks: rs.iter().filter(|r| r.similarity_pick.is_some()).count(),
                medevalkit,
                name,
            }
        })
        .collect();
    // Table 1 order first, then the other benchmarks by name.
    benchmarks.sort_by_key(|b| (table1_column(&b.name).unwrap_or(usize::MAX), b.name.clone()));
    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let average = mean(benchmarks.iter().map(|b| b.accuracy).collect());
    let judged_average = judged
        .then(|| {
            mean(
                benchmarks
                    .iter()
                    .filter_map(|b| b.judged_accuracy)
                    .collect(),
            )
        })
        .flatten();
    let missing_responses = results.iter().filter(|r| r.missing).count();
    EvalReport {
        label: "model".to_string(),
        rules,
        judge_model,
        results,
        benchmarks,
        average,
        judged_average,
        missing_responses,
        unmatched_responses: Vec::new(),
        skipped: Vec::new(),
    }
}

fn percent(k: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        100.0 * k as f64 / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bench(name: &str, acc: f64) -> BenchSummary {
        BenchSummary {
            name: name.into(),
            n: 4,
            correct: (acc / 25.0) as usize,
            accuracy: acc,
            judged_accuracy: None,
            missing: 0,
            by_type: BTreeMap::new(),
            breakdown: BTreeMap::new(),
            open_f1: None,
            random_guesses: 0,
            random_expected_credit: 0.0,
            crashes: 0,
            similarity_picks: 0,
            medevalkit: None,
        }
    }

    #[test]
    fn markdown_layout() {
        let mut r = summarize(vec![], Rules::Infimed, None);
        r.label = "m".into();
        r.benchmarks = vec![bench("SLAKE", 50.0), bench("other", 25.0)];
        r.average = Some(37.5);
        let md = r.summary_markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| Model | MMMU-H&M | VQA-RAD | SLAKE | PathVQA | PMC-VQA | OmniMedVQA | MedXpertQA | other | Avg. |");
        assert_eq!(lines[1], "|---|---|---|---|---|---|---|---|---|---|");
        assert_eq!(
            lines[2],
            "| m | - | - | 50.0 | - | - | - | - | 25.0 | 37.5 |"
        );
        let j = r.summary_json();
        assert_eq!(j["benchmarks"]["SLAKE"]["accuracy"], 50.0);
        assert_eq!(j["average"], 37.5);
        // a judge adds a second row, side by side
        r.judge_model = Some("j".into());
        r.benchmarks[0].judged_accuracy = Some(75.0);
        r.judged_average = Some(50.0);
        let md = r.summary_markdown();
        assert_eq!(
            md.lines().nth(3).unwrap(),
            "| m (judge j) | - | - | 75.0 | - | - | - | - | 25.0 | 50.0 |"
        );
    }

    fn rec(id: &str, bench: &str, lang: Option<&str>, answer: &str, t: &str) -> BenchRecord {
        let mut v = json!({"id": id, "benchmark": bench, "question": "q", "answer": answer, "answer_type": t});
        if let Some(l) = lang {
            v["lang"] = json!(l);
        }
        BenchRecord::from_value(&v).unwrap()
    }

    #[test]
    fn language_breakdown_and_judged_accuracy() {
        let recs = vec![
            rec("1", "SLAKE", None, "lung", "open"),
            rec("2", "SLAKE", Some("zh"), "肺", "open"),
            rec("3", "SLAKE", Some("zh"), "肝", "open"),
        ];
        let resp: HashMap<String, String> = [("1", "Lung"), ("2", "肺。"), ("3", "肺")]
            .map(|(a, b)| (a.into(), b.into()))
            .into();
        let rep = score_responses(&recs, &resp, Rules::Infimed);
        let b = &rep.benchmarks[0];
        assert_eq!(b.correct, 2);
        assert_eq!(b.breakdown["lang"]["en"].correct, 1);
        assert_eq!(
            (
                b.breakdown["lang"]["zh"].n,
                b.breakdown["lang"]["zh"].correct
            ),
            (2, 1)
        );
        let mut results = rep.results.clone();
        results[2].judge = Some(true);
        results[0].judge = Some(false);
        let j = summarize(results, Rules::Infimed, Some("m".into()));
        assert_eq!(j.benchmarks[0].judged_accuracy, Some(200.0 / 3.0));
        assert_eq!(
            j.benchmarks[0].breakdown["lang"]["zh"].judged_correct,
            Some(2)
        );
    }
}
