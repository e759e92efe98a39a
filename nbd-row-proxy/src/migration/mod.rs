//! Disk migration between two proxies over TCP: the source's pre-copy rounds and final round
//! ([`source`]), the destination's receiver ([`dest`]), and what both need to move frames.

pub mod dest;
pub mod source;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migration_stream::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Encodes and writes one message.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<usize> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    w.write_all(&out).await.context("sending to the peer")?;
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
            libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as u32)
        };
        if rc != 0 {
            tracing::debug!(name, "setsockopt failed: {}", std::io::Error::last_os_error());
        }
    };
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 20_000);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

/// Parses `tcp:HOST:PORT` (QEMU's form) or `HOST:PORT`.
pub fn parse_uri(uri: &str) -> Result<String> {
    let addr = uri.strip_prefix("tcp:").unwrap_or(uri);
    if !addr.contains(':') {
        bail!("migration URI {uri:?} is not tcp:HOST:PORT");
    }
    Ok(addr.to_string())
}
