//! What one proxy process holds for its disk, shared by the control commands and the migration
//! tasks: the disk, its write gate and ownership record, the event stream, and the merge back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_api::{
    ErrorData, Event, RowMergeFailed, RowMergeProgress, RowMergeProgressData, RowMergeStarted, RowMergeStartedData,
    RowStopped, RowStoppedData,
};
use row_store::{Disk, StoreError};
use tokio::sync::{broadcast, watch};

use crate::ownership::{Gate, RecordFile};
use crate::protection::LiveProtection;
use crate::sync;

/// How often a running merge reports progress.
const MERGE_PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The control socket's event stream, typed by `control_api`.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<qmp_proto::Event>,
}

impl Events {
    /// A stream keeping `capacity` events for slow clients.
    pub fn new(capacity: usize) -> Self {
        Self { tx: broadcast::channel(capacity).0 }
    }

    /// The sender the QMP server fans out from.
    pub fn sender(&self) -> &broadcast::Sender<qmp_proto::Event> {
        &self.tx
    }

    /// Sends event `E` with `data` to every subscribed client.
    pub fn emit<E: Event>(&self, data: E::Data) {
        let value = serde_json::to_value(data).expect("event data serialises");
        let _ = self.tx.send(qmp_proto::Event::now(E::NAME, value));
    }
}

/// Why a merge back failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MergeError {
    /// The store failed (the merge resumes on the next `row-stop` or restart).
    #[error("{0}")]
    Store(Arc<str>),
    /// The merge task ended without an outcome (the proxy is stopping).
    #[error("the merge task ended")]
    Ended,
}

impl From<StoreError> for MergeError {
    fn from(e: StoreError) -> Self {
        Self::Store(format!("{:#}", anyhow::Error::from(e)).into())
    }
}

/// The outcome of a merge: `None` while it runs, then its error if it failed.
pub type MergeOutcome = watch::Receiver<Option<Result<(), MergeError>>>;

/// The merge back into the image, at most one at a time.
#[derive(Debug, Default)]
pub struct Merger {
    running: Mutex<Option<MergeOutcome>>,
    meter: Mutex<Option<MergeMeter>>,
}

/// How far the running merge is, for `query-status`.
#[derive(Debug, Clone, Copy)]
struct MergeMeter {
    started: Instant,
    merged_blocks: u64,
    total_blocks: u64,
}

impl Merger {
    /// The running merge's progress (bytes of blocks merged, rate since it began), if one runs.
    pub fn progress(&self) -> Option<control_api::Progress> {
        let m = (*sync::lock(&self.meter))?;
        let done = m.merged_blocks * row_store::BLOCK_SIZE;
        let secs = m.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 && done > 0 { done as f64 / secs } else { 0.0 };
        Some(control_api::Progress::new("merge-back".into(), done, m.total_blocks * row_store::BLOCK_SIZE, rate))
    }

    fn set_meter(&self, meter: Option<MergeMeter>) {
        *sync::lock(&self.meter) = meter;
    }
}

/// The shared state of one proxy.
#[derive(Debug)]
pub struct Proxy {
    /// The disk.
    pub disk: Arc<Disk>,
    /// Who may write to it.
    pub gate: Arc<Gate>,
    /// Its persisted ownership record.
    pub record: RecordFile,
    /// Where its durable state lives.
    pub state: crate::state::StateEntry,
    /// The control socket's events.
    pub events: Events,
    /// The merge back.
    pub merger: Merger,
    /// The live export's name.
    pub export: String,
    /// Default write count that makes a block hot.
    pub hot_threshold: u32,
    /// How migration streams are protected.
    pub protection: LiveProtection,
    /// On a destination: the post-copy running, and the link to fetch blocks from the source.
    pub postcopy: Arc<crate::migration::residual::Postcopy>,
    /// How long a read of a block still at the source waits for it before it fails.
    pub read_wait: std::time::Duration,
}

impl Proxy {
    /// Starts the merge back (or joins the one running) and returns its outcome. Blocking:
    /// beginning a merge syncs the overlay.
    pub fn start_merge(self: &Arc<Self>) -> Result<MergeOutcome, StoreError> {
        let mut slot = sync::lock(&self.merger.running);
        if let Some(rx) = slot.as_ref().filter(|rx| rx.borrow().is_none()) {
            return Ok(rx.clone());
        }
        self.disk.begin_merge()?;
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        let this = self.clone();
        let blocks = self.disk.status().blocks_updated;
        self.events.emit::<RowMergeStarted>(RowMergeStartedData { blocks });
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut last = Instant::now();
            this.merger.set_meter(Some(MergeMeter { started, merged_blocks: 0, total_blocks: blocks }));
            let result = this.disk.merge(None, |p| {
                this.merger.set_meter(Some(MergeMeter {
                    started,
                    merged_blocks: p.merged_blocks,
                    total_blocks: p.merged_blocks + p.remaining_blocks,
                }));
                if last.elapsed() >= MERGE_PROGRESS_EVERY {
                    last = Instant::now();
                    this.events.emit::<RowMergeProgress>(RowMergeProgressData {
                        merged_blocks: p.merged_blocks,
                        remaining_blocks: p.remaining_blocks,
                    });
                }
            });
            this.merger.set_meter(None);
            let outcome = match result {
                Ok(_) => {
                    let seconds = started.elapsed().as_secs_f64();
                    this.events.emit::<RowStopped>(RowStoppedData { merged_blocks: blocks, seconds });
                    tracing::info!(blocks, seconds, "merge complete");
                    Ok(())
                }
                Err(e) => {
                    let error = MergeError::from(e);
                    tracing::error!("merge failed: {error}");
                    this.events.emit::<RowMergeFailed>(ErrorData { error: error.to_string() });
                    Err(error)
                }
            };
            let _ = tx.send(Some(outcome));
        });
        Ok(rx)
    }

    /// Waits for a merge's outcome.
    pub async fn merge_finished(mut rx: MergeOutcome) -> Result<(), MergeError> {
        let outcome = rx.wait_for(|o| o.is_some()).await.map_err(|_| MergeError::Ended)?.clone();
        outcome.expect("waited for an outcome")
    }

    /// Starts the merge from async code and waits for it.
    pub async fn merge(self: &Arc<Self>) -> Result<(), MergeError> {
        let this = self.clone();
        let rx = tokio::task::spawn_blocking(move || this.start_merge()).await.map_err(|_| MergeError::Ended)??;
        Self::merge_finished(rx).await
    }
}
