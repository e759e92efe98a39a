//! Start-up (the disk, its ownership record, the listeners), the accept loop, and graceful
//! shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use migration_session::{DestSession, DestStage, Ownership};
use qmp_proto::{Greeting, Version};
use row_store::reserved::Found;
use row_store::storage::Storage;
use row_store::{BlockBackend, Caps, Disk, DiskOptions, Extent, Mode};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::cli::{check_socket_path, Config};
use crate::control::{Control, ControlHandler};
use crate::lifecycle::{self, Away, Go, Start};
use crate::migration::dest::Incoming;
use crate::migration::source::Outgoing;
use crate::nbd::connection::{NegotiationFailed, SharedBudget, Stream, TCP_IN_FLIGHT_BYTES, TOTAL_IN_FLIGHT_BYTES};
use crate::nbd::export::Catalog;
use crate::ownership::{Access, Gate, Guarded, RecordFile};
use crate::protection::LiveProtection;
use crate::proxy::{Events, Merger, Proxy};
use crate::state::{Lookup, StateEntry};

/// How long in-flight requests may take to finish after SIGTERM (the systemd unit's
/// TimeoutStopSec leaves room for it and the flush after it).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Events kept for a control client that reads slowly.
const EVENT_BACKLOG: usize = 1024;
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A disk opened as its ownership record allows, with where its durable state lives.
pub struct Opened {
    /// The disk.
    pub disk: Arc<Disk>,
    /// Its ownership record's file.
    pub record_file: RecordFile,
    /// The record, if there is one.
    pub record: Option<Ownership>,
    /// Its state entry.
    pub state: StateEntry,
    /// Where the disk went, when it was migrated away for good and is served anyway
    /// (`--read-only` or `--fenced`).
    pub migrated_away: Option<Away>,
    /// `--read-only` of a disk opened read-write (a handed-over disk's ROW overlay must be
    /// replayed): the live export refuses writes itself.
    pub export_read_only: bool,
}

/// The `retire` command line for the disk `config` serves, for messages.
fn retire_command(config: &Config) -> String {
    let mut cmd = format!("nbd-row-proxy retire --image {}", config.image.display());
    if config.state_dir != Path::new(crate::state::DEFAULT_STATE_DIR) {
        cmd.push_str(&format!(" --state-dir {}", config.state_dir.display()));
    }
    if let Some(id) = &config.disk_id {
        cmd.push_str(&format!(" --disk-id {id}"));
    }
    if let Some(reserved) = &config.reserved {
        cmd.push_str(&format!(" --reserved {}", reserved.display()));
    }
    cmd
}

/// `receive --create SIZE`: makes a missing image, a sparse file of `size` bytes (mode 0600),
/// durably. An existing one was checked by the command line.
fn create_image(image: &Path, size: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(image) {
        Ok(f) => f,
        // Made meanwhile (another start): its size is checked when it is opened.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("creating --image {}", image.display())),
    };
    file.set_len(size)
        .and_then(|()| file.sync_all())
        .and_then(|()| row_store::Posix.sync_parent(image))
        .with_context(|| format!("creating --image {}", image.display()))?;
    tracing::info!(image = %image.display(), size, "created the image (sparse) to receive the disk into");
    Ok(())
}

/// Finds the disk's state entry and opens the disk as its ownership record allows. Blocking.
pub fn open_disk(config: &Config) -> Result<Opened> {
    if let Some(size) = config.create.filter(|_| !config.image.exists()) {
        create_image(&config.image, size)?;
    }
    let receiving = config.listen.is_some();
    let start =
        if receiving { Start::Receive } else { Start::Serve { read_only: config.read_only, fenced: config.fenced } };
    let state = StateEntry::locate(&Lookup {
        state_dir: &config.state_dir,
        image: &config.image,
        disk_id: config.disk_id.as_deref(),
        reserved: config.reserved.as_deref(),
        read_only: config.read_only,
    })?;
    let record_file = RecordFile::of_entry(&state)
        .with_context(|| format!("writing the ownership record {}", state.ownership().display()))?;
    let record = record_file.load()?;
    let migrated_away = match lifecycle::may_start(record.as_ref(), start) {
        Ok(Go::Normal) => None,
        Ok(Go::MigratedAway(away)) => Some(away),
        Err(refusal) => bail!("{}", refusal.message(&config.image, &retire_command(config))),
    };
    let holds = matches!(&record, Some(Ownership::Destination { stage: DestStage::Committed | DestStage::Owner, .. }));
    // A handed-over disk keeps its ROW overlay (the disk as handed over is the image and the
    // overlay), which only a read-write open replays: `--read-only` then refuses writes at the
    // export instead.
    let export_read_only = config.read_only
        && lifecycle::fenced_source(record.as_ref())
        && !matches!(row_store::reserved::inspect(&row_store::Posix, &state.journal()), Ok(Found::Nothing));
    let options = DiskOptions {
        reserved: Some(state.reserved().to_owned()),
        read_only: config.read_only && !export_read_only,
        // A destination overwrites the whole image, so an old overlay is obsolete there; not
        // once it holds a committed disk.
        discard_overlay: receiving && !holds,
        disk_tag: state.id().tag(),
    };
    let disk =
        Disk::open(&config.image, options).with_context(|| format!("opening disk {}", config.image.display()))?;
    check_size(&config.image, disk.size())?;
    Ok(Opened { disk: Arc::new(disk), record_file, record, state, migrated_away, export_read_only })
}

