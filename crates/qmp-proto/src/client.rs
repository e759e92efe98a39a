//! A small async QMP client for tests and tools; speaks to QEMU and to our own server.
//!
//! Commands are sent one at a time with increasing numeric ids. Events that arrive while a
//! reply is awaited are kept, in order, for [`Client::next_event`]; replies whose id does not
//! match (left over from a command that timed out) are dropped.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::line::LineBuffer;
use crate::message::{CommandError, Event, Greeting, Request, ServerMessage};

/// Events kept for the caller at most; older ones are dropped (logged) beyond this, so a tool
/// that never reads events does not grow without bound.
const MAX_BUFFERED_EVENTS: usize = 65_536;

/// Why a client operation failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("QMP connection")]
    Io(#[from] io::Error),
    /// The server closed the connection, or an earlier operation was interrupted in the middle
    /// of sending a request, which leaves the stream unusable.
    #[error("QMP connection closed")]
    Closed,
    /// No answer within the allotted time. The connection stays usable: a late reply is
    /// recognised by its id and dropped.
    #[error("timed out waiting for the QMP server")]
    Timeout,
    /// The server sent something that is not QMP, or not what was expected at this point.
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
    /// The command ran and failed; the server's error reply.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The socket speaks another protocol: the text says which, as far as its first bytes
    /// tell (e.g. an NBD server, which greets with `NBDMAGIC`).
    #[error("not a QMP socket: {0}")]
    NotQmp(String),
}

/// The magic an NBD server greets with (old-style and newstyle alike).
const NBD_MAGIC: &[u8] = b"NBDMAGIC";

/// What the first bytes a server sent say about it, if they already rule out QMP: `None` while
/// they may still be the start of a QMP greeting (or of `NBDMAGIC`, to name it).
fn not_qmp(first: &[u8]) -> Option<String> {
    let start = first.iter().position(|b| !b.is_ascii_whitespace())?;
    let first = &first[start..];
    if first.starts_with(NBD_MAGIC) {
        return Some(
            "it is an NBD server's socket (it greets with NBDMAGIC), the kind a QEMU -drive or nbdinfo connects to"
                .into(),
        );
    }
    if NBD_MAGIC.starts_with(first) {
        return None;
    }
    if first[0] != b'{' {
        let shown: String =
            first.iter().take(16).flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
        return Some(format!("it greets with \"{shown}\", not a JSON object"));
    }
    None
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    lines: LineBuffer,
    greeting: Greeting,
    events: VecDeque<Event>,
    next_id: u64,
    /// Set while a request is being written; still set means a write was cut short.
    broken: bool,
}

