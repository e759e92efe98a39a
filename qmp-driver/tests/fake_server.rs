//! A fake QEMU 7.2 (a `UnixListener` answering from the recorded fixtures, plus things no
//! QEMU here sends: an unknown event, unknown enum values, a garbage line, a late reply)
//! shows the client decodes what it can, keeps the rest, and keeps working.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::qmp;
use qmp_driver::{Decoded, Qmp, QmpError};
use qmp_proto::{ErrorClass, Request};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

const T: Duration = Duration::from_secs(5);

fn fixture(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The recorded reply to a command, to be re-sent with the current request's id.
fn reply(name: &str) -> Value {
    fixture(&format!("replies/{name}.json"))["reply"].clone()
}

fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": {"seconds": 1_795_571_247, "microseconds": 42}})
}

/// What the fake server sends for one request.
enum Out {
    /// A reply (its `id` replaced by the request's) or an event.
    Msg(Value),
    /// A line that is not JSON.
    Garbage,
}

/// Plays QEMU 7.2 for one client; returns the requests it received.
async fn fake_qemu(listener: UnixListener) -> Vec<Request> {
    let (stream, _) = listener.accept().await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let send = |v: Value| {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.extend_from_slice(b"\r\n");
        line
    };
    write.write_all(&send(fixture("greeting.json"))).await.unwrap();
    let mut received = Vec::new();
    let mut late: Option<Value> = None;
    let mut status_calls = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        let req = Request::decode(line.as_bytes()).expect("client sends valid requests");
        let ok = |v: Value| Out::Msg(json!({ "return": v }));
        let out: Vec<Out> = match req.execute.as_str() {
            "qmp_capabilities" => vec![ok(json!({}))],
            "query-status" => {
                status_calls += 1;
                match status_calls {
                    1 => vec![
                        Out::Msg(event("FUTURE_THING", json!({"answer": 42}))),
                        Out::Msg(reply("query-status-running")),
                    ],
                    _ => vec![ok(json!({"status": "future-state", "singlestep": false, "running": false}))],
                }
            }
            "query-migrate-capabilities" => vec![Out::Msg(reply("query-migrate-capabilities"))],
            "migrate-set-capabilities" | "migrate-set-parameters" | "migrate" | "migrate-continue" => {
                vec![ok(json!({}))]
            }
            "query-migrate" => {
                let mut r = reply("query-migrate-active");
                r["return"]["status"] = json!("teleporting");
                vec![Out::Msg(event("MIGRATION", json!({"status": "teleporting"}))), Out::Msg(r)]
            }
            "query-block-jobs" => vec![Out::Msg(reply("query-block-jobs-mirror-running"))],
            "cont" => vec![
                ok(json!({})),
                Out::Msg(event("MIGRATION", json!({"status": 5}))),
                Out::Msg(fixture("events/MIGRATION_PASS-src-1.json")),
                Out::Garbage,
                Out::Msg(fixture("events/RESUME-src-1.json")),
            ],
            "stop" => vec![ok(json!({})), Out::Msg(fixture("events/STOP-src-1.json"))],
            "query-version" => vec![Out::Garbage, Out::Msg(reply("query-version"))],
            "slow-command" => {
                late = req.id.clone();
                vec![]
            }
            // QEMU sends SHUTDOWN before the reply, then closes.
            "quit" => vec![Out::Msg(fixture("events/SHUTDOWN-src-1.json")), ok(json!({}))],
            _ => vec![Out::Msg(reply("error-command-not-found"))],
        };
        if req.execute != "slow-command" {
            if let Some(id) = late.take() {
                write.write_all(&send(json!({"return": {"late": true}, "id": id}))).await.unwrap();
            }
        }
        for o in out {
            let line = match o {
                Out::Garbage => b"this is not QMP {\r\n".to_vec(),
                Out::Msg(mut v) => {
                    if v.get("return").is_some() || v.get("error").is_some() {
                        v["id"] = req.id.clone().unwrap();
                    }
                    send(v)
                }
            };
            write.write_all(&line).await.unwrap();
        }
        let quit = req.execute == "quit";
        received.push(req);
        if quit {
            break;
        }
    }
    received
}

fn start() -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<Vec<Request>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, tokio::spawn(fake_qemu(listener)))
}