/// Sector size of the guests' block layer: QEMU sizes NBD disks in whole 512-byte sectors.
const SECTOR: u64 = 512;

/// Refuses an image smaller than one block, and warns about one that does not end on a block
/// boundary, saying what becomes of its tail.
fn check_size(image: &Path, size: u64) -> Result<()> {
    let block = row_store::BLOCK_SIZE;
    if size < block {
        bail!(
            "{} is {size} bytes, smaller than one {} block: there is no disk to serve (a disk image is at least one block, \
             ideally a whole number of them)",
            image.display(),
            units::format_size(block)
        );
    }
    let tail = size % block;
    if !size.is_multiple_of(SECTOR) {
        tracing::warn!(
            image = %image.display(),
            size,
            tail = size % SECTOR,
            "the image is not a whole number of 512-byte sectors: it is served and migrated byte for byte, but \
             QEMU rounds the disk up to {} bytes, and the guest's last sector extends past the image; resize it to \
             a multiple of 4 KiB",
            size.div_ceil(SECTOR) * SECTOR
        );
    } else if tail != 0 {
        tracing::warn!(
            image = %image.display(),
            size,
            tail,
            "the image is not a whole number of 4 KiB blocks: its last {tail} bytes are a short block, served, \
             tracked and migrated like the others, but a guest with 4 KiB sectors cannot use them; resize it to a \
             multiple of 4 KiB"
        );
    }
    Ok(())
}

/// Mode of the NBD socket, whatever the umask: its owner and its group (e.g. `kvm`, QEMU's under
/// libvirt, as the systemd unit's `Group=` makes it) may connect, nobody else.
pub const NBD_SOCKET_MODE: u32 = 0o660;
/// Mode of the control socket, whatever the umask: only its owner may connect.
pub const CONTROL_SOCKET_MODE: u32 = 0o600;

/// Runs `bind`, which creates the socket file `path`, under a umask that leaves at most `mode`
/// on it, then sets exactly `mode`: the socket is never open to more than that, not even for a
/// moment under a lax umask (e.g. `umask 000`). The umask is the process's, so a file another
/// thread creates meanwhile gets at most the same restriction, never a wider mode.
fn bind_with_mode<T>(path: &Path, mode: u32, bind: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask(2) only swaps the process's file mode creation mask; it cannot fail.
    let old = unsafe { libc::umask(!mode & 0o777) };
    let bound = bind();
    // SAFETY: as above, restoring the mask that was there.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Binds a Unix socket at a path `check_socket_path` accepted, with [`NBD_SOCKET_MODE`]: a stale
/// socket is replaced.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    check_socket_path("socket", path)?;
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    bind_with_mode(path, NBD_SOCKET_MODE, || UnixListener::bind(path))
        .with_context(|| format!("binding {}", path.display()))
}

/// Socket files this process created, removed when it stops (or fails to start).
#[derive(Default)]
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The shared state of the proxy, its migration state machines, and the control commands,
/// as the ownership record says: a destination (receiving, or holding a committed disk), or a
/// source (perhaps fenced by a hand-over). Binds nothing: [`run`] adds the listeners.
pub async fn assemble(config: &Config, opened: Opened) -> Arc<Control> {
    let Opened { disk, record_file, record, state, .. } = opened;
    let receiving = config.listen.is_some();
    let proxy = Arc::new(Proxy {
        disk,
        gate: Gate::new(Access::Open),
        record: record_file,
        state,
        events: Events::new(EVENT_BACKLOG),
        merger: Merger::default(),
        export: config.export.clone(),
        hot_threshold: config.hot_threshold,
        protection: config.protection.clone(),
        postcopy: Arc::default(),
        read_wait: config.read_wait,
    });
    proxy.postcopy.link.watch_abandonment(config.abandoned_after);
    let dest_record = match &record {
        Some(r @ Ownership::Destination { .. }) => Some(DestSession::restore(r).0),
        _ => None,
    };
    let incoming = match (receiving, dest_record) {
        (true, restored) => Some(Incoming::new(proxy.clone(), restored.unwrap_or_default())),
        (false, Some(restored)) => Some(Incoming::new(proxy.clone(), restored)),
        (false, None) => None,
    };
    let outgoing = Outgoing::spawn(proxy.clone(), if receiving { None } else { record.as_ref() }).await;
    Arc::new(Control { proxy, outgoing, incoming })
}

