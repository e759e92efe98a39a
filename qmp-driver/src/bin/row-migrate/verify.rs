//! `--verify-disk`: both hosts hold the same disk.
//!
//! With the proxies' strategies the check costs no downtime: it runs after the switchover,
//! while the guest runs on the destination. Window by window, the destination hashes its
//! blocks (one SHA-256 per MiB), leaving out those the guest wrote there since the commit, then
//! the source hashes the same blocks of the disk it handed over, and the digests are compared.
//! With qemu-mirror the destination proxy does not see the commit, so both whole disks are
//! hashed while the guest is paused, before the switchover (the old way, in the downtime).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use control_api::{DiskDigestsArgs, DiskDigestsReply, NoArgs, QueryDiskDigests, QueryStatus, DIGESTS_BLOCK_SIZE};
use qmp_driver::Qmp;
use serde_json::{json, Value};

use crate::ctx::{all_ok, disks_value, each_disk, Ctx};
use crate::report::{progress_detail, progress_line};

/// Bytes one pair of calls covers.
const WINDOW: u64 = 64 << 20;
/// Bytes per digest: a mismatch is located to this.
const UNIT: u64 = 1 << 20;
/// A hang-catching limit on one call (a window is read and hashed in well under a second on an
/// idle host).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Mismatched units named in the error.
const NAMED: usize = 8;

/// What the comparison of one disk found.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    compared: u64,
    left_out: u64,
    differing: Vec<u64>,
    differing_count: u64,
}

impl Tally {
    /// Adds one window: the destination's and the source's digests of `[offset, ...)`.
    fn add(&mut self, offset: u64, dst: &DiskDigestsReply, src: &DiskDigestsReply) -> Result<()> {
        if src.digests.len() != dst.digests.len() || src.skipped != dst.skipped {
            bail!("the proxies answered for different blocks at offset {offset}: a proxy does not follow the request");
        }
        for (i, (a, b)) in dst.digests.iter().zip(&src.digests).enumerate() {
            if a != b {
                self.differing_count += 1;
                if self.differing.len() < NAMED {
                    self.differing.push(offset + i as u64 * UNIT);
                }
            }
        }
        self.compared += src.hashed_bytes;
        self.left_out += dst.skipped.iter().map(|[_, n]| n).sum::<u64>();
        Ok(())
    }
}

/// After the switchover: compares every disk's blocks on both hosts, leaving out those the
/// guest has written on the destination since; fails naming the first differing MiB.
pub async fn after_switchover(ctx: &mut Ctx) -> Result<Value> {
    let results = each_disk(&mut ctx.disks, |d| async move {
        let r = compare(&mut d.src_proxy, &mut d.dst_proxy, &d.name).await;
        (d.name.clone(), r)
    })
    .await;
    Ok(disks_value(all_ok(results)?))
}

async fn compare(src: &mut Qmp, dst: &mut Qmp, name: &str) -> Result<Value> {
    let started = Instant::now();
    let size = dst.call::<QueryStatus>(NoArgs {}).await.context("query-status on the destination proxy")?.image_size;
    let mut tally = Tally::default();
    let mut offset = 0;
    while offset < size {
        let length = WINDOW.min(size - offset);
        let ask = DiskDigestsArgs { offset, length, unit: UNIT, skip: vec![], skip_written_since_commit: true };
        let theirs = dst.call_within::<QueryDiskDigests>(ask, CALL_TIMEOUT).await.context("the destination disk")?;
        let ask = DiskDigestsArgs {
            offset,
            length,
            unit: UNIT,
            skip: theirs.skipped.clone(),
            skip_written_since_commit: false,
        };
        let ours = src.call_within::<QueryDiskDigests>(ask, CALL_TIMEOUT).await.context("the source disk")?;
        tally.add(offset, &theirs, &ours)?;
        offset += length;
        let rate = offset as f64 / started.elapsed().as_secs_f64().max(1e-3);
        progress_line(&format!("{name} check"), &progress_detail(offset, size, rate));
    }
    if tally.differing_count > 0 {
        let at: Vec<String> = tally.differing.iter().map(|o| format!("{}", o / UNIT)).collect();
        bail!(
            "the destination disk differs from the source in {} MiB (at MiB {}{}): the guest runs on the destination; \
             the source keeps the disk as it handed it over (do not retire it)",
            tally.differing_count,
            at.join(", "),
            if tally.differing_count > NAMED as u64 { ", ..." } else { "" }
        );
    }
    Ok(json!({
        "when": "after-switchover",
        "compared-bytes": tally.compared,
        "written-since-bytes": tally.left_out * DIGESTS_BLOCK_SIZE,
        "size": size,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// Before the switchover, the guest paused (qemu-mirror): the SHA-256 of both whole disks.
pub async fn while_paused(ctx: &mut Ctx) -> Result<Value> {
    use control_api::QueryDigest;
    let results = each_disk(&mut ctx.disks, |d| async move {
        let (a, b) = tokio::join!(
            d.src_proxy.call_within::<QueryDigest>(NoArgs {}, CALL_TIMEOUT),
            d.dst_proxy.call_within::<QueryDigest>(NoArgs {}, CALL_TIMEOUT)
        );
        let r = async {
            let a = a.context("digest of the source disk")?;
            let b = b.context("digest of the destination disk")?;
            if a.sha256 != b.sha256 {
                bail!("the destination disk differs from the source (sha256 {} vs {})", b.sha256, a.sha256);
            }
            Ok(json!({ "when": "paused", "sha256": a.sha256, "compared-bytes": a.size, "seconds": a.seconds + b.seconds }))
        }
        .await;
        (d.name.clone(), r)
    })
    .await;
    Ok(disks_value(all_ok(results)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(digests: &[&str], skipped: &[[u64; 2]], hashed: u64) -> DiskDigestsReply {
        DiskDigestsReply {
            digests: digests.iter().map(|d| d.to_string()).collect(),
            skipped: skipped.to_vec(),
            hashed_bytes: hashed,
            seconds: 0.0,
        }
    }

    #[test]
    fn equal_windows_add_up_and_a_difference_is_located() {
        let mut t = Tally::default();
        t.add(0, &reply(&["a", "b"], &[[3, 2]], 100), &reply(&["a", "b"], &[[3, 2]], 100)).unwrap();
        assert_eq!((t.compared, t.left_out, t.differing_count), (100, 2, 0));
        t.add(64 << 20, &reply(&["a", "x"], &[], 50), &reply(&["a", "b"], &[], 50)).unwrap();
        assert_eq!(t.differing, vec![(64 << 20) + UNIT]);
        assert!(t.add(0, &reply(&["a"], &[[1, 1]], 1), &reply(&["a"], &[], 1)).is_err(), "different blocks");
    }
}
