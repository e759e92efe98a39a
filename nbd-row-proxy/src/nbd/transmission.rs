//! The transmission phase without I/O: checking a request against the session and executing it
//! against the image, producing the complete reply bytes.

use nbd_proto::consts::*;
use nbd_proto::transmission::{
    encode_block_status, encode_error, encode_offset_data_prefix, encode_offset_hole, encode_simple_reply,
    BlockStatusExtent, OFFSET_DATA_PREFIX_LEN,
};
use nbd_proto::{Command, Request};

use row_store::ZeroFlags;

use super::errno::errno_of;
use super::export::MAX_REQUEST_LEN;
use super::negotiation::{Negotiated, BASE_ALLOCATION_ID};

/// A request refused before touching the image: errno and a short reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// NBD error value.
    pub errno: u32,
    /// Short message for structured error chunks and logs.
    pub reason: &'static str,
}

const fn refuse(errno: u32, reason: &'static str) -> Refusal {
    Refusal { errno, reason }
}

/// Reads at least this large look for holes to send as `OFFSET_HOLE` chunks.
const HOLE_CHECK_MIN: u32 = 64 * 1024;
/// Most extents in one `BLOCK_STATUS` reply.
const MAX_STATUS_EXTENTS: usize = 2048;
/// Requests up to this size without FUA run on the connection's task; larger or slower ones
/// (flush, FUA, zeroing, trim) run on the blocking pool so other requests keep flowing.
const INLINE_MAX: u32 = 1 << 20;

