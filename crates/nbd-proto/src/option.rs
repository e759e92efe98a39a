//! The option haggling phase: client options and the server's option replies.

use crate::consts::*;
use crate::handshake::check_magic;
use crate::wire::{be_u32, be_u64, put_string32, Reader};
use crate::ProtocolError;

/// Largest option payload accepted. The spec caps names at 4096 bytes; a handful of meta
/// context queries fit easily. Anything larger is treated as a broken or hostile client.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// An option as framed on the wire: its code and its still-unparsed data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOption {
    /// The `NBD_OPT_*` code.
    pub option: u32,
    /// The option's data.
    pub data: Vec<u8>,
}

impl RawOption {
    /// Decodes one framed option once all of its bytes have arrived.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        if buf.len() < OPTION_HEADER_LEN {
            return Ok(None);
        }
        check_magic("option", NBD_IHAVEOPT, be_u64(buf))?;
        let option = be_u32(&buf[8..]);
        let length = be_u32(&buf[12..]);
        if length > MAX_OPTION_DATA {
            return Err(ProtocolError::OptionTooLong { option, length, max: MAX_OPTION_DATA });
        }
        let total = OPTION_HEADER_LEN + length as usize;
        if buf.len() < total {
            return Ok(None);
        }
        Ok(Some((Self { option, data: buf[OPTION_HEADER_LEN..total].to_vec() }, total)))
    }
}

/// A request for metadata contexts (`NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export the contexts are for.
    pub export: String,
    /// Context names or namespace queries such as `base:`.
    pub queries: Vec<String>,
}

/// An export selection (`NBD_OPT_INFO`/`NBD_OPT_GO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name; empty means the default export.
    pub export: String,
    /// The `NBD_INFO_*` items the client asks for.
    pub requests: Vec<u16>,
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: select the export and enter transmission at once.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any other option code; the data is ignored.
    Unknown(u32),
}

/// Why an option's data could not be parsed; answered with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub &'static str);

impl ClientOption {
    /// The `NBD_OPT_*` code of this option.
    pub fn code(&self) -> u32 {
        match self {
            Self::ExportName(_) => NBD_OPT_EXPORT_NAME,
            Self::Abort => NBD_OPT_ABORT,
            Self::List => NBD_OPT_LIST,
            Self::StartTls => NBD_OPT_STARTTLS,
            Self::Info(_) => NBD_OPT_INFO,
            Self::Go(_) => NBD_OPT_GO,
            Self::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            Self::ListMetaContext(_) => NBD_OPT_LIST_META_CONTEXT,
            Self::SetMetaContext(_) => NBD_OPT_SET_META_CONTEXT,
            Self::ExtendedHeaders => NBD_OPT_EXTENDED_HEADERS,
            Self::Unknown(code) => *code,
        }
    }

    /// Parses a framed option's data.
    pub fn parse(raw: &RawOption) -> Result<Self, InvalidOption> {
        let no_data = |opt: Self, what| {
            if raw.data.is_empty() {
                Ok(opt)
            } else {
                Err(InvalidOption(what))
            }
        };
        match raw.option {
            NBD_OPT_EXPORT_NAME => String::from_utf8(raw.data.clone())
                .map(Self::ExportName)
                .map_err(|_| InvalidOption("export name is not UTF-8")),
            NBD_OPT_ABORT => Ok(Self::Abort),
            NBD_OPT_LIST => no_data(Self::List, "NBD_OPT_LIST takes no data"),
            NBD_OPT_STARTTLS => no_data(Self::StartTls, "NBD_OPT_STARTTLS takes no data"),
            NBD_OPT_STRUCTURED_REPLY => no_data(Self::StructuredReply, "NBD_OPT_STRUCTURED_REPLY takes no data"),
            NBD_OPT_EXTENDED_HEADERS => no_data(Self::ExtendedHeaders, "NBD_OPT_EXTENDED_HEADERS takes no data"),
            NBD_OPT_INFO | NBD_OPT_GO => {
                let req = parse_info_request(&raw.data).map_err(|_| InvalidOption("malformed NBD_OPT_INFO/GO data"))?;
                Ok(if raw.option == NBD_OPT_GO { Self::Go(req) } else { Self::Info(req) })
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let req = parse_meta_request(&raw.data).map_err(|_| InvalidOption("malformed meta context request"))?;
                Ok(if raw.option == NBD_OPT_SET_META_CONTEXT {
                    Self::SetMetaContext(req)
                } else {
                    Self::ListMetaContext(req)
                })
            }
            other => Ok(Self::Unknown(other)),
        }
    }

