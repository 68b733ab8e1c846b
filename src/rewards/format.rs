//! Format rewards and answer-span extraction.
//!
//! Two reference rules are reproduced exactly (see `shared/reference/training.md` section 3):
//!
//! * [`FormatKind::ThinkAnswer`] — the r1v rule:
//!   `re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", resp, re.DOTALL)`;
//!   the answer span is the FIRST `<answer>(.*?)</answer>`, stripped.
//! * [`FormatKind::ThinkBoxed`] — the EasyR1 math rule: whitespace around `<`, `>` and `/` is removed
//!   first (`re.sub(r"\s*(<|>|/)\s*", r"\1", resp)`), then
//!   `re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", resp, re.DOTALL)`;
//!   the answer span is the content of the LAST brace-matched `\boxed{...}`, stripped.
//! * [`FormatKind::None`] — always well formatted; the answer span is the last boxed content if any,
//!   else the first answer tag, else the whole (stripped) response (MedEvalKit's scoring order).
//!
//! Answer spans are taken from the response as written (the whitespace normalisation of the EasyR1
//! rule is only used for the format check), so `\boxed{1 / 2}` yields `1 / 2`.

use std::sync::LazyLock;

use regex::Regex;

use super::FormatKind;

static THINK_ANSWER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)\A<think>.*?</think>\s*<answer>.*?</answer>\z").expect("valid regex")
});
static THINK_BOXED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)\A<think>.*</think>.*\\boxed\{.*\}.*\z").expect("valid regex")
});
static TAG_WS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s*(<|>|/)\s*").expect("valid regex"));
static ANSWER_TAG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?s)<answer>(.*?)</answer>").expect("valid regex"));

/// EasyR1's pre-normalisation: `re.sub(r"\s*(<|>|/)\s*", r"\1", resp)`.
pub fn normalize_tag_whitespace(response: &str) -> String {
    TAG_WS.replace_all(response, "$1").into_owned()
}

/// r1v: `<think>...</think>`, optional whitespace, `<answer>...</answer>`, nothing else.
pub fn is_think_answer(response: &str) -> bool {
    THINK_ANSWER.is_match(response)
}

/// EasyR1 math: after [`normalize_tag_whitespace`], `<think>.*</think>.*\boxed{.*}.*` (DOTALL).
pub fn is_think_boxed(response: &str) -> bool {
    THINK_BOXED.is_match(&normalize_tag_whitespace(response))
}

/// Whether `response` satisfies the format `kind` (`None` always does).
pub fn format_ok(kind: FormatKind, response: &str) -> bool {
    match kind {
        FormatKind::ThinkAnswer => is_think_answer(response),
        FormatKind::ThinkBoxed => is_think_boxed(response),
        FormatKind::None => true,
    }
}

/// The format reward: 1.0 when [`format_ok`], else 0.0.
pub fn format_reward(kind: FormatKind, response: &str) -> f64 {
    if format_ok(kind, response) {
        1.0
    } else {
        0.0
    }
}

/// The content (stripped) of the first `<answer>...</answer>` (r1v), or `None`.
pub fn extract_answer_tag(text: &str) -> Option<String> {
    ANSWER_TAG.captures(text).map(|c| c[1].trim().to_string())
}

