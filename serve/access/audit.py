"""The audit trail: one JSON line per admin action, appended to ``<store>/access/audit.jsonl``.

Line fields: ``time`` (ISO-8601 UTC, milliseconds), ``actor`` (``"admin"`` for the admin token,
else the acting API key's id), ``action`` (one of :data:`ACTIONS`), ``model``, ``sha256`` (of
the artifact registered or deleted), ``key_id`` (the key created or revoked), ``result``
(``"ok"`` or the error type, e.g. ``model_exists``), ``replica``.

Appends are safe from many processes: the file is opened with ``O_APPEND`` and each line goes
out in one ``write`` call while holding an exclusive ``flock`` on the file, so lines never
interleave or tear; a last line left without its newline by a crash is ended first. Entries are built from typed fields only (no free text, no request data),
which is how a token or a key secret can never end up in the log. Readers skip a line that
does not parse (e.g. cut short by a crash) and log it.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from ..store import _lock_file, _unlock_file
from .errors import InvalidKeySpec

logger = logging.getLogger(__name__)

ACTIONS = ("register", "replace", "delete", "key_create", "key_revoke")
MAX_READ = 10_000
_FIELD_PATTERNS = {
    "actor": re.compile(r"admin|[0-9a-f]{12}"),
    "model": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
    "sha256": re.compile(r"[0-9a-f]{64}"),
    "key_id": re.compile(r"[0-9a-f]{12}"),
    "result": re.compile(r"[a-z_]{1,40}"),
    "replica": re.compile(r"[A-Za-z0-9._:-]{1,80}"),
}


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _check(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _FIELD_PATTERNS[field].fullmatch(value):
        raise ValueError(f"audit field {field}={str(value)[:40]!r} is not a valid {field}")
    return value


class AuditLog:
    """Append-only JSON lines (see the module docstring)."""

    def __init__(self, store_root: str | os.PathLike):
        self.dir = Path(store_root) / "access"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "audit.jsonl"

    def append(self, *, actor: str, action: str, result: str = "ok", model: str | None = None,
               sha256: str | None = None, key_id: str | None = None, replica: str | None = None,
               time: str | None = None) -> dict[str, Any]:
        """Write one entry and return it. Every field is validated against its pattern
        (:class:`ValueError` otherwise), so nothing but ids, names and digests is ever written."""
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r} (one of {', '.join(ACTIONS)})")
        entry = {"time": time or _now_iso(), "actor": _check("actor", actor), "action": action,
                 "model": _check("model", model), "sha256": _check("sha256", sha256),
                 "key_id": _check("key_id", key_id), "result": _check("result", result),
                 "replica": _check("replica", replica)}
        if entry["actor"] is None or entry["result"] is None:
            raise ValueError("audit entries need an actor and a result")
        line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            with os.fdopen(fd, "a+b", buffering=0) as f:
                _lock_file(f)
                try:
                    size = os.fstat(f.fileno()).st_size
                    if size and (f.seek(size - 1), f.read(1))[1] != b"\n":
                        line = b"\n" + line  # end a line cut short by a crash, so ours stays whole
                    n = os.write(f.fileno(), line)
                    if n != len(line):  # a short write on a regular file means the disk is full
                        raise OSError(f"short write to {self.path} ({n} of {len(line)} bytes)")
                    os.fsync(f.fileno())
                finally:
                    _unlock_file(f)
        except BaseException:
            logger.error("could not append to the audit log %s", self.path)
            raise
        return entry

    def _lines(self) -> Iterator[dict[str, Any]]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            for i, raw in enumerate(f, 1):
                try:
                    entry = json.loads(raw)
                    if not isinstance(entry, dict) or entry.get("action") not in ACTIONS:
                        raise ValueError("not an audit entry")
                except ValueError:
                    logger.warning("%s line %d is not a valid audit entry; skipped", self.path, i)
                    continue
                yield entry

    def read(self, *, limit: int = 100, actor: str | None = None, action: str | None = None,
             model: str | None = None, key_id: str | None = None, since: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries matching every given filter, oldest first.

        ``since`` is an ISO-8601 time: entries at or after it. Filters compare exactly."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_READ:
            raise InvalidKeySpec(f"limit must be an integer from 1 to {MAX_READ}")
        if action is not None and action not in ACTIONS:
            raise InvalidKeySpec(f"action must be one of {', '.join(ACTIONS)}")
        since_dt = None
        if since is not None:
            try:
                since_dt = _dt.datetime.fromisoformat(since)
            except (TypeError, ValueError):
                raise InvalidKeySpec(f"since must be an ISO-8601 time, got {str(since)[:40]!r}") from None
            if since_dt.tzinfo is None:
                since_dt = since_dt.replace(tzinfo=_dt.timezone.utc)
        want = {k: v for k, v in (("actor", actor), ("action", action), ("model", model), ("key_id", key_id))
                if v is not None}
        out: collections.deque = collections.deque(maxlen=limit)
        for e in self._lines():
            if any(e.get(k) != v for k, v in want.items()):
                continue
            if since_dt is not None:
                try:
                    if _dt.datetime.fromisoformat(e["time"]) < since_dt:
                        continue
                except (KeyError, TypeError, ValueError):
                    continue
            out.append(e)
        return list(out)


__all__ = ["AuditLog", "ACTIONS"]
