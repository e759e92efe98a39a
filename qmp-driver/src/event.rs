//! Events as received from QEMU or a proxy: always the name, timestamp and raw data; the
//! `qapi` typed form when it decodes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qmp_proto::Timestamp;
use serde_json::{Map, Value};

/// One asynchronous QMP event.
///
/// Unknown events (a newer QEMU's, or our proxies' own such as `MERGE_DONE`) and known events
/// whose data the `qapi` types reject are kept with `typed == None`; nothing is dropped.
#[derive(Debug, Clone)]
pub struct QemuEvent {
    /// Event name, e.g. `MIGRATION`.
    pub name: String,
    /// When the sender says it happened (its wall clock).
    pub timestamp: Timestamp,
    /// The `data` member as received; `Null` when the event had none (QEMU's `STOP`).
    pub data: Value,
    /// The typed form, when the name is known to `qapi` and the data decodes.
    pub typed: Option<qapi::qmp::Event>,
    /// Why `typed` is `None`: an unknown event, or serde's message.
    pub decode_error: Option<String>,
}

impl QemuEvent {
    /// Decodes a received event leniently: unknown names are logged at `debug`, known names
    /// whose data does not match the `qapi` type at `warn`.
    pub fn decode(event: qmp_proto::Event) -> Self {
        let qmp_proto::Event { event: name, data, timestamp } = event;
        let (typed, decode_error) = match decode_typed(&name, &data, timestamp) {
            Ok(typed) => (Some(typed), None),
            Err(error) => {
                if is_known_event(&name) {
                    tracing::warn!(
                        event = %name, %error, %data,
                        "QMP event does not match the qapi type; keeping it as raw JSON"
                    );
                } else {
                    tracing::debug!(
                        event = %name, %data,
                        "QMP event unknown to qapi; keeping it as raw JSON"
                    );
                }
                (None, Some(error))
            }
        };
        Self { name, timestamp, data, typed, decode_error }
    }

    /// True when the event is called `name`.
    pub fn is(&self, name: &str) -> bool {
        self.name == name
    }

    /// A string member of `data`, e.g. `status` of `MIGRATION` or `JOB_STATUS_CHANGE`.
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }

    /// For a `MIGRATION` event, its `status` (e.g. `active`, `pre-switchover`, `completed`).
    pub fn migration_status(&self) -> Option<&str> {
        if self.is("MIGRATION") {
            self.data_str("status")
        } else {
            None
        }
    }

    /// The timestamp as a [`SystemTime`]; `None` when the sender could not tell the time
    /// (QEMU sends `-1`).
    pub fn time(&self) -> Option<SystemTime> {
        let secs = u64::try_from(self.timestamp.seconds).ok()?;
        let micros = u64::try_from(self.timestamp.microseconds).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
    }
}

/// Whether `qapi`'s `Event` enum has a variant called `name`.
fn is_known_event(name: &str) -> bool {
    // The enum is tagged by name; an unknown tag fails before the data is looked at, so ask
    // with an impossible body and look at the error. Cheap enough for a log line.
    let probe = Value::Object(Map::from_iter([("event".to_owned(), Value::String(name.to_owned()))]));
    match serde_json::from_value::<qapi::qmp::Event>(probe) {
        Ok(_) => true,
        Err(e) => !e.to_string().starts_with("unknown variant"),
    }
}

fn decode_typed(name: &str, data: &Value, timestamp: Timestamp) -> Result<qapi::qmp::Event, String> {
    let mut obj = Map::new();
    obj.insert("event".into(), Value::String(name.to_owned()));
    if !data.is_null() {
        obj.insert("data".into(), data.clone());
    }
    obj.insert(
        "timestamp".into(),
        serde_json::json!({"seconds": timestamp.seconds, "microseconds": timestamp.microseconds}),
    );
    serde_json::from_value(Value::Object(obj)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(name: &str, data: Value) -> qmp_proto::Event {
        qmp_proto::Event { event: name.into(), data, timestamp: Timestamp { seconds: 1_700_000_000, microseconds: 5 } }
    }

    #[test]
    fn known_event_without_data_is_typed() {
        let e = QemuEvent::decode(ev("STOP", Value::Null));
        assert!(matches!(e.typed, Some(qapi::qmp::Event::STOP { .. })), "{e:?}");
        assert_eq!(e.decode_error, None);
        assert_eq!(e.time(), Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_micros(5)));
    }

    #[test]
    fn migration_event_is_typed_and_has_status() {
        let e = QemuEvent::decode(ev("MIGRATION", json!({"status": "pre-switchover"})));
        assert!(matches!(e.typed, Some(qapi::qmp::Event::MIGRATION { .. })));
        assert_eq!(e.migration_status(), Some("pre-switchover"));
    }

    #[test]
    fn unknown_event_and_unknown_enum_value_are_kept_raw() {
        let e = QemuEvent::decode(ev("FUTURE_THING", json!({"x": 1})));
        assert!(e.typed.is_none());
        assert!(!is_known_event("FUTURE_THING"));
        assert_eq!(e.data, json!({"x": 1}));
        let e = QemuEvent::decode(ev("MIGRATION", json!({"status": "teleporting"})));
        assert!(is_known_event("MIGRATION"));
        assert!(e.typed.is_none());
        assert!(e.decode_error.as_deref().unwrap().contains("teleporting"));
        assert_eq!(e.migration_status(), Some("teleporting"));
    }

    #[test]
    fn unknown_wall_clock_has_no_time() {
        let mut raw = ev("STOP", Value::Null);
        raw.timestamp = Timestamp { seconds: -1, microseconds: -1 };
        let e = QemuEvent::decode(raw);
        assert_eq!(e.time(), None);
        assert_eq!(e.name, "STOP");
    }
}
