"""Served throughput and latency of the Ray Serve app against Ray's own model multiplexing.

Everything runs on 127.0.0.1 in one local Ray instance (started by the service's own runner,
``serve.run.start``), one system at a time:

  bitdelta   the service (``serve/``: one deployment whose replica is the HTTP ingress and the engine,
             one MiniLM-L6 base and T packed deltas registered through ``POST /v1/models``);
  mux        the baseline a Ray user would write: one replica of T full fine-tuned checkpoints on
             local disk behind ``@serve.multiplexed(max_num_models_per_replica=K)`` (LRU), the model
             chosen by the ``serve_multiplexed_model_id`` header, ``@serve.batch`` (batches are
             split per model by Serve). K = as many full fp32 models as fit in the bitdelta
             replica's model memory (base + pool + working-weight cache budget), at least 1;
  single     the same deployment with one full model serving one tenant (the upper bound: no
             multi-tenancy at all).

For T in 4, 16, 64 tenants (derived from one real compressed fine-tune by perturbation,
``engine_throughput.make_tenants``), popularity uniform or Zipf(1.0), an open-loop Poisson load
(``benchmarks.loadgen``) at several rates, each for a bounded time, one sentence per request.
All systems stay deployed side by side and the measurement points alternate between them (this
2-core machine is shared; a burst of other work then hits every system alike). They all batch
(max 32 rows, 5 ms wait) and run torch with the same thread count.

    python -m benchmarks.served_load            # full run (~13 min on 2 cores)
    python -m benchmarks.served_load --quick    # smoke run: T = 4, one rate, a few seconds each
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import open_loop, popularity_weights, sample_texts, wait_idle

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.served_load")
ADMIN = "bench-admin-token"
MUX_APP = "fullmux"
SINGLE_APP = "single"


# =============================================================================================
# baseline: full fine-tuned models behind Ray Serve model multiplexing
# =============================================================================================
def load_full_model(path: Path, cold: bool):
    """``from_pretrained`` of a full fine-tuned checkpoint.

    ``cold``: first drop the checkpoint file from the OS page cache (``POSIX_FADV_DONTNEED``) and
    copy the weights out of the (lazily mmap-ed) file into the process's own memory. Without this,
    transformers maps the safetensors file and every "load" of a model evicted by the LRU is served
    from the page cache, i.e. all T checkpoints silently stay in RAM (T x 91 MB outside the
    replica's RSS): not an equal-memory comparison.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if cold:
        for f in path.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    if cold:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.data = t.data.clone()
    return model.eval()


def mux_app(model_dir: str, base: str, max_models: int, torch_threads: int, max_batch_size: int = 32,
            batch_wait_s: float = 0.005, num_cpus: float = 0.5, cold: bool = True):
    """A Ray Serve app: POST {"model", "inputs"} with header ``serve_multiplexed_model_id``."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name="FullModelMux", ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=256,
                      graceful_shutdown_timeout_s=5)
    class FullModelMux:
        def __init__(self):
            import torch
            from transformers import AutoTokenizer

            torch.set_num_threads(torch_threads)
            self.tokenizer = AutoTokenizer.from_pretrained(base)
            self.loads = 0
            self.load_s = 0.0

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            path = Path(model_dir) / model_id
            if not (path / "config.json").exists():
                raise KeyError(model_id)
            t0 = time.perf_counter()
            model = await asyncio.to_thread(load_full_model, path, cold)
            self.loads += 1
            self.load_s += time.perf_counter() - t0
            return model

        def _forward(self, model, texts: list[str]) -> list[dict]:
            import torch

            enc = self.tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
            with torch.inference_mode():
                probs = torch.softmax(model(**enc).logits.float(), -1)
            top = probs.argmax(-1)
            id2label = model.config.id2label
            return [{"label": id2label[int(k)], "score": float(probs[i, k])} for i, k in enumerate(top)]

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def _batched(self, texts: list[str]) -> list[dict]:
            model = await self.get_model(serve.get_multiplexed_model_id())  # one model per batch
            return await asyncio.to_thread(self._forward, model, texts)

        async def __call__(self, request: Request):
            if request.url.path.rstrip("/").endswith("/stats"):
                return JSONResponse({"rss_bytes": _rss_bytes(), "loads": self.loads, "load_s": round(self.load_s, 2)})
            body = await request.json()
            if body.get("model") != serve.get_multiplexed_model_id():
                return JSONResponse({"error": "header/model mismatch"}, status_code=400)
            try:
                pred = await self._batched(body["inputs"][0])
            except KeyError as e:
                return JSONResponse({"error": f"unknown model {e}"}, status_code=404)
            return JSONResponse({"model": body["model"], "predictions": [pred]})

    return FullModelMux.bind()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# =============================================================================================
# preparation
# =============================================================================================
def prepare(cache: Path, T: int, need_full: int) -> dict[str, Any]:
    """Tenant artifacts (bytes) and ``need_full`` full fine-tuned checkpoints on disk."""
    from benchmarks.engine_throughput import dense_model, make_tenants, minilm_path

    base_path = minilm_path(cache)
    base, arts = make_tenants(base_path, T)
    full_dir = cache / "served_full_models"
    full_dir.mkdir(parents=True, exist_ok=True)
    for i in range(need_full):
        out = full_dir / f"t{i}"
        stamp = out / "BENCH_STAMP"
        if stamp.exists() and stamp.read_text() == str(base_path):
            continue
        m = dense_model(base, arts[i])
        m.config.id2label, m.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
        m.save_pretrained(out)
        stamp.write_text(str(base_path))
        del m
    full_bytes = sum(t.numel() * t.element_size() for t in base.module.state_dict().values())
    data = [a.to_bytes() for a in arts]
    del base, arts
    gc.collect()
    return {"base": base_path, "arts": data, "full_dir": full_dir, "full_model_bytes": full_bytes}


def register_all(url: str, arts: list[bytes], names: list[str], timeout_s: float = 120.0) -> float:
    """Register through the HTTP API (multipart upload); returns seconds taken."""
    import httpx

    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=timeout_s) as c:
        for name, data in zip(names, arts):
            r = c.post("/v1/models", data={"name": name, "replace": "true"},
                       files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
                       headers={"Authorization": f"Bearer {ADMIN}"})
            if r.status_code != 201:
                raise RuntimeError(f"registering {name}: HTTP {r.status_code} {r.text[:300]}")
    return time.perf_counter() - t0


GAUGES = ("replica_rss_bytes", "pool_bytes", "cache_bytes", "base_bytes", "cache_budget_bytes", "models")


def metrics_gauges(url: str, names: tuple[str, ...] = GAUGES) -> dict[str, float]:
    """Engine replica metrics from /metrics whose name ends with one of ``names`` (max over replicas)."""
    import httpx

    out: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics?scope=all", timeout=60).text
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, _, val = line.rpartition(" ")
        name = key.split("{")[0]
        for g in names:
            if name.endswith(g) and "ingress" not in key:
                try:
                    out[g] = max(out.get(g, 0.0), float(val))
                except ValueError:
                    pass
    return out


# =============================================================================================
# one load run
# =============================================================================================
def drive(url: str, system: str, names: list[str], law: str, rate: float, args, texts: list[str], seed: int) -> dict:
    weights = popularity_weights(len(names), law)
    path = {"bitdelta": "/v1/classify", "mux": f"/{MUX_APP}", "single": f"/{SINGLE_APP}"}[system]

    def make(i: int, rng: random.Random):
        name = rng.choices(names, weights)[0]
        body = {"model": name, "inputs": [texts[i % len(texts)]]}
        headers = {} if system == "bitdelta" else {"serve_multiplexed_model_id": name}
        return path, body, headers

    res = asyncio.run(open_loop(url, make, rate=rate, duration_s=args.duration, seed=seed,
                                max_requests=int(rate * args.duration * 3) + 20, timeout_s=args.timeout,
                                drain_s=args.drain))
    return res.summary()


def quiesce(url: str, system: str, name: str) -> bool:
    """Wait (bounded) until the server answers one request within 2 s (its backlog is gone)."""
    import httpx

    path = {"bitdelta": "/v1/classify", "mux": f"/{MUX_APP}", "single": f"/{SINGLE_APP}"}[system]
    headers = {} if system == "bitdelta" else {"serve_multiplexed_model_id": name}

    def probe():
        t0 = time.perf_counter()
        r = httpx.post(f"{url}{path}", json={"model": name, "inputs": ["warm up"]}, headers=headers, timeout=10)
        return r.status_code == 200 and time.perf_counter() - t0 < 2.0

    return wait_idle(probe, timeout_s=90.0)


# =============================================================================================
# report
# =============================================================================================
def capacity(rows: list[dict], system: str, T: int, law: str) -> dict | None:
    """The run with the highest throughput for a (system, T, law)."""
    rs = [r for r in rows if r["system"] == system and r["tenants"] == T and r["law"] == law and "throughput_rps" in r]
    return max(rs, key=lambda r: r["throughput_rps"]) if rs else None


def plot(rows: list[dict], tenants: list[int], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    laws = ["uniform", "zipf"]
    fig, axes = plt.subplots(2, len(tenants), figsize=(4.6 * len(tenants), 7.6), squeeze=False)
    style = {"bitdelta": ("tab:blue", "o-"), "mux": ("tab:red", "s--"), "single": ("tab:gray", "^:")}
    for c, T in enumerate(tenants):
        for law in laws:
            for system in ("bitdelta", "mux"):
                rs = [r for r in rows if r["system"] == system and r["tenants"] == T and r["law"] == law
                      and "throughput_rps" in r]
                if not rs:
                    continue
                color, ls = style[system]
                lw = 2 if law == "zipf" else 1
                label = f"{system} ({law})" + (f", K={rs[0].get('K')}" if system == "mux" else "")
                x = [r["offered_rps"] for r in rs]
                axes[0][c].plot(x, [r["throughput_rps"] for r in rs], ls, color=color, lw=lw,
                                alpha=1 if law == "zipf" else 0.5, label=label)
                axes[1][c].plot(x, [r["p99_ms"] or float("nan") for r in rs], ls, color=color, lw=lw,
                                alpha=1 if law == "zipf" else 0.5, label=label)
        rs = [r for r in rows if r["system"] == "single" and "throughput_rps" in r]
        if rs:
            color, ls = style["single"]
            axes[0][c].plot([r["offered_rps"] for r in rs], [r["throughput_rps"] for r in rs], ls, color=color,
                            label="single full model, 1 tenant")
            axes[1][c].plot([r["offered_rps"] for r in rs], [r["p99_ms"] or float("nan") for r in rs], ls,
                            color=color, label="single full model, 1 tenant")
        axes[0][c].set_title(f"T = {T} tenants")
        axes[0][c].set_ylabel("throughput (ok req/s)")
        axes[1][c].set_ylabel("p99 latency (ms)")
        axes[1][c].set_yscale("log")
        for r in (0, 1):
            axes[r][c].set_xlabel("offered load (req/s, Poisson)")
            axes[r][c].grid(True, alpha=0.3)
        axes[0][c].legend(fontsize=7)
    fig.suptitle("MiniLM-L6, 2 shared CPU cores, Ray Serve on 127.0.0.1:\nbitdelta vs @serve.multiplexed full models",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], tenants: list[int], meta: dict) -> str:
    md = [f"MiniLM-L6 fp32, {meta['machine']}; torch threads per replica: {meta['torch_threads']}; "
          f"{meta['duration']} s of Poisson arrivals per point, 1 sentence per request; request timeout "
          f"{meta['timeout']} s. K = full models the multiplexing replica may hold (equal model memory). Baseline "
          f"checkpoint loads: " + ("cold (file dropped from the page cache, weights copied into the replica's memory)"
                                   if meta.get("mux_cold", True) else "warm (every checkpoint stays in the OS page cache: "
                                   "NOT equal memory)") + ".", "",
          "| system | T | law | K | offered req/s | throughput ok/s | p50 ms | p95 ms | p99 ms | errors (sent) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "throughput_rps" not in r:
            md.append(f"| {r['system']} | {r['tenants']} | {r['law']} | {r.get('K', '–')} | {r['offered_rps']} | "
                      f"{r['skipped']} | | | | |")
            continue
        md.append(f"| {r['system']} | {r['tenants']} | {r['law']} | {r.get('K', '–')} | {r['offered_rps']} | "
                  f"{r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                  f"{r['errors']} ({r['sent']}) |")
    md += ["", "Capacity (best throughput over the offered rates) and the ratio bitdelta ÷ multiplexing:", "",
           "| T | law | bitdelta ok/s (p99 ms) | mux ok/s (p99 ms) | K | single-model ok/s | bitdelta ÷ mux |",
           "|---|---|---|---|---|---|---|"]
    single = capacity(rows, "single", 1, "uniform")
    for T in tenants:
        for law in ("uniform", "zipf"):
            b, m = capacity(rows, "bitdelta", T, law), capacity(rows, "mux", T, law)
            if not b:
                continue
            ratio = round(b["throughput_rps"] / m["throughput_rps"], 2) if m and m["throughput_rps"] else "–"
            md.append(f"| {T} | {law} | {b['throughput_rps']} ({b['p99_ms']}) | "
                      f"{m['throughput_rps'] if m else '–'} ({m['p99_ms'] if m else '–'}) | {m.get('K') if m else '–'} | "
                      f"{single['throughput_rps'] if single else '–'} | {ratio} |")
    mem = meta.get("memory", {})
    if mem:
        md += ["", "Memory (replica resident set, MB = 10^6 B):", "",
               "| T | bitdelta replica RSS | base + pool + cache budget | mux replica RSS (K models loaded) |",
               "|---|---|---|---|"]
        for T, v in sorted(mem.items(), key=lambda kv: int(kv[0])):
            md.append(f"| {T} | {v.get('bitdelta_rss', 0) / 1e6:,.0f} | {v.get('bitdelta_model_budget', 0) / 1e6:,.0f} | "
                      f"{v.get('mux_rss', 0) / 1e6:,.0f} (K={v.get('K')}) |")
    return "\n".join(md) + "\n"


# =============================================================================================
# main
# =============================================================================================
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: T=4, one rate, 4 s per point")
    ap.add_argument("--tenants", nargs="+", type=int, default=[4, 16, 64])
    ap.add_argument("--laws", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"])
    ap.add_argument("--rates", nargs="+", type=float, default=[5, 10, 20, 40], help="offered req/s")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per point")
    ap.add_argument("--timeout", type=float, default=15.0, help="per-request timeout (s)")
    ap.add_argument("--drain", type=float, default=10.0, help="extra seconds for outstanding requests")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--cache-mb", type=int, default=256, help="bitdelta working-weight cache budget (MiB)")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    ap.add_argument("--mux-cold", action=argparse.BooleanOptionalAction, default=True,
                    help="baseline loads read the checkpoint from disk into process memory (equal memory); "
                         "--no-mux-cold lets the OS page cache keep every checkpoint (all T models in RAM)")
    ap.add_argument("--systems", nargs="+", default=["bitdelta", "mux", "single"], choices=["bitdelta", "mux", "single"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.quick:
        args.tenants, args.laws, args.rates, args.duration, args.drain = [4], ["zipf"], [8], 4.0, 5.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import shutil

    from ray import serve

    from serve import run as serve_run
    from serve.config import ServeConfig

    if not args.port:
        args.port = serve_run.free_local_port()
    cache = RESULTS / "cache"
    Tmax = max(args.tenants)
    need_full = Tmax if "mux" in args.systems else 1
    prep = prepare(cache, Tmax, need_full)
    names = [f"t{i}" for i in range(Tmax)]
    texts = sample_texts()
    store = cache / "served_store"
    shutil.rmtree(store, ignore_errors=True)
    cfg = ServeConfig(base=str(prep["base"]), store=str(store), admin_token=ADMIN, host="127.0.0.1", port=args.port,
                      cache_bytes=args.cache_mb << 20, torch_threads=args.torch_threads, max_upload_bytes=64 << 20,
                      max_batch_size=32, max_wait_ms=5.0, replica_num_cpus=0.5)
    rows: list[dict] = []
    memory: dict[str, dict] = {}
    meta = {"mux_cold": args.mux_cold, "machine": f"{os.cpu_count()} CPU cores (shared with other jobs), CPU only", "torch_threads": args.torch_threads,
            "duration": args.duration, "timeout": args.timeout, "rates": args.rates, "cache_mb": args.cache_mb}
    t_start = time.perf_counter()
    url = serve_run.start(cfg, ray_num_cpus=2, wait_s=300)
    saturated: dict[tuple, float] = {}  # (system, T, law) -> rate at which it fell over

    def point(system: str, T: int, law: str, j: int, rate: float, extra: dict) -> dict:
        row = {"system": system, "tenants": T, "law": law, "offered_rps": rate, **extra}
        key = (system, T, law)
        if key in saturated:
            return {**row, "skipped": f"saturated at {saturated[key]} req/s"}
        tnames = names[:T]
        idle = quiesce(url, system, tnames[0])
        res = drive(url, system, tnames, law, rate, args, texts, seed=1000 * T + 10 * j + (law == "zipf"))
        row.update(res, idle_before=idle)
        log.info("%s T=%d %s %.0f req/s: %.1f ok/s p50 %s p99 %s ms, %d errors", system, T, law, rate,
                 res["throughput_rps"], res["p50_ms"], res["p99_ms"], res["errors"])
        if res["error_rate"] and res["error_rate"] > 0.3:
            saturated[key] = rate
        return row

    try:
        # every system stays deployed; the points alternate between them, so that load from other
        # jobs on this shared machine hits all of them alike
        if "single" in args.systems:
            serve.run(mux_app(str(prep["full_dir"]), str(prep["base"]), 1, args.torch_threads, cold=args.mux_cold),
                      name=SINGLE_APP, route_prefix=f"/{SINGLE_APP}", blocking=False)
        done = 0
        for ti, T in enumerate(sorted(args.tenants)):
            reg_s = register_all(url, prep["arts"][done:T], names[done:T])
            log.info("registered %d tenants over HTTP in %.1f s", T - done, reg_s)
            done = T
            g = metrics_gauges(url)
            budget = g.get("base_bytes", 0) + g.get("pool_bytes", 0) + g.get("cache_budget_bytes", 0)
            K = max(1, int(budget // prep["full_model_bytes"]))
            memory[str(T)] = {"bitdelta_model_budget": budget, "pool_bytes": g.get("pool_bytes"), "K": K,
                              "registration_s": round(reg_s, 2)}
            if "mux" in args.systems:
                serve.run(mux_app(str(prep["full_dir"]), str(prep["base"]), K, args.torch_threads, cold=args.mux_cold),
                          name=MUX_APP, route_prefix=f"/{MUX_APP}", blocking=False)
            for law in args.laws:
                for j, rate in enumerate(args.rates):
                    if "bitdelta" in args.systems:
                        rows.append(point("bitdelta", T, law, j, rate, {}))
                    if "mux" in args.systems:
                        rows.append(point("mux", T, law, j, rate, {"K": K}))
                    if "single" in args.systems and ti == 0 and law == args.laws[0]:
                        rows.append(point("single", 1, "uniform", j, rate, {"K": 1}))
            g = metrics_gauges(url)
            memory[str(T)].update(bitdelta_rss=g.get("replica_rss_bytes", 0), cache_bytes_used=g.get("cache_bytes"))
            if "mux" in args.systems:
                import httpx

                st = httpx.get(f"{url}/{MUX_APP}/stats", timeout=30).json()
                memory[str(T)].update(mux_rss=st["rss_bytes"], mux_loads=st["loads"], mux_load_s=st["load_s"])
                serve.delete(MUX_APP)
    finally:
        serve_run.stop()
    meta["memory"] = memory
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)

    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "served_load" + ("_quick" if args.quick else "")
    plot(rows, sorted(args.tenants), out_dir / f"{name}.png")
    md = markdown(rows, sorted(args.tenants), meta)
    (out_dir / f"{name}.md").write_text(md)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(md)
    cap = {}
    for T in sorted(args.tenants):
        for law in args.laws:
            b, m = capacity(rows, "bitdelta", T, law), capacity(rows, "mux", T, law)
            if b:
                cap[f"T{T}_{law}"] = {
                    "bitdelta_rps": b["throughput_rps"], "bitdelta_p99_ms": b["p99_ms"],
                    "mux_rps": m["throughput_rps"] if m else None, "mux_p99_ms": m["p99_ms"] if m else None,
                    "K": m.get("K") if m else None,
                    "ratio": round(b["throughput_rps"] / m["throughput_rps"], 2) if m and m["throughput_rps"] else None}
    single = capacity(rows, "single", 1, "uniform")
    summary = {"benchmark": "served_load", "quick": args.quick, "machine": meta["machine"],
               "capacity": cap, "single_rps": single["throughput_rps"] if single else None,
               "errors": sum(r.get("errors", 0) for r in rows), "wall_s": meta["wall_s"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
