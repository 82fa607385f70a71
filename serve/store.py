"""The artifact store: registered fine-tunes on disk, shared by every replica.

Layout (format ``STORE_FORMAT``)::

    <root>/FORMAT                      {"format_version": 1}
    <root>/objects/<sha256>.safetensors   artifact bytes, named by their SHA-256 (content-addressed)
    <root>/models/<name>.json          {"format_version", "name", "sha256", "bytes", "created", "info"}
    <root>/tmp/                        files being written (never read; cleaned by gc())
    <root>/.lock                       flock() serialising writers (put / delete / gc)

A model exists exactly when its ``models/<name>.json`` exists; that file is the commit point.
``put`` writes the object (temp + fsync + rename), then the record (temp + fsync, then
``link`` for a new name, which fails atomically if the name is taken, or ``rename`` over the
old record for a replacement), then fsyncs the directory. A crash at any point leaves either
the old state or the new one, never a half-written model: an object without a record is
garbage that ``gc()`` removes. ``delete`` unlinks the record (commit) and then the object
unless another record still points to it. ``load`` re-hashes the bytes and refuses a file whose
SHA-256 differs from its record.

Readers take no lock. :meth:`ArtifactStore.version` is a cheap signature of the records
(name, inode, mtime, size) that a replica compares before each request to notice another
replica's registration or deletion.

This module imports neither torch nor Ray.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bitdelta_core.errors import (
    ArtifactCorruptError,
    InvalidInputError,
    ModelExistsError,
    UnknownModelError,
)
from bitdelta_core.naming import NAME_PATTERN, NAME_RULE, is_valid_name

logger = logging.getLogger(__name__)

try:  # POSIX
    import fcntl

    def _lock_file(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)

    def _unlock_file(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)

except ImportError:  # Windows: lock the first byte of the lock file (blocking, retried by msvcrt)
    import msvcrt

    def _lock_file(f) -> None:
        f.seek(0)
        while True:
            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:  # LK_LOCK gives up after ~10 s of contention: keep waiting
                continue

    def _unlock_file(f) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


STORE_FORMAT = 1
_SHA_PATTERN = re.compile(r"[0-9a-f]{64}")
_RECORD_SUFFIX = ".json"
_OBJECT_SUFFIX = ".safetensors"
TMP_MAX_AGE_S = 3600.0


class StoreError(ArtifactCorruptError):
    """The store directory itself is unusable or a stored file fails its checksum."""


def check_name(name: Any) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`InvalidInputError`.

    Names are 1-64 characters from ``[A-Za-z0-9._-]`` starting with a letter or digit, so a name
    can never be a path (no ``/``, no leading ``.``, no ``..`` component) or hide unicode tricks.
    """
    if not is_valid_name(name):
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:77] + "..."
        raise InvalidInputError(f"invalid model name {shown!r}: use {NAME_RULE}")
    return name


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StoreEntry:
    """One registered model as recorded on disk."""

    name: str
    sha256: str
    bytes: int
    created: str
    info: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"format_version": STORE_FORMAT, "name": self.name, "sha256": self.sha256,
                "bytes": self.bytes, "created": self.created, "info": self.info}


