//! Migration versions: dotted numeric segments compared numerically.
//!
//! `2 < 10`, `1.2 < 1.10`, `20251101 < 20251101.1`. Leading zeros and trailing zero
//! segments are insignificant (`001` == `1`, `1.0` == `1`, as Flyway treats them), so two
//! files whose versions differ only that way are reported as duplicates. The text as written
//! is kept for display and for the history table.

use std::cmp::Ordering;
use std::fmt;

/// A parsed migration version.
#[derive(Clone, Debug)]
pub struct Version {
    text: String,
    /// Numeric segments without leading zeros, trailing `0` segments removed (at least one kept).
    key: Vec<String>,
}

/// Why a string is not a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a version: {reason}")]
pub struct VersionError {
    pub text: String,
    pub reason: &'static str,
}

/// Longest accepted version text; the CRD bounds the field the same way.
pub const MAX_VERSION_LEN: usize = 64;

impl Version {
    /// Parses dotted numeric versions such as `3`, `20251101120000` or `1.2.10`.
    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let err = |reason| VersionError {
            text: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(err("it is empty"));
        }
        if text.len() > MAX_VERSION_LEN {
            return Err(err("it is longer than 64 characters"));
        }
        let mut key = Vec::new();
        for segment in text.split('.') {
            if segment.is_empty() {
                return Err(err(
                    "it has an empty segment (two dots, or a leading/trailing dot)",
                ));
            }
            if !segment.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(
                    "versions are digits separated by dots, e.g. 3, 1.2 or 20251101120000",
                ));
            }
            let trimmed = segment.trim_start_matches('0');
            key.push(if trimmed.is_empty() {
                "0".to_string()
            } else {
                trimmed.to_string()
            });
        }
        while key.len() > 1 && key.last().is_some_and(|s| s == "0") {
            key.pop();
        }
        Ok(Version {
            text: text.to_string(),
            key,
        })
    }

    /// The version as written in the file name or history row.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the version is made only of digits (no dots), e.g. `0003` or a timestamp.
    pub fn is_single_segment(&self) -> bool {
        !self.text.contains('.')
    }
}

fn cmp_segment(a: &str, b: &str) -> Ordering {
    // Both are digit strings without leading zeros: longer is larger, else compare as text.
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        for (a, b) in self.key.iter().zip(other.key.iter()) {
            match cmp_segment(a, b) {
                Ordering::Equal => continue,
                unequal => return unequal,
            }
        }
        self.key.len().cmp(&other.key.len())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Version {}

impl std::hash::Hash for Version {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn orders_numerically_by_segment() {
        assert!(v("2") < v("10"));
        assert!(v("1.2") < v("1.10"));
        assert!(v("1.9.9") < v("1.10"));
        assert!(v("20251101") < v("20251101.1"));
        assert!(v("9") < v("20251101120000"));
        assert!(v("99999999999999999999999") < v("100000000000000000000000"));
    }

    #[test]
    fn leading_and_trailing_zeros_are_insignificant() {
        assert_eq!(v("001"), v("1"));
        assert_eq!(v("1.0"), v("1"));
        assert_eq!(v("1.0.0"), v("1"));
        assert_eq!(v("0"), v("000"));
        assert_ne!(v("1.01"), v("1.1.0.1"));
        assert_eq!(v("0001").as_str(), "0001");
    }

    #[test]
    fn rejects_what_is_not_a_version() {
        for bad in ["", "a", "1..2", ".1", "1.", "1-2", "v1", " 1", "1_2"] {
            assert!(Version::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Version::parse(&"1".repeat(65)).is_err());
    }

    proptest! {
        #[test]
        fn ordering_matches_integer_tuples(a in proptest::collection::vec(0u32..1000, 1..4),
                                           b in proptest::collection::vec(0u32..1000, 1..4)) {
            let text = |x: &Vec<u32>| x.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(".");
            let trim = |x: &Vec<u32>| {
                let mut x = x.clone();
                while x.len() > 1 && x.last() == Some(&0) { x.pop(); }
                x
            };
            prop_assert_eq!(v(&text(&a)).cmp(&v(&text(&b))), trim(&a).cmp(&trim(&b)));
        }

        #[test]
        fn zero_padding_never_changes_order(n in 0u64..u64::MAX, pad in 0usize..5) {
            let padded = format!("{}{}", "0".repeat(pad), n);
            prop_assert_eq!(v(&padded), v(&n.to_string()));
        }
    }
}
