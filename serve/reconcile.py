"""Store -> engine reconciliation: make one replica's delta pool equal the artifact store.

The store directory is the source of truth shared by every replica. :class:`Reconciler` keeps
what one replica serves equal to it:

* a model in the store and not served (or served with another sha256) is loaded (checksum
  verified by the store) and registered, replacing the old version in one step;
* a model served and no longer in the store is dropped;
* a stored artifact that fails to load is logged, counted and not retried until its sha256
  changes; a *replacement* that fails to load stops the old version from being served (the
  operator asked for the new one, so answering with the old one would be wrong).

``sync()`` is idempotent and serialised by a lock; it does nothing while the store's cheap
:meth:`~serve.store.ArtifactStore.version` is unchanged. Ray-free: it needs only an object with
``register(name, data, replace=True)`` / ``unregister(name)`` (the engine).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Protocol

from bitdelta_core.errors import BitDeltaError, UnknownModelError

from .store import ArtifactStore

logger = logging.getLogger(__name__)


class Pool(Protocol):
    def register(self, name: str, artifact: Any, *, replace: bool = False) -> Any: ...

    def unregister(self, name: str) -> None: ...


class Reconciler:
    """Keeps ``pool`` equal to ``store``; ``on_change(action, seconds)`` counts what it did
    (``action`` in ``load``, ``drop``, ``error``; ``seconds`` is the load time for ``load``)."""

    def __init__(self, store: ArtifactStore, pool: Pool, *, label: str = "replica",
                 on_change: Callable[[str, float], None] | None = None):
        self.store = store
        self.pool = pool
        self.label = label
        self.on_change = on_change or (lambda action, seconds: None)
        self.lock = threading.RLock()
        self.loaded: dict[str, str] = {}  # name -> sha256 served
        self.created: dict[str, str] = {}  # name -> registration time of the served version (store record)
        self.failed: dict[str, str] = {}  # name -> sha256 that failed to load (not retried)
        self._version: tuple | None = None

    def stale(self) -> bool:
        """True when the store changed since the last :meth:`sync` (one cheap stat)."""
        return self.store.version() != self._version

    def sync(self) -> bool:
        """Make the pool equal the store; True when anything changed."""
        with self.lock:
            version = self.store.version()
            if version == self._version:
                return False
            entries = {e.name: e for e in self.store.list()}
            changed = False
            for name in list(self.loaded):
                if name not in entries:
                    self._drop(name)
                    self.on_change("drop", 0.0)
                    changed = True
            for name, e in entries.items():
                if self.loaded.get(name) == e.sha256 or self.failed.get(name) == e.sha256:
                    continue
                changed = True
                t0 = time.perf_counter()
                try:
                    _, data = self.store.load(name)
                    self.pool.register(name, data, replace=True)
                except (BitDeltaError, OSError) as err:
                    logger.error("%s cannot serve stored model %s: %s", self.label, name, err)
                    self.failed[name] = e.sha256
                    self._drop(name)  # a replacement that fails: stop serving the old one
                    self.on_change("error", 0.0)
                    continue
                self.failed.pop(name, None)
                self.loaded[name] = e.sha256
                self.created[name] = e.created
                self.on_change("load", time.perf_counter() - t0)
            self._version = version
            return changed

    def mark_loaded(self, name: str, sha256: str, created: str) -> None:
        """Record a model this replica registered itself (already in the pool)."""
        with self.lock:
            self.loaded[name] = sha256
            self.created[name] = created
            self.failed.pop(name, None)

    def forget(self, name: str) -> None:
        """Drop ``name`` from the pool and the bookkeeping (after a deletion from the store)."""
        with self.lock:
            self._drop(name)
            self.failed.pop(name, None)

    def _drop(self, name: str) -> None:
        if name in self.loaded:
            with contextlib.suppress(UnknownModelError):
                self.pool.unregister(name)
            del self.loaded[name]
            self.created.pop(name, None)


__all__ = ["Reconciler"]
