//! The bundled demo's data: procedural, seeded synthetic "scans" with exact short answers, plus a
//! small bank of text-only medical facts. Nothing is downloaded.
//!
//! [`write_demo_data`] writes into `out_dir`:
//!
//! * `images/NNNNN.png` — 8-bit grayscale PNGs, `image_size` x `image_size` (56 by default: with
//!   `assets/demo-tiny`'s processor, min = max = 3136 pixels, that is 4x4 patches = 4 image tokens,
//!   no resize). `NNNNN` is the record's global index (train records first, then val), so text-only
//!   records leave gaps in the numbering. Each image is an elliptical body with a noise texture, two
//!   darker "lungs" (left and right) and a bright "spine" spot; lesions are 0-3 small bright Gaussian
//!   blobs inside the lungs. **Left / right are the image's left / right** (the x < centre half),
//!   not the patient's (no radiological mirroring).
//! * `train.jsonl`, `val.jsonl` — LLaMA-Factory sharegpt SFT records:
//!   `{"messages": [{"role": "user", "content": "<image>QUESTION"}, {"role": "assistant",
//!   "content": "ANSWER"}], "images": ["images/00001.png"]}`; text-only records have no `<image>`
//!   and `"images": []`. Image paths are relative to the jsonl's folder.
//! * `rl_train.jsonl`, `rl_val.jsonl` — EasyR1 RL records `{"problem": "<image>QUESTION", "answer":
//!   "ANSWER", "images": [...], "task": ...}` with task `"mcq"` for letter answers (side, text MCQ),
//!   `"math"` for lesion counts (numeric equality, 1/0) and `"text"` for yes/no (Jaccard of token
//!   sets, which is 1/0 for a one-word answer).
//! * `bench_val.jsonl` — evaluation records ([`crate::eval::BenchRecord`]) for the val split:
//!   presence and text yes/no -> `yes_no`, count -> `closed`, side and text MCQ -> `mcq` with an
//!   `options` object and the question WITHOUT the inline option lines; `id` = `"demo/NNNNN"`,
//!   `benchmark` = `"demo-TASK"` (one Table-1 column per task), `meta` = `{"task": ..., "lesions": n}` (lesions only for images).
//! * `summary.json` — [`DemoDataSummary`]: counts per task and label, chance accuracies.
//!
//! Questions (exact texts) and answers:
//!
//! | task | question | answers | chance |
//! |---|---|---|---|
//! | presence | `Is there a lesion in this scan?` | `yes` / `no` | 50% |
//! | count | `How many lesions are visible?` | `0`..`3` | 25% |
//! | side (exactly one lesion) | `On which side is the lesion?\nA. left\nB. right\nC. both\nD. none` | `A` / `B` | 50% (25% guessing among 4 letters) |
//! | text_mcq | a fact with 4 options in a random order | `A`..`D` | 25% |
//! | text_yes_no | a yes/no fact | `yes` / `no` | 50% |
//!
//! About 20% of each split is text-only (half MCQ, half yes/no); the image records are split evenly
//! over presence / count / side. Within each task the labels are exactly balanced (up to one record:
//! they are assigned round-robin, then the whole split is shuffled), so the chance accuracy (uniform
//! guessing over the task's label set) equals the majority-class baseline. Text facts are shared by
//! the splits (val tests recall with a fresh option order); images are all distinct.
//!
//! Determinism: every random draw comes from ChaCha8 streams seeded from `seed` (the bits are used
//! directly, not through `rand`'s distribution code), and the PNG encoder settings are fixed, so the
//! same seed gives byte-identical files.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::eval::{AnswerType, BenchRecord};

/// Fraction of each split that is text-only.
pub const TEXT_FRACTION: f64 = 0.2;

pub const PRESENCE_QUESTION: &str = "Is there a lesion in this scan?";
pub const COUNT_QUESTION: &str = "How many lesions are visible?";
pub const SIDE_QUESTION: &str = "On which side is the lesion?";
pub const SIDE_OPTIONS: [&str; 4] = ["left", "right", "both", "none"];

