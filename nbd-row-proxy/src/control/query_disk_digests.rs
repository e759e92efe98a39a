//! `query-disk-digests`: SHA-256 digests of a range of the disk, one per unit, leaving out
//! given blocks and, on a destination, those the guest wrote since the commit. `row-migrate
//! --verify-disk` asks the destination first (while its guest runs), then the source for the
//! same blocks, and compares: a check of every block that costs no downtime.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use control_api::{DiskDigestsArgs, DiskDigestsReply, DIGESTS_BLOCK_SIZE, DIGESTS_MAX_LENGTH, DIGESTS_MAX_SKIP_RUNS};
use qmp_proto::CommandError;
use row_store::{BlockBackend, BLOCK_SIZE};
use sha2::{Digest, Sha256};

use super::{failed, refused, Control};
use crate::ownership::WriteObserver;

/// Bytes read at once.
const CHUNK: u64 = 4 << 20;
// The skip runs of the command are in the store's blocks.
const _: () = assert!(DIGESTS_BLOCK_SIZE == BLOCK_SIZE);

/// A checked request: the range, the unit and the blocks to leave out.
#[derive(Debug, Clone, PartialEq)]
struct Range {
    offset: u64,
    end: u64,
    unit: u64,
    skip: Vec<(u64, u64)>,
}

impl Range {
    /// The request, or why it cannot be served on a disk of `size` bytes.
    fn check(a: &DiskDigestsArgs, size: u64) -> Result<Self, String> {
        let end = a.offset.checked_add(a.length).filter(|&e| e <= size);
        let Some(end) = end.filter(|_| a.length > 0) else {
            return Err(format!("the range {}+{} is empty or past the disk's end ({size} bytes)", a.offset, a.length));
        };
        if !a.offset.is_multiple_of(BLOCK_SIZE) || (!end.is_multiple_of(BLOCK_SIZE) && end != size) {
            return Err("offset and length must be multiples of 4096 (the length may end at the disk's end)".into());
        }
        if a.length > DIGESTS_MAX_LENGTH {
            return Err(format!("length {} is over the limit of {DIGESTS_MAX_LENGTH} bytes per call", a.length));
        }
        if a.unit == 0 || !a.unit.is_multiple_of(BLOCK_SIZE) {
            return Err(format!("unit {} is not a positive multiple of 4096", a.unit));
        }
        if a.skip.len() > DIGESTS_MAX_SKIP_RUNS {
            return Err(format!("{} skip runs: at most {DIGESTS_MAX_SKIP_RUNS}", a.skip.len()));
        }
        let mut after = 0u64;
        for &[first, count] in &a.skip {
            if count == 0 || first < after || first.checked_add(count).is_none() {
                return Err(format!("skip run [{first}, {count}] is empty, out of order or overlaps the one before"));
            }
            after = first + count;
        }
        Ok(Self { offset: a.offset, end, unit: a.unit, skip: a.skip.iter().map(|&[f, c]| (f, c)).collect() })
    }
}

/// What was hashed: the digests and the runs of blocks left out.
#[derive(Debug, Default, PartialEq)]
struct Digests {
    digests: Vec<String>,
    skipped: Vec<(u64, u64)>,
    hashed: u64,
}

impl Digests {
    fn skip(&mut self, b: u64) {
        match self.skipped.last_mut() {
            Some((first, n)) if *first + *n == b => *n += 1,
            _ => self.skipped.push((b, 1)),
        }
    }
}

/// Hashes `range` as `read` returns it, leaving out its skip runs and the blocks `written`
/// says were written: asked after each read, so a block written while it was read is left out.
fn digests(
    range: &Range,
    mut read: impl FnMut(&mut Vec<u8>, usize, u64) -> io::Result<()>,
    written: impl Fn(u64) -> bool,
) -> io::Result<Digests> {
    let mut out = Digests::default();
    let mut skips = range.skip.iter().copied().peekable();
    let mut buf = Vec::with_capacity(CHUNK.min(range.unit) as usize);
    let mut unit_start = range.offset;
    while unit_start < range.end {
        let unit_end = (unit_start + range.unit).min(range.end);
        let mut hasher = Sha256::new();
        let mut pos = unit_start;
        while pos < unit_end {
            let n = (unit_end - pos).min(CHUNK);
            buf.clear();
            read(&mut buf, n as usize, pos)?;
            for (i, block) in buf.chunks(BLOCK_SIZE as usize).enumerate() {
                let b = pos / BLOCK_SIZE + i as u64;
                while skips.next_if(|&(first, count)| first + count <= b).is_some() {}
                let asked = skips.peek().is_some_and(|&(first, _)| first <= b);
                if asked || written(b) {
                    out.skip(b);
                } else {
                    hasher.update(block);
                    out.hashed += block.len() as u64;
                }
            }
            pos += n;
        }
        out.digests.push(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect());
        unit_start = unit_end;
    }
    Ok(out)
}

