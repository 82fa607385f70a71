"""1,000 fine-tunes of MiniLM-L6 served from ONE engine replica on this machine.

Full fp32 copies would need 1,000 x 91 MB = 91 GB; the replica holds one base and 1,000 packed
deltas. Steps, all over HTTP on 127.0.0.1 against the service started by its own runner
(``serve.run.start``):

1. register the first 16 tenants, drive an open-loop Poisson load spread uniformly over them;
2. register the other 984 (timed: total and per-registration percentiles), read the replica's
   resident memory from ``/metrics``, drive the SAME load (rate, duration, texts) spread
   uniformly over all 1,000 tenants; compare p50/p99 with step 1;
3. stop Ray Serve and start the service again on the same store: the restart (store restore:
   every artifact re-read, checksum-verified and registered) is timed until ``/healthz`` answers
   with 1,000 models; check that ``GET /v1/models`` lists them all and one classify works.

Tenants are perturbations of one real compressed fine-tune (``engine_throughput.make_tenants``),
uploaded as ordinary artifacts.

    python -m benchmarks.scale_1000            # full run (~8 min on 2 cores)
    python -m benchmarks.scale_1000 --quick    # smoke run: 40 tenants vs 4, a few seconds of load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.loadgen import open_loop, sample_texts
from benchmarks.served_load import ADMIN, RESULTS, metrics_gauges

log = logging.getLogger("benchmarks.scale_1000")


def register(url: str, arts: list[bytes], names: list[str]) -> list[float]:
    """Register over HTTP one by one; per-registration seconds."""
    import httpx
    from tqdm import tqdm

    times = []
    with httpx.Client(base_url=url, timeout=120.0) as c:
        for name, data in tqdm(list(zip(names, arts)), desc="register", unit="model", mininterval=10):
            t0 = time.perf_counter()
            r = c.post("/v1/models", data={"name": name},
                       files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
                       headers={"Authorization": f"Bearer {ADMIN}"})
            if r.status_code != 201:
                raise RuntimeError(f"registering {name}: HTTP {r.status_code} {r.text[:300]}")
            times.append(time.perf_counter() - t0)
    return times


def load(url: str, names: list[str], args, texts: list[str], seed: int) -> dict:
    def make(i: int, rng: random.Random):
        return "/v1/classify", {"model": rng.choice(names), "inputs": [texts[i % len(texts)]]}, {}

    # the registrations just wrote up to ~2 GB into the store: flush it now, so that the kernel's
    # background writeback does not land inside one load point and not the other
    if hasattr(os, "sync"):
        os.sync()
    # warm-up outside the measurement (first-request costs), bounded
    asyncio.run(open_loop(url, make, rate=args.rate, duration_s=min(3.0, args.duration), seed=seed + 1,
                          max_requests=50, timeout_s=args.timeout, drain_s=5))
    res = asyncio.run(open_loop(url, make, rate=args.rate, duration_s=args.duration, seed=seed,
                                max_requests=int(args.rate * args.duration * 3) + 20, timeout_s=args.timeout,
                                drain_s=args.drain))
    return {"tenants": len(names), **res.summary()}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p * len(xs) + 0.5)) - 1))]


def plot(out: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small, big = out["load_small"], out["load_all"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    qs = ["p50_ms", "p95_ms", "p99_ms"]
    x = range(len(qs))
    a.bar([i - 0.2 for i in x], [small[q] or 0 for q in qs], 0.4, label=f"{small['tenants']} tenants")
    a.bar([i + 0.2 for i in x], [big[q] or 0 for q in qs], 0.4, label=f"{big['tenants']} tenants")
    a.set_xticks(list(x), ["p50", "p95", "p99"])
    a.set_ylabel("latency (ms)")
    a.set_title(f"same load: Poisson {out['rate']} req/s, uniform over tenants")
    a.legend()
    rss = out["memory_after_load"].get("replica_rss_bytes", 0) / 1e9
    b.bar(["bitdelta replica\n(RSS, measured)", "full fp32 models\n(#params x 4 B x N)"],
          [rss, out["checks"]["full_models_would_need_gb"]], color=["tab:blue", "tab:red"])
    b.axhline(8, color="k", ls=":", lw=1, label="8 GB target")
    b.set_yscale("log")
    b.set_ylim(0.5, 200)
    b.set_ylabel("GB")
    b.set_title(f"{out['tenants']} fine-tunes of MiniLM-L6")
    b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 tenants vs 4")
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--small", type=int, default=16, help="the comparison point")
    ap.add_argument("--rate", type=float, default=8.0, help="offered req/s (Poisson), same for both runs")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--drain", type=float, default=15.0)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--cache-mb", type=int, default=256)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.quick:
        args.tenants, args.small, args.duration, args.drain = 40, 4, 5.0, 5.0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from benchmarks.engine_throughput import make_tenants, minilm_path
    from serve import run as serve_run
    from serve.config import ServeConfig

    port = serve_run.free_local_port()
    cache = RESULTS / "cache"
    base_path = minilm_path(cache)
    t0 = time.perf_counter()
    _, arts = make_tenants(base_path, args.tenants)
    log.info("derived %d tenants in %.0f s", args.tenants, time.perf_counter() - t0)
    names = [f"ft{i:04d}" for i in range(args.tenants)]
    texts = sample_texts()
    store = cache / "scale_store"
    shutil.rmtree(store, ignore_errors=True)
    cfg = ServeConfig(base=str(base_path), store=str(store), admin_token=ADMIN, host="127.0.0.1", port=port,
                      cache_bytes=args.cache_mb << 20, torch_threads=args.torch_threads, max_upload_bytes=64 << 20,
                      max_batch_size=32, max_wait_ms=5.0, replica_num_cpus=0.5)
    out: dict = {"tenants": args.tenants, "small": args.small, "rate": args.rate, "duration_s": args.duration,
                 "machine": f"{os.cpu_count()} CPU cores (shared with other jobs), CPU only",
                 "torch_threads": args.torch_threads, "cache_mb": args.cache_mb}
    artifact_bytes = 0
    url = serve_run.start(cfg, ray_num_cpus=2, wait_s=300)
    try:
        data = [a.to_bytes() for a in arts[: args.small]]
        artifact_bytes = len(data[0])
        reg = register(url, data, names[: args.small])
        out["load_small"] = load(url, names[: args.small], args, texts, seed=1)
        log.info("%d tenants: %s", args.small, out["load_small"])
        t0 = time.perf_counter()
        chunk = 100  # serialise artifacts chunk by chunk (bounded extra memory in this driver)
        for s in range(args.small, args.tenants, chunk):
            e = min(args.tenants, s + chunk)
            reg += register(url, [a.to_bytes() for a in arts[s:e]], names[s:e])
        del arts
        out["registration"] = {"total_s": round(sum(reg), 1), "wall_s_after_small": round(time.perf_counter() - t0, 1),
                               "p50_s": round(pct(reg, 0.5), 3), "p99_s": round(pct(reg, 0.99), 3),
                               "mean_s": round(statistics.mean(reg), 3), "artifact_bytes": artifact_bytes}
        g = metrics_gauges(url)
        out["memory_after_registration"] = g
        out["load_all"] = load(url, names, args, texts, seed=1)
        log.info("%d tenants: %s", args.tenants, out["load_all"])
        out["memory_after_load"] = metrics_gauges(url)
    finally:
        serve_run.stop()

    # ---- restart on the same store ----
    import httpx

    t0 = time.perf_counter()
    url = serve_run.start(cfg, ray_num_cpus=2, wait_s=900)
    ready_s = time.perf_counter() - t0
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            health = c.get("/healthz").json()
            listed = c.get("/v1/models").json()["models"]
            r = c.post("/v1/classify", json={"model": names[-1], "inputs": ["a gripping, beautifully shot film"]})
        g = metrics_gauges(url, ("replica_rss_bytes", "pool_bytes", "models", "artifact_load_seconds_sum",
                                 "artifact_load_seconds_count"))
        out["restart"] = {"ready_s": round(ready_s, 1), "healthz_models": health["models"], "listed": len(listed),
                          "classify_status": r.status_code,
                          "artifact_load_seconds_sum": round(g.get("artifact_load_seconds_sum", 0.0), 1),
                          "artifacts_loaded": g.get("artifact_load_seconds_count"),
                          "rss_bytes": g.get("replica_rss_bytes"), "pool_bytes": g.get("pool_bytes")}
    finally:
        serve_run.stop()

    small, big = out["load_small"], out["load_all"]
    rss = out["memory_after_load"].get("replica_rss_bytes", 0)
    out["checks"] = {
        "rss_gb": round(rss / 1e9, 2), "rss_under_8gb": rss < 8e9,
        "p99_ratio": round(big["p99_ms"] / small["p99_ms"], 2) if big["p99_ms"] and small["p99_ms"] else None,
        "p50_ratio": round(big["p50_ms"] / small["p50_ms"], 2) if big["p50_ms"] and small["p50_ms"] else None,
        "full_models_would_need_gb": round(args.tenants * 90.9e6 / 1e9, 1),
        "all_restored": out["restart"]["listed"] == args.tenants and out["restart"]["classify_status"] == 200,
    }

    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "scale_1000" + ("_quick" if args.quick else "")
    reg, rst, c = out["registration"], out["restart"], out["checks"]
    md = [f"MiniLM-L6 fp32, one engine replica, {out['machine']}, torch threads {args.torch_threads}, "
          f"cache budget {args.cache_mb} MiB. Load: Poisson {args.rate} req/s for {args.duration} s, 1 sentence per "
          f"request, tenants drawn uniformly.", "",
          "| quantity | value |", "|---|---|",
          f"| tenants registered over HTTP | {args.tenants} (artifact {artifact_bytes / 1e6:.2f} MB each) |",
          f"| registration: total / per model p50 / p99 | {reg['total_s']} s / {reg['p50_s'] * 1000:.0f} ms / "
          f"{reg['p99_s'] * 1000:.0f} ms |",
          f"| replica RSS with {args.tenants} tenants (after load) | {rss / 1e9:.2f} GB "
          f"(pool {out['memory_after_load'].get('pool_bytes', 0) / 1e9:.2f} GB; full models would need "
          f"{c['full_models_would_need_gb']} GB) |",
          f"| restart until /healthz answers with all models | {rst['ready_s']} s (artifact loads: "
          f"{rst['artifact_load_seconds_sum']} s for {rst['artifacts_loaded']:.0f}) |",
          f"| restored: listed / classify | {rst['listed']} / HTTP {rst['classify_status']} |", "",
          "| tenants | offered req/s | throughput ok/s | p50 ms | p95 ms | p99 ms | errors (sent) |",
          "|---|---|---|---|---|---|---|"]
    for r in (small, big):
        md.append(f"| {r['tenants']} | {r['offered_rps']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | "
                  f"{r['p99_ms']} | {r['errors']} ({r['sent']}) |")
    md += ["", f"p99 at {args.tenants} ÷ p99 at {args.small}: **{c['p99_ratio']}** (p50: {c['p50_ratio']})."]
    plot(out, out_dir / f"{name}.png")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(out, indent=2))
    print("\n".join(md))
    summary = {"benchmark": "scale_1000", "quick": args.quick, "tenants": args.tenants, **c,
               "registration_total_s": reg["total_s"], "restart_s": rst["ready_s"],
               "p99_ms": {str(args.small): small["p99_ms"], str(args.tenants): big["p99_ms"]}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
