"""What the service adds on top of the model: this service against the leanest servers of one dense model.

All servers run at the same time on 127.0.0.1 and the measurement points alternate between them
(the 2-core machine is shared; a burst of other work then hits every server alike). One load
generator (this process) drives them all:

  (a)   plain      one process: FastAPI + uvicorn, one dense MiniLM-L6 fine-tune, the same continuous
                   batcher as the service (a forward starts the moment the model is free and takes
                   everything queued);
  (b)   ray        a minimal Ray Serve app: ONE deployment = FastAPI ingress + the same dense model
                   and batcher, reached through the Serve proxy;
  (b')  ray-di     the same app with Ray Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1),
                   the client on the replica's own port;
  (c)   bitdelta   this service (serve/: one deployment, HTTP layer + engine replica) with T of 64
                   registered fine-tunes in use, through the Serve proxy;
  (c')  bitdelta-di  the same service with direct ingress, the client on the replica's own port.

(b)/(c) share one Ray instance, (b')/(c') another (direct ingress is a process-wide Ray setting).
Every server runs torch with the same thread count. Load: closed loop with C = 1, 8, 32 clients,
each request one sentence or eight (real SST-2 sentences), and one open-loop Poisson point. For
every point: ok req/s, p50/p99, and the CPU seconds per request of every process of the server
(process groups: proxy, replica, controller, raylet/gcs, other) and of the load generator.

    python -m benchmarks.served_overhead             # full run (~15 min on 2 cores)
    python -m benchmarks.served_overhead --quick     # smoke run: a few short points
"""

# No ``from __future__ import annotations``: Ray Serve re-binds the route methods of the dense
# app, and FastAPI must see real annotations.
import argparse
import asyncio
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve.run import free_local_port
from serve.schemas import ClassifyRequest

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.served_overhead")
ADMIN = "bench-admin-token"
DENSE_PREFIX = "/dense"
SYSTEMS = ("plain", "ray", "ray-di", "bitdelta", "bitdelta-di")
LABELS = {"plain": "(a) plain FastAPI", "ray": "(b) minimal Ray Serve", "ray-di": "(b') minimal Ray Serve, direct ingress",
          "bitdelta": "(c) this service", "bitdelta-di": "(c') this service, direct ingress"}


# =============================================================================================
# the dense-model servers (a) and (b): the same model, schema and batcher as the service
# =============================================================================================
class DenseWorker:
    """One dense fine-tuned model behind :class:`serve.batching.MicroBatcher` (continuous; no
    wait unless ``refill_s``, the service's refill hold, is given)."""

    def __init__(self, model_dir: str, threads: int, max_length: int = 128, refill_s: float = 0.0):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from serve.batching import MicroBatcher

        torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.id2label = self.model.config.id2label
        self.max_length = max_length
        self.batcher = MicroBatcher(self._forward, encode=self._encode, max_batch_size=32, max_batch_tokens=16384,
                                    refill_wait_s=refill_s)

    def _encode(self, items) -> None:
        enc = self.tok([x for it in items for x in it.inputs], truncation=True, max_length=self.max_length)
        i = 0
        for it in items:
            it.encodings = [{k: v[j] for k, v in enc.items()} for j in range(i, i + it.rows)]
            it.tokens = [len(e["input_ids"]) for e in it.encodings]
            i += it.rows

    def _forward(self, items) -> list:
        import torch

        batch = self.tok.pad([e for it in items for e in it.encodings], return_tensors="pt")
        with torch.inference_mode():
            probs = torch.softmax(self.model(**batch).logits.float(), -1)
        top = probs.argmax(-1)
        preds = [{"label": self.id2label[int(k)], "score": float(probs[i, k]), "scores": None} for i, k in enumerate(top)]
        out, i = [], 0
        for it in items:
            out.append(preds[i: i + it.rows])
            i += it.rows
        return out

    async def classify(self, model: str, inputs: list) -> dict:
        from serve.batching import BatchItem

        return {"model": model, "predictions": await self.batcher.submit(BatchItem(model, list(inputs)))}


