//! One client connection: moves bytes between the socket and the sans-I/O negotiation and
//! transmission code. Negotiation (with STARTTLS on TCP exports that require TLS) must end
//! within [`NEGOTIATION_TIMEOUT`]. Requests are pipelined: cheap ones run on this task, slow
//! ones on the blocking pool. The task handles every request already buffered, gathering the
//! replies, and writes them in one vectored write before it waits for more input: one system
//! call and one wake-up of the client for a whole burst, instead of one per reply. Replies go
//! out in completion order. A request sent to the blocking pool holds a share of the
//! connection's byte budget ([`MAX_IN_FLIGHT_BYTES`]) from before its payload is read until its
//! reply is on the socket, and nothing more is read while replies cannot be written, so a client
//! that stops reading replies stops being read: back-pressure, not buffering. It also holds the
//! same share of a process-wide budget ([`SharedBudget`], [`TOTAL_IN_FLIGHT_BYTES`], of which
//! TCP connections together may hold [`TCP_IN_FLIGHT_BYTES`]): a request waits for it rather
//! than allocating past it, so many such clients together cannot exhaust the host's memory, and
//! TCP clients cannot take all of it from QEMU's Unix socket.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nbd_proto::consts::*;
use nbd_proto::{ClientFlags, Command, Greeting, RawOption, Request};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::budget::{cost, Budget, Held};
pub use super::budget::{SharedBudget, MAX_IN_FLIGHT_BYTES, TCP_IN_FLIGHT_BYTES, TOTAL_IN_FLIGHT_BYTES};
use super::buffer_pool::BufferPool;
use super::export::{Catalog, PullFuture};
use super::negotiation::{Negotiated, Negotiation, Step};
use super::request_reader::RequestReader;
use super::transmission::{error_reply, execute, execute_into, read_reply_with, runs_inline, validate};

/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 16;
/// Bytes of replies gathered before they are written anyway.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// How long a client may take from connecting to starting transmission.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection's byte stream: Unix, TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A reply and the share of the byte budgets its request holds until it is written.
type Reply = (Vec<u8>, Option<Held>);

/// Counters logged when a connection closes.
#[derive(Debug, Default)]
struct Stats {
    requests: u64,
    bytes_read: u64,
    bytes_written: u64,
}

/// What a connection's error says when it failed before transmission began: a client that
/// never got in (the wrong protocol, no TLS, no certificate, too slow). A flood of them is
/// logged as one line now and then, not one each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiationFailed;

impl std::fmt::Display for NegotiationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("negotiation failed")
    }
}

/// Serves one connection to completion. `tls`: the export requires TLS on this connection
/// (STARTTLS before any other option). `peer` names it in logs. Its requests share a budget of
/// their own ([`TOTAL_IN_FLIGHT_BYTES`]); the server's connections share one ([`serve_with`]).
pub async fn serve(
    stream: Box<dyn Stream>,
    tls: Option<TlsAcceptor>,
    catalog: Catalog,
    peer: String,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve_with(stream, tls, catalog, peer, shutdown, &SharedBudget::new(TOTAL_IN_FLIGHT_BYTES)).await
}

/// [`serve`], with requests drawing on `shared` as well as on the connection's own budget. An
/// error before transmission began carries [`NegotiationFailed`] as its context.
pub async fn serve_with(
    stream: Box<dyn Stream>,
    tls: Option<TlsAcceptor>,
    catalog: Catalog,
    peer: String,
    mut shutdown: watch::Receiver<bool>,
    shared: &SharedBudget,
) -> Result<()> {
    let negotiated = tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(stream, tls, catalog, &peer))
        .await
        .map_err(|_| anyhow!("took longer than {NEGOTIATION_TIMEOUT:?}"))
        .and_then(|r| r)
        .context(NegotiationFailed)?;
    let Some((reader, session)) = negotiated else { return Ok(()) };
    let (stream, buffered) = reader.into_parts();
    let (r, writer) = tokio::io::split(stream);
    let mut reader = RequestReader::with_buffered(r, buffered);
    let mut replies = Replies {
        writer,
        batch: Vec::with_capacity(MAX_BATCH),
        bytes: 0,
        held: Vec::new(),
        pool: BufferPool::default(),
    };
    let session = Arc::new(session);
    let _attached = session.export.pull.as_ref().and_then(|p| p.attach());
    tracing::info!(
        %peer,
        export = %session.export.name,
        structured = session.structured,
        block_status = session.base_allocation,
        "connection open"
    );

    let mut stats = Stats::default();
    let mut running = Running::new();
    let outcome = transmission(
        &mut reader,
        &mut replies,
        &session,
        &Budget::new(shared),
        &mut running,
        &mut shutdown,
        &mut stats,
    )
    .await;
    // Requests still running elsewhere hold their own senders: their replies go out too.
    let Running { tx, mut rx, mut count } = running;
    drop(tx);
    while count > 0 {
        let Some(reply) = rx.recv().await else { break };
        count -= 1;
        replies.push(reply);
        if replies.full() && replies.flush().await.is_err() {
            break;
        }
    }
    let written = replies.flush().await;
    let _ = replies.writer.shutdown().await;
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

