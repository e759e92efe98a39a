//! QMP messages and their one-line JSON encoding, without I/O.
//!
//! Server side: [`Request::decode`] turns a received line into a request (or a [`BadRequest`]
//! carrying the error reply QEMU would send); [`Greeting`], [`Response`] and [`Event`] encode to
//! lines. Client side: [`Request::to_line`] encodes, [`ServerMessage::decode`] tells a received
//! line apart by its key.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use thiserror::Error;

/// Serializes one message as a JSON line (`\n`-terminated).
fn to_line(value: &impl Serialize) -> Vec<u8> {
    // Only string-keyed maps and plain structs are serialized: this cannot fail.
    let mut line = serde_json::to_vec(value).expect("QMP messages always serialize");
    line.push(b'\n');
    line
}

/// Version announced in the greeting (QEMU's `{"major", "minor", "micro"}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro (patch) version.
    pub micro: u64,
}

/// The banner a server sends on connect:
/// `{"QMP": {"version": {"qemu": VERSION, "package": PACKAGE}, "capabilities": [...]}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Greeting {
    /// Version, in the slot QEMU names `qemu`.
    pub version: Version,
    /// Free-form package string, e.g. `"nbd-row-proxy 0.1.0"`.
    pub package: String,
    /// Capabilities the server offers (QEMU: `"oob"`); ours offers none.
    pub capabilities: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct GreetingWire {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Serialize, Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct GreetingVersion {
    qemu: Version,
    #[serde(default)]
    package: String,
}

impl Greeting {
    /// A greeting with no capabilities.
    pub fn new(version: Version, package: impl Into<String>) -> Self {
        Self { version, package: package.into(), capabilities: Vec::new() }
    }

    /// Encodes as a JSON line.
    pub fn to_line(&self) -> Vec<u8> {
        to_line(&GreetingWire {
            qmp: GreetingBody {
                version: GreetingVersion { qemu: self.version, package: self.package.clone() },
                capabilities: self.capabilities.clone(),
            },
        })
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let wire: GreetingWire = serde_json::from_value(value)?;
        let GreetingBody { version, capabilities } = wire.qmp;
        Ok(Self { version: version.qemu, package: version.package, capabilities })
    }
}

/// A command from the client: `{"execute": CMD, "arguments": {...}, "id": ANY}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Command name.
    pub execute: String,
    /// Arguments; empty when the client sent none.
    pub arguments: Map<String, Value>,
    /// Any JSON value the client chose; echoed in the response so replies can be matched.
    pub id: Option<Value>,
}

impl Request {
    /// A request without arguments or id.
    pub fn new(execute: impl Into<String>) -> Self {
        Self { execute: execute.into(), arguments: Map::new(), id: None }
    }

    /// Encodes as a JSON line; empty arguments and a missing id are left out.
    pub fn to_line(&self) -> Vec<u8> {
        let mut obj = Map::new();
        obj.insert("execute".into(), Value::String(self.execute.clone()));
        if !self.arguments.is_empty() {
            obj.insert("arguments".into(), Value::Object(self.arguments.clone()));
        }
        if let Some(id) = &self.id {
            obj.insert("id".into(), id.clone());
        }
        to_line(&obj)
    }

    /// Decodes one received line. On failure the error holds the reply to send (with the id,
    /// when one could be read), using QEMU's wording; the connection should go on.
    pub fn decode(line: &[u8]) -> Result<Self, BadRequest> {
        let value: Value =
            serde_json::from_slice(line).map_err(|e| BadRequest::new(None, format!("JSON parse error, {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(BadRequest::new(None, "QMP input must be a JSON object"));
        };
        let id = obj.remove("id");
        let bad = |desc: String| BadRequest::new(id.clone(), desc);
        let execute = match obj.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(bad("QMP input member 'execute' must be a string".into())),
            None => return Err(bad("QMP input lacks member 'execute'".into())),
        };
        let arguments = match obj.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(args)) => args,
            Some(_) => return Err(bad("QMP input member 'arguments' must be an object".into())),
        };
        if let Some(key) = obj.keys().next() {
            return Err(bad(format!("QMP input member '{key}' is unexpected")));
        }
        Ok(Self { execute, arguments, id })
    }
}

