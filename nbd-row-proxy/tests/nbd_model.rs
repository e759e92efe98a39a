//! The NBD server against a model, over an in-memory pipe: random option haggling, then random
//! requests (valid, misaligned, out of range, with wrong flags, unknown) one at a time. Every
//! reply must carry the request's cookie and succeed or fail as the spec and the session say;
//! reads return what the model holds; block status never calls data zero; the connection ends
//! cleanly. The server is the real one (`nbd::connection::serve`) on a [`MemDisk`].

use std::sync::Arc;

use nbd_proto::consts::*;
use nbd_proto::option::{InfoReply, InfoRequest, MetaContextRequest};
use nbd_proto::transmission::{Chunk, ReplyHeader};
use nbd_proto::{ClientFlags, ClientOption, Command, ExportNameReply, Greeting, OptionReply, OptionReplyKind, Request};
use nbd_row_proxy::harness::Lab;
use proptest::prelude::*;
use row_store::{BlockBackend, MemDisk};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

const NAME: &str = "vm1";
/// Export names a client may ask for: the default, the disk's, an unknown one, the frozen base
/// (absent: ROW is off).
const NAMES: [&str; 4] = ["", NAME, "nope", "vm1@base"];

#[derive(Debug, Clone)]
enum Opt {
    Structured,
    SetMeta {
        export: usize,
        query: usize,
    },
    ListMeta {
        export: usize,
    },
    Info {
        export: usize,
        block_size: bool,
    },
    List,
    Unknown(u32),
    /// An option whose data does not parse.
    Malformed(u32),
}

const QUERIES: [&str; 3] = ["base:allocation", "base:", "qemu:dirty-bitmap:x"];

#[derive(Debug, Clone, Copy)]
enum Enter {
    Go { export: usize, block_size: bool },
    ExportName { export: usize },
}

#[derive(Debug, Clone)]
struct Req {
    command: Command,
    flags: u16,
    offset: u64,
    length: u32,
    fill: u8,
}

#[derive(Debug, Clone)]
struct Script {
    size: usize,
    no_zeroes: bool,
    options: Vec<Opt>,
    enter: Enter,
    requests: Vec<Req>,
    disconnect: bool,
}

fn opt() -> impl Strategy<Value = Opt> {
    prop_oneof![
        3 => Just(Opt::Structured),
        3 => (0..NAMES.len(), 0..QUERIES.len()).prop_map(|(export, query)| Opt::SetMeta { export, query }),
        1 => (0..NAMES.len()).prop_map(|export| Opt::ListMeta { export }),
        1 => (0..NAMES.len(), any::<bool>()).prop_map(|(export, block_size)| Opt::Info { export, block_size }),
        1 => Just(Opt::List),
        1 => prop_oneof![Just(NBD_OPT_EXTENDED_HEADERS), 100u32..200].prop_map(Opt::Unknown),
        1 => prop_oneof![Just(NBD_OPT_GO), Just(NBD_OPT_INFO), Just(NBD_OPT_SET_META_CONTEXT), Just(NBD_OPT_LIST)]
            .prop_map(Opt::Malformed),
    ]
}

fn req(size: usize) -> impl Strategy<Value = Req> {
    let sectors = (size / 512) as u64;
    let command = prop_oneof![
        4 => Just(Command::Read),
        4 => Just(Command::Write),
        1 => Just(Command::Trim),
        2 => Just(Command::WriteZeroes),
        1 => Just(Command::Flush),
        2 => Just(Command::BlockStatus),
        1 => Just(Command::Cache),
        1 => Just(Command::Unknown(77)),
    ];
    let flags = prop_oneof![
        6 => Just(0u16),
        1 => Just(NBD_CMD_FLAG_FUA),
        1 => Just(NBD_CMD_FLAG_DF),
        1 => Just(NBD_CMD_FLAG_NO_HOLE),
        1 => Just(NBD_CMD_FLAG_REQ_ONE),
        1 => Just(NBD_CMD_FLAG_FAST_ZERO),
        1 => Just(1u16 << 9),
    ];
    let offset = prop_oneof![
        8 => (0..sectors).prop_map(|s| s * 512),
        1 => 0..(size as u64 + 4096),
        1 => Just(u64::MAX - 511),
    ];
    let length = prop_oneof![
        8 => (1u32..=32).prop_map(|n| n * 512),
        1 => 0u32..70_000,
        1 => Just(33u32 << 20),
    ];
    (command, flags, offset, length, any::<u8>()).prop_map(|(command, flags, offset, mut length, fill)| {
        // A WRITE's payload is sent even when refused: keep it small.
        if command == Command::Write && length > 1 << 20 {
            length = 4096;
        }
        Req { command, flags, offset, length, fill }
    })
}

