//! `nbd-row-proxy`: an NBD server that sits between QEMU and a disk image.

mod connection;
mod control;
mod export;
mod migration;
mod negotiation;
mod server;
mod transmission;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use row_store::{Disk, DiskOptions};

use crate::export::{Access, Catalog};

#[derive(Debug, Parser)]
#[command(name = "nbd-row-proxy", version, about = "NBD server for live migration of a VM with its local disk")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve a raw image over NBD.
    Serve(ServeArgs),
    /// Receive a disk by migration, serving it over NBD from the start (reads wait for the
    /// commit); afterwards an ordinary `serve` of the image.
    Receive(ReceiveArgs),
}

#[derive(Debug, clap::Args)]
struct ReceiveArgs {
    /// TCP address to accept the migration on, e.g. 0.0.0.0:10810.
    #[arg(long)]
    listen: String,
    /// How long an NBD read waits for the migration to commit before failing with EIO.
    /// Keep it short: QEMU reads sector 0 synchronously while it sets up a virtio disk, and
    /// its monitor is stuck for as long as that read waits.
    #[arg(long, default_value = "2", value_name = "SECONDS")]
    read_wait: f64,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Raw disk image (file or block device).
    #[arg(long)]
    image: PathBuf,
    /// Unix socket to listen on (QEMU: file=nbd+unix:///NAME?socket=PATH).
    #[arg(long)]
    socket: PathBuf,
    /// Also listen on this TCP address, e.g. 127.0.0.1:10809.
    #[arg(long)]
    tcp: Option<String>,
    /// Export name; the empty name selects it too.
    #[arg(long, default_value = "")]
    export: String,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Reserved file that receives writes while ROW is on (default: IMAGE.row).
    #[arg(long)]
    reserved: Option<PathBuf>,
    /// Control socket (QMP-shaped JSON, mode 0600) for row-start, row-stop, query-status, ...
    #[arg(long)]
    control: Option<PathBuf>,
    /// Blocks written at least this many times count as hot (high-frequency).
    #[arg(long, default_value_t = 2)]
    hot_threshold: u32,
    /// Pre-shared key (a file, mode 0600, at least 16 bytes) that authenticates migrations.
    #[arg(long)]
    auth_key_file: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-row-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (args, incoming, read_wait) = match cli.command {
        Cmd::Serve(args) => (args, None, 0.0),
        Cmd::Receive(r) => (r.serve, Some(r.listen), r.read_wait),
    };
    {
        {
            let options = DiskOptions {
                reserved: args.reserved,
                read_only: args.read_only,
                discard_overlay: incoming.is_some(),
            };
            let disk = Disk::open(&args.image, options)
                .with_context(|| format!("opening disk {}", args.image.display()))?;
            let key = match &args.auth_key_file {
                Some(path) => Some(Arc::new(migration_stream::Key::from_file(path).with_context(|| format!("reading key {}", path.display()))?)),
                None => None,
            };
            let initial = if incoming.is_some() { Access::Incoming } else { Access::Open };
            let (access, access_rx) = tokio::sync::watch::channel(initial);
            let read_wait = std::time::Duration::try_from_secs_f64(read_wait).context("--read-wait")?;
            let catalog = Catalog::new(args.export, Arc::new(disk), args.read_only, access_rx, read_wait);
            let listen = server::Listen {
                socket: args.socket,
                tcp: args.tcp,
                control: args.control,
                hot_threshold: args.hot_threshold,
                key,
                incoming,
            };
            let result = runtime.block_on(server::run(catalog, listen, access));
            // A merge still running on the blocking pool is resumable: do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            result
        }
    }
}
