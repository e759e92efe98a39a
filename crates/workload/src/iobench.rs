//! `row-iobench`: what a guest's disk delivers, measured from inside the guest. Random 4 KiB
//! reads and writes at queue depth 1 and 32, and sequential 1 MiB reads and writes, with
//! O_DIRECT on a block device, so the guest's page cache is out of the way and every request
//! reaches the virtual disk (and whatever serves it on the host).
//!
//! Built statically by `scripts/build-guest`; run by `scripts/bench-guest` in the test guest as
//! `guest.cmd=row-iobench guest.args=--device,/dev/vda,--seconds,5`. A depth of N is N threads,
//! each with one request in flight (as fio's psync engine with N jobs): the busybox guest has no
//! libaio, and a virtio-blk queue sees N requests either way.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use workload::aligned::AlignedBuf;
use workload::{mix64, BLOCK_SIZE};

const USAGE: &str = "\
usage: row-iobench --device PATH [--seconds S] [--jobs NAME,NAME...] [--area-mib N]
  --device PATH    block device or file (opened with O_DIRECT; write jobs overwrite its data)
  --seconds S      how long each job runs (default 5)
  --jobs LIST      which jobs, in this order, separated by + or , (default: all, in the
                   order below; the guest's init splits its arguments on commas):
                   rand-read-4k-qd1 rand-read-4k-qd32 seq-read-1m
                   rand-write-4k-qd1 rand-write-4k-qd32 seq-write-1m
  --area-mib N     the jobs use the first N MiB of the device (default: all of it)
Output lines:
  IOBENCH-START device=PATH size=BYTES area=BYTES seconds=S
  IOBENCH job=NAME ops=N bytes=B seconds=S iops=X mib-per-s=Y mean-latency-us=L
  IOBENCH-DONE jobs=N | IOBENCH-FAIL job=NAME error=...";

/// One measurement: a request size, a pattern and a number of requests in flight.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Job {
    name: &'static str,
    write: bool,
    random: bool,
    blocks: u64,
    depth: usize,
}

const JOBS: [Job; 6] = [
    Job { name: "rand-read-4k-qd1", write: false, random: true, blocks: 1, depth: 1 },
    Job { name: "rand-read-4k-qd32", write: false, random: true, blocks: 1, depth: 32 },
    Job { name: "seq-read-1m", write: false, random: false, blocks: 256, depth: 1 },
    Job { name: "rand-write-4k-qd1", write: true, random: true, blocks: 1, depth: 1 },
    Job { name: "rand-write-4k-qd32", write: true, random: true, blocks: 1, depth: 32 },
    Job { name: "seq-write-1m", write: true, random: false, blocks: 256, depth: 1 },
];

#[derive(Debug)]
struct Args {
    device: String,
    seconds: f64,
    jobs: Vec<Job>,
    area_mib: Option<u64>,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args { device: String::new(), seconds: 5.0, jobs: JOBS.to_vec(), area_mib: None };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("{name} needs a value"));
        match name {
            "--device" => a.device = value()?,
            "--seconds" => {
                a.seconds = value()?.parse().map_err(|_| "--seconds: a number".to_string())?;
                if !(a.seconds > 0.0 && a.seconds < 86_400.0) {
                    return Err("--seconds: more than 0, less than a day".into());
                }
            }
            "--jobs" => a.jobs = parse_jobs(&value()?)?,
            "--area-mib" => {
                let n: u64 = value()?.parse().map_err(|_| "--area-mib: a whole number".to_string())?;
                a.area_mib = Some(n.max(1));
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if a.device.is_empty() {
        return Err("--device is required".into());
    }
    Ok(a)
}

fn parse_jobs(list: &str) -> Result<Vec<Job>, String> {
    list.split([',', '+'])
        .filter(|n| !n.is_empty())
        .map(|n| JOBS.iter().find(|j| j.name == n).copied().ok_or(format!("unknown job {n:?}")))
        .collect()
}

/// What one job measured.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Tally {
    ops: u64,
    busy: Duration,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ops += other.ops;
        self.busy += other.busy;
    }
}

/// The offset of a job's `n`th request from thread `thread`: random ones spread over the area by
/// a mixer (no two threads share a sequence), sequential ones one after the other, wrapping.
fn offset(job: &Job, area_units: u64, thread: usize, n: u64) -> u64 {
    let unit = if job.random { mix64(((thread as u64) << 40) ^ n ^ 0x5eed) % area_units } else { n % area_units };
    unit * job.blocks * BLOCK_SIZE as u64
}

