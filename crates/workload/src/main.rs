//! `row-workload`: writes a deterministic skewed block workload to a device with O_DIRECT,
//! paced at a rate, and verifies every written block reads back as its latest version.
//!
//! Built statically by `scripts/build-guest` and run in the test guest as
//! `guest.cmd=row-workload guest.args=--device,/dev/vda,--writes,3000,--verify`.

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use workload::{fill_block, inspect, Content, Header, Profile, Workload, BLOCK_SIZE};

const USAGE: &str = "\
usage: row-workload [guest] --device PATH [options]
  --device PATH         block device or file to write (opened with O_DIRECT)
  --area-blocks N       blocks of 4 KiB in the area (default: the whole device after --first-block)
  --first-block B       device block where the area starts (default 0)
  --hot-blocks H        size of the hot set in blocks (default 0)
  --hot-share S         share of writes to the hot set, 0..1 (default 0.9 with a hot set)
  --sequential          non-hot writes rewrite the area in order instead of at random
  --rate R              writes per second, paced (default 0: as fast as possible)
  --seconds S           stop after S seconds
  --writes N            stop after N writes (with --seconds: whichever comes first)
  --seed X              workload seed (default 1)
  --verify              afterwards read back every written block and check its version
Arguments may also be given as --name=value. Output lines:
  WORKLOAD-START ..., WORKLOAD written=N rate=R/s (about once per second),
  WORKLOAD-WRITES-DONE writes=N blocks=B seconds=S digest=D,
  WORKLOAD-VERIFY-OK blocks=N writes=M digest=D | WORKLOAD-VERIFY-FAIL block=B want=V got=...";

#[derive(Debug)]
struct Args {
    device: String,
    area_blocks: Option<u64>,
    first_block: u64,
    hot_blocks: u64,
    hot_share: Option<f64>,
    sequential: bool,
    rate: f64,
    seconds: Option<f64>,
    writes: Option<u64>,
    seed: u64,
    verify: bool,
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
        area_blocks: None,
        first_block: 0,
        hot_blocks: 0,
        hot_share: None,
        sequential: false,
        rate: 0.0,
        seconds: None,
        writes: None,
        seed: 1,
        verify: false,
    };
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
            "--area-blocks" => a.area_blocks = Some(parse_num(name, &value()?)?),
            "--first-block" => a.first_block = parse_num(name, &value()?)?,
            "--hot-blocks" => a.hot_blocks = parse_num(name, &value()?)?,
            "--hot-share" => a.hot_share = Some(parse_num(name, &value()?)?),
            "--rate" => a.rate = parse_num(name, &value()?)?,
            "--seconds" => a.seconds = Some(parse_num(name, &value()?)?),
            "--writes" => a.writes = Some(parse_num(name, &value()?)?),
            "--seed" => a.seed = parse_num(name, &value()?)?,
            "--sequential" => a.sequential = true,
            "--verify" => a.verify = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.device.is_empty() {
        return Err("--device is required".into());
    }
    if a.seconds.is_none() && a.writes.is_none() {
        return Err("one of --seconds or --writes is required".into());
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        return Err("--rate must be >= 0".into());
    }
    Ok(a)
}

/// One 4 KiB buffer aligned to 4096 bytes, as O_DIRECT wants.
struct AlignedBlock {
    ptr: *mut u8,
}

impl AlignedBlock {
    const LAYOUT: Layout = match Layout::from_size_align(BLOCK_SIZE, 4096) {
        Ok(l) => l,
        Err(_) => panic!("bad layout"),
    };

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(Self::LAYOUT);
        }
        Self { ptr }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to BLOCK_SIZE initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, BLOCK_SIZE) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, BLOCK_SIZE) }
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::LAYOUT) }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(a: &Args) -> Result<bool, String> {
    let mut file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.device)
        .map_err(|e| format!("cannot open {}: {e}", a.device))?;
    let device_bytes = file.seek(SeekFrom::End(0)).map_err(|e| format!("cannot size {}: {e}", a.device))?;
    let device_blocks = device_bytes / BLOCK_SIZE as u64;
    if a.first_block >= device_blocks {
        return Err(format!("--first-block {} is past the device ({device_blocks} blocks)", a.first_block));
    }
    let area_blocks = a.area_blocks.unwrap_or(device_blocks - a.first_block);
    if a.first_block + area_blocks > device_blocks {
        return Err(format!(
            "area {}+{area_blocks} blocks does not fit the device ({device_blocks} blocks)",
            a.first_block
        ));
    }
    let hot_share = a.hot_share.unwrap_or(if a.hot_blocks > 0 { 0.9 } else { 0.0 });
    let profile = Profile { area_blocks, hot_blocks: a.hot_blocks, hot_share, sequential: a.sequential };
    profile.validate().map_err(|e| e.to_string())?;
    say(&format!(
        "WORKLOAD-START device={} first-block={} area-blocks={area_blocks} hot-blocks={} hot-share={hot_share} \
         sequential={} rate={} seconds={} writes={} seed={}",
        a.device,
        a.first_block,
        a.hot_blocks,
        a.sequential,
        a.rate,
        a.seconds.map_or("-".into(), |s| s.to_string()),
        a.writes.map_or("-".into(), |w| w.to_string()),
        a.seed
    ));

    let mut work = Workload::new(profile, a.seed);
    let mut buf = AlignedBlock::new();
    let start = Instant::now();
    let deadline = a.seconds.map(|s| start + Duration::from_secs_f64(s));
    let max_writes = a.writes.unwrap_or(u64::MAX);
    let mut written = 0u64;
    let mut last_report = start;
    let mut written_at_report = 0u64;
    while written < max_writes {
        if a.rate > 0.0 {
            // Pace against the schedule, not the previous write, so stalls are caught up.
            let due = start + Duration::from_secs_f64(written as f64 / a.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let w = work.next_write();
        let block = a.first_block + w.block;
        fill_block(buf.as_mut_slice(), block, w.version, a.seed);
        file.write_all_at(buf.as_slice(), block * BLOCK_SIZE as u64)
            .map_err(|e| format!("write of block {block} version {} failed: {e}", w.version))?;
        written += 1;
        let now = Instant::now();
        if now - last_report >= Duration::from_secs(1) {
            let rate = (written - written_at_report) as f64 / (now - last_report).as_secs_f64();
            say(&format!("WORKLOAD written={written} rate={rate:.0}/s"));
            last_report = now;
            written_at_report = written;
        }
    }
    file.sync_all().map_err(|e| format!("flush failed: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let ledger = &work.ledger;
    say(&format!(
        "WORKLOAD-WRITES-DONE writes={written} blocks={} seconds={secs:.1} rate={:.0}/s digest={:016x}",
        ledger.blocks_written(),
        written as f64 / secs.max(1e-9),
        ledger.digest()
    ));

    if !a.verify {
        return Ok(true);
    }
    let mut bad = 0u64;
    for (b, want) in ledger.iter() {
        let block = a.first_block + b;
        file.read_exact_at(buf.as_mut_slice(), block * BLOCK_SIZE as u64)
            .map_err(|e| format!("read of block {block} failed: {e}"))?;
        let got = inspect(buf.as_slice(), a.seed);
        if got != Content::Valid(Header { block, version: want }) {
            bad += 1;
            if bad <= 20 {
                say(&format!("WORKLOAD-VERIFY-FAIL block={block} want={want} got={got}"));
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
