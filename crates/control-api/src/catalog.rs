//! Every command and event with its JSON schema, and the documents generated from them: the
//! README's command table and the Python module the benchmarks import.

use std::collections::BTreeMap;

use schemars::{schema_for, JsonSchema};
use serde_json::Value;

use crate::{commands::*, events::*, Command, Event};

/// One command as documented.
#[derive(Debug, Clone)]
pub struct CommandInfo {
    /// Wire name.
    pub name: &'static str,
    /// What it does.
    pub doc: &'static str,
    /// JSON schema of the arguments.
    pub args: Value,
    /// JSON schema of the reply.
    pub reply: Value,
}

/// One event as documented.
#[derive(Debug, Clone)]
pub struct EventInfo {
    /// Wire name.
    pub name: &'static str,
    /// When it is sent.
    pub doc: &'static str,
    /// JSON schema of the data.
    pub data: Value,
}

fn schema<T: JsonSchema>() -> Value {
    schema_for!(T).as_value().clone()
}

fn command<C: Command>() -> CommandInfo {
    CommandInfo { name: C::NAME, doc: C::DOC, args: schema::<C::Args>(), reply: schema::<C::Reply>() }
}

fn event<E: Event>() -> EventInfo {
    EventInfo { name: E::NAME, doc: E::DOC, data: schema::<E::Data>() }
}

/// Every command and every event, in the order the README lists them.
pub fn catalog() -> (Vec<CommandInfo>, Vec<EventInfo>) {
    let commands = vec![
        command::<QueryStatus>(),
        command::<RowStart>(),
        command::<RowStop>(),
        command::<QueryRow>(),
        command::<MigrateStart>(),
        command::<QueryMigrate>(),
        command::<MigrateFinish>(),
        command::<MigrateCancel>(),
        command::<MigrateComplete>(),
        command::<Reclaim>(),
        command::<ReloadProtection>(),
        command::<QueryDigest>(),
        command::<QueryDiskDigests>(),
    ];
    let events = vec![
        event::<RowStarted>(),
        event::<RowMergeStarted>(),
        event::<RowMergeProgress>(),
        event::<RowStopped>(),
        event::<RowMergeFailed>(),
        event::<MigrationState>(),
        event::<MigrationRoundStarted>(),
        event::<MigrationRoundCompleted>(),
        event::<MigrationFailed>(),
        event::<MigrationIncoming>(),
    ];
    (commands, events)
}

/// The properties of an object schema, in declaration order, with whether each is required.
fn properties(schema: &Value) -> Vec<(&str, &Value, bool)> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map_or(Vec::new(), |r| r.iter().filter_map(Value::as_str).collect());
    schema.get("properties").and_then(Value::as_object).map_or(Vec::new(), |props| {
        props.iter().map(|(k, v)| (k.as_str(), v, required.contains(&k.as_str()))).collect()
    })
}

/// The first sentence of a description, on one line.
fn first_sentence(doc: &str) -> String {
    let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    match doc.find(". ") {
        Some(i) => doc[..=i].to_string(),
        None => doc,
    }
}

/// The README's table of commands: name, what it does, arguments (with defaults), reply.
pub fn markdown_commands() -> String {
    let (commands, events) = catalog();
    let mut out = String::from("| command | what it does | arguments | returns |\n|---|---|---|---|\n");
    for c in &commands {
        let args: Vec<String> = properties(&c.args)
            .into_iter()
            .map(|(name, s, required)| {
                let doc = s.get("description").and_then(Value::as_str).unwrap_or("");
                let default = s.get("default").map(|d| format!(", default `{d}`")).unwrap_or_default();
                let opt = if required { "" } else { " (optional" };
                let close = if required { "" } else { ")" };
                format!("`{name}`{opt}{default}{close}: {}", first_sentence(doc))
            })
            .collect();
        let reply: Vec<String> = properties(&c.reply).into_iter().map(|(name, _, _)| format!("`{name}`")).collect();
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            c.name,
            c.doc,
            if args.is_empty() { "".into() } else { args.join("<br>") },
            if reply.is_empty() { "`{}`".into() } else { reply.join(", ") }
        ));
    }
    out.push_str("\n| event | when | data |\n|---|---|---|\n");
    for e in &events {
        let data: Vec<String> = properties(&e.data).into_iter().map(|(name, _, _)| format!("`{name}`")).collect();
        out.push_str(&format!("| `{}` | {} | {} |\n", e.name, e.doc, data.join(", ")));
    }
    out
}

