//! What the user sees: progress on stderr, and the report.

use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often a stage may print a plain progress line when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// One progress line: rewritten in place on a terminal, a plain line (a new stage at once, the
/// same stage at most every 2 s) otherwise.
pub fn progress_line(what: &str, detail: &str) {
    static LAST: std::sync::Mutex<Option<(String, Instant)>> = std::sync::Mutex::new(None);
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{what}: {detail}");
    } else {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.as_ref().is_none_or(|(w, t)| w != what || t.elapsed() >= PLAIN_PROGRESS_EVERY);
        if !due {
            return;
        }
        *last = Some((what.to_string(), Instant::now()));
        let _ = writeln!(err, "{what}: {detail}");
    }
    let _ = err.flush();
}

/// `done` of `total` bytes at `rate` bytes/s: a bar (on a terminal), the share, the sizes and
/// the rate in the same IEC units, and the estimated time left; "starting" before anything is
/// known.
pub fn progress_detail(done: u64, total: u64, rate: f64) -> String {
    if total == 0 && done == 0 {
        return "starting".to_string();
    }
    let share = if total > 0 { done.min(total) as f64 / total as f64 } else { 0.0 };
    let left = total.saturating_sub(done) as f64;
    let eta = if rate > 0.0 && left > 0.0 {
        format!(", ETA {}", humantime::format_duration(Duration::from_secs((left / rate).ceil() as u64)))
    } else {
        String::new()
    };
    let bar = if std::io::stderr().is_terminal() {
        const WIDTH: usize = 24;
        let filled = (share * WIDTH as f64).round() as usize;
        format!("[{}{}] ", "#".repeat(filled), "-".repeat(WIDTH - filled))
    } else {
        String::new()
    };
    format!(
        "{bar}{:>3.0}% {} / {}, {}{eta}",
        share * 100.0,
        units::format_size(done),
        units::format_size(total),
        units::format_rate(rate.max(0.0) as u64)
    )
}

/// Ends a progress line on a terminal.
pub fn progress_done() {
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = writeln!(err);
    }
}

fn mb(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |b| format!("{:.1}", b / 1e6))
}

/// The human-readable report.
pub fn print(r: &Value) {
    println!("strategy              {}", r["strategy"].as_str().unwrap_or("?"));
    println!("total time            {:.1} s", r["total-seconds"].as_f64().unwrap_or(0.0));
    println!(
        "downtime              {:.0} ms  (final disk round {:.0} ms + memory stop-and-copy {:.0} ms)",
        r["downtime-ms"].as_f64().unwrap_or(0.0),
        r["final-disk-round-ms"].as_f64().unwrap_or(0.0),
        r["memory-stop-and-copy-ms"].as_f64().unwrap_or(0.0)
    );
    if let (Some(limit), Some(predicted)) = (r["downtime-limit-ms"].as_f64(), r["predicted-downtime-ms"].as_f64()) {
        println!(
            "downtime budget       {limit:.0} ms, predicted {predicted:.0} ms (disk {:.0} ms of it)",
            r["disk-budget-ms"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(ms) = r["verify-disk-ms"].as_f64().filter(|ms| *ms > 0.0) {
        println!("disk check            {ms:.0} ms of the downtime (--verify-disk: both digests equal)");
    }
    for v in r["disk-verified"].as_array().cloned().unwrap_or_else(|| vec![r["disk-verified"].clone()]) {
        if v["when"] == "after-switchover" {
            println!(
                "disk check            equal: {} MB compared after the switchover in {:.1} s, {} MB left out (written \
                 on the destination since)",
                mb(&v["compared-bytes"]),
                v["seconds"].as_f64().unwrap_or(0.0),
                mb(&v["written-since-bytes"])
            );
        }
    }
    println!("memory                {} MB", mb(&r["memory-bytes"]));
    match r["disk"].as_array() {
        Some(disks) => {
            for (i, disk) in disks.iter().enumerate() {
                println!("--- disk {}", i + 1);
                print_disk(disk);
            }
        }
        None => print_disk(&r["disk"]),
    }
    for key in ["src-ssh", "dst-ssh"] {
        if let Some(destination) = r[key]["destination"].as_str() {
            let sockets = r[key]["sockets"].as_array().map_or(0, Vec::len);
            println!("{key:<22}{destination} ({sockets} socket(s) forwarded by ssh)");
        }
    }
}

/// One disk's rounds and bytes.
fn print_disk(disk: &Value) {
    let p = &disk["postcopy"];
    if p.is_object() {
        println!(
            "post-copy             {} blocks after the switchover ({}); {:.1} s until the destination held all, \
             {} reads waited (longest {:.0} ms, mean {:.0} ms), {} reconnects",
            p["blocks"].as_u64().unwrap_or(0),
            p["reason"].as_str().unwrap_or("?"),
            p["seconds"].as_f64().unwrap_or(0.0),
            p["fetch-count"].as_u64().unwrap_or(0),
            p["fetch-max-ms"].as_f64().unwrap_or(0.0),
            p["fetch-mean-ms"].as_f64().unwrap_or(0.0),
            p["reconnects"].as_u64().unwrap_or(0)
        );
    }
    if let Some(rounds) = disk["rounds"].as_array() {
        println!("disk round  kind     blocks   logical MB   wire MB   seconds");
        for round in rounds {
            println!(
                "{:>10}  {:<7} {:>7}   {:>10}   {:>7}   {:>7.2}",
                round["round"].as_u64().unwrap_or(0),
                round["kind"].as_str().unwrap_or("?"),
                round["blocks"].as_u64().unwrap_or(0),
                mb(&round["logical-bytes"]),
                mb(&round["wire-bytes"]),
                round["seconds"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "disk update data      {} MB logical, {} MB on the wire (after round 1)",
            mb(&disk["update-logical-bytes"]),
            mb(&disk["update-wire-bytes"])
        );
    }
    println!("disk on the wire      {} MB", mb(&disk["total-wire-bytes"]));
}

/// The one line `--recover` prints.
pub fn recovered(r: &Value) -> String {
    let actions: Vec<&str> =
        r["actions"].as_array().map_or(Vec::new(), |a| a.iter().filter_map(Value::as_str).collect());
    format!(
        "the guest runs on the {} ({})",
        r["guest"].as_str().unwrap_or("?"),
        if actions.is_empty() { "nothing to do".to_string() } else { actions.join(", ") }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_uses_one_kind_of_unit_and_says_starting_before_any_figure() {
        assert_eq!(progress_detail(0, 0, 0.0), "starting");
        let d = progress_detail(3 << 20, 12 << 20, 2.0 * 1048576.0);
        assert!(d.contains("25% 3 MiB / 12 MiB, 2 MiB/s"), "{d}");
        assert!(d.contains("ETA 5s"), "{d}");
        assert!(!d.contains("MB/s"), "{d}");
    }
}
