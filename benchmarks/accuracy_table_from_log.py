"""Rebuild accuracy_table results from a run's log, merged with the rows of a separate run.

``python -m benchmarks.accuracy_table_from_log LOG`` reads the per-task JSON summary lines and the
evaluate/distill log lines of an ``accuracy_table`` run (for a run that ended before it wrote its
results), merges the rows of ``results/accuracy_table_rte.json`` (a run with ``--tasks rte --out
benchmarks/results/accuracy_table_rte``) and writes ``accuracy_table.{json,md}``; rebuilt rows carry
a ``"note"``."""
import json, re, sys
from pathlib import Path
from bitdelta_core.artifact import load_artifact
from bitdelta_core.data import get_task, load_task
from bitdelta_core.distill import DistillConfig
from benchmarks.accuracy_table import RECIPES, RESULTS, EVAL_MAX, SEED, write_results, markdown

log = Path(sys.argv[1]).read_text().splitlines()
summ = [json.loads(l) for l in log if l.startswith('{"task"')]
ev = [l for l in log if "bitdelta_core.evaluate: " in l]
di = [l for l in log if "bitdelta_core.distill: distilled" in l]
rows = []
for k, s in enumerate(summ):
    task = s["task"]
    spec = get_task(task)
    models = {}
    for line in ev[3 * k: 3 * k + 3]:
        m = re.search(r"evaluate: (\w+): (\w+)=([\d.]+) accuracy=([\d.]+) agreement=([\d.]+) bytes=(\d+)", line)
        name, mname, mval, acc, agr, nbytes = m.groups()
        models[name] = {"metric_name": mname, "metric": float(mval), "accuracy": float(acc), "agreement": float(agr),
                        "bytes": int(nbytes)}
    art = load_artifact(RESULTS / "cache" / "artifacts" / f"{task}.distilled.safetensors")
    for name, m in models.items():
        m["bits_per_parameter"] = m["bytes"] * 8 / art.num_parameters
    d = re.search(r"distilled (\d+) scales in \d+ steps \(([\d.]+) s\): held-out loss ([\d.e-]+) -> ([\d.e-]+)", di[k])
    n_eval = len(load_task(task, "eval").subset(EVAL_MAX, seed=SEED))
    folder = next((RESULTS / "cache").glob(f"{task}-*"))
    rows.append({
        "task": task, "metric": spec.metric, "eval_split": spec.eval_split, "eval_examples": n_eval,
        "finetune": {**RECIPES[task], "cached": True, "folder": str(folder)},
        "original": models["original"], "1bit": models["1bit"], "distilled": models["distilled"],
        "drop_points_1bit": s["drop_points_1bit"], "drop_points_distilled": s["drop_points_distilled"],
        "ratio": models["original"]["bytes"] / models["distilled"]["bytes"],
        "distill": {"num_scales": int(d.group(1)), "wall_s": float(d.group(2)), "loss_before": float(d.group(3)),
                    "loss_after": float(d.group(4))},
        "times_s": s["times_s"], "note": "row rebuilt from the run's log (run cut before RTE)",
    })
rte = RESULTS / "accuracy_table_rte.json"
if rte.is_file():
    rows += json.loads(rte.read_text())["rows"]
summary = write_results(rows, [r["task"] for r in rows], DistillConfig(), RESULTS / "accuracy_table", None)
print(markdown(rows, summary))
print(json.dumps(summary))
