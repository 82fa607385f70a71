"""Resident memory of N full fine-tuned models against one base + N packed 1-bit deltas.

For each base (MiniLM-L6, a BERT-base-sized config) and N in 1, 2, 4, ..., 64, two ways to hold
N fine-tunes, each measured in a FRESH Python subprocess (so nothing freed earlier hides in the
allocator):

  full    N full fine-tuned models (base weights + the reconstructed delta, fp32), resident in
          one process, as a per-tenant deployment would hold them;
  engine  one ``MultiTenantEngine`` (fp32 base) with N deltas registered from artifact bytes,
          measured after registration (the pool) and again after one mixed forward over all N
          tenants (the working-weight cache, bounded by ``cache_bytes``, is then filled too).

Resident memory is ``VmRSS`` from ``/proc/self/status`` after ``gc.collect()`` and glibc
``malloc_trim(0)`` (identical in both modes). The process's fixed cost (interpreter, torch,
transformers, this package imported, the base's tokenizer loaded and the BERT code run once on a
tiny config: what any serving process has, whichever way it holds the models) is measured in its
own subprocess with N = 0 and subtracted from the "net" numbers, which are compared with the theoretical lines

  full:    N x #params x 32 bits
  engine:  #params x (N x 1 bit + 32 bits)      (fp32 base, one sign bit per weight and delta)

Tensor bytes (what the tensors themselves hold) are reported next to the resident numbers.
Tenants are ``engine_throughput.make_tenants``: synthetic fine-tunes whose embedding rows change
only where SST-2 training sentences would touch them, as real fine-tunes do (``--rows all``: every
row changes, the worst case); tenant 1 compressed for real, 2..N perturbations of it. A third line,
``#params x 32 bits + N x artifact bytes``, shows the engine against what its files hold.

    python -m benchmarks.memory_vs_n            # full run (~12 min on 2 cores)
    python -m benchmarks.memory_vs_n --quick    # CI smoke run: MiniLM, N in {0, 1, 4}
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.memory_vs_n")

NS = [1, 2, 4, 8, 16, 32, 64]
MB = 1e6


# ---------------------------------------------------------------------------------------------
# measurement helpers (used inside the child processes)
# ---------------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in bytes (Linux ``/proc/self/status``)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:  # not Linux: fall back to the peak from getrusage (kB on Linux, bytes on macOS)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmRSS"] = out["VmHWM"] = peak * (1 if sys.platform == "darwin" else 1024)
    return out


def settle() -> dict[str, int]:
    """Collect garbage and give freed heap back to the OS, then read the resident set."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return proc_status()


def _tensor_bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def _imports():
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertForSequenceClassification  # noqa: F401

    import bitdelta_core.multitenant  # noqa: F401
    from benchmarks import engine_throughput  # noqa: F401


