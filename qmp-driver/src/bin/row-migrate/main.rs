//! `row-migrate`: live-migrates a running QEMU guest together with its local disk.
//!
//! It drives the two QEMU processes over QMP and the two nbd-row-proxy processes over their
//! control sockets. For `row` and `bitmap` the proxies move the disk (pre-copy rounds while the
//! guest runs, the final round while QEMU holds the guest paused at `pre-switchover`); for
//! `qemu-mirror` the source QEMU mirrors its drive onto the destination proxy's NBD export, as
//! libvirt's `--copy-storage-all` does.
//!
//! It never lets a guest run on both hosts: before `migrate-continue` any failure rolls back
//! (the disk is given back to the source first, and the guest resumed only once it is); once
//! `migrate-continue` has been sent, nothing is undone and the source guest stays paused.

mod arm;
mod budget;
mod ctx;
mod disks;
mod libvirt;
mod libvirt_recover;
mod mirror;
mod ram;
mod recover;
mod report;
mod rollback;
mod sequence;
mod ssh;
mod verify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::ctx::Failure;

/// Exit codes, documented in `--help` and the README.
pub mod exit {
    /// The guest runs on the destination with its disk.
    pub const MIGRATED: u8 = 0;
    /// Refused before changing anything (a usage error, a failed check).
    pub const REFUSED: u8 = 2;
    /// Failed and rolled back: the guest runs on the source with its disk.
    pub const ROLLED_BACK: u8 = 3;
    /// Failed, and the rollback did not finish: the state is unknown (the message says what to
    /// check). The source guest is left paused rather than risk two running copies.
    pub const ROLLBACK_FAILED: u8 = 4;
    /// Failed after the switchover was requested: the guest runs on the destination (or is
    /// paused on both); the source is never resumed.
    pub const AFTER_SWITCHOVER: u8 = 5;
}

const EXIT_CODES: &str = "Exit status:
  0  migrated: the guest runs on the destination with its disk
  2  refused before changing anything (usage error, failed check)
  3  failed and rolled back: the guest runs on the source with its disk
  4  the rollback failed too: state unknown; the source guest is left paused (the message says what to check)
  5  failed after the switchover: the guest runs on the destination; nothing was undone
row-migrate --recover (same sockets) brings a migration that was killed, or ended with 4 or 5, to
one consistent state: completed if the guest runs on the destination (after waiting for a
running post-copy push to end), otherwise undone. For a libvirt domain, row-migrate --domain
NAME --to URI --recover does the same.";

const EXAMPLES: &str = "Examples:
  # Host A runs the guest (QMP at /run/a/qmp.sock) on `nbd-row-proxy serve --control /run/a/vm1.ctl`;
  # host B runs QEMU with the same devices and -incoming defer, on `nbd-row-proxy receive
  # --listen 0.0.0.0:10810 --control /run/b/vm1.ctl`. Migrate, capped at 1 Gbit/s:
  row-migrate --src-qmp /run/a/qmp.sock --dst-qmp /run/b/qmp.sock \\
      --src-proxy /run/a/vm1.ctl --dst-proxy /run/b/vm1.ctl \\
      --disk-uri tcp:host-b:10810 --mem-uri tcp:host-b:4444 --max-bandwidth 1gbit

  # A VM with two disks: one --disk SRC_CONTROL,DST_CONTROL,URI each, sharing --max-bandwidth
  row-migrate --src-qmp /run/a/qmp.sock --dst-qmp /run/b/qmp.sock \\
      --disk /run/a/root.ctl,/run/b/root.ctl,tcp:host-b:10810 \\
      --disk /run/a/data.ctl,/run/b/data.ctl,tcp:host-b:10811 --mem-uri tcp:host-b:4444

  # The same with both copies of the disks compared after the switchover, a 1 h limit and a JSON report
  row-migrate ... --verify-disk --timeout 1h --json

  # libvirt's way for comparison: QEMU mirrors onto B's `serve --tcp` export
  row-migrate ... --strategy qemu-mirror --disk-uri nbd://host-b:10809/vm1 --tls-creds /etc/pki/qemu

  # Run on host A only: B's sockets are paths on host-b, forwarded by ssh (one `ssh -N -L ...`)
  row-migrate --src-qmp /run/a/qmp.sock --dst-qmp /run/b/qmp.sock \\
      --src-proxy /run/a/vm1.ctl --dst-proxy /run/b/vm1.ctl \\
      --disk-uri tcp:host-b:10810 --mem-uri tcp:host-b:4444 \\
      --dst-ssh root@host-b --dst-ssh-option IdentityFile=/root/.ssh/id_migrate

  # A VM run by libvirt (or any manager): arm the disk, then let the manager migrate it as if it
  # were on shared storage (virsh migrate --live ...); B's first write takes the disk
  row-migrate --arm-only --src-proxy /run/a/vm1.ctl --dst-proxy /run/b/vm1.ctl \
      --disk-uri tcp:host-b:10810 --dst-ssh root@host-b

  # A libvirt domain (its disks on nbd-row-proxy on both hosts, same socket paths): row-migrate
  # arms its disks, runs `virsh migrate --live --persistent --undefinesource vm1 URI` and waits
  # for each disk's hand-over; B's control sockets are /run/nbd-row-proxy/*.ctl reached by ssh
  row-migrate --domain vm1 --to qemu+ssh://host-b/system --disk-uri tcp:host-b:10810 --dst-ssh root@host-b

  # After a row-migrate that was killed or ended with status 4 or 5
  row-migrate --src-qmp /run/a/qmp.sock --dst-qmp /run/b/qmp.sock \\
      --src-proxy /run/a/vm1.ctl --dst-proxy /run/b/vm1.ctl --recover

