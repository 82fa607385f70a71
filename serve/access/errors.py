"""Typed errors of the access layer; each is an :class:`~serve.errors.ApiError` with its HTTP status,
so the service's one error handler turns it into ``{"error": {"type", "message"}}``."""

from __future__ import annotations

import math

from ..errors import ApiError

_BEARER = {"WWW-Authenticate": "Bearer"}


class AccessError(ApiError):
    """Base class of the access layer's errors."""


class Unauthorized(AccessError):
    """No credential, or a credential that is malformed, unknown, wrong, revoked or expired (401).

    The message is the same for every one of these causes, so a caller learns nothing about
    which keys exist."""

    def __init__(self, message: str = "this endpoint needs 'Authorization: Bearer <token>' with a valid token "
                                      "or an active API key"):
        super().__init__(401, "unauthorized", message, dict(_BEARER))


class Forbidden(AccessError):
    """An authenticated API key asks for something its grant never allows (403); never used for a
    model name, which answers as unknown (404) instead."""

    def __init__(self, message: str, actor: str | None = None):
        super().__init__(403, "forbidden", message)
        self.actor = actor  # the key id, for the audit trail


class InvalidKeySpec(AccessError):
    """A key request (name, scopes, rate limit, expiry) is invalid (422)."""

    def __init__(self, message: str):
        super().__init__(422, "invalid_request", message)


class UnknownKey(AccessError):
    """No key with this id (404)."""

    def __init__(self, key_id: str):
        shown = key_id if len(key_id) <= 40 else key_id[:37] + "..."
        super().__init__(404, "unknown_key", f"API key {shown!r} does not exist")


class RateLimited(AccessError):
    """The key's token bucket is empty (429); ``Retry-After`` says when a retry can pass."""

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s = float(retry_after_s)
        super().__init__(429, "rate_limited", message,
                         {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))})


class RequestOverBurst(AccessError):
    """One request needs more than a bucket can ever hold (e.g. more inputs than the burst): no
    retry can pass, so this is 413, not 429."""

    def __init__(self, message: str):
        super().__init__(413, "too_many_inputs", message)


class AccessStoreError(AccessError):
    """The keys file or the audit log on disk is unreadable or of an unknown format (500)."""

    def __init__(self, message: str):
        super().__init__(500, "internal_error", message)


__all__ = ["AccessError", "Unauthorized", "Forbidden", "InvalidKeySpec", "UnknownKey", "RateLimited",
           "RequestOverBurst", "AccessStoreError"]