/// What [`write_demo_data`] generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoDataConfig {
    pub seed: u64,
    /// Number of training records (default 1200).
    pub train: usize,
    /// Number of validation records (default 200).
    pub val: usize,
    /// Image side in pixels (default 56); a positive multiple of 28 so the Qwen processor never resizes.
    pub image_size: u32,
    /// At most this many distinct records (and images): record `i` repeats record `i % pool`
    /// (its question, answer and image file). For data sets at paper scale (188K records) whose
    /// images are shared between records. `None`: every record is its own.
    pub image_pool: Option<usize>,
}

impl Default for DemoDataConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train: 1200,
            val: 200,
            image_size: 56,
            image_pool: None,
        }
    }
}

/// The five question kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DemoTask {
    Presence,
    Count,
    Side,
    TextMcq,
    TextYesNo,
}

impl DemoTask {
    pub const ALL: [DemoTask; 5] = [
        DemoTask::Presence,
        DemoTask::Count,
        DemoTask::Side,
        DemoTask::TextMcq,
        DemoTask::TextYesNo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DemoTask::Presence => "presence",
            DemoTask::Count => "count",
            DemoTask::Side => "side",
            DemoTask::TextMcq => "text_mcq",
            DemoTask::TextYesNo => "text_yes_no",
        }
    }

    pub fn from_name(name: &str) -> Option<DemoTask> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The answers the task can have (the side task only ever has `A` or `B`).
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            DemoTask::Presence | DemoTask::TextYesNo => &["no", "yes"],
            DemoTask::Count => &["0", "1", "2", "3"],
            DemoTask::Side => &["A", "B"],
            DemoTask::TextMcq => &["A", "B", "C", "D"],
        }
    }

    pub fn has_image(self) -> bool {
        !matches!(self, DemoTask::TextMcq | DemoTask::TextYesNo)
    }

    /// The EasyR1 / reward task name.
    pub fn rl_task(self) -> &'static str {
        match self {
            DemoTask::Side | DemoTask::TextMcq => "mcq",
            DemoTask::Count => "math",
            DemoTask::Presence | DemoTask::TextYesNo => "text",
        }
    }

    pub fn answer_type(self) -> AnswerType {
        match self {
            DemoTask::Presence | DemoTask::TextYesNo => AnswerType::YesNo,
            DemoTask::Count => AnswerType::Closed,
            DemoTask::Side | DemoTask::TextMcq => AnswerType::Mcq,
        }
    }
}

/// Counts of one task in one split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskStats {
    pub records: usize,
    /// Answer -> number of records.
    pub labels: BTreeMap<String, usize>,
    /// Expected accuracy of guessing uniformly over the task's label set.
    pub chance_accuracy: f64,
    /// Accuracy of always giving the most frequent answer of this split.
    pub majority_accuracy: f64,
}

/// Counts of one split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitSummary {
    pub records: usize,
    pub with_image: usize,
    pub text_only: usize,
    pub tasks: BTreeMap<String, TaskStats>,
    /// Record-weighted mean of the tasks' chance accuracies.
    pub chance_accuracy: f64,
    /// Record-weighted mean of the tasks' majority accuracies.
    pub majority_accuracy: f64,
}

/// What [`write_demo_data`] wrote (also saved as `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DemoDataSummary {
    pub seed: u64,
    pub image_size: u32,
    /// Number of PNG files written.
    pub images: usize,
    pub train: SplitSummary,
    pub val: SplitSummary,
    /// Demo task -> RL task of its `rl_*.jsonl` records.
    pub rl_tasks: BTreeMap<String, String>,
    /// Demo task -> `answer_type` of its `bench_val.jsonl` records.
    pub answer_types: BTreeMap<String, String>,
    /// Files written, relative to the output folder (images summarised as `images/*.png`).
    pub files: Vec<String>,
}

impl DemoDataSummary {
    /// A few human-readable lines.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "demo data: seed {}, {} images of {}x{}\n",
            self.seed, self.images, self.image_size, self.image_size
        );
        for (name, split) in [("train", &self.train), ("val", &self.val)] {
            s += &format!(
                "{name}: {} records ({} with image, {} text-only), chance accuracy {:.1}%\n",
                split.records,
                split.with_image,
                split.text_only,
                100.0 * split.chance_accuracy
            );
            for (task, st) in &split.tasks {
                let labels: Vec<String> =
                    st.labels.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                s += &format!(
                    "  {task:<12} {:>5}  chance {:>5.1}%  [{}]\n",
                    st.records,
                    100.0 * st.chance_accuracy,
                    labels.join(" ")
                );
            }
        }
        s += &format!("files: {}\n", self.files.join(", "));
        s
    }
}

