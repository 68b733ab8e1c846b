//! Scoring of benchmark responses under infimed's own rules (`--rules infimed`, the default);
//! `--rules medevalkit` is [`super::kit`]. Every rule below has a test in this file and an
//! example in the README.
//!
//! 1. **Committed text** ([`committed_span`]): the content of the last brace-matched `\boxed{}`,
//!    else of the first `<answer>...</answer>`, else the whole response (stripped).
//! 2. **Answer marker** ([`after_answer_marker`]): in the committed text, the text after the LAST
//!    "answer is", "answer:", "final answer", "answer would be", "answer should be" (any case;
//!    markdown such as `**Answer**:` accepted; Chinese `答案是`, `答案:`), up to the end of that
//!    line, without leading `:`, `*`, quotes and whitespace. It is used when it gives an answer of
//!    the question's kind (a letter, a yes/no word, a non-empty text).
//! 3. **Normalisation** ([`normalize_text`]), the same for gold and reply, open and closed:
//!    lowercase; every character that is neither a letter nor a digit becomes a space, except `.`
//!    `,` `/` `:` between two digits (so "2.5" stays "2.5", "1:2" stays "1:2"), `-` starting a
//!    number ("-3") and `%`; runs of spaces become one, ends are trimmed. "**CT**." -> "ct";
//!    "2.5 cm" -> "2.5 cm", which is not "25 cm".
//! 4. Per question:
//!    * **yes/no** (answer_type `yes_no`, or any question whose normalised gold is `yes` or `no`,
//!      e.g. SLAKE's closed "Yes"/"No"): [`extract_yes_no`]: the first word after an answer
//!      marker when it is yes/no; else a leading `yes`/`no` that stands alone (followed by
//!      punctuation, a line end or the end: "No, it does not." is no, "No obvious mass" and "yes
//!      and no" are not); else exactly one of the whole words `yes`, `no` ("normal", "not" and
//!      "nodule" are not "no").
//!    * **mcq**: [`extract_mcq`]: in the committed text, the letter after an answer marker; else
//!      a leading letter ("B", "(B)", "B.", "B. text", "B\n\nExplanation: A is wrong ...": the
//!      letter the reply starts with wins over letters in its explanation; "A patient ..." and
//!      "B cells ..." are words, "A is correct" is a letter); else the whole text is one option's
//!      text; else the one distinct explicit choice ("(C)", "C." at a line start, "option C") of
//!      the first paragraph, else of the whole text; else the one option whose text occurs (whole
//!      words); else the one distinct standalone capital option letter. Several candidates at a
//!      step: no answer (wrong), never a guess.
//!    * **closed / open**: the committed text (box or tag content; else the text after an answer
//!      marker; else the whole response), normalised, equals the normalised gold. Open questions
//!      also get token-set precision, recall and F1 on the normalised texts (a metric, it does not
//!      decide `correct`).
//! 5. A record with no response counts as wrong (`missing`) and stays in the denominator.

use std::collections::HashSet;
use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

use super::{canonical_benchmark, norm_words, AnswerType, BenchRecord};
use crate::rewards;

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
    /// The committed text (infimed rules) or the text MedEvalKit's judge starts from.
    pub span: Option<String>,
    /// What was compared with the ground truth: the letter (mcq), `yes`/`no` (null when none was
    /// found), the normalised text (closed / open); under `--rules medevalkit` the text MedEvalKit
    /// compares (`split_response`, the processed response, MMMU's parsed letter).
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
    /// `--rules medevalkit`: MedEvalKit's bucket, `open` or `close` (VQA-RAD, SLAKE, PathVQA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// `--rules medevalkit`: the option (letter) MedEvalKit's string-similarity fallback picked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity_pick: Option<String>,
    /// `--rules medevalkit`: MedEvalKit would pick a letter at random (MMMU, no letter found);
    /// scored wrong here.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub random_guess: bool,
    /// `--rules medevalkit`: what MedEvalKit raises on this record (its run of the benchmark
    /// stops); scored wrong here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash: Option<String>,
    /// `--rules medevalkit`: the number of options (a random guess's expected credit is 1 / this).
    #[serde(skip)]
    pub options: usize,
    /// The LLM judge's verdict, where it was asked (`--judge`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge: Option<bool>,
    /// The judge prompt this record would be sent with (`--judge`), if it is judged.
    #[serde(skip)]
    pub judge_prompt: Option<String>,
    /// Breakdown groups of this record: (dimension, value), e.g. ("lang", "zh"),
    /// ("question_type", "Reasoning").
    #[serde(skip)]
    pub groups: Vec<(String, String)>,
}

