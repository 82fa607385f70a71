"""One multi-tenant Linear layer on a GPU, three ways: what the one-launch Triton kernel buys.

For a batch of ``--tokens`` rows split into G tenant groups (even split) on one layer shape
(out x in), side by side in one run:

  triton     bitdelta_core.triton_kernel: base weight + every group's α ⊙ sign(Δ) unpacked from
             the packed bits, one launch, nothing merged (tables and plan prepared as the engine
             does: once per tenant / once per forward)
  stacked    the engine's stacked path with every tenant's merged weight already cached: the
             groups zero-padded into one baddbmm (G merged copies of the layer resident)
  dense      one addmm of all rows with the base weight: the floor (no multi-tenancy)

Shapes default to BERT-base's (768 <-> 3072) and MiniLM-L6's (384 <-> 1536) layers. Times are
medians of ``--reps`` CUDA-synchronised calls after a warm-up. Prints a JSON summary as its last
line and writes benchmarks/results/triton_layer.{json,md}.

    python -m benchmarks.triton_layer                  # needs CUDA and triton
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

from bitdelta_core.codec import encode

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.triton_layer")

SHAPES = [(3072, 768), (768, 3072), (768, 768), (1536, 384), (384, 1536), (384, 384)]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, dev: torch.device) -> float:
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_shape(N: int, K: int, G: int, tokens: int, dtype: torch.dtype, reps: int, device: str = "cuda") -> dict:
    from bitdelta_core import triton_kernel as tk

    dev = torch.device(device)
    g = torch.Generator().manual_seed(N + K + G)
    W = (torch.randn(N, K, generator=g) * 0.05).to(dev, dtype)
    b = torch.randn(N, generator=g).to(dev, dtype)
    x = torch.randn(tokens, K, generator=g).to(dev, dtype)
    codes = [encode(torch.randn(N, K, generator=g) * 1e-3) for _ in range(G)]
    signs = [c.signs.to(dev) for c in codes]
    scales = [c.kept_scales(dtype).to(dev) for c in codes]
    bounds = [round(i * tokens / G) for i in range(G + 1)]
    spans = list(zip(bounds[:-1], bounds[1:]))
    out = torch.empty(tokens, N, device=dev, dtype=dtype)

    # triton: table rows 1..G (row 0: the base), plan once
    keep: list = []
    entries = tk.table_entry(tk.DeltaGroup(0, 0, bias=b), W, dtype, keep)
    for sg, sc in zip(signs, scales):
        entries += tk.table_entry(tk.DeltaGroup(0, 0, sg, sc, None, b), W, dtype, keep)
    table = tk.metadata_tensor(entries, dev).view(-1, 4)
    plan = tk.make_plan(spans, dev, list(range(1, G + 1)))

    def run_triton():
        tk.launch_linear(x, W, out, table, plan, transposed=False, has_bias=True)

    # stacked: merged weights cached, groups padded into one baddbmm
    merged = torch.stack([W + sc[:, None] * (c.decode(torch.float32).to(dev, dtype).sign())
                          for c, sc in zip(codes, scales)]).transpose(1, 2)  # (G, K, N)
    rmax = max(e - s for s, e in spans)
    g_idx = torch.tensor([i for i, (s, e) in enumerate(spans) for _ in range(e - s)], device=dev)
    r_idx = torch.tensor([r for s, e in spans for r in range(e - s)], device=dev)
    bias_g = b.expand(G, 1, N)

    def run_stacked():
        xp = x.new_zeros((G, rmax, K))
        xp[g_idx, r_idx] = x
        y = torch.baddbmm(bias_g, xp, merged)
        out.copy_(y[g_idx, r_idx])

    def run_dense():
        torch.addmm(b, x, W.t(), out=out)

    # correctness of the timed triton call against the merged weights
    run_triton()
    ref = torch.cat([x[s:e].float() @ merged[i].float() + b.float() for i, (s, e) in enumerate(spans)])
    err = float(((out.float() - ref).abs() / (1 + ref.abs())).max())
    res = {"out": N, "in": K, "groups": G, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
           "max_rel_err": err}
    for name, fn in (("triton", run_triton), ("stacked", run_stacked), ("dense", run_dense)):
        res[f"{name}_us"] = round(timed(fn, reps, dev) * 1e6, 1)
    res["triton_over_dense"] = round(res["dense_us"] / res["triton_us"], 3)  # throughput ratio
    res["triton_speedup_vs_stacked"] = round(res["stacked_us"] / res["triton_us"], 3)
    res["merged_bytes_stacked"] = merged.numel() * merged.element_size()
    res["packed_bytes_triton"] = sum(s.numel() + sc.numel() * sc.element_size() for s, sc in zip(signs, scales))
    log.info("%s", res)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--tokens", type=int, default=2048, help="rows of the batch (32 sequences x 64 tokens)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="OUTxIN layer shapes")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only under TRITON_INTERPRET=1 (a smoke test)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("triton_layer needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    rows = [run_shape(N, K, G, args.tokens, dtype, args.reps, args.device) for N, K in shapes for G in args.groups]
    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("BENCH_NAME", "triton_layer")
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
    md = ["| out x in | G | tokens | dtype | triton µs | stacked µs | dense µs | dense/triton | stacked/triton | max rel err |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['out']}x{r['in']} | {r['groups']} | {r['tokens']} | {r['dtype']} | {r['triton_us']} | "
                  f"{r['stacked_us']} | {r['dense_us']} | {r['triton_over_dense']} | {r['triton_speedup_vs_stacked']} | "
                  f"{r['max_rel_err']:.1e} |")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.device} (Triton interpreter)"
    summary = {"benchmark": "triton_layer", "device": device, "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
