"""Accuracy, the task's own metric, and agreement with the original fine-tune.

Metrics (plain numpy, checked against hand-computed values in the tests):

* ``accuracy``  = mean(pred == label)
* ``mcc``       Matthews correlation (binary or multi-class, Gorodkin's R_K); 0 when undefined
* ``f1``        F1 of the positive class (id 1), as GLUE reports for MRPC/QQP; 0 when undefined
* ``pearson``   Pearson r of the scalar output vs the gold score (STS-B); 0 when undefined

``agreement`` of a compressed model = fraction of examples whose predicted class equals the
original fine-tune's prediction (for regression: Pearson r between the two outputs).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import TextDataset
from .errors import DataError, ModelLoadError
from .finetune import encode_texts, length_batches
from .models import require_tokenizer

logger = logging.getLogger(__name__)


# ---- metrics ------------------------------------------------------------------------------


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    _check_same_len(pred, gold)
    return float((pred == gold).mean())


def matthews_corrcoef(pred, gold) -> float:
    pred, gold = np.asarray(pred, dtype=np.int64), np.asarray(gold, dtype=np.int64)
    _check_same_len(pred, gold)
    k = int(max(pred.max(), gold.max())) + 1
    c = np.zeros((k, k), dtype=np.float64)  # c[true, pred]
    np.add.at(c, (gold, pred), 1)
    t, p = c.sum(1), c.sum(0)
    n, correct = c.sum(), np.trace(c)
    num = correct * n - (t * p).sum()
    den = np.sqrt(n * n - (p * p).sum()) * np.sqrt(n * n - (t * t).sum())
    return float(num / den) if den > 0 else 0.0


def f1_score(pred, gold, positive: int = 1) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    _check_same_len(pred, gold)
    tp = float(((pred == positive) & (gold == positive)).sum())
    fp = float(((pred == positive) & (gold != positive)).sum())
    fn = float(((pred != positive) & (gold == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _check_same_len(x, y)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def _check_same_len(a, b) -> None:
    if a.shape != b.shape or a.size == 0:
        raise DataError(f"metric inputs must be non-empty and the same length, got {a.shape} and {b.shape}")


def task_metric(name: str, pred, gold) -> float:
    fns = {"accuracy": accuracy, "mcc": matthews_corrcoef, "f1": f1_score, "pearson": pearson}
    try:
        return fns[name](pred, gold)
    except KeyError:
        raise DataError(f"unknown metric {name!r}; known: {sorted(fns)}") from None


# ---- prediction ---------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(model, tokenizer, ds: TextDataset, *, batch_size: int = 64, max_length: int = 128,
                   progress: bool = True, desc: str = "eval") -> torch.Tensor:
    """Logits ``(N, num_labels)`` in dataset order (batches sorted by length for speed)."""
    model.eval()
    out = torch.empty(len(ds), model.config.num_labels)
    batches = length_batches(ds.texts, batch_size, shuffle=False)
    for b in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        enc = encode_texts(tokenizer, [ds.texts[i] for i in b], max_length)
        out[torch.tensor(b)] = model(**enc).logits.float()
    return out


def outputs_to_predictions(logits: torch.Tensor, regression: bool) -> np.ndarray:
    return logits[:, 0].numpy() if regression else logits.argmax(-1).numpy()


def score(pred: np.ndarray, ds: TextDataset, reference: np.ndarray | None = None) -> dict:
    """Accuracy (classification), the task metric and agreement with ``reference`` predictions."""
    gold = np.asarray(ds.labels)
    metric = ds.task.metric if not ds.is_regression else "pearson"
    r: dict = {"metric_name": metric, "metric": task_metric(metric, pred, gold)}
    r["accuracy"] = None if ds.is_regression else accuracy(pred, gold)
    if reference is not None:
        r["agreement"] = pearson(pred, reference) if ds.is_regression else accuracy(pred, reference)
    return r


def _load_classifier(path):
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(os.fspath(path)).eval()
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a sequence classifier from {os.fspath(path)!r}: {e}") from None


def weights_bytes(folder: str | os.PathLike) -> int:
    """Bytes of an HF folder's weight files (``*.safetensors`` / ``*.bin``)."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin"]
    return sum(p.stat().st_size for p in files)


def evaluate(
    base: str | os.PathLike | None,
    finetuned: str | os.PathLike,
    ds: TextDataset,
    deltas: Mapping[str, str | os.PathLike] | None = None,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> dict:
    """Evaluate the original fine-tune and each delta artifact (``name -> path``) on ``ds``.

    Returns ``{"task", "metric_name", "examples", "models": {name: {accuracy, metric, agreement,
    bytes, bits_per_parameter?, wall_s}}}``; the original is named ``"original"``.
    """
    from .apply import apply
    from .artifact import load_artifact

    deltas = dict(deltas or {})
    if deltas and base is None:
        raise DataError("evaluating a delta needs its base model")
    tok = require_tokenizer(finetuned)
    t0 = time.perf_counter()
    model = _load_classifier(finetuned)
    ds.check_num_labels(model.config.num_labels, f"fine-tune {os.fspath(finetuned)!r}")
    ref_logits = predict_logits(model, tok, ds, batch_size=batch_size, max_length=max_length,
                                progress=progress, desc="eval original")
    ref = outputs_to_predictions(ref_logits, ds.is_regression)
    n_params = sum(p.numel() for p in model.state_dict().values())
    full = weights_bytes(finetuned)
    models = {"original": {**score(ref, ds), "agreement": 1.0, "bytes": full,
                           "bits_per_parameter": full * 8 / n_params, "wall_s": time.perf_counter() - t0}}
    del model
    for name, path in deltas.items():
        t0 = time.perf_counter()
        art = load_artifact(path)
        if art.num_labels is not None and art.num_labels != ds.num_labels:
            raise DataError(f"{ds.source}: the data has {ds.num_labels} label(s) but delta {name!r} "
                            f"({os.fspath(path)}) has a {art.num_labels}-way head")
        m = apply(base, art)
        logits = predict_logits(m, tok, ds, batch_size=batch_size, max_length=max_length,
                                progress=progress, desc=f"eval {name}")
        pred = outputs_to_predictions(logits, ds.is_regression)
        size = os.path.getsize(path)
        models[name] = {**score(pred, ds, ref), "bytes": size,
                        "bits_per_parameter": size * 8 / max(art.num_parameters, 1),
                        "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
                        "wall_s": time.perf_counter() - t0}
        del m
    for name, r in models.items():
        logger.info("%s: %s=%.4f accuracy=%s agreement=%.4f bytes=%d", name, r["metric_name"], r["metric"],
                    r["accuracy"], r["agreement"], r["bytes"])
    return {"task": ds.task.name, "source": ds.source, "metric_name": models["original"]["metric_name"],
            "examples": len(ds), "num_parameters": n_params, "models": models}


__all__ = ["accuracy", "matthews_corrcoef", "f1_score", "pearson", "task_metric", "predict_logits",
           "score", "evaluate", "weights_bytes"]
