//! Async QMP server on a Unix socket: greeting, capabilities negotiation, in-order command
//! dispatch to a [`Handler`], and event fan-out.
//!
//! Each connection runs on its own task. Commands on one connection run one after another and
//! are answered in order, each on a task of its own, so a long command neither blocks other
//! clients nor holds up events on its own connection. A command whose client goes away is not
//! cancelled: it runs to completion and its reply is dropped, so a half-done operation (say, a
//! merge) is never abandoned at an arbitrary await point.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::line::LineBuffer;
use crate::message::{BadRequest, CommandError, ErrorClass, Event, Greeting, Request, Response};

/// Requests read ahead of the one running; past this we stop reading (backpressure).
const MAX_QUEUED: usize = 64;
/// Clients served at once; a client beyond this is closed at once.
pub const MAX_CLIENTS: usize = 16;

/// The future a [`Handler`] returns for one command.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, CommandError>> + Send + 'a>>;

/// Executes commands for the server. `qmp_capabilities` is handled by the server and never
/// reaches the handler.
///
/// Implementations usually `match` on the name inside `Box::pin(async move { ... })` and
/// return [`CommandError::command_not_found`] for names they do not serve. The future runs on
/// its own task, so it may take as long as it needs.
pub trait Handler: Send + Sync + 'static {
    /// Runs `command` with its `arguments`, returning the `return` value or the error reply.
    fn handle<'a>(&'a self, command: &'a str, arguments: Map<String, Value>) -> HandlerFuture<'a>;
}

