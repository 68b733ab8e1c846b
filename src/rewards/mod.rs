//! Verifiable rewards for GRPO (and the answer extraction reused by evaluation).
//!
//! `reward = format_weight * F + accuracy_weight * A * F` with `F` ∈ {0, 1} the format reward
//! ([`format`]) and `A` ∈ [0, 1] the task accuracy of the extracted answer span: accuracy counts only
//! when the format holds (the paper's `R = 0.1 * R_format + 0.9 * R_accuracy`, accuracy gated by the
//! format). [`RewardBreakdown::accuracy`] reports the UNGATED accuracy (what evaluation wants); the gate
//! is applied in [`RewardBreakdown::reward`].
//!
//! Accuracy by [`Task`]: [`mcq`] (letter match, 1/0), [`text`] (Jaccard of token sets), [`math`]
//! (numeric / normalised-string equality, 1/0), [`grounding`] (IoU of boxes). When a record has no
//! task, [`infer_task`] picks one from the ground truth.
//!
//! Default config: `think_boxed` with 0.1 / 0.9. The 0.1 / 0.9 split is EasyR1's math reward, whose
//! format rule is think_boxed (the paper's GRPO ran on verl/EasyR1), and MedEvalKit's reasoning prompts
//! ask for the final answer in `\boxed{}`, so training and evaluation extract the answer the same way.
//! r1v's `think_answer` is available as a recipe setting.

use serde::{Deserialize, Serialize};

pub mod format;
pub mod grounding;
pub mod math;
pub mod mcq;
pub mod text;

pub use format::{
    extract_all_boxed, extract_answer, extract_answer_tag, extract_last_boxed, format_ok,
    format_reward,
};
pub use grounding::{grounding_reward, iou, parse_boxes, ScoredBox};
pub use math::{eval_math, math_accuracy, math_equal, normalize_math};
pub use mcq::{extract_choice, extract_choice_with_options, mcq_accuracy, parse_gt_choice};
pub use text::{jaccard, jaccard_tokens};

/// Which format the response must follow (a recipe setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatKind {
    /// r1v: `<think>...</think>` then `<answer>...</answer>`; the answer is the first answer tag.
    ThinkAnswer,
    /// EasyR1 math: `<think>...</think>` then `\boxed{...}`; the answer is the last boxed content.
    #[default]
    ThinkBoxed,
    /// No format requirement (F = 1); the answer is boxed, else answer tag, else the whole response.
    None,
}

impl FormatKind {
    pub const ALL: [FormatKind; 3] = [
        FormatKind::ThinkAnswer,
        FormatKind::ThinkBoxed,
        FormatKind::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FormatKind::ThinkAnswer => "think_answer",
            FormatKind::ThinkBoxed => "think_boxed",
            FormatKind::None => "none",
        }
    }
}

impl std::fmt::Display for FormatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FormatKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let k = s.trim().to_ascii_lowercase().replace('-', "_");
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == k)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown format {s:?} (expected think_answer, think_boxed or none)")
            })
    }
}

/// How accuracy is graded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Multiple choice: extracted letter == ground-truth letter (1/0).
    Mcq,
    /// Free text: Jaccard similarity of token sets.
    Text,
    /// Math: numeric (1e-6 relative) or normalised-string equality (1/0).
    Math,
    /// Grounding: IoU of boxes.
    Grounding,
}

impl Task {
    pub const ALL: [Task; 4] = [Task::Mcq, Task::Text, Task::Math, Task::Grounding];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Mcq => "mcq",
            Task::Text => "text",
            Task::Math => "math",
            Task::Grounding => "grounding",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Task {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let k = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == k)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown task {s:?} (expected mcq, text, math or grounding)")
            })
    }
}

/// The `[reward]` table of a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    pub format: FormatKind,
    pub format_weight: f64,
    pub accuracy_weight: f64,
}

impl Default for RewardConfig {
    /// think_boxed, 0.1 / 0.9 (see the module docs for why).
    fn default() -> Self {
        Self {
            format: FormatKind::ThinkBoxed,
            format_weight: 0.1,
            accuracy_weight: 0.9,
        }
    }
}

