//! [`Qmp`]: the connection, typed and raw commands, and event waiting.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use qmp_proto::{Client, ClientError, Greeting, Version};
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::decoded::Decoded;
use crate::error::QmpError;
use crate::event::QemuEvent;

/// Per-command timeout until [`Qmp::set_timeout`] changes it.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Events set aside by [`Qmp::wait_event`] at most; the oldest are dropped (logged) beyond.
const MAX_PENDING_EVENTS: usize = 65_536;

/// Which QMP server a socket should be, for [`Qmp::connect_to`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// QEMU's monitor.
    Qemu,
    /// An nbd-row-proxy's control socket.
    Proxy,
}

fn describe_package(package: &str) -> String {
    if package.trim().is_empty() {
        String::new()
    } else {
        format!(", {}", package.trim())
    }
}

/// An async QMP connection to QEMU or to one of our proxies' control sockets.
///
/// Built on [`qmp_proto::Client`]: one command at a time, each with a timeout; events that
/// arrive meanwhile are kept in order for [`next_event`](Self::next_event). Nothing the peer
/// may legitimately send ends the connection: unknown events, unknown enum values and missing
/// fields are kept as raw JSON and logged.
#[derive(Debug)]
pub struct Qmp {
    client: Client,
    timeout: Duration,
    /// Events read while waiting for another one; older than any still in `client`.
    pending: VecDeque<QemuEvent>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and sends `qmp_capabilities`,
    /// all within `timeout`. Commands then use [`DEFAULT_COMMAND_TIMEOUT`].
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        let client = Client::connect(path, timeout)
            .await
            .map_err(|e| QmpError::from_client(e, "qmp_capabilities", "QMP greeting and negotiation", timeout))?;
        Ok(Self::from_client(client))
    }

    /// Like [`connect`](Self::connect), and checks from the greeting that the server is the
    /// kind expected: a socket that is not QMP (an NBD server's), or QEMU's monitor given for a
    /// proxy's control socket (or the reverse), fails at once with an error that names what the
    /// socket really is.
    pub async fn connect_to(path: impl AsRef<Path>, timeout: Duration, peer: Peer) -> Result<Self, QmpError> {
        let qmp = Self::connect(path, timeout).await?;
        let package = &qmp.greeting().package;
        let is_proxy = package.starts_with(control_api::GREETING_PACKAGE);
        match (peer, is_proxy) {
            (Peer::Qemu, true) => Err(QmpError::WrongPeer {
                expected: "QEMU's QMP socket (-qmp unix:PATH,server)".into(),
                found: format!("it is an nbd-row-proxy control socket (--control; greeting {package:?})"),
            }),
            (Peer::Proxy, false) => Err(QmpError::WrongPeer {
                expected: "an nbd-row-proxy control socket (--control)".into(),
                found: format!(
                    "it is QEMU's QMP socket (QEMU {}.{}.{}{})",
                    qmp.version().major,
                    qmp.version().minor,
                    qmp.version().micro,
                    describe_package(package)
                ),
            }),
            _ => Ok(qmp),
        }
    }

    /// Like [`connect`](Self::connect), on an already connected stream.
    pub async fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        let client = Client::from_stream(stream, timeout)
            .await
            .map_err(|e| QmpError::from_client(e, "qmp_capabilities", "QMP greeting and negotiation", timeout))?;
        Ok(Self::from_client(client))
    }

    /// Wraps a client that has already negotiated.
    pub fn from_client(client: Client) -> Self {
        Self { client, timeout: DEFAULT_COMMAND_TIMEOUT, pending: VecDeque::new() }
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Greeting {
        self.client.greeting()
    }

    /// The server's version from the greeting (QEMU's `qemu` slot), e.g. 7.2.22.
    pub fn version(&self) -> Version {
        self.client.greeting().version
    }

    /// Sets the default per-command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The default per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a typed `qapi` command: arguments serialised with serde, the reply decoded
    /// leniently ([`Decoded::Raw`] when it does not fit `C::Ok`, e.g. an enum value QEMU 7.2
    /// sends that the 9.x types lack).
    pub async fn execute<C: qapi::Command>(&mut self, command: C) -> Result<Decoded<C::Ok>, QmpError> {
        let arguments =
            serde_json::to_value(&command).map_err(|error| QmpError::Encode { command: C::NAME.to_owned(), error })?;
        let raw = self.execute_raw(C::NAME, arguments).await?;
        Ok(Decoded::decode(C::NAME, raw))
    }

    /// Runs any command by name with JSON arguments (an object, or `Null` for none), with the
    /// default timeout, and returns the `return` member as received.
    pub async fn execute_raw(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_raw_with_timeout(command, arguments, self.timeout).await
    }

    /// Like [`execute_raw`](Self::execute_raw) with an explicit timeout.
    pub async fn execute_raw_with_timeout(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        tracing::trace!(%command, %arguments, "QMP command");
        match self.client.execute(command, arguments, timeout).await {
            Ok(value) => {
                tracing::trace!(%command, reply = %value, "QMP reply");
                Ok(value)
            }
            Err(e) => {
                let e = QmpError::from_client(e, command, &format!("reply to {command}"), timeout);
                tracing::debug!(%command, error = &e as &dyn std::error::Error, "QMP command failed");
                Err(e)
            }
        }
    }

    /// The next event: one set aside earlier, one that arrived during a command, or one that
    /// arrives within `timeout`. `Ok(None)` if none did.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Option<QemuEvent>, QmpError> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(Some(event));
        }
        self.read_event(timeout).await
    }

    /// Waits up to `timeout` for the first event `pred` accepts, looking first at those
    /// already received. Events it passes over are kept, in order, for
    /// [`next_event`](Self::next_event) and later waits. Fails with
    /// [`QmpError::Timeout`] if none came.
    pub async fn wait_event(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&QemuEvent) -> bool,
    ) -> Result<QemuEvent, QmpError> {
        if let Some(i) = self.pending.iter().position(&pred) {
            return Ok(self.pending.remove(i).expect("index just found"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_event(left).await? {
                Some(event) if pred(&event) => return Ok(event),
                Some(event) => self.set_aside(event),
                None => return Err(QmpError::Timeout { what: "event".into(), timeout }),
            }
        }
    }

    /// Waits up to `timeout` for a `MIGRATION` event whose status is one of `statuses`
    /// (needs the `events` migration capability on the QEMU that sends it).
    pub async fn wait_migration_event(&mut self, timeout: Duration, statuses: &[&str]) -> Result<QemuEvent, QmpError> {
        self.wait_event(timeout, |e| e.migration_status().is_some_and(|s| statuses.contains(&s))).await.map_err(|e| {
            match e {
                QmpError::Timeout { timeout, .. } => {
                    QmpError::Timeout { what: format!("MIGRATION event with status in {statuses:?}"), timeout }
                }
                other => other,
            }
        })
    }

    /// Takes every event received so far, without waiting.
    pub fn take_events(&mut self) -> Vec<QemuEvent> {
        let mut events: Vec<QemuEvent> = self.pending.drain(..).collect();
        events.extend(self.client.take_events().into_iter().map(QemuEvent::decode));
        events
    }

    /// Reads one event from the client (its buffer first), decoding it. A line that is not
    /// QMP is logged and skipped (the client has already consumed it), within the same
    /// `timeout`.
    async fn read_event(&mut self, timeout: Duration) -> Result<Option<QemuEvent>, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.client.next_event(left).await {
                Ok(event) => return Ok(event.map(QemuEvent::decode)),
                Err(ClientError::Timeout) => return Ok(None),
                Err(ClientError::Protocol(problem)) => {
                    tracing::warn!(%problem, "skipping a QMP line that is not an event or reply");
                }
                Err(e) => return Err(QmpError::from_client(e, "", "event", timeout)),
            }
        }
    }

    fn set_aside(&mut self, event: QemuEvent) {
        if self.pending.len() == MAX_PENDING_EVENTS {
            let dropped = self.pending.pop_front();
            tracing::warn!(?dropped, "too many QMP events set aside; dropping the oldest");
        }
        self.pending.push_back(event);
    }
}
