//! The fixed newstyle greeting, the client's flags, and the reply to `NBD_OPT_EXPORT_NAME`.

use crate::consts::*;
use crate::wire::{be_u16, be_u32, be_u64};
use crate::ProtocolError;

/// The server's first message: magic numbers and handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// `NBD_FLAG_FIXED_NEWSTYLE` and friends.
    pub handshake_flags: u16,
}

impl Greeting {
    /// Appends the 18-byte greeting.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.handshake_flags.to_be_bytes());
    }

    /// Client side: decodes the greeting; only newstyle servers are accepted.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        if buf.len() < GREETING_LEN {
            return Ok(None);
        }
        check_magic("greeting", NBD_MAGIC, be_u64(buf))?;
        check_magic("newstyle", NBD_IHAVEOPT, be_u64(&buf[8..]))?;
        Ok(Some((Self { handshake_flags: be_u16(&buf[16..]) }, GREETING_LEN)))
    }
}

/// The client's 32-bit flags, sent right after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The raw flags; unknown bits are rejected by [`ClientFlags::decode`].
    pub bits: u32,
}

impl ClientFlags {
    /// Every client flag this implementation understands.
    pub const KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

    /// Whether the client speaks fixed newstyle.
    pub fn fixed_newstyle(&self) -> bool {
        self.bits & NBD_FLAG_C_FIXED_NEWSTYLE != 0
    }

    /// Whether the 124 zero bytes after `NBD_OPT_EXPORT_NAME` are omitted.
    pub fn no_zeroes(&self) -> bool {
        self.bits & NBD_FLAG_C_NO_ZEROES != 0
    }

    /// Appends the four bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bits.to_be_bytes());
    }

    /// Decodes the four bytes; the spec says a server must close on flags it does not know.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let bits = be_u32(buf);
        if bits & !Self::KNOWN != 0 {
            return Err(ProtocolError::UnknownClientFlags(bits));
        }
        Ok(Some((Self { bits }, 4)))
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: no reply header, just size and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub transmission_flags: u16,
}

impl ExportNameReply {
    /// Appends the reply, with the legacy 124 zero bytes unless the client opted out.
    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.transmission_flags.to_be_bytes());
        if !no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
    }

    /// Client side: decodes the reply.
    pub fn decode(buf: &[u8], no_zeroes: bool) -> Result<Option<(Self, usize)>, ProtocolError> {
        let len = if no_zeroes { 10 } else { 134 };
        if buf.len() < len {
            return Ok(None);
        }
        Ok(Some((Self { size: be_u64(buf), transmission_flags: be_u16(&buf[8..]) }, len)))
    }
}

pub(crate) fn check_magic(what: &'static str, expected: u64, found: u64) -> Result<(), ProtocolError> {
    if expected == found {
        Ok(())
    } else {
        Err(ProtocolError::BadMagic { what, expected, found })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip_and_partial() {
        let g = Greeting { handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES };
        let mut out = Vec::new();
        g.encode(&mut out);
        assert_eq!(out.len(), GREETING_LEN);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        for cut in 0..out.len() {
            assert_eq!(Greeting::decode(&out[..cut]), Ok(None));
        }
        assert_eq!(Greeting::decode(&out), Ok(Some((g, GREETING_LEN))));
        out[0] ^= 1;
        assert!(matches!(Greeting::decode(&out), Err(ProtocolError::BadMagic { .. })));
    }

    #[test]
    fn client_flags_reject_unknown_bits() {
        let mut out = Vec::new();
        ClientFlags { bits: 3 }.encode(&mut out);
        let (f, n) = ClientFlags::decode(&out).unwrap().unwrap();
        assert!(f.fixed_newstyle() && f.no_zeroes());
        assert_eq!(n, 4);
        assert_eq!(ClientFlags::decode(&[0, 0, 0]), Ok(None));
        assert_eq!(ClientFlags::decode(&[0, 0, 0, 4]), Err(ProtocolError::UnknownClientFlags(4)));
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let r = ExportNameReply { size: 1 << 30, transmission_flags: 0x1ed };
        for no_zeroes in [false, true] {
            let mut out = Vec::new();
            r.encode(no_zeroes, &mut out);
            assert_eq!(out.len(), if no_zeroes { 10 } else { 134 });
            assert_eq!(ExportNameReply::decode(&out[..9], no_zeroes), Ok(None));
            assert_eq!(ExportNameReply::decode(&out, no_zeroes), Ok(Some((r, out.len()))));
        }
    }
}
