"""One base model + a pool of packed 1-bit deltas -> one batched forward for mixed fine-tunes.

How a batch runs
----------------
Every row of a batch names a tenant (a registered delta) or the base. Before the forward the
engine computes *groups*: ``(slot, row_indices)`` per tenant present. Every parameter-bearing
module of the base model is wrapped once (:class:`TenantLayer`, its class chosen by the module's
exact type); in the forward a wrapper

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

Everything that is not a parameterised module (attention, activations, pooling) runs once for
the whole batch. Heads may differ per tenant (``num_labels``, label names, problem type): the
logits are padded to the widest head in the batch and cut per row afterwards. A batch of one
tenant alone takes a fast path decided once per batch (each layer runs that tenant's weights,
cached merged weights where the cache admits the tenant).

Parameters read outside a module's ``forward`` (DeBERTa's relative-position table): reading a
wrapped layer's parameter gives the running batch's value, in a mixed batch a
:class:`GroupedValue` (one part per tenant group) that layers and tensor operations apply part
by part; a module whose code combines it with per-row data runs once per group
(:class:`GroupSplit`). The start-up self-check finds those modules and picks the engine's
``path``: ``"mixed"``, or ``"fallback"`` (one forward per tenant group) where no set of such
modules makes a mixed batch exact.

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
    # the whole batch is one tenant's rows (that tenant) / only base rows: decided once here so
    # that every layer's forward takes its fast path with one attribute read
    single: Tenant | None = field(default=None, init=False)
    base_only: bool = field(default=False, init=False)
    _narrowed: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if len(self.groups) == 1:
            slot = self.groups[0][0]
            self.base_only = slot == BASE_SLOT
            self.single = None if self.base_only else self.tenants[slot]

    def narrow(self, g: int) -> "BatchContext":
        """The context of group ``g`` alone (its rows renumbered from 0), for modules that run
        once per group."""
        if not self._narrowed:
            for slot, rows in self.groups:
                n = rows.stop - rows.start
                t = self.tenants.get(slot)
                self._narrowed.append(BatchContext(n, [(slot, slice(0, n))], {slot: t} if t else {}, self.admitted))
        return self._narrowed[g]


class _Runtime:
    """What the wrapped layers share with the engine: the running batch's context (set for
    the duration of one forward, ``None`` outside), the working-weight cache, the cache of
    tenant-derived constants, the compiled CPU kernel and the Triton kernels (the module and
    the tenants' table rows; ``None`` when off). One narrow object instead of a back-pointer
    to the engine."""

    def __init__(self, cache: "WorkingCache", derived: "DerivedCache", kernel, const_ids: set[int],
                 triton=None, triton_tables=None):
        self.ctx: BatchContext | None = None
        self.cache = cache
        self.derived = derived
        self.kernel = kernel
        self.const_ids = const_ids  # ids of the base model's parameters and buffers
        self.triton = triton  # bitdelta_core.triton_kernel, or None
        self.triton_tables = triton_tables  # triton_kernel.DeltaTables: tenant -> table row


class DerivedCache:
    """Tensors computed from one tenant's parameters alone (no request data), by key:
    e.g. DeBERTa's relative-position embeddings after each attention layer's projections.
    They are the same on every forward, so a mixed batch computes them once per tenant
    instead of once per tenant per batch. LRU bounded by ``budget`` bytes; dropped with the
    tenant."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.used = 0
        self._d: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    def get(self, slot: int, key: str) -> torch.Tensor | None:
        t = self._d.get((slot, key))
        if t is not None:
            self._d.move_to_end((slot, key))
        return t

    def put(self, slot: int, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if n > self.budget or (slot, key) in self._d:
            return
        while self.used + n > self.budget and self._d:
            _, old = self._d.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self._d[(slot, key)] = t
        self.used += n

    def drop(self, slot: int) -> None:
        for k in [k for k in self._d if k[0] == slot]:
            t = self._d.pop(k)
            self.used -= t.numel() * t.element_size()


class NeedsSplitError(RuntimeError):
    """A value that differs per tenant group met per-row batch data outside a wrapped layer:
    the module doing it must run once per group (found by the start-up self-check)."""


_SIMPLE = (int, float, bool, str, slice, type(None), type(Ellipsis), torch.dtype, torch.device, torch.Size)


def _simple_repr(x) -> str | None:
    """A stable description of an op argument, or None when it is not a plain value."""
    if isinstance(x, (tuple, list)):
        parts = [_simple_repr(v) for v in x]
        return None if any(p is None for p in parts) else "(" + ",".join(parts) + ")"
    return repr(x) if isinstance(x, _SIMPLE) else None


class GroupedValue:
    """A value without a batch axis that differs per tenant group: a tenant's parameter read
    outside its module's ``forward`` (DeBERTa's ``rel_embeddings.weight``), or a wrapped layer
    applied to one. ``parts[g]`` belongs to group ``g`` of the running context.

    Torch functions and tensor methods apply part by part. Combined with per-row data (any
    other tensor of one or more dimensions that is not a base parameter or buffer) it raises
    :class:`NeedsSplitError` in a mixed batch, and unwraps to its one part when the running
    context holds one group. ``key`` describes how the value was derived from parameters alone
    (``None`` once request data is involved); wrapped layers cache their outputs on keyed
    inputs per tenant (:class:`DerivedCache`).
    """

    __slots__ = ("parts", "key", "_rt")

    def __init__(self, parts: list, key: str | None, rt: _Runtime):
        self.parts = parts
        self.key = key
        self._rt = rt

    # metadata is the same for every part
    shape = property(lambda self: self.parts[0].shape)
    dtype = property(lambda self: self.parts[0].dtype)
    device = property(lambda self: self.parts[0].device)
    ndim = property(lambda self: self.parts[0].ndim)
    is_cuda = property(lambda self: self.parts[0].is_cuda)
    requires_grad = property(lambda self: False)

    def size(self, *a):
        return self.parts[0].size(*a)

    def dim(self):
        return self.parts[0].dim()

    def numel(self):
        return self.parts[0].numel()

    def __len__(self):
        return len(self.parts[0])

    def __getattr__(self, name):
        attr = getattr(self.parts[0], name)
        if callable(attr):
            meth = getattr(torch.Tensor, name)
            return lambda *a, **k: GroupedValue.__torch_function__(meth, (), (self, *a), k)
        if isinstance(attr, torch.Tensor):  # .T, .mT, ...
            return GroupedValue([getattr(p, name) for p in self.parts],
                                None if self.key is None else f"{self.key}.{name}", self._rt)
        return attr

    def __getitem__(self, idx):
        return GroupedValue.__torch_function__(torch.Tensor.__getitem__, (), (self, idx), {})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        gvs = [v for v in flat if isinstance(v, GroupedValue)]
        n = len(gvs[0].parts)
        rt = gvs[0]._rt
        if any(len(v.parts) != n for v in gvs):
            raise NeedsSplitError(f"{getattr(func, '__name__', func)} combines values of different batches")
        data = [v for v in flat if isinstance(v, torch.Tensor) and v.dim() >= 1 and id(v) not in rt.const_ids]
        if data and n > 1:
            raise NeedsSplitError(f"{getattr(func, '__name__', func)} combines a per-tenant value with batch data")
        outs = []
        for g in range(n):
            a, k = torch.utils._pytree.tree_unflatten([v.parts[g] if isinstance(v, GroupedValue) else v for v in flat], spec)
            outs.append(func(*a, **k))
        if data:  # one group: the value is the same for every row, a plain result
            return outs[0]
        key = None
        if all(v.key is not None for v in gvs):
            described = [v.key if isinstance(v, GroupedValue) else _simple_repr(v) for v in flat]
            if all(d is not None for d in described):
                key = f"{getattr(func, '__name__', func)}[{','.join(described)}]"
        return _group_results(outs, key, rt)

    def _binary(op, reverse=False):
        def f(self, other):
            return GroupedValue.__torch_function__(op, (), (other, self) if reverse else (self, other), {})
        return f

    __add__, __radd__ = _binary(torch.add), _binary(torch.add, True)
    __sub__, __rsub__ = _binary(torch.sub), _binary(torch.sub, True)
    __mul__, __rmul__ = _binary(torch.mul), _binary(torch.mul, True)
    __truediv__, __rtruediv__ = _binary(torch.div), _binary(torch.div, True)
    __matmul__, __rmatmul__ = _binary(torch.matmul), _binary(torch.matmul, True)
    __pow__ = _binary(torch.pow)
    del _binary

    def __neg__(self):
        return GroupedValue.__torch_function__(torch.neg, (), (self,), {})


def _group_results(outs: list, key: str | None, rt: _Runtime):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return GroupedValue(outs, key, rt)
    if isinstance(first, (tuple, list)) and not isinstance(first, torch.Size):
        return type(first)(_group_results([o[i] for o in outs], None if key is None else f"{key}#{i}", rt)
                           for i in range(len(first)))
    if all(o == first for o in outs[1:]):
        return first
    raise NeedsSplitError("a per-tenant value produced results that differ per group and are not tensors")


def _has_grouped(args, kwargs) -> bool:
    return any(isinstance(a, GroupedValue) for a in args) or any(isinstance(v, GroupedValue) for v in kwargs.values())


def _part(a, g: int):
    """Argument ``a`` for group ``g`` of a context (a one-part value for grouped ones)."""
    return GroupedValue([a.parts[g]], a.key, a._rt) if isinstance(a, GroupedValue) else a


def _unwrap(a):
    return a.parts[0] if isinstance(a, GroupedValue) else a


# ---------------------------------------------------------------------------------------------
# layer kernels: how to run a module with explicit parameters (registry by exact type)
# ---------------------------------------------------------------------------------------------
Kernel = Callable[[nn.Module, dict[str, torch.Tensor], tuple, dict], Any]
_KERNELS: dict[type, Kernel] = {}


def register_kernel(cls: type) -> Callable[[Kernel], Kernel]:
    """Register a functional kernel ``fn(module, params, args, kwargs)`` for modules of exactly
    type ``cls`` (a subclass may lay out its inputs differently: it takes the generic path
    until a kernel is registered for it too)."""

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
    Conv1D = None


_STACKABLE = {_linear} | ({_conv1d} if Conv1D is not None else set())


def _generic_kernel(m, p, args, kwargs):
    return torch.func.functional_call(m, p, args, kwargs, strict=False)


def _kernel_for(module: nn.Module) -> Kernel:
    return _KERNELS.get(type(module), _generic_kernel)


# ---------------------------------------------------------------------------------------------
# wrappers: one per parameter-bearing module, its class chosen once at wrap time
# ---------------------------------------------------------------------------------------------
class TenantLayer(nn.Module):
    """Wraps one parameter-bearing module; applies each row's tenant parameters.

    The generic wrapper runs the module's kernel (:data:`_KERNELS`, by exact type, else
    ``functional_call``) with each group's parameters; a module with children runs once per
    group with the running context narrowed to that group, so its wrapped children apply that
    group's tenant. Subclasses specialise embeddings and Linear-like layers (:func:`wrap`).
    """

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__()
        self.name = name
        self.base = base
        self._rt = rt
        self.kernel = _kernel_for(base)
        self.param_names = [n for n, _ in base.named_parameters(recurse=False)]
        self._keys = {p: f"{name}.{p}" for p in self.param_names}
        self._nested = any(True for _ in base.children())

    def __getattr__(self, name: str):
        # code that reads e.g. ``layer.weight`` directly sees the running batch's value of it:
        # the base's, the one tenant's, or a GroupedValue when the batch mixes tenants
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules["base"]
            if name in self._keys:
                ctx = self._rt.ctx
                if ctx is not None and not ctx.base_only:
                    return self._read_param(name, ctx)
            return getattr(base, name)

    def _read_param(self, pname: str, ctx: BatchContext):
        base_p = getattr(self._modules["base"], pname)
        if ctx.single is not None:
            d = ctx.single.layers.get(self.name)
            return base_p if d is None or pname not in d else self._param(ctx.single, pname, d[pname], ctx)
        if not any(pname in t.layers.get(self.name, ()) for t in ctx.tenants.values()):
            return base_p
        parts = []
        for slot, _ in ctx.groups:
            d = ctx.tenants[slot].layers.get(self.name, {}).get(pname) if slot != BASE_SLOT else None
            parts.append(base_p if d is None else self._param(ctx.tenants[slot], pname, d, ctx))
        return GroupedValue(parts, self._keys[pname], self._rt)

    def forward(self, *args, **kwargs):
        ctx = self._rt.ctx
        if ctx is None or ctx.base_only:
            return self.base(*args, **kwargs)
        t = ctx.single
        if t is not None:
            d = t.layers.get(self.name)
            if _has_grouped(args, kwargs):
                return self._on_grouped(ctx, args, kwargs)
            return self.base(*args, **kwargs) if d is None else self._one(t, d, ctx, args, kwargs)
        if not any(self.name in t.layers for t in ctx.tenants.values()):
            if _has_grouped(args, kwargs):
                return self._on_grouped(ctx, args, kwargs)
            return self.base(*args, **kwargs)
        if _has_grouped(args, kwargs) or not self._batched(args[0] if args else None, ctx.batch_size):
            return self._on_grouped(ctx, args, kwargs)
        return self._mixed(ctx, args, kwargs)

    @staticmethod
    def _batched(x, B: int) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B

    # -- one group ------------------------------------------------------------------------
    def _one(self, t: Tenant, d: dict, ctx: BatchContext, args, kwargs):
        """The whole input through tenant ``t``'s parameters (``d``: its deltas here)."""
        return self.kernel(self.base, self._params(t, d, ctx), args, kwargs)

    def _group_out(self, slot: int, ctx: BatchContext, args, kwargs):
        t = ctx.tenants.get(slot)
        d = t.layers.get(self.name) if t is not None else None
        if d is None:
            return self.base(*args, **kwargs)
        return self._one(t, d, ctx, args, kwargs)

    def _on_grouped(self, ctx: BatchContext, args, kwargs):
        """Input without a batch axis (a GroupedValue or a tensor shared by all rows): the
        output differs per group, a GroupedValue (cached per tenant when the input was derived
        from parameters alone)."""
        gvs = [a for a in (*args, *kwargs.values()) if isinstance(a, GroupedValue)]
        key = None
        if gvs and all(v.key is not None for v in gvs):
            described = [a.key if isinstance(a, GroupedValue) else _simple_repr(a) for a in (*args, *kwargs.values())]
            if all(x is not None for x in described):
                key = f"{self.name}({','.join(described)}{','.join(kwargs)})"
        parts = []
        for g, (slot, _) in enumerate(ctx.groups):
            y = self._rt.derived.get(slot, key) if key is not None else None
            if y is None:
                sub = ctx.narrow(g) if len(ctx.groups) > 1 else ctx
                y = self._in_context(sub, lambda: self._group_out(
                    slot, sub, tuple(_unwrap(_part(a, g)) for a in args),
                    {k: _unwrap(_part(v, g)) for k, v in kwargs.items()}))
                if key is not None and isinstance(y, torch.Tensor):
                    self._rt.derived.put(slot, key, y)
            parts.append(y)
        return _group_results(parts, key, self._rt)

    def _in_context(self, sub: BatchContext, fn):
        rt = self._rt
        outer = rt.ctx
        rt.ctx = sub
        try:
            return fn()
        finally:
            rt.ctx = outer

    # -- mixed batch ----------------------------------------------------------------------
    def _mixed(self, ctx: BatchContext, args, kwargs):
        B = ctx.batch_size
        outs = []
        for g, (slot, rows) in enumerate(ctx.groups):
            sub_args = tuple(_take_rows(a, rows, B) for a in args)
            sub_kwargs = {k: _take_rows(v, rows, B) for k, v in kwargs.items()}
            if self._nested:  # wrapped children must see this group alone
                y = self._in_context(ctx.narrow(g), lambda: self._group_out(slot, ctx.narrow(g), sub_args, sub_kwargs))
            else:
                y = self._group_out(slot, ctx, sub_args, sub_kwargs)
            outs.append((rows, y))
        return _scatter_rows(outs, B)

    # -- parameters of one tenant for this layer -------------------------------------------
    def _group_params(self, slot: int, ctx: BatchContext) -> dict[str, torch.Tensor]:
        """This layer's parameters for one group: the base's for base rows and for tenants
        that leave the layer alone, else the tenant's (:meth:`_params`)."""
        t = ctx.tenants.get(slot)
        d = t.layers.get(self.name) if t is not None else None
        if d is None:
            return {n: getattr(self.base, n) for n in self.param_names}
        return self._params(t, d, ctx)

    def _params(self, t: Tenant, d: dict[str, ParamDelta], ctx: BatchContext) -> dict[str, torch.Tensor]:
        base = self.base
        return {p: getattr(base, p) if p not in d else self._param(t, p, d[p], ctx) for p in self.param_names}

    # -- Triton tables (CUDA; bitdelta_core.triton_kernel), used by Linear-like and embedding layers
    def _triton_table(self):
        """This layer's device table of the tenants' delta addresses (written once per tenant)."""
        base = self.base
        return self._rt.triton.LayerTable(self._rt.triton_tables, base.weight.detach(),
                                          getattr(base, "bias", None), self._triton_entry)

    def _triton_entry(self, tenant: Tenant):
        """This layer's table entry for a tenant: its 1-bit weight and bias (``None``: the base's),
        or ``"dense"`` for a replacement weight (heads), which the kernel does not cover."""
        d = tenant.layers.get(self.name, {})
        wd, bd = d.get("weight"), d.get("bias")
        if (wd is not None and wd.kind != "sign") or (bd is not None and bd.kind != "dense"):
            return "dense"
        if wd is None and bd is None:
            return None
        tk = self._rt.triton
        bias = getattr(self.base, "bias", None) if bd is None else bd.dense
        if wd is None:
            return tk.DeltaGroup(0, 0, bias=bias)
        return tk.DeltaGroup(0, 0, wd.sign.signs, wd.sign.scale, wd.index, bias)

    def _triton_rows(self, ctx: BatchContext) -> list[int]:
        """Each group's table row, computed once per forward and shared by every layer."""
        rows = ctx.plans.get("rows")
        if rows is None:
            tables = self._rt.triton_tables
            rows = ctx.plans["rows"] = [tables.row(None if slot == BASE_SLOT else ctx.tenants[slot])
                                        for slot, _ in ctx.groups]
        return rows

    def _param(self, t: Tenant, pname: str, d: ParamDelta, ctx: BatchContext) -> torch.Tensor:
        if d.kind == "dense":
            return d.dense
        cache = self._rt.cache
        key = self._keys[pname]
        admitted = t.slot in ctx.admitted
        w = cache.get(t.slot, key) if admitted else None
        if w is None:
            w = merged_weight(getattr(self.base, pname).detach(), d.sign, d.sign.scale, d.index)
            if admitted:
                cache.put(t.slot, key, w)
        return w


class LinearLayer(TenantLayer):
    """``nn.Linear`` and GPT-2 ``Conv1D`` (exact types): groups write straight into their rows
    of one output; 1-bit weights run through the compiled fused kernel where it applies, all
    groups of the batch in one call; on CUDA the one-launch Triton kernel when the engine has
    it, else the stacked batched-matmul path."""

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__(name, base, rt)
        self.conv = type(base) is not nn.Linear  # Conv1D: weight (in, out)
        w = base.weight
        # rows of the packed signs start on a byte: Linear (out, in) needs in % 8 == 0, Conv1D
        # (in, out) out % 8 == 0; the kernel reads the base weight in place (contiguous fp32)
        self.fused = (rt.kernel is not None and w.dim() == 2 and w.shape[1] % 8 == 0
                      and w.dtype == torch.float32 and w.is_contiguous())
        self.width = w.shape[1 if self.conv else 0]
        # every group of a batch in one Triton launch (CUDA), when the engine runs the kernels
        self._table = self._triton_table() if rt.triton is not None and w.dim() == 2 else None

    def _one(self, t, d, ctx, args, kwargs):
        if len(args) != 1 or kwargs:
            return self.kernel(self.base, self._params(t, d, ctx), args, kwargs)
        x = args[0]
        if self._table is not None and len(ctx.groups) == 1 and ctx.groups[0][0] == t.slot:
            y = self._triton_forward(x, ctx)
            if y is not None:
                return y
        if self.fused and t.slot not in ctx.admitted:
            f = self._fused_entry(d)
            if f is not None:
                K = x.shape[-1]
                out = x.new_empty((*x.shape[:-1], self.width))
                cpu_kernel_mod.signed_linear_groups(self._rt.kernel, x.reshape(-1, K).contiguous(),
                                                    out.view(-1, self.width), self.base.weight.detach(),
                                                    [(0, x.numel() // K, *f)], transposed=self.conv)
                return out
        wd, bd = d.get("weight"), d.get("bias")
        w = self.base.weight if wd is None else self._param(t, "weight", wd, ctx)
        b = self.base.bias if bd is None else self._param(t, "bias", bd, ctx)
        if not self.conv:
            return F.linear(x, w, b)
        y = x.reshape(-1, x.shape[-1]) @ w if b is None else torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
        return y.reshape(*x.shape[:-1], w.shape[1])

    def _fused_entry(self, d: dict[str, ParamDelta]):
        """(signs, scale, index, bias) for the fused kernel, or None when this tenant's layer
        does not take it (a dense weight, a bias stored as 1-bit, no stored row)."""
        wd, bd = d.get("weight"), d.get("bias")
        if (wd is not None and wd.kind == "sign" and (bd is None or bd.kind == "dense")
                and (wd.index is None or wd.index.numel())):
            return wd.sign.signs, wd.sign.scale, wd.index, self.base.bias if bd is None else bd.dense
        return None

    def _mixed(self, ctx, args, kwargs):
        if len(args) == 1 and not kwargs:
            x = args[0]
            y = None
            if self._table is not None:
                y = self._triton_forward(x, ctx)
            if y is None and ctx.pad_index is not None:
                y = self._stacked(x, ctx)
            if y is None:
                y = self._grouped_linear(x, ctx)
            if y is not None:
                return y
        return super()._mixed(ctx, args, kwargs)

    def _grouped_linear(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """Each group's ``x_g W_gᵀ + b_g`` (Conv1D: ``x_g W_g + b_g``) written straight into its
        rows of one output (no concatenation pass); tenants with a 1-bit weight go through the
        compiled fused kernel when the layer has it. None when the groups' output widths differ
        (heads)."""
        conv, width = self.conv, self.width
        for slot, _ in ctx.groups:
            d = ctx.tenants[slot].layers.get(self.name, {}).get("weight") if slot != BASE_SLOT else None
            if d is not None and d.kind == "dense" and d.dense.shape[1 if conv else 0] != width:
                return None
        K = x.shape[-1]
        per_row = x[0].numel() // K  # tokens per batch row
        x2 = x.reshape(-1, K)
        out = x.new_empty((*x.shape[:-1], width))
        o2 = out.view(-1, width)
        fused = []
        for slot, rows in ctx.groups:
            s, e = rows.start * per_row, rows.stop * per_row
            t = ctx.tenants.get(slot)
            d = t.layers.get(self.name) if t is not None else None
            if d is not None and self.fused and slot not in ctx.admitted:
                f = self._fused_entry(d)
                if f is not None:
                    fused.append((s, e, *f))
                    continue
            p = self._params(t, d, ctx) if d is not None else {n: getattr(self.base, n) for n in self.param_names}
            w, b = p["weight"], p.get("bias")
            w = w if conv else w.t()
            if b is None:
                torch.mm(x2[s:e], w, out=o2[s:e])
            else:
                torch.addmm(b, x2[s:e], w, out=o2[s:e])
        if fused:
            cpu_kernel_mod.signed_linear_groups(self._rt.kernel, x2.contiguous(), o2,
                                                self.base.weight.detach(), fused, transposed=conv)
        return out

    # -- Triton path (CUDA; bitdelta_core.triton_kernel) -----------------------------------
    def _triton_forward(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """The layer for every group in one Triton launch (:mod:`.triton_kernel`): the base weight
        plus each group's ``α ⊙ sign(Δ)`` unpacked in the kernel, no merged weight. Per layer the
        host only launches: the tenants' delta addresses sit in the layer's device table (written
        once per tenant) and the forward's tile plan is shared by all layers. None (the other
        paths run) where the kernel does not apply: another dtype, an input not per batch row."""
        if not isinstance(x, torch.Tensor):
            return None
        tk = self._rt.triton
        rows = self._triton_rows(ctx)
        table = self._table
        table.sync()
        if table.dense_rows and not table.dense_rows.isdisjoint(rows):
            return self._triton_groups(x, ctx)  # tenants with their own weight here (heads)
        w = table.weight
        K, width = x.shape[-1] if x.dim() else 0, self.width
        if x.dtype != w.dtype or K != w.shape[0 if self.conv else 1] or x.numel() == 0:
            return None
        M = x.numel() // K
        B = ctx.batch_size
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
        tk.launch_linear(x2, w, out.view(-1, width), table.table, plan, transposed=self.conv,
                         has_bias=getattr(self.base, "bias", None) is not None)
        return out

    def _triton_groups(self, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """:meth:`_triton_forward` for a layer where some tenants bring their own dense weight
        (classification heads): the kernel runs the other groups, those tenants an ordinary GEMM
        on their rows. None for heads of different widths (the other paths run)."""
        tk = self._rt.triton
        w = self.base.weight.detach()
        B = ctx.batch_size
        conv, width = self.conv, self.width
        K = x.shape[-1] if x.dim() else 0
        if x.dtype != w.dtype or K != w.shape[0 if conv else 1] or x.numel() == 0:
            return None
        if len(ctx.groups) == 1:
            spans = [(0, x.numel() // K)]
        elif x.dim() >= 2 and x.shape[0] == B:
            per_row = x[0].numel() // K
            spans = [(sl.start * per_row, sl.stop * per_row) for _, sl in ctx.groups]
        else:
            return None
        bias = getattr(self.base, "bias", None)
        groups, dense = [], []
        for (slot, _), (s, e) in zip(ctx.groups, spans):
            entry = None if slot == BASE_SLOT else self._triton_entry(ctx.tenants[slot])
            if entry == "dense":
                d = ctx.tenants[slot].layers[self.name]
                wd, bd = d.get("weight"), d.get("bias")
                if wd is None or wd.kind != "dense" or wd.dense.shape != w.shape:
                    return None
                dense.append((s, e, wd.dense, bias if bd is None else bd.dense))
                groups.append(tk.DeltaGroup(s, s, bias=bias))
            else:
                g = entry or tk.DeltaGroup(s, e, bias=bias)
                g.start, g.end = s, e
                groups.append(g)
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
        if not self.conv:  # (G, out, in) -> (G, in, out); Conv1D is already (in, out)
            W = W.transpose(1, 2)
        xf = xp.reshape(G, -1, x.shape[-1])
        y = torch.bmm(xf, W) if bs[0] is None else torch.baddbmm(torch.stack(bs).unsqueeze(1), xf, W)
        return y.reshape(G, ctx.rmax, *x.shape[1:-1], W.shape[-1])[g_idx, r_idx]


class EmbeddingLayer(TenantLayer):
    """``nn.Embedding`` (exact type): ``E_base[ids] + α[ids] ⊙ sign(Δ)[ids]`` gathered straight
    from the packed signs; only the bytes of the looked-up rows are read (with the Triton
    kernels: every row of the batch in one launch)."""

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__(name, base, rt)
        self._table = self._triton_table() if rt.triton is not None and base.max_norm is None else None

    def forward(self, *args, **kwargs):
        ctx = self._rt.ctx
        if ctx is None or ctx.base_only or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return super().forward(*args, **kwargs)
        ids = args[0]
        t = ctx.single
        if t is not None:
            d = t.layers.get(self.name, {}).get("weight")
            if d is not None and self._table is not None:
                out = self._triton_forward(ids, ctx)
                if out is not None:
                    return out
            out = F.embedding(ids, self.base.weight, self.base.padding_idx)
            return out if d is None else self._add_delta(out, ids, d)
        if not any(self.name in t.layers for t in ctx.tenants.values()):
            return self.base(ids)
        B = ctx.batch_size
        if ids.dim() == 0 or ids.shape[0] not in (1, B):
            return self._on_grouped(ctx, args, kwargs)  # ids shared by all rows, not per row
        if self._table is not None:
            out = self._triton_forward(ids, ctx)
            if out is not None:
                return out
        if ids.shape[0] != B:  # (1, L) positions: the same for every row, each row's table
            ids = ids.expand(B, *ids.shape[1:])
        out = F.embedding(ids, self.base.weight, self.base.padding_idx)
        for slot, rows in ctx.groups:
            if slot == BASE_SLOT:
                continue
            d = ctx.tenants[slot].layers.get(self.name, {}).get("weight")
            if d is not None:
                out[rows] = self._add_delta(out[rows], ids[rows], d)
        return out

    def _one(self, t, d, ctx, args, kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and "weight" in d:
            ids = args[0]
            return self._add_delta(F.embedding(ids, self.base.weight, self.base.padding_idx), ids, d["weight"])
        return super()._one(t, d, ctx, args, kwargs)

    def _triton_forward(self, ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor | None:
        """Every batch row's lookup in one Triton launch, each row reading its group's table row
        (:func:`.triton_kernel.launch_embedding`); None where the kernel does not apply (ids not
        per batch row, a tenant with a dense table here)."""
        B = ctx.batch_size
        if ids.dim() < 1 or ids.shape[0] not in (1, B) or ids.is_floating_point():
            return None
        rows = self._triton_rows(ctx)
        table = self._table
        table.sync()
        if table.dense_rows and not table.dense_rows.isdisjoint(rows):
            return None
        trow = ctx.plans.get("rows_per_batch_row")
        if trow is None:
            per_row = [r for r, (_, sl) in zip(rows, ctx.groups) for _ in range(sl.stop - sl.start)]
            trow = ctx.plans["rows_per_batch_row"] = self._rt.triton.metadata_tensor(per_row, ids.device, torch.int32)
        if ids.shape[0] != B:
            ids = ids.expand(B, *ids.shape[1:])
        return self._rt.triton.launch_embedding(ids, table.weight, table.table, trow)

    def _add_delta(self, out: torch.Tensor, ids: torch.Tensor, d: ParamDelta) -> torch.Tensor:
        m = self.base
        if d.kind == "dense":
            return F.embedding(ids, d.dense, m.padding_idx)
        scale = d.sign.scale
        if d.index is not None:  # stored rows only: find each id's position, 0 scale if absent
            if not d.index.numel():
                return out
            pos = torch.searchsorted(d.index, ids.contiguous()).clamp_(max=d.index.numel() - 1)
            scale = torch.where(d.index[pos] == ids, scale[pos], 0)
            ids = pos
        else:
            scale = scale[ids]
        signs = unpack_sign_rows(d.sign.signs, m.embedding_dim, ids, out.dtype)
        return torch.addcmul(out, signs, scale.unsqueeze(-1))


def wrap(name: str, module: nn.Module, rt: _Runtime) -> TenantLayer:
    """The wrapper for one parameter-bearing module, chosen by its exact type."""
    cls = _WRAPPERS.get(type(module), TenantLayer)
    return cls(name, module, rt)


_WRAPPERS: dict[type, type[TenantLayer]] = {nn.Linear: LinearLayer, nn.Embedding: EmbeddingLayer}
if Conv1D is not None:
    _WRAPPERS[Conv1D] = LinearLayer


class GroupSplit(nn.Module):
    """Runs a (parameter-free) module once per tenant group, the running context narrowed to
    that group: for modules whose code combines per-tenant values read outside a layer's
    ``forward`` with per-row data (DeBERTa's disentangled attention). Chosen by the start-up
    self-check; everything outside such modules still runs once for the whole batch."""

    def __init__(self, name: str, base: nn.Module, rt: _Runtime):
        super().__init__()
        self.name = name
        self.base = base
        self._rt = rt

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, *args, **kwargs):
        ctx = self._rt.ctx
        if ctx is None or len(ctx.groups) == 1:
            return self.base(*args, **kwargs)
        return _run_per_group(self.base, self._rt, ctx, args, kwargs)


def _run_per_group(fn, rt: _Runtime, ctx: BatchContext, args, kwargs):
    B = ctx.batch_size
    outs = []
    for g, (_, rows) in enumerate(ctx.groups):
        sub_args = tuple(_part(_take_rows(a, rows, B), g) for a in args)
        sub_kwargs = {k: _part(_take_rows(v, rows, B), g) for k, v in kwargs.items()}
        rt.ctx = ctx.narrow(g)
        try:
            outs.append((rows, fn(*sub_args, **sub_kwargs)))
        finally:
            rt.ctx = ctx
    return _scatter_rows(outs, B)


def _take_rows(a, rows: slice, B: int):
    if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == B:
        return a[rows]
    return a


def _scatter_rows(outs: list[tuple[slice, Any]], B: int):
    """Concatenate the groups' outputs (groups are consecutive slices), padding the last dim
    to the widest (heads of different ``num_labels``)."""
    first = outs[0][1]
    if isinstance(first, GroupedValue):
        return GroupedValue([y.parts[0] for _, y in outs], first.key, first._rt)
    if isinstance(first, dict):
        return type(first)(**{k: _scatter_rows([(r, y[k]) for r, y in outs], B) for k in first.keys()})
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
        derived_cache_bytes: int = 1 << 30,
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
        if self_check:
            self._self_check()
        logger.info("engine ready: %s (%s) on %s/%s, %.1f MB base, %s, %s path%s", self.architecture,
                    self.base_name, self.device, dtype, self.base_bytes / 1e6,
                    "compiled CPU kernel" if self._kernel is not None else
                    "Triton kernels" if self._triton is not None else "plain PyTorch layers", self.path,
                    f" ({len(self.per_group_modules)} modules per tenant group: "
                    f"{', '.join(sorted(set(self.per_group_modules)))})" if self.per_group_modules else "")

    # -- construction helpers ----------------------------------------------------------------
    def _triton_module(self, wanted: bool | None):
        """:mod:`.triton_kernel` when the engine runs its kernels, else None (``wanted=True``:
        :class:`~.triton_kernel.TritonUnavailableError` naming why they cannot run)."""
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
        """Prove on this architecture that a mixed batch equals per-model forwards; pick the path.

        Two synthetic tenants (a random 1-bit delta on every matrix, a dense change to every
        vector) and a base row run in one batch, compared row by row with ``functional_call``
        on each tenant's merged weights. Where the model's code combines a per-tenant value read
        outside a layer's ``forward`` with per-row data (DeBERTa's relative-position table) or
        otherwise fails on the mixed batch, the module running that code (and every module of
        its type) is set to run once per tenant group (:class:`GroupSplit`) and the check
        repeats. When that does not make the batch exact, mixed batches run one forward per
        tenant group ("fallback" path, checked the same way; as a last resort on the groups'
        merged weights). Only a model that cannot run at all is refused.
        """
        g = torch.Generator().manual_seed(0)
        probes, merged = {}, {}
        for slot in (-2, -3):
            probes[slot], merged[slot] = self._probe_tenant(slot, g)
        vocab = int(getattr(self.config, "vocab_size", 0) or 100)
        B, L = 5, 7
        ids = torch.randint(min(5, vocab - 1), min(vocab, 100), (B, L), generator=g).to(self.device)
        enc = {"input_ids": ids}
        if _accepts(self.model, "attention_mask"):
            enc["attention_mask"] = torch.ones_like(ids)
        groups = [(-2, slice(0, 2)), (BASE_SLOT, slice(2, 3)), (-3, slice(3, 5))]
        row_slot = [-2, -2, BASE_SLOT, -3, -3]
        live = {id(m): n for n, m in self.model.named_modules() if isinstance(m, TenantLayer)}
        names = {full: f"{live[id(self._layers[m])]}.base.{p}" for full, (m, p) in self._param_owner.items()}
        try:
            with torch.inference_mode():
                ref = torch.cat([
                    _logits(self.model(**{k: v[i:i + 1] for k, v in enc.items()})) if s == BASE_SLOT else
                    _logits(torch.func.functional_call(self.model, {names[k]: v for k, v in merged[s].items()}, (),
                                                       {k: v[i:i + 1] for k, v in enc.items()}, strict=False))
                    for i, s in enumerate(row_slot)]).float()
        except Exception as e:  # noqa: BLE001 - the model itself cannot run
            raise ModelLoadError(f"{self.architecture} cannot run a forward pass: {type(e).__name__}: {e}") from None
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        err, culprit = math.inf, None
        try:
            for _ in range(8):
                try:
                    mixed = self._probe_forward(enc, groups, probes)
                except Exception as e:  # noqa: BLE001 - any failure of the mixed batch: find who
                    culprit = self._culprit(e)
                    if culprit is None:
                        logger.info("self-check: the mixed batch fails (%s: %s)", type(e).__name__, e)
                        break
                    self._split_type(type(culprit))
                    continue
                err = _rel_err(mixed, ref)
                break
            if err <= tol:
                self.self_check_error = err
                logger.debug("self-check passed for %s on the mixed path (relative error %.1e)", self.architecture, err)
                return
            if err < math.inf:
                logger.info("self-check: the mixed batch differs from per-model forwards (relative error %.1e)", err)
            self.path = "fallback"
            try:
                err = _rel_err(self._probe_forward(enc, groups, probes), ref)
            except Exception as e:  # noqa: BLE001
                logger.info("self-check: per-group forwards fail (%s: %s)", type(e).__name__, e)
                err = math.inf
            if not err <= tol:
                self.path = "fallback-merged"
                err = _rel_err(self._probe_forward(enc, groups, probes), ref)
                if not err <= tol:  # pragma: no cover - this is the reference computation itself
                    raise ModelLoadError(f"{self.architecture}: per-group forwards on merged weights differ "
                                         f"from per-model forwards (relative error {err:.2e})")
            self.self_check_error = err
            logger.warning("%s: mixed batches run one forward per tenant group (%s path); the mixed path "
                           "did not reproduce per-model forwards", self.architecture, self.path)
        finally:
            for slot in probes:
                self._rt.derived.drop(slot)

    def _probe_tenant(self, slot: int, g: torch.Generator) -> tuple[Tenant, dict[str, torch.Tensor]]:
        layers: dict[str, dict[str, ParamDelta]] = {}
        merged: dict[str, torch.Tensor] = {}
        for full, (mname, pname) in self._param_owner.items():
            p = getattr(self._module(mname), pname).detach()
            if not p.is_floating_point():
                continue
            step = 0.05 * float(p.float().std() if p.numel() > 1 else p.float().abs().mean()) + 1e-3
            if p.dim() >= 2:
                signs = torch.randint(0, 256, (math.ceil(p.numel() / 8),), dtype=torch.uint8, generator=g).to(self.device)
                scale = torch.full((p.shape[0],), step, device=self.device, dtype=self.dtype)
                sd = SignDelta(tuple(p.shape), signs, scale, "row")
                d = ParamDelta("sign", sign=sd)
                merged[full] = merged_weight(p, sd, scale)
            else:
                dense = p + step * torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                d = ParamDelta("dense", dense=dense)
                merged[full] = dense
            layers.setdefault(mname, {})[pname] = d
        return Tenant(None, slot, layers, 0, None, "", 0), merged

    def _probe_forward(self, enc, groups, probes) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward_ctx(enc, BatchContext(enc["input_ids"].shape[0], groups, probes), strict=True).float()

    def _culprit(self, e: BaseException) -> nn.Module | None:
        """The innermost model module (not a wrapper, not a leaf, not the root) running when
        ``e`` was raised: the one to run once per tenant group."""
        wrapped = {id(m.base) for m in self.model.modules() if isinstance(m, (TenantLayer, GroupSplit))}
        ours = {id(m) for m in self.model.modules()}
        frames = []
        tb = e.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for f in reversed(frames):
            m = f.f_locals.get("self")
            if (isinstance(m, nn.Module) and id(m) in ours and m is not self.model and id(m) not in wrapped
                    and not isinstance(m, (TenantLayer, GroupSplit)) and any(True for _ in m.children())):
                return m
        return None

    def _split_type(self, cls: type) -> None:
        targets = [(n, m) for n, m in self.model.named_modules() if type(m) is cls]
        for name, m in reversed(targets):
            _replace_submodule(self.model, name, GroupSplit(name, m, self._rt))
            self.per_group_modules.append(cls.__name__)
        logger.info("self-check: %d %s module(s) run once per tenant group", len(targets), cls.__name__)

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
        with self._lock:
            ctx = self._make_context(tenants, B, next(iter(encodings.values())).numel() // B)
            enc = {k: v.to(self.device) for k, v in encodings.items()}
            if ctx.perm is not None:
                enc = {k: v.index_select(0, ctx.perm) for k, v in enc.items()}
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
        single = len(order) == 1
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
            # a batch of one tenant alone runs on its merged weights too when the cache takes it:
            # at a few tokens the fused kernel's per-call merge costs more than reading W_t
            # (the Triton kernels never need merged weights)
            large = self._triton is None and (self._kernel is None or single
                                              or len(rows) * tokens_per_row >= self.fused_max_tokens)
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
                "per_group_modules": sorted(set(self.per_group_modules)),
                "tenants": tenants,
            }


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return math.inf
    return float((got - ref).abs().max() / (ref.abs().max() + 1e-6))


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


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
