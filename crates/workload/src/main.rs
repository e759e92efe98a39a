//! `row-workload`: writes a deterministic skewed block workload to a device with O_DIRECT, or
//! to an NBD export over a Unix socket, paced at a rate, and verifies every written block reads
//! back as its latest version.
//!
//! Built statically by `scripts/build-guest` and run in the test guest as
//! `guest.cmd=row-workload guest.args=--device,/dev/vda,--writes,3000,--verify`; run on a host
//! against a proxy's socket by `scripts/bench-migration` as
//! `row-workload --nbd /run/a/vm1.sock --profile msn --rate 200 --expect-seconds 30 --stop-file F`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use workload::aligned::AlignedBuf;
use workload::nbd::NbdClient;
use workload::presets::expected_overwrite_share;
use workload::{fill_block, inspect, Content, Header, Ledger, Preset, Profile, Workload, BLOCK_SIZE, PRESETS};

const USAGE: &str = "\
usage: row-workload [guest] (--device PATH | --nbd SOCKET) [options]
  --device PATH         block device or file to write (opened with O_DIRECT)
  --nbd SOCKET          NBD server's Unix socket to write to instead (fixed newstyle, NBD_OPT_GO)
  --export NAME         NBD export name (default: the empty name)
  --depth N             NBD requests in flight (default 1)
  --area-blocks N       blocks of 4 KiB in the area (default: the whole device after --first-block)
  --first-block B       device block where the area starts (default 0)
  --hot-blocks H        size of the hot set in blocks (default 0)
  --hot-share S         share of writes to the hot set, 0..1 (default 0.9 with a hot set)
  --sequential          non-hot writes rewrite the area in order instead of at random
  --profile NAME        a preset instead of --hot-blocks/--hot-share/--sequential, sized for the
                        expected number of writes so the run's overwrite share (writes to a block
                        already written in this run / all writes) comes out near the preset's:
                        msn 68%, live-maps 0.6%, display-ads 88%, source-control 84%,
                        map-reduce 51%, bonnie (sequential rewrite of a file area, 3 passes, 67%)
  --expect-writes N     writes the run is expected to make (for --profile; default: --writes,
                        or --rate x --expect-seconds, or --rate x --seconds)
  --expect-seconds S    expected duration of the run (for --profile)
  --rate R              writes per second, paced (default 0: as fast as possible)
  --seconds S           stop after S seconds
  --writes N            stop after N writes (with --seconds: whichever comes first)
  --stop-file PATH      stop writing as soon as PATH exists (as a VM pausing)
  --seed X              workload seed (default 1)
  --verify              afterwards read back every written block and check its version
  --verify-only         write nothing: check the first --writes N writes of the run (same
                        profile and seed) read back as their latest versions
  --at-least            with --verify-only: a block may also hold a later version of this run
                        (after a crash, writes after the N known ones may have landed too)
  --sync                each write is durable when acknowledged (O_DSYNC; over NBD a flush)
  --write-blocks N      each write covers N consecutive 4 KiB blocks (default 1): the area is
                        cut into units of N blocks (a shorter tail is never written) and the
                        profile (--hot-blocks, --profile, --sequential) picks units; every block
                        of a unit gets the unit's version, so --verify stays exact per block
Arguments may also be given as --name=value. Output lines:
  WORKLOAD-START ..., WORKLOAD written=N rate=R/s max-latency-ms=L (about once per second; L: the
  slowest write of that second, as the write call took), WORKLOAD-STOPPED reason=stop-file|seconds|writes,
  WORKLOAD-WRITES-DONE writes=N blocks=B seconds=S rate=R/s overwrite-share=O digest=D
  max-latency-ms=L mean-latency-ms=M write-blocks=N,
  WORKLOAD-VERIFY-OK blocks=N writes=M digest=D | WORKLOAD-VERIFY-FAIL block=B want=V got=...,
  WORKLOAD-DONE writes=N blocks=B overwrite-share=O expected-overwrite-share=E verify=ok|fail|skipped
  (expected-overwrite-share: what the profile predicts for the number of writes made)";