def fixed_setup(base: str):
    """What every serving process has whatever it holds: the base's tokenizer, and the model code
    paths exercised once (a tiny BERT from a config, one forward) so that lazily loaded code and
    allocator arenas count as fixed cost, not as model memory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(base)
    tiny = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64)).eval()
    ids = torch.randint(5, 100, (2, 8))
    with torch.inference_mode():
        tiny(input_ids=ids, attention_mask=torch.ones_like(ids))
    return tok


def child(args) -> dict:
    """Runs in a fresh interpreter: hold N fine-tunes one way, report memory as JSON."""
    _imports()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = fixed_setup(args.base)
    arts = sorted(Path(args.arts).glob("t*.safetensors"), key=lambda p: int(p.stem[1:]))[: args.n]
    if len(arts) < args.n:
        raise SystemExit(f"only {len(arts)} artifacts in {args.arts}, need {args.n}")
    res: dict = {"mode": args.mode, "n": args.n}
    ids = torch.randint(1000, 20000, (1, 16))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    t0 = time.perf_counter()
    if args.mode == "none":
        res["after_load"] = settle()
        res["tensor_bytes"] = 0
    elif args.mode == "full":
        from transformers import BertForSequenceClassification

        from benchmarks.engine_throughput import dense_model
        from bitdelta_core.artifact import load_artifact
        from bitdelta_core.models import load_model

        base = load_model(args.base, cls=BertForSequenceClassification, num_labels=2)
        models = []
        for p in arts:
            art = load_artifact(p)
            models.append(dense_model(base, art))
            del art
        del base
        res["load_s"] = time.perf_counter() - t0
        res["after_load"] = settle()
        res["tensor_bytes"] = _tensor_bytes(t for m in models for t in m.state_dict().values())
        with torch.inference_mode():
            for m in models:
                m(**enc)
        res["after_forward"] = settle()
        res["tensor_bytes_after_forward"] = res["tensor_bytes"]
    else:  # engine
        from bitdelta_core.multitenant import MultiTenantEngine

        eng = MultiTenantEngine(args.base, cache_bytes=args.cache_bytes, tokenizer=tokenizer)
        for i, p in enumerate(arts):
            eng.register(f"t{i}", p.read_bytes())
        res["load_s"] = time.perf_counter() - t0
        res["after_load"] = settle()
        mem = eng.memory_report()
        res["base_bytes"], res["pool_bytes"] = mem["base_bytes"], mem["pool_bytes"]
        res["tensor_bytes"] = mem["base_bytes"] + mem["pool_bytes"]
        if args.n:
            names = [f"t{i}" for i in range(args.n)]
            eng.forward({k: v.expand(args.n, -1) for k, v in enc.items()}, names)
        res["after_forward"] = settle()
        mem = eng.memory_report()
        res["cache_bytes"], res["cache_budget"] = mem["cache_bytes"], mem["cache_budget"]
        res["tensor_bytes_after_forward"] = res["tensor_bytes"] + mem["cache_bytes"]
    return res


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def prepare(label: str, nmax: int, cache: Path, rows: str = "seen") -> tuple[Path, Path, int]:
    """Base folder, a folder of ``nmax`` artifacts (t0..), and the base's parameter count."""
    from benchmarks.engine_throughput import bert_base_path, make_tenants, minilm_path

    base_path = minilm_path(cache) if label == "minilm" else bert_base_path(cache)
    art_dir = cache / "memory_vs_n" / f"{label}-{rows}"
    art_dir.mkdir(parents=True, exist_ok=True)
    stamp = art_dir / "STAMP.json"
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    if have.get("n", 0) < nmax or have.get("base") != str(base_path):
        log.info("%s: building %d tenant artifacts (%s embedding rows changed)", label, nmax, rows)
        base, arts = make_tenants(base_path, nmax, rows=rows)
        for i, a in enumerate(arts):
            a.save(art_dir / f"t{i}.safetensors")
        params = sum(t.numel() for t in base.module.parameters())
        stamp.write_text(json.dumps({"n": nmax, "base": str(base_path), "params": params}))
        del base, arts
        gc.collect()
    params = json.loads(stamp.read_text())["params"]
    return base_path, art_dir, params


