//! Caption cleaning exactly as LAVIS `BlipCaptionProcessor.pre_caption` (method.md section 2),
//! applied to every caption before tokenising. The steps, in this order:
//! lowercase; each of `. ! " ( ) * # : ; ~` becomes a space; every run of two or more whitespace
//! characters (regex `\s{2,}`) becomes one space, so a single tab or newline stays; trailing
//! newlines are stripped, then leading and trailing spaces; more than 50 space-separated words are cut
//! to the first 50.

use std::sync::LazyLock;

use regex::Regex;

/// Captions longer than this many words (split on `" "`) are truncated (LAVIS `max_words`).
pub const MAX_WORDS: usize = 50;

/// The characters LAVIS replaces with a space.
const PUNCTUATION: &[char] = &['.', '!', '"', '(', ')', '*', '#', ':', ';', '~'];

/// Python's `\s` on a `str` (the characters for which `str.isspace()` holds): Unicode White_Space,
/// which is Rust's `\s`, plus the four separators U+001C to U+001F.
static WHITESPACE_RUN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[\s\x1C-\x1F]{2,}").expect("valid regex"));

/// The LAVIS-cleaned form of `caption`.
pub fn clean_caption(caption: &str) -> String {
    let lowered = caption.to_lowercase().replace(PUNCTUATION, " ");
    let collapsed = WHITESPACE_RUN.replace_all(&lowered, " ");
    let stripped = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = stripped.split(' ').collect();
    if words.len() > MAX_WORDS { words[..MAX_WORDS].join(" ") } else { stripped.to_string() }
}

#[cfg(test)]
mod tests {
    use super::clean_caption;

    #[test]
    fn lowercases_and_drops_final_period() {
        assert_eq!(
            clean_caption("Two young guys with shaggy hair look at their hands."),
            "two young guys with shaggy hair look at their hands"
        );
    }

    #[test]
    fn punctuation_becomes_space_but_commas_and_apostrophes_stay() {
        assert_eq!(clean_caption("A man (in \"red\") jumps!Yes: no; ~ok* #1."), "a man in red jumps yes no ok 1");
        assert_eq!(clean_caption("A dog's toy, a ball-like thing?"), "a dog's toy, a ball-like thing?");
    }

    #[test]
    fn only_runs_of_two_or_more_whitespace_collapse() {
        assert_eq!(clean_caption("a\tb"), "a\tb");
        assert_eq!(clean_caption("a\t\tb"), "a b");
        assert_eq!(clean_caption("a \nb"), "a b");
        assert_eq!(clean_caption("a\nb"), "a\nb");
        // Python's `\s` also matches the separators U+001C-U+001F (`re.sub(r"\s{2,}", " ", ...)`).
        assert_eq!(clean_caption("a\x1c\x1cb"), "a b");
        assert_eq!(clean_caption("a\u{2003}\u{3000}b"), "a b");
        assert_eq!(clean_caption("a\x1cb"), "a\x1cb");
    }

    #[test]
    fn strips_trailing_newline_then_spaces() {
        assert_eq!(clean_caption("  A cat\n"), "a cat");
        // A lone leading tab survives: only spaces are stripped at the ends (Python `strip(" ")`).
        assert_eq!(clean_caption("\tA cat"), "\ta cat");
        assert_eq!(clean_caption("..."), "");
    }

    #[test]
    fn truncates_to_fifty_words() {
        let long: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
        let cleaned = clean_caption(&long.join(" "));
        assert_eq!(cleaned.split(' ').count(), 50);
        assert!(cleaned.ends_with("w49"));
        let exact: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
        assert_eq!(clean_caption(&exact.join(" ")), exact.join(" "));
    }

    #[test]
    fn unicode_is_lowercased() {
        assert_eq!(clean_caption("ÉCOLE Über"), "école über");
    }
}
