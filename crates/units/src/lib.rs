//! One convention for sizes, rates and durations, shared by every command-line flag of
//! `nbd-row-proxy` and `row-migrate` and every control-socket argument.
//!
//! The parsing itself is done by well-kept crates ([`parse_size`](https://docs.rs/parse-size) for
//! sizes, [`humantime`] for durations); this crate fixes which meaning each form has, adds bit
//! rates, and words the errors the same way everywhere.
//!
//! | form | meaning |
//! |---|---|
//! | `4096` | a plain number: bytes (sizes), bytes per second (rates); for durations the unit the argument always had (seconds for `--read-wait`, milliseconds for `final-budget-ms`) |
//! | `100k`, `100kB`, `100M`, `100MB`, `1.5G`, `2T` | SI, powers of 1000: `100M` is 100 000 000 bytes |
//! | `100Ki`, `100KiB`, `100MiB`, `1.5GiB` | IEC, powers of 1024: `100MiB` is 104 857 600 bytes |
//! | `12MB/s`, `12MiB/s`, `12MBps` | a rate in bytes per second (`/s` is optional) |
//! | `100mbit`, `100Mbit/s`, `100mbps`, `1Gibit` | a rate in bits per second (8 bits a byte) |
//! | `500ms`, `2s`, `1h30m`, `1d` | a duration ([`humantime`]'s units: `ns`, `us`, `ms`, `s`, `m`, `h`, `d`, ...) |
//!
//! Letters are case-insensitive (`100mb` = `100MB`) except in `bps` (bits) against `Bps` (bytes).
//! Before this convention `row-migrate --max-bandwidth 100M` meant 100 MiB/s; it now means
//! 100 MB/s, as `M` does everywhere else; write `100MiB` for the old value.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

pub mod serde;

/// What a plain number (no unit) means in a duration argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plain {
    /// Seconds (`--read-wait 2`, `--timeout 30`).
    Seconds,
    /// Milliseconds (`final-budget-ms: 50`).
    Millis,
}

impl Plain {
    fn name(self) -> &'static str {
        match self {
            Plain::Seconds => "seconds",
            Plain::Millis => "milliseconds",
        }
    }
}

/// Why a value was refused. Its text completes `invalid value '...' for '--flag': `, as clap
/// words it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnitError {
    /// Not a size.
    #[error("expected a size like 100MiB (IEC), 100M (SI) or a number of bytes")]
    Size,
    /// Not a rate.
    #[error("expected a rate like 100mbit, 12MiB/s or bytes per second")]
    Rate,
    /// Not a duration.
    #[error("expected a duration like 500ms, 2s or 1h30m, or a number of {}", .0.name())]
    Duration(Plain),
    /// Zero (or less) where only a positive value makes sense.
    #[error("must be more than zero")]
    Zero,
    /// Beyond what the argument can hold.
    #[error("is too large")]
    TooLarge,
}

/// A size in bytes: a plain number of bytes, or a number with an SI (`100M`) or IEC (`100MiB`)
/// unit.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    if t.is_empty() || t.starts_with(['-', '+']) {
        return Err(UnitError::Size);
    }
    // parse-size's default configuration is the SI one: K, M, G are powers of 1000, and only
    // Ki, Mi, Gi (with or without B) are powers of 1024.
    parse_size::parse_size(t).map_err(|e| match e {
        parse_size::Error::PosOverflow => UnitError::TooLarge,
        _ => UnitError::Size,
    })
}

/// A rate in bytes per second: a plain number of bytes per second, a size per second (`12MB/s`,
/// `12MiB/s`, `12MBps`), or bits per second (`100mbit`, `100Mbit/s`, `100mbps`).
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let (t, bits) = if let Some(rest) = t.strip_suffix("bps") {
        (rest, true)
    } else if let Some(rest) = t.strip_suffix("Bps") {
        (rest, false)
    } else {
        let t = t.strip_suffix("/s").unwrap_or(t);
        let lower = t.to_ascii_lowercase();
        match ["bits", "bit"].iter().find(|suffix| lower.ends_with(*suffix)) {
            Some(suffix) => (&t[..t.len() - suffix.len()], true),
            None => (t, false),
        }
    };
    // A unit letter must remain in front of `bit`/`bps`, or a number: `100bit` is 100 bits.
    if t.trim().is_empty() || t.trim_end().ends_with(['b', 'B']) && bits {
        return Err(UnitError::Rate);
    }
    let n = parse_size(t).map_err(|e| if e == UnitError::TooLarge { e } else { UnitError::Rate })?;
    Ok(if bits { n / 8 + u64::from(n % 8 >= 4) } else { n })
}

/// A duration: a number with [`humantime`]'s units (`500ms`, `2s`, `1h30m`), or a plain number
/// (fractions allowed) in the unit `plain` says.
pub fn parse_duration(s: &str, plain: Plain) -> Result<Duration, UnitError> {
    let t = s.trim();
    if let Ok(n) = t.parse::<f64>() {
        if !n.is_finite() || n < 0.0 || t.starts_with('-') {
            return Err(UnitError::Duration(plain));
        }
        let secs = match plain {
            Plain::Seconds => n,
            Plain::Millis => n / 1000.0,
        };
        return Duration::try_from_secs_f64(secs).map_err(|_| UnitError::TooLarge);
    }
    humantime::parse_duration(t).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => UnitError::TooLarge,
        _ => UnitError::Duration(plain),
    })
}