impl RewardConfig {
    /// Weights must be finite and non-negative. Rewards then lie in `[0, format_weight + accuracy_weight]`.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, w) in [
            ("format_weight", self.format_weight),
            ("accuracy_weight", self.accuracy_weight),
        ] {
            anyhow::ensure!(
                w.is_finite() && w >= 0.0,
                "reward.{name} must be finite and >= 0, got {w}"
            );
        }
        Ok(())
    }

    /// The `[reward]` table of a TOML recipe (other tables are ignored; a missing table or missing
    /// fields take the defaults; unknown fields in `[reward]` are an error). Validated.
    pub fn from_recipe_toml(text: &str) -> anyhow::Result<Self> {
        let value: toml::Value = toml::from_str(text)?;
        let cfg = match value.get("reward") {
            Some(table) => {
                anyhow::ensure!(table.is_table(), "`reward` must be a table");
                table
                    .clone()
                    .try_into::<RewardConfig>()
                    .map_err(|e| anyhow::anyhow!("[reward]: {e}"))?
            }
            None => RewardConfig::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// One scored response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardBreakdown {
    /// Format reward F ∈ {0, 1}.
    pub format: f64,
    /// Task accuracy A ∈ [0, 1] of the extracted answer, NOT gated by the format (0 when nothing
    /// could be extracted).
    pub accuracy: f64,
    /// `format_weight * F + accuracy_weight * A * F`.
    pub reward: f64,
    /// The task used (given or inferred).
    pub task: Task,
    /// The answer span graded (see [`format::extract_answer`]).
    pub extracted: Option<String>,
}

/// Infer the task from the ground truth, in this order:
/// 1. a (non-empty) box list — `[x1,y1,x2,y2]`, `[[...], ...]`, `[{"Position": ...}]` — → grounding;
/// 2. a single capital letter, optionally `(B)`, `B.` or `B)` → mcq;
/// 3. math ([`math::looks_like_math`]: evaluates to a number after normalisation — `42`, `-3.5`, `1/2`,
///    `50%`, `1,000`, `5 cm` — or carries LaTeX `\`, `^` or `$`) → math;
/// 4. anything else (words, yes/no, empty) → text.
///
/// A ground truth with option text ("B. Edema") is NOT inferred as mcq (free-text answers such as
/// "E. coli" look the same): give such records `task: "mcq"` explicitly; [`mcq::parse_gt_choice`]
/// then reads the letter.
pub fn infer_task(answer: &str) -> Task {
    let a = answer.trim();
    if grounding::looks_like_boxes(a) {
        return Task::Grounding;
    }
    let c: Vec<char> = a.chars().collect();
    let single = match c.as_slice() {
        [l] | ['(', l, ')'] | [l, '.' | ')'] => l.is_ascii_uppercase(),
        _ => false,
    };
    if single {
        return Task::Mcq;
    }
    if math::looks_like_math(a) {
        return Task::Math;
    }
    Task::Text
}

/// Accuracy of an extracted answer span against the ground truth, in [0, 1] (NaN-safe).
pub fn accuracy(task: Task, extracted: &str, answer: &str) -> f64 {
    let a = match task {
        Task::Mcq => mcq::mcq_accuracy(extracted, answer),
        Task::Text => text::jaccard(extracted, answer),
        Task::Math => math::math_accuracy(extracted, answer),
        Task::Grounding => grounding::grounding_reward(extracted, answer),
    };
    if a.is_finite() {
        a.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// Score one response against its ground truth (`task`: given, or inferred from `answer`).
pub fn score(
    cfg: &RewardConfig,
    response: &str,
    answer: &str,
    task: Option<Task>,
) -> RewardBreakdown {
    let task = task.unwrap_or_else(|| infer_task(answer));
    let format = format::format_reward(cfg.format, response);
    let extracted = format::extract_answer(cfg.format, response);
    let acc = extracted
        .as_deref()
        .map_or(0.0, |e| accuracy(task, e, answer));
    let reward = cfg.format_weight * format + cfg.accuracy_weight * acc * format;
    RewardBreakdown {
        format,
        accuracy: acc,
        reward,
        task,
        extracted,
    }
}

/// A record's `answer` as text: strings as they are, numbers as JSON writes them, arrays and objects
/// as compact JSON, booleans as `true`/`false`; `null` is rejected.
pub fn answer_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => Some(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(format: FormatKind) -> RewardConfig {
        RewardConfig {
            format,
            ..RewardConfig::default()
        }
    }

    #[test]
    fn total_formula_with_paper_weights() {
        let c = cfg(FormatKind::ThinkBoxed);
        // format and accuracy
        let r = score(&c, "<think>2+2</think> \\boxed{4}", "4", None);
        assert_eq!((r.format, r.accuracy, r.task), (1.0, 1.0, Task::Math));
        assert!((r.reward - 1.0).abs() < 1e-12);
        // format only
        let r = score(&c, "<think>2+2</think> \\boxed{5}", "4", None);
        assert_eq!((r.format, r.accuracy), (1.0, 0.0));
        assert!((r.reward - 0.1).abs() < 1e-12);
        // right answer, wrong format: accuracy is reported but gated out of the reward
        let r = score(&c, "\\boxed{4}", "4", None);
        assert_eq!((r.format, r.accuracy, r.reward), (0.0, 1.0, 0.0));
        // partial accuracy (text): 0.1 + 0.9 * 1/3
        let r = score(
            &c,
            "<think>.</think> \\boxed{left lung}",
            "left kidney",
            Some(Task::Text),
        );
        assert!((r.accuracy - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.reward - (0.1 + 0.9 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn think_answer_mcq() {
        let c = cfg(FormatKind::ThinkAnswer);
        let r = score(
            &c,
            "<think>A seems wrong</think>\n<answer>(C)</answer>",
            "C",
            None,
        );
        assert_eq!((r.task, r.format, r.accuracy), (Task::Mcq, 1.0, 1.0));
        assert_eq!(r.extracted.as_deref(), Some("(C)"));
        let r = score(
            &c,
            "<think>x</think><answer>The answer is C</answer>",
            "(C)",
            None,
        );
        assert_eq!(r.reward, 1.0);
        let r = score(
            &c,
            "<think>x</think><answer>C. Edema</answer>",
            "C. Edema",
            Some(Task::Mcq),
        );
        assert_eq!(r.reward, 1.0);
        // missing tags: no format, no extraction
        let r = score(&c, "The answer is C", "C", None);
        assert_eq!(
            (r.format, r.accuracy, r.reward, r.extracted),
            (0.0, 0.0, 0.0, None)
        );
        // "Always" is not A
        let r = score(&c, "<think>x</think><answer>Always</answer>", "A", None);
        assert_eq!((r.format, r.accuracy), (1.0, 0.0));
        assert!((r.reward - 0.1).abs() < 1e-12);
    }

    #[test]
    fn think_boxed_last_box_and_nesting() {
        let c = cfg(FormatKind::ThinkBoxed);
        let r = score(
            &c,
            "<think>t</think> \\boxed{A} no wait \\boxed{B}",
            "B",
            None,
        );
        assert_eq!((r.accuracy, r.reward), (1.0, 1.0));
        let r = score(&c, "<think>t</think> \\boxed{\\frac{1}{2}}", "0.5", None);
        assert_eq!(r.extracted.as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(r.reward, 1.0);
        // the EasyR1 regex holds but the box never closes (brace-matched): nothing to grade
        let r = score(&c, "<think>t</think> \\boxed{4 {}", "4", None);
        assert_eq!(
            (r.format, r.accuracy, r.extracted.as_deref()),
            (1.0, 0.0, None)
        );
        assert!((r.reward - 0.1).abs() < 1e-12);
        let r = score(&c, "<think>t</think> \\boxed{4", "4", None);
        assert_eq!((r.format, r.accuracy, r.extracted), (0.0, 0.0, None));
    }

    #[test]
    fn format_none_always_one_and_falls_back() {
        let c = cfg(FormatKind::None);
        let r = score(&c, "the answer is B", "B", None);
        assert_eq!((r.format, r.accuracy, r.reward), (1.0, 1.0, 1.0));
        let r = score(&c, "", "B", None);
        assert_eq!((r.format, r.accuracy), (1.0, 0.0));
        assert!((r.reward - 0.1).abs() < 1e-12);
    }

    #[test]
    fn grounding_and_empty() {
        let c = cfg(FormatKind::ThinkAnswer);
        let r = score(
            &c,
            "<think>t</think><answer>[{'Position': [0,0,10,10], 'Confidence': 0.9}]</answer>",
            "[[0,0,10,10]]",
            None,
        );
        assert_eq!((r.task, r.accuracy, r.reward), (Task::Grounding, 1.0, 1.0));
        let r = score(
            &c,
            "<think>t</think><answer>somewhere left</answer>",
            "[[0,0,10,10]]",
            None,
        );
        assert_eq!((r.task, r.accuracy), (Task::Grounding, 0.0));
        let r = score(&c, "<think></think><answer></answer>", "", None);
        assert_eq!((r.task, r.format, r.accuracy), (Task::Text, 1.0, 0.0));
    }

    #[test]
    fn task_inference() {
        for (a, t) in [
            ("B", Task::Mcq),
            ("(B)", Task::Mcq),
            (" C. ", Task::Mcq),
            ("b", Task::Text),
            ("Yes", Task::Text),
            ("left lung", Task::Text),
            ("", Task::Text),
            ("42", Task::Math),
            ("-1/2", Task::Math),
            ("\\frac{3}{4}", Task::Math),
            ("50%", Task::Math),
            ("1,000", Task::Math),
            ("[10, 20, 30, 40]", Task::Grounding),
            ("[[1,2,3,4],[5,6,7,8]]", Task::Grounding),
            (
                "[{\"Position\": [1,2,3,4], \"Confidence\": 1}]",
                Task::Grounding,
            ),
        ] {
            assert_eq!(infer_task(a), t, "{a:?}");
        }
    }

    #[test]
    fn enums_and_config_serde() {
        assert_eq!(
            "think_answer".parse::<FormatKind>().unwrap(),
            FormatKind::ThinkAnswer
        );
        assert_eq!(
            "think-boxed".parse::<FormatKind>().unwrap(),
            FormatKind::ThinkBoxed
        );
        assert!("boxed".parse::<FormatKind>().is_err());
        assert_eq!("grounding".parse::<Task>().unwrap(), Task::Grounding);
        assert_eq!(
            serde_json::to_string(&FormatKind::ThinkBoxed).unwrap(),
            "\"think_boxed\""
        );
        assert_eq!(serde_json::from_str::<Task>("\"mcq\"").unwrap(), Task::Mcq);
        let c = RewardConfig::from_recipe_toml(
            "[model]\nname = \"x\"\n[reward]\nformat = \"think_answer\"\nformat_weight = 0.2\n[grpo]\nlr = 1e-6\n",
        )
        .unwrap();
        assert_eq!(
            c,
            RewardConfig {
                format: FormatKind::ThinkAnswer,
                format_weight: 0.2,
                accuracy_weight: 0.9
            }
        );
        assert_eq!(
            RewardConfig::from_recipe_toml("[sft]\nlr = 1.0\n").unwrap(),
            RewardConfig::default()
        );
        assert!(RewardConfig::from_recipe_toml("[reward]\nformat = \"nope\"\n").is_err());
        assert!(RewardConfig::from_recipe_toml("[reward]\nformat_wieght = 0.1\n").is_err());
        assert!(RewardConfig::from_recipe_toml("[reward]\nformat_weight = -1.0\n").is_err());
        assert!(RewardConfig::from_recipe_toml("reward = 3\n").is_err());
    }

    fn any_task() -> impl Strategy<Value = Option<Task>> {
        prop_oneof![
            Just(None),
            Just(Some(Task::Mcq)),
            Just(Some(Task::Text)),
            Just(Some(Task::Math)),
            Just(Some(Task::Grounding))
        ]
    }

    fn any_format() -> impl Strategy<Value = FormatKind> {
        prop_oneof![
            Just(FormatKind::ThinkAnswer),
            Just(FormatKind::ThinkBoxed),
            Just(FormatKind::None)
        ]
    }

    /// Strings made of tag / boxed fragments and noise, to hit the well-formatted paths too.
    fn responseish() -> impl Strategy<Value = String> {
        let frag = prop_oneof![
            Just("<think>".to_string()),
            Just("</think>".to_string()),
            Just("<answer>".to_string()),
            Just("</answer>".to_string()),
            Just("\\boxed{".to_string()),
            Just("}".to_string()),
            Just("{".to_string()),
            Just(" ".to_string()),
            "[A-D]",
            "[0-9./%-]{1,4}",
            "\\PC{0,6}",
        ];
        proptest::collection::vec(frag, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn reward_bounds_and_gate(resp in prop_oneof!["\\PC{0,80}", responseish()], ans in prop_oneof!["\\PC{0,20}", "[A-D]", "[0-9./-]{1,5}"], task in any_task(), fmt in any_format()) {
            let r = score(&cfg(fmt), &resp, &ans, task);
            prop_assert!((0.0..=1.0).contains(&r.reward), "reward {}", r.reward);
            prop_assert!((0.0..=1.0).contains(&r.accuracy));
            prop_assert!(r.format == 0.0 || r.format == 1.0);
            if fmt == FormatKind::None {
                prop_assert_eq!(r.format, 1.0);
            }
            if r.format == 0.0 {
                prop_assert_eq!(r.reward, 0.0);
            }
            let expected = 0.1 * r.format + 0.9 * r.accuracy * r.format;
            prop_assert!((r.reward - expected).abs() < 1e-12);
        }

        #[test]
        fn no_format_means_zero_reward(resp in "[^<]{0,80}", ans in "\\PC{0,20}", task in any_task()) {
            // without a '<' there can be no <think> tag
            for fmt in [FormatKind::ThinkAnswer, FormatKind::ThinkBoxed] {
                let r = score(&cfg(fmt), &resp, &ans, task);
                prop_assert_eq!(r.format, 0.0);
                prop_assert_eq!(r.reward, 0.0);
            }
        }

        #[test]
        fn correct_wellformed_answers_get_full_reward(letter in "[A-E]", n in -10_000i64..10_000) {
            let c = cfg(FormatKind::ThinkAnswer);
            let r = score(&c, &format!("<think>hmm</think> <answer>{letter}</answer>"), &format!("({letter})"), None);
            prop_assert_eq!(r.reward, 1.0);
            let c = cfg(FormatKind::ThinkBoxed);
            let r = score(&c, &format!("<think>hmm</think> so \\boxed{{{n}}}."), &n.to_string(), None);
            prop_assert_eq!(r.reward, 1.0);
        }
    }
}
