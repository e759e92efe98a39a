# The proxy's control-socket schema for Python scripts, generated from crates/control-api.
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


class DigestReply(Record):
    """Reply of `query-digest`."""

    FIELDS = {
        "sha256": ("sha256", None, True),
        "size": ("size", None, True),
        "seconds": ("seconds", None, True),
    }


class DiskDigestsArgs(Record):
    """Arguments of `query-disk-digests`."""

    FIELDS = {
        "offset": ("offset", None, True),
        "length": ("length", None, True),
        "unit": ("unit", None, True),
        "skip": ("skip", None, False),
        "skip_written_since_commit": ("skip-written-since-commit", None, False),
    }


class DiskDigestsReply(Record):
    """Reply of `query-disk-digests`."""

    FIELDS = {
        "digests": ("digests", None, True),
        "skipped": ("skipped", None, True),
        "hashed_bytes": ("hashed-bytes", None, True),
        "seconds": ("seconds", None, True),
    }


class ErrorData(Record):
    """Data of the failure events."""

    FIELDS = {
        "error": ("error", None, True),
    }


class Fence(Record):
    """Why this proxy refuses writes to its disk, persisted so that a restart keeps refusing them."""

    FIELDS = {
        "reason": ("reason", None, True),
        "since": ("since", None, True),
        "session": ("session", None, True),
        "peer": ("peer", None, True),
        "phase": ("phase", None, True),
    }


class IncomingData(Record):
    """Data of `MIGRATION_INCOMING`."""

    FIELDS = {
        "phase": ("phase", None, True),
        "session": ("session", None, False),
        "strategy": ("strategy", None, False),
        "round": ("round", None, False),
        "reason": ("reason", None, False),
    }


class IncomingPostcopy(Record):
    """A destination's post-copy as `query-status` shows it."""

    FIELDS = {
        "missing_blocks": ("missing-blocks", None, True),
        "link_up": ("link-up", None, True),
        "waits": ("waits", None, True),
        "wait_max_ms": ("wait-max-ms", None, True),
        "wait_mean_ms": ("wait-mean-ms", None, True),
        "received_bytes": ("received-bytes", None, True),
    }


class MigrateFinishArgs(Record):
    """`migrate-finish`'s arguments (all optional: `{}` sends everything, as before)."""

    FIELDS = {
        "postcopy": ("postcopy", None, False),
        "budget_ms": ("budget-ms", None, False),
    }


class MigrateStartArgs(Record):
    """Arguments of `migrate-start`."""

    FIELDS = {
        "uri": ("uri", None, True),
        "strategy": ("strategy", None, False),
        "rounds": ("rounds", None, False),
        "hot_threshold": ("hot-threshold", None, False),
        "max_bandwidth": ("max-bandwidth", None, False),
        "compress": ("compress", None, False),
        "bitmap_granularity": ("bitmap-granularity", None, False),
        "final_budget_ms": ("final-budget-ms", None, False),
        "tls_hostname": ("tls-hostname", None, False),
        "arm": ("arm", None, False),
    }


class MigrateStartReply(Record):
    """Reply of `migrate-start`."""

    FIELDS = {
        "session": ("session", None, True),
    }


class MigrationStateData(Record):
    """Data of `MIGRATION_STATE`."""

    FIELDS = {
        "phase": ("phase", None, True),
    }


class MigrationStatus(Record):
    """The state of the outgoing migration (`query-migrate`, `migrate-finish`)."""

    FIELDS = {
        "phase": ("phase", None, True),
        "strategy": ("strategy", None, False),
        "session": ("session", None, False),
        "round": ("round", None, True),
        "rounds": ("rounds", ["RoundStats"], True),
        "round_remaining_blocks": ("round-remaining-blocks", None, True),
        "round_blocks": ("round-blocks", None, False),
        "rate": ("rate", None, True),
        "error": ("error", None, False),
        "total_seconds": ("total-seconds", None, True),
        "update_logical_bytes": ("update-logical-bytes", None, True),
        "update_wire_bytes": ("update-wire-bytes", None, True),
        "total_logical_bytes": ("total-logical-bytes", None, True),
        "total_wire_bytes": ("total-wire-bytes", None, True),
        "final_wire_bytes": ("final-wire-bytes", None, True),
        "final_seconds": ("final-seconds", None, True),
        "predicted_final_ms": ("predicted-final-ms", None, False),
        "postcopy": ("postcopy", "PostcopyStatus", False),
    }


class PostcopyStatus(Record):
    """How a post-copy goes (`query-migrate` on the source)."""

    FIELDS = {
        "reason": ("reason", None, True),
        "predicted_final_ms": ("predicted-final-ms", None, True),
        "blocks": ("blocks", None, True),
        "remaining_blocks": ("remaining-blocks", None, True),
        "fetches": ("fetches", None, True),
        "reconnects": ("reconnects", None, True),
        "done": ("done", None, True),
        "stalled": ("stalled", None, False),
    }


class Progress(Record):
    """How far a long task is: done and total bytes, the recent rate and the estimated time left."""

    FIELDS = {
        "task": ("task", None, True),
        "done_bytes": ("done-bytes", None, True),
        "total_bytes": ("total-bytes", None, True),
        "rate": ("rate", None, True),
        "eta_seconds": ("eta-seconds", None, False),
    }


class ProtectionReply(Record):
    """Reply of `reload-protection`: what is in force now."""

    FIELDS = {
        "protection": ("protection", None, True),
        "tls_creds": ("tls-creds", None, False),
        "auth_key_file": ("auth-key-file", None, False),
    }