/// The commands and events as plain text for `--help`: one line each, name and what it does.
pub fn text_commands() -> String {
    let (commands, events) = catalog();
    let width = commands.iter().map(|c| c.name.len()).chain(events.iter().map(|e| e.name.len())).max().unwrap_or(0);
    let mut out = String::from("Control-socket commands (QMP-shaped JSON on --control; arguments in the README):\n");
    for c in &commands {
        out.push_str(&format!("  {:width$}  {}\n", c.name, first_sentence(c.doc).replace('`', "")));
    }
    out.push_str("Events:\n");
    for e in &events {
        out.push_str(&format!("  {:width$}  {}\n", e.name, first_sentence(e.doc).replace('`', "")));
    }
    out
}

/// Every named object type in the schemas: the roots (by title) and their `$defs`.
fn named_types() -> BTreeMap<String, Value> {
    let (commands, events) = catalog();
    let roots = commands.iter().flat_map(|c| [&c.args, &c.reply]).chain(events.iter().map(|e| &e.data));
    let mut types = BTreeMap::new();
    for root in roots {
        if let Some(defs) = root.get("$defs").and_then(Value::as_object) {
            for (name, schema) in defs {
                types.insert(name.clone(), schema.clone());
            }
        }
        if let Some(title) = root.get("title").and_then(Value::as_str) {
            let mut schema = root.clone();
            if let Some(obj) = schema.as_object_mut() {
                obj.remove("$defs");
                obj.remove("$schema");
            }
            types.insert(title.to_string(), schema);
        }
    }
    types.retain(|_, s| s.get("properties").is_some());
    types
}

/// How a value converts in Python: `None` (as it is), a record type's name, or a list of them.
fn python_kind(schema: &Value, types: &BTreeMap<String, Value>) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        return if types.contains_key(name) { format!("{name:?}") } else { "None".into() };
    }
    // Option<Record>: `anyOf: [{$ref}, {type: null}]`.
    for alt in schema.get("anyOf").and_then(Value::as_array).into_iter().flatten() {
        let k = python_kind(alt, types);
        if k != "None" {
            return k;
        }
    }
    match schema.get("items").map(|items| python_kind(items, types)) {
        Some(k) if k != "None" => format!("[{k}]"),
        _ => "None".into(),
    }
}

fn root_kind(schema: &Value, types: &BTreeMap<String, Value>) -> String {
    match schema.get("title").and_then(Value::as_str) {
        Some(t) if types.contains_key(t) => format!("{t:?}"),
        _ => "None".into(),
    }
}

/// The Python module the benchmarks import (`scripts/lib/control_api.py`): command names, the
/// argument names each command accepts, and reply/event records whose attributes are the
/// schema's members, so a renamed member fails loudly in Python too.
pub fn python_module() -> String {
    let (commands, events) = catalog();
    let types = named_types();
    let mut out = String::from(PYTHON_HEADER);
    for (name, schema) in &types {
        let doc = schema.get("description").and_then(Value::as_str).unwrap_or("A record.");
        out.push_str(&format!("\nclass {name}(Record):\n    \"\"\"{}\"\"\"\n\n    FIELDS = {{\n", first_sentence(doc)));
        for (key, prop, required) in properties(schema) {
            let attr = key.replace('-', "_");
            let kind = python_kind(prop, &types);
            let required = if required { "True" } else { "False" };
            out.push_str(&format!("        {attr:?}: ({key:?}, {kind}, {required}),\n"));
        }
        out.push_str("    }\n\n");
    }
    out.push_str("\n# command name -> (argument names, reply record name or None)\nCOMMANDS = {\n");
    for c in &commands {
        let args: Vec<String> = properties(&c.args).into_iter().map(|(k, _, _)| format!("{k:?}, ")).collect();
        out.push_str(&format!(
            "    {:?}: (({}), {}),\n",
            c.name,
            args.concat().trim_end(),
            root_kind(&c.reply, &types)
        ));
    }
    out.push_str("}\n\n# event name -> data record name\nEVENTS = {\n");
    for e in &events {
        out.push_str(&format!("    {:?}: {},\n", e.name, root_kind(&e.data, &types)));
    }
    out.push_str("}\n");
    out
}

