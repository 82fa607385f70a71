"""Ray Serve application: a FastAPI ingress (``Api``) in front of engine replicas (``ModelServer``).

::

    client --HTTP--> Serve proxy --> Api (FastAPI: schemas, limits, auth, metrics)
                                       |  DeploymentHandle calls (plain dicts, never exceptions)
                                       v
                                     ModelServer x num_replicas
                                       MultiTenantEngine (one base + packed delta pool)
                                       MicroBatcher (mixes fine-tunes in one forward)
                                       ArtifactStore sync (shared directory)

Consistency between replicas: the store directory is the source of truth. Every engine replica
compares the store's cheap :meth:`~serve.store.ArtifactStore.version` before each request and,
when it changed, loads new/replaced artifacts (checksum verified) and drops deleted ones. So a
registration or deletion made through any replica is seen by every replica on its next request;
after a change the ingress also broadcasts ``sync`` so idle replicas catch up early. A restarted
service restores everything from the store.

Run it with ``bitdelta serve`` (:mod:`serve.run`), ``serve run deploy/serve_config.yaml`` or
``serve.run(build_app({...}))``.
"""

# No ``from __future__ import annotations`` here: Ray Serve re-binds the route methods, and
# FastAPI must see real annotations (Request, ClassifyRequest), not strings.
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitdelta_core.errors import BitDeltaError, InvalidInputError, UnknownModelError

from .batching import BatchItem, BatchStats, MicroBatcher
from .config import ServeConfig
from .errors import ApiError, error_payload, raise_if_error
from .metrics import LATENCY_BUCKETS, SIZE_BUCKETS, TOKEN_BUCKETS, Registry, render
from .schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, Health, ModelInfo, ModelList
from .store import NAME_PATTERN, ArtifactStore, StoreError, check_name

logger = logging.getLogger("bitdelta.serve")

try:  # Ray errors meaning "the replica is gone" (a RayTaskError, a bug in the call, is not one)
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    _REPLICA_GONE: tuple[type[BaseException], ...] = (ActorDiedError, ActorUnavailableError, RayActorError)
except ImportError:  # pragma: no cover - older Ray
    from ray.exceptions import RayActorError

    _REPLICA_GONE = (RayActorError,)

API_VERSION = "1"
ENGINE_CALL_TIMEOUT_S = 30.0
_IDEMPOTENT = frozenset({"classify", "list_models", "get_model"})


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit use)
        return f"pid{os.getpid()}"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except Exception:  # noqa: BLE001
            return 0


# =============================================================================================
# engine replica
# =============================================================================================
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256,
                  health_check_period_s=10, graceful_shutdown_timeout_s=5)
