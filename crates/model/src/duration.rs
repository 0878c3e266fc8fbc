//! Durations in resources are human-readable strings such as `250ms`, `5s` or `1m30s`.

use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// The longest duration a resource may give: `100y` (humantime's years of 365.25 days). Longer
/// ones (humantime reads up to 2^64 s) would overflow `Instant`/`SystemTime` arithmetic, e.g.
/// a request's deadline or a certificate's expiry, and panic where they are used.
pub const MAX: Duration = Duration::from_secs(3_155_760_000);

pub fn parse(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    if d > MAX {
        return Err(format!("invalid duration {text:?}: longer than 100y"));
    }
    Ok(d)
}

pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// `#[serde(with = "duration::option")]` for `Option<Duration>` fields.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&format(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => parse(&text).map(Some).map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(format(Duration::from_millis(1500)), "1s500ms");
        assert!(parse("5 parsecs").is_err());
    }

    /// Caught by `fuzz_tests::fuzz_durations`: `timeouts: {request: 18446744073709551615s}` was
    /// accepted, and the proxy panicked adding it to `Instant::now()` on every request of the
    /// rule (a `certificateTtl` that long, the control plane when it signed a certificate).
    #[test]
    fn rejects_durations_that_overflow_clock_arithmetic() {
        assert_eq!(parse("100y"), Ok(MAX));
        for text in ["100y 1s", "18446744073709551615s", "300000000000y"] {
            assert_eq!(parse(text), Err(format!("invalid duration {text:?}: longer than 100y")));
        }
        assert!(std::time::Instant::now().checked_add(MAX).is_some());
        assert!(std::time::SystemTime::now().checked_add(MAX).is_some());
    }
}