/// Everything the proxy listens on; the socket files it created go when it is dropped.
struct Listeners {
    unix: UnixListener,
    tcp: Option<TcpListener>,
    migration: Option<TcpListener>,
    control: Option<UnixListener>,
    _created: Created,
}

async fn bind(config: &Config) -> Result<Listeners> {
    let mut created = Created::default();
    let unix = bind_unix(&config.socket)?;
    created.0.push(config.socket.clone());
    let tcp = match config.tcp {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?),
        None => None,
    };
    let migration = match config.listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("binding migration listener {addr}"))?)
        }
        None => None,
    };
    let control = match &config.control {
        Some(path) => {
            check_socket_path("--control", path)?;
            let l = bind_with_mode(path, CONTROL_SOCKET_MODE, || qmp_proto::bind_control_socket(path))
                .with_context(|| format!("binding control socket {}", path.display()))?;
            created.0.push(path.clone());
            Some(l)
        }
        None => None,
    };
    Ok(Listeners { unix, tcp, migration, control, _created: created })
}

/// Serves the disk until SIGTERM or SIGINT, then drains connections and flushes.
pub async fn run(config: Config, opened: Opened) -> Result<()> {
    let disk = opened.disk.clone();
    let (migrated_away, export_read_only) = (opened.migrated_away.clone(), opened.export_read_only);
    let control = assemble(&config, opened).await;
    let proxy = control.proxy.clone();
    let mut listeners = bind(&config).await?;
    let mut live: Arc<dyn BlockBackend> =
        Arc::new(Guarded::new(disk.clone(), proxy.gate.clone(), proxy.postcopy.clone()));
    if export_read_only {
        live = Arc::new(ReadOnly(live));
    }
    let catalog = Catalog::new(config.export.clone(), disk.clone(), live, control.pull());
    log_serving(&config, &proxy, migrated_away.as_ref());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let (Some(listener), Some(incoming)) = (listeners.migration.take(), &control.incoming) {
        tracing::info!(
            listen = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            phase = %incoming.phase(),
            protection = config.protection.current().describe(),
            "waiting for an incoming migration"
        );
        tokio::spawn(incoming.clone().listen(listener, shutdown_rx.clone()));
    }
    let control_task =
        listeners.control.take().map(|listener| start_control(listener, &config, &control, shutdown_rx.clone()));
    if disk.mode() == Mode::Merging && !export_read_only {
        tracing::info!("resuming the merge interrupted by the last exit");
        let p = proxy.clone();
        tokio::task::spawn_blocking(move || p.start_merge()).await?.context("resuming the merge")?;
    }
    // NBD over TCP negotiates TLS when the proxy started with credentials; each client gets the
    // server identity in force when it connects (a reload replaces it for the next one).
    let nbd_tls = match (config.protection.current().tls, config.tcp) {
        (Some(creds), Some(_)) if config.protection.acceptor().is_none() => {
            bail!("--tcp with --tls-creds {}: no server-cert.pem there", creds.dir().display())
        }
        (Some(_), Some(_)) => true,
        _ => false,
    };
    // Every socket is bound and the control socket answers: a unit ordered after this one
    // (a VM) finds them.
    // The handlers are in place before READY: a stop right after it drains like any other.
    let signals = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    };
    crate::notify::notify("READY=1");
    let conns = serve_until_signal(
        &listeners,
        catalog,
        nbd_tls,
        &config.protection,
        config.max_connections,
        &shutdown_rx,
        signals,
    )
    .await?;
    crate::notify::notify("STOPPING=1");
    drop(listeners);
    let _ = shutdown_tx.send(true);
    if let Some(task) = control_task {
        let _ = task.await;
    }
    shut_down(conns, &disk).await
}

