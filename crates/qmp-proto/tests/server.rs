//! The server and client over real Unix sockets, with a toy handler.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qmp_proto::{
    bind_control_socket, serve, Client, ClientError, CommandError, ErrorClass, Event, Greeting, Handler, HandlerFuture,
    LineBuffer, Version,
};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(5);

/// `echo` returns its arguments, `sleep-ms` sleeps `ms` then returns, `fail` fails, `panic`
/// panics.
struct Toy;

impl Handler for Toy {
    fn handle<'a>(&'a self, command: &'a str, arguments: Map<String, Value>) -> HandlerFuture<'a> {
        Box::pin(async move {
            match command {
                "echo" => Ok(Value::Object(arguments)),
                "sleep-ms" => {
                    let ms = arguments.get("ms").and_then(Value::as_u64).ok_or_else(|| CommandError::generic("ms?"))?;
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!({"slept": ms}))
                }
                "fail" => Err(CommandError::device_not_found("no such export")),
                "panic" => panic!("toy handler panics on request"),
                _ => Err(CommandError::command_not_found(command)),
            }
        })
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    events: broadcast::Sender<Event>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = bind_control_socket(&path).unwrap();
    let (events, _) = broadcast::channel(64);
    let (stop, stop_rx) = watch::channel(false);
    let greeting = Greeting::new(Version { major: 0, minor: 1, micro: 0 }, "nbd-row-proxy 0.1.0");
    let task = tokio::spawn(serve(listener, greeting, Arc::new(Toy), events.clone(), stop_rx));
    Server { _dir: dir, path, events, stop, task }
}

impl Server {
    async fn client(&self) -> Client {
        Client::connect(&self.path, T).await.unwrap()
    }

    async fn raw(&self) -> Raw {
        let mut raw = Raw { stream: UnixStream::connect(&self.path).await.unwrap(), lines: LineBuffer::new() };
        assert!(raw.recv().await.get("QMP").is_some());
        raw
    }

    async fn negotiated_raw(&self) -> Raw {
        let mut raw = self.raw().await;
        raw.send(r#"{"execute": "qmp_capabilities"}"#).await;
        assert_eq!(raw.recv().await, json!({"return": {}}));
        raw
    }

    fn emit(&self, name: &str, data: Value) {
        self.events.send(Event::now(name, data)).unwrap();
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(T, self.task).await.expect("server stops promptly").unwrap();
    }
}

/// A byte-level client, to send what `Client` would not.
struct Raw {
    stream: UnixStream,
    lines: LineBuffer,
}

impl Raw {
    async fn send(&mut self, text: &str) {
        self.stream.write_all(format!("{text}\n").as_bytes()).await.unwrap();
    }

    async fn recv(&mut self) -> Value {
        tokio::time::timeout(T, async {
            loop {
                if let Some(line) = self.lines.next_line().unwrap() {
                    return serde_json::from_slice(&line).unwrap();
                }
                let mut buf = [0u8; 4096];
                let n = self.stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "server closed the connection");
                self.lines.push(&buf[..n]);
            }
        })
        .await
        .expect("reply in time")
    }
}

#[tokio::test]
async fn greeting_is_sent_on_connect() {
    let server = start().await;
    let mut raw = Raw { stream: UnixStream::connect(&server.path).await.unwrap(), lines: LineBuffer::new() };
    assert_eq!(
        raw.recv().await,
        json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, "package": "nbd-row-proxy 0.1.0"},
            "capabilities": []}})
    );
    let client = server.client().await;
    assert_eq!(client.greeting().package, "nbd-row-proxy 0.1.0");
    server.stop().await;
}

