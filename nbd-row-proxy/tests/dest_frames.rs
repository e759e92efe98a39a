//! The destination's frame handling against a model: a real `receive` proxy (assembled without
//! its sockets) takes one migration connection over a pipe, the handshake done as an `--insecure`
//! source does it, then a random sequence of frames: data and zero extents in and out of the
//! disk, corrupt lz4, rounds, keepalives, commits, discards, dones, messages that have no place
//! in a session and bytes that are no frame at all.
//!
//! What must hold: the disk is committed exactly when a `Commit` arrives after nothing but valid
//! frames, it then holds exactly what the frames wrote, and the destination answered `Committed`;
//! before a commit, any bad frame ends the session with an `Error` to the source and nothing
//! served (reads wait, writes are refused); after it, nothing a peer sends undoes the commit.

use migration_stream::{Codec, Message, RoundKind, SessionParams};
use nbd_row_proxy::harness::Lab;
use nbd_row_proxy::ownership::Access;
use proptest::prelude::*;
use row_store::BlockBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use control_api::IncomingPhase;

const BLOCK: usize = 4096;
const BLOCKS: usize = 64;
const SIZE: usize = BLOCK * BLOCKS;

#[derive(Debug, Clone)]
enum Frame {
    Begin,
    Data {
        block: usize,
        blocks: usize,
        fill: u8,
        compress: bool,
    },
    /// An extent reaching past the end of the disk.
    DataOutside,
    /// lz4 that does not decode to its length.
    DataCorrupt,
    Zero {
        block: usize,
        blocks: usize,
    },
    RoundEnd,
    Keepalive,
    Commit,
    Discard,
    Done,
    /// A message only a destination sends.
    Unexpected,
    /// Bytes that are not a frame.
    Garbage,
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        2 => Just(Frame::Begin),
        12 => (0..BLOCKS, 1..=4usize, any::<u8>(), any::<bool>())
            .prop_map(|(block, blocks, fill, compress)| Frame::Data { block, blocks, fill, compress }),
        1 => Just(Frame::DataOutside),
        1 => Just(Frame::DataCorrupt),
        3 => (0..BLOCKS, 1..=8usize).prop_map(|(block, blocks)| Frame::Zero { block, blocks }),
        2 => Just(Frame::RoundEnd),
        1 => Just(Frame::Keepalive),
        3 => Just(Frame::Commit),
        1 => Just(Frame::Discard),
        2 => Just(Frame::Done),
        1 => Just(Frame::Unexpected),
        1 => Just(Frame::Garbage),
    ]
}

/// The session: whether the source's disk size matches, then the frames.
fn script() -> impl Strategy<Value = (bool, Vec<Frame>)> {
    let first = prop_oneof![8 => Just(Frame::Begin), 1 => frame()];
    (prop::bool::weighted(0.95), first, prop::collection::vec(frame(), 0..30)).prop_map(|(size_ok, first, mut rest)| {
        rest.insert(0, first);
        (size_ok, rest)
    })
}

fn encode(f: &Frame, round: &mut u32) -> Vec<u8> {
    let mut out = Vec::new();
    let msg = match f {
        Frame::Begin => {
            *round += 1;
            Message::RoundBegin { round: *round, kind: if *round == 1 { RoundKind::Base } else { RoundKind::Update } }
        }
        Frame::Data { block, blocks, fill, compress } => {
            let n = (*blocks).min(BLOCKS - block);
            // A little structure so that lz4 has something to find.
            let data: Vec<u8> = (0..n * BLOCK).map(|i| fill.wrapping_add((i / 512) as u8)).collect();
            Message::data((block * BLOCK) as u64, &data, *compress)
        }
        Frame::DataOutside => Message::data((SIZE - BLOCK) as u64, &[7u8; 2 * BLOCK], false),
        Frame::DataCorrupt => {
            Message::Data { offset: 0, codec: Codec::Lz4, logical_len: BLOCK as u32, payload: vec![0xf0, 1, 2, 3] }
        }
        Frame::Zero { block, blocks } => {
            Message::Zero { offset: (block * BLOCK) as u64, len: ((*blocks).min(BLOCKS - block) * BLOCK) as u64 }
        }
        Frame::RoundEnd => Message::RoundEnd { round: *round },
        Frame::Keepalive => Message::Keepalive,
        Frame::Commit => Message::Commit,
        Frame::Discard => Message::Discard { reason: "model".into() },
        Frame::Done => Message::Done,
        Frame::Unexpected => Message::Committed,
        Frame::Garbage => return b"\x05\0\0\0\x04\0\0\0abcd\0\0\0\0".to_vec(),
    };
    msg.encode(&mut out);
    out
}

/// What the destination must end with, and say.
#[derive(Debug, PartialEq)]
struct Expected {
    phase: IncomingPhase,
    committed_replies: usize,
    error_replies: usize,
    /// The disk's content if committed.
    image: Option<Vec<u8>>,
}

