"""The HTTP layer: routes, request limits, auth and the one mapping from errors to answers.

Every error is ``{"error": {"type": str, "message": str}}`` with its status code, produced in one
place (the exception handlers below): library errors through the ordered table of
:mod:`serve.errors`, :class:`~serve.errors.ApiError` as raised, anything unexpected as a 500
that names an error id (never the exception: a traceback can carry paths and addresses).

The routes live on :class:`Routes`, a mixin for the class that Ray Serve makes the ingress
(:mod:`serve.app`); they reach the model worker through ``self.replica``
(:class:`~serve.replica.Replica`) and the other replicas through ``self.peers``
(:class:`Peers`). Nothing here imports Ray.
"""

# No ``from __future__ import annotations`` here: Ray Serve re-binds the route methods, and
# FastAPI must see real annotations (Request, ClassifyRequest), not strings.
import asyncio
import hashlib
import hmac
import importlib
import json
import logging
import time
import uuid
from typing import Any, Callable, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitdelta_core.errors import BitDeltaError, InvalidInputError, UnknownModelError
from bitdelta_core.naming import NAME_PATTERN, NAME_RULE, is_valid_name

from .access import AccessControl, Principal, Tarpit
from .access import http as access_http
from .access.schemas import AuditList, KeyCreate, KeyCreated, KeyInfo, KeyList
from .config import ServeConfig
from .errors import ApiError, classify_exception
from .metrics import render
from .schemas import ClassifyRequest, ClassifyResponse, ErrorResponse, Health, ModelInfo, ModelList
from .store import check_name

logger = logging.getLogger("bitdelta.serve")

API_VERSION = "1"
REPLICA_HEADER = "x-bitdelta-replica"


class Peers(Protocol):
    """Every replica of the service (this one included)."""

    async def broadcast(self, method: str, timeout_s: float = 10.0) -> list[Any]:
        """``method()`` of the model worker on every replica; exceptions as values."""


# ---------------------------------------------------------------------------------------------
# process-wide settings of the HTTP layer (one ingress per process)
# ---------------------------------------------------------------------------------------------
_SETTINGS: dict[str, Any] = {"body": 1 << 20, "upload": 256 << 20, "replica": ""}


def settings() -> dict[str, Any]:
    """The live settings of this process. Looked up through ``sys.modules`` because Ray Serve
    ships the FastAPI app (and its middleware) to the replica as a frozen copy whose globals are
    not this module's."""
    return importlib.import_module("serve.http")._SETTINGS


ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid artifact (corrupt, wrong base, NaN, shape mismatch)"},
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    409: {"model": ErrorResponse, "description": "name already registered"},
    413: {"model": ErrorResponse, "description": "body, input count or text length over the limit"},
    422: {"model": ErrorResponse, "description": "malformed request"},
    403: {"model": ErrorResponse, "description": "the API key may not do this"},
    429: {"model": ErrorResponse, "description": "the API key's rate limit is exceeded (see Retry-After)"},
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