impl Client {
    /// Connects to the socket at `path`, reads the greeting and negotiates capabilities, all
    /// within `timeout`.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ClientError> {
        let stream =
            tokio::time::timeout(timeout, UnixStream::connect(path)).await.map_err(|_| ClientError::Timeout)??;
        Self::from_stream(stream, timeout).await
    }

    /// Like [`connect`](Self::connect), on an already connected stream.
    pub async fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        let mut client = Self {
            stream,
            lines: LineBuffer::new(),
            greeting: Greeting::default(),
            events: VecDeque::new(),
            next_id: 0,
            broken: false,
        };
        client.greeting = match tokio::time::timeout(timeout, client.read_greeting()).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Ok(ServerMessage::Greeting(g))) => g,
            Ok(Ok(other)) => return Err(ClientError::Protocol(format!("expected a greeting, got {other:?}"))),
            Ok(Err(e)) => return Err(e),
        };
        client.execute("qmp_capabilities", Value::Null, timeout).await?;
        Ok(client)
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs `command` and waits up to `timeout` for its reply. `arguments` is a JSON object,
    /// or `Null` for none. Events arriving meanwhile are kept for [`next_event`](Self::next_event).
    pub async fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value, ClientError> {
        if self.broken {
            return Err(ClientError::Closed);
        }
        let arguments = match arguments {
            Value::Null => Map::new(),
            Value::Object(map) => map,
            other => return Err(CommandError::generic(format!("arguments must be a JSON object, not {other}")).into()),
        };
        let id = json!(self.next_id);
        self.next_id += 1;
        let request = Request { execute: command.to_owned(), arguments, id: Some(id.clone()) };
        tokio::time::timeout(timeout, async {
            self.broken = true;
            self.stream.write_all(&request.to_line()).await?;
            self.broken = false;
            loop {
                match self.read_message().await? {
                    ServerMessage::Response(r) if r.id.as_ref() == Some(&id) => return Ok(r.result?),
                    ServerMessage::Response(r) => {
                        tracing::debug!(id = ?r.id, "dropping QMP reply to an earlier request");
                    }
                    ServerMessage::Event(event) => self.keep_event(event),
                    ServerMessage::Greeting(_) => return Err(ClientError::Protocol("greeting in mid-session".into())),
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    /// The next event: a kept one, or one that arrives within `timeout`; `Ok(None)` if none did.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        if self.broken {
            return Err(ClientError::Closed);
        }
        let wait = async {
            loop {
                match self.read_message().await? {
                    ServerMessage::Event(event) => return Ok(event),
                    ServerMessage::Response(r) => {
                        tracing::debug!(id = ?r.id, "dropping QMP reply to an earlier request");
                    }
                    ServerMessage::Greeting(_) => return Err(ClientError::Protocol("greeting in mid-session".into())),
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(event) => event.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Takes every event received so far without waiting.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn keep_event(&mut self, event: Event) {
        if self.events.len() == MAX_BUFFERED_EVENTS {
            let dropped = self.events.pop_front();
            tracing::warn!(?dropped, "too many unread QMP events; dropping the oldest");
        }
        self.events.push_back(event);
    }

    /// Reads the greeting like [`read_message`](Self::read_message), but gives up as soon as the
    /// first bytes show that the server is not QMP (an NBD server sends `NBDMAGIC` and waits,
    /// without a newline: waiting for a line would last until the timeout).
    async fn read_greeting(&mut self) -> Result<ServerMessage, ClientError> {
        let mut first = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match self.lines.next_line() {
                Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Some(line)) => {
                    if let Some(what) = not_qmp(&line) {
                        return Err(ClientError::NotQmp(what));
                    }
                    return ServerMessage::decode(&line).map_err(|e| ClientError::Protocol(e.to_string()));
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(match not_qmp(&first) {
                    Some(what) => ClientError::NotQmp(what),
                    None => ClientError::Closed,
                });
            }
            if first.len() < 64 {
                first.extend_from_slice(&buf[..n.min(64 - first.len())]);
                if let Some(what) = not_qmp(&first) {
                    return Err(ClientError::NotQmp(what));
                }
            }
            self.lines.push(&buf[..n]);
        }
    }

    /// Reads the next message. Cancel-safe: bytes read are buffered before any await.
    async fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        let mut buf = [0u8; 8192];
        loop {
            match self.lines.next_line() {
                Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Some(line)) => {
                    return ServerMessage::decode(&line).map_err(|e| ClientError::Protocol(e.to_string()))
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.lines.push(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::not_qmp;

    #[test]
    fn first_bytes_tell_nbd_and_other_protocols_from_qmp() {
        assert!(not_qmp(b"NBDMAGICIHAVEOPT\0\x03").unwrap().contains("NBD server"));
        assert_eq!(not_qmp(b"NBDM"), None, "could still be NBDMAGIC: wait for more");
        assert_eq!(not_qmp(b""), None);
        assert_eq!(not_qmp(b"  \n"), None);
        assert_eq!(not_qmp(br#"{"QMP": {"#), None);
        assert!(not_qmp(b"SSH-2.0-OpenSSH").unwrap().contains(r#"greets with "SSH-2.0-OpenSSH""#));
    }
}
