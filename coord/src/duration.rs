//! Durations in configuration files: `"90s"`, `"3h"`, `"1h 30m"` (jiff's friendly
//! format) or ISO 8601 (`"PT3H"`). Negative durations are refused. Serde helpers only;
//! no policy.

use std::time::Duration;

/// Parse a non-negative duration.
pub fn parse(text: &str) -> Result<Duration, String> {
    let signed: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    Duration::try_from(signed).map_err(|_| format!("duration {text:?} must not be negative"))
}

/// Render in the friendly format `parse` reads back.
pub fn render(duration: Duration) -> String {
    match jiff::SignedDuration::try_from(duration) {
        Ok(d) => format!("{d:#}"),
        Err(_) => format!("{}s", duration.as_secs()),
    }
}

/// `#[serde(with = "crate::duration")]`.
pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&render(*d))
}

/// `#[serde(with = "crate::duration")]`.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn friendly_and_iso() {
        for (text, secs) in [
            ("90s", 90),
            ("3h", 10_800),
            ("1h 30m", 5_400),
            ("1h30m", 5_400),
            ("PT3H", 10_800),
            ("0s", 0),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        assert!(parse("-5s").is_err());
        assert!(parse("soon").is_err());
        assert_eq!(
            parse(&render(Duration::from_millis(1500))),
            Ok(Duration::from_millis(1500))
        );
    }
}
