//! Listeners, connection tasks and graceful shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use qmp_proto::{Greeting, Version};
use row_store::Mode;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use crate::control::Control;
use crate::export::{Access, Catalog};
use migration_stream::Key;

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens and how it is controlled.
#[derive(Debug, Clone)]
pub struct Listen {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Optional TCP address.
    pub tcp: Option<String>,
    /// Optional control socket path.
    pub control: Option<PathBuf>,
    /// Default write-count threshold of the hot/cold split.
    pub hot_threshold: u32,
    /// Pre-shared key for migration sessions.
    pub key: Option<Arc<Key>>,
    /// `receive`: accept an incoming migration on this TCP address.
    pub incoming: Option<String>,
}

/// Binds a Unix socket, replacing a stale socket file but never a live one.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another server", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Serves the catalog until SIGTERM or SIGINT, then drains connections and flushes.
pub async fn run(catalog: Catalog, listen: Listen, access: watch::Sender<Access>) -> Result<()> {
    let unix = bind_unix(&listen.socket)?;
    let tcp = match &listen.tcp {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?),
        None => None,
    };
    tracing::info!(
        socket = %listen.socket.display(),
        tcp = listen.tcp.as_deref().unwrap_or("-"),
        export = %catalog.live().name,
        size = catalog.live().size(),
        mode = catalog.live().disk.mode().as_str(),
        "serving"
    );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (events, _) = broadcast::channel(1024);
    let disk = Arc::clone(&catalog.live().disk);
    let control = Control::new(
        disk.clone(),
        catalog.live().name.clone(),
        listen.hot_threshold,
        events.clone(),
        listen.key.clone(),
        access.subscribe(),
    );
    if let Some(addr) = &listen.incoming {
        let key = listen.key.clone().context("receive needs --auth-key-file")?;
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding migration listener {addr}"))?;
        tracing::info!(listen = %addr, "waiting for an incoming migration");
        tokio::spawn(crate::migration::dest::receive(disk.clone(), listener, key, access.clone(), events.clone(), shutdown_rx.clone()));
    }
    let mut control_task = None;
    if let Some(path) = &listen.control {
        let listener = qmp_proto::bind_control_socket(path).with_context(|| format!("binding control socket {}", path.display()))?;
        let greeting = Greeting::new(
            Version { major: 0, minor: 1, micro: 0 },
            concat!("nbd-row-proxy ", env!("CARGO_PKG_VERSION")),
        );
        let handler: Arc<dyn qmp_proto::Handler> = control.clone();
        control_task = Some(tokio::spawn(qmp_proto::serve(listener, greeting, handler, events.clone(), shutdown_rx.clone())));
        tracing::info!(control = %path.display(), "control socket ready");
    }
    if disk.mode() == Mode::Merging {
        tracing::info!("resuming the merge interrupted by the last exit");
        let control = control.clone();
        tokio::task::spawn_blocking(move || control.start_merge()).await?.map_err(|e| anyhow::anyhow!("{}", e.desc))?;
    }
    let mut conns = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done { tracing::error!(error = %e, "connection task failed"); }
                continue;
            }
            c = unix.accept() => c.map(|(s, _)| { let (r, w) = s.into_split(); (Box::new(r) as Reader, Box::new(w) as Writer, "unix".to_string()) }),
            c = accept_tcp(tcp.as_ref()) => c.map(|(s, addr)| {
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                (Box::new(r) as Reader, Box::new(w) as Writer, addr.to_string())
            }),
        };
        let (reader, writer, kind) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        let peer = format!("{kind}#{next_id}");
        let (catalog, rx) = (catalog.clone(), shutdown_rx.clone());
        conns.spawn(async move {
            if let Err(e) = crate::connection::serve(reader, writer, catalog, peer.clone(), rx).await {
                tracing::warn!(%peer, "connection ended: {e:#}");
            }
        });
    }
    drop(unix);
    drop(tcp);
    let _ = std::fs::remove_file(&listen.socket);
    let _ = shutdown_tx.send(true);
    if let Some(task) = control_task {
        let _ = task.await;
        if let Some(path) = &listen.control {
            let _ = std::fs::remove_file(path);
        }
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still busy after {DRAIN_TIMEOUT:?}; closing them");
    }
    tokio::task::spawn_blocking(move || disk.flush())
        .await?
        .with_context(|| format!("flushing {}", catalog.live().disk.image_path().display()))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

async fn accept_tcp(l: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}
