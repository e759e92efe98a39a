//! Model-based test: random sequences of writes (some with FUA), reads, trims, zeroes,
//! flushes, ROW start/stop, partial merges, restarts, power cuts and failing syncs, checked
//! after every step against a plain in-memory disk.
//!
//! The store runs over [`SimStorage`], which at a power cut keeps only what was synced (plus a
//! random subset of what was not, page by page), and whose syncs can be made to fail the way
//! Linux's do (the data they covered never reaches the disk). What must hold:
//! - reads always return the model's current content;
//! - after a restart or a power cut, every block holds one whole version written since the
//!   last acknowledged flush (or that flushed one): an acknowledged FLUSH or FUA write survives,
//!   and nothing unacknowledged corrupts a block;
//! - once a sync has failed, every write and every flush fails until the store is reopened
//!   (a later sync that succeeds would otherwise report data durable that the kernel dropped).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use row_store::{BlockBackend, Disk, DiskOptions, Mode, SimStorage, Storage, ZeroFlags, BLOCK_SIZE};

const BLOCKS: u64 = 24;
/// A short last block exercises the partial tail.
const SIZE: u64 = BLOCKS * BLOCK_SIZE + 1024;
const SECTOR: u64 = 512;
const SECTORS: u64 = SIZE / SECTOR;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Trim {
        sector: u64,
        sectors: u64,
    },
    Zero {
        sector: u64,
        sectors: u64,
        may_punch: bool,
    },
    Flush,
    RowStart,
    RowStop,
    MergeSome(u64),
    /// The process dies; the page cache survives.
    Restart,
    /// The machine loses power.
    PowerCut,
    /// A sync fails with EIO, after this many have succeeded.
    FailSync(u8),
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(20)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>(), prop::bool::weighted(0.15))
            .prop_map(|((sector, sectors), seed, fua)| Op::Write { sector, sectors, seed, fua }),
        3 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Trim { sector, sectors }),
        1 => (range(), any::<bool>()).prop_map(|((sector, sectors), may_punch)| Op::Zero { sector, sectors, may_punch }),
        2 => Just(Op::Flush),
        2 => Just(Op::RowStart),
        1 => Just(Op::RowStop),
        1 => (1..8u64).prop_map(Op::MergeSome),
        1 => Just(Op::Restart),
        2 => Just(Op::PowerCut),
        1 => (0..3u8).prop_map(Op::FailSync),
    ]
}

/// The reference disk: current bytes, and per block every version that a crash may expose.
struct Model {
    current: Vec<u8>,
    versions: Vec<Vec<Vec<u8>>>,
    /// A sync failed since the store was opened: writes and flushes must fail.
    latched: bool,
}

impl Model {
    fn new() -> Self {
        let current = vec![0u8; SIZE as usize];
        let versions = (0..=BLOCKS).map(|b| vec![block_of(&current, b).to_vec()]).collect();
        Self { current, versions, latched: false }
    }

    fn blocks(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / BLOCK_SIZE..=(offset + len - 1) / BLOCK_SIZE
    }

    fn apply(&mut self, offset: u64, data: &[u8]) {
        self.current[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in Self::blocks(offset, data.len() as u64) {
            let v = block_of(&self.current, b).to_vec();
            self.versions[b as usize].push(v);
        }
    }

    /// The blocks of a range are durable as they are now (an acknowledged FUA write).
    fn durable_range(&mut self, offset: u64, len: u64) {
        for b in Self::blocks(offset, len) {
            self.versions[b as usize] = vec![block_of(&self.current, b).to_vec()];
        }
    }

    fn durable(&mut self) {
        for b in 0..=BLOCKS {
            self.versions[b as usize] = vec![block_of(&self.current, b).to_vec()];
        }
    }
}

fn block_of(data: &[u8], b: u64) -> &[u8] {
    let start = (b * BLOCK_SIZE) as usize;
    &data[start..(start + BLOCK_SIZE as usize).min(data.len())]
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31) | 1).collect()
}