impl ScoredRecord {
    /// A record scored as wrong, with nothing extracted yet.
    pub(crate) fn new(record: &BenchRecord, response: Option<&str>) -> ScoredRecord {
        ScoredRecord {
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
            bucket: None,
            similarity_pick: None,
            random_guess: false,
            crash: None,
            options: 0,
            judge: None,
            judge_prompt: None,
            groups: breakdown_groups(record),
        }
    }
}

/// The meta fields reported as breakdowns (MedEvalKit's question type, modality and task
/// breakdowns, MMMU's subjects).
pub const BREAKDOWN_META: [&str; 4] = ["question_type", "modality_type", "medical_task", "subject"];

/// A record's breakdown groups: its language (`lang`, en when absent) and each of
/// [`BREAKDOWN_META`] that its `meta` has as a string.
pub fn breakdown_groups(record: &BenchRecord) -> Vec<(String, String)> {
    let mut g = vec![("lang".to_string(), record.lang().to_string())];
    for k in BREAKDOWN_META {
        if let Some(v) = record.meta_str(k) {
            g.push((k.to_string(), v.to_string()));
        }
    }
    g
}

/// The committed text: the last brace-matched `\boxed{}` content, else the first `<answer>`
/// content, else the whole response; stripped. The flag says whether a box or tag was found.
pub fn committed_span(response: &str) -> (String, bool) {
    match rewards::extract_last_boxed(response).or_else(|| rewards::extract_answer_tag(response)) {
        Some(s) => (s, true),
        None => (response.trim().to_string(), false),
    }
}

static MARKER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(?:(?:final\s+)?answer(?:\*{1,2})?\s*(?:(?:is|would be|should be)\b|[:：])|final answer\b|答案\s*[是:：])",
    )
    .expect("valid regex")
});

/// The text after the last answer marker, to the end of its line, without leading `:`, `*`,
/// quotes and whitespace (`None` when there is no marker).
pub fn after_answer_marker(text: &str) -> Option<&str> {
    let m = MARKER.find_iter(text).last()?;
    let rest = &text[m.end()..];
    let line = rest.split('\n').next().unwrap_or("");
    Some(line.trim_matches(|c: char| {
        c.is_whitespace() || matches!(c, ':' | '：' | '*' | '"' | '\'' | '`')
    }))
}

/// The normalisation applied to gold and reply alike (see the module docs, rule 3).
pub fn normalize_text(s: &str) -> String {
    let c: Vec<char> = s.to_lowercase().chars().collect();
    let digit = |i: Option<usize>| i.and_then(|i| c.get(i)).is_some_and(|c| c.is_numeric());
    let mut out = String::with_capacity(s.len());
    for (i, &ch) in c.iter().enumerate() {
        let keep = ch.is_alphanumeric()
            || ch == '%'
            || (matches!(ch, '.' | ',' | '/' | ':')
                && digit(i.checked_sub(1))
                && digit(Some(i + 1)))
            || (ch == '-'
                && digit(Some(i + 1))
                && i.checked_sub(1).is_none_or(|p| !c[p].is_alphanumeric()));
        out.push(if keep { ch } else { ' ' });
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

static LEADING_YES_NO: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)^[\s*_"'`#>]*(yes|no)[*_"'`]*\s*(?:[,.;:!。，；：！]|\n|$)"#)
        .expect("valid regex")
});

/// The yes/no answer of a response (module docs, rule 4): `Some("yes")`, `Some("no")` or `None`.
pub fn extract_yes_no(response: &str) -> Option<&'static str> {
    let (span, _) = committed_span(response);
    let word = |w: &str| match w {
        "yes" => Some("yes"),
        "no" => Some("no"),
        _ => None,
    };
    if let Some(m) = after_answer_marker(&span) {
        if let Some(w) = normalize_text(m).split(' ').next().and_then(word) {
            return Some(w);
        }
    }
    if let Some(c) = LEADING_YES_NO.captures(&span) {
        return word(&c[1].to_lowercase());
    }
    let n = normalize_text(&span);
    let words: HashSet<&str> = n.split(' ').collect();
    match (words.contains("yes"), words.contains("no")) {
        (true, false) => Some("yes"),
        (false, true) => Some("no"),
        _ => None,
    }
}

