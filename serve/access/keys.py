"""API keys: scoped, optionally expiring and rate-limited credentials kept in the artifact store.

A key's token is ``bdk_<id>_<secret>``: ``id`` is 12 hex digits (public: it names the key in
listings, the audit log and ``DELETE /v1/keys/{id}``), ``secret`` is 32 random bytes
(``secrets.token_urlsafe``). The token is returned once, at creation, and never stored: the
record keeps ``sha256(salt || secret)`` with a random 16-byte salt. A 256-bit random secret
cannot be guessed, so a fast hash is as safe as a slow KDF here and costs microseconds per
request instead of tens of milliseconds; verification compares digests with
:func:`hmac.compare_digest`.

Scopes are model names (``sst2``) or glob patterns (``acme-*``, ``team-?-prod``; ``*`` and
``?`` as in :func:`fnmatch.fnmatchcase`, case-sensitive); a key sees a model when any scope
matches its name.

Layout (format ``KEYS_FORMAT``), next to the models of an :class:`~serve.store.ArtifactStore`::

    <store>/access/keys.json    {"format_version": 1, "generation": n, "keys": [record, ...]}
    <store>/access/.lock        flock() serialising writers (create / revoke)

Every change rewrites ``keys.json`` whole (temp file + fsync + rename + directory fsync, under
the lock), so a reader sees the old file or the new one. :meth:`KeyStore.version` is one
``stat`` (inode, size, mtime, ctime of ``keys.json``); a rename gives the file a new inode, so
a replica that compares it before each request sees a creation or a revocation made by any
other replica at its next request. For two seconds after a change the file is re-read instead
(a second change within the filesystem's timestamp granularity could reuse the inode and
size); each write bumps ``generation``, so the bytes always differ. Revoked keys stay in the file (``revoked_at`` set) so the
listing and the audit trail can name them.

This module imports neither torch nor Ray.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..store import _fsync_dir, _lock_file, _unlock_file
from .errors import AccessStoreError, InvalidKeySpec, UnknownKey, Unauthorized
from .ratelimit import RateLimit

logger = logging.getLogger(__name__)

KEYS_FORMAT = 1
TOKEN_PREFIX = "bdk_"
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{12}")
TOKEN_PATTERN = re.compile(r"bdk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@:-]{0,63}")
SCOPE_PATTERN = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9._*?-]{0,63}")
MAX_SCOPES = 64
MAX_KEYS = 10_000
MAX_EXPIRY_S = 10 * 365 * 86400.0


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def hash_secret(secret: str, salt: bytes) -> str:
    return hashlib.sha256(salt + secret.encode("utf-8")).hexdigest()


def check_scopes(scopes: Any) -> tuple[str, ...]:
    """Validated scopes (duplicates dropped, order kept) or :class:`InvalidKeySpec`."""
    if not isinstance(scopes, (list, tuple)) or not scopes:
        raise InvalidKeySpec("scopes must be a non-empty list of model names or glob patterns such as 'acme-*'")
    if len(scopes) > MAX_SCOPES:
        raise InvalidKeySpec(f"at most {MAX_SCOPES} scopes per key, got {len(scopes)}")
    out: list[str] = []
    for s in scopes:
        if not isinstance(s, str) or not SCOPE_PATTERN.fullmatch(s):
            shown = s if not isinstance(s, str) or len(s) <= 80 else s[:77] + "..."
            raise InvalidKeySpec(f"invalid scope {shown!r}: use a model name or a glob of 1-64 characters from "
                                 "A-Z a-z 0-9 . _ - * ?, starting with a letter, digit, * or ?")
        if s not in out:
            out.append(s)
    return tuple(out)


def check_key_name(name: Any) -> str:
    if not isinstance(name, str) or not KEY_NAME_PATTERN.fullmatch(name):
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:77] + "..."
        raise InvalidKeySpec(f"invalid key name {shown!r}: use 1-64 characters from A-Z a-z 0-9 space . _ @ : -, "
                             "starting with a letter or digit")
    return name


def scope_matches(scopes: Iterable[str], model: str) -> bool:
    return any(fnmatchcase(model, s) for s in scopes)


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored (``secret_sha256`` and ``salt`` never leave the server: see :meth:`public`)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    secret_sha256: str = field(repr=False)
    salt: str = field(repr=False)  # hex
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    rate_limit: RateLimit | None = None
    manage: bool = False

    def allows(self, model: str) -> bool:
        """True when one of the key's scopes matches ``model``."""
        return scope_matches(self.scopes, model)

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def verify(self, secret: str) -> bool:
        return hmac.compare_digest(hash_secret(secret, bytes.fromhex(self.salt)), self.secret_sha256)

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "scopes": list(self.scopes), "secret_sha256": self.secret_sha256,
                "salt": self.salt, "created_at": self.created_at, "expires_at": self.expires_at,
                "revoked_at": self.revoked_at, "manage": self.manage,
                "rate_limit": self.rate_limit.to_dict() if self.rate_limit else None}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "KeyRecord":
        rec = cls(id=str(d["id"]), name=str(d["name"]), scopes=tuple(d["scopes"]), secret_sha256=str(d["secret_sha256"]),
                  salt=str(d["salt"]), created_at=float(d["created_at"]),
                  expires_at=None if d.get("expires_at") is None else float(d["expires_at"]),
                  revoked_at=None if d.get("revoked_at") is None else float(d["revoked_at"]),
                  rate_limit=RateLimit.from_dict(d.get("rate_limit")), manage=bool(d.get("manage", False)))
        if not KEY_ID_PATTERN.fullmatch(rec.id) or len(rec.secret_sha256) != 64:
            raise ValueError(f"bad id or digest in key record {rec.id!r}")
        return rec

    def public(self, now: float | None = None) -> dict[str, Any]:
        """What listings show: everything but the digest and the salt."""
        now = time.time() if now is None else now
        return {"id": self.id, "name": self.name, "scopes": list(self.scopes), "manage": self.manage,
                "rate_limit": self.rate_limit.to_dict() if self.rate_limit else None,
                "created_at": _iso(self.created_at),
                "expires_at": None if self.expires_at is None else _iso(self.expires_at),
                "revoked_at": None if self.revoked_at is None else _iso(self.revoked_at),
                "status": self.status(now), "token_prefix": f"{TOKEN_PREFIX}{self.id}_"}


