//! The downtime budget (`--downtime-limit`, STOP to RESUME) and how it splits between QEMU's
//! memory stop-and-copy, what follows QEMU's own count, and the disk's final round; the link's
//! rate as round 1 measured it, and QEMU's pace on a slow link. Pure arithmetic.

use std::time::Duration;

use serde_json::Value;

/// What memory's stop-and-copy gets of the downtime budget (QEMU's downtime-limit): half.
/// QEMU counts its downtime until its last byte is in the socket, not at the destination.
pub fn memory_share(limit: Duration) -> Duration {
    limit / 2
}

/// What QEMU's migration stream has in flight when QEMU counts its downtime as over (the TCP
/// send buffer and the link's queue) when nothing paces it: about 1 MB measured on the bench's
/// links (tbf with a 50 ms queue and a 512 KB burst), at 20 and at 100 Mbit/s alike; paced
/// below the link by --max-bandwidth, next to nothing (76 ms downtime at 20 Mbit/s, QEMU
/// counting 72 ms).
pub const STREAM_IN_FLIGHT: f64 = 1_048_576.0;

/// How long the stream in flight takes to reach the destination at `rate` bytes/s.
pub fn drain_time(rate: Option<f64>) -> Duration {
    match rate {
        Some(r) if r > 0.0 => Duration::from_secs_f64(STREAM_IN_FLIGHT / r),
        _ => Duration::ZERO,
    }
}

/// The link's rate as round 1 measured it (bytes/s on the wire; the disks' round 1 ran side by
/// side, so their sum; paced by --max-bandwidth if it was given); a round 1 shorter than a
/// second is no measurement.
pub fn measured_link_rate(disks: &Value) -> Option<f64> {
    let one = |d: &Value| {
        let r = &d["rounds"][0];
        let (bytes, secs) = (r["wire-bytes"].as_f64()?, r["seconds"].as_f64()?);
        (secs >= 1.0 && bytes > 0.0).then(|| bytes / secs)
    };
    match disks {
        Value::Array(all) => all.iter().filter_map(one).reduce(|a, b| a + b),
        d => one(d),
    }
}

/// QEMU's pace below the link, as a share of the rate round 1 measured.
pub const AUTO_PACE: f64 = 0.9;

/// QEMU's memory pace when the operator gave none (`--max-bandwidth`): a tenth below the link's
/// rate as round 1 measured it, when unpaced the stream in the link's queue would take longer to
/// reach the destination than the resume's share of the budget (a slow link: 1 MB at 20 Mbit/s
/// is 420 ms; paced, QEMU's own count is about all of the downtime). None on a fast link or
/// without a measurement.
pub fn auto_pace(link_rate: Option<f64>, limit: Duration) -> Option<u64> {
    let link = link_rate.filter(|r| *r > 0.0)?;
    (drain_time(Some(link)) > resume_share(limit)).then_some((link * AUTO_PACE) as u64)
}

/// Whether QEMU's stream is paced at no more than the link carried in round 1 (so the link's
/// queue stays short): a cap the disk reached, or the pace below it. A cap without a
/// measurement is trusted.
pub fn paced_below(memory_rate: Option<u64>, link_rate: Option<f64>) -> bool {
    match (memory_rate, link_rate) {
        (Some(pace), Some(link)) => pace as f64 <= link * 1.05,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// What the switchover takes after QEMU's own downtime accounting ends, kept out of the disk's
/// budget: the migration stream still in socket buffers and on the link, the destination's
/// device-state load and resume (about 100 ms at 100 Mbit/s with a 256 MiB TCG guest whose
/// stop-and-copy got 200 ms). A sixth of the limit, 20 ms at least.
pub fn resume_share(limit: Duration) -> Duration {
    (limit / 6).max(Duration::from_millis(20)).min(limit / 2)
}

/// The downtime the final disk round was predicted to take: its prediction when it was sent,
/// the budget when post-copy kept it within that (the largest over the disks).
pub fn finals_predicted_ms(disk: &Value, budget: Duration) -> f64 {
    let one = |d: &Value| match d.get("postcopy") {
        Some(p) if p.is_object() => budget.as_secs_f64() * 1000.0,
        _ => d["predicted-final-ms"].as_f64().unwrap_or(0.0),
    };
    match disk {
        Value::Array(all) => all.iter().map(one).fold(0.0, f64::max),
        d => one(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_link_rate_is_round_one_s_and_a_pace_below_it_keeps_the_queue_short() {
        let disk =
            json!({ "rounds": [{ "wire-bytes": 20_000_000u64, "seconds": 2.0 }, { "wire-bytes": 1, "seconds": 9.0 }] });
        assert_eq!(measured_link_rate(&disk), Some(10_000_000.0));
        let two = json!([disk, { "rounds": [{ "wire-bytes": 8_000_000u64, "seconds": 2.0 }] }]);
        assert_eq!(measured_link_rate(&two), Some(14_000_000.0));
        // A round 1 under a second measured nothing; the mirror's report has no rounds.
        assert_eq!(measured_link_rate(&json!({ "rounds": [{ "wire-bytes": 5, "seconds": 0.2 }] })), None);
        assert_eq!(measured_link_rate(&json!({ "offset": 5 })), None);
        // A cap the disk reached (the link carried it) or one below it: paced below the link.
        assert!(paced_below(Some(10_000_000), Some(10_000_000.0)));
        assert!(paced_below(Some(9_000_000), Some(10_000_000.0)));
        assert!(paced_below(Some(9_000_000), None));
        // A cap above what the link carried, or none: QEMU fills the link's queue.
        assert!(!paced_below(Some(100_000_000), Some(10_000_000.0)));
        assert!(!paced_below(None, Some(10_000_000.0)));
    }

    #[test]
    fn the_downtime_budget_splits_into_memory_resume_and_disk() {
        let limit = Duration::from_millis(300);
        assert_eq!(memory_share(limit), Duration::from_millis(150));
        assert_eq!(resume_share(limit), Duration::from_millis(50));
        // A small limit still keeps 20 ms for the resume, but never more than memory gets.
        assert_eq!(resume_share(Duration::from_millis(60)), Duration::from_millis(20));
        assert_eq!(resume_share(Duration::from_millis(30)), Duration::from_millis(15));
        // On a slow link the stream in flight takes longer to drain than the share.
        assert_eq!(drain_time(Some(2_500_000.0)).as_millis(), 419);
        assert_eq!(drain_time(None), Duration::ZERO);
        // There row-migrate paces QEMU a tenth below the link; on a fast one, not at all.
        assert_eq!(auto_pace(Some(2_500_000.0), limit), Some(2_250_000));
        assert_eq!(auto_pace(Some(12_500_000.0), limit), Some(11_250_000));
        assert_eq!(auto_pace(Some(200_000_000.0), limit), None);
        assert_eq!(auto_pace(None, limit), None);
        assert!(paced_below(auto_pace(Some(2_500_000.0), limit), Some(2_500_000.0)));
        for ms in [1u64, 30, 60, 300, 1000, 60_000] {
            let limit = Duration::from_millis(ms);
            assert!(memory_share(limit) + resume_share(limit) <= limit, "{ms} ms");
        }
    }
}
