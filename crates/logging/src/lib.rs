//! How `nbd-row-proxy` and `row-migrate` log: one line per event on stderr, as text or JSON
//! (`--log-format`), filtered by `RUST_LOG` (an invalid one is an error, not silently ignored),
//! with ANSI colour only when stderr is a terminal and `NO_COLOR` is unset.
//!
//! Levels mean the same in both: `ERROR` something failed and the process stops or the
//! operation is lost; `WARN` something an operator should look at, with the reason; `INFO` what
//! the process does (start, stop, a migration's phases); `DEBUG` ordinary client behaviour (a
//! client that lists exports, asks for an export that is not there, or hangs up).

use std::io::IsTerminal;

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

/// The filter: `RUST_LOG` if set and not empty, else `default` (e.g. `info`).
pub fn filter(default: &str) -> Result<EnvFilter, LogError> {
    let value = match std::env::var(FILTER_VAR) {
        Ok(v) if !v.trim().is_empty() => v,
        Ok(_) | Err(std::env::VarError::NotPresent) => default.to_owned(),
        Err(std::env::VarError::NotUnicode(_)) => return Err(LogError::NotUnicode),
    };
    EnvFilter::builder().parse(&value).map_err(|e| LogError::Filter { value, reason: e.to_string() })
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

#[cfg(test)]
mod tests {
    use super::*;

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
