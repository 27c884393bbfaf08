//! Title filters (`users.reports_filter`, `t_chats.reports_filter`): which reports of its
//! mailboxes one recipient gets. Read with the directory's rows ([`super::model`]), applied by
//! the relay when it resolves a report's recipients ([`super::Snapshot::deliveries`]).
//!
//! A filter is a comma-separated list of words, each matched case-insensitively anywhere in
//! the report's title (`sales, weekly`: a title containing either), or `/regex/` (the `regex`
//! crate's syntax, case-insensitive, matched anywhere in the title unless anchored with `^…$`).
//! A filter that cannot be read (an invalid regex, no words) matches nothing: that recipient
//! gets no report until it is fixed, never every report.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest compiled regex a filter may build (`regex::RegexBuilder::size_limit`): 1 MiB.
pub const FILTER_REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One recipient's `reports_filter`, as the sysadmin typed it and as it matches.
#[derive(Debug, Clone)]
pub struct TitleFilter {
    source: String,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    /// Lowercased words; a title matches when it contains any of them.
    Words(Vec<String>),
    /// A compiled `/regex/`.
    Regex(regex::Regex),
    /// Why the cell cannot be used; matches nothing.
    Invalid(String),
}

impl TitleFilter {
    /// Reads a `reports_filter` cell (already trimmed and non-empty). Never fails: a filter that
    /// cannot be used is kept with its reason ([`Self::error`]) and matches nothing.
    pub fn parse(text: &str) -> Self {
        let source = text.trim().to_owned();
        let matcher = match source
            .strip_prefix('/')
            .and_then(|rest| rest.strip_suffix('/'))
        {
            Some("") => Matcher::Invalid("the regex between the slashes is empty".into()),
            Some(pattern) => match regex::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .size_limit(FILTER_REGEX_SIZE_LIMIT)
                .build()
            {
                Ok(regex) => Matcher::Regex(regex),
                // The regex crate's message spans lines (the pattern, a caret, the error):
                // one line for the log and `check`.
                Err(error) => Matcher::Invalid(format!(
                    "invalid regex: {}",
                    error
                        .to_string()
                        .lines()
                        .map(str::trim)
                        .filter(|line| !line.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                )),
            },
            None => {
                let words: Vec<String> = source
                    .split(',')
                    .map(|word| word.trim().to_lowercase())
                    .filter(|word| !word.is_empty())
                    .collect();
                if words.is_empty() {
                    Matcher::Invalid("no words (a comma-separated list, or /regex/)".into())
                } else {
                    Matcher::Words(words)
                }
            }
        };
        Self { source, matcher }
    }

    /// Whether a report titled `title` passes; always `false` for an unusable filter.
    pub fn matches(&self, title: &str) -> bool {
        match &self.matcher {
            Matcher::Words(words) => {
                let title = title.to_lowercase();
                words.iter().any(|word| title.contains(word.as_str()))
            }
            Matcher::Regex(regex) => regex.is_match(title),
            Matcher::Invalid(_) => false,
        }
    }

    /// Why the filter cannot be used (then it matches nothing), or `None`.
    pub fn error(&self) -> Option<&str> {
        match &self.matcher {
            Matcher::Invalid(reason) => Some(reason),
            _ => None,
        }
    }

    /// The cell as the sysadmin typed it (trimmed).
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for TitleFilter {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for TitleFilter {}

impl Serialize for TitleFilter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for TitleFilter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|text| Self::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_case_insensitively_anywhere_in_the_title() {
        let filter = TitleFilter::parse(" Sales , WEEKLY ,, ");
        assert_eq!(filter.error(), None);
        assert!(filter.matches("Daily sales by region"));
        assert!(filter.matches("Weekly KPIs"));
        assert!(filter.matches("Продажи: weekly"));
        assert!(!filter.matches("Daily KPIs"));
        let cyrillic = TitleFilter::parse("Продажи");
        assert!(cyrillic.matches("ежедневные ПРОДАЖИ"));
    }

    #[test]
    fn a_regex_between_slashes_matches_case_insensitively() {
        let filter = TitleFilter::parse("/^(daily|weekly) sales$/");
        assert_eq!(filter.error(), None);
        assert!(filter.matches("Daily Sales"));
        assert!(!filter.matches("Daily Sales (copy)"));
        assert!(!filter.matches("Monthly sales"));
    }

    #[test]
    fn an_unusable_filter_matches_nothing_and_says_why() {
        for (cell, reason) in [
            ("/sales(/", "invalid regex"),
            ("//", "empty"),
            (", ,", "no words"),
        ] {
            let filter = TitleFilter::parse(cell);
            assert!(
                filter.error().is_some_and(|e| e.contains(reason)),
                "{cell}: {:?}",
                filter.error()
            );
            assert!(!filter.matches("sales"), "{cell}");
            assert!(!filter.error().unwrap().contains('\n'), "{cell}");
            assert!(!filter.matches(""), "{cell}");
        }
    }

    #[test]
    fn a_filter_round_trips_through_json_as_its_text() {
        let filter = TitleFilter::parse("/^daily/");
        let json = serde_json::to_string(&filter).unwrap();
        assert_eq!(json, "\"/^daily/\"");
        let back: TitleFilter = serde_json::from_str(&json).unwrap();
        assert_eq!(back, filter);
        assert!(back.matches("daily sales"));
    }
}
