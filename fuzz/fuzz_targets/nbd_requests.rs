//! The transmission phase as a server sees it: request headers with write payloads skipped, and
//! replies as a client sees them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{Chunk, ReplyHeader, Request};

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while let Ok(Some((req, n))) = Request::decode(buf) {
        let mut again = Vec::new();
        req.encode(&mut again);
        assert_eq!(&again[..], &buf[..n]);
        buf = &buf[n..];
        if req.has_payload() {
            buf = &buf[(req.length as usize).min(buf.len())..];
        }
    }
    let mut buf = data;
    while let Ok(Some((header, n))) = ReplyHeader::decode(buf) {
        buf = &buf[n..];
        if let ReplyHeader::Structured(h) = header {
            let len = (h.length as usize).min(buf.len());
            let _ = Chunk::parse(&h, &buf[..len]);
            buf = &buf[len..];
        }
    }
});