    /// Client side: appends the framed option.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            Self::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            Self::Info(req) | Self::Go(req) => {
                put_string32(&mut data, &req.export);
                data.extend_from_slice(&(req.requests.len() as u16).to_be_bytes());
                for r in &req.requests {
                    data.extend_from_slice(&r.to_be_bytes());
                }
            }
            Self::ListMetaContext(req) | Self::SetMetaContext(req) => {
                put_string32(&mut data, &req.export);
                data.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
                for q in &req.queries {
                    put_string32(&mut data, q);
                }
            }
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::ExtendedHeaders
            | Self::Unknown(_) => {}
        }
        out.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.code().to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtocolError> {
    let mut r = Reader::new(data, "NBD_OPT_INFO/GO");
    let export = r.string32()?;
    let n = r.u16()? as usize;
    if r.remaining() != n * 2 {
        return Err(ProtocolError::Malformed("NBD_OPT_INFO/GO"));
    }
    let requests = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
    Ok(InfoRequest { export, requests })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, ProtocolError> {
    let mut r = Reader::new(data, "meta context request");
    let export = r.string32()?;
    let n = r.u32()? as usize;
    // Each query needs at least its four-byte length, which bounds `n` before allocating.
    if n > r.remaining() / 4 {
        return Err(ProtocolError::Malformed("meta context request"));
    }
    let queries = (0..n).map(|_| r.string32()).collect::<Result<_, _>>()?;
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// One piece of export information carried by `NBD_REP_INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        transmission_flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Smallest request granularity.
        minimum: u32,
        /// Size that avoids read-modify-write.
        preferred: u32,
        /// Largest payload.
        maximum: u32,
    },
    /// An information type this implementation does not know.
    Unknown {
        /// The `NBD_INFO_*` type.
        info_type: u16,
        /// Its raw data.
        data: Vec<u8>,
    },
}

/// The body of an option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReplyKind {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: one export for `NBD_OPT_LIST`.
    Server {
        /// Export name.
        name: String,
        /// Optional description.
        details: String,
    },
    /// `NBD_REP_INFO`.
    Info(InfoReply),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Identifier used in `NBD_REPLY_TYPE_BLOCK_STATUS` (0 for list replies).
        id: u32,
        /// Context name.
        name: String,
    },
    /// Any `NBD_REP_ERR_*`, with a short human-readable message.
    Error {
        /// The error reply type (has [`NBD_REP_FLAG_ERROR`] set).
        code: u32,
        /// Message for humans; may be empty.
        message: String,
    },
    /// A non-error reply type this implementation does not know.
    Unknown {
        /// Reply type.
        reply_type: u32,
        /// Raw data.
        data: Vec<u8>,
    },
}

/// One option reply: which option it answers and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option being answered.
    pub option: u32,
    /// The reply.
    pub kind: OptionReplyKind,
}

impl OptionReply {
    /// Shorthand for an `NBD_REP_ACK`.
    pub fn ack(option: u32) -> Self {
        Self { option, kind: OptionReplyKind::Ack }
    }

    /// Shorthand for an error reply.
    pub fn error(option: u32, code: u32, message: impl Into<String>) -> Self {
        Self { option, kind: OptionReplyKind::Error { code, message: message.into() } }
    }

