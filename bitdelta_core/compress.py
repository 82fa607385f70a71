"""Two models in -> :class:`~bitdelta_core.artifact.DeltaArtifact` out.

>>> art = compress("path/to/base", "path/to/finetuned")          # doctest: +SKIP
>>> art.save("sst2.safetensors")                                  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from .artifact import DeltaArtifact, TensorEntry
from .codec import Codec, codec_counts, format_counts
from .dtypes import dtype_name
from .codec import encode
from .errors import ArchitectureMismatchError, ModelLoadError
from .models import Fingerprinter, LoadedModel, ModelSource, load_model, load_tokenizer
from .select import CompressionConfig, TensorPlan, decide

logger = logging.getLogger(__name__)


def load_pair(base: ModelSource, finetuned: ModelSource) -> tuple[LoadedModel, LoadedModel]:
    """Load the fine-tune, then the base *in the fine-tune's class* so parameter names agree.

    A base checkpoint without the fine-tune's head (a bare ``BertModel`` for a
    ``BertForSequenceClassification``) loads fine: the head's tensors are marked as not present
    and stored densely. A base head of another size is ignored the same way.
    """
    ft = load_model(finetuned)
    cls = type(ft.module) if ft.module is not None and ft.config is not None else None
    if isinstance(base, (str, os.PathLike)) and cls is not None:
        kwargs: dict[str, Any] = {"ignore_mismatched_sizes": True}
        if getattr(ft.config, "num_labels", None) is not None:
            kwargs["num_labels"] = ft.config.num_labels
        b = load_model(base, cls=cls, **kwargs)
    else:
        b = load_model(base)
    b = _align_prefix(b, ft)
    _check_same_architecture(b, ft)
    return b, ft


def _align_prefix(base: LoadedModel, ft: LoadedModel) -> LoadedModel:
    """Rename a bare backbone's tensors (``embeddings.*``) to the fine-tune's (``bert.embeddings.*``).

    Only when no name is shared as is and every base name exists in the fine-tune under the
    fine-tune's ``base_model_prefix``; otherwise ``base`` is returned unchanged.
    """
    prefix = getattr(ft.module, "base_model_prefix", None)
    if not prefix or any(n in ft.state for n in base.state):
        return base
    renamed = {f"{prefix}.{n}": t for n, t in base.state.items()}
    if not all(n in ft.state for n in renamed):
        return base
    present = None if base.present is None else {f"{prefix}.{n}" for n in base.present}
    tied = {f"{prefix}.{a}": f"{prefix}.{c}" for a, c in base.tied.items()}
    logger.info("base tensors renamed with prefix %r to match the fine-tune", prefix)
    return LoadedModel(renamed, base.module, base.config, base.name_or_path, present, tied)


def _check_same_architecture(base: LoadedModel, ft: LoadedModel) -> None:
    """Fail loudly when the two state dicts clearly come from different architectures.

    Allowed differences: tensors only one side has (a new head), and a changed first dimension
    (a resized vocabulary or position table). Any other shape change names the first mismatching
    tensor in the fine-tune's order.
    """
    bt = base.base_tensors()
    if not bt:
        raise ArchitectureMismatchError("the base model has no tensors")
    shared = [n for n in ft.state if n in bt]
    if not shared:
        raise ArchitectureMismatchError(
            f"no tensor name is shared: fine-tune starts with {next(iter(ft.state), None)!r}, "
            f"base with {next(iter(bt))!r}; the models have different architectures"
        )
    if len(shared) < 0.5 * len(bt):
        missing = next(n for n in bt if n not in ft.state)
        raise ArchitectureMismatchError(
            f"only {len(shared)}/{len(bt)} base tensors exist in the fine-tune (first missing: {missing!r}); "
            "the models have different architectures"
        )
    first_diff = None
    for n in shared:
        a, b = bt[n], ft.state[n]
        if a.shape == b.shape:
            continue
        first_diff = first_diff or n
        if a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
            raise ArchitectureMismatchError(
                f"tensor {first_diff!r} has shape {tuple(bt[first_diff].shape)} in the base but "
                f"{tuple(ft.state[first_diff].shape)} in the fine-tune (and {n!r}: {tuple(a.shape)} vs "
                f"{tuple(b.shape)}); the models have different architectures"
            )


def plan(base: ModelSource | LoadedModel, finetuned: ModelSource | LoadedModel,
         config: CompressionConfig | None = None) -> list[TensorPlan]:
    """Dry run: the codec decision for every fine-tuned tensor, nothing encoded."""
    b, ft = _as_pair(base, finetuned)
    return decide(ft.state, b.base_tensors(), config or CompressionConfig(), ft.tied)


def _as_pair(base, finetuned):
    if isinstance(base, LoadedModel) and isinstance(finetuned, LoadedModel):
        base = _align_prefix(base, finetuned)
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
    """Tokens the fine-tune's tokenizer adds over the base's, with their ids (None if same/unknown).

    Only local folders that really ship tokenizer files are compared (transformers 5 would
    otherwise build an empty tokenizer from ``config.json`` and every token would look added).
    ``added_tokens`` is in id order; :func:`bitdelta_core.apply.export` re-adds them in that order.
    """
    if base_path is None or ft_path is None:
        return None
    if os.path.abspath(os.fspath(base_path)) == os.path.abspath(os.fspath(ft_path)):
        return None
    tb, tf = load_tokenizer(base_path), load_tokenizer(ft_path)
    if tb is None or tf is None:
        return None
    base_vocab = tb.get_vocab()
    special = set(getattr(tf, "all_special_tokens", []) or [])
    added = [
        {"content": tok, "id": int(i), "special": tok in special}
        for tok, i in sorted(tf.get_vocab().items(), key=lambda kv: kv[1])
        if tok not in base_vocab
    ]
    if len(added) > 0.5 * max(len(base_vocab), 1):
        logger.warning("the fine-tune's tokenizer differs from the base's in %d tokens; not a token "
                       "extension, recording no tokenizer diff", len(added))
        return None
    return {"added_tokens": added, "base_vocab_size": len(base_vocab)} if added else None


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
    base_state = b.base_tensors()
    plans = decide(ft.state, base_state, config, ft.tied, check_identical=False)
    fp = Fingerprinter(base_state)
    # The base fingerprint (a hash of every base tensor the delta relies on) is computed in a
    # background thread while the main thread encodes; hashlib releases the GIL.
    needed = [p.name for p in plans if p.tied_to is None and p.codec in (Codec.BASE, Codec.SIGN1, Codec.RESIZED)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fingerprint") as pool:
        hashing = pool.submit(lambda: [fp.digest(n) for n in needed])
        entries, fp_names, num_params = _encode_all(plans, ft, base_state, config, progress)
        hashing.result()
    fingerprint = fp.fingerprint(fp_names)
    art = DeltaArtifact(
        tensors=entries,
        base={
            "name_or_path": b.name_or_path,
            "fingerprint": fingerprint,
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
        len(entries), format_counts(codec_counts(e.codec for e in entries.values())), art.stored_bytes() / 1e6,
        art.stored_bytes() * 8 / max(num_params, 1),
    )
    return art


def _encode_all(plans: list[TensorPlan], ft: LoadedModel, base_state: dict[str, torch.Tensor],
                config: CompressionConfig, progress: bool) -> tuple[dict[str, TensorEntry], list[str], int]:
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
            delta = t.detach().float() - base_state[p.name].detach().float()
            e.sign = encode(delta, config.granularity, config.scale_torch_dtype)
            _check_scale(e.sign, p.name)
            if not e.sign.scale.any() and not delta.any():  # identical to the base after all
                e = TensorEntry(Codec.BASE, p.shape, e.dtype, base_shape=p.base_shape)
            fp_names.append(p.name)
        elif p.codec == Codec.RESIZED:
            bt = base_state[p.name]
            k = min(bt.shape[0], t.shape[0])
            e.sign = encode(t[:k].detach().float() - bt[:k].detach().float(), config.granularity,
                            config.scale_torch_dtype)
            _check_scale(e.sign, p.name)
            if t.shape[0] > k:
                e.dense = t[k:].detach().to(config.dense_torch_dtype(t)).clone()
            fp_names.append(p.name)
        else:  # DENSE
            e.dense = t.detach().to(config.dense_torch_dtype(t)).clone()
        entries[p.name] = e
    return entries, fp_names, num_params


def _check_scale(sign, name: str) -> None:
    if not torch.isfinite(sign.scale).all():
        raise ModelLoadError(f"tensor {name!r}: the fine-tune or the base holds NaN/Inf values")


def bits_per_parameter(file_bytes: int, art: DeltaArtifact) -> float:
    return file_bytes * 8 / max(art.num_parameters, 1)


__all__ = ["compress", "plan", "load_pair", "bits_per_parameter"]
