//! Sending a round: reading block ranges on the blocking pool, splitting zero blocks from data,
//! compressing, framing, pacing, and counting what went on the wire. Zeroed runs go as one zero
//! extent each, without being read.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use control_api::{MigrationRoundCompleted, MigrationRoundStarted, RoundKind, RoundStartedData, RoundStats};
use migration_session::Span;
use migration_stream::{Codec, Message};
use row_store::{BlockBackend, Held, BLOCK_SIZE};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{send, RateLimit};
use crate::proxy::Events;
use crate::sync::lock;

/// Blocks read, compressed and framed together (1 MiB).
const CHUNK_BLOCKS: u64 = 256;
/// Chunks read ahead of the socket.
const READ_AHEAD: usize = 4;
/// The rate shown by `query-migrate` is measured over windows this long.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// The figures of the rounds so far, for `query-migrate`.
#[derive(Debug, Default, Clone)]
pub struct RoundFigures {
    /// Round in progress or last done.
    pub round: u32,
    /// Finished rounds.
    pub rounds: Vec<RoundStats>,
    /// Blocks of the round in progress still to send.
    pub remaining_blocks: u64,
    /// The kind of the round in progress (None between rounds).
    pub sending: Option<RoundKind>,
    /// Blocks of the round in progress (or last done).
    pub round_blocks: u64,
    /// Recent rate on the wire, bytes/s.
    pub rate: f64,
    /// When the migration started.
    pub started: Option<Instant>,
    /// What the final round was predicted to take at the measured rate, ms.
    pub predicted_final_ms: Option<f64>,
}

/// Where a round's bytes go: the session's connection, paced, and the destination's fetch
/// answers, which go ahead of everything else.
pub struct Out {
    /// The connection's write half.
    pub writer: super::transport::Writer,
    /// The pacing.
    pub limit: RateLimit,
    /// Framed answers to the destination's fetches (a read on the destination waits for them).
    pub urgent: mpsc::Receiver<Vec<u8>>,
}

impl Out {
    /// Sends one urgent frame now (not paced: a guest's read waits for it).
    pub async fn send_urgent(&mut self, frame: &[u8]) -> Result<()> {
        self.writer.write_all(frame).await.context("sending to the destination")?;
        self.writer.flush().await.context("sending to the destination")
    }
}

/// What a round sent: `(first block, count, write epoch when read)` per chunk.
pub type Sent = Vec<(u64, u64, u64)>;

/// Sends rounds for one session and keeps their figures.
pub struct Rounds {
    /// What the rounds read.
    pub disk: Arc<row_store::Disk>,
    /// Where the figures are kept.
    pub progress: Arc<Mutex<RoundFigures>>,
    /// Where round events go.
    pub events: Events,
    /// Whether data frames are lz4-compressed.
    pub compress: bool,
}

impl Rounds {
    /// The measured rate of round 1 on the wire, bytes/s.
    pub fn first_round_rate(&self) -> Option<f64> {
        lock(&self.progress).rounds.first().filter(|r| r.seconds > 0.0).map(|r| r.wire_bytes as f64 / r.seconds)
    }