Units: rates as 100mbit, 1Gbit/s (bits) or 12MB/s (SI), 12MiB/s (IEC), a plain number is bytes/s;
durations as 500ms, 2s, 1h30m, a plain number is seconds.
Logs: stderr, filtered by RUST_LOG (default warn); --log-format json for one JSON object per line.";

/// The usage line: a migration needs --mem-uri and a disk (the single-disk flags or --disk);
/// --recover only the sockets.
const USAGE: &str = "row-migrate [OPTIONS] --src-qmp <SRC_QMP> --dst-qmp <DST_QMP> --mem-uri <MEM_URI> \
<--src-proxy <SRC_PROXY> --dst-proxy <DST_PROXY> --disk-uri <DISK_URI> | --disk <SRC,DST,URI>...>
       row-migrate [OPTIONS] --src-qmp <SRC_QMP> --dst-qmp <DST_QMP> --recover \
<--src-proxy <SRC_PROXY> --dst-proxy <DST_PROXY> | --disk <SRC,DST,URI>...>
       row-migrate [OPTIONS] --arm-only \
<--src-proxy <SRC_PROXY> --dst-proxy <DST_PROXY> --disk-uri <DISK_URI> | --disk <SRC,DST,URI>...>
       row-migrate [OPTIONS] --domain <NAME> --to <URI> <--disk-uri <DISK_URI> | --target-uri <DEV=URI>...> \
<--dst-ssh <[USER@]HOST> | --dst-control-dir <DIR>>";

/// How the disk moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Redirect-on-write: base, cold updates, then hot and rewritten blocks while paused.
    Row,
    /// Dirty bitmap: the whole disk, then what was dirtied, round after round.
    Bitmap,
    /// QEMU's own drive mirror onto the destination proxy's NBD export (libvirt's way).
    QemuMirror,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Row => "row",
            Strategy::Bitmap => "bitmap",
            Strategy::QemuMirror => "qemu-mirror",
        }
    }

    /// The proxies move the disk (rather than QEMU's mirror).
    fn by_proxies(self) -> bool {
        self != Strategy::QemuMirror
    }
}

/// When the disk's final round may leave blocks for after the switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PostcopyArg {
    /// Never: the final round sends everything while the guest is paused, however long.
    Never,
    /// When the final round would not fit the downtime budget at the measured link rate.
    Auto,
    /// Whenever anything is left for the final round.
    Always,
}

impl PostcopyArg {
    /// The proxies' form.
    pub fn mode(self) -> control_api::PostcopyMode {
        match self {
            PostcopyArg::Never => control_api::PostcopyMode::Never,
            PostcopyArg::Auto => control_api::PostcopyMode::Auto,
            PostcopyArg::Always => control_api::PostcopyMode::Always,
        }
    }
}

