//! The real server code driven in memory, for the property tests and the fuzz targets: a proxy
//! assembled from its command line without its listeners, whose NBD connections, migration
//! connections and control connections then run over any stream a test hands them.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use row_store::{BlockBackend, Disk};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::cli::{Cli, Config};
use crate::control::{Control, ControlHandler};
use crate::nbd::export::Catalog;
use crate::ownership::Guarded;
use crate::server;

/// A proxy as `nbd-row-proxy ARGS` would run, minus its sockets.
pub struct Lab {
    /// Its state and control commands.
    pub control: Arc<Control>,
    /// Its configuration.
    pub config: Config,
    /// Its disk.
    pub disk: Arc<Disk>,
}

impl Lab {
    /// Opens the disk and assembles the proxy `args` describe (the command line without the
    /// program name, e.g. `["receive", "--image", ...]`); sockets are validated, never bound.
    pub async fn start(args: &[&str]) -> Result<Self> {
        let cli = Cli::try_parse_from(std::iter::once("nbd-row-proxy").chain(args.iter().copied()))?;
        let config = cli.validate()?;
        let opened = server::open_disk(&config)?;
        let disk = opened.disk.clone();
        let control = server::assemble(&config, opened).await;
        Ok(Self { control, config, disk })
    }

    /// The NBD exports of the disk, the live one behind the write gate, as `run` serves them.
    pub fn catalog(&self) -> Catalog {
        let proxy = &self.control.proxy;
        let live: Arc<dyn BlockBackend> =
            Arc::new(Guarded::new(self.disk.clone(), proxy.gate.clone(), proxy.postcopy.clone()));
        self.catalog_over(live)
    }

    /// The same exports with the live one served by `backend` (e.g. a [`row_store::MemDisk`]).
    pub fn catalog_over(&self, backend: Arc<dyn BlockBackend>) -> Catalog {
        Catalog::new(self.config.export.clone(), self.disk.clone(), backend, self.control.pull())
    }

    /// One incoming migration connection over `stream`: the handshake, then the session.
    pub async fn incoming<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
    {
        let incoming = self.control.incoming.clone().context("this proxy does not receive migrations")?;
        let (params, reader, wr) = incoming.handshake(stream).await?;
        incoming.connection(params, reader, wr).await
    }

    /// Runs a control command as the control socket would (`arguments`: a JSON object).
    pub async fn execute(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, qmp_proto::CommandError> {
        use qmp_proto::Handler;
        let serde_json::Value::Object(arguments) = arguments else {
            return Err(qmp_proto::CommandError::generic("arguments must be an object"));
        };
        ControlHandler(self.control.clone()).handle(command, arguments).await
    }

    /// One control-socket client on `stream`, served until it closes.
    pub async fn control_client(&self, stream: UnixStream) {
        let greeting = qmp_proto::Greeting::new(qmp_proto::Version { major: 0, minor: 1, micro: 0 }, "harness");
        let handler: Arc<dyn qmp_proto::Handler> = Arc::new(ControlHandler(self.control.clone()));
        let events = self.control.proxy.events.sender().clone();
        let (_stop, shutdown) = watch::channel(false);
        qmp_proto::serve_connection(stream, &greeting, handler, events, shutdown).await;
    }
}

/// Sends `input` to a fresh NBD connection on `catalog` (then closes the sending side) and
/// returns everything the server sent until it closed the connection.
pub async fn nbd_exchange(catalog: Catalog, tls: Option<TlsAcceptor>, input: &[u8]) -> Vec<u8> {
    let (client, server_end) = tokio::io::duplex(256 << 10);
    let (_stop, shutdown) = watch::channel(false);
    let server =
        tokio::spawn(crate::nbd::connection::serve(Box::new(server_end), tls, catalog, "harness".into(), shutdown));
    let (mut rd, mut wr) = tokio::io::split(client);
    let send = async {
        // The server may close first (a refused option, a bad request): the rest is not read.
        if wr.write_all(input).await.is_ok() {
            let _ = wr.shutdown().await;
        }
    };
    let receive = async {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let ((), out) = tokio::join!(send, receive);
    let _ = server.await;
    out
}
