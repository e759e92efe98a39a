//! How `nbd-row-proxy` and `row-migrate` log: one line per event on stderr, as text or JSON
//! (`--log-format`), filtered by `RUST_LOG` (an invalid one is an error, not silently ignored),
//! with ANSI colour only when stderr is a terminal and `NO_COLOR` is unset.
//!
//! Levels mean the same in both: `ERROR` something failed and the process stops or the
//! operation is lost; `WARN` something an operator should look at, with the reason; `INFO` what
//! the process does (start, stop, a migration's phases); `DEBUG` ordinary client behaviour (a
//! client that lists exports, asks for an export that is not there, or hangs up).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing_subscriber::EnvFilter;

/// The variable that filters logging, as in every `tracing` program.
pub const FILTER_VAR: &str = "RUST_LOG";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIMESTAMP LEVEL target: message key=value ...`
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's fields.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, Error)]
pub enum LogError {
    /// `RUST_LOG` does not parse.
    #[error("invalid {FILTER_VAR} '{value}': {reason}")]
    Filter {
        /// The variable's value.
        value: String,
        /// What the parser said.
        reason: String,
    },
    /// `RUST_LOG` is not UTF-8.
    #[error("invalid {FILTER_VAR}: not UTF-8")]
    NotUnicode,
    /// A subscriber was installed already.
    #[error("logging is set up already: {0}")]
    Installed(String),
}

/// An error and its causes on one line, `: `-separated, each cause once: a cause whose text the
/// line already ends with (a message that embeds its source, as some libraries' do) is not
/// repeated. What both binaries print and what the control socket answers.
pub fn error_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// The filter: `RUST_LOG` if set and not empty, else `default` (e.g. `info`). rustls logs only
/// its errors unless the filter names it: its warnings are about clients (an NBD client over TLS
/// that sends an IP address as its server name, as gnutls does), nothing an operator acts on.
pub fn filter(default: &str) -> Result<EnvFilter, LogError> {
    let value = match std::env::var(FILTER_VAR) {
        Ok(v) if !v.trim().is_empty() => v,
        Ok(_) | Err(std::env::VarError::NotPresent) => default.to_owned(),
        Err(std::env::VarError::NotUnicode(_)) => return Err(LogError::NotUnicode),
    };
    let directives = with_quiet_rustls(&value);
    EnvFilter::builder().parse(&directives).map_err(|e| LogError::Filter { value, reason: e.to_string() })
}

/// `value` with `rustls=error` added, unless it says something of rustls itself.
fn with_quiet_rustls(value: &str) -> String {
    if value.contains("rustls") {
        value.to_owned()
    } else {
        format!("{value},rustls=error")
    }
}

/// Whether to write ANSI colour codes: only to a terminal, and not with `NO_COLOR` set.
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && !matches!(std::env::var_os("NO_COLOR"), Some(v) if !v.is_empty())
}

/// Installs the global subscriber: `format` lines on stderr, filtered by `RUST_LOG` or
/// `default`.
pub fn init(format: LogFormat, default: &str) -> Result<(), LogError> {
    let filter = filter(default)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(colour()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_ansi(false).try_init(),
    };
    installed.map_err(|e| LogError::Installed(e.to_string()))
}

/// Keeps a flood of like events (a refused connection, a failed handshake) from flooding the
/// log: the first is logged, and then at most one line per `interval`, which says how many were
/// left out since the last one. [`RateLimit::overdue`] gives the count of events left out when
/// no new one comes to carry it, for a summary on a timer.
///
/// ```
/// # use std::time::Duration;
/// static REFUSED: logging::RateLimit = logging::RateLimit::new(Duration::from_secs(10));
/// for _ in 0..1000 {
///     if let Some(suppressed) = REFUSED.hit() {
///         eprintln!("refusing a connection ({suppressed} more refused since the last message)");
///     }
/// }
/// ```
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the last line was let through.
    logged: Option<Instant>,
    /// Events left out since then.
    suppressed: u64,
}

