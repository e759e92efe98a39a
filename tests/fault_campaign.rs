//! The fault campaign: a real TCG guest on host A, writing 4 KiB blocks with O_DIRECT|O_DSYNC
//! to its virtio disk through the proxy, is migrated to host B with `row-migrate`; at one phase
//! of the migration (round 1, round 2, the memory copy, the final disk round, inside
//! `migrate-continue`, after `completed` but before `migrate-complete`) one component is killed
//! (the source proxy, the destination proxy, `row-migrate`, the source QEMU, the destination
//! QEMU) or the link is cut. Then the killed proxy is restarted (QEMU's NBD client reconnects),
//! the link restored, `row-migrate --recover` run where the driver died or asked for it, and a
//! guest whose QEMU died is booted again to verify its disk.
//!
//! For every case it records where the guest runs afterwards and asserts: never on both hosts
//! at once; at most one proxy accepts writes; the host it runs on has every write the guest made
//! (the running guest verifies every block it wrote; a rebooted one every block it had
//! reported written, `--verify-only --at-least`). It prints a table fault × phase → outcome and
//! writes it to `target/fault-campaign.md` (and `.json`).
//!
//! `FAULT_CAMPAIGN=full` runs all 36 cases (about an hour, `scripts/fault-campaign`); the
//! default runs the CI subset below. `FAULT_CASES=fault/phase,...` picks cases by name;
//! `FAULT_KEEP_LOGS=1` keeps every case's logs under target/fault-campaign-failures.

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::rig::*;
use e2e::*;
use serde_json::{json, Value};

/// Guest time the workload writes before it verifies (time stands still while it is paused).
const GUEST_SECONDS: u32 = 45;
/// Disk and memory bandwidth cap, so the phases last long enough to be hit.
const BANDWIDTH: &str = "8MiB";
/// How long the test hooks hold each phase.
const HOLD_MS: u64 = 4000;
/// How long a killed proxy stays down (QEMU's NBD client waits up to 30 s for it).
const PROXY_DOWN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillSourceProxy,
    KillDestinationProxy,
    KillRowMigrate,
    KillSourceQemu,
    KillDestinationQemu,
    CutLink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Round1,
    Round2,
    MemoryCopy,
    FinalRound,
    InsideContinue,
    BeforeComplete,
}

const FAULTS: [Fault; 6] = [
    Fault::KillSourceProxy,
    Fault::KillDestinationProxy,
    Fault::KillRowMigrate,
    Fault::KillSourceQemu,
    Fault::KillDestinationQemu,
    Fault::CutLink,
];
const PHASES: [Phase; 6] =
    [Phase::Round1, Phase::Round2, Phase::MemoryCopy, Phase::FinalRound, Phase::InsideContinue, Phase::BeforeComplete];

/// The CI subset: one case per fault, spread over the phases where it matters most.
const CI_CASES: [(Fault, Phase); 6] = [
    (Fault::KillSourceProxy, Phase::FinalRound),
    (Fault::KillDestinationProxy, Phase::Round1),
    (Fault::KillRowMigrate, Phase::InsideContinue),
    (Fault::KillSourceQemu, Phase::MemoryCopy),
    (Fault::KillDestinationQemu, Phase::BeforeComplete),
    (Fault::CutLink, Phase::FinalRound),
];

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillSourceProxy => "kill source proxy",
            Fault::KillDestinationProxy => "kill destination proxy",
            Fault::KillRowMigrate => "kill row-migrate",
            Fault::KillSourceQemu => "kill source QEMU",
            Fault::KillDestinationQemu => "kill destination QEMU",
            Fault::CutLink => "cut the link",
        })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Round1 => "round 1",
            Phase::Round2 => "round 2",
            Phase::MemoryCopy => "memory copy",
            Phase::FinalRound => "final disk round",
            Phase::InsideContinue => "inside migrate-continue",
            Phase::BeforeComplete => "completed, before migrate-complete",
        })
    }
}

fn slug(s: &str) -> String {
    s.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect::<Vec<_>>().join("-").to_lowercase()
}

