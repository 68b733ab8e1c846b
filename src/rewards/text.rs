//! Free-text accuracy: Jaccard similarity of token sets.
//!
//! The paper does not define the tokenisation; ours (training.md section 3):
//! 1. lowercase (Unicode `to_lowercase`);
//! 2. delete every character of [`STRIPPED_PUNCTUATION`], i.e. `, . ; @ # ? ! & $` — nothing else
//!    (hyphens, apostrophes, colons, slashes, brackets and quotes are kept, so "x-ray" is one token);
//! 3. split on Unicode whitespace, drop empty pieces, and keep the SET of tokens (duplicates count once);
//! 4. `|A ∩ B| / |A ∪ B|`; when both sets are empty the similarity is 0 (an empty answer is never
//!    rewarded, even against an empty ground truth).

use std::collections::BTreeSet;

/// The characters deleted before splitting: exactly `[,.;@#?!&$]`.
pub const STRIPPED_PUNCTUATION: &[char] = &[',', '.', ';', '@', '#', '?', '!', '&', '$'];

/// The token set of `text` under the rules of this module.
pub fn jaccard_tokens(text: &str) -> BTreeSet<String> {
    let cleaned: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !STRIPPED_PUNCTUATION.contains(c))
        .collect();
    cleaned.split_whitespace().map(str::to_string).collect()
}

/// Jaccard similarity of the token sets of `a` and `b`, in [0, 1]; 0 when both are empty.
pub fn jaccard(a: &str, b: &str) -> f64 {
    let (ta, tb) = (jaccard_tokens(a), jaccard_tokens(b));
    let union = ta.union(&tb).count();
    if union == 0 {
        return 0.0;
    }
    ta.intersection(&tb).count() as f64 / union as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identical_after_normalisation() {
        assert_eq!(jaccard("Yes.", "yes"), 1.0);
        assert_eq!(jaccard("Left  lung!", "left lung"), 1.0);
        assert_eq!(jaccard("the the lung", "lung the"), 1.0);
        assert_eq!(jaccard("a,b", "ab"), 1.0); // ',' is deleted, not a separator
    }

    #[test]
    fn partial_overlap() {
        assert!((jaccard("right lower lobe", "lower lobe") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(jaccard("no", "normal"), 0.0);
        assert!((jaccard("x-ray chest", "x-ray") - 0.5).abs() < 1e-12);
    }

    #[test]
    fn empty_cases() {
        assert_eq!(jaccard("", ""), 0.0);
        assert_eq!(jaccard("  ?!. ", ""), 0.0);
        assert_eq!(jaccard("", "lung"), 0.0);
        assert_eq!(jaccard("lung", ""), 0.0);
    }

    #[test]
    fn only_the_documented_punctuation_is_stripped() {
        assert_eq!(
            jaccard_tokens("A,B.C;D@E#F?G!H&I$J"),
            ["abcdefghij".to_string()].into_iter().collect()
        );
        assert_eq!(
            jaccard_tokens("(a) b: c-d"),
            ["(a)", "b:", "c-d"].iter().map(|s| s.to_string()).collect()
        );
    }

    proptest! {
        #[test]
        fn jaccard_in_unit_interval_and_symmetric(a in ".{0,40}", b in ".{0,40}") {
            let j = jaccard(&a, &b);
            prop_assert!((0.0..=1.0).contains(&j));
            prop_assert_eq!(j, jaccard(&b, &a));
        }
    }
}
