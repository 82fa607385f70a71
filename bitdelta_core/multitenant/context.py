"""What the wrapped layers see during one forward: the batch context, the runtime, per-group values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .tenants import BASE_SLOT, Tenant

if TYPE_CHECKING:
    from .cache import DerivedCache, WorkingCache


@dataclass
class PackedTokens:
    """The batch's real tokens, for Linear layers that skip padding: ``index`` holds the flat
    positions (row-major over the sorted ``(batch, seq_len)`` grid) of every token the attention
    mask keeps, and ``spans[g]`` group ``g``'s run of them, in the batch's group order. A Linear
    layer whose input is laid out on that grid computes these rows only; the padding positions
    of its output are zero (finite, and never read by a masked model's real tokens, which the
    start-up self-check proves per architecture)."""

    index: torch.Tensor
    pad: torch.Tensor  # the flat positions of the padding
    seq_len: int
    spans: list[tuple[int, int]]
    # the last input gathered and its real tokens: layers that read one input (the query, key
    # and value projections) gather it once. Inference tensors keep no version counter; a model
    # that changed that input in place between two such layers would fail the start-up
    # self-check, which runs the model's own code on a padded batch
    last: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens of ``x`` (``(batch, seq_len, features)``) as one matrix."""
        last = self.last
        if last is not None and last[0] is x:
            return last[1]
        xp = x.reshape(-1, x.shape[-1]).index_select(0, self.index)
        self.last = (x, xp)
        return xp

    def scatter(self, yp: torch.Tensor, batch: int) -> torch.Tensor:
        """``yp`` (one row per real token) on the ``(batch, seq_len)`` grid, padding rows zero."""
        out = yp.new_empty((batch, self.seq_len, yp.shape[-1]))
        flat = out.view(-1, yp.shape[-1])
        flat.index_copy_(0, self.index, yp)
        return flat.index_fill_(0, self.pad, 0).view(out.shape)


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
    # the real tokens of a padded batch (None: no padding, or the engine keeps padding)
    packed: PackedTokens | None = None
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


def packed_tokens(mask: torch.Tensor, ctx: BatchContext) -> PackedTokens:
    """The real tokens of the sorted batch's ``(batch, seq_len)`` attention mask, and each
    tenant group's run of them."""
    keep = mask.ne(0).reshape(-1)
    index, pad = keep.nonzero().squeeze(1), keep.logical_not().nonzero().squeeze(1)
    keep = keep.view(mask.shape)
    per_row = keep.sum(1).cumsum(0).tolist()
    spans = []
    for _, rows in ctx.groups:
        start = per_row[rows.start - 1] if rows.start else 0
        spans.append((start, per_row[rows.stop - 1]))
    return PackedTokens(index, pad, mask.shape[1], spans)


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