/// The start-up line, and a warning when the disk was migrated away for good.
fn log_serving(config: &Config, proxy: &Proxy, migrated_away: Option<&Away>) {
    let disk = &proxy.disk;
    tracing::info!(
        socket = %config.socket.display(),
        tcp = config.tcp.map(|a| a.to_string()).as_deref().unwrap_or("-"),
        export = %config.export,
        size = disk.size(),
        mode = disk.mode().as_str(),
        read_only = config.read_only,
        access = %proxy.gate.access(),
        disk_id = %proxy.state.id(),
        state = %proxy.state.dir().display(),
        "serving"
    );
    if let Some(away) = migrated_away {
        tracing::warn!(
            peer = %away.peer,
            session = %away.session,
            "this disk was migrated to {} (the migration completed), which owns it: served {}, writes refused; \
             `{}` drops its state once it is not needed",
            away.peer,
            if config.read_only { "read-only" } else { "fenced (--fenced)" },
            retire_command(config)
        );
    }
}

/// Serves the control socket until `shutdown`.
fn start_control(
    listener: UnixListener,
    config: &Config,
    control: &Arc<Control>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let greeting = Greeting::new(
        Version { major: 0, minor: 1, micro: 0 },
        format!("{} {}", control_api::GREETING_PACKAGE, env!("CARGO_PKG_VERSION")),
    );
    let handler: Arc<dyn qmp_proto::Handler> = Arc::new(ControlHandler(control.clone()));
    let events = control.proxy.events.sender().clone();
    let path = config.control.as_deref().map_or_else(String::new, |p| p.display().to_string());
    tracing::info!(control = %path, "control socket ready");
    tokio::spawn(qmp_proto::serve(listener, greeting, handler, events, shutdown))
}

/// The live export of a disk served `--read-only` but opened read-write: reads as the disk,
/// writes refused (and not advertised).
#[derive(Debug)]
struct ReadOnly(Arc<dyn BlockBackend>);

impl BlockBackend for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn caps(&self) -> Caps {
        self.0.caps().read_only()
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> std::io::Result<()> {
        self.0.read_append(out, len, offset)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }

    fn cache(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.cache(offset, len)
    }

    fn extents(&self, offset: u64, len: u64, max: usize) -> std::io::Result<Vec<Extent>> {
        self.0.extents(offset, len, max)
    }
}

/// How often warnings about a flood of connections that never got in are summed up: at most
/// one line of each kind per interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Connections refused because their listener's pool was full.
static REFUSED: logging::RateLimit = logging::RateLimit::new(WARN_INTERVAL);
/// Connections that ended before transmission (no TLS, no certificate, garbage, too slow).
static NOT_NEGOTIATED: logging::RateLimit = logging::RateLimit::new(WARN_INTERVAL);
/// Failed accepts (e.g. out of file descriptors).
static ACCEPT_FAILED: logging::RateLimit = logging::RateLimit::new(WARN_INTERVAL);

/// The connections of one listener: at most `max` at once, and the byte budget their requests
/// share.
struct Pool {
    listener: &'static str,
    slots: Arc<Semaphore>,
    max: usize,
    budget: SharedBudget,
}

impl Pool {
    fn new(listener: &'static str, max: usize, budget: SharedBudget) -> Self {
        Self { listener, slots: Arc::new(Semaphore::new(max)), max, budget }
    }

    /// A slot for a new connection from `peer`, or none (logged now and then) when all are taken.
    fn admit(&self, peer: &str) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            if let Some(suppressed) = REFUSED.hit() {
                tracing::warn!(
                    %peer,
                    listener = self.listener,
                    max_connections = self.max,
                    suppressed,
                    "too many NBD connections: refusing this one (more refusals within {WARN_INTERVAL:?} are \
                     counted, not logged)"
                );
            }
        }
        slot
    }
}

/// The signals the serving loop answers: TERM and INT stop it, HUP reloads the protection.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// SIGHUP: reads the protection's files again (see [`crate::protection`]).
fn reload_on_hangup(protection: &LiveProtection) {
    match protection.reload(None, None) {
        Ok(p) => tracing::info!(protection = p.describe(), "SIGHUP: protection reloaded"),
        Err(e) => tracing::error!("SIGHUP: {e:#}"),
    }
}

