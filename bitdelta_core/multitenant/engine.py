"""The engine: the base model, the tenant pool and its lifecycle, tokenization and the batched forward."""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import threading
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from .. import cpu_kernel as cpu_kernel_mod
from ..apply import check_base
from ..artifact import DeltaArtifact, artifact_from_bytes, load_artifact
from ..codec import Codec, Granularity, SignDelta
from ..dtypes import FLOAT_DTYPES
from ..errors import (
    BaseMismatchError,
    InputTooLongError,
    InvalidInputError,
    ModelExistsError,
    ModelLoadError,
    UnknownModelError,
)
from ..models import Fingerprinter, load_model, load_tokenizer, require_tokenizer
from ..naming import NAME_PATTERN
from .cache import DerivedCache, WorkingCache
from .context import BatchContext, NeedsSplitError, _Runtime, packed_tokens
from .heads import _find_head_params, _head_info, _logits, _postprocess, _seqcls_class
from .layers import TenantLayer, _replace_submodule, _run_per_group, _scatter_rows, wrap
from .selfcheck import run_self_check
from .tenants import BASE_SLOT, ParamDelta, Prediction, Tenant, TenantInfo

logger = logging.getLogger(__name__)

# with the compiled CPU kernel, a tenant group of at least this many tokens in a batch runs on
# merged weights (from the cache when the tenant is admitted) rather than fused: measured on the
# 2-core benchmark machine, fused tiles tie with merged weights at 512 tokens per group and lose
# ~8 % on MiniLM at 2,048 (one tenant for a whole 32 x 64 batch)
FUSED_MAX_TOKENS = 1024


