"""Loading models and state dicts from HF folders, hub ids, ``nn.Module`` objects or dicts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
from torch import nn

from .errors import ModelLoadError

logger = logging.getLogger(__name__)

ModelSource = Union[str, os.PathLike, nn.Module, Mapping[str, torch.Tensor]]


@dataclass
class LoadedModel:
    """A state dict plus what we know about where it came from.

    ``present`` is the set of names whose values really come from the checkpoint (for a base
    loaded into a fine-tune's class, the new head is *not* present); ``None`` means all.
    """

    state: dict[str, torch.Tensor]
    module: nn.Module | None = None
    config: Any = None  # transformers PretrainedConfig or None
    name_or_path: str | None = None
    present: set[str] | None = None
    tied: dict[str, str] = field(default_factory=dict)  # alias -> canonical

    def base_tensors(self) -> dict[str, torch.Tensor]:
        if self.present is None:
            return self.state
        return {k: v for k, v in self.state.items() if k in self.present}


def find_tied(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each alias to the first name (in order) that shares its storage, shape and offset."""
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# Files whose presence means a folder really ships a tokenizer. transformers 5 otherwise builds an
# *empty* tokenizer from config.json alone, which would make every real token look "added".
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "merges.txt",
)


def has_tokenizer_files(path) -> bool:
    """True if ``path`` is a local folder holding tokenizer files."""
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES
    )


def load_tokenizer(path):
    """The tokenizer of a local folder that ships one, else ``None`` (never an empty stand-in)."""
    if not has_tokenizer_files(path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        logger.warning("cannot load the tokenizer of %s: %s", path, e)
        return None


def require_tokenizer(path):
    """The tokenizer of a folder or hub id; :class:`ModelLoadError` naming the path when it has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise ModelLoadError(f"cannot load a tokenizer from {os.fspath(path)!r}: {e}") from None


def _looks_local(path: str) -> bool:
    """A string that can only be a filesystem path (not a hub id ``org/name``)."""
    return (
        os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path or path.count("/") > 1
        or path.endswith(".safetensors") or not _HUB_ID.fullmatch(path)
    )


def _is_path_like(src) -> bool:
    return isinstance(src, (str, os.PathLike))


def resolve_class(architecture: str):
    import transformers

    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise ModelLoadError(f"transformers has no model class {architecture!r}")
    return cls


def _class_for_path(path: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise ModelLoadError(f"cannot load a model config from {path!r}: {e}") from None
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ModelLoadError(f"{path!r}: config.json names no architecture; pass the model class explicitly")
    return resolve_class(archs[0]), config


def load_model(src: ModelSource, cls=None, **kwargs) -> LoadedModel:
    """Load ``src``. Paths/hub ids are loaded with ``cls`` (default: the config's architecture)."""
    if isinstance(src, nn.Module):
        state = src.state_dict()
        return LoadedModel(dict(state), src, getattr(src, "config", None),
                           getattr(getattr(src, "config", None), "name_or_path", None) or type(src).__name__,
                           None, find_tied(state))
    if isinstance(src, Mapping):
        state = {k: v for k, v in src.items()}
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise ModelLoadError(f"state dict entry {k!r} is not a tensor")
        return LoadedModel(state, None, None, None, None, find_tied(state))
    if not _is_path_like(src):
        raise ModelLoadError(f"cannot load a model from an object of type {type(src).__name__}")
    path = os.path.expanduser(os.fspath(src))
    if not path:
        raise ModelLoadError("empty model path")
    if not os.path.exists(path):
        if _looks_local(path):
            raise ModelLoadError(f"model path {path!r} does not exist")
        logger.debug("%s is not a local path; trying it as a hub id", path)
    elif os.path.isfile(path):
        return _load_safetensors_file(path)
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{path!r} is a folder without config.json (not a Hugging Face model folder)")
    if cls is None:
        cls, _ = _class_for_path(path)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {cls.__name__} from {path!r}: {e}") from None
    model.eval()
    state = model.state_dict()
    not_loaded = set(info.get("missing_keys", ())) | {k for k, *_ in _mismatched(info)}
    present = {k for k in state if k not in not_loaded}
    logger.debug("loaded %s from %s (%d tensors, %d not in checkpoint)", cls.__name__, path, len(state), len(not_loaded))
    return LoadedModel(dict(state), model, model.config, path, present, find_tied(state))


def _load_safetensors_file(path: str) -> LoadedModel:
    """A bare ``.safetensors`` state dict (no module, no config)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path!r} is not a readable safetensors state dict: {e}") from None
    return LoadedModel(state, None, None, path, None, {})


def _mismatched(info) -> list:
    out = []
    for m in info.get("mismatched_keys", ()) or ():
        out.append(m if isinstance(m, (tuple, list)) else (m,))
    return out


def tensor_digest(t: torch.Tensor) -> str:
    """Digest of a tensor's values (as float32 for floats, so fp16/bf16 copies of a base match)."""
    t = t.detach()
    if t.is_floating_point():
        t = t.float()
    t = t.contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(t.shape)).encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    return h.hexdigest()


class Fingerprinter:
    """Per-tensor digests of a base, cached, combined over any subset of names."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._state = state
        self._cache: dict[str, str] = {}

    def digest(self, name: str) -> str:
        d = self._cache.get(name)
        if d is None:
            d = self._cache[name] = tensor_digest(self._state[name])
        return d

    def fingerprint(self, names) -> str:
        h = hashlib.blake2b(digest_size=16)
        for n in sorted(names):
            h.update(json.dumps([n, self.digest(n)]).encode())
        return h.hexdigest()
