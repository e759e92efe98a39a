//! The command line, and its validation: every argument is checked before anything is bound or
//! created, so a typo fails with one clear line and leaves nothing behind.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::protection::{LiveProtection, ProtectionFiles};
use row_store::storage::suffixed;

/// How long a read on an incoming disk waits for the commit by default.
const DEFAULT_READ_WAIT: &str = "10s";
const DEFAULT_ABANDONED_AFTER: &str = "10s";

/// Examples after `nbd-row-proxy --help`.
const EXAMPLES: &str = "Examples:
  # Serve a disk to QEMU, with a control socket for row-migrate
  nbd-row-proxy serve --image /var/lib/vm1/disk.raw --socket /run/vm1/disk.sock --export vm1 \\
      --control /run/vm1/disk.ctl --auth-key-file /etc/nbd-row-proxy/key
  # QEMU then opens: -drive file=nbd+unix:///vm1?socket=/run/vm1/disk.sock,format=raw,if=virtio,cache=none

  # On the destination host: wait for the disk to arrive by migration
  nbd-row-proxy receive --image /var/lib/vm1/disk.raw --listen 0.0.0.0:10810 \\
      --socket /run/vm1/disk.sock --control /run/vm1/disk.ctl --auth-key-file /etc/nbd-row-proxy/key

  # Then migrate with row-migrate (row-migrate --help). `nbd-row-proxy serve --help` lists the
  # control-socket commands.

  # Afterwards, on the source host: drop the state of the disk that moved away (or keep the
  # image and receive the disk back into it later)
  nbd-row-proxy retire --image /var/lib/vm1/disk.raw

Logs: stderr, filtered by RUST_LOG (default info; e.g. RUST_LOG=debug); --log-format json for one
JSON object per line. An invalid RUST_LOG exits with status 2.";

/// Examples after `serve --help`.
const SERVE_EXAMPLES: &str = "Examples:
  # A disk for one VM, with its control socket
  nbd-row-proxy serve --image disk.raw --socket /run/vm1/disk.sock --export vm1 --control /run/vm1/disk.ctl

  # Also over TCP with TLS client certificates (libvirt's layout), for qemu-mirror or backups
  nbd-row-proxy serve --image disk.raw --socket /run/vm1/disk.sock --tcp 0.0.0.0:10809 \\
      --tls-creds /etc/pki/qemu --control /run/vm1/disk.ctl

  # Ask the control socket something (one JSON object per line, QMP-shaped)
  printf '%s\\n' '{\"execute\":\"qmp_capabilities\"}' '{\"execute\":\"query-status\"}' | socat - UNIX:/run/vm1/disk.ctl

The image should be a multiple of 4 KiB; one smaller than 4 KiB is refused.

A disk this host migrated away (the migration completed) is not served: serve it --read-only to
look at it, `nbd-row-proxy retire --image IMAGE` once it is no longer needed, or --fenced to
start it fenced and `reclaim` it by force.";

/// Examples after `receive --help`.
const RECEIVE_EXAMPLES: &str = "Examples:
  # Receive a disk authenticated by a shared key (at least 16 bytes, mode 0600)
  nbd-row-proxy receive --image dst.raw --listen 0.0.0.0:10810 --auth-key-file /etc/nbd-row-proxy/key \\
      --socket /run/vm1/disk.sock --control /run/vm1/disk.ctl

  # Over TLS with mutual certificates; a read waits at most 500 ms for a block still at the source
  nbd-row-proxy receive --image dst.raw --listen 0.0.0.0:10810 --tls-creds /etc/pki/qemu \\
      --socket /run/vm1/disk.sock --control /run/vm1/disk.ctl --read-wait 500ms

  # Create the image (sparse) at the source disk's size if it is not there yet
  nbd-row-proxy receive --image dst.raw --create 10GiB --listen 0.0.0.0:10810 \\
      --auth-key-file /etc/nbd-row-proxy/key --socket /run/vm1/disk.sock --control /run/vm1/disk.ctl

The image must have exactly the size of the source's disk (query-status shows it as image-size).";

/// Examples after `retire --help`.
const RETIRE_EXAMPLES: &str = "Examples:
  # The disk was migrated to another host and the migration completed: drop its state here; the
  # image then holds the disk as it was handed over, a disk of its own (serve it, or receive into it)
  nbd-row-proxy retire --image /var/lib/vm1/disk.raw

  # The same, and delete the image file
  nbd-row-proxy retire --image /var/lib/vm1/disk.raw --delete-image

