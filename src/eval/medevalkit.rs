//! MedEvalKit's answer extraction and judges, reproduced exactly (`infimed eval --rules
//! medevalkit`), bugs included.
//!
//! Reference: `alibaba-damo-academy/MedEvalKit` at commit
//! [`MEDEVALKIT_COMMIT`] (`utils/utils.py`, `utils/<BENCH>/<BENCH>.py`, `utils/MMMU/eval_utils.py`
//! and `eval_val.py`) and mathruler's `extract_boxed_content` (`hiyouga/MathRuler`,
//! `mathruler/grader.py`). Every function here is a transcription of the Python function of the
//! same name; Python's string semantics are kept (`str.strip()`/`str.split()` whitespace includes
//! `\x1c`-`\x1f`; `"a" in s` is a substring test; `s.split(p)[-1]` is the text after the last
//! `p`). `tests/fixtures/medevalkit/make_reference.py` runs MedEvalKit's own code on a committed
//! reply set, and `tests/eval_medevalkit.rs` checks that these functions agree on every reply.
//!
//! What is not reproduced, on purpose:
//! * MMMU's `random.choice` when no letter is found: the reply is scored wrong and counted as a
//!   random guess ([`mmmu_parse_multi_choice`] returns `None`); its expected credit under
//!   MedEvalKit is `1 / options`.
//! * A reply on which MedEvalKit raises (an open answer that is empty, blank or only periods after
//!   `parse_response`: `rouge` raises "Hypothesis is empty." and `calculate_f1` returns an int
//!   that cannot be unpacked) stops MedEvalKit's whole benchmark; here it is scored wrong and
//!   counted as a crash ([`judge_open_end_vqa`] returns `Err`).
//! * BLEU and ROUGE means (reported by MedEvalKit beside open accuracy, never part of it) are not
//!   computed.

use std::collections::HashMap;

/// The MedEvalKit commit whose scoring is reproduced.
pub const MEDEVALKIT_COMMIT: &str = "9b12e3b34232a8779cc1275417bf4f72f03d28e0";

/// Python's `str.isspace()` for one character (`str.strip()` / `str.split()` whitespace): Rust's
/// `char::is_whitespace` plus the separators `\x1c`-`\x1f`.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `s.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `s.split()` (runs of whitespace, no empty pieces).
pub fn py_split_ws(s: &str) -> Vec<&str> {
    s.split(py_isspace).filter(|w| !w.is_empty()).collect()
}

/// Python's `s.split(sep)[-1]`: the text after the last `sep` (all of `s` when absent).
fn after_last<'a>(s: &'a str, sep: &str) -> &'a str {
    s.rfind(sep).map_or(s, |i| &s[i + sep.len()..])
}

/// Python's `s.split(sep)[0]`.
fn before_first<'a>(s: &'a str, sep: &str) -> &'a str {
    s.find(sep).map_or(s, |i| &s[..i])
}

/// mathruler's `extract_boxed_content`: the content of the LAST `\boxed{` when its braces close
/// (stripped), else the string `"None"` (an unclosed last box gives `"None"` even when an earlier
/// box is closed).
pub fn extract_boxed_content(text: &str) -> String {
    const OPEN: &str = "\\boxed{";
    let Some(start) = text.rfind(OPEN) else {
        return "None".to_string();
    };
    let content = &text[start + OPEN.len()..];
    let mut depth = 0i64;
    for (i, c) in content.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth == -1 {
            return py_strip(&content[..i]).to_string();
        }
    }
    "None".to_string()
}

/// `get_content_between_a_b`: every `start..end` content, each followed by a space, then stripped.
fn content_between(start: &str, end: &str, text: &str) -> String {
    let mut out = String::new();
    let mut from = text.find(start);
    while let Some(s) = from {
        let body = s + start.len();
        match text[body..].find(end) {
            Some(e) => {
                out.push_str(&text[body..body + e]);
                out.push(' ');
                let next = body + e + end.len();
                from = text[next..].find(start).map(|k| next + k);
            }
            None => break,
        }
    }
    py_strip(&out).to_string()
}

