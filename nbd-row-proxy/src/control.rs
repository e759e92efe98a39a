//! The control socket: QMP-shaped commands that switch the disk between modes and report on it.
//!
//! Commands: `query-status`, `row-start`, `row-stop`, `query-row`, and for migration
//! `migrate-start`, `query-migrate`, `migrate-finish`, `migrate-cancel`, `migrate-complete`.
//! Events: `ROW_STARTED`, `ROW_MERGE_STARTED`, `ROW_MERGE_PROGRESS` (at most every 500 ms),
//! `ROW_STOPPED`, `MIGRATION_STATE`, `MIGRATION_ROUND_STARTED`, `MIGRATION_ROUND_COMPLETED`,
//! `MIGRATION_FAILED`, and on a destination `MIGRATION_INCOMING`.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use migration_stream::{Key, Strategy};
use qmp_proto::{parse_arguments, CommandError, Event, Handler, HandlerFuture};
use tokio::sync::watch;

use crate::export::Access;
use crate::migration::source::{MigrateArgs, Migration, Rollback};
use row_store::{Disk, Mode, BLOCK_SIZE};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// State the control commands act on.
pub struct Control {
    disk: Arc<Disk>,
    export: String,
    hot_threshold: u32,
    events: broadcast::Sender<Event>,
    /// The running merge, so `row-stop` twice waits for the same one.
    merge: Mutex<Option<MergeOutcome>>,
    /// Handle to ourselves for background tasks started from `&self` command handlers.
    me: Weak<Control>,
    /// Pre-shared key for migration sessions, if one was given.
    key: Option<Arc<Key>>,
    /// The current or last outgoing migration.
    migration: tokio::sync::Mutex<Option<Arc<Migration>>>,
    /// Whether the disk is open or still arriving by migration.
    access: watch::Receiver<Access>,
}

