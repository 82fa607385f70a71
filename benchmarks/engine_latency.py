"""The engine's fixed cost per request at small batches, against a dense model, side by side.

On the real MiniLM-L6 base with real-sized synthetic fine-tunes (as in
:mod:`benchmarks.engine_throughput`: every weight changes, embedding rows where SST-2 training
sentences would touch them), for short SST-2 validation sentences:

  * 1 sentence, 1 tenant; 8 and 32 sentences of one tenant; 32 sentences of 16 tenants
    (uniform; the mixed-batch case)
  * dense: one fine-tuned model (the tenant's merged weights), the same texts: tokenizer call,
    forward, softmax and top label
  * engine: ``MultiTenantEngine.classify`` on the same texts (tokenize, resolve, sort, forward,
    post-process), and ``forward`` on the same token ids against the dense model's forward

Methods alternate within every repetition (a shared machine slows them alike); each figure is
the median wall time and the median CPU time of the process (all threads: the fairer figure
on a loaded machine). Prints a JSON summary as its last line; writes
benchmarks/results/engine_latency.{json,md}.

    python -m benchmarks.engine_latency                # full run (a few minutes)
    python -m benchmarks.engine_latency --quick        # CI-sized smoke run
    python -m benchmarks.engine_latency --threads 1    # one torch thread
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.engine_throughput import RESULTS, dense_model, make_tenants, minilm_path
from bitdelta_core.multitenant import MultiTenantEngine

log = logging.getLogger("benchmarks.engine_latency")


def sentences(n: int) -> list[str]:
    """``n`` short SST-2 validation sentences (4-20 words)."""
    from bitdelta_core.data import load_task

    out = [t[0] for t in load_task("sst2", "validation").texts if 4 <= len(t[0].split()) <= 20]
    return (out * (n // len(out) + 1))[:n]


def measure(fns: dict, reps: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU milliseconds per call; methods alternate every repetition."""
    for fn in fns.values():
        fn()
        fn()  # warm-up: caches, the allocator, lazily built kernels
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: {"wall_ms": round(1e3 * statistics.median(wall[k]), 3),
                "cpu_ms": round(1e3 * statistics.median(cpu[k]), 3)} for k in fns}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run: 4 tenants, few repetitions")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-cpu-kernel", action="store_true", help="run the engine without the compiled CPU kernel")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    T = 4 if args.quick else 16
    reps = 5 if args.quick else args.reps
    base_path = minilm_path()
    base, arts = make_tenants(base_path, T)
    dense = dense_model(base, arts[0])
    eng = MultiTenantEngine(base_path, cpu_kernel=False if args.no_cpu_kernel else None)
    names = [f"t{i}" for i in range(T)]
    for n, a in zip(names, arts):
        eng.register(n, a)
    tok = eng.tokenizer
    id2label = {0: "neg", 1: "pos"}
    texts = sentences(32)
    cases = [("1 sentence, 1 tenant", texts[:1], ["t0"]), ("8 sentences, 1 tenant", texts[:8], ["t0"] * 8),
             ("32 sentences, 1 tenant", texts, ["t0"] * 32),
             (f"32 sentences, {T} tenants", texts, [names[i % T] for i in range(32)])]
    rows = []
    for label, batch, models in cases:
        enc = {k: v for k, v in tok(batch, padding=True, return_tensors="pt").items()}

        def dense_classify(batch=batch):
            with torch.inference_mode():
                e = tok(batch, padding=True, return_tensors="pt")
                probs = dense(**e).logits.float().softmax(-1)
                k = probs.argmax(-1).tolist()
                return [(id2label[j], float(probs[i, j])) for i, j in enumerate(k)]

        def engine_classify(batch=batch, models=models):
            return eng.classify(batch, models)

        def dense_forward(enc=enc):
            with torch.inference_mode():
                return dense(**enc).logits

        def engine_forward(enc=enc, models=models):
            return eng.forward(enc, models)

        # the figures mean nothing if the engine answers differently: same top labels where
        # the tenant is t0 (the dense model is t0's merged weights)
        want = [lab for lab, _ in dense_classify()]
        got = engine_classify()
        agree = [g.label == (w if m == "t0" else g.label) for g, w, m in zip(got, want, models)]
        assert all(agree), f"{label}: the engine's labels differ from the dense model's"
        res = measure({"dense_classify": dense_classify, "engine_classify": engine_classify,
                       "dense_forward": dense_forward, "engine_forward": engine_forward}, reps)
        row = {"case": label, "rows": len(batch), "tenants": len(set(models)), "tokens": int(enc["input_ids"].numel())}
        for k, v in res.items():
            row[f"{k}_wall_ms"], row[f"{k}_cpu_ms"] = v["wall_ms"], v["cpu_ms"]
        for what in ("classify", "forward"):
            for clock in ("wall", "cpu"):
                row[f"{what}_ratio_{clock}"] = round(row[f"engine_{what}_{clock}_ms"] / row[f"dense_{what}_{clock}_ms"], 3)
        log.info("%s", row)
        rows.append(row)
    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("BENCH_NAME", "engine_latency" + ("_quick" if args.quick else ""))
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    md = ["| case | tokens | dense classify ms (wall / cpu) | engine classify ms (wall / cpu) | "
          "engine ÷ dense, classify (wall / cpu) | dense forward ms (wall / cpu) | engine forward ms (wall / cpu) | "
          "engine ÷ dense, forward (wall / cpu) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['tokens']} | {r['dense_classify_wall_ms']} / {r['dense_classify_cpu_ms']} | "
                  f"{r['engine_classify_wall_ms']} / {r['engine_classify_cpu_ms']} | "
                  f"{r['classify_ratio_wall']} / {r['classify_ratio_cpu']} | "
                  f"{r['dense_forward_wall_ms']} / {r['dense_forward_cpu_ms']} | "
                  f"{r['engine_forward_wall_ms']} / {r['engine_forward_cpu_ms']} | "
                  f"{r['forward_ratio_wall']} / {r['forward_ratio_cpu']} |")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    summary = {"benchmark": "engine_latency", "torch_threads": torch.get_num_threads(),
               "machine": f"{os.cpu_count()} CPU cores", "cpu_kernel": eng._kernel is not None,
               "reps": reps, "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