class ArtifactStore:
    """A directory of registered artifacts (see the module docstring for layout and guarantees)."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.models = self.root / "models"
        self.tmp = self.root / "tmp"
        if create:
            for d in (self.root, self.objects, self.models, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
            fmt = self.root / "FORMAT"
            if not fmt.exists():
                self._write_atomic(fmt, json.dumps({"format_version": STORE_FORMAT}).encode())
        if not self.models.is_dir() or not self.objects.is_dir():
            raise StoreError(f"{self.root} is not an artifact store (no models/ and objects/ folders)")
        self._check_format()
        self._version_cache: tuple | None = None  # ((inode, mtime) of models/, scan start ns, signature)

    # ---- helpers --------------------------------------------------------------------------------
    def _check_format(self) -> None:
        fmt = self.root / "FORMAT"
        try:
            version = json.loads(fmt.read_text()).get("format_version")
        except (OSError, ValueError, AttributeError) as e:
            raise StoreError(f"{fmt}: unreadable store format file ({e})") from None
        if version != STORE_FORMAT:
            raise StoreError(f"{fmt}: store format {version!r} is not supported (this version reads {STORE_FORMAT})")

    def _record_path(self, name: str) -> Path:
        return self.models / f"{check_name(name)}{_RECORD_SUFFIX}"

    def _object_path(self, sha: str) -> Path:
        if not _SHA_PATTERN.fullmatch(sha):
            raise StoreError(f"invalid object id {sha!r}")
        return self.objects / f"{sha}{_OBJECT_SUFFIX}"

    def _temp_file(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(prefix="put.", suffix=".tmp", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = self._temp_file(data)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as f:
            _lock_file(f)
            try:
                yield
            finally:
                _unlock_file(f)

    def _read_record(self, path: Path) -> StoreEntry:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UnknownModelError(f"model {path.stem!r} is not registered") from None
        try:
            rec = json.loads(raw)
            if rec.get("format_version") != STORE_FORMAT:
                raise ValueError(f"format_version {rec.get('format_version')!r}")
            entry = StoreEntry(name=rec["name"], sha256=rec["sha256"], bytes=int(rec["bytes"]),
                               created=str(rec["created"]), info=dict(rec.get("info") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{path}: unreadable model record ({e})") from None
        if entry.name != path.name[: -len(_RECORD_SUFFIX)] or not _SHA_PATTERN.fullmatch(entry.sha256):
            raise StoreError(f"{path}: record does not match its file name or has a bad checksum field")
        return entry

    def _referenced(self) -> set[str]:
        refs = set()
        for p in self.models.glob(f"*{_RECORD_SUFFIX}"):
            with contextlib.suppress(StoreError, UnknownModelError):
                refs.add(self._read_record(p).sha256)
        return refs

    # ---- reading ----------------------------------------------------------------------------
    # a directory whose last change is older than this (vs. the start of the scan that saw it) is
    # trusted to show any later change in its mtime, even on filesystems with a coarse timestamp
    _RACY_NS = 2_000_000_000

    def version(self) -> tuple:
        """Signature of the set of records; changes on every put/replace/delete.

        Every change renames or unlinks an entry of ``models/``, which updates that directory's
        mtime; while the mtime (and inode) is the one the last full scan saw, and that scan began
        more than ``_RACY_NS`` after it, the scan's result is returned without reading the
        records again (one ``stat`` instead of one per model: 6.5 ms at 1,000 models).
        """
        st = os.stat(self.models)
        key = (st.st_ino, st.st_mtime_ns)
        cached = self._version_cache
        if cached is not None and cached[0] == key and cached[1] - st.st_mtime_ns > self._RACY_NS:
            return cached[2]
        started = time.time_ns()
        sig = self._scan_version()
        self._version_cache = (key, started, sig)
        return sig

    def _scan_version(self) -> tuple:
        sig = []
        with os.scandir(self.models) as it:
            for e in it:
                if e.name.endswith(_RECORD_SUFFIX) and not e.name.startswith("."):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    sig.append((e.name, st.st_ino, st.st_mtime_ns, st.st_size))
        sig.sort()
        return tuple(sig)

    def names(self) -> list[str]:
        return sorted(p.name[: -len(_RECORD_SUFFIX)] for p in self.models.glob(f"*{_RECORD_SUFFIX}")
                      if NAME_PATTERN.fullmatch(p.name[: -len(_RECORD_SUFFIX)]))

    def __contains__(self, name: str) -> bool:
        try:
            return self._record_path(name).is_file()
        except InvalidInputError:
            return False

    def get(self, name: str) -> StoreEntry:
        """The record of ``name`` (:class:`UnknownModelError` if absent)."""
        return self._read_record(self._record_path(name))

    def list(self) -> list[StoreEntry]:
        """All readable records, sorted by name (unreadable ones are logged and skipped)."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except UnknownModelError:  # deleted meanwhile
                continue
            except StoreError as e:
                logger.error("skipping %s: %s", name, e)
        return out

    def load(self, name: str) -> tuple[StoreEntry, bytes]:
        """The record and the artifact bytes of ``name``, checksum verified."""
        entry = self.get(name)
        path = self._object_path(entry.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"model {name!r}: its artifact {path.name} is missing from the store") from None
        got = sha256_hex(data)
        if got != entry.sha256 or len(data) != entry.bytes:
            raise StoreError(
                f"model {name!r}: stored artifact fails its checksum (sha256 {got[:12]}, {len(data)} bytes; "
                f"record says {entry.sha256[:12]}, {entry.bytes} bytes)"
            )
        return entry, data

    # ---- writing ----------------------------------------------------------------------------
    def put(self, name: str, data: bytes, *, replace: bool = False, info: dict[str, Any] | None = None) -> StoreEntry:
        """Store ``data`` under ``name`` atomically; :class:`ModelExistsError` if taken and not ``replace``."""
        check_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"artifact data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        sha = sha256_hex(data)
        entry = StoreEntry(name=name, sha256=sha, bytes=len(data), created=_now(), info=dict(info or {}))
        record = json.dumps(entry.record(), sort_keys=True).encode()
        rec_path = self._record_path(name)
        with self._locked():
            if not replace and rec_path.exists():
                raise ModelExistsError(f"model {name!r} is already registered (use replace=true to overwrite)")
            obj = self._object_path(sha)
            try:
                if not obj.exists():
                    self._write_atomic(obj, data)
                tmp = self._temp_file(record)
                try:
                    if replace:
                        os.replace(tmp, rec_path)
                    else:
                        try:
                            os.link(tmp, rec_path)  # atomic create-if-absent
                        except FileExistsError:
                            raise ModelExistsError(f"model {name!r} is already registered") from None
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                _fsync_dir(self.models)
            finally:  # success: drop a replaced object; failure: drop the unreferenced new one
                with contextlib.suppress(OSError):
                    self._gc_objects_locked()
        logger.info("stored %s (%d bytes, sha256 %s)", name, len(data), sha[:12])
        return entry

    def delete(self, name: str) -> StoreEntry:
        """Remove ``name`` (:class:`UnknownModelError` if absent); returns the removed record."""
        rec_path = self._record_path(name)
        with self._locked():
            entry = self._read_record(rec_path)
            os.unlink(rec_path)
            _fsync_dir(self.models)
            self._gc_objects_locked()
        logger.info("deleted %s", name)
        return entry

    def gc(self) -> int:
        """Remove unreferenced objects and stale temp files; returns how many files were removed."""
        with self._locked():
            n = self._gc_objects_locked()
            cutoff = time.time() - TMP_MAX_AGE_S
            for p in self.tmp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if p.stat().st_mtime < cutoff:
                        p.unlink()
                        n += 1
        return n

    def _gc_objects_locked(self) -> int:
        refs = self._referenced()
        n = 0
        for p in self.objects.glob(f"*{_OBJECT_SUFFIX}"):
            if p.name[: -len(_OBJECT_SUFFIX)] not in refs:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
        return n

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.objects.glob(f"*{_OBJECT_SUFFIX}"))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


__all__ = ["ArtifactStore", "StoreEntry", "StoreError", "check_name", "sha256_hex", "NAME_PATTERN"]