const PYTHON_HEADER: &str = r#"# The proxy's control-socket schema for Python scripts, generated from crates/control-api.
# Do not edit: run `cargo run -q -p control-api --bin control-schema -- python > scripts/lib/control_api.py`.
# control-api's tests fail while this file differs from what the Rust types generate.
"""Typed access to nbd-row-proxy's control socket for the benchmark scripts.

`call(client, "query-migrate")` checks the argument names against the schema, runs the command
through any object with an `execute(command, arguments, timeout=None)` method, and wraps the
reply in a record whose attributes are the schema's members (`status.phase`,
`status.rounds[0].wire_bytes`). A member the schema does not know raises AttributeError, and
one the reply lacks raises KeyError: a renamed field fails here, not as a silent None.
"""

from typing import Any, Optional


class Record:
    """A reply or event object with one attribute per schema member."""

    FIELDS: dict = {}

    def __init__(self, raw: dict):
        if not isinstance(raw, dict):
            raise TypeError(f"{type(self).__name__}: expected an object, got {raw!r}")
        self.raw = raw
        for attr, (key, kind, required) in self.FIELDS.items():
            if key in raw:
                value = _convert(raw[key], kind)
            elif required:
                raise KeyError(f"{type(self).__name__}: the reply has no {key!r}: {raw}")
            else:
                value = None
            setattr(self, attr, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.raw!r})"


def _convert(value: Any, kind: Any) -> Any:
    if kind is None or value is None:
        return value
    if isinstance(kind, list):
        return [_convert(v, kind[0]) for v in value]
    return globals()[kind](value)


def call(client: Any, command: str, timeout: Optional[float] = None, **arguments: Any) -> Any:
    """Runs `command` with keyword arguments (`max_bandwidth=...` for `max-bandwidth`)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown control command {command!r}")
    names, reply = COMMANDS[command]
    args = {}
    for name, value in arguments.items():
        key = name.replace("_", "-")
        if key not in names:
            raise TypeError(f"{command} takes no argument {key!r} (it takes {', '.join(names) or 'none'})")
        if value is not None:
            args[key] = value
    raw = client.execute(command, args or None, timeout=timeout)
    return globals()[reply](raw) if reply else raw


def event(name: str, data: dict) -> Any:
    """Wraps an event's data in its record."""
    kind = EVENTS.get(name)
    return globals()[kind](data) if kind else data

"#;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn repo_file(rel: &str) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    #[test]
    fn every_command_and_event_has_an_object_schema() {
        let (commands, events) = catalog();
        let mut names: Vec<&str> = commands.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), commands.len(), "duplicate command names");
        for c in &commands {
            assert_eq!(c.args["type"], "object", "{}: arguments must be an object", c.name);
            assert!(!c.doc.is_empty());
        }
        for e in &events {
            assert!(e.name.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{}", e.name);
            assert!(e.data.get("properties").is_some() || e.data.get("$ref").is_some(), "{}", e.name);
        }
    }

    #[test]
    fn the_text_list_names_every_command_and_event() {
        let text = text_commands();
        let (commands, events) = catalog();
        for name in commands.iter().map(|c| c.name).chain(events.iter().map(|e| e.name)) {
            assert!(text.lines().any(|l| l.trim_start().starts_with(name)), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn readme_table_is_generated_from_the_types() {
        let readme = repo_file("README.md");
        let begin =
            "<!-- control-api:begin (generated by `cargo run -p control-api --bin control-schema -- markdown`) -->\n";
        let end = "<!-- control-api:end -->";
        let start = readme.find(begin).expect("README has the control-api:begin marker") + begin.len();
        let stop = readme[start..].find(end).expect("README has the control-api:end marker") + start;
        assert!(
            readme[start..stop] == markdown_commands(),
            "README's control table differs from the types: regenerate it with \
             `cargo run -q -p control-api --bin control-schema -- markdown`"
        );
    }

    #[test]
    fn python_module_is_generated_from_the_types() {
        assert!(
            repo_file("scripts/lib/control_api.py") == python_module(),
            "scripts/lib/control_api.py differs from the types: regenerate it with \
             `cargo run -q -p control-api --bin control-schema -- python > scripts/lib/control_api.py`"
        );
    }
}
