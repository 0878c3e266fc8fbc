//! Durations in resources are human-readable strings such as `250ms`, `5s` or `1m30s`.

use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
use std::time::Duration;

pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("invalid duration {text:?}: {e}"))
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
}
