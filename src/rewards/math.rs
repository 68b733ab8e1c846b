//! Math accuracy: normalise, evaluate numerically, else compare normalised strings. No CAS.
//!
//! **Normalisation** ([`normalize_math`]), applied to both the prediction and the ground truth:
//! 1. a `\boxed{..}` anywhere → the content of the last brace-matched one;
//! 2. `\dfrac`/`\tfrac` → `\frac`; `\left`, `\right`, `$`, `\$` and the spacing commands `\! \, \; \: \ `
//!    and `~` removed; `\text{..}`, `\textbf{..}`, `\textrm{..}`, `\textit{..}`, `\mathrm{..}`,
//!    `\mathbf{..}`, `\mbox{..}`, `\operatorname{..}` replaced by their content; degree marks
//!    (`^\circ`, `^{\circ}`, `\circ`, `\degree`, `°`) removed; `\cdot`, `\times`, `\ast`, `×` → `*`;
//!    `\div`, `÷` → `/`; `−` → `-`;
//! 3. an assignment `x = 3` (left side a short identifier such as `x`, `y_1`, `\theta`) → its right side;
//! 4. thousands separators removed: `{,}`, and a `,` between a digit and exactly three digits not followed
//!    by a digit (`1,234,567` → `1234567`; `1,2` and `(1,23)` are kept); `1\,000` and `1 000` → `1000`;
//! 5. a mixed number `7 3/4` → `7+3/4` (as mathruler does);
//! 6. percent: a `%` / `\%` / trailing word "percent" is removed and remembered (see below);
//! 7. trailing units removed, repeatedly, when they follow a number: a fixed list ([`UNITS`]: cm, mm, m,
//!    km, kg, g, mg, ml, l, s, min, h, days, years, degrees, units, dollars, mmHg, bpm, cm^2, ...;
//!    case-insensitive), plus a trailing `.`;
//! 8. all whitespace removed; lower case.
//!
//! **Evaluation** ([`eval_math`]): the normalised string is parsed as an expression over f64 —
//! numbers (`-3`, `.5`, `1e-3`), `+ - * /`, `^` (right associative, `2^{10}`, `2^-1`), parentheses and
//! braces, `\frac{a}{b}` / `\frac12` (single-digit arguments), `\sqrt{x}`, `\sqrt[n]{x}`, `\pi`, `π`,
//! implicit products before `(`, `\sqrt`, `\pi`, `\frac` (`2\pi`, `3(4)`), and a mixed number when an
//! integer literal is directly followed by a proper fraction of integers (`2\frac{1}{2}` = 2.5;
//! `2\frac{\pi}{3}` is a product). The whole string must parse and the value must be finite
//! (division by zero, negative square roots and overflow fail).
//!
//! **Equality** ([`math_equal`]): when both sides evaluate, they are equal iff
//! `|a - b| <= 1e-6 * max(|a|, |b|)` (relative tolerance; exact for 0), so `0.5 == 1/2 == \frac12 ==
//! \dfrac{1}{2}` and `1,000 == 1000`. **Percent rule**: a percent sign is stripped as EasyR1/mathruler
//! do, so `50% == 50`; in addition, when exactly one side carried a percent sign, its value divided by
//! 100 is also accepted, so `50% == 0.5` too (`50 != 0.5` without a sign). Otherwise (not numeric, e.g.
//! `x^2+1`, intervals, words) the normalised strings must be equal, after `{c}` → `c` for single
//! characters (`x^{2}` == `x^2`). Empty answers never match.

use std::sync::LazyLock;

use regex::Regex;

use super::format::extract_last_boxed;

