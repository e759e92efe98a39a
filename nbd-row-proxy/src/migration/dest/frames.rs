//! One connection's frames at the destination: the rounds before the commit, the post-copy's
//! data after it (into the residual), and the session's control messages.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use control_api::{IncomingData, IncomingPhase};
use migration_session::{BlockSet, SessionId};
use migration_stream::Message;
use row_store::{BlockBackend, ZeroFlags, BLOCK_SIZE};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use super::Incoming;
use crate::migration::residual::{blocks_of, Residual};
use crate::migration::transport::{Reader, Writer};
use crate::migration::{last_word, send, FrameReader, SESSION_IDLE_TIMEOUT};

/// What a connection's frames build up between them.
struct Received {
    session: SessionId,
    /// The disk's size, which every extent must lie within.
    size: u64,
    /// The write-back of the previous rounds, running while the next one arrives.
    background_sync: Option<JoinHandle<std::io::Result<()>>>,
    /// What a post-copy switchover leaves at the source.
    missing: BlockSet,
}

/// Whether the connection goes on after a frame.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

impl Incoming {
    pub(super) async fn frames(
        self: &Arc<Self>,
        session: SessionId,
        reader: &mut FrameReader<Reader>,
        wr: &mut Writer,
    ) -> Result<()> {
        let link = &self.proxy.postcopy.link;
        let (generation, mut fetches) = link.attach();
        if let Some(r) = self.proxy.postcopy.residual() {
            r.link_changed();
        }
        let result = self.frames_on(session, reader, wr, &mut fetches).await;
        link.detach(generation);
        result
    }

    async fn frames_on(
        self: &Arc<Self>,
        session: SessionId,
        reader: &mut FrameReader<Reader>,
        wr: &mut Writer,
        fetches: &mut UnboundedReceiver<Message>,
    ) -> Result<()> {
        let size = self.proxy.disk.size();
        let mut st = Received { session, size, background_sync: None, missing: BlockSet::new() };
        loop {
            let Some(msg) = next_frame(reader, wr, fetches).await? else {
                return match self.phase() {
                    IncomingPhase::Committed | IncomingPhase::Owner => Ok(()),
                    _ => Err(anyhow!("the source closed the connection before committing")),
                };
            };
            let residual = self.residual_for(session, &msg)?;
            let flow = match msg {
                Message::Data { .. } | Message::Zero { .. } | Message::Fetched { .. } | Message::Missing { .. } => {
                    self.receive_frame(&mut st, msg, residual.as_deref())?;
                    Flow::Continue
                }
                other => self.on_control(&mut st, other, wr).await?,
            };
            if flow == Flow::End {
                return Ok(());
            }
        }
    }

    /// Where data goes: the image before the commit, the post-copy's residual after it; data
    /// (or a round, or a missing list) the session's phase does not take fails the connection.
    fn residual_for(&self, session: SessionId, msg: &Message) -> Result<Option<Arc<Residual>>> {
        let (accepts, held) = {
            let m = self.lock();
            (m.accepts_data(session), m.session() == Some(session))
        };
        let Err(refusal) = accepts else { return Ok(None) };
        Ok(match (self.proxy.postcopy.residual(), msg) {
            (Some(r), Message::Data { .. } | Message::Zero { .. } | Message::Fetched { .. }) if held => Some(r),
            // The post-copy push comes as a round.
            (Some(_), Message::RoundBegin { .. } | Message::RoundEnd { .. }) if held => None,
            (
                _,
                Message::Data { .. }
                | Message::Zero { .. }
                | Message::Missing { .. }
                | Message::RoundBegin { .. }
                | Message::RoundEnd { .. },
            ) => Err(refusal)?,
            _ => None,
        })
    }