/// How QEMU's mirror copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MirrorMode {
    /// Copy dirty data in the background (QEMU's default).
    Background,
    /// Guest writes wait until they are mirrored (converges, slows the guest).
    WriteBlocking,
    /// Background until the mirror is READY, then write-blocking (the bulk copy does not slow
    /// the guest, the rest converges): switched with `block-job-change` where the QEMU has it
    /// (8.2+), write-blocking from the start where it does not.
    ReadyThenWriteBlocking,
}

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "row-migrate",
    version,
    about = "Live-migrate a QEMU guest with its local disk",
    // clap leaves --mem-uri out of the usage it derives (it is required unless --recover).
    override_usage = USAGE,
    after_help = EXIT_CODES,
    after_long_help = format!("{EXAMPLES}\n\n{EXIT_CODES}")
)]
pub struct Args {
    /// Source QEMU's QMP socket.
    #[arg(long, required_unless_present_any = ["arm_only", "domain"])]
    pub src_qmp: Option<PathBuf>,
    /// Destination QEMU's QMP socket (QEMU started with `-incoming defer`).
    #[arg(long, required_unless_present_any = ["arm_only", "domain"])]
    pub dst_qmp: Option<PathBuf>,
    /// Source nbd-row-proxy control socket (a VM with one disk; see --disk for more).
    #[arg(long)]
    pub src_proxy: Option<PathBuf>,
    /// Destination nbd-row-proxy control socket (a VM with one disk).
    #[arg(long)]
    pub dst_proxy: Option<PathBuf>,
    /// Where the disk goes: `tcp:HOST:PORT` of `receive --listen` (row, bitmap), or
    /// `nbd://HOST:PORT/EXPORT` of the destination proxy (qemu-mirror).
    #[arg(long)]
    pub disk_uri: Option<String>,
    /// One disk of the VM: its source and destination proxies' control sockets and its stream
    /// address, as SRC_CONTROL,DST_CONTROL,URI or src=...,dst=...,uri=...; repeat for every disk.
    /// All disks pre-copy at once (sharing --max-bandwidth), their final rounds run in parallel
    /// while the guest is paused, and QEMU switches over only when every destination has
    /// committed; otherwise every disk is rolled back.
    #[arg(long = "disk", value_name = "SRC,DST,URI", value_parser = disks::parse_disk)]
    pub disks: Vec<disks::DiskSpec>,
    /// Where QEMU's memory migration goes, e.g. `tcp:HOST:4444`.
    #[arg(long, required_unless_present_any = ["recover", "arm_only", "domain"])]
    pub mem_uri: Option<String>,
    /// Migration method.
    #[arg(long, value_enum, default_value_t = Strategy::Row)]
    pub strategy: Strategy,
    /// Bandwidth cap for disk and memory: bits per second (100mbit, 1Gbit/s) or bytes per
    /// second (12MB/s SI, 12MiB/s IEC; a plain number is bytes/s). Unlimited by default.
    #[arg(long, value_parser = units::positive_rate, value_name = "RATE")]
    pub max_bandwidth: Option<u64>,
    /// The guest's downtime budget, disk and memory together (STOP to RESUME), e.g. 300ms or 1s
    /// (a plain number is seconds). Half goes to QEMU's memory stop-and-copy (its downtime-limit),
    /// a sixth (or on a slow link the time its buffered stream takes to arrive) to the resume
    /// after it; the disk's final round gets what is left when the guest pauses, and with
    /// --postcopy auto what would not fit is sent after the switchover.
    #[arg(long, default_value = "300ms", value_parser = units::positive_seconds, value_name = "DURATION")]
    pub downtime_limit: Duration,
    /// Post-copy of the disk (row, bitmap): `auto` switches over with the blocks the final round
    /// cannot send within the downtime budget left at the destination, which serves the guest
    /// at once, fetches a block when the guest reads it and gets the rest pushed in the
    /// background; `always` does so whenever blocks are left; `never` sends everything while
    /// the guest is paused. With qemu-mirror, --verify-disk implies `never` (it compares both
    /// disks before the switchover).
    #[arg(long, value_enum, default_value_t = PostcopyArg::Auto)]
    pub postcopy: PostcopyArg,
    /// Post-copy of memory (QEMU's `postcopy-ram`); by default `auto`, or `never` with
    /// `--postcopy never`. `auto` switches
    /// QEMU to post-copy when its pre-copy passes stop shrinking and what is left would not stop
    /// and copy within memory's share of the budget; `always` a second into the copy; `never`
    /// waits for pre-copy to converge. During a RAM post-copy the guest runs on the destination
    /// while its untouched pages are still on the source: a failure of either host then loses
    /// the guest. Needs `postcopy-ram` on both QEMUs (`auto` goes on without it, with a warning).
    #[arg(long, value_enum, value_name = "WHEN")]
    pub ram_postcopy: Option<PostcopyArg>,
    /// Turn on QEMU's `auto-converge`: it throttles the guest's vCPUs while memory does not
    /// converge (the guest slows down instead of its memory moving after the switchover).
    #[arg(long)]
    pub auto_converge: bool,
    /// Disk pre-copy rounds before the final one (row: 2, bitmap: 3).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: Option<u32>,
    /// Writes that make a block hot (row), 1 to 127.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub hot_threshold: Option<u32>,
    /// qemu-mirror's copy mode.
    #[arg(long, value_enum, default_value_t = MirrorMode::Background)]
    pub mirror_copy_mode: MirrorMode,
    /// Roll back when QEMU's memory migration moves no byte for this long (a dead link is
    /// otherwise noticed only after TCP gives up, minutes later), e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = units::positive_seconds, value_name = "DURATION")]
    pub stall_timeout: Duration,
    /// Give up (and roll back) if the switchover has not happened after this long, e.g. 10m or
    /// 1h30m (a post-copy after the switchover is not bounded by it: it cannot be undone).
    #[arg(long, default_value = "15m", value_parser = units::positive_seconds, value_name = "DURATION")]
    pub timeout: Duration,
    /// TLS credentials directory (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem, as libvirt lays them out, e.g. /etc/pki/qemu), readable by both QEMUs:
    /// the guest's RAM then moves over TLS (QEMU's tls-creds-x509 objects), and so does the disk
    /// with qemu-mirror (the destination proxy's --tcp export with its own --tls-creds). The
    /// proxies' disk stream is protected by their own --tls-creds or key.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Migrate even though the source guest has more writable drives than disks given (the
    /// others must be on storage both hosts share, or the destination starts without their data).
    #[arg(long)]
    pub allow_unmoved_drives: bool,
    /// Check that both hosts hold the same disk. With row and bitmap, after the switchover and
    /// without downtime: the guest runs on the destination while both proxies hash the disk
    /// (SHA-256 per MiB), leaving out the blocks the guest wrote there since; a difference
    /// fails with exit 5, naming the MiB (the source keeps its disk). With qemu-mirror, both
    /// whole disks before the switchover, in the downtime; a mismatch rolls back.
    #[arg(long)]
    pub verify_disk: bool,
    /// Print the report (or, on failure, the error and the state each component was left in)
    /// as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Log lines on stderr as text or as one JSON object per line (filtered by RUST_LOG,
    /// default warn).
    #[arg(long, value_enum, default_value_t = logging::LogFormat::Text)]
    pub log_format: logging::LogFormat,
    /// Reach the destination's sockets through ssh: --dst-qmp and each disk's destination
    /// control socket are paths on this host, forwarded to private local sockets by one
    /// `ssh -N -L LOCAL:REMOTE ...` (the system's OpenSSH client, no password prompt: a key or
    /// an agent logs in; sshd must allow AllowStreamLocalForwarding, its default). ssh ends with
    /// row-migrate.
    #[arg(long, value_name = "[USER@]HOST", value_parser = ssh::parse_destination)]
    pub dst_ssh: Option<ssh::Destination>,
    /// An ssh_config option for --dst-ssh, passed as `-o OPT`, e.g. Port=2222,
    /// IdentityFile=/root/.ssh/id_migrate, StrictHostKeyChecking=yes, ProxyJump=gw; repeatable.
    #[arg(long, value_name = "OPT", requires = "dst_ssh", value_parser = ssh::parse_option)]
    pub dst_ssh_option: Vec<ssh::SshOption>,
    /// Reach the source's sockets through ssh, as --dst-ssh does the destination's (--src-qmp
    /// and each disk's source control socket are paths on this host).
    #[arg(long, value_name = "[USER@]HOST", value_parser = ssh::parse_destination)]
    pub src_ssh: Option<ssh::Destination>,
    /// An ssh_config option for --src-ssh, passed as `-o OPT`; repeatable.
    #[arg(long, value_name = "OPT", requires = "src_ssh", value_parser = ssh::parse_option)]
    pub src_ssh_option: Vec<ssh::SshOption>,
    /// Instead of migrating: after a row-migrate that was killed or ended with status 4 or 5, bring
    /// the four components to one consistent state. If the guest runs on the destination, the
    /// source proxy completes; otherwise the disk goes back to the source and the guest resumes
    /// there. Exit 0 when done (the report says where the guest runs), 4 with what to do if not.
    /// With --domain NAME --to URI: waits for libvirt's job to end, then completes the disks'
    /// hand-overs if libvirt left the domain on the destination (resuming it if an I/O error
    /// paused it), or disarms them if it left it on the source.
    #[arg(long)]
    pub recover: bool,
    /// Instead of migrating: arm every disk (row or bitmap) for a hand-over that follows the VM
    /// manager's own live migration (`virsh migrate --live`, Nova, ...), and return once each is
    /// ready (exit 0). The manager's migration then moves the disk: the destination's first
    /// write takes it (the source proxy refuses writes from then on, sends what is left by
    /// post-copy and completes by itself). Needs the disk flags only, no QMP socket;
    /// `migrate-cancel` on a source proxy disarms its disk.
    #[arg(long, conflicts_with_all = ["recover", "verify_disk"])]
    pub arm_only: bool,
    /// Instead of QMP sockets: move the libvirt domain NAME (running on --from) to --to with
    /// libvirt's own live migration. row-migrate reads its XML (`virsh dumpxml`), finds the
    /// disks nbd-row-proxy serves (`<disk type='network'>`, protocol nbd, a Unix socket X.sock
    /// with the control socket X.ctl beside it; both hosts serve a disk on the same path, so the
    /// XML needs no change), arms each (as --arm-only), runs `virsh migrate --live --persistent
    /// --undefinesource NAME URI` and follows libvirt's job, then waits until every disk has been
    /// handed over (on the destination's first write) and completed. Each disk's destination
    /// proxy is --dst-control-dir/X.ctl; its stream --disk-uri (one disk) or --target-uri. With
    /// --arm-only: arms the domain's disks and returns (a manager then migrates it).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with_all = ["src_qmp", "dst_qmp", "src_proxy", "dst_proxy", "disks", "mem_uri", "verify_disk"]
    )]
    pub domain: Option<String>,
    /// The destination's libvirt connection URI for --domain, e.g. qemu+ssh://host-b/system or
    /// qemu+tls://host-b/system (virsh's own URI, so its authentication applies).
    #[arg(long, value_name = "URI", requires = "domain")]
    pub to: Option<String>,
    /// The source's libvirt connection URI for --domain (default: virsh's default,
    /// LIBVIRT_DEFAULT_URI or qemu:///system as root).
    #[arg(long, value_name = "URI", requires = "domain")]
    pub from: Option<String>,
    /// With --domain: the directory of the destination proxies' control sockets (X.ctl for the
    /// disk on X.sock). With --dst-ssh it is a path on that host, and the default
    /// /run/nbd-row-proxy (where nbd-row-proxy@.service puts them) is right; without, give where
    /// this host sees them (the same path as the source's is refused).
    #[arg(long, value_name = "DIR", default_value = "/run/nbd-row-proxy", requires = "domain")]
    pub dst_control_dir: PathBuf,
    /// With --domain: the stream address of the disk with `<target dev='DEV'>`, as DEV=URI
    /// (tcp:HOST:PORT of its destination proxy's `receive --listen`); repeat per disk. A domain
    /// with one proxy disk may give --disk-uri instead.
    #[arg(long = "target-uri", value_name = "DEV=URI", requires = "domain", value_parser = libvirt::parse_target_uri)]
    pub target_uris: Vec<(String, String)>,
}