class ModelServer:
    """Holds one :class:`~bitdelta_core.multitenant.MultiTenantEngine`; batches; syncs the store.

    Every public method returns plain data; library errors come back as
    ``{"error": {"status", "type", "message"}}`` (see :mod:`serve.errors`).
    """

    def __init__(self, args: dict[str, Any]):
        import torch

        from bitdelta_core.multitenant import MultiTenantEngine

        self.cfg = ServeConfig.load(args)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        t0 = time.perf_counter()
        self.engine = MultiTenantEngine(self.cfg.base, device=self.cfg.device, dtype=self.cfg.dtype,
                                        cache_bytes=self.cfg.cache_bytes, max_length=self.cfg.max_length,
                                        cpu_kernel=None if self.cfg.cpu_kernel else False)
        self.store = ArtifactStore(self.cfg.store)
        self.replica = _replica_id()
        self._sync_lock = threading.RLock()
        self._loaded: dict[str, str] = {}  # name -> sha256 served
        self._failed: dict[str, str] = {}  # name -> sha256 that failed to load (not retried)
        self._version: tuple | None = None
        self._last_check = 0.0
        self._init_metrics()
        with contextlib.suppress(OSError):
            self.store.gc()
        self._sync()
        self.batcher = MicroBatcher(self._run_batch, max_batch_size=self.cfg.max_batch_size,
                                    max_batch_tokens=self.cfg.max_batch_tokens,
                                    max_wait_s=self.cfg.max_wait_ms / 1000.0, on_batch=self._on_batch)
        logger.info("replica %s ready in %.1f s with %d models", self.replica, time.perf_counter() - t0,
                    len(self._loaded))

    # ---- metrics ------------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        r = self.metrics = Registry()
        self.m_batch_rows = r.histogram("batch_size", "inputs per batched forward", buckets=SIZE_BUCKETS)
        self.m_batch_requests = r.histogram("batch_requests", "requests per batched forward", buckets=SIZE_BUCKETS)
        self.m_batch_models = r.histogram("batch_models", "distinct fine-tunes per batched forward", buckets=SIZE_BUCKETS)
        self.m_batch_tokens = r.histogram("batch_padded_tokens", "rows x longest row per forward", buckets=TOKEN_BUCKETS)
        self.m_forward = r.histogram("forward_seconds", "time of one batched forward", buckets=LATENCY_BUCKETS)
        self.m_queue = r.histogram("queue_seconds", "time the oldest request of a batch waited", buckets=LATENCY_BUCKETS)
        self.m_sync = r.counter("store_sync", "store changes applied by this replica", ["action"])
        self.m_load = r.histogram("artifact_load_seconds", "time to load+verify+register one artifact")
        self.g_models = r.gauge("models", "fine-tunes resident in this replica's pool")
        self.g_pool = r.gauge("pool_bytes", "packed delta bytes resident (signs, scales, dense tensors)")
        self.g_cache = r.gauge("cache_bytes", "merged working-weight cache bytes in use")
        self.g_cache_budget = r.gauge("cache_budget_bytes", "working-weight cache budget")
        self.g_base = r.gauge("base_bytes", "bytes of the shared base model")
        self.g_kernel = r.gauge("cpu_kernel", "1 when the compiled fused CPU kernel runs the 1-bit layers")
        self.g_rss = r.gauge("replica_rss_bytes", "resident set size of the replica process")
        self.g_store = r.gauge("store_bytes", "bytes of artifacts in the store")

    def _error(self, e: BaseException) -> dict[str, Any]:
        return {**error_payload(e), "replica": self.replica}

    def _on_batch(self, s: BatchStats) -> None:
        self.m_batch_rows.observe(s.rows)
        self.m_batch_requests.observe(s.requests)
        self.m_batch_models.observe(s.models)
        self.m_batch_tokens.observe(s.padded_tokens)
        self.m_forward.observe(s.run_s)
        self.m_queue.observe(s.wait_s)

    # ---- store sync ---------------------------------------------------------------------------
    def _sync(self) -> None:
        """Make the pool equal the store (idempotent; serialised)."""
        with self._sync_lock:
            version = self.store.version()
            if version == self._version:
                return
            entries = {e.name: e for e in self.store.list()}
            for name in list(self._loaded):
                if name not in entries:
                    with contextlib.suppress(UnknownModelError):
                        self.engine.unregister(name)
                    del self._loaded[name]
                    self.m_sync.inc(action="drop")
            for name, e in entries.items():
                if self._loaded.get(name) == e.sha256 or self._failed.get(name) == e.sha256:
                    continue
                t0 = time.perf_counter()
                try:
                    _, data = self.store.load(name)
                    self.engine.register(name, data, replace=True)
                except (BitDeltaError, OSError) as err:
                    logger.error("replica %s cannot serve stored model %s: %s", self.replica, name, err)
                    self._failed[name] = e.sha256
                    if name in self._loaded:  # a replacement that fails: stop serving the old one
                        with contextlib.suppress(UnknownModelError):
                            self.engine.unregister(name)
                        del self._loaded[name]
                    self.m_sync.inc(action="error")
                    continue
                self._failed.pop(name, None)
                self._loaded[name] = e.sha256
                self.m_load.observe(time.perf_counter() - t0)
                self.m_sync.inc(action="load")
            self._version = version

    async def _maybe_sync(self) -> None:
        now = time.monotonic()
        if self.cfg.sync_interval_s and now - self._last_check < self.cfg.sync_interval_s:
            return
        self._last_check = now
        if self.store.version() != self._version:
            await asyncio.to_thread(self._sync)

    async def sync(self) -> dict[str, Any]:
        """Apply store changes now (broadcast by the ingress after a registration/deletion)."""
        try:
            await asyncio.to_thread(self._sync)
        except (BitDeltaError, OSError) as e:
            return self._error(e)
        return {"replica": self.replica, "models": sorted(self._loaded)}

    # ---- classification -----------------------------------------------------------------------
    async def classify(self, model: str, inputs: list, truncate: bool = True,
                       return_all_scores: bool = False) -> dict[str, Any]:
        try:
            await self._maybe_sync()
            if model not in self.engine:
                raise UnknownModelError(f"model {model!r} is not registered")
            # tokenized once, here: the batcher budgets on the token counts, the batch runs the ids
            encs = await asyncio.to_thread(self.engine.encode, inputs, truncate=truncate)
            tokens = [len(e["input_ids"]) for e in encs]
            preds = await self.batcher.submit(BatchItem(model, list(inputs), tokens, return_all_scores, encodings=encs))
            return {"model": model, "predictions": preds, "replica": self.replica}
        except (BitDeltaError, StoreError, OSError) as e:
            return self._error(e)

    def _run_batch(self, items: list[BatchItem]) -> list[Any]:
        try:
            return self._forward(items)
        except BitDeltaError as e:
            if len(items) == 1:
                return [e]
        out: list[Any] = []  # isolate the failing request (e.g. its model was deleted meanwhile)
        for it in items:
            try:
                out.extend(self._forward([it]))
            except BitDeltaError as e:
                out.append(e)
        return out

    def _forward(self, items: list[BatchItem]) -> list[list[dict]]:
        models = [it.model for it in items for _ in it.inputs]
        want_all = any(it.return_all_scores for it in items)
        encs = [e for it in items for e in it.encodings]  # classify() encodes every request once
        preds = self.engine.classify_encoded(encs, models, return_all_scores=want_all)
        out, i = [], 0
        for it in items:
            chunk = preds[i : i + it.rows]
            i += it.rows
            out.append([{"label": p.label, "score": float(p.score),
                         "scores": dict(p.scores) if (it.return_all_scores and p.scores is not None) else None}
                        for p in chunk])
        return out

    # ---- registry -----------------------------------------------------------------------------
    async def register(self, name: str, data: bytes, replace: bool = False) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(self._register, name, data, replace)
        except (BitDeltaError, StoreError, OSError) as e:
            return self._error(e)

    def _register(self, name: str, data: bytes, replace: bool) -> dict[str, Any]:
        from bitdelta_core.errors import ModelExistsError

        check_name(name)
        self._sync()
        if not replace and name in self.store:
            raise ModelExistsError(f"model {name!r} is already registered (use replace=true to overwrite)")
        art = self.engine.validate(data)  # full validation before anything is written
        summary = {"num_labels": art.num_labels, "architecture": art.model.get("architecture"),
                   "base": art.base.get("name_or_path")}
        entry = self.store.put(name, data, replace=replace, info=summary)
        with self._sync_lock:
            try:
                info = self.engine.register(name, art, replace=True)
            except BitDeltaError:
                with contextlib.suppress(BitDeltaError, OSError):
                    self.store.delete(name)
                raise
            self._loaded[name] = entry.sha256
            self._failed.pop(name, None)
        logger.info("replica %s registered %s (%d bytes)", self.replica, name, entry.bytes)
        return _info_dict(info)

    async def unregister(self, name: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(self._unregister, name)
        except (BitDeltaError, StoreError, OSError) as e:
            return self._error(e)

    def _unregister(self, name: str) -> dict[str, Any]:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise UnknownModelError(f"model {name!r} is not registered")
        with self._sync_lock:
            self.store.delete(name)
            if name in self._loaded:
                with contextlib.suppress(UnknownModelError):
                    self.engine.unregister(name)
                del self._loaded[name]
            self._failed.pop(name, None)
        return {"deleted": name}

    async def list_models(self) -> dict[str, Any]:
        try:
            await self._maybe_sync()
            return {"models": sorted((_info_dict(i) for i in self.engine.list()), key=lambda d: d["name"]),
                    "replica": self.replica}
        except (BitDeltaError, StoreError, OSError) as e:
            return self._error(e)

    async def get_model(self, name: str) -> dict[str, Any]:
        try:
            await self._maybe_sync()
            return {**_info_dict(self.engine.get(name)), "replica": self.replica}
        except (BitDeltaError, StoreError, OSError) as e:
            return self._error(e)

    # ---- health / stats -----------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return {"replica": self.replica, "models": len(self._loaded)}

    def check_health(self) -> None:  # Ray Serve's periodic health check
        if self.engine is None:
            raise RuntimeError("engine not loaded")

    async def stats(self) -> dict[str, Any]:
        rep = self.engine.memory_report()
        self.g_models.set(len(self._loaded))
        self.g_pool.set(rep["pool_bytes"])
        self.g_cache.set(rep["cache_bytes"])
        self.g_cache_budget.set(rep["cache_budget"])
        self.g_base.set(rep["base_bytes"])
        self.g_kernel.set(1 if rep["cpu_kernel"] else 0)
        self.g_rss.set(_rss_bytes())
        with contextlib.suppress(OSError):
            self.g_store.set(self.store.total_bytes())
        return {"replica": self.replica, "metrics": self.metrics.snapshot(), "memory": rep,
                "rss_bytes": _rss_bytes()}


def _info_dict(info) -> dict[str, Any]:
    return {"name": info.name, "base": info.base, "num_labels": int(info.num_labels),
            "labels": list(info.labels) if info.labels is not None else None,
            "bytes": int(info.bytes), "created": info.created}


# =============================================================================================
# HTTP ingress
# =============================================================================================
_LIMITS = {"body": 1 << 20, "upload": 256 << 20}  # set by Api.__init__ (one ingress per process)


def _limits() -> dict[str, int]:
    """The live limits of this process. Looked up through ``sys.modules`` because Ray Serve ships
    the FastAPI app (and its middleware) to the replica as a frozen copy whose globals are not
    this module's."""
    import importlib

    return importlib.import_module("serve.app")._LIMITS

ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid artifact (corrupt, wrong base, NaN, shape mismatch)"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    409: {"model": ErrorResponse, "description": "name already registered"},
    413: {"model": ErrorResponse, "description": "body, input count or text length over the limit"},
    422: {"model": ErrorResponse, "description": "malformed request"},
}