class QueryRowArgs(Record):
    """Arguments of `query-row`."""

    FIELDS = {
        "hot_threshold": ("hot-threshold", None, False),
    }


class ReclaimArgs(Record):
    """Arguments of `reclaim`."""

    FIELDS = {
        "force": ("force", None, False),
    }


class ReloadProtectionArgs(Record):
    """Arguments of `reload-protection`."""

    FIELDS = {
        "tls_creds": ("tls-creds", None, False),
        "auth_key_file": ("auth-key-file", None, False),
    }


class RoundStartedData(Record):
    """Data of `MIGRATION_ROUND_STARTED`."""

    FIELDS = {
        "round": ("round", None, True),
        "kind": ("kind", None, True),
        "blocks": ("blocks", None, True),
    }


class RoundStats(Record):
    """Counters of one migration round: the figures the paper reports."""

    FIELDS = {
        "round": ("round", None, True),
        "kind": ("kind", None, True),
        "blocks": ("blocks", None, True),
        "logical_bytes": ("logical-bytes", None, True),
        "zero_bytes": ("zero-bytes", None, True),
        "wire_bytes": ("wire-bytes", None, True),
        "seconds": ("seconds", None, True),
    }


class RowMergeProgressData(Record):
    """Data of `ROW_MERGE_PROGRESS`."""

    FIELDS = {
        "merged_blocks": ("merged-blocks", None, True),
        "remaining_blocks": ("remaining-blocks", None, True),
    }


class RowMergeStartedData(Record):
    """Data of `ROW_MERGE_STARTED`."""

    FIELDS = {
        "blocks": ("blocks", None, True),
    }


class RowReport(Record):
    """Reply of `query-row`."""

    FIELDS = {
        "mode": ("mode", None, True),
        "blocks_updated": ("blocks-updated", None, True),
        "hot_blocks": ("hot-blocks", None, True),
        "cold_blocks": ("cold-blocks", None, True),
        "hot_threshold": ("hot-threshold", None, True),
        "generation": ("generation", None, True),
        "reserved_bytes": ("reserved-bytes", None, True),
        "block_size": ("block-size", None, True),
        "map_runs": ("map-runs", None, False),
        "map_bytes": ("map-bytes", None, False),
    }


class RowStartedData(Record):
    """Data of `ROW_STARTED`."""

    FIELDS = {
        "epoch": ("epoch", None, True),
        "base_export": ("base-export", None, True),
    }


class RowStopArgs(Record):
    """Arguments of `row-stop`."""

    FIELDS = {
        "wait": ("wait", None, False),
    }


class RowStopReply(Record):
    """Reply of `row-stop`."""

    FIELDS = {
        "merged_blocks": ("merged-blocks", None, True),
        "seconds": ("seconds", None, False),
    }


class RowStoppedData(Record):
    """Data of `ROW_STOPPED`."""

    FIELDS = {
        "merged_blocks": ("merged-blocks", None, True),
        "seconds": ("seconds", None, True),
    }


class StatusReply(Record):
    """Reply of `query-status`."""

    FIELDS = {
        "mode": ("mode", None, True),
        "export": ("export", None, True),
        "image": ("image", None, True),
        "image_size": ("image-size", None, True),
        "read_only": ("read-only", None, True),
        "reserved": ("reserved", None, False),
        "reserved_bytes": ("reserved-bytes", None, True),
        "reserved_allocated": ("reserved-allocated", None, True),
        "block_size": ("block-size", None, True),
        "incoming": ("incoming", None, True),
        "incoming_phase": ("incoming-phase", None, False),
        "writes_refused": ("writes-refused", None, False),
        "fence": ("fence", "Fence", False),
        "progress": ("progress", "Progress", False),
        "postcopy": ("postcopy", "IncomingPostcopy", False),
        "protection": ("protection", None, False),
    }


# command name -> (argument names, reply record name or None)
COMMANDS = {
    "query-status": ((), "StatusReply"),
    "row-start": ((), None),
    "row-stop": (("wait",), "RowStopReply"),
    "query-row": (("hot-threshold",), "RowReport"),
    "migrate-start": (("uri", "strategy", "rounds", "hot-threshold", "max-bandwidth", "compress", "bitmap-granularity", "final-budget-ms", "tls-hostname", "arm",), "MigrateStartReply"),
    "query-migrate": ((), "MigrationStatus"),
    "migrate-finish": (("postcopy", "budget-ms",), "MigrationStatus"),
    "migrate-cancel": ((), None),
    "migrate-complete": ((), None),
    "reclaim": (("force",), None),
    "reload-protection": (("tls-creds", "auth-key-file",), "ProtectionReply"),
    "query-digest": ((), "DigestReply"),
    "query-disk-digests": (("offset", "length", "unit", "skip", "skip-written-since-commit",), "DiskDigestsReply"),
}

# event name -> data record name
EVENTS = {
    "ROW_STARTED": "RowStartedData",
    "ROW_MERGE_STARTED": "RowMergeStartedData",
    "ROW_MERGE_PROGRESS": "RowMergeProgressData",
    "ROW_STOPPED": "RowStoppedData",
    "ROW_MERGE_FAILED": "ErrorData",
    "MIGRATION_STATE": "MigrationStateData",
    "MIGRATION_ROUND_STARTED": "RoundStartedData",
    "MIGRATION_ROUND_COMPLETED": "RoundStats",
    "MIGRATION_FAILED": "ErrorData",
    "MIGRATION_INCOMING": "IncomingData",
}
