//! Frames and the messages they carry.

use std::fmt;
use std::str::FromStr;

use crate::{StreamError, MAGIC, MAX_BLOCK_LEN, VERSION};

/// Size of a frame header: type, flags, reserved, payload_len.
pub const HEADER_LEN: usize = 8;
/// Bytes a frame adds around its payload: the header and the trailing CRC-32.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + 4;
/// Size of a `Data` payload's fixed fields (offset, codec, logical_len) before the data.
pub const DATA_HEADER_LEN: usize = 8 + 1 + 4;
/// The largest frame payload accepted: a full [`MAX_BLOCK_LEN`] block plus the `Data` fields.
pub const MAX_FRAME_PAYLOAD: usize = MAX_BLOCK_LEN + FETCHED_HEADER_LEN;
/// Bytes of a `Fetch` payload: id, offset and length.
const FETCH_LEN: usize = 8 + 8 + 4;
/// Bytes of a `Fetched` payload before the encoded block: the request id and the `Data` fields.
pub const FETCHED_HEADER_LEN: usize = 8 + DATA_HEADER_LEN;
/// The most ranges one `Missing` frame carries (its payload is at most 20 bytes a range).
pub const MAX_MISSING_RUNS: usize = 4096;
/// The longest `Reject`/`Discard`/`Error` text, in bytes; the encoder truncates longer text
/// (at a character boundary) and the decoder refuses it.
pub const MAX_REASON_LEN: usize = 4096;

/// Hellos of any version must fit this; keeps a foreign peer from making us wait for 8 MiB.
const MAX_HELLO_LEN: usize = 1024;
const HELLO_PREFIX_LEN: usize = MAGIC.len() + 2;
const SERVER_HELLO_LEN: usize = HELLO_PREFIX_LEN + 32;
const CLIENT_HELLO_LEN: usize = HELLO_PREFIX_LEN + SessionParams::ENCODED_LEN + 32 + 32;

const T_SERVER_HELLO: u8 = 1;
const T_CLIENT_HELLO: u8 = 2;
const T_ACCEPT: u8 = 3;
const T_REJECT: u8 = 4;
const T_ROUND_BEGIN: u8 = 5;
const T_DATA: u8 = 6;
const T_ZERO: u8 = 7;
const T_ROUND_END: u8 = 8;
const T_COMMIT: u8 = 9;
const T_COMMITTED: u8 = 10;
const T_DISCARD: u8 = 11;
const T_DONE: u8 = 12;
const T_ERROR: u8 = 13;
const T_REVOKE: u8 = 14;
const T_REVOKED: u8 = 15;
const T_KEEPALIVE: u8 = 16;
const T_MISSING: u8 = 17;
const T_FETCH: u8 = 18;
const T_FETCHED: u8 = 19;
const T_PUSH_DONE: u8 = 20;
const T_HOLDS: u8 = 21;
const T_RESUME: u8 = 22;
const T_RESUMED: u8 = 23;
const T_RUNNING: u8 = 24;
const T_CLAIM: u8 = 25;
const T_CLAIM_REFUSED: u8 = 26;
const T_ABANDONED: u8 = 27;
/// The last type code.
const T_LAST: u8 = T_ABANDONED;

/// How the source tracks which blocks changed between rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Follow the redirect-on-write store's rows.
    Row = 0,
    /// Follow a dirty bitmap.
    Bitmap = 1,
}

impl Strategy {
    /// The name used on the command line and in logs: `"row"` or `"bitmap"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Row => "row",
            Self::Bitmap => "bitmap",
        }
    }

    fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Row),
            1 => Some(Self::Bitmap),
            _ => None,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A strategy name that is neither `row` nor `bitmap`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown migration strategy {0:?} (expected \"row\" or \"bitmap\")")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "row" => Ok(Self::Row),
            "bitmap" => Ok(Self::Bitmap),
            other => Err(UnknownStrategy(other.to_owned())),
        }
    }
}

/// How a `Data` frame's bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// The bytes themselves.
    Raw = 0,
    /// An LZ4 block (no LZ4 frame header).
    Lz4 = 1,
}

impl Codec {
    /// `"raw"` or `"lz4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Lz4 => "lz4",
        }
    }

    fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Raw),
            1 => Some(Self::Lz4),
            _ => None,
        }
    }
}

/// What a round carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoundKind {
    /// The first full copy.
    Base = 0,
    /// Blocks changed since the previous round, while the guest still runs.
    Update = 1,
    /// The last changes, with the guest paused.
    Final = 2,
    /// After a post-copy switchover: the blocks the final round left, pushed.
    Postcopy = 3,
}

impl RoundKind {
    /// `"base"`, `"update"` or `"final"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Update => "update",
            Self::Final => "final",
            Self::Postcopy => "postcopy",
        }
    }

    fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Base),
            1 => Some(Self::Update),
            2 => Some(Self::Final),
            3 => Some(Self::Postcopy),
            _ => None,
        }
    }
}

/// What the source proposes in its hello; covered by both MACs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    /// Identifies this migration session.
    pub session_id: [u8; 16],
    /// Size of the disk in bytes.
    pub disk_size: u64,
    /// Granularity of change tracking in bytes; never 0.
    pub block_size: u32,
    /// How changes are tracked.
    pub strategy: Strategy,
}

impl SessionParams {
    /// Size of the encoded parameters.
    pub const ENCODED_LEN: usize = 16 + 8 + 4 + 1;

    /// Appends the wire form (also what the MACs cover).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session_id);
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.push(self.strategy as u8);
    }

    fn parse(r: &mut Reader<'_>) -> Result<Self, StreamError> {
        let session_id = r.array::<16>()?;
        let disk_size = r.u64()?;
        let block_size = r.u32()?;
        if block_size == 0 {
            return Err(StreamError::Malformed("session block_size is 0"));
        }
        let strategy =
            Strategy::from_wire(r.u8()?).ok_or(StreamError::Malformed("unknown strategy in session parameters"))?;
        Ok(Self { session_id, disk_size, block_size, strategy })
    }
}

