"""Accuracy/size table: fine-tune -> compress (1-bit) -> distill scales -> evaluate, on MiniLM-L6.

    flock /tmp/bench.lock .venv/bin/python -m benchmarks.accuracy_table [--tasks sst2,cola] [--refit]

For each task: fine-tune the MiniLM-L6 base on a subset of the shipped training split (cached
under ``benchmarks/results/cache/``, keyed by the recipe), compress it against the base,
distill the scales on unlabeled training texts, and evaluate the original fine-tune, the 1-bit
delta and the distilled delta on the task's evaluation split. Writes
``benchmarks/results/accuracy_table.{json,md}`` and prints a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bitdelta_core.compress import compress
from bitdelta_core.data import get_task, load_task
from bitdelta_core.distill import DistillConfig, distill
from bitdelta_core.evaluate import evaluate
from bitdelta_core.finetune import finetune

RESULTS = Path(__file__).resolve().parent / "results"

# Fine-tune recipes: CPU-cheap (a few minutes each on 2 cores) but good enough to be meaningful.
RECIPES = {
    "sst2": dict(max_examples=3000, epochs=2, max_length=64, batch_size=32, lr=1e-4),
    # 2,000 CoLA sentences x 2 epochs predict only the majority class (MCC 0.0): use the full split
    "cola": dict(max_examples=None, epochs=3, max_length=64, batch_size=32, lr=1e-4),
    "ag_news": dict(max_examples=2000, epochs=1, max_length=64, batch_size=32, lr=1e-4),
    "subj": dict(max_examples=2000, epochs=1, max_length=64, batch_size=32, lr=1e-4),
    "rte": dict(max_examples=None, epochs=2, max_length=128, batch_size=16, lr=5e-5),
}
EVAL_MAX = 2000  # evaluation examples per task (ag_news' 7,600-row test split is subsampled)
SEED = 0


def minilm_path() -> str:
    from bitdelta_core.bases import minilm_path as packaged

    return str(packaged())


def cached_finetune(base: str, task: str, cache: Path, refit: bool, wait_s: float = 0) -> tuple[Path, float, bool]:
    """The task's fine-tune from the cache (made now if missing). ``wait_s``: first wait that long
    for another process that is filling the cache (``--wait-cache``)."""
    recipe = RECIPES[task]
    key = hashlib.sha1(json.dumps([task, recipe, SEED], sort_keys=True).encode()).hexdigest()[:10]
    out = cache / f"{task}-{key}"
    deadline = time.monotonic() + wait_s
    while not refit and not out.joinpath("finetune.json").is_file() and time.monotonic() < deadline:
        time.sleep(5)
    if out.joinpath("finetune.json").is_file() and not refit:
        return out, json.loads(out.joinpath("finetune.json").read_text())["wall_s"], True
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    finetune(base, task, out, seed=SEED, **recipe)
    return out, time.perf_counter() - t0, False


def run_task(task: str, base: str, cache: Path, dcfg: DistillConfig, refit: bool, wait_s: float = 0) -> dict:
    spec = get_task(task)
    times: dict[str, float] = {}
    ft, times["finetune_s"], cached = cached_finetune(base, task, cache, refit, wait_s)
    work = cache / "artifacts"
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    art = compress(base, os.fspath(ft), progress=False)
    one_bit = work / f"{task}.1bit.safetensors"
    art.save(one_bit)
    times["compress_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib = load_task(task, "train").subset(4 * (dcfg.calib_size + dcfg.heldout_size), seed=SEED + 1)
    res = distill(base, os.fspath(ft), art, calib, dcfg, progress=False)
    distilled = work / f"{task}.distilled.safetensors"
    res.artifact.save(distilled)
    times["distill_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ev = load_task(task, "eval").subset(EVAL_MAX, seed=SEED)
    rep = evaluate(base, os.fspath(ft), ev, {"1bit": one_bit, "distilled": distilled}, progress=False)
    times["eval_s"] = time.perf_counter() - t0
    m = rep["models"]
    return {
        "task": task, "metric": rep["metric_name"], "eval_split": spec.eval_split, "eval_examples": len(ev),
        "finetune": {**RECIPES[task], "cached": cached, "folder": str(ft)},
        "original": m["original"], "1bit": m["1bit"], "distilled": m["distilled"],
        "drop_points_1bit": 100 * (m["original"]["accuracy"] - m["1bit"]["accuracy"]),
        "drop_points_distilled": 100 * (m["original"]["accuracy"] - m["distilled"]["accuracy"]),
        "ratio": m["original"]["bytes"] / m["distilled"]["bytes"],
        "distill": {"loss_before": res.loss_before, "loss_after": res.loss_after, "num_scales": res.num_scales,
                    "wall_s": res.wall_s},
        "times_s": {k: round(v, 1) for k, v in times.items()},
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def markdown(rows: list[dict], summary: dict) -> str:
    def cell(r, k):
        m = r[k]
        s = f"{m['accuracy']:.4f}"
        if r["metric"] != "accuracy":
            s += f" ({r['metric'].upper()} {m['metric']:.4f})"
        return s

    lines = [
        "| task | metric | original | 1-bit | distilled | agreement 1-bit / distilled | full size | artifact size | ratio | bits/param |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | accuracy{' + ' + r['metric'].upper() if r['metric'] != 'accuracy' else ''} "
            f"| {cell(r, 'original')} | {cell(r, '1bit')} | {cell(r, 'distilled')} "
            f"| {100 * r['1bit']['agreement']:.1f}% / {100 * r['distilled']['agreement']:.1f}% "
            f"| {_mb(r['original']['bytes'])} | {_mb(r['distilled']['bytes'])} | {r['ratio']:.1f}x "
            f"| {r['distilled']['bits_per_parameter']:.3f} |")
    lines += [
        "",
        f"Accuracy drop vs the original fine-tune (points): 1-bit mean {summary['drop_1bit_mean']:.2f}, "
        f"worst {summary['drop_1bit_worst']:.2f}; distilled mean {summary['drop_distilled_mean']:.2f}, "
        f"worst {summary['drop_distilled_worst']:.2f}. Min agreement (distilled) "
        f"{100 * summary['agreement_min']:.1f}%. Max bits/param {summary['bits_per_param_max']:.3f}.",
        "",
        "| task | eval split (examples) | fine-tune | finetune s | compress s | distill s | eval s | distill loss before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, t = r["finetune"], r["times_s"]
        lines.append(
            f"| {r['task']} | {r['eval_split']} ({r['eval_examples']}) | {f['max_examples'] or 'all'} ex x {f['epochs']} ep, "
            f"len {f['max_length']}, lr {f['lr']:g}{' (cached)' if f['cached'] else ''} | {t['finetune_s']:.0f} "
            f"| {t['compress_s']:.1f} | {t['distill_s']:.0f} | {t['eval_s']:.0f} "
            f"| {r['distill']['loss_before']:.4g} -> {r['distill']['loss_after']:.4g} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], tasks: list[str], dcfg: DistillConfig, out: Path, total_s: float | None) -> dict:
    """Summary + JSON + Markdown for ``rows`` (called after every task, so a cut run keeps its rows)."""
    d1 = [r["drop_points_1bit"] for r in rows]
    dd = [r["drop_points_distilled"] for r in rows]
    summary = {
        "tasks": tasks,
        "drop_1bit_mean": sum(d1) / len(d1), "drop_1bit_worst": max(d1),
        "drop_distilled_mean": sum(dd) / len(dd), "drop_distilled_worst": max(dd),
        "agreement_min": min(r["distilled"]["agreement"] for r in rows),
        "bits_per_param_max": max(r["distilled"]["bits_per_parameter"] for r in rows),
        "distill_s_max": max(r["times_s"]["distill_s"] for r in rows),
        "total_s": total_s,
    }
    summary["targets_met"] = {
        "drop_mean<=0.3": summary["drop_distilled_mean"] <= 0.3,
        "drop_worst<=1.0": summary["drop_distilled_worst"] <= 1.0,
        "agreement>=0.98": summary["agreement_min"] >= 0.98,
        "bits_per_param<=1.10": summary["bits_per_param_max"] <= 1.10,
        "distill<=180s": summary["distill_s_max"] <= 180,
    }
    doc = {"summary": summary, "distill_config": asdict(dcfg), "rows": rows,
           "machine": {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "python": platform.python_version()},
           "command": "flock /tmp/bench.lock .venv/bin/python -m benchmarks.accuracy_table"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(RECIPES), help="comma-separated tasks")
    ap.add_argument("--cache", default=str(RESULTS / "cache"), help="fine-tune cache folder")
    ap.add_argument("--refit", action="store_true", help="ignore cached fine-tunes")
    ap.add_argument("--steps", type=int, default=DistillConfig.steps)
    ap.add_argument("--lr", type=float, default=DistillConfig.lr)
    ap.add_argument("--out", default=str(RESULTS / "accuracy_table"), help="output stem (.json/.md)")
    ap.add_argument("--wait-cache", type=float, default=0, metavar="S",
                    help="wait up to S seconds per task for a fine-tune another process is caching")
    ap.add_argument("--merge", action="store_true",
                    help="replace only these tasks' rows in an existing results file (others kept as they are)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine two threads were "
                         "3-5x slower than one under load, measured 2.8 s vs 7-15 s per MiniLM training step)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = minilm_path()
    dcfg = DistillConfig(steps=args.steps, lr=args.lr)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    cache = Path(args.cache)
    t_all = time.perf_counter()
    out = Path(args.out)
    old_rows = []
    if args.merge and out.with_suffix(".json").is_file():
        old_rows = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if r["task"] not in tasks]
    rows: list[dict] = []
    summary: dict = {}
    for task in tasks:
        r = run_task(task, base, cache, dcfg, args.refit, args.wait_cache)
        print(json.dumps({k: r[k] for k in ("task", "drop_points_1bit", "drop_points_distilled", "times_s")}),
              flush=True)
        rows.append(r)
        all_rows = old_rows + rows
        summary = write_results(all_rows, [x["task"] for x in all_rows], dcfg, out,
                                None if old_rows else round(time.perf_counter() - t_all, 1))
    all_rows = old_rows + rows
    print(markdown(all_rows, summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
