//! Sans-I/O codec for the disk-migration stream between a source proxy and a destination proxy.
//!
//! Like `nbd-proto`, nothing here touches a socket: [`Message::decode`] takes the bytes that
//! have arrived so far and answers `Ok(None)` when more are needed (never an error),
//! `Ok(Some((message, consumed)))` once a whole frame is there, and `Err` only for bytes that
//! can never become valid (the connection cannot go on). [`Message::encode`] appends to a
//! `Vec<u8>`.
//!
//! # Frame layout
//!
//! All integers are little-endian. Every message is one frame:
//!
//! ```text
//! +0  type         u8    message type (1 = ServerHello ... 16 = Keepalive)
//! +1  flags        u8    must be 0
//! +2  reserved     u16   must be 0
//! +4  payload_len  u32   at most MAX_FRAME_PAYLOAD (MAX_BLOCK_LEN + 13)
//! +8  payload      payload_len bytes, layout per type (below)
//! +8+payload_len   crc32 u32   CRC-32 (IEEE) over header and payload
//! ```
//!
//! The header is checked as soon as its 8 bytes are there: an unknown type, nonzero
//! flags/reserved bits, a `payload_len` above [`MAX_FRAME_PAYLOAD`] or one that cannot fit the
//! type are rejected before waiting for the payload. Once the whole frame is there the CRC is
//! checked first ([`StreamError::Checksum`]), then the payload.
//!
//! [`MAGIC`] is not repeated per frame; the two hellos carry it, followed by the protocol
//! version, at the start of their payload. Any future version must keep that prefix (and the
//! frame header) so that a version mismatch is reported as [`StreamError::Version`] rather
//! than as garbage.
//!
//! | type | message       | payload                                                          |
//! |------|---------------|------------------------------------------------------------------|
//! | 1    | `ServerHello` | `magic[8] version:u16 nonce[32]` (42 bytes)                      |
//! | 2    | `ClientHello` | `magic[8] version:u16 params[29] nonce[32] mac[32]` (103 bytes)  |
//! | 3    | `Accept`      | `mac[32]`                                                        |
//! | 4    | `Reject`      | reason, UTF-8, at most [`MAX_REASON_LEN`] bytes                  |
//! | 5    | `RoundBegin`  | round u32, kind u8 (0 base, 1 update, 2 final)                   |
//! | 6    | `Data`        | offset u64, codec u8 (0 raw, 1 lz4), logical_len u32, data       |
//! | 7    | `Zero`        | offset u64, len u64                                              |
//! | 8    | `RoundEnd`    | round u32                                                        |
//! | 9    | `Commit`      | empty                                                            |
//! | 10   | `Committed`   | empty                                                            |
//! | 11   | `Discard`     | reason, UTF-8                                                    |
//! | 12   | `Done`        | empty                                                            |
//! | 13   | `Error`       | message, UTF-8                                                   |
//! | 14   | `Revoke`      | empty: the first message of a session asking for its disk back   |
//! | 15   | `Revoked`     | empty                                                            |
//! | 16   | `Keepalive`   | empty: the source is alive with nothing to send                  |
//! | 17   | `Missing`     | up to 4096 ranges: LEB128 (gap after the previous range, len)    |
//! | 18   | `Fetch`       | id u64, offset u64, len u32                                      |
//! | 19   | `Fetched`     | id u64, then a `Data` payload                                    |
//! | 20–24 | `PushDone`, `Holds`, `Resume`, `Resumed`, `Running` | empty                   |
//! | 25   | `Claim`       | empty: the destination's guest writes; hand the disk over        |
//! | 26   | `ClaimRefused`| reason, UTF-8                                                    |
//! | 27   | `Abandoned`   | reason, UTF-8: the destination's QEMU left without writing       |
//!
//! Session parameters (29 bytes): `session_id[16] disk_size:u64 block_size:u32 strategy:u8`
//! (strategy 0 row, 1 bitmap; block_size never 0).
//!
//! A `Data` frame's `logical_len` is 1..=[`MAX_BLOCK_LEN`]; with the raw codec the data is exactly
//! `logical_len` bytes; with lz4 it is an LZ4 *block* (no frame header) that
//! [`decode_block`] inflates to exactly `logical_len` bytes. [`Message::decode`] checks the
//! structure only; decompression is the receiver's call to [`decode_block`].
//!
//! # Authentication
//!
//! Challenge–response with a pre-shared [`Key`]; the key never crosses the wire.
//!
//! 1. dest → source: `ServerHello { nonce: Ns }`
//! 2. source → dest: `ClientHello { params, nonce: Nc, mac: client_mac(key, Ns, Nc, params) }`
//! 3. dest verifies, then → source: `Accept { mac: server_mac(key, Ns, Nc, params) }`
//!    (or `Reject { reason }` and close); the source verifies that MAC before sending data.
//!
//! The two MACs use different labels, so a MAC reflected back at its sender never verifies.

mod auth;
mod block;
mod error;
mod message;
pub mod seal;

pub use auth::{client_mac, nonce, server_mac, verify, Key, KeyError, MAX_KEY_LEN, MIN_KEY_LEN};
pub use block::{decode_block, decode_block_into, encode_block, is_zero};
pub use error::StreamError;
pub use message::{
    missing_frames, Codec, Message, RoundKind, SessionParams, Strategy, UnknownStrategy, DATA_HEADER_LEN,
    FRAME_OVERHEAD, HEADER_LEN, MAX_FRAME_PAYLOAD, MAX_MISSING_RUNS, MAX_REASON_LEN,
};

/// Identifies the migration protocol; the first bytes of both hello payloads.
pub const MAGIC: [u8; 8] = *b"NBDROWM1";

/// The protocol version this crate speaks.
pub const VERSION: u16 = 4;

/// The largest block a `Data` frame carries (its `logical_len`), 8 MiB. A frame's whole
/// payload may be up to [`MAX_FRAME_PAYLOAD`], which leaves room for the `Data` fields.
pub const MAX_BLOCK_LEN: usize = 8 << 20;