    /// Reads `spans` through `view` (zeroed ones are not read), frames and sends them as round
    /// `kind`; returns what was sent with each chunk's write epoch as of its read.
    pub async fn send(
        &self,
        out: &mut Out,
        kind: RoundKind,
        view: Arc<dyn BlockBackend>,
        spans: Vec<Span>,
    ) -> Result<Sent> {
        let total: u64 = spans.iter().map(|s| s.count).sum();
        let round = {
            let mut p = lock(&self.progress);
            p.round += 1;
            p.remaining_blocks = total;
            p.sending = Some(kind);
            p.round_blocks = total;
            p.round
        };
        // A round that fails (a cut link) is no longer in progress either.
        let _sending = NotSending(&self.progress);
        self.events.emit::<MigrationRoundStarted>(RoundStartedData { round, kind, blocks: total });
        tracing::info!(round, kind = kind.as_str(), blocks = total, "round started");
        let started = Instant::now();
        let mut stats =
            RoundStats { round, kind, blocks: 0, logical_bytes: 0, zero_bytes: 0, wire_bytes: 0, seconds: 0.0 };
        let wire_kind = match kind {
            RoundKind::Base => migration_stream::RoundKind::Base,
            RoundKind::Update => migration_stream::RoundKind::Update,
            RoundKind::Final => migration_stream::RoundKind::Final,
            RoundKind::Postcopy => migration_stream::RoundKind::Postcopy,
        };
        stats.wire_bytes += send(&mut out.writer, &Message::RoundBegin { round, kind: wire_kind }).await? as u64;
        if kind == RoundKind::Update {
            super::test_hooks::pause("update-round").await;
        }
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Chunk>>(READ_AHEAD);
        let (disk, compress) = (self.disk.clone(), self.compress);
        let producer = tokio::task::spawn_blocking(move || produce(&*view, &disk, spans, compress, &tx));
        let mut sent = Vec::new();
        let mut window = (Instant::now(), 0u64);
        loop {
            let chunk = tokio::select! {
                biased;
                Some(frame) = out.urgent.recv() => {
                    out.send_urgent(&frame).await?;
                    continue;
                }
                chunk = rx.recv() => match chunk {
                    Some(c) => c,
                    None => break,
                },
            };
            let chunk = chunk.context("reading the disk")?;
            out.limit.take(chunk.frames.len()).await;
            out.writer.write_all(&chunk.frames).await.context("sending to the destination")?;
            stats.blocks += chunk.blocks;
            stats.logical_bytes += chunk.logical;
            stats.zero_bytes += chunk.zero;
            stats.wire_bytes += chunk.frames.len() as u64;
            window.1 += chunk.frames.len() as u64;
            sent.push((chunk.first, chunk.blocks, chunk.generation));
            let mut p = lock(&self.progress);
            p.remaining_blocks = p.remaining_blocks.saturating_sub(chunk.blocks);
            if window.0.elapsed() >= RATE_WINDOW {
                p.rate = window.1 as f64 / window.0.elapsed().as_secs_f64();
                window = (Instant::now(), 0);
            }
        }
        producer.await?;
        stats.wire_bytes += send(&mut out.writer, &Message::RoundEnd { round }).await? as u64;
        stats.seconds = started.elapsed().as_secs_f64();
        tracing::info!(round, blocks = stats.blocks, wire = stats.wire_bytes, seconds = stats.seconds, "round done");
        self.events.emit::<MigrationRoundCompleted>(stats.clone());
        let mut p = lock(&self.progress);
        p.remaining_blocks = 0;
        p.rounds.push(stats);
        Ok(sent)
    }
}

/// One read-and-framed piece of a round.
struct Chunk {
    first: u64,
    blocks: u64,
    logical: u64,
    zero: u64,
    generation: u64,
    frames: Vec<u8>,
}

/// Runs on the blocking pool: reads spans in chunks, splits zero blocks from data, compresses
/// and frames them. A zeroed span is checked again at the moment of sending (the epoch mark and
/// the check are one step under the disk's lock): the parts still zeroed go as zero extents, any
/// part written since is read like data.
fn produce(
    view: &dyn BlockBackend,
    disk: &row_store::Disk,
    spans: Vec<Span>,
    compress: bool,
    tx: &mpsc::Sender<std::io::Result<Chunk>>,
) {
    let size = view.size();
    let mut buf = Vec::with_capacity((CHUNK_BLOCKS * BLOCK_SIZE) as usize);
    let mut send = |chunk: std::io::Result<Chunk>| tx.blocking_send(chunk).is_ok();
    for span in spans {
        let (first, end_block) = (span.first, span.first + span.count);
        if span.zero {
            let (epoch, segments) = disk.mark_segments(first, end_block);
            for seg in segments {
                if seg.held == Held::Zero {
                    let (start, end) = (seg.start * BLOCK_SIZE, (seg.end * BLOCK_SIZE).min(size));
                    let mut chunk = Chunk {
                        first: seg.start,
                        blocks: seg.end - seg.start,
                        logical: end - start,
                        zero: end - start,
                        generation: epoch,
                        frames: Vec::new(),
                    };
                    Message::Zero { offset: start, len: end - start }.encode(&mut chunk.frames);
                    if !send(Ok(chunk)) {
                        return;
                    }
                } else if !read_and_send(view, disk, seg.start, seg.end, compress, &mut buf, &mut send) {
                    return;
                }
            }
        } else if !read_and_send(view, disk, first, end_block, compress, &mut buf, &mut send) {
            return;
        }
    }
}

