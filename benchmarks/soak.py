"""Load and churn soak: concurrent classification against many tenants while others register,
replace and delete deltas, over real HTTP on 127.0.0.1.

Tenants are tiny real fine-tunes of a tiny BERT base (built from configs, no downloads):
``s0..`` are *stable* (registered once, never touched), ``c0..`` are *churned* (each has two
versions A and B; a churn thread registers, replaces A<->B and deletes them). Every tenant
version has its own label names, and its expected answer for every input of a fixed pool is
precomputed offline with :func:`bitdelta_core.apply.apply` (one input at a time).

Correctness of every answer is decided after the run from a timeline: each churn operation is
recorded with its send/receive times, so for a classify request sent at ``a`` and answered at
``b`` the set of states the tenant *could* have had in ``[a, b]`` is known (the state at ``a``
plus the result of every operation that overlaps ``[a, b]``). A 200 must equal the offline
answer of one of those versions of *that* tenant (labels and scores, all rows from the same
version); a 404 is allowed only if "absent" was possible; anything else (5xx, other tenants'
answers, mixed versions) is an error.

The replica's resident memory is read from ``/metrics`` (``bitdelta_replica_rss_bytes``) at the
start, after warm-up and at the end: growth after warm-up must stay within 5 %.

    flock /tmp/bench.lock python -m benchmarks.soak --duration 180

Prints a JSON summary as the last line and writes benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:  # the tiny base/fine-tune/tokenizer helpers are shared with the tests
    sys.path.insert(0, str(_TESTS))

from serve_helpers import ADMIN, AUTH, finetune, free_port, reference_predictions, save_base, texts  # noqa: E402

logger = logging.getLogger("bitdelta.soak")
ABSENT = None
SCORE_TOL = 1e-4


# =============================================================================================
# fixture: tenants, versions, offline expectations
# =============================================================================================
@dataclass
class Fixture:
    base: Path
    pool: list  # inputs: str or [str, str]
    artifacts: dict[tuple[str, str], bytes]  # (tenant, version) -> artifact bytes
    expected: dict[tuple[str, str], list[dict]]  # (tenant, version) -> prediction per pool input
    stable: list[str]
    churned: list[str]

    def versions(self, tenant: str) -> list[str]:
        return sorted(v for t, v in self.artifacts if t == tenant)


def build_fixture(root: Path, *, n_stable: int = 4, n_churned: int = 3, pool_size: int = 16) -> Fixture:
    """Base + fine-tunes + offline reference answers (``apply`` model, one input at a time)."""
    from bitdelta_core.apply import apply
    from bitdelta_core.compress import compress
    from serve_helpers import tiny_tokenizer

    root = Path(root)
    base = save_base(root / "base")
    tok = tiny_tokenizer()
    pool: list = texts(pool_size - 2, seed=11, length=5) + [["w1 w2 w3", "w9 w8"], ["w40", "w41 w42 w43 w44"]]
    specs: list[tuple[str, str]] = [(f"s{i}", "A") for i in range(n_stable)]
    specs += [(f"c{i}", v) for i in range(n_churned) for v in ("A", "B")]
    artifacts, expected = {}, {}
    for k, (tenant, version) in enumerate(specs):
        labels = [f"{tenant}{version}_{j}" for j in range(2 + k % 2)]
        ft = finetune(base, root / f"ft_{tenant}{version}", labels, seed=100 + k)
        art = compress(base, ft, progress=False)
        artifacts[(tenant, version)] = art.to_bytes()
        expected[(tenant, version)] = reference_predictions(apply(str(base), art), tok, pool, art.id2label())
    return Fixture(base=base, pool=pool, artifacts=artifacts, expected=expected,
                   stable=[f"s{i}" for i in range(n_stable)], churned=[f"c{i}" for i in range(n_churned)])


# =============================================================================================
# timeline of churn operations and the verdict on every answer
# =============================================================================================
@dataclass
class Op:
    start: float
    end: float
    state: str | None  # version after the op, None = absent


@dataclass
class Timeline:
    """Per tenant: initial state and the sequential (non-overlapping) operations on it."""

    initial: dict[str, str | None]
    ops: dict[str, list[Op]] = field(default_factory=dict)

    def record(self, tenant: str, op: Op) -> None:
        self.ops.setdefault(tenant, []).append(op)

    def possible(self, tenant: str, a: float, b: float) -> set:
        """States ``tenant`` may have had at some instant of ``[a, b]``."""
        state = self.initial.get(tenant, ABSENT)
        out = set()
        for op in self.ops.get(tenant, []):
            if op.end <= a:
                state = op.state  # certainly applied before the request was sent
            elif op.start <= b:
                out.add(op.state)  # overlaps the request: may or may not be visible
        out.add(state)
        return out


def match_version(fx: Fixture, tenant: str, idx: list[int], preds: list[dict]) -> tuple[str, str] | None:
    """Which (tenant, version) gave exactly these predictions: the named tenant's versions first,
    then every other tenant's (to report a cross-tenant answer); None if nothing matches."""
    if len(preds) != len(idx):
        return None
    keys = sorted(fx.expected, key=lambda k: k[0] != tenant)
    for key in keys:
        exp = fx.expected[key]
        if all(_same(p, exp[i]) for p, i in zip(preds, idx)):
            return key
    return None


