"""Multi-tenant access: scoped API keys, per-key rate limits and an audit trail of admin actions.

Everything lives next to the models in the artifact store directory (``<store>/access/``), so
every replica and a restarted service see the same keys and the same trail. See
``docs/access.md`` for the access model and :mod:`serve.access.control` for the rules.
"""

from .audit import ACTIONS, AuditLog
from .control import AccessControl, Principal
from .errors import (AccessError, AccessStoreError, Forbidden, InvalidKeySpec, RateLimited, RequestOverBurst,
                     Unauthorized, UnknownKey)
from .keys import KeyRecord, KeyStore, check_scopes, scope_matches
from .ratelimit import RateLimit, RateLimiter, Tarpit, TokenBucket

__all__ = ["ACTIONS", "AuditLog", "AccessControl", "Principal", "AccessError", "AccessStoreError", "Forbidden",
           "InvalidKeySpec", "RateLimited", "RequestOverBurst", "Unauthorized", "UnknownKey", "KeyRecord", "KeyStore",
           "check_scopes", "scope_matches", "RateLimit", "RateLimiter", "Tarpit", "TokenBucket"]
