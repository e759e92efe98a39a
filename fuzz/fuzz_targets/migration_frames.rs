//! Migration stream frames: decode frames in a loop; whatever decodes must re-encode to the
//! same bytes and decode again to the same message. Decoded `Data` blocks are also inflated.
//! Random bytes rarely pass the CRC, so the input is also wrapped, as type byte and payload,
//! in a frame with a valid CRC to reach the payload parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_stream::{decode_block, Message};

fn check_frames(data: &[u8]) {
    let mut buf = data;
    while let Ok(Some((msg, n))) = Message::decode(buf) {
        assert!(n > 0 && n <= buf.len());
        assert_eq!(msg.wire_len(), n);
        let mut again = Vec::new();
        msg.encode(&mut again);
        assert_eq!(&again[..], &buf[..n]);
        let (redecoded, m) = Message::decode(&again).unwrap().unwrap();
        assert_eq!(m, n);
        assert_eq!(redecoded, msg);
        if let Message::Data { codec, logical_len, payload, .. } = &msg {
            if let Ok(block) = decode_block(*codec, payload, *logical_len) {
                assert_eq!(block.len(), *logical_len as usize);
            }
        }
        buf = &buf[n..];
    }
}

fuzz_target!(|data: &[u8]| {
    check_frames(data);
    if let Some((&ty, payload)) = data.split_first() {
        let mut frame = vec![ty, 0, 0, 0];
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        let crc = crc32fast::hash(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        check_frames(&frame);
    }
    // Block decoding on its own: arbitrary bytes as an lz4 payload never panic or overrun.
    if let Some((&len, rest)) = data.split_first() {
        let logical = u32::from(len) * 64 + 1;
        if let Ok(block) = decode_block(migration_stream::Codec::Lz4, rest, logical) {
            assert_eq!(block.len(), logical as usize);
        }
    }
});