def _same(got: dict, want: dict) -> bool:
    return got.get("label") == want["label"] and math.isclose(got["score"], want["score"], rel_tol=SCORE_TOL,
                                                              abs_tol=SCORE_TOL)


@dataclass
class Sample:
    tenant: str
    idx: list[int]
    t0: float
    t1: float
    status: int
    body: Any


def verdicts(fx: Fixture, timeline: Timeline, samples: list[Sample]) -> dict[str, Any]:
    """Check every classify answer against the timeline; returns counts and the first problems."""
    counts = {"ok": 0, "ok_404": 0, "server_error": 0, "wrong_answer": 0, "cross_tenant": 0,
              "unexpected_404": 0, "other_status": 0, "transport_error": 0}
    problems: list[str] = []
    for s in samples:
        allowed = timeline.possible(s.tenant, s.t0, s.t1)
        kind = None
        if s.status == 200:
            got = match_version(fx, s.tenant, s.idx, (s.body or {}).get("predictions") or [])
            if got is None:
                kind = "wrong_answer"
            elif got[0] != s.tenant:
                kind = "cross_tenant"
            elif got[1] not in allowed:
                kind = "wrong_answer"
            else:
                counts["ok"] += 1
        elif s.status == 404:
            msg = ((s.body or {}).get("error") or {}).get("message", "")
            if ABSENT in allowed and s.tenant in msg:
                counts["ok_404"] += 1
            else:
                kind = "unexpected_404"
        elif s.status == 0:
            kind = "transport_error"
        elif s.status >= 500:
            kind = "server_error"
        else:
            kind = "other_status"
        if kind:
            counts[kind] += 1
            if len(problems) < 10:
                problems.append(f"{kind}: {s.tenant} idx={s.idx} allowed={sorted(map(str, allowed))} "
                                f"status={s.status} body={json.dumps(s.body)[:300]}")
    return {"counts": counts, "problems": problems}


# =============================================================================================
# the run
# =============================================================================================
def register(c, name: str, data: bytes, replace: bool = False):
    return c.post("/v1/models", data={"name": name, "replace": "true" if replace else "false"},
                  files={"file": (f"{name}.safetensors", data)}, headers=AUTH)


def replica_rss(c) -> int:
    """Sum of ``bitdelta_replica_rss_bytes`` over engine replicas (from /metrics)."""
    total = 0
    for line in c.get("/metrics?scope=all").text.splitlines():
        m = re.match(r"bitdelta_replica_rss_bytes(\{[^}]*\})? (\S+)$", line)
        if m:
            total += int(float(m.group(2)))
    return total


