"""Who may do what: the one object the HTTP layer asks (no FastAPI or Ray imports).

=================  ======================================  ==========================================
credential         read (classify, list, get a model)      admin (models, keys, audit)
=================  ======================================  ==========================================
admin token        every model                             everything
API key            the models its scopes match; others     with ``manage``: register, replace, delete
                   answer exactly as unknown models (404)  models its scopes match; never keys/audit
classify token     every model                             nothing
nothing            every model while the service is open:  nothing
                   no classify token and no key ever
                   created; else 401
=================  ======================================  ==========================================

Tokens are compared in constant time (SHA-256 digests through :func:`hmac.compare_digest`). An
API key is looked up by the id inside its token and verified against its stored digest; a
malformed, unknown, wrong, revoked or expired key gets the same 401. Each request also passes
the key's rate limit (:mod:`serve.access.ratelimit`, per replica).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from .audit import AuditLog
from .errors import AccessError, Forbidden, RateLimited, Unauthorized
from .keys import TOKEN_PREFIX, KeyRecord, KeyStore
from .ratelimit import RateLimiter, Tarpit

logger = logging.getLogger(__name__)

Kind = Literal["admin", "key", "classify", "open"]


def _digest(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).digest()


def _secret(v: Any) -> str | None:
    if v is None:
        return None
    return v.get_secret_value() if hasattr(v, "get_secret_value") else str(v)


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    kind: Kind
    key: KeyRecord | None = None

    @property
    def actor(self) -> str:
        """The audit log's actor: ``"admin"`` or the key id."""
        return self.key.id if self.key is not None else "admin" if self.kind == "admin" else self.kind

    def sees(self, model: str) -> bool:
        """Whether this caller may know ``model`` exists (classify, list, get)."""
        return self.key is None or self.key.allows(model)

    def visible(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.sees(n)]


class AccessControl:
    """Authentication, scope checks, rate limits and the audit trail of one replica.

    ``store_root`` is the artifact store directory (keys and audit log live under
    ``access/`` there, shared by all replicas). ``clock`` (monotonic) drives the rate limiter,
    ``wall`` (epoch seconds) key expiry; both are injectable for tests.
    """

    def __init__(self, store_root: str | os.PathLike, *, admin_token: Any = None, classify_token: Any = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 replica: str | None = None, tarpit: Tarpit | None = None):
        admin, classify = _secret(admin_token), _secret(classify_token)
        self._admin = _digest(admin) if admin else None
        self._classify = _digest(classify) if classify else None
        self.keys = KeyStore(store_root, wall=wall)
        self.audit_log = AuditLog(store_root)
        self.limiter = RateLimiter(clock=clock)
        self.tarpit = tarpit if tarpit is not None else Tarpit()
        self.replica = replica

    # ---- credentials ------------------------------------------------------------------------------
    @staticmethod
    def bearer(authorization: str | None) -> str | None:
        """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None

    def _is(self, token: str, digest: bytes | None) -> bool:
        # always compare (against a dummy when unset) so timing does not tell which tokens are set
        return hmac.compare_digest(_digest(token), digest or b"\0" * 32) and digest is not None

    def open_mode(self) -> bool:
        """No classify token and no key ever created: reads need no credential."""
        return self._classify is None and not self.keys.any_keys()

    def principal(self, authorization: str | None) -> Principal:
        """The caller of a read request (classify, list, get) or :class:`Unauthorized`."""
        token = self.bearer(authorization)
        if token is not None and token.startswith(TOKEN_PREFIX):
            return Principal("key", self.keys.authenticate(token))
        if token is not None:
            is_admin = self._is(token, self._admin)
            is_classify = self._is(token, self._classify)
            if is_admin:
                return Principal("admin")
            if is_classify:
                return Principal("classify")
        if self.open_mode():  # an open service ignores credentials it does not know
            return Principal("open")
        raise Unauthorized()

    def admin(self, authorization: str | None) -> Principal:
        """The admin token's caller or :class:`Unauthorized` (key management and audit)."""
        if self._admin is None:
            raise Unauthorized("admin endpoints are disabled: the server has no admin token configured "
                               "(set BITDELTA_ADMIN_TOKEN)")
        token = self.bearer(authorization)
        if token is None or not self._is(token, self._admin):
            raise Unauthorized("admin endpoints need 'Authorization: Bearer <token>' with the right token")
        return Principal("admin")

    def manager(self, authorization: str | None, model: str | None) -> Principal:
        """The caller of a model registration/replacement/deletion of ``model``: the admin token, or
        an API key with ``manage`` whose scopes match ``model``.

        A key without ``manage`` gets 403; a managing key out of scope gets :class:`Forbidden` too
        (the decision depends on the name only, never on whether the model exists)."""
        token = self.bearer(authorization)
        if token is not None and token.startswith(TOKEN_PREFIX):
            rec = self.keys.authenticate(token)
            if not rec.manage:
                raise Forbidden(f"API key {rec.id} may not register or delete models (created without manage)", rec.id)
            if model is not None and not rec.allows(model):
                raise Forbidden(f"API key {rec.id} may not register or delete model names outside its scopes", rec.id)
            return Principal("key", rec)
        return self.admin(authorization)

    def manager_precheck(self, authorization: str | None) -> Principal:
        """:meth:`manager` before the model name is known (401/403 before an upload is read)."""
        return self.manager(authorization, None)

    def metrics_guard(self, authorization: str | None) -> None:
        """``/metrics`` labels name every model, so once API keys exist (tenants who must not learn
        each other's model names) it needs the admin token; before that it stays open for scrapers."""
        if self.keys.any_keys():
            self.admin(authorization)

    # ---- per request ------------------------------------------------------------------------------
    def check_rate(self, principal: Principal, inputs: int = 1) -> None:
        """Debit the key's buckets (nothing for tokens and open mode); :class:`RateLimited` (429)."""
        if principal.key is not None:
            self.limiter.check(principal.key.id, principal.key.rate_limit, inputs)

    def refusal(self, authorization: str | None) -> tuple[str, RateLimited] | None:
        """(key id, the 429) that a read request (classify, list, get) with this ``Authorization``
        gets now whatever its body says, without debiting; None when the request must go on to
        its route.

        Only an active API key whose requests bucket is empty is refused here (the inputs bucket
        needs the body's input count: the route checks it).
        Everything else (the admin or classify token, open mode, and a malformed, unknown, wrong,
        revoked or expired key, which the route answers with its 401) returns None, so this
        check never changes which answer a credential gets. It costs what :meth:`principal`
        costs for a key: one ``stat`` of the keys file and one SHA-256."""
        token = self.bearer(authorization)
        if token is None or not token.startswith(TOKEN_PREFIX):
            return None
        try:
            rec = self.keys.authenticate(token)
        except AccessError:  # 401 (or an unreadable keys file): the route gives its own answer
            return None
        refused = self.limiter.peek(rec.id, rec.rate_limit)
        return None if refused is None else (rec.id, refused)

    def audit(self, principal: Principal | str, action: str, *, result: str = "ok", model: str | None = None,
              sha256: str | None = None, key_id: str | None = None) -> None:
        """Append one audit line; a failure to write is logged, never turned into a failed request
        (the action itself already happened)."""
        actor = principal if isinstance(principal, str) else principal.actor
        try:
            self.audit_log.append(actor=actor, action=action, result=result, model=model, sha256=sha256,
                                  key_id=key_id, replica=self.replica)
        except (OSError, ValueError) as e:
            logger.error("audit entry %s by %s on %s not written: %s", action, actor, model or key_id, e)


__all__ = ["AccessControl", "Principal"]