#[derive(Debug)]
struct Args {
    device: String,
    nbd: Option<PathBuf>,
    export: String,
    depth: usize,
    area_blocks: Option<u64>,
    first_block: u64,
    hot_blocks: u64,
    hot_share: Option<f64>,
    sequential: bool,
    profile: Option<&'static Preset>,
    expect_writes: Option<u64>,
    expect_seconds: Option<f64>,
    rate: f64,
    seconds: Option<f64>,
    writes: Option<u64>,
    stop_file: Option<PathBuf>,
    seed: u64,
    verify: bool,
    verify_only: bool,
    at_least: bool,
    sync: bool,
    write_blocks: u64,
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    let parsed = if let Some(hex) = value.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok().and_then(|v| v.to_string().parse().ok())
    } else {
        value.parse().ok()
    };
    parsed.ok_or_else(|| format!("{name}: bad value {value:?}"))
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut it = argv.iter().map(String::as_str).peekable();
    if it.peek() == Some(&"guest") {
        it.next();
    }
    let mut a = Args {
        device: String::new(),
        nbd: None,
        export: String::new(),
        depth: 1,
        area_blocks: None,
        first_block: 0,
        hot_blocks: 0,
        hot_share: None,
        sequential: false,
        profile: None,
        expect_writes: None,
        expect_seconds: None,
        rate: 0.0,
        seconds: None,
        writes: None,
        stop_file: None,
        seed: 1,
        verify: false,
        verify_only: false,
        at_least: false,
        sync: false,
        write_blocks: 1,
    };
    let mut explicit_shape = false;
    while let Some(arg) = it.next() {
        if arg.is_empty() {
            continue; // `guest.args=` with a trailing comma
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().map(str::to_string).ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match name {
            "--device" => a.device = value()?,
            "--nbd" => a.nbd = Some(PathBuf::from(value()?)),
            "--export" => a.export = value()?,
            "--depth" => a.depth = parse_num(name, &value()?)?,
            "--area-blocks" => a.area_blocks = Some(parse_num(name, &value()?)?),
            "--first-block" => a.first_block = parse_num(name, &value()?)?,
            "--hot-blocks" => {
                a.hot_blocks = parse_num(name, &value()?)?;
                explicit_shape = true;
            }
            "--hot-share" => {
                a.hot_share = Some(parse_num(name, &value()?)?);
                explicit_shape = true;
            }
            "--profile" => {
                let v = value()?;
                let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
                a.profile = Some(
                    Preset::find(&v)
                        .ok_or_else(|| format!("--profile: unknown {v:?} (one of {})", names.join(", ")))?,
                );
            }
            "--expect-writes" => a.expect_writes = Some(parse_num(name, &value()?)?),
            "--expect-seconds" => a.expect_seconds = Some(parse_num(name, &value()?)?),
            "--rate" => a.rate = parse_num(name, &value()?)?,
            "--seconds" => a.seconds = Some(parse_num(name, &value()?)?),
            "--writes" => a.writes = Some(parse_num(name, &value()?)?),
            "--stop-file" => a.stop_file = Some(PathBuf::from(value()?)),
            "--seed" => a.seed = parse_num(name, &value()?)?,
            "--sequential" => {
                a.sequential = true;
                explicit_shape = true;
            }
            "--verify" => a.verify = true,
            "--verify-only" => a.verify_only = true,
            "--at-least" => a.at_least = true,
            "--sync" => a.sync = true,
            "--write-blocks" => a.write_blocks = parse_num(name, &value()?)?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (a.device.is_empty(), &a.nbd) {
        (true, None) => return Err("--device or --nbd is required".into()),
        (false, Some(_)) => return Err("--device and --nbd exclude each other".into()),
        _ => {}
    }
    if a.verify_only {
        if a.writes.is_none() {
            return Err("--verify-only needs --writes N".into());
        }
    } else if a.seconds.is_none() && a.writes.is_none() && a.stop_file.is_none() {
        return Err("one of --seconds, --writes or --stop-file is required".into());
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        return Err("--rate must be >= 0".into());
    }
    if a.depth == 0 {
        return Err("--depth must be at least 1".into());
    }
    if !(1..=MAX_WRITE_BLOCKS).contains(&a.write_blocks) {
        return Err(format!("--write-blocks must be 1..={MAX_WRITE_BLOCKS}"));
    }
    if a.profile.is_some() && explicit_shape {
        return Err("--profile excludes --hot-blocks, --hot-share and --sequential".into());
    }
    if a.profile.is_some() && a.expected_writes().is_none() {
        return Err("--profile needs the expected number of writes: --expect-writes, --writes, \
                    or --rate with --expect-seconds or --seconds"
            .into());
    }
    Ok(a)
}

impl Args {
    /// How many writes the run is expected to make, to size a `--profile`.
    fn expected_writes(&self) -> Option<u64> {
        if let Some(n) = self.expect_writes {
            return Some(n);
        }
        let by_time = (self.rate > 0.0)
            .then(|| self.expect_seconds.or(self.seconds).map(|s| (s * self.rate).round() as u64))
            .flatten();
        match (by_time, self.writes) {
            (Some(t), Some(w)) => Some(t.min(w)),
            (t, w) => t.or(w),
        }
    }
}

/// Most blocks one write may cover (1 MiB).
const MAX_WRITE_BLOCKS: u64 = 256;
/// Blocks read at once by the verification (consecutive written blocks).
const VERIFY_CHUNK_BLOCKS: u64 = 64;

/// The worst and the mean time the writes took, per interval and over the run.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Latency {
    count: u64,
    total: Duration,
    max: Duration,
}

impl Latency {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total += d;
        self.max = self.max.max(d);
    }

    fn max_ms(&self) -> f64 {
        self.max.as_secs_f64() * 1e3
    }

    fn mean_ms(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total.as_secs_f64() * 1e3 / self.count as f64
        }
    }
}

