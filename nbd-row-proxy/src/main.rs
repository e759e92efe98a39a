//! `nbd-row-proxy`: an NBD server that sits between QEMU and a disk image, and moves the disk to
//! another host when the VM migrates.

mod cli;
mod control;
mod migration;
mod nbd;
mod ownership;
mod proxy;
mod server;
mod tls;

use std::time::Duration;

use anyhow::Result;
use clap::Parser;

/// How long a merge still running at exit may hold up the process (it resumes on the next start).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-row-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> Result<()> {
    if let cli::Cmd::TlsCerts(a) = &cli.command {
        tls::make_lab_pki(&a.dir, &a.hosts)?;
        println!("wrote a lab CA and certificates for {} into {}", a.hosts.join(", "), a.dir.display());
        return Ok(());
    }
    let config = cli.validate()?;
    let (disk, record_file, record) = server::open_disk(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(server::run(config, disk, record_file, record));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}
