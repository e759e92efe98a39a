//! The ownership record: what a proxy persists next to its image (`IMAGE.ownership`) so that a
//! restart keeps honouring a migration's hand-over.
//!
//! No record means this host owns the disk. A source writes one when it starts a migration and
//! updates it as the hand-over proceeds; a destination writes one when it accepts a session. The
//! proxy writes it to a temporary file, syncs it, renames it over the old one and syncs the
//! directory, so a crash leaves either the old record or the new one.

use std::fmt;
use std::time::SystemTime;

use crate::phase::Strategy;
use serde::{Deserialize, Serialize};

/// Format version of the record.
pub const RECORD_VERSION: u32 = 1;

/// A migration session's id: 16 random bytes, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// Parses 32 hex digits.
    pub fn parse(hex: &str) -> Option<Self> {
        if hex.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad session id {s:?}")))
    }
}

/// A moment, as RFC 3339 UTC text (what `query-status` shows).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Where a source's hand-over is, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceStage {
    /// Pre-copy: the source still owns the disk. A restart rolls the migration back.
    Precopy,
    /// Writes refused; the commit may or may not have reached the destination.
    Finishing,
    /// The destination committed.
    HandedOver,
    /// The session ended: the destination owns the disk.
    Completed,
}

/// Where a destination is, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestStage {
    /// A session began overwriting the image and did not commit: the image is not a disk.
    Incomplete,
    /// The session committed: the image is the whole disk, durable.
    Committed,
    /// This host owns the disk.
    Owner,
}

/// The record itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "kebab-case")]
pub enum Ownership {
    /// This proxy is (or was) the source of a migration.
    Source {
        /// Where the hand-over is.
        stage: SourceStage,
        /// The session.
        session: SessionId,
        /// The destination (`tcp:HOST:PORT`).
        peer: String,
        /// The method.
        strategy: Strategy,
        /// When writes started to be refused (finishing and later), RFC 3339.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fenced_since: Option<String>,
        /// Handed over by post-copy and not all pushed yet: the destination still reads blocks
        /// from this disk, which must be kept as it is until the destination holds them all.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        postcopy: bool,
        /// Handed over on the destination's claim (a VM manager migrated the guest): nobody
        /// else says when it is complete, so the source does once the destination holds every
        /// block, after a restart too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        claimed: bool,
    },
    /// This proxy is (or was) the destination of a migration.
    Destination {
        /// Where the destination is.
        stage: DestStage,
        /// The session.
        session: SessionId,
        /// When it got there, RFC 3339.
        since: String,
        /// Committed by a post-copy: blocks came after the commit, so the residual log must be
        /// there (until it says the post-copy completed); without it nothing proves which
        /// blocks this host holds.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        postcopy: bool,
    },
}

/// A record that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("the ownership record is not valid: {0}")]
pub struct BadRecord(String);

#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u32,
    #[serde(flatten)]
    ownership: Ownership,
}

impl Ownership {
    /// The file's bytes: one JSON object and a newline, readable by people.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(&Envelope { version: RECORD_VERSION, ownership: self.clone() })
            .expect("the record serialises");
        out.push(b'\n');
        out
    }

    /// Parses the file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, BadRecord> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| BadRecord(e.to_string()))?;
        if env.version != RECORD_VERSION {
            return Err(BadRecord(format!("version {}, this program reads {RECORD_VERSION}", env.version)));
        }
        Ok(env.ownership)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_print_and_parse_as_hex() {
        let id = SessionId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(SessionId::parse(&id.to_string()), Some(id));
        assert_eq!(SessionId::parse("xyz"), None);
        assert_eq!(SessionId::parse(&"g".repeat(32)), None);
    }

    #[test]
    fn records_round_trip_and_reject_other_versions() {
        let r = Ownership::Source {
            stage: SourceStage::HandedOver,
            session: SessionId([1; 16]),
            peer: "tcp:192.0.2.2:10810".into(),
            strategy: Strategy::Row,
            fenced_since: Some(now_rfc3339()),
            postcopy: true,
            claimed: true,
        };
        let bytes = r.encode();
        assert!(std::str::from_utf8(&bytes).unwrap().contains("\"handed-over\""));
        assert_eq!(Ownership::decode(&bytes).unwrap(), r);
        let d = Ownership::Destination {
            stage: DestStage::Owner,
            session: SessionId([2; 16]),
            since: now_rfc3339(),
            postcopy: true,
        };
        assert_eq!(Ownership::decode(&d.encode()).unwrap(), d);
        let other = String::from_utf8(bytes).unwrap().replace("\"version\": 1", "\"version\": 9");
        assert!(Ownership::decode(other.as_bytes()).is_err());
        assert!(Ownership::decode(b"garbage").is_err());
    }
}
