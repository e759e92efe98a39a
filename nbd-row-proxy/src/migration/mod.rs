//! Disk migration between two proxies over TCP: the source's session ([`source`], reading and
//! framing rounds in [`rounds`]), the destination's ([`dest`]), and what both need to move
//! frames: a frame reader, the authenticated handshake, pacing and dead-peer timeouts.
//!
//! The decisions (what may happen next, what to persist first) are `migration_session`'s state
//! machines; this module performs them.

pub mod dest;
pub mod fetch_link;
pub mod residual;
pub mod rounds;
pub mod source;
pub mod test_hooks;
pub mod transport;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migration_session::SessionId;
use migration_stream::{Message, SessionParams};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long connecting to the destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each step of the handshake may take (greeting, session request, reply).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to make the data durable and answer the commit.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the destination may take to answer a revoke.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a best-effort last word (a discard, an error) may take to send.
pub const LAST_WORD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the destination waits for a session's next frame (an idle source sends
/// keepalives every few seconds).
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination waits for an authenticated connection's first message.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Unacknowledged data fails the connection after this long (`TCP_USER_TIMEOUT`).
const DEAD_PEER_TIMEOUT_MS: libc::c_int = 20_000;
/// An idle connection is probed after this long, every interval, this many times.
const KEEPALIVE_IDLE_S: libc::c_int = 10;
const KEEPALIVE_INTERVAL_S: libc::c_int = 5;
const KEEPALIVE_PROBES: libc::c_int = 3;

/// Reads whole frames from a stream with the sans-I/O decoder.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a read half.
    pub fn new(inner: R) -> Self {
        Self { inner, buf: Vec::with_capacity(1 << 20), pos: 0 }
    }

    /// The next message; `Ok(None)` on a clean end of stream between frames.
    pub async fn next(&mut self) -> Result<Option<Message>> {
        loop {
            if let Some((msg, n)) = Message::decode(&self.buf[self.pos..]).context("corrupt migration stream")? {
                self.pos += n;
                return Ok(Some(msg));
            }
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            } else if self.pos > (1 << 20) {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            self.buf.reserve(1 << 20);
            if self.inner.read_buf(&mut self.buf).await.context("reading from the peer")? == 0 {
                if self.pos == self.buf.len() {
                    return Ok(None);
                }
                bail!("the peer closed the connection in the middle of a frame");
            }
        }
    }

    /// The read half back, with the bytes read from it but not decoded yet (what follows the
    /// handshake when the stream switches to sealed records).
    pub fn into_parts(self) -> (R, Vec<u8>) {
        (self.inner, self.buf[self.pos..].to_vec())
    }

    /// Whether what arrived undecoded looks like a TLS record (handshake, TLS 1.x): a peer
    /// that speaks TLS to a proxy without `--tls-creds`.
    pub fn looks_like_tls(&self) -> bool {
        let rest = &self.buf[self.pos..];
        rest.len() >= 2 && rest[0] == 0x16 && rest[1] == 0x03
    }

    /// The next message, which must arrive within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration, what: &str) -> Result<Message> {
        match tokio::time::timeout(timeout, self.next()).await {
            Ok(Ok(Some(msg))) => Ok(msg),
            Ok(Ok(None)) => bail!("the peer closed the connection while we waited for {what}"),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("no {what} from the peer within {timeout:?}"),
        }
    }
}

/// Encodes, writes and flushes one message.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<usize> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    w.write_all(&out).await.context("sending to the peer")?;
    w.flush().await.context("sending to the peer")?;
    Ok(out.len())
}

/// A token bucket that paces bytes to a rate, like QEMU's `max-bandwidth`.
#[derive(Debug)]
pub struct RateLimit {
    rate: Option<f64>,
    allowance: f64,
    last: Instant,
}

impl RateLimit {
    /// `bytes_per_sec` of `None` or 0 means unlimited.
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        let rate = bytes_per_sec.filter(|r| *r > 0).map(|r| r as f64);
        Self { rate, allowance: 0.0, last: Instant::now() }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&mut self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        let now = Instant::now();
        // At most 100 ms of burst.
        self.allowance = (self.allowance + now.duration_since(self.last).as_secs_f64() * rate).min(rate / 10.0);
        self.last = now;
        self.allowance -= bytes as f64;
        if self.allowance < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.allowance / rate)).await;
        }
    }
}

/// Makes a dead peer or link fail the session within about half a minute instead of TCP's
/// default quarter of an hour: unacknowledged data times out (`TCP_USER_TIMEOUT`) and an idle
/// connection is probed (keepalive), e.g. while the source waits in `ready` for the VM to pause.
pub fn set_dead_peer_timeouts(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            tracing::debug!(name, "setsockopt failed: {}", std::io::Error::last_os_error());
        }
    };
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, DEAD_PEER_TIMEOUT_MS);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES);
}

/// Parses `tcp:HOST:PORT` (QEMU's form) or `HOST:PORT`.
pub fn parse_uri(uri: &str) -> Result<String> {
    let addr = uri.strip_prefix("tcp:").unwrap_or(uri);
    if !addr.contains(':') {
        bail!("migration URI {uri:?} is not tcp:HOST:PORT");
    }
    Ok(addr.to_string())
}

/// The session parameters both MACs cover.
pub fn session_params(session: SessionId, disk_size: u64, strategy: control_api::Strategy) -> SessionParams {
    SessionParams {
        session_id: session.0,
        disk_size,
        block_size: row_store::BLOCK_SIZE as u32,
        strategy: match strategy {
            control_api::Strategy::Row => migration_stream::Strategy::Row,
            control_api::Strategy::Bitmap => migration_stream::Strategy::Bitmap,
        },
    }
}

/// Writes `msg` and closes, without waiting more than [`LAST_WORD_TIMEOUT`].
pub async fn last_word<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) {
    let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, async {
        let _ = send(w, msg).await;
        let _ = w.shutdown().await;
    })
    .await;
}