impl RateLimit {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self { interval, window: Mutex::new(Window { logged: None, suppressed: 0 }) }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// An event now: `Some(n)` to log it, `n` like events having been left out since the last
    /// line; `None` to leave it out (it is counted).
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    /// [`RateLimit::hit`] at `now`.
    pub fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        match w.logged {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                w.suppressed += 1;
                None
            }
            _ => {
                w.logged = Some(now);
                Some(std::mem::take(&mut w.suppressed))
            }
        }
    }

    /// `Some(n)` once the interval since the last line is over and `n > 0` events were left out
    /// since then: log a summary line (it counts as the interval's line).
    pub fn overdue(&self) -> Option<u64> {
        self.overdue_at(Instant::now())
    }

    /// [`RateLimit::overdue`] at `now`.
    pub fn overdue_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let over = w.logged.is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if !over || w.suppressed == 0 {
            return None;
        }
        w.logged = Some(now);
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_logs_errors_only_unless_named() {
        assert_eq!(with_quiet_rustls("info"), "info,rustls=error");
        assert_eq!(with_quiet_rustls("debug,rustls=trace"), "debug,rustls=trace");
        assert!(EnvFilter::builder().parse(with_quiet_rustls("nbd_row_proxy=debug")).is_ok());
    }

    /// A library error whose message embeds its source, as rustls' PEM error does.
    #[derive(Debug, Error)]
    #[error("I/O error: {0}")]
    struct Embeds(#[source] std::io::Error);

    #[derive(Debug, Error)]
    #[error("TLS credentials: /etc/x/ca-cert.pem")]
    struct Outer(#[source] Embeds);

    #[test]
    fn each_cause_is_printed_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = Outer(Embeds(io()));
        assert_eq!(error_line(&e), format!("TLS credentials: /etc/x/ca-cert.pem: I/O error: {}", io()));
        let chained = anyhow::Error::from(io()).context("reading the key").context("reload-protection");
        assert_eq!(error_line(chained.as_ref()), format!("reload-protection: reading the key: {}", io()));
    }

    #[test]
    fn a_flood_makes_one_line_per_interval_with_the_count_left_out() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(limit.hit_at(t0), Some(0), "the first is logged");
        assert_eq!((0..99).filter_map(|_| limit.hit_at(at(1))).count(), 0, "the rest of the interval is not");
        assert_eq!(limit.overdue_at(at(9)), None, "no summary before the interval is over");
        assert_eq!(limit.hit_at(at(10)), Some(99), "the next line says how many were left out");
        assert_eq!(limit.hit_at(at(11)), None);
        assert_eq!(limit.hit_at(at(12)), None);
        // No event comes to carry the count: the timer's summary does, once.
        assert_eq!(limit.overdue_at(at(15)), None);
        assert_eq!(limit.overdue_at(at(20)), Some(2));
        assert_eq!(limit.overdue_at(at(40)), None, "nothing left out since");
        assert_eq!(limit.hit_at(at(25)), None, "the summary counts as the interval's line");
        assert_eq!(limit.hit_at(at(30)), Some(1));
        assert_eq!(limit.hit_at(at(100)), Some(0), "a quiet log logs every event");
    }

    #[test]
    fn filters_parse_or_say_why_not() {
        // One test touches the variable, so tests running in parallel do not race on it.
        std::env::remove_var(FILTER_VAR);
        assert!(filter("info").is_ok());
        std::env::set_var(FILTER_VAR, "nbd_row_proxy=debug,warn");
        assert!(filter("info").is_ok());
        std::env::set_var(FILTER_VAR, "   ");
        assert!(filter("info").is_ok());
        std::env::set_var(FILTER_VAR, "nbd_row_proxy=loud");
        let e = filter("info").unwrap_err().to_string();
        assert!(e.starts_with("invalid RUST_LOG 'nbd_row_proxy=loud': "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        std::env::remove_var(FILTER_VAR);
    }
}