/// One message of the migration stream; each is one frame on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// dest → source, first: the server's challenge.
    ServerHello {
        /// Protocol version; always [`VERSION`] once decoded.
        version: u16,
        /// The server's fresh nonce.
        nonce: [u8; 32],
    },
    /// source → dest: session proposal and the client's proof of the key.
    ClientHello {
        /// Protocol version; always [`VERSION`] once decoded.
        version: u16,
        /// The proposed session.
        params: SessionParams,
        /// The client's fresh nonce.
        nonce: [u8; 32],
        /// [`client_mac`](crate::client_mac) over both nonces and `params`.
        mac: [u8; 32],
    },
    /// dest → source: session accepted, with the server's proof of the key (mutual auth).
    Accept {
        /// [`server_mac`](crate::server_mac) over both nonces and the params.
        mac: [u8; 32],
    },
    /// dest → source: session refused; the dest closes after this.
    Reject {
        /// Why, for the operator.
        reason: String,
    },
    /// Starts a round of block transfers.
    RoundBegin {
        /// Round number.
        round: u32,
        /// What the round carries.
        kind: RoundKind,
    },
    /// A block of disk data.
    Data {
        /// Byte offset on the disk.
        offset: u64,
        /// How `payload` is encoded.
        codec: Codec,
        /// Length of the block once decoded, 1..=[`MAX_BLOCK_LEN`].
        logical_len: u32,
        /// The encoded bytes; see [`decode_block`](crate::decode_block).
        payload: Vec<u8>,
    },
    /// A range that reads as zeroes; no payload.
    Zero {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes; never 0.
        len: u64,
    },
    /// Ends a round.
    RoundEnd {
        /// Round number, as in its `RoundBegin`.
        round: u32,
    },
    /// source: everything is sent; make it durable.
    Commit,
    /// dest: fsynced; the disk is yours.
    Committed,
    /// source: throw the session away.
    Discard {
        /// Why, for the operator.
        reason: String,
    },
    /// source: migration complete; close.
    Done,
    /// dest → source: the session failed.
    Error {
        /// What went wrong, for the operator.
        message: String,
    },
    /// source → dest, the first message of a session: give back the disk of this session (the
    /// switchover failed). Answered by `Revoked`, or `Error` once the destination owns the disk.
    Revoke,
    /// dest → source: the disk of the session is given back (or was never held).
    Revoked,
    /// source → dest: the session is alive though it has nothing to send (while the VM's
    /// memory moves); a session silent for long is dropped.
    Keepalive,
    /// source → dest, in a post-copy switchover's final round (and dest → source in answer to
    /// `Resume`): these ranges have not been sent; the destination fetches them when read and
    /// the source pushes them after the switchover. Up to [`MAX_MISSING_RUNS`] ranges, in
    /// increasing order, each as LEB128 varints (gap from the end of the one before, length):
    /// the list is sent while the guest is paused, often over the link QEMU's memory stream is
    /// still draining, so it is kept small (about 5 bytes a range instead of 28).
    Missing {
        /// `(offset, len)` byte ranges, increasing and apart; no length is 0.
        runs: Vec<(u64, u64)>,
    },
    /// dest → source: send this range now, ahead of everything else (a read waits for it).
    Fetch {
        /// The destination's id for the request, echoed in the answer.
        id: u64,
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes, 1..=[`MAX_BLOCK_LEN`].
        len: u32,
    },
    /// source → dest: the answer to a `Fetch`: the range's current content.
    Fetched {
        /// The request's id.
        id: u64,
        /// Byte offset on the disk.
        offset: u64,
        /// How `payload` is encoded.
        codec: Codec,
        /// Length once decoded, as the request's.
        logical_len: u32,
        /// The encoded bytes.
        payload: Vec<u8>,
    },
    /// source → dest: every missing range has been pushed; answer `Holds` once all is durable.
    PushDone,
    /// dest → source: every block of the disk is durable here; the post-copy is over.
    Holds,
    /// source → dest, the first message of a reconnection during post-copy: what is still missing?
    Resume,
    /// dest → source: the `Missing` ranges sent before this are all that is still missing.
    Resumed,
    /// dest → source, after a post-copy commit: the guest runs here now (its first request
    /// came), so the push no longer competes with the memory migration's last bytes.
    Running,
    /// dest → source, before any commit: the guest runs here and wants to write (a VM manager
    /// migrated it and the source QEMU is inactive): hand the disk over now. An armed source
    /// answers with the final round (what is left goes to post-copy) and the commit.
    Claim,
    /// source → dest: the `Claim` is refused (the source is not armed for it); writes here
    /// stay refused.
    ClaimRefused {
        /// Why, UTF-8, at most [`MAX_REASON_LEN`] bytes.
        reason: String,
    },
    /// dest → source, before any commit: the destination's QEMU came and went without its guest
    /// writing (the VM manager abandoned its migration): an armed source disarms (the disk
    /// stays with it) and discards the session.
    Abandoned {
        /// What the destination saw, UTF-8, at most [`MAX_REASON_LEN`] bytes.
        reason: String,
    },
}

impl Message {
    /// A `Data` message for `block` (1..=[`MAX_BLOCK_LEN`] bytes), LZ4-compressed when `compress`
    /// is set and that makes it smaller.
    pub fn data(offset: u64, block: &[u8], compress: bool) -> Self {
        debug_assert!(!block.is_empty() && block.len() <= MAX_BLOCK_LEN);
        let (codec, payload) = crate::encode_block(block, compress);
        Self::Data { offset, codec, logical_len: block.len() as u32, payload }
    }

    /// A `Fetched` answer to request `id`, like [`Message::data`].
    pub fn fetched(id: u64, offset: u64, block: &[u8], compress: bool) -> Self {
        debug_assert!(!block.is_empty() && block.len() <= MAX_BLOCK_LEN);
        let (codec, payload) = crate::encode_block(block, compress);
        Self::Fetched { id, offset, codec, logical_len: block.len() as u32, payload }
    }

