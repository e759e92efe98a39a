//! One client connection: moves bytes between the socket and the sans-I/O negotiation and
//! transmission code. Negotiation (with STARTTLS on TCP exports that require TLS) must end
//! within [`NEGOTIATION_TIMEOUT`]. Requests are pipelined: cheap ones run on this task, slow
//! ones on the blocking pool, and replies go out in completion order through a writer task that
//! batches them into vectored writes. A request holds a share of the connection's byte budget
//! ([`MAX_IN_FLIGHT_BYTES`]) from before its payload is read until its reply is on the socket,
//! so a client that stops reading replies stops being read: back-pressure, not buffering.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nbd_proto::consts::*;
use nbd_proto::{ClientFlags, Command, Greeting, ProtocolError, RawOption, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::export::{Catalog, MAX_REQUEST_LEN};
use super::negotiation::{Negotiation, Session, Step};
use super::transmission::{error_reply, execute, runs_inline, validate};
use crate::ownership::Access;

/// Replies queued for the writer.
const REPLY_QUEUE: usize = 256;
/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 64;
/// How long a client may take from connecting to starting transmission.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of request payloads and replies a connection may have in flight (two of the largest
/// requests).
pub const MAX_IN_FLIGHT_BYTES: u32 = 2 * MAX_REQUEST_LEN;

/// A connection's byte stream: Unix, TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A reply and the share of the byte budget its request holds until it is written.
type Reply = (Vec<u8>, Option<OwnedSemaphorePermit>);

/// Reads framed messages out of a byte stream with the sans-I/O decoders.
struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(inner: R) -> Self {
        Self::with_buffered(inner, Vec::new())
    }

    /// Reads from `inner`, after the bytes already read from it.
    fn with_buffered(inner: R, mut buffered: Vec<u8>) -> Self {
        buffered.reserve(256 * 1024);
        Self { inner, buf: buffered, pos: 0 }
    }

    /// The stream back, with what was read from it but not decoded yet.
    fn into_parts(self) -> (R, Vec<u8>) {
        (self.inner, self.buf[self.pos..].to_vec())
    }

    fn get_mut(&mut self) -> &mut R {
        &mut self.inner
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

/// Serves one connection to completion. `tls`: the export requires TLS on this connection
/// (STARTTLS before any other option). `peer` names it in logs.
pub async fn serve(
    stream: Box<dyn Stream>,
    tls: Option<TlsAcceptor>,
    catalog: Catalog,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let negotiated = tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(stream, tls, catalog, &peer))
        .await
        .map_err(|_| anyhow!("negotiation took longer than {NEGOTIATION_TIMEOUT:?}"))??;
    let Some((reader, session)) = negotiated else { return Ok(()) };
    let (stream, buffered) = reader.into_parts();
    let (r, writer) = tokio::io::split(stream);
    let mut reader = FrameReader::with_buffered(r, buffered);
    let session = Arc::new(session);
    tracing::info!(
        %peer,
        export = %session.export.name,
        structured = session.structured,
        block_status = session.base_allocation,
        "connection open"
    );

    let (tx, rx) = mpsc::channel::<Reply>(REPLY_QUEUE);
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

/// The handshake and option haggling, with the TLS upgrade when STARTTLS asks for it;
/// `None` when the client left or ended negotiation.
async fn negotiate(
    stream: Box<dyn Stream>,
    tls: Option<TlsAcceptor>,
    catalog: Catalog,
    peer: &str,
) -> Result<Option<(FrameReader<Box<dyn Stream>>, Session)>> {
    let mut reader = FrameReader::new(stream);
    let mut greeting = Vec::new();
    Greeting { handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES }.encode(&mut greeting);
    reader.get_mut().write_all(&greeting).await.context("sending greeting")?;
    let Some(flags) = reader.next(ClientFlags::decode).await.context("reading client flags")? else {
        return Ok(None);
    };
    let mut negotiation = Negotiation::new(catalog, flags.no_zeroes(), tls.is_some());
    loop {
        let Some(raw) = reader.next(RawOption::decode).await.context("reading option")? else {
            tracing::debug!(%peer, "client left during negotiation");
            return Ok(None);
        };
        match negotiation.on_option(&raw) {
            Step::Continue(bytes) => reader.get_mut().write_all(&bytes).await?,
            Step::Close(bytes) => {
                reader.get_mut().write_all(&bytes).await?;
                tracing::debug!(%peer, option = raw.option, "negotiation ended by the client");
                return Ok(None);
            }
            Step::StartTls(bytes) => {
                let stream = reader.get_mut();
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                let (plain, buffered) = reader.into_parts();
                if !buffered.is_empty() {
                    bail!("the client sent data before the TLS handshake");
                }
                let acceptor = tls.as_ref().context("STARTTLS without TLS credentials")?;
                let secured = acceptor.accept(plain).await.context("TLS handshake")?;
                tracing::debug!(%peer, "TLS established");
                reader = FrameReader::new(Box::new(secured));
            }
            Step::Transmission(bytes, session) => {
                let stream = reader.get_mut();
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                return Ok(Some((reader, session)));
            }
        }
    }
}

/// What a request costs of the byte budget: its payload or its reply.
fn cost(req: &Request) -> u32 {
    match req.command {
        Command::Read | Command::Write => req.length.clamp(1, MAX_IN_FLIGHT_BYTES),
        _ => 1,
    }
}

async fn transmission<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    session: &Arc<Session>,
    tx: &mpsc::Sender<Reply>,
    shutdown: &mut watch::Receiver<bool>,
    stats: &mut Stats,
) -> Result<()> {
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES as usize));
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
            if tx.send((error_reply(session, req.cookie, refusal.errno, refusal.reason), None)).await.is_err() {
                return Ok(());
            }
            continue;
        }
        // Its share of the budget comes before its payload is read or its reply made.
        let permit = Some(budget.clone().acquire_many_owned(cost(&req)).await.expect("the budget is never closed"));
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
                if tx.send((reply, permit)).await.is_err() {
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
                let _ = tx.send((reply, permit)).await;
            });
            continue;
        }
        if runs_inline(&req) {
            if tx.send((execute(session, &req, payload), permit)).await.is_err() {
                return Ok(());
            }
        } else {
            let (session, tx) = (session.clone(), tx.clone());
            tokio::task::spawn_blocking(move || {
                let _ = tx.blocking_send((execute(&session, &req, payload), permit));
            });
        }
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(mut writer: W, mut rx: mpsc::Receiver<Reply>) -> Result<()> {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(MAX_BATCH);
    let mut permits = Vec::with_capacity(MAX_BATCH);
    while let Some((first, permit)) = rx.recv().await {
        batch.push(first);
        permits.push(permit);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((reply, permit)) => {
                    batch.push(reply);
                    permits.push(permit);
                }
                Err(_) => break,
            }
        }
        write_all_vectored(&mut writer, &batch).await?;
        batch.clear();
        // Written: the budget these replies held is free again.
        permits.clear();
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
