use thiserror::Error;

/// Bytes that can never form a valid frame, or block data that does not decode; the session
/// cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StreamError {
    /// A frame's CRC-32 did not match its contents.
    #[error("migration frame checksum mismatch (stream corrupted in transit)")]
    Checksum,
    /// A frame's header or payload is inconsistent with its type.
    #[error("malformed migration frame: {0}")]
    Malformed(&'static str),
    /// A frame type this implementation does not know.
    #[error("unknown migration frame type {0} (not a migration stream, or a newer peer)")]
    UnknownType(u8),
    /// A hello did not start with [`MAGIC`](crate::MAGIC).
    #[error("peer is not speaking the nbd-row-proxy migration protocol (bad magic)")]
    NotAMigrationStream,
    /// The peer speaks a protocol version this implementation does not.
    #[error("migration protocol version mismatch: we speak version {ours}, the peer speaks {theirs}")]
    Version {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A frame header announced a payload larger than
    /// [`MAX_FRAME_PAYLOAD`](crate::MAX_FRAME_PAYLOAD).
    #[error("migration frame announces a {0}-byte payload, more than the {max} accepted", max = crate::MAX_FRAME_PAYLOAD)]
    TooLarge(u32),
    /// Block data did not decode to the announced length.
    #[error("corrupt migration block data: {0}")]
    Corrupt(&'static str),
}
