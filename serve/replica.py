"""The model worker of one replica: engine + continuous batcher + store sync + registry.

Ray-free: :mod:`serve.app` puts it behind the HTTP layer (:mod:`serve.http`) in one Ray Serve
deployment, and the tests drive it directly. Methods raise typed errors
(:mod:`bitdelta_core.errors`, :class:`~serve.store.StoreError`); the HTTP layer maps them to
answers in one place.

Consistency between replicas: the artifact store directory is the source of truth. Before each
request a replica compares the store's cheap :meth:`~serve.store.ArtifactStore.version` (one
``stat``) and, when it changed, reconciles its pool with the store (:class:`~serve.reconcile.Reconciler`),
so a registration or deletion made through any replica is seen by every replica at its next
request. A restarted replica restores everything from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import Any

from bitdelta_core.errors import BitDeltaError, ModelExistsError, UnknownModelError
from bitdelta_core.naming import is_valid_name

from .batching import BatchItem, BatchStats, MicroBatcher
from .config import ServeConfig
from .metrics import LATENCY_BUCKETS, SIZE_BUCKETS, TOKEN_BUCKETS, Registry, Sink
from .reconcile import Reconciler
from .store import ArtifactStore, check_name

logger = logging.getLogger("bitdelta.serve")


def rss_bytes() -> int:
    """Resident set size of this process (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except Exception:  # noqa: BLE001 - no /proc and no psutil: report nothing
            return 0


def info_dict(info) -> dict[str, Any]:
    return {"name": info.name, "base": info.base, "num_labels": int(info.num_labels),
            "labels": list(info.labels) if info.labels is not None else None,
            "bytes": int(info.bytes), "created": info.created}


class Replica:
    """One base model + the packed pool of every stored fine-tune, batched across fine-tunes."""

    def __init__(self, cfg: ServeConfig, replica_id: str | None = None, metrics_export: Sink | None = None):
        """``metrics_export``: where the replica's metrics are mirrored as they change (e.g.
        :class:`serve.ray_metrics.RaySink`); its own registry renders ``/metrics`` either way."""
        import torch

        from bitdelta_core.multitenant import MultiTenantEngine

        self.cfg = cfg
        self.replica_id = replica_id or f"pid{os.getpid()}"
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        # the forward runs in a worker thread and gives the GIL back around every torch op; while
        # the event loop is busy (a burst of requests, a flood of refusals) each of those returns
        # would wait up to the switch interval, so a short one keeps forwards at their own speed
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)
        t0 = time.perf_counter()
        self.engine = MultiTenantEngine(cfg.base, device=cfg.device, dtype=cfg.dtype, cache_bytes=cfg.cache_bytes,
                                        max_length=cfg.max_length, cpu_kernel=None if cfg.cpu_kernel else False)
        self.store = ArtifactStore(cfg.store)
        self._init_metrics(metrics_export)
        self.reconciler = Reconciler(self.store, self.engine, label=f"replica {self.replica_id}",
                                     on_change=self._on_store_change)
        self._last_check = 0.0
        self._store_warned = -1e9
        with contextlib.suppress(OSError):
            self.store.gc()
        self.reconciler.sync()
        self.refresh_gauges()
        self.batcher = MicroBatcher(self._forward, encode=self._encode, max_batch_size=cfg.max_batch_size,
                                    max_batch_tokens=cfg.max_batch_tokens, max_wait_s=cfg.max_wait_ms / 1000.0,
                                    refill_wait_s=cfg.refill_wait_ms / 1000.0, on_batch=self._on_batch)
        logger.info("replica %s ready in %.1f s with %d models (torch threads %d)", self.replica_id,
                    time.perf_counter() - t0, len(self.reconciler.loaded), torch.get_num_threads())

    # ---- metrics ------------------------------------------------------------------------------
    def _init_metrics(self, export: Sink | None = None) -> None:
        r = self.metrics = Registry(export=export)
        # requests, as the HTTP layer sees them
        self.m_requests = r.counter("requests", "classify requests by model and status code", ["model", "code"])
        self.m_inputs = r.counter("inputs", "classified inputs by model", ["model"])
        self.m_latency = r.histogram("request_latency_seconds", "classify latency in the replica by model", ["model"])
        self.m_registrations = r.counter("registrations", "model registrations by result", ["result"])
        self.m_deletions = r.counter("deletions", "model deletions by result", ["result"])
        self.m_http = r.counter("http_requests", "HTTP requests by route and status code", ["route", "code"])
        # batches
        self.m_batch_rows = r.histogram("batch_size", "inputs per batched forward", buckets=SIZE_BUCKETS)
        self.m_batch_requests = r.histogram("batch_requests", "requests per batched forward", buckets=SIZE_BUCKETS)
        self.m_batch_models = r.histogram("batch_models", "distinct fine-tunes per batched forward", buckets=SIZE_BUCKETS)
        self.m_batch_tokens = r.histogram("batch_padded_tokens", "rows x longest row per forward", buckets=TOKEN_BUCKETS)
        self.m_forward = r.histogram("forward_seconds", "tokenization + batched forward", buckets=LATENCY_BUCKETS)
        self.m_queue = r.histogram("queue_seconds", "time the oldest request of a batch waited", buckets=LATENCY_BUCKETS)
        # store and memory
        self.m_sync = r.counter("store_sync", "store changes applied by this replica", ["action"])
        self.m_load = r.histogram("artifact_load_seconds", "time to load+verify+register one artifact")
        self.g_models = r.gauge("models", "fine-tunes resident in this replica's pool")
        self.g_pool = r.gauge("pool_bytes", "packed delta bytes resident (signs, scales, dense tensors)")
        self.g_cache = r.gauge("cache_bytes", "merged working-weight cache bytes in use")
        self.g_cache_budget = r.gauge("cache_budget_bytes", "working-weight cache budget")
        self.g_base = r.gauge("base_bytes", "bytes of the shared base model")
        self.g_kernel = r.gauge("cpu_kernel", "1 when the compiled fused CPU kernel runs the 1-bit layers")
        self.g_path = r.gauge("serving_path", "1 for the way this replica runs a batch (mixed / fallback / "
                              "fallback-merged, from the engine's self-check)", ["path"])
        self.g_rss = r.gauge("replica_rss_bytes", "resident set size of the replica process")
        self.g_store = r.gauge("store_bytes", "bytes of artifacts in the store")

    def _on_store_change(self, action: str, seconds: float) -> None:
        self.m_sync.inc(action=action)
        if action == "load":
            self.m_load.observe(seconds)

    def _on_batch(self, s: BatchStats) -> None:
        self.m_batch_rows.observe(s.rows)
        self.m_batch_requests.observe(s.requests)
        self.m_batch_models.observe(s.models)
        self.m_batch_tokens.observe(s.padded_tokens)
        self.m_forward.observe(s.run_s)
        self.m_queue.observe(s.wait_s)

    # ---- store sync ---------------------------------------------------------------------------
    async def maybe_sync(self) -> None:
        """Apply store changes before serving (one ``stat`` when nothing changed)."""
        now = time.monotonic()
        if self.cfg.sync_interval_s and now - self._last_check < self.cfg.sync_interval_s:
            return
        self._last_check = now
        try:
            if self.reconciler.stale():
                await asyncio.to_thread(self._sync)
        except OSError as e:
            # The store is unreachable (a network filesystem gone, a volume unmounted): keep
            # answering from the pool in memory, which is what the store held at the last sync.
            self.m_sync.inc(action="store_unreachable")
            if now - self._store_warned > 30.0:
                self._store_warned = now
                logger.warning("replica %s: artifact store unreachable (%s); serving the %d models in memory",
                               self.replica_id, e.strerror or type(e).__name__, len(self.reconciler.loaded))

    async def sync(self) -> dict[str, Any]:
        """Apply store changes now."""
        await asyncio.to_thread(self._sync)
        return {"replica": self.replica_id, "models": sorted(self.reconciler.loaded)}

    def _sync(self) -> None:
        self.reconciler.sync()
        self.refresh_gauges()

    # ---- classification -----------------------------------------------------------------------
    async def classify(self, model: str, inputs: list, truncate: bool = True,
                       return_all_scores: bool = False) -> dict[str, Any]:
        await self.maybe_sync()
        if model not in self.engine:
            raise UnknownModelError(f"model {model!r} is not registered")
        preds = await self.batcher.submit(BatchItem(model, list(inputs), truncate=truncate,
                                                    return_all_scores=return_all_scores))
        return {"model": model, "predictions": preds}

    def _encode(self, items: list[BatchItem]) -> None:
        """Tokenize every new request of a round: one batched tokenizer call per ``truncate``
        setting; a request that fails alone gets its own error."""
        for flag in (True, False):
            group = [it for it in items if it.truncate is flag]
            if not group:
                continue
            try:
                encs = self.engine.encode([x for it in group for x in it.inputs], truncate=flag)
            except BitDeltaError:
                encs = None  # find the request(s) at fault
            if encs is not None:
                i = 0
                for it in group:
                    it.encodings = encs[i: i + it.rows]
                    it.tokens = [len(e["input_ids"]) for e in it.encodings]
                    i += it.rows
                continue
            for it in group:
                try:
                    it.encodings = self.engine.encode(it.inputs, truncate=flag)
                    it.tokens = [len(e["input_ids"]) for e in it.encodings]
                except BitDeltaError as e:
                    it.error = e

    def _forward(self, items: list[BatchItem]) -> list[Any]:
        try:
            return self._forward_all(items)
        except BitDeltaError as e:
            if len(items) == 1:
                return [e]
        out: list[Any] = []  # isolate the failing request (e.g. its model was deleted meanwhile)
        for it in items:
            try:
                out.extend(self._forward_all([it]))
            except BitDeltaError as e:
                out.append(e)
        return out

    def _forward_all(self, items: list[BatchItem]) -> list[list[dict]]:
        models = [it.model for it in items for _ in it.inputs]
        want_all = any(it.return_all_scores for it in items)
        encs = [e for it in items for e in it.encodings]
        preds = self.engine.classify_encoded(encs, models, return_all_scores=want_all)
        out, i = [], 0
        for it in items:
            chunk = preds[i: i + it.rows]
            i += it.rows
            out.append([{"label": p.label, "score": float(p.score),
                         "scores": dict(p.scores) if (it.return_all_scores and p.scores is not None) else None}
                        for p in chunk])
        return out

    # ---- registry -----------------------------------------------------------------------------
    async def register(self, name: str, data: bytes, replace: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self._register, name, data, replace)

    def _register(self, name: str, data: bytes, replace: bool) -> dict[str, Any]:
        check_name(name)
        self.reconciler.sync()
        if not replace and name in self.store:
            raise ModelExistsError(f"model {name!r} is already registered (use replace=true to overwrite)")
        art = self.engine.validate(data)  # full validation before anything is written
        summary = {"num_labels": art.num_labels, "architecture": art.model.get("architecture"),
                   "base": art.base.get("name_or_path")}
        entry = self.store.put(name, data, replace=replace, info=summary)
        with self.reconciler.lock:
            try:
                info = self.engine.register(name, art, replace=True)
            except BitDeltaError:
                with contextlib.suppress(BitDeltaError, OSError):
                    self.store.delete(name)
                raise
            self.reconciler.mark_loaded(name, entry.sha256, entry.created)
        logger.info("replica %s registered %s (%d bytes)", self.replica_id, name, entry.bytes)
        self.refresh_gauges()
        return self._info(info)

    def _info(self, info) -> dict[str, Any]:
        """A model's description; ``created`` is the store record's, the same on every replica."""
        d = info_dict(info)
        d["created"] = self.reconciler.created.get(info.name, d["created"])
        return d

    async def unregister(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._unregister, name)

    def _unregister(self, name: str) -> dict[str, Any]:
        if not is_valid_name(name):
            raise UnknownModelError(f"model {name!r} is not registered")
        with self.reconciler.lock:
            entry = self.store.delete(name)
            self.reconciler.forget(name)
        self.refresh_gauges()
        return {"deleted": name, "sha256": entry.sha256}

    @property
    def serving_path(self) -> str:
        """How this replica's engine runs a batch (``mixed``, ``fallback``, ``fallback-merged``)."""
        return getattr(self.engine, "path", "mixed")

    async def list_models(self) -> list[dict[str, Any]]:
        await self.maybe_sync()
        return sorted((self._info(i) for i in self.engine.list()), key=lambda d: d["name"])

    async def get_model(self, name: str) -> dict[str, Any]:
        await self.maybe_sync()
        return self._info(self.engine.get(name))

    # ---- health / stats -----------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "models": len(self.reconciler.loaded)}

    async def stats(self) -> dict[str, Any]:
        rep, rss = self.refresh_gauges()
        return {"replica": self.replica_id, "metrics": self.metrics.snapshot(), "memory": rep, "rss_bytes": rss}

    def refresh_gauges(self) -> tuple[dict[str, Any], int]:
        """Set the memory and pool gauges from the engine (cheap: sums of sizes); returns the
        engine's memory report and the process RSS."""
        rep = self.engine.memory_report()
        self.g_models.set(len(self.reconciler.loaded))
        self.g_pool.set(rep["pool_bytes"])
        self.g_cache.set(rep["cache_bytes"])
        self.g_cache_budget.set(rep["cache_budget"])
        self.g_base.set(rep["base_bytes"])
        self.g_kernel.set(1 if rep["cpu_kernel"] else 0)
        self.g_path.set(1, path=rep.get("path", "mixed"))
        rss = rss_bytes()
        self.g_rss.set(rss)
        with contextlib.suppress(OSError):
            self.g_store.set(self.store.total_bytes())
        return rep, rss


__all__ = ["Replica", "info_dict", "rss_bytes"]
