"""One multi-tenant Linear layer, five ways: what the compiled CPU kernel buys.

For G tenant groups of m token rows each on one layer shape (out x in), side by side:

  fused      the compiled kernel (bitdelta_core.cpu_kernel): merged rows rebuilt per tile in
             cache from the packed signs, never written to memory; groups of at most
             cpu_kernel.SMALL_ROWS rows on the register-blocked path
  tiles      the same kernel with one GEMM call per group and tile for every group (the
             register-blocked path off): what that path buys on small groups
  merge      per group, merge W + α ⊙ sign into a fresh tensor, then one GEMM (the engine's
             plain path for a tenant that is not in the working-weight cache)
  cached     per group, one GEMM on an already merged weight (the plain path's best case: every
             tenant in the cache, G merged copies of the layer resident)
  one_gemm   one GEMM of all G*m rows with a single weight: the floor (no multi-tenancy)

Shapes default to BERT-base's (768 <-> 3072) and MiniLM-L6's (384 <-> 1536) layers with 16
groups of 128 tokens (a 32 x 64 batch over 16 tenants) and 1 group of 2,048; ``--groups`` and
``--shapes`` pick others (served one-sentence traffic: ~20 tokens per sentence, a few
sentences per tenant group, e.g. ``--groups 12x40 4x40 1x480``). Median of
``--reps`` timed calls after a warm-up; prints a JSON summary as its last line and writes
benchmarks/results/fused_kernel.{json,md}.

    python -m benchmarks.fused_kernel --threads 2
    python -m benchmarks.fused_kernel --threads 1 --shapes 1536x384 384x1536 --groups 12x40 1x480
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

from bitdelta_core import cpu_kernel
from bitdelta_core.codec import encode
from bitdelta_core.multitenant import merged_weight

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.fused_kernel")

SHAPES = [(3072, 768), (768, 3072), (768, 768), (1536, 384), (384, 1536), (384, 384)]
GROUPS = [(16, 128), (4, 512), (1, 2048)]


def _pair(text: str) -> tuple[int, int]:
    """``"12x40"`` -> ``(12, 40)``."""
    try:
        a, b = text.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two whole numbers joined by x (e.g. 12x40), got {text!r}") from None


def _median(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_case(mod, N: int, K: int, G: int, m: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(N * K + G)
    W = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(G * m, K, generator=g)
    bias = [torch.randn(N, generator=g) for _ in range(G)]
    codes = [encode(torch.randn(N, K, generator=g) * 1e-3) for _ in range(G)]
    scales = [c.kept_scales() for c in codes]
    out = torch.empty(G * m, N)
    spans = [(i * m, (i + 1) * m) for i in range(G)]
    groups = [(s, e, c.signs, sc, None, b) for (s, e), c, sc, b in zip(spans, codes, scales, bias)]
    cached = [merged_weight(W, c, sc) for c, sc in zip(codes, scales)]

    def fused():
        cpu_kernel.signed_linear_groups(mod, x, out, W, groups)

    def tiles():
        small, cpu_kernel.SMALL_ROWS = cpu_kernel.SMALL_ROWS, 0
        try:
            fused()
        finally:
            cpu_kernel.SMALL_ROWS = small

    def merge():
        for (s, e), c, sc, b in zip(spans, codes, scales, bias):
            torch.addmm(b, x[s:e], merged_weight(W, c, sc).t(), out=out[s:e])

    def cached_fn():
        for (s, e), w, b in zip(spans, cached, bias):
            torch.addmm(b, x[s:e], w.t(), out=out[s:e])

    def one_gemm():
        torch.addmm(bias[0], x, W.t(), out=out)

    # the kernel's answer is the merged weights' answer (checked on every run of the benchmark)
    cached_fn()
    want = out.clone()
    err = 0.0
    for fn in (fused, tiles):
        fn()
        err = max(err, float((out - want).abs().max()))
    if err > 1e-3:
        raise AssertionError(f"fused kernel differs from merged weights by {err:.2e} on {N}x{K}")
    res = {"out": N, "in": K, "groups": G, "rows_per_group": m, "max_abs_diff": err}
    for name, fn in (("fused", fused), ("tiles", tiles), ("merge", merge), ("cached", cached_fn), ("one_gemm", one_gemm)):
        res[f"{name}_ms"] = round(_median(fn, reps) * 1e3, 3)
    res["tiles_over_fused"] = round(res["tiles_ms"] / res["fused_ms"], 3)
    res["merge_over_fused"] = round(res["merge_ms"] / res["fused_ms"], 3)
    res["cached_over_fused"] = round(res["cached_ms"] / res["fused_ms"], 3)
    res["fused_over_one_gemm"] = round(res["fused_ms"] / res["one_gemm_ms"], 3)
    log.info("%s", res)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="one small shape, 2 reps (CI smoke run)")
    ap.add_argument("--shapes", nargs="+", type=_pair, metavar="OUTxIN", help="layer shapes (default: BERT-base's and MiniLM's)")
    ap.add_argument("--groups", nargs="+", type=_pair, metavar="GxM", help="G groups of M token rows each")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    mod = cpu_kernel.load(required=True)
    shapes, groups = (args.shapes or SHAPES, args.groups or GROUPS) if not args.quick else ([(384, 384)], [(4, 32)])
    rows = [run_case(mod, N, K, G, m, 2 if args.quick else args.reps) for N, K in shapes for G, m in groups]
    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("BENCH_NAME", "fused_kernel" + ("_quick" if args.quick else ""))
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    md = [f"Register-blocked path for groups of at most {cpu_kernel.SMALL_ROWS} rows; torch threads: "
          f"{torch.get_num_threads()}; median of {2 if args.quick else args.reps} calls.", "",
          "| layer (out × in) | groups × tokens | fused ms | fused, GEMM per tile ms | merge + GEMM ms | "
          "cached merged GEMM ms | one GEMM (floor) ms | tiles ÷ fused | merge ÷ fused | cached ÷ fused | fused ÷ floor |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['out']} × {r['in']} | {r['groups']} × {r['rows_per_group']} | {r['fused_ms']} | {r['tiles_ms']} | "
                  f"{r['merge_ms']} | {r['cached_ms']} | {r['one_gemm_ms']} | {r['tiles_over_fused']} | "
                  f"{r['merge_over_fused']} | {r['cached_over_fused']} | {r['fused_over_one_gemm']} |")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    summary = {"benchmark": "fused_kernel", "torch_threads": torch.get_num_threads(),
               "machine": f"{os.cpu_count()} CPU cores", "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
