//! Multiple-choice accuracy: extract an option letter from an answer span, compare with the
//! ground-truth letter. Deterministic (never picks at random).
//!
//! [`extract_choice`] rules, in order (letters are `A`-`Z`; the result is upper case):
//! 1. **Whole span.** After trimming whitespace and wrapping `* $ " ' \``, `\text{..}`, `\textbf{..}`,
//!    `\mathrm{..}`, `\mathbf{..}` and a leading "Option"/"Choice", the span is a single letter in one of
//!    the forms `B`, `(B)`, `[B]`, `B.`, `B)`, `B:` (lower case accepted here: `b`, `(b)`).
//! 2. **Explicit choices**, anywhere in the span; when several appear the LAST one (by position) wins:
//!    * a parenthesised capital `(B)` not glued to a preceding letter or digit (`f(B)` does not count);
//!    * a list-item capital: `B.`, `B)` or `B:` followed by whitespace / end / closing markup, at the
//!      start of a line (after optional markup such as `**`, `-`, `#`) or right after the word
//!      "option"/"choice" ("B. Pneumonia", "Option B: ..."; a sentence-final "vitamin A." or "U.S."
//!      does not count);
//!    * the letter introduced by an answer marker — "answer is", "answer:", "final answer",
//!      "**answer**", "answer would be", "answer should be", "option is", "choice is", "option ",
//!      "choice " (case-insensitive),
//!      skipping `: * " ' ( [ { $ = -`, whitespace and the words "is", "be", "option", "choice",
//!      "letter", `\boxed`, `\text`, `\textbf`, `\mathrm`. An upper-case letter counts when it is not
//!      followed by a letter/digit; a lower-case one only when followed by end or `. ) : , * } ] " '`
//!      (so "the answer is a bit unclear" is not `A`).
//! 3. **Fallback**: only when no explicit choice exists, the LAST standalone capital letter (not
//!    touching a letter, digit, `_`, `-`, `'` or `\`, nor part of an abbreviation such as "U.S.":
//!    "Always", "T-cell", "I'm", "B12" never count).
//!    `A` and `I` followed by whitespace and a lower-case word are read as the article / pronoun and
//!    skipped, unless that word is "is" ("A is correct" gives `A`; "A patient with" and "I think" do not).
//!
//! Option-text matching needs the options, which a reward record does not carry; evaluation can use
//! [`extract_choice_with_options`].

use std::sync::LazyLock;

use regex::Regex;

static WHOLE_SINGLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.:)]?)$").expect("valid regex")
});
static WHOLE_WITH_TEXT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:\(([A-Z])\)|([A-Z])[.:)])\s+\S").expect("valid regex"));

