"""Two models in -> :class:`~bitdelta_core.artifact.DeltaArtifact` out.

>>> art = compress("path/to/base", "path/to/finetuned")          # doctest: +SKIP
>>> art.save("sst2.safetensors")                                  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from .artifact import DeltaArtifact, TensorEntry, dtype_name
from .codec import encode
from .errors import ArchitectureMismatchError
from .models import Fingerprinter, LoadedModel, ModelSource, load_model
from .select import Codec, CompressionConfig, TensorPlan, decide

logger = logging.getLogger(__name__)


def load_pair(base: ModelSource, finetuned: ModelSource) -> tuple[LoadedModel, LoadedModel]:
    """Load the fine-tune, then the base *in the fine-tune's class* so parameter names agree."""
    ft = load_model(finetuned)
    cls = type(ft.module) if ft.module is not None and ft.config is not None else None
    if isinstance(base, (str,)) or hasattr(base, "__fspath__"):
        kwargs = {}
        if ft.config is not None and getattr(ft.config, "num_labels", None) is not None:
            kwargs["num_labels"] = ft.config.num_labels
        b = load_model(base, cls=cls, **kwargs) if cls is not None else load_model(base)
    else:
        b = load_model(base)
    _check_same_architecture(b, ft)
    return b, ft


def _check_same_architecture(base: LoadedModel, ft: LoadedModel) -> None:
    """Fail loudly when the two state dicts clearly come from different architectures."""
    bt = base.base_tensors()
    if not bt:
        raise ArchitectureMismatchError("the base model has no tensors")
    shared = [n for n in ft.state if n in bt]
    if not shared:
        raise ArchitectureMismatchError(
            f"no tensor name is shared: fine-tune starts with {next(iter(ft.state))!r}, "
            f"base with {next(iter(bt))!r}; the models have different architectures"
        )
    if len(shared) < 0.5 * len(bt):
        missing = next(n for n in bt if n not in ft.state)
        raise ArchitectureMismatchError(
            f"only {len(shared)}/{len(bt)} base tensors exist in the fine-tune (first missing: {missing!r}); "
            "the models have different architectures"
        )
    for n in shared:
        a, b = bt[n], ft.state[n]
        if a.dim() != b.dim() or (a.dim() >= 2 and a.shape[1:] != b.shape[1:]) or (a.dim() < 2 and a.shape != b.shape):
            raise ArchitectureMismatchError(
                f"tensor {n!r} has shape {tuple(a.shape)} in the base but {tuple(b.shape)} in the fine-tune; "
                "the models have different architectures"
            )


def plan(base: ModelSource | LoadedModel, finetuned: ModelSource | LoadedModel,
         config: CompressionConfig | None = None) -> list[TensorPlan]:
    """Dry run: the codec decision for every fine-tuned tensor, nothing encoded."""
    b, ft = _as_pair(base, finetuned)
    return decide(ft.state, b.base_tensors(), config or CompressionConfig(), ft.tied)


def _as_pair(base, finetuned):
    if isinstance(base, LoadedModel) and isinstance(finetuned, LoadedModel):
        _check_same_architecture(base, finetuned)
        return base, finetuned
    return load_pair(base, finetuned)


def model_info(ft: LoadedModel) -> dict[str, Any]:
    cfg = ft.config
    if cfg is None:
        return {"architecture": None, "module_class": type(ft.module).__name__ if ft.module is not None else None}
    arch = type(ft.module).__name__ if ft.module is not None else (getattr(cfg, "architectures", None) or [None])[0]
    id2label = getattr(cfg, "id2label", None)
    return {
        "architecture": arch,
        "model_type": getattr(cfg, "model_type", None),
        "config": json.loads(cfg.to_json_string(use_diff=False)),
        "num_labels": getattr(cfg, "num_labels", None),
        "id2label": {str(k): v for k, v in id2label.items()} if id2label else None,
        "problem_type": getattr(cfg, "problem_type", None),
    }


