//! `nbd-row-proxy`: an NBD server that sits between QEMU and a disk image.

mod connection;
mod control;
mod export;
mod negotiation;
mod server;
mod transmission;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use row_store::{Disk, DiskOptions};

use crate::export::Catalog;

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
    match cli.command {
        Cmd::Serve(args) => {
            let options = DiskOptions { reserved: args.reserved, read_only: args.read_only };
            let disk = Disk::open(&args.image, options)
                .with_context(|| format!("opening disk {}", args.image.display()))?;
            let catalog = Catalog::new(args.export, Arc::new(disk), args.read_only);
            let listen = server::Listen {
                socket: args.socket,
                tcp: args.tcp,
                control: args.control,
                hot_threshold: args.hot_threshold,
            };
            let result = runtime.block_on(server::run(catalog, listen));
            // A merge still running on the blocking pool is resumable: do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
            result
        }
    }
}