/// Binds the control socket at `path` with mode 0600.
///
/// A socket file left by a dead server is replaced; one a live server answers on is refused
/// (`AddrInUse`), and so is any other kind of file there (`AlreadyExists`). The mode is set
/// right after binding, so keep the socket in a directory only its owner can enter if that
/// brief window matters. Must be called within a Tokio runtime.
pub fn bind_control_socket(path: impl AsRef<Path>) -> io::Result<UnixListener> {
    let path = path.as_ref();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves QMP on `listener` until `shutdown` becomes `true` (or its sender is dropped).
///
/// Every connection gets `greeting`, must negotiate with `qmp_capabilities`, and then has its
/// commands run by `handler`. Events sent on `events` go to every connection that has finished
/// negotiation; a client too slow to keep up loses events (logged) rather than holding others
/// back. On shutdown, listening stops and connections close without waiting for running
/// commands, which finish on their own. The caller removes the socket file.
pub async fn serve(
    listener: UnixListener,
    greeting: Greeting,
    handler: Arc<dyn Handler>,
    events: broadcast::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let greeting: Arc<[u8]> = greeting.to_line().into();
    let mut conns = JoinSet::new();
    let mut next_peer = 0u64;
    loop {
        tokio::select! {
            _ = shutdown_requested(&mut shutdown) => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "QMP connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok(_) if conns.len() >= MAX_CLIENTS => {
                    tracing::warn!(max = MAX_CLIENTS, "too many control clients: refusing one");
                }
                Ok((stream, _)) => {
                    next_peer += 1;
                    let conn = Connection {
                        peer: next_peer,
                        handler: Arc::clone(&handler),
                        events: events.clone(),
                        shutdown: shutdown.clone(),
                    };
                    conns.spawn(conn.run(stream, Arc::clone(&greeting)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "QMP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Serves one accepted connection as [`serve`] serves each of its clients, until it closes (the
/// property tests and fuzz targets drive the server this way over a socket pair).
pub async fn serve_connection(
    stream: UnixStream,
    greeting: &Greeting,
    handler: Arc<dyn Handler>,
    events: broadcast::Sender<Event>,
    shutdown: watch::Receiver<bool>,
) {
    let conn = Connection { peer: 0, handler, events, shutdown };
    conn.run(stream, greeting.to_line().into()).await;
}

/// Resolves once shutdown is requested or nobody can request it any more.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Per-connection state shared by its loop.
struct Connection {
    peer: u64,
    handler: Arc<dyn Handler>,
    events: broadcast::Sender<Event>,
    shutdown: watch::Receiver<bool>,
}

/// The command currently running for a connection.
struct InFlight {
    id: Option<Value>,
    task: JoinHandle<Result<Value, CommandError>>,
}

impl Connection {
    async fn run(mut self, stream: UnixStream, greeting: Arc<[u8]>) {
        let peer = self.peer;
        tracing::debug!(peer, "QMP client connected");
        match self.serve(stream, &greeting).await {
            Ok(()) => tracing::debug!(peer, "QMP client left"),
            Err(e) => tracing::debug!(peer, error = &e as &dyn std::error::Error, "QMP connection ended"),
        }
    }

    async fn serve(&mut self, stream: UnixStream, greeting: &[u8]) -> io::Result<()> {
        let (mut reader, mut writer) = stream.into_split();
        writer.write_all(greeting).await?;
        let mut lines = LineBuffer::new();
        let mut queue: VecDeque<Result<Request, BadRequest>> = VecDeque::new();
        let mut events: Option<broadcast::Receiver<Event>> = None;
        let mut negotiated = false;
        let mut running: Option<InFlight> = None;
        let mut eof = false;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while running.is_none() {
                let Some(next) = queue.pop_front() else { break };
                let req = match next {
                    Ok(req) => req,
                    Err(bad) => {
                        tracing::debug!(peer = self.peer, error = %bad.error.desc, "bad QMP request");
                        send(&mut writer, &Response::from(bad)).await?;
                        continue;
                    }
                };
                if req.execute == "qmp_capabilities" {
                    let result = negotiate(negotiated, &req.arguments);
                    if result.is_ok() {
                        negotiated = true;
                        events = Some(self.events.subscribe());
                    }
                    send(&mut writer, &Response { id: req.id, result }).await?;
                } else if !negotiated {
                    let error = CommandError::new(
                        ErrorClass::CommandNotFound,
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    );
                    send(&mut writer, &Response { id: req.id, result: Err(error) }).await?;
                } else {
                    tracing::debug!(peer = self.peer, command = %req.execute, "QMP command");
                    let handler = Arc::clone(&self.handler);
                    let Request { execute, arguments, id } = req;
                    let task = tokio::spawn(async move { handler.handle(&execute, arguments).await });
                    running = Some(InFlight { id, task });
                }
            }
            if eof && running.is_none() {
                return Ok(());
            }
            tokio::select! {
                _ = shutdown_requested(&mut self.shutdown) => return Ok(()),
                joined = finished(&mut running) => {
                    let id = running.take().and_then(|r| r.id);
                    let result = joined.unwrap_or_else(|e| {
                        tracing::error!(peer = self.peer, error = %e, "QMP command task failed");
                        Err(CommandError::generic("internal error: the command failed unexpectedly"))
                    });
                    send(&mut writer, &Response { id, result }).await?;
                }
                event = next_event(&mut events) => match event {
                    Ok(event) => writer.write_all(&event.to_line()).await?,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(peer = self.peer, lost = n, "QMP client too slow: events dropped");
                    }
                    Err(RecvError::Closed) => events = None,
                },
                read = reader.read(&mut buf), if !eof && queue.len() < MAX_QUEUED => {
                    let n = read?;
                    if n == 0 {
                        eof = true;
                        queue.extend(lines.finish().filter(|l| !is_blank(l)).map(|l| Request::decode(&l)));
                    }
                    lines.push(&buf[..n]);
                    loop {
                        match lines.next_line() {
                            Ok(None) => break,
                            Ok(Some(line)) if is_blank(&line) => {}
                            Ok(Some(line)) => queue.push_back(Request::decode(&line)),
                            Err(e) => queue.push_back(Err(BadRequest::new(None, format!("QMP input {e}")))),
                        }
                    }
                }
            }
        }
    }
}

/// `qmp_capabilities`: we offer no capabilities, so only an empty `enable` is accepted.
fn negotiate(negotiated: bool, arguments: &Map<String, Value>) -> Result<Value, CommandError> {
    if negotiated {
        return Err(CommandError::new(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    for (key, value) in arguments {
        match (key.as_str(), value) {
            ("enable", Value::Array(caps)) => {
                if let Some(cap) = caps.first() {
                    let name = cap.as_str().map_or_else(|| cap.to_string(), str::to_owned);
                    return Err(CommandError::generic(format!("Capability '{name}' not available")));
                }
            }
            ("enable", _) => return Err(CommandError::generic("Invalid parameter type for 'enable', expected: array")),
            _ => return Err(CommandError::generic(format!("Parameter '{key}' is unexpected"))),
        }
    }
    Ok(json!({}))
}

async fn send(writer: &mut OwnedWriteHalf, response: &Response) -> io::Result<()> {
    writer.write_all(&response.to_line()).await
}

/// Waits for the running command, or forever if none is running.
async fn finished(running: &mut Option<InFlight>) -> Result<Result<Value, CommandError>, tokio::task::JoinError> {
    match running {
        Some(r) => (&mut r.task).await,
        None => std::future::pending().await,
    }
}

/// Waits for the next event, or forever before negotiation.
async fn next_event(events: &mut Option<broadcast::Receiver<Event>>) -> Result<Event, RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}