    /// Appends the framed reply.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        let reply_type = match &self.kind {
            OptionReplyKind::Ack => NBD_REP_ACK,
            OptionReplyKind::Server { name, details } => {
                put_string32(&mut data, name);
                data.extend_from_slice(details.as_bytes());
                NBD_REP_SERVER
            }
            OptionReplyKind::Info(info) => {
                encode_info(info, &mut data);
                NBD_REP_INFO
            }
            OptionReplyKind::MetaContext { id, name } => {
                data.extend_from_slice(&id.to_be_bytes());
                data.extend_from_slice(name.as_bytes());
                NBD_REP_META_CONTEXT
            }
            OptionReplyKind::Error { code, message } => {
                data.extend_from_slice(message.as_bytes());
                *code
            }
            OptionReplyKind::Unknown { reply_type, data: raw } => {
                data.extend_from_slice(raw);
                *reply_type
            }
        };
        out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&reply_type.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
    }

    /// Client side: decodes one framed reply.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        if buf.len() < OPTION_REPLY_HEADER_LEN {
            return Ok(None);
        }
        check_magic("option reply", NBD_REP_MAGIC, be_u64(buf))?;
        let option = be_u32(&buf[8..]);
        let reply_type = be_u32(&buf[12..]);
        let length = be_u32(&buf[16..]);
        if length > MAX_OPTION_DATA {
            return Err(ProtocolError::Malformed("option reply length"));
        }
        let total = OPTION_REPLY_HEADER_LEN + length as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let data = &buf[OPTION_REPLY_HEADER_LEN..total];
        let mut r = Reader::new(data, "option reply");
        let kind = match reply_type {
            NBD_REP_ACK => {
                r.finish()?;
                OptionReplyKind::Ack
            }
            NBD_REP_SERVER => {
                let name = r.string32()?;
                let rest = r.rest();
                let details =
                    String::from_utf8(rest.to_vec()).map_err(|_| ProtocolError::Malformed("NBD_REP_SERVER"))?;
                OptionReplyKind::Server { name, details }
            }
            NBD_REP_INFO => OptionReplyKind::Info(decode_info(data)?),
            NBD_REP_META_CONTEXT => {
                let id = r.u32()?;
                let n = r.remaining();
                OptionReplyKind::MetaContext { id, name: r.utf8(n)? }
            }
            code if code & NBD_REP_FLAG_ERROR != 0 => {
                let message = String::from_utf8_lossy(data).into_owned();
                OptionReplyKind::Error { code, message }
            }
            reply_type => OptionReplyKind::Unknown { reply_type, data: data.to_vec() },
        };
        Ok(Some((Self { option, kind }, total)))
    }
}

fn encode_info(info: &InfoReply, data: &mut Vec<u8>) {
    match info {
        InfoReply::Export { size, transmission_flags } => {
            data.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
            data.extend_from_slice(&size.to_be_bytes());
            data.extend_from_slice(&transmission_flags.to_be_bytes());
        }
        InfoReply::Name(name) => {
            data.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
            data.extend_from_slice(name.as_bytes());
        }
        InfoReply::Description(text) => {
            data.extend_from_slice(&NBD_INFO_DESCRIPTION.to_be_bytes());
            data.extend_from_slice(text.as_bytes());
        }
        InfoReply::BlockSize { minimum, preferred, maximum } => {
            data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
            for v in [minimum, preferred, maximum] {
                data.extend_from_slice(&v.to_be_bytes());
            }
        }
        InfoReply::Unknown { info_type, data: raw } => {
            data.extend_from_slice(&info_type.to_be_bytes());
            data.extend_from_slice(raw);
        }
    }
}