/// `extract(text, tag)` (hard): the `<tag>...</tag>` contents joined by a space and stripped; the
/// whole text when there is none; `""` for an empty text.
pub fn extract(text: &str, tag: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    let t = content_between(&format!("<{tag}>"), &format!("</{tag}>"), text);
    if t.is_empty() {
        text.to_string()
    } else {
        t
    }
}

/// `parse_response`'s answer patterns, in its order.
const ANSWER_PATTERNS: [&str; 9] = [
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

/// `parse_response`: lowercase; the last box when the word "boxed" occurs anywhere (`"None"` when
/// that box is unclosed), elif `<answer>` occurs the tag contents; then for each pattern in order
/// the text after its last occurrence. Not stripped.
pub fn parse_response(response: &str) -> String {
    let mut r = response.to_lowercase();
    if r.contains("boxed") {
        r = extract_boxed_content(&r);
    } else if r.contains("<answer>") {
        r = extract(&r, "answer");
    }
    for p in ANSWER_PATTERNS {
        if r.contains(p) {
            r = after_last(&r, p).to_string();
        }
    }
    r
}

/// difflib's `SequenceMatcher(None, a, b).ratio()` (with its default `autojunk`: when `b` has at
/// least 200 items, items occurring more than `len(b) // 100 + 1` times are not used to start a
/// match).
pub fn str_similarity(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let total = a.len() + b.len();
    if total == 0 {
        return 1.0;
    }
    let mut b2j: HashMap<char, Vec<usize>> = HashMap::new();
    for (j, &c) in b.iter().enumerate() {
        b2j.entry(c).or_default().push(j);
    }
    if b.len() >= 200 {
        let ntest = b.len() / 100 + 1;
        b2j.retain(|_, idx| idx.len() <= ntest);
    }
    let mut matches = 0usize;
    let mut queue = vec![(0usize, a.len(), 0usize, b.len())];
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let (i, j, k) = find_longest_match(&a, &b, &b2j, (alo, ahi, blo, bhi));
        if k > 0 {
            matches += k;
            if alo < i && blo < j {
                queue.push((alo, i, blo, j));
            }
            if i + k < ahi && j + k < bhi {
                queue.push((i + k, ahi, j + k, bhi));
            }
        }
    }
    2.0 * matches as f64 / total as f64
}

/// difflib's `find_longest_match` without junk (popular items only lack a `b2j` entry, so the
/// extension loops may still cross them, as in difflib).
fn find_longest_match(
    a: &[char],
    b: &[char],
    b2j: &HashMap<char, Vec<usize>>,
    (alo, ahi, blo, bhi): (usize, usize, usize, usize),
) -> (usize, usize, usize) {
    let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
    let mut j2len: HashMap<usize, usize> = HashMap::new();
    for (i, c) in a.iter().enumerate().take(ahi).skip(alo) {
        let mut new: HashMap<usize, usize> = HashMap::new();
        for &j in b2j.get(c).map(Vec::as_slice).unwrap_or(&[]) {
            if j < blo {
                continue;
            }
            if j >= bhi {
                break;
            }
            let k = j
                .checked_sub(1)
                .and_then(|p| j2len.get(&p))
                .copied()
                .unwrap_or(0)
                + 1;
            new.insert(j, k);
            if k > bestsize {
                (besti, bestj, bestsize) = (i + 1 - k, j + 1 - k, k);
            }
        }
        j2len = new;
    }
    while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
        (besti, bestj, bestsize) = (besti - 1, bestj - 1, bestsize + 1);
    }
    while besti + bestsize < ahi
        && bestj + bestsize < bhi
        && a[besti + bestsize] == b[bestj + bestsize]
    {
        bestsize += 1;
    }
    (besti, bestj, bestsize)
}

/// `find_most_similar_index`: the first choice with the strictly highest ratio (0 when every ratio
/// is 0).
pub fn find_most_similar_index(choices: &[String], target: &str) -> usize {
    let mut best = (0usize, 0.0f64);
    for (i, c) in choices.iter().enumerate() {
        let s = str_similarity(c, target);
        if s > best.1 {
            best = (i, s);
        }
    }
    best.0
}

