//! The connection of a session: paced writes out, the destination's frames in (its fetches
//! answered from the live disk, its claims and abandonments apart from its answers).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use control_api::PostcopyStatus;
use migration_stream::Message;
use row_store::{BlockBackend, Disk};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::lock;
use crate::migration::rounds::Out;
use crate::migration::transport::{Reader, Writer};
use crate::migration::{last_word, FrameReader, RateLimit, COMMIT_TIMEOUT};

/// How long a failing session waits for the destination's reason.
const REASON_WAIT: Duration = Duration::from_millis(500);

/// Fetches from the destination waiting to be read, and answers waiting to be sent.
const FETCH_QUEUE: usize = 64;

/// The connection of a session: paced writes, and the destination's frames as they come.
pub(super) struct Conn {
    pub(super) out: Out,
    pub(super) from_dest: mpsc::Receiver<Result<Message>>,
    /// What the destination asks of an armed source (`Claim`, `Abandoned`), apart from its
    /// answers.
    pub(super) asks: mpsc::Receiver<DestAsk>,
    /// Frames that go ahead of the rounds (fetch answers, claim refusals).
    pub(super) urgent_tx: mpsc::Sender<Vec<u8>>,
    pub(super) reader: JoinHandle<()>,
    pub(super) fetcher: JoinHandle<()>,
}

impl Conn {
    /// The connection's halves; the destination's fetches are answered from `disk`.
    pub(super) fn new(reader: FrameReader<Reader>, writer: Writer, max_bandwidth: Option<u64>, fetch: Fetcher) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let (fetch_tx, fetch_rx) = mpsc::channel(FETCH_QUEUE);
        let (urgent_tx, urgent) = mpsc::channel(FETCH_QUEUE);
        let (ask_tx, asks) = mpsc::channel(2);
        let reader = tokio::spawn(forward_frames(reader, tx, fetch_tx, ask_tx));
        let fetcher = tokio::spawn(fetch.serve(fetch_rx, urgent_tx.clone()));
        Self {
            out: Out { writer, limit: RateLimit::new(max_bandwidth), urgent },
            from_dest: rx,
            asks,
            urgent_tx,
            reader,
            fetcher,
        }
    }

    /// Tells the destination its claim is refused, ahead of the rounds' frames.
    pub(super) async fn refuse_claim(&self, why: &str) {
        tracing::warn!("the destination asked for the disk (its guest writes): refused: {why}");
        let mut frame = Vec::new();
        Message::ClaimRefused { reason: why.to_string() }.encode(&mut frame);
        let _ = self.urgent_tx.send(frame).await;
    }

    /// A broken pipe often hides the destination's own reason, sent just before it closed: the
    /// `Error` it sent, if one arrives within [`REASON_WAIT`].
    pub(super) async fn destination_reason(&mut self) -> Option<String> {
        match tokio::time::timeout(REASON_WAIT, self.from_dest.recv()).await {
            Ok(Some(Ok(Message::Error { message }))) => Some(format!("the destination failed: {message}")),
            _ => None,
        }
    }

    /// What the destination says next, answering its fetches while waiting until `deadline`.
    /// Sending a fetch answer can fail (the error); the destination's own failures are
    /// [`Heard::Gone`].
    pub(super) async fn next_answering(&mut self, deadline: tokio::time::Instant) -> Result<Heard> {
        loop {
            let next = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    biased;
                    Some(f) = self.out.urgent.recv() => Err(f),
                    m = self.from_dest.recv() => Ok(m),
                }
            })
            .await;
            match next {
                Err(_) => return Ok(Heard::Silent),
                Ok(Err(frame)) => self.out.send_urgent(&frame).await?,
                Ok(Ok(Some(Ok(m)))) => return Ok(Heard::Frame(m)),
                Ok(Ok(other)) => return Ok(Heard::Gone(dest_problem(other))),
            }
        }
    }

    /// Best-effort last message, then close.
    pub(super) async fn close_with(mut self, msg: &Message) {
        last_word(&mut self.out.writer, msg).await;
        self.reader.abort();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.fetcher.abort();
    }
}

