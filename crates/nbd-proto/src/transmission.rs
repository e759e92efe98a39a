//! The transmission phase: requests, simple replies and structured reply chunks.

use crate::consts::*;
use crate::handshake::check_magic;
use crate::wire::{be_u16, be_u32, be_u64, Reader};
use crate::ProtocolError;

/// A transmission command, decoded from its 16-bit type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// `NBD_CMD_RESIZE`.
    Resize,
    /// Any other type.
    Unknown(u16),
}

impl Command {
    /// Maps the wire type to a command.
    pub fn from_wire(value: u16) -> Self {
        match value {
            NBD_CMD_READ => Self::Read,
            NBD_CMD_WRITE => Self::Write,
            NBD_CMD_DISC => Self::Disc,
            NBD_CMD_FLUSH => Self::Flush,
            NBD_CMD_TRIM => Self::Trim,
            NBD_CMD_CACHE => Self::Cache,
            NBD_CMD_WRITE_ZEROES => Self::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Self::BlockStatus,
            NBD_CMD_RESIZE => Self::Resize,
            other => Self::Unknown(other),
        }
    }

    /// The wire type of this command.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => NBD_CMD_READ,
            Self::Write => NBD_CMD_WRITE,
            Self::Disc => NBD_CMD_DISC,
            Self::Flush => NBD_CMD_FLUSH,
            Self::Trim => NBD_CMD_TRIM,
            Self::Cache => NBD_CMD_CACHE,
            Self::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Self::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Self::Resize => NBD_CMD_RESIZE,
            Self::Unknown(other) => other,
        }
    }
}

/// A transmission request header (compact form). A `WRITE`'s payload of `length` bytes follows
/// it on the wire and is not part of this struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque value echoed in the reply (the spec's `cookie`, formerly `handle`).
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Decodes a request header. A bad magic means the stream is out of sync: fatal.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        if buf.len() < REQUEST_LEN {
            return Ok(None);
        }
        let magic = be_u32(buf);
        check_magic("request", NBD_REQUEST_MAGIC.into(), magic.into())?;
        Ok(Some((
            Self {
                flags: be_u16(&buf[4..]),
                command: Command::from_wire(be_u16(&buf[6..])),
                cookie: be_u64(&buf[8..]),
                offset: be_u64(&buf[16..]),
                length: be_u32(&buf[24..]),
            },
            REQUEST_LEN,
        )))
    }

    /// Client side: appends the 28-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_wire().to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Whether the request carries a payload on the wire.
    pub fn has_payload(&self) -> bool {
        self.command == Command::Write
    }
}

/// Appends a simple reply header; a successful `READ`'s data follows it on the wire.
pub fn encode_simple_reply(cookie: u64, error: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// The header of one structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Length of the chunk's payload.
    pub length: u32,
}

impl ChunkHeader {
    /// Appends the 20-byte header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.chunk_type.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Whether this is the reply's last chunk.
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

/// Size of the fixed part before the data of an `OFFSET_DATA` chunk (header and offset).
pub const OFFSET_DATA_PREFIX_LEN: usize = CHUNK_HEADER_LEN + 8;

/// Appends an `OFFSET_DATA` chunk's header and offset; the caller appends `data_len` bytes.
pub fn encode_offset_data_prefix(cookie: u64, flags: u16, offset: u64, data_len: u32, out: &mut Vec<u8>) {
    ChunkHeader { flags, chunk_type: NBD_REPLY_TYPE_OFFSET_DATA, cookie, length: data_len + 8 }.encode(out);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(cookie: u64, flags: u16, offset: u64, hole_size: u32, out: &mut Vec<u8>) {
    ChunkHeader { flags, chunk_type: NBD_REPLY_TYPE_OFFSET_HOLE, cookie, length: 12 }.encode(out);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_size.to_be_bytes());
}

/// Appends a chunk of type `NONE` (only meaningful with `NBD_REPLY_FLAG_DONE`).
pub fn encode_none(cookie: u64, out: &mut Vec<u8>) {
    ChunkHeader { flags: NBD_REPLY_FLAG_DONE, chunk_type: NBD_REPLY_TYPE_NONE, cookie, length: 0 }.encode(out);
}

/// One extent of a `BLOCK_STATUS` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusExtent {
    /// Length in bytes.
    pub length: u32,
    /// Context-defined flags, e.g. `NBD_STATE_HOLE | NBD_STATE_ZERO`.
    pub flags: u32,
}