/// Units stripped after a number (case-insensitive), longest first at use.
pub const UNITS: &[&str] = &[
    "cm^{2}",
    "cm^{3}",
    "mm^{2}",
    "mm^{3}",
    "m^{2}",
    "m^{3}",
    "cm^2",
    "cm^3",
    "mm^2",
    "mm^3",
    "m^2",
    "m^3",
    "cm²",
    "cm³",
    "mm²",
    "mm³",
    "m²",
    "m³",
    "km/h",
    "m/s",
    "mg/dl",
    "g/dl",
    "mg/ml",
    "mmol/l",
    "ml/min",
    "beats/min",
    "mmhg",
    "bpm",
    "µm",
    "μm",
    "nm",
    "mm",
    "cm",
    "km",
    "m",
    "kg",
    "mg",
    "µg",
    "μg",
    "mcg",
    "g",
    "ml",
    "l",
    "liters",
    "liter",
    "litres",
    "litre",
    "seconds",
    "second",
    "sec",
    "s",
    "minutes",
    "minute",
    "mins",
    "min",
    "hours",
    "hour",
    "hrs",
    "hr",
    "h",
    "days",
    "day",
    "weeks",
    "week",
    "months",
    "month",
    "years",
    "year",
    "yrs",
    "degrees",
    "degree",
    "deg",
    "units",
    "unit",
    "dollars",
    "dollar",
    "cents",
    "cent",
    "feet",
    "foot",
    "ft",
    "inches",
    "inch",
    "in",
    "miles",
    "mile",
    "mi",
    "yards",
    "yard",
    "yd",
    "pounds",
    "pound",
    "lbs",
    "lb",
    "ounces",
    "ounce",
    "oz",
    "gallons",
    "gallon",
    "gal",
    "meters",
    "meter",
    "metres",
    "metre",
    "kilometers",
    "centimeters",
    "millimeters",
    "grams",
    "gram",
    "kilograms",
    "kilogram",
    "mol",
    "mmol",
];

static UNITS_BY_LEN: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut u = UNITS.to_vec();
    u.sort_by_key(|s| std::cmp::Reverse(s.len()));
    u
});
static ASSIGNMENT_LHS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\\?[A-Za-z][A-Za-z0-9_{}\\]{0,11}$").expect("valid regex"));
static MIXED_NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(\d)\s+(\d+/\d+)").expect("valid regex"));
static SINGLE_BRACE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{([^{}])\}").expect("valid regex"));

/// A normalised math answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MathAnswer {
    /// The normalised string (rules 1-8 of the module docs).
    pub normalized: String,
    /// Its value when it evaluates.
    pub value: Option<f64>,
    /// Whether a percent sign was stripped.
    pub percent: bool,
}

