//! Pre-shared key and the challenge–response MACs.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::SessionParams;

/// The shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// The longest key file accepted, in bytes; anything larger is most likely the wrong file.
pub const MAX_KEY_LEN: usize = 4096;

const CLIENT_LABEL: &[u8] = b"nbd-row-proxy client";
const SERVER_LABEL: &[u8] = b"nbd-row-proxy server";

/// The secret shared by the source and destination proxies. Its `Debug` output does not show
/// the bytes, and they are overwritten when it is dropped.
#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error("cannot read migration key file {}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error(
        "migration key file {} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key is shorter than [`MIN_KEY_LEN`].
    #[error(
        "migration key in {} is {len} bytes; at least {MIN_KEY_LEN} are required \
         (e.g. `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`)",
        path.display()
    )]
    TooShort {
        /// The key file.
        path: PathBuf,
        /// Length after stripping a trailing newline.
        len: usize,
    },
    /// The file is larger than [`MAX_KEY_LEN`].
    #[error("migration key file {} is larger than {MAX_KEY_LEN} bytes; is it the right file?", path.display())]
    TooLong {
        /// The key file.
        path: PathBuf,
    },
}

impl Key {
    /// Reads a key file: one trailing newline (`\n` or `\r\n`) is stripped; a key shorter
    /// than [`MIN_KEY_LEN`] or a file that group or others may access is refused.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Key, KeyError> {
        let path = path.as_ref();
        let io = |source| KeyError::Io { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // Checked on the open file, so a swap between check and read does not matter.
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_owned(), mode });
        }
        let mut bytes = Vec::new();
        file.take(MAX_KEY_LEN as u64 + 3).read_to_end(&mut bytes).map_err(io)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.len() > MAX_KEY_LEN {
            bytes.fill(0);
            return Err(KeyError::TooLong { path: path.to_owned() });
        }
        if bytes.len() < MIN_KEY_LEN {
            let len = bytes.len();
            bytes.fill(0);
            return Err(KeyError::TooShort { path: path.to_owned(), len });
        }
        Ok(Key { bytes })
    }

    /// The key's bytes, for the derivations of this crate.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A key from bytes as they are; no length check (for tests and callers that checked).
    pub fn from_bytes(bytes: &[u8]) -> Key {
        Key { bytes: bytes.to_vec() }
    }

    /// Length of the key in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the key is empty (never true for a key read by [`Key::from_file`]).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(<{} bytes redacted>)", self.bytes.len())
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.bytes.fill(0);
        std::hint::black_box(&self.bytes);
    }
}

/// A fresh 32-byte nonce from the operating system's random number generator.
///
/// # Panics
/// If the operating system cannot supply random bytes.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the operating system's random number generator failed");
    n
}

fn mac(key: &Key, label: &[u8], server_nonce: &[u8; 32], client_nonce: &[u8; 32], params: &SessionParams) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key.bytes).expect("HMAC accepts keys of any length");
    m.update(label);
    m.update(server_nonce);
    m.update(client_nonce);
    let mut p = Vec::with_capacity(SessionParams::ENCODED_LEN);
    params.encode(&mut p);
    m.update(&p);
    m.finalize().into_bytes().into()
}

/// The source's proof of the key: HMAC-SHA256(key, "nbd-row-proxy client" || server_nonce ||
/// client_nonce || encoded params).
pub fn client_mac(key: &Key, server_nonce: &[u8; 32], client_nonce: &[u8; 32], params: &SessionParams) -> [u8; 32] {
    mac(key, CLIENT_LABEL, server_nonce, client_nonce, params)
}

/// The destination's proof of the key: as [`client_mac`] with the label
/// "nbd-row-proxy server", so a reflected client MAC never verifies.
pub fn server_mac(key: &Key, server_nonce: &[u8; 32], client_nonce: &[u8; 32], params: &SessionParams) -> [u8; 32] {
    mac(key, SERVER_LABEL, server_nonce, client_nonce, params)
}

