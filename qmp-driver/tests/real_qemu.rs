//! Against a real QEMU, whichever is first on PATH (10.0 from bookworm-backports as
//! scripts/setup installs it; 7.2 in `scripts/test --qemu72-subset`, which puts the binaries
//! unpacked by scripts/qemu72 first): start `qemu-system-x86_64 -accel tcg -S` with a QMP Unix
//! socket, drive it through what the migration driver needs, and kill it by pid at the end
//! (also on failure, from a `Drop` guard). Version differences are read from the QEMU in front
//! of us (its QMP schema, see `qmp_driver::Features`), not assumed.
//!
//! Skipped, with a note on stderr, when no QEMU is installed; set `QMP_DRIVER_REQUIRE_QEMU=1`
//! to make that a failure instead, and `QEMU_SYSTEM_X86_64` to choose the binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use qmp_driver::{Qmp, QmpError, Support};
use qmp_proto::ErrorClass;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn qemu_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("QEMU_SYSTEM_X86_64") {
        return Some(path.into());
    }
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("qemu-system-x86_64")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(
            std::env::var_os("QMP_DRIVER_REQUIRE_QEMU").is_none(),
            "qemu-system-x86_64 not found and QMP_DRIVER_REQUIRE_QEMU is set"
        );
        eprintln!("SKIPPED: qemu-system-x86_64 not found (apt-get install qemu-system-x86)");
    }
    found
}

/// A QEMU process, killed by pid when dropped.
struct QemuGuard {
    child: Child,
    qmp_path: PathBuf,
}

impl QemuGuard {
    fn start(binary: &Path, dir: &Path, name: &str, extra: &[&str]) -> Self {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let child = Command::new(binary)
            .args(["-accel", "tcg", "-S", "-nodefaults", "-nographic", "-m", "64", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu");
        Self { child, qmp_path }
    }

    /// Connects once the socket exists (QEMU creates it before it is ready to run).
    async fn connect(&mut self) -> Qmp {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("qemu exited early: {status}");
            }
            match Qmp::connect(&self.qmp_path, T).await {
                Ok(qmp) => return qmp,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot connect to {}: {e}", self.qmp_path.display()),
            }
        }
    }

