//! Random sequences of control commands and writes against a real source proxy and a real
//! destination: every command is answered (a result or an error, never a dropped connection or
//! a dead process), writes are refused exactly when `query-status` says so, a committed hand-over
//! leaves both disks equal, and at the end the source still holds every write it accepted.

use std::time::{Duration, Instant};

use e2e::migration::*;
use e2e::*;
use nbd_proto::consts::NBD_EPERM;
use nbd_proto::Command as Cmd;
use proptest::prelude::*;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
enum Step {
    QueryStatus,
    QueryMigrate,
    QueryRow,
    RowStart,
    RowStop { wait: bool },
    MigrateStart { bitmap: bool },
    WaitReady,
    MigrateFinish,
    MigrateCancel,
    MigrateComplete,
    Reclaim { force: bool },
    Write { block: u64, byte: u8 },
    DestWrite { block: u64, byte: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => Just(Step::QueryStatus),
        1 => Just(Step::QueryMigrate),
        1 => Just(Step::QueryRow),
        2 => Just(Step::RowStart),
        1 => any::<bool>().prop_map(|wait| Step::RowStop { wait }),
        3 => any::<bool>().prop_map(|bitmap| Step::MigrateStart { bitmap }),
        3 => Just(Step::WaitReady),
        3 => Just(Step::MigrateFinish),
        2 => Just(Step::MigrateCancel),
        2 => Just(Step::MigrateComplete),
        1 => any::<bool>().prop_map(|force| Step::Reclaim { force }),
        4 => (0..64u64, 1..255u8).prop_map(|(block, byte)| Step::Write { block, byte }),
        1 => (0..64u64, 1..255u8).prop_map(|(block, byte)| Step::DestWrite { block, byte }),
    ]
}

const KNOWN_PHASES: &[&str] =
    &["idle", "setup", "precopy", "ready", "finishing", "handed-over", "completed", "cancelled", "failed"];

fn write(server: &Server, block: u64, byte: u8) -> u32 {
    let mut c = RawClient::connect(&server.socket, "", true).unwrap();
    let e = c.call(request(Cmd::Write, 1, block * BS as u64, BS as u32), &vec![byte; BS]).unwrap().error;
    if e == 0 {
        assert_eq!(c.call(request(Cmd::Flush, 2, 0, 0), &[]).unwrap().error, 0);
    }
    e
}

fn alive(host: &mut Host, what: &str) {
    assert!(
        host.server.proc.child.try_wait().unwrap().is_none(),
        "the {what} proxy died:\n{}",
        host.server.proc.log_text()
    );
}

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let key = key_file(src_dir.path(), "control-sequences-key-0123456789");
    let (image, mut model) = source_image(src_dir.path(), 77);
    let mut src = source(src_dir.path(), &image, &key);
    let dst_image = dst_dir.path().join("disk.raw");
    sparse_file(&dst_image, SIZE as u64);
    let port = free_port();
    let mut dst = destination(dst_dir.path(), &dst_image, &key, port);
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut ctl = src.ctl();
    for step in steps {
        let reply: Result<Value, String> = match &step {
            Step::QueryStatus => ctl.execute("query-status", json!({})),
            Step::QueryMigrate => ctl.execute("query-migrate", json!({})),
            Step::QueryRow => ctl.execute("query-row", json!({})),
            Step::RowStart => ctl.execute("row-start", json!({})),
            Step::RowStop { wait } => ctl.execute("row-stop", json!({ "wait": wait })),
            Step::MigrateStart { bitmap } => ctl.execute(
                "migrate-start",
                json!({ "uri": uri, "strategy": if *bitmap { "bitmap" } else { "row" }, "max-bandwidth": 64 << 20 }),
            ),
            Step::WaitReady => {
                let start = Instant::now();
                loop {
                    let m = ctl.ok("query-migrate", json!({}));
                    let active = matches!(m["phase"].as_str(), Some("setup" | "precopy"));
                    if !active || start.elapsed() > Duration::from_secs(30) {
                        break Ok(m);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Step::MigrateFinish => {
                let r = ctl.execute("migrate-finish", json!({}));
                if r.as_ref().is_ok_and(|s| s["phase"] == "handed-over") {
                    // A hand-over leaves both disks equal (before the destination's own writes).
                    let dst_status = dst.ctl().ok("query-status", json!({}));
                    if dst_status["incoming-phase"] == "committed" {
                        prop_assert!(read_all(&dst.server) == model, "the destination's disk differs after the commit");
                    }
                }
                r
            }
            Step::MigrateCancel => ctl.execute("migrate-cancel", json!({})),
            Step::MigrateComplete => ctl.execute("migrate-complete", json!({})),
            Step::Reclaim { force } => ctl.execute("reclaim", json!({ "force": force })),
            Step::Write { block, byte } => {
                let refused = ctl.ok("query-status", json!({}))["writes-refused"].is_string();
                let e = write(&src.server, *block, *byte);
                prop_assert_eq!(e == NBD_EPERM, refused, "write refused {} but writes-refused says {}", e, refused);
                if e == 0 {
                    let off = *block as usize * BS;
                    model[off..off + BS].fill(*byte);
                }
                Ok(json!({ "error": e }))
            }
            Step::DestWrite { block, byte } => {
                let e = write(&dst.server, *block, *byte);
                Ok(json!({ "error": e }))
            }
        };
        // Every command is answered; errors are one clear sentence, and the proxies live on.
        if let Err(e) = &reply {
            prop_assert!(!e.is_empty() && !e.contains("panicked") && !e.contains("closed"), "{:?}: {}", step, e);
        }
        alive(&mut src, "source");
        alive(&mut dst, "destination");
        let m = ctl.ok("query-migrate", json!({}));
        prop_assert!(KNOWN_PHASES.contains(&m["phase"].as_str().unwrap_or("?")), "{}", m);
    }
    // Take the disk back by any means; the source must hold every write it accepted.
    let _ = ctl.execute("migrate-cancel", json!({}));
    let _ = ctl.execute("reclaim", json!({ "force": true }));
    let start = Instant::now();
    loop {
        let s = ctl.ok("query-status", json!({}));
        if s["writes-refused"].is_null() && s["mode"] != "merging" {
            break;
        }
        prop_assert!(start.elapsed() < HANG_LIMIT, "the source did not settle: {}", s);
        std::thread::sleep(Duration::from_millis(50));
    }
    prop_assert!(read_all(&src.server) == model, "the source lost a write it accepted");
    prop_assert_eq!(write(&src.server, 0, 9), 0, "the source takes writes again");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("CONTROL_SEQUENCES").ok().and_then(|v| v.parse().ok()).unwrap_or(10),
        max_shrink_iters: 50,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_command_sequences_never_break_the_proxies(steps in proptest::collection::vec(step(), 4..18)) {
        run(steps)?;
    }
}
