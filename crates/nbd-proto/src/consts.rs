//! Wire constants, named as in the NBD protocol specification (`doc/proto.md`).

/// `NBDMAGIC`: first eight bytes of every newstyle greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second eight bytes of the newstyle greeting and prefix of every option.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact headers).
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server → client, 16 bits).
/// Server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (client → server, 32 bits).
/// Client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client does not want the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
/// Always set: the other flags are meaningful.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// The export is on rotational media.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// A flush on one connection covers writes completed on every connection.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` is supported.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
/// Select an export and enter transmission (no error reporting).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Obsolete: never used.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Ask about an export without selecting it.
pub const NBD_OPT_INFO: u32 = 6;
/// Select an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Enable structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Enable extended headers (64-bit lengths).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// Success; ends the reply to an option.
pub const NBD_REP_ACK: u32 = 1;
/// One export in the reply to `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// One piece of export information for `NBD_OPT_INFO`/`GO`.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is not supported.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS required first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// The export does not exist.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// The client must request block size constraints.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// The request or reply is too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Extended headers are required.
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

// Information types in `NBD_REP_INFO`.
/// Size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Commands.
/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write; the payload follows the request.
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Make completed writes durable.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Discard a range.
pub const NBD_CMD_TRIM: u16 = 4;
/// Prefetch a range.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes without a payload.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata (e.g. allocation) of a range.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
/// Resize the export.
pub const NBD_CMD_RESIZE: u16 = 8;

// Command flags.
/// Force unit access: durable before the reply.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// `WRITE_ZEROES` must not punch holes.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `READ` must not be fragmented into several chunks.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// `BLOCK_STATUS` wants a single extent.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `WRITE_ZEROES` must fail fast rather than be slow.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Payload length in extended headers.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply chunk flags and types.
/// Last chunk of a reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; only valid with `NBD_REPLY_FLAG_DONE`.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A hole (reads as zeroes) at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Extents of one metadata context.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// An error for the whole request.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
/// An error at one offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

// `base:allocation` extent flags.
/// The extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// The extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Name of the allocation metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";

// Error values carried in replies (the spec fixes these numbers, which match Linux errno).
/// Operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Input/output error.
pub const NBD_EIO: u32 = 5;
/// Out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// No space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Size of the newstyle greeting sent by the server.
pub const GREETING_LEN: usize = 18;
/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Largest string the spec allows in names and descriptions.
pub const MAX_STRING_LEN: usize = 4096;