app = FastAPI(
    title="bitdelta-serve",
    version=API_VERSION,
    description="Multi-tenant classification over one shared base model with 1-bit (BitDelta) fine-tune deltas. "
                "Errors are `{\"error\": {\"type\", \"message\"}}`.",
    docs_url="/docs",
    openapi_url="/openapi.json",
    redoc_url=None,
)


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (FastAPI re-raises HTTPException)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Pure ASGI: 413 from Content-Length before reading, or while streaming a body without one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/models"
        limit = _limits()["upload" if is_upload else "body"]
        for k, v in scope.get("headers") or []:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared < 0:
                    return await _send_json(send, 400, "invalid_request", "invalid Content-Length header")
                if declared > limit:
                    return await _send_json(send, 413, "payload_too_large",
                                            f"request body of {declared} bytes is larger than the limit of {limit} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body") or b"")
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        return await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, kind: str, message: str) -> None:
    import json

    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


app.add_middleware(BodyLimitMiddleware)

_STATUS_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                 422: "invalid_request", 429: "too_many_requests", 503: "unavailable"}


def _json_error(status: int, kind: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _json_error(exc.status, exc.type, exc.message, exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        if e.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})")
        else:
            parts.append(f"{loc}: {e.get('msg')}")
    return _json_error(422, "invalid_request", "; ".join(parts) or "malformed request")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = _STATUS_TYPES.get(exc.status_code, "http_error")
    msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400 and msg == "There was an error parsing the body":  # FastAPI: bad UTF-8, RecursionError
        return _json_error(422, "invalid_request", "request body is not valid JSON (not UTF-8, or nested too deeply)")
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        msg = f"method {request.method} is not allowed on {request.url.path}"
    return _json_error(exc.status_code, kind, msg, getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    # never echo the exception: a Ray error carries a remote traceback (paths, IPs, actor ids)
    error_id = uuid.uuid4().hex[:12]
    logger.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return _json_error(500, "internal_error", f"internal error (id {error_id}); see the server log")


def _digest(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).digest()


def _check_bearer(request: Request, expected, what: str) -> None:
    """Constant-time comparison of the bearer token (SHA-256 first, so length leaks nothing)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if expected is None:
        raise ApiError(401, "unauthorized", f"{what} endpoints are disabled: the server has no {what} token "
                       "configured (set BITDELTA_ADMIN_TOKEN)", {"WWW-Authenticate": "Bearer"})
    good = hmac.compare_digest(_digest(token.strip()), _digest(expected.get_secret_value()))
    if scheme.lower() != "bearer" or not good:
        raise ApiError(401, "unauthorized", f"{what} endpoints need 'Authorization: Bearer <token>' with the "
                       f"right token", {"WWW-Authenticate": "Bearer"})


_UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["name", "file"],
            "properties": {
                "name": {"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$",
                         "description": "model name (1-64 chars of A-Z a-z 0-9 . _ -, starting alphanumeric)"},
                "file": {"type": "string", "format": "binary",
                         "description": "a .safetensors delta artifact made by `bitdelta compress`"},
                "replace": {"type": "boolean", "default": False,
                            "description": "overwrite an existing model of that name (else 409)"},
            }}}},
    }
}


def _with_replica(res: dict[str, Any]) -> JSONResponse:
    """The engine's answer as JSON; the answering engine replica goes into a header."""
    replica = str(res.pop("replica", ""))
    return JSONResponse(res, headers={"x-bitdelta-replica": replica} if replica else None)


def _parse_bool(v: Any, field: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off", ""):
        return False
    raise ApiError(422, "invalid_request", f"{field}: expected a boolean, got {str(v)[:40]!r}")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class Api:
    def __init__(self, engine: DeploymentHandle, args: dict[str, Any]):
        self.cfg = ServeConfig.load(args)
        self.engine = engine
        _limits().update(body=self.cfg.max_body_bytes, upload=self.cfg.max_upload_bytes)
        r = self.metrics = Registry()
        self.m_requests = r.counter("requests", "classify requests by model and status code", ["model", "code"])
        self.m_inputs = r.counter("inputs", "classified inputs by model", ["model"])
        self.m_latency = r.histogram("request_latency_seconds", "classify latency at the ingress by model", ["model"])
        self.m_registrations = r.counter("registrations", "model registrations by result", ["result"])
        self.m_deletions = r.counter("deletions", "model deletions by result", ["result"])
        self.m_http = r.counter("http_requests", "HTTP requests by route and status code", ["route", "code"])

    # ---- helpers ------------------------------------------------------------------------------
    async def _call(self, method: str, *args) -> Any:
        """One engine call; read-only calls are retried once if the replica died under them
        (Serve routes the retry to a live replica). Registrations are never retried blindly."""
        attempts = 2 if method in _IDEMPOTENT else 1
        for attempt in range(attempts):
            try:
                resp = getattr(self.engine, method).remote(*args)
                return raise_if_error(await asyncio.wait_for(resp, ENGINE_CALL_TIMEOUT_S))
            except ApiError:
                raise
            except (asyncio.TimeoutError, TimeoutError):
                raise ApiError(503, "unavailable",
                               f"the engine did not answer {method} within {ENGINE_CALL_TIMEOUT_S:.0f} s") from None
            except _REPLICA_GONE as e:  # the replica died / is restarting: not the request's fault
                logger.warning("engine call %s failed (attempt %d): %s: %s", method, attempt + 1, type(e).__name__, e)
                if attempt + 1 < attempts:
                    continue
                raise ApiError(503, "unavailable", f"the engine replica handling {method} died or is restarting; "
                               "retry", {"Retry-After": "1"}) from None
        raise AssertionError("unreachable")

    async def _broadcast_sync(self) -> None:
        """Tell every engine replica to pick up a store change now (best effort, bounded)."""
        try:
            await self.engine.broadcast("sync").results_async(timeout_s=10.0, return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - the per-request sync still guarantees correctness
            logger.warning("sync broadcast failed: %s", e)

    def _count(self, route: str, code: int) -> None:
        self.m_http.inc(route=route, code=code)

    # ---- classification -----------------------------------------------------------------------
    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              summary="Classify texts (or text pairs) with a registered fine-tune")
    async def classify(self, req: ClassifyRequest, request: Request):
        t0 = time.perf_counter()
        label = req.model if NAME_PATTERN.fullmatch(req.model) else "_invalid"
        code = 500
        try:
            if self.cfg.classify_token is not None:
                _check_bearer(request, self.cfg.classify_token, "classify")
            if len(req.inputs) > self.cfg.max_inputs:
                raise ApiError(413, "too_many_inputs",
                               f"{len(req.inputs)} inputs is more than the limit of {self.cfg.max_inputs} per request")
            for i, x in enumerate(req.inputs):
                n = len(x) if isinstance(x, str) else len(x[0]) + len(x[1])
                if n > self.cfg.max_text_chars:
                    raise ApiError(413, "text_too_long",
                                   f"input {i} has {n} characters, more than the limit of {self.cfg.max_text_chars}")
                try:  # JSON allows lone surrogates ("\ud800"); the tokenizer would fail with a 500
                    (x if isinstance(x, str) else x[0] + x[1]).encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(422, "invalid_request", f"input {i} is not valid Unicode text (lone surrogate)") from None
            res = await self._call("classify", req.model, req.inputs, req.truncate, req.return_all_scores)
            code = 200
            self.m_inputs.inc(len(req.inputs), model=label)
            return _with_replica(res)
        except ApiError as e:
            code = e.status
            if code == 404:
                label = "_unknown"
            raise
        finally:
            self.m_requests.inc(model=label, code=code)
            self._count("/v1/classify", code)
            if code == 200:
                self.m_latency.observe(time.perf_counter() - t0, model=label)

    # ---- model registry ---------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]}, summary="List registered fine-tunes")
    async def list_models(self, request: Request):
        if self.cfg.classify_token is not None:
            _check_bearer(request, self.cfg.classify_token, "classify")
        return _with_replica(await self._call("list_models"))

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses={401: ERRORS[401], 404: ERRORS[404]},
             summary="One registered fine-tune")
    async def get_model(self, name: str, request: Request):
        if self.cfg.classify_token is not None:
            _check_bearer(request, self.cfg.classify_token, "classify")
        if not NAME_PATTERN.fullmatch(name):
            raise ApiError(404, "unknown_model", f"model {name[:80]!r} is not registered")
        return _with_replica(await self._call("get_model", name))

    @app.post("/v1/models", status_code=201, response_model=ModelInfo, openapi_extra=_UPLOAD_OPENAPI,
              responses={k: ERRORS[k] for k in (400, 401, 409, 413, 422)},
              summary="Register a fine-tune (admin): multipart name + file (+ replace)")
    async def register(self, request: Request, replace: bool = Query(False, description="overwrite an existing model")):
        result = "error"
        try:
            _check_bearer(request, self.cfg.admin_token, "admin")
            ctype = request.headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                raise ApiError(422, "invalid_request",
                               f"expected a multipart/form-data body with fields 'name' and 'file', got {ctype[:60]!r}")
            try:
                form = await request.form(max_files=1, max_fields=4, max_part_size=64 * 1024)
            except StarletteHTTPException as e:
                if e.status_code == 413:
                    raise
                raise ApiError(422, "invalid_request", f"malformed multipart body: {e.detail}") from None
            except Exception as e:  # noqa: BLE001 - multipart parser errors of any kind
                raise ApiError(422, "invalid_request", f"malformed multipart body: {e}") from None
            try:
                name, upload = form.get("name"), form.get("file")
                if not isinstance(name, str):
                    raise ApiError(422, "invalid_request", "field 'name' (a text field) is missing")
                if not isinstance(upload, UploadFile):
                    raise ApiError(422, "invalid_request", "field 'file' (a file upload) is missing")
                unknown = set(form.keys()) - {"name", "file", "replace"}
                if unknown:
                    raise ApiError(422, "invalid_request", f"unexpected form fields: {sorted(unknown)}")
                if form.get("replace") is not None:
                    replace = replace or _parse_bool(form.get("replace"), "replace")
                try:
                    check_name(name)
                except InvalidInputError as e:
                    raise ApiError(422, "invalid_name", str(e)) from None
                data = await upload.read()
            finally:
                await form.close()
            if not data:
                raise ApiError(400, "artifact_corrupt", "the uploaded file is empty")
            info = await self._call("register", name, data, replace)
            result = "ok"
            await self._broadcast_sync()
            return JSONResponse(info, status_code=201)
        except ApiError as e:
            result = e.type
            raise
        finally:
            self.m_registrations.inc(result=result)

    @app.delete("/v1/models/{name}", status_code=204, responses={401: ERRORS[401], 404: ERRORS[404]},
                summary="Delete a fine-tune (admin); removes it from disk")
    async def delete_model(self, name: str, request: Request):
        result = "error"
        try:
            _check_bearer(request, self.cfg.admin_token, "admin")
            if not NAME_PATTERN.fullmatch(name):
                raise ApiError(404, "unknown_model", f"model {name[:80]!r} is not registered")
            await self._call("unregister", name)
            result = "ok"
            await self._broadcast_sync()
            return Response(status_code=204)
        except ApiError as e:
            result = e.type
            raise
        finally:
            self.m_deletions.inc(result=result)

    # ---- operations -------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}}, summary="Liveness/readiness")
    async def healthz(self):
        try:
            res = await self.engine.broadcast("health").results_async(timeout_s=10.0, return_exceptions=True)
        except Exception as e:  # noqa: BLE001
            raise ApiError(503, "unavailable", f"no engine replica answered: {e}") from None
        ok = [r for r in res if isinstance(r, dict)]
        if not ok:
            raise ApiError(503, "unavailable", "no engine replica answered")
        return {"status": "ok", "models": max(r["models"] for r in ok), "replicas": len(ok)}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics(self):
        snaps = [({"replica": "ingress"}, self.metrics.snapshot())]
        try:
            res = await self.engine.broadcast("stats").results_async(timeout_s=10.0, return_exceptions=True)
        except Exception as e:  # noqa: BLE001
            logger.warning("stats broadcast failed: %s", e)
            res = []
        for r in res:
            if isinstance(r, dict):
                snaps.append(({"replica": r["replica"]}, r["metrics"]))
        return PlainTextResponse(render(snaps), media_type="text/plain; version=0.0.4; charset=utf-8")


# =============================================================================================
# application builder (serve run deploy/serve_config.yaml, serve.run(build_app({...})))
# =============================================================================================
def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application from config values (``args``; ``BITDELTA_*`` env fills the rest)."""
    cfg = ServeConfig.load(dict(args or {}))
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = cfg.autoscaling
    else:
        opts["num_replicas"] = cfg.num_replicas
    engine = ModelServer.options(**opts).bind(cfg.to_args())
    return Api.bind(engine, cfg.to_args())


__all__ = ["app", "Api", "ModelServer", "build_app"]
