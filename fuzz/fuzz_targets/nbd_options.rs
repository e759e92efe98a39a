//! The option phase as a server sees it: client flags, then framed options parsed one by one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{ClientFlags, ClientOption, RawOption};

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    match ClientFlags::decode(buf) {
        Ok(Some((_, n))) => buf = &buf[n..],
        _ => return,
    }
    while let Ok(Some((raw, n))) = RawOption::decode(buf) {
        assert!(n <= buf.len());
        if let Ok(option) = ClientOption::parse(&raw) {
            // Whatever parses must re-encode to a frame that parses the same way.
            let mut again = Vec::new();
            option.encode(&mut again);
            let (raw2, _) = RawOption::decode(&again).unwrap().unwrap();
            assert_eq!(ClientOption::parse(&raw2).unwrap(), option);
        }
        buf = &buf[n..];
    }
});