/// What happened in one case.
#[derive(Debug, Clone)]
struct Outcome {
    fault: Fault,
    phase: Phase,
    /// row-migrate's exit status (None: killed).
    driver_exit: Option<i32>,
    /// `row-migrate --recover`'s exit status, when it ran.
    recover_exit: Option<i32>,
    /// Where the guest ended: `A`, `B`, or `A (rebooted)` / `B (rebooted)`.
    guest: String,
    /// Whether its verification passed.
    verified: bool,
    /// Both guests ran, or both proxies accepted writes, at some observation.
    split_brain: bool,
    seconds: f64,
}

fn running(side: &mut Side) -> bool {
    side.qemu_status().as_deref() == Some("running")
}

fn writable(side: &Side) -> bool {
    match qmp(&side.ctl, "query-status", json!({})) {
        Ok(s) => s["writes-refused"].is_null() && s["incoming"] == false,
        Err(_) => false,
    }
}

/// Both guests running, or both proxies taking writes: two owners.
fn two_owners(rig: &mut Rig) -> bool {
    let (a_run, b_run) = (running(rig.a()), running(rig.b()));
    let (a_w, b_w) = (writable(rig.a()), writable(rig.b()));
    if (a_run && b_run) || (a_w && b_w) {
        eprintln!(
            "[{:5.1}s] TWO OWNERS: guests running A={a_run} B={b_run}, proxies writable A={a_w} B={b_w}",
            rig.secs()
        );
        return true;
    }
    false
}

