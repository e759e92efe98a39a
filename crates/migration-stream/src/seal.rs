//! Sealed records: the migration stream's protection when the proxies share a pre-shared key but
//! no TLS certificates. After the key's challenge–response handshake, every byte in either
//! direction travels in records encrypted and authenticated with ChaCha20-Poly1305, under one
//! key per direction derived with HKDF-SHA256 from the pre-shared key, both nonces and the
//! session parameters. Each record's nonce is its number in its direction, so a record that is
//! altered, replayed, reordered or dropped fails to open, and the session ends.
//!
//! Record layout: `len:u32 LE` (the sealed length, tag included) followed by the sealed bytes.
//! A record holds at most [`MAX_RECORD_PLAINTEXT`] bytes of the stream.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key as AeadKey, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::{Key, SessionParams};

/// Most stream bytes in one record.
pub const MAX_RECORD_PLAINTEXT: usize = 256 << 10;
/// Bytes a record adds: its length and the Poly1305 tag.
pub const RECORD_OVERHEAD: usize = 4 + TAG_LEN;
const TAG_LEN: usize = 16;
const C2S: &[u8] = b"nbd-row-proxy sealed source to destination";
const S2C: &[u8] = b"nbd-row-proxy sealed destination to source";

/// Why a record could not be opened: the stream was tampered with, or is not sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The length field is beyond what a sealed record can be.
    #[error("sealed record of {0} bytes is too large (is the peer using the same protection?)")]
    TooLarge(u32),
    /// Authentication failed: altered, replayed, reordered or dropped records, or another key.
    #[error("sealed record {0} failed authentication: the stream was altered, replayed, reordered or cut")]
    Forged(u64),
}

/// The two directions' keys of one session.
pub struct SessionKeys {
    /// Source → destination.
    pub to_destination: [u8; 32],
    /// Destination → source.
    pub to_source: [u8; 32],
}

/// Derives a session's keys from the pre-shared key, the handshake's nonces and its parameters.
pub fn derive(key: &Key, server_nonce: &[u8; 32], client_nonce: &[u8; 32], params: &SessionParams) -> SessionKeys {
    let mut salt = Vec::with_capacity(64 + SessionParams::ENCODED_LEN);
    salt.extend_from_slice(server_nonce);
    salt.extend_from_slice(client_nonce);
    params.encode(&mut salt);
    let hk = Hkdf::<Sha256>::new(Some(&salt), key.bytes());
    let mut keys = SessionKeys { to_destination: [0; 32], to_source: [0; 32] };
    hk.expand(C2S, &mut keys.to_destination).expect("32 bytes is a valid HKDF output");
    hk.expand(S2C, &mut keys.to_source).expect("32 bytes is a valid HKDF output");
    keys
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n.into()
}

/// Seals one direction's stream into records.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Sealer {
    /// A sealer with `key`, from record 0.
    pub fn new(key: &[u8; 32]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(AeadKey::from_slice(key)), counter: 0 }
    }

    /// Appends records carrying `plaintext` (split at [`MAX_RECORD_PLAINTEXT`]) to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        for chunk in plaintext.chunks(MAX_RECORD_PLAINTEXT) {
            let len = ((chunk.len() + TAG_LEN) as u32).to_le_bytes();
            let sealed = self
                .cipher
                .encrypt(&nonce(self.counter), Payload { msg: chunk, aad: &len })
                .expect("sealing cannot fail for records of this size");
            self.counter += 1;
            out.extend_from_slice(&len);
            out.extend_from_slice(&sealed);
        }
    }
}

/// Opens one direction's records.
pub struct Opener {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Opener {
    /// An opener with `key`, from record 0.
    pub fn new(key: &[u8; 32]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(AeadKey::from_slice(key)), counter: 0 }
    }