Refused with one line (exit 1): a disk this host owns, a hand-over that is not over (run
row-migrate --recover first), a post-copy still pushing, a disk a proxy serves right now.";

/// Examples after `tls-certs --help`.
const TLS_EXAMPLES: &str = "Example:
  # A lab PKI for two hosts; copy the directory to both and pass it as --tls-creds
  nbd-row-proxy tls-certs --dir /tmp/pki --host host-a --host host-b --host 127.0.0.1";

/// `serve --help`'s epilogue: examples, then the control-socket commands from the schema.
fn serve_help() -> String {
    format!("{SERVE_EXAMPLES}\n\n{}", control_api::catalog::text_commands())
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "nbd-row-proxy",
    version,
    about = "NBD server for live migration of a VM with its local disk",
    after_long_help = EXAMPLES
)]
pub struct Cli {
    /// Log lines on stderr as text or as one JSON object per line (filtered by RUST_LOG,
    /// default info).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    pub log_format: logging::LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Serve a raw image over NBD.
    #[command(after_long_help = serve_help())]
    Serve(ServeCommand),
    /// Receive a disk by migration, serving it over NBD from the start (before the commit a read
    /// gets the source's current data and a write claims an armed source's disk); once
    /// committed, the disk is served read-write.
    #[command(after_long_help = format!("{RECEIVE_EXAMPLES}\n\n{}", control_api::catalog::text_commands()))]
    Receive(ReceiveArgs),
    /// Write a throwaway CA and server and client certificates for a lab or a test, in the
    /// layout --tls-creds reads (production uses the site's own PKI, e.g. libvirt's).
    #[command(after_long_help = TLS_EXAMPLES)]
    TlsCerts(TlsCertsArgs),
    /// Drop the state of a disk this host migrated away for good (the migration completed), or of
    /// an image whose incoming migration did not commit: the overlay is merged back into the image,
    /// the state entry removed, and with --delete-image the image file too.
    #[command(after_long_help = RETIRE_EXAMPLES)]
    Retire(RetireArgs),
}

/// `serve`: the common arguments and what only `serve` takes.
#[derive(Debug, clap::Args)]
pub struct ServeCommand {
    /// Everything `receive` takes too.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Start even though the disk was migrated to another host and the migration completed:
    /// served fenced (reads answered, writes fail with EPERM), e.g. to take it back with the
    /// control command reclaim {"force": true} when that host is gone for good. Without it such
    /// a disk is refused (unless --read-only). No effect on other disks.
    #[arg(long)]
    pub fenced: bool,
}

/// `retire`: which disk, and where its state is.
#[derive(Debug, clap::Args)]
pub struct RetireArgs {
    /// The disk's image (file or block device), as it was served.
    #[arg(long)]
    pub image: PathBuf,
    /// The state directory it was served with.
    #[arg(long, value_name = "DIR", env = "NBD_ROW_PROXY_STATE_DIR", default_value = crate::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The --disk-id it was served with, if any.
    #[arg(long, value_name = "ID")]
    pub disk_id: Option<String>,
    /// The --reserved it was served with, if any (the overlay to merge back).
    #[arg(long)]
    pub reserved: Option<PathBuf>,
    /// Also delete the image file (not the overlay's data: nothing is merged). Refused for a
    /// block device.
    #[arg(long)]
    pub delete_image: bool,
}

impl RetireArgs {
    /// The request for [`crate::lifecycle::retire`].
    pub fn request(&self) -> crate::lifecycle::RetireRequest {
        crate::lifecycle::RetireRequest {
            image: self.image.clone(),
            state_dir: self.state_dir.clone(),
            disk_id: self.disk_id.clone(),
            reserved: self.reserved.clone(),
            delete_image: self.delete_image,
        }
    }
}

/// `tls-certs`: where and for which names.
#[derive(Debug, clap::Args)]
pub struct TlsCertsArgs {
    /// Directory to write ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and
    /// client-key.pem into.
    #[arg(long)]
    pub dir: PathBuf,
    /// A name the server certificate carries (DNS name or IP address); repeatable.
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
    /// Replace files already in --dir: each is first renamed to NAME.bak-<unix-seconds>. Without
    /// it, an existing file is an error and nothing is written.
    #[arg(long)]
    pub force: bool,
}