fn script() -> impl Strategy<Value = Script> {
    let size = prop_oneof![Just(64usize << 10), Just((64 << 10) + 512), Just((64 << 10) + 100)];
    let enter = prop_oneof![
        4 => (0..2usize, any::<bool>()).prop_map(|(export, block_size)| Enter::Go { export, block_size }),
        1 => (0..2usize).prop_map(|export| Enter::ExportName { export }),
    ];
    (size, any::<bool>(), prop::collection::vec(opt(), 0..6), enter, any::<bool>()).prop_flat_map(
        |(size, no_zeroes, options, enter, disconnect)| {
            prop::collection::vec(req(size), 0..40).prop_map(move |requests| Script {
                size,
                no_zeroes,
                options: options.clone(),
                enter,
                requests,
                disconnect,
            })
        },
    )
}

/// The client's end of the pipe, reading whole messages.
struct Client {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    buf: Vec<u8>,
}

impl Client {
    async fn next<T>(&mut self, decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, nbd_proto::ProtocolError>) -> T {
        loop {
            if let Some((v, n)) = decode(&self.buf).expect("the server sent a malformed message") {
                self.buf.drain(..n);
                return v;
            }
            let mut chunk = [0u8; 65536];
            let n = self.rd.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed the connection unexpectedly");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        self.next(|b| Ok((b.len() >= n).then(|| (b[..n].to_vec(), n)))).await
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }

    /// Replies to one option until its final one (ACK or an error).
    async fn option_replies(&mut self, code: u32) -> Vec<OptionReply> {
        let mut out = Vec::new();
        loop {
            let r = self.next(OptionReply::decode).await;
            assert_eq!(r.option, code, "a reply to another option");
            let last = matches!(r.kind, OptionReplyKind::Ack | OptionReplyKind::Error { .. });
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// The server closes the connection: nothing more arrives.
    async fn closed(&mut self) {
        let mut rest = Vec::new();
        self.rd.read_to_end(&mut rest).await.unwrap();
        assert!(self.buf.is_empty() && rest.is_empty(), "bytes after the end: {:?}", [&self.buf[..], &rest].concat());
    }
}

/// What the negotiated session allows, as the client understands it.
#[derive(Debug, Default)]
struct Session {
    structured: bool,
    block_status: bool,
    alignment: u64,
}

fn error_code(r: &OptionReply) -> Option<u32> {
    match r.kind {
        OptionReplyKind::Error { code, .. } => Some(code),
        _ => None,
    }
}

async fn negotiate(c: &mut Client, s: &Script) -> Session {
    let greeting = c.next(Greeting::decode).await;
    assert_eq!(greeting.handshake_flags & NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_FIXED_NEWSTYLE);
    let mut flags = Vec::new();
    let client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | if s.no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
    ClientFlags { bits: client_flags }.encode(&mut flags);
    c.send(&flags).await;
    let mut structured = false;
    // The export `base:allocation` was selected for by the last SET_META_CONTEXT.
    let mut meta: Option<(&str, bool)> = None;
    for o in &s.options {
        let mut bytes = Vec::new();
        let code = match o {
            Opt::Structured => {
                ClientOption::StructuredReply.encode(&mut bytes);
                NBD_OPT_STRUCTURED_REPLY
            }
            Opt::SetMeta { export, query } => {
                let m = MetaContextRequest { export: NAMES[*export].into(), queries: vec![QUERIES[*query].into()] };
                ClientOption::SetMetaContext(m).encode(&mut bytes);
                NBD_OPT_SET_META_CONTEXT
            }
            Opt::ListMeta { export } => {
                let m = MetaContextRequest { export: NAMES[*export].into(), queries: vec![] };
                ClientOption::ListMetaContext(m).encode(&mut bytes);
                NBD_OPT_LIST_META_CONTEXT
            }
            Opt::Info { export, block_size } => {
                let requests = if *block_size { vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME] } else { vec![] };
                ClientOption::Info(InfoRequest { export: NAMES[*export].into(), requests }).encode(&mut bytes);
                NBD_OPT_INFO
            }
            Opt::List => {
                ClientOption::List.encode(&mut bytes);
                NBD_OPT_LIST
            }
            Opt::Unknown(code) => {
                ClientOption::Unknown(*code).encode(&mut bytes);
                *code
            }
            Opt::Malformed(code) => {
                bytes.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
                bytes.extend_from_slice(&code.to_be_bytes());
                bytes.extend_from_slice(&3u32.to_be_bytes());
                bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
                *code
            }
        };
        c.send(&bytes).await;
        let replies = c.option_replies(code).await;
        let last = replies.last().unwrap();
        let known = |i: usize| i < 2;
        match o {
            Opt::Structured => {
                let want = if structured { Some(NBD_REP_ERR_INVALID) } else { None };
                assert_eq!(error_code(last), want);
                structured = true;
            }
            Opt::SetMeta { export, query } => {
                if !structured {
                    assert_eq!(error_code(last), Some(NBD_REP_ERR_INVALID));
                } else if !known(*export) {
                    assert_eq!(error_code(last), Some(NBD_REP_ERR_UNKNOWN));
                } else {
                    assert_eq!(error_code(last), None);
                    let selected = *query == 0;
                    let contexts = replies.iter().filter(|r| matches!(r.kind, OptionReplyKind::MetaContext { .. }));
                    assert_eq!(contexts.count(), usize::from(selected));
                    meta = Some((NAMES[*export], selected));
                }
            }
            Opt::ListMeta { export } => {
                assert_eq!(error_code(last), if known(*export) { None } else { Some(NBD_REP_ERR_UNKNOWN) });
            }
            Opt::Info { export, .. } => {
                if known(*export) {
                    assert_eq!(error_code(last), None);
                    let size = replies.iter().find_map(|r| match &r.kind {
                        OptionReplyKind::Info(InfoReply::Export { size, .. }) => Some(*size),
                        _ => None,
                    });
                    assert_eq!(size, Some(s.size as u64));
                } else {
                    assert_eq!(error_code(last), Some(NBD_REP_ERR_UNKNOWN));
                }
            }
            Opt::List => {
                assert_eq!(error_code(last), None);
                let servers: Vec<_> = replies
                    .iter()
                    .filter_map(|r| match &r.kind {
                        OptionReplyKind::Server { name, .. } => Some(name.as_str()),
                        _ => None,
                    })
                    .collect();
                assert_eq!(servers, [NAME]);
            }
            Opt::Unknown(_) => assert_eq!(error_code(last), Some(NBD_REP_ERR_UNSUP)),
            Opt::Malformed(_) => assert_eq!(error_code(last), Some(NBD_REP_ERR_INVALID)),
        }
    }
    // Both names the client may enter with are the same export.
    let block_status = structured && meta.is_some_and(|(name, selected)| selected && (name.is_empty() || name == NAME));
    let mut bytes = Vec::new();
    match s.enter {
        Enter::Go { export, block_size } => {
            let requests = if block_size { vec![NBD_INFO_BLOCK_SIZE] } else { vec![] };
            ClientOption::Go(InfoRequest { export: NAMES[export].into(), requests }).encode(&mut bytes);
            c.send(&bytes).await;
            let replies = c.option_replies(NBD_OPT_GO).await;
            assert_eq!(replies.last().unwrap().kind, OptionReplyKind::Ack);
            let min = if s.size.is_multiple_of(512) { 512 } else { 1 };
            let alignment = if block_size { min } else { 1 };
            Session { structured, block_status, alignment }
        }
        Enter::ExportName { export } => {
            ClientOption::ExportName(NAMES[export].into()).encode(&mut bytes);
            c.send(&bytes).await;
            let no_zeroes = s.no_zeroes;
            let reply = c.next(|b| ExportNameReply::decode(b, no_zeroes)).await;
            assert_eq!(reply.size, s.size as u64);
            Session { structured, block_status, alignment: 1 }
        }
    }
}

/// The error a request must get, or `None` if it must succeed.
fn expected_error(s: &Session, r: &Req, size: u64) -> Option<u32> {
    use Command::*;
    let known =
        NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
    let allowed = match r.command {
        Read => NBD_CMD_FLAG_DF,
        Write | Trim => NBD_CMD_FLAG_FUA,
        WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        BlockStatus => NBD_CMD_FLAG_REQ_ONE,
        Flush | Cache | Disc => 0,
        Resize | Unknown(_) => return Some(NBD_EINVAL),
    };
    if r.flags & !known != 0 || r.flags & !allowed != 0 || (r.flags & NBD_CMD_FLAG_DF != 0 && !s.structured) {
        return Some(NBD_EINVAL);
    }
    if r.command == Flush {
        return None;
    }
    if r.command == BlockStatus && !s.block_status {
        return Some(NBD_EINVAL);
    }
    if matches!(r.command, Read | Write) && r.length > 32 << 20 {
        return Some(NBD_EINVAL);
    }
    if r.length == 0 || !r.offset.is_multiple_of(s.alignment) || !(r.length as u64).is_multiple_of(s.alignment) {
        return Some(NBD_EINVAL);
    }
    if r.offset.checked_add(r.length as u64).is_none_or(|end| end > size) {
        return Some(if matches!(r.command, Write | Trim | WriteZeroes) { NBD_ENOSPC } else { NBD_EINVAL });
    }
    // The in-memory disk cannot zero fast.
    if r.command == WriteZeroes && r.flags & NBD_CMD_FLAG_FAST_ZERO != 0 {
        return Some(NBD_ENOTSUP);
    }
    None
}

/// A reply: its error, the data of a read, and the extents of a block status.
#[derive(Debug, Default)]
struct Reply {
    error: u32,
    data: Vec<u8>,
    extents: Vec<(u32, u32)>,
}

async fn reply(c: &mut Client, s: &Session, r: &Req) -> Reply {
    let mut out = Reply::default();
    let mut data = vec![None; if r.command == Command::Read { r.length as usize } else { 0 }];
    let mut first = true;
    loop {
        let h = match c.next(ReplyHeader::decode).await {
            ReplyHeader::Simple { error, cookie } => {
                // Simple replies: always without structured replies; with them, only as the one
                // reply to a request that returns no data (the spec allows both).
                assert!(
                    !s.structured || (first && !matches!(r.command, Command::Read | Command::BlockStatus)),
                    "a simple reply to {r:?} after structured replies were negotiated"
                );
                assert_eq!(cookie, r.length as u64 ^ r.offset);
                out.error = error;
                if error == 0 && r.command == Command::Read {
                    out.data = c.bytes(r.length as usize).await;
                }
                return out;
            }
            ReplyHeader::Structured(h) => {
                assert!(s.structured, "a structured reply without structured replies");
                h
            }
        };
        first = false;
        assert_eq!(h.cookie, r.length as u64 ^ r.offset);
        let payload = c.bytes(h.length as usize).await;
        match Chunk::parse(&h, &payload).expect("a malformed chunk") {
            Chunk::None => assert!(h.is_done()),
            Chunk::OffsetData { offset, data: bytes } => {
                let at = (offset - r.offset) as usize;
                for (i, b) in bytes.iter().enumerate() {
                    assert!(data[at + i].replace(*b).is_none(), "a byte sent twice");
                }
            }
            Chunk::OffsetHole { offset, hole_size } => {
                let at = (offset - r.offset) as usize;
                for d in &mut data[at..at + hole_size as usize] {
                    assert!(d.replace(0).is_none(), "a byte sent twice");
                }
            }
            Chunk::BlockStatus { context_id, extents } => {
                assert_eq!(context_id, 1);
                out.extents.extend(extents.iter().map(|e| (e.length, e.flags)));
            }
            Chunk::Error { error, .. } => {
                assert_ne!(error, 0);
                out.error = error;
            }
            Chunk::Unknown { chunk_type, .. } => panic!("unknown chunk type {chunk_type}"),
        }
        if h.is_done() {
            break;
        }
    }
    if out.error == 0 {
        out.data = data.into_iter().map(|b| b.expect("a byte of the read was not sent")).collect();
    }
    out
}

async fn run(s: Script) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let sock = dir.path().join("nbd.sock");
    let lab = Lab::start(&[
        "serve",
        "--image",
        image.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
        "--export",
        NAME,
    ])
    .await
    .unwrap();
    let disk = Arc::new(MemDisk::new(s.size, true));
    let catalog = lab.catalog_over(disk.clone() as Arc<dyn BlockBackend>);
    let (client, server_end) = tokio::io::duplex(1 << 20);
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(nbd_row_proxy::nbd::connection::serve(
        Box::new(server_end),
        None,
        catalog,
        "model".into(),
        shutdown,
    ));
    let (rd, wr) = tokio::io::split(client);
    let mut c = Client { rd, wr, buf: Vec::new() };
    let session = negotiate(&mut c, &s).await;
    let mut model = vec![0u8; s.size];
    let size = s.size as u64;
    for r in &s.requests {
        let mut bytes = Vec::new();
        let cookie = r.length as u64 ^ r.offset;
        Request { flags: r.flags, command: r.command, cookie, offset: r.offset, length: r.length }.encode(&mut bytes);
        if r.command == Command::Write {
            bytes.extend(std::iter::repeat_n(r.fill, r.length as usize));
        }
        c.send(&bytes).await;
        let want = expected_error(&session, r, size);
        let got = reply(&mut c, &session, r).await;
        assert_eq!((got.error != 0).then_some(got.error), want, "{r:?} in {session:?}");
        if want.is_some() {
            continue;
        }
        if r.command == Command::Flush {
            continue; // offset and length mean nothing to a flush
        }
        let range = r.offset as usize..(r.offset + r.length as u64) as usize;
        match r.command {
            Command::Write => model[range].fill(r.fill),
            Command::Trim | Command::WriteZeroes => model[range].fill(0),
            Command::Read => assert!(got.data == model[range], "{r:?} read other bytes than were written"),
            Command::BlockStatus => {
                assert!(!got.extents.is_empty());
                if r.flags & NBD_CMD_FLAG_REQ_ONE != 0 {
                    assert_eq!(got.extents.len(), 1);
                }
                let mut at = r.offset;
                for (len, flags) in &got.extents {
                    assert!(*len > 0, "an empty extent");
                    let end = (at + *len as u64).min(size);
                    if flags & NBD_STATE_ZERO != 0 {
                        assert!(model[at as usize..end as usize].iter().all(|&b| b == 0), "data reported as zero");
                    }
                    at += *len as u64;
                }
                assert!(at <= size, "extents past the end of the export");
            }
            _ => {}
        }
    }
    assert_eq!(disk.contents(), model, "the disk differs from the model");
    if s.disconnect {
        let mut bytes = Vec::new();
        Request { flags: 0, command: Command::Disc, cookie: 0, offset: 0, length: 0 }.encode(&mut bytes);
        c.send(&bytes).await;
        c.closed().await;
    } else {
        c.wr.shutdown().await.unwrap();
        c.closed().await;
    }
    server.await.unwrap().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("NBD_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_server_keeps_to_the_spec_and_the_model(s in script()) {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(run(s));
    }
}