    /// The message's name, for logs and "unexpected message" errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ServerHello { .. } => "ServerHello",
            Self::ClientHello { .. } => "ClientHello",
            Self::Accept { .. } => "Accept",
            Self::Reject { .. } => "Reject",
            Self::RoundBegin { .. } => "RoundBegin",
            Self::Data { .. } => "Data",
            Self::Zero { .. } => "Zero",
            Self::RoundEnd { .. } => "RoundEnd",
            Self::Commit => "Commit",
            Self::Committed => "Committed",
            Self::Discard { .. } => "Discard",
            Self::Done => "Done",
            Self::Error { .. } => "Error",
            Self::Revoke => "Revoke",
            Self::Revoked => "Revoked",
            Self::Keepalive => "Keepalive",
            Self::Missing { .. } => "Missing",
            Self::Fetch { .. } => "Fetch",
            Self::Fetched { .. } => "Fetched",
            Self::PushDone => "PushDone",
            Self::Holds => "Holds",
            Self::Resume => "Resume",
            Self::Resumed => "Resumed",
            Self::Running => "Running",
            Self::Claim => "Claim",
            Self::ClaimRefused { .. } => "ClaimRefused",
            Self::Abandoned { .. } => "Abandoned",
        }
    }

    fn type_code(&self) -> u8 {
        match self {
            Self::ServerHello { .. } => T_SERVER_HELLO,
            Self::ClientHello { .. } => T_CLIENT_HELLO,
            Self::Accept { .. } => T_ACCEPT,
            Self::Reject { .. } => T_REJECT,
            Self::RoundBegin { .. } => T_ROUND_BEGIN,
            Self::Data { .. } => T_DATA,
            Self::Zero { .. } => T_ZERO,
            Self::RoundEnd { .. } => T_ROUND_END,
            Self::Commit => T_COMMIT,
            Self::Committed => T_COMMITTED,
            Self::Discard { .. } => T_DISCARD,
            Self::Done => T_DONE,
            Self::Error { .. } => T_ERROR,
            Self::Revoke => T_REVOKE,
            Self::Revoked => T_REVOKED,
            Self::Keepalive => T_KEEPALIVE,
            Self::Missing { .. } => T_MISSING,
            Self::Fetch { .. } => T_FETCH,
            Self::Fetched { .. } => T_FETCHED,
            Self::PushDone => T_PUSH_DONE,
            Self::Holds => T_HOLDS,
            Self::Resume => T_RESUME,
            Self::Resumed => T_RESUMED,
            Self::Running => T_RUNNING,
            Self::Claim => T_CLAIM,
            Self::ClaimRefused { .. } => T_CLAIM_REFUSED,
            Self::Abandoned { .. } => T_ABANDONED,
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::ServerHello { .. } => SERVER_HELLO_LEN,
            Self::ClientHello { .. } => CLIENT_HELLO_LEN,
            Self::Accept { .. } => 32,
            Self::Reject { reason: s }
            | Self::Discard { reason: s }
            | Self::Error { message: s }
            | Self::ClaimRefused { reason: s }
            | Self::Abandoned { reason: s } => clip(s).len(),
            Self::RoundBegin { .. } => 5,
            Self::Data { payload, .. } => DATA_HEADER_LEN + payload.len(),
            Self::Zero { .. } => 16,
            Self::Missing { runs } => missing_payload(runs).len(),
            Self::RoundEnd { .. } => 4,
            Self::Fetch { .. } => FETCH_LEN,
            Self::Fetched { payload, .. } => FETCHED_HEADER_LEN + payload.len(),
            Self::Commit
            | Self::Committed
            | Self::Done
            | Self::Revoke
            | Self::Revoked
            | Self::Keepalive
            | Self::PushDone
            | Self::Holds
            | Self::Resume
            | Self::Resumed
            | Self::Running
            | Self::Claim => 0,
        }
    }

    /// Bytes the frame takes on the wire (header, payload and CRC).
    pub fn wire_len(&self) -> usize {
        FRAME_OVERHEAD + self.payload_len()
    }

    /// Appends the frame. Text longer than [`MAX_REASON_LEN`] is truncated. A `Data` payload
    /// must be consistent with its codec and `logical_len` (as [`Message::data`] makes it), or
    /// the peer refuses the frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let payload_len = self.payload_len();
        out.reserve(FRAME_OVERHEAD + payload_len);
        out.push(self.type_code());
        out.push(0);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        match self {
            Self::ServerHello { version, nonce } => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(nonce);
            }
            Self::ClientHello { version, params, nonce, mac } => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&version.to_le_bytes());
                params.encode(out);
                out.extend_from_slice(nonce);
                out.extend_from_slice(mac);
            }
            Self::Accept { mac } => out.extend_from_slice(mac),
            Self::Reject { reason: s }
            | Self::Discard { reason: s }
            | Self::Error { message: s }
            | Self::ClaimRefused { reason: s }
            | Self::Abandoned { reason: s } => {
                out.extend_from_slice(clip(s).as_bytes());
            }
            Self::RoundBegin { round, kind } => {
                out.extend_from_slice(&round.to_le_bytes());
                out.push(*kind as u8);
            }
            Self::Data { offset, codec, logical_len, payload } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.push(*codec as u8);
                out.extend_from_slice(&logical_len.to_le_bytes());
                out.extend_from_slice(payload);
            }
            Self::Zero { offset, len } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Self::Missing { runs } => out.extend_from_slice(&missing_payload(runs)),
            Self::RoundEnd { round } => out.extend_from_slice(&round.to_le_bytes()),
            Self::Fetch { id, offset, len } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Self::Fetched { id, offset, codec, logical_len, payload } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.push(*codec as u8);
                out.extend_from_slice(&logical_len.to_le_bytes());
                out.extend_from_slice(payload);
            }
            Self::Commit
            | Self::Committed
            | Self::Done
            | Self::Revoke
            | Self::Revoked
            | Self::Keepalive
            | Self::PushDone
            | Self::Holds
            | Self::Resume
            | Self::Resumed
            | Self::Running
            | Self::Claim => {}
        }
        debug_assert_eq!(out.len() - start, HEADER_LEN + payload_len);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one frame from the start of `buf`: `Ok(None)` until the whole frame is there,
    /// then the message and the number of bytes it took. Header errors are reported as soon as
    /// the 8 header bytes are there.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, StreamError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let ty = header[0];
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap());
        if !(T_SERVER_HELLO..=T_LAST).contains(&ty) {
            return Err(StreamError::UnknownType(ty));
        }
        if header[1] != 0 || header[2] != 0 || header[3] != 0 {
            return Err(StreamError::Malformed("nonzero flags or reserved bits in frame header"));
        }
        if len as usize > MAX_FRAME_PAYLOAD {
            return Err(StreamError::TooLarge(len));
        }
        let len = len as usize;
        check_len(ty, len)?;
        let total = HEADER_LEN + len + 4;
        let Some(frame) = buf.get(..total) else {
            return Ok(None);
        };
        let (body, crc) = frame.split_at(HEADER_LEN + len);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(StreamError::Checksum);
        }
        let msg = parse_payload(ty, &body[HEADER_LEN..])?;
        Ok(Some((msg, total)))
    }
}

