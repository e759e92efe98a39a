//! The migration streams' protection, replaceable while the proxy runs: `reload-protection`
//! (new paths, or the same paths with new contents) and SIGHUP (the same paths) read the TLS
//! credentials and the key again, check them as start-up does, and swap them in for the next
//! connection. The NBD clients are not touched; a reload that fails changes nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use migration_stream::Key;
use tokio_rustls::TlsAcceptor;

use crate::migration::transport::Protection;
use crate::sync;
use crate::tls::TlsCreds;

/// Where the protection comes from: what `--tls-creds`, `--auth-key-file` and `--insecure` say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProtectionFiles {
    /// The TLS credentials directory (`ca-cert.pem`, `server-*.pem`, `client-*.pem`).
    pub tls_creds: Option<PathBuf>,
    /// The pre-shared key file.
    pub auth_key_file: Option<PathBuf>,
    /// Streams with neither are allowed.
    pub insecure: bool,
}

impl ProtectionFiles {
    /// Reads and checks every file: the key (its mode too), the CA, and the identities present
    /// in the credentials directory (at least one of server and client), so a typo fails now,
    /// not in the middle of a migration.
    pub fn load(&self) -> Result<Protection> {
        Ok(self.load_with_acceptor()?.0)
    }

    /// [`ProtectionFiles::load`], and the server identity's acceptor (for NBD over TCP).
    fn load_with_acceptor(&self) -> Result<(Protection, Option<TlsAcceptor>)> {
        let key = self.auth_key_file.as_deref().map(Key::from_file).transpose()?.map(Arc::new);
        let (tls, acceptor) = match self.tls_creds.as_deref().map(load_creds).transpose()? {
            Some((creds, acceptor)) => (Some(creds), acceptor),
            None => (None, None),
        };
        Ok((Protection { tls, key, insecure: self.insecure }, acceptor))
    }
}

/// Loads a credentials directory and builds the identities it holds.
fn load_creds(dir: &Path) -> Result<(TlsCreds, Option<TlsAcceptor>)> {
    let creds = TlsCreds::load(dir)?;
    let (server, client) = (dir.join("server-cert.pem"), dir.join("client-cert.pem"));
    if !server.exists() && !client.exists() {
        bail!("--tls-creds {}: neither server-cert.pem nor client-cert.pem is there", dir.display());
    }
    let acceptor = server.exists().then(|| creds.acceptor()).transpose()?;
    if client.exists() {
        creds.connector()?;
    }
    Ok((creds, acceptor))
}

/// The protection in force, the files it was read from, and the acceptor of its server identity.
#[derive(Clone)]
pub struct LiveProtection(Arc<RwLock<State>>);

struct State {
    files: ProtectionFiles,
    protection: Protection,
    acceptor: Option<TlsAcceptor>,
}

impl std::fmt::Debug for LiveProtection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.current().describe())
    }
}

impl Default for LiveProtection {
    fn default() -> Self {
        Self(Arc::new(RwLock::new(State {
            files: ProtectionFiles::default(),
            protection: Protection::default(),
            acceptor: None,
        })))
    }
}

impl LiveProtection {
    /// Reads `files` (see [`ProtectionFiles::load`]).
    pub fn load(files: ProtectionFiles) -> Result<Self> {
        let (protection, acceptor) = files.load_with_acceptor()?;
        Ok(Self(Arc::new(RwLock::new(State { files, protection, acceptor }))))
    }

    /// What protects the next connection.
    pub fn current(&self) -> Protection {
        sync::read(&self.0).protection.clone()
    }

    /// The files it was read from.
    pub fn files(&self) -> ProtectionFiles {
        sync::read(&self.0).files.clone()
    }

    /// The TLS server side for the next NBD client over TCP; `None` without a server identity.
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        sync::read(&self.0).acceptor.clone()
    }

    /// Reads the files again, with `tls_creds` and `auth_key_file` in place of the current
    /// paths where given (absolute paths only: the caller's directory is not ours). On success
    /// the next connection uses the result; on failure nothing changes.
    pub fn reload(&self, tls_creds: Option<PathBuf>, auth_key_file: Option<PathBuf>) -> Result<Protection> {
        for p in tls_creds.iter().chain(auth_key_file.iter()) {
            if !p.is_absolute() {
                bail!("{}: give an absolute path (the proxy's working directory is not yours)", p.display());
            }
        }
        let mut files = self.files();
        files.tls_creds = tls_creds.or(files.tls_creds);
        files.auth_key_file = auth_key_file.or(files.auth_key_file);
        let (protection, acceptor) = files.load_with_acceptor().context("the protection was not changed")?;
        *sync::write(&self.0) = State { files, protection: protection.clone(), acceptor };
        Ok(protection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![byte; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn a_reload_adds_a_key_and_a_failed_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let live = LiveProtection::default();
        assert!(live.current().usable().is_err(), "nothing configured: migrations refused");

        let key = key_file(dir.path(), "k1", 1);
        live.reload(None, Some(key.clone())).unwrap();
        assert!(live.current().key.is_some());
        assert_eq!(live.files().auth_key_file.as_deref(), Some(key.as_path()));

        // A missing file, a bad mode, a relative path: refused, the key in force stays.
        let err = live.reload(None, Some(dir.path().join("missing"))).unwrap_err();
        assert!(format!("{err:#}").contains("not changed"), "{err:#}");
        let loose = key_file(dir.path(), "k2", 2);
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(live.reload(None, Some(loose)).is_err());
        assert!(live.reload(None, Some(PathBuf::from("rel/key"))).is_err());
        assert_eq!(live.files().auth_key_file.as_deref(), Some(key.as_path()));
        assert!(live.current().key.is_some());

        // The same path with new contents: a rotation.
        let before = live.current().key.unwrap();
        key_file(dir.path(), "k1", 3);
        live.reload(None, None).unwrap();
        assert!(!Arc::ptr_eq(&before, &live.current().key.unwrap()), "the key was read again");
    }

    #[test]
    fn credentials_without_an_identity_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::make_lab_pki(dir.path(), &["localhost".into()]).unwrap();
        let live = LiveProtection::default();
        live.reload(Some(dir.path().to_owned()), None).unwrap();
        assert!(live.current().tls.is_some());
        let empty = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("ca-cert.pem"), empty.path().join("ca-cert.pem")).unwrap();
        let err = live.reload(Some(empty.path().to_owned()), None).unwrap_err();
        assert!(format!("{err:#}").contains("neither server-cert.pem nor client-cert.pem"), "{err:#}");
        assert_eq!(live.files().tls_creds.as_deref(), Some(dir.path()));
    }
}