class MultiTenantEngine:
    """One base model + a pool of 1-bit deltas; ``classify`` mixes tenants in one forward.

    >>> eng = MultiTenantEngine("path/to/base")                       # doctest: +SKIP
    >>> eng.register("sst2", "sst2.safetensors")                      # doctest: +SKIP
    >>> eng.classify(["great movie", "bad movie"], ["sst2", "sst2"])  # doctest: +SKIP
    """

    def __init__(
        self,
        base: str | os.PathLike | nn.Module,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        cache_bytes: int = 1 << 30,
        derived_cache_bytes: int = 1 << 30,
        max_length: int | None = None,
        tokenizer: Any = None,
        self_check: bool = True,
        stacked: bool | None = None,
        cpu_kernel: bool | None = None,
        triton_kernel: bool | None = None,
        skip_padding: bool = True,
    ):
        if dtype not in FLOAT_DTYPES:
            raise InvalidInputError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = FLOAT_DTYPES[dtype]
        # stacked (batched-matmul) Linear path: fewer kernel launches, but it copies every
        # group's weights per layer, which pays on GPUs and not on memory-bound CPUs
        self.stacked = self.device.type == "cuda" if stacked is None else bool(stacked)
        # fused CPU Linear (compiled, optional): None = use it when it builds, unless
        # BITDELTA_CPU_KERNEL=0; True = require it; False = plain PyTorch only
        self._kernel = None
        self.fused_max_tokens = FUSED_MAX_TOKENS
        if cpu_kernel or (cpu_kernel is None and cpu_kernel_mod.env_enabled()):
            if self.device.type == "cpu" and self.dtype == torch.float32:
                self._kernel = cpu_kernel_mod.load(required=bool(cpu_kernel))
            elif cpu_kernel:
                raise cpu_kernel_mod.KernelUnavailableError(
                    f"the compiled kernel runs float32 on CPU only, not {dtype} on {self.device}")
        # one-launch Triton kernels (optional dependency): None = use them on CUDA when triton
        # imports, unless BITDELTA_TRITON=0; True = require them; False = never
        self._triton = self._triton_module(triton_kernel)
        self._triton_tables = self._triton.DeltaTables(self.device) if self._triton is not None else None
        if isinstance(base, nn.Module):
            loaded = load_model(base)
            self.architecture = type(base).__name__
        else:
            cls = _seqcls_class(base)
            loaded = load_model(base, cls=cls)
            self.architecture = cls.__name__
        self.base_name = loaded.name_or_path or self.architecture
        model = loaded.module.eval()
        base_state = loaded.base_tensors()
        # fingerprint digests are taken in the checkpoint's precision, before any cast: a cast
        # (.to(dtype/device) below) makes new tensors and these references keep the originals;
        # without one they are the model's own tensors (no second copy of the base in memory)
        self._fingerprinter = Fingerprinter({k: v.detach() for k, v in base_state.items()})
        self._base_state_shapes = {k: tuple(v.shape) for k, v in loaded.state.items()}
        model.to(device=self.device, dtype=self.dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.config = getattr(model, "config", None)
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(base)
        self.max_length = int(max_length or self._default_max_length())
        self._lock = threading.RLock()
        self._tenants: dict[str, Tenant] = {}
        self._by_slot: dict[int, Tenant] = {}
        self._next_slot = 0
        self._cache = WorkingCache(cache_bytes)
        const_ids = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        self._rt = _Runtime(self._cache, DerivedCache(derived_cache_bytes), self._kernel, const_ids,
                            self._triton, self._triton_tables)
        self._wrap_layers()
        self._validated: weakref.WeakValueDictionary[int, DeltaArtifact] = weakref.WeakValueDictionary()
        self.base_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        # how mixed batches run (decided by the self-check): "mixed" = one forward for the whole
        # batch, the modules in ``per_group_modules`` once per tenant group inside it;
        # "fallback" = one forward per tenant group on the group's weights (still one base and
        # the packed pool in memory)
        self.path = "mixed"
        self.per_group_modules: list[str] = []
        self.self_check_error: float | None = None
        # Linear layers compute a padded batch's real tokens only (PackedTokens): set by the
        # self-check on the mixed CPU path where it proves the real tokens never read the padding
        self.skip_padding = False
        if self_check:
            run_self_check(self, skip_padding=skip_padding and self._triton is None and not self.stacked)
        logger.info("engine ready: %s (%s) on %s/%s, %.1f MB base, %s, %s path%s, padding %s", self.architecture,
                    self.base_name, self.device, dtype, self.base_bytes / 1e6,
                    "compiled CPU kernel" if self._kernel is not None else
                    "Triton kernels" if self._triton is not None else "plain PyTorch layers", self.path,
                    f" ({len(self.per_group_modules)} modules per tenant group: "
                    f"{', '.join(sorted(set(self.per_group_modules)))})" if self.per_group_modules else "",
                    "skipped" if self.skip_padding else "computed")

    # -- construction helpers ----------------------------------------------------------------
    def _triton_module(self, wanted: bool | None):
        """:mod:`.triton_kernel` when the engine runs its kernels, else None (``wanted=True``:
        :class:`~.triton_kernel.TritonUnavailableError` naming why they cannot run)."""
        if wanted is False or (wanted is None and self.device.type != "cuda"):
            return None
        from .. import triton_kernel as tk

        if wanted is None and not tk.env_enabled():
            return None
        # CPU tensors run the kernels only under Triton's interpreter (the tests use it)
        if tk.usable(self.device) or (wanted and self.device.type == "cpu" and tk.available() and tk.interpreting()):
            return tk
        if wanted:
            raise tk.TritonUnavailableError(f"the Triton kernel cannot run here: {tk.unavailable_reason(self.device)}")
        logger.info("Triton kernel unavailable (%s); using the stacked PyTorch path", tk.unavailable_reason(self.device))
        return None

    @staticmethod
    def _load_tokenizer(base):
        """The base's tokenizer, or None: a local folder's only when it ships tokenizer files
        (:func:`~bitdelta_core.models.load_tokenizer`), a hub id's when it loads. A base without
        one still runs :meth:`forward`."""
        if isinstance(base, nn.Module):
            return None
        if os.path.isdir(base):
            tok = load_tokenizer(base)
        else:
            try:
                tok = require_tokenizer(base)
            except ModelLoadError:
                tok = None
        if tok is None:
            logger.warning("no tokenizer found for %s: classify() needs one, forward() works", base)
            return None
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        return tok

    def _default_max_length(self) -> int:
        cands = []
        if self.tokenizer is not None and 0 < getattr(self.tokenizer, "model_max_length", 0) < 100_000:
            cands.append(self.tokenizer.model_max_length)
        for key in ("max_position_embeddings", "n_positions"):
            v = getattr(self.config, key, None)
            if isinstance(v, int) and v > 0:
                cands.append(v)
        return min(cands) if cands else 512

    def _wrap_layers(self) -> None:
        self._layer_params: dict[str, dict[str, tuple[int, ...]]] = {}
        targets = [
            (name, m) for name, m in self.model.named_modules()
            if name and any(True for _ in m.parameters(recurse=False))
        ]
        self._layers: dict[str, TenantLayer] = {}
        for name, m in reversed(targets):  # children before parents: paths stay valid
            self._layer_params[name] = {n: tuple(p.shape) for n, p in m.named_parameters(recurse=False)}
            self._layers[name] = wrap(name, m, self._rt)
            _replace_submodule(self.model, name, self._layers[name])
        # names of the full model's parameters -> (module, local name)
        self._param_owner: dict[str, tuple[str, str]] = {}
        for mname, params in self._layer_params.items():
            for pname in params:
                self._param_owner[f"{mname}.{pname}"] = (mname, pname)
        self._head_params = _find_head_params(self._layer_params, self.config)

    # -- pool management ---------------------------------------------------------------------
    def validate(self, artifact: DeltaArtifact | str | os.PathLike | bytes) -> DeltaArtifact:
        """Fully check that ``artifact`` can be served on this base (raises typed errors)."""
        art = self._as_artifact(artifact)
        arch = art.model.get("architecture")
        if arch is not None and arch != self.architecture:
            raise BaseMismatchError(f"the delta is for a {arch}, this engine serves {self.architecture}")
        if art.tokenizer:
            raise BaseMismatchError(
                "the delta's tokenizer adds tokens to the base's; a shared-base engine serves only "
                "fine-tunes that keep the base vocabulary"
            )
        check_base(self._fingerprinter._state, art, self._fingerprinter)
        covered = set(art.tensors) | set(art.tied)
        missing = [n for n in self._param_owner if n not in covered]
        if missing:
            raise BaseMismatchError(f"the delta has no entry for parameter {missing[0]!r} of the base model")
        for name, e in art.tensors.items():
            if name not in self._param_owner:
                if name in self._base_state_shapes:  # a buffer: must equal the base's
                    if e.codec != Codec.BASE:
                        raise BaseMismatchError(f"the delta changes buffer {name!r}, which the engine cannot serve")
                    continue
                raise BaseMismatchError(f"the delta has a tensor {name!r} that the base model does not have")
            want = self._base_state_shapes[name]
            if e.codec == Codec.RESIZED:
                raise BaseMismatchError(f"the delta resizes {name!r}; the engine serves the base vocabulary only")
            if tuple(e.shape) != want:
                ok_head = name in self._head_params and tuple(e.shape[1:]) == want[1:]
                if not ok_head:
                    raise BaseMismatchError(f"tensor {name!r} has shape {tuple(e.shape)}, the base has {want}")
        self._validated[id(art)] = art
        return art

    def _as_artifact(self, artifact) -> DeltaArtifact:
        if isinstance(artifact, DeltaArtifact):
            return artifact
        if isinstance(artifact, (bytes, bytearray, memoryview)):
            return artifact_from_bytes(bytes(artifact))
        return load_artifact(artifact)

    def register(self, name: str, artifact: DeltaArtifact | str | os.PathLike | bytes, *,
                 replace: bool = False) -> TenantInfo:
        """Add a fine-tune. Validation happens before anything becomes visible."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise InvalidInputError(
                f"invalid model name {name!r}: use 1-64 characters from [A-Za-z0-9._-], starting alphanumeric"
            )
        if not replace and name in self._tenants:
            raise ModelExistsError(f"model {name!r} is already registered")
        if isinstance(artifact, DeltaArtifact) and self._validated.get(id(artifact)) is artifact:
            art = artifact  # validate() already checked this very object (the service does)
        else:
            art = self.validate(artifact)
        layers, merged_bytes = self._resident_layers(art)
        num_labels, id2label, problem = _head_info(art, self.config)
        nbytes = sum(d.nbytes() for ps in layers.values() for d in ps.values())
        info = TenantInfo(
            name=name,
            base=self.base_name,
            architecture=art.model.get("architecture") or self.architecture,
            num_labels=num_labels,
            labels=[id2label[i] for i in range(num_labels)] if problem != "regression" else None,
            problem_type=problem,
            bytes=nbytes,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        with self._lock:
            if not replace and name in self._tenants:
                raise ModelExistsError(f"model {name!r} is already registered")
            old = self._tenants.get(name)
            slot = self._next_slot
            self._next_slot += 1
            tenant = Tenant(info, slot, layers, num_labels, id2label, problem, merged_bytes)
            self._tenants[name] = tenant
            self._by_slot[slot] = tenant
            if old is not None:
                self._by_slot.pop(old.slot, None)
                self._cache.drop(old.slot)
                self._rt.derived.drop(old.slot)
        logger.info("registered %s (%d labels, %.2f MB packed)%s", name, num_labels, nbytes / 1e6,
                    " replacing the previous version" if old else "")
        return info

    def _resident_layers(self, art: DeltaArtifact) -> tuple[dict[str, dict[str, ParamDelta]], int]:
        layers: dict[str, dict[str, ParamDelta]] = {}
        merged = 0
        for full, (mname, pname) in self._param_owner.items():
            e = art.tensors.get(full) or art.tensors.get(art.tied.get(full, ""))
            if e is None or e.codec == Codec.BASE:
                continue
            if e.codec == Codec.DENSE:
                d = ParamDelta("dense", dense=e.dense.to(device=self.device, dtype=self.dtype))
            else:
                s = e.sign
                # one resident copy of the scales: one per stored row, in the compute dtype; rows
                # the fine-tune left unchanged stay out (their index is kept instead of the mask)
                scale = s.kept_scales(torch.float32).to(self.device, self.dtype)
                index = s.kept_rows()
                sign = SignDelta(s.shape, s.signs.to(self.device), scale, Granularity.ROW, s.rowmask)
                d = ParamDelta("sign", sign=sign, index=None if index is None else index.to(self.device))
                if not isinstance(self._module(mname), nn.Embedding):
                    merged += math.prod(s.shape) * self.dtype.itemsize
            layers.setdefault(mname, {})[pname] = d
        return layers, merged

    def _module(self, mname: str) -> nn.Module:
        return self._layers[mname].base

    def unregister(self, name: str) -> None:
        with self._lock:
            t = self._tenants.pop(name, None)
            if t is None:
                raise UnknownModelError(f"model {name!r} is not registered")
            self._by_slot.pop(t.slot, None)
            self._cache.drop(t.slot)
            self._rt.derived.drop(t.slot)
        logger.info("unregistered %s", name)

    def get(self, name: str) -> TenantInfo:
        t = self._tenants.get(name)
        if t is None:
            raise UnknownModelError(f"model {name!r} is not registered")
        return t.info

    def list(self) -> list[TenantInfo]:
        return [t.info for t in list(self._tenants.values())]

    def __contains__(self, name) -> bool:
        return name in self._tenants

    def __len__(self) -> int:
        return len(self._tenants)

    # -- forward -------------------------------------------------------------------------------
    def count_tokens(self, inputs: Sequence) -> list[int]:
        """Tokens of each input before any truncation."""
        self._need_tokenizer()
        return [len(e["input_ids"]) for e in self._encode_many(_check_inputs(inputs), truncation=False)]

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidInputError("this engine has no tokenizer; use forward() with token ids")

    def encode(self, inputs: Sequence, *, truncate: bool = True) -> list[dict[str, list[int]]]:
        """Each input's tokenizer fields (``input_ids``, ``attention_mask``, …) as lists, cut to
        ``max_length`` — or, with ``truncate=False``, :class:`InputTooLongError` for the first
        input that is longer. Inputs are tokenized once (those over the limit a second time, with
        truncation). :meth:`classify_encoded` runs the result; the service counts tokens on it
        for batching and so never tokenizes a request twice."""
        self._need_tokenizer()
        inputs = _check_inputs(inputs)
        out = self._encode_many(inputs, truncation=False)
        long = [i for i, e in enumerate(out) if len(e["input_ids"]) > self.max_length]
        if long and not truncate:
            i = long[0]
            raise InputTooLongError(f"input {i} has {len(out[i]['input_ids'])} tokens, more than the "
                                    f"maximum {self.max_length} (truncate=false)")
        if long:
            for i, e in zip(long, self._encode_many([inputs[i] for i in long], truncation=True)):
                out[i] = e
        return out

    def _encode_many(self, inputs: list, truncation: bool) -> list[dict[str, list[int]]]:
        kw = {"truncation": True, "max_length": self.max_length} if truncation else {}
        if all(isinstance(x, str) for x in inputs):
            enc = self.tokenizer(list(inputs), **kw)
        elif all(not isinstance(x, str) for x in inputs):
            enc = self.tokenizer([x[0] for x in inputs], [x[1] for x in inputs], **kw)
        else:  # single texts and pairs mixed: one call each
            return [dict(self.tokenizer(*((x,) if isinstance(x, str) else x), **kw)) for x in inputs]
        return [{k: v[i] for k, v in enc.items()} for i in range(len(inputs))]

    def tokenize(self, inputs: Sequence, *, truncate: bool = True) -> dict[str, torch.Tensor]:
        """Padded tensors of :meth:`encode`, on the engine's device."""
        return self._pad(self.encode(inputs, truncate=truncate))

    def _pad(self, encodings: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer.pad(list(encodings), return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, encodings: dict[str, torch.Tensor], models: Sequence[str | None] | str | None) -> torch.Tensor:
        """Logits ``(batch, widest head in the batch)`` for already-tokenized inputs.

        ``models[i]`` names row ``i``'s tenant; ``None`` runs that row on the plain base.
        """
        if not encodings:
            raise InvalidInputError("empty encodings")
        first = next(iter(encodings.values()))
        if not isinstance(first, torch.Tensor) or first.dim() < 1 or first.shape[0] == 0:
            raise InvalidInputError("the batch is empty")
        B = first.shape[0]
        for k, v in encodings.items():
            if not isinstance(v, torch.Tensor) or v.shape[:1] != (B,) or v.shape != first.shape:
                raise InvalidInputError(
                    f"input {k!r} has shape {tuple(getattr(v, 'shape', ()))}, expected {tuple(first.shape)}"
                )
        return self._run(encodings, self._resolve(_row_models(models, B, "a batch of")))

    def _resolve(self, models: list[str | None]) -> list[Tenant | None]:
        """Name -> tenant, once per request: a request that resolved a tenant finishes with
        that version even if it is replaced or removed meanwhile (never with another's)."""
        tenants = []
        with self._lock:
            for m in models:
                if m is None:
                    tenants.append(None)
                    continue
                t = self._tenants.get(m)
                if t is None:
                    raise UnknownModelError(f"model {m!r} is not registered")
                tenants.append(t)
        return tenants

    def _run(self, encodings: dict[str, torch.Tensor], tenants: list[Tenant | None]) -> torch.Tensor:
        B = len(tenants)
        mask = encodings.get("attention_mask") if self.skip_padding else None
        if mask is not None and (mask.dim() != 2 or bool(mask.all())):
            mask = None  # nothing to skip
        with self._lock:
            row_tokens = mask.ne(0).sum(1).tolist() if mask is not None else None
            ctx = self._make_context(tenants, B, next(iter(encodings.values())).numel() // B, row_tokens)
            enc = {k: v.to(self.device) for k, v in encodings.items()}
            if ctx.perm is not None:
                enc = {k: v.index_select(0, ctx.perm) for k, v in enc.items()}
            if mask is not None:
                ctx.packed = packed_tokens(enc["attention_mask"], ctx)
            with torch.inference_mode():
                logits = self._forward_ctx(enc, ctx)
        if ctx.perm is not None:
            logits = torch.empty_like(logits).index_copy_(0, ctx.perm, logits)
        return logits

    def _forward_ctx(self, enc: dict[str, torch.Tensor], ctx: BatchContext, strict: bool = False) -> torch.Tensor:
        """Logits of the sorted batch ``enc`` under ``ctx`` (the caller holds the lock);
        ``strict``: raise :class:`NeedsSplitError` instead of running the batch per group."""
        rt = self._rt
        if self.path == "fallback-merged" and not ctx.base_only:
            return self._forward_merged(enc, ctx)
        try:
            if self.path == "fallback" and len(ctx.groups) > 1:
                return _run_per_group(lambda **kw: _logits(self.model(**kw)), rt, ctx, (), enc)
            rt.ctx = ctx
            try:
                return _logits(self.model(**enc))
            except NeedsSplitError as e:  # a code path the self-check did not reach: still exact
                if strict:
                    raise
                logger.warning("%s; running this batch once per tenant group", e)
                return _run_per_group(lambda **kw: _logits(self.model(**kw)), rt, ctx, (), enc)
        finally:
            rt.ctx = None

    def _forward_merged(self, enc: dict[str, torch.Tensor], ctx: BatchContext) -> torch.Tensor:
        """One ``functional_call`` per tenant group on the group's merged weights (the last
        resort: every changed tensor is merged on each call)."""
        live = {id(m): n for n, m in self.model.named_modules() if isinstance(m, TenantLayer)}
        outs = []
        for slot, rows in ctx.groups:
            sub = {k: v[rows] for k, v in enc.items()}
            t = ctx.tenants.get(slot)
            if t is None:
                outs.append((rows, _logits(self.model(**sub))))
                continue
            params = {}
            for mname, deltas in t.layers.items():
                layer = self._layers[mname]
                for pname, d in deltas.items():
                    params[f"{live[id(layer)]}.base.{pname}"] = layer._param(t, pname, d, ctx)
            outs.append((rows, _logits(torch.func.functional_call(self.model, params, (), sub, strict=False))))
        return _scatter_rows(outs, ctx.batch_size)

    def _make_context(self, tenants: list[Tenant | None], B: int, tokens_per_row: int = 1,
                      row_tokens: list[int] | None = None) -> BatchContext:
        """The sorted batch's context; ``row_tokens``: each row's real tokens when the layers
        skip padding (else every row counts ``tokens_per_row``)."""
        slots = [BASE_SLOT if t is None else t.slot for t in tenants]
        order: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            order.setdefault(s, []).append(i)
        groups, perm, start = [], [], 0
        for s, rows in order.items():
            groups.append((s, slice(start, start + len(rows))))
            perm.extend(rows)
            start += len(rows)
        by_slot = {t.slot: t for t in tenants if t is not None}
        ctx = BatchContext(B, groups, by_slot)
        if perm != list(range(B)):
            ctx.perm = torch.tensor(perm, device=self.device)
        if self.stacked and self._triton is None and len(groups) >= 3:
            g_idx = [g for g, (_, sl) in enumerate(groups) for _ in range(sl.stop - sl.start)]
            r_idx = [r for _, sl in groups for r in range(sl.stop - sl.start)]
            ctx.pad_index = (torch.tensor(g_idx, device=self.device), torch.tensor(r_idx, device=self.device))
            ctx.rmax = max(sl.stop - sl.start for _, sl in groups)
        pinned = set(by_slot)
        self._cache.record({s: len(rows) for s, rows in order.items() if s != BASE_SLOT})
        for s, rows in sorted(order.items(), key=lambda kv: -len(kv[1])):  # hottest first
            if s == BASE_SLOT or self._by_slot.get(s) is not by_slot[s]:
                continue  # base rows, or a tenant removed/replaced since the request resolved it
            # with the fused kernel only large groups run on (cached) merged weights: one big GEMM
            # per layer beats the kernel's tiles there, and small groups never need the cache, a
            # batch of one tenant alone included: the kernel's register-blocked path beats a GEMM
            # on the merged weights at a few sentences (MiniLM-L6, one thread, 1-8 sentences of one
            # tenant: 0.91-0.97x the forward on cached merged weights). The Triton kernels never
            # need merged weights
            large = self._triton is None and (self._kernel is None
                                              or (sum(row_tokens[i] for i in rows) if row_tokens is not None
                                                  else len(rows) * tokens_per_row) >= self.fused_max_tokens)
            if large and by_slot[s].merged_bytes and self._cache.admit(s, by_slot[s].merged_bytes, pinned):
                ctx.admitted.add(s)
        return ctx

    def classify(self, inputs: Sequence, models: Sequence[str] | str, *, truncate: bool = True,
                 return_all_scores: bool = False) -> list[Prediction]:
        """Classify ``inputs`` (texts or text pairs); ``models`` names each row's fine-tune."""
        inputs = _check_inputs(inputs)
        tenants = self._resolve(_row_models(models, len(inputs)))  # fails before tokenizing
        return self._classify(self.tokenize(inputs, truncate=truncate), tenants, return_all_scores)

    def classify_encoded(self, encodings: Sequence[dict[str, list[int]]], models: Sequence[str] | str, *,
                         return_all_scores: bool = False) -> list[Prediction]:
        """:meth:`classify` for inputs already run through :meth:`encode`."""
        encodings = list(encodings)
        if not encodings:
            raise InvalidInputError("the batch is empty")
        models = _row_models(models, len(encodings))
        if any(not isinstance(e, dict) or not e.get("input_ids") for e in encodings):
            raise InvalidInputError("every encoding needs non-empty input_ids (use encode())")
        tenants = self._resolve(models)
        self._need_tokenizer()
        return self._classify(self._pad(encodings), tenants, return_all_scores)

    def _classify(self, enc: dict[str, torch.Tensor], tenants: list[Tenant | None],
                  return_all_scores: bool) -> list[Prediction]:
        logits = self._run(enc, tenants).float().cpu()
        return [_postprocess(logits[i, : t.num_labels], t, return_all_scores) for i, t in enumerate(tenants)]

    # -- reporting -----------------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        with self._lock:
            tenants = {
                n: {"packed": t.info.bytes, "cache": self._cache.resident(t.slot)} for n, t in self._tenants.items()
            }
            return {
                "base_bytes": self.base_bytes,
                "pool_bytes": sum(v["packed"] for v in tenants.values()),
                "cache_bytes": sum(v["cache"] for v in tenants.values()),
                "cache_budget": self._cache.budget,
                "cache_hits": self._cache.hits,
                "cache_misses": self._cache.misses,
                "cache_evictions": self._cache.evictions,
                "cache_rejections": self._cache.rejections,
                "derived_cache_bytes": self._rt.derived.used,
                "cpu_kernel": self._kernel is not None,
                "triton_kernel": self._triton is not None,
                "path": self.path,
                "skip_padding": self.skip_padding,
                "per_group_modules": sorted(set(self.per_group_modules)),
                "tenants": tenants,
            }


def _row_models(models, n: int, what: str = "") -> list:
    """One model name per row: a single name (or ``None``) for all ``n`` rows, or a list of ``n``."""
    if models is None or isinstance(models, str):
        return [models] * n
    models = list(models)
    if len(models) != n:
        raise InvalidInputError(f"{len(models)} model names for {what + ' ' if what else ''}{n} "
                                f"{'rows' if what else 'inputs'}")
    return models


def _check_inputs(inputs) -> list:
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise InvalidInputError("inputs must be a non-empty list of texts or [text, text] pairs")
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(s, str) for s in x):
            out.append((x[0], x[1]))
        else:
            raise InvalidInputError(f"input {i} must be a string or a pair of strings, got {type(x).__name__}")
    return out
