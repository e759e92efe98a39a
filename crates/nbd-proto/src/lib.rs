//! Sans-I/O codec for the Network Block Device protocol.
//!
//! Every function here works on byte buffers: decoders take what has arrived so far and answer
//! `Ok(None)` when more bytes are needed (that is never an error), `Ok(Some((value, consumed)))`
//! once a whole message is there, and `Err` only for bytes that can never become valid. Encoders
//! append to a `Vec<u8>`. Nothing here touches a socket, so the same code serves the async
//! server, test clients and the fuzz targets.
//!
//! Both directions are covered: the server side (greeting, option replies, replies) and the
//! client side (client flags, options, requests), so every message round-trips in tests.

pub mod consts;
mod error;
pub mod handshake;
pub mod option;
pub mod transmission;
mod wire;

pub use error::ProtocolError;
pub use handshake::{ClientFlags, ExportNameReply, Greeting};
pub use option::{ClientOption, InfoReply, OptionReply, OptionReplyKind, RawOption};
pub use transmission::{BlockStatusExtent, Chunk, ChunkHeader, Command, ReplyHeader, Request};