fn model(size_ok: bool, frames: &[Frame]) -> Expected {
    use IncomingPhase::*;
    let mut image = vec![0u8; SIZE];
    let mut out = Expected { phase: Waiting, committed_replies: 0, error_replies: 0, image: None };
    if !size_ok {
        return out; // rejected in the handshake
    }
    for (i, f) in frames.iter().enumerate() {
        let phase = if i == 0 { None } else { Some(out.phase) };
        match (phase, f) {
            // The first message: a round begins the session; a discard of nothing is fine.
            (None, Frame::Begin) => out.phase = Receiving,
            (None, Frame::Discard) => return out,
            (None, _) => {
                out.error_replies += 1;
                return out;
            }
            (Some(Receiving), Frame::Data { block, blocks, fill, .. }) => {
                let n = (*blocks).min(BLOCKS - block);
                for (j, b) in image[block * BLOCK..(block + n) * BLOCK].iter_mut().enumerate() {
                    *b = fill.wrapping_add((j / 512) as u8);
                }
            }
            (Some(Receiving), Frame::Zero { block, blocks }) => {
                let n = (*blocks).min(BLOCKS - block);
                image[block * BLOCK..(block + n) * BLOCK].fill(0);
            }
            (Some(Receiving), Frame::Begin | Frame::RoundEnd | Frame::Keepalive) => {}
            (Some(Receiving), Frame::Commit) => {
                out.phase = Committed;
                out.committed_replies += 1;
            }
            (Some(Receiving), Frame::Discard) => {
                out.phase = Waiting;
                return out;
            }
            (Some(Receiving), _) => {
                out.phase = Waiting;
                out.error_replies += 1;
                return out;
            }
            (Some(Committed), Frame::Keepalive) => {}
            (Some(Committed), Frame::Done) => {
                out.phase = Owner;
                break;
            }
            (Some(Committed), Frame::Discard) => {
                out.error_replies += 1;
                break;
            }
            // Anything else after the commit ends the connection and changes nothing.
            (Some(_), _) => break,
        }
    }
    if out.phase == Receiving {
        // The source closed before committing.
        out.phase = Waiting;
        out.error_replies += 1;
    }
    if matches!(out.phase, Committed | Owner) {
        out.image = Some(image);
    }
    out
}

async fn run(size_ok: bool, frames: Vec<Frame>) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    // An old disk's content: a session begins by throwing it away.
    std::fs::write(&image, vec![0x5a; SIZE]).unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let lab = Lab::start(&[
        "receive",
        "--image",
        &d("disk.raw"),
        "--socket",
        &d("nbd.sock"),
        "--listen",
        "127.0.0.1:1",
        "--insecure",
    ])
    .await
    .unwrap();
    let (client, server_end) = tokio::io::duplex(1 << 20);
    let (mut rd, mut wr) = tokio::io::split(client);
    let served = async { lab.incoming(server_end).await };
    let source = async {
        let mut got = Vec::new();
        let mut replies = Vec::new();
        let next = |got: &mut Vec<u8>| -> Option<Message> {
            let (m, n) = Message::decode(got).expect("the destination sent a bad frame")?;
            got.drain(..n);
            Some(m)
        };
        let mut buf = vec![0u8; 65536];
        let hello = loop {
            if let Some(m) = next(&mut got) {
                break m;
            }
            let n = rd.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        };
        assert!(matches!(hello, Message::ServerHello { .. }), "{hello:?}");
        let params = SessionParams {
            session_id: [9; 16],
            disk_size: if size_ok { SIZE as u64 } else { SIZE as u64 + 4096 },
            block_size: BLOCK as u32,
            strategy: migration_stream::Strategy::Row,
        };
        let mut bytes = Vec::new();
        Message::ClientHello { version: migration_stream::VERSION, params, nonce: [1; 32], mac: [0; 32] }
            .encode(&mut bytes);
        let mut round = 0;
        for f in &frames {
            bytes.extend(encode(f, &mut round));
        }
        // The destination may stop reading early (a refused session, a bad frame).
        if wr.write_all(&bytes).await.is_ok() {
            let _ = wr.shutdown().await;
        }
        let mut rest = Vec::new();
        let _ = rd.read_to_end(&mut rest).await;
        got.extend(rest);
        while let Some(m) = next(&mut got) {
            replies.push(m);
        }
        assert!(got.is_empty(), "a partial frame from the destination");
        replies
    };
    let (_, replies) = tokio::join!(served, source);
    let incoming = lab.control.incoming.clone().unwrap();
    let want = model(size_ok, &frames);
    let accepted = replies.iter().filter(|m| matches!(m, Message::Accept { .. })).count();
    let rejected = replies.iter().filter(|m| matches!(m, Message::Reject { .. })).count();
    assert_eq!((accepted, rejected), if size_ok { (1, 0) } else { (0, 1) });
    let count = |f: fn(&Message) -> bool| replies.iter().filter(|m| f(m)).count();
    let got = Expected {
        phase: incoming.phase(),
        committed_replies: count(|m| matches!(m, Message::Committed)),
        error_replies: count(|m| matches!(m, Message::Error { .. })),
        image: matches!(incoming.phase(), IncomingPhase::Committed | IncomingPhase::Owner).then(|| {
            let mut out = Vec::new();
            lab.disk.read_append(&mut out, SIZE, 0).unwrap();
            out
        }),
    };
    assert_eq!(got, want, "replies: {replies:?}");
    let access = lab.control.proxy.gate.access();
    match want.phase {
        IncomingPhase::Committed | IncomingPhase::Owner => assert_eq!(access, Access::Committed),
        _ => assert_eq!(access, Access::Incoming, "an uncommitted disk is served"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("DEST_FRAMES_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_destination_commits_only_a_whole_valid_session((size_ok, frames) in script()) {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
            .block_on(run(size_ok, frames));
    }
}
