"""HTTP client calls of the key and audit endpoints (admin token), for the CLI and scripts."""

from __future__ import annotations

import os
from typing import Any

import httpx

from ..client import ServiceError, _raise
from ..config import ENV_PREFIX


class AccessClient:
    """``POST/GET /v1/keys``, ``DELETE /v1/keys/{id}``, ``GET /v1/audit`` with the admin token
    (``admin_token=`` or ``$BITDELTA_ADMIN_TOKEN``)."""

    def __init__(self, url: str, *, admin_token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        token = admin_token if admin_token is not None else os.environ.get(ENV_PREFIX + "ADMIN_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "AccessClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create_key(self, name: str, scopes: list[str], *, rate_limit: dict[str, float] | None = None,
                   expires_at: str | None = None, expires_in_s: float | None = None,
                   manage: bool = False) -> dict[str, Any]:
        """The new key's record with its ``token`` (shown this once)."""
        body: dict[str, Any] = {"name": name, "scopes": list(scopes), "manage": manage}
        if rate_limit:
            body["rate_limit"] = rate_limit
        if expires_at is not None:
            body["expires_at"] = expires_at
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        r = self._http.post("/v1/keys", json=body)
        _raise(r)
        return r.json()

    def list_keys(self) -> list[dict[str, Any]]:
        r = self._http.get("/v1/keys")
        _raise(r)
        return r.json()["keys"]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        r = self._http.delete(f"/v1/keys/{key_id}")
        _raise(r)
        return r.json()

    def audit(self, *, limit: int = 100, **filters: str | None) -> list[dict[str, Any]]:
        params = {"limit": limit, **{k: v for k, v in filters.items() if v is not None}}
        r = self._http.get("/v1/audit", params=params)
        _raise(r)
        return r.json()["entries"]


__all__ = ["AccessClient", "ServiceError"]