@dataclass
class _Snapshot:
    version: tuple | None = None
    read_ns: int = 0  # wall time (ns) just before the stat that gave ``version``
    raw: bytes = b""
    generation: int = 0
    keys: dict[str, KeyRecord] = field(default_factory=dict)


class KeyStore:
    """The keys of one artifact store directory (see the module docstring for layout and guarantees).

    Reads are served from an in-memory snapshot that :meth:`refresh` reloads when
    :meth:`version` changed; every public read refreshes first, so a change made by another
    process is seen by the next call. ``wall`` (epoch seconds) is injectable for expiry tests.
    """

    def __init__(self, store_root: str | os.PathLike, *, wall: Callable[[], float] = time.time):
        self.dir = Path(store_root) / "access"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "keys.json"
        self.wall = wall
        self._lock = threading.Lock()
        self._snap = _Snapshot()
        self.refresh()

    # ---- reading ------------------------------------------------------------------------------
    def version(self) -> tuple | None:
        """One ``stat`` of ``keys.json``: changes on every create/revoke (``None`` = no file yet)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    # a file changed less than this before the stat that saw it may change again within the
    # filesystem's timestamp granularity, possibly reusing the inode: re-read it instead of
    # trusting the stat (the file is small; every write bumps ``generation``, so the bytes differ)
    _RACY_NS = 2_000_000_000

    def refresh(self) -> bool:
        """Reload ``keys.json`` if it changed since the last load; True when the keys changed."""
        snap = self._snap
        v = self.version()
        if v == snap.version and (v is None or snap.read_ns - v[2] > self._RACY_NS):
            return False
        with self._lock:
            new = self._read()
            if new.raw == self._snap.raw and new.version is not None:
                self._snap.version, self._snap.read_ns = new.version, new.read_ns
                return False
            self._snap = new
        return True

    def _read(self) -> _Snapshot:
        # the version is taken before the bytes: the content is at least that new, so a rename in
        # between costs at most one extra reload, never a stale snapshot
        read_ns = time.time_ns()
        v = self.version()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _Snapshot()
        try:
            doc = json.loads(raw)
            if doc.get("format_version") != KEYS_FORMAT:
                raise ValueError(f"format_version {doc.get('format_version')!r} (this version reads {KEYS_FORMAT})")
            keys = {}
            for d in doc["keys"]:
                rec = KeyRecord.from_record(d)
                keys[rec.id] = rec
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise AccessStoreError(f"{self.path}: unreadable keys file ({e})") from None
        return _Snapshot(version=v, read_ns=read_ns, raw=raw, generation=int(doc.get("generation", 0)), keys=keys)

    def list(self) -> list[KeyRecord]:
        """Every key (revoked and expired ones included), oldest first."""
        self.refresh()
        return sorted(self._snap.keys.values(), key=lambda r: (r.created_at, r.id))

    def get(self, key_id: str) -> KeyRecord:
        self.refresh()
        rec = self._snap.keys.get(key_id) if isinstance(key_id, str) else None
        if rec is None:
            raise UnknownKey(str(key_id))
        return rec

    def any_keys(self) -> bool:
        """True once any key was ever created here (revoked ones count, so revoking the last key
        never turns the service back into open mode)."""
        self.refresh()
        return bool(self._snap.keys)

    def authenticate(self, token: str) -> KeyRecord:
        """The active key of ``token`` or :class:`Unauthorized` (one answer for every failure)."""
        m = TOKEN_PATTERN.fullmatch(token) if isinstance(token, str) else None
        self.refresh()
        rec = self._snap.keys.get(m.group(1)) if m else None
        if rec is None or not m:
            # hash anyway so an unknown id costs what a wrong secret costs
            hmac.compare_digest(hash_secret(m.group(2) if m else "", b"\0" * 16), "0" * 64)
            raise Unauthorized()
        if not rec.verify(m.group(2)) or not rec.active(self.wall()):
            raise Unauthorized()
        return rec

    # ---- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.dir / ".lock", "a+b") as f:
            _lock_file(f)
            try:
                yield
            finally:
                _unlock_file(f)

    def _write(self, snap: _Snapshot, keys: dict[str, KeyRecord]) -> None:
        doc = {"format_version": KEYS_FORMAT, "generation": snap.generation + 1,
               "keys": [r.to_record() for r in sorted(keys.values(), key=lambda r: (r.created_at, r.id))]}
        data = json.dumps(doc, sort_keys=True, indent=1).encode()
        tmp = self.dir / f".keys.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(self.dir)

    def create(self, name: str, scopes: Iterable[str], *, rate_limit: RateLimit | None = None,
               expires_at: float | None = None, manage: bool = False) -> tuple[KeyRecord, str]:
        """A new key and its token; the token is returned here only and never stored."""
        name = check_key_name(name)
        scopes_t = check_scopes(list(scopes) if not isinstance(scopes, (list, tuple)) else scopes)
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise InvalidKeySpec("rate_limit must be a RateLimit")
        if not isinstance(manage, bool):
            raise InvalidKeySpec(f"manage must be a boolean, got {type(manage).__name__}")
        now = self.wall()
        if expires_at is not None:
            if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or expires_at != expires_at:
                raise InvalidKeySpec("expires_at must be a time")
            if expires_at <= now:
                raise InvalidKeySpec(f"expires_at {_iso(expires_at)} is not in the future")
            if expires_at - now > MAX_EXPIRY_S:
                raise InvalidKeySpec("expires_at is more than 10 years ahead")
            expires_at = float(expires_at)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._locked():
            snap = self._read()
            if len(snap.keys) >= MAX_KEYS:
                raise InvalidKeySpec(f"this store already holds {MAX_KEYS} keys")
            key_id = secrets.token_hex(6)
            while key_id in snap.keys:
                key_id = secrets.token_hex(6)
            rec = KeyRecord(id=key_id, name=name, scopes=scopes_t, secret_sha256=hash_secret(secret, salt),
                            salt=salt.hex(), created_at=now, expires_at=expires_at, rate_limit=rate_limit,
                            manage=manage)
            self._write(snap, {**snap.keys, key_id: rec})
        self.refresh()
        logger.info("created API key %s (%s) with scopes %s", key_id, name, list(scopes_t))
        return rec, f"{TOKEN_PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> tuple[KeyRecord, bool]:
        """Revoke ``key_id``; returns the record and whether this call revoked it (False: it
        already was). :class:`UnknownKey` when there is no such key."""
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            raise UnknownKey(str(key_id))
        with self._locked():
            snap = self._read()
            rec = snap.keys.get(key_id)
            if rec is None:
                raise UnknownKey(key_id)
            if rec.revoked_at is not None:
                return rec, False
            rec = replace(rec, revoked_at=self.wall())
            self._write(snap, {**snap.keys, key_id: rec})
        self.refresh()
        logger.info("revoked API key %s (%s)", key_id, rec.name)
        return rec, True


__all__ = ["KeyRecord", "KeyStore", "check_scopes", "check_key_name", "scope_matches", "hash_secret",
           "TOKEN_PREFIX", "TOKEN_PATTERN", "KEY_ID_PATTERN", "KEYS_FORMAT"]
