//! A minimal blocking NBD client over a Unix socket, on top of the `nbd-proto` codec: fixed
//! newstyle, `NBD_OPT_GO`, simple replies only, and `WRITE` / `FLUSH` / `READ`.
//!
//! Requests may be pipelined up to a depth: [`NbdClient::submit_write`] returns as soon as the
//! request is sent while fewer than `depth` are in flight, and waits for the oldest reply
//! otherwise. NBD does not order overlapping requests in flight, so a write to a block that
//! already has a write in flight first waits for that one.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nbd_proto::consts::*;
use nbd_proto::{ClientFlags, ClientOption, Command, Greeting, OptionReply, OptionReplyKind, ReplyHeader, Request};

/// A connected NBD client in the transmission phase.
pub struct NbdClient {
    sock: UnixStream,
    buf: Vec<u8>,
    size: u64,
    flags: u16,
    depth: usize,
    next_cookie: u64,
    /// Requests in flight: cookie → (command, first block, block count).
    in_flight: HashMap<u64, (Command, u64, u64)>,
    /// Blocks with a write in flight.
    busy: HashSet<u64>,
}

fn proto(e: nbd_proto::ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl NbdClient {
    /// Connects to `socket`, negotiates fixed newstyle and selects `export` with `NBD_OPT_GO`.
    /// `depth` (at least 1) bounds the requests in flight.
    pub fn connect(socket: &Path, export: &str, depth: usize) -> io::Result<Self> {
        let sock = UnixStream::connect(socket)?;
        sock.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut c = Self {
            sock,
            buf: Vec::new(),
            size: 0,
            flags: 0,
            depth: depth.max(1),
            next_cookie: 1,
            in_flight: HashMap::new(),
            busy: HashSet::new(),
        };
        let greeting: Greeting = c.read_frame(Greeting::decode)?;
        if greeting.handshake_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::other("the server does not speak fixed newstyle NBD"));
        }
        let mut out = Vec::new();
        let no_zeroes = greeting.handshake_flags & NBD_FLAG_NO_ZEROES != 0;
        let bits = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
        ClientFlags { bits }.encode(&mut out);
        ClientOption::Go(nbd_proto::option::InfoRequest { export: export.into(), requests: Vec::new() })
            .encode(&mut out);
        c.sock.write_all(&out)?;
        loop {
            let reply: OptionReply = c.read_frame(OptionReply::decode)?;
            match reply.kind {
                OptionReplyKind::Ack => break,
                OptionReplyKind::Info(nbd_proto::InfoReply::Export { size, transmission_flags }) => {
                    c.size = size;
                    c.flags = transmission_flags;
                }
                OptionReplyKind::Error { code, message } => {
                    return Err(io::Error::other(format!(
                        "NBD_OPT_GO for export {export:?} refused: {code:#x} {message}"
                    )))
                }
                _ => {}
            }
        }
        if c.size == 0 && c.flags == 0 {
            return Err(io::Error::other("the server sent no export information"));
        }
        Ok(c)
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    fn send(&mut self, command: Command, offset: u64, length: u32, payload: &[u8]) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut out = Vec::with_capacity(REQUEST_LEN + payload.len());
        Request { flags: 0, command, cookie, offset, length }.encode(&mut out);
        out.extend_from_slice(payload);
        self.sock.write_all(&out)?;
        Ok(cookie)
    }

    /// Waits for one reply and retires its request; returns the cookie, or the error.
    fn complete_one(&mut self) -> io::Result<u64> {
        let header: ReplyHeader = self.read_frame(ReplyHeader::decode)?;
        let ReplyHeader::Simple { error, cookie } = header else {
            return Err(io::Error::other("structured reply without negotiating it"));
        };
        let Some((command, first, count)) = self.in_flight.remove(&cookie) else {
            return Err(io::Error::other(format!("reply for unknown cookie {cookie}")));
        };
        if command == Command::Write {
            for b in first..first + count {
                self.busy.remove(&b);
            }
        }
        if error != 0 {
            return Err(io::Error::other(format!(
                "{command:?} of {count} block(s) at block {first} failed: NBD error {error}{}",
                if error == NBD_EPERM { " (EPERM: writes refused)" } else { "" }
            )));
        }
        Ok(cookie)
    }

    /// Sends a write of `data` (whole 4 KiB blocks) at `offset`; may return before the reply.
    pub fn submit_write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let bs = crate::BLOCK_SIZE as u64;
        let (first, count) = (offset / bs, (data.len() as u64).div_ceil(bs));
        while (first..first + count).any(|b| self.busy.contains(&b)) || self.in_flight.len() >= self.depth {
            self.complete_one()?;
        }
        let cookie = self.send(Command::Write, offset, data.len() as u32, data)?;
        self.in_flight.insert(cookie, (Command::Write, first, count));
        self.busy.extend(first..first + count);
        Ok(())
    }

    /// Waits for every request in flight.
    pub fn drain(&mut self) -> io::Result<()> {
        while !self.in_flight.is_empty() {
            self.complete_one()?;
        }
        Ok(())
    }

    /// Waits for every request in flight, then sends `FLUSH` and waits for it.
    pub fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        let cookie = self.send(Command::Flush, 0, 0, &[])?;
        self.in_flight.insert(cookie, (Command::Flush, 0, 0));
        self.complete_one().map(drop)
    }

    /// Reads `buf.len()` bytes at `offset` (after the requests in flight).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.drain()?;
        let cookie = self.send(Command::Read, offset, buf.len() as u32, &[])?;
        self.in_flight.insert(cookie, (Command::Read, offset / crate::BLOCK_SIZE as u64, 0));
        self.complete_one()?;
        while self.buf.len() < buf.len() {
            self.fill()?;
        }
        buf.copy_from_slice(&self.buf[..buf.len()]);
        self.buf.drain(..buf.len());
        Ok(())
    }

    /// Ends the session politely (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) -> io::Result<()> {
        self.drain()?;
        self.send(Command::Disc, 0, 0, &[]).map(drop)
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut tmp = [0u8; 65536];
        let n = self.sock.read(&mut tmp)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the NBD server closed the connection"));
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    fn read_frame<T>(
        &mut self,
        decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, nbd_proto::ProtocolError>,
    ) -> io::Result<T> {
        loop {
            if let Some((value, used)) = decode(&self.buf).map_err(proto)? {
                self.buf.drain(..used);
                return Ok(value);
            }
            self.fill()?;
        }
    }
}