/// Replies gathered for one vectored write, with the budget shares they hold until written,
/// and the buffers written replies leave behind, for the next payloads and replies.
struct Replies<W> {
    writer: W,
    batch: Vec<Vec<u8>>,
    bytes: usize,
    held: Vec<Held>,
    pool: BufferPool,
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    fn push(&mut self, (reply, permit): Reply) {
        self.bytes += reply.len();
        self.batch.push(reply);
        self.held.extend(permit);
    }

    fn full(&self) -> bool {
        self.batch.len() >= MAX_BATCH || self.bytes >= MAX_BATCH_BYTES
    }

    /// Writes what was gathered; the budget it held is free again.
    async fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        write_all_vectored(&mut self.writer, &self.batch).await?;
        for buf in self.batch.drain(..) {
            self.pool.give(buf);
        }
        self.bytes = 0;
        self.held.clear();
        Ok(())
    }
}

/// The handshake and option haggling, with the TLS upgrade when STARTTLS asks for it;
/// `None` when the client left or ended negotiation.
async fn negotiate(
    stream: Box<dyn Stream>,
    tls: Option<TlsAcceptor>,
    catalog: Catalog,
    peer: &str,
) -> Result<Option<(RequestReader<Box<dyn Stream>>, Negotiated)>> {
    let mut reader = RequestReader::new(stream);
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
                // Clients may hang up without reading the reply to NBD_OPT_ABORT (nbdinfo does
                // after an unknown export): nothing to report then.
                let _ = reader.get_mut().write_all(&bytes).await;
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
                reader = RequestReader::new(Box::new(secured));
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

/// Requests running elsewhere (on the blocking pool, or waiting for a migration source): their
/// replies come back on `rx`, and `count` of them are out.
struct Running {
    tx: mpsc::UnboundedSender<Reply>,
    rx: mpsc::UnboundedReceiver<Reply>,
    count: usize,
}

impl Running {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx, count: 0 }
    }

    /// Takes in the replies that are back already.
    fn collect_ready<W: AsyncWrite + Unpin>(&mut self, replies: &mut Replies<W>) {
        while let Ok(reply) = self.rx.try_recv() {
            self.count -= 1;
            replies.push(reply);
        }
    }

    /// The next reply to come back.
    async fn next(&mut self) -> Option<Reply> {
        let reply = self.rx.recv().await;
        if reply.is_some() {
            self.count -= 1;
        }
        reply
    }

    /// Runs a request on the blocking pool.
    fn spawn_blocking(
        &mut self,
        session: &Arc<Negotiated>,
        req: Request,
        payload: Option<Vec<u8>>,
        permit: Option<Held>,
    ) {
        let (session, tx) = (session.clone(), self.tx.clone());
        self.count += 1;
        tokio::task::spawn_blocking(move || {
            let reply = execute(&session, &req, payload);
            let _ = tx.send((reply, permit));
        });
    }

    /// Runs a request once a migration source has answered `pull`, without holding up the rest
    /// of the connection.
    fn spawn_pulled(
        &mut self,
        pull: PullFuture,
        session: &Arc<Negotiated>,
        req: Request,
        payload: Option<Vec<u8>>,
        permit: Option<Held>,
    ) {
        let (session, tx) = (session.clone(), self.tx.clone());
        self.count += 1;
        tokio::spawn(async move {
            let reply = match pull.await {
                Ok(Some(data)) => read_reply_with(&session, &req, &data),
                Ok(None) => {
                    let s = session.clone();
                    tokio::task::spawn_blocking(move || execute(&s, &req, payload))
                        .await
                        .unwrap_or_else(|_| error_reply(&session, req.cookie, NBD_EIO, "internal error"))
                }
                Err(e) => {
                    tracing::warn!(offset = req.offset, length = req.length, "{e}");
                    // A refusal (EPERM) stays one: the client must not take it for a media error.
                    error_reply(&session, req.cookie, super::errno::errno_of(&e, req.flags), &e.to_string())
                }
            };
            let _ = tx.send((reply, permit));
        });
    }
}

