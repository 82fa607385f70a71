"""One base model + a pool of packed 1-bit deltas -> one batched forward for mixed fine-tunes.

How a batch runs
----------------
Every row of a batch names a tenant (a registered delta) or the base. Before the forward the
engine computes *groups*: ``(slot, row_indices)`` per tenant present. Every parameter-bearing
leaf module of the base model is wrapped once (:class:`TenantLayer`); in the forward a wrapper

* returns the plain base output when the whole batch is base-only,
* for embeddings, gathers ``E_base[ids] + α[ids] ⊙ sign(Δ)[ids]`` straight from the packed
  signs (only the bytes of the looked-up rows are touched, the table is never unpacked),
* for every other layer type, runs each group with that tenant's *working weights*:
  ``W_t = W_base + α ⊙ sign(Δ_t)`` for 1-bit tensors, the tenant's own dense tensors (biases,
  norms, heads), the base tensor otherwise. Layer types are handled by a registry of
  functional kernels (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.LayerNorm``) with a generic
  ``torch.func.functional_call`` fallback for any other module.
* on CPU in float32, where the optional compiled kernel builds (:mod:`.cpu_kernel`), the 1-bit
  Linear/Conv1D weights of all tenant groups of a layer run in one fused call instead: per tile
  of output features each group's merged rows are rebuilt from the packed bits in cache and
  multiplied right away, so no ``W_t`` is ever materialised and the base weight is read once
  per layer, not once per tenant (same values as the merged path; faster than even cached
  merged weights on the 2-core benchmark machine).
* on CUDA with the optional Triton kernels (:mod:`.triton_kernel`), every Linear/Conv1D and
  embedding runs all groups of the batch in one launch: the base product plus each group's
  ``α ⊙ sign(Δ)`` unpacked from the packed bits in the kernel, no merged weight on the device
  (``triton_kernel=False`` or ``BITDELTA_TRITON=0``: the stacked ``baddbmm`` path instead).

Everything that is not a parameterised leaf (attention, activations, pooling) runs once for
the whole batch. Heads may differ per tenant (``num_labels``, label names, problem type): the
logits are padded to the widest head in the batch and cut per row afterwards.

Memory tiers
------------
* pool: per tenant the packed signs (1 bit/weight), scales and dense tensors; always resident.
* working-weight cache: merged ``W_t`` tensors of hot tenants, bounded by ``cache_bytes``. A
  tenant is admitted whole (all its layers) or not at all, so a cyclic sweep over layers cannot
  thrash it, and only in place of tenants that served fewer rows recently (frequency-aware
  admission, see :class:`WorkingCache`); tenants that are not admitted are merged layer by
  layer on the fly (transient memory only) — correct, just slower. With the fused CPU kernel
  only tenants with a large group in the batch (``fused_max_tokens``) are admitted and run on
  merged weights; small groups run fused and never touch the cache.

Thread safety: pool mutations and forwards are serialised by one lock; validation of a new
artifact (the slow part of a registration) runs outside it, so a registration never blocks
serving for long, and a failed registration leaves the pool untouched.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .apply import check_base
from .artifact import DeltaArtifact, artifact_from_bytes, load_artifact
from . import cpu_kernel as cpu_kernel_mod
from .codec import Granularity, SignDelta
from .errors import (
    BaseMismatchError,
    InputTooLongError,
    InvalidInputError,
    ModelExistsError,
    ModelLoadError,
    UnknownModelError,
)
from .models import Fingerprinter, load_model, resolve_class
from .naming import NAME_PATTERN
from .packing import unpack_sign_rows, unpack_signs
from .select import Codec

logger = logging.getLogger(__name__)

BASE_SLOT = -1
# with the compiled CPU kernel, a tenant group of at least this many tokens in a batch runs on
# merged weights (from the cache when the tenant is admitted) rather than fused: measured on the
# 2-core benchmark machine, fused tiles tie with merged weights at 512 tokens per group and lose
# ~8 % on MiniLM at 2,048 (one tenant for a whole 32 x 64 batch)
FUSED_MAX_TOKENS = 1024
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def merged_weight(base: torch.Tensor, sign: SignDelta, scale: torch.Tensor,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """``base + scale[:, None] * sign(Δ)`` in ``base``'s dtype.

    ``scale`` holds one scale per stored row; ``index`` (the stored rows, ascending) is given
    when ``sign`` leaves unchanged rows out, which then stay equal to the base.
    """
    rows = base.shape[0]
    cols = base.numel() // rows
    b = base.reshape(rows, cols)
    if index is None:  # in place on the freshly unpacked signs: one allocation, no second pass buffer
        signs = unpack_signs(sign.signs, (rows, cols), base.dtype)
        return signs.mul_(scale.unsqueeze(1)).add_(b).reshape(base.shape)
    signs = unpack_signs(sign.signs, (index.numel(), cols), base.dtype)
    return b.index_add(0, index, signs.mul_(scale.unsqueeze(1))).reshape(base.shape)


# ---------------------------------------------------------------------------------------------
# per-tenant data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TenantInfo:
    """What the pool knows about a registered fine-tune (returned by list/get)."""

    name: str
    base: str
    architecture: str
    num_labels: int
    labels: list[str] | None
    problem_type: str
    bytes: int
    created: str


@dataclass
class Prediction:
    label: str | None
    score: float
    scores: dict[str, float] | None = None


@dataclass
class ParamDelta:
    """How one tenant changes one base parameter (resident form)."""

    kind: str  # "sign" | "dense"
    sign: SignDelta | None = None  # packed signs + one scale per stored row, in compute dtype
    dense: torch.Tensor | None = None  # replacement tensor in compute dtype
    index: torch.Tensor | None = None  # stored rows (int64, ascending) when unchanged rows are left out

    def nbytes(self) -> int:
        n = 0
        if self.sign is not None:
            n += self.sign.nbytes()
        if self.index is not None:
            n += self.index.numel() * self.index.element_size()
        if self.dense is not None:
            n += self.dense.numel() * self.dense.element_size()
        return n


@dataclass
class Tenant:
    info: TenantInfo
    slot: int
    # module name -> {param name (local) -> ParamDelta}; modules the tenant leaves alone are absent
    layers: dict[str, dict[str, ParamDelta]]
    num_labels: int
    id2label: dict[int, str] | None
    problem_type: str
    merged_bytes: int  # bytes of all working weights if merged (cache admission size)


# ---------------------------------------------------------------------------------------------
# working-weight cache (LRU over tenants, admission by whole tenant)
# ---------------------------------------------------------------------------------------------
class WorkingCache:
    """Merged working weights of whole tenants, bounded by ``budget`` bytes.

    Admission is frequency-aware (TinyLFU-like): the cache counts the rows each tenant served
    (halving all counts every ``window`` rows, so popularity can shift), and a tenant that does
    not fit in the free space only evicts tenants that served fewer rows. Under a popularity
    skew the hot tenants therefore stay resident while the long tail streams through merged on
    the fly; a plain LRU would let every batch's tail evict them.
    """

    def __init__(self, budget: int, window: int = 4096):
        self.budget = int(budget)
        self.window = int(window)
        self._entries: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._reserved: dict[int, int] = {}
        self._freq: dict[int, float] = {}
        self._seen = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejections = 0

    @property
    def used(self) -> int:
        return sum(self._reserved.values())

    def resident(self, slot: int) -> int:
        return sum(t.numel() * t.element_size() for t in self._entries.get(slot, {}).values())

    def record(self, rows: dict[int, int]) -> None:
        """Count one batch: ``rows[slot]`` rows served by each tenant."""
        for slot, n in rows.items():
            self._freq[slot] = self._freq.get(slot, 0.0) + n
        self._seen += sum(rows.values())
        if self._seen >= self.window:
            self._seen //= 2
            self._freq = {k: v / 2 for k, v in self._freq.items() if v >= 1 or k in self._entries}

    def admit(self, slot: int, size: int, pinned: set[int]) -> bool:
        """Reserve ``size`` bytes for ``slot``, evicting only tenants (not in ``pinned``) that
        served fewer rows; False when it does not fit (the caller merges on the fly)."""
        if slot in self._entries:
            self._entries.move_to_end(slot)
            return True
        if size > self.budget:
            return False
        free = self.budget - self.used
        if size > free:
            want = self._freq.get(slot, 0.0)
            # least frequent first, least recently used among equals (dict order is LRU order)
            order = {s: i for i, s in enumerate(self._entries)}
            victims, room = [], free
            for s in sorted((s for s in self._entries if s not in pinned),
                            key=lambda s: (self._freq.get(s, 0.0), order[s])):
                if room >= size or self._freq.get(s, 0.0) >= want:
                    break
                victims.append(s)
                room += self._reserved[s]
            if room < size:
                self.rejections += 1
                return False
            for v in victims:
                self.drop(v)
                self.evictions += 1
        self._entries[slot] = {}
        self._reserved[slot] = size
        return True

    def get(self, slot: int, key: str) -> torch.Tensor | None:
        d = self._entries.get(slot)
        t = d.get(key) if d is not None else None
        if t is None:
            self.misses += 1
        else:
            self.hits += 1
        return t

    def put(self, slot: int, key: str, t: torch.Tensor) -> None:
        d = self._entries.get(slot)
        if d is not None:
            d[key] = t

    def drop(self, slot: int) -> None:
        self._entries.pop(slot, None)
        self._reserved.pop(slot, None)


# ---------------------------------------------------------------------------------------------
# the forward context shared by all wrappers during one batched forward
# ---------------------------------------------------------------------------------------------
@dataclass
class BatchContext:
    batch_size: int
    # (slot, rows): the batch is sorted by tenant before the forward, so each tenant's rows are
    # one contiguous slice and layers take views instead of gathering rows
    groups: list[tuple[int, slice]]
    tenants: dict[int, Tenant]
    admitted: set[int] = field(default_factory=set)
    perm: torch.Tensor | None = None  # sorted position -> original row (None: already sorted)
    # CUDA: (group, row-in-group) of every sorted row and the largest group, for the stacked
    # path that runs all groups of a Linear layer as one batched matmul (few kernel launches)
    pad_index: tuple[torch.Tensor, torch.Tensor] | None = None
    rmax: int = 0
    # Triton path, built once per forward and shared by layers: each group's table row, tile
    # plans (bitdelta_core.triton_kernel.TilePlan) per row layout, the embeddings' row map
    plans: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# layer kernels: how to run a module with explicit parameters (registry, generic fallback)
# ---------------------------------------------------------------------------------------------
Kernel = Callable[[nn.Module, dict[str, torch.Tensor], tuple, dict], Any]
_KERNELS: dict[type, Kernel] = {}


def register_kernel(cls: type) -> Callable[[Kernel], Kernel]:
    """Register a functional kernel ``fn(module, params, args, kwargs)`` for a module type."""

    def deco(fn: Kernel) -> Kernel:
        _KERNELS[cls] = fn
        return fn

    return deco


@register_kernel(nn.Linear)
def _linear(m, p, args, kwargs):
    return F.linear(args[0], p["weight"], p.get("bias"))


@register_kernel(nn.LayerNorm)
def _layer_norm(m, p, args, kwargs):
    return F.layer_norm(args[0], m.normalized_shape, p.get("weight"), p.get("bias"), m.eps)


try:  # GPT-2 style Conv1D: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D

    @register_kernel(Conv1D)
    def _conv1d(m, p, args, kwargs):
        x = args[0]
        w = p["weight"]
        y = x.reshape(-1, x.shape[-1]) @ w
        if p.get("bias") is not None:
            y = y + p["bias"]
        return y.reshape(*x.shape[:-1], w.shape[1])
except ImportError:  # pragma: no cover - transformers always has it today
    pass


_STACKABLE = {_linear} | ({_conv1d} if "_conv1d" in globals() else set())


def _generic_kernel(m, p, args, kwargs):
    return torch.func.functional_call(m, p, args, kwargs, strict=False)


def _kernel_for(module: nn.Module) -> Kernel:
    for cls in type(module).__mro__:
        k = _KERNELS.get(cls)
        if k is not None:
            return k
    return _generic_kernel


class TenantLayer(nn.Module):
    """Wraps one parameter-bearing leaf module; applies each row's tenant parameters."""

    def __init__(self, name: str, base: nn.Module, engine: "MultiTenantEngine"):
        super().__init__()
        self.name = name
        self.base = base
        self._engine = [engine]  # list: keep the engine out of the module tree
        self.kernel = _kernel_for(base)
        self.param_names = [n for n, _ in base.named_parameters(recurse=False)]
        # 1-bit weights of this layer run through the compiled fused kernel (never merged)
        # (rows of the packed signs start on a byte: Linear (out, in) needs in % 8 == 0, Conv1D
        # (in, out) out % 8 == 0)
        self.fused = (engine._kernel is not None and self.kernel in _STACKABLE and base.weight.dim() == 2
                      and base.weight.shape[1] % 8 == 0 and base.weight.dtype == torch.float32
                      and base.weight.is_contiguous())
        # Linear/Conv1D/Embedding run through the one-launch Triton kernels (CUDA) when enabled
        self.triton = engine._triton is not None and (
            (self.kernel in _STACKABLE and base.weight.dim() == 2)
            or (type(base) is nn.Embedding and base.max_norm is None))
        self._table = (engine._triton.LayerTable(engine._triton_tables, base.weight.detach(),
                                                 getattr(base, "bias", None), self._triton_entry)
                       if self.triton else None)

    def __getattr__(self, name: str):
        # code that reads e.g. ``layer.weight`` directly sees the base module's attribute
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, *args, **kwargs):
        ctx = self._engine[0]._ctx
        if ctx is None or (len(ctx.groups) == 1 and ctx.groups[0][0] == BASE_SLOT):
            return self.base(*args, **kwargs)
        if not any(s in ctx.tenants and self.name in ctx.tenants[s].layers for s, _ in ctx.groups):
            return self.base(*args, **kwargs)
        if self.triton and not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            y = self._triton_forward(args[0], ctx)
            if y is not None:
                return y
        if isinstance(self.base, nn.Embedding):
            return self._embedding(args[0], ctx)
        B = ctx.batch_size
        if self.fused and not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            y = self._grouped_linear(args[0], ctx)
            if y is not None:
                return y
        if len(ctx.groups) == 1:  # one tenant for the whole batch: no slicing
            slot = ctx.groups[0][0]
            return self.kernel(self.base, self._params(slot, ctx), args, kwargs)
        x = args[0]
        if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B):
            raise InvalidInputError(
                f"layer {self.name} received an input whose first dim {tuple(getattr(x, 'shape', ()))} "
                f"is not the batch size {B}; this architecture cannot mix tenants per row"
            )
        if ctx.pad_index is not None and self.kernel in _STACKABLE and not kwargs and len(args) == 1:
            y = self._stacked(x, ctx)
            if y is not None:
                return y
        if self.kernel is _linear and not kwargs and len(args) == 1:
            y = self._grouped_linear(x, ctx)
            if y is not None:
                return y
        outs = []
        for slot, rows in ctx.groups:
            sub_args = tuple(_take_rows(a, rows, B) for a in args)
            sub_kwargs = {k: _take_rows(v, rows, B) for k, v in kwargs.items()}
            if slot == BASE_SLOT or self.name not in ctx.tenants[slot].layers:
                y = self.base(*sub_args, **sub_kwargs)
            else:
                y = self.kernel(self.base, self._params(slot, ctx), sub_args, sub_kwargs)
            outs.append((rows, y))
        return _scatter_rows(outs, B)

    def _grouped_linear(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """Each group's ``x_g W_gᵀ + b_g`` (Conv1D: ``x_g W_g + b_g``) written straight into its
        rows of one output (no concatenation pass); tenants with a 1-bit weight go through the
        compiled fused kernel when the layer has it. None when the groups' output widths differ
        (heads)."""
        conv = self.kernel is not _linear  # GPT-2 Conv1D: weight (in, out)
        width = self.base.weight.shape[1 if conv else 0]
        for slot, _ in ctx.groups:
            d = ctx.tenants[slot].layers.get(self.name, {}).get("weight") if slot != BASE_SLOT else None
            if d is not None and d.kind == "dense" and d.dense.shape[1 if conv else 0] != width:
                return None
        K = x.shape[-1]
        if len(ctx.groups) == 1:  # the whole input is one group, whatever its leading dims
            spans = [(ctx.groups[0][0], 0, x.numel() // K)]
        elif x.dim() >= 2 and x.shape[0] == ctx.batch_size:
            per_row = x[0].numel() // K  # tokens per batch row
            spans = [(slot, rows.start * per_row, rows.stop * per_row) for slot, rows in ctx.groups]
        else:
            return None  # the caller raises the "not the batch size" error
        x2 = x.reshape(-1, K)
        out = x.new_empty((*x.shape[:-1], width))
        o2 = out.view(-1, width)
        fused = []
        for slot, s, e in spans:
            d = None
            if self.fused and slot != BASE_SLOT and slot not in ctx.admitted:
                d = ctx.tenants[slot].layers.get(self.name, {})
            wd, bd = (d.get("weight"), d.get("bias")) if d else (None, None)
            if (wd is not None and wd.kind == "sign" and (bd is None or bd.kind == "dense")
                    and (wd.index is None or wd.index.numel())):  # (no stored row: the base's weight)
                bias = self.base.bias if bd is None else bd.dense
                fused.append((s, e, wd.sign.signs, wd.sign.scale, wd.index, bias))
                continue
            p = self._group_params(slot, ctx)
            w, b = p["weight"], p.get("bias")
            w = w if conv else w.t()
            if b is None:
                torch.mm(x2[s:e], w, out=o2[s:e])
            else:
                torch.addmm(b, x2[s:e], w, out=o2[s:e])
        if fused:
            cpu_kernel_mod.signed_linear_groups(self._engine[0]._kernel, x2.contiguous(), o2,
                                                self.base.weight.detach(), fused, transposed=conv)
        return out

    # -- Triton path (CUDA; bitdelta_core.triton_kernel) -----------------------------------
    def _triton_entry(self, tenant: "Tenant"):
        """This layer's table entry for a tenant: its 1-bit weight and bias (``None``: the base's),
        or ``"dense"`` for a replacement weight (heads), which the kernel does not cover."""
        d = tenant.layers.get(self.name, {})
        wd, bd = d.get("weight"), d.get("bias")
        if (wd is not None and wd.kind != "sign") or (bd is not None and bd.kind != "dense"):
            return "dense"
        if wd is None and bd is None:
            return None
        bias = getattr(self.base, "bias", None) if bd is None else bd.dense
        if wd is None:
            return self._engine[0]._triton.DeltaGroup(0, 0, bias=bias)
        return self._engine[0]._triton.DeltaGroup(0, 0, wd.sign.signs, wd.sign.scale, wd.index, bias)

    def _triton_forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """The layer for every group in one Triton launch (:mod:`.triton_kernel`): the base weight
        plus each group's ``α ⊙ sign(Δ)`` unpacked in the kernel, no merged weight. Per layer the
        host only launches: the tenants' delta addresses sit in the layer's device table (written
        once per tenant) and the forward's tile plan is shared by all layers. None (the caller's
        paths run) where the kernel does not apply: another dtype, an input not per batch row."""
        engine = self._engine[0]
        tk = engine._triton
        rows = ctx.plans.get("rows")
        if rows is None:  # each group's table row, once per forward
            rows = ctx.plans["rows"] = [engine._triton_tables.row(None if slot == BASE_SLOT else ctx.tenants[slot])
                                        for slot, _ in ctx.groups]
        table = self._table
        table.sync()
        if table.dense_rows and not table.dense_rows.isdisjoint(rows):
            return self._triton_groups(x, ctx)  # tenants with their own weight here (heads)
        w = table.weight
        B = ctx.batch_size
        if isinstance(self.base, nn.Embedding):
            if x.dim() < 1 or x.shape[0] not in (1, B) or x.is_floating_point():
                return None
            trow = ctx.plans.get("rows_per_batch_row")
            if trow is None:
                per_row = [r for r, (_, sl) in zip(rows, ctx.groups) for _ in range(sl.stop - sl.start)]
                trow = ctx.plans["rows_per_batch_row"] = tk.metadata_tensor(per_row, x.device, torch.int32)
            return tk.launch_embedding(x.expand(B, *x.shape[1:]) if x.shape[0] != B else x, w, table.table, trow)
        conv = self.kernel is not _linear  # GPT-2 Conv1D: weight (in, out)
        K, width = x.shape[-1], w.shape[1 if conv else 0]
        if x.dtype != w.dtype or K != w.shape[0 if conv else 1] or x.numel() == 0:
            return None
        M = x.numel() // K
        if len(ctx.groups) == 1:  # the whole input is one group, whatever its leading dims
            per_row = None
        elif x.dim() >= 2 and x.shape[0] == B:
            per_row = M // B  # tokens per batch row
        else:
            return None
        key = ("plan", per_row, M)
        plan = ctx.plans.get(key)
        if plan is None:
            spans = [(0, M)] if per_row is None else [(sl.start * per_row, sl.stop * per_row) for _, sl in ctx.groups]
            plan = ctx.plans[key] = tk.make_plan(spans, x.device, rows)
        x2 = x.reshape(-1, K)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        out = x.new_empty((*x.shape[:-1], width))
        tk.launch_linear(x2, w, out.view(-1, width), table.table, plan, transposed=conv,
                         has_bias=getattr(self.base, "bias", None) is not None)
        return out

    def _triton_groups(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """:meth:`_triton_forward` for a layer where some tenants bring their own dense weight
        (classification heads): the kernel runs the other groups, those tenants an ordinary GEMM
        on their rows. None for heads of different widths and embeddings (other paths run)."""
        if isinstance(self.base, nn.Embedding):
            return None
        tk = self._engine[0]._triton
        w = self.base.weight.detach()
        B = ctx.batch_size
        conv = self.kernel is not _linear
        K, width = x.shape[-1], w.shape[1 if conv else 0]
        if len(ctx.groups) == 1:
            spans = [(0, x.numel() // K)]
        elif x.dim() >= 2 and x.shape[0] == B:
            per_row = x[0].numel() // K
            spans = [(sl.start * per_row, sl.stop * per_row) for _, sl in ctx.groups]
        else:
            return None
        groups, dense = [], []
        for (slot, _), (s, e) in zip(ctx.groups, spans):
            entry = None if slot == BASE_SLOT else self._triton_entry(ctx.tenants[slot])
            if entry == "dense":
                d = ctx.tenants[slot].layers[self.name]
                wd, bd = d.get("weight"), d.get("bias")
                if wd is None or wd.kind != "dense" or wd.dense.shape != w.shape:
                    return None
                dense.append((s, e, wd.dense, self.base.bias if bd is None else bd.dense))
                groups.append(tk.DeltaGroup(s, s, bias=self.base.bias))
            else:
                groups.append(entry or tk.DeltaGroup(s, e, bias=self.base.bias))
                groups[-1].start, groups[-1].end = s, e
        x2 = x.reshape(-1, K)
        out = x.new_empty((*x.shape[:-1], width))
        o2 = out.view(-1, width)
        tk.grouped_linear(x2, w, groups, transposed=conv, out=o2)
        for s, e, wt, b in dense:
            wt = wt if conv else wt.t()
            if b is None:
                torch.mm(x2[s:e], wt, out=o2[s:e])
            else:
                torch.addmm(b, x2[s:e], wt, out=o2[s:e])
        return out

    def _stacked(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """All groups in one (b)addbmm over zero-padded groups; None if weights differ in shape."""
        ws, bs = [], []
        for slot, _ in ctx.groups:
            p = self._group_params(slot, ctx)
            ws.append(p["weight"])
            bs.append(p.get("bias"))
        if len({tuple(w.shape) for w in ws}) != 1 or len({b is None for b in bs}) != 1:
            return None
        G = len(ws)
        g_idx, r_idx = ctx.pad_index
        xp = x.new_zeros((G, ctx.rmax, *x.shape[1:]))
        xp[g_idx, r_idx] = x
        W = torch.stack(ws)
        if self.kernel is _linear:  # (G, out, in) -> (G, in, out); Conv1D is already (in, out)
            W = W.transpose(1, 2)
        xf = xp.reshape(G, -1, x.shape[-1])
        y = torch.bmm(xf, W) if bs[0] is None else torch.baddbmm(torch.stack(bs).unsqueeze(1), xf, W)
        return y.reshape(G, ctx.rmax, *x.shape[1:-1], W.shape[-1])[g_idx, r_idx]

    # -- parameters of one tenant for this layer -------------------------------------------
    def _group_params(self, slot: int, ctx: BatchContext) -> dict[str, torch.Tensor]:
        """This layer's parameters for one group: the base's for base rows and for tenants
        that leave the layer alone, else the tenant's (:meth:`_params`)."""
        if slot == BASE_SLOT or self.name not in ctx.tenants[slot].layers:
            return {n: getattr(self.base, n) for n in self.param_names}
        return self._params(slot, ctx)

    def _params(self, slot: int, ctx: BatchContext) -> dict[str, torch.Tensor]:
        tenant = ctx.tenants[slot]
        deltas = tenant.layers.get(self.name, {})
        engine = self._engine[0]
        out = {}
        for pname in self.param_names:
            base_p = getattr(self.base, pname)
            d = deltas.get(pname)
            if d is None:
                out[pname] = base_p
            elif d.kind == "dense":
                out[pname] = d.dense
            else:
                key = f"{self.name}.{pname}"
                w = engine._cache.get(slot, key) if slot in ctx.admitted else None
                if w is None:
                    w = merged_weight(base_p.detach(), d.sign, d.sign.scale, d.index)
                    if slot in ctx.admitted:
                        engine._cache.put(slot, key, w)
                out[pname] = w
        return out

    def _embedding(self, ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        m: nn.Embedding = self.base
        B = ctx.batch_size
        if ids.shape[0] != B:
            if ids.shape[0] != 1:
                raise InvalidInputError(f"embedding {self.name}: ids batch {ids.shape[0]} != batch size {B}")
            ids = ids.expand(B, *ids.shape[1:])
        out = F.embedding(ids, m.weight, m.padding_idx)
        for slot, rows in ctx.groups:
            if slot == BASE_SLOT:
                continue
            d = ctx.tenants[slot].layers.get(self.name, {}).get("weight")
            if d is None:
                continue
            r_ids = ids[rows]
            if d.kind == "dense":
                out[rows] = F.embedding(r_ids, d.dense, m.padding_idx)
            else:
                scale = d.sign.scale
                if d.index is not None:  # stored rows only: find each id's position, 0 scale if absent
                    if not d.index.numel():
                        continue
                    pos = torch.searchsorted(d.index, r_ids.contiguous()).clamp_(max=d.index.numel() - 1)
                    scale = torch.where(d.index[pos] == r_ids, scale[pos], 0)
                    r_ids = pos
                else:
                    scale = scale[r_ids]
                signs = unpack_sign_rows(d.sign.signs, m.embedding_dim, r_ids, out.dtype)
                out[rows] = torch.addcmul(out[rows], signs, scale.unsqueeze(-1))
        return out


def _take_rows(a, rows: slice, B: int):
    if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == B:
        return a[rows]
    return a


def _scatter_rows(outs: list[tuple[slice, Any]], B: int):
    """Concatenate the groups' outputs (groups are consecutive slices), padding the last dim
    to the widest (heads of different ``num_labels``)."""
    first = outs[0][1]
    if isinstance(first, (tuple, list)):
        return type(first)(_scatter_rows([(r, y[i]) for r, y in outs], B) for i in range(len(first)))
    if not isinstance(first, torch.Tensor):
        return first
    ys = [y for _, y in outs]
    if first.dim() >= 2:
        width = max(y.shape[-1] for y in ys)
        ys = [y if y.shape[-1] == width else F.pad(y, (0, width - y.shape[-1])) for y in ys]
    return torch.cat(ys, dim=0)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
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
        max_length: int | None = None,
        tokenizer: Any = None,
        self_check: bool = True,
        stacked: bool | None = None,
        cpu_kernel: bool | None = None,
        triton_kernel: bool | None = None,
    ):
        if dtype not in _DTYPES:
            raise InvalidInputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
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
            cls = self._seqcls_class(base)
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
        self._wrap_layers()
        self._lock = threading.RLock()
        self._tenants: dict[str, Tenant] = {}
        self._by_slot: dict[int, Tenant] = {}
        self._next_slot = 0
        self._cache = WorkingCache(cache_bytes)
        self._validated: weakref.WeakValueDictionary[int, DeltaArtifact] = weakref.WeakValueDictionary()
        self._ctx: BatchContext | None = None
        self.base_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        if self_check:
            self._self_check()
        logger.info("engine ready: %s (%s) on %s/%s, %.1f MB base, %s", self.architecture, self.base_name,
                    self.device, dtype, self.base_bytes / 1e6,
                    "compiled CPU kernel" if self._kernel is not None else
                    "Triton kernels" if self._triton is not None else "plain PyTorch layers")

    # -- construction helpers ----------------------------------------------------------------
    def _triton_module(self, wanted: bool | None):
        if wanted is False or (wanted is None and self.device.type != "cuda"):
            return None
        from . import triton_kernel as tk

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
    def _seqcls_class(base) -> type:
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

    @staticmethod
    def _load_tokenizer(base):
        if isinstance(base, nn.Module):
            return None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(os.fspath(base))
        except Exception:  # noqa: BLE001 - a base without tokenizer files can still run forward()
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
        for name, m in reversed(targets):  # children before parents: paths stay valid
            self._layer_params[name] = {n: tuple(p.shape) for n, p in m.named_parameters(recurse=False)}
            _replace_submodule(self.model, name, TenantLayer(name, m, self))
        # names of the full model's parameters -> (module, local name)
        self._param_owner: dict[str, tuple[str, str]] = {}
        for mname, params in self._layer_params.items():
            for pname in params:
                self._param_owner[f"{mname}.{pname}"] = (mname, pname)
        self._head_params = self._find_head_params()

    def _find_head_params(self) -> set[str]:
        """Linear output layers whose width is the number of labels (may differ per tenant)."""
        n = getattr(self.config, "num_labels", None)
        heads = set()
        for mname, params in self._layer_params.items():
            w = params.get("weight")
            if w is not None and len(w) == 2 and w[0] == n:
                heads.add(f"{mname}.weight")
                if "bias" in params:
                    heads.add(f"{mname}.bias")
        return heads

    def _self_check(self) -> None:
        """Prove on this architecture that a mixed batch equals per-model forwards.

        Some models read weights outside their modules' ``forward`` (DeBERTa's relative
        position table, for one); per-row deltas would then be silently skipped. A synthetic
        tenant with a random 1-bit delta on every matrix is run next to a base row and compared
        with ``functional_call`` on the merged weights; a mismatch refuses the architecture.
        """
        g = torch.Generator().manual_seed(0)
        layers: dict[str, dict[str, ParamDelta]] = {}
        merged: dict[str, torch.Tensor] = {}
        for full, (mname, pname) in self._param_owner.items():
            p = getattr(self._module(mname), pname).detach()
            if p.dim() < 2 or not p.is_floating_point():
                continue
            n = p.numel()
            signs = torch.randint(0, 256, (math.ceil(n / 8),), dtype=torch.uint8, generator=g).to(self.device)
            scale = torch.full((p.shape[0],), 0.05 * float(p.float().std() + 1e-3), device=self.device, dtype=self.dtype)
            sd = SignDelta(tuple(p.shape), signs, scale, "row")
            layers.setdefault(mname, {})[pname] = ParamDelta("sign", sign=sd)
            merged[f"{mname}.base.{pname}"] = merged_weight(p, sd, scale)
        probe = Tenant(None, -2, layers, 0, None, "", 0)
        vocab = int(getattr(self.config, "vocab_size", 0) or 100)
        ids = torch.randint(min(5, vocab - 1), min(vocab, 100), (2, 8), generator=g).to(self.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            self._ctx = BatchContext(2, [(-2, slice(0, 1)), (BASE_SLOT, slice(1, 2))], {-2: probe})
            try:
                mixed = _logits(self.model(**enc)).float()
            except InvalidInputError as e:
                raise ModelLoadError(f"{self.architecture} cannot be served by the mixed-batch engine: {e}") from None
            finally:
                self._ctx = None
            ref_t = _logits(torch.func.functional_call(self.model, merged, (), {k: v[:1] for k, v in enc.items()},
                                                       strict=False)).float()
            ref_b = _logits(self.model(**{k: v[1:] for k, v in enc.items()})).float()
        ref = torch.cat([ref_t, ref_b])
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        err = float((mixed - ref).abs().max() / (ref.abs().max() + 1e-6))
        if not err <= tol:
            raise ModelLoadError(
                f"{self.architecture} cannot be served by the mixed-batch engine: a self-check of per-row "
                f"deltas differs from per-model forwards (relative error {err:.2e}); its layers likely read "
                "weights outside forward()"
            )
        logger.debug("self-check passed for %s (relative error %.1e)", self.architecture, err)

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
        return self.model.get_submodule(mname).base

    def unregister(self, name: str) -> None:
        with self._lock:
            t = self._tenants.pop(name, None)
            if t is None:
                raise UnknownModelError(f"model {name!r} is not registered")
            self._by_slot.pop(t.slot, None)
            self._cache.drop(t.slot)
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
        with self._lock:
            ctx = self._make_context(tenants, B, next(iter(encodings.values())).numel() // B)
            enc = {k: v.to(self.device) for k, v in encodings.items()}
            if ctx.perm is not None:
                enc = {k: v.index_select(0, ctx.perm) for k, v in enc.items()}
            self._ctx = ctx
            try:
                with torch.inference_mode():
                    logits = _logits(self.model(**enc))
            finally:
                self._ctx = None
        if ctx.perm is not None:
            logits = torch.empty_like(logits).index_copy_(0, ctx.perm, logits)
        return logits

    def _make_context(self, tenants: list[Tenant | None], B: int, tokens_per_row: int = 1) -> BatchContext:
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
            # per layer beats the kernel's tiles there, and small groups never need the cache
            # (the Triton kernel never needs merged weights)
            large = self._triton is None and (self._kernel is None or len(rows) * tokens_per_row >= self.fused_max_tokens)
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
                "cpu_kernel": self._kernel is not None,
                "triton_kernel": self._triton is not None,
                "tenants": tenants,
            }


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


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


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