#[tokio::test]
async fn commands_before_negotiation_are_refused() {
    let server = start().await;
    let mut raw = server.raw().await;
    raw.send(r#"{"execute": "echo", "id": 1}"#).await;
    assert_eq!(
        raw.recv().await,
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1})
    );
    raw.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#).await;
    assert_eq!(raw.recv().await["error"]["class"], "GenericError");
    raw.send(r#"{"execute": "qmp_capabilities", "id": "n"}"#).await;
    assert_eq!(raw.recv().await, json!({"return": {}, "id": "n"}));
    raw.send(r#"{"execute": "qmp_capabilities", "id": 2}"#).await;
    let again = raw.recv().await;
    assert_eq!(again["error"]["class"], "CommandNotFound");
    assert_eq!(again["id"], 2);
    raw.send(r#"{"execute": "echo", "arguments": {"a": 1}, "id": 3}"#).await;
    assert_eq!(raw.recv().await, json!({"return": {"a": 1}, "id": 3}));
    server.stop().await;
}

#[tokio::test]
async fn unknown_and_failing_commands_leave_the_connection_usable() {
    let server = start().await;
    let mut client = server.client().await;
    match client.execute("nope", Value::Null, T).await {
        Err(ClientError::Command(e)) => {
            assert_eq!(e, CommandError::new(ErrorClass::CommandNotFound, "The command nope has not been found"))
        }
        other => panic!("unexpected {other:?}"),
    }
    match client.execute("fail", Value::Null, T).await {
        Err(ClientError::Command(e)) => assert_eq!(e.class, ErrorClass::DeviceNotFound),
        other => panic!("unexpected {other:?}"),
    }
    match client.execute("panic", Value::Null, T).await {
        Err(ClientError::Command(e)) => assert_eq!(e.class, ErrorClass::GenericError),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(client.execute("echo", json!({"x": "y"}), T).await.unwrap(), json!({"x": "y"}));
    server.stop().await;
}

#[tokio::test]
async fn malformed_input_gets_generic_errors_and_the_connection_goes_on() {
    let server = start().await;
    let mut raw = server.negotiated_raw().await;
    raw.send(r#"{"execute": "#).await;
    let reply = raw.recv().await;
    assert_eq!(reply["error"]["class"], "GenericError");
    assert!(reply["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "), "{reply}");
    assert!(reply.get("id").is_none());
    for (input, id) in [
        ("[1, 2]", Value::Null),
        (r#"{"id": 5}"#, json!(5)),
        (r#"{"execute": "echo", "bogus": true, "id": "b"}"#, json!("b")),
        (r#"{"execute": "echo", "arguments": [1], "id": "c"}"#, json!("c")),
        (r#"{"execute": 7, "id": "d"}"#, json!("d")),
    ] {
        raw.send(input).await;
        let reply = raw.recv().await;
        assert_eq!(reply["error"]["class"], "GenericError", "{input}");
        assert_eq!(reply.get("id").cloned().unwrap_or(Value::Null), id, "{input}");
    }
    // Blank lines are ignored; an over-long line is refused and skipped.
    raw.send("").await;
    let long = format!(r#"{{"execute": "echo", "arguments": {{"s": "{}"}}}}"#, "x".repeat(qmp_proto::MAX_LINE));
    raw.send(&long).await;
    let reply = raw.recv().await;
    assert_eq!(reply["error"]["class"], "GenericError");
    assert!(reply["error"]["desc"].as_str().unwrap().contains("longer than"), "{reply}");
    raw.send(r#"{"execute": "echo", "id": 9}"#).await;
    assert_eq!(raw.recv().await, json!({"return": {}, "id": 9}));
    server.stop().await;
}

#[tokio::test]
async fn ids_are_echoed_verbatim_and_replies_come_in_order() {
    let server = start().await;
    let mut raw = server.negotiated_raw().await;
    raw.send(r#"{"execute": "sleep-ms", "arguments": {"ms": 200}, "id": {"a": [1, "x"]}}"#).await;
    raw.send(r#"{"execute": "echo", "id": "second"}"#).await;
    raw.send(r#"{"execute": "echo"}"#).await;
    assert_eq!(raw.recv().await, json!({"return": {"slept": 200}, "id": {"a": [1, "x"]}}));
    assert_eq!(raw.recv().await, json!({"return": {}, "id": "second"}));
    assert_eq!(raw.recv().await, json!({"return": {}}));
    server.stop().await;
}

#[tokio::test]
async fn events_reach_every_negotiated_client() {
    let server = start().await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    // Not negotiated yet: must not get the event.
    let mut pending = server.raw().await;
    server.emit("MERGE_DONE", json!({"export": "disk"}));
    for client in [&mut a, &mut b] {
        let ev = client.next_event(T).await.unwrap().expect("event delivered");
        assert_eq!(ev.event, "MERGE_DONE");
        assert_eq!(ev.data, json!({"export": "disk"}));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((now - 5..=now).contains(&ev.timestamp.seconds));
    }
    pending.send(r#"{"execute": "qmp_capabilities"}"#).await;
    assert_eq!(pending.recv().await, json!({"return": {}}));
    pending.send(r#"{"execute": "echo", "id": 1}"#).await;
    assert_eq!(pending.recv().await, json!({"return": {}, "id": 1}), "no event from before negotiation");
    assert!(a.next_event(Duration::from_millis(50)).await.unwrap().is_none());
    server.stop().await;
}

#[tokio::test]
async fn events_flow_while_a_slow_command_runs_on_the_same_connection() {
    let server = start().await;
    let mut raw = server.negotiated_raw().await;
    raw.send(r#"{"execute": "sleep-ms", "arguments": {"ms": 2000}, "id": 1}"#).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    server.emit("PROGRESS", json!({"done": 1}));
    let ev = raw.recv().await;
    assert_eq!(ev["event"], "PROGRESS");
    assert!(started.elapsed() < Duration::from_millis(1000), "event held back by the command");
    assert_eq!(raw.recv().await, json!({"return": {"slept": 2000}, "id": 1}));

    // The client keeps events that arrive while it waits for a reply, in order.
    let mut client = server.client().await;
    let events = server.events.clone();
    let emitter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for n in 0..3 {
            events.send(Event::now("TICK", json!({"n": n}))).unwrap();
        }
    });
    assert_eq!(client.execute("sleep-ms", json!({"ms": 300}), T).await.unwrap(), json!({"slept": 300}));
    emitter.await.unwrap();
    let kept = client.take_events();
    assert_eq!(kept.iter().map(|e| e.data["n"].as_i64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(kept.iter().all(|e| e.event == "TICK" && e.timestamp.seconds > 0));
    server.stop().await;
}

#[tokio::test]
async fn a_client_leaving_mid_command_does_not_disturb_others() {
    let server = start().await;
    let mut other = server.client().await;
    {
        let mut quitter = server.negotiated_raw().await;
        quitter.send(r#"{"execute": "sleep-ms", "arguments": {"ms": 300}, "id": 1}"#).await;
        quitter.send(r#"{"execute": "echo", "id": 2}"#).await;
    }
    {
        // Garbage, half a line, then gone.
        let mut rude = server.raw().await;
        rude.stream.write_all(b"\x00\xff\xfe garbage\n{\"execute\": \"ec").await.unwrap();
    }
    assert_eq!(other.execute("echo", json!({"k": 1}), T).await.unwrap(), json!({"k": 1}));
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.emit("AFTER", Value::Null);
    assert_eq!(other.next_event(T).await.unwrap().unwrap().event, "AFTER");
    assert_eq!(other.execute("sleep-ms", json!({"ms": 1}), T).await.unwrap(), json!({"slept": 1}));
    let mut fresh = server.client().await;
    assert_eq!(fresh.execute("echo", Value::Null, T).await.unwrap(), json!({}));
    server.stop().await;
}

#[tokio::test]
async fn client_timeout_leaves_the_connection_usable() {
    let server = start().await;
    let mut client = server.client().await;
    let slow = client.execute("sleep-ms", json!({"ms": 300}), Duration::from_millis(50)).await;
    assert!(matches!(slow, Err(ClientError::Timeout)), "{slow:?}");
    // The late reply to the timed-out command is recognised by its id and dropped.
    assert_eq!(client.execute("echo", json!({"n": 2}), T).await.unwrap(), json!({"n": 2}));
    server.stop().await;
}

#[tokio::test]
async fn half_closed_client_still_gets_its_replies() {
    let server = start().await;
    let mut raw = server.raw().await;
    // Last request without a newline, then EOF: as `printf ... | socat` would send.
    raw.stream
        .write_all(
            b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"sleep-ms\", \"arguments\": {\"ms\": 50}, \"id\": 1}",
        )
        .await
        .unwrap();
    raw.stream.shutdown().await.unwrap();
    assert_eq!(raw.recv().await, json!({"return": {}}));
    assert_eq!(raw.recv().await, json!({"return": {"slept": 50}, "id": 1}));
    let mut rest = Vec::new();
    raw.stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn socket_is_private() {
    let server = start().await;
    let mode = std::fs::metadata(&server.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    server.stop().await;
}

#[tokio::test]
async fn stale_socket_is_replaced_but_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a dropped listener leaves its file behind");
    let listener = bind_control_socket(&path).expect("stale socket replaced");
    let connect = tokio::spawn({
        let path = path.clone();
        async move { UnixStream::connect(path).await }
    });
    listener.accept().await.unwrap();
    connect.await.unwrap().unwrap();
    drop(listener);

    let server = start().await;
    let err = bind_control_socket(&server.path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    let mut client = server.client().await;
    assert_eq!(client.execute("echo", Value::Null, T).await.unwrap(), json!({}));
    server.stop().await;

    let file = dir.path().join("plain");
    std::fs::write(&file, b"keep me").unwrap();
    assert_eq!(bind_control_socket(&file).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[tokio::test]
async fn shutdown_closes_connections_even_mid_command() {
    let server = start().await;
    let mut raw = server.negotiated_raw().await;
    raw.send(r#"{"execute": "sleep-ms", "arguments": {"ms": 10000}, "id": 1}"#).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut idle = server.client().await;
    server.stop().await;
    let mut rest = Vec::new();
    tokio::time::timeout(T, raw.stream.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty());
    assert!(matches!(idle.next_event(T).await, Err(ClientError::Closed)));
}

/// A socket that greets with NBD's magic and waits (as an NBD server does) is named at once,
/// not after the timeout.
#[tokio::test]
async fn an_nbd_socket_is_recognised_before_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let started = Instant::now();
    let err = Client::connect(&path, Duration::from_secs(30)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert!(matches!(&err, ClientError::NotQmp(what) if what.contains("NBD server")), "{err}");
    server.await.unwrap();
}