def run_load(url: str, fx: Fixture, *, duration_s: float, clients: int = 6, churners: int = 1,
             churn_pause_s: float = 0.05, warmup_s: float = 0.0, seed: int = 0,
             progress: bool = False) -> dict[str, Any]:
    """Register the fixture, run classify clients + churn threads for ``duration_s``, verify."""
    import httpx

    with httpx.Client(base_url=url, timeout=60.0) as c:
        initial: dict[str, str | None] = {}
        for t in fx.stable:
            r = register(c, t, fx.artifacts[(t, "A")], replace=True)
            assert r.status_code == 201, r.text
            initial[t] = "A"
        for t in fx.churned:
            r = register(c, t, fx.artifacts[(t, "A")], replace=True)
            assert r.status_code == 201, r.text
            initial[t] = "A"
        rss_start = replica_rss(c)
    timeline = Timeline(initial=dict(initial))
    samples: list[Sample] = []
    churn_log: dict[str, int] = {"register": 0, "replace": 0, "delete": 0, "errors": 0}
    churn_errors: list[str] = []
    lock = threading.Lock()
    t_start = time.monotonic()
    deadline = t_start + warmup_s + duration_s
    tenants = fx.stable + fx.churned
    rss_warm: dict[str, int] = {}

    def classify_worker(wid: int) -> None:
        r_ = random.Random(seed * 1000 + wid)
        local: list[Sample] = []
        with httpx.Client(base_url=url, timeout=60.0) as cc:
            for _ in range(10_000_000):  # bounded by the deadline below
                if time.monotonic() >= deadline:
                    break
                tenant = r_.choice(tenants)
                idx = r_.sample(range(len(fx.pool)), r_.randint(1, 4))
                t0 = time.monotonic()
                try:
                    r = cc.post("/v1/classify", json={"model": tenant, "inputs": [fx.pool[i] for i in idx]})
                    status = r.status_code
                    try:
                        body = r.json()
                    except ValueError:
                        body = {"raw": r.text[:200]}
                except httpx.HTTPError as e:
                    status, body = 0, {"transport": f"{type(e).__name__}: {e}"}
                local.append(Sample(tenant, idx, t0, time.monotonic(), status, body))
        with lock:
            samples.extend(local)

    def churn_worker(wid: int, mine: list[str]) -> None:
        r_ = random.Random(seed * 7919 + wid)
        state = {t: initial[t] for t in mine}
        with httpx.Client(base_url=url, timeout=60.0) as cc:
            for _ in range(10_000_000):
                if time.monotonic() >= deadline:
                    break
                t = r_.choice(mine)
                cur = state[t]
                if cur is ABSENT:
                    action, new = "register", r_.choice(fx.versions(t))
                elif r_.random() < 0.6:
                    action, new = "replace", ("B" if cur == "A" else "A")
                else:
                    action, new = "delete", ABSENT
                t0 = time.monotonic()
                try:
                    if action == "delete":
                        r = cc.delete(f"/v1/models/{t}", headers=AUTH)
                        ok = r.status_code == 204
                    else:
                        r = register(cc, t, fx.artifacts[(t, new)], replace=(action == "replace"))
                        ok = r.status_code == 201
                    detail = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, detail = False, f"{type(e).__name__}: {e}"
                t1 = time.monotonic()
                with lock:
                    if ok:
                        timeline.record(t, Op(t0, t1, new))
                        state[t] = new
                        churn_log[action] += 1
                    else:  # state unknown from here on: count it and stop touching this tenant
                        churn_log["errors"] += 1
                        churn_errors.append(f"{action} {t}: {detail}")
                        timeline.record(t, Op(t0, float("inf"), new))
                        mine = [x for x in mine if x != t]
                        if not mine:
                            return
                time.sleep(churn_pause_s)

    def monitor() -> None:
        with httpx.Client(base_url=url, timeout=60.0) as cc:
            if warmup_s > 0:
                time.sleep(warmup_s)
                rss_warm["bytes"] = replica_rss(cc)
                rss_warm["t"] = time.monotonic() - t_start
            last = time.monotonic()
            while time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                if progress and time.monotonic() - last >= 15:
                    last = time.monotonic()
                    with lock:
                        n = len(samples)
                    print(f"  t={time.monotonic() - t_start:6.1f}s  churn={dict(churn_log)}  finished_clients={n}",
                          flush=True)

    groups = [fx.churned[i::churners] for i in range(churners)]
    threads = [threading.Thread(target=classify_worker, args=(i,), daemon=True) for i in range(clients)]
    threads += [threading.Thread(target=churn_worker, args=(i, g), daemon=True) for i, g in enumerate(groups) if g]
    threads.append(threading.Thread(target=monitor, daemon=True))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=warmup_s + duration_s + 120)
    alive = [th.name for th in threads if th.is_alive()]
    with httpx.Client(base_url=url, timeout=60.0) as c:
        rss_end = replica_rss(c)
        models_end = sorted(m["name"] for m in c.get("/v1/models").json()["models"])
    measured = [s for s in samples if s.t0 >= t_start + warmup_s]
    lat = sorted(s.t1 - s.t0 for s in measured if s.status == 200)
    v = verdicts(fx, timeline, samples)
    errors = sum(n for k, n in v["counts"].items() if k not in ("ok", "ok_404")) + churn_log["errors"]
    return {
        "duration_s": round(duration_s, 1),
        "warmup_s": warmup_s,
        "clients": clients,
        "tenants": len(tenants),
        "requests": len(samples),
        "requests_measured": len(measured),
        "churners": churners,
        "churn_ops": {k: n for k, n in churn_log.items() if k != "errors"},
        "churn_errors": churn_errors[:10],
        "verdicts": v["counts"],
        "problems": v["problems"],
        "errors": errors,
        "throughput_rps": round(len(measured) / duration_s, 2) if duration_s else None,
        "latency_p50_ms": _pct(lat, 50),
        "latency_p99_ms": _pct(lat, 99),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_after_warmup_mb": round(rss_warm["bytes"] / 2**20, 1) if rss_warm else None,
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_after_warmup_pct": (round(100.0 * (rss_end - rss_warm["bytes"]) / rss_warm["bytes"], 2)
                                        if rss_warm.get("bytes") else None),
        "models_at_end": models_end,
        "threads_still_running": alive,
    }