/// One generated question.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoRecord {
    /// Global index (train first, then val); names the image file and the bench id.
    pub index: usize,
    pub task: DemoTask,
    /// The question without option lines.
    pub stem: String,
    /// `(letter, text)` options for MCQ tasks.
    pub options: Vec<(String, String)>,
    pub answer: String,
    /// `images/NNNNN.png` for image tasks.
    pub image: Option<String>,
    /// Lesion centres (x, y in pixels) for image tasks.
    pub lesions: Vec<(f64, f64)>,
}

impl DemoRecord {
    /// The question as the model sees it: the stem, then `\nA. ...` option lines for MCQ.
    pub fn question(&self) -> String {
        let mut q = self.stem.clone();
        for (l, t) in &self.options {
            q += &format!("\n{l}. {t}");
        }
        q
    }

    /// What the model is asked (SFT and RL records): the `<image>` placeholder for image records,
    /// then MedEvalKit's direct-answer prompt for the benchmark record
    /// ([`crate::eval::build_prompt`]), so that `infimed eval --mode direct` asks exactly what
    /// the demo model was trained on.
    pub fn prompt(&self) -> String {
        let tag = if self.image.is_some() { "<image>" } else { "" };
        format!(
            "{tag}{}",
            crate::eval::build_prompt(&bench_record(self), crate::eval::Mode::Direct)
        )
    }