/// [`parse_duration`] with plain numbers in seconds, for clap's `value_parser`.
pub fn seconds(s: &str) -> Result<Duration, UnitError> {
    parse_duration(s, Plain::Seconds)
}

/// [`seconds`], refusing zero.
pub fn positive_seconds(s: &str) -> Result<Duration, UnitError> {
    match seconds(s)? {
        d if d.is_zero() => Err(UnitError::Zero),
        d => Ok(d),
    }
}

/// [`parse_size`], refusing zero, for clap's `value_parser`.
pub fn positive_size(s: &str) -> Result<u64, UnitError> {
    match parse_size(s)? {
        0 => Err(UnitError::Zero),
        n => Ok(n),
    }
}

/// [`parse_rate`], refusing zero, for clap's `value_parser`.
pub fn positive_rate(s: &str) -> Result<u64, UnitError> {
    match parse_rate(s)? {
        0 => Err(UnitError::Zero),
        n => Ok(n),
    }
}

/// A byte count for people: IEC units with up to one decimal (`1.5 GiB`, `4 KiB`, `512 B`).
pub fn format_size(bytes: u64) -> String {
    Iec(bytes).to_string()
}

/// A rate for people: bytes per second in IEC units (`12.5 MiB/s`).
pub fn format_rate(bytes_per_second: u64) -> String {
    format!("{}/s", Iec(bytes_per_second))
}

struct Iec(u64);

impl fmt::Display for Iec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        let rounded = (value * 10.0).round() / 10.0;
        if rounded.fract() == 0.0 {
            write!(f, "{rounded:.0} {}", UNITS[unit])
        } else {
            write!(f, "{rounded:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_si_unless_iec_is_written() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("100M"), Ok(100_000_000));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("100mb"), Ok(100_000_000));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("100Mi"), Ok(100 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1500));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size(" 64 KiB "), Ok(64 << 10));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn bad_sizes_are_refused_with_one_line() {
        for bad in ["", "-1", "+1", "abc", "10 parsecs", "1.5.5M", "NaN", "100mbit"] {
            assert_eq!(parse_size(bad), Err(UnitError::Size), "{bad}");
        }
        assert_eq!(parse_size("100EiB"), Err(UnitError::TooLarge));
        assert_eq!(positive_size("0"), Err(UnitError::Zero));
        let msg = UnitError::Size.to_string();
        assert!(!msg.contains('\n') && msg.contains("100MiB"), "{msg}");
    }

    #[test]
    fn rates_in_bytes_or_bits() {
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("12MB/s"), Ok(12_000_000));
        assert_eq!(parse_rate("12MiB/s"), Ok(12 << 20));
        assert_eq!(parse_rate("12MBps"), Ok(12_000_000));
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("100mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("100Mbit/s"), Ok(12_500_000));
        assert_eq!(parse_rate("100 Mbit/s"), Ok(12_500_000));
        assert_eq!(parse_rate("100mbps"), Ok(12_500_000));
        assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("1Gibit"), Ok(1 << 27));
        assert_eq!(parse_rate("100bits"), Ok(13));
        assert_eq!(parse_rate("1kbit"), Ok(125));
    }

    #[test]
    fn bad_rates_are_refused() {
        for bad in ["", "10 parsecs", "fast", "-1M", "bit", "/s", "12MBbit", "Mbit"] {
            assert_eq!(parse_rate(bad), Err(UnitError::Rate), "{bad}");
        }
        assert_eq!(positive_rate("0"), Err(UnitError::Zero));
        assert_eq!(positive_rate("0mbit"), Err(UnitError::Zero));
        assert_eq!(UnitError::Rate.to_string(), "expected a rate like 100mbit, 12MiB/s or bytes per second");
    }

    #[test]
    fn durations_with_units_or_the_old_plain_unit() {
        assert_eq!(parse_duration("2", Plain::Seconds), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5", Plain::Seconds), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("50", Plain::Millis), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("500ms", Plain::Seconds), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s", Plain::Millis), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h30m", Plain::Seconds), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m", Plain::Seconds), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0", Plain::Seconds), Ok(Duration::ZERO));
        assert_eq!(seconds("15m"), Ok(Duration::from_secs(900)));
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in ["", "soon", "-1", "-1s", "inf", "NaN", "10 parsecs", "2 fortnights"] {
            assert_eq!(parse_duration(bad, Plain::Seconds), Err(UnitError::Duration(Plain::Seconds)), "{bad}");
        }
        assert_eq!(positive_seconds("0s"), Err(UnitError::Zero));
        assert_eq!(positive_seconds("0"), Err(UnitError::Zero));
        assert_eq!(parse_duration("1e300", Plain::Seconds), Err(UnitError::TooLarge));
        assert_eq!(
            UnitError::Duration(Plain::Millis).to_string(),
            "expected a duration like 500ms, 2s or 1h30m, or a number of milliseconds"
        );
    }

    #[test]
    fn sizes_print_in_iec_units() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_rate(100 << 20), "100 MiB/s");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }
}
