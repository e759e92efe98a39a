//! What the QEMU in front of us offers, read from its QMP schema (`query-qmp-schema`), so that
//! version differences are handled by what a QEMU says it accepts, not by its version number
//! (which `query-version` gives here for messages only).
//!
//! The introspected schema names types by arbitrary numbers, so everything is found by
//! following a command's `arg-type` through its members: e.g. the migration capabilities are
//! the values of the enum behind `migrate-set-capabilities`' `capabilities[].capability`.
//!
//! | what                                  | QEMU 7.2 (Debian 12)   | QEMU 10.0 (bookworm-backports) |
//! |---------------------------------------|------------------------|--------------------------------|
//! | `block-job-change` (8.2+)             | absent                 | present, with mirror copy-mode |
//! | capability `block` (removed in 9.1)   | present                | absent                         |
//! | capability `zero-blocks`              | present                | deprecated                     |
//! | `postcopy-ram`, `pause-before-switchover`, `late-block-activate`, `events` | present | present |
//! | `migrate` `channels` / `blk`          | no / yes               | yes / no                       |
//! | `nbd-server-start` `addr`             | legacy (`data` wrapper)| legacy (`data` wrapper)        |

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::client::Qmp;
use crate::error::QmpError;

/// The form of `nbd-server-start`'s `addr` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrForm {
    /// `SocketAddressLegacy`: `{"type": "unix", "data": {"path": ...}}` (7.2 and 10.0 alike).
    Legacy,
    /// Flat `SocketAddress`: `{"type": "unix", "path": ...}`.
    Flat,
}

/// How a QEMU treats one name (a capability, a parameter, an argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Accepted.
    Yes,
    /// Accepted, but marked `deprecated` in the schema (it will go away).
    Deprecated,
    /// Unknown to this QEMU: sending it is an error.
    No,
}

/// What one QEMU offers, from its QMP schema.
#[derive(Debug, Clone, Default)]
pub struct Features {
    /// `query-version` as text, e.g. `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`: for messages
    /// only, never for decisions.
    pub version: String,
    /// Every command name.
    pub commands: BTreeSet<String>,
    /// `migrate-set-capabilities`' capability names, each with whether it is deprecated.
    pub capabilities: BTreeMap<String, bool>,
    /// `migrate-set-parameters`' parameter names, each with whether it is deprecated.
    pub parameters: BTreeMap<String, bool>,
    /// `migrate`'s argument names (`uri`, `channels`, `blk`, `inc`, `detach`, `resume`, ...).
    pub migrate_args: BTreeSet<String>,
    /// `blockdev-mirror`'s `copy-mode` values (`background`, `write-blocking`).
    pub mirror_copy_modes: BTreeSet<String>,
    /// The form of `nbd-server-start`'s `addr`, when the command exists.
    pub nbd_server_addr: Option<AddrForm>,
}

/// The schema as a map from type or command name to its `SchemaInfo`.
struct Schema<'a>(BTreeMap<&'a str, &'a Value>);

impl<'a> Schema<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).copied()
    }

    /// The members of an object type, by name (an array type `[T]` is seen through).
    fn members(&self, ty: &str) -> Vec<&'a Value> {
        let Some(info) = self.get(ty) else { return Vec::new() };
        if info["meta-type"] == "array" {
            return info["element-type"].as_str().map(|t| self.members(t)).unwrap_or_default();
        }
        info["members"].as_array().map(|m| m.iter().collect()).unwrap_or_default()
    }

    /// One member of an object type.
    fn member(&self, ty: &str, name: &str) -> Option<&'a Value> {
        self.members(ty).into_iter().find(|m| m["name"] == name)
    }

    /// A command's argument type name.
    fn arg_type(&self, command: &str) -> Option<&'a str> {
        self.get(command).filter(|c| c["meta-type"] == "command")?["arg-type"].as_str()
    }

    /// A command's argument member, by name.
    fn arg(&self, command: &str, name: &str) -> Option<&'a Value> {
        self.member(self.arg_type(command)?, name)
    }

    /// An enum's values and whether each is deprecated; an array type `[E]` is seen through.
    fn enum_values(&self, ty: &str) -> BTreeMap<String, bool> {
        let Some(info) = self.get(ty) else { return BTreeMap::new() };
        if info["meta-type"] == "array" {
            return info["element-type"].as_str().map(|t| self.enum_values(t)).unwrap_or_default();
        }
        // `members` (with features) since 6.2; `values` alone before.
        if let Some(members) = info["members"].as_array().filter(|_| info["meta-type"] == "enum") {
            return members.iter().filter_map(|m| Some((m["name"].as_str()?.to_owned(), deprecated(m)))).collect();
        }
        info["values"].as_array().into_iter().flatten().filter_map(|v| Some((v.as_str()?.to_owned(), false))).collect()
    }
}

fn deprecated(member: &Value) -> bool {
    member["features"].as_array().is_some_and(|f| f.iter().any(|f| f == "deprecated"))
}

fn names(members: Vec<&Value>) -> BTreeMap<String, bool> {
    members.into_iter().filter_map(|m| Some((m["name"].as_str()?.to_owned(), deprecated(m)))).collect()
}