/// Runs `job` on `file` for `seconds`: `job.depth` threads, each one request at a time.
fn run_job(file: &File, job: &Job, area: u64, seconds: f64) -> std::io::Result<Tally> {
    let unit = job.blocks * BLOCK_SIZE as u64;
    let area_units = (area / unit).max(1);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..job.depth)
            .map(|t| {
                s.spawn(move || -> std::io::Result<Tally> {
                    let mut buf = AlignedBuf::new(job.blocks);
                    // Data no server can take for zeroes.
                    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
                        *b = (mix64(i as u64 ^ t as u64) & 0xff) as u8 | 1;
                    }
                    let mut tally = Tally::default();
                    while Instant::now() < deadline {
                        let at = offset(job, area_units, t, tally.ops);
                        let start = Instant::now();
                        if job.write {
                            file.write_all_at(buf.as_slice(), at)?;
                        } else {
                            file.read_exact_at(buf.as_mut_slice(), at)?;
                        }
                        tally.busy += start.elapsed();
                        tally.ops += 1;
                    }
                    Ok(tally)
                })
            })
            .collect();
        let mut total = Tally::default();
        for t in threads {
            total.add(t.join().map_err(|_| std::io::Error::other("a job thread panicked"))??);
        }
        Ok(total)
    })
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(a: &Args) -> Result<(), String> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(a.jobs.iter().any(|j| j.write))
        .custom_flags(libc::O_DIRECT)
        .open(&a.device)
        .map_err(|e| format!("{}: {e}", a.device))?;
    let size = file.seek(SeekFrom::End(0)).map_err(|e| format!("{}: size: {e}", a.device))?;
    let area = a.area_mib.map_or(size, |m| (m << 20).min(size));
    if area < 1 << 20 {
        return Err(format!("{}: {area} bytes to work in; need at least 1 MiB", a.device));
    }
    say(&format!("IOBENCH-START device={} size={size} area={area} seconds={}", a.device, a.seconds));
    for job in &a.jobs {
        let started = Instant::now();
        let tally = run_job(&file, job, area, a.seconds).map_err(|e| format!("job={} error={e}", job.name))?;
        let seconds = started.elapsed().as_secs_f64();
        let bytes = tally.ops * job.blocks * BLOCK_SIZE as u64;
        let latency_us = if tally.ops == 0 { 0.0 } else { tally.busy.as_secs_f64() * 1e6 / tally.ops as f64 };
        say(&format!(
            "IOBENCH job={} ops={} bytes={bytes} seconds={seconds:.3} iops={:.0} mib-per-s={:.1} mean-latency-us={latency_us:.0}",
            job.name,
            tally.ops,
            tally.ops as f64 / seconds,
            bytes as f64 / seconds / (1 << 20) as f64,
        ));
    }
    say(&format!("IOBENCH-DONE jobs={}", a.jobs.len()));
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("row-iobench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("IOBENCH-FAIL {e}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_parse_in_the_given_order_and_typos_are_named() {
        let jobs = parse_jobs("seq-write-1m+rand-read-4k-qd1").unwrap();
        assert_eq!(jobs.iter().map(|j| j.name).collect::<Vec<_>>(), ["seq-write-1m", "rand-read-4k-qd1"]);
        assert_eq!(parse_jobs("rand-read-4k").unwrap_err(), "unknown job \"rand-read-4k\"");
        assert!(parse_args(&["--seconds".into(), "1".into()]).unwrap_err().contains("--device"));
        assert!(parse_args(&["--device=/dev/vda".into(), "--seconds=0".into()]).is_err());
    }

    #[test]
    fn offsets_stay_in_the_area_on_unit_boundaries() {
        for job in &JOBS {
            let unit = job.blocks * BLOCK_SIZE as u64;
            let area_units = 100;
            for n in 0..1000 {
                let at = offset(job, area_units, 3, n);
                assert_eq!(at % unit, 0, "{}", job.name);
                assert!(at < area_units * unit, "{}", job.name);
            }
        }
        let seq = &JOBS[2];
        assert_eq!(offset(seq, 10, 0, 11), unit_bytes(seq));
        // Random threads do not walk the same sequence.
        let rand = &JOBS[1];
        let a: Vec<u64> = (0..50).map(|n| offset(rand, 1 << 20, 0, n)).collect();
        let b: Vec<u64> = (0..50).map(|n| offset(rand, 1 << 20, 1, n)).collect();
        assert_ne!(a, b);
    }

    fn unit_bytes(job: &Job) -> u64 {
        job.blocks * BLOCK_SIZE as u64
    }

    #[test]
    fn a_job_on_a_file_counts_its_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        // Not every filesystem takes O_DIRECT (tmpfs does not): the job then runs without it.
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&path);
        let file = file.or_else(|_| OpenOptions::new().read(true).write(true).open(&path)).unwrap();
        let tally = run_job(&file, &JOBS[4], 4 << 20, 0.05).unwrap();
        assert!(tally.ops > 0);
        let written = std::fs::read(&path).unwrap();
        assert!(written.iter().any(|&b| b != 0), "the writes reached the file");
    }
}