/// What waiting for the next request brought.
enum Next {
    Request(Request),
    /// Something else (a reply came back, more bytes arrived): look again.
    Again,
    /// The client closed the connection between requests, or the server is stopping.
    End,
}

/// The next request if it is buffered; else the gathered replies go out, then wait for bytes,
/// a reply coming back or the shutdown.
async fn next_request<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut RequestReader<R>,
    replies: &mut Replies<W>,
    running: &mut Running,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Next> {
    if let Some(req) = reader.try_next(Request::decode).context("reading request")? {
        return Ok(Next::Request(req));
    }
    replies.flush().await.context("sending replies")?;
    tokio::select! {
        biased;
        _ = shutdown.changed() => Ok(Next::End),
        Some(reply) = running.next() => {
            replies.push(reply);
            Ok(Next::Again)
        }
        n = reader.fill() => {
            if n.context("reading request")? > 0 {
                return Ok(Next::Again);
            }
            if reader.partial() {
                let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the middle of a message");
                return Err(anyhow::Error::from(eof).context("reading request"));
            }
            Ok(Next::End)
        }
    }
}

/// The request's share of the byte budget. The budget comes back as replies are written: while
/// it is short, the gathered replies go out and the next completion is taken in, until there is
/// room. With nothing of its own in flight, the connection waits for other connections' replies
/// to free the shared budgets.
async fn take_budget<W: AsyncWrite + Unpin>(
    budget: &Budget,
    bytes: u32,
    replies: &mut Replies<W>,
    running: &mut Running,
) -> Result<Held> {
    loop {
        if let Some(held) = budget.try_take(bytes) {
            return Ok(held);
        }
        replies.flush().await.context("sending replies")?;
        if running.count == 0 {
            return Ok(budget.take(bytes).await);
        }
        if let Some(reply) = running.next().await {
            replies.push(reply);
        }
    }
}

/// A write's payload, read whole (what is gathered goes out first if the client is still
/// sending it).
async fn read_payload<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut RequestReader<R>,
    replies: &mut Replies<W>,
    req: &Request,
) -> Result<Option<Vec<u8>>> {
    if !req.has_payload() {
        return Ok(None);
    }
    if !reader.has(req.length as usize) {
        replies.flush().await.context("sending replies")?;
    }
    let mut payload = replies.pool.take();
    reader.read_payload(req.length as usize, &mut payload).await.context("reading write payload")?;
    Ok(Some(payload))
}

async fn transmission<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut RequestReader<R>,
    replies: &mut Replies<W>,
    session: &Arc<Negotiated>,
    budget: &Budget,
    running: &mut Running,
    shutdown: &mut watch::Receiver<bool>,
    stats: &mut Stats,
) -> Result<()> {
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        running.collect_ready(replies);
        if replies.full() {
            replies.flush().await.context("sending replies")?;
        }
        let req = match next_request(reader, replies, running, shutdown).await? {
            Next::Request(req) => req,
            Next::Again => continue,
            Next::End => return Ok(()),
        };
        stats.requests += 1;
        tracing::trace!(?req, "request");
        if let Err(refusal) = validate(session, &req) {
            tracing::debug!(?req, reason = refusal.reason, "request refused");
            if req.has_payload() {
                reader.discard(req.length as u64).await.context("discarding refused payload")?;
            }
            replies.push((error_reply(session, req.cookie, refusal.errno, refusal.reason), None));
            continue;
        }
        // A destination may have to get blocks from the migration source first.
        let pull = match req.command {
            Command::Flush | Command::Cache => None,
            _ => session.export.pull.as_ref().and_then(|p| p.before(req.command, req.offset, req.length as u64)),
        };
        let inline = runs_inline(&req) && pull.is_none();
        // A request that runs elsewhere holds its share of the budget from before its payload
        // is read; one that runs here is done before the next is read.
        let permit = if inline { None } else { Some(take_budget(budget, cost(&req), replies, running).await?) };
        let payload = read_payload(reader, replies, &req).await?;
        match req.command {
            Command::Disc => return Ok(()),
            Command::Read => stats.bytes_read += req.length as u64,
            Command::Write => stats.bytes_written += req.length as u64,
            _ => {}
        }
        match pull {
            Some(pull) => running.spawn_pulled(pull, session, req, payload, permit),
            None if inline => {
                let reply = execute_into(session, &req, payload.as_deref(), replies.pool.take());
                replies.push((reply, permit));
                if let Some(payload) = payload {
                    replies.pool.give(payload);
                }
            }
            None => running.spawn_blocking(session, req, payload, permit),
        }
    }
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
