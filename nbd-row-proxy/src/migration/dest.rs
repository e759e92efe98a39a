//! Destination side of a disk migration: `nbd-row-proxy receive`.
//!
//! It accepts one authenticated session at a time and writes what arrives into the image.
//! The NBD export exists from the start (QEMU opens its drive before the migration ends), but
//! until the source's commit, reads wait and writes are refused. A session that fails, is
//! discarded, or breaks before the commit leaves the export in that state and the next session
//! starts over; after the commit and the source's `Done`, this is an ordinary `serve`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use migration_stream::{Key, Message};
use qmp_proto::Event;
use row_store::{Disk, BLOCK_SIZE};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

use super::{send, FrameReader};
use crate::export::Access;

/// How a session ended without an error.
enum SessionEnd {
    /// Committed and complete: the disk is ours.
    Done,
    /// The source threw the session away.
    Discarded(String),
}

/// Accepts sessions until one completes, then returns (the server goes on serving).
pub async fn receive(
    disk: Arc<Disk>,
    listener: TcpListener,
    key: Arc<Key>,
    access: watch::Sender<Access>,
    events: broadcast::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let emit = |name: &str, data| {
        let _ = events.send(Event::now(name, data));
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a migration connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tracing::info!(%peer, "incoming migration connection");
        let _ = stream.set_nodelay(true);
        super::set_dead_peer_timeouts(&stream);
        let result = tokio::select! {
            _ = shutdown.changed() => return,
            r = session(&disk, stream, &key, &access, &emit) => r,
        };
        match result {
            Ok(SessionEnd::Done) => {
                tracing::info!(%peer, "incoming migration complete: serving the disk");
                emit("MIGRATION_INCOMING", json!({ "state": "completed" }));
                return;
            }
            Ok(SessionEnd::Discarded(reason)) => {
                access.send_replace(Access::Incoming);
                tracing::warn!(%peer, "the source discarded the migration: {reason}");
                emit("MIGRATION_INCOMING", json!({ "state": "discarded", "reason": reason }));
            }
            Err(e) => {
                access.send_replace(Access::Incoming);
                tracing::warn!(%peer, "incoming migration failed: {e:#}");
                emit("MIGRATION_INCOMING", json!({ "state": "failed", "error": format!("{e:#}") }));
            }
        }
    }
}

async fn session(
    disk: &Arc<Disk>,
    stream: TcpStream,
    key: &Key,
    access: &watch::Sender<Access>,
    emit: &impl Fn(&str, serde_json::Value),
) -> Result<SessionEnd> {
    let (rd, mut wr) = stream.into_split();
    let mut reader = FrameReader::new(rd);
    let server_nonce = migration_stream::nonce();
    send(&mut wr, &Message::ServerHello { version: migration_stream::VERSION, nonce: server_nonce }).await?;
    let Message::ClientHello { params, nonce: client_nonce, mac, .. } =
        reader.next_within(Duration::from_secs(10), "session request").await?
    else {
        bail!("the peer did not ask for a migration session");
    };
    let want = migration_stream::client_mac(key, &server_nonce, &client_nonce, &params);
    let refusal = if !migration_stream::verify(&want, &mac) {
        Some("authentication failed (different --auth-key-file?)".to_string())
    } else if params.disk_size != disk.size() {
        Some(format!("disk size differs: the source has {} bytes, this image {}", params.disk_size, disk.size()))
    } else if params.block_size as u64 != BLOCK_SIZE {
        Some(format!("block size {} is not supported", params.block_size))
    } else {
        None
    };
    if let Some(reason) = refusal {
        let _ = send(&mut wr, &Message::Reject { reason: reason.clone() }).await;
        bail!("refused the session: {reason}");
    }
    send(&mut wr, &Message::Accept { mac: migration_stream::server_mac(key, &server_nonce, &client_nonce, &params) }).await?;
    tracing::info!(strategy = params.strategy.as_str(), size = params.disk_size, "migration session accepted");
    emit("MIGRATION_INCOMING", json!({ "state": "receiving", "strategy": params.strategy.as_str() }));
    let result = receive_frames(disk, &mut reader, &mut wr, access, emit).await;
    if let Err(e) = &result {
        // Tell the source why, if it still listens.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            send(&mut wr, &Message::Error { message: format!("{e:#}") }),
        )
        .await;
    }
    result
}

async fn receive_frames(
    disk: &Arc<Disk>,
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    access: &watch::Sender<Access>,
    emit: &impl Fn(&str, serde_json::Value),
) -> Result<SessionEnd> {
    let d = disk.clone();
    tokio::task::spawn_blocking(move || d.reset_image()).await??;
    let mut committed = false;
    let mut background_sync: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
    let size = disk.size();
    loop {
        let Some(msg) = reader.next().await? else {
            if committed {
                return Ok(SessionEnd::Done);
            }
            bail!("the source closed the connection before committing");
        };
        match msg {
            Message::Data { offset, codec, logical_len, payload } if !committed => {
                if offset.checked_add(logical_len as u64).is_none_or(|end| end > size) {
                    bail!("data extent at {offset}+{logical_len} lies outside the {size}-byte disk");
                }
                let data = migration_stream::decode_block(codec, &payload, logical_len).context("bad data frame")?;
                tokio::task::block_in_place(|| disk.write_at(&data, offset, false))
                    .with_context(|| format!("writing {logical_len} bytes at {offset} to the image"))?;
            }
            Message::Zero { offset, len } if !committed => {
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    bail!("zero extent at {offset}+{len} lies outside the {size}-byte disk");
                }
                tokio::task::block_in_place(|| disk.write_zeroes(offset, len, true, false, false))
                    .with_context(|| format!("zeroing {len} bytes at {offset}"))?;
            }
            Message::RoundBegin { round, kind } if !committed => {
                tracing::info!(round, ?kind, "round arriving");
                emit("MIGRATION_INCOMING", json!({ "state": "receiving", "round": round }));
            }
            Message::RoundEnd { .. } if !committed => {
                // Write back what this round brought while the next one is on its way, so the
                // commit (which the paused VM waits for) only has the final round left to sync.
                if background_sync.as_ref().is_none_or(|h| h.is_finished()) {
                    if let Some(h) = background_sync.take() {
                        h.await?.context("syncing the image")?;
                    }
                    let d = disk.clone();
                    background_sync = Some(tokio::task::spawn_blocking(move || d.flush()));
                }
            }
            Message::Commit if !committed => {
                if let Some(h) = background_sync.take() {
                    h.await?.context("syncing the image")?;
                }
                let d = disk.clone();
                tokio::task::spawn_blocking(move || d.flush()).await?.context("syncing the image")?;
                access.send_replace(Access::Open);
                committed = true;
                send(wr, &Message::Committed).await?;
                tracing::info!("migration committed: the image is durable and writable");
                emit("MIGRATION_INCOMING", json!({ "state": "committed" }));
            }
            Message::Discard { reason } => return Ok(SessionEnd::Discarded(reason)),
            Message::Done if committed => return Ok(SessionEnd::Done),
            other => bail!("unexpected {} message in the migration stream", other.name()),
        }
    }
}
