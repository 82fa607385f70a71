"""Classification heads: the model class, each tenant's head, the head parameters, logits to predictions."""

from __future__ import annotations

import os

import torch

from ..artifact import DeltaArtifact
from ..errors import ModelLoadError
from ..models import resolve_class
from .tenants import Prediction, Tenant


def _seqcls_class(base) -> type:
    """The sequence-classification class for a base folder or hub id (its config's architecture)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        cfg = AutoConfig.from_pretrained(os.fspath(base))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the base config from {os.fspath(base)!r}: {e}") from None
    for arch in getattr(cfg, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return resolve_class(arch)
    mapping = AutoModelForSequenceClassification._model_mapping
    try:
        return mapping[type(cfg)]
    except KeyError:
        raise ModelLoadError(f"{cfg.model_type!r} has no sequence-classification class") from None


def _find_head_params(layer_params: dict[str, dict[str, tuple[int, ...]]], config) -> set[str]:
    """Linear output layers whose width is the number of labels (may differ per tenant)."""
    n = getattr(config, "num_labels", None)
    heads = set()
    for mname, params in layer_params.items():
        w = params.get("weight")
        if w is not None and len(w) == 2 and w[0] == n:
            heads.add(f"{mname}.weight")
            if "bias" in params:
                heads.add(f"{mname}.bias")
    return heads


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _head_info(art: DeltaArtifact, config) -> tuple[int, dict[int, str], str]:
    num_labels = art.num_labels or getattr(config, "num_labels", 2)
    id2label = art.id2label() or {i: f"LABEL_{i}" for i in range(num_labels)}
    problem = art.model.get("problem_type")
    if problem is None:
        problem = "regression" if num_labels == 1 else "single_label_classification"
    return num_labels, id2label, problem


def _postprocess(row: torch.Tensor, t: Tenant, all_scores: bool) -> Prediction:
    if t.problem_type == "regression":
        return Prediction(label=None, score=float(row[0]), scores=None)
    probs = torch.sigmoid(row) if t.problem_type == "multi_label_classification" else torch.softmax(row, -1)
    k = int(torch.argmax(probs))
    scores = {t.id2label[i]: float(probs[i]) for i in range(t.num_labels)} if all_scores else None
    return Prediction(label=t.id2label[k], score=float(probs[k]), scores=scores)