/// A line that is not a valid request, with the error reply it deserves.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    /// The request's id, if the line was an object carrying one.
    pub id: Option<Value>,
    /// What was wrong (class `GenericError`).
    pub error: CommandError,
}

impl BadRequest {
    /// A `GenericError` for a malformed request.
    pub fn new(id: Option<Value>, desc: impl Into<String>) -> Self {
        Self { id, error: CommandError::generic(desc) }
    }
}

impl From<BadRequest> for Response {
    fn from(bad: BadRequest) -> Self {
        Response { id: bad.id, result: Err(bad.error) }
    }
}

/// QMP error class. QEMU's classes have variants; anything else a peer sends is kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ErrorClass {
    /// Any error without a more specific class (nearly all of them, in QEMU).
    GenericError,
    /// The command does not exist, or is not allowed in the current state.
    CommandNotFound,
    /// The named device (here: export, image, job...) is not active.
    DeviceNotActive,
    /// The named device (here: export, image, job...) does not exist.
    DeviceNotFound,
    /// QEMU's KVM capability error; present for completeness when talking to QEMU.
    KVMMissingCap,
    /// A class this crate does not know.
    Other(String),
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KVMMissingCap => "KVMMissingCap",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for ErrorClass {
    fn from(s: String) -> Self {
        match s.as_str() {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KVMMissingCap,
            _ => Self::Other(s),
        }
    }
}

impl From<ErrorClass> for String {
    fn from(class: ErrorClass) -> Self {
        match class {
            ErrorClass::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed command: the `{"class", "desc"}` body of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{class}: {desc}")]
pub struct CommandError {
    /// Error class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl CommandError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self { class, desc: desc.into() }
    }

    /// A `GenericError`, the usual class for a failed command.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// The `CommandNotFound` error QEMU sends for an unknown command; handlers return it for
    /// names they do not serve.
    pub fn command_not_found(command: &str) -> Self {
        Self::new(ErrorClass::CommandNotFound, format!("The command {command} has not been found"))
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }
}

/// Deserializes a command's arguments into `T`, turning mistakes (missing, extra with
/// `#[serde(deny_unknown_fields)]`, or mistyped members) into a `GenericError` for the reply.
pub fn parse_arguments<T: DeserializeOwned>(arguments: Map<String, Value>) -> Result<T, CommandError> {
    serde_json::from_value(Value::Object(arguments))
        .map_err(|e| CommandError::generic(format!("Invalid arguments: {e}")))
}

/// The reply to one command: `{"return": VALUE, "id": ID}` or `{"error": {...}, "id": ID}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The request's id, echoed; `None` when the request had none (or could not be parsed).
    pub id: Option<Value>,
    /// What the command returned, or why it failed.
    pub result: Result<Value, CommandError>,
}

impl Response {
    /// Encodes as a JSON line; a missing id is left out, as QEMU does.
    pub fn to_line(&self) -> Vec<u8> {
        let mut obj = Map::new();
        match &self.result {
            Ok(value) => obj.insert("return".into(), value.clone()),
            Err(error) => obj.insert("error".into(), json!({"class": error.class, "desc": error.desc})),
        };
        if let Some(id) = &self.id {
            obj.insert("id".into(), id.clone());
        }
        to_line(&obj)
    }

    fn from_object(mut obj: Map<String, Value>) -> Result<Self, DecodeError> {
        let id = obj.remove("id");
        let result = match (obj.remove("return"), obj.remove("error")) {
            (Some(value), None) => Ok(value),
            (None, Some(error)) => Err(serde_json::from_value(error)?),
            _ => return Err(DecodeError::Unrecognized),
        };
        Ok(Self { id, result })
    }
}

/// Wall-clock time of an event, split as QEMU does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self { seconds: d.as_secs() as i64, microseconds: d.subsec_micros() as i64 },
            // Before 1970: QEMU reports -1 when it cannot tell the time; do the same.
            Err(_) => Self { seconds: -1, microseconds: -1 },
        }
    }
}

