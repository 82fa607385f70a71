"""Open-loop HTTP load on loopback, shared by the served benchmarks.

Arrivals are a Poisson process (exponential gaps at ``rate`` per second) for at most
``duration_s`` seconds and ``max_requests`` requests; each request is sent at its scheduled time
whether or not earlier ones have answered (open loop: a slow server cannot slow the offered load
down, so queueing shows up in the latencies). Latency is measured from the scheduled arrival time.
After the last arrival, outstanding requests get at most ``drain_s`` seconds; what is still
unanswered then is cancelled and counted as ``unfinished`` (an error).
"""

from __future__ import annotations

import asyncio
import csv
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from bitdelta_core.data import shipped_data_dir

DATA = shipped_data_dir()
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load generation is restricted to loopback, got host {host!r}")


def sample_texts(n: int = 512, seed: int = 0) -> list[str]:
    """Short real sentences (SST-2 validation) for request bodies; synthetic ones if absent."""
    path = DATA / "sst2" / "validation.tsv"
    texts: list[str] = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(rows, None)
            texts = [r[0].strip() for r in rows if r and r[0].strip()]
    if not texts:
        texts = [f"sample sentence number {i} about a film" for i in range(n)]
    rng = random.Random(seed)
    rng.shuffle(texts)
    return texts[:n]


def popularity_weights(T: int, law: str) -> list[float]:
    if law == "uniform":
        return [1.0] * T
    if law == "zipf":  # Zipf(1.0): tenant k (1-based) has weight 1/k
        return [1.0 / k for k in range(1, T + 1)]
    raise ValueError(f"unknown popularity law {law!r}")


@dataclass
class LoadResult:
    rate: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies)

        def q(p):
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, max(0, math.ceil(p * len(lat)) - 1))] * 1000, 1)

        n_err = sum(self.errors.values())
        return {"offered_rps": self.rate, "duration_s": self.duration_s, "sent": self.sent, "ok": self.ok,
                "errors": n_err, "error_kinds": dict(self.errors),
                "error_rate": round(n_err / self.sent, 4) if self.sent else None,
                "throughput_rps": round(self.ok / self.wall_s, 2) if self.wall_s else 0.0,
                "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99),
                "mean_ms": round(sum(lat) / len(lat) * 1000, 1) if lat else None}


async def open_loop(url: str, make_request: Callable[[int, random.Random], tuple[str, dict, dict]], *,
                    rate: float, duration_s: float, max_requests: int, seed: int = 0,
                    timeout_s: float = 20.0, drain_s: float = 20.0) -> LoadResult:
    """Drive ``rate`` requests/s (Poisson) for ``duration_s`` s; ``make_request(i, rng)`` returns
    ``(path, json_body, headers)``. Bounded by ``max_requests`` and ``duration_s + drain_s``."""
    import httpx

    check_loopback(url)
    rng = random.Random(seed)
    res = LoadResult(rate, duration_s)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        last_done = [t0]

        async def one(path, body, headers, t_sched):
            try:
                r = await client.post(path, json=body, headers=headers)
                if r.status_code == 200:
                    res.ok += 1
                    res.latencies.append(loop.time() - t_sched)
                else:
                    k = f"http_{r.status_code}"
                    res.errors[k] = res.errors.get(k, 0) + 1
            except httpx.TimeoutException:
                res.errors["timeout"] = res.errors.get("timeout", 0) + 1
            except httpx.HTTPError as e:
                k = type(e).__name__
                res.errors[k] = res.errors.get(k, 0) + 1
            last_done[0] = max(last_done[0], loop.time())

        tasks = []
        t = 0.0
        for i in range(max_requests):
            t += rng.expovariate(rate)
            if t > duration_s:
                break
            delay = t0 + t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            path, body, headers = make_request(i, rng)
            tasks.append(asyncio.create_task(one(path, body, headers, t0 + t)))
        res.sent = len(tasks)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=drain_s + timeout_s)
            for p in pending:
                p.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                res.errors["unfinished"] = res.errors.get("unfinished", 0) + len(pending)
        res.wall_s = max(last_done[0] - t0, 1e-9)
    return res


def wait_idle(probe: Callable[[], bool], *, timeout_s: float = 60.0, interval_s: float = 1.0) -> bool:
    """Call ``probe`` (True = the server answered a request quickly) until it does; bounded."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 1):
        try:
            if probe():
                return True
        except Exception:  # noqa: BLE001 - a failing probe just means "not idle yet"
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(interval_s)
    return False
