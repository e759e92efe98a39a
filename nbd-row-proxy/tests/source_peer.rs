//! The source's handling of what a destination says, against a destination that misbehaves: a
//! real source proxy (assembled without its sockets, `--insecure`) migrates to a scripted peer on
//! loopback that refuses or garbles the handshake, sends errors, forged `Committed`s, `Revoked`s
//! or garbage in the middle of the rounds, answers the commit wrongly or not at all, and answers
//! the revoke that follows every way it can. The control commands drive it as `row-migrate`
//! would: start, finish once ready, then complete or cancel.
//!
//! What must hold, whatever the peer does: the source never counts a hand-over the peer did not
//! confirm after receiving the commit; once the peer has the commit, the source refuses writes
//! until the peer gives the disk back (`Revoked`); a source whose commit never left is writable
//! again after the failure; and what the peer holds at the commit is the source's disk.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration_stream::Message;
use nbd_row_proxy::harness::Lab;
use nbd_row_proxy::ownership::Access;
use proptest::prelude::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: usize = 256 << 10;

/// A reply the peer gives; `Proper` is the one the protocol asks for at that point.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Say {
    Proper,
    Error,
    Committed,
    Revoked,
    Garbage,
    Close,
}

#[derive(Debug, Clone)]
struct Peer {
    handshake: Say,
    after_accept: Option<Say>,
    after_round1: Option<Say>,
    commit_answer: Say,
    revoke_answer: Say,
    finish: bool,
    then_complete: bool,
}

fn say() -> impl Strategy<Value = Say> {
    prop_oneof![Just(Say::Error), Just(Say::Committed), Just(Say::Revoked), Just(Say::Garbage), Just(Say::Close)]
}

fn mostly_proper() -> impl Strategy<Value = Say> {
    prop_oneof![3 => Just(Say::Proper), 2 => say()]
}

fn peer() -> impl Strategy<Value = Peer> {
    (
        prop_oneof![6 => Just(Say::Proper), 1 => say()],
        prop::option::weighted(0.15, say()),
        prop::option::weighted(0.15, say()),
        mostly_proper(),
        mostly_proper(),
        prop::bool::weighted(0.9),
        any::<bool>(),
    )
        .prop_map(
            |(handshake, after_accept, after_round1, commit_answer, revoke_answer, finish, then_complete)| Peer {
                handshake,
                after_accept,
                after_round1,
                commit_answer,
                revoke_answer,
                finish,
                then_complete,
            },
        )
}