fn read(disk: &Disk, offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    disk.read_append(&mut out, len as usize, offset).expect("reads never fail");
    out
}

fn open(storage: &SimStorage, path: &Path) -> Disk {
    Disk::open_on(Arc::new(storage.clone()), path, DiskOptions::default()).expect("the store reopens after any crash")
}

/// A mutating operation's result: while latched it must fail; when it fails otherwise, the
/// failure must have tripped the latch (a sync failed).
fn expect_outcome<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, impl std::fmt::Display>,
    model: &mut Model,
    disk: &Disk,
) -> Result<bool, TestCaseError> {
    match r {
        Ok(_) => {
            prop_assert!(!model.latched, "{} succeeded after a failed sync", what);
            Ok(true)
        }
        Err(e) => {
            prop_assert!(disk.sync_failure().is_some(), "{} failed without a failed sync: {}", what, e);
            model.latched = true;
            Ok(false)
        }
    }
}

/// After a write-like op failed, learn what the range holds now: each block must be its old
/// or its new content (the write may have reached the page cache before the sync failed).
fn learn_after_failure(disk: &Disk, model: &mut Model, offset: u64, new: &[u8]) -> Result<(), TestCaseError> {
    let len = new.len() as u64;
    let (fb, lb) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
    let start = fb * BLOCK_SIZE;
    let end = ((lb + 1) * BLOCK_SIZE).min(SIZE);
    let now = read(disk, start, end - start);
    let mut with_new = model.current[start as usize..end as usize].to_vec();
    with_new[(offset - start) as usize..(offset - start + len) as usize].copy_from_slice(new);
    for b in fb..=lb {
        let (s, e) = (((b - fb) * BLOCK_SIZE) as usize, (((b - fb + 1) * BLOCK_SIZE) as usize).min(now.len()));
        prop_assert!(
            now[s..e] == model.current[start as usize + s..start as usize + e] || now[s..e] == with_new[s..e],
            "block {} after a failed write is neither its old nor its new content",
            b
        );
    }
    model.apply(start, &now);
    Ok(())
}

