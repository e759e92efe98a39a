//! Recorded QEMU 7.2 messages (see `fixtures/record_qemu72.py`) decode without error: typed
//! where the `qapi` 9.x types fit, raw where they do not, and our helpers read them all.

use std::fs;
use std::path::{Path, PathBuf};

use qapi::qmp;
use qmp_driver::{parse_capabilities, BlockJob, Decoded, MigrationInfo, QemuEvent, VmStatus};
use qmp_proto::{ErrorClass, ServerMessage};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON files in a fixtures subfolder, sorted.
fn files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(fixtures().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {dir}");
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
    let raw = load(&fixtures().join("greeting.json"));
    let ServerMessage::Greeting(g) = wire(&raw) else { panic!("not a greeting") };
    assert_eq!((g.version.major, g.version.minor), (7, 2));
    assert_eq!(g.capabilities, vec!["oob".to_owned()]);
    // The typed greeting decodes, but qapi 0.15 matches `"oob"` against an untagged unit
    // variant (which only matches `null`), so it lands in `Unknown` and `supports_oob()` is
    // false; use `qmp_proto::Greeting::capabilities` instead.
    let typed: qmp::QapiCapabilities = serde_json::from_value(raw).unwrap();
    assert_eq!(typed.QMP.version.qemu.minor, 2);
    assert!(!typed.supports_oob(), "qapi fixed its oob check: Greeting handling can use it");
}

#[test]
fn every_recorded_reply_decodes_typed_or_raw() {
    let mut report = Vec::new();
    for path in files("replies") {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let fixture = load(&path);
        let execute = fixture["execute"].as_str().unwrap();
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

        // Which replies the 9.x types reject on 7.2, pinned so a qapi upgrade shows up here.
        let expect_typed = !matches!(
            name.as_str(),
            "query-migrate-capabilities" | "query-block-jobs-mirror-running" | "query-block-jobs-mirror-ready"
        );
        assert_eq!(is_typed, expect_typed, "{name}: {error:?}");

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
                for name in ["events", "pause-before-switchover", "block", "compress"] {
                    assert!(caps.iter().any(|c| c.name == name), "{name} listed");
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
                    assert!(job.typed.is_none(), "7.2 mirror jobs lack actively-synced");
                } else {
                    assert!(jobs.is_empty());
                }
            }
            _ => {}
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn every_recorded_event_decodes_typed() {
    let mut names = Vec::new();
    for path in files("events") {
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
        assert!(names.iter().any(|n| n == expected), "a {expected} event is recorded");
    }
}
