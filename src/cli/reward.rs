//! `infimed reward`: score JSONL responses with the verifiable rewards and print a summary.
//!
//! Input records: `{"response": "...", "answer": ..., "task": "mcq"|"text"|"math"|"grounding"?, ...}`.
//! `answer` may be a string, a number (written as JSON writes it) or an array/object (grounding boxes,
//! written back as compact JSON); `task` may be absent or null (then inferred from the answer). Each
//! record is written back with `"format"`, `"accuracy"` (ungated) and `"reward"` added; other fields are
//! kept. Blank lines are skipped. Any malformed line is an error naming `FILE:LINE`.
//!
//! The reward config comes from the defaults, then `--recipe R` (its `[reward]` table), then
//! `--format`, `--format-weight`, `--accuracy-weight`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::rewards::{self, answer_text, FormatKind, RewardConfig, Task};

#[derive(Args, Debug, Clone)]
pub struct RewardArgs {
    /// Input JSONL: one {"response", "answer", "task"?} object per line (other fields are kept).
    #[arg(long)]
    pub data: PathBuf,
    /// Output JSONL: the input records with "format", "accuracy" and "reward" added.
    #[arg(long)]
    pub out: PathBuf,
    /// A TOML recipe whose [reward] table (format, format_weight, accuracy_weight) is used.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Format rule: think_answer, think_boxed or none (overrides the recipe).
    #[arg(long)]
    pub format: Option<FormatKind>,
    /// Weight of the format reward (overrides the recipe).
    #[arg(long)]
    pub format_weight: Option<f64>,
    /// Weight of the (format-gated) accuracy reward (overrides the recipe).
    #[arg(long)]
    pub accuracy_weight: Option<f64>,
}

/// Running means of one group of records.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupStats {
    pub n: usize,
    pub format_sum: f64,
    pub accuracy_sum: f64,
    pub reward_sum: f64,
}

impl GroupStats {
    fn add(&mut self, b: &rewards::RewardBreakdown) {
        self.n += 1;
        self.format_sum += b.format;
        self.accuracy_sum += b.accuracy;
        self.reward_sum += b.reward;
    }

    fn mean(&self, sum: f64) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            sum / self.n as f64
        }
    }

    pub fn format_rate(&self) -> f64 {
        self.mean(self.format_sum)
    }
    pub fn mean_accuracy(&self) -> f64 {
        self.mean(self.accuracy_sum)
    }
    pub fn mean_reward(&self) -> f64 {
        self.mean(self.reward_sum)
    }
}

/// Per-task and overall statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub by_task: BTreeMap<Task, GroupStats>,
    pub overall: GroupStats,
}

impl Summary {
    /// The summary as a text table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<10} {:>7} {:>8} {:>9} {:>8}\n",
            "task", "n", "format", "accuracy", "reward"
        );
        let row = |name: &str, g: &GroupStats| {
            format!(
                "{:<10} {:>7} {:>8.4} {:>9.4} {:>8.4}\n",
                name,
                g.n,
                g.format_rate(),
                g.mean_accuracy(),
                g.mean_reward()
            )
        };
        for (task, g) in &self.by_task {
            s.push_str(&row(task.as_str(), g));
        }
        s.push_str(&row("all", &self.overall));
        s
    }
}

/// The config of a `reward` run: defaults, then the recipe's `[reward]`, then the flags.
pub fn resolve_config(args: &RewardArgs) -> Result<RewardConfig> {
    let mut cfg = match &args.recipe {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading recipe {}", path.display()))?;
            RewardConfig::from_recipe_toml(&text)
                .with_context(|| format!("recipe {}", path.display()))?
        }
        None => RewardConfig::default(),
    };
    if let Some(f) = args.format {
        cfg.format = f;
    }
    if let Some(w) = args.format_weight {
        cfg.format_weight = w;
    }
    if let Some(w) = args.accuracy_weight {
        cfg.accuracy_weight = w;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Score one JSONL line (already known to be non-blank) and return the record with the fields added.
fn score_line(cfg: &RewardConfig, line: &str) -> Result<(Value, rewards::RewardBreakdown)> {
    let value: Value = serde_json::from_str(line).map_err(|e| anyhow!("malformed JSON: {e}"))?;
    let Value::Object(mut obj) = value else {
        bail!("expected a JSON object")
    };
    let response = match obj.get("response") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => bail!("`response` must be a string, got {other}"),
        None => bail!("missing `response`"),
    };
    let answer = match obj.get("answer") {
        Some(v) => answer_text(v).ok_or_else(|| anyhow!("`answer` is null"))?,
        None => bail!("missing `answer`"),
    };
    let task = match obj.get("task") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.parse::<Task>()?),
        Some(other) => bail!("`task` must be a string, got {other}"),
    };
    let b = rewards::score(cfg, &response, &answer, task);
    obj.insert("format".into(), Value::from(b.format));
    obj.insert("accuracy".into(), Value::from(b.accuracy));
    obj.insert("reward".into(), Value::from(b.reward));
    Ok((Value::Object(obj), b))
}

/// Score every record of a JSONL byte buffer (`source` names it in errors as `source:LINE`).
/// Returns the output JSONL text and the summary.
pub fn score_jsonl(cfg: &RewardConfig, bytes: &[u8], source: &str) -> Result<(String, Summary)> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let mut out = String::new();
    let mut summary = Summary::default();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let lineno = i + 1;
        let line = std::str::from_utf8(raw)
            .map_err(|e| anyhow!("{source}:{lineno}: invalid UTF-8: {e}"))?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let (record, b) = score_line(cfg, line).map_err(|e| anyhow!("{source}:{lineno}: {e:#}"))?;
        summary.by_task.entry(b.task).or_default().add(&b);
        summary.overall.add(&b);
        out.push_str(&serde_json::to_string(&record)?);
        out.push('\n');
    }
    Ok((out, summary))
}

