//! Metrics: typed records written to the run's sinks (`metrics.jsonl`, TensorBoard event files
//! under `tensorboard/`), and SVG plots.
//!
//! A learner describes each kind of record as a `#[derive(Serialize)]` struct with a `step`
//! ([`Record`]); [`Metrics::write`] puts it on one line of `metrics.jsonl` (its fields as keys)
//! and every number in it into TensorBoard as a scalar of the same name at that step (nested
//! maps joined with `/`: `by_task/mcq/reward`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::learn::tensorboard::EventWriter;

/// One line of `metrics.jsonl`: what a learner measured at an optimizer step.
pub trait Record: Serialize {
    /// The optimizer step the record belongs to (its `step` key).
    fn step(&self) -> usize;
}

/// The sinks of a run's metrics (rank 0): `metrics.jsonl` and TensorBoard.
pub struct Metrics {
    jsonl: MetricsLog,
    tensorboard: EventWriter,
}

impl Metrics {
    /// The sinks of `out_dir`: fresh (`resumed_at = None`) or continuing a run resumed at that
    /// step (what was logged after it is dropped from both, so no step appears twice).
    pub fn open(out_dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        Ok(Self {
            jsonl: MetricsLog::open(&out_dir.join("metrics.jsonl"), resumed_at)?,
            tensorboard: EventWriter::open(&out_dir.join("tensorboard"), resumed_at)?,
        })
    }

    /// One record: a JSON line, and its numbers as TensorBoard scalars at its step.
    pub fn write<R: Record>(&mut self, record: &R) -> Result<()> {
        let value = serde_json::to_value(record)?;
        self.jsonl.write(&value)?;
        self.tensorboard.scalars(record.step(), &scalars(&value))
    }

    /// A text (Markdown) in TensorBoard's text tab, at `step`.
    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        self.tensorboard.text(step, tag, text)
    }

    /// `metrics.jsonl`.
    pub fn path(&self) -> &Path {
        self.jsonl.path()
    }
}

/// Every number of a record except its `step`, by name (nested maps joined with `/`).
pub fn scalars(record: &Value) -> Vec<(String, f64)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, f64)>) {
        match v {
            Value::Number(n) => out.extend(n.as_f64().map(|x| (prefix.to_string(), x))),
            Value::Object(map) => {
                for (k, x) in map {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    if !(prefix.is_empty() && k == "step") {
                        walk(&name, x, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", record, &mut out);
    out
}

/// Append-only metrics log (one JSON object per line).
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path`; on a fresh run it is truncated, on resume the lines past `keep_until_step`
    /// are dropped so the log continues without duplicates.
    pub fn open(path: &Path, keep_until_step: Option<usize>) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let kept: Vec<String> = match keep_until_step {
            Some(s) if path.exists() => std::fs::read_to_string(path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|x| x.as_u64()))
                        .is_some_and(|st| (st as usize) <= s)
                })
                .map(String::from)
                .collect(),
            _ => vec![],
        };
        let mut file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        for l in kept {
            writeln!(file, "{l}")?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(v)?)?;
        self.file.flush()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Write one SVG line plot per requested key of a metrics JSONL (x = step).
pub fn plot_metrics(metrics: &Path, keys: &[&str], out_dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut written = vec![];
    for key in keys {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(*key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path = out_dir.join(format!("{}.svg", key.replace('/', "_")));
        std::fs::write(&path, svg_line_plot(key, &pts))
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A small self-contained SVG line chart with axes and min/max labels.
pub fn svg_line_plot(title: &str, pts: &[(f64, f64)]) -> String {
    let (w, h, m) = (640.0, 360.0, 50.0);
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let sx = |x: f64| m + (x - x0) / (x1 - x0).max(1e-12) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0).max(1e-12) * (h - 2.0 * m);
    let path: Vec<String> = pts
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{tx}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{m}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{yb}" stroke="black"/>
<text x="{m}" y="{lx}" text-anchor="middle">{x0}</text><text x="{xr}" y="{lx}" text-anchor="middle">{x1}</text>
<text x="{ly}" y="{yb}" text-anchor="end">{y0:.4}</text><text x="{ly}" y="{m}" text-anchor="end">{y1:.4}</text>
<text x="{tx}" y="{xl}" text-anchor="middle">step</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>
</svg>
"##,
        tx = w / 2.0,
        yb = h - m,
        xr = w - m,
        lx = h - m + 16.0,
        ly = m - 4.0,
        xl = h - 10.0,
        pts = path.join(" "),
    )
}