def dense_fastapi(with_classify: bool = True):
    """The FastAPI app of (a) and (b): POST /v1/classify with the service's request schema."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state: dict[str, DenseWorker] = {}

    if with_classify:
        @app.post("/v1/classify")
        async def classify(req: ClassifyRequest):
            return JSONResponse(await state["worker"].classify(req.model, req.inputs))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app, state


def run_plain(args) -> None:
    import uvicorn

    app, state = dense_fastapi()
    state["worker"] = DenseWorker(args.model, args.threads, refill_s=args.dense_refill_ms / 1000)
    _ready({"plain": f"http://127.0.0.1:{args.port}"})
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def dense_ray_app(model_dir: str, threads: int, refill_s: float = 0.0):
    from ray import serve

    from fastapi.responses import JSONResponse

    app, _ = dense_fastapi(with_classify=False)

    @serve.deployment(name="DenseModel", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
    @serve.ingress(app)
    class DenseModel:
        def __init__(self):
            self.worker = DenseWorker(model_dir, threads, refill_s=refill_s)

        @app.post("/v1/classify")
        async def classify(self, req: ClassifyRequest):
            return JSONResponse(await self.worker.classify(req.model, req.inputs))

    return DenseModel.bind()


def run_ray(args) -> None:
    """One Ray instance with the minimal dense app (under /dense) and the service (under /)."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import ServeConfig
    from serve.run import worker_env

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    serve.run(dense_ray_app(args.model, args.threads, args.dense_refill_ms / 1000), name="dense", route_prefix=DENSE_PREFIX, blocking=False)
    cfg = ServeConfig(base=args.base, store=args.store, admin_token=ADMIN, torch_threads=args.threads,
                      max_batch_size=32, max_length=128, replica_num_cpus=0.5, port=args.port,
                      **({} if args.refill_ms is None else {"refill_wait_ms": args.refill_ms}))
    serve.run(build_app(cfg.to_args()), name="bitdelta", route_prefix="/", blocking=False)
    proxy = f"http://127.0.0.1:{args.port}"
    urls = _wait_up({"ray": proxy + DENSE_PREFIX, "bitdelta": proxy})
    if args.direct:  # each ingress replica listens on its own port in the range set below
        import httpx

        direct = {}
        for port in range(args.di_port, args.di_port + 20):
            for key, path in (("ray-di", DENSE_PREFIX + "/healthz"), ("bitdelta-di", "/healthz")):
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
                except httpx.HTTPError:
                    continue
                if r.status_code == 200 and ("replicas" in r.json()) == (key == "bitdelta-di"):
                    direct[key] = f"http://127.0.0.1:{port}" + (DENSE_PREFIX if key == "ray-di" else "")
        urls = direct
    _ready(urls)
    while True:
        time.sleep(3600)


def _wait_up(urls: dict[str, str], timeout_s: float = 300) -> dict[str, str]:
    import httpx

    deadline = time.monotonic() + timeout_s
    for name, url in urls.items():
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} at {url} did not come up")
            time.sleep(0.5)
    return urls


def _ready(urls: dict[str, str]) -> None:
    print("READY " + json.dumps(urls), flush=True)


