//! Evaluation reports: `results.jsonl`, `summary.json` and `summary.md` (the paper's Table 1).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::score::{score_record, ScoredRecord};
use super::{table1_column, AnswerType, BenchRecord, Skipped, TABLE1};

/// Counts of one answer type within a benchmark.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TypeSummary {
    pub n: usize,
    pub correct: usize,
    /// Percent.
    pub accuracy: f64,
}

/// One benchmark's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchSummary {
    pub name: String,
    pub n: usize,
    pub correct: usize,
    /// `100 * correct / n`.
    pub accuracy: f64,
    /// Records without a response (counted wrong).
    pub missing: usize,
    pub by_type: BTreeMap<AnswerType, TypeSummary>,
    /// Mean token-set F1 of the open questions, percent (absent when there are none).
    pub open_f1: Option<f64>,
}

/// The result of an evaluation run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Row label of the markdown table (the model's name).
    pub label: String,
    /// One per benchmark record, in input order.
    pub results: Vec<ScoredRecord>,
    /// Table 1 order, then other benchmarks by name.
    pub benchmarks: Vec<BenchSummary>,
    /// Unweighted mean of the benchmark accuracies (percent); `None` without benchmarks.
    pub average: Option<f64>,
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
        let mut benchmarks = serde_json::Map::new();
        for b in &self.benchmarks {
            let by_type: serde_json::Map<String, Value> = b
                .by_type
                .iter()
                .map(|(t, s)| {
                    (
                        t.to_string(),
                        json!({"n": s.n, "correct": s.correct, "accuracy": s.accuracy}),
                    )
                })
                .collect();
            let mut o = json!({"n": b.n, "correct": b.correct, "accuracy": b.accuracy, "missing": b.missing, "by_type": by_type});
            if let Some(f1) = b.open_f1 {
                o["open_f1"] = json!(f1);
            }
            benchmarks.insert(b.name.clone(), o);
        }
        json!({
            "label": self.label,
            "benchmarks": benchmarks,
            "average": self.average,
            "missing_responses": self.missing_responses,
            "unmatched_responses": self.unmatched_responses.len(),
            "skipped_invalid": self.skipped.len(),
        })
    }

    /// The markdown report: a table in the layout of the paper's Table 1 (a benchmark not
    /// evaluated shows `-`; benchmarks outside the seven get extra columns before `Avg.`),
    /// accuracies with one decimal, then notes on missing / unmatched / skipped lines.
    pub fn summary_markdown(&self) -> String {
        let mut cols: Vec<(String, Option<f64>)> = TABLE1
            .iter()
            .map(|(name, _)| (name.to_string(), None))
            .collect();
        for b in &self.benchmarks {
            match table1_column(&b.name) {
                Some(i) => cols[i].1 = Some(b.accuracy),
                None => cols.push((b.name.clone(), Some(b.accuracy))),
            }
        }
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"));
        let mut s = String::new();
        let header: Vec<String> = cols.iter().map(|(n, _)| n.replace('|', "\\|")).collect();
        let _ = writeln!(s, "| Model | {} | Avg. |", header.join(" | "));
        let _ = writeln!(s, "|---|{}---|", "---|".repeat(cols.len()));
        let cells: Vec<String> = cols.iter().map(|(_, v)| fmt(*v)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            self.label.replace('|', "\\|"),
            cells.join(" | "),
            fmt(self.average)
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Accuracy in percent; Avg. is the mean of the evaluated benchmarks' accuracies."
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
            let _ = writeln!(
                s,
                "- {}: {}/{} correct ({:.1}%): {}{f1}",
                b.name,
                b.correct,
                b.n,
                b.accuracy,
                types.join(", ")
            );
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

/// Write `dir/results.jsonl` (one [`ScoredRecord`] per line), `dir/summary.json` and `dir/summary.md`
/// (the folder is created).
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
    let path = dir.join("summary.json");
    fs::write(
        &path,
        serde_json::to_string_pretty(&report.summary_json())? + "\n",
    )
    .with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join("summary.md");
    fs::write(&path, report.summary_markdown())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Score `responses` (id -> response text) against `records`. Every record is scored, in order;
/// a record without a response is wrong and counted in `missing`. Response ids that match no
/// record are listed in [`EvalReport::unmatched_responses`] (sorted; a warning, not an error).
/// Per benchmark: n, correct, accuracy in percent, per-type counts and the mean open F1; the
/// average is the unweighted mean of the benchmark accuracies.
pub fn score_responses(records: &[BenchRecord], responses: &HashMap<String, String>) -> EvalReport {
    let results: Vec<ScoredRecord> = records
        .iter()
        .map(|r| score_record(r, responses.get(&r.id).map(String::as_str)))
        .collect();
    let known: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut unmatched: Vec<String> = responses
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unmatched.sort();

    let mut by_bench: BTreeMap<String, Vec<&ScoredRecord>> = BTreeMap::new();
    for r in &results {
        by_bench.entry(r.benchmark.clone()).or_default().push(r);
    }
    let mut benchmarks: Vec<BenchSummary> = by_bench
        .into_iter()
        .map(|(name, rs)| {
            let n = rs.len();
            let correct = rs.iter().filter(|r| r.correct).count();
            let missing = rs.iter().filter(|r| r.missing).count();
            let mut by_type: BTreeMap<AnswerType, TypeSummary> = BTreeMap::new();
            for r in &rs {
                let t = by_type.entry(r.answer_type).or_default();
                t.n += 1;
                t.correct += usize::from(r.correct);
            }
            for t in by_type.values_mut() {
                t.accuracy = percent(t.correct, t.n);
            }
            let f1s: Vec<f64> = rs.iter().filter_map(|r| r.f1).collect();
            let open_f1 =
                (!f1s.is_empty()).then(|| 100.0 * f1s.iter().sum::<f64>() / f1s.len() as f64);
            BenchSummary {
                name,
                n,
                correct,
                accuracy: percent(correct, n),
                missing,
                by_type,
                open_f1,
            }
        })
        .collect();
    // Table 1 order first, then the other benchmarks by name.
    benchmarks.sort_by_key(|b| (table1_column(&b.name).unwrap_or(usize::MAX), b.name.clone()));
    let average = (!benchmarks.is_empty())
        .then(|| benchmarks.iter().map(|b| b.accuracy).sum::<f64>() / benchmarks.len() as f64);
    let missing_responses = results.iter().filter(|r| r.missing).count();
    EvalReport {
        label: "model".to_string(),
        results,
        benchmarks,
        average,
        missing_responses,
        unmatched_responses: unmatched,
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

    #[test]
    fn markdown_layout() {
        let mut r = EvalReport {
            label: "m".into(),
            results: vec![],
            benchmarks: vec![],
            average: None,
            missing_responses: 0,
            unmatched_responses: vec![],
            skipped: vec![],
        };
        for (name, acc) in [("SLAKE", 50.0), ("other", 25.0)] {
            r.benchmarks.push(BenchSummary {
                name: name.into(),
                n: 4,
                correct: (acc / 25.0) as usize,
                accuracy: acc,
                missing: 0,
                by_type: BTreeMap::new(),
                open_f1: None,
            });
        }
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
    }
}
