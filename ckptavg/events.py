"""Machine-readable output: the JSON documents of ``--json`` and the JSON lines of ``ckptavg watch``.

Every document and event is one JSON object with ``"schema": "ckptavg/1"`` and ``"command"``
(``merge``, ``bn``, ``inspect``, ``sweep``, ``soup``, ``watch``). A command run with ``--json``
prints one document on stdout (its report, or ``{"error": {...}}`` when it failed); ``watch``
prints one line per event (``"event"``: start, seen, skipped, published, unchanged, pruned,
error, stopped). Human text and progress go to stderr. :data:`SCHEMAS` is the schema (JSON
Schema, draft 2020-12 subset) of each; fields may be added in a later ``ckptavg/1`` output,
none removed or retyped; a breaking change bumps the ``schema`` value.

Exit codes (stable): 0 success (also ``watch`` stopped by SIGINT/SIGTERM, and ``watch --once``
with nothing to do); 1 an error a user can cause (bad or incomplete checkpoint, mismatched
inputs, ``inspect`` with an unreadable checkpoint); 2 a usage error (unknown option, bad value);
130 / 143 a command other than ``watch`` interrupted by SIGINT / SIGTERM (nothing partial left).

Example::

    from ckptavg.events import document, validate, SCHEMAS
    doc = document("merge", report.to_dict())
    assert validate(doc, SCHEMAS["merge"]) == []
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEMA_ID", "SCHEMAS", "EXIT_CODES", "EVENT_KINDS", "document", "error_document", "event", "dumps",
           "validate", "schema_of", "describe"]

SCHEMA_ID = "ckptavg/1"
EXIT_CODES = {"ok": 0, "error": 1, "usage": 2, "interrupted": 130, "terminated": 143}
EVENT_KINDS = ("start", "seen", "skipped", "published", "unchanged", "pruned", "error", "stopped")

_STR, _INT, _NUM, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
_OPT_STR, _OPT_INT = {"type": ["string", "null"]}, {"type": ["integer", "null"]}
_OPT_NUM = {"type": ["number", "null"]}
_STRS = {"type": "array", "items": _STR}


def _obj(required: Mapping[str, Any], optional: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": sorted(required), "properties": {**required, **(optional or {})}}


def _envelope(command: str, required: Mapping[str, Any], optional: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
    return _obj({"schema": {"const": SCHEMA_ID}, "command": {"const": command}, **required}, optional)


_INPUT = _obj({"path": _STR, "weight": _NUM, "epoch": _OPT_INT, "step": _OPT_INT},
              {"format": _STR, "bytes": _INT, "metrics": {"type": "object"}})
_MERGE = {"method": _STR, "inputs": {"type": "array", "items": _INPUT}, "tensors": _INT, "output": _OPT_STR,
          "bytes_written": _INT, "bytes_read": _INT, "seconds": _NUM, "dry_run": _BOOL}
_BN = _obj({"mode": _STR, "layers": _STRS, "batches": _INT, "samples": _INT, "skipped": _BOOL})
_ERROR = _obj({"message": _STR, "exit_code": _INT})
_TIME = {"time": _STR, "event": {"enum": list(EVENT_KINDS)}}


def _event(kind: str, required: Mapping[str, Any], optional: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return _envelope("watch", {**_TIME, "event": {"const": kind}, **required}, optional)


#: the schema of each document (by command) and each watch event (``watch.<event>``)
SCHEMAS: dict[str, dict[str, Any]] = {
    "merge": _envelope("merge", _MERGE, {"outputs": _STRS, "notes": _STRS, "variants": {
        "type": "array", "items": _obj({"method": _STR, "weights": {"type": "array", "items": _NUM},
                                        "amplification": _NUM}, {"output": _STR, "fit_error": _OPT_NUM})}}),
    "bn": _envelope("bn", {"input": _STR, "output": _STR, "bytes_written": _INT, "seconds": _NUM, "bn": _BN}),
    "inspect": _envelope("inspect", {
        "order": _STR, "consistent": _BOOL, "notes": _STRS, "differences": {"type": "object"},
        "checkpoints": {"type": "array", "items": _obj({"path": _STR, "format": _OPT_STR, "epoch": _OPT_INT,
                                                           "step": _OPT_INT, "tensors": _OPT_INT,
                                                           "error": _OPT_STR})}}),
    "sweep": _envelope("sweep", {
        "metric": _STR, "higher_is_better": _BOOL, "winner": _STR, "output": _OPT_STR, "seconds": _NUM,
        "rows": {"type": "array", "items": _obj({"name": _STR, "kind": _STR, "checkpoints": _STRS,
                                                 "score": _OPT_NUM, "winner": _BOOL})}}),
    "soup": _envelope("soup", {"metric": _STR, "higher_is_better": _BOOL, "members": {"type": "array"},
                               "score": _OPT_NUM, "uniform_soup_score": _OPT_NUM, "output": _OPT_STR,
                               "steps": {"type": "array"}}),
    "error": _obj({"schema": {"const": SCHEMA_ID}, "command": _STR, "error": _ERROR}),
    "watch.start": _event("start", {"inputs": _STRS, "outputs": _STRS, "mode": {"enum": ["inotify", "poll"]},
                                    "once": _BOOL}),
    "watch.seen": _event("seen", {"path": _STR, "format": _STR, "bytes": _OPT_INT}),
    "watch.skipped": _event("skipped", {"path": _STR, "reason": {"enum": ["incomplete", "unreadable",
                                                                          "not-a-checkpoint"]},
                                        "detail": _STR}),
    "watch.published": _event("published", {"outputs": _STRS, "inputs": {"type": "array", "items": _INPUT},
                                            "method": _STR, "bytes_written": _INT, "bytes_read": _INT,
                                            "seconds": _NUM}),
    "watch.unchanged": _event("unchanged", {"checkpoints": _INT}),
    "watch.pruned": _event("pruned", {"paths": _STRS}),
    "watch.error": _event("error", {"message": _STR, "exit_code": _INT}, {"path": _OPT_STR}),
    "watch.stopped": _event("stopped", {"reason": {"enum": ["signal", "once", "stop"]}, "updates": _INT}),
}


def _clean(value: Any) -> Any:
    """JSON-ready: NaN/inf -> null, paths and other objects -> str, tuples -> lists."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def document(command: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` document of ``command``: ``payload`` (a report's ``to_dict()``) with the envelope."""
    return {"schema": SCHEMA_ID, "command": command, **_clean(dict(payload))}