    pub fn images(&self) -> Vec<String> {
        self.image.iter().cloned().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Text fact bank.

/// (question, correct answer, three distractors).
const MCQ_FACTS: [(&str, &str, [&str; 3]); 20] = [
    (
        "Which organ produces insulin?",
        "pancreas",
        ["liver", "kidney", "spleen"],
    ),
    (
        "Which organ filters blood to make urine?",
        "kidney",
        ["liver", "lung", "stomach"],
    ),
    (
        "Which blood cells carry oxygen?",
        "red blood cells",
        ["white blood cells", "platelets", "plasma cells"],
    ),
    (
        "Which vitamin deficiency causes scurvy?",
        "vitamin C",
        ["vitamin A", "vitamin D", "vitamin K"],
    ),
    (
        "Which is the longest bone in the human body?",
        "femur",
        ["tibia", "humerus", "radius"],
    ),
    (
        "Which heart chamber pumps blood to the body?",
        "left ventricle",
        ["right atrium", "right ventricle", "left atrium"],
    ),
    (
        "Which imaging method uses a strong magnetic field?",
        "MRI",
        ["CT", "X-ray", "ultrasound"],
    ),
    (
        "Which gland produces thyroxine?",
        "thyroid",
        ["adrenal", "pituitary", "pancreas"],
    ),
    (
        "Which organ stores bile?",
        "gallbladder",
        ["pancreas", "spleen", "appendix"],
    ),
    (
        "Which hormone raises blood glucose?",
        "glucagon",
        ["insulin", "melatonin", "oxytocin"],
    ),
    (
        "Which vessel carries blood from the heart to the lungs?",
        "pulmonary artery",
        ["aorta", "vena cava", "pulmonary vein"],
    ),
    (
        "Where does gas exchange mainly happen?",
        "alveoli",
        ["bronchi", "trachea", "pleura"],
    ),
    (
        "Which part of the brain coordinates balance?",
        "cerebellum",
        ["frontal lobe", "thalamus", "hypothalamus"],
    ),
    (
        "Which mineral is needed to make hemoglobin?",
        "iron",
        ["calcium", "zinc", "sodium"],
    ),
    (
        "Which drugs treat bacterial infections?",
        "antibiotics",
        ["antivirals", "antacids", "antihistamines"],
    ),
    (
        "What is the medical term for high blood pressure?",
        "hypertension",
        ["hypotension", "anemia", "hypoglycemia"],
    ),
    (
        "Which parasite causes malaria?",
        "Plasmodium",
        ["Giardia", "Toxoplasma", "Leishmania"],
    ),
    (
        "Which test records the heart's electrical activity?",
        "ECG",
        ["EEG", "EMG", "MRI"],
    ),
    (
        "Which cells produce antibodies?",
        "B cells",
        ["red blood cells", "platelets", "neurons"],
    ),
    (
        "Which organ produces bile?",
        "liver",
        ["gallbladder", "pancreas", "stomach"],
    ),
];

const YES_FACTS: [&str; 9] = [
    "Is warfarin an anticoagulant drug?",
    "Is the femur a bone of the leg?",
    "Does insulin lower blood glucose?",
    "Is the heart a muscle?",
    "Is hemoglobin found in red blood cells?",
    "Is tuberculosis caused by a bacterium?",
    "Does the liver produce bile?",
    "Is the trachea part of the airway?",
    "Is a CT scan made with X-rays?",
];

const NO_FACTS: [&str; 9] = [
    "Is the pancreas part of the nervous system?",
    "Is influenza caused by a bacterium?",
    "Do antibiotics cure viral infections?",
    "Is the kidney located in the skull?",
    "Does an X-ray use a magnetic field to form images?",
    "Is the femur a bone of the arm?",
    "Does vitamin C deficiency cause rickets?",
    "Is the spleen part of the respiratory system?",
    "Is insulin produced by the liver?",
];

/// Number of distinct text facts in the bank.
pub fn num_text_facts() -> usize {
    MCQ_FACTS.len() + YES_FACTS.len() + NO_FACTS.len()
}

// ---------------------------------------------------------------------------------------------
// Randomness (only raw ChaCha8 bits, so the output does not depend on `rand`'s sampling code).

struct Rng(ChaCha8Rng);

impl Rng {
    fn new(seed: u64, stream: u64, index: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&stream.to_le_bytes());
        key[16..24].copy_from_slice(&index.to_le_bytes());
        key[24..].copy_from_slice(b"infidemo");
        Rng(ChaCha8Rng::from_seed(key))
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in 0..n (n > 0; the modulo bias is negligible for small n).
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

const STREAM_SCHEDULE: u64 = 1;
const STREAM_RECORD: u64 = 2;
const STREAM_IMAGE: u64 = 3;

// ---------------------------------------------------------------------------------------------
// Records.

/// One slot of a split: the task and the index of its label in [`DemoTask::labels`].
#[derive(Debug, Clone, Copy)]
struct Slot {
    task: DemoTask,
    label: usize,
}

/// Task counts for a split of `n` records: (task, count).
fn task_counts(n: usize) -> [(DemoTask, usize); 5] {
    let n_text = (n as f64 * TEXT_FRACTION).round() as usize;
    let n_vis = n - n_text;
    let third = |k: usize| n_vis / 3 + usize::from(k < n_vis % 3);
    [
        (DemoTask::Presence, third(0)),
        (DemoTask::Count, third(1)),
        (DemoTask::Side, third(2)),
        (DemoTask::TextMcq, n_text.div_ceil(2)),
        (DemoTask::TextYesNo, n_text / 2),
    ]
}

fn schedule(seed: u64, split: u64, n: usize) -> Vec<Slot> {
    let mut slots = Vec::with_capacity(n);
    for (task, count) in task_counts(n) {
        let k = task.labels().len();
        slots.extend((0..count).map(|j| Slot { task, label: j % k }));
    }
    Rng::new(seed, STREAM_SCHEDULE, split).shuffle(&mut slots);
    slots
}

/// Builds the records of both splits (train first), without images.
pub fn demo_records(cfg: &DemoDataConfig) -> Vec<DemoRecord> {
    let mut out: Vec<DemoRecord> = Vec::with_capacity(cfg.train + cfg.val);
    for (split, n) in [(0u64, cfg.train), (1u64, cfg.val)] {
        for slot in schedule(cfg.seed, split, n) {
            let index = out.len();
            match cfg.image_pool {
                Some(pool) if index >= pool => {
                    let rec = out[index % pool].clone();
                    out.push(rec);
                }
                _ => out.push(make_record(cfg, index, slot)),
            }
        }
    }
    out
}

fn letter(i: usize) -> String {
    char::from(b'A' + i as u8).to_string()
}

fn make_record(cfg: &DemoDataConfig, index: usize, slot: Slot) -> DemoRecord {
    let mut rng = Rng::new(cfg.seed, STREAM_RECORD, index as u64);
    let label = slot.task.labels()[slot.label].to_string();
    let image = slot
        .task
        .has_image()
        .then(|| format!("images/{index:05}.png"));
    let mut rec = DemoRecord {
        index,
        task: slot.task,
        stem: String::new(),
        options: Vec::new(),
        answer: label,
        image,
        lesions: Vec::new(),
    };
    // Lesion sides: false = left, true = right.
    let sides: Vec<bool> = match slot.task {
        DemoTask::Presence => {
            rec.stem = PRESENCE_QUESTION.into();
            let n = if rec.answer == "yes" {
                1 + rng.below(3)
            } else {
                0
            };
            (0..n).map(|_| rng.below(2) == 1).collect()
        }
        DemoTask::Count => {
            rec.stem = COUNT_QUESTION.into();
            let n = slot.label;
            (0..n).map(|_| rng.below(2) == 1).collect()
        }
        DemoTask::Side => {
            rec.stem = SIDE_QUESTION.into();
            rec.options = SIDE_OPTIONS
                .iter()
                .enumerate()
                .map(|(i, t)| (letter(i), t.to_string()))
                .collect();
            vec![slot.label == 1]
        }
        DemoTask::TextMcq => {
            let (q, correct, distractors) = MCQ_FACTS[rng.below(MCQ_FACTS.len())];
            let mut others: Vec<&str> = distractors.to_vec();
            rng.shuffle(&mut others);
            others.insert(slot.label, correct);
            rec.stem = q.into();
            rec.options = others
                .iter()
                .enumerate()
                .map(|(i, t)| (letter(i), t.to_string()))
                .collect();
            Vec::new()
        }
        DemoTask::TextYesNo => {
            let bank: &[&str] = if rec.answer == "yes" {
                &YES_FACTS
            } else {
                &NO_FACTS
            };
            rec.stem = bank[rng.below(bank.len())].into();
            Vec::new()
        }
    };
    if rec.image.is_some() {
        rec.lesions = sides
            .iter()
            .map(|&right| (if right { 1.0 } else { -1.0 }, 0.0))
            .collect();
    }
    rec
}

// ---------------------------------------------------------------------------------------------
// Images.

fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Soft inside-weight of an axis-aligned ellipse (1 inside, 0 outside, ~`soft` px transition).
fn ellipse_weight(x: f64, y: f64, cx: f64, cy: f64, a: f64, b: f64, soft: f64) -> f64 {
    let d = (((x - cx) / a).powi(2) + ((y - cy) / b).powi(2)).sqrt();
    smoothstep((1.0 - d) * a.min(b) / soft + 0.5)
}

/// Renders the scan of `rec` (sides in `rec.lesions[i].0`: -1 left, +1 right) and returns the
/// grayscale pixels and the lesion centres in pixels.
fn render_scan(seed: u64, index: usize, size: u32, sides: &[f64]) -> (Vec<u8>, Vec<(f64, f64)>) {
    let mut rng = Rng::new(seed, STREAM_IMAGE, index as u64);
    let s = f64::from(size);
    let k = s / 56.0;
    // Anatomy with per-image jitter.
    let cx = s / 2.0 + rng.uniform(-1.5, 1.5) * k;
    let cy = s / 2.0 + rng.uniform(-1.5, 1.5) * k;
    let body_a = 0.45 * s * rng.uniform(0.96, 1.04);
    let body_b = 0.36 * s * rng.uniform(0.95, 1.05);
    let lung_dx = 0.2 * s * rng.uniform(0.95, 1.05);
    let lung_cy = cy - 0.02 * s;
    let lung_a = 0.13 * s * rng.uniform(0.93, 1.07);
    let lung_b = 0.24 * s * rng.uniform(0.93, 1.07);
    let spine_cy = cy + 0.22 * s;
    let tissue = 130.0 + rng.uniform(-10.0, 10.0);
    let lung = 50.0 + rng.uniform(-8.0, 8.0);
    let spine = 205.0 + rng.uniform(-10.0, 10.0);
    let background = 6.0;
    let soft = 1.0 * k;

    // Lesions inside the lungs, at most 0.65 of the lung radius from its centre, kept apart.
    let min_dist = 6.5 * k;
    let mut lesions: Vec<(f64, f64, f64, f64)> = Vec::new(); // (x, y, sigma, amplitude)
    'outer: loop {
        lesions.clear();
        for &side in sides {
            let lcx = cx + side * lung_dx;
            let mut placed = false;
            for _ in 0..200 {
                let (u, v) = (rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0));
                if u * u + v * v > 1.0 {
                    continue;
                }
                let (x, y) = (lcx + 0.65 * lung_a * u, lung_cy + 0.65 * lung_b * v);
                if lesions
                    .iter()
                    .all(|&(px, py, _, _)| ((px - x).powi(2) + (py - y).powi(2)).sqrt() >= min_dist)
                {
                    lesions.push((x, y, rng.uniform(1.8, 2.4) * k, rng.uniform(150.0, 190.0)));
                    placed = true;
                    break;
                }
            }
            if !placed {
                continue 'outer;
            }
        }
        break;
    }

    // Low-frequency texture: 9x9 value-noise grid, bilinear.
    const G: usize = 9;
    let grid: Vec<f64> = (0..G * G).map(|_| rng.uniform(-14.0, 14.0)).collect();
    let texture = |x: f64, y: f64| {
        let gx = (x / s * (G - 1) as f64).clamp(0.0, (G - 1) as f64 - 1e-9);
        let gy = (y / s * (G - 1) as f64).clamp(0.0, (G - 1) as f64 - 1e-9);
        let (ix, iy) = (gx as usize, gy as usize);
        let (fx, fy) = (gx - ix as f64, gy - iy as f64);
        let g = |i: usize, j: usize| grid[j * G + i];
        let top = g(ix, iy) * (1.0 - fx) + g(ix + 1, iy) * fx;
        let bot = g(ix, iy + 1) * (1.0 - fx) + g(ix + 1, iy + 1) * fx;
        top * (1.0 - fy) + bot * fy
    };

    let mut pixels = Vec::with_capacity((size * size) as usize);
    for py in 0..size {
        for px in 0..size {
            let (x, y) = (f64::from(px) + 0.5, f64::from(py) + 0.5);
            let wb = ellipse_weight(x, y, cx, cy, body_a, body_b, soft);
            let mut v = background * (1.0 - wb) + tissue * wb;
            for side in [-1.0, 1.0] {
                let wl = ellipse_weight(x, y, cx + side * lung_dx, lung_cy, lung_a, lung_b, soft);
                v = v * (1.0 - wl) + lung * wl;
            }
            let ws = ellipse_weight(x, y, cx, spine_cy, 0.05 * s, 0.06 * s, soft);
            v = v * (1.0 - ws) + spine * ws;
            v += texture(x, y) * wb;
            for &(lx, ly, sigma, amp) in &lesions {
                let r2 = (x - lx).powi(2) + (y - ly).powi(2);
                v += amp * (-r2 / (2.0 * sigma * sigma)).exp();
            }
            v += rng.uniform(-6.0, 6.0) + rng.uniform(-6.0, 6.0);
            pixels.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    (pixels, lesions.iter().map(|&(x, y, _, _)| (x, y)).collect())
}

fn encode_png(pixels: &[u8], size: u32) -> Result<Vec<u8>> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::{ExtendedColorType, ImageEncoder};
    let mut buf = Vec::new();
    PngEncoder::new_with_quality(&mut buf, CompressionType::Default, FilterType::Adaptive)
        .write_image(pixels, size, size, ExtendedColorType::L8)?;
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Output.

#[derive(Serialize)]
struct SftMessage<'a> {
    role: &'a str,
    content: String,
}

#[derive(Serialize)]
struct SftRecord<'a> {
    messages: Vec<SftMessage<'a>>,
    images: Vec<String>,
}

#[derive(Serialize)]
struct RlRecord {
    problem: String,
    answer: String,
    images: Vec<String>,
    task: &'static str,
}

fn bench_record(rec: &DemoRecord) -> BenchRecord {
    let options =
        (!rec.options.is_empty()).then(|| rec.options.iter().cloned().collect::<BTreeMap<_, _>>());
    let mut meta = serde_json::Map::new();
    meta.insert("task".into(), rec.task.as_str().into());
    if rec.image.is_some() {
        meta.insert("lesions".into(), rec.lesions.len().into());
    }
    BenchRecord {
        id: format!("demo/{:05}", rec.index),
        benchmark: format!("demo-{}", rec.task.as_str()),
        question: rec.stem.clone(),
        options,
        answer: rec.answer.clone(),
        answer_type: rec.task.answer_type(),
        images: rec.images(),
        lang: None,
        meta: Some(serde_json::Value::Object(meta)),
    }
}

fn write_jsonl<T: Serialize>(path: &Path, items: impl IntoIterator<Item = T>) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(f);
    for item in items {
        serde_json::to_writer(&mut w, &item)?;
        w.write_all(b"\n")?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn split_summary(records: &[DemoRecord]) -> SplitSummary {
    let mut tasks = BTreeMap::new();
    for task in DemoTask::ALL {
        let recs: Vec<&DemoRecord> = records.iter().filter(|r| r.task == task).collect();
        let mut labels: BTreeMap<String, usize> =
            task.labels().iter().map(|l| (l.to_string(), 0)).collect();
        for r in &recs {
            *labels.entry(r.answer.clone()).or_default() += 1;
        }
        let n = recs.len();
        let max = labels.values().copied().max().unwrap_or(0);
        tasks.insert(
            task.as_str().to_string(),
            TaskStats {
                records: n,
                labels,
                chance_accuracy: 1.0 / task.labels().len() as f64,
                majority_accuracy: if n == 0 { 0.0 } else { max as f64 / n as f64 },
            },
        );
    }
    let n = records.len();
    let weighted = |f: fn(&TaskStats) -> f64| {
        if n == 0 {
            0.0
        } else {
            tasks.values().map(|t| t.records as f64 * f(t)).sum::<f64>() / n as f64
        }
    };
    let with_image = records.iter().filter(|r| r.image.is_some()).count();
    SplitSummary {
        records: n,
        with_image,
        text_only: n - with_image,
        chance_accuracy: weighted(|t| t.chance_accuracy),
        majority_accuracy: weighted(|t| t.majority_accuracy),
        tasks,
    }
}

/// Generates the demo data set into `out_dir` (created if needed; existing files of the same
/// names are overwritten, nothing else is removed). See the module docs for the layout.
pub fn write_demo_data(out_dir: &Path, cfg: &DemoDataConfig) -> Result<DemoDataSummary> {
    ensure!(
        cfg.image_size >= 28 && cfg.image_size.is_multiple_of(28),
        "image_size must be a positive multiple of 28, got {}",
        cfg.image_size
    );
    let distinct = cfg
        .image_pool
        .map_or(cfg.train + cfg.val, |p| p.min(cfg.train + cfg.val));
    ensure!(cfg.image_pool != Some(0), "image_pool must be at least 1");
    ensure!(
        distinct <= 100_000,
        "at most 100000 distinct records (5-digit image names), got {distinct} (use an image pool)"
    );
    let img_dir = out_dir.join("images");
    fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;

    let mut records = demo_records(cfg);
    let mut images = 0;
    for rec in records.iter_mut().take(distinct) {
        let Some(rel) = &rec.image else { continue };
        let sides: Vec<f64> = rec.lesions.iter().map(|l| l.0).collect();
        let (pixels, centres) = render_scan(cfg.seed, rec.index, cfg.image_size, &sides);
        rec.lesions = centres;
        let path = out_dir.join(rel);
        fs::write(&path, encode_png(&pixels, cfg.image_size)?)
            .with_context(|| format!("writing {}", path.display()))?;
        images += 1;
    }
    let (train, val) = records.split_at(cfg.train);

    let sft = |r: &DemoRecord| SftRecord {
        messages: vec![
            SftMessage {
                role: "user",
                content: r.prompt(),
            },
            SftMessage {
                role: "assistant",
                content: r.answer.clone(),
            },
        ],
        images: r.images(),
    };
    let rl = |r: &DemoRecord| RlRecord {
        problem: r.prompt(),
        answer: r.answer.clone(),
        images: r.images(),
        task: r.task.rl_task(),
    };
    write_jsonl(&out_dir.join("train.jsonl"), train.iter().map(sft))?;
    write_jsonl(&out_dir.join("val.jsonl"), val.iter().map(sft))?;
    write_jsonl(&out_dir.join("rl_train.jsonl"), train.iter().map(rl))?;
    write_jsonl(&out_dir.join("rl_val.jsonl"), val.iter().map(rl))?;
    write_jsonl(
        &out_dir.join("bench_val.jsonl"),
        val.iter().map(bench_record),
    )?;

    let summary = DemoDataSummary {
        seed: cfg.seed,
        image_size: cfg.image_size,
        images,
        train: split_summary(train),
        val: split_summary(val),
        rl_tasks: DemoTask::ALL
            .iter()
            .map(|t| (t.as_str().to_string(), t.rl_task().to_string()))
            .collect(),
        answer_types: DemoTask::ALL
            .iter()
            .map(|t| {
                let v = serde_json::to_value(t.answer_type()).expect("answer type serialises");
                (
                    t.as_str().to_string(),
                    v.as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        files: [
            "images/*.png",
            "train.jsonl",
            "val.jsonl",
            "rl_train.jsonl",
            "rl_val.jsonl",
            "bench_val.jsonl",
            "summary.json",
        ]
        .map(String::from)
        .to_vec(),
    };
    let path = out_dir.join("summary.json");
    fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_balanced() {
        let cfg = DemoDataConfig::default();
        let recs = demo_records(&cfg);
        assert_eq!(recs.len(), 1400);
        let s = split_summary(&recs[..1200]);
        assert_eq!(s.text_only, 240);
        for t in s.tasks.values() {
            let (min, max) = (
                t.labels.values().min().unwrap(),
                t.labels.values().max().unwrap(),
            );
            assert!(max - min <= 1, "{t:?}");
        }
        assert_eq!(
            s.tasks["presence"].records + s.tasks["count"].records + s.tasks["side"].records,
            960
        );
    }

    #[test]
    fn mcq_letters_vary_and_options_hold_the_answer() {
        let recs = demo_records(&DemoDataConfig {
            seed: 3,
            ..Default::default()
        });
        for r in recs.iter().filter(|r| r.task == DemoTask::TextMcq) {
            assert_eq!(r.options.len(), 4);
            let (_, correct, _) = MCQ_FACTS.iter().find(|f| f.0 == r.stem).unwrap();
            let i = (r.answer.as_bytes()[0] - b'A') as usize;
            assert_eq!(r.options[i].1, *correct);
        }
        assert_eq!(num_text_facts(), 38);
    }

    #[test]
    fn lesions_land_on_their_side() {
        let size = 56;
        for (i, sides) in [
            vec![-1.0],
            vec![1.0],
            vec![-1.0, 1.0, 1.0],
            vec![-1.0, -1.0, -1.0],
        ]
        .iter()
        .enumerate()
        {
            let (px, centres) = render_scan(7, i, size, sides);
            assert_eq!(px.len(), 56 * 56);
            assert_eq!(centres.len(), sides.len());
            for (c, s) in centres.iter().zip(sides) {
                assert!((c.0 - 28.0) * s > 2.0, "{c:?} {s}");
                // The lesion centre is brighter than the (dark) lung around it.
                let v = px[c.1 as usize * 56 + c.0 as usize];
                assert!(v > 100, "{v}");
            }
        }
    }

    #[test]
    fn rejects_bad_image_size() {
        let dir = std::env::temp_dir().join("infimed-demo-bad-size");
        assert!(write_demo_data(
            &dir,
            &DemoDataConfig {
                image_size: 50,
                ..Default::default()
            }
        )
        .is_err());
    }
}
