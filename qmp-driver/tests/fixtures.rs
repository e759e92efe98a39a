//! Recorded QEMU messages (see `fixtures/record_qemu72.py`) decode without error: typed where
//! the `qapi` 9.x types fit, raw where they do not, and our helpers read them all. Two sets:
//! QEMU 7.2 (Debian 12's, in `fixtures/`) and QEMU 10.0 (bookworm-backports, in
//! `fixtures/qemu-10.0/`); each set's schema is read into [`Features`] with the expected answers.

use std::fs;
use std::path::{Path, PathBuf};

use qapi::qmp;
use qmp_driver::{
    parse_capabilities, AddrForm, BlockJob, Decoded, Features, MigrationInfo, QemuEvent, Support, VmStatus,
};
use qmp_proto::{ErrorClass, ServerMessage};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The recorded sets: folder under `tests/fixtures` and the QEMU (major, minor) it holds.
const SETS: [(&str, (u64, u64)); 2] = [("", (7, 2)), ("qemu-10.0", (10, 0))];

fn fixtures(set: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(set)
}

fn load(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON files in a fixtures subfolder of a set, sorted.
fn files(set: &str, dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(fixtures(set).join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {set}/{dir}");
    files
}

/// Re-encodes a recorded message as one line and decodes it as our protocol layer would.
fn wire(value: &Value) -> ServerMessage {
    let line = serde_json::to_vec(value).unwrap();
    ServerMessage::decode(&line).unwrap_or_else(|e| panic!("{value}: {e}"))
}

fn typed<C: qapi::Command>(raw: &Value) -> (bool, Option<String>)
where
    C::Ok: DeserializeOwned,
{
    let d = Decoded::<C::Ok>::decode(C::NAME, raw.clone());
    assert_eq!(d.raw(), raw, "raw JSON is kept");
    (d.is_typed(), d.decode_error().map(str::to_owned))
}

/// Decodes a return value as the command's typed `Ok`: (typed?, decode error).
fn decode_reply(execute: &str, raw: &Value) -> (bool, Option<String>) {
    match execute {
        "query-status" => typed::<qmp::query_status>(raw),
        "query-migrate" => typed::<qmp::query_migrate>(raw),
        "query-migrate-capabilities" => typed::<qmp::query_migrate_capabilities>(raw),
        "query-migrate-parameters" => typed::<qmp::query_migrate_parameters>(raw),
        "query-block" => typed::<qmp::query_block>(raw),
        "query-block-jobs" => typed::<qmp::query_block_jobs>(raw),
        "query-jobs" => typed::<qmp::query_jobs>(raw),
        "query-version" => typed::<qmp::query_version>(raw),
        "migrate" => typed::<qmp::migrate>(raw),
        "migrate-incoming" => typed::<qmp::migrate_incoming>(raw),
        "migrate-continue" => typed::<qmp::migrate_continue>(raw),
        "migrate_cancel" => typed::<qmp::migrate_cancel>(raw),
        "migrate-set-capabilities" => typed::<qmp::migrate_set_capabilities>(raw),
        "migrate-set-parameters" => typed::<qmp::migrate_set_parameters>(raw),
        "blockdev-mirror" => typed::<qmp::blockdev_mirror>(raw),
        "nbd-server-start" => typed::<qmp::nbd_server_start>(raw),
        "cont" => typed::<qmp::cont>(raw),
        "stop" => typed::<qmp::stop>(raw),
        "quit" => typed::<qmp::quit>(raw),
        other => panic!("no typed command listed for {other}"),
    }
}

#[test]
fn greeting_decodes() {
    for (set, (major, minor)) in SETS {
        let raw = load(&fixtures(set).join("greeting.json"));
        let ServerMessage::Greeting(g) = wire(&raw) else { panic!("{set}: not a greeting") };
        assert_eq!((g.version.major, g.version.minor), (major, minor), "{set}");
        assert_eq!(g.capabilities, vec!["oob".to_owned()], "{set}");
        // The typed greeting decodes, but qapi 0.15 matches `"oob"` against an untagged unit
        // variant (which only matches `null`), so it lands in `Unknown` and `supports_oob()` is
        // false; use `qmp_proto::Greeting::capabilities` instead.
        let typed: qmp::QapiCapabilities = serde_json::from_value(raw).unwrap();
        assert_eq!(typed.QMP.version.qemu.minor, minor as i64, "{set}");
        assert!(!typed.supports_oob(), "qapi fixed its oob check: Greeting handling can use it");
    }
}

#[test]
fn every_recorded_reply_decodes_typed_or_raw() {
    for (set, version) in SETS {
        replies_decode(set, version);
    }
}

fn replies_decode(set: &str, (major, _): (u64, u64)) {
    let mut report = Vec::new();
    for path in files(set, "replies") {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let fixture = load(&path);
        let execute = fixture["execute"].as_str().unwrap();
        if execute == "query-qmp-schema" {
            continue; // read into `Features` below
        }
        let ServerMessage::Response(response) = wire(&fixture["reply"]) else { panic!("{name}: not a reply") };
        let raw = match response.result {
            Ok(raw) => raw,
            Err(e) => {
                assert!(name.starts_with("error-"), "{name}: unexpected error {e}");
                let class =
                    if execute == "no-such-command" { ErrorClass::CommandNotFound } else { ErrorClass::GenericError };
                assert_eq!(e.class, class, "{name}");
                continue;
            }
        };
        let (is_typed, error) = decode_reply(execute, &raw);
        report.push(format!(
            "{name}: {}",
            if is_typed { "typed".to_owned() } else { format!("raw ({})", error.as_deref().unwrap()) }
        ));

        // Which replies the 9.x types reject, pinned so a qapi upgrade shows up here: on 7.2
        // the capabilities (`block`, `compress`) and mirror jobs (no `actively-synced`).
        let expect_typed = major >= 10
            || !matches!(
                name.as_str(),
                "query-migrate-capabilities" | "query-block-jobs-mirror-running" | "query-block-jobs-mirror-ready"
            );
        assert_eq!(is_typed, expect_typed, "{set}/{name}: {error:?}");

        // Our helpers read every one of them regardless.
        match execute {
            "query-status" => {
                let status = VmStatus::from_reply(&raw).unwrap();
                assert!(status.typed.is_some(), "{name}");
                assert_eq!(status.running, status.status == "running", "{name}");
            }
            "query-migrate" => {
                let info = MigrationInfo::from_reply(raw.clone());
                assert!(info.typed.is_some(), "{name}");
                let expected = name.trim_start_matches("query-migrate-").trim_start_matches("dst-");
                let expected = if expected == "none" { "none" } else { expected };
                assert_eq!(info.status, expected, "{name}");
                if info.status == "active" && !name.contains("dst") {
                    assert!(info.ram_transferred().unwrap() > 0);
                    assert!(info.ram_total().unwrap() >= 64 << 20);
                    assert!(info.total_time_ms().is_some());
                }
                if name == "query-migrate-completed" {
                    assert_eq!(info.ram_remaining(), Some(0));
                    assert!(info.downtime_ms().is_some());
                    assert!(info.is_finished());
                }
            }
            "query-migrate-capabilities" => {
                let caps = parse_capabilities(&raw).unwrap();
                let listed = |name: &str| caps.iter().any(|c| c.name == name);
                for name in ["events", "pause-before-switchover", "late-block-activate", "postcopy-ram"] {
                    assert!(listed(name), "{set}: {name} listed");
                }
                for name in ["block", "compress"] {
                    assert_eq!(listed(name), major < 8, "{set}: {name} listed only by 7.2");
                }
            }
            "query-block-jobs" => {
                let jobs = BlockJob::list_from_reply(raw.clone()).unwrap();
                if name.contains("mirror") {
                    let job = &jobs[0];
                    assert_eq!((job.device.as_str(), job.job_type.as_str()), ("mirror0", "mirror"));
                    assert_eq!(job.ready, name.ends_with("ready"));
                    assert_eq!(job.status, if job.ready { "ready" } else { "running" });
                    assert!(job.offset > 0 && job.len >= job.offset);
                    assert_eq!(job.typed.is_none(), major < 8, "7.2 mirror jobs lack actively-synced");
                } else {
                    assert!(jobs.is_empty());
                }
            }
            _ => {}
        }
    }
    eprintln!("{set}:\n{}", report.join("\n"));
}

#[test]
fn every_recorded_event_decodes_typed() {
    for (set, _) in SETS {
        events_decode(set);
    }
}

fn events_decode(set: &str) {
    let mut names = Vec::new();
    for path in files(set, "events") {
        let raw = load(&path);
        let ServerMessage::Event(event) = wire(&raw) else { panic!("{}: not an event", path.display()) };
        let event = QemuEvent::decode(event);
        assert!(event.typed.is_some(), "{}: {:?}", path.display(), event.decode_error);
        assert!(event.timestamp.seconds > 0);
        assert!(event.time().is_some());
        names.push(event.name.clone());
        if event.is("MIGRATION") {
            assert!(event.migration_status().is_some());
        }
    }
    for expected in [
        "STOP",
        "RESUME",
        "MIGRATION",
        "MIGRATION_PASS",
        "JOB_STATUS_CHANGE",
        "BLOCK_JOB_READY",
        "BLOCK_JOB_COMPLETED",
        "SHUTDOWN",
    ] {
        assert!(names.iter().any(|n| n == expected), "{set}: a {expected} event is recorded");
    }
}

/// Reads a set's recorded `query-qmp-schema` and `query-version` into [`Features`].
fn features(set: &str) -> Features {
    let reply =
        |name: &str| load(&fixtures(set).join("replies").join(format!("{name}.json")))["reply"]["return"].clone();
    Features::from_schema(&reply("query-qmp-schema"), Some(&reply("query-version"))).unwrap()
}

#[test]
fn schema_features_of_qemu_7_2() {
    let f = features("");
    assert!(f.version.starts_with("7.2."), "{}", f.version);
    assert!(f.has_command("blockdev-mirror") && f.has_command("migrate-continue"));
    assert!(!f.block_job_change(), "block-job-change is 8.2+");
    for cap in ["events", "postcopy-ram", "pause-before-switchover", "late-block-activate", "zero-blocks", "block"] {
        assert_eq!(f.capability(cap), Support::Yes, "{cap}");
    }
    assert_eq!(f.capability("compress"), Support::Yes);
    assert_eq!(f.capability("switchover-ack"), Support::No);
    assert_eq!(f.parameter("downtime-limit"), Support::Yes);
    assert_eq!(f.parameter("max-bandwidth"), Support::Yes);
    assert_eq!(f.parameter("tls-creds"), Support::Yes);
    assert_eq!(f.parameter("block-incremental"), Support::Yes);
    assert_eq!(f.parameter("avail-switchover-bandwidth"), Support::No);
    assert!(!f.migrate_channels() && f.migrate_blk());
    assert_eq!(f.mirror_copy_modes.iter().map(String::as_str).collect::<Vec<_>>(), ["background", "write-blocking"]);
    assert_eq!(f.nbd_server_addr, Some(AddrForm::Legacy));
    // What row-migrate sets, on each side.
    assert_eq!(f.require_capabilities("the source QEMU", &["events", "pause-before-switchover"]), Ok(vec![]));
    assert_eq!(f.require_capabilities("the destination QEMU", &["events", "late-block-activate"]), Ok(vec![]));
}

#[test]
fn schema_features_of_qemu_10_0() {
    let f = features("qemu-10.0");
    assert!(f.version.starts_with("10.0."), "{}", f.version);
    assert!(f.block_job_change(), "block-job-change is 8.2+");
    for cap in ["events", "postcopy-ram", "pause-before-switchover", "late-block-activate", "switchover-ack"] {
        assert_eq!(f.capability(cap), Support::Yes, "{cap}");
    }
    assert_eq!(f.capability("zero-blocks"), Support::Deprecated);
    assert_eq!(f.capability("block"), Support::No, "removed in 9.1");
    assert_eq!(f.capability("compress"), Support::No, "removed in 9.1");
    assert_eq!(f.parameter("downtime-limit"), Support::Yes);
    assert_eq!(f.parameter("max-bandwidth"), Support::Yes);
    assert_eq!(f.parameter("tls-creds"), Support::Yes);
    assert_eq!(f.parameter("block-incremental"), Support::No);
    assert!(f.migrate_channels() && !f.migrate_blk());
    assert_eq!(f.mirror_copy_modes.iter().map(String::as_str).collect::<Vec<_>>(), ["background", "write-blocking"]);
    assert_eq!(f.nbd_server_addr, Some(AddrForm::Legacy));
    assert_eq!(f.require_capabilities("the source QEMU", &["events", "pause-before-switchover"]), Ok(vec![]));
    assert_eq!(f.require_capabilities("the destination QEMU", &["events", "late-block-activate"]), Ok(vec![]));
    // A capability it lacks is refused by name, a deprecated one passes and is reported.
    let err = f.require_capabilities("the source QEMU", &["events", "block"]).unwrap_err();
    assert!(err.starts_with("the source QEMU (QEMU 10.0.") && err.contains("capability block "), "{err}");
    assert_eq!(f.require_capabilities("the source QEMU", &["zero-blocks"]), Ok(vec!["zero-blocks"]));
    assert_eq!(f.known_capabilities(&[("events", true), ("block", false)]), [("events", true)]);
}

#[test]
fn a_schema_that_is_not_one_is_refused() {
    assert!(Features::from_schema(&serde_json::json!({}), None).is_err());
    assert!(Features::from_schema(&serde_json::json!([]), None).is_err());
}