def error_document(command: str, message: str, exit_code: int) -> dict[str, Any]:
    """The ``--json`` document of a command that failed."""
    return {"schema": SCHEMA_ID, "command": command, "error": {"message": message, "exit_code": exit_code}}


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """One ``watch`` event (a JSON line), stamped with the UTC time."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return {"schema": SCHEMA_ID, "command": "watch", "event": kind, "time": now, **_clean(fields)}


def dumps(doc: Mapping[str, Any], indent: int | None = None) -> str:
    """Strict JSON text (no NaN) of a document or event."""
    return json.dumps(_clean(dict(doc)), indent=indent, allow_nan=False)


def schema_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The schema a document or event must satisfy."""
    if "error" in doc and doc.get("event") is None and isinstance(doc.get("error"), dict):
        return SCHEMAS["error"]
    key = f"watch.{doc.get('event')}" if doc.get("command") == "watch" else str(doc.get("command"))
    if key not in SCHEMAS:
        raise KeyError(f"no schema for {key!r}")
    return SCHEMAS[key]


_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
                          "array": list, "object": dict, "null": type(None)}


def validate(instance: Any, schema: Mapping[str, Any], where: str = "$") -> list[str]:
    """The ways ``instance`` breaks ``schema`` (type, const, enum, required, properties, items);
    empty when it conforms.

    Example::

        validate({"schema": "ckptavg/1"}, SCHEMAS["merge"])  # ['$: missing required field command', ...]
    """
    errs: list[str] = []
    if "const" in schema and instance != schema["const"]:
        errs.append(f"{where}: {instance!r} is not {schema['const']!r}")
    if "enum" in schema and instance not in schema["enum"]:
        errs.append(f"{where}: {instance!r} is not one of {schema['enum']}")
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        ok = any(isinstance(instance, _TYPES[t]) and not (t in ("integer", "number") and isinstance(instance, bool))
                 for t in names)
        if not ok:
            return errs + [f"{where}: {type(instance).__name__} is not {' or '.join(names)}"]
    if isinstance(instance, dict):
        errs += [f"{where}: missing required field {k}" for k in schema.get("required", []) if k not in instance]
        for k, sub in schema.get("properties", {}).items():
            if k in instance:
                errs += validate(instance[k], sub, f"{where}.{k}")
    if isinstance(instance, list) and "items" in schema:
        for i, v in enumerate(instance):
            errs += validate(v, schema["items"], f"{where}[{i}]")
    return errs


def describe(ev: Mapping[str, Any]) -> str:
    """One human line for a watch event (what ``ckptavg watch`` prints on stderr without ``--json``)."""
    kind = ev.get("event")
    if kind == "published":
        n = len(ev.get("inputs", []))
        return f"published {', '.join(ev['outputs'])}: {n} checkpoint{'s' if n != 1 else ''} ({ev.get('method')})"
    if kind == "skipped":
        return f"skipped {ev['path']} ({ev['reason']}: {ev['detail']})"
    if kind == "seen":
        return f"complete: {ev['path']} ({ev['format']})"
    if kind == "start":
        return f"watching {' '.join(ev['inputs'])} ({ev['mode']}) -> {', '.join(ev['outputs'])}"
    if kind == "pruned":
        return f"pruned {', '.join(ev['paths'])}"
    if kind == "error":
        return f"error: {ev['message']}"
    if kind == "unchanged":
        return f"nothing new ({ev['checkpoints']} complete checkpoints already averaged)"
    return f"stopped ({ev.get('reason')}) after {ev.get('updates')} update(s)"
