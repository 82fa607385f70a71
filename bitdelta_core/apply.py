"""Base + artifact -> the fine-tune as the delta approximates it (in memory or as an HF folder)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .artifact import DeltaArtifact, load_artifact, parse_dtype
from .errors import BaseMismatchError, ModelLoadError
from .models import Fingerprinter, LoadedModel, ModelSource, load_model, load_tokenizer, resolve_class
from .codec import Codec

logger = logging.getLogger(__name__)


def check_base(base_state: Mapping[str, torch.Tensor], art: DeltaArtifact,
               fingerprinter: Fingerprinter | None = None) -> None:
    """Raise :class:`BaseMismatchError` unless ``base_state`` is the base ``art`` was made for."""
    for name in art.base["fingerprint_names"]:
        e = art.tensors.get(name)
        t = base_state.get(name)
        if t is None:
            raise BaseMismatchError(f"the base has no tensor {name!r}, which the delta needs")
        want = e.base_shape if (e is not None and e.codec == Codec.RESIZED) else (e.shape if e else None)
        if want is not None and tuple(t.shape) != tuple(want):
            raise BaseMismatchError(
                f"base tensor {name!r} has shape {tuple(t.shape)}, the delta expects {tuple(want)}"
            )
    fp = (fingerprinter or Fingerprinter(base_state)).fingerprint(art.base["fingerprint_names"])
    if fp != art.base["fingerprint"]:
        raise BaseMismatchError(
            f"the delta was made for base {art.base.get('name_or_path')!r} (fingerprint "
            f"{art.base['fingerprint'][:12]}), but this base's weights differ (fingerprint {fp[:12]})"
        )


def reconstruct(entry, base_tensor: torch.Tensor | None) -> torch.Tensor:
    """The fine-tuned tensor for one entry: ``base + α·sign(Δ)`` (computed in fp32) or dense."""
    dtype = parse_dtype(entry.dtype)
    if entry.codec == Codec.DENSE:
        return entry.dense.to(dtype).clone()
    if entry.codec == Codec.BASE:
        return base_tensor.to(dtype).clone()
    if entry.codec == Codec.SIGN1:
        return (base_tensor.float() + entry.sign.decode(torch.float32)).to(dtype)
    k = entry.sign.shape[0]
    shared = base_tensor[:k].float() + entry.sign.decode(torch.float32)
    parts = [shared.to(dtype)]
    if entry.dense is not None:
        parts.append(entry.dense.to(dtype))
    return torch.cat(parts, dim=0)


def apply_to_state_dict(base_state: Mapping[str, torch.Tensor], art: DeltaArtifact, *,
                        check: bool = True) -> dict[str, torch.Tensor]:
    """The fine-tune's full state dict (tied aliases included) from a base state dict."""
    if check:
        check_base(base_state, art)
    out: dict[str, torch.Tensor] = {}
    for name, e in art.tensors.items():
        out[name] = reconstruct(e, base_state.get(name))
    for alias, target in art.tied.items():
        out[alias] = out[target]
    return out


def _config_from_meta(art: DeltaArtifact):
    from transformers import AutoConfig

    cfg = dict(art.model.get("config") or {})
    model_type = cfg.pop("model_type", None) or art.model.get("model_type")
    if model_type is None:
        raise ModelLoadError("the artifact carries no model config; apply it to an nn.Module instead")
    return AutoConfig.for_model(model_type, **cfg)


def load_base_for(art: DeltaArtifact, base: ModelSource) -> LoadedModel:
    """Load ``base`` in the fine-tune's class (names then match the artifact's)."""
    arch = art.model.get("architecture")
    if isinstance(base, (str, os.PathLike)) and arch:
        kwargs = {"ignore_mismatched_sizes": True}
        if art.num_labels is not None:
            kwargs["num_labels"] = art.num_labels
        return load_model(base, cls=resolve_class(arch), **kwargs)
    return load_model(base)


def apply(base: ModelSource, art: DeltaArtifact | str | os.PathLike) -> nn.Module:
    """Return the fine-tuned model (``base + α·sign(Δ)`` per tensor) ready for inference.

    ``base`` may be an HF folder / hub id (loaded in the fine-tune's class) or an ``nn.Module``
    (updated in place and returned) of the same architecture.
    """
    if not isinstance(art, DeltaArtifact):
        art = load_artifact(art)
    b = load_base_for(art, base)
    state = apply_to_state_dict(b.base_tensors(), art)
    module = b.module
    if module is None:
        raise ModelLoadError("apply needs a model (HF path or nn.Module); use apply_to_state_dict for state dicts")
    current = module.state_dict()
    same_shapes = set(current) == set(state) and all(current[k].shape == state[k].shape for k in state)
    if not same_shapes:
        if not art.model.get("architecture"):
            bad = next((k for k in state if k not in current or current[k].shape != state[k].shape), None)
            raise BaseMismatchError(f"the base module's tensor {bad!r} does not match the delta")
        cfg = _config_from_meta(art)
        module = resolve_class(art.model["architecture"])(cfg)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BaseMismatchError(f"the delta does not cover the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(module, "config", None) is not None and art.model.get("config"):
        _update_config(module.config, art)
    return module.eval()


# Config fields that describe the file, not the model: never copied from the artifact.
_CONFIG_SKIP = {"transformers_version", "_name_or_path", "name_or_path", "architectures", "dtype", "torch_dtype",
                "id2label", "label2id", "problem_type", "num_labels"}


def _update_config(cfg, art: DeltaArtifact) -> None:
    """Make the base's config the fine-tune's: labels, problem type and every other changed field
    (e.g. a resized ``vocab_size``, a new ``pad_token_id``), so ``save_pretrained`` writes the
    fine-tune's config rather than the base's."""
    meta = art.model.get("config") or {}
    changed = {}
    for k, v in meta.items():
        if k in _CONFIG_SKIP or k.startswith("_") or isinstance(v, dict) and k.endswith("_config"):
            continue
        if hasattr(cfg, k) and getattr(cfg, k) != v:
            changed[k] = v
    if changed:
        logger.debug("config fields taken from the delta: %s", sorted(changed))
        cfg.update(changed)
    if art.id2label():
        cfg.id2label = art.id2label()
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    cfg.problem_type = art.model.get("problem_type")
    if art.model.get("architecture"):
        cfg.architectures = [art.model["architecture"]]


def export(base: ModelSource, art: DeltaArtifact | str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the applied fine-tune as a standalone HF folder (``from_pretrained`` loads it)."""
    if not isinstance(art, DeltaArtifact):
        art = load_artifact(art)
    model = apply(base, art)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok = load_tokenizer(base) if isinstance(base, (str, os.PathLike)) else None
    if tok is not None:
        for a in (art.tokenizer or {}).get("added_tokens") or []:
            tok.add_tokens([a["content"]], special_tokens=bool(a.get("special")))
            got = tok.convert_tokens_to_ids(a["content"])
            if a.get("id") is not None and got != a["id"]:
                logger.warning("added token %r got id %s, the fine-tune had %s", a["content"], got, a["id"])
        tok.save_pretrained(out)
    elif art.tokenizer:
        logger.warning("the delta records added tokens but the base has no tokenizer files; none exported")
    logger.info("exported fine-tune to %s", out)
    return out
