"""HTTP models of the key and audit endpoints (unknown keys are rejected with 422)."""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from .keys import KEY_NAME_PATTERN, MAX_EXPIRY_S, MAX_SCOPES, SCOPE_PATTERN
from .ratelimit import MAX_RATE, RateLimit

Number = StrictInt | StrictFloat
Scope = Annotated[StrictStr, Field(max_length=64, pattern=f"^{SCOPE_PATTERN.pattern}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RateLimitSpec(_Strict):
    requests_per_s: Number | None = Field(None, gt=0, le=MAX_RATE, description="sustained requests per second")
    requests_burst: Number | None = Field(None, ge=1, le=MAX_RATE,
                                          description="requests allowed at once (default: max(1, requests_per_s))")
    inputs_per_s: Number | None = Field(None, gt=0, le=MAX_RATE, description="sustained classified inputs per second")
    inputs_burst: Number | None = Field(None, ge=1, le=MAX_RATE,
                                        description="inputs allowed at once; also the most inputs one request may "
                                                    "carry (default: max(1, inputs_per_s))")

    def to_limit(self) -> RateLimit:
        return RateLimit(**self.model_dump())


class KeyCreate(_Strict):
    name: StrictStr = Field(max_length=64, pattern=f"^{KEY_NAME_PATTERN.pattern}$",
                            description="a label for people (the tenant, the app)", examples=["acme-prod"])
    scopes: list[Scope] = Field(min_length=1, max_length=MAX_SCOPES,
                                    description="model names or glob patterns (* and ?) the key may use",
                                    examples=[["acme-*", "shared-sentiment"]])
    rate_limit: RateLimitSpec | None = Field(None, description="per-replica token buckets (none: unlimited)")
    expires_at: AwareDatetime | None = Field(None, description="ISO-8601 time with a zone after which the key is refused")
    expires_in_s: Number | None = Field(None, gt=0, le=MAX_EXPIRY_S, description="or: seconds from now")
    manage: StrictBool = Field(False, description="may also register, replace and delete models its scopes match")

    @model_validator(mode="after")
    def _check(self) -> "KeyCreate":
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give expires_at or expires_in_s, not both")
        if self.rate_limit is not None and self.rate_limit.requests_per_s is None and self.rate_limit.inputs_per_s is None:
            raise ValueError("rate_limit needs requests_per_s, inputs_per_s or both")
        return self

    def expiry(self, now: float | None = None) -> float | None:
        if self.expires_at is not None:
            return self.expires_at.timestamp()
        if self.expires_in_s is not None:
            return (time.time() if now is None else now) + float(self.expires_in_s)
        return None


class KeyInfo(_Strict):
    id: str = Field(description="public key id (12 hex digits)")
    name: str
    scopes: list[str]
    manage: bool
    rate_limit: dict[str, float | None] | None
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    status: str = Field(description="active, expired or revoked")
    token_prefix: str = Field(description="the start of the key's token, to recognise it")


class KeyCreated(KeyInfo):
    token: str = Field(description="the bearer token: shown once, never stored by the server")


class KeyList(_Strict):
    keys: list[KeyInfo]


class AuditEntry(_Strict):
    time: str
    actor: str
    action: str
    model: str | None = None
    sha256: str | None = None
    key_id: str | None = None
    result: str
    replica: str | None = None


class AuditList(_Strict):
    entries: list[AuditEntry]


__all__ = ["RateLimitSpec", "KeyCreate", "KeyInfo", "KeyCreated", "KeyList", "AuditEntry", "AuditList"]
