//! The error type of every [`Qmp`](crate::Qmp) operation.

use std::io;
use std::time::Duration;

use qmp_proto::{ClientError, CommandError};
use thiserror::Error;

/// Why a QMP operation failed.
///
/// Only [`Io`](Self::Io) and [`Closed`](Self::Closed) mean the connection is gone; after any
/// other error the same [`Qmp`](crate::Qmp) can go on sending commands.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP connection")]
    Io(#[from] io::Error),
    /// The peer closed the connection (or an earlier write was cut short).
    #[error("QMP connection closed")]
    Closed,
    /// Nothing arrived in time. A late reply is recognised by its id and dropped.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited, e.g. `reply to query-status` or `event`.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A line that is not QMP. The line is skipped; the connection stays usable, but the
    /// reply to the command in flight may have been that line.
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
    /// The socket is not a QMP server at all (e.g. an NBD server's socket).
    #[error("not a QMP socket: {0}")]
    NotQmp(String),
    /// The socket is QMP, but not the server that was expected: QEMU's monitor where a proxy's
    /// control socket was wanted, or the reverse.
    #[error("{found}, not {expected}")]
    WrongPeer {
        /// What was expected, e.g. `QEMU's QMP socket`.
        expected: String,
        /// What the greeting says it is.
        found: String,
    },
    /// The command ran and the server answered with an error.
    #[error("QMP command {command} failed: {error}")]
    Command {
        /// The command's name.
        command: String,
        /// The server's `{"class", "desc"}`.
        error: CommandError,
    },
    /// The command's arguments could not be serialised to a JSON object.
    #[error("cannot encode the arguments of {command}: {error}")]
    Encode {
        /// The command's name.
        command: String,
        /// What serde said.
        error: serde_json::Error,
    },
    /// The command succeeded but its reply lacks something this helper needs (e.g. a
    /// `query-status` reply without a `status` string).
    #[error("unexpected reply to {command}: {reason}")]
    UnexpectedReply {
        /// The command's name.
        command: String,
        /// What was missing or malformed.
        reason: String,
    },
}

impl QmpError {
    /// Maps a [`ClientError`] met while doing `what` (for timeouts and command errors).
    pub(crate) fn from_client(error: ClientError, command: &str, what: &str, timeout: Duration) -> Self {
        match error {
            ClientError::Io(e) => Self::Io(e),
            ClientError::Closed => Self::Closed,
            ClientError::Timeout => Self::Timeout { what: what.to_owned(), timeout },
            ClientError::Protocol(p) => Self::Protocol(p),
            ClientError::Command(error) => Self::Command { command: command.to_owned(), error },
            ClientError::NotQmp(what) => Self::NotQmp(what),
        }
    }

    /// True for [`Timeout`](Self::Timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// True when the connection is gone ([`Io`](Self::Io) or [`Closed`](Self::Closed)).
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Self::Io(_) | Self::Closed)
    }

    /// The server's error reply, for [`Command`](Self::Command).
    pub fn command_error(&self) -> Option<&CommandError> {
        match self {
            Self::Command { error, .. } => Some(error),
            _ => None,
        }
    }
}