/// Compares two MACs in constant time.
pub fn verify(expected: &[u8; 32], got: &[u8; 32]) -> bool {
    expected.ct_eq(got).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Strategy;
    use std::io::Write;

    fn params() -> SessionParams {
        SessionParams { session_id: [9; 16], disk_size: 1 << 30, block_size: 4096, strategy: Strategy::Row }
    }

    #[test]
    fn macs() {
        let key = Key::from_bytes(b"correct horse battery staple");
        let wrong = Key::from_bytes(b"correct horse battery stapler");
        let (sn, cn) = (nonce(), nonce());
        assert_ne!(sn, cn);
        let c = client_mac(&key, &sn, &cn, &params());
        let s = server_mac(&key, &sn, &cn, &params());
        assert!(verify(&client_mac(&key, &sn, &cn, &params()), &c));
        assert!(verify(&server_mac(&key, &sn, &cn, &params()), &s));
        assert!(!verify(&client_mac(&wrong, &sn, &cn, &params()), &c));
        assert!(!verify(&s, &c), "a reflected client MAC must not pass as the server's");
        let mut other = params();
        other.disk_size += 4096;
        assert!(!verify(&client_mac(&key, &sn, &cn, &other), &c));
        other = params();
        other.strategy = Strategy::Bitmap;
        assert!(!verify(&client_mac(&key, &sn, &cn, &other), &c));
        assert!(!verify(&client_mac(&key, &cn, &sn, &params()), &c), "nonces are ordered");
        assert!(!verify(&client_mac(&key, &nonce(), &cn, &params()), &c));
        let mut flipped = c;
        flipped[31] ^= 1;
        assert!(!verify(&c, &flipped));
    }

    #[test]
    fn known_answer() {
        // HMAC-SHA256 computed independently (Python hmac module).
        let key = Key::from_bytes(b"0123456789abcdef");
        let p = SessionParams { session_id: [0; 16], disk_size: 0, block_size: 1, strategy: Strategy::Row };
        let c = client_mac(&key, &[1; 32], &[2; 32], &p);
        let s = server_mac(&key, &[1; 32], &[2; 32], &p);
        assert_eq!(hex(&c), CLIENT_KAT);
        assert_eq!(hex(&s), SERVER_KAT);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    const CLIENT_KAT: &str = "2e8bdb4c06fc04da7bb93bb771bb548cddea05cd04b98d9ad43aa5431c183f62";
    const SERVER_KAT: &str = "3a1e66eff4139a37eaea17a003d1eafb31e1d118653b6df7f821fc74b8c64314";

    fn key_file(contents: &[u8], mode: u32) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn key_from_file() {
        let f = key_file(b"0123456789abcdef\n", 0o600);
        let k = Key::from_file(f.path()).unwrap();
        assert_eq!(k.len(), 16);
        assert_eq!(k.bytes, b"0123456789abcdef");
        assert!(!format!("{k:?}").contains("0123"));
        let f = key_file(b"0123456789abcdef\r\n", 0o400);
        assert_eq!(Key::from_file(f.path()).unwrap().bytes, b"0123456789abcdef");
        // Only one newline is stripped.
        let f = key_file(b"0123456789abcde\n\n", 0o600);
        assert_eq!(Key::from_file(f.path()).unwrap().bytes, b"0123456789abcde\n");
    }

    #[test]
    fn key_file_refusals() {
        let f = key_file(b"0123456789abcde\n", 0o600);
        let err = Key::from_file(f.path()).unwrap_err();
        assert!(matches!(err, KeyError::TooShort { len: 15, .. }), "{err}");
        let f = key_file(b"", 0o600);
        assert!(matches!(Key::from_file(f.path()), Err(KeyError::TooShort { len: 0, .. })));
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let f = key_file(b"0123456789abcdef0123456789abcdef\n", mode);
            let err = Key::from_file(f.path()).unwrap_err();
            assert!(matches!(err, KeyError::Permissions { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        let f = key_file(&vec![b'k'; MAX_KEY_LEN + 1], 0o600);
        assert!(matches!(Key::from_file(f.path()), Err(KeyError::TooLong { .. })));
        let f = key_file(&vec![b'k'; MAX_KEY_LEN], 0o600);
        assert_eq!(Key::from_file(f.path()).unwrap().len(), MAX_KEY_LEN);
        let err = Key::from_file("/nonexistent/migration.key").unwrap_err();
        assert!(matches!(err, KeyError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/migration.key"), "{err}");
    }
}