/// Accepts NBD connections until SIGTERM or SIGINT; returns the connections still running.
/// The Unix socket and the TCP listener each serve at most `max_connections` at once, so TCP
/// clients (authenticated or not) can never keep QEMU's Unix socket from getting in; beyond that
/// new connections are closed at once, and the others go on. All connections' requests share one
/// byte budget, of which TCP connections may hold part. TCP connections must negotiate TLS when
/// `nbd_tls` is set.
async fn serve_until_signal(
    l: &Listeners,
    catalog: Catalog,
    nbd_tls: bool,
    protection: &LiveProtection,
    max_connections: usize,
    shutdown: &watch::Receiver<bool>,
    mut signals: Signals,
) -> Result<JoinSet<()>> {
    let total = SharedBudget::new(TOTAL_IN_FLIGHT_BYTES);
    let unix_pool = Pool::new("unix", max_connections, total.clone());
    let tcp_pool = Pool::new("tcp", max_connections, total.capped(TCP_IN_FLIGHT_BYTES));
    let mut summaries = tokio::time::interval(WARN_INTERVAL);
    summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = signals.term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(conns) }
            _ = signals.int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(conns) }
            _ = signals.hup.recv() => {
                reload_on_hangup(protection);
                continue;
            }
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done { tracing::error!(error = %e, "connection task failed"); }
                continue;
            }
            _ = summaries.tick() => {
                summarize_suppressed();
                continue;
            }
            c = l.unix.accept() => c.map(|(s, _)| (Box::new(s) as Box<dyn Stream>, "unix".to_string(), false, &unix_pool)),
            c = accept_tcp(l.tcp.as_ref()) => c.map(|(s, addr)| {
                let _ = s.set_nodelay(true);
                (Box::new(s) as Box<dyn Stream>, addr.to_string(), nbd_tls, &tcp_pool)
            }),
        };
        let (stream, kind, needs_tls, pool) = match accepted {
            Ok(c) => c,
            Err(e) => {
                if let Some(suppressed) = ACCEPT_FAILED.hit() {
                    tracing::warn!(error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Each TLS client gets the server identity in force now; with none, it is refused
        // rather than served in clear.
        let tls = match (needs_tls, protection.acceptor()) {
            (false, _) => None,
            (true, Some(acceptor)) => Some(acceptor),
            (true, None) => {
                tracing::error!(peer = %kind, "NBD client over TCP refused: the protection in force has no server identity");
                continue;
            }
        };
        // Reap the connections that ended (their slots are free already).
        while let Some(done) = conns.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "connection task failed");
            }
        }
        let Some(slot) = pool.admit(&kind) else { continue };
        next_id += 1;
        let peer = format!("{kind}#{next_id}");
        let (catalog, rx, budget) = (catalog.clone(), shutdown.clone(), pool.budget.clone());
        conns.spawn(async move {
            let _slot = slot;
            let ended = crate::nbd::connection::serve_with(stream, tls, catalog, peer.clone(), rx, &budget).await;
            log_connection_end(&peer, ended);
        });
    }
}

/// How a connection ended, at the level it deserves: a client hanging up is ordinary, clients
/// that never got in are counted, anything else is a warning.
fn log_connection_end(peer: &str, ended: Result<()>) {
    match ended {
        Ok(()) => {}
        Err(e) if client_hung_up(&e) => tracing::debug!(%peer, "the client hung up: {e:#}"),
        Err(e) if e.downcast_ref::<NegotiationFailed>().is_some() => {
            if let Some(suppressed) = NOT_NEGOTIATED.hit() {
                tracing::warn!(
                    %peer,
                    suppressed,
                    "connection ended: {e:#} (more such within {WARN_INTERVAL:?} are counted, not logged)"
                );
            }
        }
        Err(e) => tracing::warn!(%peer, "connection ended: {e:#}"),
    }
}

/// One line for each kind of warning left out over the last interval, with the count.
fn summarize_suppressed() {
    if let Some(n) = REFUSED.overdue() {
        tracing::warn!(refused = n, "{n} more NBD connections refused (too many) since the last such message");
    }
    if let Some(n) = NOT_NEGOTIATED.overdue() {
        tracing::warn!(failed = n, "{n} more NBD connections ended before transmission since the last such message");
    }
    if let Some(n) = ACCEPT_FAILED.overdue() {
        tracing::warn!(failed = n, "{n} more accepts failed since the last such message");
    }
}

/// Whether a connection's error is only the client going away (closing its socket, in the middle
/// of a reply or a message): ordinary, logged at debug rather than as a warning.
fn client_hung_up(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            )
        })
    })
}

/// Lets in-flight requests finish (for at most [`DRAIN_TIMEOUT`]), then flushes the disk.
async fn shut_down(mut conns: JoinSet<()>, disk: &Arc<Disk>) -> Result<()> {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("connections still busy after {DRAIN_TIMEOUT:?}; closing them");
    }
    let d = disk.clone();
    tokio::task::spawn_blocking(move || d.flush())
        .await?
        .with_context(|| format!("flushing {}", disk.image_path().display()))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn accept_tcp(l: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}