/// Checks a request against the session; `Err` is the error to reply with. The caller still
/// consumes a refused WRITE's payload.
pub fn validate(session: &Negotiated, req: &Request) -> Result<(), Refusal> {
    let known =
        NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
    if req.flags & !known != 0 {
        return Err(refuse(NBD_EINVAL, "unknown command flags"));
    }
    let allowed = match req.command {
        Command::Read => NBD_CMD_FLAG_DF,
        Command::Write | Command::Trim => NBD_CMD_FLAG_FUA,
        Command::WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        Command::BlockStatus => NBD_CMD_FLAG_REQ_ONE,
        Command::Flush | Command::Cache | Command::Disc => 0,
        Command::Resize | Command::Unknown(_) => return Err(refuse(NBD_EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Err(refuse(NBD_EINVAL, "flag not valid for this command"));
    }
    if req.flags & NBD_CMD_FLAG_DF != 0 && !session.structured {
        return Err(refuse(NBD_EINVAL, "DF needs structured replies"));
    }
    let export = &session.export;
    let writes = matches!(req.command, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && export.read_only() {
        return Err(refuse(NBD_EPERM, "export is read-only"));
    }
    if matches!(req.command, Command::Flush | Command::Disc) {
        return Ok(());
    }
    if req.command == Command::BlockStatus && !session.base_allocation {
        return Err(refuse(NBD_EINVAL, "no metadata context negotiated"));
    }
    if matches!(req.command, Command::Read | Command::Write) && req.length > MAX_REQUEST_LEN {
        return Err(refuse(NBD_EINVAL, "payload larger than 32 MiB"));
    }
    if req.length == 0 {
        return Err(refuse(NBD_EINVAL, "zero-length request"));
    }
    let align = session.alignment as u64;
    if !req.offset.is_multiple_of(align) || !(req.length as u64).is_multiple_of(align) {
        return Err(refuse(NBD_EINVAL, "request not aligned to the minimum block size"));
    }
    let end = req.offset.checked_add(req.length as u64);
    if end.is_none_or(|end| end > export.size()) {
        return Err(if writes {
            refuse(NBD_ENOSPC, "write beyond the end of the export")
        } else {
            refuse(NBD_EINVAL, "request beyond the end of the export")
        });
    }
    Ok(())
}

/// Whether a validated request is cheap enough to run on the connection's own task.
pub fn runs_inline(req: &Request) -> bool {
    match req.command {
        Command::Read | Command::Write => req.length <= INLINE_MAX && req.flags & NBD_CMD_FLAG_FUA == 0,
        Command::BlockStatus => true,
        _ => false,
    }
}

/// The reply to a refused or failed request.
pub fn error_reply(session: &Negotiated, cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    if session.structured {
        encode_error(cookie, NBD_REPLY_FLAG_DONE, errno, message, &mut out);
    } else {
        encode_simple_reply(cookie, errno, &mut out);
    }
    out
}

/// Executes a validated request (with its payload for WRITE) and returns the reply bytes.
pub fn execute(session: &Negotiated, req: &Request, payload: Option<Vec<u8>>) -> Vec<u8> {
    execute_into(session, req, payload.as_deref(), Vec::new())
}

/// [`execute`], building the reply in `out` (cleared first) so its memory is used again: a
/// connection recycles its buffers, as a fresh 256 KiB one per read is mapped, faulted in page
/// by page and unmapped again (a fifth of the server's time on sequential reads).
pub fn execute_into(session: &Negotiated, req: &Request, payload: Option<&[u8]>, mut out: Vec<u8>) -> Vec<u8> {
    out.clear();
    let backend = &session.export.backend;
    let (offset, length) = (req.offset, req.length as u64);
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    let result = match req.command {
        Command::Read => return read_reply(session, req, out),
        Command::BlockStatus => return block_status_reply(session, req),
        Command::Write => backend.write_at(payload.unwrap_or_default(), offset, fua),
        Command::Flush => backend.flush(),
        Command::Trim => backend.trim(offset, length, fua),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                may_punch: req.flags & NBD_CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            backend.write_zeroes(offset, length, flags)
        }
        Command::Cache => backend.cache(offset, length),
        Command::Disc | Command::Resize | Command::Unknown(_) => Ok(()),
    };
    match result {
        Ok(()) => {
            encode_simple_reply(req.cookie, 0, &mut out);
            out
        }
        Err(e) => {
            let errno = errno_of(&e, req.flags);
            // A refused write (the disk belongs to another host) is the client's business; a
            // failing disk is the operator's.
            if errno == NBD_EPERM {
                tracing::debug!(command = ?req.command, offset, length, error = %e, "request refused");
            } else {
                tracing::warn!(command = ?req.command, offset, length, error = %e, "request failed");
            }
            error_reply(session, req.cookie, errno, &e.to_string())
        }
    }
}

/// The reply to a READ answered with `data` (fetched from a migration source).
pub fn read_reply_with(session: &Negotiated, req: &Request, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OFFSET_DATA_PREFIX_LEN + data.len());
    if session.structured {
        encode_offset_data_prefix(req.cookie, NBD_REPLY_FLAG_DONE, req.offset, req.length, &mut out);
    } else {
        encode_simple_reply(req.cookie, 0, &mut out);
    }
    out.extend_from_slice(data);
    out
}

fn read_reply(session: &Negotiated, req: &Request, mut out: Vec<u8>) -> Vec<u8> {
    let backend = &session.export.backend;
    let len = req.length as usize;
    if !session.structured {
        out.reserve(16 + len);
        encode_simple_reply(req.cookie, 0, &mut out);
        return match backend.read_append(&mut out, len, req.offset) {
            Ok(()) => out,
            Err(e) => error_reply(session, req.cookie, errno_of(&e, req.flags), &e.to_string()),
        };
    }
    // Large reads look for holes: a hole costs 32 bytes on the wire instead of its length.
    if req.length >= HOLE_CHECK_MIN && backend.caps().cheap_extents {
        if let Ok(extents) = backend.extents(req.offset, req.length as u64, 16) {
            let covers = extents.iter().map(|e| e.length).sum::<u64>() == req.length as u64;
            let has_hole = extents.iter().any(|e| e.hole);
            let single_chunk_only = req.flags & NBD_CMD_FLAG_DF != 0;
            if covers && has_hole && (extents.len() == 1 || !single_chunk_only) {
                return fragmented_read(session, req, &extents, out);
            }
        }
    }
    out.reserve(OFFSET_DATA_PREFIX_LEN + len);
    encode_offset_data_prefix(req.cookie, NBD_REPLY_FLAG_DONE, req.offset, req.length, &mut out);
    match backend.read_append(&mut out, len, req.offset) {
        Ok(()) => out,
        Err(e) => error_reply(session, req.cookie, errno_of(&e, req.flags), &e.to_string()),
    }
}

fn fragmented_read(session: &Negotiated, req: &Request, extents: &[row_store::Extent], mut out: Vec<u8>) -> Vec<u8> {
    let backend = &session.export.backend;
    let mut pos = req.offset;
    for (i, e) in extents.iter().enumerate() {
        let flags = if i + 1 == extents.len() { NBD_REPLY_FLAG_DONE } else { 0 };
        let len = e.length as u32;
        if e.hole {
            encode_offset_hole(req.cookie, flags, pos, len, &mut out);
        } else {
            encode_offset_data_prefix(req.cookie, flags, pos, len, &mut out);
            if let Err(e) = backend.read_append(&mut out, len as usize, pos) {
                return error_reply(session, req.cookie, errno_of(&e, req.flags), &e.to_string());
            }
        }
        pos += e.length;
    }
    out
}

fn block_status_reply(session: &Negotiated, req: &Request) -> Vec<u8> {
    let req_one = req.flags & NBD_CMD_FLAG_REQ_ONE != 0;
    let max = if req_one { 1 } else { MAX_STATUS_EXTENTS };
    match session.export.backend.extents(req.offset, req.length as u64, max) {
        Ok(extents) => {
            let extents: Vec<BlockStatusExtent> = extents
                .iter()
                .map(|e| BlockStatusExtent {
                    length: e.length as u32,
                    flags: if e.hole { NBD_STATE_HOLE | NBD_STATE_ZERO } else { 0 },
                })
                .collect();
            let mut out = Vec::with_capacity(32 + 8 * extents.len());
            encode_block_status(req.cookie, NBD_REPLY_FLAG_DONE, BASE_ALLOCATION_ID, &extents, &mut out);
            out
        }
        Err(e) => error_reply(session, req.cookie, errno_of(&e, req.flags), &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nbd_proto::Command;
    use row_store::MemDisk;

    use super::*;
    use crate::nbd::export::Export;

    fn session(writable: bool, structured: bool, alignment: u32) -> Negotiated {
        let export = Arc::new(Export {
            name: "vm1".into(),
            description: String::new(),
            backend: Arc::new(MemDisk::new(1 << 20, writable)),
            pull: None,
        });
        Negotiated { export, structured, base_allocation: structured, alignment }
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request { flags, command, cookie: 1, offset, length }
    }

    fn refusal(s: &Negotiated, r: Request) -> u32 {
        validate(s, &r).map_or_else(|r| r.errno, |()| 0)
    }

    #[test]
    fn flags_must_be_known_and_fit_the_command() {
        let s = session(true, true, 1);
        assert_eq!(refusal(&s, req(Command::Read, 1 << 9, 0, 512)), NBD_EINVAL);
        assert_eq!(refusal(&s, req(Command::Read, NBD_CMD_FLAG_FUA, 0, 512)), NBD_EINVAL);
        assert_eq!(refusal(&s, req(Command::Read, NBD_CMD_FLAG_DF, 0, 512)), 0);
        assert_eq!(refusal(&s, req(Command::Write, NBD_CMD_FLAG_FUA, 0, 512)), 0);
        assert_eq!(refusal(&s, req(Command::WriteZeroes, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, 0, 512)), 0);
        assert_eq!(refusal(&s, req(Command::Flush, NBD_CMD_FLAG_FUA, 0, 0)), NBD_EINVAL);
        assert_eq!(refusal(&s, req(Command::Unknown(99), 0, 0, 512)), NBD_EINVAL);
        // DF needs structured replies.
        assert_eq!(refusal(&session(true, false, 1), req(Command::Read, NBD_CMD_FLAG_DF, 0, 512)), NBD_EINVAL);
    }

    #[test]
    fn ranges_lengths_and_alignment() {
        let s = session(true, true, 512);
        assert_eq!(refusal(&s, req(Command::Read, 0, 0, 0)), NBD_EINVAL, "zero length");
        assert_eq!(refusal(&s, req(Command::Read, 0, 1, 512)), NBD_EINVAL, "misaligned offset");
        assert_eq!(refusal(&s, req(Command::Read, 0, 0, 513)), NBD_EINVAL, "misaligned length");
        assert_eq!(refusal(&s, req(Command::Read, 0, (1 << 20) - 512, 1024)), NBD_EINVAL, "past the end");
        assert_eq!(refusal(&s, req(Command::Write, 0, (1 << 20) - 512, 1024)), NBD_ENOSPC, "a write past the end");
        assert_eq!(refusal(&s, req(Command::Read, 0, u64::MAX - 511, 512)), NBD_EINVAL, "offset overflow");
        assert_eq!(refusal(&s, req(Command::Read, 0, 0, MAX_REQUEST_LEN + 512)), NBD_EINVAL, "too large");
        assert_eq!(refusal(&s, req(Command::Flush, 0, 0, 0)), 0, "flush has no range");
        // Without block sizes negotiated, any alignment goes.
        assert_eq!(refusal(&session(true, true, 1), req(Command::Read, 0, 1, 3)), 0);
    }

    #[test]
    fn writes_to_a_read_only_export_and_block_status_without_a_context() {
        let ro = session(false, true, 1);
        for c in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(refusal(&ro, req(c, 0, 0, 512)), NBD_EPERM);
        }
        assert_eq!(refusal(&ro, req(Command::Read, 0, 0, 512)), 0);
        assert_eq!(refusal(&session(true, false, 1), req(Command::BlockStatus, 0, 0, 512)), NBD_EINVAL);
    }

    #[test]
    fn execute_reaches_the_backend_and_maps_its_errors() {
        let s = session(true, true, 1);
        let reply = execute(&s, &req(Command::Write, 0, 4096, 4), Some(vec![1, 2, 3, 4]));
        assert_eq!(&reply[..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
        // FAST_ZERO on a backend that cannot zero fast: ENOTSUP, as the spec wants.
        let reply = execute(&s, &req(Command::WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, 512), None);
        let (header, _) = nbd_proto::ReplyHeader::decode(&reply).unwrap().unwrap();
        let nbd_proto::ReplyHeader::Structured(chunk) = header else { panic!("structured error expected") };
        assert_eq!(chunk.chunk_type, NBD_REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(reply[20..24].try_into().unwrap()), NBD_ENOTSUP);
    }
}