/// Appends a `BLOCK_STATUS` chunk for one metadata context.
pub fn encode_block_status(cookie: u64, flags: u16, context_id: u32, extents: &[BlockStatusExtent], out: &mut Vec<u8>) {
    let length = 4 + 8 * extents.len() as u32;
    ChunkHeader { flags, chunk_type: NBD_REPLY_TYPE_BLOCK_STATUS, cookie, length }.encode(out);
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}

/// Longest error message put in an `ERROR` chunk. QEMU drops a connection whose chunk payload
/// exceeds 1000 bytes (NBD_MAX_MALLOC_PAYLOAD), so stay far below.
pub const MAX_ERROR_MESSAGE: usize = 200;

/// Appends an `ERROR` chunk, truncating the message at a character boundary.
pub fn encode_error(cookie: u64, flags: u16, error: u32, message: &str, out: &mut Vec<u8>) {
    let message = truncate_utf8(message, MAX_ERROR_MESSAGE);
    let length = 6 + message.len() as u32;
    ChunkHeader { flags, chunk_type: NBD_REPLY_TYPE_ERROR, cookie, length }.encode(out);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Client side: the header of any reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful `READ` the data follows.
    Simple {
        /// Error value, 0 on success.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured chunk; `length` payload bytes follow.
    Structured(ChunkHeader),
}

/// Largest structured chunk payload a client accepts (the data of a 32 MiB read and its offset).
pub const MAX_CHUNK_PAYLOAD: u32 = (32 << 20) + 8;

impl ReplyHeader {
    /// Decodes a reply header.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        match be_u32(buf) {
            NBD_SIMPLE_REPLY_MAGIC => {
                if buf.len() < SIMPLE_REPLY_LEN {
                    return Ok(None);
                }
                Ok(Some((Self::Simple { error: be_u32(&buf[4..]), cookie: be_u64(&buf[8..]) }, SIMPLE_REPLY_LEN)))
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                if buf.len() < CHUNK_HEADER_LEN {
                    return Ok(None);
                }
                let header = ChunkHeader {
                    flags: be_u16(&buf[4..]),
                    chunk_type: be_u16(&buf[6..]),
                    cookie: be_u64(&buf[8..]),
                    length: be_u32(&buf[16..]),
                };
                if header.length > MAX_CHUNK_PAYLOAD {
                    return Err(ProtocolError::Malformed("structured reply chunk length"));
                }
                Ok(Some((Self::Structured(header), CHUNK_HEADER_LEN)))
            }
            found => Err(ProtocolError::BadMagic {
                what: "reply",
                expected: NBD_SIMPLE_REPLY_MAGIC.into(),
                found: found.into(),
            }),
        }
    }
}

/// Client side: a decoded structured chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Where the data belongs.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Start of the hole.
        offset: u64,
        /// Its length.
        hole_size: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// The metadata context.
        context_id: u32,
        /// Consecutive extents from the request's offset.
        extents: Vec<BlockStatusExtent>,
    },
    /// `NBD_REPLY_TYPE_ERROR` or `ERROR_OFFSET`.
    Error {
        /// Error value.
        error: u32,
        /// Human-readable message.
        message: String,
        /// For `ERROR_OFFSET`, the offset concerned.
        offset: Option<u64>,
    },
    /// Any other chunk type.
    Unknown {
        /// Chunk type.
        chunk_type: u16,
        /// Raw payload.
        data: Vec<u8>,
    },
}