/// The outcome of [`judge_multi_choice`].
#[derive(Debug, Clone, PartialEq)]
pub struct MultiChoice {
    pub correct: bool,
    /// What was compared: `split_response` (the text before the first `.`, after the last `:`).
    pub split_response: String,
    /// The choice picked by string similarity (`Some(index)`) when neither a letter nor a choice
    /// text was found: MedEvalKit's deterministic fallback, never "unparsed".
    pub similarity_pick: Option<usize>,
}

/// `judge_multi_choice(choices, answer, response)`; `choices` as MedEvalKit builds them (e.g.
/// `"A. text"`, or PMC-VQA's raw CSV cells), `answer` the gold (a letter, or OmniMedVQA's option
/// text when no option equals it).
pub fn judge_multi_choice(choices: &[String], answer: &str, response: &str) -> MultiChoice {
    let alphas: Vec<String> = (0..choices.len())
        .map(|i| char::from_u32('a' as u32 + i as u32).map_or_else(String::new, String::from))
        .collect();
    let is_alpha = |s: &str| alphas.iter().any(|a| a == s);
    let mut response = response.to_lowercase();
    let first = before_first(&response, "\n\n").to_string();
    let last = before_first(after_last(&response, "\n\n"), ".").to_string();
    if is_alpha(&first) {
        response = first;
    } else if is_alpha(&last) {
        response = last;
    }
    let response = parse_response(&response);
    let choices: Vec<String> = choices.iter().map(|c| c.to_lowercase()).collect();
    let response = py_strip(&response).to_lowercase().replace('\n', "");
    let split_response = after_last(before_first(&response, "."), ":").to_string();
    let answer = py_strip(answer).to_lowercase();
    let index_of = |s: &str| alphas.iter().position(|a| a == s);
    let mut similarity_pick = None;
    let correct = if split_response == answer {
        true
    } else if let Some(i) = index_of(&split_response) {
        choices[i] == answer
    } else if choices.contains(&split_response) {
        index_of(&answer).is_some_and(|i| split_response == choices[i])
    } else {
        let i = find_most_similar_index(&choices, &response);
        similarity_pick = Some(i);
        alphas.get(i).is_some_and(|a| *a == answer) || choices.get(i) == Some(&answer)
    };
    MultiChoice {
        correct,
        split_response,
        similarity_pick,
    }
}

/// `parse_response` then every `\n` and `.` removed (the comparison text of the closed judges).
fn closed_text(response: &str) -> String {
    parse_response(response).replace(['\n', '.'], "")
}

/// `judge_close_end_vqa`: exact equality of the lowercased gold and the response after
/// `parse_response` with every `\n` and `.` removed (the gold keeps its periods).
pub fn judge_close_end_vqa(answer: &str, response: &str) -> (bool, String) {
    let r = closed_text(response);
    (r == answer.to_lowercase(), r)
}

/// `judge_judgement`: substring rule: exactly one of `yes` / `no` occurs in the processed response
/// (as substrings: "normal", "not", "nodule" contain "no") and the lowercased gold occurs in it.
pub fn judge_judgement(answer: &str, response: &str) -> (bool, String) {
    let r = closed_text(response);
    let ok = (r.contains("yes") ^ r.contains("no")) && r.contains(&answer.to_lowercase());
    (ok, r)
}

/// What `judge_open_end_vqa` computes that infimed reports: exact match and `calculate_f1`'s
/// values, correctly named (MedEvalKit unpacks them as `precision, recall, f1` although the
/// function returns `(f1, precision, recall)`: its "precision" column is this `f1`, its
/// "recall" this `precision` and its "f1" this `recall`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenEnd {
    pub em: bool,
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
}

/// `judge_open_end_vqa`: `em` = the lowercased gold equals `parse_response(response)` (not
/// stripped). `Err(what MedEvalKit raises)` where it raises: the response (or gold) is empty or only
/// periods (`rouge`: "Hypothesis is empty." / "Reference is empty."), or has no token
/// (`calculate_f1` returns `0`, which cannot be unpacked).
pub fn judge_open_end_vqa(answer: &str, response: &str) -> Result<(OpenEnd, String), String> {
    let answer = answer.to_lowercase();
    let response = parse_response(response);
    let no_sentence = |s: &str| s.split('.').all(str::is_empty);
    if no_sentence(&response) {
        return Err("ValueError: Hypothesis is empty.".into());
    }
    if no_sentence(&answer) {
        return Err("ValueError: Reference is empty.".into());
    }
    let (f1, precision, recall) = calculate_f1(&response, &answer)
        .ok_or_else(|| "TypeError: cannot unpack non-iterable int object".to_string())?;
    let em = response == answer;
    Ok((
        OpenEnd {
            em,
            f1,
            precision,
            recall,
        },
        response,
    ))
}

