//! The destination's line to the source while blocks are still there: fetches of this host's
//! reads go out on the current session connection and their answers come back to the waiting
//! requests; a write before the commit goes out as a `Claim`, and the source's refusal comes back.
//! It also watches the live export's clients before the commit, and tells the source when the
//! destination's QEMU left without writing (`Abandoned`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use migration_session::AbandonWatch;
use migration_stream::{Message, MAX_BLOCK_LEN};
use row_store::BLOCK_SIZE;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::sync;

/// The destination's way to ask the source for data now: the current session connection's
/// outgoing frames, and the reads waiting for answers.
#[derive(Debug, Default)]
pub struct FetchLink {
    inner: Mutex<LinkState>,
    attached: Notify,
    /// The source's answer to this host's last `Claim`: `Some(reason)` once refused.
    claim_refused: watch::Sender<Option<String>>,
    /// The live export's clients before the commit: did the destination's QEMU leave?
    abandon: Mutex<AbandonWatch>,
    /// The image holds part of a migration (a session began and did not commit): it is not
    /// a disk anyone may read.
    partial: AtomicBool,
}

#[derive(Debug, Default)]
struct LinkState {
    tx: Option<(u64, mpsc::UnboundedSender<Message>)>,
    /// The connection a `Claim` went out on, unanswered.
    claimed: Option<u64>,
    generation: u64,
    next_id: u64,
    waiting: HashMap<u64, oneshot::Sender<Vec<u8>>>,
}

impl FetchLink {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        sync::lock(&self.inner)
    }

    /// A session connection is up: fetches go to it. Returns its generation and the frames to
    /// send on it.
    pub fn attach(&self) -> (u64, mpsc::UnboundedReceiver<Message>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut l = self.lock();
        l.generation += 1;
        let g = l.generation;
        l.tx = Some((g, tx));
        // Answers promised on an older connection will not come.
        l.waiting.clear();
        drop(l);
        self.attached.notify_waiters();
        (g, rx)
    }

    /// The connection of `generation` is gone.
    pub fn detach(&self, generation: u64) {
        let mut l = self.lock();
        if l.tx.as_ref().is_some_and(|(g, _)| *g == generation) {
            l.tx = None;
            l.waiting.clear();
        }
    }

    /// Whether a session connection is up.
    pub fn connected(&self) -> bool {
        self.lock().tx.is_some()
    }

    pub(super) fn send(&self, msg: Message) -> bool {
        self.lock().tx.as_ref().is_some_and(|(_, tx)| tx.send(msg).is_ok())
    }

    /// Asks the source for the disk (the guest here wants to write before any commit; see
    /// `Message::Claim`), once per connection until it answers; returns the watch that says
    /// whether it refused, or `None` if no session connection is up.
    pub fn claim(&self) -> Option<watch::Receiver<Option<String>>> {
        let mut l = self.lock();
        let (generation, tx) = l.tx.clone()?;
        sync::lock(&self.abandon).wrote();
        if l.claimed != Some(generation) {
            self.claim_refused.send_replace(None);
            tx.send(Message::Claim).ok()?;
            l.claimed = Some(generation);
        }
        Some(self.claim_refused.subscribe())
    }

    /// The source refused the claim: the writes waiting for it fail, the next one asks again.
    pub fn claim_refused(&self, reason: String) {
        self.lock().claimed = None;
        self.claim_refused.send_replace(Some(reason));
    }

    /// Watches for an abandoned migration (see [`AbandonWatch`]); `after` zero: never.
    pub fn watch_abandonment(&self, after: Duration) {
        *sync::lock(&self.abandon) = AbandonWatch::new(after);
    }

    /// A new session begins: what the clients did before it does not count, and the image
    /// now holds part of a migration.
    pub fn new_session(&self) {
        self.mark_partial();
        sync::lock(&self.abandon).renew();
    }

    /// The image holds part of a migration that did not commit (from now on, or restored).
    pub fn mark_partial(&self) {
        self.partial.store(true, Ordering::Relaxed);
    }

    /// Whether the image holds part of a migration that did not commit: a read the source
    /// cannot answer must fail rather than return this host's copy.
    pub fn partial(&self) -> bool {
        self.partial.load(Ordering::Relaxed)
    }

    /// A client of the live export entered transmission.
    pub fn client_attached(&self) {
        sync::lock(&self.abandon).attach();
    }

    /// A client of the live export left after `attached_for`.
    pub fn client_detached(&self, attached_for: Duration) {
        sync::lock(&self.abandon).detach(Instant::now(), attached_for);
    }

    /// If the destination's QEMU left without writing and no client came back in time: tells
    /// the source (`Abandoned`), once, and returns why. Nothing while no session is up.
    pub fn tell_if_abandoned(&self, now: Instant) -> Option<String> {
        let l = self.lock();
        let (_, tx) = l.tx.as_ref()?;
        let mut watch = sync::lock(&self.abandon);
        if !watch.abandoned(now) {
            return None;
        }
        let reason = watch.reason();
        tx.send(Message::Abandoned { reason: reason.clone() }).ok()?;
        Some(reason)
    }

    /// Asks for blocks `[first, end)` (answers arrive as `Fetched` frames, id 0: no waiter).
    pub fn request_blocks(&self, first: u64, end: u64, size: u64) {
        let (start, stop) = (first * BLOCK_SIZE, (end * BLOCK_SIZE).min(size));
        let mut at = start;
        while at < stop {
            let len = (stop - at).min(MAX_BLOCK_LEN as u64) as u32;
            if !self.send(Message::Fetch { id: 0, offset: at, len }) {
                return;
            }
            at += len as u64;
        }
    }

    /// The source's current content of `[offset, offset+len)`, before any commit (a read while
    /// the disk is still arriving); `None` if no session connection is up or it broke.
    pub async fn read_now(&self, offset: u64, len: u64, wait: Duration) -> Option<Vec<u8>> {
        let mut answers = Vec::new();
        {
            let mut l = self.lock();
            let (_, tx) = l.tx.clone()?;
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(MAX_BLOCK_LEN as u64) as u32;
                l.next_id += 1;
                let id = l.next_id;
                let (done, answer) = oneshot::channel();
                l.waiting.insert(id, done);
                tx.send(Message::Fetch { id, offset: at, len: n }).ok()?;
                answers.push(answer);
                at += n as u64;
            }
        }
        let mut out = Vec::with_capacity(len as usize);
        for a in answers {
            out.extend(tokio::time::timeout(wait, a).await.ok()?.ok()?);
        }
        Some(out)
    }

    /// An answer arrived.
    pub fn answered(&self, id: u64, data: Vec<u8>) {
        if let Some(w) = self.lock().waiting.remove(&id) {
            let _ = w.send(data);
        }
    }
}
