"""The key and audit endpoints' logic, independent of how the service is deployed.

Each function takes the replica's :class:`~serve.access.control.AccessControl` and the request's
``Authorization`` header, does the (blocking, small) file work in a thread, and returns plain
JSON-able data or raises a typed :class:`~serve.errors.ApiError`. The HTTP layer's routes are
thin wrappers around these.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .control import AccessControl, Principal
from .errors import AccessError
from .keys import KEY_ID_PATTERN
from .schemas import KeyCreate

async def create_key(access: AccessControl, authorization: str | None, body: KeyCreate) -> dict[str, Any]:
    admin = access.admin(authorization)

    def work() -> dict[str, Any]:
        try:
            rec, token = access.keys.create(body.name, body.scopes,
                                            rate_limit=body.rate_limit.to_limit() if body.rate_limit else None,
                                            expires_at=body.expiry(access.keys.wall()), manage=body.manage)
        except AccessError as e:
            access.audit(admin, "key_create", result=e.type)
            raise
        access.audit(admin, "key_create", key_id=rec.id)
        return {**rec.public(access.keys.wall()), "token": token}

    return await asyncio.to_thread(work)


async def list_keys(access: AccessControl, authorization: str | None) -> dict[str, Any]:
    access.admin(authorization)

    def work() -> dict[str, Any]:
        now = access.keys.wall()
        return {"keys": [r.public(now) for r in access.keys.list()]}

    return await asyncio.to_thread(work)


async def revoke_key(access: AccessControl, authorization: str | None, key_id: str) -> dict[str, Any]:
    admin = access.admin(authorization)

    def work() -> dict[str, Any]:
        try:
            rec, changed = access.keys.revoke(key_id)
        except AccessError as e:  # an id that is not one (e.g. a pasted token) is never written to the log
            access.audit(admin, "key_revoke", key_id=key_id if KEY_ID_PATTERN.fullmatch(key_id) else None,
                         result=e.type)
            raise
        access.limiter.forget(rec.id)
        access.audit(admin, "key_revoke", key_id=rec.id, result="ok" if changed else "already_revoked")
        return rec.public(access.keys.wall())

    return await asyncio.to_thread(work)


async def read_audit(access: AccessControl, authorization: str | None, *, limit: int = 100, actor: str | None = None,
                     action: str | None = None, model: str | None = None, key_id: str | None = None,
                     since: str | None = None) -> dict[str, Any]:
    access.admin(authorization)
    entries = await asyncio.to_thread(access.audit_log.read, limit=limit, actor=actor, action=action, model=model,
                                      key_id=key_id, since=since)
    return {"entries": entries}


def visible_models(principal: Principal, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A model listing cut to what ``principal`` may see."""
    return [m for m in models if principal.sees(m["name"])]


__all__ = ["create_key", "list_keys", "revoke_key", "read_audit", "visible_models"]