/// An asynchronous notification: `{"event": NAME, "data": {...}, "timestamp": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event name, conventionally `UPPER_CASE`.
    pub event: String,
    /// Event payload, normally an object; `Null` (left out on the wire) when there is none.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    /// When the event happened (sender's wall clock).
    pub timestamp: Timestamp,
}

impl Event {
    /// An event stamped with the current wall-clock time.
    pub fn now(event: impl Into<String>, data: Value) -> Self {
        Self { event: event.into(), data, timestamp: Timestamp::now() }
    }

    /// Encodes as a JSON line.
    pub fn to_line(&self) -> Vec<u8> {
        to_line(self)
    }
}

/// A line received from a server that could not be understood.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// Not JSON, or a known message with wrongly typed members.
    #[error("invalid QMP message: {0}")]
    Json(#[from] serde_json::Error),
    /// A JSON value that is not a greeting, response or event.
    #[error("not a QMP greeting, response or event")]
    Unrecognized,
}

/// Anything a server sends, as seen by a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The banner sent on connect.
    Greeting(Greeting),
    /// The reply to a command.
    Response(Response),
    /// An asynchronous event.
    Event(Event),
}

impl ServerMessage {
    /// Decodes one received line, telling the kind apart by its key (`QMP`, `event`, or
    /// `return`/`error`).
    pub fn decode(line: &[u8]) -> Result<Self, DecodeError> {
        let Value::Object(obj) = serde_json::from_slice(line)? else {
            return Err(DecodeError::Unrecognized);
        };
        if obj.contains_key("QMP") {
            Greeting::from_value(Value::Object(obj)).map(Self::Greeting)
        } else if obj.contains_key("event") {
            Ok(Self::Event(serde_json::from_value(Value::Object(obj))?))
        } else {
            Response::from_object(obj).map(Self::Response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'), "lines end with a newline");
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn greeting_wire_format_and_round_trip() {
        let g = Greeting::new(Version { major: 0, minor: 1, micro: 0 }, "nbd-row-proxy 0.1.0");
        let line = g.to_line();
        assert_eq!(
            parse(&line),
            json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0},
                "package": "nbd-row-proxy 0.1.0"}, "capabilities": []}})
        );
        assert_eq!(ServerMessage::decode(&line).unwrap(), ServerMessage::Greeting(g));
    }

    #[test]
    fn decodes_qemu_greeting() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 2, "major": 8}, "package": "Debian 1:8.2.2"}, "capabilities": ["oob"]}}"#;
        let ServerMessage::Greeting(g) = ServerMessage::decode(line).unwrap() else { panic!() };
        assert_eq!(g.version, Version { major: 8, minor: 2, micro: 2 });
        assert_eq!(g.package, "Debian 1:8.2.2");
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn request_decode_full_and_minimal() {
        let r = Request::decode(br#"{"execute": "merge", "arguments": {"a": 1}, "id": {"x": [1]}}"#).unwrap();
        assert_eq!(r.execute, "merge");
        assert_eq!(r.arguments.get("a"), Some(&json!(1)));
        assert_eq!(r.id, Some(json!({"x": [1]})));
        let r = Request::decode(br#"{"execute":"qmp_capabilities"}"#).unwrap();
        assert_eq!(r, Request::new("qmp_capabilities"));
    }

    #[test]
    fn request_round_trip() {
        let mut r = Request::new("echo");
        r.arguments.insert("k".into(), json!("v"));
        r.id = Some(json!(7));
        assert_eq!(parse(&r.to_line()), json!({"execute": "echo", "arguments": {"k": "v"}, "id": 7}));
        assert_eq!(Request::decode(&r.to_line()).unwrap(), r);
        assert_eq!(parse(&Request::new("x").to_line()), json!({"execute": "x"}));
    }

    #[test]
    fn bad_requests_get_generic_errors_with_id_when_possible() {
        let cases: &[(&[u8], Option<Value>, &str)] = &[
            (b"{\"execute\": ", None, "JSON parse error, "),
            (b"nonsense", None, "JSON parse error, "),
            (b"[1, 2]", None, "QMP input must be a JSON object"),
            (br#"{"id": 3}"#, Some(json!(3)), "QMP input lacks member 'execute'"),
            (br#"{"execute": 1, "id": "a"}"#, Some(json!("a")), "QMP input member 'execute' must be a string"),
            (br#"{"execute": "x", "arguments": [1]}"#, None, "QMP input member 'arguments' must be an object"),
            (
                br#"{"execute": "x", "extra": 1, "id": null}"#,
                Some(Value::Null),
                "QMP input member 'extra' is unexpected",
            ),
        ];
        for (line, id, desc) in cases {
            let bad = Request::decode(line).unwrap_err();
            assert_eq!(&bad.id, id, "{}", String::from_utf8_lossy(line));
            assert_eq!(bad.error.class, ErrorClass::GenericError);
            assert!(bad.error.desc.starts_with(desc), "{:?} does not start with {desc:?}", bad.error.desc);
        }
    }

    #[test]
    fn response_wire_format() {
        let ok = Response { id: Some(json!("a")), result: Ok(json!({"n": 1})) };
        assert_eq!(parse(&ok.to_line()), json!({"return": {"n": 1}, "id": "a"}));
        let err = Response { id: None, result: Err(CommandError::command_not_found("foo")) };
        assert_eq!(
            parse(&err.to_line()),
            json!({"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}})
        );
        for r in [ok, err] {
            assert_eq!(ServerMessage::decode(&r.to_line()).unwrap(), ServerMessage::Response(r));
        }
    }

    #[test]
    fn unknown_error_class_is_kept() {
        let line = br#"{"error": {"class": "FancyError", "desc": "d"}, "id": 1}"#;
        let ServerMessage::Response(r) = ServerMessage::decode(line).unwrap() else { panic!() };
        let e = r.result.unwrap_err();
        assert_eq!(e.class, ErrorClass::Other("FancyError".into()));
        assert_eq!(e.to_string(), "FancyError: d");
        assert_eq!(parse(&Response { id: None, result: Err(e) }.to_line())["error"]["class"], "FancyError");
    }

    #[test]
    fn event_wire_format_and_round_trip() {
        let ev = Event {
            event: "MERGE_DONE".into(),
            data: json!({"export": "disk"}),
            timestamp: Timestamp { seconds: 1700000000, microseconds: 42 },
        };
        assert_eq!(
            parse(&ev.to_line()),
            json!({"event": "MERGE_DONE", "data": {"export": "disk"},
                "timestamp": {"seconds": 1700000000, "microseconds": 42}})
        );
        assert_eq!(ServerMessage::decode(&ev.to_line()).unwrap(), ServerMessage::Event(ev));
    }

    #[test]
    fn event_without_data_as_qemu_sends() {
        let line = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
        let ServerMessage::Event(ev) = ServerMessage::decode(line).unwrap() else { panic!() };
        assert_eq!(ev.data, Value::Null);
        assert!(!String::from_utf8(ev.to_line()).unwrap().contains("data"));
    }

    #[test]
    fn event_now_uses_wall_clock() {
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let ev = Event::now("X", json!({}));
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((before..=after).contains(&ev.timestamp.seconds));
        assert!((0..1_000_000).contains(&ev.timestamp.microseconds));
    }

    #[test]
    fn server_message_rejects_garbage() {
        assert!(matches!(ServerMessage::decode(b"{"), Err(DecodeError::Json(_))));
        assert!(matches!(ServerMessage::decode(b"[]"), Err(DecodeError::Unrecognized)));
        assert!(matches!(ServerMessage::decode(br#"{"foo": 1}"#), Err(DecodeError::Unrecognized)));
        assert!(matches!(ServerMessage::decode(br#"{"error": {"class": 1}}"#), Err(DecodeError::Json(_))));
    }

    #[test]
    fn parse_arguments_maps_errors() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Args {
            #[allow(dead_code)]
            name: String,
        }
        let args = |v: Value| v.as_object().unwrap().clone();
        assert!(parse_arguments::<Args>(args(json!({"name": "x"}))).is_ok());
        for bad in [json!({}), json!({"name": 1}), json!({"name": "x", "more": 1})] {
            let e = parse_arguments::<Args>(args(bad)).unwrap_err();
            assert_eq!(e.class, ErrorClass::GenericError);
        }
    }
}