#[tokio::test]
async fn client_survives_what_qemu_and_the_future_send() {
    let (_dir, path, server) = start();
    let mut qmp = Qmp::connect(&path, T).await.unwrap();
    assert_eq!((qmp.version().major, qmp.version().minor), (7, 2));
    assert_eq!(qmp.greeting().capabilities, vec!["oob".to_owned()]);
    qmp.set_timeout(T);

    // An unknown event arrives during a command: kept, raw.
    let status = qmp.query_status().await.unwrap();
    assert_eq!((status.status.as_str(), status.running), ("running", true));
    assert!(status.typed.is_some());
    let future = qmp.next_event(T).await.unwrap().expect("the unknown event was kept");
    assert_eq!(future.name, "FUTURE_THING");
    assert!(future.typed.is_none());
    assert_eq!(future.data, json!({"answer": 42}));
    assert_eq!((future.timestamp.seconds, future.timestamp.microseconds), (1_795_571_247, 42));

    // A reply with a run state the qapi enum lacks: raw via execute, still read by the helper.
    let decoded = qmp.execute(qmp::query_status {}).await.unwrap();
    let Decoded::Raw { raw, error } = &decoded else { panic!("{decoded:?}") };
    assert_eq!(raw["status"], "future-state");
    assert!(error.contains("future-state"), "{error}");
    assert_eq!(qmp.query_status().await.unwrap().status, "future-state");

    // 7.2's capability list: raw as a typed command, complete by name.
    let decoded = qmp.execute(qmp::query_migrate_capabilities {}).await.unwrap();
    assert!(!decoded.is_typed());
    assert!(decoded.decode_error().unwrap().contains("compress"));
    let caps = qmp.query_migrate_capabilities().await.unwrap();
    assert!(caps.iter().any(|c| c.name == "block" && !c.state));
    qmp.migrate_set_capabilities(&[("events", true), ("pause-before-switchover", true), ("block", false)])
        .await
        .unwrap();
    qmp.migrate_set_parameters(json!({"max-bandwidth": 1 << 20})).await.unwrap();

    // A migration status the qapi enum lacks, in the reply and in an event.
    let info = qmp.query_migrate().await.unwrap();
    assert_eq!(info.status, "teleporting");
    assert!(info.typed.is_none());
    assert!(info.ram_transferred().unwrap() > 0);
    assert!(!info.is_finished());

    // 7.2's mirror job lacks `actively-synced`: raw, fields still read.
    let jobs = qmp.query_block_jobs().await.unwrap();
    assert_eq!((jobs[0].device.as_str(), jobs[0].status.as_str()), ("mirror0", "running"));
    assert!(jobs[0].typed.is_none());

    // Waiting for RESUME passes over three events (one with mistyped data), kept, and a line
    // that is not QMP, skipped.
    qmp.cont().await.unwrap();
    let resume = qmp.wait_event(T, |e| e.is("RESUME")).await.unwrap();
    assert!(resume.typed.is_some());
    assert!(resume.time().is_some());
    let kept: Vec<_> = qmp.take_events();
    let names: Vec<_> = kept.iter().map(|e| (e.name.as_str(), e.typed.is_some())).collect();
    assert_eq!(names, [("MIGRATION", false), ("MIGRATION", false), ("MIGRATION_PASS", true)]);
    assert_eq!(kept[0].migration_status(), Some("teleporting"));
    assert_eq!(kept[1].data, json!({"status": 5}));

    // An error reply is an error, not a disconnection.
    let err = qmp.execute_raw("no-such-command", Value::Null).await.unwrap_err();
    assert_eq!(err.command_error().unwrap().class, ErrorClass::CommandNotFound);
    assert!(!err.is_disconnected());

    // A garbage line costs that command its reply, not the connection.
    let err = qmp.execute(qmp::query_version {}).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err}");

    // A command that times out; its late reply is dropped by id.
    let err = qmp.execute_raw_with_timeout("slow-command", Value::Null, Duration::from_millis(200)).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    qmp.stop().await.unwrap();
    let stop = qmp.wait_event(T, |e| e.is("STOP")).await.unwrap();
    assert!(stop.typed.is_some());

    // Waiting for an event that never comes times out and keeps nothing back.
    let err = qmp.wait_migration_event(Duration::from_millis(100), &["completed"]).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("completed"), "{err}");

    qmp.quit().await.unwrap();
    let shutdown = qmp.next_event(T).await.unwrap().unwrap();
    assert_eq!(shutdown.name, "SHUTDOWN");

    let received = server.await.unwrap();
    let set_caps = received.iter().find(|r| r.execute == "migrate-set-capabilities").unwrap();
    assert_eq!(
        Value::Object(set_caps.arguments.clone()),
        json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "pause-before-switchover", "state": true},
            {"capability": "block", "state": false},
        ]})
    );
}

#[tokio::test]
async fn commands_send_what_qemu_7_2_accepts() {
    let (_dir, path, server) = start();
    let mut qmp = Qmp::connect(&path, T).await.unwrap();
    qmp.migrate("unix:/tmp/mig.sock").await.unwrap();
    qmp.migrate_continue("pre-switchover").await.unwrap();
    qmp.quit().await.unwrap();
    let received = server.await.unwrap();
    let args: Vec<(String, Value)> = received.into_iter().map(|r| (r.execute, Value::Object(r.arguments))).collect();
    assert_eq!(
        args,
        [
            ("qmp_capabilities".to_owned(), json!({})),
            ("migrate".to_owned(), json!({"uri": "unix:/tmp/mig.sock"})),
            ("migrate-continue".to_owned(), json!({"state": "pre-switchover"})),
            ("quit".to_owned(), json!({})),
        ]
    );
}
