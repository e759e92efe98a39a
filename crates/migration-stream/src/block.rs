//! Block payload encoding and zero detection.

use crate::{Codec, StreamError, MAX_BLOCK_LEN};

/// Encodes a block for a `Data` frame: LZ4 when `compress` is set and that is strictly smaller,
/// raw otherwise, so the payload is never larger than `data`.
pub fn encode_block(data: &[u8], compress: bool) -> (Codec, Vec<u8>) {
    if compress && !data.is_empty() {
        let packed = lz4_flex::block::compress(data);
        if packed.len() < data.len() {
            return (Codec::Lz4, packed);
        }
    }
    (Codec::Raw, data.to_vec())
}

/// Decodes a `Data` payload to exactly `logical_len` bytes (1..=[`MAX_BLOCK_LEN`]). A size
/// mismatch or corrupt LZ4 is an error; at most `logical_len` bytes are allocated.
pub fn decode_block(codec: Codec, payload: &[u8], logical_len: u32) -> Result<Vec<u8>, StreamError> {
    let len = logical_len as usize;
    if len == 0 || len > MAX_BLOCK_LEN {
        return Err(StreamError::Corrupt("logical length out of range"));
    }
    if codec == Codec::Raw {
        if payload.len() != len {
            return Err(StreamError::Corrupt("raw block length differs from logical length"));
        }
        return Ok(payload.to_vec());
    }
    let mut out = vec![0u8; len];
    decode_block_into(codec, payload, &mut out)?;
    Ok(out)
}

/// Like [`decode_block`], into a caller's buffer whose length is the logical length.
pub fn decode_block_into(codec: Codec, payload: &[u8], out: &mut [u8]) -> Result<(), StreamError> {
    match codec {
        Codec::Raw => {
            if payload.len() != out.len() {
                return Err(StreamError::Corrupt("raw block length differs from logical length"));
            }
            out.copy_from_slice(payload);
        }
        Codec::Lz4 => {
            let n = lz4_flex::block::decompress_into(payload, out)
                .map_err(|_| StreamError::Corrupt("lz4 block is corrupt or longer than announced"))?;
            if n != out.len() {
                return Err(StreamError::Corrupt("lz4 block is shorter than announced"));
            }
        }
    }
    Ok(())
}

/// Whether every byte of `data` is zero; checks 64 bytes per step.
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for chunk in &mut chunks {
        let mut acc = 0u64;
        for word in chunk.chunks_exact(8) {
            acc |= u64::from_ne_bytes(word.try_into().unwrap());
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn lz4_round_trip() {
        let data: Vec<u8> = b"hello migration ".iter().copied().cycle().take(65536).collect();
        let (codec, payload) = encode_block(&data, true);
        assert_eq!(codec, Codec::Lz4);
        assert!(payload.len() < data.len() / 10);
        assert_eq!(decode_block(codec, &payload, data.len() as u32).unwrap(), data);
        let mut out = vec![0xaa; data.len()];
        decode_block_into(codec, &payload, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn incompressible_stays_raw_and_same_size() {
        let data = noise(65536);
        let (codec, payload) = encode_block(&data, true);
        assert_eq!(codec, Codec::Raw);
        assert_eq!(payload, data);
        assert_eq!(decode_block(codec, &payload, data.len() as u32).unwrap(), data);
        assert_eq!(encode_block(&[], true), (Codec::Raw, Vec::new()));
        assert_eq!(encode_block(b"a", true), (Codec::Raw, b"a".to_vec()));
    }

    #[test]
    fn compression_off_is_raw() {
        let data = vec![0u8; 4096];
        assert_eq!(encode_block(&data, false), (Codec::Raw, data));
    }

    #[test]
    fn zeroes_compress() {
        let data = vec![0u8; 1 << 20];
        let (codec, payload) = encode_block(&data, true);
        assert_eq!(codec, Codec::Lz4);
        assert!(payload.len() < 8192, "{}", payload.len());
        assert_eq!(decode_block(codec, &payload, data.len() as u32).unwrap(), data);
    }

    #[test]
    fn decode_block_rejects_wrong_sizes_and_corruption() {
        let data = vec![5u8; 4096];
        let (codec, payload) = encode_block(&data, true);
        assert_eq!(codec, Codec::Lz4);
        for wrong in [1, 4095, 4097, 1 << 20] {
            assert!(matches!(decode_block(codec, &payload, wrong), Err(StreamError::Corrupt(_))), "{wrong}");
        }
        assert!(decode_block(codec, &payload, 0).is_err());
        assert!(decode_block(codec, &payload, MAX_BLOCK_LEN as u32 + 1).is_err());
        assert!(decode_block(codec, &payload, u32::MAX).is_err());
        assert!(decode_block(Codec::Raw, &data, 4095).is_err());
        assert!(decode_block(Codec::Raw, &data, 4097).is_err());
        assert!(decode_block(Codec::Lz4, &[], 4096).is_err());
        assert!(decode_block_into(Codec::Raw, &data, &mut [0; 10]).is_err());
        // Every truncation and every single-byte corruption either errors or yields exactly
        // 4096 bytes; never a panic.
        for cut in 0..payload.len() {
            assert!(decode_block(codec, &payload[..cut], 4096).is_err(), "cut {cut}");
        }
        for i in 0..payload.len() {
            for v in [0u8, 0xff, payload[i] ^ 0x10] {
                let mut bad = payload.clone();
                bad[i] = v;
                if let Ok(out) = decode_block(codec, &bad, 4096) {
                    assert_eq!(out.len(), 4096);
                }
            }
        }
        for junk in [noise(100), vec![0xff; 100], vec![0xf0; 3]] {
            if let Ok(out) = decode_block(codec, &junk, 4096) {
                assert_eq!(out.len(), 4096);
            }
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        for n in [1, 7, 63, 64, 65, 4096, 4099] {
            let mut data = vec![0u8; n];
            assert!(is_zero(&data));
            for i in [0, n / 2, n - 1] {
                data[i] = 1;
                assert!(!is_zero(&data), "n {n} i {i}");
                data[i] = 0;
            }
        }
        assert!(!is_zero(&noise(4096)));
    }
}