/// Reads blocks `[first, end)` in chunks and sends them framed; `false` once the receiver is
/// gone or a read failed (the error was sent).
fn read_and_send(
    view: &dyn BlockBackend,
    disk: &row_store::Disk,
    first: u64,
    end_block: u64,
    compress: bool,
    buf: &mut Vec<u8>,
    send: &mut impl FnMut(std::io::Result<Chunk>) -> bool,
) -> bool {
    let size = view.size();
    let mut b = first;
    while b < end_block {
        let n = (end_block - b).min(CHUNK_BLOCKS);
        let start = b * BLOCK_SIZE;
        let end = ((b + n) * BLOCK_SIZE).min(size);
        // The epoch before the read: a write after it makes the block outstanding again.
        let epoch = disk.mark();
        buf.clear();
        if let Err(e) = view.read_append(buf, (end - start) as usize, start) {
            send(Err(e));
            return false;
        }
        let mut chunk =
            Chunk { first: b, blocks: n, logical: end - start, zero: 0, generation: epoch, frames: Vec::new() };
        frame_range(buf, start, compress, &mut chunk);
        if !send(Ok(chunk)) {
            return false;
        }
        b += n;
    }
    true
}

/// Frames `data` (at byte `start`) as zero extents for all-zero blocks and data extents (one
/// per run of non-zero blocks) for the rest.
fn frame_range(data: &[u8], start: u64, compress: bool, chunk: &mut Chunk) {
    let bs = BLOCK_SIZE as usize;
    let mut i = 0;
    while i < data.len() {
        let zero = migration_stream::is_zero(&data[i..(i + bs).min(data.len())]);
        let mut j = i;
        while j < data.len() && migration_stream::is_zero(&data[j..(j + bs).min(data.len())]) == zero {
            j = (j + bs).min(data.len());
        }
        let offset = start + i as u64;
        if zero {
            Message::Zero { offset, len: (j - i) as u64 }.encode(&mut chunk.frames);
            chunk.zero += (j - i) as u64;
        } else {
            let (codec, payload): (Codec, Vec<u8>) = migration_stream::encode_block(&data[i..j], compress);
            Message::Data { offset, codec, logical_len: (j - i) as u32, payload }.encode(&mut chunk.frames);
        }
        i = j;
    }
}

/// Clears `RoundFigures::sending` when a round ends, however it ends.
struct NotSending<'a>(&'a Mutex<RoundFigures>);

impl Drop for NotSending<'_> {
    fn drop(&mut self) {
        lock(self.0).sending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> Chunk {
        Chunk { first: 0, blocks: 0, logical: 0, zero: 0, generation: 0, frames: Vec::new() }
    }

    #[test]
    fn zero_blocks_become_zero_extents_and_the_rest_data() {
        let bs = BLOCK_SIZE as usize;
        let mut data = vec![0u8; 4 * bs];
        data[bs..2 * bs].fill(7);
        data[3 * bs] = 1;
        let mut c = chunk();
        frame_range(&data, 8192, true, &mut c);
        let mut msgs = Vec::new();
        let mut rest = &c.frames[..];
        while let Some((m, n)) = Message::decode(rest).unwrap() {
            msgs.push(m);
            rest = &rest[n..];
        }
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0], Message::Zero { offset: 8192, len: bs as u64 });
        assert!(
            matches!(msgs[1], Message::Data { offset, logical_len, .. } if offset == 8192 + bs as u64 && logical_len == bs as u32)
        );
        assert_eq!(msgs[2], Message::Zero { offset: 8192 + 2 * bs as u64, len: bs as u64 });
        assert_eq!(c.zero, 2 * bs as u64);
    }
}
