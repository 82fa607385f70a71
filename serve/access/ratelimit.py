"""Token buckets per API key: requests per second and inputs per second, each with a burst.

A bucket of rate ``r`` (tokens/s) and capacity ``b`` holds ``min(b, level + r * elapsed)``
tokens; a request costing ``n`` passes when ``level >= n`` and then takes ``n``. An empty bucket
refills to ``n`` after ``(n - level) / r`` seconds, the ``Retry-After`` of a refusal. A request
is checked against both of its key's buckets before either is debited, so a refusal costs
nothing.

Buckets live in the process that checks them: with N replicas each answering a share of the
traffic, a key gets up to N x its limit in total. Sharing one bucket between replicas would need
a round trip (a lock and a write on the shared store, or a call to one actor) on every request.

The clock is injectable (``clock=``, monotonic seconds) so tests can step time exactly.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from .errors import InvalidKeySpec, RateLimited, RequestOverBurst

MAX_RATE = 1e6


def _positive(v: Any, what: str, *, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidKeySpec(f"{what} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v > MAX_RATE or (v <= minimum if strict else v < minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise InvalidKeySpec(f"{what} must be finite, {bound} and at most {MAX_RATE:g}, got {v!r}")
    return v


@dataclass(frozen=True)
class RateLimit:
    """Per-key limits (``None`` = that dimension is not limited).

    ``requests_burst`` / ``inputs_burst`` are the bucket capacities: how many requests (inputs)
    may arrive at once after a quiet period. They default to one second's worth, at least 1.
    """

    requests_per_s: float | None = None
    requests_burst: float | None = None
    inputs_per_s: float | None = None
    inputs_burst: float | None = None

    def __post_init__(self) -> None:
        for dim in ("requests", "inputs"):
            rate, burst = getattr(self, f"{dim}_per_s"), getattr(self, f"{dim}_burst")
            if rate is None:
                if burst is not None:
                    raise InvalidKeySpec(f"{dim}_burst needs {dim}_per_s")
                continue
            rate = _positive(rate, f"{dim}_per_s")
            burst = max(1.0, rate) if burst is None else _positive(burst, f"{dim}_burst", minimum=1.0, strict=False)
            object.__setattr__(self, f"{dim}_per_s", rate)
            object.__setattr__(self, f"{dim}_burst", burst)
        if self.requests_per_s is None and self.inputs_per_s is None:
            raise InvalidKeySpec("a rate limit needs requests_per_s, inputs_per_s or both")

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "RateLimit | None":
        if d is None:
            return None
        if not isinstance(d, Mapping):
            raise InvalidKeySpec(f"rate_limit must be an object, got {type(d).__name__}")
        unknown = set(d) - {"requests_per_s", "requests_burst", "inputs_per_s", "inputs_burst"}
        if unknown:
            raise InvalidKeySpec(f"rate_limit: unknown fields {sorted(unknown)}")
        return cls(**dict(d))


class TokenBucket:
    """One bucket; not thread-safe on its own (:class:`RateLimiter` holds the lock)."""

    __slots__ = ("rate", "capacity", "level", "stamp")

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = float(rate), float(capacity)
        self.level, self.stamp = self.capacity, now  # a new bucket starts full

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, n: float) -> float:
        """Seconds until ``n`` tokens are available (0.0 = now); call :meth:`refill` first."""
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level -= n


class RateLimiter:
    """Buckets per key id, built from each key's :class:`RateLimit` on first use and rebuilt (full)
    when that limit changes. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[RateLimit, TokenBucket | None, TokenBucket | None]] = {}

    def check(self, key_id: str, limit: RateLimit | None, inputs: int = 1) -> None:
        """Admit one request of ``inputs`` inputs for ``key_id`` or raise.

        :class:`RateLimited` (429, ``retry_after_s``) when a bucket is short of tokens now;
        :class:`RequestOverBurst` (413) when the request alone exceeds a bucket's capacity.
        """
        if limit is None:
            return
        with self._lock:
            now = self.clock()
            entry = self._buckets.get(key_id)
            if entry is None or entry[0] != limit:
                if len(self._buckets) >= self.max_keys:
                    self._buckets.clear()  # bounded memory; buckets refill to full anyway
                entry = (limit,
                         TokenBucket(limit.requests_per_s, limit.requests_burst, now) if limit.requests_per_s else None,
                         TokenBucket(limit.inputs_per_s, limit.inputs_burst, now) if limit.inputs_per_s else None)
                self._buckets[key_id] = entry
            _, req, inp = entry
            if inp is not None and inputs > inp.capacity:
                raise RequestOverBurst(f"{inputs} inputs is more than this API key's burst of {inp.capacity:g} inputs "
                                       "per request; split the request")
            wait = 0.0
            for bucket, n, what in ((req, 1, "requests"), (inp, inputs, "inputs")):
                if bucket is not None:
                    bucket.refill(now)
                    wait = max(wait, bucket.wait_for(n))
            if wait > 0.0:
                raise _refusal(limit, wait)
            if req is not None:
                req.take(1)
            if inp is not None:
                inp.take(inputs)

    def peek(self, key_id: str, limit: RateLimit | None) -> RateLimited | None:
        """The refusal that every request of ``key_id`` gets now, whatever its size, without
        debiting anything: :class:`RateLimited` when the requests bucket cannot take one more
        request, else None (the inputs bucket needs the request's input count: :meth:`check`).

        Its ``Retry-After`` is the one :meth:`check` gives a one-input request, a lower bound
        of what it gives a larger one."""
        if limit is None or limit.requests_per_s is None:
            return None
        with self._lock:
            entry = self._buckets.get(key_id)
            if entry is None or entry[0] != limit:
                return None  # a new (or changed) limit starts with full buckets
            now = self.clock()
            _, req, inp = entry
            req.refill(now)
            wait = req.wait_for(1)
            if wait <= 0.0:
                return None
            if inp is not None:
                inp.refill(now)
                wait = max(wait, inp.wait_for(1))
            return _refusal(limit, wait)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._buckets.pop(key_id, None)