# =============================================================================================
# orchestration: processes, CPU accounting
# =============================================================================================
class Server:
    """A server subprocess (its own process group) and the URLs it printed."""

    def __init__(self, argv: list[str], env: dict[str, str], timeout_s: float = 600):
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.served_overhead", *argv], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self.urls: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        for _ in range(100_000):
            line = self.proc.stdout.readline()
            if line.startswith("READY "):
                self.urls = json.loads(line[6:])
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"server {argv} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {argv} not ready in {timeout_s} s")

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) of every process of this server, by process group."""
        import psutil

        out: dict[str, float] = {}
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return out
        for p in procs:
            try:
                t = p.cpu_times()
                group = _group(" ".join(p.cmdline()) or p.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            out[group] = out.get(group, 0.0) + t.user + t.system
        return out

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _group(cmd: str) -> str:
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeReplica:dense" in cmd:
        return "replica:dense"
    if "ServeReplica:bitdelta" in cmd:
        return "replica:bitdelta"
    if "ServeController" in cmd:
        return "controller"
    if "raylet" in cmd or "gcs_server" in cmd:
        return "raylet+gcs"
    if "served_overhead" in cmd and "--role plain" in cmd:
        return "plain"
    return "other"


def _own_groups(system: str) -> set[str]:
    if system == "plain":
        return {"plain"}
    replica = "replica:dense" if system.startswith("ray") else "replica:bitdelta"
    return {replica, "proxy", "controller", "raylet+gcs", "other"}


def replica_times(url: str) -> dict[str, float]:
    """Sums and counts of the service's own timing histograms (all replicas), from /metrics."""
    import httpx

    want = ("bitdelta_request_latency_seconds", "bitdelta_forward_seconds", "bitdelta_queue_seconds",
            "bitdelta_batch_size")
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics?scope=all", timeout=30).text.splitlines():
        name, _, value = line.partition("{") if "{" in line else line.partition(" ")
        for w in want:
            for suffix in ("_sum", "_count"):
                if name == w + suffix:
                    out[w + suffix] = out.get(w + suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean ms per request in the replica, per forward (tokenize + run), of queueing, and rows per forward."""
    def d(k):
        return after.get(k, 0.0) - before.get(k, 0.0)

    def mean(metric, scale=1000.0):
        n = d(metric + "_count")
        return round(d(metric + "_sum") / n * scale, 2) if n else None

    return {"in_replica_ms": mean("bitdelta_request_latency_seconds"), "forward_ms": mean("bitdelta_forward_seconds"),
            "queue_ms": mean("bitdelta_queue_seconds"), "rows_per_forward": mean("bitdelta_batch_size", 1.0)}


# =============================================================================================
# load
# =============================================================================================
def _pct(lat: list[float], p: float) -> float | None:
    if not lat:
        return None
    s = sorted(lat)
    return round(s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))] * 1000, 1)


async def closed_loop(url: str, names: list[str], weights: list[float], texts: list[str], *, clients: int,
                      sentences: int, warmup_s: float, duration_s: float, seed: int, timeout_s: float = 30) -> dict:
    """``clients`` loops, each sending its next request when the previous one answered; counts
    the answers that arrive in ``duration_s`` after ``warmup_s`` (their latencies from sending).
    Bounded in time."""
    import httpx

    rng = random.Random(seed)
    lat: list[float] = []
    errors: dict[str, int] = {}
    ok = 0
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup_s, t_start + warmup_s + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        async def one(i: int) -> None:
            nonlocal ok
            k = i
            while time.perf_counter() < t_end:
                name = rng.choices(names, weights)[0]
                body = {"model": name, "inputs": [texts[(k + j) % len(texts)] for j in range(sentences)]}
                k += clients * sentences
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", json=body)
                    kind = None if r.status_code == 200 else f"http_{r.status_code}"
                except httpx.HTTPError as e:
                    kind = type(e).__name__
                t1 = time.perf_counter()
                if t_measure <= t1 <= t_end:  # answers in the window (a slow answer counts where it lands)
                    if kind is None:
                        ok += 1
                        lat.append(t1 - t0)
                    else:
                        errors[kind] = errors.get(kind, 0) + 1

        await asyncio.gather(*(one(i) for i in range(clients)))
    return {"ok": ok, "errors": sum(errors.values()), "error_kinds": errors, "rps": round(ok / duration_s, 1),
            "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99), "latencies": lat}


async def open_loop_point(url: str, names, weights, texts, *, rate: float, duration_s: float, seed: int) -> dict:
    from benchmarks.loadgen import open_loop

    def make(i, rng):
        return "/v1/classify", {"model": rng.choices(names, weights)[0], "inputs": [texts[i % len(texts)]]}, {}

    res = await open_loop(url, make, rate=rate, duration_s=duration_s, seed=seed,
                          max_requests=int(rate * duration_s * 2) + 20, timeout_s=30, drain_s=20)
    s = res.summary()
    return {"ok": s["ok"], "errors": s["errors"], "error_kinds": s["error_kinds"], "rps": s["throughput_rps"],
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}


# =============================================================================================
# preparation
# =============================================================================================
def prepare(cache: Path, T: int) -> dict[str, Any]:
    """MiniLM base, T tenants in a fresh store, and a dense checkpoint of tenant 0."""
    from benchmarks.engine_throughput import dense_model, make_tenants, minilm_path
    from serve.store import ArtifactStore

    base_path = minilm_path(cache)
    base, arts = make_tenants(base_path, T)
    dense_dir = cache / "overhead_dense_t0"
    m = dense_model(base, arts[0])
    m.config.id2label, m.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    m.save_pretrained(dense_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(base_path)).save_pretrained(dense_dir)
    store_dir = Path(tempfile.mkdtemp(prefix="overhead-store-", dir=cache))
    store = ArtifactStore(store_dir)
    names = [f"t{i:02d}" for i in range(T)]
    for name, a in zip(names, arts):
        store.put(name, a.to_bytes(), info={"num_labels": 2})
    return {"base": str(base_path), "dense": str(dense_dir), "store": str(store_dir), "names": names}


def _load(text: str) -> tuple[int, int]:
    """``"32x1"`` -> 32 clients, 1 sentence per request."""
    try:
        c, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxN (clients x sentences), e.g. 32x1; got {text!r}") from None
    if c < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"clients and sentences must be at least 1, got {text!r}")
    return c, n


def _tenant_set(text: str) -> tuple[int, str]:
    """``"16:zipf"`` -> 16 tenants in use, Zipf popularity."""
    T, _, law = text.partition(":")
    if not T.isdigit() or int(T) < 1 or law not in ("uniform", "zipf"):
        raise argparse.ArgumentTypeError(f"expected T:uniform or T:zipf with T >= 1, got {text!r}")
    return int(T), law


def tenant_sets(names: list[str], quick: bool) -> list[tuple[int, str]]:
    if quick:
        return [(16, "zipf")]
    return [(1, "uniform"), (16, "uniform"), (16, "zipf"), (64, "uniform"), (64, "zipf")]


def measure_slice(srv: "Server", url: str, system: str, names: list[str], law: str, load, texts: list[str],
                  args, seed: int) -> dict:
    """One server under one load for ``args.duration`` seconds: the client's figures, the CPU
    seconds of the server's processes and the load generator, the replica's timing sums."""
    from benchmarks.loadgen import popularity_weights

    weights = popularity_weights(len(names), law if law != "-" else "uniform")
    times0 = replica_times(url) if system.startswith("bitdelta") else None
    cpu0, own0 = srv.cpu(), time.process_time()
    if load == "open":
        res = asyncio.run(open_loop_point(url, names, weights, texts, rate=args.open_rate, duration_s=args.duration,
                                          seed=seed))
        res["load"], res["busy_s"] = f"open {args.open_rate:g}/s x1", args.duration
    else:
        c, n = load
        res = asyncio.run(closed_loop(url, names, weights, texts, clients=c, sentences=n, warmup_s=args.warmup,
                                      duration_s=args.duration, seed=seed))
        res["load"], res["busy_s"] = f"C={c} x{n}", args.duration + args.warmup
    cpu1, own1 = srv.cpu(), time.process_time()
    res["duration_s"] = args.duration
    res["cpu"] = {g: cpu1.get(g, 0.0) - cpu0.get(g, 0.0) for g in cpu1 if g in _own_groups(system)}
    res["loadgen_cpu"] = own1 - own0
    if times0 is not None:
        t1 = replica_times(url)
        res["times"] = {k: t1.get(k, 0.0) - times0.get(k, 0.0) for k in t1}
    return res


def merge_slices(system: str, tenants: str, slices: list[dict]) -> dict:
    """One row from a server's slices under one load: answers and time summed, latencies pooled
    (closed loop), the rate of every slice kept (``rounds_rps``) for paired ratios."""
    duration = sum(s["duration_s"] for s in slices)
    ok = sum(s["ok"] for s in slices)
    lat = [x for s in slices for x in s.get("latencies", [])]
    errors: dict[str, int] = {}
    for s in slices:
        for k, v in s["error_kinds"].items():
            errors[k] = errors.get(k, 0) + v
    row = {"load": slices[0]["load"], "system": system, "tenants": tenants, "ok": ok,
           "errors": sum(s["errors"] for s in slices), "error_kinds": errors, "rps": round(ok / duration, 1),
           "rounds_rps": [s["rps"] for s in slices]}
    if lat:
        row["p50_ms"], row["p99_ms"] = _pct(lat, 0.5), _pct(lat, 0.99)
    else:  # open loop: one slice, the generator's own percentiles
        row["p50_ms"], row["p99_ms"] = slices[0]["p50_ms"], slices[0]["p99_ms"]
    # CPU over the slices (warm-ups included) per request answered in them, scaled likewise
    answered = max(1.0, sum(s["rps"] * s["busy_s"] for s in slices))
    cpu: dict[str, float] = {}
    for s in slices:
        for g, v in s["cpu"].items():
            cpu[g] = cpu.get(g, 0.0) + v
    row["cpu_ms_per_req"] = round(sum(cpu.values()) / answered * 1000, 2)
    row["cpu_ms_per_req_by"] = {g: round(v / answered * 1000, 2) for g, v in cpu.items()}
    row["loadgen_cpu_ms_per_req"] = round(sum(s["loadgen_cpu"] for s in slices) / answered * 1000, 2)
    if "times" in slices[0]:
        total: dict[str, float] = {}
        for s in slices:
            for k, v in s["times"].items():
                total[k] = total.get(k, 0.0) + v
        row["replica"] = breakdown({}, total)
    return row


# =============================================================================================
# report
# =============================================================================================
def markdown(rows: list[dict], meta: dict) -> str:
    md = [f"MiniLM-L6 fp32, {meta['machine']}; torch threads per server: {meta['threads']}; closed loop "
          f"{meta.get('rounds', 1)} round(s) of {meta['duration']} s per server after {meta['warmup']} s warm-up; "
          f"open loop {meta['open_rate']} req/s Poisson for {meta['duration']} s. Servers on 127.0.0.1, all up at "
          "once, points interleaved. Batcher refill hold: the service "
          f"{meta.get('service_refill_ms', 0)} ms, the dense servers {meta.get('dense_refill_ms', 0)} ms. "
          "CPU ms/req: CPU time of the server's own processes (and of the load generator) per answered request.", "",
          "| load | system | tenants | req/s | p50 ms | p99 ms | errors | server CPU ms/req | by process | loadgen CPU ms/req |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by = ", ".join(f"{k} {v}" for k, v in sorted(r.get("cpu_ms_per_req_by", {}).items()) if v >= 0.05)
        md.append(f"| {r['load']} | {LABELS[r['system']]} | {r['tenants']} | {r['rps']} | {r['p50_ms']} | "
                  f"{r['p99_ms']} | {r['errors']} | {r.get('cpu_ms_per_req')} | {by} | {r.get('loadgen_cpu_ms_per_req')} |")
    md += ["", "Where a request's time goes in the service (means over the point, from the replicas' own "
           "histograms): in replica = from the route's entry to its answer; forward = one round of batched "
           "tokenization + forward; queue = the oldest request's wait for its batch; the rest of the client's "
           "latency is proxy, HTTP and JSON.", "",
           "| load | system | tenants | client p50 ms | in replica ms | forward ms | queue ms | rows/forward |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.get("replica")
        if b:
            md.append(f"| {r['load']} | {LABELS[r['system']]} | {r['tenants']} | {r['p50_ms']} | {b['in_replica_ms']} | "
                      f"{b['forward_ms']} | {b['queue_ms']} | {b['rows_per_forward']} |")
    md += ["", "Ratios (same run): this service with 16 Zipf tenants against the dense-model servers, one sentence "
           "per request. Per round: the same ratio within each round of the closed loop (every server measured "
           "once per round, in turn).", "",
           "| load | (c) ÷ best of (b), (b') | (c') ÷ best of (b), (b') | (c') ÷ best of (b), (b') per round | "
           "(c) ÷ (a) | (c') ÷ (a) | p50 (c) ÷ (a) | p50 (c') ÷ (a) |", "|---|---|---|---|---|---|---|---|"]
    for load, v in summary(rows).items():
        per = " / ".join(str(x) for x in v.get("c_di/b rounds", [])) or "-"
        md.append(f"| {load} | {v.get('c/b')} | {v.get('c_di/b')} | {per} | {v.get('c/a')} | {v.get('c_di/a')} | "
                  f"{v.get('p50 c/a')} | {v.get('p50 c_di/a')} |")
    return "\n".join(md) + "\n"


def summary(rows: list[dict], tenants: str = "16 zipf") -> dict[str, dict]:
    """Per one-sentence load: the service (16 Zipf tenants) over the best dense Ray Serve app and
    over the plain server, from the whole run (``c/b`` ...) and round by round (``c/b rounds``:
    each round's servers were measured minutes apart at most, so their ratio is paired)."""
    out: dict[str, dict] = {}
    loads = sorted({r["load"] for r in rows if r["load"].endswith("x1")}, key=lambda s: (len(s), s))
    for load in loads:
        by = {r["system"]: r for r in rows if r["load"] == load and r["tenants"] in ("-", tenants)}
        if not all(k in by for k in ("plain", "ray")):
            continue
        best_b = max(by["ray"]["rps"], by.get("ray-di", {"rps": 0})["rps"]) or float("nan")
        v: dict[str, Any] = {}
        for key, sys_ in (("c", "bitdelta"), ("c_di", "bitdelta-di")):
            if sys_ in by:
                v[f"{key}/b"] = round(by[sys_]["rps"] / best_b, 2)
                v[f"{key}/a"] = round(by[sys_]["rps"] / by["plain"]["rps"], 2) if by["plain"]["rps"] else None
                if by[sys_]["p50_ms"] and by["plain"]["p50_ms"]:
                    v[f"p50 {key}/a"] = round(by[sys_]["p50_ms"] / by["plain"]["p50_ms"], 2)
                rounds = zip(by[sys_].get("rounds_rps", []), by["ray"].get("rounds_rps", []),
                             by.get("ray-di", {}).get("rounds_rps", []) or [0.0] * len(by["ray"].get("rounds_rps", [])))
                per = [round(c / max(b, bd), 2) for c, b, bd in rounds if max(b, bd) > 0]
                if len(per) > 1:
                    v[f"{key}/b rounds"] = per
        out[load] = v
    return out


def plot(rows: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"plain": "tab:gray", "ray": "tab:orange", "ray-di": "tab:red", "bitdelta": "tab:blue",
              "bitdelta-di": "tab:cyan"}
    for ax, sentences in zip(axes, (1, 8)):
        for system in SYSTEMS:
            pts = sorted(((int(r["load"].split("C=")[1].split("x")[0]), r["rps"]) for r in rows
                          if r["system"] == system and r["load"].startswith("C=") and r["load"].endswith(f"x{sentences}")
                          and r["tenants"] in ("-", "16 zipf")))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[system], label=LABELS[system])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{sentences} sentence{'s' if sentences > 1 else ''} per request (service: 16 Zipf tenants)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# =============================================================================================
# main
# =============================================================================================
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: few short points")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each slice")
    p.add_argument("--rounds", type=int, default=3,
                   help="closed loop: every server measured this many times per load, in turn (--duration each)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every server")
    p.add_argument("--open-rate", type=float, default=40.0, help="open-loop point: Poisson req/s")
    p.add_argument("--tenants", type=int, default=64, help="fine-tunes registered in the service")
    p.add_argument("--out", default=None, help="results name (default served_overhead[_quick])")
    p.add_argument("--loads", nargs="+", type=_load, metavar="CxN",
                   help="closed-loop points: C clients, N sentences per request (default 1x1 8x1 32x1 1x8 8x8 32x8)")
    p.add_argument("--sets", nargs="+", type=_tenant_set, metavar="T:LAW",
                   help="the service's tenant mixes, e.g. 16:zipf 1:uniform (default: 1, 16, 64 tenants, uniform and Zipf)")
    p.add_argument("--no-open", action="store_true", help="skip the open-loop point")
    p.add_argument("--refill-ms", type=float, default=None,
                   help="the service's refill_wait_ms (default: the service's default)")
    p.add_argument("--dense-refill-ms", type=float, default=0.0,
                   help="the same refill hold in the dense servers' batcher (default 0: a forward starts the moment "
                        "the model is free, as the baselines are defined)")
    # server roles (internal: the orchestrator starts these as subprocesses)
    p.add_argument("--role", choices=["plain", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--di-port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sets and max(T for T, _ in args.sets) > args.tenants:
        p.error(f"--sets uses up to {max(T for T, _ in args.sets)} tenants but only --tenants {args.tenants} are registered")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would load the generator
    if args.role == "plain":
        run_plain(args)
        return {}
    if args.role == "ray":
        run_ray(args)
        return {}

    from benchmarks.loadgen import sample_texts

    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.quick:
        args.duration, args.warmup, args.rounds = min(args.duration, 3.0), min(args.warmup, 1.0), 1
        args.tenants = min(args.tenants, 16)
    cache = RESULTS / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    prep = prepare(cache, args.tenants)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    common = ["--model", prep["dense"], "--base", prep["base"], "--store", prep["store"], "--threads", str(args.threads),
              "--dense-refill-ms", str(args.dense_refill_ms)] + ([] if args.refill_ms is None else ["--refill-ms", str(args.refill_ms)])
    servers: list[Server] = []
    urls: dict[str, str] = {}
    owner: dict[str, Server] = {}
    try:
        t0 = time.perf_counter()
        specs = [(["--role", "plain", "--port", str(free_local_port())], {}),
                 (["--role", "ray", "--port", str(free_local_port())], {})]
        if not args.quick:
            di = 32000 + random.Random(os.getpid()).randrange(0, 900)
            specs.append((["--role", "ray", "--direct", "--port", str(free_local_port()), "--di-port", str(di)],
                          {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(di),
                           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(di + 20),
                           "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(di + 1000),
                           "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(di + 1020)}))
        for argv_, extra in specs:  # one at a time: two Ray instances starting at once on 2 cores time out
            s = Server(argv_ + common, {**env, **extra})
            servers.append(s)
            for k, u in s.urls.items():
                urls[k], owner[k] = u, s
        log.info("servers up in %.0f s: %s", time.perf_counter() - t0, urls)
        texts = sample_texts(512)
        loads = args.loads or [(c, n) for n in (1, 8) for c in (1, 8, 32)]
        if args.quick:
            loads = [(1, 1), (8, 1)]
        sets = args.sets or tenant_sets(prep["names"], args.quick)
        points = [(system, T, law) for system in SYSTEMS if system in urls
                  for T, law in (sets if system.startswith("bitdelta") else [(1, "-")])]
        rows: list[dict] = []
        seed = 0
        for load in loads + ([] if args.no_open else ["open"]):
            # closed loop: every server once per round, in turn, so each round's figures are taken
            # minutes apart at most and compare servers under the same machine conditions
            rounds = 1 if load == "open" else args.rounds
            slices: dict[tuple, list[dict]] = {pt: [] for pt in points}
            for rnd in range(rounds):
                for system, T, law in points:
                    seed += 1
                    sl = measure_slice(owner[system], urls[system], system, prep["names"][:T], law, load, texts,
                                       args, seed)
                    slices[(system, T, law)].append(sl)
                    log.info("%-10s %-12s %-10s round %d/%d: %6.1f req/s p50 %s ms", sl["load"], system,
                             "-" if law == "-" else f"{T} {law}", rnd + 1, rounds, sl["rps"], sl["p50_ms"])
            for (system, T, law), sls in slices.items():
                row = merge_slices(system, "-" if law == "-" else f"{T} {law}", sls)
                rows.append(row)
                log.info("%-10s %-12s %-10s %6.1f req/s p50 %s p99 %s ms, cpu %.1f ms/req, errors %d", row["load"],
                         system, row["tenants"], row["rps"], row["p50_ms"], row["p99_ms"], row["cpu_ms_per_req"],
                         row["errors"])
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(prep["store"], ignore_errors=True)  # a fresh store per run (prepare)
    from serve.config import ServeConfig

    meta = {"machine": f"{os.cpu_count()} CPU cores", "threads": args.threads, "duration": args.duration,
            "rounds": args.rounds,
            "service_refill_ms": ServeConfig.model_fields["refill_wait_ms"].default if args.refill_ms is None
            else args.refill_ms, "dense_refill_ms": args.dense_refill_ms,
            "warmup": args.warmup, "open_rate": args.open_rate, "registered_tenants": args.tenants,
            "quick": args.quick}
    name = args.out or ("served_overhead_quick" if args.quick else "served_overhead")
    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary(rows)}, indent=1))
    (out_dir / f"{name}.md").write_text(markdown(rows, meta))
    plot(rows, out_dir / f"{name}.png")
    out = {"summary": summary(rows), "rows": rows, "results": str(out_dir / f"{name}.md")}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