fn run(seed: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let storage = SimStorage::new(seed);
    let path = PathBuf::from("/vm/disk.raw");
    storage.create_durable(&path, SIZE);
    let mut disk = open(&storage, &path);
    let mut model = Model::new();
    for op in ops {
        match op {
            Op::Write { sector, sectors, seed, fua } => {
                let data = pattern(seed, (sectors * SECTOR) as usize);
                let offset = sector * SECTOR;
                let r = disk.write_at(&data, offset, fua);
                if expect_outcome("write", r, &mut model, &disk)? {
                    model.apply(offset, &data);
                    if fua {
                        model.durable_range(offset, data.len() as u64);
                    }
                } else {
                    learn_after_failure(&disk, &mut model, offset, &data)?;
                }
            }
            Op::Read { sector, sectors } => {
                let got = read(&disk, sector * SECTOR, sectors * SECTOR);
                let want = &model.current[(sector * SECTOR) as usize..((sector + sectors) * SECTOR) as usize];
                prop_assert!(got == want, "read at sector {} x{} differs", sector, sectors);
            }
            Op::Trim { sector, sectors } => {
                let (offset, len) = (sector * SECTOR, sectors * SECTOR);
                let r = disk.trim(offset, len, false);
                if expect_outcome("trim", r, &mut model, &disk)? {
                    // Advisory in direct mode: the range may read as before or as zeroes; learn which.
                    let now = read(&disk, offset, len);
                    if disk.mode() != Mode::Direct {
                        prop_assert!(
                            now.iter().all(|&b| b == 0),
                            "a trimmed range over an overlay must read as zeroes"
                        );
                    }
                    model.apply(offset, &now);
                }
            }
            Op::Zero { sector, sectors, may_punch } => {
                let (offset, len) = (sector * SECTOR, sectors * SECTOR);
                let r = disk.write_zeroes(offset, len, ZeroFlags { may_punch, fast_only: false, fua: false });
                if expect_outcome("write-zeroes", r, &mut model, &disk)? {
                    model.apply(offset, &vec![0u8; len as usize]);
                } else {
                    learn_after_failure(&disk, &mut model, offset, &vec![0u8; len as usize])?;
                }
            }
            Op::Flush => {
                if expect_outcome("flush", disk.flush(), &mut model, &disk)? {
                    model.durable();
                }
            }
            Op::RowStart => {
                let was = disk.mode();
                let r = disk.row_start();
                if model.latched {
                    prop_assert!(r.is_err(), "row-start succeeded after a failed sync");
                } else if was != Mode::Direct {
                    prop_assert!(r.is_err());
                } else if expect_outcome("row-start", r, &mut model, &disk)? {
                    prop_assert_eq!(disk.mode(), Mode::Row);
                    // row-start syncs the image first.
                    model.durable();
                }
            }
            Op::RowStop => {
                let was = disk.mode();
                let r = disk.row_stop(|_| {});
                if was == Mode::Direct {
                    prop_assert!(r.is_err());
                } else if expect_outcome("row-stop", r, &mut model, &disk)? {
                    prop_assert_eq!(disk.mode(), Mode::Direct);
                    prop_assert!(!storage.exists(disk.reserved_path()).unwrap());
                    model.durable();
                }
            }
            Op::MergeSome(n) => {
                match disk.mode() {
                    Mode::Direct => continue,
                    Mode::Row => {
                        if !expect_outcome("begin-merge", disk.begin_merge(), &mut model, &disk)? {
                            continue;
                        }
                        model.durable();
                    }
                    Mode::Merging => {}
                }
                match disk.merge(Some(n), |_| {}) {
                    Ok(true) => {
                        prop_assert!(!model.latched, "a merge finished after a failed sync");
                        prop_assert_eq!(disk.mode(), Mode::Direct);
                        model.durable();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        expect_outcome("merge", Err::<(), _>(e), &mut model, &disk)?;
                    }
                }
            }
            Op::Restart | Op::PowerCut => {
                let mode = disk.mode();
                let latched = model.latched;
                drop(disk);
                if matches!(op, Op::PowerCut) {
                    storage.power_cut();
                }
                disk = open(&storage, &path);
                if !latched {
                    prop_assert_eq!(disk.mode(), mode, "mode after {:?}", op);
                }
                let all = read(&disk, 0, SIZE);
                for b in 0..=BLOCKS {
                    let got = block_of(&all, b);
                    prop_assert!(
                        model.versions[b as usize].iter().any(|v| v == got),
                        "block {} after {:?} is none of its {} versions since the last flush",
                        b,
                        op,
                        model.versions[b as usize].len()
                    );
                }
                model.current = all;
                // After a power cut what was read is what the disk holds; after a restart it may
                // still be only in the page cache, so the older versions stay possible.
                if matches!(op, Op::PowerCut) {
                    model.durable();
                }
                model.latched = false;
                // Reopening recovers; a merge interrupted by the crash is resumed later.
            }
            Op::FailSync(skip) => storage.fail_syncs_after(skip.into(), 1),
        }
        let all = read(&disk, 0, SIZE);
        prop_assert!(all == model.current, "full read differs from the model");
    }
    if model.latched {
        return Ok(());
    }
    storage.fail_syncs(0);
    // Leaving ROW at the end must give back exactly the model's disk, in the image itself,
    // and that must survive a power cut.
    if disk.mode() != Mode::Direct {
        disk.row_stop(|_| {}).unwrap();
    }
    disk.flush().unwrap();
    drop(disk);
    storage.power_cut();
    prop_assert!(storage.contents(&path).unwrap() == model.current, "image after merge differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn row_store_matches_a_plain_disk_through_crashes_and_power_cuts(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(seed, ops)?;
    }
}
