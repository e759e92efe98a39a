//! The migration stream's transport and its protection, decided by the proxy's configuration:
//!
//! - **TLS** (`--tls-creds DIR`): TLS 1.3 with mutual X.509 authentication; with a key as well,
//!   its challenge–response runs inside TLS as a second factor.
//! - **Key** (`--auth-key-file` alone): the challenge–response in clear, then every byte in both
//!   directions in sealed records (ChaCha20-Poly1305 under keys derived from the key and the
//!   handshake), see `migration_stream::seal`.
//! - **None** (`--insecure`): frames with a CRC only, for a trusted test network.
//!
//! Either way the frames above are the same (`migration_stream::Message`), read by a
//! [`FrameReader`] and written by [`send`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use anyhow::{anyhow, bail, Context as _, Result};
use migration_stream::seal::{Opener, Sealer, MAX_RECORD_PLAINTEXT};
use migration_stream::{Key, Message, SessionParams};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{last_word, parse_uri, send, set_dead_peer_timeouts, FrameReader, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};
use crate::tls::{server_name, TlsCreds};

/// The read half of a migration connection, whatever protects it.
pub type Reader = Box<dyn AsyncRead + Unpin + Send + Sync>;
/// The write half.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send + Sync>;

/// How this proxy protects its migration streams.
#[derive(Clone, Default)]
pub struct Protection {
    /// TLS credentials.
    pub tls: Option<TlsCreds>,
    /// Pre-shared key.
    pub key: Option<Arc<Key>>,
    /// Allow streams with neither (`--insecure`).
    pub insecure: bool,
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl Protection {
    /// In words, for logs and errors.
    pub fn describe(&self) -> &'static str {
        match (&self.tls, &self.key) {
            (Some(_), Some(_)) => "TLS with mutual certificates and the pre-shared key",
            (Some(_), None) => "TLS with mutual certificates",
            (None, Some(_)) => "the pre-shared key, sealed records",
            (None, None) if self.insecure => "nothing (--insecure)",
            (None, None) => "none: migrations are refused until reload-protection gives credentials or a key",
        }
    }

    /// Whether migrations may run at all with this configuration.
    pub fn usable(&self) -> Result<()> {
        if self.tls.is_none() && self.key.is_none() && !self.insecure {
            bail!(
                "migrations need --tls-creds DIR or --auth-key-file FILE (or, on a trusted test network, --insecure); \
                 a running proxy takes them with the control command reload-protection"
            );
        }
        Ok(())
    }
}

/// The source speaks TLS to a destination without `--tls-creds`, as the destination says it.
const TLS_MISMATCH_HERE: &str = "the source speaks TLS and this proxy has no --tls-creds: both proxies need the same \
     protection (--tls-creds on both, or neither)";
/// The same, as the source says it.
const TLS_MISMATCH_THERE: &str = "this proxy has --tls-creds and the destination does not: both proxies need the \
     same protection (--tls-creds on both, or neither)";

/// Splits a stream into boxed halves.
fn halves<S: AsyncRead + AsyncWrite + Send + Sync + 'static>(s: S) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

/// The source's side: connects to `uri`, runs TLS and the session handshake, and returns the
/// protected halves.
pub async fn connect(
    uri: &str,
    p: &Protection,
    params: &SessionParams,
    tls_name: Option<&str>,
) -> Result<(FrameReader<Reader>, Writer)> {
    let addr = parse_uri(uri)?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    set_dead_peer_timeouts(&stream);
    let (rd, mut wr) = match &p.tls {
        Some(creds) => {
            let host = tls_name.unwrap_or_else(|| addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h));
            let name = server_name(host).ok_or_else(|| anyhow!("{host:?} is not a host name for TLS"))?;
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, creds.connector()?.connect(name, stream))
                .await
                .map_err(|_| anyhow!("no TLS handshake with {addr} within {HANDSHAKE_TIMEOUT:?} (does the destination use --tls-creds?)"))?
                .map_err(|e| {
                    // Our TLS hello was answered by a plain migration greeting.
                    if e.to_string().contains("InvalidContentType") {
                        anyhow!("{addr} does not speak TLS: {TLS_MISMATCH_THERE}")
                    } else {
                        anyhow::Error::from(e).context(format!("TLS handshake with {addr} (its certificate must name {host:?} and be signed by the CA in {})", creds.dir().display()))
                    }
                })?;
            halves(tls)
        }
        None => halves(stream),
    };
    let mut reader = FrameReader::new(rd);
    let greeting = reader
        .next_within(HANDSHAKE_TIMEOUT, "greeting")
        .await
        .with_context(|| format!("{addr} did not greet (if it expects TLS, give this proxy --tls-creds too)"))?;
    let Message::ServerHello { nonce: server_nonce, .. } = greeting else {
        bail!("{addr} did not greet like a migration destination");
    };
    let client_nonce = migration_stream::nonce();
    let mac = p.key.as_ref().map_or([0; 32], |k| migration_stream::client_mac(k, &server_nonce, &client_nonce, params));
    let hello =
        Message::ClientHello { version: migration_stream::VERSION, params: params.clone(), nonce: client_nonce, mac };
    send(&mut wr, &hello).await?;
    match reader.next_within(HANDSHAKE_TIMEOUT, "authentication reply").await? {
        Message::Accept { mac } => {
            if let Some(k) = &p.key {
                let want = migration_stream::server_mac(k, &server_nonce, &client_nonce, params);
                if !migration_stream::verify(&want, &mac) {
                    bail!("the destination failed authentication (a different --auth-key-file?)");
                }
            }
        }
        Message::Reject { reason } => bail!("the destination refused the session: {reason}"),
        other => bail!("unexpected {} in reply to the session request", other.name()),
    }
    if let (None, Some(k)) = (&p.tls, &p.key) {
        let keys = migration_stream::seal::derive(k, &server_nonce, &client_nonce, params);
        let inner = reader.into_parts();
        let rd: Reader = Box::new(SealedReader::new(inner.0, inner.1, Opener::new(&keys.to_source)));
        let wr: Writer = Box::new(SealedWriter::new(wr, Sealer::new(&keys.to_destination)));
        return Ok((FrameReader::new(rd), wr));
    }
    Ok((reader, wr))
}