/// `receive`: `serve`'s arguments and where the migration arrives.
#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    /// TCP address to accept the migration on, e.g. 0.0.0.0:10810.
    #[arg(long)]
    pub listen: String,
    /// How long an NBD request waits for blocks still at the migration source before it fails
    /// with EIO, e.g. 500ms or 10s (a plain number is seconds). Before the switchover a read is
    /// answered at once with the source's current data; during post-copy a read of a block not
    /// pushed yet fetches it ahead of the push. This bounds the wait when the source or the
    /// link is down: the guest then sees EIO (with QEMU's rerror=stop it pauses, and resumes
    /// with `cont` once the link is back).
    #[arg(long, default_value = DEFAULT_READ_WAIT, value_parser = units::seconds, value_name = "DURATION")]
    pub read_wait: Duration,
    /// Before the hand-over: how long no NBD client may be attached, after the destination's
    /// QEMU (a client attached for at least a second) left without its guest writing,
    /// before the migration counts as abandoned by the VM manager. The source is then told: an
    /// armed source disarms (the disk stays with it) and this host discards what it received.
    /// 0 turns this off (the source stays armed until migrate-cancel).
    #[arg(long, default_value = DEFAULT_ABANDONED_AFTER, value_parser = units::seconds, value_name = "DURATION")]
    pub abandoned_after: Duration,
    /// Create the image (a sparse file, mode 0600) with this size if it does not exist, e.g.
    /// 10GiB or 10737418240: the size of the source's disk (its query-status image-size). An
    /// existing image must have exactly this size.
    #[arg(long, value_name = "SIZE", value_parser = units::positive_size)]
    pub create: Option<u64>,
    /// Everything `serve` takes.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `serve`: the image, the sockets, and how the migration is protected.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Raw disk image (file or block device).
    #[arg(long)]
    pub image: PathBuf,
    /// Unix socket to listen on (QEMU: file=nbd+unix:///NAME?socket=PATH). Only a stale socket
    /// may be there already.
    #[arg(long)]
    pub socket: PathBuf,
    /// Also listen on this TCP address, e.g. 127.0.0.1:10809 (needs --tls-creds, whose
    /// certificates clients must then present, or --insecure).
    #[arg(long)]
    pub tcp: Option<String>,
    /// Export name; the empty name selects it too.
    #[arg(long, default_value = "")]
    pub export: String,
    /// Refuse writes. Also serves a disk this host migrated away for good (otherwise refused),
    /// as it was handed over.
    #[arg(long)]
    pub read_only: bool,
    /// Where the disk's durable state lives (overlay, journal, ownership record, post-copy
    /// residual): one entry per disk, found by the disk's identity, not its path. Older state
    /// beside the image (IMAGE.row, .row.map, .ownership, .residual) is moved in once.
    #[arg(long, value_name = "DIR", env = "NBD_ROW_PROXY_STATE_DIR", default_value = crate::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The disk's id (its state entry's name): 1 to 128 of A-Z a-z 0-9 . _ -. By default a
    /// file's id is kept in its extended attribute user.nbd-row-proxy.disk-id (made at first
    /// use), an LVM/device-mapper volume's is its dm uuid, a loop device's its backing file's;
    /// other block devices need one.
    #[arg(long, value_name = "ID")]
    pub disk_id: Option<String>,
    /// Reserved file that receives writes while ROW is on (its journal is PATH.map); by default
    /// both are in the disk's state entry.
    #[arg(long)]
    pub reserved: Option<PathBuf>,
    /// Control socket (QMP-shaped JSON, mode 0600) for row-start, row-stop, query-status, ...
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Blocks written at least this many times count as hot (high-frequency); 1 to 127 (write
    /// counts saturate at 127).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub hot_threshold: u32,
    /// Pre-shared key (a file, mode 0600, at least 16 bytes) that authenticates migrations; with
    /// --tls-creds a second factor, without it the stream is sealed with keys derived from it.
    #[arg(long)]
    pub auth_key_file: Option<PathBuf>,
    /// TLS credentials directory (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem, as QEMU and libvirt lay them out, e.g. /etc/pki/qemu): migrations run over
    /// TLS 1.3 with mutual certificates.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Allow migration streams with neither TLS nor a key (a trusted test network only).
    #[arg(long)]
    pub insecure: bool,
    /// NBD connections served at once on each listener (the unix socket and TCP have separate
    /// pools); more are refused (the ones being served go on).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The image.
    pub image: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The operator's disk id.
    pub disk_id: Option<String>,
    /// The reserved file, if not the default.
    pub reserved: Option<PathBuf>,
    /// The NBD Unix socket.
    pub socket: PathBuf,
    /// The NBD TCP address.
    pub tcp: Option<SocketAddr>,
    /// The control socket.
    pub control: Option<PathBuf>,
    /// The export name.
    pub export: String,
    /// Serve read-only.
    pub read_only: bool,
    /// `serve --fenced`: start a disk that was migrated away, fenced.
    pub fenced: bool,
    /// `receive --create`: the size to create the image with if it is missing.
    pub create: Option<u64>,
    /// Default hot threshold.
    pub hot_threshold: u32,
    /// How migration streams are protected.
    pub protection: LiveProtection,
    /// `receive`: where to listen for the migration.
    pub listen: Option<SocketAddr>,
    /// `receive`: how long a request waits for blocks still at the source.
    pub read_wait: Duration,
    /// `receive`: how long after the destination's QEMU left an armed migration counts as
    /// abandoned (zero: never).
    pub abandoned_after: Duration,
    /// NBD connections served at once.
    pub max_connections: usize,
}