/// A read of the destination's guest to answer from the live disk: `len` bytes at `offset`,
/// answered under `id`.
pub(super) struct Fetch {
    id: u64,
    offset: u64,
    len: u32,
}

/// Answers the destination's fetches: reads the disk as it is now and frames the data.
#[derive(Clone)]
pub(super) struct Fetcher {
    pub(super) disk: Arc<Disk>,
    pub(super) compress: bool,
    /// Fetches answered, for `query-migrate`.
    pub(super) postcopy: Arc<Mutex<Option<PostcopyStatus>>>,
}

impl Fetcher {
    pub(super) async fn serve(self, mut fetches: mpsc::Receiver<Fetch>, urgent: mpsc::Sender<Vec<u8>>) {
        while let Some(Fetch { id, offset, len }) = fetches.recv().await {
            let (disk, compress) = (self.disk.clone(), self.compress);
            let frame = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                if offset.checked_add(len as u64).is_none_or(|end| end > disk.size()) {
                    return Err(std::io::Error::other(format!("fetch at {offset}+{len} lies outside the disk")));
                }
                let mut buf = Vec::with_capacity(len as usize);
                disk.read_append(&mut buf, len as usize, offset)?;
                let mut frame = Vec::new();
                Message::fetched(id, offset, &buf, compress).encode(&mut frame);
                Ok(frame)
            })
            .await;
            match frame {
                Ok(Ok(frame)) => {
                    if let Some(p) = lock(&self.postcopy).as_mut() {
                        p.fetches += 1;
                    }
                    if urgent.send(frame).await.is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => tracing::warn!("answering a fetch of the destination: {e}"),
                Err(e) => tracing::warn!("answering a fetch of the destination: {e}"),
            }
        }
    }
}

/// Forwards the destination's frames (its fetches to the fetcher); the last item is the error
/// or end that stopped it.
pub(super) async fn forward_frames(
    mut reader: FrameReader<Reader>,
    tx: mpsc::Sender<Result<Message>>,
    fetches: mpsc::Sender<Fetch>,
    asks: mpsc::Sender<DestAsk>,
) {
    loop {
        let item = match reader.next().await {
            Ok(Some(Message::Fetch { id, offset, len })) => {
                if fetches.send(Fetch { id, offset, len }).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(Message::Claim)) => {
                // One pending ask of a kind is enough; the session's phase decides what it gets.
                let _ = asks.try_send(DestAsk::Claim);
                continue;
            }
            Ok(Some(Message::Abandoned { reason })) => {
                let _ = asks.try_send(DestAsk::Abandoned(reason));
                continue;
            }
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(anyhow!("the destination closed the connection")),
            Err(e) => Err(e),
        };
        let end = item.is_err();
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}

/// What the destination asks of an armed source, before any commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DestAsk {
    /// Its guest wants to write: hand the disk over.
    Claim,
    /// Its QEMU came and went without its guest writing (why): disarm.
    Abandoned(String),
}

/// What the destination said, waited for with a deadline.
pub(super) enum Heard {
    /// A frame.
    Frame(Message),
    /// Its stream broke or ended: why.
    Gone(String),
    /// Nothing before the deadline.
    Silent,
}

impl Heard {
    /// Why this is not the answer that was awaited (`what`, for a silence).
    pub(super) fn problem(self, what: &str) -> String {
        match self {
            Heard::Frame(m) => dest_problem(Some(Ok(m))),
            Heard::Gone(why) => why,
            Heard::Silent => format!("the destination did not {what} within {COMMIT_TIMEOUT:?}"),
        }
    }
}

/// What a frame from the destination means when none was expected.
pub(super) fn dest_problem(msg: Option<Result<Message>>) -> String {
    match msg {
        Some(Ok(Message::Error { message })) => format!("the destination failed: {message}"),
        Some(Ok(other)) => format!("unexpected {} from the destination", other.name()),
        Some(Err(e)) => format!("{e:#}"),
        None => "the destination closed the connection".into(),
    }
}