def _refusal(limit: RateLimit, wait: float) -> RateLimited:
    return RateLimited(f"rate limit of this API key exceeded ({_describe(limit)}); retry after {wait:.3f} s", wait)


def _describe(limit: RateLimit) -> str:
    parts = []
    if limit.requests_per_s:
        parts.append(f"{limit.requests_per_s:g} requests/s, burst {limit.requests_burst:g}")
    if limit.inputs_per_s:
        parts.append(f"{limit.inputs_per_s:g} inputs/s, burst {limit.inputs_burst:g}")
    return "; ".join(parts) + " per replica"


class Tarpit:
    """Holds the early 429 of a key over its limit until its bucket would take a request again
    (at most ``max_hold_s``) before answering it.

    A client that retries the moment it is refused, without reading ``Retry-After`` (a loop, a
    runaway job), then sends no faster than its limit on each connection instead of as fast as
    refusals come back: a held answer is one sleeping coroutine, no CPU, where an immediate one
    invites the next request at once. At most ``per_key`` answers of one key are held at a time
    on a replica (the rest are answered at once), so one key cannot fill a replica's request
    slots with held answers; a well-behaved client waits ``Retry-After`` anyway and never
    notices."""

    def __init__(self, max_hold_s: float = 1.0, per_key: int = 8):
        if max_hold_s < 0 or per_key < 0:
            raise ValueError("max_hold_s and per_key must be >= 0")
        self.max_hold_s = float(max_hold_s)
        self.per_key = int(per_key)
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: str, wait_s: float) -> float:
        """Seconds to hold this refusal (0: answer now); a hold > 0 must be given back with
        :meth:`release`."""
        hold = min(max(0.0, float(wait_s)), self.max_hold_s)
        if hold <= 0.0 or self.per_key == 0:
            return 0.0
        with self._lock:
            n = self._held.get(key_id, 0)
            if n >= self.per_key:
                return 0.0
            self._held[key_id] = n + 1
        return hold

    def release(self, key_id: str) -> None:
        with self._lock:
            n = self._held.get(key_id, 0) - 1
            if n > 0:
                self._held[key_id] = n
            else:
                self._held.pop(key_id, None)

    def held(self, key_id: str) -> int:
        with self._lock:
            return self._held.get(key_id, 0)


__all__ = ["RateLimit", "RateLimiter", "Tarpit", "TokenBucket", "MAX_RATE"]