/// Waits until the migration is at `phase`; false if it ended first.
fn reach(rig: &mut Rig, driver: &mut Driver, phase: Phase) -> bool {
    let deadline = Instant::now() + HANG_LIMIT;
    while Instant::now() < deadline {
        if driver.proc.child.try_wait().unwrap().is_some() {
            return false;
        }
        let m = qmp(&rig.a().ctl, "query-migrate", json!({})).unwrap_or_default();
        let stderr = std::fs::read_to_string(&driver.stderr).unwrap_or_default();
        let at = match phase {
            Phase::Round1 => m["phase"] == "precopy" && m["round"] == 1,
            Phase::Round2 => m["phase"] == "precopy" && m["round"].as_u64().unwrap_or(0) >= 2,
            Phase::MemoryCopy => {
                m["phase"] == "ready"
                    && qmp(&rig.a().mon, "query-migrate", json!({})).is_ok_and(|q| q["status"] == "active")
            }
            Phase::FinalRound => m["phase"] == "finishing",
            Phase::InsideContinue => stderr.contains("at before-continue"),
            Phase::BeforeComplete => stderr.contains("at before-complete"),
        };
        if at {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn inject(rig: &mut Rig, driver: &Driver, fault: Fault) {
    let key = rig.key.clone();
    match fault {
        Fault::KillSourceProxy => {
            rig.a().kill_proxy();
            std::thread::sleep(PROXY_DOWN);
            rig.a().start_proxy(Role::Source, &key);
        }
        Fault::KillDestinationProxy => {
            rig.b().kill_proxy();
            std::thread::sleep(PROXY_DOWN);
            rig.b().start_proxy(Role::Receive, &key);
        }
        Fault::KillRowMigrate => signal(driver.pid(), libc::SIGKILL),
        Fault::KillSourceQemu => rig.a().kill_qemu(),
        Fault::KillDestinationQemu => rig.b().kill_qemu(),
        Fault::CutLink => link(rig, false),
    }
}

fn link(rig: &Rig, up: bool) {
    let state = if up { "up" } else { "down" };
    run_ok(Command::new("ip").args(["-n", &rig.net.a, "link", "set", &rig.net.veth_a, state]));
}

/// The most writes any incarnation of the guest reported on a console.
fn reported_writes(rig: &Rig) -> u64 {
    rig.sides
        .iter()
        .flat_map(|s| s.console_text().lines().map(str::to_string).collect::<Vec<_>>())
        .filter_map(|l| {
            let n = l.strip_prefix("WORKLOAD written=")?.split_whitespace().next()?.parse::<u64>().ok()?;
            Some(n)
        })
        .max()
        .unwrap_or(0)
}

/// Runs `row-migrate --recover` with the rig's sockets; its exit status.
fn recover(rig: &mut Rig) -> Option<i32> {
    let driver = rig.spawn_driver(HostId::A, HostId::B, "row", &["--recover"]);
    let res = driver.wait(HANG_LIMIT);
    eprintln!(
        "[{:5.1}s] row-migrate --recover exited {:?}: {}{}",
        rig.secs(),
        res.code,
        res.stdout.trim(),
        res.stderr.trim()
    );
    res.code
}

fn run_case(fault: Fault, phase: Phase) -> Outcome {
    let _serial = serial();
    let started = Instant::now();
    eprintln!("===== {fault} at {phase}");
    let guest = Guest { workload: vec!["--sync".into(), "--verify".into()], resilient: true, ..Guest::default() };
    let hold = format!("final-round:{HOLD_MS},update-round:{HOLD_MS}");
    let mut rig = Rig::start_with(Role::Receive, GUEST_SECONDS, guest, &[("NBD_ROW_PAUSE", &hold)]);
    rig.driver_env = vec![("NBD_ROW_PAUSE".into(), format!("before-continue:{HOLD_MS},before-complete:{HOLD_MS}"))];
    std::thread::sleep(Duration::from_secs(1));
    let mut driver = rig.spawn_driver(HostId::A, HostId::B, "row", &["--max-bandwidth", BANDWIDTH, "--timeout", "90s"]);
    assert!(reach(&mut rig, &mut driver, phase), "{fault} at {phase}: the migration never got to {phase}");
    eprintln!("[{:5.1}s] at {phase}: {fault}", rig.secs());
    inject(&mut rig, &driver, fault);
    let mut split_brain = two_owners(&mut rig);
    let driver_exit = if fault == Fault::KillRowMigrate {
        let _ = driver.proc.wait_or_kill(Duration::from_secs(5));
        None
    } else {
        let res = driver.wait(HANG_LIMIT);
        eprintln!(
            "[{:5.1}s] row-migrate exited {:?}: {}",
            rig.secs(),
            res.code,
            res.stderr.lines().last().unwrap_or_default()
        );
        res.code
    };
    if fault == Fault::CutLink {
        link(&rig, true);
    }
    split_brain |= two_owners(&mut rig);
    // The driver died, or asked for it, or failed after the switchover (the source proxy may not
    // have heard that the migration completed): bring everything to one state.
    let needs_recover = driver_exit.is_none_or(|c| c == 4 || c == 5);
    let recover_exit = needs_recover.then(|| recover(&mut rig));
    split_brain |= two_owners(&mut rig);

    // Where does the guest run now? If nowhere, boot it again where the disk is writable.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut on = None;
    while on.is_none() && Instant::now() < deadline {
        if running(rig.a()) {
            on = Some(HostId::A);
        } else if running(rig.b()) {
            on = Some(HostId::B);
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (host, rebooted) = match on {
        Some(h) => (h, false),
        None => {
            let host = if writable(rig.b()) {
                HostId::B
            } else {
                assert!(writable(rig.a()), "{fault} at {phase}: no proxy takes writes and no guest runs");
                HostId::A
            };
            let n = reported_writes(&rig);
            eprintln!(
                "[{:5.1}s] no guest runs: booting one on {host:?} to verify the {n} writes it reported",
                rig.secs()
            );
            let side = rig.side(host);
            side.kill_qemu();
            let mut args = workload_area();
            args.extend(["--verify-only".into(), "--at-least".into(), "--writes".into(), n.to_string()]);
            side.start_guest(&args, false);
            (host, true)
        }
    };
    // It verifies every block it wrote (or reported written), on exactly one host.
    let verifying = Instant::now();
    let console = loop {
        split_brain |= two_owners(&mut rig);
        let text = rig.side(host).console_text();
        if text.contains("WORKLOAD-VERIFY-") {
            break text;
        }
        assert!(verifying.elapsed() < HANG_LIMIT, "{fault} at {phase}: the guest never verified");
        std::thread::sleep(Duration::from_millis(500));
    };
    let verified = console.contains("WORKLOAD-VERIFY-OK") && !console.contains("WORKLOAD-VERIFY-FAIL");
    let guest = format!("{host:?}{}", if rebooted { " (rebooted)" } else { "" });
    let outcome = Outcome {
        fault,
        phase,
        driver_exit,
        recover_exit: recover_exit.flatten(),
        guest,
        verified,
        split_brain,
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!("===== {fault} at {phase}: {outcome:?}");
    if !verified || split_brain || std::env::var_os("FAULT_KEEP_LOGS").is_some() {
        // Keep the logs of a failed case (or of every case, with FAULT_KEEP_LOGS set).
        let keep = repo_root().join("target").join("fault-campaign-failures").join(slug(&format!("{fault} {phase}")));
        let _ = std::fs::create_dir_all(&keep);
        for s in &rig.sides {
            for f in [s.console.clone(), s.image.with_file_name("proxy.log"), s.image.with_file_name("qemu.log")] {
                let _ =
                    std::fs::copy(&f, keep.join(format!("{}-{}", s.name, f.file_name().unwrap().to_string_lossy())));
            }
        }
    }
    outcome
}

fn exit_text(c: Option<i32>) -> String {
    c.map_or("killed".into(), |c| c.to_string())
}

fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from(
        "| fault | phase | row-migrate exit | --recover exit | guest ends on | every write there | one owner |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            o.fault,
            o.phase,
            exit_text(o.driver_exit),
            o.recover_exit.map_or("-".into(), |c| c.to_string()),
            o.guest,
            if o.verified { "yes" } else { "**NO**" },
            if o.split_brain { "**NO**" } else { "yes" },
        ));
    }
    let lost = outcomes.iter().filter(|o| !o.verified).count();
    let split = outcomes.iter().filter(|o| o.split_brain).count();
    out.push_str(&format!("\n{} cases, {lost} with a lost write, {split} with two owners.\n", outcomes.len()));
    out
}

#[test]
fn fault_campaign() {
    let cases: Vec<(Fault, Phase)> = if let Ok(picked) = std::env::var("FAULT_CASES") {
        let all: Vec<(Fault, Phase)> = FAULTS.iter().flat_map(|f| PHASES.iter().map(move |p| (*f, *p))).collect();
        picked
            .split(',')
            .map(|name| {
                *all.iter()
                    .find(|(f, p)| slug(&format!("{f}/{p}")) == slug(name))
                    .unwrap_or_else(|| panic!("no case {name:?}"))
            })
            .collect()
    } else if std::env::var("FAULT_CAMPAIGN").as_deref() == Ok("full") {
        FAULTS.iter().flat_map(|f| PHASES.iter().map(move |p| (*f, *p))).collect()
    } else {
        CI_CASES.to_vec()
    };
    let mut outcomes = Vec::new();
    for (fault, phase) in cases {
        outcomes.push(run_case(fault, phase));
        eprintln!("{}", table(&outcomes));
    }
    let text = table(&outcomes);
    println!("{text}");
    let target = repo_root().join("target");
    let _ = std::fs::write(target.join("fault-campaign.md"), &text);
    let rows: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            json!({
                "fault": o.fault.to_string(), "phase": o.phase.to_string(), "row-migrate-exit": o.driver_exit,
                "recover-exit": o.recover_exit, "guest": o.guest, "verified": o.verified,
                "split-brain": o.split_brain, "seconds": o.seconds,
            })
        })
        .collect();
    let _ = std::fs::write(target.join("fault-campaign.json"), serde_json::to_string_pretty(&rows).unwrap());
    let lost: Vec<String> =
        outcomes.iter().filter(|o| !o.verified).map(|o| format!("{} at {}", o.fault, o.phase)).collect();
    let split: Vec<String> =
        outcomes.iter().filter(|o| o.split_brain).map(|o| format!("{} at {}", o.fault, o.phase)).collect();
    assert!(lost.is_empty(), "lost writes in: {lost:?}\n{text}");
    assert!(split.is_empty(), "two owners in: {split:?}\n{text}");
}