/// Runs of consecutive blocks of `blocks` (ascending), each at most `max` long: `(first, len)`.
fn runs(blocks: impl IntoIterator<Item = u64>, max: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some((first, len)) if *first + *len == b && *len < max => *len += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Where the blocks go: a device opened with O_DIRECT, or an NBD export.
enum Target {
    Device(File),
    Nbd(NbdClient),
}

impl Target {
    fn open(a: &Args) -> Result<(Self, u64, String), String> {
        if let Some(socket) = &a.nbd {
            let c = NbdClient::connect(socket, &a.export, a.depth)
                .map_err(|e| format!("cannot connect to NBD socket {}: {e}", socket.display()))?;
            if c.read_only() && !a.verify_only {
                return Err(format!("NBD export {:?} at {} is read-only", a.export, socket.display()));
            }
            let size = c.size();
            return Ok((Target::Nbd(c), size, format!("nbd:{}", socket.display())));
        }
        let mut file: File = OpenOptions::new()
            .read(true)
            .write(!a.verify_only)
            .custom_flags(libc::O_DIRECT | if a.sync { libc::O_DSYNC } else { 0 })
            .open(&a.device)
            .map_err(|e| format!("cannot open {}: {e}", a.device))?;
        let size = file.seek(SeekFrom::End(0)).map_err(|e| format!("cannot size {}: {e}", a.device))?;
        Ok((Target::Device(file), size, a.device.clone()))
    }

    /// Writes whole blocks from `block` on (an NBD write may still be in flight on return).
    fn write_blocks(&mut self, data: &[u8], block: u64) -> std::io::Result<()> {
        let offset = block * BLOCK_SIZE as u64;
        match self {
            Target::Device(f) => f.write_all_at(data, offset),
            Target::Nbd(c) => c.submit_write(offset, data),
        }
    }

    /// Waits for the writes in flight and makes them durable.
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Target::Device(f) => f.sync_all(),
            Target::Nbd(c) => c.flush(),
        }
    }

    fn read_blocks(&mut self, buf: &mut [u8], block: u64) -> std::io::Result<()> {
        let offset = block * BLOCK_SIZE as u64;
        match self {
            Target::Device(f) => f.read_exact_at(buf, offset),
            Target::Nbd(c) => c.read_at(buf, offset),
        }
    }

    fn close(self) {
        if let Target::Nbd(c) = self {
            let _ = c.disconnect();
        }
    }
}