/// A letter at the very start of `text` (after markup and "option"/"choice"): `B`, `(B)`, `[B]`,
/// `B.`, `B)`, `B:`, `B,`, `B. text`, `B\n...`; `A is ...` counts, `A patient` / `B cells` do not
/// (an upper-case letter followed by a lower-case word other than "is"); a lower-case letter
/// counts only when it is the whole text (`b`, `(b)`, `b.`). Only letters in `letters` count.
pub fn leading_letter(text: &str, letters: &[char]) -> Option<char> {
    static PREFIX: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r#"^[\s*_"'`#>]*(?:(?i:option|choice)\s*[:#]?\s*)?"#).expect("valid regex")
    });
    let t = &text[PREFIX.find(text).map_or(0, |m| m.end())..];
    let c: Vec<char> = t.chars().collect();
    let rest_is_empty = |from: usize| {
        c[from.min(c.len())..]
            .iter()
            .all(|ch| ch.is_whitespace() || matches!(ch, '.' | '*' | '_' | '"' | '\'' | '`' | ':'))
    };
    let (letter, after) = match c.as_slice() {
        ['(' | '[', l, ')' | ']', ..] if l.is_ascii_alphabetic() => {
            if l.is_ascii_lowercase() && !rest_is_empty(3) {
                return None;
            }
            (l.to_ascii_uppercase(), 3)
        }
        [l, ..] if l.is_ascii_uppercase() => (*l, 1),
        [l, ..] if l.is_ascii_lowercase() && rest_is_empty(1) => (l.to_ascii_uppercase(), 1),
        _ => return None,
    };
    let ok = match c.get(after).copied() {
        None => true,
        Some(n) if n.is_whitespace() => {
            let word: String = c[after..]
                .iter()
                .skip_while(|ch| ch.is_whitespace())
                .take_while(|ch| ch.is_alphabetic())
                .collect();
            !word.starts_with(|w: char| w.is_lowercase()) || word == "is"
        }
        Some(n) => matches!(
            n,
            '.' | ')' | ']' | ':' | ',' | ';' | '*' | '_' | '!' | '"' | '\''
        ),
    };
    (ok && letters.contains(&letter)).then_some(letter)
}

static EXPLICIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?m)(?:(?:^|[^\p{L}\p{N}])\(([A-Z])\)|^[\s*_#>\-]*([A-Z])[.):](?:\s|$)|(?i:\b(?:option|choice))\s*[:#]?\s*\(?([A-Za-z])\b)",
    )
    .expect("valid regex")
});

/// The distinct explicit choices of `text` in `letters`: `(C)`, `C.`/`C)`/`C:` at a line start,
/// "option C" / "choice C".
fn explicit_choices(text: &str, letters: &[char]) -> Vec<char> {
    let mut out: Vec<char> = Vec::new();
    for c in EXPLICIT.captures_iter(text) {
        let l = c
            .iter()
            .skip(1)
            .flatten()
            .next()
            .and_then(|m| m.as_str().chars().next())
            .map(|l| l.to_ascii_uppercase());
        if let Some(l) = l.filter(|l| letters.contains(l) && !out.contains(l)) {
            out.push(l);
        }
    }
    out
}

/// The distinct standalone capital letters of `text` in `letters` (not touching a letter, digit,
/// `-`, `'`, `\` or `_`, not an abbreviation such as "U.S.", and not the article "A" / pronoun "I"
/// followed by a lower-case word other than "is").
fn standalone_letters(text: &str, letters: &[char]) -> Vec<char> {
    let c: Vec<char> = text.chars().collect();
    let touching =
        |ch: char| ch.is_alphanumeric() || matches!(ch, '-' | '\'' | '\u{2019}' | '\\' | '_');
    let mut out = Vec::new();
    for i in 0..c.len() {
        let l = c[i];
        if !l.is_ascii_uppercase() || !letters.contains(&l) || out.contains(&l) {
            continue;
        }
        let prev = i.checked_sub(1).map(|p| c[p]);
        let next = c.get(i + 1).copied();
        if prev.is_some_and(|p| touching(p) || p == '.')
            || next.is_some_and(touching)
            || (next == Some('.') && c.get(i + 2).is_some_and(|n| n.is_alphanumeric()))
        {
            continue;
        }
        if matches!(l, 'A' | 'I') && next.is_some_and(char::is_whitespace) {
            let word: String = c[i + 1..]
                .iter()
                .skip_while(|ch| ch.is_whitespace())
                .take_while(|ch| ch.is_alphabetic())
                .collect();
            if word.starts_with(|w: char| w.is_lowercase()) && word != "is" {
                continue;
            }
        }
        out.push(l);
    }
    out
}