/// `calculate_f1` on lowercased whitespace-token sets: `(f1, precision, recall)`; `None` where it
/// returns the int `0` (either side has no token).
pub fn calculate_f1(prediction: &str, ground_truth: &str) -> Option<(f64, f64, f64)> {
    let lp = prediction.to_lowercase();
    let lg = ground_truth.to_lowercase();
    let p: std::collections::HashSet<&str> = py_split_ws(&lp).into_iter().collect();
    let g: std::collections::HashSet<&str> = py_split_ws(&lg).into_iter().collect();
    if p.is_empty() || g.is_empty() {
        return None;
    }
    let common = p.intersection(&g).count() as f64;
    let precision = common / p.len() as f64;
    let recall = common / g.len() as f64;
    if precision + recall == 0.0 {
        return Some((0.0, 0.0, 0.0));
    }
    Some((
        2.0 * (precision * recall) / (precision + recall),
        precision,
        recall,
    ))
}

/// The pre-step of VQA-RAD, SLAKE and PathVQA's `cal_metrics`: the last box when
/// `extract_boxed_content` finds one, elif `<answer>` occurs the tag contents, else the response.
pub fn box_then_tag(response: &str) -> String {
    let b = extract_boxed_content(response);
    if b != "None" {
        b
    } else if response.contains("<answer>") {
        extract(response, "answer")
    } else {
        response.to_string()
    }
}

/// MMMU's pre-step (`eval_val.run_model`): the `<answer>` contents when the tag occurs, THEN the
/// last box when one is found.
pub fn tag_then_box(response: &str) -> String {
    let mut r = if response.contains("<answer>") {
        extract(response, "answer")
    } else {
        response.to_string()
    };
    let b = extract_boxed_content(&r);
    if b != "None" {
        r = b;
    }
    r
}

/// MMMU's `parse_multi_choice_response`: `(A)` forms, else ` A ` tokens, else (replies of more
/// than 5 words) option texts; several candidates: the last by position. `None` where MMMU picks
/// `random.choice(all_choices)`.
pub fn mmmu_parse_multi_choice(response: &str, index2ans: &[(char, String)]) -> Option<char> {
    let mut r = if response.contains("<answer>") {
        extract(response, "answer")
    } else if response.contains("\\boxed") {
        extract_boxed_content(response)
    } else {
        response.to_string()
    };
    r = py_strip(&r).to_string();
    for ch in [',', '.', '!', '?', ';', ':', '\''] {
        r = r.trim_matches(ch).to_string();
    }
    let r = format!(" {r} ");
    let mut candidates: Vec<char> = Vec::new();
    let mut brackets = false;
    let mut index_ans = true;
    for (c, _) in index2ans {
        if r.contains(&format!("({c})")) {
            candidates.push(*c);
            brackets = true;
        }
    }
    if candidates.is_empty() {
        for (c, _) in index2ans {
            if r.contains(&format!(" {c} ")) {
                candidates.push(*c);
            }
        }
    }
    let lower = r.to_lowercase();
    if candidates.is_empty() && py_split_ws(&r).len() > 5 {
        for (c, ans) in index2ans {
            if lower.contains(&ans.to_lowercase()) {
                candidates.push(*c);
                index_ans = false;
            }
        }
    }
    let pos = |hay: &str, needle: &str| hay.rfind(needle).map_or(-1i64, |i| i as i64);
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        _ => {
            let starts: Vec<i64> = candidates
                .iter()
                .map(|c| {
                    if !index_ans {
                        let ans = &index2ans.iter().find(|(k, _)| k == c).expect("candidate").1;
                        pos(&lower, &ans.to_lowercase())
                    } else if brackets {
                        pos(&r, &format!("({c})"))
                    } else {
                        pos(&r, &format!(" {c} "))
                    }
                })
                .collect();
            // numpy's argmax: the first maximum
            let best = starts
                .iter()
                .enumerate()
                .fold(0usize, |b, (i, s)| if *s > starts[b] { i } else { b });
            Some(candidates[best])
        }
    }
}

