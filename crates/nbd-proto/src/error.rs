use thiserror::Error;

/// Bytes that can never form a valid message; the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// A fixed magic number did not match.
    #[error("bad {what} magic: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        /// Which magic was checked.
        what: &'static str,
        /// The value the spec requires.
        expected: u64,
        /// The value received.
        found: u64,
    },
    /// An option's data is longer than this implementation accepts.
    #[error("option {option} carries {length} bytes, more than the {max} accepted")]
    OptionTooLong {
        /// Option code.
        option: u32,
        /// Announced data length.
        length: u32,
        /// Largest accepted length.
        max: u32,
    },
    /// A reply or message field is inconsistent with its length.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The client announced flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
}