# ---------------------------------------------------------------------------------------------
# middleware: body limits before anything is read; the answering replica on every response
# ---------------------------------------------------------------------------------------------
class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (FastAPI re-raises HTTPException)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """Pure ASGI: 413 from Content-Length before reading, or while streaming a body without one;
    the early 429 of a rate-limited API key (``settings()["refuse_early"]``, set by
    :meth:`Routes.init_http`) before the body is read; adds the ``x-bitdelta-replica`` header
    to every answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = settings()
        is_upload = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/models"
        limit = s["upload" if is_upload else "body"]
        replica = s["replica"].encode("latin-1", "replace")
        for k, v in scope.get("headers") or []:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared < 0:
                    return await _send_json(send, 400, "invalid_request", "invalid Content-Length header", replica)
                if declared > limit:
                    return await _send_json(send, 413, "payload_too_large",
                                            f"request body of {declared} bytes is larger than the limit of {limit} bytes",
                                            replica)

        async def tagged_send(msg):
            if msg["type"] == "http.response.start" and replica:
                msg = {**msg, "headers": [*msg.get("headers", []), (REPLICA_HEADER.encode(), replica)]}
            await send(msg)

        refuse_early = s.get("refuse_early")
        if refuse_early is not None:
            auth = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), None)
            if auth is not None:
                early = refuse_early(scope.get("method", ""), scope.get("path", ""), auth.decode("latin-1"))
                if early is not None:  # the body is never read: the server discards it
                    return await early(scope, receive, tagged_send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body") or b"")
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        return await self.app(scope, limited_receive, tagged_send)


async def _send_json(send, status: int, kind: str, message: str, replica: bytes = b"") -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if replica:
        headers.append((REPLICA_HEADER.encode(), replica))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app.add_middleware(BodyLimitMiddleware)


# ---------------------------------------------------------------------------------------------
# the one error path
# ---------------------------------------------------------------------------------------------
_STATUS_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                 422: "invalid_request", 429: "too_many_requests", 503: "unavailable"}


def _json_error(status: int, kind: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception is answered with."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, BitDeltaError):
        return classify_exception(exc)[0]
    if isinstance(exc, OSError):
        return 503
    return 500


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _json_error(exc.status, exc.type, exc.message, exc.headers)


@app.exception_handler(BitDeltaError)
async def _library_error(request: Request, exc: BitDeltaError):
    status, kind = classify_exception(exc)
    if status == 500:
        return await _unexpected(request, exc)
    return _json_error(status, kind, str(exc))


@app.exception_handler(OSError)
async def _store_error(request: Request, exc: OSError):
    # I/O errors reach a route only from the artifact store (a shared directory): the replica
    # cannot register, delete or load now; the message names no path.
    logger.warning("store I/O error on %s %s: %s", request.method, request.url.path, exc)
    return _json_error(503, "store_unavailable", f"the artifact store is unavailable "
                       f"({exc.strerror or type(exc).__name__}); retry later")


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
    # never echo the exception: it can carry a traceback with paths, addresses, actor ids
    error_id = uuid.uuid4().hex[:12]
    logger.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return _json_error(500, "internal_error", f"internal error (id {error_id}); see the server log")


# ---------------------------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------------------------
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


def _outcome(exc: BaseException) -> str:
    """The result label of a failed admin action (registration/deletion metrics, audit trail)."""
    if isinstance(exc, ApiError):
        return exc.type
    if isinstance(exc, BitDeltaError):
        return classify_exception(exc)[1]
    return "error"


def _unknown(name: str) -> ApiError:
    return ApiError(404, "unknown_model", f"model {name[:80]!r} is not registered")


_UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["name", "file"],
            "properties": {
                "name": {"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$",
                         "description": f"model name ({NAME_RULE})"},
                "file": {"type": "string", "format": "binary",
                         "description": "a .safetensors delta artifact made by `bitdelta compress`"},
                "replace": {"type": "boolean", "default": False,
                            "description": "overwrite an existing model of that name (else 409)"},
            }}}},
    }
}


def _parse_bool(v: Any, field: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off", ""):
        return False
    raise ApiError(422, "invalid_request", f"{field}: expected a boolean, got {str(v)[:40]!r}")


def _check_inputs(inputs: list, cfg: ServeConfig) -> None:
    if len(inputs) > cfg.max_inputs:
        raise ApiError(413, "too_many_inputs", f"{len(inputs)} inputs is more than the limit of {cfg.max_inputs} per request")
    for i, x in enumerate(inputs):
        n = len(x) if isinstance(x, str) else len(x[0]) + len(x[1])
        if n > cfg.max_text_chars:
            raise ApiError(413, "text_too_long", f"input {i} has {n} characters, more than the limit of {cfg.max_text_chars}")
        try:  # JSON allows lone surrogates ("\ud800"); the tokenizer would fail with a 500
            (x if isinstance(x, str) else x[0] + x[1]).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, "invalid_request", f"input {i} is not valid Unicode text (lone surrogate)") from None


# ---------------------------------------------------------------------------------------------
# routes
# ---------------------------------------------------------------------------------------------
class Routes:
    """HTTP routes of one replica. The class that uses this mixin sets ``cfg`` (ServeConfig),
    ``replica`` (:class:`~serve.replica.Replica`) and ``peers`` (:class:`Peers`), then calls
    :meth:`init_http`."""

    cfg: ServeConfig
    peers: Peers
    access: AccessControl

    def init_http(self) -> None:
        settings().update(body=self.cfg.max_body_bytes, upload=self.cfg.max_upload_bytes,
                          replica=self.replica.replica_id)
        # API keys, rate limits (this replica's buckets), audit trail: serve.access, docs/access.md
        self.access = AccessControl(self.cfg.store, admin_token=self.cfg.admin_token,
                                    classify_token=self.cfg.classify_token, replica=self.replica.replica_id,
                                    tarpit=Tarpit(max_hold_s=self.cfg.rate_limit_hold_s))
        settings()["refuse_early"] = self.refuse_early

    # the read routes that check the caller's rate limit before anything else they do
    _RATE_CHECKED_FIRST = {("POST", "/v1/classify"), ("GET", "/v1/models")}

    def refuse_early(self, method: str, path: str, authorization: str) -> Callable | None:
        """The 429 of a read request whose API key is over its rate limit whatever the body says,
        answered by the middleware before the body is read or parsed; None lets the request go
        on to its route (which still debits the buckets with the real input count).

        The answer is the one the route's own check gives (same status, body and headers),
        held until the key's bucket would take a request again (at most a second, a few
        answers per key at a time: :class:`serve.access.ratelimit.Tarpit`) so that a client
        retrying in a loop sends at its limit, not as fast as refusals come back; only an active
        key is refused here, so a bad credential still gets the route's 401, and
        as in the routes the rate check comes before any model name is looked at."""
        route = path if (method, path) in self._RATE_CHECKED_FIRST else None
        if route is None and method == "GET" and path.startswith("/v1/models/") and "/" not in path[11:] and path[11:]:
            route = "/v1/models/{name}"
        if route is None:
            return None
        found = self.access.refusal(authorization)
        if found is None:
            return None
        key_id, refused = found
        if route == "/v1/classify":
            self.replica.m_requests.inc(model="_unread", code=429)
            self.replica.m_http.inc(route=route, code=429)
        answer = _json_error(refused.status, refused.type, refused.message, refused.headers)
        tarpit = self.access.tarpit
        hold = tarpit.acquire(key_id, refused.retry_after_s)
        if hold <= 0.0:
            return answer

        async def held(scope, receive, send):  # serve.access.ratelimit.Tarpit
            try:
                await asyncio.sleep(hold)
            finally:
                tarpit.release(key_id)
            await answer(scope, receive, send)

        return held

    def _principal(self, request: Request) -> Principal:
        return self.access.principal(request.headers.get("authorization"))

    async def _hidden(self, name: str) -> UnknownModelError:
        """A model outside the caller's scopes answers as an unknown one: same store check first,
        same error (the HTTP tests compare both answers byte for byte)."""
        await self.replica.maybe_sync()
        return UnknownModelError(f"model {name!r} is not registered")

    async def _sync_peers(self) -> None:
        """Let every replica pick up a store change now (best effort: each replica also checks
        the store before its next request, which is what guarantees consistency)."""
        try:
            await self.peers.broadcast("sync")
        except Exception as e:  # noqa: BLE001
            logger.warning("sync broadcast failed: %s", e)

    # ---- classification -----------------------------------------------------------------------
    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS,
              summary="Classify texts (or text pairs) with a registered fine-tune")
    async def classify(self, req: ClassifyRequest, request: Request):
        t0 = time.perf_counter()
        m = self.replica
        label = req.model if is_valid_name(req.model) else "_invalid"
        code = 500
        try:
            principal = self._principal(request)
            _check_inputs(req.inputs, self.cfg)
            self.access.check_rate(principal, len(req.inputs))  # before the scope check: a hidden model costs the same
            if not principal.sees(req.model):
                raise await self._hidden(req.model)
            res = await m.classify(req.model, req.inputs, req.truncate, req.return_all_scores)
            code = 200
            m.m_inputs.inc(len(req.inputs), model=label)
            return JSONResponse(res)
        except Exception as e:
            code = status_of(e)
            if code == 404:
                label = "_unknown"
            raise
        finally:
            m.m_requests.inc(model=label, code=code)
            m.m_http.inc(route="/v1/classify", code=code)
            if code == 200:
                m.m_latency.observe(time.perf_counter() - t0, model=label)

    # ---- model registry ---------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]}, summary="List registered fine-tunes")
    async def list_models(self, request: Request):
        principal = self._principal(request)
        self.access.check_rate(principal)
        return JSONResponse({"models": access_http.visible_models(principal, await self.replica.list_models()),
                             "serving_path": self.replica.serving_path})

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses={401: ERRORS[401], 404: ERRORS[404]},
             summary="One registered fine-tune")
    async def get_model(self, name: str, request: Request):
        principal = self._principal(request)
        self.access.check_rate(principal)
        if not is_valid_name(name):
            raise _unknown(name)
        if not principal.sees(name):
            raise await self._hidden(name)
        return JSONResponse(await self.replica.get_model(name))

    @app.post("/v1/models", status_code=201, response_model=ModelInfo, openapi_extra=_UPLOAD_OPENAPI,
              responses={k: ERRORS[k] for k in (400, 401, 409, 413, 422)},
              summary="Register a fine-tune (admin): multipart name + file (+ replace)")
    async def register(self, request: Request, replace: bool = Query(False, description="overwrite an existing model")):
        result = "error"
        auth = request.headers.get("authorization")
        actor: str | None = None  # known once the credential is: only identified callers are audited
        name = data = None
        existed = False
        try:
            self.access.manager_precheck(auth)  # admin token, or an API key with manage (401/403 before the upload)
            name, data, replace = await self._read_upload(request, replace)
            actor = self.access.manager(auth, name).actor  # a key: only names its scopes match
            existed = replace and name in self.replica.store
            info = await self.replica.register(name, data, replace)
            result = "ok"
            await self._sync_peers()
            return JSONResponse(info, status_code=201)
        except Exception as e:
            result = _outcome(e)
            actor = getattr(e, "actor", None) or actor
            raise
        finally:
            self.replica.m_registrations.inc(result=result)
            if actor is not None:
                await asyncio.to_thread(self.access.audit, actor, "replace" if existed else "register", result=result,
                                        model=name, sha256=hashlib.sha256(data).hexdigest() if data else None)

    async def _read_upload(self, request: Request, replace: bool) -> tuple[str, bytes, bool]:
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
        return name, data, replace

    @app.delete("/v1/models/{name}", status_code=204, responses={401: ERRORS[401], 404: ERRORS[404]},
                summary="Delete a fine-tune (admin); removes it from disk")
    async def delete_model(self, name: str, request: Request):
        result = "error"
        auth = request.headers.get("authorization")
        actor: str | None = None
        sha = None
        try:
            self.access.manager_precheck(auth)
            if not is_valid_name(name):
                raise _unknown(name)
            actor = self.access.manager(auth, name).actor
            sha = (await self.replica.unregister(name)).get("sha256")
            result = "ok"
            await self._sync_peers()
            return Response(status_code=204)
        except Exception as e:
            result = _outcome(e)
            actor = getattr(e, "actor", None) or actor
            raise
        finally:
            self.replica.m_deletions.inc(result=result)
            if actor is not None:
                await asyncio.to_thread(self.access.audit, actor, "delete", result=result,
                                        model=name if is_valid_name(name) else None, sha256=sha)

    # ---- API keys and audit trail (admin token; logic in serve.access.http) -------------------------
    @app.post("/v1/keys", status_code=201, response_model=KeyCreated, responses={k: ERRORS[k] for k in (401, 413, 422)},
              summary="Create an API key (admin); its token is in this answer only")
    async def create_key(self, body: KeyCreate, request: Request):
        return JSONResponse(await access_http.create_key(self.access, request.headers.get("authorization"), body),
                            status_code=201)

    @app.get("/v1/keys", response_model=KeyList, responses={401: ERRORS[401]}, summary="List API keys (admin; no secrets)")
    async def list_keys(self, request: Request):
        return JSONResponse(await access_http.list_keys(self.access, request.headers.get("authorization")))

    @app.delete("/v1/keys/{key_id}", response_model=KeyInfo, responses={401: ERRORS[401], 404: ERRORS[404]},
                summary="Revoke an API key (admin); every replica refuses it from its next request")
    async def revoke_key(self, key_id: str, request: Request):
        return JSONResponse(await access_http.revoke_key(self.access, request.headers.get("authorization"), key_id))

    @app.get("/v1/audit", response_model=AuditList, responses={401: ERRORS[401], 422: ERRORS[422]},
             summary="The audit trail of admin actions (admin): the newest `limit` matching entries, oldest first")
    async def audit(self, request: Request, limit: int = Query(100, ge=1, le=10_000),
                    actor: str | None = Query(None, max_length=64), action: str | None = Query(None, max_length=32),
                    model: str | None = Query(None, max_length=64), key_id: str | None = Query(None, max_length=64),
                    since: str | None = Query(None, max_length=64, description="ISO-8601 time")):
        return JSONResponse(await access_http.read_audit(
            self.access, request.headers.get("authorization"), limit=limit, actor=actor, action=action, model=model,
            key_id=key_id, since=since))

    # ---- operations -------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}}, summary="Liveness/readiness")
    async def healthz(self):
        try:
            res = await self.peers.broadcast("health")
        except Exception as e:  # noqa: BLE001
            raise ApiError(503, "unavailable", f"no replica answered: {e}") from None
        ok = [r for r in res if isinstance(r, dict)] or [await self.replica.health()]
        return {"status": "ok", "models": max(r["models"] for r in ok), "replicas": len(ok)}

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: ERRORS[401]},
             summary="Prometheus metrics of this replica, or of every replica (admin token once API keys "
                     "exist: the labels name every model)")
    async def metrics(self, request: Request,
                      scope: str = Query("replica", pattern="^(replica|all)$",
                                         description="replica: the answering replica's own series; all: "
                                                     "every replica's, gathered by broadcast")):
        # Across nodes, Prometheus scrapes the same series from Ray's metrics agent on every node
        # (serve.ray_metrics); this route is a replica's own view, or a whole-deployment view
        # for a single machine without Prometheus.
        self.access.metrics_guard(request.headers.get("authorization"))
        res: list = []
        if scope == "all":
            try:
                res = await self.peers.broadcast("stats")
            except Exception as e:  # noqa: BLE001
                logger.warning("stats broadcast failed: %s", e)
        snaps = [({"replica": r["replica"]}, r["metrics"]) for r in res if isinstance(r, dict)]
        if not snaps:
            own = await self.replica.stats()
            snaps = [({"replica": own["replica"]}, own["metrics"])]
        return PlainTextResponse(render(snaps), media_type="text/plain; version=0.0.4; charset=utf-8")


__all__ = ["app", "Routes", "Peers", "settings", "status_of", "REPLICA_HEADER", "API_VERSION"]