    /// Waits for the process to exit on its own (after `quit`).
    fn wait_exit(&mut self) {
        for _ in 0..200 {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("qemu did not exit after quit");
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Child::kill sends SIGKILL to this child's pid only.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_capabilities_cont_stop_and_events() {
    let Some(binary) = qemu_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut qemu = QemuGuard::start(&binary, dir.path(), "vm", &[]);
    let mut qmp = qemu.connect().await;
    eprintln!("QEMU {:?} ({})", qmp.version(), qmp.greeting().package);
    assert!(qmp.version().major >= 7);
    qmp.set_timeout(T);

    let status = qmp.query_status().await.unwrap();
    assert_eq!((status.status.as_str(), status.running), ("prelaunch", false));
    assert!(status.typed.is_some());

    let info = qmp.query_migrate().await.unwrap();
    assert_eq!(info.status, "none");

    let caps = qmp.query_migrate_capabilities().await.unwrap();
    let state = |caps: &[qmp_driver::CapabilityState], name: &str| {
        caps.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("{name} listed")).state
    };
    assert!(!state(&caps, "events"));
    assert!(!state(&caps, "pause-before-switchover"));
    qmp.migrate_set_capabilities(&[("events", true), ("pause-before-switchover", true)]).await.unwrap();
    let caps = qmp.query_migrate_capabilities().await.unwrap();
    assert!(state(&caps, "events"));
    assert!(state(&caps, "pause-before-switchover"));

    // The schema's capabilities are exactly those QEMU lists, and it refuses one it lacks.
    let features = qmp.features().await.unwrap();
    eprintln!("features: {features:?}");
    assert_eq!(features.version.split('.').next(), Some(qmp.version().major.to_string().as_str()));
    let listed: std::collections::BTreeSet<&str> = caps.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(listed, features.capabilities.keys().map(String::as_str).collect(), "schema vs listed capabilities");
    for name in ["events", "pause-before-switchover", "late-block-activate", "postcopy-ram"] {
        assert_ne!(features.capability(name), Support::No, "{name}");
    }
    if features.capability("block") == Support::No {
        let err = qmp.migrate_set_capabilities(&[("block", false)]).await.unwrap_err();
        assert!(matches!(&err, QmpError::Command { error, .. } if error.class == ErrorClass::GenericError), "{err}");
    }

    // A capability QEMU does not know is a command error; the connection goes on.
    let err = qmp.migrate_set_capabilities(&[("no-such-capability", true)]).await.unwrap_err();
    assert!(matches!(&err, QmpError::Command { error, .. } if error.class == ErrorClass::GenericError), "{err}");

    let before = now_secs();
    qmp.cont().await.unwrap();
    let resume = qmp.wait_event(T, |e| e.is("RESUME")).await.unwrap();
    assert!(resume.typed.is_some());
    assert!((before - 1..=now_secs() + 1).contains(&resume.timestamp.seconds), "{:?}", resume.timestamp);
    assert_eq!(qmp.query_status().await.unwrap().status, "running");

    qmp.stop().await.unwrap();
    let stop = qmp.wait_event(T, |e| e.is("STOP")).await.unwrap();
    assert!(stop.typed.is_some());
    assert!(stop.timestamp >= resume.timestamp, "{:?} < {:?}", stop.timestamp, resume.timestamp);
    let status = qmp.query_status().await.unwrap();
    assert_eq!((status.status.as_str(), status.running), ("paused", false));

    // A throttled mirror between two null-co nodes: 7.2's job lacks `actively-synced`.
    for node in [
        json!({"driver": "null-co", "node-name": "src", "size": 1 << 30, "read-zeroes": true}),
        json!({"driver": "null-co", "node-name": "dst", "size": 1 << 30}),
    ] {
        qmp.execute_raw("blockdev-add", node).await.unwrap();
    }
    qmp.execute_raw(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "dst", "sync": "full", "speed": 1 << 20}),
    )
    .await
    .unwrap();
    let jobs = qmp.query_block_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!((jobs[0].device.as_str(), jobs[0].job_type.as_str()), ("m0", "mirror"));
    assert!(!jobs[0].ready);
    assert_eq!(jobs[0].len, 1 << 30);
    if qmp.version().major < 8 {
        assert!(jobs[0].typed.is_none(), "7.2 mirror job decoded typed: {:?}", jobs[0].raw);
    }
    // block-job-change (8.2+) switches the running mirror to write-blocking; where the schema
    // lacks it, QEMU does not know the command.
    let change =
        qmp.execute_raw("block-job-change", json!({"id": "m0", "type": "mirror", "copy-mode": "write-blocking"})).await;
    match (features.block_job_change(), change) {
        (true, Ok(_)) => {}
        (false, Err(QmpError::Command { error, .. })) if error.class == ErrorClass::CommandNotFound => {}
        (has, other) => panic!("block-job-change in the schema: {has}, sent: {other:?}"),
    }
    let blocks = qmp.query_block().await.unwrap();
    assert!(blocks.raw().as_array().unwrap().is_empty(), "no -drive, no BlockBackend: {blocks}");
    qmp.execute_raw("block-job-cancel", json!({"device": "m0", "force": true})).await.unwrap();
    qmp.wait_event(T, |e| e.is("BLOCK_JOB_CANCELLED")).await.unwrap();
    let changes: Vec<_> = qmp
        .take_events()
        .into_iter()
        .filter(|e| e.is("JOB_STATUS_CHANGE"))
        .map(|e| e.data_str("status").unwrap().to_owned())
        .collect();
    assert!(changes.starts_with(&["created".to_owned(), "running".to_owned()]), "{changes:?}");

    qmp.quit().await.unwrap();
    qemu.wait_exit();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_pauses_before_switchover_and_completes() {
    let Some(binary) = qemu_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut src_qemu = QemuGuard::start(&binary, dir.path(), "src", &[]);
    let mut dst_qemu = QemuGuard::start(&binary, dir.path(), "dst", &["-incoming", "defer"]);
    let mut src = src_qemu.connect().await;
    let mut dst = dst_qemu.connect().await;
    assert_eq!(dst.query_status().await.unwrap().status, "inmigrate");

    src.migrate_set_capabilities(&[("events", true), ("pause-before-switchover", true)]).await.unwrap();
    dst.migrate_set_capabilities(&[("events", true)]).await.unwrap();
    src.migrate_set_parameters(json!({"downtime-limit": 300})).await.unwrap();
    let params = src.query_migrate_parameters().await.unwrap();
    assert_eq!(params["downtime-limit"], 300);

    // The NBD server takes the legacy address form on 7.2.
    src.nbd_server_start_unix(dir.path().join("nbd.sock")).await.unwrap();
    src.nbd_server_stop().await.unwrap();

    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    dst.migrate_incoming(&uri).await.unwrap();
    src.cont().await.unwrap();
    src.wait_event(T, |e| e.is("RESUME")).await.unwrap();
    src.migrate(&uri).await.unwrap();

    let pre = src.wait_migration_event(T, &["pre-switchover", "failed", "cancelled"]).await.unwrap();
    assert_eq!(pre.migration_status(), Some("pre-switchover"));
    let info = src.query_migrate().await.unwrap();
    assert_eq!(info.status, "pre-switchover");
    assert!(info.ram_transferred().unwrap() > 0);
    assert!(info.typed.is_some(), "{}", info.raw);
    let stopped = src.wait_event(T, |e| e.is("STOP")).await.unwrap();
    assert!(stopped.timestamp <= pre.timestamp, "the source stops before pre-switchover");

    src.migrate_continue("pre-switchover").await.unwrap();
    src.wait_migration_event(T, &["completed"]).await.unwrap();
    let info = src.query_migrate().await.unwrap();
    assert!(info.is_finished() && info.status == "completed", "{}", info.raw);
    assert_eq!(info.ram_remaining(), Some(0));
    // QEMU sends MIGRATION "completed" before it leaves "finish-migrate" for "postmigrate".
    let mut status = src.query_status().await.unwrap().status;
    for _ in 0..100 {
        if status != "finish-migrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = src.query_status().await.unwrap().status;
    }
    assert_eq!(status, "postmigrate");

    dst.wait_migration_event(T, &["completed"]).await.unwrap();
    let seen: Vec<String> = dst.take_events().iter().filter_map(|e| e.migration_status().map(str::to_owned)).collect();
    assert!(seen.contains(&"active".to_owned()), "{seen:?}");
    assert_eq!(dst.query_status().await.unwrap().status, "paused");
    dst.cont().await.unwrap();
    dst.wait_event(T, |e| e.is("RESUME")).await.unwrap();
    assert!(dst.query_status().await.unwrap().running);

    src.quit().await.unwrap();
    dst.quit().await.unwrap();
    src_qemu.wait_exit();
    dst_qemu.wait_exit();
}