impl Features {
    /// Reads a `query-qmp-schema` return value, and optionally a `query-version` one.
    pub fn from_schema(schema: &Value, version: Option<&Value>) -> Result<Self, String> {
        let entries = schema.as_array().ok_or("query-qmp-schema: not an array")?;
        let schema = Schema(entries.iter().filter_map(|e| Some((e["name"].as_str()?, e))).collect());
        let commands: BTreeSet<String> = entries
            .iter()
            .filter(|e| e["meta-type"] == "command")
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect();
        if commands.is_empty() {
            return Err("query-qmp-schema: no commands".into());
        }

        // migrate-set-capabilities: {capabilities: [{capability: MigrationCapability, state}]}
        let capabilities = schema
            .arg("migrate-set-capabilities", "capabilities")
            .and_then(|m| m["type"].as_str())
            .and_then(|list| schema.member(list, "capability"))
            .and_then(|m| m["type"].as_str())
            .map(|e| schema.enum_values(e))
            .unwrap_or_default();
        let parameters =
            schema.arg_type("migrate-set-parameters").map(|t| names(schema.members(t))).unwrap_or_default();
        let migrate_args =
            schema.arg_type("migrate").map(|t| names(schema.members(t)).into_keys().collect()).unwrap_or_default();
        let mirror_copy_modes = schema
            .arg("blockdev-mirror", "copy-mode")
            .and_then(|m| m["type"].as_str())
            .map(|e| schema.enum_values(e).into_keys().collect())
            .unwrap_or_default();
        // Legacy: each variant of the `type`-tagged union wraps its fields in `data`.
        let nbd_server_addr = schema.arg("nbd-server-start", "addr").and_then(|m| m["type"].as_str()).map(|addr| {
            let unix = schema
                .get(addr)
                .and_then(|a| a["variants"].as_array()?.iter().find(|v| v["case"] == "unix")?["type"].as_str());
            match unix {
                Some(u) if schema.member(u, "data").is_some() => AddrForm::Legacy,
                _ => AddrForm::Flat,
            }
        });
        Ok(Self {
            version: version.map(version_text).unwrap_or_default(),
            commands,
            capabilities,
            parameters,
            migrate_args,
            mirror_copy_modes,
            nbd_server_addr,
        })
    }

    /// Whether QEMU has a command.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains(name)
    }

    /// `block-job-change` (8.2+): switches a running mirror's `copy-mode` (to
    /// `write-blocking`) without restarting it.
    pub fn block_job_change(&self) -> bool {
        self.has_command("block-job-change")
    }

    /// Whether `migrate-set-capabilities` knows a capability, and if it is deprecated.
    pub fn capability(&self, name: &str) -> Support {
        support(self.capabilities.get(name))
    }

    /// Whether `migrate-set-parameters` knows a parameter, and if it is deprecated.
    pub fn parameter(&self, name: &str) -> Support {
        support(self.parameters.get(name))
    }

    /// `migrate` takes `channels` (8.2+) besides `uri`.
    pub fn migrate_channels(&self) -> bool {
        self.migrate_args.contains("channels")
    }

    /// `migrate` takes `blk`/`inc` (block migration, removed in 9.1).
    pub fn migrate_blk(&self) -> bool {
        self.migrate_args.contains("blk")
    }

    /// Checks capabilities a caller needs before it sets them: an error naming every one this
    /// QEMU does not know (`who` says which QEMU, e.g. "the source QEMU"); deprecated ones
    /// pass, and are returned so the caller can warn.
    pub fn require_capabilities<'n>(&self, who: &str, names: &[&'n str]) -> Result<Vec<&'n str>, String> {
        let missing: Vec<&str> = names.iter().copied().filter(|n| self.capability(n) == Support::No).collect();
        if !missing.is_empty() {
            return Err(format!(
                "{who}{} does not offer the migration capabilit{} {} (its QMP schema lacks {}); it offers: {}",
                self.version_suffix(),
                if missing.len() == 1 { "y" } else { "ies" },
                missing.join(", "),
                if missing.len() == 1 { "it" } else { "them" },
                self.capabilities.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(names.iter().copied().filter(|n| self.capability(n) == Support::Deprecated).collect())
    }

    /// Of `capabilities`, those this QEMU knows: for optional ones, skipped where absent.
    pub fn known_capabilities<'n>(&self, capabilities: &[(&'n str, bool)]) -> Vec<(&'n str, bool)> {
        capabilities.iter().copied().filter(|(n, _)| self.capability(n) != Support::No).collect()
    }

    fn version_suffix(&self) -> String {
        if self.version.is_empty() {
            String::new()
        } else {
            format!(" (QEMU {})", self.version)
        }
    }
}

fn support(entry: Option<&bool>) -> Support {
    match entry {
        None => Support::No,
        Some(true) => Support::Deprecated,
        Some(false) => Support::Yes,
    }
}

/// `query-version`'s reply as `MAJOR.MINOR.MICRO (package)`.
fn version_text(v: &Value) -> String {
    let q = &v["qemu"];
    let n = |k: &str| q[k].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "?".into());
    let package = v["package"].as_str().map(str::trim).unwrap_or_default();
    let base = format!("{}.{}.{}", n("major"), n("minor"), n("micro"));
    if package.is_empty() {
        base
    } else {
        format!("{base} ({package})")
    }
}

impl Qmp {
    /// `query-qmp-schema` and `query-version`, raw, read into [`Features`].
    pub async fn features(&mut self) -> Result<Features, QmpError> {
        let schema = self.execute_raw("query-qmp-schema", Value::Null).await?;
        let version = self.execute_raw("query-version", Value::Null).await.ok();
        Features::from_schema(&schema, version.as_ref())
            .map_err(|reason| QmpError::UnexpectedReply { command: "query-qmp-schema".into(), reason })
    }
}
