//! One client connection: moves bytes between the socket and the sans-I/O negotiation and
//! transmission code. Requests are pipelined: cheap ones run on this task, slow ones on the
//! blocking pool, and replies go out in completion order through a writer task that batches
//! them into vectored writes.

use std::io::{self, IoSlice};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nbd_proto::consts::*;
use nbd_proto::{ClientFlags, Command, Greeting, ProtocolError, RawOption, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::export::Catalog;
use super::negotiation::{Negotiation, Session, Step};
use super::transmission::{error_reply, execute, runs_inline, validate};
use crate::ownership::Access;

/// Replies queued for the writer; bounds memory when a client stops reading.
const REPLY_QUEUE: usize = 256;
/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 64;

/// Reads framed messages out of a byte stream with the sans-I/O decoders.
struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(inner: R) -> Self {
        Self { inner, buf: Vec::with_capacity(256 * 1024), pos: 0 }
    }

    /// Next message, or `None` on a clean end of stream between messages.
    async fn next<T>(
        &mut self,
        decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, ProtocolError>,
    ) -> Result<Option<T>> {
        loop {
            if let Some((value, n)) = decode(&self.buf[self.pos..])? {
                self.pos += n;
                return Ok(Some(value));
            }
            if self.fill().await? == 0 {
                if self.pos == self.buf.len() {
                    return Ok(None);
                }
                bail!("connection closed in the middle of a message");
            }
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > self.buf.capacity() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 64 * 1024 {
            self.buf.reserve(256 * 1024);
        }
        self.inner.read_buf(&mut self.buf).await
    }

    /// Appends the next `len` bytes of the stream to `dst`.
    async fn read_payload(&mut self, len: usize, dst: &mut Vec<u8>) -> io::Result<()> {
        let buffered = (self.buf.len() - self.pos).min(len);
        dst.extend_from_slice(&self.buf[self.pos..self.pos + buffered]);
        self.pos += buffered;
        // Read straight into the spare capacity: no zero-fill of a buffer about to be overwritten.
        let target = dst.len() + len - buffered;
        dst.reserve(len - buffered);
        while dst.len() < target {
            let want = (target - dst.len()) as u64;
            if (&mut self.inner).take(want).read_buf(dst).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Skips the next `len` bytes of the stream (a refused write's payload).
    async fn discard(&mut self, len: u64) -> io::Result<()> {
        let buffered = ((self.buf.len() - self.pos) as u64).min(len);
        self.pos += buffered as usize;
        let rest = len - buffered;
        let copied = tokio::io::copy(&mut (&mut self.inner).take(rest), &mut tokio::io::sink()).await?;
        if copied < rest {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// Counters logged when a connection closes.
#[derive(Debug, Default)]
struct Stats {
    requests: u64,
    bytes_read: u64,
    bytes_written: u64,
}

/// Serves one connection to completion. `peer` names it in logs.
pub async fn serve<R, W>(
    reader: R,
    mut writer: W,
    catalog: Catalog,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(reader);
    let mut greeting = Vec::new();
    Greeting { handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES }.encode(&mut greeting);
    writer.write_all(&greeting).await.context("sending greeting")?;
    let Some(flags) = reader.next(ClientFlags::decode).await.context("reading client flags")? else {
        return Ok(());
    };
    let mut negotiation = Negotiation::new(catalog, flags.no_zeroes());
    let session = loop {
        let Some(raw) = reader.next(RawOption::decode).await.context("reading option")? else {
            tracing::debug!(%peer, "client left during negotiation");
            return Ok(());
        };
        match negotiation.on_option(&raw) {
            Step::Continue(bytes) => writer.write_all(&bytes).await?,
            Step::Close(bytes) => {
                writer.write_all(&bytes).await?;
                tracing::debug!(%peer, option = raw.option, "negotiation ended by the client");
                return Ok(());
            }
            Step::Transmission(bytes, session) => {
                writer.write_all(&bytes).await?;
                break session;
            }
        }
    };
    writer.flush().await?;
    let session = Arc::new(session);
    tracing::info!(
        %peer,
        export = %session.export.name,
        structured = session.structured,
        block_status = session.base_allocation,
        "connection open"
    );

    let (tx, rx) = mpsc::channel::<Vec<u8>>(REPLY_QUEUE);
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let mut stats = Stats::default();
    let outcome = transmission(&mut reader, &session, &tx, &mut shutdown, &mut stats).await;
    // In-flight requests on the blocking pool hold their own senders: the writer ends once
    // every reply has been written.
    drop(tx);
    let written = writer_task.await.context("reply writer panicked")?;
    tracing::info!(
        %peer,
        export = %session.export.name,
        requests = stats.requests,
        bytes_read = stats.bytes_read,
        bytes_written = stats.bytes_written,
        "connection closed"
    );
    outcome?;
    written.context("sending replies")
}

async fn transmission<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    session: &Arc<Session>,
    tx: &mpsc::Sender<Vec<u8>>,
    shutdown: &mut watch::Receiver<bool>,
    stats: &mut Stats,
) -> Result<()> {
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let next = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            next = reader.next(Request::decode) => next,
        };
        let req = match next {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.context("reading request")),
        };
        stats.requests += 1;
        tracing::trace!(?req, "request");
        if let Err(refusal) = validate(session, &req) {
            tracing::debug!(?req, reason = refusal.reason, "request refused");
            if req.has_payload() {
                reader.discard(req.length as u64).await.context("discarding refused payload")?;
            }
            if tx.send(error_reply(session, req.cookie, refusal.errno, refusal.reason)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let payload = if req.has_payload() {
            let mut payload = Vec::with_capacity(req.length as usize);
            reader.read_payload(req.length as usize, &mut payload).await.context("reading write payload")?;
            stats.bytes_written += req.length as u64;
            Some(payload)
        } else {
            None
        };
        match req.command {
            Command::Disc => return Ok(()),
            Command::Read => stats.bytes_read += req.length as u64,
            _ => {}
        }
        // FLUSH and CACHE have nothing to wait for (QEMU flushes when it inactivates the
        // drives of an incoming VM, before any migration has arrived).
        let waits = !matches!(req.command, Command::Flush | Command::Cache);
        if waits && *session.export.access.borrow() == Access::Incoming {
            if matches!(req.command, Command::Write | Command::Trim | Command::WriteZeroes) {
                let reply =
                    error_reply(session, req.cookie, NBD_EPERM, "the disk is still being migrated to this host");
                if tx.send(reply).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            // Reads wait for the commit, without holding up the rest of the connection.
            let (session, tx) = (session.clone(), tx.clone());
            tokio::spawn(async move {
                let mut access = session.export.access.clone();
                let wait = access.wait_for(|a| *a != Access::Incoming);
                let opened = matches!(tokio::time::timeout(session.export.read_wait, wait).await, Ok(Ok(_)));
                let reply = if opened {
                    let s = session.clone();
                    tokio::task::spawn_blocking(move || execute(&s, &req, payload))
                        .await
                        .unwrap_or_else(|_| error_reply(&session, req.cookie, NBD_EIO, "internal error"))
                } else {
                    error_reply(&session, req.cookie, NBD_EIO, "the disk has not been migrated here yet")
                };
                let _ = tx.send(reply).await;
            });
            continue;
        }
        if runs_inline(&req) {
            if tx.send(execute(session, &req, payload)).await.is_err() {
                return Ok(());
            }
        } else {
            let (session, tx) = (session.clone(), tx.clone());
            tokio::task::spawn_blocking(move || {
                let _ = tx.blocking_send(execute(&session, &req, payload));
            });
        }
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::Receiver<Vec<u8>>) -> Result<()> {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(reply) => batch.push(reply),
                Err(_) => break,
            }
        }
        write_all_vectored(&mut writer, &batch).await?;
        batch.clear();
    }
    writer.flush().await?;
    let _ = writer.shutdown().await;
    Ok(())
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(writer: &mut W, bufs: &[Vec<u8>]) -> io::Result<()> {
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < bufs.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&bufs[idx][off..]))
            .chain(bufs[idx + 1..].iter().map(|b| IoSlice::new(b)))
            .collect();
        let mut n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = bufs[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while idx < bufs.len() && bufs[idx].len() == off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}