const MARKERS: &[&str] = &[
    "**answer**",
    "final answer",
    "answer is",
    "answer:",
    "answer :",
    "answer would be",
    "answer should be",
    "option is",
    "choice is",
    "option ",
    "choice ",
];
/// Words skipped between a marker and the letter (longest first where prefixes collide).
const SKIP_WORDS: &[&str] = &[
    "\\textbf", "\\mathrm", "\\boxed", "\\text", "option", "choice", "letter", "is", "be",
];

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Trim whitespace and wrapping markup repeatedly (used by the whole-span rule only).
fn strip_wrappers(span: &str) -> String {
    let mut t = span.trim().to_string();
    loop {
        let before = t.clone();
        for cmd in ["\\textbf{", "\\mathrm{", "\\mathbf{", "\\text{"] {
            if t.starts_with(cmd) && t.ends_with('}') && t.len() > cmd.len() {
                t = t[cmd.len()..t.len() - 1].to_string();
            }
        }
        if t.starts_with('{') && t.ends_with('}') && t.len() >= 2 {
            t = t[1..t.len() - 1].to_string();
        }
        t = t
            .trim_matches(|c: char| {
                c.is_whitespace()
                    || matches!(
                        c,
                        '*' | '$'
                            | '"'
                            | '\''
                            | '`'
                            | '\u{201c}'
                            | '\u{201d}'
                            | '\u{2018}'
                            | '\u{2019}'
                    )
            })
            .to_string();
        for prefix in ["option", "choice"] {
            if t.len() > prefix.len()
                && t.get(..prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
            {
                let rest = &t[prefix.len()..];
                if rest.starts_with(|c: char| c.is_whitespace() || c == ':') {
                    t = rest
                        .trim_start_matches(|c: char| c.is_whitespace() || c == ':')
                        .to_string();
                }
            }
        }
        if t == before {
            return t;
        }
    }
}

/// Rule 1: the whole span is a choice letter (`with_text`: or starts with one followed by option text).
fn whole_span_choice(span: &str, with_text: bool) -> Option<char> {
    let t = strip_wrappers(span);
    let caps = WHOLE_SINGLE.captures(&t).or_else(|| {
        if with_text {
            WHOLE_WITH_TEXT.captures(&t)
        } else {
            None
        }
    })?;
    let m = caps.iter().skip(1).flatten().next()?;
    m.as_str().chars().next().map(|c| c.to_ascii_uppercase())
}

/// Whether position `i` starts a line (after optional markup) or follows the word "option"/"choice".
fn list_item_context(chars: &[char], i: usize) -> bool {
    let mut j = i;
    while j > 0 {
        let c = chars[j - 1];
        if c == '\n' {
            return true;
        }
        if c.is_whitespace()
            || matches!(
                c,
                '*' | '"' | '\'' | '`' | '(' | '[' | '{' | '>' | '$' | '-' | '#' | ':'
            )
        {
            j -= 1;
        } else {
            break;
        }
    }
    if j == 0 {
        return true;
    }
    let mut k = j;
    while k > 0 && chars[k - 1].is_alphabetic() {
        k -= 1;
    }
    let word: String = chars[k..j].iter().collect();
    word.eq_ignore_ascii_case("option") || word.eq_ignore_ascii_case("choice")
}

/// Position-tagged explicit choices (rule 2).
fn explicit_choices(chars: &[char]) -> Vec<(usize, char)> {
    let n = chars.len();
    let lower: Vec<char> = chars.iter().map(|c| c.to_ascii_lowercase()).collect();
    let mut out = Vec::new();
    let opening = |c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '*' | '"' | '\'' | '`' | '(' | '[' | '{' | ':' | '$' | '>'
            )
    };
    let closing = |c: char| {
        c.is_whitespace() || matches!(c, '*' | '"' | '\'' | '`' | '_' | '$' | '}' | ']' | '<')
    };
    for i in 0..n {
        let c = chars[i];
        // (B)
        if c == '('
            && i + 2 < n
            && chars[i + 1].is_ascii_uppercase()
            && chars[i + 2] == ')'
            && (i == 0 || !is_word(chars[i - 1]))
        {
            out.push((i + 1, chars[i + 1]));
        }
        // B.  B)  B:  as a list item
        if c.is_ascii_uppercase()
            && (i == 0 || opening(chars[i - 1]))
            && list_item_context(chars, i)
            && i + 1 < n
            && matches!(chars[i + 1], '.' | ')' | ':')
            && (i + 2 == n || closing(chars[i + 2]))
        {
            out.push((i, c));
        }
    }
    // answer markers
    for marker in MARKERS {
        let m: Vec<char> = marker.chars().collect();
        let mut start = 0;
        while start + m.len() <= n {
            if lower[start..start + m.len()] != m[..] {
                start += 1;
                continue;
            }
            let mut j = start + m.len();
            start += 1;
            loop {
                while j < n
                    && (chars[j].is_whitespace()
                        || matches!(
                            chars[j],
                            ':' | '*' | '"' | '\'' | '(' | '[' | '{' | '$' | '=' | '-' | '`'
                        ))
                {
                    j += 1;
                }
                let skipped = SKIP_WORDS.iter().find(|w| {
                    let w: Vec<char> = w.chars().collect();
                    j + w.len() <= n
                        && lower[j..j + w.len()] == w[..]
                        && (j + w.len() == n || !chars[j + w.len()].is_alphabetic())
                });
                match skipped {
                    Some(w) => j += w.chars().count(),
                    None => break,
                }
            }
            if j < n && chars[j].is_ascii_alphabetic() {
                let next = chars.get(j + 1).copied();
                let ok = if chars[j].is_ascii_uppercase() {
                    next.is_none_or(|c| !is_word(c))
                } else {
                    next.is_none_or(|c| {
                        matches!(c, '.' | ')' | ':' | ',' | '*' | '}' | ']' | '"' | '\'')
                    })
                };
                if ok {
                    out.push((j, chars[j].to_ascii_uppercase()));
                }
            }
        }
    }
    out
}