/// Socket options for an accepted migration connection: no Nagle delay, and keepalives and a
/// send timeout that notice a dead peer.
pub fn tune_accepted(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    set_dead_peer_timeouts(stream);
}

/// The destination's side: TLS (if configured) and the session handshake on an accepted
/// connection (tuned with [`tune_accepted`] if it is TCP); the session's parameters and the protected halves. `check` refuses parameters
/// (e.g. another disk size) with a reason sent back to the source.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static>(
    stream: S,
    p: &Protection,
    check: impl FnOnce(&SessionParams) -> Option<String>,
) -> Result<(SessionParams, FrameReader<Reader>, Writer)> {
    let (rd, mut wr) = match &p.tls {
        Some(creds) => {
            let tls = creds
                .acceptor()?
                .accept(stream)
                .await
                .context("TLS handshake (the source needs a client certificate signed by the CA)")?;
            halves(tls)
        }
        None => halves(stream),
    };
    let mut reader = FrameReader::new(rd);
    let server_nonce = migration_stream::nonce();
    send(&mut wr, &Message::ServerHello { version: migration_stream::VERSION, nonce: server_nonce }).await?;
    let request = match reader.next_within(HANDSHAKE_TIMEOUT, "session request").await {
        Err(_) if p.tls.is_none() && reader.looks_like_tls() => bail!("{TLS_MISMATCH_HERE}"),
        r => r?,
    };
    let Message::ClientHello { params, nonce: client_nonce, mac, .. } = request else {
        bail!("the peer did not ask for a migration session");
    };
    let authentic = p.key.as_ref().is_none_or(|k| {
        migration_stream::verify(&migration_stream::client_mac(k, &server_nonce, &client_nonce, &params), &mac)
    });
    let refusal = if !authentic {
        Some("authentication failed (a different --auth-key-file?)".to_string())
    } else {
        check(&params)
    };
    if let Some(reason) = refusal {
        last_word(&mut wr, &Message::Reject { reason: reason.clone() }).await;
        bail!("refused the session: {reason}");
    }
    let mac =
        p.key.as_ref().map_or([0; 32], |k| migration_stream::server_mac(k, &server_nonce, &client_nonce, &params));
    send(&mut wr, &Message::Accept { mac }).await?;
    if let (None, Some(k)) = (&p.tls, &p.key) {
        let keys = migration_stream::seal::derive(k, &server_nonce, &client_nonce, &params);
        let inner = reader.into_parts();
        let rd: Reader = Box::new(SealedReader::new(inner.0, inner.1, Opener::new(&keys.to_destination)));
        let wr: Writer = Box::new(SealedWriter::new(wr, Sealer::new(&keys.to_source)));
        return Ok((params, FrameReader::new(rd), wr));
    }
    Ok((params, reader, wr))
}

/// Opens sealed records from a stream: an `AsyncRead` of the plaintext.
pub struct SealedReader {
    inner: Reader,
    sealed: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    opener: Opener,
}

impl SealedReader {
    /// Reads records from `inner`, starting with the bytes already buffered in `pending`.
    pub fn new(inner: Reader, pending: Vec<u8>, opener: Opener) -> Self {
        Self { inner, sealed: pending, plain: Vec::new(), pos: 0, opener }
    }
}

impl AsyncRead for SealedReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.pos);
                buf.put_slice(&this.plain[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            this.plain.clear();
            this.pos = 0;
            match this.opener.open(&this.sealed, &mut this.plain) {
                Ok(Some(n)) => {
                    this.sealed.drain(..n);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
            }
            let mut chunk = [0u8; 64 << 10];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                if !this.sealed.is_empty() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a sealed record",
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            this.sealed.extend_from_slice(rb.filled());
        }
    }
}

/// Seals what is written into records: an `AsyncWrite` of the plaintext.
pub struct SealedWriter {
    inner: Writer,
    out: Vec<u8>,
    pos: usize,
    sealer: Sealer,
}

impl SealedWriter {
    /// Writes records to `inner`.
    pub fn new(inner: Writer, sealer: Sealer) -> Self {
        Self { inner, out: Vec::new(), pos: 0, sealer }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.out.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SealedWriter {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        let n = buf.len().min(MAX_RECORD_PLAINTEXT);
        this.sealer.seal(&buf[..n], &mut this.out);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