impl Args {
    /// `--src-qmp` (required unless `--arm-only`).
    pub fn src_qmp(&self) -> &Path {
        self.src_qmp.as_deref().unwrap_or(Path::new(""))
    }

    /// `--dst-qmp` (required unless `--arm-only`).
    pub fn dst_qmp(&self) -> &Path {
        self.dst_qmp.as_deref().unwrap_or(Path::new(""))
    }

    /// `--mem-uri` (required unless `--recover`).
    pub fn mem_uri(&self) -> &str {
        self.mem_uri.as_deref().unwrap_or_default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // `row-migrate --generate-docs DIR`: man pages and completions (scripts/package).
    if let Some(code) = cli_docs::hook(<Args as clap::CommandFactory>::command, &["nbd-row-proxy"]) {
        return code;
    }
    let mut args = Args::parse();
    if let Err(e) = logging::init(args.log_format, "warn") {
        eprintln!("row-migrate: {e}");
        return ExitCode::from(exit::REFUSED);
    }
    let json = args.json;
    let recovering = args.recover;
    let arming = args.arm_only;
    // --domain: the domain's proxy disks become `--disk`s (before the tunnels forward them).
    // --domain --recover reads what it needs from libvirt itself (the domain may be on either host).
    if recovering && args.domain.is_some() {
        return finish(libvirt_recover::recover(args).await, json, |r| println!("{}", report::recovered(r)));
    }
    let domain = match args.domain.is_some().then(|| libvirt::prepare(&mut args)).transpose() {
        Ok(domain) => domain,
        Err(Failure { code, error, .. }) => {
            eprintln!("row-migrate: {}", logging::error_line(error.as_ref()));
            return ExitCode::from(code);
        }
    };
    let migrating_domain = domain.is_some() && !arming;
    // --dst-ssh/--src-ssh: the remote sockets are forwarded, and `args` points at the local ends.
    let result = match ssh::Tunnels::open(&mut args).await {
        Ok(tunnels) => {
            let result = if recovering {
                recover::recover(args).await
            } else if arming {
                arm::arm(args).await
            } else if let Some(domain) = domain {
                libvirt::migrate(args, domain).await
            } else {
                sequence::run(args).await
            };
            tunnels.finish(result)
        }
        Err(failure) => Err(failure),
    };
    finish(result, json, |report| {
        if recovering {
            println!("{}", report::recovered(report));
        } else if arming {
            println!("{}", arm::summary(report));
        } else if migrating_domain {
            println!("{}", libvirt::summary(report));
        } else {
            report::print(report);
        }
    })
}

/// Prints the report (`--json`, else `text`) or the failure, and gives the exit status.
fn finish(result: Result<serde_json::Value, Failure>, json: bool, text: impl FnOnce(&serde_json::Value)) -> ExitCode {
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).expect("report serialises"));
            } else {
                text(&report);
            }
            ExitCode::from(exit::MIGRATED)
        }
        Err(Failure { code, error, state }) => {
            let error = logging::error_line(error.as_ref());
            eprintln!("row-migrate: {error}");
            if json {
                let out = json!({ "ok": false, "exit-code": code, "error": error, "state": state });
                println!("{}", serde_json::to_string(&out).expect("report serialises"));
            }
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_convention_and_old_forms_still_parse() {
        let base = ["row-migrate", "--src-qmp", "a", "--dst-qmp", "b", "--src-proxy", "c", "--dst-proxy", "d"];
        let parse = |extra: &[&str]| {
            let argv = base.iter().chain(extra).chain(&["--disk-uri", "tcp:h:1", "--mem-uri", "tcp:h:2"]);
            Args::try_parse_from(argv).map_err(|e| e.to_string())
        };
        let a = parse(&["--max-bandwidth", "100mbit", "--timeout", "1h30m", "--downtime-limit", "1"]).unwrap();
        assert_eq!(a.max_bandwidth, Some(12_500_000));
        assert_eq!(a.timeout, Duration::from_secs(5400));
        assert_eq!(a.downtime_limit, Duration::from_secs(1));
        assert_eq!(parse(&["--max-bandwidth", "100MiB"]).unwrap().max_bandwidth, Some(100 << 20));
        assert_eq!(parse(&["--max-bandwidth", "100M"]).unwrap().max_bandwidth, Some(100_000_000));
        assert_eq!(parse(&["--max-bandwidth", "12MB/s"]).unwrap().max_bandwidth, Some(12_000_000));
        let e = parse(&["--max-bandwidth", "10 parsecs"]).unwrap_err();
        assert!(
            e.contains(
                "invalid value '10 parsecs' for '--max-bandwidth <RATE>': expected a rate like 100mbit, 12MiB/s or bytes per second"
            ),
            "{e}"
        );
        for bad in [["--max-bandwidth", "0"], ["--timeout", "0s"], ["--stall-timeout", "-1"], ["--timeout", "soon"]] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_cli_parses_and_documents_exit_codes() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("5  failed after the switchover"), "{help}");
        assert!(help.contains("Examples:") && help.contains("--recover"), "{help}");
        let usage = Args::command().render_usage().to_string();
        let first = usage.lines().next().unwrap_or_default();
        assert!(first.contains("--mem-uri <MEM_URI>") && first.contains("--disk-uri"), "{usage}");
        assert!(usage.lines().nth(1).is_some_and(|l| l.contains("--recover")), "{usage}");
    }
}
