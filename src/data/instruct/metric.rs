//! Exact match, the task metric of generation-based evaluation.

/// Characters stripped from both ends of an answer before comparing: punctuation a model adds
/// around a one-word answer ("Spam.", "'ham'") and whitespace.
const EDGE: &[char] = &['.', ',', '!', '?', ';', ':', '"', '\'', '`', '*', '(', ')'];

/// The answer as compared: whitespace runs made one space, lower-cased, trimmed, and quotes /
/// trailing punctuation removed from both ends.
pub fn normalize_answer(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .to_lowercase()
        .trim_matches(|c: char| EDGE.contains(&c) || c.is_whitespace())
        .to_string()
}

/// Whether a generated answer equals the reference once both are normalised
/// ([`normalize_answer`]): "Spam." matches "spam"; "spam, probably" does not.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    normalize_answer(prediction) == normalize_answer(reference)
}

/// The share of `(prediction, reference)` pairs that match exactly; 0 for no pairs.
pub fn exact_match_rate<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let (mut hits, mut n) = (0usize, 0usize);
    for (p, r) in pairs {
        n += 1;
        hits += usize::from(exact_match(p, r));
    }
    if n == 0 { 0.0 } else { hits as f64 / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_ignores_case_space_and_edge_punctuation() {
        assert_eq!(normalize_answer("  Spam.\n"), "spam");
        assert_eq!(normalize_answer("\"HAM\"!"), "ham");
        assert_eq!(normalize_answer("HH AH0   L OW1"), "hh ah0 l ow1");
        assert_eq!(normalize_answer("..."), "");
    }

    #[test]
    fn exact_match_is_whole_answer() {
        assert!(exact_match("Spam.", "spam"));
        assert!(exact_match(" ham", "Ham"));
        assert!(!exact_match("spam, probably", "spam"));
        assert!(!exact_match("ham", "spam"));
        assert!(!exact_match("", "spam"));
        assert!(exact_match("HH AH0 L OW1.", "hh ah0 l ow1"));
    }

    #[test]
    fn rate_counts_hits() {
        let pairs = [
            ("spam", "spam"),
            ("Ham!", "ham"),
            ("spam", "ham"),
            ("x", "y"),
        ];
        assert_eq!(exact_match_rate(pairs), 0.5);
        assert_eq!(exact_match_rate(std::iter::empty()), 0.0);
    }
}