/// Why the writes stopped.
fn stop_reason(a: &Args, written: u64, max_writes: u64, deadline: Option<Instant>) -> Option<&'static str> {
    if written >= max_writes {
        return Some("writes");
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Some("seconds");
    }
    if a.stop_file.as_deref().is_some_and(Path::exists) {
        return Some("stop-file");
    }
    None
}

/// Reads back every block of the ledger; returns whether all hold their latest version.
fn verify(target: &mut Target, a: &Args, ledger: &Ledger, written: u64) -> Result<bool, String> {
    let mut buf = AlignedBuf::new(VERIFY_CHUNK_BLOCKS);
    let mut bad = 0u64;
    for (first, len) in runs(ledger.iter().map(|(b, _)| b), VERIFY_CHUNK_BLOCKS) {
        let (start, bytes) = (a.first_block + first, len as usize * BLOCK_SIZE);
        let chunk = &mut buf.as_mut_slice()[..bytes];
        target.read_blocks(chunk, start).map_err(|e| format!("read of blocks {start}+{len} failed: {e}"))?;
        for (i, data) in chunk.chunks(BLOCK_SIZE).enumerate() {
            let block = start + i as u64;
            let want = ledger.latest(first + i as u64);
            let got = inspect(data, a.seed);
            let ok = match got {
                Content::Valid(Header { block: b, version }) if b == block => {
                    version == want || (a.at_least && version > want)
                }
                _ => false,
            };
            if !ok {
                bad += 1;
                if bad <= 20 {
                    say(&format!("WORKLOAD-VERIFY-FAIL block={block} want={want} got={got}"));
                }
            }
        }
    }
    if bad > 0 {
        say(&format!("WORKLOAD-VERIFY-FAIL bad={bad} blocks={} writes={}", ledger.blocks_written(), written));
        return Ok(false);
    }
    say(&format!(
        "WORKLOAD-VERIFY-OK blocks={} writes={written} digest={:016x}",
        ledger.blocks_written(),
        ledger.digest()
    ));
    Ok(true)
}

