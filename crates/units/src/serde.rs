//! `deserialize_with` helpers for JSON arguments that accept a plain number (as they always did)
//! or a string in the convention of this crate (`"100MiB"`, `"100mbit"`, `"2s"`). The fields stay
//! plain integers, and serialise as such, so older peers read them unchanged.
//!
//! ```
//! #[derive(serde::Deserialize)]
//! struct Args {
//!     #[serde(default, deserialize_with = "units::serde::opt_rate")]
//!     max_bandwidth: Option<u64>,
//! }
//! let a: Args = serde_json::from_str(r#"{"max_bandwidth": "100mbit"}"#).unwrap();
//! assert_eq!(a.max_bandwidth, Some(12_500_000));
//! ```

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

use crate::{Plain, UnitError};

/// What kind of value a field holds, and how a string is read.
#[derive(Clone, Copy)]
enum Kind {
    Size,
    Rate,
    Millis,
}

impl Kind {
    fn parse(self, s: &str) -> Result<u64, UnitError> {
        match self {
            Kind::Size => crate::parse_size(s),
            Kind::Rate => crate::parse_rate(s),
            Kind::Millis => {
                let d = crate::parse_duration(s, Plain::Millis)?;
                u64::try_from(d.as_nanos().div_ceil(1_000_000)).map_err(|_| UnitError::TooLarge)
            }
        }
    }

    fn error(self) -> UnitError {
        match self {
            Kind::Size => UnitError::Size,
            Kind::Rate => UnitError::Rate,
            Kind::Millis => UnitError::Duration(Plain::Millis),
        }
    }
}

struct NumberOrString(Kind);

impl<'de> Visitor<'de> for NumberOrString {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a number or a string: {}", self.0.error())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("invalid value {v}: {}", self.0.error())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        if v.is_finite() && v >= 0.0 && v < u64::MAX as f64 {
            Ok(v.round() as u64)
        } else {
            Err(E::custom(format!("invalid value {v}: {}", self.0.error())))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        self.0.parse(v).map_err(|e| E::custom(format!("invalid value '{v}': {e}")))
    }
}

struct Optional(Kind);

impl<'de> Visitor<'de> for Optional {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "null, a number or a string: {}", self.0.error())
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(NumberOrString(self.0)).map(Some)
    }
}

fn optional<'de, D: Deserializer<'de>>(d: D, kind: Kind) -> Result<Option<u64>, D::Error> {
    d.deserialize_option(Optional(kind))
}

/// A size in bytes: `4096` or `"4KiB"`.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(NumberOrString(Kind::Size))
}

/// An optional size in bytes: `null`, `4096` or `"4KiB"`.
pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    optional(d, Kind::Size)
}

/// A rate in bytes per second: `12500000`, `"100mbit"` or `"12MiB/s"`.
pub fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(NumberOrString(Kind::Rate))
}

/// An optional rate in bytes per second: `null`, `12500000`, `"100mbit"` or `"12MiB/s"`.
pub fn opt_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    optional(d, Kind::Rate)
}

/// A duration in whole milliseconds: `50` (milliseconds) or `"50ms"`, `"2s"` (rounded up to the
/// next millisecond).
pub fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(NumberOrString(Kind::Millis))
}

/// An optional duration in whole milliseconds: `null`, `50` or `"2s"`.
pub fn opt_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    optional(d, Kind::Millis)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Args {
        #[serde(default, deserialize_with = "super::opt_rate")]
        rate: Option<u64>,
        #[serde(default, deserialize_with = "super::opt_size")]
        size: Option<u64>,
        #[serde(default, deserialize_with = "super::opt_millis")]
        ms: Option<u64>,
    }

    fn args(json: &str) -> Result<Args, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn numbers_and_strings_are_both_accepted() {
        assert_eq!(args("{}").unwrap(), Args { rate: None, size: None, ms: None });
        assert_eq!(
            args(r#"{"rate": null, "size": null, "ms": null}"#).unwrap(),
            Args { rate: None, size: None, ms: None }
        );
        assert_eq!(
            args(r#"{"rate": 1000, "size": 4096, "ms": 50}"#).unwrap(),
            Args { rate: Some(1000), size: Some(4096), ms: Some(50) }
        );
        assert_eq!(
            args(r#"{"rate": "100mbit", "size": "100MiB", "ms": "2s"}"#).unwrap(),
            Args { rate: Some(12_500_000), size: Some(100 << 20), ms: Some(2000) }
        );
        assert_eq!(args(r#"{"ms": "1us"}"#).unwrap().ms, Some(1));
        assert_eq!(args(r#"{"ms": "50"}"#).unwrap().ms, Some(50));
    }

    #[test]
    fn bad_values_say_what_was_expected() {
        let e = args(r#"{"rate": "10 parsecs"}"#).unwrap_err();
        assert!(e.starts_with("invalid value '10 parsecs': expected a rate like 100mbit"), "{e}");
        let e = args(r#"{"size": -1}"#).unwrap_err();
        assert!(e.contains("expected a size"), "{e}");
        let e = args(r#"{"ms": true}"#).unwrap_err();
        assert!(e.contains("expected a duration"), "{e}");
    }
}