/// Rule 3: the last standalone capital letter, skipping the article "A" and the pronoun "I".
fn standalone_choice(chars: &[char]) -> Option<char> {
    let n = chars.len();
    let touching = |c: char| is_word(c) || matches!(c, '-' | '\'' | '\u{2019}' | '\\');
    (0..n).rev().find_map(|i| {
        let c = chars[i];
        if !c.is_ascii_uppercase() {
            return None;
        }
        // abbreviations: "U.S." (a '.' glued on the left, or a '.' followed by a letter/digit)
        // and function arguments: "f(B)"
        let prev_touch = i > 0
            && (touching(chars[i - 1])
                || chars[i - 1] == '.'
                || (chars[i - 1] == '(' && i >= 2 && is_word(chars[i - 2])));
        let next_touch = i + 1 < n
            && (touching(chars[i + 1])
                || (chars[i + 1] == '.' && chars.get(i + 2).is_some_and(|c| c.is_alphanumeric())));
        if prev_touch || next_touch {
            return None;
        }
        if matches!(c, 'A' | 'I') {
            let mut j = i + 1;
            while j < n && chars[j].is_whitespace() {
                j += 1;
            }
            if j > i + 1 && j < n && chars[j].is_lowercase() {
                let word: String = chars[j..].iter().take_while(|c| is_word(**c)).collect();
                if word != "is" {
                    return None;
                }
            }
        }
        Some(c)
    })
}

/// The option letter (upper case) named by an answer span; see the module docs for the rules.
pub fn extract_choice(span: &str) -> Option<char> {
    if let Some(c) = whole_span_choice(span, false) {
        return Some(c);
    }
    let chars: Vec<char> = span.chars().collect();
    let explicit = explicit_choices(&chars);
    if let Some(&(_, c)) = explicit.iter().max_by_key(|(pos, _)| *pos) {
        return Some(c);
    }
    standalone_choice(&chars)
}

/// The ground-truth letter: "B", "(B)", "b", "B. text", "(B) text", ... — the whole-span rule, also
/// accepting a leading `(B)`, `B.`, `B)`, `B:` followed by option text (so "B. Vitamin A." is `B`),
/// then [`extract_choice`].
pub fn parse_gt_choice(gt: &str) -> Option<char> {
    whole_span_choice(gt, true).or_else(|| extract_choice(gt))
}

/// 1.0 when the letter extracted from `span` equals the ground-truth letter, else 0.0 (also 0.0 when
/// either side has no letter).
pub fn mcq_accuracy(span: &str, gt: &str) -> f64 {
    match (extract_choice(span), parse_gt_choice(gt)) {
        (Some(a), Some(b)) if a == b => 1.0,
        _ => 0.0,
    }
}