/// Rejects, from the header alone, a payload length that cannot fit the type.
fn check_len(ty: u8, len: usize) -> Result<(), StreamError> {
    let (ok, what) = match ty {
        T_SERVER_HELLO | T_CLIENT_HELLO => {
            ((HELLO_PREFIX_LEN..=MAX_HELLO_LEN).contains(&len), "hello payload length out of range")
        }
        T_ACCEPT => (len == 32, "Accept payload is not 32 bytes"),
        T_REJECT | T_DISCARD | T_ERROR | T_CLAIM_REFUSED | T_ABANDONED => {
            (len <= MAX_REASON_LEN, "reason text too long")
        }
        T_ROUND_BEGIN => (len == 5, "RoundBegin payload is not 5 bytes"),
        T_DATA => (len > DATA_HEADER_LEN, "Data payload too short"),
        T_ZERO => (len == 16, "Zero payload is not 16 bytes"),
        T_MISSING => ((2..=MAX_MISSING_RUNS * 20).contains(&len), "Missing payload length out of range"),
        T_FETCH => (len == FETCH_LEN, "Fetch payload is not 20 bytes"),
        T_FETCHED => (len > FETCHED_HEADER_LEN, "Fetched payload too short"),
        T_ROUND_END => (len == 4, "RoundEnd payload is not 4 bytes"),
        T_COMMIT | T_COMMITTED | T_DONE | T_REVOKE | T_REVOKED | T_KEEPALIVE | T_PUSH_DONE | T_HOLDS | T_RESUME
        | T_RESUMED | T_RUNNING | T_CLAIM => (len == 0, "unexpected payload on an empty message"),
        _ => return Err(StreamError::UnknownType(ty)),
    };
    if ok {
        Ok(())
    } else {
        Err(StreamError::Malformed(what))
    }
}

/// Checks a hello's magic and version and returns the rest of its payload.
fn hello_body(p: &[u8]) -> Result<(u16, &[u8]), StreamError> {
    if p.len() < HELLO_PREFIX_LEN {
        return Err(StreamError::Malformed("hello payload too short"));
    }
    if p[..MAGIC.len()] != MAGIC {
        return Err(StreamError::NotAMigrationStream);
    }
    let version = u16::from_le_bytes(p[MAGIC.len()..HELLO_PREFIX_LEN].try_into().unwrap());
    if version != VERSION {
        return Err(StreamError::Version { ours: VERSION, theirs: version });
    }
    Ok((version, &p[HELLO_PREFIX_LEN..]))
}

fn parse_payload(ty: u8, p: &[u8]) -> Result<Message, StreamError> {
    let msg = match ty {
        T_SERVER_HELLO => {
            let (version, rest) = hello_body(p)?;
            let mut r = Reader::new(rest, "ServerHello payload has the wrong length");
            let nonce = r.array()?;
            r.finish()?;
            Message::ServerHello { version, nonce }
        }
        T_CLIENT_HELLO => parse_client_hello(p)?,
        T_ACCEPT => Message::Accept { mac: Reader::new(p, "Accept payload").array()? },
        T_REJECT => Message::Reject { reason: text(p)? },
        T_DISCARD => Message::Discard { reason: text(p)? },
        T_ERROR => Message::Error { message: text(p)? },
        T_ROUND_BEGIN => {
            let mut r = Reader::new(p, "RoundBegin payload");
            let round = r.u32()?;
            let kind = RoundKind::from_wire(r.u8()?).ok_or(StreamError::Malformed("unknown round kind"))?;
            Message::RoundBegin { round, kind }
        }
        T_DATA => {
            let (offset, codec, logical_len, payload) = parse_data(p)?;
            Message::Data { offset, codec, logical_len, payload }
        }
        T_ZERO => parse_zero(p)?,
        T_ROUND_END => Message::RoundEnd { round: Reader::new(p, "RoundEnd payload").u32()? },
        T_MISSING => Message::Missing { runs: parse_missing(p)? },
        T_FETCH => parse_fetch(p)?,
        T_FETCHED => {
            let mut r = Reader::new(p, "Fetched payload");
            let id = r.u64()?;
            let (offset, codec, logical_len, payload) = parse_data(r.rest())?;
            Message::Fetched { id, offset, codec, logical_len, payload }
        }
        T_PUSH_DONE => Message::PushDone,
        T_HOLDS => Message::Holds,
        T_RESUME => Message::Resume,
        T_RESUMED => Message::Resumed,
        T_RUNNING => Message::Running,
        T_CLAIM => Message::Claim,
        T_CLAIM_REFUSED => Message::ClaimRefused { reason: text(p)? },
        T_ABANDONED => Message::Abandoned { reason: text(p)? },
        T_COMMIT => Message::Commit,
        T_COMMITTED => Message::Committed,
        T_DONE => Message::Done,
        T_REVOKE => Message::Revoke,
        T_REVOKED => Message::Revoked,
        T_KEEPALIVE => Message::Keepalive,
        _ => return Err(StreamError::UnknownType(ty)),
    };
    Ok(msg)
}