fn address(what: &str, s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("{what} {s:?} is not an address (HOST:PORT, e.g. 0.0.0.0:10810)"))?
        .next()
        .with_context(|| format!("{what} {s:?} resolves to no address"))
}

/// A path where a socket will be bound: its directory must exist, and only a stale socket (one
/// nobody answers on) may be there; any other file is refused, never replaced.
pub fn check_socket_path(what: &str, path: &Path) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("{what} {}: directory {} does not exist", path.display(), dir.display());
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("{what} {}", path.display())),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{what} {} is in use by a running server", path.display());
            }
            Ok(())
        }
        Ok(_) => bail!("{what} {} exists and is not a socket; refusing to replace it", path.display()),
    }
}

/// The image: a file or a block device. `receive` may be given a missing one with `--create`
/// (its directory must exist; an existing one must have the size asked for); without it a
/// missing image is explained.
fn check_image(image: &Path, receive: bool, create: Option<u64>) -> Result<()> {
    let meta = match std::fs::metadata(image) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && receive => {
            let Some(size) = create else {
                bail!(
                    "--image {} does not exist: receive writes the disk into an image that has exactly the size \
                     of the source's disk (query-status on the source shows it as image-size): create it with \
                     `truncate -s SIZE {}` (or a logical volume of that size), or pass --create SIZE",
                    image.display(),
                    image.display()
                );
            };
            let dir = image.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                bail!("--image {}: directory {} does not exist", image.display(), dir.display());
            }
            if size < row_store::BLOCK_SIZE {
                bail!("--create {size}: a disk is at least one {} block", units::format_size(row_store::BLOCK_SIZE));
            }
            return Ok(());
        }
        r => r.with_context(|| format!("--image {}", image.display()))?,
    };
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        bail!("--image {} is neither a file nor a block device", image.display());
    }
    if let Some(want) = create {
        use std::io::{Seek, SeekFrom};
        let size = std::fs::File::open(image)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .with_context(|| format!("--image {}", image.display()))?;
        if size != want {
            bail!(
                "--image {} exists with {size} bytes, not the {want} bytes of --create: it is not created again \
                 (give its size, or another path)",
                image.display()
            );
        }
    }
    Ok(())
}

/// `path` made absolute against the working directory (a daemon's may change).
fn absolute(what: &str, path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{what} {}", path.display()))
}

/// The sockets, the disk id and the state directory (made absolute): a socket path that names
/// one of the disk's own files is a typo that would hide it.
fn check_paths(args: &ServeArgs) -> Result<PathBuf> {
    check_socket_path("--socket", &args.socket)?;
    if let Some(control) = &args.control {
        check_socket_path("--control", control)?;
        if control == &args.socket {
            bail!("--control and --socket are the same path");
        }
    }
    if let Some(id) = &args.disk_id {
        crate::state::DiskId::parse(id)?;
    }
    let state_dir = absolute("--state-dir", &args.state_dir)?;
    let mut disk_files = vec![args.image.clone(), state_dir.clone()];
    if let Some(reserved) = &args.reserved {
        disk_files.extend([reserved.clone(), suffixed(reserved, ".map")]);
    }
    for sock in std::iter::once(&args.socket).chain(args.control.as_ref()) {
        if disk_files.iter().any(|f| f == sock) {
            bail!("{} is one of the disk's own files, not a place for a socket", sock.display());
        }
    }
    Ok(state_dir)
}