    /// A frame of data: written to the image, or (`residual`) filled into the post-copy's
    /// residual; a missing list is kept for the commit.
    fn receive_frame(&self, st: &mut Received, msg: Message, residual: Option<&Residual>) -> Result<()> {
        let (disk, size) = (&self.proxy.disk, st.size);
        match msg {
            Message::Data { offset, codec, logical_len, payload } => {
                if offset.checked_add(logical_len as u64).is_none_or(|end| end > size) {
                    bail!("data extent at {offset}+{logical_len} lies outside the {size}-byte disk");
                }
                let data = migration_stream::decode_block(codec, &payload, logical_len).context("bad data frame")?;
                tokio::task::block_in_place(|| match residual {
                    Some(r) => r.receive(offset, &data),
                    None => disk.write_at(&data, offset, false),
                })
                .with_context(|| format!("writing {logical_len} bytes at {offset} to the image"))?;
            }
            Message::Zero { offset, len } => {
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    bail!("zero extent at {offset}+{len} lies outside the {size}-byte disk");
                }
                let flags = ZeroFlags { may_punch: true, ..ZeroFlags::default() };
                tokio::task::block_in_place(|| match residual {
                    Some(r) => r.receive_zero(offset, len),
                    None => disk.write_zeroes(offset, len, flags),
                })
                .with_context(|| format!("zeroing {len} bytes at {offset}"))?;
            }
            Message::Missing { runs } => {
                for (offset, len) in runs {
                    let end = offset.checked_add(len).filter(|end| *end <= size);
                    if end.is_none() || !offset.is_multiple_of(BLOCK_SIZE) {
                        bail!("missing range at {offset}+{len} is not a range of blocks of the {size}-byte disk");
                    }
                    let (first, last) = blocks_of(offset, len);
                    st.missing.insert(first, last);
                }
            }
            Message::Fetched { id, offset, codec, logical_len, payload } => {
                if offset.checked_add(logical_len as u64).is_none_or(|end| end > size) {
                    bail!("fetched extent at {offset}+{logical_len} lies outside the {size}-byte disk");
                }
                let data = migration_stream::decode_block(codec, &payload, logical_len).context("bad fetched frame")?;
                if let Some(r) = residual {
                    tokio::task::block_in_place(|| r.receive(offset, &data))
                        .with_context(|| format!("writing {logical_len} fetched bytes at {offset}"))?;
                }
                self.proxy.postcopy.link.answered(id, data);
            }
            other => bail!("unexpected {} message among the data", other.name()),
        }
        Ok(())
    }

    /// A control message: round boundaries, the commit, the end of the post-copy, the end of
    /// the session.
    async fn on_control(self: &Arc<Self>, st: &mut Received, msg: Message, wr: &mut Writer) -> Result<Flow> {
        let session = st.session;
        match msg {
            Message::RoundBegin { round, kind } => {
                tracing::info!(round, ?kind, "round arriving");
                self.emit(IncomingData { round: Some(round), ..self.data() });
            }
            Message::RoundEnd { .. } => self.round_ended(st).await?,
            Message::Commit => self.committing(st, wr).await?,
            Message::PushDone => self.push_done(session, wr).await?,
            Message::Discard { reason } => {
                match self.blocking(move |me| me.apply(|m| m.discard(session))).await {
                    Ok(_) => {
                        tracing::warn!(%session, "the source discarded the migration: {reason}");
                        self.emit(IncomingData { reason: Some(reason), ..self.data() });
                    }
                    Err(e) => {
                        tracing::warn!(%session, "refused the source's discard: {e:#}");
                        last_word(wr, &Message::Error { message: format!("{e:#}") }).await;
                    }
                }
                return Ok(Flow::End);
            }
            Message::Keepalive => {}
            Message::ClaimRefused { reason } => {
                tracing::warn!(%session, "the source refused to hand the disk over on a write here: {reason}");
                self.proxy.postcopy.link.claim_refused(reason);
            }
            Message::Done => {
                if self.proxy.postcopy.residual().is_some() {
                    bail!("the source said done while the post-copy is still running");
                }
                self.blocking(move |me| me.apply(|m| m.done(session))).await?;
                tracing::info!(%session, "incoming migration complete: this host owns the disk");
                self.emit(self.data());
                return Ok(Flow::End);
            }
            other => bail!("unexpected {} message in the migration stream", other.name()),
        }
        Ok(Flow::Continue)
    }

    /// Writes back what a round brought while the next one is on its way, so the commit (which
    /// the paused VM waits for) only has the final round left to sync.
    async fn round_ended(&self, st: &mut Received) -> Result<()> {
        if st.background_sync.as_ref().is_none_or(|h| h.is_finished()) {
            if let Some(h) = st.background_sync.take() {
                h.await?.context("syncing the image")?;
            }
            let d = self.proxy.disk.clone();
            st.background_sync = Some(tokio::task::spawn_blocking(move || d.flush()));
        }
        Ok(())
    }

    /// The source's commit: everything durable, the residual recorded, then `Committed`.
    async fn committing(self: &Arc<Self>, st: &mut Received, wr: &mut Writer) -> Result<()> {
        if let Some(h) = st.background_sync.take() {
            h.await?.context("syncing the image")?;
        }
        let session = st.session;
        let residual = std::mem::take(&mut st.missing);
        let postcopy = !residual.is_empty();
        let blocks = residual.blocks();
        self.commit(session, residual).await?;
        send(wr, &Message::Committed).await?;
        if postcopy {
            tracing::info!(%session, blocks, "migration committed with a post-copy: the disk is served read-write, missing blocks come from the source");
        } else {
            tracing::info!(%session, "migration committed: the image is durable and served read-write");
        }
        self.emit(self.data());
        Ok(())
    }

    /// The push is over: once every block is here durably, `Holds`.
    async fn push_done(self: &Arc<Self>, session: SessionId, wr: &mut Writer) -> Result<()> {
        let Some(r) = self.proxy.postcopy.residual() else {
            // Already complete (a resumed session): say so again.
            return send(wr, &Message::Holds).await.map(drop);
        };
        self.blocking(move |me| -> Result<()> {
            r.finish()?;
            me.proxy.postcopy.set(None);
            Ok(())
        })
        .await?;
        send(wr, &Message::Holds).await?;
        tracing::info!(%session, "post-copy complete: every block is here, durably");
        self.emit(self.data());
        Ok(())
    }
}

/// The source's next frame, sending the fetches of this host's reads (ahead of anything else)
/// while waiting; `None` at the end of the stream.
async fn next_frame(
    reader: &mut FrameReader<Reader>,
    wr: &mut Writer,
    fetches: &mut UnboundedReceiver<Message>,
) -> Result<Option<Message>> {
    loop {
        let next = tokio::select! {
            biased;
            Some(fetch) = fetches.recv() => {
                send(wr, &fetch).await?;
                continue;
            }
            next = tokio::time::timeout(SESSION_IDLE_TIMEOUT, reader.next()) => next,
        };
        return next.map_err(|_| anyhow!("the source sent nothing for {SESSION_IDLE_TIMEOUT:?}"))?;
    }
}