impl Chunk {
    /// Parses a chunk payload of the type given in its header.
    pub fn parse(header: &ChunkHeader, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload, "structured reply chunk");
        let chunk = match header.chunk_type {
            NBD_REPLY_TYPE_NONE => Self::None,
            NBD_REPLY_TYPE_OFFSET_DATA => {
                let offset = r.u64()?;
                Self::OffsetData { offset, data: r.rest().to_vec() }
            }
            NBD_REPLY_TYPE_OFFSET_HOLE => Self::OffsetHole { offset: r.u64()?, hole_size: r.u32()? },
            NBD_REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                if !r.remaining().is_multiple_of(8) {
                    return Err(ProtocolError::Malformed("block status extents"));
                }
                let mut extents = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    extents.push(BlockStatusExtent { length: r.u32()?, flags: r.u32()? });
                }
                Self::BlockStatus { context_id, extents }
            }
            NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
                let error = r.u32()?;
                let len = r.u16()? as usize;
                let message = String::from_utf8_lossy(r.bytes(len)?).into_owned();
                let offset = if header.chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET { Some(r.u64()?) } else { None };
                Self::Error { error, message, offset }
            }
            chunk_type => return Ok(Self::Unknown { chunk_type, data: payload.to_vec() }),
        };
        r.finish()?;
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_chunk(out: &[u8]) -> (ChunkHeader, Chunk) {
        let (hdr, n) = ReplyHeader::decode(out).unwrap().unwrap();
        let ReplyHeader::Structured(h) = hdr else { panic!("expected a chunk") };
        assert_eq!(out.len(), n + h.length as usize);
        (h, Chunk::parse(&h, &out[n..]).unwrap())
    }

    #[test]
    fn request_round_trip_every_command() {
        for ty in 0..12u16 {
            let req = Request {
                flags: NBD_CMD_FLAG_FUA,
                command: Command::from_wire(ty),
                cookie: 0xdead_beef_0000_0000 | ty as u64,
                offset: 1 << 40,
                length: 4096,
            };
            assert_eq!(req.command.to_wire(), ty);
            let mut out = Vec::new();
            req.encode(&mut out);
            assert_eq!(out.len(), REQUEST_LEN);
            assert_eq!(Request::decode(&out[..27]), Ok(None));
            assert_eq!(Request::decode(&out), Ok(Some((req, REQUEST_LEN))));
            assert_eq!(req.has_payload(), ty == NBD_CMD_WRITE);
        }
    }

    #[test]
    fn request_bad_magic_is_fatal() {
        let mut out = Vec::new();
        Request { flags: 0, command: Command::Read, cookie: 1, offset: 0, length: 1 }.encode(&mut out);
        out[0] = 0;
        assert!(matches!(Request::decode(&out), Err(ProtocolError::BadMagic { what: "request", .. })));
    }

    #[test]
    fn simple_reply_round_trip() {
        let mut out = Vec::new();
        encode_simple_reply(77, NBD_EINVAL, &mut out);
        assert_eq!(ReplyHeader::decode(&out[..15]), Ok(None));
        assert_eq!(ReplyHeader::decode(&out), Ok(Some((ReplyHeader::Simple { error: NBD_EINVAL, cookie: 77 }, 16))));
    }

    #[test]
    fn offset_data_and_hole_chunks() {
        let mut out = Vec::new();
        encode_offset_data_prefix(5, 0, 4096, 3, &mut out);
        out.extend_from_slice(b"abc");
        let (h, c) = decode_chunk(&out);
        assert!(!h.is_done());
        assert_eq!(c, Chunk::OffsetData { offset: 4096, data: b"abc".to_vec() });

        let mut out = Vec::new();
        encode_offset_hole(5, NBD_REPLY_FLAG_DONE, 8192, 512, &mut out);
        let (h, c) = decode_chunk(&out);
        assert!(h.is_done());
        assert_eq!(c, Chunk::OffsetHole { offset: 8192, hole_size: 512 });

        let mut out = Vec::new();
        encode_none(5, &mut out);
        assert_eq!(decode_chunk(&out).1, Chunk::None);
    }

    #[test]
    fn block_status_chunk() {
        let extents = [
            BlockStatusExtent { length: 65536, flags: 0 },
            BlockStatusExtent { length: 4096, flags: NBD_STATE_HOLE | NBD_STATE_ZERO },
        ];
        let mut out = Vec::new();
        encode_block_status(9, NBD_REPLY_FLAG_DONE, 1, &extents, &mut out);
        assert_eq!(decode_chunk(&out).1, Chunk::BlockStatus { context_id: 1, extents: extents.to_vec() });
    }

    #[test]
    fn error_chunk_message_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(500);
        let mut out = Vec::new();
        encode_error(3, NBD_REPLY_FLAG_DONE, NBD_EIO, &long, &mut out);
        let (h, c) = decode_chunk(&out);
        assert!(h.length as usize <= 6 + MAX_ERROR_MESSAGE);
        let Chunk::Error { error, message, offset } = c else { panic!() };
        assert_eq!((error, offset), (NBD_EIO, None));
        assert!(message.len() <= MAX_ERROR_MESSAGE && message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        let h = ChunkHeader { flags: 0, chunk_type: NBD_REPLY_TYPE_BLOCK_STATUS, cookie: 0, length: 7 };
        assert!(Chunk::parse(&h, &[0; 7]).is_err());
        let h = ChunkHeader { flags: 0, chunk_type: NBD_REPLY_TYPE_OFFSET_HOLE, cookie: 0, length: 4 };
        assert!(Chunk::parse(&h, &[0; 4]).is_err());
        let mut bad = Vec::new();
        bad.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        bad.extend_from_slice(&[0; 12]);
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(ReplyHeader::decode(&bad).is_err());
        assert!(ReplyHeader::decode(&[1, 2, 3, 4]).is_err());
    }
}