fn only<T: Copy>(v: &[T]) -> Option<T> {
    match v {
        [x] => Some(*x),
        _ => None,
    }
}

/// The option whose text is the whole of `text` (case and punctuation ignored).
fn exact_option(text: &str, options: &[(char, &str)]) -> Option<char> {
    let n = norm_words(text);
    if n.is_empty() {
        return None;
    }
    let hits: Vec<char> = options
        .iter()
        .filter(|(_, t)| norm_words(t) == n)
        .map(|(l, _)| *l)
        .collect();
    only(&hits)
}

/// The options whose text occurs in `text` as whole words (case and punctuation ignored).
fn contained_options(text: &str, options: &[(char, &str)]) -> Vec<char> {
    let hay = format!(" {} ", norm_words(text));
    options
        .iter()
        .filter(|(_, t)| {
            let n = norm_words(t);
            !n.is_empty() && hay.contains(&format!(" {n} "))
        })
        .map(|(l, _)| *l)
        .collect()
}

/// The option letter a response commits to (module docs, rule 4, mcq).
pub fn extract_mcq(response: &str, options: &[(char, &str)]) -> Option<char> {
    let (span, _) = committed_span(response);
    let letters: Vec<char> = options.iter().map(|(l, _)| *l).collect();
    if let Some(m) = after_answer_marker(&span) {
        if let Some(l) = leading_letter(m, &letters).or_else(|| exact_option(m, options)) {
            return Some(l);
        }
    }
    if let Some(l) = leading_letter(&span, &letters).or_else(|| exact_option(&span, options)) {
        return Some(l);
    }
    let first_paragraph = span.split("\n\n").next().unwrap_or("");
    let explicit = explicit_choices(&span, &letters);
    if !explicit.is_empty() {
        return only(&explicit).or_else(|| only(&explicit_choices(first_paragraph, &letters)));
    }
    let texts = contained_options(&span, options);
    if !texts.is_empty() {
        return only(&texts);
    }
    only(&standalone_letters(&span, &letters))
}