def run_child(mode: str, n: int, base: Path, arts: Path, cache_bytes: int, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory_vs_n", "--child", mode, "--n", str(n), "--base", str(base),
           "--arts", str(arts), "--cache-bytes", str(cache_bytes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    if p.returncode != 0:
        raise RuntimeError(f"child {mode} N={n} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["model"] for r in rows}, key=lambda s: s != "minilm")
    fig, axes = plt.subplots(1, len(labels), figsize=(6.2 * len(labels), 4.8), squeeze=False)
    for ax, label in zip(axes[0], labels):
        rs = [r for r in rows if r["model"] == label]
        ns = [r["n"] for r in rs]
        full = [(r["n"], r["full_net_rss"] / MB) for r in rs if r.get("full_net_rss") is not None]
        eng = [(r["n"], r["engine_net_rss"] / MB) for r in rs]
        eng_fwd = [(r["n"], r["engine_net_rss_after_forward"] / MB) for r in rs]
        ax.plot(ns, [r["theory_full"] / MB for r in rs], "k--", lw=1, label="theory: N × #params × 32 bit")
        ax.plot(ns, [r["theory_engine"] / MB for r in rs], "k:", lw=1.5,
                label="theory: #params × (N × 1 bit + 32 bit)")
        ax.plot(ns, [r["files_engine"] / MB for r in rs], "-.", color="gray", lw=1,
                label=f"base fp32 + N × artifact file ({rs[0]['artifact_bits_per_param']} bits/param)")
        if full:
            ax.plot(*zip(*full), "o-", color="tab:red", label="N full models (measured RSS − fixed)")
        ax.plot(*zip(*eng), "s-", color="tab:blue", label="base + N deltas, after registration")
        ax.plot(*zip(*eng_fwd), "^-", color="tab:cyan", ms=4, lw=1,
                label="base + N deltas, after one forward (+ bounded cache)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("fine-tunes resident (N)")
        ax.set_ylabel("resident MB (process fixed cost subtracted)")
        ax.set_title(f"{label}: {rs[0]['params'] / 1e6:.1f}M params, fp32")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run: MiniLM, N in {1, 4}")
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    ap.add_argument("--ns", nargs="+", type=int, default=NS)
    ap.add_argument("--cache-bytes", type=int, default=256 << 20,
                    help="engine working-weight cache budget (default: the service's 256 MiB)")
    ap.add_argument("--max-full-gb", type=float, default=9.0,
                    help="do not build more full models than fit in this many GB (the machine has 24 GB, shared)")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per child process")
    ap.add_argument("--rows", choices=["seen", "all"], default="seen",
                    help="embedding rows the synthetic fine-tunes change: those SST-2 touches (default), or all")
    ap.add_argument("--child", choices=["none", "full", "engine"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--arts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode = args.child
        res = child(args)
        print(json.dumps(res))
        return res
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.models, args.ns = ["minilm"], [1, 4]
    cache = RESULTS / "cache"
    rows = []
    overhead = None
    for label in args.models:
        base_path, art_dir, params = prepare(label, max(args.ns), cache, args.rows)
        art_bytes = statistics.mean(p.stat().st_size for p in sorted(art_dir.glob("t*.safetensors"))[: max(args.ns)])
        if overhead is None:
            overhead = run_child("none", 0, base_path, art_dir, args.cache_bytes, args.timeout_s)
            log.info("fixed process cost (N=0): %.0f MB RSS", overhead["after_load"]["VmRSS"] / MB)
        fixed = overhead["after_load"]["VmRSS"]
        full_model_bytes = params * 4
        for n in args.ns:
            r = {"model": label, "n": n, "params": params, "fixed_rss": fixed,
                 "theory_full": n * params * 4, "theory_engine": math.ceil(params * (n / 8 + 4)),
                 "artifact_bytes": round(art_bytes), "artifact_bits_per_param": round(art_bytes * 8 / params, 3),
                 "files_engine": round(params * 4 + n * art_bytes)}
            if n * full_model_bytes <= args.max_full_gb * 1e9:
                f = run_child("full", n, base_path, art_dir, args.cache_bytes, args.timeout_s)
                r.update(full_rss=f["after_load"]["VmRSS"], full_rss_anon=f["after_load"].get("RssAnon"),
                         full_net_rss=f["after_load"]["VmRSS"] - fixed, full_tensor_bytes=f["tensor_bytes"],
                         full_rss_after_forward=f["after_forward"]["VmRSS"], full_load_s=round(f["load_s"], 2))
            else:
                r.update(full_rss=None, full_net_rss=None, full_tensor_bytes=None,
                         full_note=f"not built: needs {n * full_model_bytes / 1e9:.1f} GB > --max-full-gb")
            e = run_child("engine", n, base_path, art_dir, args.cache_bytes, args.timeout_s)
            r.update(engine_rss=e["after_load"]["VmRSS"], engine_rss_anon=e["after_load"].get("RssAnon"),
                     engine_net_rss=e["after_load"]["VmRSS"] - fixed, engine_tensor_bytes=e["tensor_bytes"],
                     engine_base_bytes=e["base_bytes"], engine_pool_bytes=e["pool_bytes"],
                     engine_rss_after_forward=e["after_forward"]["VmRSS"],
                     engine_net_rss_after_forward=e["after_forward"]["VmRSS"] - fixed,
                     engine_cache_bytes=e["cache_bytes"], engine_cache_budget=e["cache_budget"],
                     engine_load_s=round(e["load_s"], 2))
            r["engine_net_over_theory"] = round(r["engine_net_rss"] / r["theory_engine"], 3)
            r["engine_net_over_files"] = round(r["engine_net_rss"] / r["files_engine"], 3)
            if r["full_rss"] is not None:
                r["full_over_engine_rss"] = round(r["full_rss"] / r["engine_rss"], 2)
                r["full_over_engine_net_rss"] = round(r["full_net_rss"] / r["engine_net_rss"], 2)
            else:  # extrapolated from the theory line (not measured)
                r["full_over_engine_net_rss"] = None
            log.info("%s N=%d: full %s MB, engine %.0f MB (theory %.0f MB)", label, n,
                     None if r["full_rss"] is None else round(r["full_net_rss"] / MB),
                     r["engine_net_rss"] / MB, r["theory_engine"] / MB)
            rows.append(r)

    out_dir = Path(os.environ.get("BENCH_OUT", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "memory_vs_n" + ("_allrows" if args.rows == "all" else "") + ("_quick" if args.quick else "")
    plot(rows, out_dir / f"{name}.png")
    md = [f"Fixed process cost (interpreter + torch + transformers + bitdelta_core + tokenizer, BERT code run once on "
          f"a tiny config, no model; N=0 subprocess): "
          f"{fixed / MB:.0f} MB RSS, subtracted in the *net* columns. Engine cache budget "
          f"{args.cache_bytes / 2**20:.0f} MiB. MB = 10^6 bytes. Embedding rows changed by the fine-tunes: "
          + ("those 4,000 SST-2 training sentences touch" if args.rows == "seen" else "all") + ". "
          + "; ".join(f"{lab} artifact {rs[0]['artifact_bytes'] / MB:.2f} MB = {rs[0]['artifact_bits_per_param']} bits/param"
                      for lab in args.models for rs in [[r for r in rows if r["model"] == lab]] if rs) + ".", "",
          "| model | N | full: RSS MB | full: net MB | full: tensor MB | engine: RSS MB | engine: net MB | "
          "engine: tensor MB | theory (1 bit) MB | net ÷ theory | base + N files MB | net ÷ files | "
          "engine net after forward MB (cache MB) | full ÷ engine (RSS) | full ÷ engine (net) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "–" if v is None else f"{v / MB:,.0f}"

    for r in rows:
        md.append(f"| {r['model']} | {r['n']} | {f(r['full_rss'])} | {f(r['full_net_rss'])} | {f(r['full_tensor_bytes'])} | "
                  f"{f(r['engine_rss'])} | {f(r['engine_net_rss'])} | {f(r['engine_tensor_bytes'])} | "
                  f"{f(r['theory_engine'])} | {r['engine_net_over_theory']} | {f(r['files_engine'])} | "
                  f"{r['engine_net_over_files']} | "
                  f"{f(r['engine_net_rss_after_forward'])} ({f(r['engine_cache_bytes'])}) | "
                  f"{r.get('full_over_engine_rss') or '–'} | {r.get('full_over_engine_net_rss') or '–'} |")
    notes = [r["full_note"] for r in rows if r.get("full_note")]
    if notes:
        md += ["", "Full models not built where they do not fit this shared 24 GB machine: "
               + "; ".join(f"{r['model']} N={r['n']}" for r in rows if r.get("full_note")) + "."]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({"fixed_process": overhead, "rows": rows}, indent=2))
    print("\n".join(md))
    checks = {}
    for label in args.models:
        rs = {r["n"]: r for r in rows if r["model"] == label}
        top = rs[max(rs)]
        checks[label] = {
            "n": top["n"],
            "full_over_engine_rss": top.get("full_over_engine_rss"),
            "full_over_engine_net_rss": top.get("full_over_engine_net_rss"),
            "max_abs_dev_from_theory": round(max(abs(r["engine_net_over_theory"] - 1) for r in rs.values()), 3),
            "max_abs_dev_from_files": round(max(abs(r["engine_net_over_files"] - 1) for r in rs.values()), 3),
            "artifact_bits_per_param": top["artifact_bits_per_param"],
        }
    summary = {"benchmark": "memory_vs_n", "quick": args.quick, "rows": args.rows, "fixed_rss_mb": round(fixed / MB, 1),
               "machine": f"{os.cpu_count()} CPU cores, shared", "checks": checks,
               "plot": str((out_dir / f"{name}.png").relative_to(Path(__file__).resolve().parent.parent))
               if out_dir.is_relative_to(Path(__file__).resolve().parent.parent) else str(out_dir / f"{name}.png")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
