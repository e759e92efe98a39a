//! Reads an NBD client's byte stream into whole messages with the sans-I/O decoders.

use std::io;

use anyhow::Result;
use nbd_proto::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads framed messages out of a byte stream with the sans-I/O decoders.
pub(super) struct RequestReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    pub(super) fn new(inner: R) -> Self {
        Self::with_buffered(inner, Vec::new())
    }

    /// Reads from `inner`, after the bytes already read from it.
    pub(super) fn with_buffered(inner: R, mut buffered: Vec<u8>) -> Self {
        buffered.reserve(256 * 1024);
        Self { inner, buf: buffered, pos: 0 }
    }

    /// The stream back, with what was read from it but not decoded yet.
    pub(super) fn into_parts(self) -> (R, Vec<u8>) {
        (self.inner, self.buf[self.pos..].to_vec())
    }

    pub(super) fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The next message if it is already buffered.
    pub(super) fn try_next<T>(
        &mut self,
        decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, ProtocolError>,
    ) -> Result<Option<T>> {
        Ok(decode(&self.buf[self.pos..])?.map(|(value, n)| {
            self.pos += n;
            value
        }))
    }

    /// Whether `len` bytes are buffered.
    pub(super) fn has(&self, len: usize) -> bool {
        self.buf.len() - self.pos >= len
    }

    /// Whether part of a message is buffered.
    pub(super) fn partial(&self) -> bool {
        self.pos < self.buf.len()
    }

    /// Next message, or `None` on a clean end of stream between messages.
    pub(super) async fn next<T>(
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
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a message",
                )
                .into());
            }
        }
    }

    pub(super) async fn fill(&mut self) -> io::Result<usize> {
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
    pub(super) async fn read_payload(&mut self, len: usize, dst: &mut Vec<u8>) -> io::Result<()> {
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
    pub(super) async fn discard(&mut self, len: u64) -> io::Result<()> {
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