def _pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return round(1000.0 * sorted_vals[k], 2)


# =============================================================================================
# CLI
# =============================================================================================
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=180.0, help="measured seconds after warm-up (default 180)")
    ap.add_argument("--warmup", type=float, default=30.0, help="warm-up seconds before the memory baseline")
    ap.add_argument("--clients", type=int, default=6, help="concurrent classify clients")
    ap.add_argument("--churners", type=int, default=2, help="concurrent churn threads (disjoint tenants each)")
    ap.add_argument("--stable", type=int, default=4, help="tenants never touched")
    ap.add_argument("--churned", type=int, default=4, help="tenants registered/replaced/deleted during the run")
    ap.add_argument("--replicas", type=int, default=1, help="engine replicas")
    ap.add_argument("--ray-num-cpus", type=int, default=2)
    ap.add_argument("--max-growth-pct", type=float, default=5.0)
    ap.add_argument("--out", default="soak", help="results file stem under benchmarks/results/")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from serve import run
    from serve.config import ServeConfig

    with tempfile.TemporaryDirectory(prefix="bitdelta_soak_") as tmp:
        t0 = time.perf_counter()
        fx = build_fixture(Path(tmp), n_stable=args.stable, n_churned=args.churned)
        print(f"fixture: {len(fx.artifacts)} tenant versions in {time.perf_counter() - t0:.1f} s", flush=True)
        cfg = ServeConfig(base=str(fx.base), store=str(Path(tmp) / "store"), admin_token=ADMIN, port=free_port(),
                          num_replicas=args.replicas, replica_num_cpus=0.5, max_wait_ms=2)
        url = run.start(cfg, ray_num_cpus=args.ray_num_cpus, wait_s=300)
        try:
            res = run_load(url, fx, duration_s=args.duration, clients=args.clients, churners=args.churners,
                           warmup_s=args.warmup, progress=True)
        finally:
            run.stop()
    growth = res["rss_growth_after_warmup_pct"]
    res.update({
        "command": "flock /tmp/bench.lock python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "replicas": args.replicas,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "passed": res["errors"] == 0 and growth is not None and growth <= args.max_growth_pct
                  and not res["threads_still_running"],
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(_markdown(res))
    print(json.dumps(res))
    return res


def _markdown(r: dict) -> str:
    rows = [("duration (measured, s)", r["duration_s"]), ("warm-up (s)", r["warmup_s"]),
            ("classify clients", r["clients"]), ("tenants (stable + churned)", r["tenants"]),
            ("engine replicas", r.get("replicas")), ("requests (all / measured)", f"{r['requests']} / {r['requests_measured']}"),
            ("churn operations", json.dumps(r["churn_ops"])), ("errors (any kind)", r["errors"]),
            ("throughput (req/s)", r["throughput_rps"]), ("latency p50 / p99 (ms)", f"{r['latency_p50_ms']} / {r['latency_p99_ms']}"),
            ("replica RSS start / after warm-up / end (MiB)", f"{r['rss_start_mb']} / {r['rss_after_warmup_mb']} / {r['rss_end_mb']}"),
            ("RSS growth after warm-up (%)", r["rss_growth_after_warmup_pct"]), ("passed", r["passed"])]
    lines = ["# Soak: classify under churn", "", f"`{r['command']}` on {r['machine']}", "",
             "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Verdicts: " + json.dumps(r["verdicts"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