/// What the peer saw and said.
#[derive(Debug, Default)]
struct Log {
    commit_received: bool,
    committed_sent: bool,
    image_at_commit: Option<Vec<u8>>,
    revoke_asked: bool,
    revoked_sent: bool,
    done_received: bool,
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn next(&mut self) -> Option<Message> {
        loop {
            match Message::decode(&self.buf) {
                Ok(Some((m, n))) => {
                    self.buf.drain(..n);
                    return Some(m);
                }
                Ok(None) => {}
                Err(e) => panic!("the source sent a bad frame: {e}"),
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn send(&mut self, m: &Message) {
        let mut b = Vec::new();
        m.encode(&mut b);
        let _ = self.s.write_all(&b).await;
    }

    /// Says `what` (other than `Proper`) and closes.
    async fn say_and_close(mut self, what: Say) {
        match what {
            Say::Proper | Say::Close => {}
            Say::Error => self.send(&Message::Error { message: "scripted failure".into() }).await,
            Say::Committed => self.send(&Message::Committed).await,
            Say::Revoked => self.send(&Message::Revoked).await,
            Say::Garbage => {
                let _ = self.s.write_all(b"\x07\0\0\0\x02\0\0\0zz\0\0\0\0").await;
            }
        }
        let _ = self.s.shutdown().await;
    }
}

async fn serve_peer(listener: TcpListener, script: Peer, log: Arc<Mutex<Log>>) {
    loop {
        let Ok((s, _)) = listener.accept().await else { return };
        let (script, log) = (script.clone(), log.clone());
        tokio::spawn(async move { peer_connection(Conn { s, buf: Vec::new() }, script, log).await });
    }
}

async fn peer_connection(mut c: Conn, script: Peer, log: Arc<Mutex<Log>>) {
    c.send(&Message::ServerHello { version: migration_stream::VERSION, nonce: [3; 32] }).await;
    let Some(Message::ClientHello { .. }) = c.next().await else { return };
    if script.handshake != Say::Proper {
        return c.say_and_close(script.handshake).await;
    }
    c.send(&Message::Accept { mac: [0; 32] }).await;
    let Some(first) = c.next().await else { return };
    if first == Message::Revoke {
        log.lock().unwrap().revoke_asked = true;
        if matches!(script.revoke_answer, Say::Proper | Say::Revoked) {
            log.lock().unwrap().revoked_sent = true;
            c.send(&Message::Revoked).await;
            return;
        }
        return c.say_and_close(script.revoke_answer).await;
    }
    if let Some(what) = script.after_accept {
        // An unasked `Committed` is still a claim to hold the disk: a source that reads it as
        // the answer to its commit (it may arrive just after the commit went out, which the
        // source cannot tell apart) has not handed over anything the peer did not claim.
        log.lock().unwrap().committed_sent |= what == Say::Committed;
        return c.say_and_close(what).await;
    }
    let mut image = vec![0u8; SIZE];
    let mut msg = Some(first);
    while let Some(m) = msg {
        match m {
            Message::Data { offset, codec, logical_len, payload } => {
                let data = migration_stream::decode_block(codec, &payload, logical_len).expect("the source's lz4");
                image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            }
            Message::Zero { offset, len } => image[offset as usize..(offset + len) as usize].fill(0),
            Message::RoundEnd { round: 1 } => {
                if let Some(what) = script.after_round1 {
                    log.lock().unwrap().committed_sent |= what == Say::Committed;
                    return c.say_and_close(what).await;
                }
            }
            Message::Commit => {
                {
                    let mut l = log.lock().unwrap();
                    l.commit_received = true;
                    l.image_at_commit = Some(image.clone());
                }
                if script.commit_answer != Say::Proper {
                    // `Committed` then closing is a confirmation too.
                    log.lock().unwrap().committed_sent = script.commit_answer == Say::Committed;
                    return c.say_and_close(script.commit_answer).await;
                }
                log.lock().unwrap().committed_sent = true;
                c.send(&Message::Committed).await;
            }
            Message::Done => log.lock().unwrap().done_received = true,
            Message::Discard { .. } => return,
            _ => {}
        }
        msg = c.next().await;
    }
}

async fn phase(lab: &Lab) -> String {
    let st = lab.execute("query-migrate", json!({})).await.unwrap();
    st["phase"].as_str().unwrap_or_default().to_string()
}

async fn run(script: Peer) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let content: Vec<u8> = (0..SIZE).map(|i| (i * 7 / 4096) as u8 ^ (i as u8)).collect();
    std::fs::write(&image, &content).unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let lab =
        Lab::start(&["serve", "--image", &d("disk.raw"), "--socket", &d("nbd.sock"), "--insecure"]).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("tcp:{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Log::default()));
    let peer = tokio::spawn(serve_peer(listener, script.clone(), log.clone()));

    let _ = lab.execute("migrate-start", json!({ "uri": uri })).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut p = phase(&lab).await;
    while !matches!(p.as_str(), "ready" | "failed" | "cancelled" | "idle") {
        assert!(Instant::now() < deadline, "stuck in phase {p}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        p = phase(&lab).await;
    }
    if p == "ready" && script.finish {
        let finished = lab.execute("migrate-finish", json!({})).await;
        if finished.is_ok() && script.then_complete {
            let _ = lab.execute("migrate-complete", json!({})).await;
        } else {
            let _ = lab.execute("migrate-cancel", json!({})).await;
        }
    } else {
        let _ = lab.execute("migrate-cancel", json!({})).await;
    }
    let p = phase(&lab).await;
    let access = lab.control.proxy.gate.access();
    let fenced = matches!(access, Access::Fenced(_));
    peer.abort();
    let log = log.lock().unwrap();
    let ctx = format!(
        "{script:?}: phase {p}, access {access:?}, peer {:?}",
        (log.commit_received, log.committed_sent, log.revoke_asked, log.revoked_sent, log.done_received)
    );
    if matches!(p.as_str(), "handed-over" | "completed") {
        assert!(log.committed_sent, "a hand-over the peer never confirmed: {ctx}");
    }
    if log.commit_received && !log.revoked_sent {
        assert!(fenced, "the peer may hold the disk, yet the source takes writes: {ctx}");
    }
    // An unasked `Committed` (after round 1, then the peer hangs up) claims the disk as well:
    // if it reached the source only after its commit went out, the source cannot tell it from
    // the answer, and staying fenced is then the safe side (never two owners).
    if log.revoked_sent || (!log.commit_received && !log.revoke_asked && !log.committed_sent) {
        assert!(!fenced, "the disk is nobody's: {ctx}");
    }
    if let Some(at_commit) = &log.image_at_commit {
        assert!(at_commit == &content, "the peer got another disk than the source's: {ctx}");
    }
    if p == "completed" {
        assert_eq!(access, Access::Fenced(format!("the disk was migrated to {uri}, which owns it now")), "{ctx}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("SOURCE_PEER_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_source_hands_over_only_what_was_confirmed(script in peer()) {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(run(script));
    }
}