fn write_output(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: RewardArgs) -> Result<()> {
    let cfg = resolve_config(&args)?;
    let bytes =
        std::fs::read(&args.data).with_context(|| format!("reading {}", args.data.display()))?;
    let (text, summary) = score_jsonl(&cfg, &bytes, &args.data.display().to_string())?;
    write_output(&args.out, &text)?;
    println!(
        "reward: format={} format_weight={} accuracy_weight={} -> {}",
        cfg.format,
        cfg.format_weight,
        cfg.accuracy_weight,
        args.out.display()
    );
    print!("{}", summary.table());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(data: PathBuf, out: PathBuf) -> RewardArgs {
        RewardArgs {
            data,
            out,
            recipe: None,
            format: None,
            format_weight: None,
            accuracy_weight: None,
        }
    }

    #[test]
    fn scores_and_keeps_fields() {
        let input = concat!(
            r#"{"id": 1, "response": "<think>x</think> \\boxed{B}", "answer": "B"}"#,
            "\n\n",
            r#"{"id": 2, "response": "<think>x</think> \\boxed{0.5}", "answer": 0.5, "task": "math"}"#,
            "\r\n",
            r#"{"id": 3, "response": "<think>x</think> \\boxed{[0,0,10,10]}", "answer": [[0,0,10,10]], "task": null}"#,
            "\n",
            r#"{"id": 4, "response": "no format", "answer": "left lung"}"#,
        );
        let (out, summary) =
            score_jsonl(&RewardConfig::default(), input.as_bytes(), "in.jsonl").unwrap();
        let recs: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0]["id"], 1);
        assert_eq!(recs[0]["reward"], 1.0);
        assert_eq!(recs[1]["reward"], 1.0);
        assert_eq!(recs[1]["task"], "math");
        assert_eq!(recs[2]["accuracy"], 1.0);
        assert_eq!(recs[3]["format"], 0.0);
        assert_eq!(recs[3]["reward"], 0.0);
        assert_eq!(summary.overall.n, 4);
        assert_eq!(summary.by_task[&Task::Mcq].n, 1);
        assert_eq!(summary.by_task[&Task::Grounding].n, 1);
        assert_eq!(summary.by_task[&Task::Text].n, 1);
        assert!((summary.overall.format_rate() - 0.75).abs() < 1e-12);
        assert!(summary.table().contains("all"));
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cfg = RewardConfig::default();
        for (input, needle) in [
            (
                "{\"response\": \"a\", \"answer\": \"b\"}\n{oops\n",
                "f.jsonl:2: malformed JSON",
            ),
            ("[1]\n", "f.jsonl:1: expected a JSON object"),
            ("{\"answer\": \"b\"}\n", "f.jsonl:1: missing `response`"),
            ("{\"response\": \"a\"}\n", "f.jsonl:1: missing `answer`"),
            (
                "{\"response\": \"a\", \"answer\": null}\n",
                "f.jsonl:1: `answer` is null",
            ),
            (
                "\n\n{\"response\": \"a\", \"answer\": \"b\", \"task\": \"essay\"}\n",
                "f.jsonl:3: unknown task",
            ),
            (
                "{\"response\": 1, \"answer\": \"b\"}\n",
                "f.jsonl:1: `response` must be a string",
            ),
        ] {
            let err = score_jsonl(&cfg, input.as_bytes(), "f.jsonl")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
        let err = score_jsonl(
            &cfg,
            b"{\"response\": \"\xff\", \"answer\": \"b\"}\n",
            "f.jsonl",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("f.jsonl:1:"));
    }

    #[test]
    fn run_reads_recipe_and_flags_override() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("in.jsonl");
        let out = dir.path().join("sub/out.jsonl");
        let recipe = dir.path().join("r.toml");
        std::fs::write(
            &data,
            "{\"response\": \"<think>x</think><answer>C</answer>\", \"answer\": \"(C)\"}\n",
        )
        .unwrap();
        std::fs::write(&recipe, "[grpo]\nlr = 1e-6\n[reward]\nformat = \"think_answer\"\nformat_weight = 0.2\naccuracy_weight = 0.8\n").unwrap();

        let mut a = args(data.clone(), out.clone());
        a.recipe = Some(recipe.clone());
        run(a.clone()).unwrap();
        let rec: Value =
            serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
        assert!((rec["reward"].as_f64().unwrap() - 1.0).abs() < 1e-12);

        a.format_weight = Some(0.5);
        assert_eq!(resolve_config(&a).unwrap().format_weight, 0.5);
        a.format = Some(FormatKind::ThinkBoxed);
        run(a.clone()).unwrap();
        let rec: Value =
            serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
        assert_eq!(rec["format"], 0.0);
        assert_eq!(rec["reward"], 0.0);

        a.format_weight = Some(f64::NAN);
        assert!(run(a).is_err());
        assert!(run(args(dir.path().join("missing.jsonl"), out)).is_err());
    }

    #[test]
    fn clap_parses_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: RewardArgs,
        }
        let w = W::try_parse_from([
            "x",
            "--data",
            "a",
            "--out",
            "b",
            "--format",
            "think_answer",
            "--format-weight",
            "0.3",
        ])
        .unwrap();
        assert_eq!(w.a.format, Some(FormatKind::ThinkAnswer));
        assert_eq!(w.a.format_weight, Some(0.3));
        assert!(
            W::try_parse_from(["x", "--data", "a", "--out", "b", "--format", "boxed"]).is_err()
        );
    }
}