fn parse_client_hello(p: &[u8]) -> Result<Message, StreamError> {
    let (version, rest) = hello_body(p)?;
    let mut r = Reader::new(rest, "ClientHello payload has the wrong length");
    let params = SessionParams::parse(&mut r)?;
    let nonce = r.array()?;
    let mac = r.array()?;
    r.finish()?;
    Ok(Message::ClientHello { version, params, nonce, mac })
}

/// A `Data` body (also the tail of `Fetched`): offset, codec, logical length, payload.
fn parse_data(p: &[u8]) -> Result<(u64, Codec, u32, Vec<u8>), StreamError> {
    let mut r = Reader::new(p, "Data payload");
    let offset = r.u64()?;
    let codec = Codec::from_wire(r.u8()?).ok_or(StreamError::Malformed("unknown codec"))?;
    let logical_len = r.u32()?;
    let payload = r.rest();
    if logical_len == 0 {
        return Err(StreamError::Malformed("Data with logical_len 0"));
    }
    if logical_len as usize > MAX_BLOCK_LEN {
        return Err(StreamError::Malformed("Data logical_len above MAX_BLOCK_LEN"));
    }
    if offset.checked_add(logical_len.into()).is_none() {
        return Err(StreamError::Malformed("Data extends past the end of a 64-bit disk"));
    }
    if codec == Codec::Raw && payload.len() != logical_len as usize {
        return Err(StreamError::Malformed("raw Data length differs from logical_len"));
    }
    Ok((offset, codec, logical_len, payload.to_vec()))
}

fn parse_zero(p: &[u8]) -> Result<Message, StreamError> {
    let mut r = Reader::new(p, "Zero payload");
    let offset = r.u64()?;
    let len = r.u64()?;
    if len == 0 {
        return Err(StreamError::Malformed("Zero with len 0"));
    }
    if offset.checked_add(len).is_none() {
        return Err(StreamError::Malformed("Zero extends past the end of a 64-bit disk"));
    }
    Ok(Message::Zero { offset, len })
}

fn parse_fetch(p: &[u8]) -> Result<Message, StreamError> {
    let mut r = Reader::new(p, "Fetch payload");
    let (id, offset, len) = (r.u64()?, r.u64()?, r.u32()?);
    if len == 0 || len as usize > MAX_BLOCK_LEN {
        return Err(StreamError::Malformed("Fetch length is 0 or above MAX_BLOCK_LEN"));
    }
    if offset.checked_add(len.into()).is_none() {
        return Err(StreamError::Malformed("Fetch extends past the end of a 64-bit disk"));
    }
    Ok(Message::Fetch { id, offset, len })
}

fn text(p: &[u8]) -> Result<String, StreamError> {
    std::str::from_utf8(p).map(str::to_owned).map_err(|_| StreamError::Malformed("text is not UTF-8"))
}

/// `s` cut to at most [`MAX_REASON_LEN`] bytes at a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_REASON_LEN {
        return s;
    }
    let mut end = MAX_REASON_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A forward-only little-endian reader over a complete payload.
/// `ranges` (in any order; touching or overlapping ones are joined) as `Missing` frames,
/// [`MAX_MISSING_RUNS`] ranges a frame.
pub fn missing_frames(ranges: &[(u64, u64)]) -> Vec<Message> {
    let mut sorted: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
    sorted.sort_unstable();
    let mut joined: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (offset, len) in sorted {
        match joined.last_mut() {
            Some((o, l)) if offset <= *o + *l => *l = (*l).max(offset + len - *o),
            _ => joined.push((offset, len)),
        }
    }
    joined.chunks(MAX_MISSING_RUNS).map(|c| Message::Missing { runs: c.to_vec() }).collect()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn missing_payload(runs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 5);
    let mut end = 0u64;
    for &(offset, len) in runs {
        put_varint(&mut out, offset - end);
        put_varint(&mut out, len);
        end = offset + len;
    }
    out
}

