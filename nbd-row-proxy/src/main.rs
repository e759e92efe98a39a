//! `nbd-row-proxy`: an NBD server that sits between QEMU and a disk image, and moves the disk to
//! another host when the VM migrates.

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use nbd_row_proxy::{cli, lifecycle, server, tls};

/// File descriptors kept for the proxy itself (its files, listeners, control and migration
/// connections) when sizing the NBD connection cap to the descriptor limit.
const RESERVED_FDS: u64 = 64;

/// Raises the soft descriptor limit to the hard one and returns how many NBD connections fit
/// under it, so a flood of connections meets the cap before the limit (and never starves the
/// control socket or the migration).
fn fd_budget() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return usize::MAX;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    let budget = lim.rlim_cur.saturating_sub(RESERVED_FDS).max(1);
    usize::try_from(budget).unwrap_or(usize::MAX)
}

/// How long a merge still running at exit may hold up the process (it resumes on the next start).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);

/// Exit status of a usage error (clap's), an invalid `RUST_LOG`, or `tls-certs` refusing to replace
/// files.
const EXIT_USAGE: u8 = 2;

fn main() -> std::process::ExitCode {
    // `nbd-row-proxy --generate-docs DIR`: man pages and completions (scripts/package).
    if let Some(code) = cli_docs::hook(<cli::Cli as clap::CommandFactory>::command, &["row-migrate"]) {
        return code;
    }
    let cli = cli::Cli::parse();
    if let Err(e) = logging::init(cli.log_format, "info") {
        eprintln!("nbd-row-proxy: {e}");
        return std::process::ExitCode::from(EXIT_USAGE);
    }
    if let cli::Cmd::TlsCerts(a) = &cli.command {
        return tls_certs(a);
    }
    if let cli::Cmd::Retire(a) = &cli.command {
        return retire(a);
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-row-proxy: {}", logging::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `tls-certs`: a lab PKI, never over existing files unless `--force` (which keeps backups).
fn tls_certs(a: &cli::TlsCertsArgs) -> std::process::ExitCode {
    match tls::make_lab_pki_with(&a.dir, &a.hosts, a.force) {
        Ok(backups) => {
            for b in backups {
                println!("moved {} to {}", b.from.display(), b.to.display());
            }
            println!("wrote a lab CA and certificates for {} into {}", a.hosts.join(", "), a.dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e @ tls::TlsError::Exists { .. }) => {
            eprintln!("nbd-row-proxy: {e}");
            std::process::ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("nbd-row-proxy: {}", logging::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `retire`: drops the state of a disk migrated away for good; what it removed on stdout, a
/// refusal in one line on stderr (exit 1).
fn retire(a: &cli::RetireArgs) -> std::process::ExitCode {
    match lifecycle::retire(&a.request()) {
        Ok(done) => {
            for path in &done.removed {
                println!("removed {}", path.display());
            }
            let image = a.image.display();
            match (&done.why, a.delete_image) {
                (_, true) => {
                    println!(
                        "retired disk {}: its state entry {} and the image are gone",
                        done.id,
                        done.entry.display()
                    )
                }
                (lifecycle::Retirable::MigratedAway(away), false) => println!(
                    "retired disk {} (migrated to {}, session {}): merged {} blocks of its overlay into {image} and \
                     removed its state entry {}; {image} now holds the disk as it was handed over, a disk of its \
                     own: serve it, or receive into it",
                    done.id,
                    away.peer,
                    away.session,
                    done.merged_blocks,
                    done.entry.display()
                ),
                (lifecycle::Retirable::Incomplete { session }, false) => println!(
                    "retired disk {} (migration session {session} into it did not commit): removed its state entry \
                     {}; {image} holds part of that migration, not a consistent disk: receive into it, or serve \
                     it as it is",
                    done.id,
                    done.entry.display()
                ),
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nbd-row-proxy: {}", logging::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> Result<()> {
    let mut config = cli.validate()?;
    // The Unix socket and the TCP listener each have a pool of `max_connections`.
    let pools = 1 + usize::from(config.tcp.is_some());
    config.max_connections = config.max_connections.min((fd_budget() / pools).max(1));
    let opened = server::open_disk(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(server::run(config, opened));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}