fn norm_option_text(s: &str) -> String {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`extract_choice`], then (for evaluation, where the options are known) the option whose text
/// appears in the span as whole words (case and punctuation ignored): the one whose last occurrence
/// ends latest, ties broken by the longer text, then by the earlier option.
pub fn extract_choice_with_options(span: &str, options: &[(char, &str)]) -> Option<char> {
    if let Some(c) = extract_choice(span) {
        return Some(c);
    }
    let hay = format!(" {} ", norm_option_text(span));
    let mut best: Option<(usize, usize, char)> = None;
    for &(letter, text) in options {
        let needle = norm_option_text(text);
        if needle.is_empty() {
            continue;
        }
        let needle = format!(" {needle} ");
        if let Some(pos) = hay.rfind(&needle) {
            let key = (pos + needle.len(), needle.len());
            if best.is_none_or(|(e, l, _)| key > (e, l)) {
                best = Some((key.0, key.1, letter.to_ascii_uppercase()));
            }
        }
    }
    best.map(|(_, _, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn whole_span_forms() {
        for s in [
            "C",
            "(C)",
            "C.",
            "C)",
            "C:",
            "[C]",
            " c ",
            "(c)",
            "**C**",
            "$C$",
            "\\text{C}",
            "{C}",
            "Option C",
            "C. Pneumonia",
            "(C) Pneumonia",
            "C: text",
        ] {
            assert_eq!(extract_choice(s), Some('C'), "{s:?}");
        }
    }

    #[test]
    fn paren_dot_and_marker_agree() {
        assert_eq!(extract_choice("I pick (C) here"), Some('C'));
        assert_eq!(extract_choice("so it is C. Done"), Some('C'));
        assert_eq!(extract_choice("The answer is C"), Some('C'));
        assert_eq!(extract_choice("The answer is: C"), Some('C'));
        assert_eq!(extract_choice("Answer: C"), Some('C'));
        assert_eq!(extract_choice("**Answer:** C"), Some('C'));
        assert_eq!(extract_choice("**Answer**: (C) Pneumonia"), Some('C'));
        assert_eq!(extract_choice("Final answer: \\boxed{C}"), Some('C'));
        assert_eq!(extract_choice("the correct option is C because"), Some('C'));
        assert_eq!(extract_choice("the answer is c."), Some('C'));
    }

    #[test]
    fn last_explicit_choice_wins() {
        assert_eq!(
            extract_choice("(A) is tempting, but the answer is (C)"),
            Some('C')
        );
        assert_eq!(
            extract_choice("The answer is A. Wait, re-evaluating: the answer is B."),
            Some('B')
        );
        assert_eq!(extract_choice("A. no\nB. no\n**D.** yes"), Some('D'));
        assert_eq!(extract_choice("B. Vitamin A."), Some('B'));
        assert_eq!(extract_choice("I choose option C"), Some('C'));
        // an explicit choice beats a later bare letter
        assert_eq!(extract_choice("The answer is C, not A"), Some('C'));
    }

    #[test]
    fn letters_inside_words_do_not_count() {
        assert_eq!(extract_choice("Always"), None);
        assert_eq!(extract_choice("Always check the Airway"), None);
        assert_eq!(
            extract_choice("A patient with T-cell lymphoma and Vitamin B12"),
            None
        );
        assert_eq!(extract_choice("I think so"), None);
        assert_eq!(extract_choice("I'm not sure"), None);
        assert_eq!(extract_choice("the answer is a bit unclear"), None);
        assert_eq!(extract_choice("in the U.S."), None);
        assert_eq!(extract_choice("f(B)"), None);
        assert_eq!(extract_choice(""), None);
        assert_eq!(extract_choice("   "), None);
    }

    #[test]
    fn standalone_fallback() {
        assert_eq!(extract_choice("Always B"), Some('B'));
        assert_eq!(extract_choice("I think B is right"), Some('B'));
        assert_eq!(extract_choice("A is correct"), Some('A'));
        assert_eq!(extract_choice("options B or D"), Some('D'));
    }

    #[test]
    fn ground_truth_forms() {
        for gt in [
            "B",
            "(B)",
            "B. Pneumothorax",
            "b",
            "B)",
            "B. Vitamin A.",
            "(B) type A",
        ] {
            assert_eq!(parse_gt_choice(gt), Some('B'), "{gt:?}");
        }
        assert_eq!(mcq_accuracy("(B)", "B. Pneumothorax"), 1.0);
        assert_eq!(mcq_accuracy("The answer is B", "(B)"), 1.0);
        assert_eq!(mcq_accuracy("C", "B"), 0.0);
        assert_eq!(mcq_accuracy("", "B"), 0.0);
        assert_eq!(mcq_accuracy("B", ""), 0.0);
        assert_eq!(mcq_accuracy("Always", "A"), 0.0);
    }

    #[test]
    fn option_text_fallback() {
        let opts = [
            ('A', "Pneumonia"),
            ('B', "Pleural effusion"),
            ('C', "Effusion"),
        ];
        assert_eq!(
            extract_choice_with_options("it is a pleural effusion", &opts),
            Some('B')
        );
        assert_eq!(extract_choice_with_options("pneumonia", &opts), Some('A'));
        assert_eq!(extract_choice_with_options("nothing", &opts), None);
        assert_eq!(extract_choice_with_options("(C)", &opts), Some('C'));
    }

    proptest! {
        #[test]
        fn never_panics_and_returns_a_capital(s in "\\PC{0,60}") {
            if let Some(c) = extract_choice(&s) {
                prop_assert!(c.is_ascii_uppercase());
            }
            let a = mcq_accuracy(&s, "B");
            prop_assert!(a == 0.0 || a == 1.0);
        }

        #[test]
        fn explicit_choice_is_found(letter in "[A-Z]", prefix in "[a-z ]{0,20}") {
            let s = format!("{prefix} the answer is ({letter})");
            prop_assert_eq!(extract_choice(&s), letter.chars().next());
        }
    }
}