fn parse_missing(p: &[u8]) -> Result<Vec<(u64, u64)>, StreamError> {
    let bad = StreamError::Malformed;
    let mut r = Reader::new(p, "Missing payload");
    let mut runs = Vec::new();
    let mut end = 0u64;
    while !r.buf.is_empty() {
        if runs.len() == MAX_MISSING_RUNS {
            return Err(bad("Missing with more than MAX_MISSING_RUNS ranges"));
        }
        let (gap, len) = (r.varint()?, r.varint()?);
        if len == 0 {
            return Err(bad("Missing with len 0"));
        }
        let offset = end.checked_add(gap).ok_or(bad("Missing extends past the end of a 64-bit disk"))?;
        end = offset.checked_add(len).ok_or(bad("Missing extends past the end of a 64-bit disk"))?;
        runs.push((offset, len));
    }
    Ok(runs)
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        if self.buf.len() < n {
            return Err(StreamError::Malformed(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StreamError> {
        Ok(self.bytes(N)?.try_into().unwrap())
    }

    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StreamError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, StreamError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A LEB128 varint of at most 10 bytes that fits 64 bits.
    fn varint(&mut self) -> Result<u64, StreamError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(StreamError::Malformed("varint above 64 bits"));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                // One encoding per value, so a frame re-encodes to the same bytes.
                if i > 0 && b == 0 {
                    return Err(StreamError::Malformed("varint not in its shortest form"));
                }
                return Ok(v);
            }
        }
        Err(StreamError::Malformed("varint above 64 bits"))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(&self) -> Result<(), StreamError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(StreamError::Malformed(self.what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::Strategy as PStrategy;

    fn params() -> SessionParams {
        SessionParams {
            session_id: *b"0123456789abcdef",
            disk_size: 10 << 30,
            block_size: 64 << 10,
            strategy: Strategy::Bitmap,
        }
    }

    fn samples() -> Vec<Message> {
        let compressible = vec![7u8; 4096];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        vec![
            Message::ServerHello { version: VERSION, nonce: [1; 32] },
            Message::ClientHello { version: VERSION, params: params(), nonce: [2; 32], mac: [3; 32] },
            Message::Accept { mac: [4; 32] },
            Message::Reject { reason: "wrong key".into() },
            Message::Reject { reason: String::new() },
            Message::RoundBegin { round: 0, kind: RoundKind::Base },
            Message::RoundBegin { round: 7, kind: RoundKind::Update },
            Message::RoundBegin { round: u32::MAX, kind: RoundKind::Final },
            Message::data(4096, &compressible, true),
            Message::data(0, &noise, true),
            Message::data(8192, b"x", false),
            Message::Zero { offset: 1 << 20, len: 1 << 30 },
            Message::RoundEnd { round: 3 },
            Message::Commit,
            Message::Committed,
            Message::Discard { reason: "source shutting down: ünïcode ✓".into() },
            Message::Done,
            Message::Error { message: "disk full".into() },
            Message::Revoke,
            Message::Revoked,
            Message::Keepalive,
            Message::Missing { runs: vec![(1 << 20, 4096)] },
            Message::Missing { runs: vec![(0, 1), (4096, u64::MAX / 2), (u64::MAX - 10, 10)] },
            Message::Fetch { id: 9, offset: 4096, len: MAX_BLOCK_LEN as u32 },
            Message::fetched(3, 8192, &noise, true),
            Message::fetched(u64::MAX, 0, &[0u8; 512], false),
            Message::PushDone,
            Message::Holds,
            Message::Resume,
            Message::Resumed,
            Message::Running,
            Message::Claim,
            Message::ClaimRefused { reason: "not armed".into() },
            Message::Abandoned { reason: "the destination's QEMU left".into() },
        ]
    }

    #[test]
    fn post_copy_frames_are_checked() {
        let bad = |ty, payload: &[u8]| Message::decode(&raw_frame(ty, payload)).unwrap_err();
        let mut fetch = Vec::new();
        fetch.extend_from_slice(&1u64.to_le_bytes());
        fetch.extend_from_slice(&0u64.to_le_bytes());
        fetch.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(bad(T_FETCH, &fetch), StreamError::Malformed("Fetch length is 0 or above MAX_BLOCK_LEN"));
        fetch[16..].copy_from_slice(&(MAX_BLOCK_LEN as u32 + 1).to_le_bytes());
        assert_eq!(bad(T_FETCH, &fetch), StreamError::Malformed("Fetch length is 0 or above MAX_BLOCK_LEN"));
        let mut missing = Vec::new();
        put_varint(&mut missing, u64::MAX);
        put_varint(&mut missing, 2);
        assert_eq!(bad(T_MISSING, &missing), StreamError::Malformed("Missing extends past the end of a 64-bit disk"));
        assert_eq!(bad(T_MISSING, &[0, 0]), StreamError::Malformed("Missing with len 0"));
        // Unsorted, touching and overlapping ranges go out sorted and joined.
        let frames = missing_frames(&[(8192, 4096), (0, 4096), (4096, 4096), (10_000, 100), (1 << 20, 0)]);
        assert_eq!(frames, vec![Message::Missing { runs: vec![(0, 12288)] }]);
        assert_eq!(bad(T_MISSING, &[0x80; 11]), StreamError::Malformed("varint above 64 bits"));
        assert_eq!(bad(T_MISSING, &[0, 0x80]), StreamError::Malformed("Missing payload"));
        assert_eq!(bad(T_MISSING, &[0, 0x81, 0]), StreamError::Malformed("varint not in its shortest form"));
        assert_eq!(bad(T_MISSING, b""), StreamError::Malformed("Missing payload length out of range"));
        // A list longer than a frame is split; each frame decodes alone, the biggest fits.
        let many: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * (u64::MAX / 20_000), u64::MAX / 40_000)).collect();
        let frames = missing_frames(&many);
        assert_eq!(frames.len(), 3);
        let mut back = Vec::new();
        for f in &frames {
            let Message::Missing { runs } = Message::decode(&enc(f)).unwrap().unwrap().0 else { panic!() };
            back.extend(runs);
        }
        assert_eq!(back, many);
        // About five bytes a range for a residual of scattered 4 KiB blocks.
        let scattered: Vec<(u64, u64)> = (0..4096u64).map(|i| (i * 40 * 4096, 4096)).collect();
        assert!(missing_payload(&scattered).len() <= 5 * 4096);
        assert_eq!(bad(T_FETCHED, &[0; FETCHED_HEADER_LEN]), StreamError::Malformed("Fetched payload too short"));
        assert_eq!(bad(T_HOLDS, b"x"), StreamError::Malformed("unexpected payload on an empty message"));
        assert_eq!(bad(T_LAST + 1, b""), StreamError::UnknownType(T_LAST + 1));
        // The largest answer fits a frame.
        let big = Message::fetched(u64::MAX, 0, &vec![1u8; MAX_BLOCK_LEN], false);
        assert_eq!(Message::decode(&enc(&big)).unwrap().unwrap().0, big);
    }

    fn enc(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    }

    /// A frame with a valid CRC around an arbitrary header and payload.
    fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![ty, 0, 0, 0];
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn every_message_round_trips() {
        let data = samples();
        assert!(matches!(data[8], Message::Data { codec: Codec::Lz4, .. }));
        assert!(matches!(data[9], Message::Data { codec: Codec::Raw, .. }));
        for m in data {
            let bytes = enc(&m);
            assert_eq!(bytes.len(), m.wire_len(), "{m:?}");
            let (got, n) = Message::decode(&bytes).unwrap().unwrap();
            assert_eq!(got, m);
            assert_eq!(n, bytes.len());
        }
    }

    #[test]
    fn consecutive_frames_decode_in_order() {
        let msgs = samples();
        let mut stream = Vec::new();
        for m in &msgs {
            m.encode(&mut stream);
        }
        let mut buf = &stream[..];
        let mut got = Vec::new();
        while let Some((m, n)) = Message::decode(buf).unwrap() {
            got.push(m);
            buf = &buf[n..];
        }
        assert!(buf.is_empty());
        assert_eq!(got, msgs);
    }

    #[test]
    fn every_cut_point_needs_more() {
        for m in samples() {
            let bytes = enc(&m);
            for cut in 0..bytes.len() {
                assert_eq!(Message::decode(&bytes[..cut]), Ok(None), "{} cut at {cut}", m.name());
            }
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        for m in samples() {
            let bytes = enc(&m);
            for bit in 0..bytes.len() * 8 {
                let mut bad = bytes.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                match Message::decode(&bad) {
                    // A longer announced length: still waiting; the CRC fails once it is there.
                    Ok(None) => assert!((4..8).contains(&(bit / 8)), "{} bit {bit}", m.name()),
                    Ok(Some(other)) => panic!("{} bit {bit} decoded as {other:?}", m.name()),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn long_text_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(MAX_REASON_LEN); // 2 bytes each
        let m = Message::Error { message: long.clone() };
        let bytes = enc(&m);
        assert_eq!(bytes.len(), m.wire_len());
        let (got, _) = Message::decode(&bytes).unwrap().unwrap();
        let Message::Error { message } = got else { panic!() };
        assert_eq!(message.len(), MAX_REASON_LEN);
        assert!(long.starts_with(&message));
    }

    #[test]
    fn oversized_payload_rejected_from_header_alone() {
        let mut h = vec![T_DATA, 0, 0, 0];
        h.extend_from_slice(&(MAX_FRAME_PAYLOAD as u32 + 1).to_le_bytes());
        assert_eq!(Message::decode(&h), Err(StreamError::TooLarge(MAX_FRAME_PAYLOAD as u32 + 1)));
        let mut h = vec![T_DATA, 0, 0, 0];
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Message::decode(&h), Err(StreamError::TooLarge(u32::MAX)));
        // The largest legal Data frame only waits for more.
        let mut h = vec![T_DATA, 0, 0, 0];
        h.extend_from_slice(&(MAX_FRAME_PAYLOAD as u32).to_le_bytes());
        assert_eq!(Message::decode(&h), Ok(None));
        // A hello may not make us wait for megabytes.
        let mut h = vec![T_SERVER_HELLO, 0, 0, 0];
        h.extend_from_slice(&(1u32 << 20).to_le_bytes());
        assert!(matches!(Message::decode(&h), Err(StreamError::Malformed(_))));
    }

    #[test]
    fn header_errors_are_reported_before_the_payload() {
        assert_eq!(Message::decode(&[0, 0, 0, 0, 0, 0, 0, 0]), Err(StreamError::UnknownType(0)));
        assert_eq!(Message::decode(&[99, 0, 0, 0, 0, 0, 0, 0]), Err(StreamError::UnknownType(99)));
        // An NBD server's greeting is not a migration stream.
        assert!(Message::decode(b"NBDMAGICIHAVEOPT").is_err());
        for (i, b) in [(1, 1u8), (2, 0x80), (3, 1)] {
            let mut h = vec![T_COMMIT, 0, 0, 0, 0, 0, 0, 0];
            h[i] = b;
            assert!(matches!(Message::decode(&h), Err(StreamError::Malformed(_))));
        }
        for (ty, len) in [(T_COMMIT, 1u32), (T_ACCEPT, 31), (T_ZERO, 17), (T_DATA, 13), (T_ROUND_END, 0)] {
            let mut h = vec![ty, 0, 0, 0];
            h.extend_from_slice(&len.to_le_bytes());
            assert!(matches!(Message::decode(&h), Err(StreamError::Malformed(_))), "{ty} {len}");
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut p = b"NBDROWM0".to_vec();
        p.extend_from_slice(&VERSION.to_le_bytes());
        p.extend_from_slice(&[0; 32]);
        assert_eq!(Message::decode(&raw_frame(T_SERVER_HELLO, &p)), Err(StreamError::NotAMigrationStream));
        let m = Message::ServerHello { version: VERSION + 1, nonce: [0; 32] };
        assert_eq!(Message::decode(&enc(&m)), Err(StreamError::Version { ours: VERSION, theirs: VERSION + 1 }));
        // A newer peer's longer hello still reports the version, not the length.
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&9u16.to_le_bytes());
        p.extend_from_slice(&[0; 200]);
        assert_eq!(
            Message::decode(&raw_frame(T_CLIENT_HELLO, &p)),
            Err(StreamError::Version { ours: VERSION, theirs: 9 })
        );
        let err = StreamError::Version { ours: 1, theirs: 9 }.to_string();
        assert!(err.contains("version 1") && err.contains("9"), "{err}");
    }

    #[test]
    fn malformed_payloads() {
        let malformed = |ty, p: &[u8]| {
            let r = Message::decode(&raw_frame(ty, p));
            assert!(matches!(r, Err(StreamError::Malformed(_))), "type {ty} {p:?}: {r:?}");
        };
        let data = |offset: u64, codec: u8, logical: u32, body: &[u8]| {
            let mut p = offset.to_le_bytes().to_vec();
            p.push(codec);
            p.extend_from_slice(&logical.to_le_bytes());
            p.extend_from_slice(body);
            p
        };
        malformed(T_DATA, &data(0, 0, 3, b"ab"));
        malformed(T_DATA, &data(0, 0, 1, b"ab"));
        malformed(T_DATA, &data(0, 0, 0, b"a"));
        malformed(T_DATA, &data(0, 1, 0, b"a"));
        malformed(T_DATA, &data(0, 1, MAX_BLOCK_LEN as u32 + 1, b"a"));
        malformed(T_DATA, &data(0, 2, 1, b"a"));
        malformed(T_DATA, &data(u64::MAX, 0, 1, b"a"));
        let mut zero = 5u64.to_le_bytes().to_vec();
        zero.extend_from_slice(&0u64.to_le_bytes());
        malformed(T_ZERO, &zero);
        let mut zero = u64::MAX.to_le_bytes().to_vec();
        zero.extend_from_slice(&1u64.to_le_bytes());
        malformed(T_ZERO, &zero);
        malformed(T_REJECT, &[0xff, 0xfe]);
        malformed(T_ERROR, b"abc\xc3");
        malformed(T_DISCARD, &vec![b'a'; MAX_REASON_LEN + 1]);
        malformed(T_ROUND_BEGIN, &[0, 0, 0, 0, 4]);
        malformed(T_ACCEPT, &[0; 33]);
        let mut hello = enc(&Message::ServerHello { version: VERSION, nonce: [0; 32] });
        hello.truncate(HEADER_LEN + SERVER_HELLO_LEN);
        malformed(T_SERVER_HELLO, &hello[HEADER_LEN..HEADER_LEN + SERVER_HELLO_LEN - 1]);
        let client = enc(&Message::ClientHello { version: VERSION, params: params(), nonce: [0; 32], mac: [0; 32] });
        let mut p = client[HEADER_LEN..client.len() - 4].to_vec();
        malformed(T_CLIENT_HELLO, &p[..p.len() - 1]);
        p[HELLO_PREFIX_LEN + 28] = 2; // strategy
        malformed(T_CLIENT_HELLO, &p);
        p[HELLO_PREFIX_LEN + 28] = 1;
        p[HELLO_PREFIX_LEN + 24..HELLO_PREFIX_LEN + 28].fill(0); // block_size
        malformed(T_CLIENT_HELLO, &p);
    }

    #[test]
    fn strategy_names() {
        for s in [Strategy::Row, Strategy::Bitmap] {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert!("rows".parse::<Strategy>().unwrap_err().to_string().contains("\"rows\""));
    }

    fn arb_message() -> impl PStrategy<Value = Message> {
        let params = (any::<[u8; 16]>(), any::<u64>(), 1..=u32::MAX, any::<bool>()).prop_map(
            |(session_id, disk_size, block_size, bitmap)| SessionParams {
                session_id,
                disk_size,
                block_size,
                strategy: if bitmap { Strategy::Bitmap } else { Strategy::Row },
            },
        );
        let kind = prop_oneof![
            Just(RoundKind::Base),
            Just(RoundKind::Update),
            Just(RoundKind::Final),
            Just(RoundKind::Postcopy)
        ];
        // Blocks with long runs so that lz4 gets used too.
        let block = proptest::collection::vec((any::<u8>(), 1..64usize), 1..64)
            .prop_map(|runs| runs.into_iter().flat_map(|(b, n)| vec![b; n]).collect::<Vec<u8>>());
        let text = ".{0,64}";
        prop_oneof![
            any::<[u8; 32]>().prop_map(|nonce| Message::ServerHello { version: VERSION, nonce }),
            (params, any::<[u8; 32]>(), any::<[u8; 32]>())
                .prop_map(|(params, nonce, mac)| { Message::ClientHello { version: VERSION, params, nonce, mac } }),
            any::<[u8; 32]>().prop_map(|mac| Message::Accept { mac }),
            text.prop_map(|reason| Message::Reject { reason }),
            (any::<u32>(), kind).prop_map(|(round, kind)| Message::RoundBegin { round, kind }),
            (0..u64::MAX / 2, block, any::<bool>()).prop_map(|(o, b, c)| Message::data(o, &b, c)),
            (0..u64::MAX / 2, 1..u64::MAX / 2).prop_map(|(offset, len)| Message::Zero { offset, len }),
            any::<u32>().prop_map(|round| Message::RoundEnd { round }),
            Just(Message::Commit),
            Just(Message::Committed),
            text.prop_map(|reason| Message::Discard { reason }),
            text.prop_map(|reason| Message::Abandoned { reason }),
            Just(Message::Done),
            Just(Message::Revoke),
            Just(Message::Revoked),
            Just(Message::Keepalive),
            text.prop_map(|message| Message::Error { message }),
            proptest::collection::vec((0..1u64 << 40, 1..1u64 << 30), 1..64).prop_map(|gaps| {
                let mut end = 0;
                let runs = gaps
                    .into_iter()
                    .map(|(gap, len)| {
                        let offset = end + gap;
                        end = offset + len;
                        (offset, len)
                    })
                    .collect();
                Message::Missing { runs }
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = &bytes[..];
            while let Ok(Some((m, n))) = Message::decode(buf) {
                prop_assert!(n > 0 && n <= buf.len());
                prop_assert_eq!(enc(&m), buf[..n].to_vec());
                buf = &buf[n..];
            }
        }

        #[test]
        fn arbitrary_frames_never_panic(ty in 0u8..=T_LAST + 1, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let frame = raw_frame(ty, &payload);
            if let Ok(Some((m, n))) = Message::decode(&frame) {
                prop_assert_eq!(n, frame.len());
                prop_assert_eq!(enc(&m), frame);
            }
        }

        #[test]
        fn encode_decode_is_identity(m in arb_message()) {
            let bytes = enc(&m);
            prop_assert_eq!(bytes.len(), m.wire_len());
            let (got, n) = Message::decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(n, bytes.len());
            if let Message::Data { codec, payload, logical_len, .. } = &got {
                let block = crate::decode_block(*codec, payload, *logical_len).unwrap();
                prop_assert_eq!(block.len(), *logical_len as usize);
            }
            prop_assert_eq!(got, m);
        }
    }
}