/// `get_compare_messages`: MedEvalKit's LLM-judge prompt (one user message), verbatim.
pub fn compare_prompt(question: &str, response: &str, answer: &str) -> String {
    format!(
        "
Your task is to determine whether the user's answer is correct based on the provided questions and standard answers (for example, if the user expresses a similar meaning to the standard answer, or another interpretation of the standard answer, it is considered correct.)

The question is: {question}

The standard answer: {answer}

The user's answer: {response}

Please strictly follow the following format for output(0 represents correct, 1 represents incorrect):
<think>{{your concise think step}}</think>
<judge>{{0/1}}</judge>

for example:
<think>The standard answer is right, and the user's answer is right frontal lobe, they express the same meaning, so it is correct.</think>
<judge>0</judge>
    "
    )
}

/// MedEvalKit's verdict: `extract(reply, "judge") == "0"` (a reply without the tag counts as its
/// whole text, so a bare `0` is correct; no reply is wrong).
pub fn judge_verdict(reply: Option<&str>) -> bool {
    reply.is_some_and(|r| extract(r, "judge") == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn boxed_like_mathruler() {
        assert_eq!(extract_boxed_content("x \\boxed{ B } y"), "B");
        assert_eq!(
            extract_boxed_content("\\boxed{\\frac{1}{2}}"),
            "\\frac{1}{2}"
        );
        assert_eq!(extract_boxed_content("\\boxed{\\boxed{3}}"), "3");
        // the last opening decides: unclosed -> "None" even after a closed box
        assert_eq!(extract_boxed_content("\\boxed{A} then \\boxed{B"), "None");
        assert_eq!(extract_boxed_content("no box"), "None");
    }

    #[test]
    fn extract_tags_joined_or_whole_text() {
        assert_eq!(
            extract("<answer> a </answer>x<answer>b</answer>", "answer"),
            "a  b"
        );
        assert_eq!(extract("plain", "answer"), "plain");
        assert_eq!(extract("<answer></answer>", "answer"), "<answer></answer>");
        assert_eq!(extract("", "answer"), "");
        assert_eq!(extract("<answer>unclosed", "answer"), "<answer>unclosed");
    }

    #[test]
    fn parse_response_patterns_not_stripped() {
        assert_eq!(parse_response("Answer: Lung"), " lung");
        assert_eq!(parse_response("The answer is B. Final answer: C"), " c");
        assert_eq!(parse_response("see \\boxed{Liver}"), "liver");
        assert_eq!(parse_response("boxed but no box"), "None");
        assert_eq!(parse_response("<answer>Yes</answer>"), "yes");
        assert_eq!(parse_response("答案:肺"), "肺");
    }

    #[test]
    fn difflib_ratio() {
        // values from Python's difflib
        assert_eq!(str_similarity("abcd", "bcde"), 0.75);
        assert_eq!(str_similarity("", ""), 1.0);
        assert_eq!(str_similarity("a. kidney", "kidney"), 0.8);
        assert_eq!(
            str_similarity("a. ct", "the scan is a ct"),
            2.0 * 4.0 / 21.0
        );
        // autojunk: in a 200-char b, ' ' (> 3 occurrences) cannot start a match
        let b = "x y ".repeat(50);
        assert_eq!(b.chars().count(), 200);
        assert_eq!(str_similarity(" ", &b), 0.0);
        assert_eq!(str_similarity(" ", "x y "), 2.0 / 5.0);
    }

    #[test]
    fn multi_choice_first_paragraph_and_fallback() {
        let c = ch(&["A. Liver", "B. Kidney", "C. Spleen", "D. Heart"]);
        let ok = |a: &str, r: &str| judge_multi_choice(&c, a, r).correct;
        assert!(ok("B", "B"));
        assert!(ok("B", "(B)"));
        assert!(ok("A", "A\n\nExplanation: B is incorrect because ..."));
        assert!(ok("B", "I choose C.\n\nFinal answer: B"));
        assert!(ok("B", "b. kidney"));
        // empty -> every ratio 0 -> option A
        let e = judge_multi_choice(&c, "A", "");
        assert!(e.correct && e.similarity_pick == Some(0));
        assert!(!ok("B", "Option B"));
    }

    #[test]
    fn judgement_is_substring_based() {
        assert!(judge_judgement("no", "The scan looks normal.").0);
        assert!(judge_judgement("no", "there is a nodule").0);
        assert!(!judge_judgement("yes", "yes, normal").0);
        assert!(!judge_judgement("no", "yes and no").0);
        assert!(judge_judgement("yes", "\\boxed{Yes}").0);
    }

    #[test]
    fn close_end_removes_periods_from_the_response_only() {
        assert!(judge_close_end_vqa("Lung", "Lung.").0);
        assert!(!judge_close_end_vqa("2.5 cm", "2.5 cm").0);
        assert!(!judge_close_end_vqa("lung", "Answer: lung").0);
    }

    #[test]
    fn open_end_em_f1_and_crashes() {
        let (o, r) = judge_open_end_vqa("Right lobe", "right lobe").unwrap();
        assert!(o.em && o.f1 == 1.0 && r == "right lobe");
        let (o, _) = judge_open_end_vqa("right lower lobe", "lower lobe").unwrap();
        assert!(!o.em);
        assert_eq!((o.precision, o.recall), (1.0, 2.0 / 3.0));
        assert_eq!(o.f1, 2.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0));
        assert!(judge_open_end_vqa("lung", "")
            .unwrap_err()
            .contains("Hypothesis"));
        assert!(judge_open_end_vqa("lung", "...")
            .unwrap_err()
            .contains("Hypothesis"));
        assert!(judge_open_end_vqa("lung", "Answer:")
            .unwrap_err()
            .contains("Hypothesis"));
        assert!(judge_open_end_vqa("lung", " ")
            .unwrap_err()
            .contains("unpack"));
        assert!(judge_open_end_vqa("lung", "\x1c")
            .unwrap_err()
            .contains("unpack"));
        assert!(judge_open_end_vqa("lung", " . ").is_ok());
        assert_eq!(calculate_f1("a b", "c d"), Some((0.0, 0.0, 0.0)));
    }

    #[test]
    fn mmmu_parser() {
        let opts: Vec<(char, String)> = vec![
            ('A', "Aspirin".into()),
            ('B', "Heparin".into()),
            ('C', "Warfarin".into()),
        ];
        let p = |r: &str| mmmu_parse_multi_choice(r, &opts);
        assert_eq!(p("B"), Some('B'));
        assert_eq!(p("(A) or (C)"), Some('C'));
        assert_eq!(p("The answer is B."), Some('B'));
        assert_eq!(
            p("I would prescribe heparin for this patient now"),
            Some('B')
        );
        assert_eq!(p("heparin"), None);
        assert_eq!(p(""), None);
        assert_eq!(p("\\boxed{C}"), Some('C'));
        assert_eq!(tag_then_box("<answer>\\boxed{A}</answer>"), "A");
        assert_eq!(box_then_tag("<answer>x</answer> \\boxed{y}"), "y");
    }

    #[test]
    fn judge_prompt_and_verdicts() {
        let p = compare_prompt("Q?", "resp", "gold");
        assert!(p.starts_with("\nYour task is to determine"));
        assert!(p.ends_with("<judge>0</judge>\n    "));
        assert!(p.contains(
            "The question is: Q?\n\nThe standard answer: gold\n\nThe user's answer: resp\n"
        ));
        assert!(p.contains("<think>{your concise think step}</think>\n<judge>{0/1}</judge>"));
        assert!(judge_verdict(Some("<think>x</think><judge>0</judge>")));
        assert!(judge_verdict(Some("0")));
        assert!(judge_verdict(Some("<judge> 0 </judge>")));
        assert!(!judge_verdict(Some("<judge>1</judge>")));
        assert!(!judge_verdict(Some("correct")));
        assert!(!judge_verdict(None));
    }
}