/// The NBD TCP address and the migration streams' protection (which a receiver must have).
fn check_network(args: &ServeArgs, receiving: bool) -> Result<(Option<SocketAddr>, LiveProtection)> {
    let tcp = args.tcp.as_deref().map(|t| address("--tcp", t)).transpose()?;
    if tcp.is_some() && args.tls_creds.is_none() && !args.insecure {
        bail!(
            "--tcp needs --tls-creds DIR (NBD clients then negotiate TLS with client certificates), or \
             --insecure for a trusted test network: an NBD export over TCP is otherwise open to anyone who \
             can reach it, in clear"
        );
    }
    let files = ProtectionFiles {
        tls_creds: args.tls_creds.clone(),
        auth_key_file: args.auth_key_file.clone(),
        insecure: args.insecure,
    };
    let protection = LiveProtection::load(files)?;
    if receiving {
        protection.current().usable()?;
    }
    Ok((tcp, protection))
}

impl Cli {
    /// Checks every argument; nothing is created or bound yet.
    pub fn validate(self) -> Result<Config> {
        let (args, listen, (read_wait, abandoned_after), fenced, create) = match self.command {
            Cmd::TlsCerts(_) => bail!("tls-certs is not a server"),
            Cmd::Retire(_) => bail!("retire is not a server"),
            Cmd::Serve(a) => (a.serve, None, (Duration::ZERO, Duration::ZERO), a.fenced, None),
            Cmd::Receive(r) => {
                let waits = (r.read_wait, r.abandoned_after);
                (r.serve, Some(address("--listen", &r.listen)?), waits, false, r.create)
            }
        };
        check_image(&args.image, listen.is_some(), create)?;
        let state_dir = check_paths(&args)?;
        let (tcp, protection) = check_network(&args, listen.is_some())?;
        if listen.is_some() && args.read_only {
            bail!("receive writes the disk it receives: --read-only does not apply");
        }
        Ok(Config {
            image: args.image,
            state_dir,
            disk_id: args.disk_id,
            reserved: args.reserved,
            socket: args.socket,
            tcp,
            control: args.control,
            export: args.export,
            read_only: args.read_only,
            fenced,
            create,
            hot_threshold: args.hot_threshold,
            protection,
            listen,
            read_wait,
            abandoned_after,
            max_connections: args.max_connections as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_wait(value: &str) -> Result<Duration, String> {
        let argv = ["nbd-row-proxy", "receive", "--listen", "127.0.0.1:1", "--image", "i", "--socket", "s"];
        let cli = Cli::try_parse_from(argv.iter().chain(&["--read-wait", value])).map_err(|e| e.to_string())?;
        match cli.command {
            Cmd::Receive(r) => Ok(r.read_wait),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn help_has_examples_and_the_control_commands_from_the_schema() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        cli.build();
        for sub in ["serve", "receive", "tls-certs", "retire"] {
            let help = cli.find_subcommand_mut(sub).unwrap().render_long_help().to_string();
            assert!(help.contains("Examples:") || help.contains("Example:"), "{sub}: {help}");
        }
        let serve = cli.find_subcommand_mut("serve").unwrap().render_long_help().to_string();
        let (commands, _) = control_api::catalog();
        for c in commands {
            assert!(serve.contains(&format!("  {} ", c.name)), "{} missing from serve --help", c.name);
        }
    }

    #[test]
    fn read_wait_takes_plain_seconds_as_before_or_a_unit() {
        assert_eq!(read_wait("2"), Ok(Duration::from_secs(2)));
        assert_eq!(read_wait("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(read_wait("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(read_wait("1m"), Ok(Duration::from_secs(60)));
        let e = read_wait("10 parsecs").unwrap_err();
        assert!(e.contains("invalid value '10 parsecs' for '--read-wait <DURATION>': expected a duration"), "{e}");
    }
}