def tokenizer_diff(base_path: Any, ft_path: Any) -> dict[str, Any] | None:
    """Tokens the fine-tune's tokenizer adds over the base's (None if same or unknown)."""
    if not isinstance(base_path, str) or not isinstance(ft_path, str):
        return None
    try:
        from transformers import AutoTokenizer

        tb = AutoTokenizer.from_pretrained(base_path)
        tf = AutoTokenizer.from_pretrained(ft_path)
    except Exception:  # noqa: BLE001 - a folder without tokenizer files is fine
        return None
    base_vocab = tb.get_vocab()
    added = []
    special = set(getattr(tf, "all_special_tokens", []) or [])
    for tok, _ in sorted(tf.get_vocab().items(), key=lambda kv: kv[1]):
        if tok not in base_vocab:
            added.append({"content": tok, "special": tok in special})
    return {"added_tokens": added} if added else None


def compress(
    base: ModelSource | LoadedModel,
    finetuned: ModelSource | LoadedModel,
    config: CompressionConfig | None = None,
    *,
    progress: bool = True,
) -> DeltaArtifact:
    """Compress ``finetuned`` against ``base`` (HF folders/hub ids, ``nn.Module`` or state dicts)."""
    config = config or CompressionConfig()
    b, ft = _as_pair(base, finetuned)
    plans = decide(ft.state, b.base_tensors(), config, ft.tied)
    base_state = b.base_tensors()
    entries: dict[str, TensorEntry] = {}
    fp_names: list[str] = []
    num_params = 0
    for p in tqdm(plans, desc="compress", unit="tensor", disable=not progress, leave=False):
        if p.tied_to is not None:
            continue
        t = ft.state[p.name]
        num_params += t.numel()
        e = TensorEntry(p.codec, p.shape, dtype_name(t.dtype), base_shape=p.base_shape)
        if p.codec == Codec.BASE:
            fp_names.append(p.name)
        elif p.codec == Codec.SIGN1:
            e.sign = encode(t.float() - base_state[p.name].float(), config.granularity, config.scale_torch_dtype)
            fp_names.append(p.name)
        elif p.codec == Codec.RESIZED:
            bt = base_state[p.name]
            k = min(bt.shape[0], t.shape[0])
            e.sign = encode(t[:k].float() - bt[:k].float(), config.granularity, config.scale_torch_dtype)
            if t.shape[0] > k:
                e.dense = t[k:].to(config.dense_torch_dtype(t)).clone()
            fp_names.append(p.name)
        else:  # DENSE
            e.dense = t.detach().to(config.dense_torch_dtype(t)).clone()
        entries[p.name] = e
    fp = Fingerprinter(base_state)
    art = DeltaArtifact(
        tensors=entries,
        base={
            "name_or_path": b.name_or_path,
            "fingerprint": fp.fingerprint(fp_names),
            "fingerprint_names": sorted(fp_names),
        },
        model=model_info(ft),
        tokenizer=tokenizer_diff(b.name_or_path, ft.name_or_path),
        tied=dict(ft.tied),
        num_parameters=num_params,
        compression=config.to_dict(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    logger.info(
        "compressed %d tensors (%s): %.3f MB payload, %.3f bits/param",
        len(entries), _codec_counts(entries), art.stored_bytes() / 1e6,
        art.stored_bytes() * 8 / max(num_params, 1),
    )
    return art


def _codec_counts(entries: dict[str, TensorEntry]) -> str:
    counts: dict[str, int] = {}
    for e in entries.values():
        counts[e.codec.value] = counts.get(e.codec.value, 0) + 1
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def bits_per_parameter(file_bytes: int, art: DeltaArtifact) -> float:
    return file_bytes * 8 / max(art.num_parameters, 1)


__all__ = ["compress", "plan", "load_pair", "bits_per_parameter"]