fn decode_info(data: &[u8]) -> Result<InfoReply, ProtocolError> {
    let mut r = Reader::new(data, "NBD_REP_INFO");
    let info_type = r.u16()?;
    let info = match info_type {
        NBD_INFO_EXPORT => InfoReply::Export { size: r.u64()?, transmission_flags: r.u16()? },
        NBD_INFO_NAME => {
            let n = r.remaining();
            InfoReply::Name(r.utf8(n)?)
        }
        NBD_INFO_DESCRIPTION => {
            let n = r.remaining();
            InfoReply::Description(r.utf8(n)?)
        }
        NBD_INFO_BLOCK_SIZE => InfoReply::BlockSize { minimum: r.u32()?, preferred: r.u32()?, maximum: r.u32()? },
        info_type => return Ok(InfoReply::Unknown { info_type, data: r.rest().to_vec() }),
    };
    r.finish()?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(opt: ClientOption) {
        let mut out = Vec::new();
        opt.encode(&mut out);
        for cut in 0..out.len() {
            assert_eq!(RawOption::decode(&out[..cut]), Ok(None), "cut at {cut}");
        }
        let (raw, n) = RawOption::decode(&out).unwrap().unwrap();
        assert_eq!(n, out.len());
        assert_eq!(ClientOption::parse(&raw), Ok(opt));
    }

    #[test]
    fn every_option_round_trips() {
        let info = InfoRequest { export: "vm1".into(), requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME] };
        let meta = MetaContextRequest { export: "".into(), queries: vec!["base:allocation".into()] };
        for opt in [
            ClientOption::ExportName("disk".into()),
            ClientOption::Abort,
            ClientOption::List,
            ClientOption::StartTls,
            ClientOption::Info(info.clone()),
            ClientOption::Go(info),
            ClientOption::StructuredReply,
            ClientOption::ListMetaContext(meta.clone()),
            ClientOption::SetMetaContext(meta),
            ClientOption::ListMetaContext(MetaContextRequest { export: "x".into(), queries: vec![] }),
            ClientOption::ExtendedHeaders,
            ClientOption::Unknown(99),
        ] {
            round_trip(opt);
        }
    }

    #[test]
    fn bad_option_magic_and_oversized_length() {
        let mut out = Vec::new();
        ClientOption::List.encode(&mut out);
        out[3] ^= 0xff;
        assert!(matches!(RawOption::decode(&out), Err(ProtocolError::BadMagic { .. })));
        let mut big = NBD_IHAVEOPT.to_be_bytes().to_vec();
        big.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        big.extend_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        assert!(matches!(RawOption::decode(&big), Err(ProtocolError::OptionTooLong { .. })));
    }

    #[test]
    fn malformed_option_data_is_invalid_not_fatal() {
        let raw = RawOption { option: NBD_OPT_GO, data: vec![0, 0, 0, 9, b'a'] };
        assert!(ClientOption::parse(&raw).is_err());
        let raw = RawOption { option: NBD_OPT_LIST, data: vec![1] };
        assert!(ClientOption::parse(&raw).is_err());
        // A meta context request claiming a billion queries must not allocate for them.
        let mut data = Vec::new();
        put_string32(&mut data, "");
        data.extend_from_slice(&1_000_000_000u32.to_be_bytes());
        let raw = RawOption { option: NBD_OPT_SET_META_CONTEXT, data };
        assert!(ClientOption::parse(&raw).is_err());
        // GO with a trailing odd byte.
        let mut data = Vec::new();
        put_string32(&mut data, "");
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&[0, 3, 7]);
        assert!(ClientOption::parse(&RawOption { option: NBD_OPT_GO, data }).is_err());
    }

    #[test]
    fn every_option_reply_round_trips() {
        let replies = [
            OptionReply::ack(NBD_OPT_GO),
            OptionReply {
                option: NBD_OPT_LIST,
                kind: OptionReplyKind::Server { name: "a".into(), details: "disk".into() },
            },
            OptionReply {
                option: NBD_OPT_GO,
                kind: OptionReplyKind::Info(InfoReply::Export { size: 4096, transmission_flags: 3 }),
            },
            OptionReply { option: NBD_OPT_GO, kind: OptionReplyKind::Info(InfoReply::Name("n".into())) },
            OptionReply { option: NBD_OPT_GO, kind: OptionReplyKind::Info(InfoReply::Description("d".into())) },
            OptionReply {
                option: NBD_OPT_GO,
                kind: OptionReplyKind::Info(InfoReply::BlockSize { minimum: 512, preferred: 4096, maximum: 1 << 25 }),
            },
            OptionReply {
                option: NBD_OPT_GO,
                kind: OptionReplyKind::Info(InfoReply::Unknown { info_type: 77, data: vec![1, 2] }),
            },
            OptionReply {
                option: NBD_OPT_SET_META_CONTEXT,
                kind: OptionReplyKind::MetaContext { id: 1, name: BASE_ALLOCATION.into() },
            },
            OptionReply::error(12345, NBD_REP_ERR_UNSUP, "not supported"),
            OptionReply { option: 1, kind: OptionReplyKind::Unknown { reply_type: 42, data: vec![9] } },
        ];
        for reply in replies {
            let mut out = Vec::new();
            reply.encode(&mut out);
            assert_eq!(OptionReply::decode(&out[..out.len() - 1]).unwrap_or(None), None);
            assert_eq!(OptionReply::decode(&out), Ok(Some((reply, out.len()))));
        }
    }
}
