//! The destination's live export while the disk arrives: reads fetched from the source,
//! writes that claim the disk, and requests that wait for a post-copy's missing blocks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use row_store::{BlockBackend, BLOCK_SIZE};

use crate::migration::residual::{blocks_of, read_local};
use crate::nbd::export::{Attachment, Pull, PullFuture};
use crate::ownership::Access;
use crate::proxy::Proxy;
use nbd_proto::Command;

/// What the requests of a destination's live export wait for: before the commit a read is
/// answered with the source's current data (or the image's while no migration ever touched
/// it; once one did, the image is a partial copy and a read the source cannot answer fails);
/// during a post-copy a request waits for the missing blocks it reads or partly overwrites.
/// Before any commit, a write asks the source for the disk (see [`claim`]).
#[derive(Debug)]
pub struct DestPull(pub Arc<Proxy>);

impl Pull for DestPull {
    fn before(&self, command: Command, offset: u64, len: u64) -> Option<PullFuture> {
        let proxy = &self.0;
        let wait = proxy.read_wait;
        if proxy.gate.access() == Access::Incoming {
            if matches!(command, Command::Write | Command::WriteZeroes | Command::Trim) {
                return claim(proxy.clone(), command, offset, len);
            }
            if command != Command::Read {
                return None;
            }
            let proxy = proxy.clone();
            return Some(Box::pin(async move {
                if let Some(data) = proxy.postcopy.link.read_now(offset, len, wait).await {
                    return Ok(Some(data));
                }
                if proxy.gate.access() != Access::Incoming {
                    // Committed meanwhile (a claimed hand-over ends its session at once, answers
                    // still in flight with it): the read runs as any after the commit.
                    return match DestPull(proxy.clone()).before(command, offset, len) {
                        Some(wait) => wait.await,
                        None => Ok(None),
                    };
                }
                if proxy.postcopy.link.partial() {
                    // The guest may run here (a manager migrated it): never a stale block.
                    return Err(std::io::Error::other(
                        "the disk is still at the migration source, which does not answer; this host's copy is partial",
                    ));
                }
                let disk = proxy.disk.clone();
                tokio::task::spawn_blocking(move || read_local(&disk, offset, len))
                    .await
                    .map_err(std::io::Error::other)?
                    .map(Some)
            }));
        }
        let residual = proxy.postcopy.residual()?;
        residual.guest_request(&proxy.postcopy.link);
        let (first, last) = blocks_of(offset, len);
        let waits: Vec<(u64, u64)> = match command {
            Command::Read => vec![(first, last)],
            // A write waits only for the blocks it covers in part (the rest it replaces).
            Command::Write | Command::WriteZeroes | Command::Trim => {
                let end = offset + len;
                let mut edges = Vec::new();
                if !offset.is_multiple_of(BLOCK_SIZE) {
                    edges.push((first, first + 1));
                }
                if !end.is_multiple_of(BLOCK_SIZE) && end != proxy.disk.size() && last > first {
                    edges.push((last - 1, last));
                }
                edges
            }
            _ => return None,
        };
        let waits: Vec<(u64, u64)> =
            waits.into_iter().filter(|&(a, b)| residual.any_missing(a * BLOCK_SIZE, (b - a) * BLOCK_SIZE)).collect();
        if waits.is_empty() {
            return None;
        }
        let proxy = proxy.clone();
        Some(Box::pin(async move {
            for (a, b) in waits {
                residual.wait_held(&proxy.postcopy.link, a, b, wait).await?;
            }
            Ok(None)
        }))
    }

    /// Counts the live export's clients for the abandonment watch (see `FetchLink`).
    fn attach(&self) -> Option<Attachment> {
        let proxy = self.0.clone();
        proxy.postcopy.link.client_attached();
        let since = Instant::now();
        Some(Attachment::new(move || proxy.postcopy.link.client_detached(since.elapsed())))
    }
}

/// How long a write before the commit waits for an armed source to hand the disk over (its
/// final round and the commit; what is left comes by post-copy).
pub const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// A write while the disk is still arriving: this host's guest runs (a VM manager migrated it,
/// so the source QEMU is inactive). Asks the source for the disk and waits for the commit;
/// the write then goes on as the first write after it. Fails (EPERM) when no session is up,
/// when the source refuses (it is not armed), or after [`CLAIM_WAIT`].
fn claim(proxy: Arc<Proxy>, command: Command, offset: u64, len: u64) -> Option<PullFuture> {
    let refused_now = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    Some(Box::pin(async move {
        let Some(mut refused) = proxy.postcopy.link.claim() else {
            return Err(refused_now("the disk is still being migrated to this host".into()));
        };
        let mut access = proxy.gate.watch();
        let handed_over = async {
            loop {
                if *access.borrow_and_update() != Access::Incoming {
                    return Ok(());
                }
                tokio::select! {
                    changed = access.changed() => if changed.is_err() {
                        return Err(refused_now("shutting down".into()));
                    },
                    changed = refused.changed() => {
                        let reason = refused.borrow_and_update().clone();
                        match (changed, reason) {
                            (Err(_), _) => return Err(refused_now("shutting down".into())),
                            (Ok(()), Some(why)) => {
                                return Err(refused_now(format!("the source did not hand the disk over: {why}")))
                            }
                            (Ok(()), None) => {}
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(CLAIM_WAIT, handed_over).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(refused_now(format!("the source did not hand the disk over within {CLAIM_WAIT:?}"))),
        }
        // Committed: the write is now a post-copy's first request (it starts the push, and
        // waits for a missing block it covers in part).
        match DestPull(proxy).before(command, offset, len) {
            Some(wait) => wait.await,
            None => Ok(None),
        }
    }))
}