/// Replace the command `\name` (when not followed by a letter) by `to`.
fn replace_command(s: &str, name: &str, to: &str) -> String {
    let pat = format!("\\{name}");
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(&pat) {
        let after = &rest[i + pat.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(&pat);
        } else {
            out.push_str(to);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Replace `\cmd{content}` by `content` (brace-matched; unclosed ones are left as they are).
fn unwrap_command(s: &str, cmd: &str) -> String {
    let open = format!("\\{cmd}{{");
    let mut s = s.to_string();
    let mut from = 0;
    while let Some(rel) = s[from..].find(&open) {
        let start = from + rel;
        let body_start = start + open.len();
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in s[body_start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    end = Some(body_start + i);
                    break;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        match end {
            Some(end) => {
                let body = s[body_start..end].to_string();
                s.replace_range(start..=end, &body);
                from = start;
            }
            None => from = body_start,
        }
    }
    s
}

/// Remove `,` between a digit and exactly three digits that are not followed by another digit.
fn strip_thousands(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for i in 0..c.len() {
        if c[i] == ',' && i > 0 && c[i - 1].is_ascii_digit() {
            let three = (1..=3).all(|k| c.get(i + k).is_some_and(|d| d.is_ascii_digit()));
            let fourth_digit = c.get(i + 4).is_some_and(|d| d.is_ascii_digit());
            if three && !fourth_digit {
                continue;
            }
        }
        out.push(c[i]);
    }
    out
}

/// Strip trailing units (that follow a number) and trailing periods.
fn strip_units(s: &str) -> String {
    let mut s = s.trim().to_string();
    loop {
        let before = s.clone();
        s = s.trim_end_matches('.').trim_end().to_string();
        for unit in UNITS_BY_LEN.iter() {
            let Some(cut) = s.len().checked_sub(unit.len()) else {
                continue;
            };
            if !s.is_char_boundary(cut) || !s[cut..].eq_ignore_ascii_case(unit) {
                continue;
            }
            let prefix = &s[..cut];
            let glued_to_letter = prefix
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphabetic());
            let after_number = prefix
                .trim_end()
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_digit() || matches!(c, '}' | ')' | '.'));
            if !glued_to_letter && after_number {
                s = prefix.trim_end().to_string();
                break;
            }
        }
        if s == before {
            return s;
        }
    }
}

/// Normalise a math answer (rules 1-8 of the module docs) and evaluate it.
pub fn normalize_math(text: &str) -> MathAnswer {
    let mut s = text.trim().to_string();
    if s.contains("\\boxed{") {
        if let Some(b) = extract_last_boxed(&s) {
            s = b;
        }
    }
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    for cmd in ["left", "right", "displaystyle"] {
        s = replace_command(&s, cmd, "");
    }
    for cmd in [
        "text",
        "textbf",
        "textrm",
        "textit",
        "mathrm",
        "mathbf",
        "mbox",
        "operatorname",
    ] {
        s = unwrap_command(&s, cmd);
    }
    for (from, to) in [
        ("\\$", ""),
        ("$", ""),
        ("\\!", ""),
        ("\\,", " "),
        ("\\;", " "),
        ("\\:", " "),
        ("\\ ", " "),
        ("~", " "),
        ("\\%", "%"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("°", ""),
        ("{,}", ""),
        ("×", "*"),
        ("÷", "/"),
        ("−", "-"),
    ] {
        s = s.replace(from, to);
    }
    for (cmd, to) in [
        ("circ", ""),
        ("degree", ""),
        ("cdot", "*"),
        ("times", "*"),
        ("ast", "*"),
        ("div", "/"),
    ] {
        s = replace_command(&s, cmd, to);
    }
    if let Some(eq) = s.rfind('=') {
        let lhs = s[..eq].trim();
        if ASSIGNMENT_LHS.is_match(lhs) {
            s = s[eq + 1..].to_string();
        }
    }
    s = strip_thousands(&s);
    s = MIXED_NUMBER.replace_all(&s, "$1+$2").into_owned();
    let mut percent = false;
    let trimmed = s.trim_end().trim_end_matches('.').trim_end();
    if trimmed.len() >= 7
        && trimmed.is_char_boundary(trimmed.len() - 7)
        && trimmed[trimmed.len() - 7..].eq_ignore_ascii_case("percent")
    {
        s = format!("{}%", &trimmed[..trimmed.len() - 7]);
    }
    if s.contains('%') {
        percent = true;
        s = s.replace('%', "");
    }
    s = strip_units(&s);
    let normalized: String = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase();
    let value = eval_normalized(&normalized);
    MathAnswer {
        normalized,
        value,
        percent,
    }
}

/// The value of a math answer (normalised first), when it evaluates to a finite number.
pub fn eval_math(text: &str) -> Option<f64> {
    normalize_math(text).value
}

/// Relative closeness: `|a - b| <= 1e-6 * max(|a|, |b|)`.
pub fn numerically_close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

fn canonical_string(s: &str) -> String {
    let mut s = s.to_string();
    loop {
        let next = SINGLE_BRACE.replace_all(&s, "$1").into_owned();
        if next == s {
            return s;
        }
        s = next;
    }
}

/// Whether `pred` and `gt` are the same math answer (see the module docs).
pub fn math_equal(pred: &str, gt: &str) -> bool {
    let (p, g) = (normalize_math(pred), normalize_math(gt));
    if p.normalized.is_empty() || g.normalized.is_empty() {
        return false;
    }
    if let (Some(a), Some(b)) = (p.value, g.value) {
        if numerically_close(a, b)
            || (p.percent && !g.percent && numerically_close(a / 100.0, b))
            || (g.percent && !p.percent && numerically_close(a, b / 100.0))
        {
            return true;
        }
    }
    canonical_string(&p.normalized) == canonical_string(&g.normalized)
}

/// 1.0 when [`math_equal`], else 0.0.
pub fn math_accuracy(pred: &str, gt: &str) -> f64 {
    if math_equal(pred, gt) {
        1.0
    } else {
        0.0
    }
}

/// Whether a ground truth looks like math (used by task inference): it evaluates to a number, or it
/// carries LaTeX (`\`), `^` or `$`.
pub fn looks_like_math(text: &str) -> bool {
    let t = text.trim();
    !t.is_empty()
        && (eval_math(t).is_some() || t.contains('\\') || t.contains('^') || t.contains('$'))
}

fn eval_normalized(s: &str) -> Option<f64> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return None;
    }
    let mut p = Parser {
        s: &chars,
        pos: 0,
        depth: 0,
    };
    let v = p.expr()?;
    (p.pos == chars.len() && v.is_finite()).then_some(v)
}

const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    s: &'a [char],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Consume the command `\name` (not followed by a letter).
    fn eat_command(&mut self, name: &str) -> bool {
        let n: Vec<char> = name.chars().collect();
        let end = self.pos + 1 + n.len();
        if self.peek() == Some('\\')
            && end <= self.s.len()
            && self.s[self.pos + 1..end] == n[..]
            && !self.s.get(end).is_some_and(|c| c.is_ascii_alphabetic())
        {
            self.pos = end;
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn expr(&mut self) -> Option<f64> {
        self.enter()?;
        let mut v = self.term()?;
        loop {
            if self.eat('+') {
                v += self.term()?;
            } else if self.eat('-') {
                v -= self.term()?;
            } else {
                break;
            }
        }
        self.depth -= 1;
        v.is_finite().then_some(v)
    }

    fn term(&mut self) -> Option<f64> {
        let mut v = self.factor()?;
        loop {
            if self.eat('*') {
                v *= self.factor()?;
            } else if self.eat('/') {
                let d = self.factor()?;
                if d == 0.0 {
                    return None;
                }
                v /= d;
            } else if matches!(self.peek(), Some('(' | '\\' | 'π')) {
                v *= self.factor()?;
            } else {
                break;
            }
        }
        v.is_finite().then_some(v)
    }

    fn factor(&mut self) -> Option<f64> {
        self.enter()?;
        let v = if self.eat('-') {
            -self.factor()?
        } else if self.eat('+') {
            self.factor()?
        } else {
            self.power()?
        };
        self.depth -= 1;
        Some(v)
    }

    fn power(&mut self) -> Option<f64> {
        let base = self.atom()?;
        if self.eat('^') {
            let e = if self.peek() == Some('{') {
                self.braced()?
            } else {
                self.factor()?
            };
            let v = base.powf(e);
            return v.is_finite().then_some(v);
        }
        Some(base)
    }

    fn braced(&mut self) -> Option<f64> {
        if !self.eat('{') {
            return None;
        }
        let v = self.expr()?;
        self.eat('}').then_some(v)
    }

    /// A `\frac`/`\sqrt` argument: `{expr}`, a single digit, or an atom.
    fn arg(&mut self) -> Option<f64> {
        match self.peek()? {
            '{' => self.braced(),
            c if c.is_ascii_digit() => {
                self.pos += 1;
                c.to_digit(10).map(f64::from)
            }
            _ => self.atom(),
        }
    }

    fn frac(&mut self) -> Option<(f64, f64)> {
        let a = self.arg()?;
        let b = self.arg()?;
        (b != 0.0).then_some((a, b))
    }

    fn number(&mut self) -> Option<(f64, bool)> {
        let start = self.pos;
        let mut integer = true;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.peek() == Some('.') && self.s.get(self.pos + 1).is_some_and(|c| c.is_ascii_digit())
        {
            integer = false;
            self.pos += 1;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        if self.pos == start {
            return None;
        }
        if self.peek() == Some('e') {
            let mut k = self.pos + 1;
            if matches!(self.s.get(k), Some('+' | '-')) {
                k += 1;
            }
            if self.s.get(k).is_some_and(|c| c.is_ascii_digit()) {
                integer = false;
                self.pos = k;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
            }
        }
        let text: String = self.s[start..self.pos].iter().collect();
        text.parse::<f64>().ok().map(|v| (v, integer))
    }

    fn atom(&mut self) -> Option<f64> {
        self.enter()?;
        let v = match self.peek()? {
            '(' => {
                self.pos += 1;
                let v = self.expr()?;
                if !self.eat(')') {
                    return None;
                }
                v
            }
            '{' => self.braced()?,
            'π' => {
                self.pos += 1;
                std::f64::consts::PI
            }
            c if c.is_ascii_digit() || c == '.' => {
                let (v, integer) = self.number()?;
                let save = self.pos;
                if integer && self.eat_command("frac") {
                    let (a, b) = self.frac()?;
                    let proper_integers =
                        a.fract() == 0.0 && b.fract() == 0.0 && a >= 0.0 && b > 0.0 && a < b;
                    if proper_integers {
                        v + a / b
                    } else {
                        self.pos = save;
                        v
                    }
                } else {
                    v
                }
            }
            '\\' => {
                if self.eat_command("frac") {
                    let (a, b) = self.frac()?;
                    a / b
                } else if self.eat_command("sqrt") {
                    let index = if self.eat('[') {
                        let n = self.expr()?;
                        if !self.eat(']') || n == 0.0 {
                            return None;
                        }
                        Some(n)
                    } else {
                        None
                    };
                    let x = self.arg()?;
                    if x < 0.0 {
                        return None;
                    }
                    match index {
                        Some(n) => x.powf(1.0 / n),
                        None => x.sqrt(),
                    }
                } else if self.eat_command("pi") {
                    std::f64::consts::PI
                } else {
                    return None;
                }
            }
            _ => return None,
        };
        self.depth -= 1;
        v.is_finite().then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eq(a: &str, b: &str) -> bool {
        math_equal(a, b)
    }

    #[test]
    fn numbers_and_fractions() {
        assert!(eq("0.5", "1/2"));
        assert!(eq("\\frac12", "0.5"));
        assert!(eq("\\frac{1}{2}", "1/2"));
        assert!(eq("\\dfrac{1}{2}", "\\tfrac{1}{2}"));
        assert!(eq("\\frac{3}{4}", "0.75"));
        assert!(eq("2", "2.0"));
        assert!(eq("-3", "-3.000"));
        assert!(eq("-\\frac{1}{2}", "-0.5"));
        assert!(eq("1/3", "0.3333333"));
        assert!(!eq("1/3", "0.33"));
        assert!(!eq("2", "3"));
        assert!(!eq("-2", "2"));
    }

    #[test]
    fn latex_text_dollars_units_thousands() {
        assert!(eq("$12$", "12"));
        assert!(eq("\\$1,000", "1000"));
        assert!(eq("1,234,567", "1234567"));
        assert!(eq("1{,}000", "1000"));
        assert!(eq("1\\,000", "1000"));
        assert!(eq("5 \\text{cm}", "5"));
        assert!(eq("5cm", "5 cm"));
        assert!(eq("\\text{12 years}", "12"));
        assert!(eq("30^\\circ", "30"));
        assert!(eq("30°", "30 degrees"));
        assert!(eq("x = 4", "4"));
        assert!(eq("\\boxed{7}", "7"));
        assert!(eq("7.", "7"));
        assert!(eq("7 3/4", "7.75"));
        assert!(eq("2\\frac{1}{2}", "2.5"));
        assert!(eq("120 mmHg", "120"));
    }

    #[test]
    fn percent_rule() {
        assert!(eq("50%", "50"));
        assert!(eq("50\\%", "0.5"));
        assert!(eq("0.5", "50%"));
        assert!(eq("50 percent", "50%"));
        assert!(!eq("50", "0.5"));
        assert!(!eq("50%", "5"));
    }

    #[test]
    fn expressions() {
        assert!(eq("2+3*4", "14"));
        assert!(eq("(2+3)*4", "20"));
        assert!(eq("2(3+1)", "8"));
        assert!(eq("2^{10}", "1024"));
        assert!(eq("2^-1", "0.5"));
        assert!(eq("-2^2", "-4"));
        assert!(eq("3 \\times 4", "12"));
        assert!(eq("3\\cdot4", "12"));
        assert!(eq("12 \\div 4", "3"));
        assert!(eq("\\sqrt{16}", "4"));
        assert!(eq("\\sqrt[3]{27}", "3"));
        assert!(eq("2\\pi", "6.283185307"));
        assert!(eq("\\frac{\\sqrt{2}}{2}", "0.70710678"));
        assert!(eq("\\left(\\frac{1}{2}\\right)", "0.5"));
        assert!(eq("1.5e3", "1500"));
    }

    #[test]
    fn division_by_zero_and_garbage_do_not_evaluate() {
        assert_eq!(eval_math("1/0"), None);
        assert_eq!(eval_math("\\sqrt{-1}"), None);
        assert_eq!(eval_math("(((1)"), None);
        assert_eq!(eval_math("abc"), None);
        assert_eq!(eval_math(""), None);
        assert_eq!(eval_math("10^{400}"), None);
        assert_eq!(eval_math(&"(".repeat(10_000)), None);
    }

    #[test]
    fn string_fallback() {
        assert!(eq("x^{2}+1", "x^2 + 1"));
        assert!(eq("\\frac{x}{2}", "\\frac{x}{2}"));
        assert!(eq("Yes", "yes"));
        assert!(eq("(1, 2)", "(1,2)"));
        assert!(!eq("x^2+1", "x^2-1"));
        assert!(!eq("", ""));
        assert!(!eq("", "0"));
        assert!(!eq("None", "0"));
    }

    #[test]
    fn looks_like_math_cases() {
        assert!(looks_like_math("42"));
        assert!(looks_like_math("-3.5"));
        assert!(looks_like_math("1/2"));
        assert!(looks_like_math("\\frac{1}{2}"));
        assert!(looks_like_math("50%"));
        assert!(looks_like_math("x^2"));
        assert!(!looks_like_math("left lung"));
        assert!(!looks_like_math("yes"));
        assert!(!looks_like_math(""));
    }

    proptest! {
        #[test]
        fn never_panics(a in "\\PC{0,40}", b in "\\PC{0,40}") {
            let acc = math_accuracy(&a, &b);
            prop_assert!(acc == 0.0 || acc == 1.0);
        }

        #[test]
        fn latexy_never_panics(a in "[0-9\\\\{}()^/*+\\-. a-z%$,=]{0,40}") {
            let _ = normalize_math(&a);
            if let Some(v) = eval_math(&a) { prop_assert!(v.is_finite()); }
        }

        #[test]
        fn integers_equal_themselves(n in -1_000_000i64..1_000_000) {
            let s = n.to_string();
            let dotted = format!("{n}.0");
            let frac = format!("\\frac{{{}}}{{2}}", 2 * n);
            prop_assert!(math_equal(&s, &dotted), "{} vs {}", s, dotted);
            prop_assert!(math_equal(&frac, &s), "{} vs {}", frac, s);
        }
    }
}