pub async fn run(c: Arc<Control>, args: DiskDigestsArgs) -> Result<DiskDigestsReply, CommandError> {
    let started = Instant::now();
    let range = Range::check(&args, c.proxy.disk.size()).map_err(failed)?;
    let written = match args.skip_written_since_commit {
        false => None,
        true => Some(c.proxy.gate.written_since_commit().ok_or_else(|| {
            failed(
                "this proxy has no record of the writes since a commit: it did not commit an incoming migration, \
                 or restarted since",
            )
        })?),
    };
    if c.proxy.postcopy.any_missing(range.offset, range.end - range.offset) {
        return Err(failed("blocks of this range are still at the source: the post-copy is running"));
    }
    let disk = c.proxy.disk.clone();
    let hashed = tokio::task::spawn_blocking(move || {
        let read = |buf: &mut Vec<u8>, n, at| disk.read_append(buf, n, at);
        digests(&range, read, |b| written.as_ref().is_some_and(|w| w.contains(b)))
    })
    .await
    .map_err(refused)?
    .map_err(refused)?;
    Ok(DiskDigestsReply {
        digests: hashed.digests,
        skipped: hashed.skipped.into_iter().map(|(f, n)| [f, n]).collect(),
        hashed_bytes: hashed.hashed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(offset: u64, length: u64, unit: u64, skip: &[[u64; 2]]) -> DiskDigestsArgs {
        DiskDigestsArgs { offset, length, unit, skip: skip.to_vec(), skip_written_since_commit: false }
    }

    fn disk(blocks: u64) -> Vec<u8> {
        (0..blocks * BLOCK_SIZE).map(|i| (i / BLOCK_SIZE) as u8).collect()
    }

    fn run_on(data: &[u8], range: &Range, written: impl Fn(u64) -> bool) -> Digests {
        let read = |buf: &mut Vec<u8>, n: usize, at: u64| {
            buf.extend_from_slice(&data[at as usize..at as usize + n]);
            Ok(())
        };
        digests(range, read, written).unwrap()
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let size = 100 * BLOCK_SIZE + 512;
        assert!(Range::check(&args(0, 0, 4096, &[]), size).unwrap_err().contains("empty"));
        assert!(Range::check(&args(0, size + 1, 4096, &[]), size).unwrap_err().contains("past the disk's end"));
        assert!(Range::check(&args(u64::MAX, 2, 4096, &[]), size).is_err());
        assert!(Range::check(&args(512, 4096, 4096, &[]), size).unwrap_err().contains("multiples of 4096"));
        assert!(Range::check(&args(0, 4096, 1000, &[]), size).unwrap_err().contains("unit"));
        assert!(Range::check(&args(0, 8192, 4096, &[[5, 2], [6, 1]]), size).unwrap_err().contains("overlaps"));
        assert!(Range::check(&args(0, 8192, 4096, &[[5, 0]]), size).is_err());
        let many = vec![[0, 1]; DIGESTS_MAX_SKIP_RUNS + 1];
        assert!(Range::check(&args(0, 8192, 4096, &many), size).unwrap_err().contains("skip runs"));
        assert!(Range::check(&args(0, size, 4096, &[]), size).is_ok(), "a range may end at a short last block");
        let huge = 1 << 40;
        assert!(Range::check(&args(0, DIGESTS_MAX_LENGTH + 4096, 4096, &[]), huge).unwrap_err().contains("limit"));
    }

    #[test]
    fn one_digest_per_unit_and_the_left_out_blocks_change_nothing_else() {
        let data = disk(10);
        let range = Range::check(&args(0, 10 * BLOCK_SIZE, 4 * BLOCK_SIZE, &[]), data.len() as u64).unwrap();
        let all = run_on(&data, &range, |_| false);
        assert_eq!(all.digests.len(), 3, "4 + 4 + 2 blocks");
        assert_eq!(all.hashed, 10 * BLOCK_SIZE);
        assert!(all.skipped.is_empty());

        // A block differs on the other side: only its unit's digest differs.
        let mut other = data.clone();
        other[5 * BLOCK_SIZE as usize] ^= 1;
        let theirs = run_on(&other, &range, |_| false);
        assert_eq!((theirs.digests[0] == all.digests[0], theirs.digests[1] == all.digests[1]), (true, false));

        // Left out there (written since the commit) and asked to be left out here: equal again.
        let dest = run_on(&other, &range, |b| b == 5 || b == 6);
        assert_eq!(dest.skipped, vec![(5, 2)]);
        let asked: Vec<[u64; 2]> = dest.skipped.iter().map(|&(f, n)| [f, n]).collect();
        let src_range = Range::check(&args(0, 10 * BLOCK_SIZE, 4 * BLOCK_SIZE, &asked), data.len() as u64).unwrap();
        let src = run_on(&data, &src_range, |_| false);
        assert_eq!(src.digests, dest.digests);
        assert_eq!(src.skipped, dest.skipped);
        assert_eq!(src.hashed, 8 * BLOCK_SIZE);
    }

    #[test]
    fn a_range_in_the_middle_with_a_short_last_block() {
        let mut data = disk(9);
        data.extend_from_slice(&[7; 100]);
        let size = data.len() as u64;
        let range =
            Range::check(&args(4 * BLOCK_SIZE, size - 4 * BLOCK_SIZE, 1 << 20, &[[2, 3], [8, 1]]), size).unwrap();
        let d = run_on(&data, &range, |b| b == 9);
        assert_eq!(d.digests.len(), 1);
        assert_eq!(d.skipped, vec![(4, 1), (8, 2)], "asked runs clipped to the range, the written short block");
        assert_eq!(d.hashed, 3 * BLOCK_SIZE);
    }
}