/// Content (stripped) of the brace-matched `\boxed{...}` starting at byte `start` (the backslash).
fn boxed_at(text: &str, start: usize) -> Option<&str> {
    const OPEN: &str = "\\boxed{";
    let body = &text[start + OPEN.len()..];
    let mut depth = 0usize;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(body[..i].trim()),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// All brace-matched `\boxed{...}` contents (stripped), in order of their opening position
/// (a nested `\boxed` appears after its parent). Unclosed ones are skipped.
pub fn extract_all_boxed(text: &str) -> Vec<String> {
    text.match_indices("\\boxed{")
        .filter_map(|(i, _)| boxed_at(text, i))
        .map(str::to_string)
        .collect()
}

/// Content (stripped) of the LAST brace-matched `\boxed{...}`: the last opening `\boxed{` whose braces
/// close (mathruler's `extract_boxed_content` takes the last opening and gives up if it is unclosed;
/// we fall back to the previous closed one instead). Nested braces are kept:
/// `\boxed{\frac{1}{2}}` gives `\frac{1}{2}`; `\boxed{\boxed{3}}` gives `3`.
pub fn extract_last_boxed(text: &str) -> Option<String> {
    let starts: Vec<usize> = text.match_indices("\\boxed{").map(|(i, _)| i).collect();
    starts
        .into_iter()
        .rev()
        .find_map(|i| boxed_at(text, i))
        .map(str::to_string)
}

/// The answer span that accuracy is graded on:
/// * `think_answer`: first `<answer>` content, stripped (`None` when there is no answer tag);
/// * `think_boxed`: last brace-matched `\boxed{}` content (`None` when there is none);
/// * `none`: boxed if present, else answer tag, else the whole response stripped.
pub fn extract_answer(kind: FormatKind, response: &str) -> Option<String> {
    match kind {
        FormatKind::ThinkAnswer => extract_answer_tag(response),
        FormatKind::ThinkBoxed => extract_last_boxed(response),
        FormatKind::None => Some(
            extract_last_boxed(response)
                .or_else(|| extract_answer_tag(response))
                .unwrap_or_else(|| response.trim().to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_answer_accepts_r1v_shape() {
        assert!(is_think_answer("<think>x</think><answer>B</answer>"));
        assert!(is_think_answer(
            "<think>\nreason\n</think>\n\n <answer>\nB\n</answer>"
        ));
        assert!(is_think_answer("<think></think><answer></answer>"));
        // Tags inside the think block are fine as long as the whole string can be matched.
        assert!(is_think_answer(
            "<think>a</think>b</think> <answer>c</answer>"
        ));
    }

    #[test]
    fn think_answer_rejects_malformed() {
        assert!(!is_think_answer(""));
        assert!(!is_think_answer("<answer>B</answer>"));
        assert!(!is_think_answer("<think>x</think>"));
        assert!(!is_think_answer("<think>x</think> text <answer>B</answer>"));
        assert!(!is_think_answer(
            "<think>x</think><answer>B</answer> trailing"
        ));
        assert!(!is_think_answer(" <think>x</think><answer>B</answer>"));
        assert!(!is_think_answer("<think>x<answer>B</answer>"));
        assert!(!is_think_answer("<answer>B</answer><think>x</think>"));
    }

    #[test]
    fn think_boxed_follows_easyr1() {
        assert!(is_think_boxed("<think>x</think>so \\boxed{2}"));
        assert!(is_think_boxed("<think>x</think>\\boxed{2} done."));
        // whitespace around < > / is removed first
        assert!(is_think_boxed("< think >x< / think > \\boxed{2}"));
        assert!(is_think_boxed("<think>a</think>\n\\boxed{}"));
        assert!(!is_think_boxed("\\boxed{2}"));
        assert!(!is_think_boxed("<think>x</think> 2"));
        assert!(!is_think_boxed("pre <think>x</think> \\boxed{2}"));
        assert!(!is_think_boxed("<think>x \\boxed{2}"));
        assert!(!is_think_boxed("\\boxed{2}<think>x</think>"));
        assert!(!is_think_boxed(""));
    }

    #[test]
    fn format_none_always_holds() {
        assert!(format_ok(FormatKind::None, ""));
        assert_eq!(format_reward(FormatKind::None, "anything"), 1.0);
        assert_eq!(format_reward(FormatKind::ThinkAnswer, "anything"), 0.0);
    }

    #[test]
    fn answer_tag_first_and_stripped() {
        assert_eq!(
            extract_answer_tag("<answer> A </answer><answer>B</answer>").as_deref(),
            Some("A")
        );
        assert_eq!(
            extract_answer_tag("<answer>\nmulti\nline\n</answer>").as_deref(),
            Some("multi\nline")
        );
        assert_eq!(extract_answer_tag("<answer>B"), None);
        assert_eq!(extract_answer_tag(""), None);
    }

    #[test]
    fn boxed_last_wins_and_braces_match() {
        assert_eq!(
            extract_last_boxed("\\boxed{1} then \\boxed{2}").as_deref(),
            Some("2")
        );
        assert_eq!(
            extract_last_boxed("\\boxed{\\frac{1}{2}}").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(
            extract_last_boxed("\\boxed{ {a}{b} } x").as_deref(),
            Some("{a}{b}")
        );
        assert_eq!(
            extract_last_boxed("\\boxed{\\boxed{3}}").as_deref(),
            Some("3")
        );
        // an unclosed last box falls back to the previous closed one
        assert_eq!(
            extract_last_boxed("\\boxed{1} \\boxed{2").as_deref(),
            Some("1")
        );
        assert_eq!(extract_last_boxed("\\boxed{2"), None);
        assert_eq!(extract_last_boxed("no box"), None);
        assert_eq!(extract_last_boxed("\\boxed{}").as_deref(), Some(""));
        assert_eq!(
            extract_all_boxed("\\boxed{1} \\boxed{a{b}} \\boxed{"),
            vec!["1", "a{b}"]
        );
    }

    #[test]
    fn extract_answer_by_kind() {
        let r = "<think>t</think><answer>A</answer> \\boxed{B}";
        assert_eq!(
            extract_answer(FormatKind::ThinkAnswer, r).as_deref(),
            Some("A")
        );
        assert_eq!(
            extract_answer(FormatKind::ThinkBoxed, r).as_deref(),
            Some("B")
        );
        assert_eq!(extract_answer(FormatKind::None, r).as_deref(), Some("B"));
        assert_eq!(
            extract_answer(FormatKind::None, "<answer> C </answer>").as_deref(),
            Some("C")
        );
        assert_eq!(
            extract_answer(FormatKind::None, "  plain  ").as_deref(),
            Some("plain")
        );
        assert_eq!(extract_answer(FormatKind::ThinkAnswer, "plain"), None);
        assert_eq!(extract_answer(FormatKind::ThinkBoxed, "plain"), None);
    }
}
