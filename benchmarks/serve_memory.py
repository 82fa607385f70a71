"""Resident memory of a served engine replica with N MiniLM-L6 1-bit deltas registered over HTTP,
next to N full fine-tuned models' size.

Starts the real service (local Ray Serve, one engine replica, 127.0.0.1), reads the replica's RSS
from ``/metrics`` (``bitdelta_replica_rss_bytes``, read from /proc by the replica itself) with 0
fine-tunes, after registering N (the three demo deltas cycled under N names; each registration is
a separate resident copy in the pool), and after classifying with every one of them (the
working-weight cache fills up to its budget). Uses the demo's cached deltas (``bitdelta demo``
builds them) or builds them itself.

    python -m benchmarks.serve_memory            # N = 32
    python -m benchmarks.serve_memory --n 8

Prints a JSON summary as its last line; writes benchmarks/results/serve_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _metric(text: str, name: str) -> float:
    vals = [float(m.group(2)) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)]
    if not vals:
        raise RuntimeError(f"metric {name} not found")
    return max(vals)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--cache", default=".cache/demo")
    ap.add_argument("--cache-bytes", type=int, default=256 << 20, help="working-weight cache budget")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from serve import run
    from serve.client import Client
    from serve.config import ServeConfig
    from serve.demo import DEMO_TASKS, EXAMPLES, base_path, prepare

    found = {t: Path(args.cache) / "artifacts" / f"{t}.safetensors" for t in DEMO_TASKS}
    if all(p.is_file() for p in found.values()):  # any demo build will do: memory does not depend on training
        prepared = {t: {"path": str(p)} for t, p in found.items()}
    else:
        prepared = prepare(Path(args.cache), DEMO_TASKS, progress=False)
    base = base_path()
    full_bytes = (base / "model.safetensors").stat().st_size  # fp32 MiniLM-L6 checkpoint
    token = "bench-admin-token"
    with tempfile.TemporaryDirectory() as store:
        cfg = ServeConfig(base=str(base), store=store, admin_token=token, port=8765, cache_bytes=args.cache_bytes,
                          max_length=128)
        url = run.start(cfg, ray_num_cpus=2)
        try:
            with Client(url, admin_token=token) as c:
                http = c._http
                time.sleep(2)
                rss0 = _metric(http.get("/metrics?scope=all").text, "bitdelta_replica_rss_bytes")
                tasks = list(prepared)
                t0 = time.perf_counter()
                for i in range(args.n):
                    c.register(f"ft{i:03d}", prepared[tasks[i % len(tasks)]]["path"])
                t_reg = time.perf_counter() - t0
                text = http.get("/metrics?scope=all").text
                rss_reg = _metric(text, "bitdelta_replica_rss_bytes")
                pool = _metric(text, "bitdelta_pool_bytes")
                for i in range(args.n):
                    c.classify(f"ft{i:03d}", EXAMPLES[tasks[i % len(tasks)]])
                text = http.get("/metrics?scope=all").text
                rss_served = _metric(text, "bitdelta_replica_rss_bytes")
                cache = _metric(text, "bitdelta_cache_bytes")
                base_b = _metric(text, "bitdelta_base_bytes")
        finally:
            run.stop()
    mib = 1 << 20
    summary = {
        "n": args.n, "base_fp32_bytes": full_bytes, "n_full_models_bytes": args.n * full_bytes,
        "replica_rss_0_bytes": int(rss0), "replica_rss_registered_bytes": int(rss_reg),
        "replica_rss_after_traffic_bytes": int(rss_served), "pool_bytes": int(pool), "cache_bytes": int(cache),
        "cache_budget_bytes": args.cache_bytes, "engine_base_bytes": int(base_b),
        "rss_growth_per_delta_bytes": int((rss_reg - rss0) / max(args.n, 1)), "register_s": round(t_reg, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_memory.json").write_text(json.dumps(summary, indent=2))
    md = [
        f"# Served replica memory with {args.n} MiniLM-L6 1-bit deltas",
        "",
        "`python -m benchmarks.serve_memory` (one engine replica, local Ray Serve, 2-core CPU)",
        "",
        "| what | MiB |",
        "|---|---|",
        f"| engine replica RSS, no fine-tunes | {rss0 / mib:.0f} |",
        f"| engine replica RSS, {args.n} registered | {rss_reg / mib:.0f} |",
        f"| engine replica RSS, after classifying with all {args.n} (cache budget {args.cache_bytes / mib:.0f}) | {rss_served / mib:.0f} |",
        f"| of which packed delta pool | {pool / mib:.0f} |",
        f"| of which merged working-weight cache | {cache / mib:.0f} |",
        f"| {args.n} full fp32 fine-tuned models (checkpoint size x {args.n}) | {args.n * full_bytes / mib:.0f} |",
        "",
        f"Per registered delta the replica grows by {(rss_reg - rss0) / args.n / mib:.1f} MiB "
        f"(one fp32 MiniLM-L6: {full_bytes / mib:.1f} MiB). Registering {args.n} took {t_reg:.1f} s over HTTP.",
    ]
    (RESULTS / "serve_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