/// Outcome of a merge: `None` while it runs.
type MergeOutcome = tokio::sync::watch::Receiver<Option<Result<(), String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RowStopArgs {
    /// Wait for the merge to finish before replying (default true).
    #[serde(default = "yes")]
    wait: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct QueryRowArgs {
    hot_threshold: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// Digest of the disk as the guest sees it: SHA-256 over its bytes, so two hosts can check
/// they hold the same disk before a switchover.
fn disk_digest(disk: &Disk) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = Vec::with_capacity(4 << 20);
    let mut pos = 0u64;
    while pos < disk.size() {
        let n = (disk.size() - pos).min(4 << 20) as usize;
        buf.clear();
        disk.read_append(&mut buf, n, pos)?;
        hasher.update(&buf);
        pos += n as u64;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn yes() -> bool {
    true
}

/// Waits for a merge started by [`Control::start_merge`] to end; its error, if it failed.
async fn merge_finished(mut rx: MergeOutcome) -> Result<(), CommandError> {
    let outcome = rx.wait_for(|o| o.is_some()).await.map_err(generic)?.clone();
    outcome.expect("waited for an outcome").map_err(generic)
}

fn generic(e: impl std::fmt::Display) -> CommandError {
    CommandError::generic(e.to_string())
}

impl Control {
    /// A controller for `disk`, exported as `export`.
    pub fn new(
        disk: Arc<Disk>,
        export: String,
        hot_threshold: u32,
        events: broadcast::Sender<Event>,
        key: Option<Arc<Key>>,
        access: watch::Receiver<Access>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            disk,
            export,
            hot_threshold,
            events,
            merge: Mutex::new(None),
            me: me.clone(),
            key,
            migration: tokio::sync::Mutex::new(None),
            access,
        })
    }

    fn emit(&self, name: &str, data: Value) {
        let _ = self.events.send(Event::now(name, data));
    }

    fn query_status(&self) -> Value {
        let s = self.disk.status();
        json!({
            "mode": s.mode.as_str(),
            "export": self.export,
            "image": self.disk.image_path(),
            "image-size": self.disk.size(),
            "read-only": self.disk.read_only(),
            "reserved": (s.mode != Mode::Direct).then(|| self.disk.reserved_path()),
            "reserved-bytes": s.reserved_bytes,
            "reserved-allocated": s.reserved_allocated,
            "block-size": BLOCK_SIZE,
            "incoming": *self.access.borrow() == Access::Incoming,
            "writes-refused": self.disk.writes_refused(),
        })
    }

    fn query_row(&self, threshold: u32) -> Value {
        let s = self.disk.status();
        let (hot, cold) = self.disk.hot_cold(threshold);
        json!({
            "mode": s.mode.as_str(),
            "blocks-updated": s.blocks_updated,
            "hot-blocks": hot.len(),
            "cold-blocks": cold.len(),
            "hot-threshold": threshold,
            "generation": s.generation,
            "reserved-bytes": s.reserved_bytes,
            "block-size": BLOCK_SIZE,
        })
    }

    async fn row_start(&self) -> Result<Value, CommandError> {
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || disk.row_start()).await.map_err(generic)?.map_err(generic)?;
        let epoch = self.disk.status().epoch;
        self.emit("ROW_STARTED", json!({ "epoch": epoch, "base-export": format!("{}@base", self.export) }));
        Ok(json!({}))
    }

    /// Starts the merge (or joins the one running) and returns a receiver for its outcome.
    pub fn start_merge(self: &Arc<Self>) -> Result<MergeOutcome, CommandError> {
        let mut slot = self.merge.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = slot.as_ref().filter(|rx| rx.borrow().is_none()) {
            return Ok(rx.clone());
        }
        self.disk.begin_merge().map_err(generic)?;
        let (tx, rx) = tokio::sync::watch::channel(None);
        *slot = Some(rx.clone());
        let this = self.clone();
        let blocks = self.disk.status().blocks_updated;
        self.emit("ROW_MERGE_STARTED", json!({ "blocks": blocks }));
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut last = Instant::now();
            let result = this.disk.merge(None, |p| {
                if last.elapsed() >= Duration::from_millis(500) {
                    last = Instant::now();
                    this.emit("ROW_MERGE_PROGRESS", json!({ "merged-blocks": p.merged_blocks, "remaining-blocks": p.remaining_blocks }));
                }
            });
            let outcome = match result {
                Ok(_) => {
                    let secs = started.elapsed().as_secs_f64();
                    this.emit("ROW_STOPPED", json!({ "merged-blocks": blocks, "seconds": secs }));
                    tracing::info!(blocks, seconds = secs, "merge complete");
                    Ok(())
                }
                Err(e) => {
                    tracing::error!("merge failed: {e}");
                    this.emit("ROW_MERGE_FAILED", json!({ "error": e.to_string() }));
                    Err(e.to_string())
                }
            };
            let _ = tx.send(Some(outcome));
        });
        Ok(rx)
    }

    async fn row_stop(self: &Arc<Self>, args: RowStopArgs) -> Result<Value, CommandError> {
        let blocks = self.disk.status().blocks_updated;
        let this = self.clone();
        let rx = tokio::task::spawn_blocking(move || this.start_merge()).await.map_err(generic)??;
        if args.wait {
            let started = Instant::now();
            merge_finished(rx).await?;
            return Ok(json!({ "merged-blocks": blocks, "seconds": started.elapsed().as_secs_f64() }));
        }
        Ok(json!({ "merged-blocks": 0 }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MigrateStartArgs {
    uri: String,
    #[serde(default = "default_strategy")]
    strategy: String,
    rounds: Option<u32>,
    hot_threshold: Option<u32>,
    max_bandwidth: Option<u64>,
    #[serde(default = "yes")]
    compress: bool,
    /// Bitmap: dirty granularity in bytes (default 1 MiB, as QEMU's old block migration).
    bitmap_granularity: Option<u64>,
    /// Row: final-round budget in milliseconds at the link's rate (default 50; 0 = the paper's
    /// three rounds, no settle passes).
    final_budget_ms: Option<u64>,
}

fn default_strategy() -> String {
    "row".into()
}

impl Control {
    async fn migrate_start(&self, args: MigrateStartArgs) -> Result<Value, CommandError> {
        let key = self.key.clone().ok_or_else(|| generic("no --auth-key-file was given to this server"))?;
        let strategy: Strategy = args.strategy.parse().map_err(generic)?;
        let mut slot = self.migration.lock().await;
        if let Some(m) = slot.as_ref().filter(|m| !m.is_over()) {
            return Err(generic(format!("a migration is already {}", serde_json::to_value(m.status().phase).unwrap_or_default())));
        }
        if *self.access.borrow() == Access::Incoming {
            return Err(generic("this disk is still arriving by migration"));
        }
        // A merge left by a cancelled or failed migration must end first.
        if self.disk.mode() == Mode::Merging {
            let this = self.me.upgrade().ok_or_else(|| generic("shutting down"))?;
            let rx = tokio::task::spawn_blocking(move || this.start_merge()).await.map_err(generic)??;
            merge_finished(rx).await?;
        }
        if strategy == Strategy::Bitmap && self.disk.mode() != Mode::Direct {
            return Err(generic("the bitmap strategy needs the disk in direct mode (ROW is on)"));
        }
        // Pre-copy rounds before the final one: the paper's ROW does two (base, cold updates);
        // its block-bitmap baseline three (the whole disk, then twice what was dirtied).
        let default_rounds = match strategy {
            Strategy::Row => 2,
            Strategy::Bitmap => 3,
        };
        let margs = MigrateArgs {
            uri: args.uri,
            strategy,
            rounds: args.rounds.unwrap_or(default_rounds).max(1),
            hot_threshold: args.hot_threshold.unwrap_or(self.hot_threshold),
            max_bandwidth: args.max_bandwidth,
            compress: args.compress,
            bitmap_granularity_blocks: (args.bitmap_granularity.unwrap_or(1 << 20) / BLOCK_SIZE).max(1),
            final_budget: match args.final_budget_ms.unwrap_or(50) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
        };
        let me = self.me.clone();
        let rollback: Rollback = Box::new(move |strategy| {
            let Some(this) = me.upgrade() else { return };
            match strategy {
                Strategy::Row => {
                    if matches!(this.disk.mode(), Mode::Row | Mode::Merging) {
                        if let Err(e) = this.start_merge() {
                            tracing::error!("merging the overlay back failed to start: {}", e.desc);
                        }
                    }
                }
                Strategy::Bitmap => {
                    let _ = this.disk.set_tracking(false);
                }
            }
        });
        let migration = Migration::start(self.disk.clone(), margs, key, self.events.clone(), rollback)
            .await
            .map_err(|e| generic(format!("{e:#}")))?;
        *slot = Some(migration);
        Ok(json!({}))
    }

    async fn current_migration(&self) -> Result<Arc<Migration>, CommandError> {
        self.migration.lock().await.clone().ok_or_else(|| generic("no migration has been started"))
    }
}

impl Handler for Control {
    fn handle<'a>(&'a self, command: &'a str, arguments: Map<String, Value>) -> HandlerFuture<'a> {
        Box::pin(async move {
            match command {
                "query-status" => {
                    parse_arguments::<NoArgs>(arguments)?;
                    Ok(self.query_status())
                }
                "query-row" => {
                    let args: QueryRowArgs = parse_arguments(arguments)?;
                    Ok(self.query_row(args.hot_threshold.unwrap_or(self.hot_threshold)))
                }
                "row-start" => {
                    parse_arguments::<NoArgs>(arguments)?;
                    self.row_start().await
                }
                "row-stop" => {
                    let args: RowStopArgs = parse_arguments(arguments)?;
                    let this = self.me.upgrade().ok_or_else(|| generic("shutting down"))?;
                    this.row_stop(args).await
                }
                "query-digest" => {
                    parse_arguments::<NoArgs>(arguments)?;
                    let disk = self.disk.clone();
                    let started = Instant::now();
                    let digest = tokio::task::spawn_blocking(move || disk_digest(&disk)).await.map_err(generic)?.map_err(generic)?;
                    Ok(json!({ "sha256": digest, "size": self.disk.size(), "seconds": started.elapsed().as_secs_f64() }))
                }
                "migrate-start" => self.migrate_start(parse_arguments(arguments)?).await,
                "query-migrate" => {
                    parse_arguments::<NoArgs>(arguments)?;
                    match self.migration.lock().await.as_ref() {
                        Some(m) => Ok(m.status().to_json()),
                        None => Ok(json!({ "phase": "none" })),
                    }
                }
                "migrate-finish" => {
                    parse_arguments::<NoArgs>(arguments)?;
                    self.current_migration().await?.finish().await.map_err(generic)
                }
                "migrate-cancel" => {
                    parse_arguments::<NoArgs>(arguments)?;
                    self.current_migration().await?.cancel().await.map_err(generic)?;
                    Ok(json!({}))
                }
                "migrate-complete" => {
                    parse_arguments::<NoArgs>(arguments)?;
                    self.current_migration().await?.complete().await.map_err(generic)?;
                    Ok(json!({}))
                }
                other => Err(CommandError::command_not_found(other)),
            }
        })
    }
}

