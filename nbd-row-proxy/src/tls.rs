//! TLS 1.3 with X.509 credentials in the directory layout QEMU and libvirt use (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`; e.g.
//! `/etc/pki/qemu`), so an existing libvirt PKI works as it is. Both ends authenticate: the
//! server's certificate must name the host the client connects to and be signed by the CA, and
//! so must the client's certificate (mutual TLS).
//!
//! [`make_lab_pki`] writes a throwaway CA and certificates for a lab or a test (`nbd-row-proxy
//! tls-certs`); production uses the site's own PKI.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why credentials could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("TLS credentials: {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The files do not make a valid configuration.
    #[error("TLS credentials in {}", dir.display())]
    Config {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// The CA does not make a client verifier.
    #[error("TLS credentials in {}: the CA cannot verify clients: {why}", dir.display())]
    Verifier {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        why: String,
    },
    /// Writing the lab PKI failed.
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The lab PKI would replace files (`tls-certs` without `--force`).
    #[error(
        "{} already holds {}: nothing written (--force first renames each to NAME.bak-<unix-seconds>)",
        dir.display(),
        names.join(", ")
    )]
    Exists {
        /// The directory.
        dir: PathBuf,
        /// The files already there.
        names: Vec<String>,
    },
    /// Generating the lab PKI failed.
    #[error("generating certificates")]
    Generate(#[from] rcgen::Error),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Loaded credentials: what this host presents and whom it trusts.
#[derive(Clone)]
pub struct TlsCreds {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds").field("dir", &self.dir).finish()
    }
}

impl TlsCreds {
    /// Reads the CA of a credentials directory; the server and client identities are read when
    /// first needed ([`TlsCreds::acceptor`], [`TlsCreds::connector`]), since a host may only
    /// have one of them.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certs(&dir.join("ca-cert.pem"))? {
            roots.add(cert).map_err(|source| TlsError::Config { dir: dir.to_owned(), source })?;
        }
        let creds = Self { dir: dir.to_owned(), roots: Arc::new(roots) };
        Ok(creds)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cfg_err(&self) -> impl Fn(rustls::Error) -> TlsError + '_ {
        |source| TlsError::Config { dir: self.dir.clone(), source }
    }

    /// The server side: presents `server-cert.pem`, requires a client certificate signed by
    /// the CA. TLS 1.3 only.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier { dir: self.dir.clone(), why: e.to_string() })?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(self.cfg_err())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.dir.join("server-cert.pem"))?, key(&self.dir.join("server-key.pem"))?)
            .map_err(self.cfg_err())?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// The client side: presents `client-cert.pem`, trusts servers signed by the CA. TLS 1.3
    /// only.
    pub fn connector(&self) -> Result<TlsConnector, TlsError> {
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(self.cfg_err())?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(certs(&self.dir.join("client-cert.pem"))?, key(&self.dir.join("client-key.pem"))?)
            .map_err(self.cfg_err())?;
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// The name a server certificate must carry for `host` (a DNS name or an IP address).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string()).ok()
}

/// The files [`make_lab_pki`] writes, in the order it writes them.
pub const LAB_PKI_FILES: [&str; 5] =
    ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"];

/// Writes a throwaway CA and a server and a client certificate signed by it into `dir`, in the
/// layout above; the server certificate names `hosts` (DNS names or IP addresses). Keys are
/// written with mode 0600. Never replaces a file: if any of [`LAB_PKI_FILES`] is there, nothing
/// is written ([`TlsError::Exists`]); see [`make_lab_pki_with`].
pub fn make_lab_pki(dir: &Path, hosts: &[String]) -> Result<(), TlsError> {
    make_lab_pki_with(dir, hosts, false).map(|_| ())
}

/// A file [`make_lab_pki_with`] moved aside: where it was, and where it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// The file's old path.
    pub from: PathBuf,
    /// Its backup, `NAME.bak-<unix-seconds>` (with `.N` after it if that was taken).
    pub to: PathBuf,
}

/// [`make_lab_pki`]; with `force`, files already there are first renamed to
/// `NAME.bak-<unix-seconds>` (never over an existing backup), and the backups are returned. The
/// new files are created exclusively, so a file that appears meanwhile is not replaced either.
pub fn make_lab_pki_with(dir: &Path, hosts: &[String], force: bool) -> Result<Vec<Backup>, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let existing: Vec<&str> =
        LAB_PKI_FILES.iter().copied().filter(|name| std::fs::symlink_metadata(dir.join(name)).is_ok()).collect();
    if !existing.is_empty() && !force {
        return Err(TlsError::Exists { dir: dir.to_owned(), names: existing.iter().map(|n| n.to_string()).collect() });
    }
    // Generated before anything is moved: a failure here leaves the directory as it was.
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "nbd-row-proxy lab CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let mut files = vec![("ca-cert.pem".to_string(), ca_cert.pem(), false)];
    let issuer = Issuer::new(ca, ca_key);
    for (role, names) in [("server", hosts.to_vec()), ("client", vec!["nbd-row-proxy-client".to_string()])] {
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        files.push((format!("{role}-cert.pem"), cert.pem(), false));
        files.push((format!("{role}-key.pem"), key.serialize_pem(), true));
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let backups = existing.iter().map(|name| back_up(&dir.join(name), stamp)).collect::<Result<Vec<_>, _>>()?;
    for (name, text, secret) in &files {
        write_new(&dir.join(name), text, *secret)?;
    }
    Ok(backups)
}

/// Moves `path` to `path.bak-STAMP` (or `.bak-STAMP.N`), never over an existing file: the
/// backup is a new link, made exclusively, before the old name goes.
fn back_up(path: &Path, stamp: u64) -> Result<Backup, TlsError> {
    let err = |source| TlsError::Write { path: path.to_owned(), source };
    for n in 0u32.. {
        let suffix = if n == 0 { format!(".bak-{stamp}") } else { format!(".bak-{stamp}.{n}") };
        let to = row_store::storage::suffixed(path, &suffix);
        match std::fs::hard_link(path, &to) {
            Ok(()) => {
                std::fs::remove_file(path).map_err(err)?;
                return Ok(Backup { from: path.to_owned(), to });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(e)),
        }
    }
    unreachable!("u32 backups of one file")
}

/// Creates `path` (it must not exist) with `text`: mode 0600 for a key, 0644 otherwise.
fn write_new(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn mutual_tls_with_a_lab_pki_and_refusals_without_the_right_certificates() {
        let dir = tempfile::tempdir().unwrap();
        make_lab_pki(dir.path(), &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let creds = TlsCreds::load(dir.path()).unwrap();
        let (acceptor, connector) = (creds.acceptor().unwrap(), creds.connector().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(&buf).await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(server_name("127.0.0.1").unwrap(), tcp).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        server.await.unwrap();

        // Another CA's client is refused, and the server's certificate must name the host.
        let other = tempfile::tempdir().unwrap();
        make_lab_pki(other.path(), &["127.0.0.1".into()]).unwrap();
        let stranger = TlsCreds::load(other.path()).unwrap().connector().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = creds.acceptor().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            acceptor.accept(s).await.is_err()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(stranger.connect(server_name("127.0.0.1").unwrap(), tcp).await.is_err());
        assert!(server.await.unwrap(), "the server accepted a client of another CA");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = creds.acceptor().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(s).await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(connector.connect(server_name("192.0.2.9").unwrap(), tcp).await.is_err(), "wrong host name accepted");
        assert!(TlsCreds::load(Path::new("/nonexistent")).is_err());
    }
}