fn run(a: &Args) -> Result<bool, String> {
    let (mut target, device_bytes, what) = Target::open(a)?;
    let device_blocks = device_bytes / BLOCK_SIZE as u64;
    if a.first_block >= device_blocks {
        return Err(format!("--first-block {} is past the device ({device_blocks} blocks)", a.first_block));
    }
    let area_blocks = a.area_blocks.unwrap_or(device_blocks - a.first_block);
    // The generator's area counts units of --write-blocks blocks.
    let area_units = area_blocks / a.write_blocks;
    if area_units == 0 {
        return Err(format!("area of {area_blocks} blocks is smaller than one write of {}", a.write_blocks));
    }
    if a.first_block + area_blocks > device_blocks {
        return Err(format!(
            "area {}+{area_blocks} blocks does not fit the device ({device_blocks} blocks)",
            a.first_block
        ));
    }
    let profile = match a.profile {
        Some(preset) => preset.profile_for(area_units, a.expected_writes().expect("checked by parse_args")),
        None => {
            let hot_share = a.hot_share.unwrap_or(if a.hot_blocks > 0 { 0.9 } else { 0.0 });
            Profile {
                area_blocks: area_units,
                hot_blocks: a.hot_blocks,
                hot_share,
                sequential: a.sequential,
                fresh: false,
            }
        }
    };
    profile.validate().map_err(|e| e.to_string())?;
    let expected_writes = a.expected_writes();
    let expected_share = expected_writes.map(|n| expected_overwrite_share(&profile, n));
    say(&format!(
        "WORKLOAD-START device={what} first-block={} area-blocks={} hot-blocks={} hot-share={} \
         sequential={} profile={} expected-writes={} expected-overwrite-share={} rate={} seconds={} writes={} \
         depth={} seed={} write-blocks={}{}",
        a.first_block,
        profile.area_blocks * a.write_blocks,
        profile.hot_blocks,
        profile.hot_share,
        profile.sequential,
        a.profile.map_or("-", |p| p.name),
        expected_writes.map_or("-".into(), |n| n.to_string()),
        expected_share.map_or("-".into(), |s| format!("{s:.4}")),
        a.rate,
        a.seconds.map_or("-".into(), |s| s.to_string()),
        a.writes.map_or("-".into(), |w| w.to_string()),
        a.depth,
        a.seed,
        a.write_blocks,
        if a.verify_only { " verify-only" } else { "" }
    ));

    if a.verify_only {
        let n = a.writes.expect("checked by parse_args");
        let ledger = Workload::ledger_after_with(profile, a.seed, a.write_blocks, n);
        let ok = verify(&mut target, a, &ledger, n)?;
        target.close();
        return Ok(ok);
    }

    let mut work = Workload::with_write_blocks(profile, a.seed, a.write_blocks);
    let mut buf = AlignedBuf::new(a.write_blocks);
    let (mut lat_run, mut lat_second) = (Latency::default(), Latency::default());
    let start = Instant::now();
    let deadline = a.seconds.map(|s| start + Duration::from_secs_f64(s));
    let max_writes = a.writes.unwrap_or(u64::MAX);
    let mut written = 0u64;
    let mut last_report = start;
    let mut written_at_report = 0u64;
    let reason = loop {
        if let Some(reason) = stop_reason(a, written, max_writes, deadline) {
            break reason;
        }
        if a.rate > 0.0 {
            // Pace against the schedule, not the previous write, so stalls are caught up.
            let due = start + Duration::from_secs_f64(written as f64 / a.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if let Some(reason) = stop_reason(a, written, max_writes, deadline) {
                break reason;
            }
        }
        let w = work.next_write();
        let block = a.first_block + w.block;
        for (i, data) in buf.as_mut_slice().chunks_mut(BLOCK_SIZE).enumerate() {
            fill_block(data, block + i as u64, w.version, a.seed);
        }
        let t_write = Instant::now();
        target
            .write_blocks(buf.as_slice(), block)
            .map_err(|e| format!("write {} (block {block} version {}) failed: {e}", written + 1, w.version))?;
        if a.sync {
            if let Target::Nbd(c) = &mut target {
                c.flush().map_err(|e| format!("flush after write {} failed: {e}", written + 1))?;
            }
        }
        let took = t_write.elapsed();
        lat_run.add(took);
        lat_second.add(took);
        written += 1;
        let now = Instant::now();
        if now - last_report >= Duration::from_secs(1) {
            let rate = (written - written_at_report) as f64 / (now - last_report).as_secs_f64();
            say(&format!("WORKLOAD written={written} rate={rate:.0}/s max-latency-ms={:.1}", lat_second.max_ms()));
            last_report = now;
            written_at_report = written;
            lat_second = Latency::default();
        }
    };
    let secs = start.elapsed().as_secs_f64();
    say(&format!("WORKLOAD-STOPPED reason={reason} writes={written} seconds={secs:.3}"));
    target.flush().map_err(|e| format!("flush failed: {e}"))?;
    let ledger = &work.ledger;
    let share = ledger.overwrite_share();
    say(&format!(
        "WORKLOAD-WRITES-DONE writes={written} blocks={} seconds={secs:.1} rate={:.0}/s overwrite-share={share:.4} \
         digest={:016x} max-latency-ms={:.1} mean-latency-ms={:.2} write-blocks={}",
        ledger.blocks_written(),
        written as f64 / secs.max(1e-9),
        ledger.digest(),
        lat_run.max_ms(),
        lat_run.mean_ms(),
        a.write_blocks
    ));
    let verified = if a.verify { Some(verify(&mut target, a, ledger, written)?) } else { None };
    target.close();
    say(&format!(
        "WORKLOAD-DONE writes={written} blocks={} overwrite-share={share:.4} expected-overwrite-share={:.4} verify={}",
        ledger.blocks_written(),
        expected_overwrite_share(work.generator.profile(), written),
        match verified {
            Some(true) => "ok",
            Some(false) => "fail",
            None => "skipped",
        }
    ));
    Ok(verified != Some(false))
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
            eprintln!("row-workload: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            say(&format!("WORKLOAD-ERROR {e}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(&s.split(',').map(str::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn parses_guest_args_style_lists() {
        let a = args("guest,--device,/dev/vda,--area-blocks,8192,--hot-blocks=256,--hot-share,0.8,--rate,150,--writes,4000,--seed,0x10,--verify,").unwrap();
        assert_eq!(a.device, "/dev/vda");
        assert_eq!(a.area_blocks, Some(8192));
        assert_eq!(a.hot_blocks, 256);
        assert_eq!(a.hot_share, Some(0.8));
        assert_eq!(a.rate, 150.0);
        assert_eq!(a.writes, Some(4000));
        assert_eq!(a.seed, 16);
        assert!(a.verify && !a.sequential);
        assert!(args("--device,/dev/vda").unwrap_err().contains("--seconds"));
        assert!(args("--writes,1").unwrap_err().contains("--device"));
        assert!(args("--device,/x,--writes").unwrap_err().contains("needs a value"));
        assert!(args("--device,/x,--writes,1,--bogus").unwrap_err().contains("bogus"));
        assert!(args("--device,/x,--writes,abc").unwrap_err().contains("bad value"));
    }

    #[test]
    fn parses_nbd_profile_and_stop_file_options() {
        let a = args("--nbd,/run/a.sock,--profile,msn,--rate,200,--expect-seconds,30,--stop-file,/tmp/stop,--depth,4")
            .unwrap();
        assert_eq!(a.nbd.as_deref(), Some(Path::new("/run/a.sock")));
        assert_eq!(a.profile.unwrap().name, "msn");
        assert_eq!(a.expected_writes(), Some(6000));
        assert_eq!(a.stop_file.as_deref(), Some(Path::new("/tmp/stop")));
        assert_eq!(a.depth, 4);
        assert_eq!(args("--nbd,/s,--profile,bonnie,--writes,500").unwrap().expected_writes(), Some(500));
        assert_eq!(
            args("--nbd,/s,--profile,msn,--rate,10,--seconds,9,--expect-writes,7").unwrap().expected_writes(),
            Some(7)
        );
        assert!(args("--nbd,/s,--profile,msn,--stop-file,/x").unwrap_err().contains("expected number"));
        assert!(args("--nbd,/s,--profile,nope,--writes,1").unwrap_err().contains("live-maps"));
        assert!(args("--nbd,/s,--profile,msn,--hot-blocks,3,--writes,1").unwrap_err().contains("excludes"));
        assert!(args("--nbd,/s,--device,/d,--writes,1").unwrap_err().contains("exclude"));
        assert!(args("--nbd,/s,--verify-only").unwrap_err().contains("--writes"));
        assert!(args("--nbd,/s,--stop-file,/x").is_ok());
    }

    /// A one-connection NBD server over an in-memory disk, speaking just what the client uses.
    fn fake_nbd_server(socket: &Path, size: usize) -> std::thread::JoinHandle<Vec<u8>> {
        fake_nbd_server_over(socket, vec![0u8; size])
    }

    /// The same over a disk holding `disk`.
    fn fake_nbd_server_over(socket: &Path, mut disk: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
        let size = disk.len();
        use nbd_proto::consts::*;
        use nbd_proto::transmission::encode_simple_reply;
        use nbd_proto::{Command, Greeting, InfoReply, OptionReply, OptionReplyKind, RawOption, Request};
        use std::io::Read;
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut out = Vec::new();
            Greeting { handshake_flags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES }.encode(&mut out);
            s.write_all(&out).unwrap();
            let mut buf = Vec::new();
            let fill = |s: &mut std::os::unix::net::UnixStream, buf: &mut Vec<u8>, n: usize| {
                while buf.len() < n {
                    let mut tmp = [0u8; 65536];
                    let got = s.read(&mut tmp).unwrap();
                    if got == 0 {
                        return false;
                    }
                    buf.extend_from_slice(&tmp[..got]);
                }
                true
            };
            assert!(fill(&mut s, &mut buf, 4));
            buf.drain(..4);
            let opt = loop {
                if let Some((o, used)) = RawOption::decode(&buf).unwrap() {
                    buf.drain(..used);
                    break o;
                }
                let n = buf.len() + 1;
                assert!(fill(&mut s, &mut buf, n));
            };
            assert_eq!(opt.option, NBD_OPT_GO);
            let mut out = Vec::new();
            let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH;
            OptionReply {
                option: NBD_OPT_GO,
                kind: OptionReplyKind::Info(InfoReply::Export { size: size as u64, transmission_flags: flags }),
            }
            .encode(&mut out);
            OptionReply::ack(NBD_OPT_GO).encode(&mut out);
            s.write_all(&out).unwrap();
            loop {
                if !fill(&mut s, &mut buf, REQUEST_LEN) {
                    return disk;
                }
                let (req, used) = Request::decode(&buf).unwrap().unwrap();
                buf.drain(..used);
                let (off, len) = (req.offset as usize, req.length as usize);
                let mut out = Vec::new();
                match req.command {
                    Command::Write => {
                        assert!(fill(&mut s, &mut buf, len));
                        disk[off..off + len].copy_from_slice(&buf[..len]);
                        buf.drain(..len);
                        encode_simple_reply(req.cookie, 0, &mut out);
                    }
                    Command::Read => {
                        encode_simple_reply(req.cookie, 0, &mut out);
                        out.extend_from_slice(&disk[off..off + len]);
                    }
                    Command::Flush => encode_simple_reply(req.cookie, 0, &mut out),
                    Command::Disc => return disk,
                    other => panic!("unexpected {other:?}"),
                }
                s.write_all(&out).unwrap();
            }
        })
    }

    #[test]
    fn writes_and_verifies_an_nbd_export_with_pipelining_and_a_stop_file() {
        let dir = std::env::temp_dir().join(format!("row-workload-nbd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nbd.sock");
        let server = fake_nbd_server(&socket, 1 << 20);
        let a = args(&format!(
            "--nbd,{},--profile,display-ads,--expect-writes,2000,--writes,2000,--depth,8,--verify,--seed,5",
            socket.display()
        ))
        .unwrap();
        assert!(run(&a).unwrap());
        let disk = server.join().unwrap();
        let profile = Preset::find("display-ads").unwrap().profile_for(256, 2000);
        let ledger = Workload::ledger_after(profile, 5, 2000);
        for b in 0..256u64 {
            let off = b as usize * BLOCK_SIZE;
            let got = inspect(&disk[off..off + BLOCK_SIZE], 5);
            match ledger.latest(b) {
                0 => assert_eq!(got, Content::Zero),
                v => assert_eq!(got, Content::Valid(Header { block: b, version: v }), "block {b}"),
            }
        }
        // A second run checks the same writes with --verify-only, then a stop file ends a run.
        std::fs::remove_file(&socket).unwrap();
        let server = fake_nbd_server(&socket, 1 << 20);
        let stop = dir.join("stop");
        std::fs::write(&stop, b"").unwrap();
        let a = args(&format!("--nbd,{},--stop-file,{},--rate,100", socket.display(), stop.display())).unwrap();
        assert!(run(&a).unwrap());
        assert!(server.join().unwrap().iter().all(|&b| b == 0), "nothing written after the stop file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runs_group_consecutive_blocks_up_to_a_length() {
        assert_eq!(runs([], 4), []);
        assert_eq!(runs([3, 4, 5, 9, 10, 12], 64), [(3, 3), (9, 2), (12, 1)]);
        assert_eq!(runs(0..10, 4), [(0, 4), (4, 4), (8, 2)]);
    }

    #[test]
    fn latency_keeps_the_worst_and_the_mean() {
        let mut l = Latency::default();
        assert_eq!((l.max_ms(), l.mean_ms()), (0.0, 0.0));
        l.add(Duration::from_millis(2));
        l.add(Duration::from_millis(10));
        l.add(Duration::from_millis(3));
        assert_eq!(l.max_ms(), 10.0);
        assert!((l.mean_ms() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn multi_block_writes_land_and_verify_exactly() {
        assert_eq!(args("--device,/x,--writes,1").unwrap().write_blocks, 1);
        assert_eq!(args("--device,/x,--writes,1,--write-blocks,16").unwrap().write_blocks, 16);
        assert!(args("--device,/x,--writes,1,--write-blocks,0").unwrap_err().contains("--write-blocks"));
        assert!(args("--device,/x,--writes,1,--write-blocks,257").unwrap_err().contains("--write-blocks"));
        let dir = std::env::temp_dir().join(format!("row-workload-multi-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nbd.sock");
        // 1 MiB = 256 blocks from block 3: 15 units of 16 blocks (the 13-block tail is never
        // written); 20 sequential writes wrap once, so units 0..5 hold version 2.
        let server = fake_nbd_server(&socket, 1 << 20);
        let common = format!("--nbd,{},--first-block,3,--sequential,--write-blocks,16,--seed,9", socket.display());
        let a = args(&format!("{common},--writes,20,--verify")).unwrap();
        assert!(run(&a).unwrap());
        let disk = server.join().unwrap();
        for b in 0..256u64 {
            let off = b as usize * BLOCK_SIZE;
            let got = inspect(&disk[off..off + BLOCK_SIZE], 9);
            let want = match b {
                0..=2 | 243.. => Content::Zero,
                b if b < 3 + 5 * 16 => Content::Valid(Header { block: b, version: 2 }),
                b => Content::Valid(Header { block: b, version: 1 }),
            };
            assert_eq!(got, want, "block {b}");
        }
        // --verify-only replays the same multi-block writes: 20 pass, 21 do not (unit 5 would
        // hold version 2), and one torn block inside a unit is caught.
        let verify_only = |disk: &Vec<u8>, writes: u32| {
            std::fs::remove_file(&socket).unwrap();
            let server = fake_nbd_server_over(&socket, disk.clone());
            let ok = run(&args(&format!("{common},--writes,{writes},--verify-only")).unwrap()).unwrap();
            server.join().unwrap();
            ok
        };
        assert!(verify_only(&disk, 20));
        assert!(!verify_only(&disk, 21));
        let mut torn = disk;
        torn[(3 + 7 * 16 + 9) * BLOCK_SIZE + 100] ^= 1;
        assert!(!verify_only(&torn, 20));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_and_verifies_a_file() {
        let dir = std::env::temp_dir().join(format!("row-workload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let a = args(&format!(
            "--device,{},--first-block,16,--area-blocks,64,--hot-blocks,4,--writes,500,--verify",
            path.display()
        ))
        .unwrap();
        // Some filesystems (tmpfs) refuse O_DIRECT; there is nothing to test then.
        match run(&a) {
            Ok(ok) => assert!(ok),
            Err(e) if e.contains("cannot open") => eprintln!("skipped: {e}"),
            Err(e) => panic!("{e}"),
        }
        // After a crash only the first N writes are known to be acknowledged: later versions
        // must pass with --at-least, and only with it.
        if let Ok(true) = run(&a) {
            let at = |extra: &str| {
                args(&format!(
                    "--device,{},--first-block,16,--area-blocks,64,--hot-blocks,4,--writes,300,--verify-only{extra}",
                    path.display()
                ))
                .unwrap()
            };
            assert!(!run(&at("")).unwrap(), "later versions are not the first 300 writes' latest");
            assert!(run(&at(",--at-least")).unwrap());
            assert!(args("--device,/x,--sync,--writes,1").unwrap().sync);
        }
        let data = std::fs::read(&path).unwrap_or_default();
        if !data.is_empty() && data[16 * BLOCK_SIZE..].iter().any(|&b| b != 0) {
            let ledger = Workload::ledger_after(Profile::skewed(64, 4, 0.9), 1, 500);
            for b in 0..64u64 {
                let off = ((16 + b) as usize) * BLOCK_SIZE;
                let got = inspect(&data[off..off + BLOCK_SIZE], 1);
                match ledger.latest(b) {
                    0 => assert_eq!(got, Content::Zero),
                    v => assert_eq!(got, Content::Valid(Header { block: 16 + b, version: v })),
                }
            }
            assert!(data[..16 * BLOCK_SIZE].iter().all(|&b| b == 0));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