    /// Opens the record at the start of `buf`: `Ok(None)` until it is whole, then its plaintext
    /// (appended to `out`) and the bytes it took.
    pub fn open(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, SealError> {
        let Some(len) = buf.get(..4) else { return Ok(None) };
        let len_bytes: [u8; 4] = len.try_into().expect("4 bytes");
        let n = u32::from_le_bytes(len_bytes);
        if n as usize > MAX_RECORD_PLAINTEXT + TAG_LEN || (n as usize) < TAG_LEN {
            return Err(SealError::TooLarge(n));
        }
        let Some(sealed) = buf.get(4..4 + n as usize) else { return Ok(None) };
        let plain = self
            .cipher
            .decrypt(&nonce(self.counter), Payload { msg: sealed, aad: &len_bytes })
            .map_err(|_| SealError::Forged(self.counter))?;
        self.counter += 1;
        out.extend_from_slice(&plain);
        Ok(Some(4 + n as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Strategy;

    fn keys() -> SessionKeys {
        let params =
            SessionParams { session_id: [1; 16], disk_size: 1 << 20, block_size: 4096, strategy: Strategy::Row };
        derive(&Key::from_bytes(b"0123456789abcdef0123"), &[2; 32], &[3; 32], &params)
    }

    fn open_all(o: &mut Opener, mut wire: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::new();
        while let Some(n) = o.open(wire, &mut out)? {
            wire = &wire[n..];
        }
        assert!(wire.is_empty(), "a partial record left over");
        Ok(out)
    }

    #[test]
    fn records_round_trip_in_order_and_hide_the_data() {
        let k = keys();
        let mut s = Sealer::new(&k.to_destination);
        let data: Vec<u8> = (0..MAX_RECORD_PLAINTEXT * 2 + 100).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        s.seal(&data, &mut wire);
        s.seal(b"commit", &mut wire);
        assert_eq!(wire.len(), data.len() + 6 + 4 * RECORD_OVERHEAD);
        assert!(!wire.windows(64).any(|w| w == &data[1000..1064]), "plaintext on the wire");
        let mut o = Opener::new(&k.to_destination);
        let mut want = data.clone();
        want.extend_from_slice(b"commit");
        assert_eq!(open_all(&mut o, &wire).unwrap(), want);
        // Every cut point just needs more bytes.
        let mut o = Opener::new(&k.to_destination);
        for cut in 0..20 {
            assert_eq!(o.open(&wire[..cut], &mut Vec::new()), Ok(None));
        }
    }

    #[test]
    fn altered_replayed_reordered_dropped_or_reflected_records_fail() {
        let k = keys();
        let mut s = Sealer::new(&k.to_destination);
        let (mut r0, mut r1, mut r2) = (Vec::new(), Vec::new(), Vec::new());
        s.seal(b"round 1", &mut r0);
        s.seal(b"data", &mut r1);
        s.seal(b"commit", &mut r2);
        let cat = |parts: &[&Vec<u8>]| parts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<u8>>();
        let open = |wire: Vec<u8>| open_all(&mut Opener::new(&k.to_destination), &wire);
        assert!(open(cat(&[&r0, &r1, &r2])).is_ok());
        let mut flipped = cat(&[&r0, &r1, &r2]);
        flipped[r0.len() + 6] ^= 1;
        assert_eq!(open(flipped), Err(SealError::Forged(1)));
        assert_eq!(open(cat(&[&r0, &r0])), Err(SealError::Forged(1)), "replayed");
        assert_eq!(open(cat(&[&r1, &r0])), Err(SealError::Forged(0)), "reordered");
        assert_eq!(open(cat(&[&r0, &r2])), Err(SealError::Forged(1)), "one dropped");
        // The other direction's key does not open it (no reflection), nor does another session's.
        assert!(open_all(&mut Opener::new(&k.to_source), &r0).is_err());
        let other = derive(
            &Key::from_bytes(b"0123456789abcdef0123"),
            &[9; 32],
            &[3; 32],
            &SessionParams { session_id: [1; 16], disk_size: 1 << 20, block_size: 4096, strategy: Strategy::Row },
        );
        assert!(open_all(&mut Opener::new(&other.to_destination), &r0).is_err());
        let mut huge = r0.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(open(huge), Err(SealError::TooLarge(_))));
    }
}
