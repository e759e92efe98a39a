//! A QMP-shaped JSON control protocol: the wire format QEMU's monitor speaks, reused for the
//! proxy's control socket so one client can drive both QEMU and the proxy.
//!
//! Messages are JSON objects, one per line, over a Unix socket. The server greets, the client
//! sends `qmp_capabilities`, then commands (`{"execute", "arguments", "id"}`) are answered in
//! order with `{"return"}` or `{"error"}`, and events (`{"event", "data", "timestamp"}`) may
//! arrive at any time.
//!
//! - [`message`] and [`line`](mod@line) are sans-I/O: types, encoding to a line, decoding
//!   from a line, and splitting a byte stream into lines.
//! - [`server`] serves many concurrent clients on a `UnixListener`, dispatching commands to a
//!   [`Handler`] and fanning out [`Event`]s from a broadcast channel.
//! - [`client`] is a small async client for tests and tools.
//!
//! Unlike QEMU, which runs a streaming JSON parser, both ends here need each message on its own
//! line (no pretty-printed multi-line JSON); every QMP client in practice sends it that way.

pub mod client;
pub mod line;
pub mod message;
pub mod server;

pub use client::{Client, ClientError};
pub use line::{LineBuffer, LineTooLong, MAX_LINE};
pub use message::{
    parse_arguments, BadRequest, CommandError, DecodeError, ErrorClass, Event, Greeting, Request, Response,
    ServerMessage, Timestamp, Version,
};
pub use server::{bind_control_socket, serve, serve_connection, Handler, HandlerFuture};
