//! Model-based test: random sequences of writes, reads, trims, zeroes, flushes, ROW start/stop,
//! partial merges and simulated crashes, checked after every step against a plain in-memory
//! disk. A crash is the store being dropped without a flush and reopened from the same files,
//! as after SIGKILL; afterwards every block must hold one whole version written since the last
//! flush (or the flushed one), never a mix.

use proptest::prelude::*;
use row_store::{Disk, DiskOptions, Mode, BLOCK_SIZE};

const BLOCKS: u64 = 24;
/// A short last block exercises the partial tail.
const SIZE: u64 = BLOCKS * BLOCK_SIZE + 1024;
const SECTOR: u64 = 512;
const SECTORS: u64 = SIZE / SECTOR;

#[derive(Debug, Clone)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Read { sector: u64, sectors: u64 },
    Trim { sector: u64, sectors: u64 },
    Zero { sector: u64, sectors: u64, may_punch: bool },
    Flush,
    RowStart,
    RowStop,
    MergeSome(u64),
    Crash,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(20)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        3 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Trim { sector, sectors }),
        1 => (range(), any::<bool>()).prop_map(|((sector, sectors), may_punch)| Op::Zero { sector, sectors, may_punch }),
        1 => Just(Op::Flush),
        2 => Just(Op::RowStart),
        1 => Just(Op::RowStop),
        1 => (1..8u64).prop_map(Op::MergeSome),
        2 => Just(Op::Crash),
    ]
}

/// The reference disk: current bytes, and per block every version that a crash may expose.
struct Model {
    current: Vec<u8>,
    versions: Vec<Vec<Vec<u8>>>,
}

impl Model {
    fn new() -> Self {
        let current = vec![0u8; SIZE as usize];
        let versions = (0..=BLOCKS).map(|b| vec![block_of(&current, b).to_vec()]).collect();
        Self { current, versions }
    }

    fn apply(&mut self, offset: u64, data: &[u8]) {
        self.current[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        let (fb, lb) = (offset / BLOCK_SIZE, (offset + data.len() as u64 - 1) / BLOCK_SIZE);
        for b in fb..=lb {
            let v = block_of(&self.current, b).to_vec();
            self.versions[b as usize].push(v);
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

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs keeps thousands of fsyncs cheap and supports holes like ext4/xfs.
    tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap()
}

fn check_all(disk: &Disk, model: &Model) -> Result<(), TestCaseError> {
    let mut all = vec![0u8; SIZE as usize];
    disk.read_at(&mut all, 0).unwrap();
    prop_assert!(all == model.current, "full read differs from the model");
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = scratch_dir();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let mut disk = Disk::open(&path, DiskOptions::default()).unwrap();
    let mut model = Model::new();
    for op in ops {
        match op {
            Op::Write { sector, sectors, seed } => {
                let data = pattern(seed, (sectors * SECTOR) as usize);
                disk.write_at(&data, sector * SECTOR, seed % 7 == 0).unwrap();
                // Some writes carry FUA; the versions kept for a crash stay valid either way.
                model.apply(sector * SECTOR, &data);
            }
            Op::Read { sector, sectors } => {
                let mut buf = vec![0u8; (sectors * SECTOR) as usize];
                disk.read_at(&mut buf, sector * SECTOR).unwrap();
                let want = &model.current[(sector * SECTOR) as usize..((sector + sectors) * SECTOR) as usize];
                prop_assert!(buf == want, "read at sector {} x{} differs", sector, sectors);
            }
            Op::Trim { sector, sectors } => {
                let mode = disk.mode();
                disk.trim(sector * SECTOR, sectors * SECTOR, false).unwrap();
                if mode == Mode::Direct {
                    // Advisory in direct mode: the range may or may not read as zeroes after.
                    let mut buf = vec![0u8; (sectors * SECTOR) as usize];
                    disk.read_at(&mut buf, sector * SECTOR).unwrap();
                    model.apply(sector * SECTOR, &buf);
                } else {
                    model.apply(sector * SECTOR, &vec![0u8; (sectors * SECTOR) as usize]);
                }
            }
            Op::Zero { sector, sectors, may_punch } => {
                disk.write_zeroes(sector * SECTOR, sectors * SECTOR, may_punch, false, false).unwrap();
                model.apply(sector * SECTOR, &vec![0u8; (sectors * SECTOR) as usize]);
            }
            Op::Flush => {
                disk.flush().unwrap();
                model.durable();
            }
            Op::RowStart => {
                let was = disk.mode();
                let r = disk.row_start();
                prop_assert_eq!(r.is_ok(), was == Mode::Direct);
                if r.is_ok() {
                    prop_assert_eq!(disk.mode(), Mode::Row);
                    model.durable();
                }
            }
            Op::RowStop => {
                let was = disk.mode();
                let r = disk.row_stop(|_| {});
                prop_assert_eq!(r.is_ok(), was != Mode::Direct);
                prop_assert_eq!(disk.mode(), Mode::Direct);
                prop_assert!(!disk.reserved_path().exists());
                model.durable();
            }
            Op::MergeSome(n) => {
                match disk.mode() {
                    Mode::Direct => continue,
                    Mode::Row => {
                        disk.begin_merge().unwrap();
                        model.durable();
                    }
                    Mode::Merging => {}
                }
                if disk.merge(Some(n), |_| {}).unwrap() {
                    prop_assert_eq!(disk.mode(), Mode::Direct);
                    model.durable();
                }
            }
            Op::Crash => {
                let mode = disk.mode();
                drop(disk);
                disk = Disk::open(&path, DiskOptions::default()).unwrap();
                prop_assert_eq!(disk.mode(), mode, "mode after restart");
                let mut all = vec![0u8; SIZE as usize];
                disk.read_at(&mut all, 0).unwrap();
                for b in 0..=BLOCKS {
                    let got = block_of(&all, b);
                    prop_assert!(
                        model.versions[b as usize].iter().any(|v| v == got),
                        "block {} after crash is none of its {} versions since the last flush",
                        b,
                        model.versions[b as usize].len()
                    );
                }
                model.current = all;
                model.durable();
            }
        }
        check_all(&disk, &model)?;
    }
    // Leaving ROW at the end must give back exactly the model's disk, in the image itself.
    if disk.mode() != Mode::Direct {
        disk.row_stop(|_| {}).unwrap();
    }
    drop(disk);
    let image = std::fs::read(&path).unwrap();
    prop_assert!(image == model.current, "image after merge differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn row_store_matches_a_plain_disk(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