/// Token-set precision, recall and F1 of two normalised texts (whitespace tokens as sets); all 0
/// when either side has no token or nothing overlaps.
pub fn token_prf(prediction: &str, reference: &str) -> (f64, f64, f64) {
    let p: HashSet<&str> = prediction.split_whitespace().collect();
    let r: HashSet<&str> = reference.split_whitespace().collect();
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

/// Whether a gold answer is `yes` or `no` after normalisation.
pub fn is_yes_no(gold: &str) -> bool {
    matches!(normalize_text(gold).as_str(), "yes" | "no")
}

/// The text a closed / open reply is compared on: box or tag content, else the text after an
/// answer marker (when not empty), else the whole response.
fn free_text(response: &str) -> String {
    let (span, boxed) = committed_span(response);
    if boxed {
        return span;
    }
    match after_answer_marker(&span).filter(|m| !normalize_text(m).is_empty()) {
        Some(m) => m.to_string(),
        None => span,
    }
}

/// Score one response against one benchmark record (infimed rules).
pub fn score_record(record: &BenchRecord, response: Option<&str>) -> ScoredRecord {
    let mut out = ScoredRecord::new(record, response);
    let yes_no = record.answer_type == AnswerType::YesNo
        || (record.answer_type != AnswerType::Mcq && is_yes_no(&record.answer));
    let Some(response) = response else {
        if record.answer_type == AnswerType::Open && !yes_no {
            (out.precision, out.recall, out.f1) = (Some(0.0), Some(0.0), Some(0.0));
        }
        return out;
    };
    out.span = Some(committed_span(response).0);
    if yes_no {
        let pred = extract_yes_no(response);
        out.correct = pred.is_some_and(|p| p == normalize_text(&record.answer));
        out.extracted = pred.map(str::to_string);
    } else if record.answer_type == AnswerType::Mcq {
        let pred = extract_mcq(response, &record.option_pairs());
        out.correct = pred.is_some_and(|p| p.to_string() == record.answer);
        out.extracted = pred.map(|c| c.to_string());
    } else {
        let pred = normalize_text(&free_text(response));
        let gold = normalize_text(&record.answer);
        out.correct = !pred.is_empty() && pred == gold;
        if record.answer_type == AnswerType::Open {
            let (p, r, f) = token_prf(&pred, &gold);
            (out.precision, out.recall, out.f1) = (Some(p), Some(r), Some(f));
        }
        out.extracted = Some(pred);
    }
    out
}

/// The judge prompt of a record under infimed rules: closed and open questions whose gold is not
/// yes/no are judged; the judge sees the question, the gold as written and the committed text
/// (box or tag content, else the whole response).
pub fn judge_prompt(record: &BenchRecord, response: Option<&str>) -> Option<String> {
    let free = matches!(record.answer_type, AnswerType::Closed | AnswerType::Open);
    if !free || is_yes_no(&record.answer) {
        return None;
    }
    let (span, _) = committed_span(response?);
    Some(super::medevalkit::compare_prompt(
        &record.question,
        &span,
        &record.answer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::report::score_responses;
    use crate::eval::Rules;
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

    fn letter(resp: &str) -> Option<char> {
        let r = mcq();
        extract_mcq(resp, &r.option_pairs())
    }

    #[test]
    fn committed_text_box_then_tag_then_whole() {
        assert_eq!(
            committed_span(" a \\boxed{x} \\boxed{y} "),
            ("y".into(), true)
        );
        assert_eq!(committed_span("<answer> z </answer>"), ("z".into(), true));
        assert_eq!(committed_span("  plain \n"), ("plain".into(), false));
    }

    #[test]
    fn answer_markers_last_one_to_end_of_line() {
        assert_eq!(after_answer_marker("The answer is (C)."), Some("(C)."));
        assert_eq!(after_answer_marker("**Answer**: B\nbecause"), Some("B"));
        assert_eq!(
            after_answer_marker("answer is B. Final answer: C"),
            Some("C")
        );
        assert_eq!(
            after_answer_marker("I think B. The final answer is C."),
            Some("C.")
        );
        assert_eq!(
            after_answer_marker("The final answer is 2.5 cm"),
            Some("2.5 cm")
        );
        assert_eq!(after_answer_marker("答案：肺"), Some("肺"));
        assert_eq!(after_answer_marker("I answered quickly"), None);
    }

    #[test]
    fn normalisation_keeps_numbers() {
        assert_eq!(normalize_text("**CT**."), "ct");
        assert_eq!(normalize_text(" Left\nLung. "), "left lung");
        assert_eq!(normalize_text("2.5 cm"), "2.5 cm");
        assert_ne!(normalize_text("2.5 cm"), normalize_text("25 cm"));
        assert_eq!(
            normalize_text("1,000 mL; 1:2; 3/4; 50%."),
            "1,000 ml 1:2 3/4 50%"
        );
        assert_eq!(normalize_text("-3 and T2-weighted"), "-3 and t2 weighted");
        assert_eq!(normalize_text("肝脏。"), "肝脏");
    }

    #[test]
    fn mcq_box_and_tag_win() {
        let r = mcq();
        assert!(ok(
            &r,
            "<think>(A) fits the consolidation, the answer is A... no.</think> \\boxed{C}"
        ));
        assert!(!ok(&r, "The answer is C. \\boxed{B}"));
        assert!(ok(&r, "<answer>C</answer>"));
        assert!(ok(&r, "\\boxed{C. Vitamin A deficiency}"));
    }

    #[test]
    fn mcq_answer_marker_last_one() {
        assert_eq!(letter("The answer is (C)."), Some('C'));
        assert_eq!(
            letter("(A) is tempting, but on reflection the answer is (C)."),
            Some('C')
        );
        assert_eq!(
            letter("The answer is (C). Wait, re-evaluating: the answer is (B)."),
            Some('B')
        );
        assert_eq!(letter("Answer: c"), Some('C'));
        // a marker without a letter falls through to the other rules
        assert_eq!(
            letter("C\n\nThe answer is consistent with malabsorption."),
            Some('C')
        );
    }

    #[test]
    fn mcq_leading_letter_wins_over_explanation() {
        assert_eq!(
            letter("A\n\nExplanation: B is incorrect because ..."),
            Some('A')
        );
        assert_eq!(letter("B. Pleural effusion. (A) is incorrect."), Some('B'));
        assert_eq!(
            letter("(D) Normal; (A) would show consolidation"),
            Some('D')
        );
        assert_eq!(letter("**C**"), Some('C'));
        assert_eq!(letter("c"), Some('C'));
        assert_eq!(letter("A is correct"), Some('A'));
        assert_eq!(letter("Option B: pleural effusion"), Some('B'));
        // words, not letters
        assert_eq!(letter("A patient with night blindness"), None);
        assert_eq!(
            leading_letter("B cells are not involved", &['A', 'B']),
            None
        );
    }

    #[test]
    fn mcq_option_text() {
        let r = mcq();
        // "Vitamin A deficiency" contains a standalone "A": the exact option text wins
        assert!(ok(&r, "Vitamin A deficiency"));
        assert!(ok(&r, "\\boxed{vitamin a deficiency.}"));
        assert!(ok(&r, "It is most likely a vitamin a deficiency"));
        assert_eq!(letter("pleural effusion"), Some('B'));
        // two option texts: no answer
        assert_eq!(letter("pneumonia or pleural effusion"), None);
    }

    #[test]
    fn mcq_explicit_choices_must_be_unique() {
        assert_eq!(
            letter("Considering the findings, option D fits."),
            Some('D')
        );
        assert_eq!(
            letter("It's (C).\n\n(A) and (B) are less likely."),
            Some('C')
        );
        assert_eq!(letter("Either (A) or (B)."), None);
        assert_eq!(letter("I'd go with C"), Some('C'));
        assert_eq!(letter("I am not sure"), None);
        assert_eq!(letter(""), None);
    }

    #[test]
    fn yes_no_rules() {
        let no = typed("yes_no", "no");
        assert!(ok(&no, "No"));
        assert!(ok(&no, "no."));
        assert!(ok(&no, "**No**"));
        assert!(ok(&no, "\\boxed{No}"));
        assert!(ok(
            &no,
            "No, there is no effusion; yes, the heart is normal."
        ));
        assert!(!ok(&no, "normal"));
        assert!(!ok(&no, "The findings are normal"));
        assert!(!ok(&no, "not present"));
        assert!(!ok(&no, "yes and no"));
        assert!(!ok(&no, ""));
        let yes = typed("yes_no", "yes");
        assert!(ok(&yes, "Yes, there is an effusion."));
        assert!(ok(&yes, "Yes, there is no effusion."));
        assert!(ok(&yes, "There is evidence of necrosis, so yes."));
        assert!(!ok(&yes, "Yesterday"));
        assert!(!ok(&yes, "No"));
        // the answer marker decides; a leading "No" that is a determiner is not an answer
        assert!(ok(
            &yes,
            "No obvious mass at first, but the final answer: yes"
        ));
        assert!(ok(&yes, "The answer is yes because the mass is visible."));
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
        assert!(ok(&c, "**Left lung**"));
        assert!(ok(&c, "\\boxed{Left lung}"));
        assert!(!ok(&c, "the left lung"));
        assert!(!ok(&c, "lung"));
        // a closed question with a yes/no gold is a yes/no question
        let cy = typed("closed", "No");
        assert!(ok(&cy, "No, it does not."));
        assert!(!ok(&cy, "normal"));
    }

    #[test]
    fn decimals_keep_their_meaning() {
        let c = typed("closed", "2.5 cm");
        assert!(ok(&c, "2.5 cm."));
        assert!(ok(&c, "The answer is 2.5 cm"));
        assert!(!ok(&c, "25 cm"));
        let o = typed("open", "0.5 mg");
        assert!(ok(&o, "0.5 mg."));
        assert!(!ok(&o, "5 mg"));
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
        let s = score_record(&o, Some("**CT**"));
        assert_eq!((s.correct, s.f1), (false, Some(0.0)));
        let s = score_record(&o, None);
        assert_eq!((s.correct, s.missing, s.f1), (false, true, Some(0.0)));
        assert!(ok(&typed("open", "CT"), "**CT**"));
    }

    #[test]
    fn judged_records_are_free_text_only() {
        let o = typed("open", "fibrosis");
        let p = judge_prompt(&o, Some("\\boxed{Fibrosis}")).unwrap();
        assert!(p.contains("The standard answer: fibrosis\n\nThe user's answer: Fibrosis\n"));
        assert_eq!(judge_prompt(&o, None), None);
        assert_eq!(judge_prompt(&typed("closed", "Yes"), Some("yes")), None);
        assert_eq!(judge_prompt(&mcq(), Some("C")), None);
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
        let rep = score_responses(&recs, &resp, Rules::Infimed);
        assert_eq!(rep.missing_responses, 1);
        assert_eq!(rep.unmatched_responses, vec!["zzz".to_string()]);
        assert_eq!(rep.benchmarks.len(), 2);
        assert_eq!(rep.benchmarks[0].name, "VQA-RAD");
        assert_eq!((rep.benchmarks[0].n, rep.benchmarks[0].correct), (1, 0));
        assert_eq!(rep.benchmarks[1].accuracy, 100.0);
        assert_eq!(rep.average, Some(50.0));
    }
}
